"""Theorem 1 closed forms against autograd, and the case labels."""

import pytest
import torch

from ge_utils.theory import (
    dpo_case,
    head_gradient_stats_autograd,
    head_gradient_stats_closed_form,
    random_head_draws,
    theorem1_table,
)


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_closed_form_matches_autograd(scale):
    draws = random_head_draws(64, 40, 8, logit_scale=scale, seed=1)
    auto = head_gradient_stats_autograd(draws)
    closed = head_gradient_stats_closed_form(draws)
    norm = torch.maximum(auto["norm2_a"], auto["norm2_b"])
    for key in ("inner", "norm2_a", "norm2_b"):
        assert ((auto[key] - closed[key]).abs() / norm).max() < 1e-12


def test_autograd_matches_brute_force_single_draw():
    draws = random_head_draws(3, 10, 4, seed=2)
    auto = head_gradient_stats_autograd(draws)
    for n in range(3):
        w = draws.weight[n].clone().requires_grad_(True)
        logp = torch.log_softmax(w @ draws.hidden[n], -1)
        (ga,) = torch.autograd.grad(logp[draws.token_a[n]], w, retain_graph=True)
        (gb,) = torch.autograd.grad(logp[draws.token_b[n]], w)
        assert torch.isclose(auto["inner"][n], (ga * gb).sum(), rtol=1e-12)
        assert torch.isclose(auto["norm2_a"][n], (ga * ga).sum(), rtol=1e-12)


def test_case_one_always_and_negative_inner_when_boosted():
    table = theorem1_table(100, 30, 6, [0.5, 10.0], seed=3, chosen_boost=1.0)
    assert (table["case"] == 1).all()
    boosted = table[table["setting"] == "chosen boosted"]
    assert boosted["top_is_a_or_b"].all()
    assert (boosted["inner"] < 0).all()
    # A random peaked layer does put mass on a third token, making the inner product positive.
    assert (table["inner"] > 0).any()


def test_dpo_case_labels():
    norm2_w = torch.tensor([2.0, 1.0, 3.0])
    norm2_l = torch.tensor([2.0, 3.0, 1.0])
    inner = torch.tensor([-1.0, 2.0, 2.0])
    assert dpo_case(norm2_w, norm2_l, inner).tolist() == [1, 2, 3]


def test_bad_draw_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        random_head_draws(10, 1, 4)
    with pytest.raises(ValueError, match="logit_scale"):
        random_head_draws(10, 5, 4, logit_scale=0.0)


def test_realized_head_step_matches_first_order_and_is_case_1():
    from ge_utils.theory import (
        head_gradient_stats_closed_form,
        random_head_draws,
        realized_head_step,
    )

    draws = random_head_draws(200, 32, 8, logit_scale=4.0, seed=3)
    d_a, d_b = realized_head_step(draws, step=1e-5)
    closed = head_gradient_stats_closed_form(draws)
    h2 = (draws.hidden**2).sum(-1)
    eta = 1e-5 / h2
    pred_a = eta * (closed["norm2_a"] - closed["inner"])
    pred_b = eta * (closed["inner"] - closed["norm2_b"])
    assert torch.allclose(d_a, pred_a, rtol=1e-3, atol=1e-12)
    assert torch.allclose(d_b, pred_b, rtol=1e-3, atol=1e-12)
    assert bool((d_a > 0).all() and (d_b < 0).all())
    with pytest.raises(ValueError, match="step"):
        realized_head_step(draws, step=0.0)
