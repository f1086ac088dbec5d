"""Figures: the sample-complexity figure and one training-curve figure per (V, N).

matplotlib is imported inside the functions (Agg canvas, no pyplot, no
display needed), so importing this module costs nothing.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from runner.jobfolders import local_folder
from runner.reporting.groups import group_of, label
from runner.reporting.results import MODEL_LABELS, Results, run_lines
from trainer.atomic import write_atomic
from trainer.files import read_metrics

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink",
          "tab:olive", "tab:cyan", "tab:red", "tab:gray"]
RUN_STYLES = ["-", "--", ":", "-."]
DPI = 120
MAIN_TITLE = ("Table connectivity: test-set balanced accuracy (top row) and accuracy "
              "(bottom row) vs number of training examples")
# A title line's mean character width in ems, with a margin: wrapping at width / (this x
# font size) keeps every line inside the figure (checked with the renderer in the tests).
CHAR_EMS = 0.62


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _label(model: str, group: str = "") -> str:
    return MODEL_LABELS.get(model, model) + (f"\n{group}" if group else "")


def wrap_title(lines: list[str], width_inches: float, fontsize: float) -> str:
    """The lines, each wrapped so that it fits the figure's width."""
    chars = max(20, int(width_inches * 72 / (fontsize * CHAR_EMS)))
    return "\n".join(part for line in lines
                     for part in (textwrap.wrap(line, chars, break_on_hyphens=False) or [""]))


def sample_complexity(results: Results, out: str | Path) -> Path:
    """Write the sample-complexity figure (see sample_complexity_figure) to `out` (PNG)."""
    fig = sample_complexity_figure(results)
    out = Path(out)
    write_atomic(out, lambda f: fig.savefig(f, format="png"))  # whole or absent
    return out


def sample_complexity_figure(results: Results):
    """Balanced accuracy (top) and accuracy (bottom) vs N, one panel per V, a line per model.

    Points: mean over the finished runs, error bars one sample standard
    deviation (never clipped: the y-range covers them), hollow circles the
    single runs. Panels of one row share their y-range. Dashed references: 50 %
    (any constant answer's balanced accuracy; a coin flip's accuracy) and the
    evaluation sets' majority-class rate (always answering the common class).
    The title says what was run (profile, steps, size, overrides), so a quick
    smoke sweep cannot pass for the study.
    """
    from matplotlib.ticker import FixedLocator, NullLocator, PercentFormatter

    rows = [r for r in results.rows if r["runs_finished"]]
    if not rows:
        raise ValueError("no job has finished yet: nothing to plot")
    Vs = sorted({r["V"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in results.rows))
    groups = list(dict.fromkeys(r.get("group", "") for r in results.rows))
    series = [(g, m) for g in groups for m in models]  # one line per config and model
    width = 5.0 * len(Vs) + 2.6
    fig = _figure(width, 8.4)
    axes = fig.subplots(2, len(Vs), squeeze=False, sharex="col", sharey="row")
    planned = sum(r["runs_planned"] for r in results.rows)
    finished = sum(r["runs_finished"] for r in results.rows)
    runs_per_point = sorted({r["runs_finished"] for r in rows})
    for col, V in enumerate(Vs):
        at_v = [r for r in rows if r["V"] == V]
        Ns = sorted({r["N"] for r in at_v})
        majority = [run["majority_rate"] for r in at_v for run in r["runs"]
                    if run["majority_rate"] is not None]
        majority_rate = sum(majority) / len(majority) if majority else None
        for row_i, (metric, ylabel) in enumerate([
                ("balanced_accuracy", "balanced accuracy\n(mean of the two classes' recalls)"),
                ("accuracy", "accuracy (share of test answers right)")]):
            ax = axes[row_i][col]
            for s_i, (group, model) in enumerate(series):
                pts = sorted((r for r in at_v if r["model"] == model
                              and r.get("group", "") == group), key=lambda r: r["N"])
                if not pts:
                    continue
                shift = 2 ** (0.04 * (s_i - (len(series) - 1) / 2))  # side by side on log2 x
                color = COLORS[s_i % len(COLORS)]
                xs = [r["N"] * shift for r in pts]
                ax.errorbar(xs, [r[metric]["mean"] for r in pts],
                            yerr=[r[metric]["std"] or 0.0 for r in pts], color=color,
                            marker="o", ms=5, capsize=4, lw=1.8,
                            ls=RUN_STYLES[models.index(model) % len(RUN_STYLES)],
                            label=_label(model, group))
                for x, r in zip(xs, pts, strict=True):
                    vals = [run[metric] for run in r["runs"] if run[metric] is not None]
                    ax.plot([x] * len(vals), vals, "o", mfc="none", mec=color, alpha=0.8,
                            ms=7, mew=1.2, zorder=3)
            ax.axhline(0.5, color="0.35", ls="--", lw=1,
                       label="chance: any constant\nanswer (50 %)" if metric ==
                       "balanced_accuracy" else "coin flip (50 %)")
            if metric == "accuracy" and majority_rate is not None:
                ax.axhline(majority_rate, color="tab:red", ls="--", lw=1,
                           label="always the majority\nclass (its rate at this V)")
                ax.annotate(f"{100 * majority_rate:.0f} %", (1, majority_rate),
                            xycoords=("axes fraction", "data"), xytext=(-3, 3),
                            textcoords="offset points", ha="right", va="bottom",
                            color="tab:red", fontsize=8)
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(Ns))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(Ns, [str(n) for n in Ns])
            ax.set_xlim(min(Ns) / 2 ** 0.4, max(Ns) * 2 ** 0.4)
            low, high = _y_range(rows, metric)
            ax.set_ylim(low, high)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax.grid(True, alpha=0.3)
            if col == 0:
                ax.set_ylabel(ylabel)
            if row_i == 0:
                ax.set_title(f"V = {V} tables")
            else:
                ax.set_xlabel("training examples N (log scale)")
            if col == len(Vs) - 1:
                ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    runs_note = (f"{runs_per_point[0]} run" if runs_per_point == [1] else
                 f"{runs_per_point[0]} runs" if len(runs_per_point) == 1
                 else f"{runs_per_point[0]}-{runs_per_point[-1]} runs")
    # What the plotted (finished) runs ran, not every job in the queue.
    plotted = results.plotted or results.run
    lines = [MAIN_TITLE,
             f"points: mean ± 1 sample std over {runs_note}; circles: single runs"
             + ("" if finished == planned else
                f"; incomplete: {finished} of {planned} runs finished"),
             *run_lines(plotted)]
    if len(groups) > 1:
        lines.append("a line per model and config (" + ", ".join(results.by)
                     + "): runs of different configs are never averaged together")
    fig.suptitle(wrap_title(lines, width, 10), fontsize=10,
                 color="black" if plotted.get("study_as_run") else "darkred")
    return fig


def _y_range(rows: list[dict], metric: str) -> tuple[float, float]:
    """One y-range for every panel of a metric: the 50 % line, every run, every error bar."""
    low, high = [0.45], [1.0]
    for r in rows:
        s = r[metric]
        if s["min"] is not None:
            low.append(s["min"])
            high.append(s["max"])
        if s["std"] is not None:
            low.append(s["mean"] - s["std"])
            high.append(s["mean"] + s["std"])
    return max(0.0, min(low) - 0.03), max(high) + 0.02


def training_curves(jobs: list[dict], out_dir: str | Path, by: list[str] = ()) -> list[Path]:
    """Write curves_V{V}_N{N}.png per (V, N) (see curves_figures) to `out_dir`; the files."""
    out_dir = Path(out_dir)
    written = []
    for (V, N), fig in curves_figures(jobs, by):
        path = out_dir / f"curves_V{V}_N{N}.png"
        write_atomic(path, lambda f, fig=fig: fig.savefig(f, format="png"))  # whole or absent
        written.append(path)
    return written


def curves_figures(jobs: list[dict], by: list[str] = ()):
    """One figure per (V, N): test accuracy and balanced accuracy vs step, both models.

    From each job's metrics.jsonl (evaluation records only); running and failed
    jobs show their curve so far. The x-axis runs from 0 to the jobs' training
    steps with integer ticks, so a one-point curve keeps a sensible axis. Legends
    name each job's config group (the keys `by`) when there are several. The title
    says the profile and steps. Yields ((V, N), figure).
    """
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    models = list(dict.fromkeys(j["model"] for j in jobs))
    groups: dict[tuple, list[tuple[dict, list[dict]]]] = {}
    for job in jobs:
        evals = [r for r in read_metrics(local_folder(job["out_dir"])) if "test_accuracy" in r]
        if evals:
            groups.setdefault((job["v"], job["n"]), []).append((job, evals))
    for (V, N), members in sorted(groups.items()):
        fig = _figure(11, 4.4)
        axes = fig.subplots(1, 2, sharex=True)
        majority = [r["test_majority_rate"] for _, ev in members for r in ev
                    if r.get("test_majority_rate") is not None]
        configs = list(dict.fromkeys(label(group_of(j, list(by))) for j, _ in members))
        steps = max(j["total_steps"] or 1 for j, _ in members)
        for ax, metric, title in [
                (axes[0], "test_accuracy", "accuracy (share of test answers right)"),
                (axes[1], "test_balanced_accuracy", "balanced accuracy (mean of class recalls)")]:
            for job, evals in sorted(members, key=lambda m: (models.index(m[0]["model"]),
                                                              m[0]["run"])):
                config = label(group_of(job, list(by)))
                color = COLORS[(models.index(job["model"]) + len(models) * configs.index(config))
                               % len(COLORS)]
                style = RUN_STYLES[(job["run"] - 1) % len(RUN_STYLES)]
                ax.plot([r["step"] + 1 for r in evals], [r.get(metric) for r in evals],
                        color=color, ls=style, marker="o", ms=3, lw=1.4,
                        label=f"{_label(job['model'])}, run {job['run']}"
                        + ("" if job["state"] == "succeeded" else f" ({job['state']})")
                        + (f"\n{config}" if len(configs) > 1 else ""))
            ax.axhline(0.5, color="0.35", ls="--", lw=1,
                       label="50 %: a coin flip; also the balanced\naccuracy of any constant "
                       "answer")
            if metric == "test_accuracy" and majority:
                rate = sum(majority) / len(majority)
                ax.axhline(rate, color="tab:red", ls="--", lw=1,
                           label=f"always the majority class ({100 * rate:.0f} %)")
            ax.set_title(title, fontsize=10)
            ax.set_ylabel("on the held-out test set")
            ax.set_xlabel("training steps done")
            ax.set_xlim(0, steps)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax.set_ylim(-0.02, 1.02)
            ax.grid(True, alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", fontsize=8)
        fig.suptitle(curves_title(V, N, [j for j, _ in members]), fontsize=11)
        yield (V, N), fig


def curves_title(V: int, N: int, jobs: list[dict]) -> str:
    """'Training curves: V = 5 tables, N = 256 training examples; profile smoke, 30 steps
    (test set evaluated every 10 steps)'."""
    def one(values) -> str:
        return "/".join(str(v) for v in sorted(set(values), key=str))

    profiles = one(j.get("profile") or "unknown" for j in jobs)
    steps = one(j["total_steps"] for j in jobs)
    every = one((j.get("config") or {}).get("evaluation", {}).get("eval_every", "?")
                for j in jobs)
    return (f"Training curves: V = {V} tables, N = {N} training examples; profile {profiles}, "
            f"{steps} steps (test set evaluated every {every} steps)")
