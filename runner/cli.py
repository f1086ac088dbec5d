"""Command line: python -m runner [--db URL] COMMAND ...

Data goes to stdout, logs to stderr. Bad input (files, keys, values, an
unreachable database) prints one line naming the fault and exits with 2,
before anything is written.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path

import click

from db import DatabaseError, JobQueue, connect, mask_url
from db.engine import NoQueue, default_url
from db.models import STATES
from db.queue import ORDERS, PlanReport
from runner.bucket.s3 import BucketError

EXIT_BAD_INPUT = 2


class BadInput(click.ClickException):
    exit_code = EXIT_BAD_INPUT


def open_queue(ctx: click.Context, create: bool = False, readonly: bool = False,
               outage: float = 0, worker: bool = False) -> JobQueue:
    """The queue; `readonly` for commands that only look (they never create or migrate).

    `outage`: seconds to wait for a database that is unreachable (a worker's --db-outage),
    here and in every later operation; the user's commands report an outage at once.
    `worker`: one database connection at a time (see db.engine.connect).
    """
    from db.outage import OutageExceeded, Outages

    def opened(retrying: bool) -> JobQueue:
        return JobQueue(connect(ctx.obj["db"], create=create, readonly=readonly,
                                one_connection=worker), outage_budget=outage)

    try:
        return Outages(outage, log_outage).run(opened, str)
    except OutageExceeded as e:
        raise click.ClickException(str(e)) from None
    except DatabaseError as e:
        raise BadInput(str(e)) from None


def open_existing_queue(ctx: click.Context) -> JobQueue:
    """The queue, to write to, where there is one already: a database without a queue (an
    empty one, a wrong --db) is refused and gets no tables."""
    from db.engine import NotAQueue

    try:
        connect(ctx.obj["db"], readonly=True).dispose()
    except NotAQueue as e:
        raise BadInput(str(e)) from None
    except DatabaseError:
        pass  # an older schema (upgraded below), or what open_queue reports itself
    return open_queue(ctx)


def log_outage(notice) -> None:
    """The database was unreachable when a command started, and the command waits."""
    from runner.progress import duration

    if notice.kind == "started":
        logging.getLogger("runner").warning("%s; retrying for up to %s", notice.reason,
                                            duration(notice.budget))
    else:
        logging.getLogger("runner").warning("database back after %s", duration(notice.seconds))


def print_version(ctx: click.Context, param, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from runner.version import package_version

        click.echo(f"runner {package_version()}")
        ctx.exit()


@click.group(invoke_without_command=True)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=print_version, help="Print the program's version and exit.")
@click.option("--db", envvar="RUNNER_DB", default=None, metavar="URL",
              help="Queue database; else $RUNNER_DB, else sqlite:///runs/queue.sqlite. "
                   "A plain file path means a SQLite file there. "
                   "postgresql+psycopg://user:pass@host/db for several hosts.")
@click.pass_context
def cli(ctx: click.Context, db: str | None) -> None:
    """Resumable job queue for the table-connectivity sweep.

    \b
    Examples:
      python -m runner plan                      # the 60-run study
      python -m runner plan --profile smoke --only V=5
      python -m runner worker --gpu 0
      python -m runner status --watch
      python -m runner requeue --failed
      python -m runner results
      python -m runner plot --out runs/sample_complexity.png
      python -m runner logs table_connectivity_standard_V5_N256_run1 --follow
    """
    ctx.obj = {"db": db or default_url()}
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@cli.command()
@click.option("--sweep", "sweep_path", default=None, type=click.Path(dir_okay=False),
              help="Sweep file (grid, names, folders) [default: the study's conf/sweep.yaml].")
@click.option("--profile", default=None, help="full | smoke | small (default: the sweep's).")
@click.option("--only", multiple=True, metavar="KEY=VALUE",
              help="Restrict the grid: V=20, N=256, model=lowrank_gpt2, run=1 (repeatable).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a resolved config key, e.g. training.train_steps=200.")
@click.option("--out-root", envvar="RUNNER_OUT_ROOT", default="runs", show_default=True,
              help="Where the jobs' folders go (else $RUNNER_OUT_ROOT): a folder every "
                   "worker sees, or s3://BUCKET/PREFIX (endpoint and credentials from "
                   "the AWS variables: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).")
@click.option("--dry-run", is_flag=True, help="Report what would be planned; write nothing.")
@click.option("--replace", is_flag=True,
              help="Apply changed configs to queued jobs that are not running: each goes back "
                   "to pending with the new config, its old folder moved aside "
                   "(<folder>.replaced-<time>), never deleted. It does not touch new "
                   "jobs' folders that another queue left: see --adopt-folders.")
@click.option("--adopt-folders", is_flag=True,
              help="Take over new jobs' folders that belong to another queue (or hold a "
                   "job's files and no queue marker, e.g. after the database was made "
                   "again): they are marked as this queue's, and workers resume from their "
                   "states where the config matches. Without it such folders are refused.")
@click.pass_context
def plan(ctx, sweep_path, profile, only, overrides, out_root, dry_run, replace, adopt_folders):
    """Insert the sweep's missing jobs into the queue (never duplicates).

    A job already queued with another config (or folder) is left alone and
    reported with the keys that differ; nothing is planned then, and the
    exit status is 2. Add --replace to apply the change.
    """
    from runner.jobfolders import FolderUnavailable, move_aside, open_folder
    from runner.ownership import marker
    from runner.planner import (
        DEFAULT_SWEEP,
        SweepError,
        check_out_root,
        job_rows,
        load_sweep,
        parse_only,
    )
    from trainer.config import ConfigError

    try:
        sweep = load_sweep(Path(sweep_path) if sweep_path else DEFAULT_SWEEP)
        check_out_root(out_root)
        rows = job_rows(sweep, profile or sweep.get("profile", "full"),
                        parse_only(only, sweep), list(overrides), out_root)
    except (SweepError, ConfigError) as e:
        raise BadInput(str(e)) from None
    try:
        queue = JobQueue(connect(ctx.obj["db"], create=not dry_run))
        preview = queue.plan(rows, dry_run=True)
        queue_id = queue.queue_id()
    except NoQueue:  # a dry run against a queue not created yet: all would be new
        queue, preview, queue_id = None, PlanReport(new=[row["name"] for row in rows]), None
    except DatabaseError as e:
        raise BadInput(str(e)) from None
    adopted = foreign_job_folders(rows, preview.new, out_root, queue_id, adopt_folders)
    if queue is None:
        report = preview
    else:
        # A changed job without --replace refuses the whole plan: report below, write nothing.
        dry_run_only = dry_run or (not replace and bool(preview.changed))
        try:
            if not dry_run_only:  # marked as this queue's before the rows that use them
                for row in rows:
                    if row["out_dir"] in adopted:
                        open_folder(row["out_dir"]).adopt(marker(queue_id, row["name"]))
            report = queue.plan(rows, dry_run=dry_run_only, replace=replace,
                                move_aside=move_aside)
        except FolderUnavailable as e:
            raise BadInput(f"cannot take a job's folder over: {e}") from None
        except DatabaseError as e:
            raise BadInput(str(e)) from None
        except OSError as e:  # an old folder could not be moved aside: nothing was changed
            raise BadInput(f"cannot move a replaced job's folder aside: {e}") from None
    if report.changed and not replace:
        raise BadInput(f"{changed_summary(report.changed)}; nothing planned. To apply the "
                       f"change (old folders are moved aside, never deleted): "
                       f"{replan_command()}")
    verb = "would plan" if dry_run else "planned"
    click.echo(f"{verb} {len(rows)} jobs: {len(report.new)} new, "
               f"{len(report.existing)} already queued"
               + (f", {len(report.replaced)} replaced" if report.replaced else ""))
    if adopted:
        click.echo(f"{len(adopted)} new job(s) {'would take' if dry_run else 'took'} over "
                   "folders another queue left; workers resume from their states", err=True)
    if report.replaced:
        click.echo(f"{changed_summary({n: report.changed[n] for n in report.replaced})}: "
                   f"{'would be' if dry_run else 'now'} pending with the new config, old "
                   "folders moved aside to <folder>.replaced-<time>", err=True)
    if report.running:
        click.echo(f"warning: {len(report.running)} changed job(s) are running and were left "
                   f"as they are: {', '.join(report.running[:3])}"
                   + (", ..." if len(report.running) > 3 else "")
                   + "; run plan --replace again once they are done", err=True)


def foreign_job_folders(rows: list[dict], new: list[str], out_root: str, queue_id: str | None,
                        adopt: bool) -> dict[str, dict | str]:
    """New jobs' folders that are not this queue's: refused in one line unless `adopt`."""
    from runner.jobfolders import FolderUnavailable, open_folder
    from runner.ownership import foreign_folders, refusal

    names = set(new)
    try:
        foreign = foreign_folders(open_folder(out_root),
                                  [row["out_dir"] for row in rows if row["name"] in names],
                                  queue_id)
    except FolderUnavailable as e:
        raise BadInput(f"cannot look into the jobs' folders: {e}") from None
    if foreign and not adopt:
        raise BadInput(refusal(foreign))
    return foreign


def changed_summary(changed: dict[str, list[str]], limit: int = 4) -> str:
    """One line: how many jobs differ, and in which keys (most common first)."""
    counts = collections.Counter(change for changes in changed.values() for change in changes)
    shown = [f"{change}" + (f" ({n} jobs)" if n != len(changed) else "")
             for change, n in counts.most_common(limit)]
    more = f" and {len(counts) - limit} more difference(s)" if len(counts) > limit else ""
    return (f"{len(changed)} job(s) are queued with a different config: "
            + "; ".join(shown) + more)


def replan_command() -> str:
    """This very command line, with --replace."""
    return shlex.join(["python", "-m", "runner", *sys.argv[1:], "--replace"])


@cli.command()
@click.option("--gpu", default="0", show_default=True, help="GPU index, or 'cpu'.")
@click.option("--max-jobs", type=click.IntRange(min=1), default=None, help="Stop after N jobs.")
@click.option("--lease", type=click.FloatRange(min=1), default=60, show_default=True,
              help="Seconds a silent worker keeps its job before another may take it over.")
@click.option("--order", type=click.Choice(ORDERS), default="guide", show_default=True,
              help="guide: the study's order; cost: longest jobs first.")
@click.option("--wait", is_flag=True, help="Keep polling when nothing is claimable.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default in a SLURM task: the CPUs it was allocated, "
                   "$SLURM_CPUS_PER_TASK, else its share of $SLURM_CPUS_ON_NODE, else its "
                   "CPU affinity; elsewhere all cores). Give each of several CPU "
                   "workers on one machine its share, or they slow each other down badly.")
@click.option("--progress-every", type=click.FloatRange(min=0), default=30, show_default=True,
              metavar="SECONDS",
              help="Seconds between progress log lines when not on a terminal "
                   "(on a terminal: a progress bar).")
@click.option("--db-outage", type=click.FloatRange(min=0), default=600, show_default=True,
              metavar="SECONDS",
              help="How long the database may stay unreachable (restart, failover, network "
                   "cut, SQLite locked or disk full) while training goes on and queue writes "
                   "wait; past it the job is checkpointed and the worker exits 1. "
                   "0: exit at the first failure. The same budget holds for a bucket.")
@click.option("--cache-dir", envvar="RUNNER_CACHE_DIR", default=None, metavar="DIR",
              help="Local working copies of job folders that live in a bucket (else "
                   "$RUNNER_CACHE_DIR, else ~/.cache/runner). $VAR and ${VAR} are expanded "
                   "where the worker runs ('$SLURM_TMPDIR/runner': a node's local disk).")
@click.option("--processes", type=click.IntRange(min=1, max=64), default=1, show_default=True,
              metavar="K",
              help="K workers sharing this device, each claiming its own jobs (small jobs "
                   "leave a GPU idle); signals reach each, and without --threads each gets "
                   "its share of the CPUs.")
@click.pass_context
def worker(ctx, gpu, max_jobs, lease, order, wait, threads, progress_every, db_outage,
           cache_dir, processes):
    """Claim jobs one by one and train them in this process.

    On a terminal the running job shows a progress bar (step/total, loss,
    steps/s, ETA); otherwise a log line every --progress-every seconds.
    """
    from runner import group
    from runner.slurm.task import SlurmTask
    from runner.worker import BadDevice, Worker

    cache_dir = expand_variables(cache_dir, "--cache-dir")
    queue = open_queue(ctx, outage=db_outage, worker=True)
    task = SlurmTask.from_environ(os.environ)
    if processes > 1 and not group.is_member():
        ctx.exit(worker_group(queue, gpu, processes, threads, task))
    try:
        w = Worker(queue, gpu, lease, order, threads, progress_every, slurm=task,
                   cache_dir=cache_dir, requeue_task=not group.is_member())
    except BadDevice as e:
        raise BadInput(str(e)) from None
    w.install_signal_handlers()
    try:
        w.run(max_jobs=max_jobs, wait=wait)
    except DatabaseError as e:
        raise click.ClickException(str(e)) from None
    if w.folder_error is not None:
        raise click.ClickException(f"{w.folder_error}; the job was handed back")
    if w.all_failed:
        raise click.ClickException(f"every job this worker ran failed ({len(w.outcomes)}); "
                                   "see `python -m runner status`")


def expand_variables(value: str | None, option: str) -> str | None:
    """`value` with $VAR and ${VAR} expanded from this process's environment; one that is
    not set is refused (a folder named '$SLURM_TMPDIR' would be made instead)."""
    if value is None or "$" not in value:
        return value
    expanded = os.path.expandvars(value)
    if unset := re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded):
        raise BadInput(f"{option} {value!r}: ${unset[0]} is not set here")
    return expanded


def worker_group(queue: JobQueue, gpu: str, processes: int, threads: int | None,
                 task) -> int:
    """`worker --processes K`: K members (this command with --processes 1), run by
    runner.group; under SLURM the task requeues itself once, after the last of them."""
    from runner import group
    from runner.slurm.task import requeue_if_work_left
    from runner.worker import BadDevice, check_gpu

    try:
        check_gpu(gpu)  # once here, rather than a line from each member
    except BadDevice as e:
        raise BadInput(str(e)) from None
    queue.engine.dispose()  # no connection held while the members work
    args = [*sys.argv[1:], "--processes", "1"]
    if threads is None:
        args += ["--threads", str(group.threads_each(processes, task.cpus if task else None))]
    logging.getLogger("runner").info("%d workers on %s", processes, gpu)
    return group.run_group(processes, args, when_stopped=lambda: requeue_if_work_left(queue,
                                                                                      task))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", type=click.FloatRange(min=0.5), is_flag=False, flag_value=5.0,
              default=None, metavar="[SECONDS]",
              help="Redraw every SECONDS (default 5) until Ctrl-C.")
@click.option("--state", "states", multiple=True, type=click.Choice(STATES),
              help="List the jobs in this state (repeatable); counts and ETA stay whole.")
@click.option("--limit", type=click.IntRange(min=0), default=None, metavar="N",
              help="At most N jobs listed (with --offset: a page).")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="K", help="Skip the first K jobs listed (in the guide's order).")
@click.pass_context
def status(ctx, as_json, watch, states, limit, offset):
    """Counts by state, sweep progress and ETA, workers, running jobs, failed jobs.

    The ETA comes from the step rates measured so far and the number of live
    workers. A running job whose heartbeat is older than its lease, or whose
    worker on this host is gone, is marked stale: another worker may take it.
    The table lists the running jobs and the first failed ones; --state lists any
    state, and --limit/--offset page through it (so does --json).
    """
    from runner.status import Listing, snapshot, status_json, status_text

    if watch is not None and as_json:
        raise BadInput("--watch redraws the table; for scripts, poll status --json instead")
    queue = open_queue(ctx, readonly=True)
    listing = Listing(states=tuple(states), limit=limit, offset=offset)

    def report() -> str:
        if as_json:
            return status_json(snapshot(queue, listing))
        # The plain table reads whole only the jobs it shows (running, failed).
        return status_text(snapshot(queue, None if listing == Listing() else listing),
                           mask_url(ctx.obj["db"]))

    if watch is None:
        click.echo(report())
        return
    try:
        while True:
            text = report()
            click.clear()
            click.echo(f"{time.strftime('%H:%M:%S')}  every {watch:g}s, Ctrl-C to stop\n")
            click.echo(text)
            time.sleep(watch)
    except KeyboardInterrupt:
        pass


@cli.command()
@click.argument("named", nargs=-1, metavar="[NAME]...")
@click.option("--failed", is_flag=True, help="Every failed job.")
@click.option("--name", "names", multiple=True, metavar="NAME",
              help="A job by name, or any part of it that matches one job (repeatable).")
@click.option("--fresh", is_flag=True,
              help="Start the named jobs over from step 0: their folders are moved aside "
                   "(<folder>.replaced-<time>), never deleted.")
@click.pass_context
def requeue(ctx, named, failed, names, fresh):
    """Put failed (or named) jobs back to pending; they resume from their checkpoint.

    Cancelled and succeeded jobs come back the same way (a succeeded one re-finishes
    from its final state; use --fresh to train it again). A named running job is
    requeued only once its worker has gone silent for longer than its lease, or
    its worker's process on this host is gone.

    \b
    Examples:
      python -m runner requeue --failed
      python -m runner requeue standard_V5_N256_run1
      python -m runner requeue --fresh lowrank_V20_N4096_run3
    """
    from runner.jobfolders import move_aside
    from runner.liveness import HOST, dead_reason

    names = (*names, *named)
    if not failed and not names:
        raise BadInput("say which jobs: --failed and/or NAME")
    if fresh and (failed or not names):
        raise BadInput("--fresh starts named jobs over: give their names (not --failed)")
    queue = open_queue(ctx)
    jobs = queue.jobs() if names else []
    names = list(dict.fromkeys(find_job(jobs, name)["name"] for name in names))
    try:
        done = queue.requeue(names, failed=failed, fresh=fresh, move_aside=move_aside,
                             host=HOST, is_dead=dead_reason)
    except ValueError as e:
        raise BadInput(str(e)) from None
    except OSError as e:  # the folder could not be moved aside: nothing was changed
        raise BadInput(f"cannot move a job's folder aside: {e}") from None
    click.echo(f"requeued {len(done)} job(s)" + (" from step 0" if fresh else "")
               + (": " + ", ".join(done) if done else ""))


@cli.command()
@click.argument("named", nargs=-1, metavar="[NAME]...")
@click.option("--pending", is_flag=True, help="Every pending job.")
@click.option("--failed", is_flag=True, help="Every failed job.")
@click.option("--only", multiple=True, metavar="KEY=VALUE",
              help="Restrict --pending/--failed: V=20, N=256, model=lowrank_gpt2, run=1 "
                   "(repeatable; values of one key OR-ed, keys AND-ed).")
@click.pass_context
def cancel(ctx, named, pending, failed, only):
    """Cancel jobs: they are never claimed until requeued (requeue NAME).

    A running job is stopped by its worker within one lease interval: it
    checkpoints, then marks the job cancelled.

    \b
    Examples:
      python -m runner cancel standard_V20_N4096_run3
      python -m runner cancel --pending --only V=20
    """
    if not (named or pending or failed):
        raise BadInput("say which jobs: NAME..., --pending or --failed")
    if only and not (pending or failed):
        raise BadInput("--only restricts --pending or --failed; name jobs directly instead")
    filters = parse_filters(only)
    queue = open_queue(ctx)
    jobs = queue.jobs()
    chosen = [find_job(jobs, name)["name"] for name in named]
    chosen += [j["name"] for j in jobs
               if ((pending and j["state"] == "pending") or (failed and j["state"] == "failed"))
               and all(j[key] in values for key, values in filters.items())]
    try:
        report = queue.cancel(list(dict.fromkeys(chosen)))
    except ValueError as e:
        raise BadInput(str(e)) from None
    click.echo(f"cancelled {len(report.cancelled)} job(s)"
               + (f"; {len(report.asked)} running job(s) will be stopped by their workers: "
                  + ", ".join(report.asked) if report.asked else "")
               + (f"; {len(report.skipped)} already cancelled or succeeded"
                  if report.skipped else ""))


FILTER_KEYS = {"V": ("v", int), "N": ("n", int), "model": ("model", str), "run": ("run", int)}


def parse_filters(items: tuple[str, ...]) -> dict[str, set]:
    """--only KEY=VALUE as {job field: allowed values}."""
    out: dict[str, set] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in FILTER_KEYS:
            raise BadInput(f"--only '{item}': expected KEY=VALUE with KEY one of "
                           f"{', '.join(FILTER_KEYS)}")
        field_name, kind = FILTER_KEYS[key]
        try:
            out.setdefault(field_name, set()).add(kind(raw))
        except ValueError:
            raise BadInput(f"--only '{item}': {key} must be an integer") from None
    return out


@cli.command()
@click.option("--now", is_flag=True,
              help="Also hand back the running jobs: their workers checkpoint and put them "
                   "back to pending.")
@click.pass_context
def pause(ctx, now):
    """Pause the queue: workers claim nothing new (running jobs finish, unless --now).

    Workers started with --wait keep waiting; others exit when they find
    nothing to claim. `resume` lifts it.
    """
    asked = open_queue(ctx).pause(now=now)
    click.echo("queue paused: nothing new will be claimed"
               + (f"; {len(asked)} running job(s) will be handed back by their workers"
                  if now else "; running jobs finish (pause --now hands them back)"))


@cli.command()
@click.pass_context
def resume(ctx):
    """Lift a pause: workers claim again.

    Workers started without --wait (SLURM array tasks among them) exit when they find the
    queue paused: when no worker is left, resume says so, as nothing will claim."""
    queue = open_queue(ctx)
    was = queue.resume()
    click.echo("queue resumed" if was else "the queue was not paused")
    if was and not any(w["alive"] for w in queue.workers()):
        click.echo("note: no worker is running (workers without --wait, SLURM array tasks "
                   "too, exit when they find the queue paused): start workers again "
                   "(make workers, python -m runner slurm submit)")


def cached_when_bucket_unreachable(command):
    """A reader: job folders in a bucket that cannot be read are read from the copies cached
    on this machine (those it has), with one note on stderr saying so."""

    @functools.wraps(command)
    def read(*args, **kwargs):
        from runner.jobfolders import cached_copies_when_unreachable

        with cached_copies_when_unreachable(lambda line: click.echo(line, err=True)):
            return command(*args, **kwargs)

    return read


BY_OPTION = click.option(
    "--by", multiple=True, metavar="KEY",
    help="Split rows by this dotted config key (e.g. training.learning_rate; repeatable) "
         "[default: every key that differs between jobs of one (V, model, N), seeds aside].")


def aggregate_by(jobs: list[dict], by: tuple[str, ...]):
    """runner.reporting.results.aggregate, a --by key no job has refused as bad input."""
    from runner.reporting.groups import GroupingError
    from runner.reporting.results import aggregate

    try:
        return aggregate(jobs, by=by)
    except GroupingError as e:
        raise BadInput(str(e)) from None


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON: what was run, rows and notes.")
@click.option("--csv", "as_csv", is_flag=True,
              help="CSV: one line per row, fractions, with its config group, profile and --set.")
@BY_OPTION
@click.pass_context
@cached_when_bucket_unreachable
def results(ctx, as_json, as_csv, by):
    """Test accuracy per (config, V, model, N): mean ± std over runs, min–max, majority rate.

    Finished runs are the jobs succeeded in the database; each one's metrics
    are read from its folder's eval.json, which wins if the database disagrees
    (noted on stderr, and under "notes" in --json). The header says what was
    run: profile, steps, model size and --set overrides. Jobs of one (V, model,
    N) planned with different configs (say, two learning rates) get a row each.
    """
    from runner.reporting.results import to_csv, to_json, to_text

    if as_json and as_csv:
        raise BadInput("--json and --csv: choose one output format")
    fmt = "json" if as_json else "csv" if as_csv else None
    res = aggregate_by(open_queue(ctx, readonly=True).jobs(), by)
    click.echo({"json": to_json, "csv": to_csv}.get(fmt, to_text)(res), nl=fmt != "csv")
    if fmt != "json":
        for note in res.notes:
            click.echo(f"note: {note}", err=True)


@cli.command()
@click.option("--out", default="runs/sample_complexity.png", show_default=True,
              type=click.Path(dir_okay=False), help="The sample-complexity figure (PNG).")
@click.option("--curves-dir", default=None, type=click.Path(file_okay=False),
              help="Where the training-curve figures go [default: curves/ beside --out].")
@BY_OPTION
@click.pass_context
@cached_when_bucket_unreachable
def plot(ctx, out, curves_dir, by):
    """Sample-complexity figure (accuracy vs N per V, a line per model and config) and
    training curves."""
    from runner.outputs import OutputError, check_file, check_folder, writing
    from runner.reporting.plot import sample_complexity, training_curves

    if not out.lower().endswith(".png"):
        raise BadInput(f"--out '{out}': the figure is written as PNG; name it *.png")
    curves_dir = curves_dir or Path(out).parent / "curves"
    try:
        check_file(out, "--out")
        check_folder(curves_dir, "--curves-dir")
        jobs = open_queue(ctx, readonly=True).jobs()
        res = aggregate_by(jobs, by)
        for note in res.notes:
            click.echo(f"note: {note}", err=True)
        with writing(out, "--out"):  # each figure is written whole or not at all
            path = sample_complexity(res, out)
        with writing(curves_dir, "--curves-dir"):
            curves = training_curves(jobs, curves_dir, res.by)
    except OutputError as e:
        raise BadInput(str(e)) from None
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote the sample-complexity figure: {path}")
    if curves:
        click.echo(f"wrote {len(curves)} training-curve figure(s) to {curves[0].parent}/")


@cli.command()
@click.argument("name")
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing new lines until the job ends (or Ctrl-C).")
@click.pass_context
@cached_when_bucket_unreachable
def logs(ctx, name, follow):
    """Print a job's own log (train.log in its folder), across attempts.

    NAME is the job's name, or any part of it that matches one job only
    (e.g. standard_V5_N256_run1).
    """
    from runner.jobfolders import local_folder
    from trainer.files import LOG_FILE

    queue = open_queue(ctx, readonly=True)
    job = find_job(queue.jobs(), name)
    path = local_folder(job["out_dir"]) / LOG_FILE
    if not follow:
        try:
            click.echo(path.read_text(), nl=False)
        except FileNotFoundError:
            raise click.ClickException(
                f"{job['name']} ({job['state']}) has no log yet; it will be "
                f"{job['out_dir']}/{LOG_FILE}") from None
        return
    try:
        follow_log(queue, job, path)
    except KeyboardInterrupt:
        pass


@cli.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def history(ctx, name, as_json):
    """A job's claims: which worker and SLURM task ran each, from when to when, up to which
    step, and how each ended (handed back and why, succeeded, failed, lease expired, ...).

    NAME is the job's name, or any part of it that matches one job only.
    """
    import json

    from runner.history import claims, to_text

    queue = open_queue(ctx, readonly=True)
    job = find_job(queue.jobs(config=False), name)
    entries = claims(queue.events(job["id"]), queue.workers(), job["lease_token"])
    if as_json:
        click.echo(json.dumps({"name": job["name"], "state": job["state"], "claims": entries},
                              indent=2))
    else:
        click.echo(to_text(job["name"], entries), nl=False)


def find_job(jobs: list[dict], name: str) -> dict:
    """The job called `name`, else the only one whose name contains it."""
    exact = [j for j in jobs if j["name"] == name]
    if exact:
        return exact[0]
    found = [j for j in jobs if name in j["name"]]
    if len(found) == 1:
        return found[0]
    if found:
        raise BadInput(f"'{name}' matches {len(found)} jobs ("
                       + ", ".join(j["name"] for j in found[:3])
                       + (", ..." if len(found) > 3 else "") + "); give more of the name")
    raise BadInput(f"no job named '{name}' (see `python -m runner status --json` for names)")


def follow_log(queue: JobQueue, job: dict, path: Path, poll: float = 0.5) -> None:
    """Like tail -f from the start of the file; returns once the job has ended."""
    if not path.exists():
        click.echo(f"waiting for {job['name']} ({job['state']}) to start: {path}", err=True)
    from runner.jobfolders import local_folder

    offset, checked, state = 0, 0.0, job["state"]
    while True:
        path = local_folder(job["out_dir"]) / path.name  # a bucket's: refreshed every 2 s
        try:
            with open(path) as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
        except FileNotFoundError:
            chunk = ""
        if chunk:
            click.echo(chunk, nl=False)
            continue
        if state in ("succeeded", "failed"):
            return
        time.sleep(poll)
        if time.monotonic() - checked > 2:  # the database, less often than the file
            checked = time.monotonic()
            state = next((j["state"] for j in queue.jobs() if j["id"] == job["id"]), "failed")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on: 127.0.0.1 this machine only, 0.0.0.0 every "
                   "interface. Anything but loopback needs a token (generated unless given).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port (0: any free port; the URL is printed).")
@click.option("--token", envvar="RUNNER_SERVE_TOKEN", default=None, metavar="TOKEN",
              help="Require this token of every request (else $RUNNER_SERVE_TOKEN; beyond "
                   "loopback a new one is generated and printed in the URL).")
@click.pass_context
def serve(ctx, host, port, token):
    """Read-only live dashboard of the queue in a browser, with a JSON API.

    \b
    The page: progress and ETA, every job (filterable), the sample-complexity
    figure, and per job its curves, config, events and log. The API:
    /api/status (= status --json), /api/results (= results --json),
    /api/jobs/NAME, /api/latest. Ctrl-C stops it.
    With a token, open the printed URL (…/?token=…): the page keeps it in a
    cookie; scripts send `Authorization: Bearer TOKEN`. Requests without it get 403.
    """
    from runner.reporting.serve import (
        BindError,
        Dashboard,
        bind,
        check_token,
        is_loopback,
        new_token,
        open_readonly,
        urls,
    )
    from runner.reporting.serve import serve as run_server

    if token is not None and (why := check_token(token)):
        raise BadInput(f"--token / $RUNNER_SERVE_TOKEN: {why}")
    generated = token is None and not is_loopback(host)
    if generated:
        token = new_token()
    try:
        dashboard = Dashboard(open_readonly(ctx.obj["db"]), ctx.obj["db"])
    except DatabaseError as e:
        raise BadInput(str(e)) from None
    try:
        sock = bind(host, port)
    except BindError as e:
        raise BadInput(str(e)) from None
    local, remote = urls(host, sock.getsockname()[1], token)
    click.echo(f"dashboard of {mask_url(ctx.obj['db'])}: {local}  (Ctrl-C to stop)")
    if remote:
        click.echo(f"listening on all interfaces ({host}); from another machine: {remote}")
    if not is_loopback(host):
        click.echo("note: listening beyond loopback: every request needs the token "
                   + ("(a new one, generated now; choose one with --token or "
                      "$RUNNER_SERVE_TOKEN)" if generated else "(as given)")
                   + ", and travels unencrypted over plain http", err=True)
    sys.stdout.flush()
    run_server(dashboard, sock, host, token)


@cli.command()
@click.option("--out", default="runs/report.html", show_default=True,
              type=click.Path(dir_okay=False), help="The report (one HTML file).")
@BY_OPTION
@click.pass_context
@cached_when_bucket_unreachable
def report(ctx, out, by):
    """The sweep as one self-contained HTML file (figures embedded, no network needed).

    What was run, progress, the results table, the sample-complexity figure,
    training curves per (V, N), failures with their errors, every job.
    """
    from runner.outputs import OutputError, check_file, writing
    from runner.reporting.report import write

    if not out.lower().endswith((".html", ".htm")):
        raise BadInput(f"--out '{out}': the report is HTML; name it *.html")
    from runner.reporting.groups import GroupingError

    try:
        check_file(out, "--out")
        queue = open_queue(ctx, readonly=True)
        with writing(out, "--out"):  # written whole or not at all
            path = write(queue, mask_url(ctx.obj["db"]), out, by)
    except (OutputError, GroupingError) as e:
        raise BadInput(str(e)) from None
    click.echo(f"wrote the report: {path} (open it in a browser)")


@cli.command()
@click.option("--tensorboard", "tb_dir", required=True, type=click.Path(file_okay=False),
              metavar="DIR", help="Where the TensorBoard runs go (one folder per job).")
@click.option("--follow", is_flag=True,
              help="Keep exporting new points until no job is pending or running (or Ctrl-C).")
@click.option("--interval", type=click.FloatRange(min=0.2), default=10, show_default=True,
              metavar="SECONDS", help="With --follow: seconds between passes.")
@click.pass_context
def export(ctx, tb_dir, follow, interval):
    """Every job's metrics.jsonl as TensorBoard event files, its config as hparams.

    One run per job, named as the job. Running it again adds only new points.
    Needs the tensorboard extra (pip install -e '.[tensorboard]'); view with
    `tensorboard --logdir DIR`.
    """
    from runner.outputs import OutputError, check_folder, writing
    from runner.reporting.export import Exporter, MissingExtra

    try:
        check_folder(tb_dir, "--tensorboard")
    except OutputError as e:
        raise BadInput(str(e)) from None
    queue = open_queue(ctx, readonly=True)
    try:
        exporter = Exporter(tb_dir)
    except MissingExtra as e:
        raise BadInput(str(e)) from None
    try:
        while True:
            jobs = queue.jobs()
            try:
                with writing(tb_dir, "--tensorboard"):
                    written = exporter.export(jobs)
            except OutputError as e:
                raise BadInput(str(e)) from None
            click.echo(f"exported {sum(written.values())} new point(s) from {len(written)} "
                       f"job(s) to {tb_dir}")
            if not follow or not any(j["state"] in ("pending", "running") for j in jobs):
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        exporter.close()


@cli.group()
def slurm():
    """Workers as a SLURM job array: submit, status, cancel (README, "On a SLURM cluster")."""


@slurm.command("submit")
@click.option("--workers", type=click.IntRange(min=1), required=True,
              help="Array tasks: one worker each.")
@click.option("--parallel", type=click.IntRange(min=1), default=None,
              help="At most this many tasks at once (--array=0-N%P).")
@click.option("--partition", default=None)
@click.option("--time", "time_limit", default=None, metavar="TIME",
              help="Each task's time limit, as sbatch takes it: MINUTES, MM:SS, HH:MM:SS, "
                   "D-HH, D-HH:MM or D-HH:MM:SS. A worker stopped by it requeues itself.")
@click.option("--gpus-per-worker", type=click.IntRange(min=0), default=None,
              help="--gres=gpu:K per task: 1 (a worker trains on one GPU), or 0 with --cpu "
                   "[default: 1; 0 with --cpu].")
@click.option("--cpus-per-worker", type=click.IntRange(min=1), default=None,
              help="--cpus-per-task; the worker uses that many threads.")
@click.option("--mem", default=None,
              help="Memory per task, as sbatch takes it: megabytes, or with K, M, G or T (16G).")
@click.option("--account", default=None)
@click.option("--qos", default=None)
@click.option("--sbatch-arg", "sbatch_args", multiple=True, metavar="ARG",
              help="One more #SBATCH line, e.g. --sbatch-arg=--constraint=a100 (repeatable).")
@click.option("--cpu", is_flag=True, help="Workers train on the CPU (--gpu cpu).")
@click.option("--grace", type=click.IntRange(min=10), default=120, show_default=True,
              metavar="SECONDS",
              help="The stop signal comes this long before the time limit: the worker "
                   "checkpoints and hands its job back meanwhile.")
@click.option("--signal", "stop_signal", type=click.Choice(["TERM", "USR1", "HUP"]),
              default="TERM", show_default=True, help="The signal sent before the time limit.")
@click.option("--gpu-type", default=None, metavar="TYPE",
              help="The GPU type to ask for (--gres=gpu:TYPE:1), as the cluster names it "
                   "(a100, h100, ...).")
@click.option("--workers-per-gpu", type=click.IntRange(min=1, max=64), default=1,
              show_default=True, metavar="K",
              help="K workers in each task, sharing its GPU (with --cpu: its CPUs), each "
                   "claiming its own jobs: worker --processes K.")
@click.option("--lease", type=click.FloatRange(min=1), default=None,
              help="The workers' --lease [default: the worker's].")
@click.option("--db-outage", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="The workers' --db-outage [default: the worker's].")
@click.option("--order", type=click.Choice(ORDERS), default=None,
              help="The workers' --order [default: the worker's].")
@click.option("--cache-dir", default=None, metavar="DIR",
              help="The workers' --cache-dir, for job folders in a bucket: quote a variable "
                   "to have it expanded on the node ('$SLURM_TMPDIR/runner', '$TMPDIR/runner')"
                   " [default: the worker's, ~/.cache/runner].")
@click.option("--logs", type=click.Path(file_okay=False), default=None,
              help="Folder of the script and the tasks' logs [default: <out-root>/logs].")
@click.option("--dry-run", is_flag=True, help="Print the script; submit nothing.")
@click.option("--force", is_flag=True,
              help="On a partition of several nodes, submit even with a path that looks "
                   "node-local (/tmp, tmpfs) or a database or S3 host of localhost.")
@click.pass_context
def slurm_submit(ctx, workers, parallel, partition, time_limit, gpus_per_worker,
                 cpus_per_worker, mem, account, qos, sbatch_args, cpu, grace, stop_signal,
                 gpu_type, workers_per_gpu, lease, db_outage, order, cache_dir, logs, dry_run,
                 force):
    """Submit WORKERS workers of this queue as one SLURM job array; print its job id.

    Each task asks for its GPU(s), is requeued on preemption (--requeue), gets the stop
    signal GRACE seconds before its time limit, hands its job back and requeues itself
    while jobs are pending; it exits 0 when nothing is left, so the array ends with the
    sweep. The queue URL is written into the script (which is private to you) and
    reaches the workers as $RUNNER_DB, never on a command line.
    """
    from runner.slurm import submit
    from runner.slurm.array import Refused, SlurmError, SubmitOptions

    try:
        limit = submit.time_limit(time_limit, grace)
        submit.check_memory(mem)
        submit.check_gpus(gpus_per_worker, cpu, gpu_type)
    except Refused as e:
        raise BadInput(str(e)) from None
    url = submit.absolute_sqlite_url(ctx.obj["db"])
    queue = open_queue(ctx, readonly=dry_run)
    opts = SubmitOptions(
        workers=workers, parallel=parallel, partition=partition, time=limit,
        gpus_per_worker=(0 if cpu else 1) if gpus_per_worker is None else gpus_per_worker,
        cpus_per_worker=cpus_per_worker, mem=mem, account=account, qos=qos, cpu=cpu,
        grace=grace, signal=stop_signal, sbatch_args=list(sbatch_args), gpu_type=gpu_type,
        workers_per_task=workers_per_gpu,
        worker_args=submit.worker_args(lease=lease, db_outage=db_outage, order=order,
                                       cache_dir=cache_dir))
    try:
        sub = submit.prepare(queue, url, opts, logs, dry_run,
                             note=lambda line: click.echo(line, err=True), force=force)
        if dry_run:
            click.echo(sub.script(masked=True), nl=False)
            return
        job_id, script = submit.submit(queue, sub)
    except Refused as e:
        raise BadInput(str(e)) from None
    except SlurmError as e:
        raise click.ClickException(str(e)) from None
    click.echo(job_id)
    click.echo(submit.submitted_line(sub, job_id, script), err=True)


@slurm.command("status")
@click.pass_context
def slurm_status(ctx):
    """The SLURM launches of this queue, their tasks (squeue, sacct) and workers."""
    from runner.slurm import launches

    queue = open_queue(ctx, readonly=True)
    for line in launches.status(queue, note=lambda line: click.echo(line, err=True)):
        click.echo(line)


@slurm.command("cancel")
@click.argument("job_ids", nargs=-1, metavar="[JOBID]...")
@click.option("--grace", type=click.FloatRange(min=0), default=120, show_default=True,
              metavar="SECONDS", help="How long running workers get to hand their jobs back.")
@click.option("--signal", "stop_signal", type=click.Choice(["TERM", "USR1", "HUP"]),
              default="TERM", show_default=True)
@click.pass_context
def slurm_cancel(ctx, job_ids, grace, stop_signal):
    """Stop SLURM launches without losing work (default: every launch not cancelled yet).

    Tasks not started are cancelled; running workers get the hand-back signal, checkpoint
    and return their jobs to pending, and do not requeue themselves.
    """
    from runner.slurm import launches
    from runner.slurm.array import Refused, SlurmError

    queue = open_existing_queue(ctx)
    try:
        for line in launches.cancel(queue, job_ids, stop_signal, grace):
            click.echo(line)
    except Refused as e:
        raise BadInput(str(e)) from None
    except SlurmError as e:
        raise click.ClickException(str(e)) from None


@cli.command(name="gc")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@click.option("--replaced", is_flag=True,
              help="Also remove the folders that plan --replace and requeue --fresh moved "
                   "aside (<folder>.replaced-<time>).")
@click.pass_context
def gc_command(ctx, dry_run, replaced):
    """Free disk space: per job, keep the newest valid state and every snapshot.

    Removes older and invalid training states and the temp files of unfinished
    writes (with --replaced, the replaced folders too) and says how much that
    freed. A running job's folders are left alone. In a bucket: the objects no
    head can name again (an older attempt's, unnamed).
    """
    from runner.disk import collect, describe

    found = collect(open_queue(ctx, readonly=True), dry_run=dry_run, replaced=replaced)
    click.echo(describe(found, dry_run))
    if found.failed:
        path, why = found.failed[0]
        raise click.ClickException(f"could not clean {len(found.failed)} path(s); first: "
                                   f"{path}: {why}")


def main() -> None:
    """Entry point: click errors become one line on stderr with their exit status."""
    try:
        cli.main(standalone_mode=False)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except DatabaseError as e:  # the database went away after it was opened
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except BucketError as e:  # job folders in a bucket that cannot be read
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_BAD_INPUT)
