"""Fast (ghost) statistics equal the exact ones, per pair and token-wise."""

from __future__ import annotations

import pytest
import torch

import ge_utils.fast_gradients as fg
from ge_utils.fast_gradients import GhostRecorder, fast_gradient_stats, tokenwise_inner
from ge_utils.gradients import exact_gradient_stats
from ge_utils.logprobs import build_batch, concat_batches, sequence_logprobs, token_logprobs
from ge_utils.models import tiny_causal_lm

PROMPTS = [[2, 5, 7, 6], [2, 4, 6], [2, 9, 10, 11, 12]]
CHOSEN = [[13, 14, 15, 8], [16, 8], [13, 17]]
REJECTED = [[18, 14, 15, 8], [19, 20, 21, 8], [18]]
KEYS = ("norm2_chosen", "norm2_rejected", "inner", "logp_chosen", "logp_rejected")


def batches(side: str = "right"):
    c = build_batch(list(zip(PROMPTS, CHOSEN, strict=True)), 0, side)
    r = build_batch(list(zip(PROMPTS, REJECTED, strict=True)), 0, side)
    return c, r


def assert_stats_close(fast, exact, rtol):
    for k in KEYS:
        scale = exact[k].abs().max()
        assert ((fast[k] - exact[k]).abs() / scale).max() < rtol, k


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("materialize", [True, False])
def test_fast_equals_exact_float64(tiny_model, side, materialize, monkeypatch):
    if not materialize:  # force the Gram-product path for every layer
        monkeypatch.setattr(fg, "MATERIALIZE_BYTES", 0)
    c, r = batches(side)
    assert_stats_close(
        fast_gradient_stats(tiny_model, c, r), exact_gradient_stats(tiny_model, c, r), 1e-8
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_equals_exact_float32(arch):
    model = tiny_causal_lm(arch, 30, seed=2)
    c, r = batches()
    assert_stats_close(fast_gradient_stats(model, c, r), exact_gradient_stats(model, c, r), 1e-4)


@pytest.mark.parametrize(
    ("arch", "targets"), [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])]
)
def test_fast_equals_exact_with_lora(arch, targets, monkeypatch):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny_causal_lm(arch, 30).double()
    model = get_peft_model(
        base,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False
        ),
    )
    model.eval()
    monkeypatch.setattr(fg, "MATERIALIZE_BYTES", 0)
    c, r = batches("left")
    assert_stats_close(fast_gradient_stats(model, c, r), exact_gradient_stats(model, c, r), 1e-8)


def test_parameter_subsets_and_unsupported_parameters(tiny_model):
    names = [n for n, _ in tiny_model.named_parameters()][-4:]
    c, r = batches()
    assert_stats_close(
        fast_gradient_stats(tiny_model, c, r, names),
        exact_gradient_stats(tiny_model, c, r, names),
        1e-8,
    )
    tiny_model.register_parameter("mystery", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(TypeError, match=r"cannot handle parameter.*mystery"):
        fast_gradient_stats(tiny_model, c, r)


def brute_token_grads(model, batch, params=None):
    """Flattened float64 gradient of every response token's log-prob of a one-row batch."""
    plist = [p for n, p in model.named_parameters() if params is None or n in params]
    lp = token_logprobs(model, batch)[0][batch.response_mask[0]]
    rows = []
    for t in range(len(lp)):
        grads = torch.autograd.grad(lp[t], plist, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).double().flatten()
                    for g, p in zip(grads, plist, strict=True)
                ]
            )
        )
    return torch.stack(rows)


@pytest.mark.parametrize("side", ["left", "right"])
def test_tokenwise_all_parameters_matches_brute_force(tiny_model, side):
    c, r = batches(side)
    c, r = c.select([0]), r.select([0])
    expected = brute_token_grads(tiny_model, c) @ brute_token_grads(tiny_model, r).T
    got = tokenwise_inner(tiny_model, c, r, scope="all")
    assert got.shape == (len(CHOSEN[0]), len(REJECTED[0]))
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * expected.abs().max())
    # Summing the token-wise matrix gives the sequence-level inner product.
    stats = exact_gradient_stats(tiny_model, c, r)
    torch.testing.assert_close(got.sum(), stats["inner"][0], rtol=1e-8, atol=0)


def test_tokenwise_head_matches_brute_force_on_the_output_layer():
    model = tiny_causal_lm("llama", 30, seed=1).double()
    head = model.get_output_embeddings()
    c, r = batches()
    c, r = c.select([1]), r.select([1])
    params = {n for n, p in model.named_parameters() if p is head.weight}
    expected = brute_token_grads(model, c, params) @ brute_token_grads(model, r, params).T
    got = tokenwise_inner(model, c, r, scope="head")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="scope"):
        tokenwise_inner(model, c, r, scope="body")


def test_recorder_recovers_stats_from_a_scaled_training_backward(tiny_model):
    """Back-propagating sum_i c_i u_i (a training loss) and dividing by c gives unit stats."""
    c, r = batches("left")
    joint = concat_batches(c, r)
    coef = torch.tensor([-0.3, -0.05, -2.0, 0.4, 0.07, 1.5], dtype=torch.float64)
    with GhostRecorder(tiny_model) as rec:
        rec.n_seq, rec.row_seq = len(joint), fg.target_positions(joint)[0]
        u = sequence_logprobs(tiny_model, joint)
        rec.scale = coef
        rec.expect_pairs(len(c))
        (coef * u).sum().backward()
        stats = rec.results()
    exact = exact_gradient_stats(tiny_model, c, r)
    for k in ("norm2_chosen", "norm2_rejected", "inner"):
        # Llama's RMSNorm computes in float32 even in a float64 model: 1e-6, not 1e-12.
        torch.testing.assert_close(stats[k], exact[k], rtol=1e-6, atol=0)
    assert all(p.grad is not None for p in tiny_model.parameters())  # training grads intact
