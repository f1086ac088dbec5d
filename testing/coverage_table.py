"""Branch coverage per module, from coverage.py's JSON report (`make coverage`).

    python -m testing.coverage_table coverage.json [--below 90]

One line per module: its statements and branches covered, in per cent, and how many
branches were never taken; `--below P` lists only the modules under P % of branches.
coverage.py's own table gives one figure that mixes statements and branches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(report: dict) -> list[tuple[str, float, float | None, int]]:
    """(module, % of statements run, % of branches taken or None, branches never taken)."""
    found = []
    for name, data in sorted(report["files"].items()):
        s = data["summary"]
        statements = 100.0 * s["covered_lines"] / s["num_statements"] if s["num_statements"] \
            else 100.0
        branches = (100.0 * s["covered_branches"] / s["num_branches"]
                    if s["num_branches"] else None)
        found.append((name, statements, branches, s["num_branches"] - s["covered_branches"]))
    return found


def table(report: dict, below: float | None = None) -> str:
    lines = [f"{'module':<32} {'statements':>10} {'branches':>9} {'not taken':>9}"]
    for name, statements, branches, missed in rows(report):
        if below is not None and (branches is None or branches >= below):
            continue
        shown = "-" if branches is None else f"{branches:.1f}%"
        lines.append(f"{name:<32} {statements:>9.1f}% {shown:>9} {missed:>9}")
    t = report["totals"]
    lines.append(f"{'all':<32} {100.0 * t['covered_lines'] / t['num_statements']:>9.1f}% "
                 f"{100.0 * t['covered_branches'] / t['num_branches']:>8.1f}% "
                 f"{t['num_branches'] - t['covered_branches']:>9}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--below", type=float, default=None, metavar="P")
    args = parser.parse_args()
    print(table(json.loads(args.report.read_text()), args.below))


if __name__ == "__main__":
    main()
