"""Layer rules beyond the common ones: OPT's (and BioGPT's) learned positional embedding
(called with the attention mask, a cache length and ``position_ids=``; rows ``position + 2``),
exact against per-sequence autograd on the layer alone and on whole tiny models; and a scaled
embedding whose scale is a Python float, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from hf_models import gpt_oss_model, hf_model
from test_fast_gradients import assert_stats_close, batches, brute_token_grads, factor_products
from torch import nn
from transformers.models.bart.modeling_bart import BartLearnedPositionalEmbedding
from transformers.models.opt.modeling_opt import OPTLearnedPositionalEmbedding

import ge_utils.stats.factors as factors
import ge_utils.stats.layers as layers
from ge_utils.stats import (
    GhostRecorder,
    exact_gradient_stats,
    fast_gradient_stats,
    tokenwise_inner,
    training_step_stats,
)

OPT_SIZES = {"ffn_dim": 64, "word_embed_proj_dim": 32, "dropout": 0.0}
# sequences of different lengths, padded on the right or the left (1 = token, 0 = padding)
MASK = torch.tensor(
    [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]
)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_opt(dtype=torch.float64):
    return hf_model("opt", **OPT_SIZES).to(dtype)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float64, 1e-8), (torch.float32, 1e-5)], ids=["float64", "float32"]
)
def test_fast_equals_exact_on_opt_with_its_positional_embedding(side, dtype, rtol):
    """Every parameter of a tiny OPT, its positional embedding's included, on pairs of
    different lengths padded on either side; and the positional embedding alone."""
    assert_exact_with_positions(tiny_opt(dtype), side, rtol)


def test_fast_equals_exact_on_biogpt_with_its_positional_embedding():
    """BioGPT's positional embedding is OPT's kind: the same rule, on both padding sides."""
    model = hf_model("biogpt").double()
    assert layers.rule_for(model.biogpt.embed_positions).name == "OffsetPositionalEmbedding"
    for side in ("left", "right"):
        assert_exact_with_positions(model, side, 1e-8)


def assert_exact_with_positions(model, side, rtol):
    assert any("embed_positions" in n for n, _ in model.named_parameters())
    c, r = batches(side)
    assert not bool(c.attention_mask.all()) and not bool(r.attention_mask.all())  # padded
    assert_stats_close(fast_gradient_stats(model, c, r), exact_gradient_stats(model, c, r), rtol)

    def positions(name: str, _: nn.Parameter) -> bool:
        return "embed_positions" in name

    exact = exact_gradient_stats(model, c, r, positions)
    assert_stats_close(fast_gradient_stats(model, c, r, positions), exact, rtol)


def position_table(rows: int = 10, dim: int = 4) -> OPTLearnedPositionalEmbedding:
    torch.manual_seed(0)
    return OPTLearnedPositionalEmbedding(rows, dim).double()


def output_grads(module, mask, cache, seed, zero_padding):
    """Random output gradients of ``module(mask, cache)``; zero on padding rows if asked (as a
    model's are: padding takes no part in any response log-prob)."""
    with torch.no_grad():
        out = module(mask, cache)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return g * mask[:, cache:, None] if zero_padding else g


def brute_gradients(module, mask, cache, g, position_ids=None):
    """(N, numel) float64 ``grad_E f_i``, ``f_i = sum(g_i * module(mask_i, cache,
    position_ids=position_ids_i))``: one autograd call per sequence."""
    rows = []
    for i in range(len(mask)):
        ids = None if position_ids is None else position_ids[i : i + 1]
        out = module(mask[i : i + 1], cache, position_ids=ids)
        (grad,) = torch.autograd.grad((out * g[i : i + 1]).sum(), [module.weight])
        rows.append(grad.double().flatten())
    return torch.stack(rows)


@pytest.mark.parametrize("cache", [0, 2])
def test_position_factors_equal_per_sequence_autograd(cache):
    """The rule's factors alone, from the rows its ``inputs`` reads off the call (the mask and
    the cache length): their products and directional derivatives are brute force's over the
    module's own positions (padding -> row 1, here with a nonzero output gradient); with a
    cache, those of the last ``S - cache`` columns."""
    module = position_table()
    rule = layers.rule_for(module)
    assert rule is not None and rule.name == "OffsetPositionalEmbedding" and rule.single_use
    g = output_grads(module, MASK, cache, seed=1, zero_padding=False)
    rows = rule.inputs(module, (MASK, cache), {})
    assert torch.equal(rows, layers.mask_positions(MASK)[:, cache:] + 2)
    found = rule.factors(module, rows[..., None], g, frozenset({"weight"}))
    assert set(found) == {"weight"}
    flat = brute_gradients(module, MASK, cache, g)
    torch.testing.assert_close(factor_products(found), flat @ flat.T, rtol=1e-10, atol=1e-12)
    # the products depend only on which positions coincide; the rows (offset) on more:
    v = torch.randn(module.weight.shape, generator=torch.Generator().manual_seed(4)).double()
    torch.testing.assert_close(factors.factor_dot(found["weight"], v), flat @ v.flatten())


PACKED = torch.tensor(
    [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3]]
)


@pytest.mark.parametrize(
    "positions", ["ge_utils", "packed"], ids=["ge-utils-positions", "packed-positions"]
)
def test_recorder_on_the_position_table_called_as_opt_calls_it(positions):
    """Through the recorder's hook, called as OPT's decoder calls it (the mask, a cache length
    and ``position_ids=``): with ge_utils's positions (0 on padding, where the output gradient
    is zero) and with positions that restart inside a row, as packed sequences' do (they are
    not the mask's, and every row has an output gradient): every pair's product and each
    sequence's directional derivative are brute force's."""
    module = position_table()
    if positions == "packed":
        position_ids = PACKED
        g = output_grads(module, MASK, 0, seed=2, zero_padding=False)
    else:
        position_ids = (MASK.cumsum(1) - 1).clamp(min=0)  # SequenceBatch.position_ids
        g = output_grads(module, MASK, 0, seed=2, zero_padding=True)
    flat = brute_gradients(module, MASK, 0, g, position_ids)
    n = len(MASK)
    ii, jj = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    with GhostRecorder(module) as rec:
        rec.expect(all=(ii, jj))
        rec.backward((module(MASK, 0, position_ids=position_ids) * g).sum())
    got = rec.results()["all"].reshape(n, n)
    torch.testing.assert_close(got, flat @ flat.T, rtol=1e-10, atol=1e-12)
    v = torch.randn(module.weight.shape, generator=torch.Generator().manual_seed(3)).double()
    with GhostRecorder(module, keep_factors=True) as rec:
        rec.backward((module(MASK, 0, position_ids=position_ids) * g).sum())
    torch.testing.assert_close(rec.directional({"weight": v}), flat @ v.flatten())


class ArangePositions(OPTLearnedPositionalEmbedding):
    """Positions 0, 1, ... whatever the mask: not OPT's computation."""

    def forward(self, attention_mask, cache_length=0, position_ids=None):
        n, s = attention_mask.shape
        return nn.Embedding.forward(self, torch.arange(s).expand(n, -1) + self.offset)


class IgnoresGivenPositions(OPTLearnedPositionalEmbedding):
    """Counts positions over the mask even when given ``position_ids``."""

    def forward(self, attention_mask, cache_length=0, position_ids=None):
        return super().forward(attention_mask, cache_length)


def test_the_positions_rule_is_checked_once_per_class():
    """OPT's table gets the rule; tables with an ``offset`` that count positions otherwise
    (BART's: without the mask; a subclass's own forward) do not, and go to the fallback."""
    assert layers.rule_for(position_table()).name == "OffsetPositionalEmbedding"
    assert layers._OFFSET_POSITIONS[OPTLearnedPositionalEmbedding] is True
    assert layers.rule_for(tiny_opt().model.decoder.embed_positions).single_use
    for other in (BartLearnedPositionalEmbedding(8, 4), ArangePositions(8, 4)):
        assert layers.rule_for(other) is None
        assert layers._OFFSET_POSITIONS[type(other)] is False
    assert layers.rule_for(nn.Embedding(8, 4)).name == "Embedding"
    assert layers.rule_for(IgnoresGivenPositions(8, 4)) is None  # the check calls it with them


@pytest.mark.parametrize("side", ["left", "right"])
def test_tokenwise_on_opt_matches_brute_force(side):
    """Token-wise products over every parameter of a tiny OPT, positions included."""
    model = tiny_opt()
    c, r = batches(side)
    c, r = c.select([1]), r.select([1])
    expected = brute_token_grads(model, c) @ brute_token_grads(model, r).T
    got = tokenwise_inner(model, c, r, scope="all")
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * expected.abs().max())


class FloatScaledEmbedding(nn.Embedding):
    """BioGPT's kind of scaled embedding: ``embed_scale`` a Python float, sqrt(d)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embed_scale = math.sqrt(32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


def test_a_python_float_embedding_scale_keeps_the_model_precision():
    """The scale of a float64 model's embedding is sqrt(32) in float64, not rounded to float32
    on the way (relative error 2e-8 before)."""
    torch.manual_seed(0)
    module = FloatScaledEmbedding(7, 4).double()
    ids = torch.randint(0, 7, (4, 3), generator=torch.Generator().manual_seed(3))
    g = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rule = layers.rule_for(module)
    assert rule is not None and rule.name == "Embedding"
    found = rule.factors(module, ids[..., None], g, frozenset({"weight"}))
    rows = []
    for i in range(len(ids)):
        (grad,) = torch.autograd.grad((module(ids[i : i + 1]) * g[i : i + 1]).sum(), module.weight)
        rows.append(grad.flatten())
    flat = torch.stack(rows)
    torch.testing.assert_close(factor_products(found), flat @ flat.T, rtol=1e-14, atol=0)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_attention_sinks_alone_equal_exact(implementation):
    """GPT-OSS's attention sinks as the only parameters (their products are small beside the
    rest's, so a whole-model check would hide an error in them), float64 and float32, both
    padding sides."""
    model = gpt_oss_model(implementation)
    assert layers.rule_for(model.model.layers[0].self_attn).name == "AttentionSinks"

    def sinks(name: str, _: nn.Parameter) -> bool:
        return name.endswith(".sinks")

    for side in ("left", "right"):
        c, r = batches(side)
        exact = exact_gradient_stats(model, c, r, sinks)
        rtol = 1e-10 if implementation == "eager" else 1e-5
        assert_stats_close(fast_gradient_stats(model, c, r, sinks), exact, rtol)


def test_attention_sinks_without_probabilities_or_under_dropout_are_refused():
    """The sinks' rule reads the probabilities that only the eager attention returns, and no
    attention dropout: another implementation, or training with dropout, is refused with the
    way out; the other parameters are measured as before."""
    model = gpt_oss_model("grouped_mm")
    c, r = batches()
    model.config._attn_implementation = "sdpa"  # returns no probabilities
    with pytest.raises(TypeError, match=r"GptOssAttention need its attention probab.*eager"):
        fast_gradient_stats(model, c, r)

    def rest(name: str, _: nn.Parameter) -> bool:
        return not name.endswith(".sinks")

    assert_stats_close(
        fast_gradient_stats(model, c, r, rest), exact_gradient_stats(model, c, r, rest), 1e-5
    )
    model.config._attn_implementation = "eager"
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.train()
    with pytest.raises(TypeError, match="attention dropout"):
        training_step_stats(model, c, r, lambda u_w, u_l: (u_l - u_w).sum())
