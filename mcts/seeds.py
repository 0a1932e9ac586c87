"""The project's one seed derivation, at the bottom of the package graph so that the search (mcts/),
the engines and the tool loop (policy/) and the entry points (harness/seeds.py) share it.

    derive_seed(0, "p0", 0)         # a stable 31-bit seed from any parts (blake2b, not Python's salted hash)
"""

from __future__ import annotations

import hashlib
from typing import Any

SEED_BITS = 31  # seeds fit a signed 32-bit int (numpy, torch and vLLM all accept them)


def derive_seed(*parts: Any) -> int:
    """A stable seed in [0, 2**31) from `parts` (their str() joined by \\x1f, hashed with blake2b):
    the same in every process and Python version, different for different parts."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (1 << SEED_BITS)
