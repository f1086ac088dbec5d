"""Bad input: exit status 2, one line naming the fault, database unchanged."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, cli, digest, refused_line

GOOD_SWEEP = (ROOT / "conf" / "sweep.yaml").read_text()


def sweep_file(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return str(path)


CASES = [
    ("malformed YAML", lambda t: ["plan", "--sweep", sweep_file(t, "grid: [1, 2\n")],
     "invalid YAML"),
    ("missing sweep file", lambda t: ["plan", "--sweep", str(t / "nope.yaml")], "cannot read"),
    ("unknown sweep key", lambda t: ["plan", "--sweep", sweep_file(t, GOOD_SWEEP + "extra: 1\n")],
     "unknown key 'extra'"),
    ("unknown family", lambda t: ["plan", "--sweep", sweep_file(
        t, GOOD_SWEEP.replace("model: [gpt2, lowrank_gpt2]", "model: [gpt2, bert]"))],
     "unknown model family 'bert'"),
    ("bad V", lambda t: ["plan", "--sweep", sweep_file(
        t, GOOD_SWEEP.replace("V: [5, 20]", "V: [0, 5]"))], "grid.V"),
    ("N below batch", lambda t: ["plan", "--sweep", sweep_file(
        t, GOOD_SWEEP.replace("N: [256,", "N: [8,"))], "training.num_training_examples"),
    ("unsafe folder", lambda t: ["plan", "--sweep", sweep_file(
        t, GOOD_SWEEP.replace("folder: table_connectivity}", "folder: ../../etc}"))],
     "models.gpt2.folder"),
    ("bad --only key", lambda t: ["plan", "--only", "W=5"], "--only 'W=5'"),
    ("bad --only value", lambda t: ["plan", "--only", "V=7"], "not in the sweep's V values"),
    ("bad --only int", lambda t: ["plan", "--only", "N=many"], "N must be an integer"),
    ("unknown --set key", lambda t: ["plan", "--set", "training.lr=1"],
     "unknown key 'training.lr'"),
    ("bad --set value", lambda t: ["plan", "--set", "training.batch_size=-4"],
     "training.batch_size"),
    ("unknown profile", lambda t: ["plan", "--profile", "huge"], "unknown profile 'huge'"),
    ("out-root escapes", lambda t: ["plan", "--out-root", "../elsewhere"], "'..' is not allowed"),
    ("requeue unknown", lambda t: ["requeue", "--name", "nope"], "no job named nope"),
    ("requeue nothing", lambda t: ["requeue"], "--failed and/or --name"),
    ("missing GPU", lambda t: ["worker", "--gpu", "0"], "--gpu 0"),
    ("bad lease", lambda t: ["worker", "--gpu", "cpu", "--lease", "0"], "--lease"),
]


@pytest.mark.parametrize("label, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(planned, tmp_path, label, args,
                                                             message):
    before = digest(planned)
    assert message in refused_line(cli(planned, *args(tmp_path)))
    assert digest(planned) == before


@pytest.mark.parametrize("url, message", [
    ("sqlite:///{tmp}/missing/queue.sqlite", "no queue at"),
    ("postgresql+psycopg://user:s3cret@127.0.0.1:1/db", "cannot reach database"),
    ("mysql://x@localhost/db", "unsupported database"),
    ("not a url", "invalid database URL"),
])
def test_unusable_database_exits_2_and_hides_the_password(tmp_path, url, message):
    proc = cli(url.format(tmp=tmp_path), "status")
    assert message in refused_line(proc)
    assert "s3cret" not in proc.stderr + proc.stdout
    assert not (tmp_path / "missing").exists()


def test_plan_into_a_fresh_clone_creates_the_queue(tmp_path):
    url = f"sqlite:///{tmp_path / 'new' / 'queue.sqlite'}"
    proc = cli(url, "plan", "--profile", "smoke", "--dry-run")
    assert proc.returncode == 0 and "would plan 60 jobs: 60 new" in proc.stdout
    assert not (tmp_path / "new").exists()
    proc = cli(url, "plan", "--profile", "smoke")
    assert proc.returncode == 0 and "planned 60 jobs: 60 new, 0 already queued" in proc.stdout
    proc = cli(url, "plan", "--profile", "smoke")
    assert "0 new, 60 already queued" in proc.stdout
