"""DPO through TRL (policy/dpo.py): the conservative smoothing by hand, its path into the loss, the
environment's tokens (program output blocks) masked out of both log-probabilities, and real runs on a
tiny random Llama (in this process, in a fresh one, with LoRA, and a failing child)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from policy.dpo import (
    ENV_COLUMNS,
    RESULT_FILE,
    SMOOTHING_COLUMN,
    EnvironmentMaskCollator,
    SmoothingCollator,
    TrainConfig,
    build_trainer,
    conservative_smoothing,
    encode_pairs,
    environment_flags,
    smoothing_correction,
    train_dpo,
    train_dpo_subprocess,
)
from tools.format import CODE_OPEN, FENCE, OUTPUT_OPEN, output_block, output_spans

# Fast settings for the tiny model: a learning rate large enough that one step visibly moves weights.
TINY = TrainConfig(epochs=1, batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, max_length=128,
                   loss_type=("sigmoid",),  # plain DPO: the hand formulas below are DPO's (default adds an NLL term)
                   autocast=False)  # float32 for the hand formulas


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from policy.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def pairs(tokenizer) -> list[dict]:
    return addition_pairs(tokenizer)


def addition_pairs(tokenizer) -> list[dict]:
    """Eight hand-made step-level pairs: a right and a wrong addition step, with visit counts."""
    out = []
    for i in range(8):
        a, b = 3 + i, 5 + 2 * i
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}],
                                               tokenize=False, add_generation_prompt=True)
        out.append({"prompt": prompt, "chosen": f"{a} + {b} = {a + b}.\n", "rejected": f"{a} + {b} = {a + b + 1}.\n",
                    "problem_id": f"p{i}", "depth": 0, "chosen_q": 0.8, "rejected_q": -0.6,
                    "chosen_visits": 3 + i, "rejected_visits": 1 + i % 3, "chosen_terminal": i % 2 == 0,
                    "rejected_terminal": False, "round": 0, "some_future_key": [1, 2]})
    return out


def program_step(a: int, b: int, op: str, result: int, after: str = "") -> str:
    """A tool-integrated step (tools/format.py): rationale, a program, its output block, then `after`."""
    return f"We compute it.\n{CODE_OPEN}\nprint({a} {op} {b})\n{FENCE}\n{OUTPUT_OPEN}{output_block(str(result))}{after}"


@pytest.fixture(scope="module")
def tool_pairs(pairs) -> list[dict]:
    """The eight pairs with tool-integrated steps: a program adds (chosen) or subtracts (rejected), the
    environment's output block follows, and the policy goes on after it."""
    out = []
    for i, pair in enumerate(pairs):
        a, b = 3 + i, 5 + 2 * i
        out.append({**pair, "chosen": program_step(a, b, "+", a + b, f"\nSo {a} + {b} = {a + b}.\n"),
                    "rejected": program_step(a, b, "-", a - b, f"\nSo {a} + {b} = {a - b}.\n")})
    return out


def env_runs(flags) -> list[tuple[int, int]]:
    """The [start, end) runs of environment flags in a row's flag list."""
    runs, start = [], None
    for j, flag in enumerate([*flags, 0]):
        if flag and start is None:
            start = j
        elif not flag and start is not None:
            runs.append((start, j))
            start = None
    return runs


def output_texts(text: str) -> list[str]:
    return [text[s:e] for s, e in output_spans(text)]


@pytest.fixture(scope="module")
def other_model_dir(default_model_dir, tmp_path_factory) -> Path:
    """A second tiny model (other random weights): a reference that differs from the policy."""
    from policy.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-ref") / "model", default_model_dir, seed=1)


def state_dict(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


# --- pure parts --------------------------------------------------------------------------------------


def test_conservative_smoothing_by_hand():
    assert conservative_smoothing(3, 1, 0.5) == 0.25
    assert conservative_smoothing(1, 3, 0.5) == 0.5  # 0.75, capped
    assert conservative_smoothing(0, 0, 0.5) == 0.0
    assert conservative_smoothing(9, 1, 0.5) == pytest.approx(0.1)
    assert conservative_smoothing(1, 1, 0.3) == 0.3


def test_smoothing_correction_is_cdpo():
    """-logsigmoid(x) + correction == -(1-eps) logsigmoid(x) - eps logsigmoid(-x); eps=0 is plain DPO."""
    import torch
    import torch.nn.functional as F

    x = torch.tensor([-3.0, -0.5, 0.0, 0.2, 1.5, 6.0])
    eps = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.3, 0.05])
    by_hand = -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)
    torch.testing.assert_close(-F.logsigmoid(x) + smoothing_correction(x, eps), by_hand)
    torch.testing.assert_close(-F.logsigmoid(x) + smoothing_correction(x, torch.zeros_like(x)), -F.logsigmoid(x))


@pytest.mark.parametrize("bad,match", [
    (dict(loss_type=("sigmoid", "dpo_typo")), "loss_type"),
    (dict(loss_type=("sigmoid", "nca_pair"), loss_weights=(1.0,)), "loss_weights"),
    (dict(reference="yesterday"), "reference"),
    (dict(smoothing_cap=0.7), "smoothing_cap"),
    (dict(eos="sometimes"), "eos"),
    (dict(batch_size=0), "batch_size"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_encode_pairs_eos_and_smoothing(pairs, tokenizer):
    enc = encode_pairs(pairs, tokenizer, cfg=TINY)
    eos = tokenizer.eos_token_id
    assert len(enc.rows) == 8 and enc.dropped == 0
    for pair, row in zip(pairs, enc.rows):
        assert (row["chosen_ids"][-1] == eos) == pair["chosen_terminal"]  # only a solution's last step ends
        assert row["rejected_ids"][-1] != eos
        assert row[SMOOTHING_COLUMN] == conservative_smoothing(pair["chosen_visits"], pair["rejected_visits"], 0.5)
        assert tokenizer.decode(row["prompt_ids"] + row["chosen_ids"]).startswith(pair["prompt"] + pair["chosen"])
    assert "label_smoothing" not in encode_pairs(pairs, tokenizer, cfg=replace(TINY, conservative=False)).rows[0]
    assert all(r["chosen_ids"][-1] == eos for r in encode_pairs(pairs, tokenizer, cfg=replace(TINY, eos="always")).rows)
    assert encode_pairs(pairs, tokenizer, cfg=replace(TINY, max_length=8)).dropped == 8  # prompts fill it
    sampled = [{**p, "source": "sampling", "chosen_visits": 1, "rejected_visits": 1} for p in pairs]
    assert all(r[SMOOTHING_COLUMN] == 0.0 for r in encode_pairs(sampled, tokenizer, cfg=TINY).rows)  # not 0.5


def test_environment_flags_by_hand():
    """A token overlapping a span is the environment's, one straddling its boundary too; touching is not."""
    assert environment_flags([(0, 3), (3, 6), (6, 9)], [(4, 7)]) == [0, 1, 1]
    assert environment_flags([(0, 4), (4, 7), (7, 9)], [(4, 7)]) == [0, 1, 0]
    assert environment_flags([(0, 2), (2, 5)], []) == [0, 0]


def test_encode_pairs_flags_exactly_the_output_blocks(tool_pairs, pairs, tokenizer):
    enc = encode_pairs(tool_pairs, tokenizer, cfg=TINY)
    eos = tokenizer.eos_token_id
    for pair, row in zip(tool_pairs, enc.rows):
        for side, column in ENV_COLUMNS.items():
            ids, env = row[f"{side}_ids"], row[column]
            assert len(env) == len(ids)
            assert [tokenizer.decode(ids[s:e]) for s, e in env_runs(env)] == output_texts(pair[side])  # "\n17\n```"
            if ids[-1] == eos:
                assert env[-1] == 0  # the appended EOS is the policy's
    assert enc.env_tokens == sum(sum(r[c]) for r in enc.rows for c in ENV_COLUMNS.values()) > 0
    lengths = [len(r["prompt_ids"]) + len(r[f"{s}_ids"]) for r in enc.rows for s in ENV_COLUMNS]
    assert max(lengths) < TINY.max_length and enc.tokens_per_epoch == sum(lengths)  # environment tokens are processed

    plain = encode_pairs(pairs, tokenizer, cfg=TINY)  # no output block in the run: rows as before
    assert all(set(r) == {"prompt_ids", "chosen_ids", "rejected_ids", SMOOTHING_COLUMN} for r in plain.rows)
    assert plain.env_tokens == 0
    mixed = encode_pairs(pairs[:2] + tool_pairs[2:4], tokenizer, cfg=TINY)  # a column is in every row or none
    assert all(set(ENV_COLUMNS.values()) <= set(r) for r in mixed.rows)
    assert all(sum(r[c]) == 0 for r in mixed.rows[:2] for c in ENV_COLUMNS.values())
    assert mixed.rows[:2] == tuple({**r, **{c: [0] * len(r[f"{s}_ids"]) for s, c in ENV_COLUMNS.items()}}
                                   for r in plain.rows[:2])

    # A prompt that stops at the output fence (the policy's last words): the completion opens with the
    # environment's text, found in prompt+completion.
    pair = tool_pairs[0]
    head, tail = pair["chosen"].split(OUTPUT_OPEN)
    stopped = {**pair, "prompt": pair["prompt"] + head + OUTPUT_OPEN, "chosen": tail, "rejected": tail + "Wrong.\n"}
    row = encode_pairs([stopped], tokenizer, cfg=replace(TINY, eos="never")).rows[0]
    assert env_runs(row["chosen_env"])[0][0] == 0
    assert tokenizer.decode(row["chosen_ids"][slice(*env_runs(row["chosen_env"])[0])]) == output_texts(
        stopped["prompt"] + tail)[-1]
    only_output = {**stopped, "chosen": output_block("17")}  # no token of the policy's on the chosen side
    assert encode_pairs([only_output], tokenizer, cfg=replace(TINY, eos="never")).dropped == 1


def test_collator_masks_the_environment_in_chosen_and_rejected(tool_pairs, tokenizer):
    """completion_mask is 0 exactly at the environment's tokens (position len(prompt_ids) + j) and 1 at
    the other completion tokens, for both halves of the batch, also when max_length cuts a block."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = list(encode_pairs(tool_pairs[:3], tokenizer, cfg=TINY).rows)
    first = rows[0]
    inside = len(first["prompt_ids"]) + env_runs(first["chosen_env"])[0][0] + 1  # ends inside row 0's block
    for max_length in (TINY.max_length, inside):
        collate = EnvironmentMaskCollator(DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id,
                                                                    max_length=max_length))
        mask = collate(rows)["completion_mask"]
        assert mask.size(0) == 2 * len(rows)  # chosen half, then rejected half
        for i, (side, row) in enumerate((s, r) for s in ENV_COLUMNS for r in rows):
            start, env = len(row["prompt_ids"]), row[ENV_COLUMNS[side]]
            expected = [int(start <= k < start + len(env) and k < max_length and not env[k - start])
                        for k in range(mask.size(1))]
            assert mask[i].tolist() == expected
        assert mask.sum() < collate.base(rows)["completion_mask"].sum()  # the mask acted


# --- the per-pair smoothing reaches TRL's loss ------------------------------------------------------------


def test_trainer_loss_is_cdpo_per_pair(pairs, tokenizer, tiny_model_dir, other_model_dir, tmp_path):
    """The trainer's loss on a batch equals the hand formula with each pair's own epsilon, the
    per-pair margins read from TRL's own metrics (batches of one pair, no smoothing)."""
    import torch
    import torch.nn.functional as F

    cfg = replace(TINY, beta=0.5)
    encoded = encode_pairs(pairs[:4], tokenizer, cfg=cfg)
    trainer = build_trainer(encoded, policy_path=str(tiny_model_dir), ref_path=str(other_model_dir),
                            tokenizer=tokenizer, cfg=cfg, output_dir=str(tmp_path))
    rows = [trainer.train_dataset[i] for i in range(4)]
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]

    def loss(batch_rows, smoothing: bool = True) -> float:
        batch = trainer.data_collator(batch_rows)
        if not smoothing:
            del batch[SMOOTHING_COLUMN]
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).item()

    margins = []
    for row in rows:
        loss([row], smoothing=False)
        margins.append(metrics["rewards/margins"][-1])
    x = torch.tensor(margins)
    assert x.abs().min() > 1e-3  # the reference differs from the policy: the correction is not vacuous
    eps = torch.tensor([r[SMOOTHING_COLUMN] for r in rows])
    assert len(set(eps.tolist())) > 1
    by_hand = (-(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)).mean().item()
    assert loss(rows) == pytest.approx(by_hand, rel=1e-4, abs=1e-5)
    assert loss(rows, smoothing=False) == pytest.approx((-F.logsigmoid(x)).mean().item(), rel=1e-4, abs=1e-5)
    zero = [{**r, SMOOTHING_COLUMN: 0.0} for r in rows]
    assert loss(zero) == pytest.approx(loss(rows, smoothing=False), rel=1e-6, abs=1e-7)


def completion_log_prob(model, row: dict, side: str, *, policy_only: bool) -> float:
    """By hand: the sum of log p(token | everything before it) over the completion's tokens (the
    policy's only, or all of them), from one forward of prompt+completion."""
    import torch

    prompt, ids = row["prompt_ids"], row[f"{side}_ids"]
    env = row[ENV_COLUMNS[side]] if policy_only else [0] * len(ids)
    seq = torch.tensor([prompt + ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), dim=-1)
    return sum(logp[len(prompt) + j - 1, tok].item() for j, tok in enumerate(ids) if not env[j])


def test_log_probs_leave_out_the_environment(tool_pairs, tokenizer, tiny_model_dir, other_model_dir, tmp_path):
    """The reference log-probs TRL precomputes (through our collator, in DPOTrainer.__init__) and the
    policy log-probs of a training batch are the sums over the policy's tokens only."""
    import torch
    from transformers import AutoModelForCausalLM

    encoded = encode_pairs(tool_pairs[:4], tokenizer, cfg=TINY)
    trainer = build_trainer(encoded, policy_path=str(tiny_model_dir), ref_path=str(other_model_dir),
                            tokenizer=tokenizer, cfg=TINY, output_dir=str(tmp_path))
    assert isinstance(trainer.data_collator, SmoothingCollator)  # the smoothing wraps the environment mask
    assert isinstance(trainer.data_collator.base, EnvironmentMaskCollator)
    ref = AutoModelForCausalLM.from_pretrained(str(other_model_dir))
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    for i in range(len(encoded.rows)):
        row = trainer.train_dataset[i]
        for side in ENV_COLUMNS:
            masked = completion_log_prob(ref, row, side, policy_only=True)
            assert row[f"ref_{side}_logps"] == pytest.approx(masked, rel=1e-4, abs=1e-4)
            assert abs(masked - completion_log_prob(ref, row, side, policy_only=False)) > 0.1
        with torch.no_grad():
            trainer.compute_loss(trainer.model, trainer.data_collator([row]))
        for side in ENV_COLUMNS:
            assert metrics[f"logps/{side}"][-1] == pytest.approx(
                completion_log_prob(trainer.model, row, side, policy_only=True), rel=1e-4, abs=1e-4)
    batch = next(iter(trainer.get_train_dataloader()))  # the columns survive remove_unused_columns
    policy_tokens = sum(len(r[f"{s}_ids"]) - sum(r[c]) for r in encoded.rows for s, c in ENV_COLUMNS.items())
    assert SMOOTHING_COLUMN in batch and batch["completion_mask"].sum().item() == policy_tokens


def test_environment_output_does_not_reach_the_loss(pairs, tokenizer, tiny_model_dir, other_model_dir, tmp_path):
    """Steps that end with their output block, in two variants that differ only in the environment's
    output: with the mask, the DPO+NLL loss (smoothing included) and its gradient are the same for both;
    without it (the same batches, the flags removed) they differ. Without EOS nothing follows the block,
    so the output is in no later token's context."""
    import torch

    def variant(chosen_out: int, rejected_out: int) -> dict:
        return {**pairs[1], "chosen": program_step(3, 4, "+", chosen_out),
                "rejected": program_step(3, 4, "-", rejected_out)}

    cfg = replace(TINY, loss_type=("sigmoid", "sft"), eos="never")
    encoded = encode_pairs([variant(17, 7), variant(93, 4)], tokenizer, cfg=cfg)
    a, b = encoded.rows
    assert a[SMOOTHING_COLUMN] > 0  # the smoothing correction is in the loss
    for side in ENV_COLUMNS:  # same length, other tokens, all of them inside the block
        assert len(a[f"{side}_ids"]) == len(b[f"{side}_ids"]) and a[f"{side}_ids"] != b[f"{side}_ids"]
        assert all(x == y or e for x, y, e in zip(a[f"{side}_ids"], b[f"{side}_ids"], a[ENV_COLUMNS[side]]))
    trainer = build_trainer(encoded, policy_path=str(tiny_model_dir), ref_path=str(other_model_dir),
                            tokenizer=tokenizer, cfg=cfg, output_dir=str(tmp_path))
    rows = [trainer.train_dataset[i] for i in range(2)]
    for side in ENV_COLUMNS:
        assert rows[0][f"ref_{side}_logps"] == pytest.approx(rows[1][f"ref_{side}_logps"], rel=1e-5, abs=1e-5)

    def loss_and_grad(row: dict) -> tuple[float, torch.Tensor]:
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, trainer.data_collator([row]))
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])

    (loss_a, grad_a), (loss_b, grad_b) = loss_and_grad(rows[0]), loss_and_grad(rows[1])
    assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6)
    unmasked = [{k: v for k, v in r.items() if k not in ENV_COLUMNS.values()} for r in rows]
    (raw_a, raw_grad_a), (raw_b, raw_grad_b) = loss_and_grad(unmasked[0]), loss_and_grad(unmasked[1])
    assert abs(raw_a - raw_b) > 1e-3 and not torch.allclose(raw_grad_a, raw_grad_b, rtol=1e-4, atol=1e-6)
    trainer.model.zero_grad()


# --- real runs -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(pairs, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "round_0" / "policy"
    result = train_dpo(pairs, policy_path=str(tiny_model_dir), ref_path=str(tiny_model_dir), out_dir=str(out),
                       cfg=TINY)
    return out, result


def test_train_dpo_on_the_tiny_model(trained, pairs, tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from policy.models import load_tokenizer

    out, result = trained
    assert result.steps == 2 and result.pairs == 8
    assert len(result.loss_history) == 2 and all(math.isfinite(v) for v in result.loss_history)
    # reward curves: one value per logged step; the margin is chosen minus rejected, accuracy a share
    for history in (result.margin_history, result.accuracy_history, result.chosen_history, result.rejected_history):
        assert len(history) == 2 and all(math.isfinite(v) for v in history)
    for m, c, r in zip(result.margin_history, result.chosen_history, result.rejected_history):
        assert m == pytest.approx(c - r, abs=1e-5)
    assert all(0.0 <= a <= 1.0 for a in result.accuracy_history)
    assert math.isfinite(result.final_loss) and math.isfinite(result.reward_margin)
    enc = encode_pairs(pairs, tokenizer, cfg=TINY)
    assert result.tokens == enc.tokens_per_epoch  # prompt counted with each completion, 1 epoch
    assert result.mean_smoothing == pytest.approx(enc.mean_smoothing)
    before, after = state_dict(tiny_model_dir), state_dict(out)
    assert before.keys() == after.keys()
    assert not all(bool((before[k] == after[k]).all()) for k in before)  # the weights moved
    AutoModelForCausalLM.from_pretrained(str(out))
    assert load_tokenizer(str(out)).eos_token_id == tokenizer.eos_token_id
    saved = json.loads((out / RESULT_FILE).read_text())
    assert saved["steps"] == 2 and saved["config"]["learning_rate"] == TINY.learning_rate
    assert sorted(p.name for p in out.parent.iterdir()) == ["policy"]  # no temporary folders left


def test_train_dpo_is_deterministic_and_replaces_a_finished_folder(trained, pairs, tiny_model_dir):
    out, result = trained
    first = state_dict(out)
    again = train_dpo(pairs, policy_path=str(tiny_model_dir), ref_path=str(tiny_model_dir), out_dir=str(out),
                      cfg=TINY)
    second = state_dict(out)
    assert again.loss_history == result.loss_history
    assert all(bool((first[k] == second[k]).all()) for k in first)
    assert sorted(p.name for p in out.parent.iterdir()) == ["policy"]


def test_lora_run_saves_a_merged_plain_checkpoint(pairs, tiny_model_dir, other_model_dir, tmp_path):
    out = tmp_path / "policy"
    cfg = replace(TINY, lora=True, lora_r=4, lora_alpha=8, learning_rate=1e-2)
    result = train_dpo(pairs, policy_path=str(tiny_model_dir), ref_path=str(other_model_dir), out_dir=str(out),
                       cfg=cfg)
    assert result.steps == 2 and math.isfinite(result.final_loss)
    assert not (out / "adapter_config.json").exists()
    before, after = state_dict(tiny_model_dir), state_dict(out)
    assert before.keys() == after.keys()  # no lora_A/lora_B keys: a plain model
    changed = {k for k in before if not bool((before[k] == after[k]).all())}
    assert changed and all(any(m in k for m in cfg.lora_target_modules) for k in changed)


def test_train_dpo_subprocess_end_to_end(pairs, tiny_model_dir, tmp_path):
    out = tmp_path / "round_0" / "policy"
    result = train_dpo_subprocess(pairs, policy_path=str(tiny_model_dir), ref_path=str(tiny_model_dir),
                                  out_dir=str(out), cfg=TINY)
    assert result.steps == 2 and result.pairs == 8 and isinstance(result.loss_history, tuple)
    assert result.processes == 1 and result.effective_batch == TINY.batch_size * TINY.grad_accum
    assert (out / "config.json").is_file() and (out / RESULT_FILE).is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["policy"]  # job, pairs and result files removed


@pytest.mark.slow
def test_train_dpo_under_torchrun_on_two_processes(pairs, tiny_model_dir, tmp_path):
    """train.launcher=torchrun, processes=2: DDP over gloo on the CPU trains the tiny model; rank 0
    saves one whole checkpoint and nothing else is left next to it."""
    out = tmp_path / "round_0" / "policy"
    cfg = replace(TINY, launcher="torchrun", processes=2)
    result = train_dpo_subprocess(pairs, policy_path=str(tiny_model_dir), ref_path=str(tiny_model_dir),
                                  out_dir=str(out), cfg=cfg)
    check_two_rank_run(result, out, tiny_model_dir, launcher="torchrun")


def check_two_rank_run(result, out: Path, start: Path, *, launcher: str) -> dict:
    """The checks of a run on 2 ranks x 4 of the 8 pairs, from the model at `start` into `out`: one step,
    finite losses, moved weights, a checkpoint that loads, nothing left next to it. Returns the saved
    train_result.json."""
    from transformers import AutoModelForCausalLM

    assert result.processes == 2 and result.effective_batch == TINY.batch_size * TINY.grad_accum * 2
    assert result.steps == 1 and result.pairs == 8  # 8 pairs, 4 per rank per step: one step per epoch
    assert result.loss_history and all(math.isfinite(v) for v in result.loss_history)
    assert math.isfinite(result.final_loss)
    before, after = state_dict(start), state_dict(out)
    assert before.keys() == after.keys()
    assert not all(bool((before[k] == after[k]).all()) for k in before)  # the weights moved
    AutoModelForCausalLM.from_pretrained(str(out))
    saved = json.loads((out / RESULT_FILE).read_text())
    assert saved["processes"] == 2 and saved["config"]["launcher"] == launcher
    assert sorted(p.name for p in out.parent.iterdir()) == ["policy"]  # job, work folder, temp folders gone
    return saved


def test_several_processes_need_torchrun():
    with pytest.raises(ValueError, match=r"train\.processes=2 needs train\.launcher=torchrun or accelerate"):
        TrainConfig(processes=2)
    with pytest.raises(ValueError, match="train.processes"):
        TrainConfig(launcher="torchrun", processes=0)
    with pytest.raises(ValueError, match="train.launcher"):
        TrainConfig(launcher="mpirun")
    cfg = TrainConfig(launcher="torchrun", processes=2, batch_size=4, grad_accum=3)
    assert cfg.effective_batch == 24


def test_launcher_command_lines(tmp_path):
    import sys

    from policy.dpo import train_command

    job = tmp_path / "job.json"
    assert train_command(job, TINY) == [sys.executable, "-m", "policy.train_main", str(job)]
    assert train_command(job, replace(TINY, launcher="torchrun", processes=3)) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
        "-m", "policy.train_main", str(job)]


ACCELERATE_CONFIGS = Path(__file__).resolve().parent.parent / "conf" / "accelerate"


def accelerate_cfg(name: str, **changes) -> TrainConfig:
    return replace(TINY, launcher="accelerate", accelerate_config=f"conf/accelerate/{name}.yaml", **changes)


@pytest.mark.slow
def test_train_dpo_under_accelerate_on_two_processes(pairs, tiny_model_dir, tmp_path, caplog):
    """train.launcher=accelerate with conf/accelerate/ddp.yaml, processes=2: accelerate's launcher starts two
    DDP ranks (gloo on the CPU); the loss is logged, the weights move, the checkpoint loads."""
    import logging

    out = tmp_path / "round_0" / "policy"
    cfg = accelerate_cfg("ddp", processes=2)
    with caplog.at_level(logging.INFO, logger="policy.dpo"):
        result = train_dpo_subprocess(pairs, policy_path=str(tiny_model_dir), ref_path=str(tiny_model_dir),
                                      out_dir=str(out), cfg=cfg)
    assert any("2 fresh processes (accelerate)" in r.getMessage() for r in caplog.records)
    saved = check_two_rank_run(result, out, tiny_model_dir, launcher="accelerate")
    assert saved["config"]["accelerate_config"] == "conf/accelerate/ddp.yaml"


def test_accelerate_command_line(tmp_path):
    import sys

    from policy.dpo import train_command

    job = tmp_path / "job.json"
    assert train_command(job, accelerate_cfg("zero3", processes=8)) == [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
        str(ACCELERATE_CONFIGS / "zero3.yaml"), "--num_processes", "8", "-m", "policy.train_main", str(job)]
    absolute = tmp_path / "mine.yaml"
    absolute.write_text((ACCELERATE_CONFIGS / "ddp.yaml").read_text())
    cfg = replace(TINY, launcher="accelerate", accelerate_config=str(absolute))
    assert train_command(job, cfg)[5:8] == [str(absolute), "--num_processes", "1"]


@pytest.mark.parametrize("name,engine", [("ddp", "ddp"), ("fsdp", "fsdp"), ("zero3", "deepspeed")])
def test_shipped_accelerate_configs_name_their_engine(name, engine):
    cfg = accelerate_cfg(name, processes=2)
    assert cfg.engine == engine and cfg.effective_batch == TINY.batch_size * TINY.grad_accum * 2


def test_engine_of_the_other_launchers():
    assert TINY.engine == "single"
    assert replace(TINY, launcher="torchrun", processes=2).engine == "ddp"


@pytest.mark.parametrize("changes,match", [
    (dict(accelerate_config=None), r"train\.accelerate_config=None with train\.launcher=accelerate"),
    (dict(accelerate_config="conf/accelerate/nothing.yaml"), "nothing.yaml.*no such file"),
    (dict(accelerate_config="conf/accelerate/fsdp.yaml", device="cpu"), "FSDP with train.device=cpu.*ddp.yaml"),
    (dict(accelerate_config="conf/accelerate/zero3.yaml", device="cpu"), "DEEPSPEED with train.device=cpu"),
    (dict(accelerate_config="conf/accelerate/fsdp.yaml", lora=True), "train.lora under FSDP"),
])
def test_accelerate_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        replace(TINY, launcher="accelerate", **changes)


def test_accelerate_config_only_with_its_launcher():
    with pytest.raises(ValueError, match=r"train\.accelerate_config=.*train\.launcher=torchrun"):
        replace(TINY, launcher="torchrun", accelerate_config="conf/accelerate/ddp.yaml")


def test_accelerate_file_problems_by_hand(tmp_path):
    from policy.dpo import accelerate_problem

    ddp = {"distributed_type": "MULTI_GPU", "mixed_precision": "no", "num_machines": 1}
    assert accelerate_problem(ddp, device="auto", lora=True) is None
    assert "expected one of MULTI_GPU (ddp)" in accelerate_problem({**ddp, "distributed_type": "XLA"}, device="auto",
                                                                   lora=False)
    assert "this machine only" in accelerate_problem({**ddp, "num_machines": 2}, device="auto", lora=False)
    assert "mixed_precision='bf16'" in accelerate_problem({**ddp, "mixed_precision": "bf16"}, device="auto", lora=False)
    fsdp = {**ddp, "distributed_type": "FSDP", "fsdp_config": {"fsdp_state_dict_type": "SHARDED_STATE_DICT"}}
    assert "FULL_STATE_DICT" in accelerate_problem(fsdp, device="cuda", lora=False)
    zero3 = {**ddp, "distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 3}}
    assert "zero3_save_16bit_model" in accelerate_problem(zero3, device="auto", lora=False)
    zero2 = {**ddp, "distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 2}}
    assert accelerate_problem(zero2, device="auto", lora=False) is None
    not_yaml = tmp_path / "list.yaml"
    not_yaml.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="not an accelerate config"):
        replace(TINY, launcher="accelerate", accelerate_config=str(not_yaml))


def test_what_cannot_run_on_this_machine_by_hand():
    from policy.dpo import launch_problem

    zero3, fsdp, ddp = ({"distributed_type": k} for k in ("DEEPSPEED", "FSDP", "MULTI_GPU"))
    assert launch_problem(zero3, device="cuda", deepspeed_installed=False).startswith("DeepSpeed is not installed")
    assert launch_problem(zero3, device="cpu", deepspeed_installed=False).startswith("DeepSpeed is not installed")
    assert launch_problem(zero3, device="cuda", deepspeed_installed=True) is None
    assert "FSDP on the CPU" in launch_problem(fsdp, device="cpu", deepspeed_installed=True)
    assert launch_problem(fsdp, device="cuda", deepspeed_installed=False) is None
    assert launch_problem(ddp, device="cpu", deepspeed_installed=False) is None


def test_an_unrunnable_accelerate_config_fails_before_any_work(pairs, tiny_model_dir, tmp_path):
    """Here (no CUDA GPU, no DeepSpeed) zero3.yaml and fsdp.yaml stop with one line before the child starts
    and before anything is written next to out_dir."""
    import importlib.util

    import torch

    if torch.cuda.is_available() or importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("checks the refusal on a machine without CUDA and DeepSpeed")
    for name, match in [("zero3", "DeepSpeed is not installed"), ("fsdp", "FSDP on the CPU")]:
        out = tmp_path / name / "policy"
        with pytest.raises(RuntimeError, match=match) as err:
            train_dpo_subprocess(pairs, policy_path=str(tiny_model_dir), ref_path=str(tiny_model_dir),
                                 out_dir=str(out), cfg=accelerate_cfg(name, processes=2))
        assert "\n" not in str(err.value) and not out.parent.exists()


def test_engine_mismatch_by_hand():
    from policy.dpo import engine_mismatch

    assert engine_mismatch("ddp", fsdp=False, deepspeed=False) is None
    assert engine_mismatch("single", fsdp=False, deepspeed=False) is None
    assert engine_mismatch("fsdp", fsdp=True, deepspeed=False) is None
    assert engine_mismatch("deepspeed", fsdp=False, deepspeed=True) is None
    assert "should be fsdp, but the trainer runs neither" in engine_mismatch("fsdp", fsdp=False, deepspeed=False)
    assert "should be ddp, but the trainer runs FSDP" in engine_mismatch("ddp", fsdp=True, deepspeed=False)


def test_old_train_json_loads():
    """A result written before `processes` and `effective_batch` existed still loads."""
    from policy.dpo import result_from_dict

    old = dict(final_loss=0.5, reward_margin=0.1, reward_accuracy=0.75, steps=2, pairs=8, tokens=100, seconds=1.0,
               loss_history=[0.6, 0.5], mean_smoothing=0.2)
    result = result_from_dict(old)
    assert result.processes == 1 and result.effective_batch is None and result.loss_history == (0.6, 0.5)


def test_failing_child_raises_and_leaves_nothing(pairs, tiny_model_dir, tmp_path):
    out = tmp_path / "round_0" / "policy"
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(RuntimeError, match="exit code 1") as info:
        train_dpo_subprocess(pairs, policy_path=missing, ref_path=str(tiny_model_dir), out_dir=str(out), cfg=TINY)
    assert "no-such-model" in str(info.value) and "policy_path" in str(info.value)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_autocast_trains_float32_weights(pairs, tiny_model_dir, tmp_path):
    out = tmp_path / "policy"
    result = train_dpo(pairs, policy_path=str(tiny_model_dir), ref_path=str(tiny_model_dir), out_dir=str(out),
                       cfg=replace(TINY, autocast=True))
    assert result.steps == 2 and all(math.isfinite(v) for v in result.loss_history)
    before, after = state_dict(tiny_model_dir), state_dict(out)
    assert all(v.dtype == before[k].dtype for k, v in after.items())  # float32 weights kept
    assert not all(bool((before[k] == after[k]).all()) for k in before)


def test_train_dpo_on_tool_integrated_pairs(tool_pairs, tokenizer, tiny_model_dir, tmp_path):
    """A real run (DPO + NLL, the default loss) on pairs with output blocks trains and moves the weights."""
    cfg = replace(TINY, loss_type=("sigmoid", "sft"))
    out = tmp_path / "policy"
    result = train_dpo(tool_pairs, policy_path=str(tiny_model_dir), ref_path=str(tiny_model_dir), out_dir=str(out),
                       cfg=cfg)
    assert result.steps == 2 and result.pairs == 8 and all(math.isfinite(v) for v in result.loss_history)
    assert result.tokens == encode_pairs(tool_pairs, tokenizer, cfg=cfg).tokens_per_epoch
    before, after = state_dict(tiny_model_dir), state_dict(out)
    assert not all(bool((before[k] == after[k]).all()) for k in before)


def test_dpo_plus_sft_adds_the_chosen_nll(trained, pairs, tiny_model_dir, tmp_path):
    """loss_type=[sigmoid, sft] (DPO + NLL on the chosen side, RPO: Pang et al. 2024) trains through our
    trainer; its first logged loss exceeds plain DPO's by the chosen tokens' NLL under the untrained
    tiny model (about ln(vocab) per token, several nats), not by nothing."""
    import dataclasses

    _, plain = trained
    both = train_dpo(pairs, policy_path=str(tiny_model_dir), ref_path=str(tiny_model_dir), out_dir=str(tmp_path / "p"),
                     cfg=dataclasses.replace(TINY, loss_type=("sigmoid", "sft")))
    assert both.steps == plain.steps and all(math.isfinite(v) for v in both.loss_history)
    assert both.loss_history[0] - plain.loss_history[0] > 2.0


def test_training_process_keeps_freed_memory_unless_told_otherwise(monkeypatch):
    from policy.dpo import MALLOC_ENV, _child_env

    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert {k: _child_env(True)[k] for k in MALLOC_ENV} == MALLOC_ENV
    assert not set(MALLOC_ENV) & set(_child_env(False))
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")  # the caller's own choice wins
    assert _child_env(True)["MALLOC_MMAP_MAX_"] == "65536"


def test_training_prints_a_bar_not_a_dict_per_step(pairs, tiny_model_dir, tmp_path, capfd):
    result = train_dpo(pairs, policy_path=str(tiny_model_dir), ref_path=str(tiny_model_dir),
                       out_dir=str(tmp_path / "policy"), cfg=TINY)
    out, err = capfd.readouterr()
    assert len(result.loss_history) == result.steps == 2  # the logs still reach the result
    assert "'loss'" not in out + err and "'grad_norm'" not in out + err
