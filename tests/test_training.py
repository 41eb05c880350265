"""The training loop on tiny models: history columns, determinism, NaN stop, caching."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from ge_utils.losses import MarginLoss
from ge_utils.models import tiny_causal_lm
from ge_utils.training import (
    TrainConfig,
    TrainingDivergedError,
    cached_run,
    preference_optimization,
    sft,
)

PROMPT = "The film was a delight from start to finish."
PAIRS = [
    {"prompt": PROMPT, "chosen": "Positive sentiment.", "rejected": "Negative sentiment."},
    {
        "prompt": "The service was slow and the food was cold.",
        "chosen": "Negative sentiment.",
        "rejected": "Positive sentiment.",
    },
    {
        "prompt": "The film was slow.",
        "chosen": "Negative sentiment based on my judgement.",
        "rejected": "Positive sentiment based on my judgement.",
    },
    {
        "prompt": "The food was a delight.",
        "chosen": "Positive sentiment based on my judgement.",
        "rejected": "Negative sentiment based on my judgement.",
    },
]


def run(tokenizer, method="exact", seed=0, **overrides):
    model = tiny_causal_lm("llama", len(tokenizer), seed=seed)
    sft_cfg = TrainConfig(steps=3, batch_size=2, lr=1e-2, progress=False, seed=seed)
    sft_hist = sft(model, tokenizer, [(p["prompt"], p["chosen"]) for p in PAIRS], sft_cfg)
    cfg = TrainConfig(
        steps=4,
        batch_size=2,
        lr=1e-2,
        eval_every=2,
        stats_method=method,
        progress=False,
        seed=seed,
        **overrides,
    )
    return sft_hist, preference_optimization(model, tokenizer, PAIRS, PAIRS[:2], cfg, PAIRS[2:])


def test_history_has_every_column(tokenizer):
    sft_hist, res = run(tokenizer)
    assert list(sft_hist.columns) == ["step", "sft_loss"] and len(sft_hist) == 3
    assert list(res.steps["step"]) == [1, 2, 3, 4]
    assert {"loss", "train_margin", "lr", "seconds"} <= set(res.steps.columns)
    eval_rows = res.pairs[res.pairs["split"] == "eval"]
    probe_rows = res.pairs[res.pairs["split"] == "probe"]
    assert sorted(eval_rows["step"].unique()) == [0, 2, 4]
    assert sorted(probe_rows["step"].unique()) == [0, 2, 4]
    for col in [
        "logp_chosen",
        "logp_rejected",
        "reward_chosen",
        "reward_rejected",
        "margin",
        "d_w",
        "d_l",
    ]:
        assert eval_rows[col].notna().all(), col
    for col in [
        "grad_inner",
        "grad_norm2_chosen",
        "grad_norm2_rejected",
        "cosine",
        "case",
        "pred_delta_chosen",
        "pred_delta_rejected",
    ]:
        assert probe_rows[col].notna().all(), col
    # At step 0 the policy is the reference: every reward is exactly zero.
    assert (
        (eval_rows[eval_rows["step"] == 0][["reward_chosen", "reward_rejected"]] == 0).all().all()
    )
    assert res.means("eval")["margin"].iloc[-1] > res.means("eval")["margin"].iloc[0]


def test_same_seed_same_history(tokenizer):
    _, a = run(tokenizer, seed=3)
    _, b = run(tokenizer, seed=3)
    timing = ["seconds"]  # wall time is the one column that may differ
    pd.testing.assert_frame_equal(a.steps.drop(columns=timing), b.steps.drop(columns=timing))
    pd.testing.assert_frame_equal(a.pairs, b.pairs)


def test_nan_loss_stops_with_step_and_history(tokenizer, monkeypatch):
    import ge_utils.training as training

    real = training.get_objective

    calls = []

    class Poisoned(MarginLoss):  # the same loss, NaN at its third training call
        def loss(self, p):
            out = super().loss(p)
            if out.requires_grad:
                calls.append(1)
                if len(calls) == 3:
                    return out * math.nan
            return out

    def poisoned(name, **kw):
        inner = real(name, **kw)
        return Poisoned(inner.spec, inner.hyperparameters)

    monkeypatch.setattr(training, "get_objective", poisoned)
    with pytest.raises(TrainingDivergedError, match="at step 3") as info:
        run(tokenizer, method="none")
    assert list(info.value.history.steps["step"]) == [1, 2]


def test_cached_run_reuses_and_ignores_incomplete(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {
            "steps": pd.DataFrame({"step": [1], "loss": [0.5]}),
            "pairs": pd.DataFrame({"step": [0], "split": ["eval"], "pair": [0]}),
        }

    params = {"lr": 1e-3, "loss": "dpo"}
    first = cached_run(tmp_path, params, compute)
    second = cached_run(tmp_path, params, compute)
    assert len(calls) == 1
    for name in ("steps", "pairs"):
        pd.testing.assert_frame_equal(first[name], second[name])
    (next(tmp_path.iterdir()) / "params.json").unlink()  # as if killed before the end
    cached_run(tmp_path, params, compute)
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"lr": -1.0}, "lr must be"),
        ({"optimizer": "lion"}, "optimizer must be"),
        ({"loss": "nope"}, "nope"),
        ({"loss_params": {"bogus": 1.0}}, "bogus"),
    ],
)
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_sgd_and_grad_accum_match_full_batch(tokenizer):
    """Two accumulated half-batches give the same update as one full batch (plain SGD)."""
    results = []
    for accum, bs in [(1, 4), (2, 2)]:
        torch.manual_seed(0)
        model = tiny_causal_lm("gpt2", len(tokenizer)).double()
        cfg = TrainConfig(
            steps=1,
            batch_size=bs,
            grad_accum=accum,
            lr=0.1,
            optimizer="sgd",
            stats_method="none",
            progress=False,
        )
        preference_optimization(model, tokenizer, PAIRS, PAIRS[:1], cfg)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)


def test_training_pair_stats_equal_exact_stats_before_the_step(tokenizer):
    from ge_utils.gradients import exact_gradient_stats
    from ge_utils.training import encode_pairs, pair_batches

    torch.manual_seed(0)
    model = tiny_causal_lm("gpt2", len(tokenizer)).double()
    enc = encode_pairs(tokenizer, PAIRS)
    exact = exact_gradient_stats(model, *pair_batches(enc, range(len(PAIRS)), 0, "cpu"))
    cfg = TrainConfig(
        steps=1,
        batch_size=2,
        grad_accum=2,
        lr=0.1,
        optimizer="sgd",
        stats_method="none",
        train_stats=True,
        progress=False,
    )
    res = preference_optimization(model, tokenizer, PAIRS, PAIRS[:1], cfg)
    train = res.pairs[res.pairs["split"] == "train"].sort_values("pair")
    assert list(train["pair"]) == [0, 1, 2, 3] and (train["step"] == 0).all()
    for col, key in [
        ("grad_inner", "inner"),
        ("grad_norm2_chosen", "norm2_chosen"),
        ("grad_norm2_rejected", "norm2_rejected"),
    ]:
        torch.testing.assert_close(torch.tensor(train[col].values), exact[key], rtol=1e-8, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_grad_norm": -1.0}, r"max_grad_norm must be None \(no clipping\) or a finite"),
        ({"max_grad_norm": math.nan}, "max_grad_norm must be .* got nan"),
        ({"max_grad_norm": 0}, "max_grad_norm must be .* > 0, got 0"),
        ({"weight_decay": math.nan}, "weight_decay must be a finite number >= 0, got nan"),
        ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0, got -1.0"),
        ({"lr": True}, "lr must be a positive finite number, got True"),
        ({"seed": "a"}, "seed must be an integer, got 'a'"),
        ({"warmup_steps": "2"}, "warmup_steps must be an integer >= 0, got '2'"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0, got -1"),
        ({"template": "chatml"}, "template must be 'none' or 'chat', got 'chatml'"),
    ],
)
def test_bad_values_are_named_on_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_valid_configs_are_kept():
    cfg = TrainConfig(max_grad_norm=1.0, weight_decay=0.01, warmup_steps=2, seed=-1, lr=1)
    assert (cfg.max_grad_norm, cfg.weight_decay, cfg.warmup_steps, cfg.seed) == (1.0, 0.01, 2, -1)


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        ("ab", "examples must be a sequence of .* pairs, got a str 'ab'"),
        (["ab"], r"examples\[0\] must be a \(prompt, response\) pair of strings, got str 'ab'"),
        ([("p", None)], r"examples\[0\] must be .* got tuple \('p', None\)"),
    ],
)
def test_sft_wants_pairs_of_strings(tokenizer, examples, message):
    model = tiny_causal_lm("llama", len(tokenizer)).double()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=message):
        sft(model, tokenizer, examples, TrainConfig(steps=1, progress=False))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_preference_pairs_want_strings(tokenizer):
    model = tiny_causal_lm("llama", len(tokenizer)).double()
    bad = [{"prompt": "p", "chosen": None, "rejected": "b"}]
    with pytest.raises(TypeError, match="pair 0: chosen must be a str, got NoneType None"):
        preference_optimization(model, tokenizer, bad, bad, TrainConfig(steps=1, progress=False))
