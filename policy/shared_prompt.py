"""One pass over each pair's shared prompt, and the LM head only where the loss reads it
(`train.shared_prompt`): the same per-token log-probabilities as TRL's plain DPO forward, for fewer
positions.

TRL 1.16 runs a batch of B pairs as 2B rows, [prompt + chosen; prompt + rejected], padded, so every
prompt is processed twice; on the CPU (no Triton) its fused LM head also projects every position of
every row onto the vocabulary. Here each pair becomes ONE row,

    shared prefix | the chosen row's rest | the rejected row's rest | padding

with explicit position ids (the rejected part restarts at the prefix length: its token j has position
P + j, as in its plain row) and a block attention mask: causal, and a position of the chosen part never
attends to the rejected part or the other way round; both see the whole prefix. Every position then
sees exactly the tokens, at exactly the positions, that it sees in its plain row, so its hidden state
is the plain row's. Only the hidden states that predict a trained token (TRL's label is not -100: a
completion token that is the policy's, not prompt, padding or the environment's output) go through
the LM head; the first token after the prefix, on either side, is predicted from the prefix's last
position. The per-token values are scattered back into TRL's layout: a `FusedCausalLMOutput` whose
`log_probs`, `entropy`, `mean_logits`, `is_top1` (and `log_sum_sq_probs` when asked) have shape
(2B, L - 1), aligned as TRL's own, zero where the label is -100. They are computed by TRL's own
kernel (`trl.kernels.ChunkedLogProbFunction`, in the same vocabulary tiles), so they equal the plain
path's up to float rounding; TRL's metrics read exactly those positions, so they are reproduced too.

Where the prefix ends. Not from `completion_mask` (the environment mask zeroes it inside a
completion too), and not from a column the collator would have to carry: the prefix is the longest
run of leading tokens the chosen and the rejected row of a pair have in common (`shared_prefix_lengths`).
It holds the prompt (both rows start with it) and any completion tokens the two sides also share
("So 3 + 5 = " before "8" or "9"): any common prefix is exact, because two causal rows that agree on
their first P tokens have the same hidden states there. Truncation needs nothing either: the rows are
packed as TRL's collator kept them (keep_start cuts a row's end; a pair whose prompt fills max_length
was dropped by `encode_pairs`), and a pair sharing nothing still packs correctly, only without saving.

How the model is reached. `SharedPromptForward` stands in for the model in TRL's fused-LM-head calls
(`model(input_ids=, attention_mask=, labels=, fused_lm_head=True, use_cache=False)`): it runs the
causal LM's body (`base_model`, e.g. LlamaModel) on the packed rows with a 4D mask, and its
`get_output_embeddings()` on the gathered states; every other call goes to the model unchanged. A
PEFT LoRA model is reached through `get_base_model()` (LoRA's layers sit inside that body, and TRL's
adapter-disabling context for the reference acts on them). transformers 5 uses a 4D attention mask
as given (masking_utils `_preprocess_mask_arguments` returns it unchanged); SDPA takes it as a boolean
mask (True = attend), eager attention as an additive one. Models this does not cover fall back to
the plain call, with the reason from `unsupported_reason`: other attention implementations (flash
attention takes no 4D mask, flex a BlockMask), logit scaling or soft-capping (the kernel would need
the model's factors), MoE router logits (TRL's aux loss), PEFT other than plain LoRA (prompt learning
adds virtual tokens, aLoRA reads offsets from the input).

Gradients flow through the packed body pass and the gathered states into every parameter, as in the
plain path; gradient checkpointing acts in the body's layers as in the plain path. Under bf16 autocast
the caller passes the accelerator's autocast context, which the plain path gets from accelerate's
wrapped `forward` (bypassed here). The mask is (B, 1, T, T) booleans: 8 pairs of 400 tokens are 1.3 MB.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

SHARED, CHOSEN, REJECTED, PAD = 0, 1, 2, 3  # the segment of a packed position
IGNORE = -100  # TRL's label for a token the loss does not read
VOCAB_TILE = 32768  # trl 1.16's vocabulary tile width (_CHUNKED_LOGPROB_CHUNK_SIZE): the same folding as the plain path
POLICY_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")  # what DPOTrainer asks of the policy's head
REFERENCE_OUTPUTS = ("log_probs",)  # what its reference precompute reads
MASK_FORMS = ("sdpa", "eager")  # attention implementations that take a 4D mask tensor
_CALL_KEYS = frozenset({"input_ids", "attention_mask", "labels", "fused_lm_head", "use_cache"})
# Text-config attributes by which models scale or cap their logits (the ones trl 1.16's fused head reads)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


@dataclass(frozen=True)
class PackedPairs:
    """A [chosen; rejected] batch of B pairs (rows of length L) packed into B rows of length T.

    input_ids: (B, T) per pair the shared prefix, the chosen row's remaining tokens, the rejected row's
        remaining tokens, then padding (token id 0).
    position_ids: (B, T) 0..Lc-1 over prefix and chosen part, P..Lr-1 over the rejected part (P the
        prefix length, Lc and Lr the rows' unpadded lengths): each token's position in its plain row.
    segments: (B, T) SHARED, CHOSEN, REJECTED or PAD per position (`block_attention` reads them).
    need: (2B, L - 1) booleans in TRL's layout: the next-token label at this position is not -100.
    source: (N,) for each True of `need`, in row-major order, the flat index (pair * T + t) of the packed
        position whose hidden state predicts that label.
    targets: (N,) the labels themselves (token ids).
    prefix: (B,) the shared prefix lengths P.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    need: torch.Tensor
    source: torch.Tensor
    targets: torch.Tensor
    prefix: torch.Tensor

    @property
    def positions(self) -> int:
        """Token positions the body processes (padding left out): sum over pairs of Lc + Lr - P."""
        return int((self.segments != PAD).sum())


def shared_prefix_lengths(input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per pair (row i and row B + i of a [chosen; rejected] batch), how many leading tokens the two
    rows have in common, at most the shorter row's unpadded length (`lengths`, per row)."""
    pairs = input_ids.size(0) // 2
    shorter = torch.minimum(lengths[:pairs], lengths[pairs:])
    columns = torch.arange(input_ids.size(1), device=input_ids.device)
    differs = (input_ids[:pairs] != input_ids[pairs:]) | (columns >= shorter[:, None])
    return torch.where(differs.any(dim=1), differs.int().argmax(dim=1), shorter)


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor) -> PackedPairs:
    """Pack TRL's [chosen; rejected] batch (right-padded rows, labels -100 where no log-prob is read)
    into one row per pair; see PackedPairs. Raises ValueError on a batch of another shape."""
    rows, length = input_ids.shape
    if rows % 2 or labels.shape != input_ids.shape:
        raise ValueError(f"expected a [chosen; rejected] batch with labels of the same shape, got input_ids "
                         f"{tuple(input_ids.shape)} and labels {tuple(labels.shape)}")
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    lengths = attention_mask.sum(dim=1)
    columns = torch.arange(length, device=device)
    if not torch.equal(attention_mask.bool(), columns < lengths[:, None]):
        raise ValueError("packing needs right-padded rows (an attention mask of ones, then zeros)")
    pairs = rows // 2
    prefix = shared_prefix_lengths(input_ids, lengths)
    ids, positions, segments = [], [], []
    for i, (p, lc, lr) in enumerate(zip(prefix.tolist(), lengths[:pairs].tolist(), lengths[pairs:].tolist())):
        ids.append(torch.cat([input_ids[i, :lc], input_ids[pairs + i, p:lr]]))
        positions.append(torch.cat([torch.arange(lc, device=device), torch.arange(p, lr, device=device)]))
        segments.append(torch.tensor([SHARED] * p + [CHOSEN] * (lc - p) + [REJECTED] * (lr - p), device=device))
    pad = torch.nn.utils.rnn.pad_sequence
    packed_ids = pad(ids, batch_first=True, padding_value=0)
    width = packed_ids.size(1)

    need = labels[:, 1:] != IGNORE
    row, t = need.nonzero(as_tuple=True)  # row-major, as masked_scatter fills
    pair = row % pairs
    # A rejected row's position t >= P sits after the chosen part in the packed row: shifted by Lc - P.
    shift = torch.where((row >= pairs) & (t >= prefix[pair]), lengths[pair] - prefix[pair], 0)
    return PackedPairs(input_ids=packed_ids, position_ids=pad(positions, batch_first=True, padding_value=0),
                       segments=pad(segments, batch_first=True, padding_value=PAD), need=need,
                       source=pair * width + t + shift, targets=labels[:, 1:][need], prefix=prefix)


def block_attention(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) booleans, True where query position q may attend to key position k: k <= q, and k
    is in the shared prefix or in q's own segment. The chosen and the rejected part never see each
    other; padding sees the prefix and earlier padding (never an empty row, so no NaN)."""
    width = segments.size(1)
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    return (causal & ((key == SHARED) | (key == query)))[:, None]


def attention_mask_for(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask in the form an attention implementation adds or selects with: booleans for SDPA,
    0 / the dtype's minimum for eager attention (as transformers builds its own masks)."""
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                        torch.finfo(dtype).min)
    raise ValueError(f"attention implementation {implementation!r} takes no 4D mask tensor; expected one of "
                     f"{', '.join(MASK_FORMS)}")


def _causal_lm(model) -> tuple[Any | None, str | None]:
    """The transformers causal LM under `model` (through PEFT's wrapper), or None and why not."""
    if hasattr(model, "get_base_model"):  # a PeftModel
        config = model.active_peft_config
        if config.is_prompt_learning or config.peft_type != "LORA" or getattr(config, "alora_invocation_tokens", None):
            return None, f"PEFT {config.peft_type} is not plain LoRA"
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        return None, f"{type(model).__name__} is not a transformers model"
    if getattr(model, "base_model", model) is model or model.get_output_embeddings() is None:
        return None, f"{type(model).__name__} has no separate body and LM head"
    if config._attn_implementation not in MASK_FORMS:
        return None, f"attention implementation {config._attn_implementation!r} takes no 4D mask tensor"
    text = config.get_text_config()
    scaled = [name for name in _LOGIT_TRANSFORMS if getattr(text, name, None) is not None]
    if scaled:
        return None, f"the model transforms its logits ({', '.join(scaled)})"
    if getattr(text, "output_router_logits", False):
        return None, "MoE router logits (an aux loss) are asked for"
    return model, None


def unsupported_reason(model) -> str | None:
    """Why the packed forward cannot stand in for `model`'s (the plain path is used then), or None."""
    return _causal_lm(model)[1]


def packed_forward(causal_lm, packed: PackedPairs, *, outputs: tuple[str, ...] = POLICY_OUTPUTS):
    """TRL's `FusedCausalLMOutput` for the batch `packed` came from: the body once over the packed rows,
    the LM head (TRL's chunked kernel) only at `packed.source`, the per-token fields scattered into
    TRL's (2B, L - 1) layout with zeros where the label is -100."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput

    head = causal_lm.get_output_embeddings()
    implementation = causal_lm.config._attn_implementation
    mask = attention_mask_for(block_attention(packed.segments), implementation, head.weight.dtype)
    hidden = causal_lm.base_model(input_ids=packed.input_ids, attention_mask=mask,
                                  position_ids=packed.position_ids, use_cache=False).last_hidden_state
    states = hidden.reshape(-1, hidden.size(-1))[packed.source].to(head.weight.device)
    per_token = ChunkedLogProbFunction.apply(states, head.weight, head.bias, packed.targets.to(head.weight.device),
                                             1.0, VOCAB_TILE, None, 1.0, outputs)
    need = packed.need.to(head.weight.device)
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        None if x is None else x.new_zeros(need.shape).masked_scatter(need, x) for x in per_token)
    return FusedCausalLMOutput(loss=-log_probs.sum() / need.sum().clamp(min=1), log_probs=log_probs, entropy=entropy,
                               log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits, is_top1=is_top1,
                               label_mask=need)


class SharedPromptForward:
    """Stands in for a model (the policy in DPOTrainer._compute_loss, the model of its reference
    precompute) in one trainer call: a fused-LM-head call on a [chosen; rejected] batch goes through
    `packed_forward`; any other call, and any call on a model `unsupported_reason` rejects, goes to the
    model unchanged.

    outputs: the per-token fields to compute (POLICY_OUTPUTS, REFERENCE_OUTPUTS, or TRL's set plus
        "log_sum_sq_probs" for WPO weighting).
    unwrap: from the model as called to the model itself (the accelerator's unwrap_model).
    autocast: the mixed-precision context the plain call would run in (the accelerator's autocast).
    """

    def __init__(self, model, *, outputs: tuple[str, ...] = POLICY_OUTPUTS,
                 unwrap: Callable[[Any], Any] = lambda m: m,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.model = model
        self.outputs = outputs
        self.unwrap = unwrap
        self.autocast = autocast

    def __call__(self, *args, **kwargs):
        if (args or not kwargs.get("fused_lm_head") or kwargs.get("use_cache") or kwargs.get("labels") is None
                or not kwargs.keys() <= _CALL_KEYS or kwargs.get("input_ids") is None):
            return self.model(*args, **kwargs)
        causal_lm, _ = _causal_lm(self.unwrap(self.model))
        if causal_lm is None:
            return self.model(*args, **kwargs)
        packed = pack_pairs(kwargs["input_ids"], kwargs.get("attention_mask"), kwargs["labels"])
        with self.autocast():
            return packed_forward(causal_lm, packed, outputs=self.outputs)
