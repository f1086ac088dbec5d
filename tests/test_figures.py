"""The figures' texts and axes: titles that fit and say what is drawn, sensible axes.

Jobs are dicts as `JobQueue.jobs()` returns them, with real resolved configs and
real eval.json / metrics.jsonl files; the figures are drawn with matplotlib's Agg
renderer and measured with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from runner.reporting import results as res
from runner.reporting.plot import (
    MAIN_TITLE,
    curves_figures,
    curves_title,
    sample_complexity_figure,
    training_curves,
)
from trainer.config import resolve
from trainer.files import EVAL_FILE, METRICS_FILE

LONG_SET = ["training.learning_rate=3e-4", "evaluation.eval_examples=96",
            "training.save_every_steps=7", "training.keep_every_steps=14"]


def job(tmp_path: Path, run: int, state: str = "succeeded", acc: float = 0.8, v: int = 5,
        n: int = 256, model: str = "gpt2", overrides: list[str] = (), profile: str = "smoke",
        evals: list[tuple[int, float]] | None = None) -> dict:
    """A job of the queue; a succeeded one with its eval.json, `evals` its metrics log."""
    out = tmp_path / f"{model}_V{v}_N{n}_run{run}_{len(overrides)}"
    out.mkdir(parents=True, exist_ok=True)
    done = state == "succeeded"
    if done:
        (out / EVAL_FILE).write_text(json.dumps(
            {"accuracy": acc, "balanced_accuracy": acc, "majority_rate": 0.7}))
    if evals is not None:
        (out / METRICS_FILE).write_text("".join(
            json.dumps({"step": step, "loss": 0.69, "test_accuracy": a,
                        "test_balanced_accuracy": a, "test_majority_rate": 0.7}) + "\n"
            for step, a in evals))
    config = resolve(model, v, n, run, profile, list(overrides))
    return {"id": run, "name": out.name, "state": state, "v": v, "n": n, "model": model,
            "run": run, "test_accuracy": acc if done else None,
            "balanced_accuracy": acc if done else None, "majority_rate": 0.7 if done else None,
            "out_dir": str(out), "config": config, "profile": profile,
            "overrides": json.dumps(list(overrides)),
            "total_steps": config["training"]["train_steps"]}


def drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def test_the_title_fits_the_figure_when_one_v_has_results(tmp_path):
    jobs = [job(tmp_path, r, acc=a, overrides=LONG_SET) for r, a in ((1, 0.7), (2, 0.8))]
    fig = sample_complexity_figure(res.aggregate(jobs))
    renderer = drawn(fig)
    box, title = fig.bbox, fig._suptitle.get_window_extent(renderer)
    assert box.x0 <= title.x0 and title.x1 <= box.x1, (title, box)
    assert box.y0 <= title.y0 and title.y1 <= box.y1, (title, box)
    # every word is still there, only wrapped
    text = " ".join(fig._suptitle.get_text().split())
    assert ("--set: training.learning_rate=3e-4 evaluation.eval_examples=96 "
            "training.save_every_steps=7 training.keep_every_steps=14") in text


def test_the_main_title_names_both_rows(tmp_path):
    fig = sample_complexity_figure(res.aggregate([job(tmp_path, 1)]))
    assert fig._suptitle.get_text().startswith(MAIN_TITLE.split()[0])
    title = " ".join(fig._suptitle.get_text().split())
    assert title.startswith("Table connectivity: test-set balanced accuracy (top row) and "
                            "accuracy (bottom row) vs number of training examples ")
    top, bottom = fig.axes[0], fig.axes[1]
    assert top.get_ylabel().startswith("balanced accuracy")
    assert bottom.get_ylabel().startswith("accuracy")


def test_the_header_says_what_the_plotted_runs_used_and_results_say_which_jobs(tmp_path):
    jobs = [job(tmp_path, 1, acc=0.7), job(tmp_path, 2, acc=0.8),
            job(tmp_path, 3, state="pending", overrides=["training.learning_rate=3e-4"])]
    results = res.aggregate(jobs)
    title = " ".join(sample_complexity_figure(results)._suptitle.get_text().split())
    assert "--set: none" in title and "3e-4" not in title
    # The table names each row's config, and the header which jobs used which --set.
    text = res.to_text(results)
    assert text.splitlines()[0].endswith(
        "--set differs: none (2 jobs); training.learning_rate=3e-4 (1 jobs)")
    assert "config training.learning_rate=0.0001: profile smoke, --set: none (2 jobs)" in text
    assert ("config training.learning_rate=0.0003: profile smoke, --set: "
            "training.learning_rate=3e-4 (1 jobs)") in text


def test_curves_of_a_one_point_failed_job_have_a_whole_step_axis_and_name_the_profile(
        tmp_path):
    jobs = [job(tmp_path, 1, evals=[(9, 0.6), (19, 0.7), (29, 0.75)]),
            job(tmp_path, 2, state="failed", evals=[(0, 0.5)])]
    (path,) = training_curves(jobs, tmp_path / "curves")
    assert path.name == "curves_V5_N256.png"

    ((key, fig),) = curves_figures([jobs[1]])
    assert key == (5, 256)
    drawn(fig)
    for ax in fig.axes[:2]:
        assert ax.get_xlim() == (0.0, 30.0)
        labels = [t.get_text() for t in ax.get_xticklabels()
                  if 0 <= t.get_position()[0] <= 30]
        assert labels == sorted(set(labels), key=int), labels   # each once, whole numbers
        assert all(label.isdigit() for label in labels), labels
    assert fig._suptitle.get_text() == (
        "Training curves: V = 5 tables, N = 256 training examples; profile smoke, 30 steps "
        "(test set evaluated every 10 steps)")
    assert curves_title(5, 256, jobs) == fig._suptitle.get_text()
