"""The learned value model (policy/value_model.py): losses, training on the tiny model, saving,
loading, and the search's Evaluator backed by it."""

from __future__ import annotations

import math

import pytest

from mcts.types import EvalRequest, Problem
from policy.value_model import (
    LOSSES,
    ValueModelEvaluator,
    ValueTrainConfig,
    check_losses,
    config_from_dict,
    read_result,
    train_value,
    train_value_subprocess,
    value_complete,
)

GOOD = "Question: 3 + 4?\nStep: 3 + 4 = 7. The answer is 7."
BAD = "Question: 3 + 4?\nStep: 3 + 4 = 9. The answer is 9."
TINY = ValueTrainConfig(loss=("bce", "bt"), learning_rate=5e-3, epochs=6, batch_size=4, max_length=64, seed=0,
                        device="cpu")


def test_loss_table_values():
    import torch

    s, y = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    assert torch.allclose(LOSSES["mse"][1](s, y), torch.tensor([0.25, torch.sigmoid(torch.tensor(2.0)) ** 2]))
    assert torch.allclose(LOSSES["bce"][1](s, y), torch.tensor([math.log(2), math.log(1 + math.exp(2))]))
    c, r = torch.tensor([1.0]), torch.tensor([-1.0])
    bt = -math.log(1 / (1 + math.exp(-2)))
    assert LOSSES["bt"][1](c, r).item() == pytest.approx(bt)
    # Eurus: BT plus -log sigmoid(r_c) - log sigmoid(-r_r)
    assert LOSSES["bt_dr"][1](c, r).item() == pytest.approx(bt + 2 * -math.log(1 / (1 + math.exp(-1))))
    assert {kind for kind, _ in LOSSES.values()} == {"point", "pair"}


def test_bad_loss_names_and_weights_are_named():
    with pytest.raises(ValueError, match="unknown or empty.*'hinge'"):
        check_losses(ValueTrainConfig(loss=("hinge",)))
    with pytest.raises(ValueError, match="1 weights for 2 losses"):
        check_losses(ValueTrainConfig(loss=("bce", "bt"), loss_weights=(1.0,)))
    with pytest.raises(ValueError, match="unknown value training key"):
        config_from_dict({"los": ["bce"]})
    assert config_from_dict({"loss": ["mse"], "epochs": 1}) == ValueTrainConfig(loss=("mse",), epochs=1)


@pytest.mark.slow
def test_trains_orders_pairs_saves_and_serves(tiny_model_dir, tmp_path):
    examples = [(GOOD, 1.0), (BAD, 0.0)] * 4
    pairs = [(GOOD, BAD)] * 4
    out = tmp_path / "value"
    result = train_value(examples, pairs, base_path=str(tiny_model_dir), out_dir=str(out), cfg=TINY)
    assert value_complete(out) and read_result(out) == result
    assert result.examples == 8 and result.pairs == 4 and result.steps == 6 * 3
    assert result.loss_history[-1] < result.loss_history[0]
    assert result.pair_accuracy == 1.0

    problem = Problem(id="p", question="3 + 4?", answer="7")
    evaluator = ValueModelEvaluator(out, lambda p, steps: "Question: " + p.question + "\nStep: " + " ".join(steps),
                                    device="cpu", max_length=64)
    good, bad, empty = evaluator.evaluate([EvalRequest(problem, ("3 + 4 = 7. The answer is 7.",)),
                                           EvalRequest(problem, ("3 + 4 = 9. The answer is 9.",)),
                                           EvalRequest(problem, ())])
    assert 0.0 <= bad.score < good.score <= 1.0 and 0.0 <= empty.score <= 1.0
    assert good.prompt_tokens > empty.prompt_tokens > 0
    assert evaluator.evaluate([]) == []


@pytest.mark.slow
def test_subprocess_trains_and_reports_failure(tiny_model_dir, tmp_path):
    cfg = ValueTrainConfig(loss=("mse",), epochs=1, batch_size=2, max_length=32, device="cpu")
    result = train_value_subprocess([(GOOD, 1.0), (BAD, 0.0)], [], base_path=str(tiny_model_dir),
                                    out_dir=str(tmp_path / "value"), cfg=cfg)
    assert result.steps == 1 and result.pair_accuracy is None and value_complete(tmp_path / "value")
    with pytest.raises(RuntimeError, match="value model training failed"):
        train_value_subprocess([(GOOD, 1.0)], [], base_path=str(tmp_path / "missing"),
                               out_dir=str(tmp_path / "value2"), cfg=cfg)
    assert not (tmp_path / "value2").exists()


@pytest.mark.slow
def test_tokens_are_counted_from_the_training_forwards(tiny_model_dir, tmp_path):
    """The FLOP ledger's tokens: each trained text's tokens, cut to max_length, once per epoch (the count a
    second tokenization of every text gave before); pairs only with a pair loss; the pair-accuracy pass not."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    long = GOOD + " So 7 is the sum of 3 and 4, and 4 + 3 = 7 too."
    examples, pairs = [(GOOD, 1.0), (BAD, 0.0), (long, 1.0)], [(long, BAD)]
    cfg = ValueTrainConfig(loss=("bce", "bt"), epochs=2, batch_size=3, micro_batch=2, max_length=32, device="cpu")
    lengths = {t: len(ids) for t, ids in zip((GOOD, BAD, long), AutoTokenizer.from_pretrained(tiny_model_dir)(
        [GOOD, BAD, long])["input_ids"])}
    assert lengths[GOOD] < cfg.max_length < lengths[long]  # one text is cut

    def count(texts):
        return sum(min(lengths[t], cfg.max_length) for t in texts)

    both = train_value(examples, pairs, base_path=str(tiny_model_dir), out_dir=str(tmp_path / "a"), cfg=cfg)
    assert both.tokens == 2 * count([GOOD, BAD, long, long, BAD]) and both.pair_accuracy is not None
    points = train_value(examples, pairs, base_path=str(tiny_model_dir), out_dir=str(tmp_path / "b"),
                         cfg=replace(cfg, loss=("bce",), epochs=1))
    assert points.tokens == count([GOOD, BAD, long])


def test_nothing_to_train_on_is_named(tmp_path):
    with pytest.raises(ValueError, match="nothing to train on"):
        train_value([], [(GOOD, BAD)], base_path="unused", out_dir=str(tmp_path / "v"),
                    cfg=ValueTrainConfig(loss=("bce",)))


def test_ranked_answer_plain_and_weighted():
    from harness.evaluation import ranked_answer

    same = lambda a, b: float(a) == float(b)  # noqa: E731
    answers, scores = ["3", "4", "4.0", None], [0.9, 0.5, 0.5, 1.0]
    assert ranked_answer(answers, scores, same, "plain") == "3"  # the best sample with an answer
    assert ranked_answer(answers, scores, same, "weighted") == "4"  # 0.5 + 0.5 > 0.9
    assert ranked_answer([None, None], [0.1, 0.2], same, "plain") is None


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_pooling_serves_the_same_scores(tiny_model_dir, tmp_path):
    """value.engine=vllm: vLLM's pooling runner scores the saved folder as transformers does."""
    from conftest import vllm_available
    from policy.backends import BackendConfig
    from policy.value_model import make_value_evaluator

    if not vllm_available():
        pytest.skip("vllm is not installed")
    out = tmp_path / "value"
    train_value([(GOOD, 1.0), (BAD, 0.0)], [], base_path=str(tiny_model_dir), out_dir=str(out),
                cfg=ValueTrainConfig(loss=("bce",), epochs=1, batch_size=2, max_length=64, device="cpu"))
    problem = Problem(id="p", question="3 + 4?", answer="7")
    text = lambda p, steps: "Question: " + p.question + "\nStep: " + " ".join(steps)  # noqa: E731
    requests = [EvalRequest(problem, ("3 + 4 = 7.",)), EvalRequest(problem, ("3 + 4 = 9.",)), EvalRequest(problem, ())]
    hf = make_value_evaluator(out, text, engine="hf", device="cpu", max_length=64, batch_size=4)
    served = make_value_evaluator(out, text, engine="vllm", device="cpu", max_length=64, batch_size=4,
                                  backend_cfg=BackendConfig(name="vllm", dtype="float32", max_model_len=256,
                                                            gpu_memory_utilization=0.05))
    try:
        a, b = hf.evaluate(requests), served.evaluate(requests)
    finally:
        served.close()
    assert [x.prompt_tokens for x in a] == [x.prompt_tokens for x in b]
    for x, y in zip(a, b):
        assert x.score == pytest.approx(y.score, abs=2e-3)
    with pytest.raises(ValueError, match="value.engine='tpu'"):
        make_value_evaluator(out, text, engine="tpu", device="cpu", max_length=64, batch_size=4)


@pytest.mark.slow
def test_micro_batches_give_the_full_batch_step(tiny_model_dir, tmp_path):
    """value.train.micro_batch changes memory only: the same losses and weights as one forward per step."""
    import torch
    from transformers import AutoModelForSequenceClassification

    examples, pairs = [(GOOD, 1.0), (BAD, 0.0), (GOOD + " Yes.", 0.5)], [(GOOD, BAD)]
    results, models = [], []
    for micro in (1, 4):
        cfg = ValueTrainConfig(loss=("bce", "bt_dr"), epochs=2, batch_size=4, micro_batch=micro, max_length=64,
                               learning_rate=1e-3, device="cpu")
        out = tmp_path / f"micro{micro}"
        results.append(train_value(examples, pairs, base_path=str(tiny_model_dir), out_dir=str(out), cfg=cfg))
        models.append(AutoModelForSequenceClassification.from_pretrained(out))
    assert results[0].loss_history == pytest.approx(results[1].loss_history, rel=1e-4)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-5)
