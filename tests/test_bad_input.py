"""More bad input, table-driven: sweep files, trainer configs, CLI arguments, database URLs.

Each gives exit status 2, one line on stderr naming the fault, and leaves the database (or
the trainer's output folder) untouched. Complements tests/test_cli.py, without repeating it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.commands import PYTHON, ROOT, cli, refused_line
from tests.support.queues import GOOD_SWEEP, digest
from trainer.config import resolve


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def sweep(t: Path, content: str | bytes) -> list[str]:
    return ["plan", "--sweep", write(t, "sweep.yaml", content)]


def edited(old: str, new: str) -> str:
    assert old in GOOD_SWEEP
    return GOOD_SWEEP.replace(old, new)


RUNNER_CASES = [
    # Sweep files.
    ("sweep not a mapping", lambda t: sweep(t, "- V\n- N\n"), "expected a mapping"),
    ("empty sweep", lambda t: sweep(t, ""), "missing key 'study'"),
    ("sweep not UTF-8", lambda t: sweep(t, b"study: caf\xe9\n"), "not UTF-8"),
    ("sweep missing grid", lambda t: sweep(t, edited("grid:", "grids:")), "unknown key 'grids'"),
    ("grid missing an axis", lambda t: sweep(t, edited("  run: [1, 2, 3]\n", "")),
     "'grid' must have exactly the keys"),
    ("repeated grid value", lambda t: sweep(t, edited("N: [256,", "N: [256, 256,")),
     "grid.N"),
    ("grid value of the wrong type", lambda t: sweep(t, edited("run: [1, 2, 3]", "run: [1, two]")),
     "grid.run"),
    ("study with a separator", lambda t: sweep(t, edited("study: table_connectivity",
                                                         "study: a/b")), "'study'"),
    ("max_attempts zero", lambda t: sweep(t, edited("max_attempts: 3", "max_attempts: 0")),
     "max_attempts"),
    ("max_attempts past any database integer",
     lambda t: sweep(t, edited("max_attempts: 3", "max_attempts: 99999999999999999999")),
     "'max_attempts' must be an integer from 1 to 1000, got 99999999999999999999"),
    ("models entry without folder", lambda t: sweep(t, edited(
        "{tag: standard, folder: table_connectivity}", "{tag: standard}")), "models.gpt2"),
    ("sweep is a folder", lambda t: ["plan", "--sweep", str(t)], "is a directory"),
    # Arguments.
    ("profile outside conf/profiles", lambda t: ["plan", "--profile", "../experiment"],
     "unknown profile '../experiment'"),
    ("--set without a value", lambda t: ["plan", "--set", "training.train_steps"],
     "expected KEY=VALUE"),
    ("--set on a section", lambda t: ["plan", "--set", "model=3"], "unknown key 'model'"),
    ("--set not a number", lambda t: ["plan", "--set", "training.learning_rate=fast"],
     "training.learning_rate"),
    ("--set inconsistent V", lambda t: ["plan", "--set", "training.task_kwargs.V=7"],
     "training.task_kwargs.V"),
    ("--set a sweep axis", lambda t: ["plan", "--set", "model.V=7"],
     "--set 'model.V=7': model.V is set by the sweep axis V; choose with --only V=VALUE among "
     "the sweep's values (5, 20), or give a sweep file with other values (--sweep)"),
    ("--set the data size", lambda t: ["plan", "--set", "training.num_training_examples=100"],
     "is set by the sweep axis N; choose with --only N=VALUE"),
    ("--set the run's seed", lambda t: ["plan", "--set", "seeds.run=9"],
     "is set by the sweep axis run"),
    ("--only without =", lambda t: ["plan", "--only", "V"], "--only 'V'"),
    ("--set past any database integer",
     lambda t: ["plan", "--set", "training.train_steps=99999999999999999999"],
     "'training.train_steps' must fit in 64 bits (below 2**63 in size), "
     "got 99999999999999999999"),
    ("--set a negative integer past 64 bits",
     lambda t: ["plan", "--set", "seeds.pool=-99999999999999999999"], "'seeds.pool' must fit"),
    ("--set an infinite learning rate",
     lambda t: ["plan", "--set", "training.learning_rate=.inf"],
     "'training.learning_rate' must be a finite number, got inf"),
    ("empty --out-root", lambda t: ["plan", "--out-root", ""], "--out-root"),
    ("unknown option", lambda t: ["plan", "--bogus"], "--bogus"),
    ("unknown command", lambda t: ["frobnicate"], "frobnicate"),
    ("--threads 0", lambda t: ["worker", "--gpu", "cpu", "--threads", "0"], "--threads"),
    ("--max-jobs 0", lambda t: ["worker", "--gpu", "cpu", "--max-jobs", "0"], "--max-jobs"),
    ("unknown --order", lambda t: ["worker", "--gpu", "cpu", "--order", "random"], "--order"),
    ("--gpu not a number", lambda t: ["worker", "--gpu", "first"], "--gpu 'first'"),
    ("--watch with --json", lambda t: ["status", "--json", "--watch", "2"], "--watch"),
    ("figure not PNG", lambda t: ["plot", "--out", str(t / "figure.pdf")], "PNG"),
    # Outputs that cannot be written (as root too): refused before any work.
    ("report into /proc", lambda t: ["report", "--out", "/proc/r.html"],
     "--out '/proc/r.html': cannot write in /proc: No such file or directory"),
    ("figure inside a file", lambda t: ["plot", "--out", write(t, "a-file", "") + "/x.png"],
     "/a-file/x.png': it is inside "),
    ("curves inside a file", lambda t: ["plot", "--out", str(t / "x.png"), "--curves-dir",
                                        write(t, "a-file", "") + "/curves"],
     "--curves-dir '"),
    ("figure into /sys", lambda t: ["plot", "--out", "/sys/x.png"],
     "--out '/sys/x.png': cannot write in /sys"),
    ("TensorBoard folder in /proc", lambda t: ["export", "--tensorboard", "/proc/tb"],
     "--tensorboard '/proc/tb': cannot write in /proc"),
    ("logs of an unknown job", lambda t: ["logs", "no_such_job"], "no_such_job"),
]


@pytest.mark.parametrize("label, args, message", RUNNER_CASES, ids=[c[0] for c in RUNNER_CASES])
def test_runner_bad_input_exits_2_with_one_line_and_changes_nothing(planned, tmp_path, label,
                                                                    args, message):
    before = digest(planned)
    args = args(tmp_path)
    files = sorted(tmp_path.rglob("*"))
    assert message in refused_line(cli(planned, *args))
    assert digest(planned) == before
    assert sorted(tmp_path.rglob("*")) == files   # no output, not even half of one


def config_file(t: Path, change=None, text: str | bytes | None = None) -> list[str]:
    """`python -m trainer --config FILE` args: a valid config edited by `change`, or `text`."""
    if text is None:
        config = resolve("gpt2", 5, 256, 1, "smoke")
        change(config)
        text = yaml.safe_dump(config)
    return ["--config", write(t, "config.yaml", text)]


def _set(dotted: str, value):
    def change(config):
        *path, last = dotted.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    return change


TRAINER_CASES = [
    ("config missing", lambda t: ["--config", str(t / "nope.yaml")], "cannot read"),
    ("config is a folder", lambda t: ["--config", str(t)], "is a directory"),
    ("config malformed YAML", lambda t: config_file(t, text="model: {n_embd: 32\n"),
     "invalid YAML"),
    ("config not UTF-8", lambda t: config_file(t, text=b"model: \xff\n"), "not UTF-8"),
    ("config a list", lambda t: config_file(t, text="- model\n"), "expected a mapping"),
    ("config empty", lambda t: config_file(t, text=""), "missing key 'model'"),
    ("config unknown key", lambda t: config_file(t, _set("model.dropout", 0.1)),
     "unknown key 'model.dropout'"),
    ("config missing section", lambda t: config_file(t, lambda c: c.pop("seeds")),
     "missing key 'seeds'"),
    ("config wrong type", lambda t: config_file(t, _set("training.batch_size", "16")),
     "training.batch_size"),
    ("config heads do not divide width", lambda t: config_file(t, _set("model.n_head", 5)),
     "model.n_embd"),
    ("config rho out of range", lambda t: config_file(t, _set("training.task_kwargs.rho", 1.5)),
     "training.task_kwargs.rho"),
    ("config V mismatch", lambda t: config_file(t, _set("training.task_kwargs.V", 7)),
     "training.task_kwargs.V"),
    ("config too few positions", lambda t: config_file(t, _set("model.n_positions", 10)),
     "model.n_positions"),
    ("config negative seed", lambda t: config_file(t, _set("seeds.pool", -1)), "seeds.pool"),
    ("config steps past 64 bits", lambda t: config_file(t, _set("training.train_steps", 2**64)),
     "'training.train_steps' must fit in 64 bits"),
    ("config infinite rho", lambda t: config_file(t, _set("training.task_kwargs.rho",
                                                          float("inf"))),
     "'training.task_kwargs.rho' must be a finite number"),
    ("config unknown task", lambda t: config_file(t, _set("training.task", "sorting")),
     "training.task"),
    ("trainer unknown family", lambda t: ["--family", "bert"], "bert"),
    ("trainer profile outside conf/profiles", lambda t: ["--profile", "../experiment"],
     "unknown profile"),
    ("trainer without --out", lambda t: ["--profile", "smoke", "--out"], "--out"),
    ("config truncation wider than the tokens",
     lambda t: config_file(t, _set("model.truncated_dims", 20)), "model.truncated_dims"),
    ("trainer on a device that is not one", lambda t: ["--profile", "smoke", "--device", "tpu"],
     "device 'tpu'"),
    ("trainer on a GPU this machine lacks",
     lambda t: ["--profile", "smoke", "--device", "cuda:7"], "device 'cuda:7'"),
    ("trainer --threads 0", lambda t: ["--profile", "smoke", "--threads", "0"], "--threads"),
]


@pytest.mark.parametrize("label, args, message", TRAINER_CASES,
                         ids=[c[0] for c in TRAINER_CASES])
def test_trainer_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, label, args,
                                                                     message):
    out = tmp_path / "out"
    extra = [] if "--out" in args(tmp_path) else ["--out", str(out)]
    proc = subprocess.run([PYTHON, "-m", "trainer", *args(tmp_path), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})
    assert message in refused_line(proc)
    assert not out.exists()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


URL_CASES = [
    ("sqlite in memory", lambda t: "sqlite://", "needs a file"),
    ("sqlite file that is not a database",
     lambda t: f"sqlite:///{write(t, 'junk.sqlite', b'not a database' * 100)}",
     "file is not a database"),
    ("sqlite path is a folder", lambda t: f"sqlite:///{t}", "unable to open database file"),
    ("port not a number", lambda t: "postgresql+psycopg://u:pw@127.0.0.1:fivefour/db",
     "invalid database URL"),
    ("unescaped @ in the password", lambda t: "postgresql+psycopg://u:p@ss@127.0.0.1:1/db",
     "%40"),
    ("unknown driver", lambda t: "postgresql+nosuchdriver://u:pw@127.0.0.1:1/db", "cannot use"),
    ("bad connection option", lambda t: "postgresql+psycopg://u:pw@127.0.0.1:1/db?sslmode=maybe",
     "sslmode"),
]


@pytest.mark.parametrize("label, url, message", URL_CASES, ids=[c[0] for c in URL_CASES])
def test_unusable_database_url_exits_2_with_one_line(tmp_path, label, url, message):
    url = url(tmp_path)
    files = {p: _file_digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    line = refused_line(cli(url, "status"))
    assert message in line
    assert ":pw@" not in line and "ss@" not in line   # the password stays masked
    assert {p: _file_digest(p) for p in tmp_path.rglob("*") if p.is_file()} == files


@pytest.mark.parametrize("bad", ["training.train_steps=99999999999999999999",
                                 "training.learning_rate=1e400",
                                 "model.n_embd=-99999999999999999999"])
def test_a_value_out_of_range_is_refused_before_the_queue_file_is_made(tmp_path, bad):
    db = tmp_path / "queue" / "q.sqlite"
    refused_line(cli(f"sqlite:///{db}", "plan", "--profile", "smoke", "--set", bad,
                     "--out-root", str(tmp_path / "runs")))
    assert list(tmp_path.iterdir()) == []   # no queue file, no folder



def test_the_claims_benchmark_refuses_a_real_queue_and_deletes_nothing(planned):
    """bench/claims.py empties the database it is given: a real queue is refused."""
    before = digest(planned)
    proc = subprocess.run([PYTHON, "bench/claims.py", "--db", planned, "--processes", "1",
                           "--jobs", "5", "--makespan-seconds", "0.5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    line = refused_line(proc)
    assert "holds 30 jobs, 30 events: the benchmark deletes every job and event" in line
    assert line.endswith("or pass --i-know-this-deletes")
    assert digest(planned) == before


NOT_A_FOLDER = "not a local folder path or an s3://BUCKET/PREFIX address"
A_URL = "a URL; give a path on this machine"
ADDRESS_CASES = [
    *((f"--out-root {bad}", ["plan", "--profile", "smoke", "--out-root", bad],
       f"--out-root '{bad}': {NOT_A_FOLDER}")
      for bad in ("S3://bucket/runs", "s3:/bucket/runs", "s3:bucket/runs", "gs://bucket/runs",
                  "s3a://bucket/runs", "http://host/runs")),
    ("--out-root with no bucket", ["plan", "--profile", "smoke", "--out-root", "s3:///runs"],
     "--out-root 's3:///runs': no bucket named"),
    ("report --out in a bucket", ["report", "--out", "s3://bucket/report.html"],
     f"--out 's3://bucket/report.html': {A_URL}"),
    ("report --out over http", ["report", "--out", "http://host/report.html"],
     f"--out 'http://host/report.html': {A_URL}"),
    ("plot --out in a bucket", ["plot", "--out", "s3://bucket/figure.png"],
     f"--out 's3://bucket/figure.png': {A_URL}"),
    ("plot --curves-dir in a bucket",
     ["plot", "--out", "figure.png", "--curves-dir", "gs://bucket/curves"],
     f"--curves-dir 'gs://bucket/curves': {A_URL}"),
    ("export into a bucket", ["export", "--tensorboard", "s3://bucket/tb"],
     f"--tensorboard 's3://bucket/tb': {A_URL}"),
]


@pytest.mark.parametrize("label, args, message", ADDRESS_CASES,
                         ids=[c[0] for c in ADDRESS_CASES])
def test_a_url_that_is_no_folder_or_output_is_refused_and_nothing_is_written(tmp_path, label,
                                                                            args, message):
    """Neither a local path nor s3://BUCKET/PREFIX (a mistyped scheme), or a URL given for a
    local output: one line, exit 2, and no folder named `s3:` (or the queue) made."""
    proc = subprocess.run([PYTHON, "-m", "runner", *args], cwd=tmp_path,
                          env={**os.environ, "RUNNER_DB": f"sqlite:///{tmp_path / 'q.sqlite'}",
                               "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert refused_line(proc).startswith(f"error: {message}")
    assert list(tmp_path.iterdir()) == []
