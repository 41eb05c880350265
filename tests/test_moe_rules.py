"""Mixture-of-experts rules (ge_utils.stats.moe): the router's and the experts' factors against
per-sequence autograd in float64, with padding on both sides and an expert that gets no token;
grouped factors against their materialized gradients; whole tiny Mixtral, Qwen2-MoE, Qwen3-MoE
and OLMoE models, fast against exact; classes that compute something else are refused."""

from __future__ import annotations

import pytest
import torch
from hf_models import gpt_oss_model, hf_model, rescaled_logits_router
from test_fast_gradients import (
    assert_fast_equals_exact,
    assert_stats_close,
    batches,
    brute_token_grads,
    factor_products,
)
from torch import nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import (
    MixtralExperts,
    MixtralSparseMoeBlock,
    MixtralTopKRouter,
)

import ge_utils.stats.factors as factors
import ge_utils.stats.layers as layers
import ge_utils.stats.moe as moe
from ge_utils.logprobs import concat_batches, sequence_logprobs
from ge_utils.models import tiny_causal_lm
from ge_utils.stats import (
    PAIR_KEYS,
    GhostRecorder,
    exact_gradient_stats,
    tokenwise_inner,
    training_step_stats,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# rows of 4 sequences (1 = token, 0 = padding), padded on the right and on the left
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
E, K, H, INNER = 4, 2, 6, 5  # experts, experts per token, hidden and intermediate sizes
UNUSED = 3  # the expert that no token goes to


def moe_block() -> MixtralSparseMoeBlock:
    """A float64 Mixtral MoE block (eager experts) with random weights; expert ``UNUSED``'s
    router row makes its logit the lowest for inputs with a positive first coordinate."""
    config = MixtralConfig(
        hidden_size=H,
        intermediate_size=INNER,
        num_local_experts=E,
        num_experts_per_tok=K,
        experts_implementation="eager",
    )
    block = MixtralSparseMoeBlock(config).double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        block.gate.weight[:, 0] = 10.0
        block.gate.weight[UNUSED, 0] = -10.0
    return block


def block_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T, H) inputs and output gradients (zero on the padding rows of ``MASK``)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*MASK.shape, H, generator=gen, dtype=torch.float64)
    x[..., 0] = x[..., 0].abs() + 0.5
    g = torch.randn(*MASK.shape, H, generator=gen, dtype=torch.float64) * MASK[..., None]
    return x, g


def per_sequence_gradients(fn, params, n) -> torch.Tensor:
    """(n, P) float64 flattened gradients of ``fn(i)`` (sequence i's scalar), one autograd call
    each."""
    rows = []
    for i in range(n):
        grads = torch.autograd.grad(fn(i), params, allow_unused=True)
        flat = [
            (q if q is not None else torch.zeros_like(p)).flatten()
            for q, p in zip(grads, params, strict=True)
        ]
        rows.append(torch.cat(flat).double())
    return torch.stack(rows)


def test_router_factors_equal_per_sequence_autograd():
    """The router's factor on the whole gradient reaching its logits (from the scores and from
    the logits themselves) gives the weight's per-sequence gradients."""
    router = moe_block().gate
    x, _ = block_inputs()
    n, t = MASK.shape
    gen = torch.Generator().manual_seed(2)
    r_logits = torch.randn(n, t, E, generator=gen, dtype=torch.float64) * MASK[..., None]
    r_scores = torch.randn(n, t, K, generator=gen, dtype=torch.float64) * MASK[..., None]

    def f(out: tuple, i: slice) -> torch.Tensor:
        logits, scores, _ = out
        return (logits * r_logits[i].reshape(-1, E)).sum() + (
            scores * r_scores[i].reshape(-1, K)
        ).sum()

    def f_i(i: int) -> torch.Tensor:
        return f(router(x[i]), slice(i, i + 1))

    expected = per_sequence_gradients(f_i, [router.weight], n)
    seen = []
    out = router(x.reshape(-1, H))
    out[0].register_hook(seen.append)
    torch.autograd.grad(f(out, slice(None)), router.weight)
    rule = layers.rule_for(router)
    assert rule.name == "TopKRouter" and rule.output(out) is out[0]
    rows = rule.inputs(router, (x,), {}).reshape(n, t, H)
    found = rule.factors(router, rows, seen[0].reshape(n, t, E), frozenset({"weight"}))
    torch.testing.assert_close(factor_products(found), expected @ expected.T, rtol=1e-10, atol=0)


def packed_rows(
    experts: nn.Module, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The rows the recorder gives the experts rule: (N, T, H + 2K), from a call with two
    positional arguments and a keyword."""
    args = (x.reshape(-1, H), index.reshape(-1, K))
    rows = moe.experts_rows(experts, args, {"top_k_weights": weights.flatten(0, 1)})
    return rows.reshape(*x.shape[:2], -1)


def test_experts_factors_equal_per_sequence_autograd():
    """Grouped factors of both stacked weights, recomputed from the captured arguments and the
    output gradient: every pair's product, and the per-sequence gradients, equal per-sequence
    autograd; padding rows (either side) and an expert without tokens contribute nothing."""
    experts = moe_block().experts
    x, g = block_inputs()
    n, t = MASK.shape
    gen = torch.Generator().manual_seed(3)
    index = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(n * t)])
    index = index.reshape(n, t, K)  # never expert UNUSED = E - 1
    weights = torch.rand(n, t, K, generator=gen, dtype=torch.float32)  # Mixtral's: float32

    def f(i: int) -> torch.Tensor:
        y = experts(x[i], index[i], weights[i])
        return (y * g[i]).sum()

    params = [experts.gate_up_proj, experts.down_proj]
    expected = per_sequence_gradients(f, params, n)
    wanted = frozenset({"gate_up_proj", "down_proj"})
    found = moe.experts_factors(experts, packed_rows(experts, x, index, weights), g, wanted)
    assert all(f.is_grouped for f in found.values())
    torch.testing.assert_close(factor_products(found), expected @ expected.T, rtol=1e-10, atol=0)
    gen = torch.Generator().manual_seed(4)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    names = ("gate_up_proj", "down_proj")
    dots = sum(factors.factor_dot(found[k], d) for k, d in zip(names, v, strict=True))
    torch.testing.assert_close(dots, expected @ torch.cat([d.flatten() for d in v]))
    unused = found["down_proj"].left.reshape(-1, H)[found["down_proj"].ids.reshape(-1) == UNUSED]
    assert len(unused) == 0
    padding = found["down_proj"].left.reshape(n, t, K, H)[MASK == 0]
    assert len(padding) and not padding.any()


def random_grouped(n: int, t: int, gen: torch.Generator) -> factors.Factor:
    """A grouped factor of ``n`` sequences with ``t`` rows of an (E, 3, 2) parameter."""
    return factors.Factor.grouped(
        torch.randint(0, E, (n, t), generator=gen),
        torch.randn(n, t, 3, generator=gen, dtype=torch.float64),
        torch.randn(n, t, 2, generator=gen, dtype=torch.float64),
    )


def materialized(u: factors.Factor) -> torch.Tensor:
    """(N, E 3 2) explicit per-sequence gradients ``sum_t e_{id_t} (x) l_t (x) r_t``."""
    onehot = nn.functional.one_hot(u.ids, E).double()
    return torch.einsum("nte,ntp,ntq->nepq", onehot, u.left, u.right).flatten(1)


def test_grouped_factor_products_equal_those_of_its_materialized_gradients():
    """Gram products with a same-block mask (pairs, every pair of two factors of different
    counts and lengths, kept rows trimmed), and directional derivatives, equal those of the
    explicit per-sequence gradients; mixing a grouped use with another kind is refused."""
    gen = torch.Generator().manual_seed(5)
    u, v = random_grouped(3, 4, gen), random_grouped(2, 5, gen)
    mu, mv = materialized(u), materialized(v)
    ii, jj = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 2, 1, 2])
    torch.testing.assert_close(
        factors.factor_inner(u, u, ii, jj), (mu[ii] * mu[jj]).sum(1), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(factors.factor_grid(u, v), mu @ mv.T, rtol=1e-12, atol=1e-12)
    direction = torch.randn(E, 3, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(factors.factor_dot(u, direction), mu @ direction.flatten())
    assert factors.materialize(u) is u
    cut = factors.Factor.grouped(u.ids, u.left * (torch.arange(4) != 1)[:, None], u.right)
    trimmed = cut.trimmed()
    assert trimmed.is_grouped and trimmed.ids.shape == (3, 3)
    torch.testing.assert_close(materialized(trimmed), materialized(cut), rtol=0, atol=0)
    outer = factors.Factor.outer(torch.randn(3, 4, 12, dtype=torch.float64), u.right)
    with pytest.raises(TypeError, match="cannot mix grouped"):
        factors.factor_grid(u, outer)
    with pytest.raises(TypeError, match="cannot mix grouped"):
        factors.factor_inner(factors.Factor.onehot(u.ids, u.right), u, ii, jj)


def test_recorder_on_a_moe_block_equals_per_sequence_autograd():
    """The recorder around a whole MoE block fed (N T, H) rows, as Mixtral's decoder does:
    the router's tuple output, the experts' three arguments, rows flattened over the batch."""
    block = moe_block()
    x, g = block_inputs()
    n = len(x)
    assert UNUSED not in block.gate(x.reshape(-1, H))[2]
    params = [p for _, p in block.named_parameters()]
    expected = per_sequence_gradients(lambda i: (block(x[i : i + 1]) * g[i]).sum(), params, n)
    ii, jj = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    with GhostRecorder(block) as rec:
        rec.expect_pairs(n // 2)  # the number of sequences, for the flattened rows
        rec.expect(all=(ii, jj))
        rec.backward((block(x) * g).sum())
        got = rec.results()["all"].reshape(n, n)
    torch.testing.assert_close(got, expected @ expected.T, rtol=1e-10, atol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_fast_equals_exact_on_a_tiny_mixtral_float64(side):
    """Every parameter (routers and experts included) of a float64 Mixtral, with 16 experts so
    that some expert of some layer gets no token of the batch."""
    model = hf_model("mixtral", num_local_experts=16).double()
    hits = []
    for layer in model.model.layers:
        layer.mlp.experts.register_forward_hook(
            lambda mod, args, out: hits.append(torch.bincount(args[1].flatten(), minlength=16))
        )
    sequence_logprobs(model, concat_batches(*batches(side)))
    assert any((h == 0).any() for h in hits[-2:])
    assert_fast_equals_exact(model, side=side, rtol=1e-8)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_fast_equals_exact_with_other_experts_implementations(implementation):
    """transformers' batched and grouped matrix-product experts (float32) compute the same."""
    model = hf_model("mixtral", experts_implementation=implementation)
    rule = layers.rule_for(model.model.layers[0].mlp.experts)
    assert rule is not None and rule.name == "Experts"
    assert_fast_equals_exact(model, side="left", rtol=1e-5)


MOE_FAMILIES = {
    "qwen2_moe": {"shared_expert_intermediate_size": 24, "norm_topk_prob": False},
    "qwen3_moe": {"head_dim": 8, "norm_topk_prob": True},
    "olmoe": {},
}


@pytest.mark.parametrize("model_type", sorted(MOE_FAMILIES))
def test_fast_equals_exact_on_other_moe_families(model_type):
    """Qwen2-MoE (a shared expert and its gate: linear layers), Qwen3-MoE and OLMoE: routers
    and experts of their own classes that compute as Mixtral's (checked), with or without the
    top-k renormalization."""
    model = hf_model(
        model_type,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        experts_implementation="eager",
        **MOE_FAMILIES[model_type],
    ).double()
    block = model.model.layers[0].mlp
    assert layers.rule_for(block.gate).name == "TopKRouter"
    assert layers.rule_for(block.experts).name == "Experts"
    assert_fast_equals_exact(model, side="left", rtol=1e-8)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_training_step_and_directional_derivatives_on_a_tiny_moe(model_type):
    """The statistics of a training backward (parameter uses counted: the router's weight once
    per call) and the directional derivatives of kept grouped factors (GPT-OSS: transposed
    blocks and the experts' biases), against autograd."""
    model = gpt_oss_model("eager") if model_type == "gpt_oss" else hf_model("mixtral").double()
    c, r = batches()
    exact = exact_gradient_stats(model, c, r)
    _, stats = training_step_stats(model, c, r, lambda u_w, u_l: (u_l - 2 * u_w).sum())
    assert_stats_close(stats, exact, 1e-8, keys=PAIR_KEYS)
    model.zero_grad()
    batch = concat_batches(c, r)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(6)
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
    with GhostRecorder(model, batch=batch, keep_factors=True) as rec:
        rec.backward(sequence_logprobs(model, batch).sum())
    grads = per_sequence_gradients(
        lambda i: sequence_logprobs(model, batch.select([i]))[0], list(params.values()), len(batch)
    )
    expected = grads @ torch.cat([d.flatten() for d in v.values()])
    torch.testing.assert_close(rec.directional(v), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_tokenwise_products_on_a_tiny_moe(model_type):
    """Token-wise products go through the same rules (grouped factors of one-token copies;
    GPT-OSS's attention sinks too)."""
    model = gpt_oss_model("eager") if model_type == "gpt_oss" else hf_model("mixtral").double()
    c, r = batches("left")
    c, r = c.select([0]), r.select([0])
    expected = brute_token_grads(model, c) @ brute_token_grads(model, r).T
    got = tokenwise_inner(model, c, r, chunk=2)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * expected.abs().max())


class ClampedExperts(MixtralExperts):
    """Clamps each expert's output: not the formula of the experts rule."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return super().forward(hidden_states, top_k_index, top_k_weights).clamp(-0.1, 0.1)


def test_router_and_experts_that_compute_otherwise_are_refused():
    """Each class is checked once on a probe: a subclass whose forward computes something else
    gets no rule (and the model is refused with the way out); Mixtral's own classes pass."""
    block = moe_block()
    assert layers.rule_for(block.gate).name == "TopKRouter"
    assert layers.rule_for(block.experts).name == "Experts"
    config = block.experts.config
    rescaled = rescaled_logits_router()
    assert layers.rule_for(rescaled(config)) is None
    assert moe._ROUTER_CHECKED[rescaled] is False
    clamped = ClampedExperts(config).double()
    clamped.load_state_dict(block.experts.state_dict())
    assert layers.rule_for(clamped) is None
    assert moe._EXPERTS_CHECKED[(ClampedExperts, "eager")] is False
    block.experts = clamped
    x, _ = block_inputs()
    with GhostRecorder(block) as rec, pytest.raises(TypeError, match=r"ClampedExperts.*params="):
        rec.expect_pairs(len(x) // 2)
        block(x)


class SlightlyScaledExperts(MixtralExperts):
    """Scales each expert's output by 1 + 2^-5: a 3% error, inside 64 bfloat16 epsilons (half
    the largest value) but far outside float32's."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return super().forward(hidden_states, top_k_index, top_k_weights) * (1 + 2**-5)


class SlightlyScaledRouter(MixtralTopKRouter):
    """Returns its logits scaled by 1 + 2^-5 (the scores come from the whole ones)."""

    def forward(self, hidden_states: torch.Tensor):
        logits, scores, index = super().forward(hidden_states)
        return logits * (1 + 2**-5), scores, index


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_probes_of_half_precision_classes_are_checked_in_float32(dtype):
    """A class checked on a bfloat16 or float16 module is probed in float32: Mixtral's own
    classes pass, and a 3% error in a subclass is refused (it passed 64 epsilons of bfloat16)."""
    block = moe_block()
    config = block.experts.config
    scaled_router, scaled_experts = SlightlyScaledRouter(config), SlightlyScaledExperts(config)
    scaled_router.load_state_dict(block.gate.state_dict())
    scaled_experts.load_state_dict(block.experts.state_dict())
    assert moe._router_probe(block.gate.to(dtype))
    assert moe._experts_probe(block.experts.to(dtype))
    assert not moe._router_probe(scaled_router.to(dtype))
    assert not moe._experts_probe(scaled_experts.to(dtype))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_fast_equals_exact_in_bfloat16(arch):
    """A bfloat16 model (dense, and a Mixtral: its routers and experts rules recompute in the
    model's dtype, as the forward does): fast statistics within 2e-3 of the largest of brute
    force's, both in bfloat16 (measured: 7e-4, 3e-4 and 3e-4)."""
    model = hf_model("mixtral") if arch == "mixtral" else tiny_causal_lm(arch, 30, seed=2)
    assert_fast_equals_exact(model.to(torch.bfloat16), side="left", rtol=2e-3)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_fast_equals_exact_on_gpt_oss(implementation):
    """GPT-OSS: routers with a bias (top-k before the softmax), experts stored transposed with
    biases and a clamped, interleaved gate (its own ``_apply_gate``), each class checked on its
    probe, and the attention sinks; every parameter, fast against exact (the eager loop in
    float64, transformers' batched and grouped products in float32, which they require)."""
    model = gpt_oss_model(implementation)
    mlp = model.model.layers[0].mlp
    assert layers.rule_for(mlp.router).name == "TopKRouter"
    assert layers.rule_for(mlp.experts).name == "Experts"
    assert moe.experts_layout(mlp.experts) == moe.ExpertsLayout(transposed=True, bias=True)
    assert_fast_equals_exact(
        model, side="left", rtol=1e-8 if implementation == "eager" else 1e-5
    )
