"""Optional W&B logging (trainer/tracking.py), in W&B's offline mode: no network.

A job stopped mid-way and resumed is one W&B run (one id, named as the job,
its config the resolved config), and its history holds every step once. The
offline run files are read back with wandb's own protobuf schema.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from pathlib import Path

import pytest

from tests.support.commands import ROOT, cli
from tests.support.skips import need
from trainer.config import ConfigError, resolve, resume_conflicts, validate
from trainer.tracking import RUN_FILE

WB = "pip install -e '.[wandb]'"


def wandb_records(path: Path):
    """The records of a .wandb file: a LevelDB-style log of wandb protobuf Records."""
    pb = need("wandb.proto.wandb_internal_pb2", WB)
    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:   # zero padding to the end of a block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):              # full, first
            pending = chunk
        else:                            # middle, last
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def read_runs(folder: Path) -> list[dict]:
    runs = []
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        run = {"steps": [], "keys": set()}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
                run.update(id=record.run.run_id, name=record.run.display_name,
                           project=record.run.project, config=config)
            elif kind == "history":
                run["steps"].append(record.history.step.num)
                run["keys"] |= {i.key or "/".join(i.nested_key) for i in record.history.item}
        runs.append(run)
    return runs


def test_a_stopped_and_resumed_job_is_one_wandb_run_with_each_step_once(tmp_path, monkeypatch):
    need("wandb", WB)
    from trainer.train import run

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    config = resolve("gpt2", 5, 256, 1, "smoke", ["tracking.wandb.project=tc-test",
                                                   "tracking.wandb.mode=offline"])
    out = tmp_path / "table_connectivity_standard_V5_N256_run1"
    stop = threading.Event()

    def stop_at_12(p):
        if p.step == 12:
            stop.set()

    first = run(config, out, on_progress=stop_at_12, stop=stop)
    assert (first.outcome, first.step) == ("stopped", 12)
    second = run(config, out)
    assert second.outcome == "completed"

    # wandb's service writes the offline files in the background: let it finish them
    wandb = need("wandb", WB)
    wandb.teardown()
    deadline = time.monotonic() + 60
    while True:
        runs = read_runs(tmp_path / "wb")
        if (len(runs) == 2 and all("id" in r for r in runs)
                and sum(len(r["steps"]) for r in runs) >= 30) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(runs) == 2                                     # one offline file per attempt
    assert {r["id"] for r in runs} == {json.loads((out / RUN_FILE).read_text())["id"]}
    assert {r["name"] for r in runs} == {out.name} and {r["project"] for r in runs} == {"tc-test"}
    assert runs[0]["steps"] == list(range(12)) and runs[1]["steps"] == list(range(12, 30))
    assert "train/loss" in runs[0]["keys"] and "test/balanced_accuracy" in runs[1]["keys"]
    assert runs[0]["config"]["training"]["train_steps"] == 30
    assert runs[0]["config"]["tracking"]["wandb"]["project"] == "tc-test"
    log = (out / "train.log").read_text()
    assert log.count("wandb: logging to run") == 2 and "from step 12" in log


def test_without_a_project_nothing_is_tracked(tmp_path):
    from trainer.train import run

    config = resolve("gpt2", 5, 256, 1, "smoke", ["training.train_steps=3"])
    assert config["tracking"]["wandb"] == {"project": None, "entity": None, "mode": None}
    run(config, tmp_path / "job")
    assert not (tmp_path / "job" / RUN_FILE).exists()
    assert not (tmp_path / "job" / "wandb").exists()


def test_tracking_keys_through_plan_set_and_their_checks(tmp_path):
    ok = cli(f"sqlite:///{tmp_path}/q.sqlite", "plan", "--profile", "smoke", "--only", "V=5",
             "--set", "tracking.wandb.project=my-sweep", "--dry-run")
    assert ok.returncode == 0, ok.stderr
    bad = cli(f"sqlite:///{tmp_path}/q.sqlite", "plan", "--set", "tracking.wandb.mode=loud")
    assert bad.returncode == 2 and "tracking.wandb.mode" in bad.stderr
    with pytest.raises(ConfigError, match="tracking.wandb.project' must be a string or null"):
        validate({**resolve("gpt2", 5, 256, 1, "smoke"),
                  "tracking": {"wandb": {"project": 3, "entity": None, "mode": None}}})
    # configs planned before tracking existed still validate and resume
    old = resolve("gpt2", 5, 256, 1, "smoke")
    del old["tracking"]
    assert validate(old)["tracking"]["wandb"]["project"] is None
    assert resume_conflicts(old, resolve("gpt2", 5, 256, 1, "smoke",
                                         ["tracking.wandb.project=x"])) == []
    assert (ROOT / "conf" / "experiment.yaml").read_text().count("tracking:") == 1
