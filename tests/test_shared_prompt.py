"""train.shared_prompt (policy/shared_prompt.py): each pair packed into one row with its shared prefix
once gives the plain TRL path's per-token log-probabilities (and entropy, mean logits, top-1 flags),
DPO loss, gradients and whole training runs, on a tiny random Llama, with the environment's tokens
masked, prompts of different lengths, padding, truncation, LoRA and gradient checkpointing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from policy import shared_prompt
from policy.dpo import (
    ENV_COLUMNS,
    SMOOTHING_COLUMN,
    EnvironmentMaskCollator,
    TrainConfig,
    build_trainer,
    encode_pairs,
    train_dpo,
)
from policy.shared_prompt import (
    CHOSEN,
    PAD,
    POLICY_OUTPUTS,
    REJECTED,
    SHARED,
    SharedPromptForward,
    block_attention,
    pack_pairs,
    shared_prefix_lengths,
    unsupported_reason,
)
from tools.format import CODE_OPEN, FENCE, OUTPUT_OPEN, output_block

TINY = TrainConfig(epochs=1, batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, max_length=128,
                   loss_type=("sigmoid", "sft"), autocast=False)  # float32: differences are rounding only
FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1", "label_mask")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from policy.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def other_model_dir(default_model_dir, tmp_path_factory) -> Path:
    from policy.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-ref") / "model", default_model_dir, seed=1)


def program_step(a: int, b: int, op: str, after: str) -> str:
    """A tool-integrated step: a program, the environment's output block, then the policy's `after`."""
    result = a + b if op == "+" else a - b
    return f"We compute it.\n{CODE_OPEN}\nprint({a} {op} {b})\n{FENCE}\n{OUTPUT_OPEN}{output_block(str(result))}{after}"


@pytest.fixture(scope="module")
def pairs(tokenizer) -> list[dict]:
    """Eight pairs: prompts of different lengths, plain and tool-integrated steps (output blocks), sides
    that share their first tokens and sides that do not, terminal and non-terminal (EOS or not)."""
    out = []
    for i in range(8):
        a, b = 3 + i, 5 + 2 * i
        question = f"What is {a} + {b}?" + " Think carefully." * (i % 4)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        if i % 2:
            chosen = program_step(a, b, "+", f"\nSo {a} + {b} = {a + b}.\n")
            rejected = program_step(a, b, "-", f"\nSo the answer is {a - b}, I think.\n")
        elif i % 4 == 0:
            chosen, rejected = f"{a} + {b} = {a + b}.\n", f"{a} + {b} = {a + b + 1}.\n"
        else:
            chosen, rejected = f"Adding gives {a + b}.\n", f"{a} plus {b} is {a * b}, so the answer is {a * b}.\n"
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_visits": 3 + i,
                    "rejected_visits": 1 + i % 3, "chosen_terminal": i % 3 == 0, "rejected_terminal": i % 3 == 1})
    return out


def collate(rows, tokenizer, max_length: int) -> dict:
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return EnvironmentMaskCollator(DataCollatorForPreference(pad_token_id=pad, max_length=max_length))(rows)


def fused_call(batch: dict) -> dict:
    """The keyword arguments of TRL's fused-LM-head call on a batch (DPOTrainer._compute_loss)."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                labels=labels, fused_lm_head=True)


def fused_model(path, **kwargs):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    add_fused_lm_head(model, outputs=POLICY_OUTPUTS)
    return model


def assert_same_fields(plain, packed, fields=FIELDS) -> None:
    import torch

    for name in fields:
        a, b = getattr(plain, name), getattr(packed, name)
        assert a.shape == b.shape, name
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)


@pytest.fixture
def packed_calls(monkeypatch) -> list[int]:
    """Counts the packed forwards (one entry, the pairs, per call of policy.shared_prompt.packed_forward)."""
    calls: list[int] = []
    original = shared_prompt.packed_forward

    def counting(causal_lm, packed, **kwargs):
        calls.append(packed.input_ids.size(0))
        return original(causal_lm, packed, **kwargs)

    monkeypatch.setattr(shared_prompt, "packed_forward", counting)
    return calls


# --- packing by hand -----------------------------------------------------------------------------------


def test_pack_pairs_by_hand():
    """TRL's collator example (prompt [1 2 3], chosen [4 5], rejected [6]; prompt [7 8], chosen [9],
    rejected [10 11]): packed rows, positions, segments, and which hidden state predicts which label."""
    import torch

    ids = torch.tensor([[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    completion = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]])
    packed = pack_pairs(ids, attention, ids.masked_fill(completion == 0, -100))
    assert packed.prefix.tolist() == [3, 2]
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 2, 3, 0]]
    S, C, R = SHARED, CHOSEN, REJECTED
    assert packed.segments.tolist() == [[S, S, S, C, C, R], [S, S, C, R, R, PAD]]
    assert packed.positions == 11  # against 5 + 3 + 4 + 4 = 16 in the plain rows
    # labels in row-major order: row 0 (4, 5), row 1 (9), row 2 (6), row 3 (10, 11)
    assert packed.targets.tolist() == [4, 5, 9, 6, 10, 11]
    # 6 is predicted from the prefix's last position (2), not from the chosen part's last token (4);
    # 10 from pair 1's last prefix position (6 + 1), 11 from the packed 10 (6 + 3)
    assert packed.source.tolist() == [2, 3, 6 + 1, 2, 6 + 1, 6 + 3]
    assert packed.need.tolist() == (completion[:, 1:] == 1).tolist()

    allowed = block_attention(packed.segments)[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 1, 0],
                       [1, 1, 1, 0, 0, 1]]  # the rejected token sees the prompt and itself, never the chosen part
    assert block_attention(packed.segments)[1, 0, 5].int().tolist() == [1, 1, 0, 0, 0, 1]  # padding: no empty row


def test_shared_prefix_covers_common_completion_tokens_and_stops_at_the_shorter_row():
    import torch

    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 0], [5, 6, 7, 9], [5, 6, 7, 0]])
    lengths = torch.tensor([4, 3, 4, 3])  # pair 0 differs at 3; pair 1 is the same row twice (padding alike)
    assert shared_prefix_lengths(ids, lengths).tolist() == [3, 3]
    assert shared_prefix_lengths(ids, torch.tensor([4, 2, 2, 3])).tolist() == [2, 2]  # a shorter row ends it


def test_pack_pairs_rejects_other_batches():
    import torch

    ids = torch.ones(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="chosen; rejected"):
        pack_pairs(ids, None, ids)
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="right-padded"):
        pack_pairs(ids, torch.tensor([[0, 1, 1], [1, 1, 1]]), ids)


# --- the packed forward equals the plain one --------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_log_probs_equal_the_plain_path(pairs, tokenizer, tiny_model_dir, attention):
    """Per token, the packed forward gives TRL's fused head's log-probs, entropy, mean logits and top-1
    flags, zero where they are not read: a batch with prompts of different lengths, padding, the
    environment's tokens masked and rows cut at max_length. The model's own forward is not called."""
    import torch

    rows = list(encode_pairs(pairs, tokenizer, cfg=TINY).rows)
    prompts = [len(r["prompt_ids"]) for r in rows]
    full = [len(r["prompt_ids"]) + len(r[f"{s}_ids"]) for s in ENV_COLUMNS for r in rows]
    max_length = max(full) - 4  # the longest rows lose their end (keep_start)
    assert len(set(prompts)) > 2 and max(prompts) < max_length and len(set(full)) > 2
    batch = collate(rows, tokenizer, max_length)
    env_masked = sum(min(len(r[f"{s}_ids"]), max_length - len(r["prompt_ids"])) for s in ENV_COLUMNS for r in rows)
    assert batch["completion_mask"].sum() < env_masked  # the environment's tokens are masked out
    assert (batch["attention_mask"].sum(dim=1) == max_length).sum() >= 1  # a row was cut

    model = fused_model(tiny_model_dir, attn_implementation=attention)
    assert model.config._attn_implementation == attention
    kwargs = fused_call(batch)
    with torch.no_grad():
        plain = model(**kwargs)

        def forbidden(*args, **kw):
            raise AssertionError("the packed path called the model's forward")

        model.forward = forbidden
        packed = SharedPromptForward(model)(**kwargs)
    assert_same_fields(plain, packed)
    assert plain.log_probs.abs().sum() > 1.0 and packed.is_top1.dtype == torch.bool
    torch.testing.assert_close(packed.loss, plain.loss, rtol=1e-5, atol=1e-6)
    positions = pack_pairs(kwargs["input_ids"], kwargs["attention_mask"], kwargs["labels"]).positions
    assert positions < 0.8 * batch["attention_mask"].sum().item()  # the prompts ran once


def test_packed_gradients_equal_the_plain_path(pairs, tokenizer, tiny_model_dir):
    """The gradient of a weighted sum of the per-token log-probs reaches every parameter as in the plain path."""
    import torch

    batch = collate(list(encode_pairs(pairs, tokenizer, cfg=TINY).rows), tokenizer, TINY.max_length)
    kwargs = fused_call(batch)
    weights = torch.randn(kwargs["input_ids"].size(0), kwargs["input_ids"].size(1) - 1,
                          generator=torch.Generator().manual_seed(0))
    grads = []
    for forward in (lambda m: m, SharedPromptForward):
        model = fused_model(tiny_model_dir)
        (forward(model)(**kwargs).log_probs * weights).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    plain, packed = grads
    assert plain.keys() == packed.keys() and all(g is not None for g in packed.values())
    for name in plain:
        torch.testing.assert_close(packed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_packed_equals_plain_with_and_without_the_adapter(pairs, tokenizer, tiny_model_dir):
    """Through PEFT's wrapper: the adapted policy, and the base with the adapter disabled (TRL's
    reference for LoRA), give the plain path's log-probs; the adapter changes them (not vacuous)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = fused_model(tiny_model_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    assert unsupported_reason(peft) is None
    kwargs = fused_call(collate(list(encode_pairs(pairs[:4], tokenizer, cfg=TINY).rows), tokenizer, TINY.max_length))
    with torch.no_grad():
        adapted = peft(**kwargs), SharedPromptForward(peft)(**kwargs)
        with peft.disable_adapter():
            base = peft(**kwargs), SharedPromptForward(peft)(**kwargs)
    assert_same_fields(*adapted)
    assert_same_fields(*base)
    assert (adapted[1].log_probs - base[1].log_probs).abs().max() > 1e-3


def test_unsupported_models_take_the_plain_call(pairs, tokenizer, tiny_model_dir, packed_calls):
    """A model that soft-caps its logits is not packed (the kernel call would leave the cap out): the
    stand-in forwards the call as it came. The bare body (no LM head) is rejected too."""
    import torch

    model = fused_model(tiny_model_dir)
    assert unsupported_reason(model) is None and "LM head" in unsupported_reason(model.model)
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in unsupported_reason(model)
    kwargs = fused_call(collate(list(encode_pairs(pairs[:2], tokenizer, cfg=TINY).rows), tokenizer, TINY.max_length))
    with torch.no_grad():
        assert_same_fields(model(**kwargs), SharedPromptForward(model)(**kwargs))
    assert packed_calls == []


# --- through the trainer -------------------------------------------------------------------------------------


def loss_and_grads(trainer, batch: dict):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    metrics = {k: v[-1] for k, v in trainer._metrics["train" if trainer.model.training else "eval"].items()}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_loss_gradients_and_metrics_match(pairs, tokenizer, tiny_model_dir, other_model_dir, tmp_path,
                                                  packed_calls, checkpointing):
    """Two trainers on the same pairs, train.shared_prompt false and true (with gradient checkpointing
    on the shared one): the same precomputed reference log-probs, and on one batch the same DPO + NLL +
    smoothing loss, gradients of every parameter and TRL metrics. The shared trainer packed (the
    reference precompute and the loss); the plain one never did."""
    import torch

    encoded = encode_pairs(pairs, tokenizer, cfg=TINY)
    assert ENV_COLUMNS["chosen"] in encoded.rows[0] and SMOOTHING_COLUMN in encoded.rows[0]
    trainers = {}
    for shared in (False, True):
        cfg = replace(TINY, shared_prompt=shared, gradient_checkpointing=checkpointing and shared)
        before = len(packed_calls)
        trainers[shared] = build_trainer(encoded, policy_path=str(tiny_model_dir), ref_path=str(other_model_dir),
                                         tokenizer=tokenizer, cfg=cfg, output_dir=str(tmp_path / str(shared)))
        assert trainers[shared].shared_prompt is shared
        assert (len(packed_calls) > before) is shared  # the reference precompute packed, or did not
        trainers[shared].model.train()
    plain, packed = trainers[False], trainers[True]
    if checkpointing:  # as Trainer.train switches it on
        packed.model.gradient_checkpointing_enable(packed.args.gradient_checkpointing_kwargs)
    assert packed.model.is_gradient_checkpointing is checkpointing and not plain.model.is_gradient_checkpointing
    for side in ENV_COLUMNS:
        a, b = plain.train_dataset[f"ref_{side}_logps"], packed.train_dataset[f"ref_{side}_logps"]
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5) and len(set(a)) == len(a)

    rows = [plain.train_dataset[i] for i in range(len(encoded.rows))]  # the same batch, reference log-probs included
    batch = plain.data_collator(rows)
    assert SMOOTHING_COLUMN in batch
    calls = len(packed_calls)
    loss_a, grads_a, metrics_a = loss_and_grads(plain, batch)
    assert len(packed_calls) == calls
    loss_b, grads_b, metrics_b = loss_and_grads(packed, batch)
    assert packed_calls[calls:] == [len(rows)]  # one packed policy forward, one row per pair
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(plain.model.parameters()))
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    for key in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "logps/chosen",
                "logps/rejected", "rewards/margins", "rewards/accuracies", SMOOTHING_COLUMN, "num_tokens"):
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-5, abs=1e-6), key
    assert abs(metrics_a["rewards/margins"]) > 1e-3  # the reference differs: the loss is not at its symmetric point


def test_train_dpo_same_run_either_way(pairs, tiny_model_dir, tmp_path, packed_calls):
    """Whole train_dpo runs (2 optimizer steps, the default DPO + NLL loss, smoothing, the environment
    mask) with train.shared_prompt false and true: the same losses, reward curves and trained weights."""
    import torch
    from transformers import AutoModelForCausalLM

    results, weights = {}, {}
    for shared in (False, True):
        before = len(packed_calls)
        out = tmp_path / f"shared-{shared}"
        results[shared] = train_dpo(pairs, policy_path=str(tiny_model_dir), ref_path=str(tiny_model_dir),
                                    out_dir=str(out), cfg=replace(TINY, shared_prompt=shared))
        assert (len(packed_calls) - before) == (4 if shared else 0)  # 2 reference batches, 2 steps
        weights[shared] = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    plain, packed = results[False], results[True]
    assert plain.steps == packed.steps == 2
    assert packed.final_loss == pytest.approx(plain.final_loss, rel=1e-5)
    for name in ("loss_history", "margin_history", "chosen_history", "rejected_history", "accuracy_history"):
        assert getattr(packed, name) == pytest.approx(getattr(plain, name), rel=1e-4, abs=1e-6), name
    assert plain.loss_history[1] != plain.loss_history[0]  # the first step moved the weights
    initial = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    assert any(not torch.equal(initial[k], weights[False][k]) for k in initial)
    for k in weights[False]:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=1e-4, atol=1e-5, msg=k)


def test_packed_forward_runs_under_the_trainers_autocast(pairs, tokenizer, tiny_model_dir, tmp_path, monkeypatch):
    """With train.autocast (bf16 over float32 weights) the packed forward runs in the accelerator's
    autocast, as accelerate's wrapped forward runs the plain one (bypassed by the packed path), in the
    reference precompute and in the loss; the losses agree to bf16 rounding."""
    import torch

    states: list[bool] = []
    original = shared_prompt.packed_forward

    def recording(causal_lm, packed, **kwargs):
        states.append(torch.is_autocast_enabled("cpu"))
        return original(causal_lm, packed, **kwargs)

    monkeypatch.setattr(shared_prompt, "packed_forward", recording)
    encoded = encode_pairs(pairs[:4], tokenizer, cfg=TINY)
    losses = {}
    for shared in (False, True):
        trainer = build_trainer(encoded, policy_path=str(tiny_model_dir), ref_path=str(tiny_model_dir),
                                tokenizer=tokenizer, cfg=replace(TINY, autocast=True, shared_prompt=shared),
                                output_dir=str(tmp_path / str(shared)))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        with torch.no_grad():
            losses[shared] = trainer.compute_loss(trainer.model, batch).item()
    assert states == [True, True]  # one reference batch, one loss
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
