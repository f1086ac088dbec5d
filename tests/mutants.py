"""Mutation check of the guards: each mutant removes or bends one guard, and the tests chosen
for it must fail (`make mutants`, or python -m tests.mutants [--only TEXT] [--list]
[--baseline]).

Each mutant is applied to a copy of the tree in a temporary folder (the files git knows,
committed or not; never the working tree), its tests run there, and the file is put back.
A mutant whose tests still pass survived: its guard is unguarded. Exit status 1 when any
survived that is not accepted (each accepted one says why), 2 when the list no longer
matches the code (an original snippet not found exactly once) or a selection errs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600  # seconds per mutant; a hang counts as killed (the tests did not pass)


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str                # relative to the repository root
    original: str            # must occur exactly once in the file
    mutated: str
    tests: tuple[str, ...]   # pytest arguments: node ids, -k expressions
    accepted: str | None = None  # why surviving is acceptable (then it does not fail the run)


GUARDS = "tests/test_guards.py"
QUEUE = "tests/test_queue.py"
OPERATIONS = "tests/test_operations.py"
LIVENESS = "tests/test_liveness.py"
SLURM = "tests/test_slurm.py"
BUCKET = "tests/test_bucket.py"
WORKER_INPROCESS = "tests/test_worker_inprocess.py"
OWNERSHIP = "tests/test_ownership.py"

MUTANTS = [
    # --- trainer: scores, checkpoints, atomic writes, labels --------------------------------
    Mutant("balanced accuracy is the mean recall", "trainer/train.py",
           '"balanced_accuracy": sum(recalls) / len(recalls),',
           '"balanced_accuracy": max(recalls),',
           (GUARDS, "-k", "scores")),
    Mutant("balanced accuracy of one class present", "trainer/train.py",
           '"balanced_accuracy": sum(recalls) / len(recalls),',
           '"balanced_accuracy": sum(recalls) / 2,',
           (GUARDS, "-k", "scores")),
    Mutant("majority rate is the larger class", "trainer/train.py",
           '"majority_rate": max(pos, neg) / (pos + neg),',
           '"majority_rate": pos / (pos + neg),',
           (GUARDS, "-k", "scores")),
    Mutant("a zero logit predicts negative", "trainer/train.py",
           "    pred = logits > 0\n", "    pred = logits >= 0\n",
           (GUARDS, "-k", "scores or zero_logit")),
    Mutant("a state's step must match its manifest", "trainer/checkpoint.py",
           'if state["step"] != manifest["step"]:', "if False:",
           (GUARDS, "-k", "manifest")),
    Mutant("a state's size must match its manifest", "trainer/checkpoint.py",
           'if len(data) != manifest.get("bytes") or ', "if ",
           (GUARDS, "-k", "manifest")),
    Mutant("a state's checksum must match its manifest", "trainer/checkpoint.py",
           ' or hashlib.sha256(data).hexdigest() != manifest.get(\n        "sha256"\n    ):',
           ":",
           (GUARDS, "-k", "manifest")),
    Mutant("a state must hold every part", "trainer/checkpoint.py",
           "if not isinstance(state, dict) or not REQUIRED_STATE_KEYS <= state.keys():",
           "if not isinstance(state, dict):",
           (GUARDS, "-k", "training_state")),
    Mutant("old states are pruned to the newest two", "trainer/checkpoint.py",
           "for old in list_states(out_dir)[KEEP_STATES:]:",
           "for old in list_states(out_dir)[KEEP_STATES + 1:]:",
           (GUARDS, "-k", "newest_states")),
    Mutant("an atomic write syncs its data before the rename", "trainer/atomic.py",
           "            os.fsync(f.fileno())\n", "            pass\n",
           (GUARDS, "-k", "atomic")),
    Mutant("an atomic write syncs the folder after the rename", "trainer/atomic.py",
           "    fsync_dir(path.parent)\n", "",
           (GUARDS, "-k", "atomic")),
    Mutant("an atomic write renames, never rewrites in place", "trainer/atomic.py",
           "        os.replace(tmp, path)\n",
           "        path.write_bytes(Path(tmp).read_bytes())\n        os.unlink(tmp)\n",
           (GUARDS, "-k", "atomic or reader")),
    Mutant("a failed atomic write removes its temp file", "trainer/atomic.py",
           "            os.unlink(tmp)\n", "            pass\n",
           (GUARDS, "-k", "failed_atomic")),
    Mutant("an atomic write gives the file the mode open() would", "trainer/atomic.py",
           "            os.fchmod(f.fileno(), FILE_MODE)\n", "            pass\n",
           (GUARDS, "-k", "mode_open_would")),
    Mutant("resume compares the whole config, not only the model", "trainer/config.py",
           "    walk(saved, wanted, ())\n",
           '    walk(saved.get("model"), wanted.get("model"), ("model",))\n',
           ("tests/test_train.py", "-k", "another_setting")),
    Mutant("a write into a job folder never recreates it", "trainer/atomic.py",
           "    path.parent.mkdir(parents=parents, exist_ok=True)\n",
           "    path.parent.mkdir(parents=True, exist_ok=True)\n",
           (GUARDS, "-k", "moved_folder")),
    Mutant("a write failed because the folder moved says moved", "trainer/train.py",
           "            check_folder()  # a write that failed because the folder moved says so\n",
           "            pass\n",
           ("tests/test_train.py", "-k", "failed_because_the_folder_moved")),
    Mutant("labels are ±1", "trainer/data.py",
           "return hit.long() * 2 - 1", "return hit.long()",
           ("tests/test_data.py", "-k", "brute_force")),
    Mutant("labels follow links of every length", "trainer/data.py",
           "for _ in range(max(1, (V - 1).bit_length())):", "for _ in range(1):",
           ("tests/test_data.py", "-k", "brute_force")),
    Mutant("data parameters are checked", "trainer/data.py",
           "if V < 1 or C < 1 or not 0.0 <= rho <= 1.0 or count < 0:",
           "if V < 1 or C < 1 or count < 0:",
           ("tests/test_data.py", "-k", "bad_parameters")),
    # --- db: leases, fencing, attempts, cancel, requeue ------------------------------------
    Mutant("a worker's writes are fenced by its lease token", "db/queue.py",
           "return and_(Job.id == claim.id, Job.lease_token == claim.token, "
           'Job.state == "running")',
           'return and_(Job.id == claim.id, Job.state == "running")',
           (QUEUE, "-k", "taken_over")),
    Mutant("a fenced write that missed is reported lost", "db/queue.py",
           "return retrying and _logged(conn, claim, kind)", "return True",
           (QUEUE, "-k", "taken_over")),
    Mutant("a heartbeat that missed says the lease is lost", "db/queue.py",
           "return Lease(row is not None, row.stop_request if row else None)\n\n"
           "        return self._transaction(body, cancel=cancel)",
           "return Lease(True, row.stop_request if row else None)\n\n"
           "        return self._transaction(body, cancel=cancel)",
           (QUEUE, "-k", "taken_over or heartbeats")),
    Mutant("a lease expires only after its length", "db/queue.py",
           "Job.heartbeat_at < db_now() - Job.lease_seconds",
           "Job.heartbeat_at < db_now() + Job.lease_seconds",
           (QUEUE, "-k", "exclusive or heartbeats")),
    Mutant("a job out of attempts is not claimed", "db/queue.py",
           "Job.attempts < Job.max_attempts,", "Job.attempts <= Job.max_attempts,",
           (QUEUE, GUARDS, "-k", "silent_deaths or out_of_attempts")),
    Mutant("a job asked to cancel is never claimed", "db/queue.py",
           'or_(Job.stop_request.is_(None), Job.stop_request != "cancel"))',
           "or_(Job.stop_request.is_(None), Job.stop_request == Job.stop_request))",
           (OPERATIONS, "-k", "expiring_between")),
    Mutant("a claim is fenced on the lease it read", "db/queue.py",
           "Job.lease_token.is_(None) if row.lease_token is None\n"
           "                       else Job.lease_token == row.lease_token)",
           "True)",
           (GUARDS, "-k", "went_stale")),
    Mutant("an expired cancelled job is settled cancelled", "db/queue.py",
           'values, detail = {"state": "cancelled"}, {"cancelled": True}',
           'values, detail = {"state": "pending"}, {"cancelled": True}',
           (OPERATIONS, "-k", "settled_not_rerun")),
    Mutant("a graceful release does not burn an attempt", "db/queue.py",
           '"attempts": Job.attempts - 1, "heartbeat_at": None, "stop_request": None}\n'
           '        if not self._conditional(claim, "release"',
           '"heartbeat_at": None, "stop_request": None}\n'
           '        if not self._conditional(claim, "release"',
           (QUEUE, "-k", "release")),
    Mutant("a running job is cancelled through its worker", "db/queue.py",
           'elif row.state == "running" and row.id not in expired:',
           "elif False:",
           (OPERATIONS, "-k", "cancelled_through_its_worker")),
    Mutant("a cancel that came too late is kept for status", "db/queue.py",
           '"stop_request": _late_cancel(),\n                  "test_accuracy"',
           '"stop_request": None,\n                  "test_accuracy"',
           (LIVENESS, "-k", "too_late")),
    Mutant("requeue waits for a live worker's lease", "db/queue.py",
           "elif row.heartbeat_at + row.lease_seconds > now:", "elif False:",
           (QUEUE, "-k", "requeue_by_name")),
    Mutant("requeue judges only this host's workers", "db/queue.py",
           "if is_dead and host and worker_host(row.worker) == host else None)",
           "if is_dead else None)",
           (LIVENESS, "-k", "never_a_live_ones")),
    Mutant("requeue is fenced on the lease it judged", "db/queue.py",
           "fence = (Job.lease_token == row.lease_token if row.lease_token is not None\n"
           "                         else Job.lease_token.is_(None))",
           "fence = True",
           (LIVENESS, QUEUE, "-k", "requeue and not sigkilled"),
           accepted="the rows were read under the requeue's lock (FOR UPDATE, SQLite's write "
                    "lock): no test can renew or take the lease in between; kept as a second "
                    "line of defence"),
    Mutant("a claim skips rows other claimers hold (PostgreSQL)", "db/queue.py",
           ".with_for_update(skip_locked=True)  # PostgreSQL; SQLite holds the write lock",
           ".with_for_update()  # PostgreSQL; SQLite holds the write lock",
           (QUEUE, "-k", "skips_a_job")),
    Mutant("a claim locks the row it reads (PostgreSQL)", "db/queue.py",
           ".order_by(*ordering).limit(1)\n"
           "            .with_for_update(skip_locked=True)  # PostgreSQL; SQLite holds the "
           "write lock",
           ".order_by(*ordering).limit(1)",
           (QUEUE, "-k", "skips_a_job")),
    Mutant("a dead worker's job on its last attempt is failed", "db/queue.py",
           "exhausted = row.attempts >= row.max_attempts",
           "exhausted = row.attempts > row.max_attempts",
           (QUEUE, "-k", "last_attempt")),
    Mutant("a cancelled launch is judged by its own id", "db/queue.py",
           "select(Launch.id).where(Launch.scheduler == scheduler, Launch.job_id == job_id,",
           "select(Launch.id).where(Launch.scheduler == scheduler,",
           (QUEUE, "-k", "cancelled_launch")),
    Mutant("reclaim judges only this host's workers", "db/queue.py",
           "                if worker_host(row.worker) != host:\n                    continue\n",
           "",
           (GUARDS, "-k", "this_hosts")),
    # --- runner: liveness, worker, status ----------------------------------------------------
    Mutant("a reused pid is not the dead worker's process", "runner/liveness.py",
           "if now is not None and now != recorded:", "if False:",
           (GUARDS, "-k", "reused")),
    Mutant("a pid that is gone means a dead worker", "runner/liveness.py",
           "    except ProcessLookupError:\n        return False",
           "    except ProcessLookupError:\n        return True",
           (LIVENESS, "-k", "never_a_live_ones")),
    Mutant("status counts a dead worker of this host as not live", "runner/status.py",
           '            w["alive"] = False\n', "            pass\n",
           (LIVENESS, "-k", "sigkilled and sqlite")),
    Mutant("a worker stops training when its lease is lost", "runner/worker.py",
           "                                    \"worker took the job over); stopping this "
           "attempt\")\n            self.stop_job.set()\n",
           "                                    \"worker took the job over); stopping this "
           "attempt\")\n",
           (LIVENESS, "-k", "lease_was_taken")),
    Mutant("a worker hands a cancelled job over as cancelled", "runner/worker.py",
           '        if control.request == "cancel":\n            self.queue.cancelled(',
           '        if False:\n            self.queue.cancelled(',
           (OPERATIONS, "-k", "cancel_while_a_worker_trains and sqlite")),
    Mutant("a worker beats well within its lease", "runner/worker.py",
           "Heartbeat(self.queue, control, self.lease / 4)",
           "Heartbeat(self.queue, control, self.lease)",
           ("tests/test_faults.py", "-k", "first_heartbeat")),
    Mutant("--gpu must be an index or cpu", "runner/worker.py",
           "    if gpu != \"cpu\" and not gpu.isdigit():\n", "    if False:\n",
           ("tests/test_bad_input.py", "-k", "gpu and sqlite")),
    Mutant("a stop that came during the claim is not lost", "runner/worker.py",
           "        if self.stopping.is_set():\n            self.stop_job.set()\n", "",
           ("tests/test_worker_signals.py", "-k", "during_the_claim and sqlite")),
    Mutant("only a second Ctrl-C exits at once", "runner/worker.py",
           "if self.stopping.is_set() and signum == signal.SIGINT:",
           "if self.stopping.is_set():",
           ("tests/test_worker_signals.py", "-k", "second_sigterm")),
    Mutant("the readers' bucket cache knows a re-uploaded object by its ETag",
           "runner/bucket/view.py",
           "wanted = [key, tags.get(job.join(key).key)]",
           "wanted = (index.get(relative) if (index.get(relative) or [None])[0] == key\n"
           "                  else [key, None])",
           ("tests/test_jobfolder_contract.py", "-k", "rewrites")),
    Mutant("a bucket folder's first head is written only if none is there",
           "runner/bucket/jobfolder.py",
           "if_match=head.etag, if_absent=head.etag is None)", "if_match=head.etag)",
           ("tests/test_bucket_heads.py", "-k", "read_no_head")),
    Mutant("a busy folder hands the job back, not failed", "runner/worker.py",
           "        if result is None and busy:\n", "        if False:\n",
           (WORKER_INPROCESS, "-k", "busy_folder and sqlite")),
    Mutant("a stopped job goes back at the step it reached", "runner/worker.py",
           "self.queue.release(claim, result.step, self.why(",
           "self.queue.release(claim, claim.step, self.why(",
           (WORKER_INPROCESS, "-k", "stop_mid_job and sqlite")),
    # --- runner.slurm: a worker's self-requeue -----------------------------------------------
    Mutant("a cancelled SLURM launch is not requeued", "runner/slurm/task.py",
           '    if queue.launch_cancelled("slurm", task.launch_id):', "    if False:",
           (SLURM, "-k", "cancel_mid")),
    Mutant("a task SLURM is ending (scancel) is not requeued", "runner/slurm/task.py",
           'if state != "RUNNING":', "if False:",
           (SLURM, "-k", "plain_scancel")),
    Mutant("a task of a cancelled launch claims nothing", "runner/slurm/task.py",
           '    if task and queue.launch_cancelled("slurm", task.launch_id):',
           "    if False:",
           (SLURM, "-k", "cancelled_launch_that")),
    Mutant("USR1 makes a worker hand back", "runner/slurm/task.py",
           "HAND_BACK_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)",
           "HAND_BACK_SIGNALS = (signal.SIGTERM, signal.SIGHUP)",
           (SLURM, "-k", "signals_clusters")),
    # --- runner.bucket: job folders in object storage ---------------------------------------
    Mutant("a head write is conditional on the ETag read", "runner/bucket/jobfolder.py",
           "etag = put(job.join(HEAD), body, if_match=head.etag, if_absent=head.etag is None)",
           "etag = put(job.join(HEAD), body)",
           (BUCKET, "-k", "fenced")),
    Mutant("a claim never takes a folder from a newer attempt", "runner/bucket/jobfolder.py",
           "    if head.attempt > attempt:\n", "    if False:\n",
           (BUCKET, "-k", "fenced")),
    Mutant("a state goes up only with its manifest", "runner/bucket/sync.py",
           "    present = set(files)\n    return [rel for rel in files if not _is_state(rel) or (",
           "    present = set(files)\n    return [rel for rel in files if True or (",
           (BUCKET, "-k", "still_being")),
    Mutant("a job ends only once the bucket holds its files", "runner/worker.py",
           "                folder.save()\n",
           "                pass\n",
           (BUCKET, "-k", "outage")),
    Mutant("a refused head write stops the uploads", "runner/bucket/sync.py",
           "            if newer.attempt == self.attempt:",
           "            if True:",
           (BUCKET, "-k", "fenced")),
    Mutant("a head write whose answer was lost is known as its own", "runner/bucket/sync.py",
           "            if newer.attempt == self.attempt:",
           "            if False:",
           (BUCKET, "-k", "answer_was_lost")),
    Mutant("superseded states are those the attempt last named", "runner/bucket/sync.py",
           "dropped = [self.job.join(key).key for rel, key in before.files.items()",
           "dropped = [self.job.join(key).key for rel, key in self.head.files.items()",
           (BUCKET, "-k", "answer_was_lost or older_attempts_states")),
    Mutant("a working copy in use is not cleared", "runner/bucket/sync.py",
           "                with lock.acquire(timeout=0):\n"
           "                    shutil.rmtree(old, ignore_errors=True)\n",
           "                shutil.rmtree(old, ignore_errors=True)\n",
           (BUCKET, "-k", "old_working_copies")),
    Mutant("a bucket folder's head is deleted first", "runner/bucket/s3.py",
           "    delete(source.bucket, [k for k in keys if k == first])\n"
           "    delete(source.bucket, [k for k in keys if k != first])\n",
           "    delete(source.bucket, keys)\n",
           (BUCKET, "-k", "deletes_its_head")),
    Mutant("gc spares the head owner's unnamed objects", "runner/bucket/jobfolder.py",
           "        if attempt < head.attempt or (attempt == head.attempt and step is not None",
           "        if attempt <= head.attempt or (attempt == head.attempt and step is not None",
           (BUCKET, "-k", "torn")),
    Mutant("gc spares what the head names", "runner/bucket/jobfolder.py",
           "        if attempt is None or relative in named:\n",
           "        if attempt is None:\n",
           (BUCKET, "-k", "fenced")),
    Mutant("plan refuses new jobs' folders that are another queue's", "runner/cli.py",
           "    if foreign and not adopt:\n",
           "    if foreign and not adopt and False:\n",
           (OWNERSHIP, "-k", "plan_refuses")),
    Mutant("a worker checks whose folder it claims", "runner/worker.py",
           "claim_folder(folder, self.queue_id(), claim.name, claim.attempt, claim.step,",
           "claim_folder(folder, None, claim.name, claim.attempt, claim.step,",
           (OWNERSHIP, "-k", "a_worker_fails")),
    Mutant("a folder with job files and no marker is foreign on a first attempt",
           "runner/ownership.py",
           "if attempt <= 1 and step == 0 and folder.holds_job_files(budget):",
           "if False:",
           (OWNERSHIP, "-k", "without_a_marker or job_files")),
    Mutant("serve generates a token for any host beyond loopback", "runner/cli.py",
           "generated = token is None and not is_loopback(host)",
           'generated = token is None and host in ("0.0.0.0", "::", "")',
           ("tests/test_serve_access.py", "-k", "lan_address")),
    Mutant("the dashboard says when the bucket cannot be read", "runner/reporting/serve.py",
           "                                         BucketError: unavailable(\"bucket\"),\n", "",
           (BUCKET, "-k", "readers_need_no_local")),
    Mutant("an emptied prefix in a bucket is no folder moved aside", "runner/bucket/folder.py",
           "if size or s3.exists(s3.S3Path.parse(url))}", "if True}",
           ("tests/test_jobfolder_contract.py", "-k", "moved_aside")),
    Mutant("an owner deletes the states it put but never named", "runner/bucket/sync.py",
           "unnamed = self.put_states - named", "unnamed = set()",
           (BUCKET, "-k", "pruned_while")),
    Mutant("gc collects an owner's unnamed states older than its newest named",
           "runner/bucket/jobfolder.py",
           "and newest_own is not None and step < newest_own):",
           "and False):",
           (BUCKET, "-k", "owners_unnamed")),
    Mutant("gc leaves an owner's unnamed states newer than its newest named",
           "runner/bucket/jobfolder.py",
           "and newest_own is not None and step < newest_own):",
           "and newest_own is not None):",
           (BUCKET, "-k", "owners_unnamed")),
    Mutant("readers fall back on their cached copies while the bucket is away",
           "runner/bucket/view.py",
           "            if fallback is None:\n", "            if True:\n",
           (BUCKET, "-k", "readers_need_no_local")),
    Mutant("a group's members leave their task's requeue to the group", "runner/worker.py",
           "if self.stopped_by and self.requeue_task:", "if self.stopped_by:",
           (SLURM, "-k", "two_workers")),
    Mutant("a group's members run in sessions of their own (one Ctrl-C each)",
           "runner/group.py", "start_new_session=True,", "start_new_session=False,",
           ("tests/test_worker_group.py", "-k", "INT")),
    Mutant("a group passes a stop signal on to each member", "runner/group.py",
           "                member.send_signal(signum)", "                pass",
           ("tests/test_worker_group.py", "-k", "TERM")),
    Mutant("readers ask an unreachable endpoint once per command", "runner/bucket/view.py",
           "fallback.unreachable = s3.transient(e)", "fallback.unreachable = False",
           ("tests/test_bucket_view.py",)),
    Mutant("a claim takes the first of the pending and expired jobs in its order", "db/queue.py",
           "            return min(found, key=lambda row: row.position, default=None)\n",
           "            return max(found, key=lambda row: row.position, default=None)\n",
           ("tests/test_queue.py", "-k", "takes_its_place and sqlite")),
    Mutant("... in the cost order too", "db/queue.py",
           "return min(found, key=lambda row: (-row.cost, row.position), default=None)",
           "return max(found, key=lambda row: (-row.cost, row.position), default=None)",
           ("tests/test_queue.py", "-k", "takes_its_place and sqlite")),
]


def tree_files() -> list[str]:
    """The files git knows here, committed or not (ignored ones, like .venv and runs, left)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                          "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def copy_tree(dest: Path) -> None:
    for rel in tree_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def stale(mutants: list[Mutant]) -> list[str]:
    """Mutants whose original snippet is not found exactly once in its file."""
    problems = []
    for m in mutants:
        count = (ROOT / m.path).read_text().count(m.original)
        if count != 1:
            problems.append(f"{m.name}: its original is found {count} times in {m.path}")
    return problems


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[int, float]:
    """pytest's exit status for `tests` in `tree` (-1 on timeout), and the seconds taken."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                               "no:cacheprovider", *tests], cwd=tree, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        status = -1
    return status, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, metavar="TEXT",
                        help="Only the mutants whose name contains TEXT.")
    parser.add_argument("--list", action="store_true", help="List the mutants and stop.")
    parser.add_argument("--baseline", action="store_true",
                        help="First run each selection on the unchanged copy: it must pass "
                             "(else a kill proves nothing).")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.only is None or args.only in m.name]
    if args.list:
        for m in mutants:
            print(f"{m.path:22} {m.name}")
        return 0
    problems = stale(mutants)
    if problems:
        print("\n".join(["the mutant list does not match the code:", *problems]),
              file=sys.stderr)
        return 2
    killed, survived, errors = [], [], []
    with tempfile.TemporaryDirectory(prefix="mutants-") as folder:
        tree = Path(folder)
        copy_tree(tree)
        if args.baseline:
            for tests in dict.fromkeys(m.tests for m in mutants):
                status, seconds = run_tests(tree, tests)
                print(f"{'baseline ok' if status == 0 else 'BASELINE FAILS':20} "
                      f"{seconds:6.1f}s  {' '.join(tests)}", flush=True)
                if status != 0:
                    return 2
        for m in mutants:
            path = tree / m.path
            original = path.read_text()
            path.write_text(original.replace(m.original, m.mutated))
            try:
                status, seconds = run_tests(tree, m.tests)
            finally:
                path.write_text(original)
            if status == 0:
                word = "survived (accepted)" if m.accepted else "SURVIVED"
                survived.append(m)
            elif status in (1, -1):
                word = "killed" if status == 1 else "killed (timeout)"
                killed.append(m)
            else:  # 2-5: interrupted, internal error, usage error, no tests collected
                word = f"ERROR (pytest exit status {status})"
                errors.append(m)
            print(f"{word:20} {seconds:6.1f}s  {m.path}: {m.name}", flush=True)
    unaccepted = [m for m in survived if not m.accepted]
    print(f"\n{len(mutants)} mutants: {len(killed)} killed, {len(survived)} survived "
          f"({len(survived) - len(unaccepted)} accepted), {len(errors)} errors; score "
          f"{len(killed)}/{len(mutants) - len(errors)}")
    for m in survived:
        print(f"  survived: {m.name}" + (f" (accepted: {m.accepted})" if m.accepted else ""))
    return 2 if errors else 1 if unaccepted else 0


if __name__ == "__main__":
    sys.exit(main())
