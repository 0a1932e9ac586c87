"""A learned value model: a scalar head on a copy of the policy, trained from the trees' outcomes.

The model is a Hugging Face sequence-classification model with one label (the form reward models
take: transformers reads the score at the last non-padding token, which here is the end of the
partial solution being valued; vLLM's pooling runner serves the same folder). Its input is the text
the policy continues from (`PromptFormatter.solution_prompt`), so the value of a step is read where
the step ends. sigmoid(score) is the estimated chance that a solution through the step is correct.

Training data: `mcts.value_data` (targets at nodes, sibling pairs). Losses come from `LOSSES`, a table
keyed by `value.loss`, each a point loss on targets or a pair loss on sibling pairs:

- `mse`: (sigmoid(r) - y)^2, regression on the target (AlphaMath's value head trains on MCTS Q).
- `bce`: binary cross-entropy with soft labels y (Math-Shepherd's soft estimation).
- `bt`: Bradley-Terry, -log sigmoid(r_chosen - r_rejected) (rStar-Math's process preference model).
- `bt_dr`: Eurus's reward-model objective, BT plus direct terms that push the chosen reward up and
  the rejected one down: -log sigmoid(r_c - r_r) - log sigmoid(r_c) - log sigmoid(-r_r).

`train_value` runs in this process; `train_value_subprocess` in a fresh one (as DPO: a process that
ran an inference engine should not also train).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from harness.console import FILE_ONLY
from harness.rundir import publish_dir, write_json_atomic
from mcts.jsonl import read_jsonl
from mcts.value_data import ValueDataConfig
from mcts.types import EvalRequest, Evaluation

log = logging.getLogger(__name__)

RESULT_FILE = "value_result.json"  # in the saved folder: the training figures (ValueTrainResult)


@dataclass(frozen=True)
class ValueTrainConfig:
    """The value model's training settings (conf/value/*.yaml sets them; see docs/configuration.md)."""

    loss: tuple[str, ...] = ("bce", "bt")  # names in LOSSES, summed with loss_weights (ours)
    loss_weights: tuple[float, ...] | None = None  # one weight per loss; None: 1 each (ours)
    learning_rate: float = 2e-5  # AdamW step size (ours; rStar-Math's PPM trains at 7e-6 on 7B)
    epochs: int = 2  # passes over the round's examples and pairs (ours)
    batch_size: int = 8  # items (examples and pairs) per optimizer step (ours)
    micro_batch: int = 2  # items per forward; gradients accumulate over the step (memory only, ours)
    max_length: int = 768  # tokens per text; longer ones keep their end, where the value is read (ours)
    weight_decay: float = 0.0  # AdamW weight decay (ours)
    seed: int = 0  # data order and head initialisation (ours)
    dtype: str = "float32"  # weights' dtype while training (ours: bf16 master weights lose small steps)
    device: str = "auto"  # cpu | cuda | auto (cuda when available)
    threads: int = 0  # torch intra-op threads; 0: torch's default (ours)


BACKBONES = ("policy",)
"""value.backbone names; anything else is a Hugging Face folder to start from."""


@dataclass(frozen=True)
class ValueConfig:
    """The `value` group (conf/value/default.yaml): whether and how each round trains a value model."""

    enabled: bool = False  # train a value model after each round's search (issue 18; ours: off by default)
    backbone: str = "policy"  # policy: a copy of the policy that searched the round (rStar-Math's PPM) | a HF folder
    rounds_of_data: int = 1  # trees of this round and the rounds_of_data - 1 before it (ours)
    before_model: str = "none"  # search.value=model before any value model exists (round 0): none | self_eval
    search_batch: int = 16  # partial solutions per forward when the search asks the model (ours)
    device: str = "auto"  # where the search runs the model with engine=hf: cpu | cuda | auto
    engine: str = "auto"  # what runs it in the search: hf | vllm (pooling runner) | auto: vllm on a CUDA GPU (ours)
    data: ValueDataConfig = field(default_factory=ValueDataConfig)  # targets and pairs (mcts/value_data.py)
    train: ValueTrainConfig = field(default_factory=ValueTrainConfig)  # losses and optimizer

    def __post_init__(self):
        if self.rounds_of_data < 1:
            raise ValueError(f"value.rounds_of_data={self.rounds_of_data}: must be >= 1")
        if self.engine not in ENGINES:
            raise ValueError(f"value.engine={self.engine!r}: expected one of {', '.join(ENGINES)}")
        if self.before_model not in ("none", "self_eval"):
            raise ValueError(f"value.before_model={self.before_model!r}: expected none or self_eval")
        check_losses(self.train)


@dataclass(frozen=True)
class ValueTrainResult:
    examples: int
    pairs: int
    steps: int
    final_loss: float
    loss_history: tuple[float, ...]
    pair_accuracy: float | None  # share of training pairs the trained model orders correctly
    seconds: float
    model: str
    tokens: int = 0  # tokens the model processed in training, summed over epochs (the FLOP ledger's input)


def _point_mse(score, target):
    import torch

    return (torch.sigmoid(score) - target) ** 2


def _point_bce(score, target):
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(score, target, reduction="none")


def _pair_bt(chosen, rejected):
    import torch.nn.functional as F

    return -F.logsigmoid(chosen - rejected)


def _pair_bt_dr(chosen, rejected):
    import torch.nn.functional as F

    return -F.logsigmoid(chosen - rejected) - F.logsigmoid(chosen) - F.logsigmoid(-rejected)


LOSSES: dict[str, tuple[str, Callable]] = {
    "mse": ("point", _point_mse),
    "bce": ("point", _point_bce),
    "bt": ("pair", _pair_bt),
    "bt_dr": ("pair", _pair_bt_dr),
}
"""value.loss name -> (what it reads: "point" targets or "pair"s, per-item loss of raw scores)."""


def check_losses(cfg: ValueTrainConfig) -> None:
    unknown = [name for name in cfg.loss if name not in LOSSES]
    if unknown or not cfg.loss:
        raise ValueError(f"value.loss: unknown or empty {list(cfg.loss)}; choose from {sorted(LOSSES)}")
    if cfg.loss_weights is not None and len(cfg.loss_weights) != len(cfg.loss):
        raise ValueError(f"value.loss_weights has {len(cfg.loss_weights)} weights for {len(cfg.loss)} losses")


def config_from_dict(d: dict[str, Any]) -> ValueTrainConfig:
    names = {f.name for f in fields(ValueTrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown value training key(s) {unknown}; known: {sorted(names)}")
    d = dict(d)
    for key in ("loss", "loss_weights"):
        if d.get(key) is not None:
            d[key] = tuple(d[key])
    return ValueTrainConfig(**d)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_value_model(path: str | Path, *, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) from a folder: a saved value model, or a causal LM (the policy), whose copy gets
    a freshly initialised scalar head (transformers logs which weights are new)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"  # keep the end of the text: the value is read there
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=getattr(torch, dtype),
                                                               attn_implementation="sdpa")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


@dataclass(frozen=True)
class Scored:
    """What `score_texts` returns: raw scores (logits), a 1-d tensor in the texts' order, and each text's
    token count after truncation (what the model processed: the FLOP ledger's input)."""

    scores: Any
    tokens: tuple[int, ...]


def _padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> dict[str, Any]:
    """input_ids and attention_mask of token rows padded on the right, as the tokenizer pads them."""
    import torch

    ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def score_texts(model, tokenizer, texts: Sequence[str], *, max_length: int, batch_size: int = 16,
                grad: bool = False, by_length: bool = False) -> Scored:
    """Raw scores for `texts`, `batch_size` texts per forward, each tokenized once. The score is read at
    each text's last token (right padding; transformers finds the last non-pad token). `by_length` sorts
    the texts by token count before batching (less padding; scores come back in the texts' order)."""
    import torch

    if not texts:
        return Scored(torch.zeros(0), ())
    rows = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i])) if by_length else list(range(len(rows)))
    device = next(model.parameters()).device
    out = []
    with torch.enable_grad() if grad else torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = _padded([rows[i] for i in order[start:start + batch_size]], tokenizer.pad_token_id, device)
            out.append(model(**batch).logits[:, 0].float())
    scores = torch.cat(out)
    if by_length:
        scores = scores[torch.argsort(torch.tensor(order, device=scores.device))]
    return Scored(scores, tuple(len(r) for r in rows))


def _batches(items: list, batch_size: int, rng: random.Random) -> list[list]:
    order = items[:]
    rng.shuffle(order)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def train_value(examples: Sequence[tuple[str, float]], pairs: Sequence[tuple[str, str]], *, base_path: str,
                out_dir: str, cfg: ValueTrainConfig) -> ValueTrainResult:
    """Train a value model on `examples` ((text, target in [0, 1])) and `pairs` ((chosen text, rejected
    text)) starting from `base_path` (the policy: a new head; or an earlier value model), and save it to
    `out_dir` atomically (model, tokenizer, value_result.json)."""
    import torch

    check_losses(cfg)
    point = [(n, w) for n, w in zip(cfg.loss, cfg.loss_weights or [1.0] * len(cfg.loss)) if LOSSES[n][0] == "point"]
    pair = [(n, w) for n, w in zip(cfg.loss, cfg.loss_weights or [1.0] * len(cfg.loss)) if LOSSES[n][0] == "pair"]
    items = ([("point", e) for e in examples] if point else []) + ([("pair", p) for p in pairs] if pair else [])
    if not items:
        raise ValueError(f"value model: nothing to train on ({len(examples)} examples, {len(pairs)} pairs for "
                         f"losses {list(cfg.loss)})")
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_value_model(base_path, dtype=cfg.dtype, device=_device(cfg.device))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    history = []
    tokens = 0  # counted from the training forwards (the FLOP ledger's input)
    per_batch = max(1, cfg.batch_size)
    from tqdm.auto import tqdm

    with tqdm(total=cfg.epochs * math.ceil(len(items) / per_batch), desc="value", unit="step", leave=False) as bar:
        for _ in range(cfg.epochs):
            for batch in _batches(items, per_batch, rng):
                optimizer.zero_grad()
                loss, seen = _accumulate(model, tokenizer, batch, point, pair, cfg)
                tokens += seen
                optimizer.step()
                history.append(loss)
                log.info("value step %d: loss %.4f", len(history), history[-1], extra=FILE_ONLY)
                bar.set_postfix(loss=f"{history[-1]:.4f}", refresh=False)
                bar.update(1)
    model.eval()
    accuracy = None
    if pairs:
        chosen = score_texts(model, tokenizer, [c for c, _ in pairs], max_length=cfg.max_length, by_length=True)
        rejected = score_texts(model, tokenizer, [r for _, r in pairs], max_length=cfg.max_length, by_length=True)
        accuracy = float((chosen.scores > rejected.scores).float().mean())
    last = history[-max(1, math.ceil(len(history) / max(cfg.epochs, 1))):]
    result = ValueTrainResult(examples=len(examples), pairs=len(pairs), steps=len(history),
                              final_loss=sum(last) / len(last), loss_history=tuple(history), pair_accuracy=accuracy,
                              seconds=time.time() - started, model=str(out_dir), tokens=tokens)
    _save(model, tokenizer, Path(out_dir), result)
    return result


def _accumulate(model, tokenizer, batch, point, pair, cfg: ValueTrainConfig) -> tuple[float, int]:
    """Backpropagate one optimizer step's weighted losses in micro-batches of `cfg.micro_batch` items
    (an example, or a pair with its two sides): point losses are means over the step's examples, pair
    losses over its pairs, so the gradient is the full batch's whatever the micro-batch. Returns the loss
    and the tokens the forwards processed."""
    n_point = sum(kind == "point" for kind, _ in batch)
    n_pair = len(batch) - n_point
    total, tokens = 0.0, 0
    for start in range(0, len(batch), max(1, cfg.micro_batch)):
        loss, seen = _chunk_loss(model, tokenizer, batch[start:start + max(1, cfg.micro_batch)], point, pair, cfg,
                                 n_point, n_pair)
        loss.backward()
        total += float(loss.detach())
        tokens += seen
    return total, tokens


def _chunk_loss(model, tokenizer, chunk, point, pair, cfg: ValueTrainConfig, n_point: int, n_pair: int):
    """The weighted losses of a micro-batch, summed per item and divided by the step's item counts (both
    sides of every pair scored in the same forward as the examples), and the tokens of that forward."""
    import torch

    examples = [e for kind, e in chunk if kind == "point"]
    pairs = [p for kind, p in chunk if kind == "pair"]
    texts = [t for t, _ in examples] + [c for c, _ in pairs] + [r for _, r in pairs]
    scored = score_texts(model, tokenizer, texts, max_length=cfg.max_length, batch_size=len(texts), grad=True)
    scores = scored.scores
    total = scores.new_zeros(())
    if examples:
        target = torch.tensor([y for _, y in examples], dtype=scores.dtype, device=scores.device)
        for name, weight in point:
            total = total + weight * LOSSES[name][1](scores[:len(examples)], target).sum() / n_point
    if pairs:
        chosen = scores[len(examples):len(examples) + len(pairs)]
        rejected = scores[len(examples) + len(pairs):]
        for name, weight in pair:
            total = total + weight * LOSSES[name][1](chosen, rejected).sum() / n_pair
    return total, sum(scored.tokens)


def _save(model, tokenizer, out: Path, result: ValueTrainResult) -> None:
    with publish_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / RESULT_FILE, asdict(result))


def value_complete(path: str | Path) -> bool:
    """Whether `path` holds a finished value model (its result file is written last)."""
    return (Path(path) / RESULT_FILE).is_file() and (Path(path) / "config.json").is_file()


def read_result(path: str | Path) -> ValueTrainResult:
    d = json.loads((Path(path) / RESULT_FILE).read_text(encoding="utf-8"))
    d["loss_history"] = tuple(d["loss_history"])
    return ValueTrainResult(**d)


# --- the fresh process -----------------------------------------------------------------------------


def train_value_subprocess(examples: Sequence[tuple[str, float]], pairs: Sequence[tuple[str, str]], *,
                           base_path: str, out_dir: str, cfg: ValueTrainConfig) -> ValueTrainResult:
    """`train_value` in a fresh Python process (`python -m policy.value_model job.json`). Raises
    RuntimeError with the end of the child's output if it fails; `out_dir` is then left as it was."""
    from policy.dpo import _child_env, _run_streaming

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    job = Path(tempfile.mkdtemp(prefix=f".{out.name}.job-", dir=out.parent))
    try:
        rows = [{"kind": "point", "text": t, "target": y} for t, y in examples]
        rows += [{"kind": "pair", "chosen": c, "rejected": r} for c, r in pairs]
        (job / "data.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                        encoding="utf-8")
        write_json_atomic(job / "job.json", {"data": str(job / "data.jsonl"), "base_path": str(base_path),
                                             "out_dir": str(out), "cfg": asdict(cfg)})
        log.info("value model on %d examples and %d pairs in a fresh process -> %s", len(examples), len(pairs), out,
                 extra=FILE_ONLY)
        code, tail = _run_streaming([sys.executable, "-m", "policy.value_model", str(job / "job.json")],
                                    _child_env())
        if code != 0:
            raise RuntimeError(f"value model training failed (exit code {code}); the end of its output:\n"
                               + "\n".join(tail))
        return read_result(out)
    finally:
        shutil.rmtree(job, ignore_errors=True)


def run_job(job_path: str) -> ValueTrainResult:
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    rows = read_jsonl(job["data"])
    examples = [(r["text"], float(r["target"])) for r in rows if r["kind"] == "point"]
    pairs = [(r["chosen"], r["rejected"]) for r in rows if r["kind"] == "pair"]
    return train_value(examples, pairs, base_path=job["base_path"], out_dir=job["out_dir"],
                       cfg=config_from_dict(job["cfg"]))


# --- used by the search ----------------------------------------------------------------------------


class ValueModelEvaluator:
    """The search's Evaluator backed by a trained value model (holds the model, so it is a class): a call
    scores its requests in forwards of `batch_size` texts sorted by length, score = sigmoid(value) of the
    partial solution's text."""

    def __init__(self, path: str | Path, prompt_text: Callable[[Any, tuple[str, ...]], str], *,
                 device: str = "auto", max_length: int = 768, batch_size: int = 16):
        self.model, self.tokenizer = load_value_model(path, device=_device(device))
        self.model.eval()
        self.prompt_text = prompt_text
        self.max_length = max_length
        self.batch_size = batch_size

    def evaluate(self, requests: Sequence[EvalRequest]) -> list[Evaluation]:
        import torch

        texts = [self.prompt_text(r.problem, tuple(r.steps)) for r in requests]
        if not texts:
            return []
        scored = score_texts(self.model, self.tokenizer, texts, max_length=self.max_length, batch_size=self.batch_size,
                             by_length=True)
        return [Evaluation(score=float(s), prompt_tokens=n)
                for s, n in zip(torch.sigmoid(scored.scores).tolist(), scored.tokens)]

    def close(self) -> None:
        self.model = None


class VLLMValueEvaluator:
    """The same Evaluator served by vLLM's pooling runner (`LLM(runner="pooling").classify`: sigmoid of
    the last token's score, with prefix caching, so the shared prompt of a tree's nodes is computed
    once). Holds its own engine next to the generation engine; `close()` frees it."""

    def __init__(self, path: str | Path, prompt_text: Callable[[Any, tuple[str, ...]], str], cfg):
        from policy.backends.vllm import VLLMBackend

        class _PoolingBackend(VLLMBackend):
            def _engine_args(self, model_path: str) -> dict[str, Any]:
                args = super()._engine_args(model_path)
                for key in ("max_logprobs", "logprobs_mode"):
                    args.pop(key, None)
                return {**args, "runner": "pooling"}

        self.backend = _PoolingBackend(str(path), cfg)
        self.prompt_text = prompt_text

    def evaluate(self, requests: Sequence[EvalRequest]) -> list[Evaluation]:
        texts = [self.prompt_text(r.problem, tuple(r.steps)) for r in requests]
        if not texts:
            return []
        outputs = self.backend.llm.classify(texts, use_tqdm=False)
        return [Evaluation(score=float(o.outputs.probs[0]), prompt_tokens=len(o.prompt_token_ids),
                           cached_tokens=int(o.num_cached_tokens or 0)) for o in outputs]

    def close(self) -> None:
        self.backend.close()


ENGINES = ("auto", "hf", "vllm")
"""value.engine: what runs the value model in the search (auto: vLLM on a CUDA GPU, else transformers)."""


def make_value_evaluator(path: str | Path, prompt_text: Callable[[Any, tuple[str, ...]], str], *, engine: str,
                         device: str, max_length: int, batch_size: int, backend_cfg=None):
    """The search's value Evaluator for the model at `path`: transformers in this process ("hf"), or a
    vLLM pooling engine ("vllm", configured like the generation backend `backend_cfg`)."""
    if engine not in ENGINES:
        raise ValueError(f"value.engine={engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "auto":
        import importlib.util

        import torch

        engine = "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"
    if engine == "vllm":
        if backend_cfg is None:
            raise ValueError("value.engine=vllm needs the backend settings to start its engine")
        return VLLMValueEvaluator(path, prompt_text, backend_cfg)
    return ValueModelEvaluator(path, prompt_text, device=device, max_length=max_length, batch_size=batch_size)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m policy.value_model <job.json>", file=sys.stderr)
        return 2
    from harness.console import quiet_console

    quiet_console()
    run_job(args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
