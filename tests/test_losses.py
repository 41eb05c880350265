"""The margin-loss family: closed-form coefficients against autograd, for every loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from ge_utils.losses import LOSSES, PairLogps, autograd_coefficients, get_loss, table2


def random_pairs(seed: int, n: int = 256) -> PairLogps:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    u_w, u_l = -30 * rand(n) - 0.05, -30 * rand(n) - 0.05
    return PairLogps(
        u_w,
        u_l,
        u_w + 3 * (rand(n) - 0.5),
        u_l + 3 * (rand(n) - 0.5),
        torch.randint(1, 12, (n,), generator=gen).double(),
        torch.randint(1, 12, (n,), generator=gen).double(),
    )


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_coefficients_match_autograd(name, seed):
    loss = get_loss(name)
    p = random_pairs(seed)
    closed, auto = loss.coefficients(p), autograd_coefficients(loss, p)
    for c, a in zip(closed, auto, strict=True):
        assert torch.isfinite(c).all()
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", list(LOSSES))
def test_coefficients_match_under_non_default_hyperparameters(name):
    params = {k: v * 1.7 + 0.3 for k, v in LOSSES[name].defaults.items()}
    loss = get_loss(name, **params)
    p = random_pairs(5)
    for c, a in zip(loss.coefficients(p), autograd_coefficients(loss, p), strict=True):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-13)


def test_dpo_matches_independent_formula():
    p = random_pairs(3)
    beta = 0.25
    z = beta * ((p.chosen - p.ref_chosen) - (p.rejected - p.ref_rejected))
    loss = get_loss("dpo", beta=beta)
    torch.testing.assert_close(loss.loss(p), -torch.log(1 / (1 + torch.exp(-z))))
    d_w, d_l = loss.coefficients(p)
    torch.testing.assert_close(d_w, beta * (1 - torch.sigmoid(z)))
    torch.testing.assert_close(d_w, d_l)


def test_sppo_ratio_exceeds_one_iff_rewards_sum_negative():
    p = random_pairs(4)
    d_w, d_l = get_loss("sppo", beta=0.1).coefficients(p)
    valid = d_l > 0
    ratio_above = (d_w / d_l > 1)[valid]
    assert torch.equal(ratio_above, (p.reward_chosen + p.reward_rejected < 0)[valid])


def test_orpo_log_odds_is_stable_near_probability_one():
    p = PairLogps(
        torch.tensor([-1e-9]),
        torch.tensor([-5.0]),
        torch.zeros(1),
        torch.zeros(1),
        torch.ones(1),
        torch.ones(1),
    )
    loss = get_loss("orpo")
    assert torch.isfinite(loss.loss(p)).all()
    odds = math.log(math.exp(-1e-9) / -math.expm1(-1e-9)) - math.log(
        math.exp(-5) / (1 - math.exp(-5))
    )
    expected = -0.1 * F.logsigmoid(torch.tensor(odds, dtype=torch.float64)) + 1e-9
    torch.testing.assert_close(loss.loss(p).double(), expected.reshape(1), rtol=1e-6, atol=0)


def test_table2_lists_every_loss():
    table = table2()
    assert len(table) == len(LOSSES)
    assert {"m(D)", "h_w", "h_l", "Lambda(u_w)", "d_w", "d_l", "separable"} <= set(table.columns)
    assert table.loc["SPPO (hard)", "separable"] and not table.loc["DPO", "separable"]
    assert table.loc["DPOP", "defaults"] == "beta=0.1, lam=50"


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("dpoo", {}, "unknown loss 'dpoo'; known losses: dpo, ipo"),
        ("dpo", {"gamma": 1.0}, "dpo: unknown hyperparameter 'gamma'; allowed: beta"),
        ("dpo", {"beta": 0.0}, "'beta' must be > 0"),
        ("dpo", {"beta": "0.1"}, "'beta' must be a number"),
        ("ipo", {"tau": math.nan}, "'tau' must be finite"),
        ("dpop", {"lam": -1.0}, "'lam' must be >= 0"),
        ("cpo", {"beta": True}, "'beta' must be a number"),
    ],
)
def test_bad_names_and_hyperparameters_are_rejected(name, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        get_loss(name, **kwargs)
