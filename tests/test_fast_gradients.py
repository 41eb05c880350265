"""Fast (ghost) statistics equal brute force (per-sequence autograd, flattened float64 gradients),
per pair and token-wise, on tiny models of several architectures."""

from __future__ import annotations

import pytest
import torch
from hf_models import HF_ARCHS, hf_model, use_rescaled_routers
from torch import nn
from transformers.pytorch_utils import Conv1D

import ge_utils.stats.factors as factors
import ge_utils.stats.layers as layers
import ge_utils.stats.recorder as recorder
from ge_utils.logprobs import build_batch, concat_batches, sequence_logprobs, token_logprobs
from ge_utils.models import tiny_causal_lm
from ge_utils.stats import (
    PAIR_KEYS,
    TINY_COEFFICIENT,
    GhostRecorder,
    exact_gradient_stats,
    fast_gradient_stats,
    tokenwise_inner,
    training_step_stats,
)

PROMPTS = [[2, 5, 7, 6], [2, 4, 6], [2, 9, 10, 11, 12]]
CHOSEN = [[13, 14, 15, 8], [16, 8], [13, 17]]
REJECTED = [[18, 14, 15, 8], [19, 20, 21, 8], [18]]
# Llama's RMSNorm back-propagates in float32 even in a float64 model, so a backward of scaled
# output gradients rounds differently from the unit one: 1e-6 there, not 1e-8.
SCALED_RTOL = 1e-6
KEYS = ("norm2_chosen", "norm2_rejected", "inner", "logp_chosen", "logp_rejected")
pytestmark = pytest.mark.usefixtures("one_thread")


def batches(side: str = "right"):
    c = build_batch(list(zip(PROMPTS, CHOSEN, strict=True)), 0, side)
    r = build_batch(list(zip(PROMPTS, REJECTED, strict=True)), 0, side)
    return c, r


def assert_stats_close(fast, exact, rtol, keys=KEYS):
    for k in keys:
        scale = exact[k].abs().max()
        assert scale > 0, k
        assert ((fast[k] - exact[k]).abs() / scale).max() < rtol, k


def assert_fast_equals_exact(model, params=None, side="right", rtol=1e-8):
    c, r = batches(side)
    exact = exact_gradient_stats(model, c, r, params)
    assert_stats_close(fast_gradient_stats(model, c, r, params), exact, rtol)
    return exact


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("materialize", [True, False])
def test_fast_equals_exact_float64(tiny_model, side, materialize, monkeypatch):
    """Every linear layer on either path: materialized per-sequence gradients, or Gram
    products (the rule's choice on these shapes is not relied on)."""
    if materialize:
        monkeypatch.setattr(factors, "MATERIALIZE_RATIO", float("inf"))
    else:
        monkeypatch.setattr(factors, "MATERIALIZE_BYTES", 0)
    kinds = []

    def counted(u: factors.Factor) -> factors.Factor:
        out = factors.materialize(u)
        if u.is_outer:
            kinds.append(out.vec is not None)
        return out

    monkeypatch.setattr(recorder, "_materialize", counted)
    assert_fast_equals_exact(tiny_model, side=side)
    assert kinds and set(kinds) == {materialize}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_equals_exact_float32(arch):
    assert_fast_equals_exact(tiny_causal_lm(arch, 30, seed=2), rtol=1e-4)


@pytest.mark.parametrize("model_type", sorted(HF_ARCHS))
def test_fast_equals_exact_on_hugging_face_architectures(model_type):
    """Every parameter of tiny models of other families, through the same rules."""
    assert_fast_equals_exact(hf_model(model_type), rtol=1e-5)


def test_unsupported_modules_raise_and_the_rest_is_exact():
    """A mixture of experts' router of a kind without a rule (one whose logits are not ``x
    W^T``, and whose output is a tuple) is refused with the way out; without its parameters the
    rest (the experts included) is exact."""
    model = use_rescaled_routers(hf_model("mixtral"))
    with pytest.raises(TypeError, match=r"RescaledLogitsRouter.*leave its parameters out of the"):
        fast_gradient_stats(model, *batches())
    c, r = batches()

    def rest(name: str, _: nn.Parameter) -> bool:
        return ".mlp.gate." not in name

    exact = exact_gradient_stats(model, c, r, rest)
    assert_stats_close(fast_gradient_stats(model, c, r, rest), exact, rtol=1e-5)


def test_rows_of_every_position_flattened_over_the_batch_are_per_sequence(tiny_model):
    """A layer fed (N T, d) rows (OPT's MLP) gets per-sequence rows back; rows that are neither
    the head's selected positions nor every position raise."""
    c, r = batches()
    with GhostRecorder(tiny_model, batch=concat_batches(c, r)) as rec:
        n, t = rec.n_seq, 5
        rows = torch.arange(n * t * 2.0).reshape(n * t, 2)
        torch.testing.assert_close(rec._rows(rows), rows.reshape(n, t, 2))
        with pytest.raises(RuntimeError, match="neither the"):
            rec._rows(torch.zeros(n * t + 1, 2))


def test_fast_equals_exact_float32_with_dense_sums_in_blocks(monkeypatch):
    """Materialized float32 gradients summed in blocks (here of 16 values, so that the tiny
    model's layers have several) give the exact statistics."""
    monkeypatch.setattr(factors, "SUM_BLOCK", 16)
    assert_fast_equals_exact(tiny_causal_lm("llama", 30, seed=2), rtol=1e-4)


def test_dense_dot_sums_in_blocks_as_accurately_as_float64():
    torch.manual_seed(0)
    a, b = (
        torch.randn(3, 2, 3 * factors.SUM_BLOCK + 123),
        torch.randn(3, 2, 3 * factors.SUM_BLOCK + 123),
    )
    got = factors.dense_dot(a, b)
    prod = (a * b).double()  # the same float32 products, summed in float64 throughout
    assert got.dtype == torch.float64 and got.shape == (3, 2)
    assert float(((got - prod.sum(-1)).abs() / prod.abs().sum(-1)).max()) < 1e-7
    short = a[..., :100], b[..., :100]  # under one block: float64 throughout, bit for bit
    torch.testing.assert_close(
        factors.dense_dot(*short),
        (short[0] * short[1]).sum(-1, dtype=torch.float64),
        rtol=0,
        atol=0,
    )
    a64, b64 = a.double(), b.double()
    torch.testing.assert_close(factors.dense_dot(a64, b64), (a64 * b64).sum(-1), rtol=0, atol=0)


def test_padding_side_does_not_change_the_statistics(tiny_model):
    left = fast_gradient_stats(tiny_model, *batches("left"))
    right = fast_gradient_stats(tiny_model, *batches("right"))
    assert_stats_close(left, right, 1e-8)


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
            r=4,
            lora_alpha=8,
            target_modules=targets,
            lora_dropout=0.0,
            init_lora_weights=False,
            fan_in_fan_out=arch == "gpt2",  # GPT-2's Conv1D stores its weight transposed
        ),
    )
    model.eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    monkeypatch.setattr(factors, "MATERIALIZE_BYTES", 0)
    assert_fast_equals_exact(model, side="left")


SUBSETS = {
    "last_four": lambda names: names[-4:],
    "norms_and_biases": lambda names: [n for n in names if "norm" in n or "ln" in n or "bias" in n],
    "attention": lambda names: [n for n in names if "attn" in n],
    "embeddings": lambda names: [n for n in names if "emb" in n or "wte" in n or "wpe" in n],
}


@pytest.mark.parametrize("subset", SUBSETS)
def test_parameter_subsets(tiny_model, subset):
    names = SUBSETS[subset]([n for n, _ in tiny_model.named_parameters()])
    assert names
    assert_fast_equals_exact(tiny_model, names)


def test_a_predicate_selects_the_parameter_set(tiny_model):
    def pick(name, _):
        return "layers.1" in name or ".h.1." in name

    assert_fast_equals_exact(tiny_model, pick)


def test_modules_called_twice_get_their_cross_terms():
    """Two decoder layers that are the same module (weight sharing across depth)."""
    model = tiny_causal_lm("llama", 30, layers=1).double()
    block = model.model.layers[0]
    model.model.layers = nn.ModuleList([block, block])
    model.config.num_hidden_layers = 2
    exact = assert_fast_equals_exact(model, side="left")
    one_call = tiny_causal_lm("llama", 30, layers=1).double()
    assert not torch.allclose(exact["inner"], exact_gradient_stats(one_call, *batches())["inner"])


def test_embedding_padding_idx_row_gets_no_gradient():
    model = tiny_causal_lm("llama", 30).double()
    model.model.embed_tokens.padding_idx = 14  # a token inside responses (not the last one)
    assert_fast_equals_exact(model)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_in_a_training_step(reentrant):
    model = tiny_causal_lm("llama", 30).double()
    c, r = batches()
    exact = exact_gradient_stats(model, c, r)
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
    (enable or model.gradient_checkpointing_enable)({"use_reentrant": reentrant})
    model.train()  # checkpointing is active in training mode only
    _, stats = training_step_stats(model, c, r, lambda u_w, u_l: (u_l - u_w).sum())
    assert_stats_close(stats, exact, 1e-8, keys=PAIR_KEYS)


def test_linear_head_with_bias():
    model = tiny_causal_lm("llama", 30, seed=3).double()
    old = model.lm_head
    model.lm_head = nn.Linear(old.in_features, old.out_features, bias=True).double()
    with torch.no_grad():
        model.lm_head.weight.copy_(old.weight)
        model.lm_head.bias.normal_()
    assert_fast_equals_exact(model)


class SoftGate(nn.Module):
    """A module of no supported kind with small parameters: ``b * tanh(a * x) + c``."""

    def __init__(self, dim: int):
        super().__init__()
        self.a = nn.Parameter(torch.linspace(0.5, 1.5, dim))
        self.b = nn.Parameter(torch.linspace(1.0, 2.0, dim))
        self.c = nn.Parameter(torch.linspace(-0.1, 0.1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b * torch.tanh(self.a * x) + self.c


@pytest.mark.parametrize("vmap", [True, False])
def test_small_modules_of_unknown_kind_by_per_sequence_autograd(vmap, monkeypatch):
    if not vmap:

        def no_vmap(*args):
            raise RuntimeError("vmap unavailable")

        monkeypatch.setattr(layers, "_small_grads_vmap", no_vmap)
    model = tiny_causal_lm("llama", 30).double()
    model.model.norm = SoftGate(model.config.hidden_size).double()
    model.model.norm.register_forward_hook(lambda m, a, out: 1.5 * out + 0.1)  # after the module
    exact = assert_fast_equals_exact(model)
    only_gate = [n for n, _ in model.named_parameters() if n.startswith("model.norm.")]
    assert len(only_gate) == 3
    gate = assert_fast_equals_exact(model, only_gate)
    assert (gate["norm2_chosen"] < exact["norm2_chosen"]).all()
    embed = model.model.embed_tokens  # a module of token ids: the fallback reads (N, T) ids
    model.model.embed_tokens = TanhEmbedding(*embed.weight.shape).double()
    assert_fast_equals_exact(model)


class SquaredRMSNorm(nn.Module):
    """Named like an RMSNorm, but its output is ``w^2 * x_hat``: not the known formula."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.8, 1.3, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight**2 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_scaled_embeddings_are_checked_before_their_rule_is_used():
    """An embedding subclass with an ``embed_scale`` gets the embedding rule only when its
    output is the table's rows times it (Gemma's does); another goes to the fallback."""
    assert layers.rule_for(ScaledEmbedding(7, 4)).name == "Embedding"
    assert layers.rule_for(TanhEmbedding(7, 4)) is None
    gemma = hf_model("gemma")
    assert layers.rule_for(gemma.model.embed_tokens).name == "Embedding"
    assert type(gemma.model.embed_tokens).forward is not nn.Embedding.forward


def test_rmsnorm_formula_is_checked_before_its_closed_form_is_used():
    model = tiny_causal_lm("llama", 30).double()
    model.model.norm = SquaredRMSNorm(model.config.hidden_size).double()
    assert_fast_equals_exact(model)
    assert layers._SLOPE_IS_NORMALIZED[SquaredRMSNorm] is False
    assert layers._SLOPE_IS_NORMALIZED[type(model.model.layers[0].input_layernorm)] is True


def test_hooks_that_change_module_outputs_are_part_of_the_model(tiny_model):
    """User hooks act after the module: the recorder must see the module's own output."""
    blocks = getattr(tiny_model.base_model, "layers", None) or tiny_model.base_model.h
    linear = next(m for m in blocks[0].modules() if isinstance(m, nn.Linear | Conv1D))
    norm = next(m for m in blocks[1].modules() if type(m).__name__.endswith("Norm"))
    linear.register_forward_hook(lambda m, a, out: 1.7 * out)
    norm.register_forward_hook(lambda m, a, out: out * torch.linspace(0.5, 2.0, out.shape[-1]))
    assert_fast_equals_exact(tiny_model)


def test_layers_sharing_an_input_reuse_its_gram_matrix(monkeypatch):
    monkeypatch.setattr(factors, "MATERIALIZE_BYTES", 0)
    model = tiny_causal_lm("llama", 30)
    joint = concat_batches(*batches())
    with GhostRecorder(model, batch=joint) as rec:
        rec.backward(sequence_logprobs(model, joint).sum())
    # Per layer: k and v reuse q's input Gram, up reuses gate's; 2 layers. The pair products
    # come from one set of pair blocks per layer input...
    assert rec.gram_reuses == 3 * 2
    # ...other targets from one for the two norms (over all sequences), one for the inner
    # products.
    with GhostRecorder(model, batch=joint) as rec:
        rec.expect(**dict(zip("abc", rec.targets.values(), strict=True)))
        rec.backward(sequence_logprobs(model, joint).sum())
    assert rec.gram_reuses == 3 * 2 * 2


@pytest.mark.parametrize("group", [1, 3])
def test_pair_blocks_equal_the_products_apart(tiny_model, group, monkeypatch):
    """expect_pairs's targets take the pair-block path (``PAIR_BLOCKS``: each sequence's Gram
    and each pair's chosen-rejected Gram as (B, 3, T, T) blocks); the same targets under other
    names take the general path (the norms over all sequences, the inner products apart): equal
    up to rounding, and to brute force."""
    from ge_utils.stats.recorder import _pair_layout

    monkeypatch.setattr(factors, "MATERIALIZE_BYTES", 0)  # every linear layer as Gram products
    c, r = batches("left")
    joint = concat_batches(c, r)
    with GhostRecorder(tiny_model, batch=joint) as rec:
        pair_targets = rec.targets
    assert _pair_layout(pair_targets) == len(c)
    renamed = dict(zip(("x", "y", "z"), pair_targets.values(), strict=True))
    assert _pair_layout(renamed) is None
    swapped = {**pair_targets, "inner": pair_targets["inner"][::-1]}
    assert _pair_layout(swapped) is None
    blocks = _recorded(tiny_model, joint, group)
    apart = _recorded(tiny_model, joint, group, renamed)
    exact = exact_gradient_stats(tiny_model, c, r)
    for key, other in zip(pair_targets, renamed, strict=True):
        torch.testing.assert_close(blocks[key], apart[other], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(blocks[key], exact[key], rtol=1e-4, atol=1e-6)


class EmbeddingAsHead(nn.Module):
    """An output layer that reads the embedding weight directly: a use outside its module."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = [embedding]  # not a submodule

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self.embedding[0].weight)


def test_parameters_used_outside_their_module_raise():
    model = tiny_causal_lm("llama", 30).double()
    model.lm_head = EmbeddingAsHead(model.model.embed_tokens)
    c, r = batches()
    with pytest.raises(
        RuntimeError, match=r"outside their own module.*: model\.embed_tokens\.weight$"
    ):
        fast_gradient_stats(model, c, r)

    model = tiny_causal_lm("llama", 30).double()
    model.model.gain = SoftGate(model.config.hidden_size).double()  # never called

    def apply_gain(module, args, output):
        return output * model.model.gain.b

    model.model.norm.register_forward_hook(apply_gain)
    with pytest.raises(RuntimeError, match=r"outside their own module.*: model\.gain\.b$"):
        fast_gradient_stats(model, c, r)
    # Unused parameters of the set contribute zero, as in brute force.
    assert_fast_equals_exact(model, ["model.gain.a", "model.norm.weight"])
    unused = fast_gradient_stats(model, c, r, ["model.gain.a"])
    assert all((unused[k] == 0).all() for k in PAIR_KEYS)


def test_unsupported_and_frozen_parameters_raise(tiny_model, monkeypatch):
    c, r = batches()
    monkeypatch.setattr(layers, "SMALL_MODULE_NUMEL", 8)
    tiny_model.base_model.gate = SoftGate(4)  # 12 parameters of no supported kind
    with pytest.raises(TypeError, match=r"cannot handle parameter\(s\): \S*gate\.a, "):
        fast_gradient_stats(tiny_model, c, r)
    monkeypatch.undo()
    first = next(iter(tiny_model.parameters()))
    first.requires_grad_(False)
    name = next(n for n, p in tiny_model.named_parameters() if p is first)
    with pytest.raises(ValueError, match=f"do not require grad: {name}"):
        fast_gradient_stats(tiny_model, c, r, [name])
    with pytest.raises(ValueError, match="3 chosen but 2 rejected"):
        fast_gradient_stats(tiny_model, c, r.select([0, 1]))


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


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_tokenwise_chunks_give_the_same_matrix(tiny_model, chunk):
    """Copies processed ``chunk`` at a time (rejected factors kept, chosen chunks multiplied
    with them): the same matrix as all copies at once, and as brute force."""
    c, r = batches()
    c, r = c.select([0]), r.select([0])
    whole = tokenwise_inner(tiny_model, c, r, chunk=64)
    got = tokenwise_inner(tiny_model, c, r, chunk=chunk)
    torch.testing.assert_close(got, whole, rtol=1e-10, atol=1e-12 * whole.abs().max())
    expected = brute_token_grads(tiny_model, c) @ brute_token_grads(tiny_model, r).T
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * expected.abs().max())
    norms = tokenwise_inner(tiny_model, c, c, chunk=chunk).diagonal()
    brute = brute_token_grads(tiny_model, c).pow(2).sum(1)
    torch.testing.assert_close(norms, brute, rtol=1e-8, atol=0)


def test_tokenwise_over_parameters_that_take_no_part_is_zero(tiny_model):
    c, r = batches()
    c, r = c.select([0]), r.select([0])
    tiny_model.unused = nn.Linear(2, 2).double()  # in the model, not in its forward
    try:
        got = tokenwise_inner(tiny_model, c, r, params=["unused.weight", "unused.bias"])
    finally:
        del tiny_model.unused
    assert got.shape == (len(CHOSEN[0]), len(REJECTED[0])) and not got.any()


def test_tokenwise_with_a_parameter_subset(tiny_model):
    c, r = batches()
    c, r = c.select([1]), r.select([1])
    names = [n for n, _ in tiny_model.named_parameters()][-3:]
    expected = brute_token_grads(tiny_model, c, names) @ brute_token_grads(tiny_model, r, names).T
    got = tokenwise_inner(tiny_model, c, r, scope="all", params=names)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * expected.abs().max())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-bias", "cohere", "granite", "gemma2"])
def test_tokenwise_head_matches_brute_force_on_the_output_layer(arch):
    """The head alone, its logits transformed or not (Cohere: scaled, Granite: divided, Gemma 2:
    soft-capped)."""
    if arch in HF_ARCHS:
        model = hf_model(arch, tie_word_embeddings=False).double()
    else:
        model = tiny_causal_lm(arch.split("-")[0], 30, seed=1, tie_embeddings=False).double()
    if arch == "llama-bias":
        model.lm_head = nn.Linear(32, 30, bias=True).double()
    head = model.get_output_embeddings()
    c, r = batches()
    c, r = c.select([1]), r.select([1])
    params = {n for n, p in model.named_parameters() if p is head.weight or p is head.bias}
    assert len(params) == (2 if arch == "llama-bias" else 1)
    expected = brute_token_grads(model, c, params) @ brute_token_grads(model, r, params).T
    got = tokenwise_inner(model, c, r, scope="head")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tokenwise_inner(model, c, r, params=params), got, rtol=1e-8, atol=0)


def test_tokenwise_rejects_bad_arguments(tiny_model):
    c, r = batches()
    with pytest.raises(ValueError, match="scope"):
        tokenwise_inner(tiny_model, c.select([0]), r.select([0]), scope="body")
    with pytest.raises(ValueError, match="one chosen and one rejected"):
        tokenwise_inner(tiny_model, c, r)
    with pytest.raises(ValueError, match="params must be None"):
        tokenwise_inner(tiny_model, c.select([0]), r.select([0]), scope="head", params=["x"])
    for chunk in (0, 1.5, True):
        with pytest.raises(ValueError, match="chunk"):
            tokenwise_inner(tiny_model, c.select([0]), r.select([0]), chunk=chunk)


def test_recorder_recovers_stats_from_a_scaled_training_backward(tiny_model):
    """Back-propagating sum_i c_i u_i (a training loss) and dividing by c gives unit stats."""
    c, r = batches("left")
    joint = concat_batches(c, r)
    coef = torch.tensor([-0.3, -0.05, -2.0, 0.4, 0.07, 1.5], dtype=torch.float64)
    with GhostRecorder(tiny_model, keep_outputs=False, batch=joint) as rec:
        u = sequence_logprobs(tiny_model, joint)
        (coef * u).sum().backward()
        stats = rec.pair_stats(coef[:3], coef[3:])
    exact = exact_gradient_stats(tiny_model, c, r)
    assert_stats_close(stats, exact, SCALED_RTOL, keys=PAIR_KEYS)
    assert all(p.grad is not None for p in tiny_model.parameters())  # training grads intact


def dpo_like(beta: float):
    def loss(u_w: torch.Tensor, u_l: torch.Tensor) -> torch.Tensor:
        return -nn.functional.logsigmoid(beta * (u_w - u_l)).mean()

    return loss


def test_training_step_stats_equal_exact_and_leave_the_training_gradient(tiny_model):
    c, r = batches("left")
    exact = exact_gradient_stats(tiny_model, c, r)
    tiny_model.zero_grad()
    loss, stats = training_step_stats(tiny_model, c, r, dpo_like(0.5))
    assert_stats_close(stats, exact, SCALED_RTOL)
    # Coefficients: dLoss/du_w = -beta sig(-beta D) / B, dLoss/du_l = +beta sig(-beta D) / B.
    d = 0.5 * torch.sigmoid(-0.5 * (exact["logp_chosen"] - exact["logp_rejected"])) / 3
    torch.testing.assert_close(stats["coef_chosen"], -d, rtol=1e-8, atol=0)
    torch.testing.assert_close(stats["coef_rejected"], d, rtol=1e-8, atol=0)
    got = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    joint = concat_batches(c, r)
    u = sequence_logprobs(tiny_model, joint)
    expected = dpo_like(0.5)(u[:3], u[3:])
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    for g, p in zip(got, tiny_model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-14)


def test_pairs_without_gradient_in_the_training_backward_are_nan(tiny_model):
    c, r = batches()
    weights = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    weights[0] = TINY_COEFFICIENT / 10  # not exactly 0: NaN by the threshold, not by 0 / 0

    def weighted_margin(u_w, u_l):
        return (weights * (u_l - u_w)).sum()

    _, stats = training_step_stats(tiny_model, c, r, weighted_margin)
    exact = exact_gradient_stats(tiny_model, c, r)
    for k in PAIR_KEYS:
        assert torch.isnan(stats[k][0]), k
        torch.testing.assert_close(stats[k][1:], exact[k][1:], rtol=SCALED_RTOL, atol=0)


def test_expect_after_the_backward_is_an_error(tiny_model):
    c, r = batches()
    joint = concat_batches(c, r)
    with GhostRecorder(tiny_model, batch=joint) as rec:
        rec.backward(sequence_logprobs(tiny_model, joint).sum())
        with pytest.raises(RuntimeError, match="before the backward"):
            rec.expect_pairs(3)


# -- per-layer factor functions, each on its own ------------------------------------------


def brute_layer_products(module, inputs, g):
    """(N, N) float64 ``<grad f_i, grad f_j>`` over the module's trainable parameters, with
    ``f_i = sum(g_i * module(inputs_i))``: one autograd call per sequence, flattened."""
    flat = brute_layer_gradients(module, inputs, g)
    return flat @ flat.T


def brute_layer_gradients(module, inputs, g):
    """(N, P) float64 ``grad f_i`` over the module's trainable parameters (in
    ``module.parameters()`` order, flattened), ``f_i = sum(g_i * module(inputs_i))``."""
    params = [p for p in module.parameters() if p.requires_grad]
    rows = []
    for i in range(len(inputs)):
        out = module(inputs[i : i + 1])
        grads = torch.autograd.grad((out * g[i : i + 1]).sum(), params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (q if q is not None else torch.zeros_like(p)).double().flatten()
                    for q, p in zip(grads, params, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def factor_products(found):
    """(N, N) products of the factors returned by a layer function, summed over parameters."""
    some = next(iter(found.values())).resolved()
    n = len(some.vec if some.vec is not None else some.right)
    ii = torch.arange(n).repeat_interleave(n)
    jj = torch.arange(n).repeat(n)
    total = sum(factors.factor_inner(f, f, ii, jj) for f in found.values())
    return total.reshape(n, n)


def lora_linear():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(5, 4)).double()
    cfg = LoraConfig(r=2, target_modules=["0"], init_lora_weights=False, lora_dropout=0.0)
    return inject_adapter_in_model(cfg, holder)[0]


def llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


class ScaledEmbedding(nn.Embedding):
    """Gemma's kind of embedding: the table's rows times a scalar ``embed_scale``."""

    def __init__(self, *args, scale: float = 2.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(scale), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class TanhEmbedding(ScaledEmbedding):
    """Has an ``embed_scale`` but is not the embedding times it: the check sends it to the
    fallback (per-sequence autograd, on token ids)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(ids))


LAYERS = {
    "Linear": lambda: nn.Linear(5, 4).double(),
    "Conv1D": lambda: Conv1D(4, 5).double(),
    "Embedding": lambda: nn.Embedding(7, 4, padding_idx=2).double(),
    "ScaledEmbedding": lambda: ScaledEmbedding(7, 4, padding_idx=2).double(),
    "TanhEmbedding": lambda: TanhEmbedding(7, 4, padding_idx=2).double(),
    "LayerNorm": lambda: nn.LayerNorm(5).double(),
    "RMSNorm": lambda: nn.RMSNorm(5).double(),
    "LlamaRMSNorm": llama_rmsnorm,
    "LoRA": lora_linear,
    "SoftGate": lambda: SoftGate(5).double(),
}


def layer_inputs(name, module):
    gen = torch.Generator().manual_seed(3)
    if name.endswith("Embedding"):
        inputs = torch.randint(0, 7, (4, 3), generator=gen)
        inputs[0, 1] = 2  # the padding row gets no gradient
    else:
        inputs = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        if isinstance(module, nn.LayerNorm | Conv1D) or name == "Linear":
            for p in module.parameters():
                p.normal_(generator=gen)
        out = module(inputs)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    g[1, 2] = 0.0  # a padding row: zero output gradient
    return inputs, g


FALLBACK = ("LoRA", "SoftGate", "TanhEmbedding")  # no rule of their own (LoRA: its layers')


@pytest.mark.parametrize("name", [n for n in LAYERS if n not in FALLBACK])
def test_layer_factors_equal_per_sequence_autograd(name):
    """Each registered pure function alone: its factors' products equal brute force."""
    module = LAYERS[name]()
    inputs, g = layer_inputs(name, module)
    rule = layers.rule_for(module)
    assert rule is not None and rule.name in (name, "LayerNorm/RMSNorm", "Embedding")
    x = inputs[..., None] if name.endswith("Embedding") else inputs
    wanted = frozenset(n for n, _ in module.named_parameters())
    found = rule.factors(module, x, g, wanted)
    assert set(found) == wanted
    expected = brute_layer_products(module, inputs, g)
    torch.testing.assert_close(factor_products(found), expected, rtol=1e-10, atol=1e-12)
    materialized = {k: factors.materialize(f) for k, f in found.items()}
    torch.testing.assert_close(factor_products(materialized), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(LAYERS))
def test_recorder_on_one_layer_equals_per_sequence_autograd(name):
    """The recorder around a single layer (LoRA: adapter layers of a peft ``lora.Linear``;
    SoftGate: the fallback) gives every pair's product."""
    module = LAYERS[name]()
    inputs, g = layer_inputs(name, module)
    n = len(inputs)
    ii, jj = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    with GhostRecorder(module) as rec:
        rec.expect(all=(ii, jj))
        rec.backward((module(inputs) * g).sum())
    expected = brute_layer_products(module, inputs, g)
    torch.testing.assert_close(rec.results()["all"].reshape(n, n), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(LAYERS))
def test_directional_derivatives_from_kept_factors_equal_autograd(name):
    """``keep_factors=True``: every use's factors are kept and ``directional(v)`` gives
    ``grad f_i . v`` per sequence (``factor_dot`` of outer, one-hot and dense factors, the
    fallback's included), equal to per-sequence autograd gradients dotted with ``v``."""
    module = LAYERS[name]()
    inputs, g = layer_inputs(name, module)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(5)
    v = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in named}
    with GhostRecorder(module, keep_factors=True) as rec:
        rec.backward((module(inputs) * g).sum())
    assert not rec.totals and rec.uses  # nothing reduced
    expected = brute_layer_gradients(module, inputs, g) @ torch.cat(
        [v[n].flatten() for n, _ in named]
    )
    torch.testing.assert_close(rec.directional(v), expected, rtol=1e-10, atol=1e-12)


def random_factor(kind, n, t, gen):
    """A factor of ``n`` sequences with ``t`` rows of a (6, 3) parameter."""
    right = torch.randn(n, t, 3, generator=gen, dtype=torch.float64)
    if kind == "outer":
        return factors.Factor.outer(torch.randn(n, t, 6, generator=gen, dtype=torch.float64), right)
    if kind == "onehot":
        return factors.Factor.onehot(torch.randint(0, 6, (n, t), generator=gen), right)
    return factors.Factor.dense(torch.randn(n, 18, generator=gen, dtype=torch.float64))


KINDS = [("outer", "outer"), ("onehot", "onehot"), ("onehot", "outer"), ("outer", "onehot")]


@pytest.mark.parametrize("kinds", [*KINDS, ("dense", "dense")])
def test_factor_grid_equals_the_products_of_every_pair(kinds):
    """``factor_grid(u, v)``: every sequence of u with every sequence of v (different counts and
    lengths), the same as ``factor_inner`` on the N_u N_v index pairs of the concatenation."""
    gen = torch.Generator().manual_seed(11)
    u, v = random_factor(kinds[0], 3, 4, gen), random_factor(kinds[1], 2, 5, gen)
    got = factors.factor_grid(u, v)
    assert got.shape == (3, 2) and got.dtype == torch.float64
    for i in range(3):
        for j in range(2):
            one = factors.factor_inner(u, v, torch.tensor([i]), torch.tensor([j]))
            torch.testing.assert_close(got[i, j], one[0], rtol=1e-12, atol=1e-12)


def test_factor_grid_refuses_to_mix_dense_and_factored_uses():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(TypeError, match="cannot mix"):
        factors.factor_grid(random_factor("dense", 2, 3, gen), random_factor("outer", 2, 3, gen))


def test_directional_derivatives_of_a_model_equal_autograd(tiny_model):
    """On a whole model (GPT-2 style: tied embeddings, two uses of one weight whose factors
    are both kept and added), the directional derivatives of every sequence's log-prob equal
    per-sequence autograd gradients dotted with the direction."""
    model, batch = tiny_model, concat_batches(*batches())
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    v = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}
    with GhostRecorder(model, batch=batch, keep_factors=True) as rec:
        rec.backward(sequence_logprobs(model, batch).sum())
    expected = []
    for i in range(len(batch)):
        u_i = sequence_logprobs(model, batch.select([i]))[0]
        grads = torch.autograd.grad(u_i, list(params.values()))
        expected.append(sum((q * v[n]).sum() for q, n in zip(grads, params, strict=True)))
    torch.testing.assert_close(rec.directional(v), torch.stack(expected), rtol=1e-9, atol=1e-12)
    with GhostRecorder(model) as plain, pytest.raises(RuntimeError, match="keep_factors"):
        plain.directional(v)


def test_kept_rows_of_a_training_backward_give_their_directional_derivatives(tiny_model):
    """``keep_rows``: in a backward of ``sum_i c_i u_i`` (a training loss) the pair statistics
    are reduced as without it, and the kept sequences' factors give ``c_i grad u_i . v`` for
    those sequences, in the order asked, also after the recorder is cleared for the next
    backward."""
    model, batch = tiny_model, concat_batches(*batches())
    n = len(batch)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(2)
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
    c = torch.linspace(-1.5, 2.0, n, dtype=torch.float64)
    rows = [3, 0, n - 1]
    with GhostRecorder(model, batch=batch, keep_factors=True) as every:
        every.backward(sequence_logprobs(model, batch).sum())
    unit = every.directional(v)
    results = {}
    for keep in (False, True):
        with GhostRecorder(model, batch=batch) as rec:
            if keep:
                rec.keep_rows(rows)
            rec.backward((c.to(torch.float32) * sequence_logprobs(model, batch)).sum())
            results[keep] = rec.results(c)
            if keep:
                kept = rec.kept()
                rec.clear()
                with pytest.raises(RuntimeError, match="keep_factors=True or call keep_rows"):
                    rec.kept()
    for key in results[False]:
        torch.testing.assert_close(results[True][key], results[False][key], rtol=0, atol=0)
    torch.testing.assert_close(kept.directional(v) / c[rows], unit[rows], rtol=1e-6, atol=1e-9)
    with GhostRecorder(model, batch=batch) as rec, pytest.raises(ValueError, match=">= 0"):
        rec.keep_rows([])


class ScaledLinear(nn.Module):
    """``y = s W x``: a layer type of the user's, unknown to the registry."""

    def __init__(self, weight: torch.Tensor, s: float):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.s = s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.s * nn.functional.linear(x, self.weight)


def test_a_custom_layer_type_added_through_the_registry(monkeypatch):
    monkeypatch.setattr(layers, "_RULES", list(layers._RULES))  # registrations stay in this test
    monkeypatch.setattr(layers, "SMALL_MODULE_NUMEL", 0)  # no fallback: a rule is needed
    model = tiny_causal_lm("llama", 30, seed=4).double()
    model.lm_head = ScaledLinear(model.lm_head.weight.detach(), 0.7)  # 2-D rows: the head
    c, r = batches()
    with pytest.raises(TypeError, match=r"cannot handle parameter\(s\): lm_head\.weight"):
        fast_gradient_stats(model, c, r)
    calls = []

    @layers.register_layer(ScaledLinear, single_use=True)
    def scaled_linear_factors(module, x, g, wanted):
        # y = s W x:  grad_W f_i = sum_t (s g_t) x_t^T
        calls.append(x.shape)
        return {"weight": factors.Factor.outer(module.s * layers.promote(g), layers.promote(x))}

    assert layers.rule_for(model.lm_head).factors is scaled_linear_factors
    assert_fast_equals_exact(model, ["lm_head.weight", "model.norm.weight"])
    assert calls and all(len(shape) == 3 for shape in calls)


# -- strategies and the record ------------------------------------------------------------


def test_strategies_by_name_agree_and_unknown_names_raise(tiny_model):
    from ge_utils.stats import get_strategy, strategy_names

    assert {"exact", "fast"} <= set(strategy_names())
    c, r = batches("left")
    exact = get_strategy("exact").pair_stats(tiny_model, c, r)
    assert_stats_close(get_strategy("fast").pair_stats(tiny_model, c, r), exact, 1e-8)
    with pytest.raises(ValueError, match="unknown statistics method 'ghost'; expected 'exact'"):
        get_strategy("ghost")


def test_training_step_of_both_strategies_agree(tiny_model):
    """The fast training step (one backward) against the exact one (backward, then per-sequence
    passes): same loss, same accumulated gradient, same statistics and coefficients."""
    from ge_utils.stats import get_strategy

    c, r = batches("left")
    out = {}
    for name in ("exact", "fast"):
        tiny_model.zero_grad()
        loss, stats = get_strategy(name).training_step(tiny_model, c, r, dpo_like(0.5))
        out[name] = loss, stats, [p.grad.clone() for p in tiny_model.parameters()]
    (loss_e, exact, grads_e), (loss_f, fast, grads_f) = out["exact"], out["fast"]
    torch.testing.assert_close(loss_f, loss_e, rtol=0, atol=0)
    for a, b in zip(grads_e, grads_f, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_stats_close(fast, exact, SCALED_RTOL, keys=(*KEYS, "coef_chosen", "coef_rejected"))


def test_pair_stats_is_a_record_and_a_read_only_mapping(tiny_model):
    from ge_utils.stats import PairStats

    stats = fast_gradient_stats(tiny_model, *batches())
    assert isinstance(stats, PairStats) and stats.n_pairs == 3
    assert set(stats) == set(KEYS) and stats["inner"] is stats.inner
    assert "coef_chosen" not in stats
    with pytest.raises(KeyError):
        stats["coef_chosen"]
    with pytest.raises(ValueError, match="differ in length"):
        PairStats(torch.zeros(2), torch.zeros(2), torch.zeros(3))


def test_all_pairs_targets_are_computed_as_one_block():
    """Token-wise targets (every chosen copy with every rejected copy) use one block product."""
    from ge_utils.stats.recorder import _as_grid

    a, b = torch.arange(3), 3 + torch.arange(4)
    grid = _as_grid(a.repeat_interleave(4), b.repeat(3))
    assert grid == (slice(0, 3), slice(3, 7))
    assert _as_grid(torch.arange(3), torch.arange(3) + 3) is None  # pairs, not all pairs
    rows, cols = _as_grid(a.repeat_interleave(4), b.flip(0).repeat(3))
    assert rows == slice(0, 3) and torch.equal(cols, b.flip(0))
    assert _as_grid(a.repeat_interleave(4), torch.cat([b.repeat(2), b.flip(0)])) is None


def _recorded(model, joint, group, targets=None, loss=None):
    """The recorder's results over ``joint`` with ``group``: the pair products (or ``targets``)
    of ``sum_i u_i``, or with ``loss`` (of the log-probs) its training backward, scaled back."""
    with GhostRecorder(model, batch=joint, group=group, keep_outputs=loss is None) as rec:
        if targets is not None:
            rec.expect(**targets)
        u = sequence_logprobs(model, joint)
        if loss is None:
            rec.backward(u.sum())
            return rec.results()
        value = loss(u)
        (coef,) = torch.autograd.grad(value, u, retain_graph=True)
        value.backward()
        return rec.results(coef)


@pytest.mark.parametrize("group", [2, 3, 64])
def test_layers_reduced_together_equal_layer_by_layer(tiny_model, group, monkeypatch):
    """``group > 1``: the factors of equal shapes (every layer's Gram products batched, dense
    gradients stacked, a shared input multiplied once) give the statistics of ``group=1`` and of
    brute force: pair products, every pair of a grid, and a training backward scaled back."""
    monkeypatch.setattr(factors, "MATERIALIZE_BYTES", 0)  # every linear layer as Gram products
    c, r = batches("left")
    joint = concat_batches(c, r)
    n = len(joint)
    grid = {"all": (torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n))}
    exact = exact_gradient_stats(tiny_model, c, r)
    for targets, loss in ((None, None), (grid, None), (None, lambda u: (u * u).sum() / 7)):
        one = _recorded(tiny_model, joint, 1, targets, loss)
        tiny_model.zero_grad()
        together = _recorded(tiny_model, joint, group, targets, loss)
        tiny_model.zero_grad()
        assert set(together) == set(one)
        for key in one:
            torch.testing.assert_close(together[key], one[key], rtol=1e-12, atol=0)
    together = _recorded(tiny_model, joint, group)
    assert_stats_close(together, exact, 1e-8, keys=PAIR_KEYS)
    torch.testing.assert_close(
        _recorded(tiny_model, joint, group, grid)["all"].reshape(n, n).diagonal()[:3],
        exact["norm2_chosen"],
        rtol=1e-8,
        atol=0,
    )


@pytest.mark.parametrize("group", [1, 3, 64])
def test_norm_layers_are_computed_together(tiny_model, group, monkeypatch):
    """The norm rule defers ``sum_t g_t * x_hat_t``: with ``group=k`` the recorder computes
    those of k norm layers in one call on their stacked rows (one call per layer for k = 1),
    and the statistics stay those of brute force."""
    sizes = []
    compute = layers.NormSlope.__call__

    def spy(self, x, g):
        sizes.append(x.shape[0])  # layers stacked along the first axis
        return compute(self, x, g)

    monkeypatch.setattr(layers.NormSlope, "__call__", spy)
    norms = sum(1 for m in tiny_model.modules() if layers._is_norm(m))
    c, r = batches("left")
    assert_stats_close(
        _recorded(tiny_model, concat_batches(c, r), group),
        exact_gradient_stats(tiny_model, c, r),
        1e-8,
        keys=PAIR_KEYS,
    )
    assert norms >= 3 and sum(sizes) == norms
    assert len(sizes) == -(-norms // group) and max(sizes) == min(group, norms)


def test_deferred_factor_products_equal_those_of_its_result():
    """A deferred factor (here a norm's) gives the products, grids and directional
    derivatives of the dense factor it resolves to."""
    torch.manual_seed(0)
    x, g = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    slope = layers.NormSlope("rms32", (5,), 1e-6)
    deferred = factors.Factor.deferred(slope, x, g)
    dense = deferred.resolved()
    assert dense.make is None and dense.vec.shape == (3, 5)
    torch.testing.assert_close(dense.vec, (g * slope.normalize(x)).sum(1), rtol=0, atol=0)
    stacked = slope(torch.stack([x, x]), torch.stack([g, -g]))
    torch.testing.assert_close(stacked, torch.stack([dense.vec, -dense.vec]))
    ii, jj = torch.tensor([0, 1, 2]), torch.tensor([2, 2, 0])
    for a, b in ((deferred, deferred), (deferred, dense)):
        torch.testing.assert_close(
            factors.factor_inner(a, b, ii, jj), factors.factor_inner(dense, dense, ii, jj)
        )
        torch.testing.assert_close(factors.factor_grid(a, b), factors.factor_grid(dense, dense))
    v = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(factors.factor_dot(deferred, v), dense.vec @ v)
    assert factors.materialize(deferred) is deferred  # left for the recorder to batch


@pytest.mark.parametrize("group", [0, -2, 1.5, True, "4"])
def test_bad_group_raises(tiny_model, group):
    with pytest.raises(ValueError, match="group must be a positive integer"):
        GhostRecorder(tiny_model, group=group)


def test_fast_gradient_stats_passes_its_group_to_the_recorder(tiny_model, monkeypatch):
    import ge_utils.stats.strategies as strategies

    seen = []

    class Spy(GhostRecorder):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("group"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(strategies, "GhostRecorder", Spy)
    c, r = batches("left")
    exact = exact_gradient_stats(tiny_model, c, r)
    assert_stats_close(fast_gradient_stats(tiny_model, c, r, group=5), exact, 1e-8)
    assert_stats_close(fast_gradient_stats(tiny_model, c, r), exact, 1e-8)
    assert seen == [5, None]


def test_factor_dot_moves_the_direction_to_the_factors_device():
    """A direction on the CPU contracted with factors on another device (the meta device here,
    which, like CUDA, refuses to mix with CPU tensors) gives the result on the factors' device:
    e.g. a CPU update with a model on a GPU."""
    meta = torch.device("meta")
    left, right = torch.empty(3, 4, 5, device=meta), torch.empty(3, 4, 6, device=meta)
    ids = torch.zeros(3, 4, dtype=torch.long, device=meta)
    uses = {
        "outer": (factors.Factor.outer(left, right), torch.randn(5, 6)),
        "onehot": (factors.Factor.onehot(ids, right), torch.randn(7, 6)),
        "dense": (factors.Factor.dense(torch.empty(3, 30, device=meta)), torch.randn(30)),
    }
    for kind, (use, v) in uses.items():
        dot = factors.factor_dot(use, v)
        assert dot.device == meta and dot.shape == (3,), kind


def test_trimmed_factor_drops_only_positions_without_a_term():
    """``Factor.trimmed`` drops the positions where every sequence's term is zero (an outer
    factor's zero ``left`` or zero ``right`` rows, a one-hot factor's zero ``right`` rows) and
    keeps every product: inner products, grids and directional derivatives."""
    torch.manual_seed(0)
    left, right = (
        torch.randn(3, 6, 4, dtype=torch.float64),
        torch.randn(3, 6, 5, dtype=torch.float64),
    )
    left[:, 5] = 0  # trailing padding: no output gradient
    right[:, 1] = 0  # a position without input
    left[0, 2] = 0  # zero in one sequence only: kept
    ids = torch.randint(0, 7, (3, 6))
    ii, jj = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 2])
    cases = {
        "outer": (factors.Factor.outer(left, right), torch.randn(4, 5, dtype=torch.float64), 4),
        "onehot": (factors.Factor.onehot(ids, right), torch.randn(7, 5, dtype=torch.float64), 5),
    }
    for kind, (use, v, kept) in cases.items():
        cut = use.trimmed()
        assert cut.right.shape[1] == kept, kind
        torch.testing.assert_close(
            factors.factor_inner(cut, cut, ii, jj), factors.factor_inner(use, use, ii, jj)
        )
        torch.testing.assert_close(factors.factor_grid(cut, use), factors.factor_grid(use, use))
        torch.testing.assert_close(factors.factor_dot(cut, v), factors.factor_dot(use, v))
    full = factors.Factor.outer(torch.ones(2, 3, 4), torch.ones(2, 3, 5))
    assert full.trimmed() is full
    dense = factors.Factor.dense(torch.zeros(2, 3))
    assert dense.trimmed() is dense


def test_kept_rows_are_trimmed_to_their_own_positions(tiny_model):
    """Rows kept for a few short sequences of a batch padded for longer ones hold only the
    positions those sequences use, and give the same directional derivatives as factors kept
    for the whole batch."""
    c, r = batches("right")
    joint = concat_batches(c, r)
    lengths = joint.attention_mask.sum(1)
    short = int(lengths.argmin())
    assert int(lengths[short]) < joint.input_ids.shape[1]
    with GhostRecorder(tiny_model, batch=joint) as rec:
        rec.keep_rows([short])
        rec.backward(sequence_logprobs(tiny_model, joint).sum())
        kept = rec.kept()
    with GhostRecorder(tiny_model, batch=joint, keep_factors=True) as every:
        every.backward(sequence_logprobs(tiny_model, joint).sum())
    widths = {u.right.shape[1] for uses in kept.uses.values() for u in uses if u.right is not None}
    assert max(widths) <= int(lengths[short])
    torch.manual_seed(1)
    v = {n: torch.randn_like(p) for n, p in tiny_model.named_parameters()}
    torch.testing.assert_close(kept.directional(v), every.directional(v)[[short]])
