"""DPO on preference pairs, through TRL: pairs -> a trained Hugging Face checkpoint. The one module
that imports trl (lazily: importing this module for its config stays cheap).

    result = train_dpo_subprocess(pairs, policy_path=p, ref_path=r, out_dir=d, cfg=TrainConfig())

Pairs are dicts in TRL's column names (`prompt`, `chosen`, `rejected`; the prompt is already
chat-formatted, so no template is applied) plus metadata (mcts/pairs.py): `chosen_visits` and
`rejected_visits` drive the conservative smoothing, `chosen_terminal`/`rejected_terminal` decide
where an end-of-sequence token is trained (`TrainConfig.eos`); other keys are ignored.

Conservative DPO. MCTS-DPO (Xie et al. 2024) smooths the preference labels of step-level pairs with
the search's visit statistics: a pair whose rejected step was visited about as often as its chosen
step is a less certain preference. Per pair, epsilon = N_r / (N_c + N_r), capped (see
`conservative_smoothing`), and the sigmoid DPO loss becomes the cDPO loss (Mitchell 2023, the form
older TRL applied for one scalar `label_smoothing`):

    loss_i = -(1 - eps_i) * logsigmoid(x_i) - eps_i * logsigmoid(-x_i),   x_i = beta * delta_i

with delta_i = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)). Since logsigmoid(x) -
logsigmoid(-x) = x, this is exactly TRL's sigmoid loss plus eps_i * x_i (`smoothing_correction`).
TRL 1.16 has only a scalar `label_smoothing` (and its sigmoid loss ignores it), so
`ConservativeDPOTrainer` adds the correction: the pairs carry a `label_smoothing` column through the
collator into the batch; the trainer reads the policy's per-token log-probabilities from its own
forward (`_ForwardRecorder`) and the reference log-probabilities, precomputed once before training
(`precompute_ref_log_probs`), from the batch. Other loss types are left as TRL computes them; with
several loss types the correction is added with the sigmoid term's weight.

The environment's tokens. A tool-integrated step (tools/format.py) holds programs and their output
blocks; the block after `OUTPUT_OPEN`, up to its closing fence, was written by the environment, not
sampled from the policy. `encode_pairs` flags, per completion token, whether its characters overlap
such a block (a token straddling the boundary counts as the environment's; an appended EOS is the
policy's) into `chosen_env`/`rejected_env` columns, only in runs where some pair has environment
text. `EnvironmentMaskCollator` zeroes TRL's `completion_mask` at those positions, so they count in
neither the policy's nor the reference's log-probabilities (TRL sets their labels to -100 and the
fused LM head gives them log-prob 0) nor in the NLL ("sft") term; they stay in the attention context,
and in the processed token count. The same collator runs TRL's reference precompute (it is passed to
the constructor) and the training batches.

Training runs in a fresh process (`train_dpo_subprocess`, see docs/notes.md "Training on the CPU": DPO
in a process where a vLLM engine ran was 50x slower). The checkpoint is written into a temporary
folder next to `out_dir` and renamed into place only when complete (with `train_result.json` inside),
so `out_dir` either does not exist or holds a whole checkpoint.

Several processes (`train.launcher=torchrun`, `train.processes=N`): the child is started as
`python -m torch.distributed.run --standalone --nproc_per_node N -m policy.train_main job.json`, and
transformers' Trainer wraps the policy in DistributedDataParallel (DDP; on the CPU over gloo). Every
rank trains on its share of each batch (effective batch = batch_size * grad_accum * N); rank 0 alone
writes what is shared (the temporary checkpoint folder and its rename, the result file, INFO log lines),
after checking that the ranks' weights agree; the other ranks log warnings and errors only and wait at
a barrier until rank 0 has saved. The pairs' dataset is a file in the job's `work_dir` (written by rank
0), so that TRL's reference log-prob cache next to it is one file all ranks read (for an in-memory
dataset each process would look for it under a random name of its own). With `shared_prompt` the
policy's forward takes TRL's plain path under DDP (the packed forward would go around DDP's gradient
all-reduce); the reference precompute, which has no gradients, stays packed.

Under accelerate (`train.launcher=accelerate`, `train.accelerate_config=<file>`): the child is started as
`accelerate launch --config_file <file> --num_processes N -m policy.train_main job.json`, and the file's
`distributed_type` names the engine (`ENGINES`): MULTI_GPU is the same DDP as torchrun's (it runs on the
CPU too: accelerate's launcher starts torchrun, and the ranks use gloo), FSDP and DEEPSPEED shard the
parameters (FSDP, ZeRO-3) or the optimizer state (ZeRO-1/2) over the ranks. `accelerate_problem` refuses,
when the config is built, what cannot run anywhere: LoRA with a sharded engine (merging the adapter needs
the whole weights), a precision in the file (train.dtype and train.autocast set it), several machines,
a sharded engine with train.device=cpu. `launch_problem` refuses, before the child starts, what cannot
run on this machine: DeepSpeed not installed, FSDP or DeepSpeed without a CUDA GPU (accelerate 1.16 would
make the ranks plain DDP and drop the plugin; never a silent fall-back, and the trainer checks it runs
the engine asked for: `engine_mismatch`). Under a sharded engine `shared_prompt` is
off (its packed forward reads the LM head's weight outside the module's forward, where FSDP and ZeRO-3
have not gathered it), the ranks' weights are not compared (each holds its own shard), and the
checkpoint is gathered from every rank (accelerate's `get_state_dict`) and written by rank 0.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from harness.console import FILE_ONLY
from harness.rundir import replace_dir
from harness.rundir import write_json_atomic as write_json
from mcts.jsonl import read_jsonl
from policy.models import check_device, resolve_device
from tools.format import output_spans

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# TRL 1.16's loss types (trl/trainer/dpo_config.py), minus "exo_pair": it needs TRL's scalar
# label_smoothing > 0, which this module does not use.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
              "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
SMOOTHED_LOSS = "sigmoid"  # the loss type the per-pair smoothing applies to
REFERENCES = ("initial", "previous")
EOS_MODES = ("terminal", "always", "never")
DTYPES = ("float32", "bfloat16")
LAUNCHERS = ("process", "torchrun", "accelerate")  # how the training child is started (train_command)
# An accelerate config's distributed_type -> the engine that trains (accelerate 1.16's DistributedType names)
ENGINES = {"MULTI_GPU": "ddp", "FSDP": "fsdp", "DEEPSPEED": "deepspeed"}
SHARDED = ("fsdp", "deepspeed")  # engines that split parameters or optimizer state over the ranks
MAX_SMOOTHING = 0.5  # epsilon = 0.5 makes a pair symmetric: no preference left to learn

SMOOTHING_COLUMN = "label_smoothing"  # per-pair epsilon, from the dataset through the collator into the batch
# Per completion token, who wrote it: the columns exist only in runs with environment text (tools/format.py).
ENV_COLUMNS = {"chosen": "chosen_env", "rejected": "rejected_env"}  # in TRL's batch order: chosen, then rejected
POLICY_TOKEN, ENV_TOKEN = 0, 1  # the flags in those columns
RESULT_FILE = "train_result.json"  # inside the checkpoint folder: written last, before the rename
STDERR_TAIL_LINES = 20  # lines of a failed child's stderr quoted in the error
_STDERR_TAIL_BYTES = 64 * 1024  # enough bytes to hold those lines (progress bars rewrite lines with \r)


@dataclass(frozen=True)
class TrainConfig:
    """The `train` config group (conf/train/dpo.yaml says where each default comes from).

    loss_type: TRL loss types (LOSS_TYPES), summed with `loss_weights`; "sigmoid" is DPO.
    loss_weights: one weight per loss type; null = 1.0 each.
    beta: DPO's beta, the strength of the pull towards the reference model.
    learning_rate: AdamW peak learning rate.
    epochs: passes over the round's pairs.
    batch_size: pairs per device (process) per step (each pair is two sequences).
    grad_accum: gradient accumulation steps (effective batch = batch_size * grad_accum * processes).
    max_length: tokens per prompt+completion sequence; longer ones lose their end (TRL keep_start);
        a pair whose prompt alone fills it is dropped.
    warmup_ratio: share of the optimizer steps spent warming up the learning rate (0 <= r < 1).
    lr_scheduler: transformers scheduler name ("cosine", "linear", "constant", ...).
    weight_decay: AdamW weight decay.
    seed: seeds model init (LoRA), data order and dropout; iterate.py derives one per round.
    conservative: per-pair label smoothing from visit counts (conservative DPO, sigmoid loss only).
    smoothing_cap: upper bound of the per-pair epsilon, in [0, 0.5].
    eos: where the tokenizer's end-of-sequence token is appended to a completion: "terminal" = only
        to a side the pair marks as ending the solution (`chosen_terminal`/`rejected_terminal`; a
        step in the middle of a solution must not teach the model to stop), "always" (TRL's
        behaviour, for whole-solution pairs without those flags), "never".
    reference: which model is the DPO reference, "initial" (the round-0 policy) or "previous" (the
        policy being trained this round); read by iterate.py, which passes the matching ref_path.
    lora: train a LoRA adapter instead of all weights; it is merged into the base before saving, so
        the checkpoint is a plain Hugging Face model (vLLM loads it like any other).
    lora_r, lora_alpha, lora_dropout, lora_target_modules: the adapter's rank, scale, dropout and
        target module names. lora_dropout only acts with disable_dropout=false.
    disable_dropout: switch off dropout in the policy (TRL's default; includes LoRA dropout), so
        that the policy and the reference agree exactly before the first step.
    dtype: weights and compute dtype, "float32" (CPU) or "bfloat16" (GPUs: weights and autocast).
    device: "auto" (a CUDA GPU when torch sees one, else the CPU), "cpu" or "cuda"
        (policy.models.resolve_device): where the policy and the reference train; the trainer's
        `use_cpu` follows it.
    autocast: bf16 autocast over float32 weights (mixed precision: matmuls in bf16, optimizer state and
        updates in float32). On a CPU with AVX-512 bf16, a SmolLM2-135M forward+backward on 16 x 270
        tokens took 45 s instead of 74 s (ours, measured); small DPO updates survive, unlike bf16 weights.
    gradient_checkpointing: trade compute for activation memory (large models on GPUs).
    logging_steps: optimizer steps between logged losses (loss_history has one value per log).
    malloc_reuse: run the training process with glibc's malloc keeping freed memory for reuse
        (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_ = 1 TiB; MALLOC_ENV) instead of mapping and
        unmapping every large tensor: on the 2-core CPU machine the kernel's page faults took 60% of
        DPO's CPU time. The peak memory stays held until the process ends. Variables already set in
        the environment win; no effect on GPU compute.
    shared_prompt: run each pair as one sequence, its shared prefix (the prompt) once, chosen and
        rejected behind a block attention mask, and the LM head only at the positions whose log-prob
        the loss reads (policy/shared_prompt.py); the same log-probabilities as TRL's plain path (false:
        every prompt run twice, the head over every position), for fewer positions. Under DDP
        (processes > 1) only the reference precompute is packed (see the module docstring).
    launcher: how the training child starts: "process" (one `python -m policy.train_main` process),
        "torchrun" (`python -m torch.distributed.run --standalone --nproc_per_node <processes>`: DDP,
        gloo on the CPU) or "accelerate" (`accelerate launch --config_file <accelerate_config>
        --num_processes <processes>`; see `train_command`).
    processes: training processes (ranks) on this machine; more than 1 needs launcher=torchrun or
        accelerate. Each rank takes batch_size pairs per step (see `effective_batch`).
    accelerate_config: with launcher=accelerate, the accelerate config file (conf/accelerate/*.yaml;
        a relative path is taken from the project root); its distributed_type picks the engine (ENGINES).
        Checked when the config is built (`accelerate_problem`); null with the other launchers.
    """

    loss_type: tuple[str, ...] = ("sigmoid", "sft")
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    learning_rate: float = 1e-5
    epochs: int = 2
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    warmup_ratio: float = 0.1
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    seed: int = 0
    conservative: bool = True
    smoothing_cap: float = 0.5
    eos: str = "terminal"
    reference: str = "initial"
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    disable_dropout: bool = True
    dtype: str = "float32"
    device: str = "auto"
    autocast: bool = True
    gradient_checkpointing: bool = False
    logging_steps: int = 1
    malloc_reuse: bool = True
    shared_prompt: bool = True
    launcher: str = "process"
    processes: int = 1
    accelerate_config: str | None = None

    def __post_init__(self) -> None:
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        if not self.loss_type or unknown:
            raise ValueError(f"train.loss_type={list(self.loss_type)}: expected one or more of {', '.join(LOSS_TYPES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"train.loss_weights has {len(self.loss_weights)} values for "
                             f"{len(self.loss_type)} loss types: give one weight per loss type (or null)")
        if self.reference not in REFERENCES:
            raise ValueError(f"train.reference={self.reference!r}: expected one of {', '.join(REFERENCES)}")
        if not 0.0 <= self.smoothing_cap <= MAX_SMOOTHING:
            raise ValueError(f"train.smoothing_cap={self.smoothing_cap}: must lie in [0, {MAX_SMOOTHING}]")
        if self.eos not in EOS_MODES:
            raise ValueError(f"train.eos={self.eos!r}: expected one of {', '.join(EOS_MODES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"train.dtype={self.dtype!r}: expected one of {', '.join(DTYPES)}")
        check_device(self.device, "train.device")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"train.launcher={self.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
        if isinstance(self.processes, bool) or not isinstance(self.processes, int) or self.processes < 1:
            raise ValueError(f"train.processes={self.processes!r}: must be an integer >= 1")
        if self.launcher == "process" and self.processes != 1:
            raise ValueError(f"train.processes={self.processes} needs train.launcher=torchrun or accelerate "
                             "(train.launcher=process starts one training process)")
        if (self.launcher == "accelerate") != (self.accelerate_config is not None):
            raise ValueError(f"train.accelerate_config={self.accelerate_config!r} with train.launcher={self.launcher}: "
                             "the file is given with train.launcher=accelerate, and only then")
        if self.launcher == "accelerate":
            problem = accelerate_problem(read_accelerate_config(self.accelerate_config), device=self.device,
                                         lora=self.lora)
            if problem:
                raise ValueError(f"train.accelerate_config={self.accelerate_config!r}: {problem}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"train.warmup_ratio={self.warmup_ratio}: must lie in [0, 1)")
        positive = {"beta": self.beta, "learning_rate": self.learning_rate, "epochs": self.epochs,
                    "batch_size": self.batch_size, "grad_accum": self.grad_accum, "max_length": self.max_length,
                    "logging_steps": self.logging_steps, "lora_r": self.lora_r}
        bad = [f"train.{k}={v}" for k, v in positive.items() if not v > 0]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be positive")

    @property
    def effective_batch(self) -> int:
        """Pairs per optimizer step, over all processes."""
        return self.batch_size * self.grad_accum * self.processes

    @property
    def engine(self) -> str:
        """What trains: "single" (one process), "ddp", "fsdp" or "deepspeed" (ENGINES; reads accelerate_config)."""
        if self.launcher == "accelerate":
            return ENGINES[read_accelerate_config(self.accelerate_config)["distributed_type"]]
        return "ddp" if self.processes > 1 else "single"

    @property
    def smoothing_active(self) -> bool:
        """Whether the per-pair smoothing reaches a loss term (conservative, with a sigmoid term)."""
        return self.conservative and SMOOTHED_LOSS in self.loss_type


def accelerate_config_path(value: str) -> Path:
    """The file `train.accelerate_config` names: absolute, or relative to the project root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def read_accelerate_config(value: str) -> dict[str, Any]:
    """The accelerate config file `value` as a dict; ValueError naming train.accelerate_config when it is
    missing or not a yaml mapping."""
    import yaml

    path = accelerate_config_path(value)
    if not path.is_file():
        raise ValueError(f"train.accelerate_config={value!r}: no such file ({path})")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"train.accelerate_config={value!r}: not an accelerate config (a yaml mapping)")
    return data


def accelerate_problem(spec: dict[str, Any], *, device: str, lora: bool) -> str | None:
    """Why the accelerate config `spec` cannot train, whatever the machine, in one line (None when it can):
    `device` is train.device as set ("auto", "cpu", "cuda"), `lora` is train.lora."""
    kind = spec.get("distributed_type")
    engine = ENGINES.get(str(kind))
    if engine is None:
        return f"distributed_type={kind!r}: expected one of {', '.join(f'{k} ({v})' for k, v in ENGINES.items())}"
    if spec.get("num_machines", 1) != 1:
        return f"num_machines={spec['num_machines']}: train.launcher=accelerate starts processes on this machine only"
    if str(spec.get("mixed_precision", "no")) != "no":
        return (f"mixed_precision={spec['mixed_precision']!r}: set 'no' (train.dtype and train.autocast set the "
                "precision; the file's value would override them)")
    if engine in SHARDED and device == "cpu":
        return f"{kind} with train.device=cpu: {NO_SHARDING_ON_CPU}"
    if engine in SHARDED and lora:
        return f"train.lora under {kind} is not supported: merging the adapter into the checkpoint needs whole weights"
    fsdp = spec.get("fsdp_config") or {}
    if engine == "fsdp" and fsdp.get("fsdp_state_dict_type") != "FULL_STATE_DICT":
        return "fsdp_config.fsdp_state_dict_type must be FULL_STATE_DICT (rank 0 saves the gathered weights)"
    deepspeed = spec.get("deepspeed_config") or {}
    if engine == "deepspeed" and deepspeed.get("zero_stage") == 3 and not deepspeed.get("zero3_save_16bit_model"):
        return "deepspeed_config.zero3_save_16bit_model must be true under ZeRO-3 (rank 0 saves the gathered weights)"
    return None


NO_SHARDING_ON_CPU = ("accelerate 1.16 shards only over CUDA GPUs (on the CPU it runs the ranks as plain DDP and "
                      "drops the plugin); use conf/accelerate/ddp.yaml there")


def launch_problem(spec: dict[str, Any], *, device: str, deepspeed_installed: bool) -> str | None:
    """Why the accelerate config `spec` cannot train on this machine, in one line (None when it can):
    `device` is where training would run ("cpu" or "cuda", resolved). Accelerate 1.16 turns FSDP and
    DeepSpeed ranks into plain DDP on the CPU (state.py: only a GPU-like distributed type becomes FSDP),
    so they are refused there rather than run as something else."""
    kind = spec.get("distributed_type")
    engine = ENGINES.get(str(kind))
    if engine == "deepspeed" and not deepspeed_installed:
        return "DeepSpeed is not installed (pip install deepspeed, on a machine with CUDA GPUs)"
    if engine in SHARDED and device != "cuda":
        return f"{kind} on the CPU (torch sees no CUDA GPU): {NO_SHARDING_ON_CPU}"
    return None


def check_launch(cfg: TrainConfig) -> None:
    """Raise RuntimeError naming train.accelerate_config when its file cannot train on this machine
    (`launch_problem`); nothing to check for the other launchers. Run before the training child starts."""
    import importlib.util

    if cfg.launcher != "accelerate":
        return
    problem = launch_problem(read_accelerate_config(cfg.accelerate_config),
                             device=resolve_device(cfg.device, key="train.device"),
                             deepspeed_installed=importlib.util.find_spec("deepspeed") is not None)
    if problem:
        raise RuntimeError(f"train.accelerate_config={cfg.accelerate_config!r}: {problem}")


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from `asdict(cfg)` read back from JSON (lists become the tuple fields)."""
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class TrainResult:
    """What one DPO run did (train.json; iterate.py logs it).

    final_loss: mean logged loss over the last epoch's steps.
    reward_margin: mean of TRL's `rewards/margins` (beta * delta, chosen minus rejected) over the
        last epoch's steps.
    reward_accuracy: mean of TRL's `rewards/accuracies` (share of pairs with chosen reward above the
        rejected one) over the last epoch's steps.
    steps: optimizer steps.
    pairs: pairs trained on (after dropping those whose prompt fills max_length).
    tokens: tokens processed by the policy, summed over epochs: per pair, prompt+chosen plus
        prompt+rejected (the prompt is run once with each completion), after truncation; this is
        what the FLOP ledger multiplies (harness/compute.py). Under DDP a short last step is filled
        up with pairs from the start (accelerate's even batches); this count leaves them out.
    seconds: wall time of loading, training and saving.
    loss_history: the loss at every logged step.
    mean_smoothing: mean per-pair epsilon that reached the loss (0 when not conservative).
    processes: training processes (DDP ranks); 1 in train.json files from before the field.
    effective_batch: pairs per optimizer step over all processes (batch_size * grad_accum * processes);
        None in train.json files from before the field.
    margin_history, accuracy_history, chosen_history, rejected_history: TRL's `rewards/margins`,
        `rewards/accuracies`, `rewards/chosen` and `rewards/rejected` (beta * log-ratio against the
        reference) at every logged step: the reward curves. Unlike the loss, they have the same
        meaning for every loss type, so loss variants compare on them.
    """

    final_loss: float
    reward_margin: float
    reward_accuracy: float
    steps: int
    pairs: int
    tokens: int
    seconds: float
    loss_history: tuple[float, ...]
    mean_smoothing: float
    margin_history: tuple[float, ...] = ()
    accuracy_history: tuple[float, ...] = ()
    chosen_history: tuple[float, ...] = ()
    rejected_history: tuple[float, ...] = ()
    processes: int = 1
    effective_batch: int | None = None


# TrainResult's per-step histories and the TRL log keys they are read from.
HISTORIES = {"loss_history": "loss", "margin_history": "rewards/margins", "accuracy_history": "rewards/accuracies",
             "chosen_history": "rewards/chosen", "rejected_history": "rewards/rejected"}


def result_from_dict(data: dict[str, Any]) -> TrainResult:
    names = {f.name for f in fields(TrainResult)}
    kwargs = {k: v for k, v in data.items() if k in names}
    for name in HISTORIES.keys() & kwargs.keys():  # loss_history is required; the reward curves are newer
        kwargs[name] = tuple(kwargs[name])
    return TrainResult(**kwargs)


# --- conservative DPO: pure functions -------------------------------------------------------------


def conservative_smoothing(chosen_visits: int, rejected_visits: int, cap: float) -> float:
    """Per-pair label smoothing epsilon = N_r / (N_c + N_r), at most `cap`; 0 when neither side was
    visited. Equal visits give 0.5 (no preference left); a chosen side visited far more often than
    the rejected one gives a confident label (epsilon near 0)."""
    total = chosen_visits + rejected_visits
    if total <= 0:
        return 0.0
    return min(rejected_visits / total, cap)


def smoothing_correction(logits, eps):
    """Per-pair cDPO loss minus the sigmoid DPO loss, for logits x = beta * delta:
    -(1-eps) logsigmoid(x) - eps logsigmoid(-x) = -logsigmoid(x) + eps * x."""
    return eps * logits


# --- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedPairs:
    """Pairs tokenized for TRL (prompt_ids, chosen_ids, rejected_ids [, label_smoothing]
    [, chosen_env, rejected_env] per row).

    dropped: pairs left out (prompt alone fills max_length, or a completion without a token of the
        policy's: empty, or only the environment's output).
    tokens_per_epoch: processed tokens in one pass (see TrainResult.tokens); environment tokens
        included (they are processed, only left out of the log-probabilities).
    mean_smoothing: mean epsilon of the kept rows (0 without the smoothing column).
    env_tokens: completion tokens in one pass that are the environment's (masked), after truncation.
    """

    rows: tuple[dict[str, Any], ...]
    dropped: int
    tokens_per_epoch: int
    mean_smoothing: float
    env_tokens: int = 0


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _wants_eos(pair: dict[str, Any], side: str, mode: str) -> bool:
    return mode == "always" or (mode == "terminal" and bool(pair.get(f"{side}_terminal")))


def environment_flags(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """Per token with character offsets [a, b): ENV_TOKEN when it overlaps an environment span [s, e)
    (a token straddling a span's boundary counts as the environment's), else POLICY_TOKEN."""
    return [ENV_TOKEN if any(a < e and s < b for s, e in spans) else POLICY_TOKEN for a, b in offsets]


def _tokenize_with_flags(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of `text` (no special tokens added) and per token its `environment_flags` against
    the output blocks of `text`. Offsets are only asked for when there is a block."""
    spans = output_spans(text)
    if not spans:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, [POLICY_TOKEN] * len(ids)
    if not tokenizer.is_fast:
        raise ValueError("masking the environment's output blocks needs a fast tokenizer (character offsets)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], environment_flags(enc["offset_mapping"], spans)


def encode_pairs(pairs: Iterable[dict[str, Any]], tokenizer, *, cfg: TrainConfig) -> EncodedPairs:
    """Tokenize pairs as the backends tokenize prompts (no special tokens added: the chat template
    already wrote them). The completion starts where the tokens of prompt and prompt+completion
    diverge (tokens can merge across the boundary), as in TRL. Output blocks are found in the whole
    prompt+completion text (a prompt that ends inside a block, e.g. at `OUTPUT_OPEN`, leaves its end
    to the completion); completion tokens that overlap one are flagged in ENV_COLUMNS, when any is."""
    rows: list[dict[str, Any]] = []
    flags: list[dict[str, list[int]]] = []  # per kept row, per side: the completion's environment flags
    dropped = tokens = 0
    eos = [tokenizer.eos_token_id]

    for pair in pairs:
        prompt = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]
        full, full_env = {}, {}
        for side in ENV_COLUMNS:
            full[side], full_env[side] = _tokenize_with_flags(tokenizer, pair["prompt"] + pair[side])
        cut = min(_common_prefix(prompt, full["chosen"]), _common_prefix(prompt, full["rejected"]))
        ends = {side: _wants_eos(pair, side, cfg.eos) for side in full}
        done = {side: full[side][cut:] + (eos if ends[side] else []) for side in full}
        env = {side: full_env[side][cut:] + ([POLICY_TOKEN] if ends[side] else []) for side in full}
        if cut >= cfg.max_length or not all(POLICY_TOKEN in env[side] for side in env):  # nothing to learn on a side
            dropped += 1
            continue
        flags.append(env)
        row = {"prompt_ids": full["chosen"][:cut], "chosen_ids": done["chosen"], "rejected_ids": done["rejected"]}
        if cfg.smoothing_active:
            # Sampled whole solutions (pairs.source=sampling) are one visit each: visit counts say nothing
            # about them (and 1/1 would give eps 0.5, no gradient at all), so they are not smoothed.
            row[SMOOTHING_COLUMN] = 0.0 if pair.get("source") == "sampling" else conservative_smoothing(
                int(pair.get("chosen_visits", 0)), int(pair.get("rejected_visits", 0)), cfg.smoothing_cap)
        rows.append(row)
        tokens += sum(min(cut + len(done[side]), cfg.max_length) for side in done)
    env_tokens = sum(sum(f[side][:cfg.max_length - len(row["prompt_ids"])]) for row, f in zip(rows, flags)
                     for side in f)  # within max_length (keep_start)
    if any(ENV_TOKEN in f[side] for f in flags for side in f):  # a column is in every row or in none
        rows = [{**row, **{ENV_COLUMNS[side]: f[side] for side in f}} for row, f in zip(rows, flags)]
    smoothing = [r[SMOOTHING_COLUMN] for r in rows if SMOOTHING_COLUMN in r]
    return EncodedPairs(rows=tuple(rows), dropped=dropped, tokens_per_epoch=tokens,
                        mean_smoothing=sum(smoothing) / len(smoothing) if smoothing else 0.0, env_tokens=env_tokens)


@dataclass
class SmoothingCollator:
    """Wraps TRL's preference collator: adds the rows' per-pair epsilon as a float tensor."""

    base: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        if examples and SMOOTHING_COLUMN in examples[0]:
            import torch

            batch[SMOOTHING_COLUMN] = torch.tensor([float(e[SMOOTHING_COLUMN]) for e in examples],
                                                   dtype=torch.float32)
        return batch


def truncated(seq: Sequence[int], max_length: int | None, truncation_mode: str) -> Sequence[int]:
    """`seq` cut to `max_length` as TRL's DataCollatorForPreference cuts prompt+completion."""
    if max_length is None:
        return seq
    if truncation_mode == "keep_start":
        return seq[:max_length]
    if truncation_mode == "keep_end":
        return seq[-max_length:]
    raise ValueError(f"truncation_mode={truncation_mode!r}: expected 'keep_start' or 'keep_end'")


def policy_mask(prompt_len: int, env: Sequence[int], *, max_length: int | None, truncation_mode: str) -> list[int]:
    """Per position of one collated prompt+completion sequence: 0 where the completion token is the
    environment's (position prompt_len + j for flag env[j]), 1 elsewhere; truncated as TRL truncates."""
    return list(truncated([1] * prompt_len + [int(flag == POLICY_TOKEN) for flag in env], max_length,
                          truncation_mode))


@dataclass
class EnvironmentMaskCollator:
    """Wraps TRL's preference collator (`base`, whose `max_length` and `truncation_mode` it follows):
    zeroes `completion_mask` where the rows' ENV_COLUMNS flag a completion token as the environment's.
    Without those columns it returns TRL's batch unchanged."""

    base: Any  # trl.trainer.dpo_trainer.DataCollatorForPreference

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        if not examples or ENV_COLUMNS["chosen"] not in examples[0]:
            return batch
        import torch

        completion_mask = batch["completion_mask"]
        keep = torch.ones_like(completion_mask)  # padding stays 1: completion_mask is 0 there already
        sequences = [(e, side, column) for side, column in ENV_COLUMNS.items() for e in examples]  # chosen, rejected
        for i, (example, side, column) in enumerate(sequences):
            if len(example[column]) != len(example[f"{side}_ids"]):
                raise ValueError(f"{column} has {len(example[column])} flags for {len(example[f'{side}_ids'])} tokens")
            mask = policy_mask(len(example["prompt_ids"]), example[column], max_length=self.base.max_length,
                               truncation_mode=self.base.truncation_mode)
            keep[i, :len(mask)] = torch.tensor(mask, dtype=keep.dtype)
        batch["completion_mask"] = completion_mask * keep
        return batch


# --- the trainer -----------------------------------------------------------------------------------


class _ForwardRecorder:
    """Stands in for the policy model in one `compute_loss` call: forwards every call and keeps the
    output of the fused-LM-head forward (the policy's per-token log-probabilities, with gradients)."""

    def __init__(self, model):
        self.model = model
        self.outputs: list[Any] = []

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        if kwargs.get("fused_lm_head"):
            self.outputs.append(out)
        return out

    @property
    def output(self):
        if len(self.outputs) != 1:
            raise RuntimeError(f"expected one policy forward in DPOTrainer._compute_loss, saw {len(self.outputs)}: "
                               "TRL's loss code changed (this module is written against trl==1.16.0)")
        return self.outputs[0]


@functools.cache
def conservative_trainer_class():
    """`ConservativeDPOTrainer`, built on first use so that importing this module does not import TRL."""
    from trl import DPOTrainer

    class ConservativeDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer, plus per-pair label smoothing (see the module docstring), on datasets
        tokenized by `encode_pairs`. Without the `label_smoothing` column it is stock TRL. The
        environment mask acts through the collator `build_trainer` passes (EnvironmentMaskCollator).
        With `shared_prompt`, the policy's and the reference precompute's fused-LM-head calls go through
        policy.shared_prompt.SharedPromptForward (one pass over each pair's prompt). `engine` is what the
        launcher asked for (TrainConfig.engine): under FSDP or DeepSpeed shared_prompt is off, and a trainer
        that runs another engine than asked is an error."""

        def __init__(self, *args, shared_prompt: bool = False, engine: str = "single", **kwargs):
            from policy.shared_prompt import unsupported_reason

            # Set before TRL's __init__: the reference precompute runs inside it.
            models = [kwargs.get("model"), kwargs.get("ref_model")]
            reasons = [r for m in models if m is not None and not isinstance(m, str) and (r := unsupported_reason(m))]
            sharded = engine in SHARDED
            self.shared_prompt = shared_prompt and not reasons and not sharded
            if shared_prompt and reasons:
                log.warning("train.shared_prompt: %s; the plain path (each prompt run with each side) is used",
                            "; ".join(reasons))
            if shared_prompt and sharded and is_main_rank():
                log.info("train.shared_prompt under %s: off (the packed forward would read the LM head's weight "
                         "where it is not gathered); TRL's plain path is used", engine, extra=FILE_ONLY)
            super().__init__(*args, **kwargs)
            mismatch = engine_mismatch(engine, fsdp=self.is_fsdp_enabled, deepspeed=self.is_deepspeed_enabled)
            if mismatch:
                raise RuntimeError(mismatch)
            if not self.precompute_ref_logps:
                raise ValueError("ConservativeDPOTrainer reads the reference log-probs from the batch: "
                                 "set precompute_ref_log_probs=True")
            # Wrapped after TRL's own set-up (pad token, reference precompute): the column only
            # exists in training batches. It wraps the collator the precompute ran (the environment mask).
            self.data_collator = SmoothingCollator(self.data_collator)
            self.smoothing_weight = sum(w for t, w in zip(self.loss_types, self.loss_weights) if t == SMOOTHED_LOSS)
            # DDP all-reduces the gradients from its own forward; the packed call would go around it.
            self.shared_policy = self.shared_prompt and self.accelerator.num_processes == 1
            if self.shared_prompt and not self.shared_policy and self.accelerator.is_main_process:
                log.info("train.shared_prompt under DDP: the reference precompute is packed, the policy's "
                         "forward takes TRL's plain path", extra=FILE_ONLY)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # tokenized by encode_pairs (its own EOS rule, no special tokens added)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            kept = [c for c in (SMOOTHING_COLUMN, *ENV_COLUMNS.values()) if c not in self._signature_columns]
            self._signature_columns = [*self._signature_columns, *kept]  # through remove_unused_columns

        def _shared(self, model, outputs: tuple[str, ...], *, policy: bool = False):
            """`model`, or with shared_prompt its stand-in that packs each pair (policy/shared_prompt.py);
            for the policy's forward (`policy`) not under DDP."""
            if not (self.shared_policy if policy else self.shared_prompt):
                return model
            from policy.shared_prompt import SharedPromptForward

            return SharedPromptForward(model, outputs=outputs, unwrap=self.accelerator.unwrap_model,
                                       autocast=self.accelerator.autocast)

        def compute_ref_log_probs(self, model, inputs):
            from policy.shared_prompt import REFERENCE_OUTPUTS

            return super().compute_ref_log_probs(self._shared(model, REFERENCE_OUTPUTS), inputs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from policy.shared_prompt import POLICY_OUTPUTS

            inputs = dict(inputs)
            eps = inputs.pop(SMOOTHING_COLUMN, None)
            model = self._shared(model, POLICY_OUTPUTS + (("log_sum_sq_probs",) if self.use_weighting else ()),
                                 policy=True)
            if eps is None or not self.smoothing_weight:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            recorder = _ForwardRecorder(model)
            result = super().compute_loss(recorder, inputs, return_outputs, num_items_in_batch)
            loss, outputs = result if return_outputs else (result, None)
            logits = self.beta * self._delta(recorder.output, inputs)
            loss = loss + self.smoothing_weight * smoothing_correction(logits, eps.to(logits)).mean()
            mode = "train" if self.model.training else "eval"
            self._metrics[mode][SMOOTHING_COLUMN].append(self.accelerator.gather(eps).float().mean().item())
            return (loss, outputs) if return_outputs else loss

        @staticmethod
        def _delta(policy_output, inputs):
            """Per pair (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)), as TRL's loss computes it
            (token log-probs summed over the completion; positions where completion_mask is 0 - prompt,
            padding, the environment's tokens - have label -100, and the fused LM head gives them 0)."""
            seq_len = inputs["completion_mask"].size(1) - 1
            chosen, rejected = policy_output.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)
            return (chosen - inputs["ref_chosen_logps"]) - (rejected - inputs["ref_rejected_logps"])

    return ConservativeDPOTrainer


def engine_mismatch(engine: str, *, fsdp: bool, deepspeed: bool) -> str | None:
    """Why a trainer with FSDP on (`fsdp`) or DeepSpeed on (`deepspeed`) does not run `engine`
    (TrainConfig.engine) in one line, or None when it does."""
    running = "FSDP" if fsdp else "DeepSpeed" if deepspeed else "neither FSDP nor DeepSpeed"
    if (engine == "fsdp") == fsdp and (engine == "deepspeed") == deepspeed:
        return None
    return (f"the training engine should be {engine}, but the trainer runs {running}: accelerate did not set up "
            "what train.accelerate_config asks for")


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def _require_model(path: str, role: str) -> None:
    """Fail with one line when a local-looking path is not a model folder (hub ids pass)."""
    p = Path(path).expanduser()
    if p.exists() or path.startswith(("/", ".", "~")) or path.count("/") != 1:
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{role}={path!r} is not a Hugging Face model folder (no config.json there)")


def _load_model(path: str, cfg: TrainConfig):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype))


def preference_collator(tokenizer, model, args):
    """TRL's preference collator as DPOTrainer.__init__ builds its default (trl 1.16, dpo_trainer.py
    `if data_collator is None`): the pad token falls back to EOS and is mirrored onto the model configs."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length,
                                     truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of)


def dpo_args(cfg: TrainConfig, output_dir: str):
    """TRL's DPOConfig from our TrainConfig (the one place the two vocabularies meet). Under several
    processes on the CPU the process group is gloo's, named (accelerate would take MPI where torch has it)."""
    from trl import DPOConfig

    use_cpu = resolve_device(cfg.device, key="train.device") == "cpu"
    distributed = {"ddp_backend": "gloo"} if use_cpu and world_size() > 1 else {}
    return DPOConfig(
        output_dir=output_dir,
        loss_type=list(cfg.loss_type),
        loss_weights=list(cfg.loss_weights) if cfg.loss_weights is not None else None,
        beta=cfg.beta,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a value below 1 is a share of the steps
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        data_seed=cfg.seed,
        precompute_ref_log_probs=True,  # the smoothing needs them in the batch; one reference pass, not one per epoch
        disable_dropout=cfg.disable_dropout,
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=cfg.dtype == "bfloat16" or cfg.autocast,
        use_cpu=use_cpu,
        logging_steps=cfg.logging_steps,
        report_to=[],
        save_strategy="no",
        dataloader_num_workers=0,
        **distributed,
    )


def lora_config(cfg: TrainConfig):
    """peft's LoraConfig when train.lora is on, else None (full fine-tuning)."""
    if not cfg.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")


def build_trainer(encoded: EncodedPairs, *, policy_path: str, ref_path: str, tokenizer, cfg: TrainConfig,
                  output_dir: str, work_dir: str | None = None):
    """A ConservativeDPOTrainer on `encoded`, reference log-probs precomputed. The reference is the
    weights at `ref_path`: when it is the policy's own folder TRL uses the policy before training
    (full training) or the base with the adapter disabled (LoRA); otherwise it is loaded. The collator
    masks the environment's tokens in the reference precompute and in training alike; the mask travels
    in the dataset, so TRL's precompute cache (keyed by the dataset's fingerprint) tells the two apart.
    Under several processes the dataset is a file in `work_dir` (`_shared_dataset`)."""
    from datasets import Dataset

    args = dpo_args(cfg, output_dir)
    dataset = Dataset.from_list(list(encoded.rows))
    if world_size() > 1:
        dataset = _shared_dataset(dataset, args, work_dir)
    peft_config = lora_config(cfg)
    model = _load_model(policy_path, cfg)
    ref_model = None if _same_model(policy_path, ref_path) else _load_model(ref_path, cfg)
    collator = EnvironmentMaskCollator(preference_collator(tokenizer, model, args))
    trainer = conservative_trainer_class()(model=model, ref_model=ref_model, args=args, data_collator=collator,
                                           train_dataset=dataset,
                                           processing_class=tokenizer, peft_config=peft_config,
                                           shared_prompt=cfg.shared_prompt, engine=cfg.engine)
    _quiet_progress(trainer)
    return trainer


def _shared_dataset(dataset, args, work_dir: str | None):
    """`dataset` as an Arrow file in `work_dir`, written by rank 0 while the other ranks wait, then read
    by all. TRL's reference precompute writes its cache (on rank 0) next to the dataset's file, named
    by rank 0's fingerprint, and every rank reads it back; for an in-memory dataset `datasets` names
    that file at random in a temporary folder of each process's own, where the other ranks never find it."""
    from datasets import Dataset

    if work_dir is None:
        raise ValueError("training in several processes needs a work_dir shared by the ranks "
                         "(train_dpo_subprocess passes one)")
    path = Path(work_dir) / "pairs.arrow"
    with args.main_process_first(local=False, desc="writing the pairs' dataset file"):
        if is_main_rank():
            dataset.flatten_indices(cache_file_name=str(path))
        return Dataset.from_file(str(path))


@contextlib.contextmanager
def _no_reference_bar():
    """Without TRL's "Computing reference log probs" bar inside training (one bar per phase): TRL reads
    TQDM_DISABLE when it draws it, while tqdm itself read the variable at import, so the training bar stays."""
    import tqdm  # noqa: F401  (imported before the variable is set: it reads TQDM_DISABLE at import)

    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def _quiet_progress(trainer) -> None:
    """The training bar (named "train") shows the step's loss instead of printing every logged dict on
    a line of its own (transformers' ProgressCallback); each dict goes to the log file, and the logs
    still reach `state.log_history` (TrainResult)."""
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:  # the parent's bar, named before its first line is drawn
                from tqdm.auto import tqdm

                self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, desc="train")
            self.current_step = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                log.info("step %d: %s", state.global_step, logs, extra=FILE_ONLY)
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

    if any(isinstance(c, ProgressCallback) for c in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(QuietProgress)


def _summarize(log_history: list[dict[str, Any]], *, epochs: int) -> dict[str, Any]:
    """Final figures from TRL's log history: means over the last epoch's logged steps."""
    logged = [e for e in log_history if "loss" in e]
    if not logged:
        raise RuntimeError("DPO training logged no loss (no optimizer step ran)")
    last = [e for e in logged if e.get("epoch", epochs) > epochs - 1] or logged[-1:]

    def mean(key: str) -> float:
        return float(sum(e.get(key, float("nan")) for e in last) / len(last))

    histories = {name: tuple(float(e.get(key, float("nan"))) for e in logged) for name, key in HISTORIES.items()}
    return dict(final_loss=mean("loss"), reward_margin=mean("rewards/margins"),
                reward_accuracy=mean("rewards/accuracies"), **histories)


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def world_size() -> int:
    """Processes training together (torchrun's WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_rank() -> bool:
    """Whether this process is rank 0, the one that writes (torchrun's RANK; true without a launcher)."""
    return int(os.environ.get("RANK", "0")) == 0


def _check_ranks_agree(trainer) -> None:
    """Raise unless every rank holds the same weights after training: DDP keeps them equal by
    all-reducing the gradients, and a forward that went around it would not have (one sum per tensor,
    gathered from every rank)."""
    import torch

    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    gathered = trainer.accelerator.gather(sums[None])
    if not all(torch.equal(row, gathered[0]) for row in gathered):
        raise RuntimeError("the training processes ended with different weights: their gradients were not "
                           "all-reduced (a forward around DDP's?)")


def _save_checkpoint(trainer, folder: Path | None, *, lora: bool, sharded: bool) -> None:
    """Rank 0 (the one given a `folder`) writes the trained weights there. Under FSDP or DeepSpeed every
    rank first takes part in gathering them (accelerate's get_state_dict, as transformers' save_model);
    with LoRA (never sharded: accelerate_problem) the adapter is merged into a plain checkpoint."""
    state_dict = None
    if sharded:
        wrapped = trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model
        state_dict = trainer.accelerator.get_state_dict(wrapped)
    if folder is None:
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if lora:
        model = model.merge_and_unload()  # a plain checkpoint: vLLM and the next round load it as is
    model.save_pretrained(folder, **({"state_dict": state_dict} if sharded else {}))


def train_dpo(pairs: Sequence[dict[str, Any]], *, policy_path: str, ref_path: str, out_dir: str,
              cfg: TrainConfig, work_dir: str | None = None) -> TrainResult:
    """Train the model at `policy_path` with DPO on `pairs` against the reference at `ref_path`; save
    the result (model, tokenizer, train_result.json) to `out_dir`, atomically. In this process: use
    `train_dpo_subprocess` from a process that ran an inference engine.

    As one of several ranks (torchrun or accelerate; `cfg.processes` of them): every rank trains and
    returns the result, rank 0 alone saves; `work_dir` is a folder all ranks share (`_shared_dataset`)."""
    from policy.models import load_tokenizer

    started = time.time()
    world, main = world_size(), is_main_rank()
    if world != cfg.processes:
        raise ValueError(f"train.processes={cfg.processes}, but this process is one of {world} (WORLD_SIZE): train "
                         "through train_dpo_subprocess, which starts them (train.launcher=torchrun or accelerate)")
    _require_model(policy_path, "policy_path")
    _require_model(ref_path, "ref_path")
    out = Path(out_dir)
    tokenizer = load_tokenizer(policy_path)
    encoded = encode_pairs(pairs, tokenizer, cfg=cfg)
    if encoded.dropped and main:  # the same data on every rank: rank 0 tells
        log.warning("%d of %d pairs dropped: the prompt fills max_length=%d, or a completion is empty "
                    "(or only program output)",
                    encoded.dropped, len(pairs), cfg.max_length)
    if not encoded.rows:
        raise ValueError(f"no pair left to train on (of {len(pairs)})")
    if cfg.conservative and not cfg.smoothing_active and main:
        log.warning("train.conservative applies to the sigmoid loss only; loss_type=%s has none: no smoothing",
                    list(cfg.loss_type))
    symmetric = sum(r.get(SMOOTHING_COLUMN, 0.0) >= MAX_SMOOTHING for r in encoded.rows)
    if symmetric and main:
        log.warning("%d of %d pairs have smoothing %.1f (rejected visited at least as often as chosen): "
                    "they carry no preference signal", symmetric, len(encoded.rows), MAX_SMOOTHING)
    log.info("DPO: %d pairs, %d tokens per epoch (%d of them the environment's, masked), mean smoothing %.3f, "
             "policy %s, reference %s", len(encoded.rows), encoded.tokens_per_epoch, encoded.env_tokens,
             encoded.mean_smoothing, policy_path, ref_path, extra=FILE_ONLY)
    engine = cfg.engine
    log.info("DPO: effective batch %d pairs per step = batch_size %d x grad_accum %d x processes %d (%s, %s)",
             cfg.effective_batch, cfg.batch_size, cfg.grad_accum, cfg.processes, cfg.launcher, engine, extra=FILE_ONLY)

    tmp = None
    if main:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="dpo-scratch-") as scratch:
            trainer = build_trainer(encoded, policy_path=policy_path, ref_path=ref_path, tokenizer=tokenizer,
                                    cfg=cfg, output_dir=scratch, work_dir=work_dir)
            with _no_reference_bar():
                trainer.train()
        if world > 1 and engine not in SHARDED:  # sharded engines hold a different shard on every rank
            _check_ranks_agree(trainer)
        _save_checkpoint(trainer, tmp, lora=cfg.lora, sharded=engine in SHARDED)
        if main:
            tokenizer.save_pretrained(tmp)
        result = TrainResult(**_summarize(trainer.state.log_history, epochs=cfg.epochs),
                             steps=int(trainer.state.global_step), pairs=len(encoded.rows),
                             tokens=encoded.tokens_per_epoch * cfg.epochs, seconds=time.time() - started,
                             mean_smoothing=encoded.mean_smoothing, processes=world,
                             effective_batch=cfg.effective_batch)
        if main:
            write_json(tmp / RESULT_FILE, {**asdict(result), "policy_path": policy_path, "ref_path": ref_path,
                                           "config": asdict(cfg)})
            replace_dir(tmp, out)  # replaces an older out: a checkpoint whose train.json was not written
        if world > 1:
            trainer.accelerator.wait_for_everyone()  # no rank ends before rank 0 has saved
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("DPO done in %.0f s: %d steps, final loss %.4f, reward margin %.4f, accuracy %.2f", result.seconds,
             result.steps, result.final_loss, result.reward_margin, result.reward_accuracy, extra=FILE_ONLY)
    return result


# --- the fresh process -----------------------------------------------------------------------------


def run_job(job_path: str) -> TrainResult:
    """The child's side of `train_dpo_subprocess`: read the job, train, write the result (rank 0 only,
    when several processes train)."""
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    pairs = read_jsonl(job["pairs"])
    result = train_dpo(pairs, policy_path=job["policy_path"], ref_path=job["ref_path"], out_dir=job["out_dir"],
                       cfg=config_from_dict(job["cfg"]), work_dir=job.get("work_dir"))
    if is_main_rank():
        write_json(Path(job["result"]), asdict(result))
    return result


MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
"""glibc malloc: large blocks from the heap, never unmapped (TrainConfig.malloc_reuse)."""


def _child_env(malloc_reuse: bool = False, processes: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // processes)))  # all cores, shared, unless the caller chose
    if malloc_reuse:
        for key, value in MALLOC_ENV.items():
            env.setdefault(key, value)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_streaming(cmd: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Run `cmd` from the project root in `env`; its stdout goes to ours, its stderr is echoed to ours
    as it comes. Returns the exit code and the last lines of its stderr."""
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stderr=subprocess.PIPE)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail = b""
    try:
        while chunk := proc.stderr.read1(65536):
            sys.stderr.write(decoder.decode(chunk))
            sys.stderr.flush()
            tail = (tail + chunk)[-_STDERR_TAIL_BYTES:]
    finally:
        code = proc.wait()
    lines = [line for line in re.split(r"[\r\n]+", tail.decode("utf-8", errors="replace")) if line.strip()]
    return code, lines[-STDERR_TAIL_LINES:]


def train_command(job_path: str | Path, cfg: TrainConfig) -> list[str]:
    """The command line that starts the training child(ren) on `job_path` (`train.launcher`). accelerate
    is run as `python -m accelerate.commands.accelerate_cli` (what the `accelerate` script runs), with
    this interpreter; its `-m` runs the module in every process, as `python -m` does."""
    main = ["-m", "policy.train_main", str(job_path)]
    if cfg.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(cfg.processes), *main]
    if cfg.launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
                str(accelerate_config_path(cfg.accelerate_config)), "--num_processes", str(cfg.processes), *main]
    return [sys.executable, *main]


def train_dpo_subprocess(pairs: Sequence[dict[str, Any]], *, policy_path: str, ref_path: str, out_dir: str,
                         cfg: TrainConfig) -> TrainResult:
    """`train_dpo` in a fresh Python process (`python -m policy.train_main job.json`), or in
    `cfg.processes` of them under torchrun or accelerate (`train_command`): the job, its pairs and the
    child's result are temporary files next to `out_dir` (with several processes also a work folder the
    ranks share). Raises RuntimeError with the exit code and the end of the child's stderr if it fails;
    `out_dir` is then left as it was."""
    check_launch(cfg)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, job_name = tempfile.mkstemp(prefix=f".{out.name}.job-", suffix=".json", dir=out.parent)
    os.close(fd)
    job_path = Path(job_name)
    pairs_path, result_path = job_path.with_suffix(".pairs.jsonl"), job_path.with_suffix(".result.json")
    work_path = job_path.with_suffix(".work") if cfg.launcher != "process" else None
    try:
        with pairs_path.open("w", encoding="utf-8") as f:
            for pair in pairs:
                f.write(json.dumps(pair, ensure_ascii=False) + "\n")
        job = {"pairs": str(pairs_path), "policy_path": str(policy_path), "ref_path": str(ref_path),
               "out_dir": str(out), "result": str(result_path), "cfg": asdict(cfg)}
        env = _child_env(cfg.malloc_reuse, cfg.processes)
        if work_path is not None:
            (work_path / "tmp").mkdir(parents=True)
            job["work_dir"] = str(work_path)
            env["TMPDIR"] = str(work_path / "tmp")  # the launcher's log folder, the ranks' scratch: removed below
        write_json(job_path, job)
        if cfg.launcher != "process":
            log.info("DPO on %d pairs in %d fresh processes (%s) -> %s", len(pairs), cfg.processes, cfg.launcher, out,
                     extra=FILE_ONLY)
        else:
            log.info("DPO on %d pairs in a fresh process -> %s", len(pairs), out, extra=FILE_ONLY)
        code, tail = _run_streaming(train_command(job_path, cfg), env)
        if code != 0:
            for stale in out.parent.glob(_temp_prefix(out) + "*"):  # left by a killed child
                shutil.rmtree(stale, ignore_errors=True)
            raise RuntimeError(f"DPO training failed (exit code {code}); the end of its output:\n" + "\n".join(tail))
        return result_from_dict(json.loads(result_path.read_text(encoding="utf-8")))
    finally:
        for path in (job_path, pairs_path, result_path):
            path.unlink(missing_ok=True)
        if work_path is not None:
            shutil.rmtree(work_path, ignore_errors=True)
