"""Security: weights-only checkpoint loads, safe names and folders, safe YAML, masked passwords."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from db import DatabaseError, JobQueue, connect, mask_url
from runner.planner import SweepError, job_rows, load_sweep
from tests.support.commands import PYTHON, ROOT, cli, runner_env
from tests.support.queues import GOOD_SWEEP, new_pg_database
from trainer import checkpoint as ckpt
from trainer.config import resolve
from trainer.train import run as train

SOURCES = [p for d in ("trainer", "runner", "db", "models", "bench")
           for p in sorted((ROOT / d).rglob("*.py"))]


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(
                node.func.value, ast.Name):
            yield node.func.value.id, node.func.attr, node


# --- checkpoints are only unpickled with weights_only=True ------------------------------------


def test_every_torch_load_is_weights_only():
    seen = 0
    for path in SOURCES:
        for module, attr, node in calls(path):
            if (module, attr) == ("torch", "load"):
                seen += 1
                flags = {k.arg: k.value for k in node.keywords}
                assert isinstance(flags.get("weights_only"), ast.Constant) and \
                    flags["weights_only"].value is True, f"{path}:{node.lineno}"
            assert (module, attr) not in {("pickle", "load"), ("pickle", "loads")}, \
                f"{path}:{node.lineno}: unpickling"
    assert seen >= 1


class _Payload:
    """Unpickling this runs a command: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_state_is_refused_and_its_code_never_runs(tmp_path):
    config = resolve("gpt2", 5, 256, 1, "smoke")
    out, marker = tmp_path / "job", tmp_path / "PWNED"
    stop = threading.Event()
    train(config, out, stop=stop, on_progress=lambda p: stop.set() if p.step == 12 else None)
    newest = ckpt.list_states(out)[0]
    buf = io.BytesIO()
    torch.save({"step": 12, "model": {}, "optimizer": {}, "rng": {}, "config": config,
                "evil": _Payload(marker)}, buf)
    data = buf.getvalue()
    newest.write_bytes(data)   # with a manifest that matches: only the unpickler can object
    newest.with_suffix(".json").write_text(json.dumps(
        {"step": 12, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    log: list[str] = []
    state = ckpt.load_latest_state(out, log.append)
    assert state["step"] == 11
    assert "ignoring state/state-0000012.pt" in log[0]
    assert not marker.exists()


# --- names and folders cannot leave the runs folder -------------------------------------------


BAD_NAMES = ["../escape", "/etc", "sub/dir", "back\\\\slash", "..", ".hidden", "", "a b",
             "tab\\t", "nul\\0byte", "~root"]


@pytest.mark.parametrize("field", ["study", "tag", "folder"])
@pytest.mark.parametrize("value", BAD_NAMES)
def test_unsafe_names_in_a_sweep_are_refused(tmp_path, field, value):
    sweep = GOOD_SWEEP
    if field == "study":
        sweep = sweep.replace("study: table_connectivity", f'study: "{value}"')
    elif field == "tag":
        sweep = sweep.replace("tag: standard,", f'tag: "{value}",')
    else:
        sweep = sweep.replace("folder: table_connectivity}", f'folder: "{value}"}}')
    assert sweep != GOOD_SWEEP
    path = tmp_path / "sweep.yaml"
    path.write_text(sweep)
    with pytest.raises(SweepError, match=field):
        load_sweep(path)


def test_every_planned_folder_is_inside_the_runs_folder(tmp_path):
    sweep = load_sweep(ROOT / "conf" / "sweep.yaml")
    for root in ("runs", str(tmp_path / "runs")):
        rows = job_rows(sweep, "smoke", {}, [], root)
        assert len(rows) == 60
        for row in rows:
            folder = Path(row["out_dir"])
            assert folder.resolve().parent.parent == Path(root).resolve()
            assert "/" not in row["name"] and "\\" not in row["name"] and ".." not in row["name"]


def test_an_escaping_sweep_writes_nothing_anywhere(tmp_path):
    url = f"sqlite:///{tmp_path / 'db' / 'queue.sqlite'}"
    (tmp_path / "work").mkdir()
    sweep = tmp_path / "work" / "sweep.yaml"
    sweep.write_text(GOOD_SWEEP.replace("folder: table_connectivity}", "folder: ../../outside}"))
    before = sorted(tmp_path.rglob("*"))
    proc = cli(url, "plan", "--sweep", str(sweep), "--profile", "smoke", "--out-root",
               str(tmp_path / "work" / "runs"))
    assert proc.returncode == 2 and "models.gpt2.folder" in proc.stderr
    assert sorted(tmp_path.rglob("*")) == before


# --- YAML only through the safe loader --------------------------------------------------------


UNSAFE_YAML = {"load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all",
               "Loader", "FullLoader", "UnsafeLoader", "add_constructor"}


def test_yaml_is_only_read_with_the_safe_loader():
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id == "yaml":
                assert node.attr not in UNSAFE_YAML, f"{path}:{node.lineno}: yaml.{node.attr}"
            if isinstance(node, ast.ImportFrom) and node.module == "yaml":
                assert not {a.name for a in node.names} & UNSAFE_YAML, f"{path}:{node.lineno}"


def test_python_tags_in_a_sweep_a_set_or_a_config_run_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    url = f"sqlite:///{tmp_path / 'queue.sqlite'}"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(GOOD_SWEEP.replace("study: table_connectivity", f"study: {tag}"))
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {tag}\n")
    runs = [
        [PYTHON, "-m", "runner", "plan", "--sweep", str(sweep)],
        [PYTHON, "-m", "runner", "plan", "--profile", "smoke", "--set",
         f"training.train_steps={tag}"],
        [PYTHON, "-m", "trainer", "--config", str(config), "--out", str(tmp_path / "o")],
    ]
    for cmd in runs:
        proc = subprocess.run(cmd, cwd=ROOT, env=runner_env(url), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "YAML" in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "queue.sqlite").exists() and not (tmp_path / "o").exists()


# --- database passwords are never printed -----------------------------------------------------


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://alice:p@ss@db.example/queue",
     "postgresql+psycopg://alice:***@db.example/queue"),
    ("postgresql+psycopg://alice:pw@db.example:notaport/queue",
     "postgresql+psycopg://alice:***@db.example:notaport/queue"),
    ("postgresql+psycopg://alice:pw@db.example/queue?sslmode=require",
     "postgresql+psycopg://alice:***@db.example/queue?sslmode=require"),
    ("postgresql+psycopg://alice:a:b/c?d#e@db.example/queue",
     "postgresql+psycopg://alice:***@db.example/queue"),
    ("postgresql+psycopg://alice@db.example/queue", "postgresql+psycopg://alice@db.example/queue"),
    ("postgresql+psycopg://db.example:5432/queue", "postgresql+psycopg://db.example:5432/queue"),
])
def test_mask_url_hides_the_whole_password(url, shown):
    assert mask_url(url) == shown


PASSWORD = "Sup3r-s3cret-pw"


@pytest.fixture
def pg_with_password(pg_server_url):
    """A new database on the test server, its URL carrying a password.

    The test cluster trusts local connections, so the password is not checked: it is there
    to be (not) printed.
    """
    url = new_pg_database(pg_server_url)
    return make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)


def test_no_command_prints_the_password(pg_with_password, tmp_path):
    url = pg_with_password
    one_job = ["--only", "V=5", "--only", "N=256", "--only", "model=gpt2", "--only", "run=1"]
    steps = [
        ["plan", "--profile", "smoke", "--out-root", str(tmp_path / "runs"), *one_job],
        ["status"], ["status", "--json"],
        ["worker", "--gpu", "cpu", "--threads", "1", "--max-jobs", "1"],
        ["status"], ["results"], ["requeue", "--failed"], ["requeue", "--name", "nope"],
    ]
    for args in steps:
        proc = cli(url, *args)
        assert PASSWORD not in proc.stdout + proc.stderr, args
        assert proc.returncode in (0, 2), (args, proc.stderr[-2000:])
    status = cli(url, "status")
    assert "runner:***@127.0.0.1" in status.stdout
    assert "succeeded 1" in status.stdout


def test_connection_errors_mask_the_password(pg_with_password):
    missing = make_url(pg_with_password).set(database="no_such_db").render_as_string(
        hide_password=False)
    unescaped = pg_with_password.replace(PASSWORD, "Sup3r@s3cret")
    for url, message in [(missing, "does not exist"), (unescaped, "%40")]:
        proc = cli(url, "status")
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "***" in proc.stderr
        assert PASSWORD not in proc.stderr and "s3cret" not in proc.stderr


def test_errors_during_work_mask_the_password(pg_with_password, pg_server_url):
    queue = JobQueue(connect(pg_with_password))
    assert queue.counts()["pending"] == 0
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        name = make_url(pg_with_password).database
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()
    with pytest.raises(DatabaseError) as caught:
        queue.counts()
    assert PASSWORD not in str(caught.value) and "***" in str(caught.value)
    queue.engine.dispose()
