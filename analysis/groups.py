"""Grouping runs by their config: runs whose resolved configs agree except for seeds, names and output
paths are repeats of one setting; groups are labelled by the config keys whose values differ between
them (or, `--labels names`, by the runs' names without the seed)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from analysis.load import Run

SEED_KEYS = ("run.seed", "backend.seed")
"""Config keys that make runs repeats of each other (the backends ignore per-request seeds, so a
seed sweep sets backend.seed along with run.seed)."""
# search_from: where round 0 came from, not a setting
IGNORED_KEYS = ("run.name", "run.dir", "out_dir", "run.search_from")
IGNORED_PREFIXES = ("hydra.", "tracking.")
SAMPLING_KEYS = ("eval.k", "eval.temperature", "eval.top_p")
# what acts with pairs.source=sampling
SAMPLING_PAIRS_KEYS = ("pairs.source", "pairs.samples", "pairs.max_pairs_per_tree")
LABELS = ("config", "names")
"""--labels: the config keys that differ between groups, or the runs' names (`name_labels`)."""


@dataclass(frozen=True)
class Group:
    """Runs whose configs agree except for seeds, names and output paths."""

    kind: str
    config: Mapping[str, Any]
    runs: tuple[Run, ...]
    diff: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None
    """A label from the runs' names (`--labels names`); None = label by the config keys that differ."""

    @property
    def config_label(self) -> str:
        return ", ".join(f"{k}={short_value(k, v)}" for k, v in self.diff.items()) or "all runs"

    @property
    def label(self) -> str:
        return self.name or self.config_label

    @property
    def seeds(self) -> list:
        return [r.config.get("run.seed", r.config.get("backend.seed")) for r in self.runs]


def is_group_key(key: str) -> bool:
    return key not in SEED_KEYS and key not in IGNORED_KEYS and not key.startswith(IGNORED_PREFIXES)


def idle_key(config: Mapping[str, Any], key: str) -> bool:
    """A key that cannot act in this config: the sampling-mode keys of an evaluation that does not
    sample, the search keys of an evaluation that does not search, pairs.samples of an MCTS pair source,
    the search keys and the tree-pair keys of the sampling pair source."""
    mode = config.get("eval.mode")
    if "run.rounds" not in config:  # an evaluate.py config
        return (mode != "sampling" and key in SAMPLING_KEYS) or (mode != "mcts" and key.startswith("search."))
    if config.get("pairs.source") == "sampling":  # no tree search (search.batch_trees only batches the calls)
        return key.startswith("search.") or (key.startswith("pairs.") and key not in SAMPLING_PAIRS_KEYS)
    return config.get("pairs.source") == "mcts" and key == "pairs.samples"


def _numbers_as_floats(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)  # `x=0` on the command line and `x: 0.0` in a yaml are one value
    if isinstance(value, list):
        return [_numbers_as_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers_as_floats(v) for k, v in value.items()}
    return value


def canonical(value: Any) -> str:
    return json.dumps(_numbers_as_floats(value), sort_keys=True, default=str)


def _key_value(config: Mapping[str, Any], key: str, whole: Mapping[str, Any]) -> str | None:
    """The key's canonical value in `config` (`whole` without its idle keys); null when `whole` has
    the key's group (e.g. other search.* keys) but not the key (a run from before the key existed:
    a new option's null is how the run behaved); None when the key is idle or `whole` lacks its group."""
    if key in config:
        return canonical(config[key])
    if key in whole:
        return None
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else None
    return canonical(None) if prefix and any(k.startswith(prefix) for k in whole) else None


def differing_keys(
    configs: Sequence[Mapping[str, Any]], wholes: Sequence[Mapping[str, Any]] | None = None
) -> list[str]:
    """Keys that take more than one value among the `configs` that have them (a key missing from a
    config that has its group counts as null; `wholes`: the configs with their idle
    keys, which count as missing values), sorted; if those do not tell the configs apart, keys whose
    presence differs too."""
    wholes = configs if wholes is None else wholes
    keys = sorted({k for c in configs for k in c})
    varied = [
        k for k in keys if len({v for c, w in zip(configs, wholes) if (v := _key_value(c, k, w)) is not None}) > 1
    ]
    if len({canonical({k: c.get(k) for k in varied}) for c in configs}) == len(configs):
        return varied
    return [k for k in keys if len({canonical(c.get(k, "<unset>")) for c in configs}) > 1]


def short_value(key: str, value: Any) -> str:
    """A label-sized value: lists as a,b; a policy path as <run>/round_<k>; no model path as "base"."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, str) and (value != value.strip() or not value.isprintable()):
        return json.dumps(value)  # e.g. a step separator " " or "\n"
    if key == "model.path" and value is None:
        return "base"
    if key == "model.path" and isinstance(value, str):
        m = re.search(r"([^/]+)/(round_\d+)/policy/?$", value)
        return f"{m.group(1)}/{m.group(2)}" if m else Path(value).name
    return str(value)


SEED_SUFFIX = re.compile(r"[-_.]?seed[-_]?\d+$")


def name_labels(groups: Sequence[Group]) -> list[Group]:
    """The groups labelled by their runs' names (run.name, else the directory name) without a seed
    suffix ("-seed1") and without the folder all of them share; a group whose runs' names disagree,
    or two groups with the same name, keep the config labels."""
    stems = []
    for g in groups:
        names = {SEED_SUFFIX.sub("", str(r.config.get("run.name") or r.path.name)) for r in g.runs}
        stems.append(names.pop() if len(names) == 1 else None)
    known = [s for s in stems if s]
    common = os.path.commonpath(known) if len(known) > 1 and all("/" in s for s in known) else ""
    stems = [s[len(common):].lstrip("/") if s and common else s for s in stems]
    unique = [s for s in stems if s and stems.count(s) == 1]
    return [replace(g, name=s if s in unique else None) for g, s in zip(groups, stems)]


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs grouped by their config without seeds, names and paths (a key set to null counts as
    missing); labels from the keys that differ between the groups of the same kind. Order: first
    appearance."""
    buckets: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        # a null option (off, or its default) groups with runs from before the option existed
        set_keys = {k: v for k, v in run.group_config.items() if v is not None}
        buckets.setdefault((run.kind, canonical(set_keys)), []).append(run)
    groups = []
    for kind in ("iterate", "evaluate"):
        members = [(cfg, rs) for (k, cfg), rs in buckets.items() if k == kind]
        configs = [rs[0].group_config for _, rs in members]
        keys = differing_keys(configs, [rs[0].config for _, rs in members])
        for config, rs in zip(configs, [rs for _, rs in members]):
            ordered = tuple(sorted(rs, key=lambda r: canonical(r.seed)))
            found = [{k: r.group_config[k] for k in keys if k in r.group_config} for r in ordered]
            groups.append(Group(kind, config, ordered, {k: next(f[k] for f in found if k in f)
                                                        for k in keys if any(k in f for f in found)}))
    return groups
