"""The mitigations: normalized steps against brute-force per-pair gradients and their first-order
guarantee; the token-mask objective's gradients against an independent implementation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_gradients import CHOSEN, PROMPTS, REJECTED, batches, brute_grad
from test_training import PAIRS

from ge_utils.gradients import exact_gradient_stats, pair_logps
from ge_utils.logprobs import build_batch, concat_batches, sequence_logprobs, token_logprobs
from ge_utils.mitigations import (
    contrastive_mask,
    first_order_normalized,
    get_mitigation,
    get_objective,
)
from ge_utils.models import tiny_causal_lm
from ge_utils.training import TrainConfig, preference_optimization

REF = (torch.tensor([-30.0, -20.0, -10.0]).double(), torch.tensor([-25.0, -28.0, -9.0]).double())


def flat_grad(model) -> torch.Tensor:
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((p.grad if p.grad is not None else torch.zeros_like(p)).flatten())
    return torch.cat(out).double()


def test_normalized_step_is_the_normalized_direction(tiny_model):
    """The parameter gradient is -(1/n) sum_i c_i (g_w/|g_w| - g_l/|g_l|), from brute force."""
    c, r = batches("right")
    method = get_mitigation("normalized_dpo", beta=0.5)
    tiny_model.zero_grad()
    _, u_w, u_l, stats = method.microstep(tiny_model, c, r, REF, n_total=3, record_stats=True)
    got = flat_grad(tiny_model)
    z = 0.5 * ((u_w - REF[0]) - (u_l - REF[1]))
    weight = 0.5 * torch.sigmoid(-z)
    want = torch.zeros_like(got)
    for i in range(3):
        g_w = brute_grad(tiny_model, PROMPTS[i], CHOSEN[i])
        g_l = brute_grad(tiny_model, PROMPTS[i], REJECTED[i])
        want -= weight[i] * (g_w / g_w.norm() - g_l / g_l.norm()) / 3
        assert stats["norm2_chosen"][i] == pytest.approx(float(g_w @ g_w), rel=1e-8)
        assert stats["inner"][i] == pytest.approx(float(g_w @ g_l), rel=1e-6, abs=1e-10)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    # The recorded effective coefficients: d_w = c / |g_w|, d_l = c / |g_l|.
    assert torch.allclose(stats["d_w"], weight / stats["norm2_chosen"].sqrt(), rtol=1e-10)


def sgd_step(model, lr: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad


@pytest.mark.parametrize("pair", [0, 1, 2])
def test_first_order_guarantee_chosen_up_rejected_down(tiny_model, pair):
    """One normalized step on a pair alone: chosen rises by eta c |g_w| (1 - cos) and rejected
    falls by eta c |g_l| (1 - cos), whatever the inner product (checked to first order)."""
    c, r = batches("right")
    c, r = c.select([pair]), r.select([pair])
    ref = (REF[0][[pair]], REF[1][[pair]])
    stats = exact_gradient_stats(tiny_model, c, r)
    method = get_mitigation("normalized_dpo")
    eta = 1e-4
    before = [p.detach().clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    _, u_w, u_l, _ = method.microstep(tiny_model, c, r, ref, n_total=1)
    weight = method.base.coefficients(pair_logps(u_w, u_l, c, r, ref))[0]
    sgd_step(tiny_model, eta)
    with torch.no_grad():
        after = sequence_logprobs(tiny_model, concat_batches(c, r))
    pred = first_order_normalized(stats, weight, eta)
    d_w, d_l = after[0] - u_w[0], after[1] - u_l[0]
    assert float(d_w) > 0 and float(d_l) < 0
    assert float(d_w) == pytest.approx(float(pred["pred_delta_chosen"][0]), rel=0.02)
    assert float(d_l) == pytest.approx(float(pred["pred_delta_rejected"][0]), rel=0.02)
    with torch.no_grad():
        for p, p0 in zip(tiny_model.parameters(), before, strict=True):
            p.copy_(p0)


def test_first_order_guarantee_holds_for_any_inner_product():
    """The predicted changes have the guaranteed signs for random statistics, cos in (-1, 1)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(500, 2, 6, generator=gen, dtype=torch.float64)
    g[:250, 1] = g[:250, 0] + 0.05 * g[:250, 1]  # nearly parallel: large positive inner products
    stats = {
        "norm2_chosen": (g[:, 0] ** 2).sum(1),
        "norm2_rejected": (g[:, 1] ** 2).sum(1),
        "inner": (g[:, 0] * g[:, 1]).sum(1),
    }
    pred = first_order_normalized(stats, torch.rand(500, generator=gen, dtype=torch.float64), 0.1)
    assert (pred["pred_delta_chosen"] > 0).all() and (pred["pred_delta_rejected"] < 0).all()


def token_sums(model, batch, i, weights, ref_tok):
    """Independent: full-sequence logits of row i, explicit loop over its response tokens.
    Returns (sum m_t (l_t - ref_t), sum m_t l_t, mean m_t)."""
    keep = batch.attention_mask[i].bool()
    ids, resp = batch.input_ids[i][keep], batch.response_mask[i][keep]
    logp = model(ids[None]).logits.log_softmax(-1)[0]
    cols = batch.response_mask[i].nonzero().flatten()
    reward, plain = 0.0, 0.0
    for k, pos in enumerate(resp.nonzero().flatten().tolist()):
        lp, m = logp[pos - 1, ids[pos]], weights[i, cols[k]]
        reward = reward + m * (lp - ref_tok[i, cols[k]])
        plain = plain + m * lp
    return reward, plain, weights[i, cols].mean()


def test_learned_mask_gradients_match_an_independent_implementation(tiny_model):
    """Model gradients: DPO on masked rewards, mask fixed. Mask gradients: the sparse contrast
    objective on the current log-probs, model fixed."""
    c, r = batches("left")
    gen = torch.Generator().manual_seed(1)
    ref_w = torch.randn(c.input_ids.shape, generator=gen, dtype=torch.float64) * c.response_mask
    ref_l = torch.randn(r.input_ids.shape, generator=gen, dtype=torch.float64) * r.response_mask
    beta, lam = 0.7, 0.3
    method = get_mitigation("masked_dpo", beta=beta, lam=lam)
    vocab = tiny_model.get_output_embeddings().weight.shape[0]
    method.ensure_parameters(vocab, "cpu")
    method.logits.data = torch.randn(vocab, generator=gen, dtype=torch.float64)
    tiny_model.zero_grad()
    method.microstep(tiny_model, c, r, REF, 3, ref_tokens=(ref_w, ref_l))
    got_model, got_mask = flat_grad(tiny_model), method.logits.grad.clone()

    logits = method.logits.detach().clone().requires_grad_(True)
    m_w = torch.sigmoid(logits[c.input_ids]) * c.response_mask
    m_l = torch.sigmoid(logits[r.input_ids]) * r.response_mask
    tiny_model.zero_grad()
    model_loss, mask_loss = 0.0, 0.0
    for i in range(3):
        rw, _, _ = token_sums(tiny_model, c, i, m_w.detach(), ref_w)
        rl, _, _ = token_sums(tiny_model, r, i, m_l.detach(), ref_l)
        model_loss = model_loss - F.logsigmoid(beta * (rw - rl)) / 3
    model_loss.backward()
    want_model = flat_grad(tiny_model)
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    for i in range(3):
        _, pw, mw = token_sums(tiny_model, c, i, m_w, ref_w)
        _, pl, ml = token_sums(tiny_model, r, i, m_l, ref_l)
        mask_loss = mask_loss + (-F.logsigmoid(beta * (pw - pl)) + lam * (mw + ml) / 2) / 3
    mask_loss.backward()
    assert (got_model - want_model).abs().max() <= 1e-8 * want_model.abs().max()
    assert torch.allclose(got_mask, logits.grad, rtol=1e-8, atol=1e-14)
    used = {t for seqs in (CHOSEN, REJECTED) for s in seqs for t in s}
    unused = [v for v in range(vocab) if v not in used]
    assert float(got_mask[unused].abs().max()) == 0


def _token_reference(model, c, r):
    with torch.no_grad():
        return token_logprobs(model, c), token_logprobs(model, r)


def test_oracle_mask_marks_the_contrastive_tokens():
    c = build_batch([([1, 2], [5, 6, 7, 8]), ([1], [9, 6])], 0, "left")
    r = build_batch([([1, 2], [4, 6, 7, 8]), ([1], [9, 6, 3])], 0, "left")
    m_w, m_l = contrastive_mask(c, r)
    assert m_w[c.response_mask].tolist() == [1, 0, 0, 0, 0, 0]
    assert m_l[r.response_mask].tolist() == [1, 0, 0, 0, 0, 0, 1]
    assert float(m_w[~c.response_mask].abs().sum()) == 0


def test_oracle_masked_gradient_is_dpo_on_the_contrastive_token(tiny_model):
    c, r = batches("right")
    ref_tok = _token_reference(tiny_model, c, r)
    method = get_mitigation("oracle_masked_dpo", beta=0.3)
    tiny_model.zero_grad()
    method.microstep(tiny_model, c, r, REF, 3, ref_tokens=ref_tok)
    got = flat_grad(tiny_model)
    # At the reference, every reward is 0: the weight is beta/2 and only differing tokens move.
    want = torch.zeros_like(got)
    for i in range(3):
        n = min(len(CHOSEN[i]), len(REJECTED[i]))
        diff_w = [k for k in range(len(CHOSEN[i])) if k >= n or CHOSEN[i][k] != REJECTED[i][k]]
        diff_l = [k for k in range(len(REJECTED[i])) if k >= n or CHOSEN[i][k] != REJECTED[i][k]]
        for sign, resp, diff in ((-1, CHOSEN[i], diff_w), (1, REJECTED[i], diff_l)):
            for k in diff:
                want += sign * 0.15 * brute_grad(tiny_model, PROMPTS[i] + resp[:k], [resp[k]]) / 3
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("normalised_dpo", {}, "unknown loss 'normalised_dpo'.*mitigations: normalized_dpo"),
        ("masked_dpo", {"mask_init": 1.0}, "'mask_init' must be in \\(0, 1\\)"),
        ("masked_dpo", {"lam": -1}, "'lam' must be >= 0"),
        ("masked_dpo", {"mask_lr": "fast"}, "'mask_lr' must be a number"),
        ("normalized_dpo", {"gamma": 1}, "unknown hyperparameter 'gamma'"),
        ("oracle_masked_dpo", {"beta": float("nan")}, "'beta' must be finite"),
    ],
)
def test_bad_mitigation_arguments_are_rejected(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_objective(name, **kwargs)


def test_train_stats_need_unmasked_gradients():
    with pytest.raises(ValueError, match="train_stats is not available with 'masked_dpo'"):
        TrainConfig(loss="masked_dpo", train_stats=True)
    TrainConfig(loss="normalized_dpo", train_stats=True)


@pytest.mark.parametrize("name", ["normalized_dpo", "masked_dpo", "oracle_masked_dpo"])
def test_mitigations_train_in_the_loop(tokenizer, name):
    def once():
        model = tiny_causal_lm("llama", len(tokenizer), seed=0)
        cfg = TrainConfig(
            steps=3,
            batch_size=2,
            lr=1e-2,
            eval_every=1,
            loss=name,
            train_stats=name == "normalized_dpo",
            progress=False,
        )
        return preference_optimization(model, tokenizer, PAIRS, PAIRS[:2], cfg, PAIRS[2:])

    res = once()
    assert len(res.steps) == 3 and res.steps["loss"].notna().all()
    held = res.means("eval")
    assert held["margin"].iloc[-1] > held["margin"].iloc[0]
    if name == "masked_dpo":
        mask = res.extra["mask"]
        assert set(mask["step"]) == {0, 1, 2, 3} and mask["weight"].between(0, 1).all()
        # Adam's first step moves every used logit by exactly mask_lr (0.25, its own rate).
        logit = torch.logit(torch.tensor(mask[mask["step"] == 1]["weight"].to_numpy()))
        assert torch.allclose(logit.abs(), torch.full_like(logit, 0.25), atol=1e-4)
    if name == "normalized_dpo":
        train = res.pairs[res.pairs["split"] == "train"]
        assert len(train) == 6 and (train["case"] == 1).all()
    again = once()
    pd_equal = res.steps.drop(columns="seconds").equals(again.steps.drop(columns="seconds"))
    assert pd_equal and res.pairs.equals(again.pairs)


def test_normalized_step_check_against_brute_force(tiny_model):
    """Per pair: cosine and first-order prediction from brute-force gradients, realized changes
    within 2% of them (a small step), the guaranteed signs, parameters restored exactly."""
    from ge_utils.mitigations import normalized_step_check

    c, r = batches("right")
    before = [p.detach().clone() for p in tiny_model.parameters()]
    table = normalized_step_check(tiny_model, c, r, REF, beta=0.5, step_size=1e-4)
    for p, p0 in zip(tiny_model.parameters(), before, strict=True):
        assert torch.equal(p, p0)
    assert list(table["pair"]) == [0, 1, 2] and table["holds"].all()
    with torch.no_grad():
        u = sequence_logprobs(tiny_model, concat_batches(c, r))
    weight = 0.5 * torch.sigmoid(-0.5 * ((u[:3] - REF[0]) - (u[3:] - REF[1])))
    eta = float(table["eta"].iloc[0])
    for i in range(3):
        g_w = brute_grad(tiny_model, PROMPTS[i], CHOSEN[i])
        g_l = brute_grad(tiny_model, PROMPTS[i], REJECTED[i])
        cos = float(g_w @ g_l / (g_w.norm() * g_l.norm()))
        row = table.iloc[i]
        assert row["cosine"] == pytest.approx(cos, rel=1e-8)
        assert row["weight"] == pytest.approx(float(weight[i]), rel=1e-8)
        pred_w = eta * float(weight[i] * g_w.norm()) * (1 - cos)
        pred_l = -eta * float(weight[i] * g_l.norm()) * (1 - cos)
        assert row["pred_delta_chosen"] == pytest.approx(pred_w, rel=1e-8)
        assert row["pred_delta_rejected"] == pytest.approx(pred_l, rel=1e-8)
        assert row["realized_delta_chosen"] == pytest.approx(pred_w, rel=0.02)
        assert row["realized_delta_rejected"] == pytest.approx(pred_l, rel=0.02)
    # The median predicted chosen change is the requested step size.
    assert float(table["pred_delta_chosen"].median()) == pytest.approx(1e-4, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"step_size": 0.0}, "step_size must be"), ({"step_size": float("nan")}, "step_size")],
)
def test_normalized_step_check_rejects_bad_input(tiny_model, kwargs, message):
    from ge_utils.mitigations import normalized_step_check

    c, r = batches("right")
    with pytest.raises(ValueError, match=message):
        normalized_step_check(tiny_model, c, r, **kwargs)
    with pytest.raises(ValueError, match="as many chosen as rejected"):
        normalized_step_check(tiny_model, c, r.select([0, 1]))


def test_normalized_guarantee_over_seeds_holds_on_a_tiny_model():
    """The chapter's check: every single-pair step realizes chosen up and rejected down, with
    realized changes within 5% of the first-order prediction at a 1e-3-nat step."""
    from ge_utils.loss_study import normalized_guarantee
    from ge_utils.spec import ExperimentSpec

    spec = ExperimentSpec(model="tiny-llama", n_train=4, n_eval=3, n_probe=0)
    table = normalized_guarantee(spec, [0, 1], 3, step_size=1e-3)
    assert list(table["seed"]) == [0, 0, 0, 1, 1, 1] and table["holds"].all()
    ratio = table["realized_delta_chosen"] / table["pred_delta_chosen"]
    assert ((ratio - 1).abs() < 0.05).all()
    with pytest.raises(ValueError, match=r"n_pairs must be in 1\.\.3"):
        normalized_guarantee(spec, [0], 4)
