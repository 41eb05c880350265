"""Exact statistics against an independent brute force, and the one-step check."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from ge_utils import gradients
from ge_utils.gradients import (
    classify_cases,
    condition_table,
    diagnose_pairs,
    exact_gradient_stats,
    one_step_change,
    pair_logps,
    parameter_set,
)
from ge_utils.logprobs import build_batch, sequence_logprobs, tokenize
from ge_utils.losses import get_loss
from ge_utils.models import tiny_causal_lm

PROMPTS = [[2, 5, 7, 6], [2, 4, 6], [2, 9, 10, 11, 12]]
CHOSEN = [[13, 14, 15, 8], [16, 8], [13, 17]]
REJECTED = [[18, 14, 15, 8], [19, 20, 21, 8], [18]]


def batches(side: str):
    c = build_batch(list(zip(PROMPTS, CHOSEN, strict=True)), 0, side)
    r = build_batch(list(zip(PROMPTS, REJECTED, strict=True)), 0, side)
    return c, r


def brute_grad(model, prompt, response, params=None):
    """Full-sequence forward through model(...).logits, autograd over unique parameters."""
    ids = torch.tensor([prompt + response])
    logp = model(ids).logits.log_softmax(-1)[0]
    u = sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(response))
    plist = [p for n, p in model.named_parameters() if params is None or n in params]
    grads = torch.autograd.grad(u, plist, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).double().flatten()
            for g, p in zip(grads, plist, strict=True)
        ]
    )


@pytest.mark.parametrize("side", ["left", "right"])
def test_exact_stats_match_brute_force(tiny_model, side):
    stats = exact_gradient_stats(tiny_model, *batches(side))
    for i in range(len(PROMPTS)):
        g_w = brute_grad(tiny_model, PROMPTS[i], CHOSEN[i])
        g_l = brute_grad(tiny_model, PROMPTS[i], REJECTED[i])
        torch.testing.assert_close(stats["norm2_chosen"][i], g_w @ g_w, rtol=1e-6, atol=0)
        torch.testing.assert_close(stats["norm2_rejected"][i], g_l @ g_l, rtol=1e-6, atol=0)
        torch.testing.assert_close(stats["inner"][i], g_w @ g_l, rtol=1e-6, atol=1e-12)


def test_tied_embeddings_are_counted_once(tokenizer):
    model = tiny_causal_lm("gpt2", len(tokenizer)).double()
    names = [n for n, _ in parameter_set(model)]
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert sum("wte" in n or "lm_head" in n for n in names) == 1
    # The tied weight can be named by either of its names; naming both counts it once.
    wte = model.get_input_embeddings().weight
    both = parameter_set(
        model, ["lm_head.weight", "transformer.ln_f.bias", "transformer.wte.weight"]
    )
    assert [n for n, _ in both] == ["lm_head.weight", "transformer.ln_f.bias"]
    assert both[0][1] is wte
    stats = exact_gradient_stats(model, *batches("right"))
    g = brute_grad(model, PROMPTS[0], CHOSEN[0])
    assert g.numel() == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(stats["norm2_chosen"][0], g @ g, rtol=1e-6, atol=0)


def test_parameter_subset(tiny_model):
    names = [n for n, _ in tiny_model.named_parameters()][-3:]
    stats = exact_gradient_stats(tiny_model, *batches("right"), params=names)
    g_w = brute_grad(tiny_model, PROMPTS[1], CHOSEN[1], params=set(names))
    g_l = brute_grad(tiny_model, PROMPTS[1], REJECTED[1], params=set(names))
    torch.testing.assert_close(stats["inner"][1], g_w @ g_l, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="unknown parameter name"):
        parameter_set(tiny_model, ["nope.weight"])
    with pytest.raises(ValueError, match="empty"):
        parameter_set(tiny_model, lambda n, p: False)


@pytest.mark.parametrize("loss_name", ["dpo", "cpo", "sppo", "simpo"])
def test_one_step_prediction_matches_realized_signs(tiny_model, loss_name):
    loss = get_loss(loss_name)
    c, r = batches("right")
    ref = (torch.tensor([-30.0, -20.0, -10.0]).double(), torch.tensor([-25.0, -28.0, -9.0]))
    stats = exact_gradient_stats(tiny_model, c, r)
    p = pair_logps(stats["logp_chosen"], stats["logp_rejected"], c, r, ref)
    d_w, d_l = loss.coefficients(p)
    eta = 1e-5 / float(torch.maximum(d_w.abs(), d_l.abs()).max())  # a small step for any loss
    table = condition_table(stats, d_w, d_l, eta=eta)
    before = [p.detach().clone() for p in tiny_model.parameters()]
    realized = one_step_change(tiny_model, c, r, loss, lr=eta, ref=ref)
    for p0, p1 in zip(before, tiny_model.parameters(), strict=True):
        assert torch.equal(p0, p1), "parameters not restored"
    for col, pred in [
        ("realized_delta_chosen", "pred_delta_chosen"),
        ("realized_delta_rejected", "pred_delta_rejected"),
    ]:
        big = table[pred].abs() > 1e-3 * table[pred].abs().max()
        assert (table[pred][big] * realized[col][big] > 0).all()
        # First order: the realized change is close to the prediction for a small step.
        rel = ((realized[col] - table[pred]).abs() / table[pred].abs().max()).max()
        assert rel < 0.05
    assert (table["case"] == realized["realized_case"]).all()


def test_case_labels_and_impossible_fourth_case():
    assert classify_cases(
        torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0, 1.0])
    ).tolist() == [1, 2, 3, 4]
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(500, 2, 6, generator=gen, dtype=torch.float64)
    stats = {
        "norm2_chosen": (g[:, 0] ** 2).sum(1),
        "norm2_rejected": (g[:, 1] ** 2).sum(1),
        "inner": (g[:, 0] * g[:, 1]).sum(1),
        "logp_chosen": torch.zeros(500),
        "logp_rejected": torch.zeros(500),
    }
    d = torch.rand(500, 2, generator=gen, dtype=torch.float64) + 0.01
    assert (condition_table(stats, d[:, 0], d[:, 1])["case"] != 4).all()
    # With d_w = d_l (DPO) the margin grows to first order: C |g_w - g_l|^2 >= 0.
    assert (condition_table(stats, d[:, 0], d[:, 0])["pred_delta_margin"] >= 0).all()


def test_diagnose_pairs_uses_reference_and_loss(tiny_model, tokenizer):
    prompts = ["The film was a delight.", "The food was cold.", "The service was slow."]
    chosen = ["Positive sentiment.", "Negative sentiment.", "Negative."]
    rejected = ["Negative sentiment.", "Positive sentiment.", "Positive."]
    loss = get_loss("dpo", beta=0.2)
    table = diagnose_pairs(tiny_model, tokenizer, prompts, chosen, rejected, loss, progress=False)
    assert list(table["pair"]) == [0, 1, 2]
    assert (table["d_w"] == 0.1).all() and (table["d_l"] == 0.1).all()  # rewards 0: beta/2
    c, r = tokenize(tokenizer, prompts, chosen), tokenize(tokenizer, prompts, rejected)
    stats = exact_gradient_stats(tiny_model, c, r)
    for key, col in [("inner", "grad_inner"), ("norm2_chosen", "grad_norm2_chosen")]:
        torch.testing.assert_close(torch.tensor(table[col].values), stats[key])

    # A reference model: rewards from its log-probs, computed independently here.
    torch.manual_seed(1)
    ref_model = tiny_causal_lm("llama", len(tokenizer)).double().train()
    in_batches = diagnose_pairs(
        tiny_model,
        tokenizer,
        prompts,
        chosen,
        rejected,
        loss,
        ref_model=ref_model,
        batch_size=2,
        progress=False,
    )
    assert ref_model.training, "the reference model's mode was not restored"
    assert list(in_batches["pair"]) == [0, 1, 2]
    with torch.no_grad():
        ref = (sequence_logprobs(ref_model.eval(), c), sequence_logprobs(ref_model, r))
    z = 0.2 * ((stats["logp_chosen"] - ref[0]) - (stats["logp_rejected"] - ref[1]))
    torch.testing.assert_close(torch.tensor(in_batches["d_w"].values), 0.2 * torch.sigmoid(-z))
    torch.testing.assert_close(
        torch.tensor(in_batches["grad_inner"].values), torch.tensor(table["grad_inner"].values)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "ghostly"}, "unknown statistics method 'ghostly'"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"eta": float("nan")}, r"eta \(the step size\) must be a finite number > 0"),
        ({"eta": -1.0}, r"must be a finite number > 0, got -1.0"),
        ({"eta": 0}, r"must be a finite number > 0, got 0"),
    ],
)
def test_diagnose_pairs_rejects_bad_arguments(tiny_model, tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        diagnose_pairs(
            tiny_model, tokenizer, ["p"] * 2, ["a"] * 2, ["b"] * 2, get_loss("dpo"), **kwargs
        )


@pytest.mark.parametrize(
    ("texts", "loss", "message"),
    [
        (("ab", "cd", "ef"), get_loss("dpo"), r"prompts must be a sequence .* got str 'ab'"),
        ((["p"], [None], ["b"]), get_loss("dpo"), r"chosen\[0\] must be a str, got NoneType"),
        ((["p"], ["a"], ["b"]), "dpo", r"loss must be a MarginLoss .* got str 'dpo'"),
    ],
)
def test_diagnose_pairs_rejects_bad_types_before_computing(
    tiny_model, tokenizer, monkeypatch, texts, loss, message
):
    def never(*args, **kwargs):
        raise AssertionError("statistics were computed before the arguments were checked")

    monkeypatch.setattr(gradients, "stats_method", lambda method: never)
    with pytest.raises(TypeError, match=message):
        diagnose_pairs(tiny_model, tokenizer, *texts, loss, progress=False)


def test_zero_change_pair_has_no_case(tiny_model, tokenizer):
    """Identical chosen and rejected: both predictions are exactly 0, so no case (as the CLI
    and the README say); the other pair keeps its case."""
    table = diagnose_pairs(
        tiny_model,
        tokenizer,
        ["The film was a delight.", "The food was cold."],
        ["Positive sentiment.", "Negative sentiment."],
        ["Positive sentiment.", "Positive sentiment."],
        get_loss("dpo"),
        progress=False,
    )
    assert table.loc[0, "pred_delta_chosen"] == 0 and table.loc[0, "pred_delta_rejected"] == 0
    assert pd.isna(table.loc[0, "case"])
    expected = classify_cases(
        torch.tensor(table["pred_delta_chosen"].values),
        torch.tensor(table["pred_delta_rejected"].values),
    )
    assert table.loc[1, "case"] == int(expected[1])


def test_sign_agreement_against_a_loop():
    """Each row agrees when both changes are > 0 or both are <= 0; ``clear`` keeps only the
    predictions above that fraction of the median size, the rest are left out."""
    import pandas as pd

    pred = pd.Series([0.5, -0.2, 0.0, 1e-4, -3.0, 2.0])
    real = pd.Series([0.1, 0.3, -0.1, -1.0, -0.5, 0.0])
    every = gradients.sign_agreement(pred, real)
    assert every.tolist() == [(p > 0) == (r > 0) for p, r in zip(pred, real, strict=True)]
    clear = gradients.sign_agreement(pred, real, clear=0.05)
    median = pred.abs().median()
    kept = [i for i, p in enumerate(pred) if abs(p) > 0.05 * median]
    assert clear.index.tolist() == kept == [0, 1, 4, 5]
    assert clear.tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="4 predicted but 6 realized"):
        gradients.sign_agreement(pred[:4], real)


def test_first_order_identity_checks_hold_on_true_gradients_and_catch_broken_statistics():
    """On statistics of real vectors, no row with d_w, d_l > 0 is in case 4 and no row with
    d_w = d_l has a falling predicted margin; statistics that break Cauchy-Schwarz are caught by
    both, and rows where an identity does not apply are not counted."""
    gen = torch.Generator().manual_seed(0)
    g_w = torch.randn(64, 30, generator=gen, dtype=torch.float64)
    g_l = g_w + 0.1 * torch.randn(64, 30, generator=gen, dtype=torch.float64)  # cosine near 1
    stats = {"norm2_chosen": (g_w * g_w).sum(1), "norm2_rejected": (g_l * g_l).sum(1),
             "inner": (g_w * g_l).sum(1), "logp_chosen": torch.zeros(64),
             "logp_rejected": torch.zeros(64)}
    d = torch.rand(64, generator=gen, dtype=torch.float64) + 0.1
    d_l = d.clone()
    d_l[:16] = -d[:16]  # a negative coefficient (IPO past its target): neither identity applies
    table = condition_table(stats, d, d_l, eta=1e-3)
    assert gradients.case4_count(table) == (0, 48)
    assert gradients.margin_falls_count(table, eta=1e-3) == (0, 48)
    per_row = pd.Series(1e-3, index=table.index)
    assert gradients.margin_falls_count(table, eta=per_row) == (0, 48)
    broken = dict(stats, inner=4 * (stats["norm2_chosen"] + stats["norm2_rejected"]))
    bad = condition_table(broken, d, d, eta=1e-3)
    assert gradients.case4_count(bad) == (64, 64)
    assert gradients.margin_falls_count(bad, eta=1e-3) == (64, 64)
