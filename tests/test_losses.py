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


def _indep(name: str, p: PairLogps, h: dict) -> torch.Tensor:
    """Each loss written out from its paper, with plain exp/log (no shared helpers)."""
    r_w, r_l = p.chosen - p.ref_chosen, p.rejected - p.ref_rejected
    a_w, a_l = p.chosen / p.len_chosen, p.rejected / p.len_rejected

    def nls(x):  # -log sigmoid(x)
        return torch.log(1 + torch.exp(-x))

    def odds(a):
        return torch.log(torch.exp(a) / (1 - torch.exp(a)))

    formulas = {
        "dpo": lambda: nls(h["beta"] * (r_w - r_l)),
        "ipo": lambda: (r_w - r_l - 1 / (2 * h["tau"])) ** 2,
        "rdpo": lambda: nls(h["beta"] * (r_w - r_l) + h["alpha"] * (p.len_chosen - p.len_rejected)),
        "simpo": lambda: nls(h["beta"] * (a_w - a_l) - h["gamma"]),
        "slic": lambda: (
            torch.clamp(h["delta"] - p.chosen + p.rejected, min=0) - h["lam"] * p.chosen
        ),
        "cpo": lambda: nls(h["beta"] * (p.chosen - p.rejected)) - h["lam"] * a_w,
        "cpo_sum": lambda: nls(h["beta"] * (p.chosen - p.rejected)) - h["lam"] * p.chosen,
        "dpop": lambda: nls(h["beta"] * (r_w - r_l - h["lam"] * torch.clamp(-r_w, min=0))),
        "rrhf": lambda: torch.clamp(a_l - a_w, min=0) - h["lam"] * a_w,
        "rrhf_sum": lambda: torch.clamp(a_l - a_w, min=0) - h["lam"] * p.chosen,
        "orpo": lambda: h["lam"] * nls(odds(a_w) - odds(a_l)) - a_w,
        "sppo": lambda: (r_w - 1 / (2 * h["beta"])) ** 2 + (r_l + 1 / (2 * h["beta"])) ** 2,
        "kto_pair": lambda: (
            (1 - 1 / (1 + torch.exp(-h["beta"] * r_w))) + (1 - 1 / (1 + torch.exp(h["beta"] * r_l)))
        ),
    }
    return formulas[name]()


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_values_match_independent_formulas(name):
    p = random_pairs(3)
    h = {k: v * 1.3 for k, v in LOSSES[name].defaults.items()}
    torch.testing.assert_close(
        get_loss(name, **h).loss(p), _indep(name, p, h), rtol=1e-9, atol=1e-12
    )


def test_rdpo_rewards_a_longer_chosen_response():
    """Park et al. Eq. 9: z = beta D + alpha (|y_w| - |y_l|), so a longer chosen response
    lowers the loss at equal rewards (the length is credited, not learned)."""
    zero = torch.zeros(2, dtype=torch.float64)
    p = PairLogps(zero, zero, zero, zero, torch.tensor([10.0, 5.0]), torch.tensor([5.0, 10.0]))
    longer_chosen, shorter_chosen = get_loss("rdpo").loss(p).tolist()
    assert longer_chosen < math.log(2) < shorter_chosen


def test_dpo_coefficients_match_independent_formula():
    p = random_pairs(3)
    beta = 0.25
    z = beta * ((p.chosen - p.ref_chosen) - (p.rejected - p.ref_rejected))
    d_w, d_l = get_loss("dpo", beta=beta).coefficients(p)
    torch.testing.assert_close(d_w, beta / (1 + torch.exp(z)))
    torch.testing.assert_close(d_w, d_l)


@pytest.mark.parametrize(
    ("name", "chosen", "rejected", "ref_chosen", "expected"),
    [
        ("slic", -3.0, -4.0, 0.0, (0.1, 0.0)),  # D = delta exactly: hinge off
        ("rrhf", -4.0, -4.0, 0.0, (0.5, 0.0)),  # D = 0 exactly (equal lengths): hinge off
        ("rrhf_sum", -4.0, -4.0, 0.0, (1.0, 0.0)),
        ("dpop", -4.0, -4.0, -4.0, (0.05, 0.05)),  # r_w = 0 exactly: no penalty
    ],
)
def test_subgradient_at_the_kink_is_zero_in_both_forms(
    name, chosen, rejected, ref_chosen, expected
):
    def t(x):
        return torch.tensor([x], dtype=torch.float64)

    p = PairLogps(t(chosen), t(rejected), t(ref_chosen), t(rejected), t(2.0), t(2.0))
    loss = get_loss(name)
    closed, auto = loss.coefficients(p), autograd_coefficients(loss, p)
    for c, a, e in zip(closed, auto, expected, strict=True):
        torch.testing.assert_close(c, t(e), rtol=1e-12, atol=0)
        torch.testing.assert_close(a, t(e), rtol=1e-12, atol=0)


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
    assert list(table["name"]) == list(LOSSES)
    assert list(table.columns) == [
        "loss",
        "name",
        "m",
        "h_w",
        "h_l",
        "Lambda",
        "d_w",
        "d_l",
        "separable",
        "defaults",
        "description",
    ]
    rows = table.set_index("name")
    assert rows.loc["sppo", "separable"] and not rows.loc["dpo", "separable"]
    assert rows.loc["dpop", "defaults"] == "beta=0.1, lam=50"
    assert rows.loc["simpo", "defaults"] == "beta=2, gamma=0.5"
    assert (table["description"].str.len() > 20).all()


def test_get_loss_binds_hyperparameters():
    loss = get_loss("SimPO", gamma=1)
    assert loss.name == "simpo" and loss.hyperparameters == {"beta": 2.0, "gamma": 1.0}
    assert repr(loss) == "simpo(beta=2, gamma=1)"
    assert loss.description.startswith("Meng et al.")


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


def test_coefficient_check_covers_every_loss_and_agrees():
    from ge_utils.losses import LOSSES, coefficient_check

    table = coefficient_check(n=64)
    assert list(table["name"]) == list(LOSSES)
    assert (table["max_rel_err"] < 1e-10).all()


@pytest.mark.parametrize("name", ["cpo", "rrhf"])
def test_nll_term_is_a_token_mean_and_the_summed_form_an_option(name):
    """TRL's CPO and the authors' RRHF average the chosen NLL over tokens: with the hinge off,
    d_w is lam/|y_w| (token mean) against lam (summed); d_l is the same in both forms."""

    def t(*x):
        return torch.tensor(x, dtype=torch.float64)

    # u_w far above u_l: CPO's sigmoid term and RRHF's hinge vanish (up to exp(-50)).
    p = PairLogps(
        t(-1.0, -2.0), t(-501.0, -502.0), t(0.0, 0.0), t(0.0, 0.0), t(4.0, 8.0), t(1.0, 1.0)
    )
    lam = 0.5
    mean_w, mean_l = get_loss(name, lam=lam).coefficients(p)
    sum_w, sum_l = get_loss(f"{name}_sum", lam=lam).coefficients(p)
    torch.testing.assert_close(mean_w, lam / p.len_chosen, rtol=1e-12, atol=1e-20)
    torch.testing.assert_close(sum_w, t(lam, lam), rtol=1e-12, atol=1e-20)
    torch.testing.assert_close(mean_l, sum_l)
    assert "token-mean" in table2().set_index("name").loc[name, "Lambda"]
    assert "summed" in table2().set_index("name").loc[f"{name}_sum", "Lambda"]


def test_mixed_length_pairs_make_rdpo_differ_from_dpo():
    """On ``mixed_length`` pairs every chosen/rejected length differs (both signs, balanced per
    label), so R-DPO's length term is active; on ``long`` pairs R-DPO equals DPO exactly."""
    from ge_utils.data import sentiment_pairs
    from ge_utils.models import word_tokenizer

    train, held = sentiment_pairs(24, 12, "mixed_length")
    pairs = train + held
    tok = word_tokenizer([p.chosen for p in pairs] + [p.rejected for p in pairs])

    def lengths(texts):
        return torch.tensor([len(tok(t, add_special_tokens=False).input_ids) for t in texts])

    for group, differ in ((pairs, True), (sentiment_pairs(24, 12, "long")[0], False)):
        lw = lengths([p.chosen for p in group]).double()
        ll = lengths([p.rejected for p in group]).double()
        assert bool((lw != ll).all()) is differ
        u = torch.linspace(-9, -1, len(group), dtype=torch.float64)
        p = PairLogps(u, u - 2, u + 0.5, u - 1, lw, ll)
        same = torch.allclose(get_loss("rdpo").loss(p), get_loss("dpo").loss(p))
        assert same is not differ
    sign = (lengths([p.chosen for p in pairs]) > lengths([p.rejected for p in pairs])).double()
    assert sign.mean() == 0.5
    assert {p.label for p in pairs if p.chosen.startswith("Positive sentiment based")} == {
        "Positive"
    }
