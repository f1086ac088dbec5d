"""The README's and docs' commands work as written, and their links lead somewhere.

README.md is the front door and docs/*.md hold the detail. Every check of a command
reads them as one list of documents, so a command moved from the README into a page
under docs/ is still checked.

Every benchmark script the documents tell users to run answers `--help` when run
exactly so (as a script, from the repository root): a script whose folder
shadows a package or a standard module fails here before it fails a user.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.support.commands import PYTHON, ROOT

README_PATH = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README_PATH, *PAGES]
README = "\n".join(path.read_text() for path in DOCUMENTS)  # every document, as one text
SCRIPTS = sorted(set(re.findall(r"python3? ((?:bench|tools)/[\w./-]+\.py)", README)))
MODULES = sorted(set(re.findall(r"python3? -m (bench\.\w+)", README)))
COMMANDS = [[script] for script in SCRIPTS] + [["-m", module] for module in MODULES]


def test_readme_names_the_benchmarks():
    assert "bench/claims.py" in SCRIPTS and "bench/step_costs.py" in SCRIPTS


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_readme_benchmark_runs_as_written(command):
    if command[0] != "-m":
        assert (ROOT / command[0]).is_file(), f"the docs run {command[0]}, which does not exist"
    proc = subprocess.run([PYTHON, *command, "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()


RUNNER_COMMANDS = sorted(set(re.findall(r"python -m runner (?:--db \S+ )?([a-z]+)", README)))
# `make X` in code: in backticks, or anywhere on a code block's line (comments included);
# prose ("... may make it worth ...") is not a command.
CODE_LINES = "\n".join(line for line in README.splitlines() if line.startswith("    "))
TARGET = r"([a-z](?:[a-z-]*[a-z])?)"  # hyphens inside: study-cpu
MAKE_TARGETS = sorted(set(re.findall(r"`make " + TARGET + r"\b", README))
                      | set(re.findall(r"\bmake " + TARGET + r"\b", CODE_LINES)))


def test_readme_runner_commands_exist():
    assert {"plan", "worker", "status", "cancel", "serve"} <= set(RUNNER_COMMANDS)
    for command in RUNNER_COMMANDS:
        proc = subprocess.run([PYTHON, "-m", "runner", command, "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"the docs' `python -m runner {command}`: {proc.stderr}"


def test_readme_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.M))
    missing = [t for t in MAKE_TARGETS if t not in targets]
    assert not missing, f"the docs name make targets the Makefile lacks: {missing}"


TRAINER_EXAMPLES = re.findall(r"^    python -m trainer (.+)$", README, re.M)


@pytest.mark.slow  # trains in real worker or trainer processes
def test_readme_hand_run_trainer_examples_run_as_written(tmp_path):
    """Both examples, in order, from one folder: the second reruns a queued job's config."""
    assert len(TRAINER_EXAMPLES) == 2 and "<name>" in TRAINER_EXAMPLES[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    plan = subprocess.run(
        [PYTHON, "-m", "runner", "--db", "queue.sqlite", "plan", "--profile", "smoke",
         "--only", "V=5", "--only", "N=256", "--only", "model=gpt2", "--only", "run=1",
         "--out-root", "runs"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120)
    assert plan.returncode == 0, plan.stderr
    name = "table_connectivity_standard_V5_N256_run1"
    worker = subprocess.run([PYTHON, "-m", "runner", "--db", "queue.sqlite", "worker", "--gpu",
                             "cpu", "--threads", "1"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, worker.stderr[-2000:]
    for example in TRAINER_EXAMPLES:
        args = shlex.split(example.replace("<name>", name))
        proc = subprocess.run([PYTHON, "-m", "trainer", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"python -m trainer {example}: {proc.stderr[-2000:]}"
        assert json.loads(proc.stdout)["outcome"] == "completed"


def test_readme_code_layout_names_every_package_and_runner_module():
    assert README.count("## Code layout") == 1, "one document holds the code layout"
    section = README.split("## Code layout", 1)[1].split("\n## ", 1)[0]
    subpackages = sorted(str(p.parent.relative_to(ROOT)) for p in ROOT.glob("runner/*/__init__.py"))
    assert {"runner/reporting", "runner/slurm", "runner/bucket"} <= set(subpackages)
    for package in ("runner", *subpackages, "db", "trainer", "models", "conf", "bench", "tests"):
        assert f"`{package}/`" in section, package
    for folder in ("runner", *subpackages):
        for module in sorted((ROOT / folder).glob("[!_]*.py")):
            assert f"`{module.stem}`" in section, f"{folder}/{module.name}"


# Links: `[text](target)` and `![alt](target)`, outside code (code spans, indented blocks).
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    lines = (line for line in text.splitlines() if not line.startswith("    "))
    return re.sub(r"`[^`\n]*`", "", "\n".join(lines))


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped,
    spaces as hyphens, a repeated heading numbered (-1, -2, ...)."""
    found, counts = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        repeat = counts.get(slug, 0)
        counts[slug] = repeat + 1
        found.add(slug if repeat == 0 else f"{slug}-{repeat}")
    return found


def relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(prose(path.read_text()))
            if not re.match(r"[a-z]+:", target)]  # http:, https:, mailto: are not checked


def test_readme_links_every_docs_page_and_each_exists():
    linked = {target.split("#", 1)[0] for target in relative_links(README_PATH)
              if target.startswith("docs/") and ".md" in target}
    assert linked, "the README links no page under docs/"
    assert not [t for t in linked if not (ROOT / t).is_file()], "README links missing pages"
    unlinked = [p.name for p in PAGES if f"docs/{p.name}" not in linked]
    assert not unlinked, f"pages under docs/ the README never links: {unlinked}"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_docs_page_says_what_it_covers_and_links_back(path):
    first_lines = path.read_text().split("\n## ", 1)[0]
    assert first_lines.startswith("# "), f"{path.name} starts with its title"
    assert "](../README.md)" in first_lines, f"{path.name} links back to the README at its top"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    """No dead link: each relative link names a file (or folder) that exists, and an
    anchor names a heading of the page it points to."""
    dead = []
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            dead.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            dead.append(target)
    assert not dead, f"{path.relative_to(ROOT)} has dead links: {dead}"
