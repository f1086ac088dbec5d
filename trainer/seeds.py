"""Pure-Python facts shared by configs and data, importable without torch."""

from __future__ import annotations

import hashlib


def derive_seed(*parts) -> int:
    """Stable seed in ``[0, 2**63)`` from any reprable parts, e.g. ``("pool", 3, 0)``."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seq_len(V: int, C: int) -> int:
    """Length of one token sequence: V groups of (table + C columns), sep, q1, q2."""
    return V * (C + 1) + 3
