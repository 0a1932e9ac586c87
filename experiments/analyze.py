"""Analysis of finished runs: plots (PNG), a markdown table and a JSON file. Reads run directories
only (never a model).

    python experiments/analyze.py runs/source_compare/* --out experiments/results/source_compare
    python experiments/analyze.py runs/search_compute --out experiments/results/search_compute --kind search
    python experiments/analyze.py runs/train_vs_infer runs/eval/train_vs_infer --out experiments/results/train_vs_infer

Inputs: run directories of `iterate.py` (config.yaml, metrics.jsonl, initial/eval.json,
round_<k>/{eval,compute,search,train}.json, pairs.jsonl, trees.jsonl) and output directories of
`evaluate.py` (eval.json + .hydra/config.yaml). An argument may be a run directory, a glob, or a folder
holding run directories at any depth.

Runs are grouped by their resolved config with the seeds (`run.seed`, `backend.seed`), names and
output paths removed: runs of one group differ only in their seeds and count as repeats. A value
is the mean over seeds with a 95% band: a t-interval over seeds when there are at least two, else
the 95% Wilson interval of the single run's evaluation (eval.json's ci95). Groups are labelled by the
config keys whose values differ between groups.

Outputs (`--out PREFIX`): PREFIX.md (tables), PREFIX.json (the same numbers), and the plots that
apply (`--kind auto`) or the one asked for:

- rounds:  PREFIX_rounds.png  held-out accuracy after each round against cumulative FLOPs
           (compute.json total_flops: search + train + eval of each round; the initial point at 0),
           one panel per evaluation task, one line per group.
- search:  PREFIX_search.png  pairs per tree, pair quality, search tokens per tree and the Q-ranked
           pairs' yield and quality (where a correct child exists: chosen right against chance)
           against search.simulations, one line per value of the other swept keys (e.g.
           search.breadth); panels whose values are all equal are left out.
- loss:    PREFIX_loss.png    the training loss at every logged step, one panel per group;
           PREFIX_rewards.png  reward curves (margin, accuracy, chosen, rejected) per step, one line
           per group;
           PREFIX_loss_summary.png  final reward margin, reward accuracy and held-out accuracy.
- compare: PREFIX_compare.png held-out accuracy against total FLOPs (log x): iterate runs after
           0..k rounds evaluated greedily (x = cumulative search + train FLOPs + the evaluation's own
           inference FLOPs) and evaluate.py runs (majority@k, MCTS at test time; x = the evaluated
           model's training FLOPs, when its run directory is known, + inference FLOPs).

Paired differences (`paired_diffs`): every two iterate groups after each round, per task, the
accuracy difference on the same evaluation problems (eval.json's per-problem records) for the seeds
both ran, with a 95% interval over problems; far narrower than the per-group bands, since both sides
answer the same problems.

Pair quality (`pair_quality`): a chosen step is good when it lies on a path to a correct answer (it
or a descendant is a terminal with outcome +1), a rejected step is good when it does not. With
verified pairs (the default) it is 100% by construction, so for MCTS runs the analysis also extracts
the pairs MCTS-DPO's Q-ranked rule would take from the same trees (`q_ranked_pairs`) and reports their
yield and quality: a measure of the search's values (self-evaluation + outcomes).

Malformed inputs raise AnalysisError naming the file; a run with missing rounds is skipped with a
warning.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import math
import os
import re
import sys
import textwrap
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from mcts.pairs import PairsConfig, extract_pairs, outcome_reach, read_pairs  # noqa: E402
from mcts.tree import Node, Tree, read_trees  # noqa: E402
from tasks import KINDS as TASK_KINDS  # noqa: E402
from tasks.extract import extract_answer, prefix_pattern  # noqa: E402
from tasks.task import answer_matches  # noqa: E402
from harness.rundir import round_config  # noqa: E402
from harness.stats import T975, Z975, paired_difference, t_quantile  # noqa: E402,F401
from tools.format import prose  # noqa: E402

log = logging.getLogger("analyze")

SEED_KEYS = ("run.seed", "backend.seed")
"""Config keys that make runs repeats of each other (the backends ignore per-request seeds, so a
seed sweep sets backend.seed along with run.seed)."""
IGNORED_KEYS = ("run.name", "run.dir", "out_dir", "run.search_from")  # search_from: where round 0 came from, not a setting
IGNORED_PREFIXES = ("hydra.", "tracking.")
KINDS = ("auto", "rounds", "search", "loss", "compare")
LABELS = ("config", "names")
SEARCH_KEYS = ("search.simulations", "search.breadth", "search.breadth_root")
LOSS_KEYS = ("train.loss_type", "train.loss_weights", "train.conservative")
SAMPLING_KEYS = ("eval.k", "eval.temperature", "eval.top_p")
SAMPLING_PAIRS_KEYS = ("pairs.source", "pairs.samples", "pairs.max_pairs_per_tree")  # what acts with pairs.source=sampling
INITIAL = "initial"
LOSS_PANEL_COLUMNS = 4



class AnalysisError(ValueError):
    """A missing or malformed input; the message names the file."""


# --- data --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalPoint:
    """One task's evaluation (one eval.json entry)."""

    task: str
    accuracy: float
    ci95: tuple[float, float]
    n: int
    correct: int
    flops: float
    mode: str = "greedy"
    k: int | None = None
    outcomes: Mapping[str, bool] = field(default_factory=dict, compare=False, repr=False)
    """problem id -> answered correctly (eval.json's records), for paired comparisons."""
    generated_tokens: int = 0
    """tokens the evaluated policy generated for the task (eval.json's compute)."""
    run_on: int | None = None
    """answers that go on after their first answer line (`runs_on`); None when records hold no outputs."""
    first_correct: int | None = None
    """answers right when graded at their first answer line (`first_answer`), as the search's terminal
    step ends; None when records hold no outputs or no gold."""

    @property
    def tokens_per_problem(self) -> float | None:
        return self.generated_tokens / self.n if self.n and self.generated_tokens else None

    @property
    def run_on_share(self) -> float | None:
        return self.run_on / self.n if self.n and self.run_on is not None else None

    @property
    def first_accuracy(self) -> float | None:
        return self.first_correct / self.n if self.n and self.first_correct is not None else None


def runs_on(output: str, prefix: str = "The answer is") -> bool:
    """Whether an answer goes on after the line that first states its answer (`prefix`, matched as
    the answer extractor matches it): the policy did not stop where the search's terminal step ends."""
    return bool(output[len(first_answer(output, prefix)):].strip())


def first_answer(output: str, prefix: str = "The answer is") -> str:
    """`output` cut after the line that first states its answer (unchanged without one): the answer the
    search would have taken, since its terminal step ends on that line."""
    m = prefix_pattern(prefix).search(output)
    end = output.find("\n", m.end()) if m else -1
    return output if end < 0 else output[:end]


def stated(output: str, tool: bool) -> str:
    """The words an answer is read from: with tools, the output without its programs and their output
    blocks (tools.format.prose, as the task's extractor reads them), else the output."""
    return prose(output) if tool else output


def count_first_correct(records: Any, prefix: str, answer_format: str, tool: bool = False) -> int | None:
    """Records answered right when graded at their first answer line, with the evaluation's own
    extractor and checker; None unless every record has an output and a gold answer."""
    if not isinstance(records, list) or not records:
        return None
    if not all(isinstance(r, Mapping) and isinstance(r.get("output"), str) and isinstance(r.get("gold"), str)
               for r in records):
        return None
    return sum(answer_matches(r["gold"], extract_answer(first_answer(stated(r["output"], tool), prefix), prefix=prefix,
                                                        answer_format=answer_format), answer_format)
               for r in records)


def count_run_on(records: Any, prefix: str, tool: bool = False) -> int | None:
    outputs = [r.get("output") for r in records if isinstance(r, Mapping)] if isinstance(records, list) else []
    outputs = [stated(o, tool) for o in outputs if isinstance(o, str)]
    return sum(runs_on(o, prefix) for o in outputs) if outputs else None


@dataclass(frozen=True)
class PairedDiff:
    """Accuracy of `other` minus `base` on the same evaluation problems, for the seeds both have.

    diff, low, high: the mean over problems of each problem's difference (1 right, 0 wrong; averaged
    over the seeds) with a 95% interval over problems; per_seed: the plain difference of each seed;
    other_only / base_only: (seed, problem) cases right only in `other` / only in `base`."""

    base: str
    other: str
    point: str
    task: str
    seeds: tuple
    problems: int
    diff: float
    low: float
    high: float
    per_seed: tuple[float, ...]
    other_only: int
    base_only: int


@dataclass(frozen=True)
class PairQuality:
    """How well a round's pairs agree with the trees' verified outcomes.

    pairs: pairs matched to their tree nodes; unmatched: pairs whose tree or nodes were not found.
    chosen_good: chosen steps on a path to a correct answer; rejected_good: rejected steps on none;
    both_good: pairs with both.
    """

    pairs: int
    unmatched: int
    chosen_good: int
    rejected_good: int
    both_good: int

    def share(self, count: int) -> float | None:
        return count / self.pairs if self.pairs else None

    @property
    def chosen_share(self) -> float | None:
        return self.share(self.chosen_good)

    @property
    def rejected_share(self) -> float | None:
        return self.share(self.rejected_good)

    @property
    def both_share(self) -> float | None:
        return self.share(self.both_good)


@dataclass(frozen=True)
class PairShape:
    """Where a round's pairs branch and how long their two sides are.

    mean_depth: steps in the shared prefix (0 = the prompt is the question alone); root_share: pairs
    with depth 0; chosen_steps / rejected_steps: mean steps (non-empty lines split on the step
    separator) of the chosen / rejected side. A source whose chosen side is longer teaches longer
    answers, whatever is right in it."""

    pairs: int
    mean_depth: float
    root_share: float
    chosen_steps: float
    rejected_steps: float


def count_steps(text: str, separator: str = "\n") -> int:
    return sum(1 for part in text.split(separator) if part.strip()) if separator else int(bool(text.strip()))


def pair_shape(pairs: Sequence[Mapping[str, Any]], separator: str = "\n") -> PairShape | None:
    """The shape of a set of pairs (None without pairs); a pair without `depth` counts as depth 0."""
    if not pairs:
        return None
    n = len(pairs)
    depths = [int(p.get("depth") or 0) for p in pairs]
    return PairShape(pairs=n, mean_depth=sum(depths) / n, root_share=sum(d == 0 for d in depths) / n,
                     chosen_steps=sum(count_steps(str(p["chosen"]), separator) for p in pairs) / n,
                     rejected_steps=sum(count_steps(str(p["rejected"]), separator) for p in pairs) / n)


@dataclass(frozen=True)
class TrainSummary:
    """The figures of train.json the analysis uses."""

    skipped: bool
    final_loss: float | None = None
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    mean_smoothing: float | None = None
    steps: int = 0
    pairs: int = 0
    loss_history: tuple[float, ...] = ()
    margin_history: tuple[float, ...] = ()
    accuracy_history: tuple[float, ...] = ()
    chosen_history: tuple[float, ...] = ()
    rejected_history: tuple[float, ...] = ()


# The reward curves of PREFIX_rewards.png: TrainSummary field, panel title.
REWARD_CURVES = (("margin_history", "reward margin (chosen - rejected)"), ("accuracy_history", "reward accuracy"),
                 ("chosen_history", "chosen reward"), ("rejected_history", "rejected reward"))


@dataclass(frozen=True)
class Point:
    """One evaluated policy of an iterate run: the initial one (position 0) or the one after round
    k (position k + 1), with what that round cost and produced."""

    position: int
    evals: Mapping[str, EvalPoint]
    search_flops: float = 0.0
    train_flops: float = 0.0
    total_flops: float = 0.0
    trees: int = 0
    search_generated_tokens: int = 0
    pairs: int | None = None
    pairs_digest: str | None = None
    quality: PairQuality | None = None
    q_ranked: PairQuality | None = None
    q_ranking: RankingCheck | None = None
    train: TrainSummary | None = None
    shape: PairShape | None = None

    @property
    def label(self) -> str:
        return INITIAL if self.position == 0 else f"round {self.position - 1}"


@dataclass(frozen=True)
class Run:
    """One run directory. kind: "iterate" (points: initial and one per round) or "evaluate"
    (evals: its one eval.json; train_flops: the evaluated model's training cost, None if unknown)."""

    path: Path
    kind: str
    config: Mapping[str, Any]
    points: tuple[Point, ...] = ()
    evals: tuple[EvalPoint, ...] = ()
    train_flops: float | None = 0.0

    @property
    def seed(self) -> tuple:
        return tuple(self.config.get(k) for k in SEED_KEYS)

    @property
    def group_config(self) -> dict[str, Any]:
        return {k: v for k, v in self.config.items() if is_group_key(k) and not idle_key(self.config, k)}


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


@dataclass(frozen=True)
class Band:
    """A mean over repeats with a 95% band; method "t" (over seeds), "wilson" (one run), "none"."""

    mean: float
    low: float
    high: float
    n: int
    method: str

    def fmt(self, scale: float = 1.0, spec: str = ".1f") -> str:
        if self.method == "none":
            return format(self.mean * scale, spec)
        return f"{format(self.mean * scale, spec)} [{format(self.low * scale, spec)}, {format(self.high * scale, spec)}]"


# --- pure functions: statistics, configs, pair quality --------------------------------------------------


def mean_band(values: Sequence[float]) -> Band | None:
    """Mean with a 95% t-interval (Student) over `values`; a single value gets a zero-width band."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    n = len(vals)
    mean = sum(vals) / n
    if n < 2:
        return Band(mean, mean, mean, 1, "none")
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return Band(mean, mean - half, mean + half, n, "t")


def accuracy_band(points: Sequence[EvalPoint]) -> Band | None:
    """Accuracy over seeds: t-interval (clipped to [0, 1]) from two seeds on, else the run's Wilson
    interval."""
    if not points:
        return None
    if len(points) == 1:
        p = points[0]
        return Band(p.accuracy, p.ci95[0], p.ci95[1], 1, "wilson")
    b = mean_band([p.accuracy for p in points])
    return Band(b.mean, max(0.0, b.low), min(1.0, b.high), b.n, b.method)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {"a.b.c": value}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


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


def differing_keys(configs: Sequence[Mapping[str, Any]], wholes: Sequence[Mapping[str, Any]] | None = None) -> list[str]:
    """Keys that take more than one value among the `configs` that have them (a key missing from a
    config that has its group counts as null; `wholes`: the configs with their idle
    keys, which count as missing values), sorted; if those do not tell the configs apart, keys whose
    presence differs too."""
    wholes = configs if wholes is None else wholes
    keys = sorted({k for c in configs for k in c})
    varied = [k for k in keys if len({v for c, w in zip(configs, wholes) if (v := _key_value(c, k, w)) is not None}) > 1]
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


def correct_nodes(tree: Tree) -> set[int]:
    """Ids of the nodes that are, or have below them, a terminal validated correct (outcome > 0)."""
    return {node_id for node_id, (good, _) in outcome_reach(tree).items() if good}


def match_child(tree: Tree, parent_id: int, text: str, q: float | None, visits: int | None) -> Node | None:
    """The child of `parent_id` that a pair side starts with (the side is the step text plus a separator,
    or a whole continuation); among equal texts, the one whose Q and visits the pair recorded."""
    if not 0 <= parent_id < len(tree.nodes):
        return None
    kids = [tree.nodes[c] for c in tree.nodes[parent_id].children]
    found = [n for n in kids if n.text and text.startswith(n.text) or n.text.strip() == text.strip()]
    if not found:
        return None

    def distance(n: Node) -> tuple:
        same_q = q is not None and math.isclose(n.q, float(q), rel_tol=1e-9, abs_tol=1e-12)
        return (not same_q, abs(n.visits - int(visits)) if visits is not None else 0, -len(n.text), n.id)

    return min(found, key=distance)


def pair_side(tree: Tree, pair: Mapping[str, Any], side: str) -> Node | None:
    """The child a pair side names: by `<side>_id` when the record has it (mcts/pairs.py writes it) and it
    is a child of `node_id`, else by text among the children of `node_id` (sampling pairs, older files)."""
    parent = int(pair["node_id"])
    node_id = pair.get(f"{side}_id")
    if isinstance(node_id, int) and 0 <= node_id < len(tree.nodes) and tree.nodes[node_id].parent == parent:
        return tree.nodes[node_id]
    return match_child(tree, parent, pair[side], pair.get(f"{side}_q"), pair.get(f"{side}_visits"))


def _tree_index(trees: Iterable[Tree], good: dict[str, set[int]] | None) -> tuple[dict[str, Tree], Callable[[Tree], set[int]]]:
    """Trees by problem id, and a lookup of each tree's correct_nodes computed once (kept in `good`, which
    a caller passes to share it between checks of the same trees)."""
    cache = {} if good is None else good

    def good_of(tree: Tree) -> set[int]:
        if tree.problem.id not in cache:
            cache[tree.problem.id] = correct_nodes(tree)
        return cache[tree.problem.id]

    return {t.problem.id: t for t in trees}, good_of


def pair_quality(trees: Iterable[Tree], pairs: Iterable[Mapping[str, Any]],
                 good: dict[str, set[int]] | None = None) -> PairQuality:
    """Pair quality of one round (see PairQuality). A pair names its tree (`problem_id`), the node whose
    children it compares (`node_id`) and the two children (`chosen_id`, `rejected_id`; without them,
    matched by text, ties broken by the recorded Q and visits)."""
    by_id, good_of = _tree_index(trees, good)
    matched = unmatched = chosen_good = rejected_good = both = 0
    for pair in pairs:
        tree = by_id.get(pair.get("problem_id"))
        if tree is None or "node_id" not in pair:
            unmatched += 1
            continue
        chosen, rejected = pair_side(tree, pair, "chosen"), pair_side(tree, pair, "rejected")
        if chosen is None or rejected is None:
            unmatched += 1
            continue
        good_nodes = good_of(tree)
        c_ok, r_ok = chosen.id in good_nodes, rejected.id not in good_nodes
        matched += 1
        chosen_good += c_ok
        rejected_good += r_ok
        both += c_ok and r_ok
    return PairQuality(matched, unmatched, chosen_good, rejected_good, both)


@dataclass(frozen=True)
class RankingCheck:
    """Whether a rule's chosen steps beat chance where the outcomes could tell (Q-ranked pairs).

    pairs: pairs checked; informed: pairs at a node with at least one child on a path to a correct
    answer (elsewhere every child is wrong and the ranking has nothing to find); informed_chosen_good:
    of those, pairs whose chosen child is on such a path; informed_random: of those, the expected
    count for a chosen child picked uniformly among the node's children.
    """

    pairs: int
    informed: int
    informed_chosen_good: int
    informed_random: float

    @property
    def informed_share(self) -> float | None:
        return self.informed / self.pairs if self.pairs else None

    @property
    def informed_chosen_share(self) -> float | None:
        return self.informed_chosen_good / self.informed if self.informed else None

    @property
    def informed_random_share(self) -> float | None:
        return self.informed_random / self.informed if self.informed else None


def ranking_check(trees: Iterable[Tree], pairs: Iterable[Mapping[str, Any]],
                  good: dict[str, set[int]] | None = None) -> RankingCheck:
    """RankingCheck of pairs that carry `node_id` and `chosen_id` (as extract_pairs writes them);
    `good` as in pair_quality."""
    by_id, good_of = _tree_index(trees, good)
    n = informed = chosen_good = 0
    random_good = 0.0
    for pair in pairs:
        tree = by_id.get(pair.get("problem_id"))
        if tree is None:
            continue
        good_nodes = good_of(tree)
        kids = tree.nodes[int(pair["node_id"])].children
        n += 1
        share = sum(c in good_nodes for c in kids) / len(kids) if kids else 0.0
        if share > 0:
            informed += 1
            chosen_good += pair.get("chosen_id") in good_nodes
            random_good += share
    return RankingCheck(n, informed, chosen_good, random_good)


def pairs_digest(pairs: Iterable[Mapping[str, Any]]) -> str:
    """A short hash of the pairs' (prompt, chosen, rejected) in file order: equal digests = same pairs."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(canonical([p.get("prompt"), p.get("chosen"), p.get("rejected")]).encode())
    return h.hexdigest()[:12]


def cumulative(values: Iterable[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def point_flops(run: Run) -> list[float]:
    """Cumulative FLOPs at each point: 0 at the initial policy, then the running sum of each round's
    total_flops (search + train + eval, compute.json)."""
    rounds = [p.total_flops for p in run.points if p.position > 0]
    offset = [0.0] if run.points and run.points[0].position == 0 else []
    return offset + cumulative(rounds)


def training_flops_at(run: Run) -> dict[int, float]:
    """Cumulative search + train FLOPs that produced the policy at each position (0 at the initial)."""
    total, out = 0.0, {}
    for p in run.points:
        total += p.search_flops + p.train_flops
        out[p.position] = total
    return out


# --- reading run directories ------------------------------------------------------------------------


def read_json_file(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise AnalysisError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise AnalysisError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def read_lines_file(path: Path, reader: Callable[[Path], list]) -> list:
    """A JSON-lines file through the project's own reader (mcts.pairs.read_pairs, mcts.tree.read_trees:
    their ValueErrors name the file and line)."""
    try:
        return reader(path)
    except (ValueError, KeyError, TypeError) as err:
        raise AnalysisError(str(err) if str(path) in str(err) else f"{path}: {err}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """A Hydra config yaml as a flat dict (interpolations resolved where they can be)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise AnalysisError(f"{path}: missing") from None
    except Exception as err:  # yaml's errors name the line
        raise AnalysisError(f"{path}: not a valid config yaml ({err})") from None
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # e.g. ${hydra:...} outside Hydra: keep the raw strings
        data = OmegaConf.to_container(cfg, resolve=False)
    if not isinstance(data, dict):
        raise AnalysisError(f"{path}: expected a mapping")
    return flatten(data)


def eval_point(name: str, data: Any, path: Path, prefix: str = "The answer is",
               answer_format: str = "number", tool: bool = False) -> EvalPoint:
    try:
        return EvalPoint(task=str(data.get("task", name)), accuracy=float(data["accuracy"]),
                         ci95=(float(data["ci95"][0]), float(data["ci95"][1])), n=int(data["n"]),
                         correct=int(data["correct"]), flops=float(data["compute"]["flops"]),
                         mode=str(data.get("mode", "greedy")), k=data.get("k"),
                         outcomes=record_outcomes(data.get("records") or [], f"{path}: entry {name!r}"),
                         generated_tokens=int(data["compute"].get("generated_tokens") or 0),
                         run_on=count_run_on(data.get("records"), prefix, tool),
                         first_correct=count_first_correct(data.get("records"), prefix, answer_format, tool))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise AnalysisError(f"{path}: entry {name!r} is not an evaluation result (missing or bad {err})") from None


def record_outcomes(records: Any, where: str) -> dict[str, bool]:
    """problem id -> correct, from eval.json records."""
    if not isinstance(records, list):
        raise AnalysisError(f"{where}: records is not a list")
    out = {}
    for i, r in enumerate(records):
        if not isinstance(r, Mapping) or "id" not in r or not isinstance(r.get("correct"), bool):
            raise AnalysisError(f"{where}: record {i} has no id or no true/false 'correct'")
        out[str(r["id"])] = r["correct"]
    return out


def read_evals(path: Path, config: Mapping[str, Any] | None = None) -> dict[str, EvalPoint]:
    """An iterate run's eval.json; `config` (flattened) gives each task's answer prefix and format."""
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise AnalysisError(f"{path}: expected {{task: result}}")
    config = config or {}
    tool = str(config.get("tool.name") or "none") != "none"
    return {name: eval_point(name, r, path, str(config.get(f"eval_tasks.{name}.answer_prefix") or "The answer is"),
                             answer_format_of(config, f"eval_tasks.{name}"), tool)
            for name, r in data.items()}


def answer_format_of(config: Mapping[str, Any], key: str) -> str:
    """A task config's answer format: its own, else its kind's, else "number" (as tasks.make_task)."""
    return str(config.get(f"{key}.answer_format") or TASK_KINDS.get(str(config.get(f"{key}.kind")), "number"))


def train_summary(data: Mapping[str, Any], path: Path) -> TrainSummary:
    if data.get("skipped"):
        return TrainSummary(skipped=True)
    try:
        return TrainSummary(skipped=False, final_loss=data.get("final_loss"), reward_margin=data.get("reward_margin"),
                            reward_accuracy=data.get("reward_accuracy"), mean_smoothing=data.get("mean_smoothing"),
                            steps=int(data.get("steps", 0)), pairs=int(data.get("pairs", 0)),
                            **{name: tuple(float(x) for x in data.get(name, ()))
                               for name in ("loss_history", *(n for n, _ in REWARD_CURVES))})
    except (TypeError, ValueError) as err:
        raise AnalysisError(f"{path}: malformed training result ({err})") from None


def phase_flops(compute: Mapping[str, Any], phase: str, path: Path) -> float:
    try:
        return float((compute.get(phase) or {}).get("flops", 0.0))
    except (TypeError, ValueError, AttributeError):
        raise AnalysisError(f"{path}: {phase}.flops is not a number") from None


def q_ranked_pairs(trees: Iterable[Tree], config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The pairs MCTS-DPO's own extraction would take from these trees (highest- against lowest-Q
    child, one step each, `pairs.margin` and `pairs.min_visits` of the run): their quality says how
    far the search's values (self-evaluation + outcomes) can be trusted, which the run's own verified
    pairs cannot (their quality is 100% by construction)."""
    cfg = PairsConfig(margin=float(config.get("pairs.margin", 0.2)), min_visits=int(config.get("pairs.min_visits", 1)),
                      verified=False, full=False)
    return [p for t in trees for p in extract_pairs(t, config=cfg, format_prompt=lambda problem, steps: "")]


def read_round(run_dir: Path, k: int, *, quality: bool = True, config: Mapping[str, Any] | None = None) -> Point:
    rd = run_dir / f"round_{k}"
    compute = read_json_file(rd / "compute.json")
    if not isinstance(compute, dict) or "total_flops" not in compute:
        raise AnalysisError(f"{rd / 'compute.json'}: no total_flops")
    evals = read_evals(rd / "eval.json", config) if (rd / "eval.json").is_file() else {}
    search = read_json_file(rd / "search.json") if (rd / "search.json").is_file() else {}
    train = train_summary(read_json_file(rd / "train.json"), rd / "train.json") if (rd / "train.json").is_file() else None
    pairs = read_lines_file(rd / "pairs.jsonl", read_pairs) if (rd / "pairs.jsonl").is_file() else None
    q = q_ranked = q_ranking = None
    if quality and pairs is not None and (rd / "trees.jsonl").is_file():
        trees = read_lines_file(rd / "trees.jsonl", read_trees)
        good: dict[str, set[int]] = {}  # each tree's correct nodes, computed once for the three checks
        q = pair_quality(trees, pairs, good)
        if (config or {}).get("pairs.source", "mcts") == "mcts":
            ranked = q_ranked_pairs(trees, config or {})
            q_ranked, q_ranking = pair_quality(trees, ranked, good), ranking_check(trees, ranked, good)
    return Point(position=k + 1, evals=evals, search_flops=phase_flops(compute, "search", rd / "compute.json"),
                 train_flops=phase_flops(compute, "train", rd / "compute.json"),
                 total_flops=float(compute["total_flops"]), trees=int(search.get("trees", 0)),
                 search_generated_tokens=int((search.get("compute") or {}).get("generated_tokens", 0)),
                 pairs=None if pairs is None else len(pairs), pairs_digest=None if pairs is None else pairs_digest(pairs),
                 quality=q, q_ranked=q_ranked, q_ranking=q_ranking, train=train,
                 shape=None if pairs is None else pair_shape(pairs, str((config or {}).get("prompt.step_separator", "\n"))))


def missing_round_files(run_dir: Path, rounds: int, needs_eval: bool) -> list[Path]:
    names = ("compute.json", "eval.json") if needs_eval else ("compute.json",)
    return [run_dir / f"round_{k}" / n for k in range(rounds) for n in names
            if not (run_dir / f"round_{k}" / n).is_file()]


def load_iterate_run(run_dir: Path, *, quality: bool = True) -> Run | None:
    """An iterate.py run directory, or None (with a warning) when a round is incomplete."""
    config = read_config_file(run_dir / "config.yaml")
    rounds = config.get("run.rounds")
    if not isinstance(rounds, int):
        raise AnalysisError(f"{run_dir / 'config.yaml'}: no run.rounds (not an iterate.py config)")
    needs_eval = any(k.startswith("eval_tasks.") for k in config)
    missing = missing_round_files(run_dir, rounds, needs_eval)
    if missing:
        log.warning("skipping %s: %s missing (run.rounds=%d; the run is incomplete)", run_dir,
                    ", ".join(str(p.relative_to(run_dir)) for p in missing[:3]) + (" ..." if len(missing) > 3 else ""),
                    rounds)
        return None
    points = []
    if (run_dir / INITIAL / "eval.json").is_file():
        points.append(Point(position=0, evals=read_evals(run_dir / INITIAL / "eval.json", config)))
    points.extend(read_round(run_dir, k, quality=quality, config=read_config_file(round_config(run_dir, k)))
                  for k in range(rounds))  # each round read with the config that produced it
    return Run(path=run_dir, kind="iterate", config=config, points=tuple(points))


def policy_training_flops(model_path: str | None) -> float | None:
    """Search + train FLOPs that produced a checkpoint at <run>/round_<k>/policy (rounds 0..k of its
    compute.json); 0 for a model that is no round's policy (the base model); None if unknown."""
    if not model_path:
        return 0.0
    p = Path(model_path)
    m = re.fullmatch(r"round_(\d+)", p.parent.name) if p.name == "policy" else None
    if m is None:
        return 0.0
    total = 0.0
    for j in range(int(m.group(1)) + 1):
        path = p.parent.parent / f"round_{j}" / "compute.json"
        if not path.is_file():
            log.warning("%s: missing, so the training FLOPs of %s are unknown", path, model_path)
            return None
        compute = read_json_file(path)
        total += phase_flops(compute, "search", path) + phase_flops(compute, "train", path)
    return total


def load_evaluate_run(out_dir: Path) -> Run:
    config = read_config_file(out_dir / ".hydra" / "config.yaml")
    data = read_json_file(out_dir / "eval.json")
    if not isinstance(data, dict):
        raise AnalysisError(f"{out_dir / 'eval.json'}: expected an evaluation result")
    point = eval_point(str(data.get("task", config.get("task.name", "task"))), data, out_dir / "eval.json")
    return Run(path=out_dir, kind="evaluate", config=config, evals=(point,),
               train_flops=policy_training_flops(data.get("model") or config.get("model.path")))


def run_kind(path: Path) -> str | None:
    if (path / "config.yaml").is_file() and ((path / "metrics.jsonl").is_file() or (path / INITIAL).is_dir()
                                              or any(path.glob("round_*"))):
        return "iterate"
    if (path / "eval.json").is_file() and (path / ".hydra" / "config.yaml").is_file():
        return "evaluate"
    return None


def discover(args: Sequence[str]) -> list[tuple[Path, str]]:
    """Run directories named by `args` (directories, globs, or folders holding runs at any depth)."""
    found: list[tuple[Path, str]] = []
    for arg in args:
        matches = sorted(glob.glob(arg)) or [arg]
        for m in map(Path, matches):
            if not m.is_dir():
                raise AnalysisError(f"{m}: not a directory")
            before = len(found)
            kind = run_kind(m)
            if kind:
                found.append((m, kind))
                continue
            for dirpath, dirnames, _ in os.walk(m):
                here = Path(dirpath)
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "policy")
                kind = run_kind(here)
                if kind:
                    found.append((here, kind))
                    dirnames[:] = []
            if len(found) == before:
                raise AnalysisError(f"{m}: no run directory (config.yaml of iterate.py, or eval.json with "
                                    ".hydra/config.yaml of evaluate.py) there or below")
    unique = dict.fromkeys(found)
    return list(unique)


def load_runs(args: Sequence[str], *, quality: bool = True) -> list[Run]:
    runs = []
    for path, kind in discover(args):
        run = load_iterate_run(path, quality=quality) if kind == "iterate" else load_evaluate_run(path)
        if run is not None:
            runs.append(run)
    if not runs:
        raise AnalysisError("no complete run among " + " ".join(args))
    return runs


# --- summaries (JSON-able) ------------------------------------------------------------------------------


def band_dict(b: Band | None) -> dict[str, Any] | None:
    return None if b is None else asdict(b)


def eval_tasks(groups: Sequence[Group]) -> list[str]:
    names = {t for g in groups for r in g.runs for p in r.points for t in p.evals}
    names |= {e.task for g in groups for r in g.runs for e in r.evals}
    return sorted(names)


def _share_band(points: Sequence[Point], attr: str, which: str = "quality") -> Band | None:
    found = [getattr(p, which) for p in points]
    return mean_band([getattr(q, attr) for q in found if q is not None and getattr(q, attr) is not None])


def _shape_band(points: Sequence[Point], attr: str) -> Band | None:
    return mean_band([getattr(p.shape, attr) for p in points if p.shape is not None])


def _train_band(points: Sequence[Point], attr: str) -> Band | None:
    return mean_band([getattr(p.train, attr) for p in points if p.train is not None and not p.train.skipped
                      and getattr(p.train, attr) is not None])


def summarize_position(group: Group, position: int, tasks: Sequence[str]) -> dict[str, Any]:
    """One point (initial or after a round) of an iterate group, over its seeds."""
    members = [(r, i) for r in group.runs for i, p in enumerate(r.points) if p.position == position]
    points = [r.points[i] for r, i in members]
    cum = [point_flops(r)[i] for r, i in members]
    rounds = [p for p in points if p.position > 0]
    per_tree = [p.pairs / p.trees for p in rounds if p.pairs is not None and p.trees]
    tokens = [p.search_generated_tokens / p.trees for p in rounds if p.trees]
    return {
        "position": position, "label": points[0].label, "runs": len(points),
        "accuracy": {t: band_dict(accuracy_band([p.evals[t] for p in points if t in p.evals])) for t in tasks},
        "cumulative_flops": band_dict(mean_band(cum)),
        "round_flops": band_dict(mean_band([p.total_flops for p in rounds])),
        "pairs": band_dict(mean_band([p.pairs for p in rounds if p.pairs is not None])),
        "pairs_per_tree": band_dict(mean_band(per_tree)),
        "search_tokens_per_problem": band_dict(mean_band(tokens)),
        "chosen_on_correct_path": band_dict(_share_band(rounds, "chosen_share")),
        "rejected_off_correct_path": band_dict(_share_band(rounds, "rejected_share")),
        "both_good": band_dict(_share_band(rounds, "both_share")),
        "q_ranked_pairs_per_tree": band_dict(mean_band([p.q_ranked.pairs / p.trees for p in rounds
                                                         if p.q_ranked is not None and p.trees])),
        "q_ranked_chosen_good": band_dict(_share_band(rounds, "chosen_share", "q_ranked")),
        "q_ranked_rejected_good": band_dict(_share_band(rounds, "rejected_share", "q_ranked")),
        "q_ranked_informed": band_dict(_share_band(rounds, "informed_share", "q_ranking")),
        "q_ranked_informed_chosen_good": band_dict(_share_band(rounds, "informed_chosen_share", "q_ranking")),
        "q_ranked_informed_random": band_dict(_share_band(rounds, "informed_random_share", "q_ranking")),
        "unmatched_pairs": sum(p.quality.unmatched for p in rounds if p.quality is not None),
        "pair_depth": band_dict(_shape_band(rounds, "mean_depth")),
        "pairs_at_root": band_dict(_shape_band(rounds, "root_share")),
        "chosen_steps": band_dict(_shape_band(rounds, "chosen_steps")),
        "rejected_steps": band_dict(_shape_band(rounds, "rejected_steps")),
        "answer_tokens": {t: band_dict(mean_band([p.evals[t].tokens_per_problem for p in points if t in p.evals
                                                  and p.evals[t].tokens_per_problem is not None])) for t in tasks},
        "run_on": {t: band_dict(mean_band([p.evals[t].run_on_share for p in points if t in p.evals
                                           and p.evals[t].run_on_share is not None])) for t in tasks},
        "first_answer_accuracy": {t: band_dict(mean_band([p.evals[t].first_accuracy for p in points if t in p.evals
                                                          and p.evals[t].first_accuracy is not None])) for t in tasks},
        "train_final_loss": band_dict(_train_band(rounds, "final_loss")),
        "train_reward_margin": band_dict(_train_band(rounds, "reward_margin")),
        "train_reward_accuracy": band_dict(_train_band(rounds, "reward_accuracy")),
        "pairs_digests": sorted({p.pairs_digest for p in rounds if p.pairs_digest}),
    }


def summarize_evaluate(group: Group) -> dict[str, Any]:
    evals = [e for r in group.runs for e in r.evals]
    train = [r.train_flops for r in group.runs]
    known = [t for t in train if t is not None]
    first = evals[0]
    return {
        "task": first.task, "mode": first.mode, "k": first.k,
        "simulations": group.config.get("search.simulations") if first.mode == "mcts" else None,
        "model": group.config.get("model.path") or group.config.get("model.name"),
        "accuracy": band_dict(accuracy_band(evals)),
        "inference_flops": band_dict(mean_band([e.flops for e in evals])),
        "train_flops": band_dict(mean_band(known)) if len(known) == len(train) else None,
    }


def summarize(groups: Sequence[Group]) -> dict[str, Any]:
    tasks = eval_tasks(groups)
    out = []
    for g in groups:
        entry = {"label": g.label, "config_label": g.config_label, "kind": g.kind, "diff": dict(g.diff), "seeds": g.seeds,
                 "runs": [str(r.path) for r in g.runs]}
        if g.kind == "iterate":
            positions = sorted({p.position for r in g.runs for p in r.points})
            entry["points"] = [summarize_position(g, pos, tasks) for pos in positions]
        else:
            entry["evaluation"] = summarize_evaluate(g)
        out.append(entry)
    return {"tasks": tasks, "groups": out, "checks": checks(groups), "paired": [asdict(d) for d in paired_diffs(groups, tasks)]}


def paired_diffs(groups: Sequence[Group], tasks: Sequence[str]) -> list[PairedDiff]:
    """Every two iterate groups (the earlier one as base) after each round, per task: the paired
    accuracy difference over the seeds both groups ran (`paired_difference`). Groups without shared
    seeds or without per-problem records are not compared."""
    iterate = [g for g in groups if g.kind == "iterate"]
    out = []
    for i, base in enumerate(iterate):
        for other in iterate[i + 1:]:
            runs_b = {canonical(r.seed): r for r in base.runs}
            shared = [(runs_b[canonical(r.seed)], r) for r in other.runs if canonical(r.seed) in runs_b]
            positions = sorted({p.position for _, r in shared for p in r.points if p.position > 0})
            for pos in positions:
                for task in tasks:
                    per_seed, seeds = [], []
                    for rb, ro in shared:
                        pb = next((p for p in rb.points if p.position == pos), None)
                        po = next((p for p in ro.points if p.position == pos), None)
                        if pb and po and task in pb.evals and task in po.evals:
                            per_seed.append((pb.evals[task].outcomes, po.evals[task].outcomes))
                            seeds.append(ro.config.get("run.seed"))
                    d = paired_difference(per_seed)
                    if d is not None:
                        out.append(PairedDiff(base=base.label, other=other.label, point=f"round {pos - 1}", task=task,
                                              seeds=tuple(seeds), **d))
    return out


def checks(groups: Sequence[Group]) -> dict[str, Any]:
    """Facts the experiments rely on: search tokens per problem per group (budget matching of pair
    sources) and, per round, whether all iterate runs trained on the same pairs."""
    iterate = [g for g in groups if g.kind == "iterate"]
    tokens = {}
    for g in iterate:
        rounds = [p for r in g.runs for p in r.points if p.position > 0 and p.trees]
        b = mean_band([p.search_generated_tokens / p.trees for p in rounds])
        if b is not None:
            tokens[g.label] = b.mean
    same = {}
    positions = sorted({p.position for g in iterate for r in g.runs for p in r.points if p.position > 0})
    for pos in positions:
        digests = [p.pairs_digest for g in iterate for r in g.runs for p in r.points
                   if p.position == pos and p.pairs_digest]
        if digests:
            same[f"round {pos - 1}"] = {"runs": len(digests), "distinct_pair_sets": len(set(digests))}
    ratio = max(tokens.values()) / min(tokens.values()) if tokens and min(tokens.values()) > 0 else None
    return {"search_tokens_per_problem": tokens, "token_ratio_max_min": ratio, "pairs_per_round": same}


# --- markdown -------------------------------------------------------------------------------------


def _cell(b: Mapping[str, Any] | None, scale: float = 1.0, spec: str = ".1f") -> str:
    if not b:
        return "-"
    return Band(**b).fmt(scale, spec)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(summary: Mapping[str, Any], plots: Sequence[Path]) -> str:
    tasks = summary["tasks"]
    parts = ["# Analysis", "",
             "Mean over seeds with a 95% band in brackets: a t-interval over seeds when a group has two or "
             "more, else the run's 95% Wilson interval (accuracy) or none. Accuracies in %; pair quality = "
             "share of chosen steps on a path to a correct answer / of rejected steps on none.", ""]
    named = [g for g in summary["groups"] if g["label"] != g.get("config_label", g["label"])]
    if named:
        parts += ["## Groups", "", _table(["group", "differs in", "runs"],
                                          [[g["label"], g["config_label"], str(len(g["runs"]))] for g in named]), ""]
    iterate = [g for g in summary["groups"] if g["kind"] == "iterate"]
    if iterate:
        head = ["group", "seeds", "point", "cum. FLOPs", *[f"{t} acc" for t in tasks], "pairs", "pairs/tree",
                "chosen good", "rejected good", "search tok/problem", "train loss", "reward margin"]
        rows = []
        for g in iterate:
            for p in g["points"]:
                rows.append([g["label"], ",".join(map(str, g["seeds"])), p["label"],
                             _cell(p["cumulative_flops"], 1.0, ".3g"),
                             *[_cell(p["accuracy"].get(t), 100.0) for t in tasks],
                             _cell(p["pairs"], 1.0, ".1f"), _cell(p["pairs_per_tree"], 1.0, ".2f"),
                             _cell(p["chosen_on_correct_path"], 100.0), _cell(p["rejected_off_correct_path"], 100.0),
                             _cell(p["search_tokens_per_problem"], 1.0, ".0f"), _cell(p["train_final_loss"], 1.0, ".3f"),
                             _cell(p["train_reward_margin"], 1.0, ".3f")])
        parts += ["## Rounds", "", _table(head, rows), ""]
        q_rows = [[g["label"], ",".join(map(str, g["seeds"])), p["label"], _cell(p["q_ranked_pairs_per_tree"], 1.0, ".2f"),
                   _cell(p["q_ranked_chosen_good"], 100.0), _cell(p["q_ranked_rejected_good"], 100.0),
                   _cell(p["q_ranked_informed"], 100.0), _cell(p["q_ranked_informed_chosen_good"], 100.0),
                   _cell(p["q_ranked_informed_random"], 100.0)]
                  for g in iterate for p in g["points"] if p.get("q_ranked_pairs_per_tree")]
        if q_rows:
            parts += ["## Q-ranked pairs from the same trees", "",
                      "The pairs MCTS-DPO's extraction (highest- against lowest-Q child, one step, the run's margin) "
                      "would take from the same trees, and their quality: how far the search's values can be trusted. "
                      "'informed': share of those pairs at a node where some child lies on a path to a correct answer "
                      "(elsewhere every child is wrong); there, how often the chosen child is on such a path, against "
                      "a child picked at random.",
                      "", _table(["group", "seeds", "point", "pairs/tree", "chosen good", "rejected good", "informed",
                                  "informed: chosen good", "informed: random"], q_rows), ""]
        s_rows = [[g["label"], ",".join(map(str, g["seeds"])), p["label"], _cell(p.get("pair_depth"), 1.0, ".2f"),
                   _cell(p.get("pairs_at_root"), 100.0, ".0f"), _cell(p.get("chosen_steps"), 1.0, ".2f"),
                   _cell(p.get("rejected_steps"), 1.0, ".2f"),
                   *[_cell((p.get("answer_tokens") or {}).get(t), 1.0, ".1f") for t in tasks],
                   *[_cell((p.get("run_on") or {}).get(t), 100.0, ".0f") for t in tasks],
                   *[_cell((p.get("first_answer_accuracy") or {}).get(t), 100.0) for t in tasks]]
                  for g in iterate for p in g["points"]]
        if any(c != "-" for r in s_rows for c in r[3:]):
            parts += ["## Pairs and answers", "",
                      "Where the pairs branch (pair depth: steps already in the prompt; at root: pairs whose prompt is "
                      "the question alone), how many steps their chosen and rejected sides have, and how long the "
                      "evaluated policy's answers are (generated tokens per evaluation problem) and how many of them "
                      "run on (%): go on after the line that first states their answer, where the search's terminal "
                      "step ends (the grader takes the last answer stated). At first answer: the accuracy had each "
                      "answer been graded at that line, what run-ons cost or gained. A source whose chosen sides are "
                      "longer than its rejected ones teaches longer answers.",
                      "", _table(["group", "seeds", "point", "pair depth", "at root (%)", "chosen steps",
                                  "rejected steps", *[f"{t} tok/answer" for t in tasks],
                                  *[f"{t} run-on (%)" for t in tasks],
                                  *[f"{t} at first answer" for t in tasks]], s_rows), ""]
    evaluate = [g for g in summary["groups"] if g["kind"] == "evaluate"]
    if evaluate:
        head = ["group", "seeds", "task", "mode", "k", "simulations", "accuracy", "train FLOPs", "inference FLOPs"]
        rows = [[g["label"], ",".join(map(str, g["seeds"])), e["task"], e["mode"], str(e["k"] or "-"),
                 str(e["simulations"] or "-"), _cell(e["accuracy"], 100.0),
                 _cell(e["train_flops"], 1.0, ".3g") if e["train_flops"] else ("0" if e["train_flops"] is not None else "unknown"),
                 _cell(e["inference_flops"], 1.0, ".3g")]
                for g in evaluate for e in [g["evaluation"]]]
        parts += ["## Inference-time runs (evaluate.py)", "", _table(head, rows), ""]
    if summary.get("paired"):
        rows = [[f"{d['other']} − {d['base']}", d["point"], d["task"], ",".join(map(str, d["seeds"])), str(d["problems"]),
                 f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]",
                 ", ".join(f"{100 * x:+.0f}" for x in d["per_seed"]), f"{d['other_only']} / {d['base_only']}"]
                for d in summary["paired"]]
        parts += ["## Paired differences", "",
                  "Accuracy of one group minus another's on the same evaluation problems, for the seeds both ran "
                  "(points; each problem's difference averaged over the seeds, 95% interval over problems). "
                  "Comparing the same problems cancels their difficulty, so these intervals are much narrower than "
                  "the per-group bands above; they do not cover training-seed spread beyond the seeds shown "
                  "('per seed'). 'right only in': (seed, problem) cases answered right by the first / by the second "
                  "group only.", "",
                  _table(["difference", "point", "task", "seeds", "problems", "difference (pts)", "per seed",
                          "right only in first / second"], rows), ""]
    c = summary["checks"]
    lines = []
    if c["search_tokens_per_problem"]:
        lines.append("Generated search tokens per problem: " + "; ".join(
            f"{k}: {v:.0f}" for k, v in c["search_tokens_per_problem"].items())
            + (f" (max/min {c['token_ratio_max_min']:.2f})" if c["token_ratio_max_min"] else ""))
    for rnd, s in c["pairs_per_round"].items():
        if s["runs"] < 2:
            continue
        verdict = "the same pairs" if s["distinct_pair_sets"] == 1 else f"{s['distinct_pair_sets']} different pair sets"
        lines.append(f"{rnd}: {s['runs']} runs trained on {verdict}")
    if lines:
        parts += ["## Checks", "", *[f"- {x}" for x in lines], ""]
    if plots:
        parts += ["## Plots", "", *[f"- {p.name}" for p in plots], ""]
    return "\n".join(parts)


# --- plots -------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(plt, count: int, width: float = 5.0, height: float = 3.8, columns: int = 4):
    """`count` panels in rows of at most `columns`; unused cells hidden."""
    cols = min(count, columns)
    rows = math.ceil(count / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained")
    axes = [ax for row in grid for ax in row]
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _save(fig, plt, path: Path, *, legend: bool = False) -> Path:
    """Save (one legend for the figure below the panels when `legend`) and close."""
    if legend:
        handles, labels = {}, []
        for ax in fig.axes:
            for h, label in zip(*ax.get_legend_handles_labels()):
                if label not in handles:
                    handles[label] = h
                    labels.append(label)
        if labels:
            ncol = 1 if max(map(len, labels)) > 60 else 2
            width, height = fig.get_size_inches()  # room for the legend rows below the panels
            fig.set_size_inches(width, height + 0.16 * math.ceil(len(labels) / ncol) * (1 + max(map(len, labels)) // 150))
            fig.legend([handles[x] for x in labels], [textwrap.fill(x, 150) for x in labels],
                       loc="outside lower center", fontsize=7, ncol=ncol)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _line(ax, xs, bands: Sequence[Mapping[str, Any]], label: str, scale: float = 100.0) -> None:
    ys = [b["mean"] * scale for b in bands]
    line, = ax.plot(xs, ys, marker="o", label=label)
    ax.fill_between(xs, [b["low"] * scale for b in bands], [b["high"] * scale for b in bands],
                    color=line.get_color(), alpha=0.2, linewidth=0)


def plot_rounds(summary: Mapping[str, Any], path: Path) -> Path | None:
    """(a) Held-out accuracy per round against cumulative FLOPs, one panel per task."""
    groups = [g for g in summary["groups"] if g["kind"] == "iterate"]
    if not groups or not summary["tasks"]:
        return None
    plt = _pyplot()
    fig, axes = _panels(plt, len(summary["tasks"]))
    for ax, task in zip(axes, summary["tasks"]):
        for g in groups:
            pts = [p for p in g["points"] if p["accuracy"].get(task)]
            _line(ax, [p["cumulative_flops"]["mean"] for p in pts], [p["accuracy"][task] for p in pts],
                  f"{g['label']} (n={len(g['seeds'])})")
        ax.set_title(task)
        ax.set_xlabel("cumulative FLOPs (search + train + eval)", fontsize=8)
        ax.set_ylabel("accuracy (%), 95% band")
        ax.grid(alpha=0.3)
    fig.suptitle("Held-out accuracy after each round (first point: initial policy)")
    return _save(fig, plt, path, legend=True)


SEARCH_METRICS = (("pairs_per_tree", "pairs per tree (the run's)", 1.0, None),
                  ("chosen_on_correct_path", "chosen on a correct path (%)", 100.0, None),
                  ("rejected_off_correct_path", "rejected on none (%)", 100.0, None),
                  ("search_tokens_per_problem", "search tokens per problem", 1.0, None),
                  ("q_ranked_pairs_per_tree", "Q-ranked pairs per tree", 1.0, None),
                  ("q_ranked_chosen_good", "Q-ranked: chosen on a correct path (%)", 100.0, None),
                  ("q_ranked_informed", "Q-ranked: at a node with a correct child (%)", 100.0, None),
                  ("q_ranked_informed_chosen_good", "there: chosen on a correct path (%),\ndashed: a random child",
                   100.0, "q_ranked_informed_random"))
"""Panels of PREFIX_search.png: summary key, title, scale, and a key drawn dashed in the same panel
(a baseline). A panel whose values are all equal (e.g. 100% by construction) is left out."""


def search_series(groups: Sequence[Group], summary: Mapping[str, Any]) -> dict[str, list[tuple[float, Mapping[str, Any]]]]:
    """Round 0 of each iterate group that searches, keyed by the values of its other differing keys:
    [(search.simulations, summarized point)]. Groups that do not search (the sampling pair source)
    are left out."""
    series: dict[str, list[tuple[float, Mapping[str, Any]]]] = {}
    for g, s in zip(groups, summary["groups"]):
        if g.kind != "iterate" or "search.simulations" not in g.config:
            continue
        first = next((p for p in s["points"] if p["position"] == 1), None)
        if first is None:
            continue
        rest = ", ".join(f"{k}={short_value(k, v)}" for k, v in g.diff.items() if k != "search.simulations") or "all"
        series.setdefault(rest, []).append((g.config["search.simulations"], first))
    return series


def plot_search(groups: Sequence[Group], summary: Mapping[str, Any], path: Path) -> Path | None:
    """(b) Pair yield and quality of the first round against search.simulations, one line per value of
    the other swept keys (`search_series`)."""
    series = search_series(groups, summary)
    if not series:
        return None

    def values(key: str) -> set[float]:
        return {round(p[key]["mean"], 9) for pts in series.values() for _, p in pts if p.get(key)}

    metrics = [m for m in SEARCH_METRICS if len(values(m[0])) > 1 or (m[3] and len(values(m[3])) > 1)]
    if not metrics:
        return None
    plt = _pyplot()
    fig, axes = _panels(plt, len(metrics), width=4.2)
    for ax, (key, title, scale, baseline) in zip(axes, metrics):
        for label, pts in series.items():
            pts = sorted(((x, p) for x, p in pts if p.get(key)), key=lambda xp: xp[0])
            if pts:
                _line(ax, [x for x, _ in pts], [p[key] for _, p in pts], label, scale)
                if baseline:
                    ax.plot([x for x, _ in pts], [p[baseline]["mean"] * scale if p.get(baseline) else float("nan")
                                                  for _, p in pts], linestyle="--", color=ax.lines[-1].get_color())
        if all(x > 0 for pts in series.values() for x, _ in pts):
            ax.set_xscale("log", base=2)
        ax.set_xlabel("search.simulations")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("Round 0: pairs and pair quality against search budget (constant panels left out)")
    return _save(fig, plt, path, legend=True)


def plot_loss(groups: Sequence[Group], path: Path) -> Path | None:
    """(c) Training loss at each logged step, one panel per group, one line per seed and round."""
    entries = [g for g in groups if g.kind == "iterate"
               and any(p.train and p.train.loss_history for r in g.runs for p in r.points)]
    if not entries:
        return None
    plt = _pyplot()
    fig, axes = _panels(plt, len(entries), width=3.8, height=3.4, columns=LOSS_PANEL_COLUMNS)
    for ax, g in zip(axes, entries):
        for r in g.runs:
            for p in r.points:
                if p.train and p.train.loss_history:
                    ax.plot(range(1, len(p.train.loss_history) + 1), p.train.loss_history, marker=".",
                            label=f"seed {r.config.get('run.seed')}, {p.label}")
        ax.set_title(textwrap.fill(g.label, 45), fontsize=8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(fig, plt, path)


def plot_rewards(groups: Sequence[Group], path: Path) -> Path | None:
    """(c) Reward curves: TRL's reward margin, reward accuracy and chosen/rejected rewards (beta x
    log-ratio to the reference) at every logged step of round 0's training, one panel per curve, one
    line per group (mean over seeds of equal length). Unlike the loss, these mean the same for every
    loss type, so the loss variants share the axes."""
    def series(g: Group, name: str) -> list[float]:
        runs = [getattr(p.train, name) for r in g.runs for p in r.points
                if p.position == 1 and p.train and getattr(p.train, name)]
        if not runs:
            return []
        n = min(len(h) for h in runs)
        return [sum(h[i] for h in runs) / len(runs) for i in range(n)]

    entries = [g for g in groups if g.kind == "iterate" and series(g, "margin_history")]
    if not entries:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(REWARD_CURVES), figsize=(3.6 * len(REWARD_CURVES), 3.4), squeeze=False,
                             layout="constrained")
    for ax, (name, title) in zip(axes[0], REWARD_CURVES):
        for g in entries:
            ys = series(g, name)
            ax.plot(range(1, len(ys) + 1), ys, marker=".", label=g.label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("logged step (round 0)")
        ax.grid(alpha=0.3)
    fig.suptitle("Reward curves per group (beta x log-ratio to the reference; mean over seeds)")
    return _save(fig, plt, path, legend=True)


def plot_loss_summary(summary: Mapping[str, Any], path: Path) -> Path | None:
    """(c) Per group (horizontal bars, 95% bands): the last round's final reward margin and reward
    accuracy, and held-out accuracy after the last round."""
    groups = [g for g in summary["groups"] if g["kind"] == "iterate" and len(g["points"]) > 1]
    if not groups:
        return None
    metrics = [("train_reward_margin", "reward margin (final)", 1.0), ("train_reward_accuracy", "reward accuracy (final)", 1.0)]
    metrics += [(f"accuracy:{t}", f"{t} accuracy (%)", 100.0) for t in summary["tasks"]]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 3, 0.45 * len(groups) + 1.5),
                             sharey=True, squeeze=False, layout="constrained")
    ys = list(range(len(groups)))
    for ax, (key, title, scale) in zip(axes[0], metrics):
        last = [g["points"][-1] for g in groups]
        bands = [p["accuracy"].get(key.split(":", 1)[1]) if key.startswith("accuracy:") else p.get(key) for p in last]
        means = [b["mean"] * scale if b else float("nan") for b in bands]
        err = [[(b["mean"] - b["low"]) * scale if b else 0.0 for b in bands],
               [(b["high"] - b["mean"]) * scale if b else 0.0 for b in bands]]
        ax.barh(ys, means, xerr=err, capsize=3, color="tab:blue", alpha=0.7)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(ys, [g["label"] for g in groups], fontsize=7)
    axes[0][0].invert_yaxis()
    return _save(fig, plt, path)


def compare_series(groups: Sequence[Group], task: str) -> list[tuple[str, list[tuple[float, Band, int | None]]]]:
    """(d)'s lines for one task, as (label, [(x, accuracy band, k)]): each iterate group's points (initial,
    after each round) at x = training FLOPs of the policy + its evaluation's inference FLOPs, means over
    seeds; evaluate.py groups joined into one line per (model, mode), ordered by x."""
    lines: list[tuple[str, list[tuple[float, Band, int | None]]]] = []
    for g in groups:
        if g.kind != "iterate":
            continue
        pts = []
        for pos in sorted({p.position for r in g.runs for p in r.points}):
            found = [(training_flops_at(r)[p.position] + p.evals[task].flops, p.evals[task])
                     for r in g.runs for p in r.points if p.position == pos and task in p.evals]
            if found:
                pts.append((mean_band([x for x, _ in found]).mean, accuracy_band([e for _, e in found]), None))
        lines.append((f"{g.label}: rounds ({g.config.get('eval.mode', 'greedy')})", pts))
    merged: dict[str, list[tuple[float, Band, int | None]]] = {}
    for g in groups:
        evals = [(r.train_flops + e.flops, e) for r in g.runs if r.train_flops is not None
                 for e in r.evals if e.task == task] if g.kind == "evaluate" else []
        if not evals:
            continue
        path = g.config.get("model.path")
        model = short_value("model.path", path) if path else f"base {g.config.get('model.name', '')}".strip()
        mode = evals[0][1].mode
        k = evals[0][1].k if mode == "sampling" else g.config.get("search.simulations") if mode == "mcts" else None
        merged.setdefault(f"{model}: {mode}", []).append(
            (mean_band([x for x, _ in evals]).mean, accuracy_band([e for _, e in evals]), k))
    lines += [(name, sorted(pts, key=lambda p: p[0])) for name, pts in merged.items()]
    return lines


def plot_compare(groups: Sequence[Group], tasks: Sequence[str], path: Path) -> Path | None:
    """(d) Accuracy against total FLOPs (training + inference), log x, one panel per task; sampling
    points are marked with k, MCTS points with the simulations."""
    if not any(g.kind == "evaluate" for g in groups):
        return None
    tasks = [t for t in tasks if any(pts for _, pts in compare_series(groups, t))]
    plt = _pyplot()
    fig, axes = _panels(plt, max(1, len(tasks)))
    for ax, task in zip(axes, tasks):
        for label, pts in compare_series(groups, task):
            if not pts:
                continue
            _line(ax, [x for x, _, _ in pts], [asdict(b) for _, b, _ in pts], label)
            for x, b, k in pts:
                if k:
                    ax.annotate(str(k), (x, 100 * b.mean), fontsize=6, textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("training + inference FLOPs")
        ax.set_ylabel("accuracy (%), 95% band")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("Accuracy against training + inference compute (numbers: k or simulations)")
    return _save(fig, plt, path, legend=True)


def wanted(kind: str, groups: Sequence[Group]) -> list[str]:
    """Which plots to draw: the one asked for, or (auto) every one the runs support."""
    if kind != "auto":
        return [kind]
    keys = {k for g in groups if g.kind == "iterate" for k in g.diff}
    out = ["rounds"] if any(g.kind == "iterate" for g in groups) else []
    if keys & set(SEARCH_KEYS):
        out.append("search")
    if keys & set(LOSS_KEYS):
        out.append("loss")
    if any(g.kind == "evaluate" for g in groups):
        out.append("compare")
    return out


def draw(kinds: Sequence[str], groups: Sequence[Group], summary: Mapping[str, Any], prefix: Path) -> list[Path]:
    makers: dict[str, list[Callable[[], Path | None]]] = {
        "rounds": [lambda: plot_rounds(summary, Path(f"{prefix}_rounds.png"))],
        "search": [lambda: plot_search(groups, summary, Path(f"{prefix}_search.png"))],
        "loss": [lambda: plot_loss(groups, Path(f"{prefix}_loss.png")),
                 lambda: plot_rewards(groups, Path(f"{prefix}_rewards.png")),
                 lambda: plot_loss_summary(summary, Path(f"{prefix}_loss_summary.png"))],
        "compare": [lambda: plot_compare(groups, summary["tasks"], Path(f"{prefix}_compare.png"))],
    }
    plots = []
    for kind in kinds:
        made = [p for p in (make() for make in makers[kind]) if p is not None]
        if not made:
            log.warning("--kind %s: the runs hold nothing to plot for it", kind)
        plots += made
    return plots


def analyze(args: Sequence[str], out: Path, kind: str = "auto", labels: str = "config") -> dict[str, Any]:
    """Load, group, summarize, plot and write PREFIX.md / PREFIX.json; returns the summary. labels:
    "config" (the config keys that differ between groups) or "names" (the runs' names, `name_labels`)."""
    if kind not in KINDS:
        raise AnalysisError(f"--kind {kind}: expected one of {', '.join(KINDS)}")
    if labels not in LABELS:
        raise AnalysisError(f"--labels {labels}: expected one of {', '.join(LABELS)}")
    groups = group_runs(load_runs(args))
    if labels == "names":
        groups = name_labels(groups)
    summary = summarize(groups)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = draw(wanted(kind, groups), groups, summary, out)
    summary["plots"] = [str(p) for p in plots]
    Path(f"{out}.json").write_text(json.dumps(summary, indent=1) + "\n")
    Path(f"{out}.md").write_text(markdown(summary, plots))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories, globs, or folders holding runs")
    parser.add_argument("--out", required=True, type=Path, help="output prefix: writes PREFIX.md, PREFIX.json, PREFIX_*.png")
    parser.add_argument("--kind", default="auto", choices=KINDS, help="which plot (auto: every one that applies)")
    parser.add_argument("--labels", default="config", choices=LABELS,
                        help="group labels: the config keys that differ (config) or the runs' names without the seed (names)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = analyze(args.runs, args.out, args.kind, args.labels)
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = sum(len(g["runs"]) for g in summary["groups"])
    print(f"{runs} runs in {len(summary['groups'])} groups -> {args.out}.md, {args.out}.json"
          + "".join(f", {Path(p).name}" for p in summary["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
