"""The seeds every entry point derives from its root seed, through the project's one derivation
(`derive_seed`, mcts/seeds.py, re-exported here).

Every seed in a run comes from one root (`run.seed` in iterate.py; 0 in evaluate.py and search.py,
which have no run group) through `derive_seed`, so the same settings sample the same way in every
entry point:

- the engine seed (`engine_config`): `derive_seed(root, "engine", backend.seed)`; it seeds what has no
  per-request seed (vLLM's CPU engine, where per-request seeds crash; hf calls without seeds);
- search requests (mcts/search.py, mcts/sampling.py): `derive_seed(search seed, problem id, node id)`,
  read by the engines as `SamplingSettings.seeds` (policy/backends);
- the search seed of round k: `derive_seed(root, k, "search")` (`search_seed`; iterate.py, search.py
  as round 0);
- the evaluation seed: `derive_seed(root, "eval")` (`eval_seed`; iterate.py, evaluate.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mcts.seeds import SEED_BITS, derive_seed  # noqa: F401  (the one derivation; re-exported here)

DEFAULT_ROOT = 0  # the root seed of an entry point without a run group (= RunConfig.seed's default)


def root_seed(run: Any | None) -> int:
    """The root of every derived seed: `run.seed`, or DEFAULT_ROOT without a run group."""
    return DEFAULT_ROOT if run is None else run.seed


def engine_seed(root: int, backend_seed: int) -> int:
    """The engine seed (`LLM(seed=...)`, hf's seed for calls without per-request seeds)."""
    return derive_seed(root, "engine", backend_seed)


def search_seed(root: int, round_index: int) -> int:
    """The seed of round `round_index`'s search (the root of its per-request seeds)."""
    return derive_seed(root, round_index, "search")


def eval_seed(root: int) -> int:
    """The seed of an evaluation (per-problem sampling seeds, test-time search)."""
    return derive_seed(root, "eval")


def engine_config(s: Any):
    """`s.backend` (a Settings' BackendConfig) with its engine seed derived from the root seed."""
    return replace(s.backend, seed=engine_seed(root_seed(s.run), s.backend.seed))
