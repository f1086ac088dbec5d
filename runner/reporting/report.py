"""`python -m runner report`: the sweep as one self-contained HTML file.

What the dashboard shows at this moment, frozen: what was run (profile,
steps, overrides, grid, versions), progress, the results table, the
sample-complexity figure, the training curves per (V, N), failures with
their errors, and every job. Figures are embedded as base64 PNG and the
style sheet is inline, so the file opens anywhere without a network and can
be attached to a draft or mailed to a collaborator. Like the dashboard, it
holds no database password and no path outside the runs folder.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

from runner.progress import eta_line
from runner.reporting.results import (
    TEXT_HEADERS,
    aggregate,
    group_heading,
    run_lines,
    set_line,
    text_cells,
)
from runner.reporting.views import (
    Redactor,
    newest_eval,
    sample_complexity_png,
    training_curves_png,
    what_was_run,
    worker_claims,
)
from runner.status import snapshot
from trainer.atomic import write_bytes_atomic

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
       max-width: 1200px; margin: 0 auto; padding: 16px 24px 48px; color: #1f2328; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 17px; margin-top: 28px;
     border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
.muted { color: #57606a; } code, pre { font: 12px ui-monospace, "DejaVu Sans Mono", monospace; }
table { border-collapse: collapse; margin: 6px 0; max-width: 100%; }
th, td { border-bottom: 1px solid #d0d7de; padding: 3px 9px; text-align: left;
         vertical-align: top; }
/* long job names and folders wrap (at any character) rather than run off the page */
td.path { overflow-wrap: anywhere; word-break: break-word; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; }
dt { color: #57606a; } dd { margin: 0; }
img { max-width: 100%; border: 1px solid #d0d7de; margin: 6px 0 14px; }
.state { border-radius: 10px; padding: 0 8px; color: #fff; font-size: 12px; font-weight: 600; }
.pending { background: #8a8f98; } .running { background: #1f6feb; }
.succeeded { background: #1a7f37; } .failed { background: #cf222e; }
.cancelled { background: #9a6700; }
pre { background: #f6f8fa; padding: 8px; white-space: pre-wrap; word-break: break-all; }
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _png(data: bytes, alt: str) -> str:
    return (f'<img alt="{_e(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode("ascii")}">')


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset(),
           paths: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{c}</td>' if i in numeric else
        f'<td class="path">{c}</td>' if i in paths else f"<td>{c}</td>"
        for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build(queue, queue_label: str, by: tuple[str, ...] = ()) -> str:
    """The report's HTML for the queue as it is now; rows split by config (see
    runner.reporting.results.aggregate, `by`)."""
    snap = snapshot(queue, configs=True)
    counts, jobs, progress = snap["counts"], snap["jobs"], snap["progress"]
    red = Redactor(jobs)
    results = aggregate(jobs, by=by)
    run = what_was_run(jobs, worker_claims(queue))
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>Sweep report</title><style>{STYLE}</style></head><body>",
             "<h1>Table-connectivity sweep: report</h1>",
             f"<p class='muted'>Made {_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} from the queue "
             f"<code>{_e(red.text(queue_label))}</code>. Self-contained: figures are embedded."
             "</p>"]

    # What was run.
    profiles = ", ".join(run["profiles"]) or "–"
    overrides = set_line(run).removeprefix("--set: ").removeprefix("--set ")
    if overrides == "none":
        overrides = "none (the profile as it is)"
    workers = ", ".join(f"{name} ({n} attempt{'s' if n != 1 else ''})"
                        for name, n in sorted(run["workers"].items()))
    verdict = run_lines(run)[1] if jobs else ""
    grid = run["grid"]
    versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items())
    parts += ["<h2>What was run</h2><dl>",
              f"<dt>jobs</dt><dd>{run['jobs']}: V ∈ {_e(grid['V'])}, N ∈ {_e(grid['N'])}, "
              f"models {_e(', '.join(grid['model']))}, runs {_e(grid['run'])}</dd>",
              f"<dt>profile</dt><dd>{_e(profiles)}</dd>",
              f"<dt>overrides</dt><dd>{_e(overrides)}</dd>",
              f"<dt>the study?</dt><dd>{_e(verdict)}</dd>",
              f"<dt>training steps</dt><dd>{_e(', '.join(map(str, run['train_steps'])))}</dd>",
              f"<dt>workers</dt><dd>{len(run['workers'])}: {_e(workers or '–')}</dd>",
              f"<dt>versions</dt><dd>{_e(versions)} <span class='muted'>(of the environment "
              "that made this report)</span></dd></dl>"]

    # Progress.
    parts += ["<h2>Progress</h2><p>"
              + " · ".join(f"<span class='state {_e(s)}'>{_e(s)} {n}</span>"
                           for s, n in counts.items())
              + f"</p><p>{_e(eta_line(progress, counts))}</p>"]

    # Results and the sample-complexity figure.
    parts.append("<h2>Results</h2>")
    if results.rows:
        parts.append("<p class='muted'>Test-set scores in %: mean ± sample std over the finished "
                     "runs (min–max). Balanced accuracy is the mean of the per-class recalls "
                     "(any constant answer scores 50 %); read accuracy beside the majority-class "
                     "rate.</p>")
        split = len(results.groups) > 1
        if split:
            parts.append("<p>Rows are split by config (" + _e(", ".join(results.by)) + "): runs "
                         "of different configs are never averaged together.</p><ul>"
                         + "".join(f"<li>{_e(group_heading(g))}</li>" for g in results.groups)
                         + "</ul>")
        parts.append(_table((["config"] if split else []) + TEXT_HEADERS,
                            [([_e(r["group"])] if split else [])
                             + [_e(c) for c in text_cells(r)] for r in results.rows],
                            {i + split for i in (0, 2, 3, 6)}))
    for note in results.notes:
        parts.append(f"<p class='muted'>note: {_e(red.text(note))}</p>")
    figure = sample_complexity_png(results)
    parts.append(_png(figure, "sample-complexity figure") if figure else
                 "<p>No job has finished yet: no sample-complexity figure.</p>")

    # Training curves.
    curves = training_curves_png(jobs, results.by)
    parts.append("<h2>Training curves</h2>")
    if not curves:
        parts.append("<p>No evaluation recorded yet.</p>")
    for name, data in curves:
        parts.append(_png(data, f"training curves {name.removesuffix('.png')}"))

    # Failures.
    failed = [j for j in jobs if j["state"] == "failed"]
    parts.append(f"<h2>Failures ({len(failed)})</h2>")
    if not failed:
        parts.append("<p>None.</p>")
    for job in failed:
        parts.append(f"<h3>{_e(job['name'])}</h3><p>attempts {job['attempts']}, last worker "
                     f"{_e(job['worker'] or '–')}</p><pre>{_e(red.text(job['error']))}</pre>")
        if job["traceback"]:
            parts.append(f"<details><summary>traceback</summary><pre>"
                         f"{_e(red.text(job['traceback']))}</pre></details>")

    # Every job.
    rows = []
    for job in jobs:
        ev = newest_eval(job["out_dir"]) if job["test_accuracy"] is None else None
        acc = job["test_accuracy"] if ev is None else ev["test_accuracy"]
        bal = job["balanced_accuracy"] if ev is None else ev["test_balanced_accuracy"]
        rows.append([_e(job["name"]), f"<span class='state {_e(job['state'])}'>"
                     f"{_e(job['state'])}</span>", f"{job['step']}/{job['total_steps']}",
                     "–" if job["loss"] is None else f"{job['loss']:.4f}", _pct(acc), _pct(bal),
                     _e(job["worker"] or "–"), str(job["attempts"]),
                     _e(red.folder(job["out_dir"]))])
    parts += [f"<h2>Jobs ({len(jobs)})</h2>",
              _table(["job", "state", "step", "loss", "test acc %", "balanced acc %", "worker",
                      "attempts", "folder (in the runs folder)"], rows, {2, 3, 4, 5, 7},
                     paths={0, 8}),
              "<p class='muted'>Test scores of unfinished jobs are their newest evaluation."
              "</p>",
              "</body></html>"]
    return "\n".join(parts)


def write(queue, queue_label: str, out: str | Path, by: tuple[str, ...] = ()) -> Path:
    page = build(queue, queue_label, by)  # first: a refused --by leaves nothing behind
    out = Path(out)
    write_bytes_atomic(out, page.encode("utf-8"))
    return out
