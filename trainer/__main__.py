"""Run one job by hand, for debugging.

\b
    python -m trainer --family gpt2 --V 5 --N 256 --run 1 --profile smoke --out runs/debug
    python -m trainer --config runs/table_connectivity/<name>/config.yaml --out runs/debug

Resumes from the folder's newest valid state. Ctrl-C saves a state and stops.
"""

from __future__ import annotations

import json
import signal
import sys
import threading

import click

from trainer.config import FAMILIES, ConfigError, load_config, resolve


@click.command(help=__doc__)
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="A resolved config (YAML); otherwise built from the options below.")
@click.option("--family", type=click.Choice(FAMILIES), default="gpt2", show_default=True)
@click.option("--V", "V", type=int, default=5, show_default=True, help="Number of tables.")
@click.option("--N", "N", type=int, default=256, show_default=True,
              help="num_training_examples.")
@click.option("--run", "run_index", type=int, default=1, show_default=True)
@click.option("--profile", default="full", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. training.train_steps=200.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: all cores).")
def main(config_path, family, V, N, run_index, profile, overrides, out_dir, device, threads):
    try:
        if config_path:
            config = load_config(config_path)
        else:
            config = resolve(family, V, N, run_index, profile, overrides)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None

    from trainer.device import BadDevice, check_device  # torch loads once the config is valid

    try:
        device = check_device(device)
    except BadDevice as e:
        raise click.UsageError(str(e)) from None
    import torch

    from trainer.train import run

    if threads:
        torch.set_num_threads(threads)

    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            sys.exit(130)
        click.echo("stopping after this step (again to quit at once)", err=True)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        result = run(config, out_dir, device=device, stop=stop,
                     echo=lambda msg: click.echo(msg, err=True))
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    click.echo(json.dumps({"outcome": result.outcome, "step": result.step, **result.metrics}))


def cli() -> None:
    """Bad input: one line on stderr, exit status 2."""
    try:
        main.main(standalone_mode=False)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)


if __name__ == "__main__":
    cli()
