"""The mutant list of tests/mutants.py matches the code: each original snippet is found once,
and each mutant changes it."""

from __future__ import annotations

from tests.mutants import MUTANTS, stale


def test_every_mutant_applies_to_the_code_as_it_is():
    assert stale(MUTANTS) == []
    assert all(m.original != m.mutated for m in MUTANTS)
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
