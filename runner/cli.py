"""Command line: python -m runner [--db URL] COMMAND ...

Data goes to stdout, logs to stderr. Bad input (files, keys, values, an
unreachable database) prints one line naming the fault and exits with 2,
before anything is written.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from db import DatabaseError, JobQueue, connect, mask_url
from db.engine import NoQueue, default_url
from db.queue import ORDERS, PlanReport

EXIT_BAD_INPUT = 2


class BadInput(click.ClickException):
    exit_code = EXIT_BAD_INPUT


def open_queue(ctx: click.Context, create: bool = False) -> JobQueue:
    try:
        return JobQueue(connect(ctx.obj["db"], create=create))
    except DatabaseError as e:
        raise BadInput(str(e)) from None


@click.group()
@click.option("--db", envvar="RUNNER_DB", default=None, metavar="URL",
              help="Queue database; else $RUNNER_DB, else sqlite:///runs/queue.sqlite. "
                   "postgresql+psycopg://user:pass@host/db for several hosts.")
@click.pass_context
def cli(ctx: click.Context, db: str | None) -> None:
    """Resumable job queue for the table-connectivity sweep.

    \b
    Examples:
      python -m runner plan                      # the 60-run study
      python -m runner plan --profile smoke --only V=5
      python -m runner worker --gpu 0
      python -m runner status
      python -m runner requeue --failed
    """
    ctx.obj = {"db": db or default_url()}
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")


@cli.command()
@click.option("--sweep", "sweep_path", default="conf/sweep.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="Sweep file (grid, names, folders).")
@click.option("--profile", default=None, help="full | smoke | small (default: the sweep's).")
@click.option("--only", multiple=True, metavar="KEY=VALUE",
              help="Restrict the grid: V=20, N=256, model=lowrank_gpt2, run=1 (repeatable).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a resolved config key, e.g. training.train_steps=200.")
@click.option("--out-root", default="runs", show_default=True,
              help="Where the jobs' folders go.")
@click.option("--dry-run", is_flag=True, help="Report what would be planned; write nothing.")
@click.pass_context
def plan(ctx, sweep_path, profile, only, overrides, out_root, dry_run):
    """Insert the sweep's missing jobs into the queue (never duplicates)."""
    from runner.planner import SweepError, check_out_root, job_rows, load_sweep, parse_only
    from trainer.config import ConfigError

    try:
        sweep = load_sweep(Path(sweep_path))
        check_out_root(out_root)
        rows = job_rows(sweep, profile or sweep.get("profile", "full"),
                        parse_only(only, sweep), list(overrides), out_root)
    except (SweepError, ConfigError) as e:
        raise BadInput(str(e)) from None
    try:
        queue = JobQueue(connect(ctx.obj["db"], create=not dry_run))
        report = queue.plan(rows, dry_run=dry_run)
    except NoQueue:  # a dry run against a queue not created yet: all would be new
        report = PlanReport(new=[row["name"] for row in rows])
    except DatabaseError as e:
        raise BadInput(str(e)) from None
    verb = "would plan" if dry_run else "planned"
    click.echo(f"{verb} {len(rows)} jobs: {len(report.new)} new, "
               f"{len(report.existing)} already queued"
               + (f", {len(report.changed)} changed" if report.changed else ""))
    for name in report.changed:
        click.echo(f"warning: {name} is queued with a different config; kept as queued "
                   "(requeue or use a new --out-root/study to change it)", err=True)


@cli.command()
@click.option("--gpu", default="0", show_default=True, help="GPU index, or 'cpu'.")
@click.option("--max-jobs", type=click.IntRange(min=1), default=None, help="Stop after N jobs.")
@click.option("--lease", type=click.FloatRange(min=1), default=60, show_default=True,
              help="Seconds a silent worker keeps its job before another may take it over.")
@click.option("--order", type=click.Choice(ORDERS), default="guide", show_default=True,
              help="guide: the study's order; cost: longest jobs first.")
@click.option("--wait", is_flag=True, help="Keep polling when nothing is claimable.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: all cores). Give each of several CPU "
                   "workers on one machine its share, or they slow each other down badly.")
@click.pass_context
def worker(ctx, gpu, max_jobs, lease, order, wait, threads):
    """Claim jobs one by one and train them in this process."""
    from runner.worker import BadDevice, Worker

    queue = open_queue(ctx)
    try:
        w = Worker(queue, gpu, lease, order, threads)
    except BadDevice as e:
        raise BadInput(str(e)) from None
    w.install_signal_handlers()
    w.run(max_jobs=max_jobs, wait=wait)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx, as_json):
    """Counts by state, running jobs with progress, failed jobs with their error."""
    from runner.status import status_json, status_text

    queue = open_queue(ctx)
    counts, jobs = queue.counts(), queue.jobs()
    if as_json:
        click.echo(status_json(counts, jobs))
    else:
        click.echo(status_text(counts, jobs, mask_url(ctx.obj["db"])))


@cli.command()
@click.option("--failed", is_flag=True, help="Every failed job.")
@click.option("--name", "names", multiple=True, metavar="NAME", help="A job by name (repeatable).")
@click.pass_context
def requeue(ctx, failed, names):
    """Put failed (or named) jobs back to pending; they resume from their checkpoint."""
    if not failed and not names:
        raise BadInput("say which jobs: --failed and/or --name NAME")
    queue = open_queue(ctx)
    try:
        done = queue.requeue(list(names), failed=failed)
    except ValueError as e:
        raise BadInput(str(e)) from None
    click.echo(f"requeued {len(done)} job(s)" + (": " + ", ".join(done) if done else ""))


def main() -> None:
    """Entry point: click errors become one line on stderr with their exit status."""
    try:
        cli.main(standalone_mode=False)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except DatabaseError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
