"""Per-layer gradient factors: one pure function per module type, found through a registry.

For a module ``m`` applied to the rows of N sequences, with inputs ``x`` (N, T, d_in) and
output gradients ``g`` (N, T, d_out) of ``f_i`` (the scalar of sequence i), a factor function
returns, for each wanted parameter of ``m`` (by attribute name), a
:class:`~ge_utils.stats.factors.Factor` whose per-sequence gradients are ``grad_p f_i``:

- ``nn.Linear``, ``y = W a + b``: ``grad_W f_i = sum_t g_t a_t^T`` (outer factor, ``left = g``,
  ``right = a``), ``grad_b f_i = sum_t g_t`` (dense);
- transformers' ``Conv1D`` (GPT-2), ``y = a W + b`` with W (d_in, d_out): ``grad_W f_i =
  sum_t a_t g_t^T`` (``left = a``, ``right = g``);
- ``nn.Embedding``, ``y_t = E[id_t]``: ``grad_E f_i = sum_t e_{id_t} g_t^T`` (one-hot factor; the
  ``padding_idx`` row gets no gradient); a subclass whose output is ``embed_scale`` times that
  (Gemma's ``*ScaledWordEmbedding``; checked once per class), the same times the scale;
- OPT's learned positional embedding (and any ``nn.Embedding`` subclass with an integer
  ``offset`` that computes as it does, checked once per class), ``y_t = E[p_t + offset]`` with
  the positions ``p`` it is given (``position_ids=``) or counts over the attention mask: the
  embedding's factor with ids ``p_t + offset`` (read off the call by the rule's ``inputs``);
- ``nn.LayerNorm`` / ``nn.RMSNorm`` and any ``*RMSNorm`` class whose output is ``s(w) * x_hat``
  with ``ds/dw = 1`` (checked once per class with a forward-mode derivative):
  ``grad_w f_i = sum_t g_t * x_hat_t``, ``grad_b f_i = sum_t g_t`` (dense, d values each);
- LoRA adapters (peft) are pairs of ``nn.Linear`` layers (``lora_A``, ``lora_B``) and are
  covered by the linear rule, with GPT-2's ``fan_in_fan_out`` included;
- mixture-of-experts routers and experts (Mixtral's, GPT-OSS's and those computing the same):
  :mod:`ge_utils.stats.moe`;
- any other module with at most ``SMALL_MODULE_NUMEL`` parameters in the set (the fallback):
  per-sequence vector-Jacobian products through that module alone,
  ``grad_p f_i = (d m(x_i) / d p)^T g_i`` (vectorized with vmap, a loop where vmap cannot run).

How to add a layer type. Write a pure function ``factors(module, x, g, wanted) -> dict[str,
Factor]`` (``x``: input rows (N, T, d_in), token ids as (N, T, 1); ``g``: output-gradient
rows (N, T, d_out); rows with more axes, such as a per-head norm's (N, T, heads, d), come
flattened to (N, T * heads, d); both zero on padding rows, in the model's dtype: promote with
:func:`promote`; ``wanted``: the names of the module's own parameters in the set) and register
it for the module class::

    from ge_utils.stats.factors import Factor
    from ge_utils.stats.layers import promote, register_layer

    @register_layer(ScaledLinear, single_use=True)
    def scaled_linear_factors(module, x, g, wanted):
        # y = s * W x:  grad_W f_i = sum_t (s g_t) x_t^T
        return {"weight": Factor.outer(module.s * promote(g), promote(x))}

A class matches its own rule when its ``forward`` is the registered class's ``forward`` (a
subclass that overrides ``forward`` computes something else and needs its own rule); pass a
predicate ``match(module) -> bool`` instead of a class for anything else. Rules registered
later take precedence. ``single_use=True`` states that each call of the module uses each of its
parameters exactly once in the autograd graph and may receive its input as the keyword
``input``; the recorder then counts uses to catch the same parameter used outside its module.
Otherwise the module must be called with one positional tensor and no keyword arguments, unless
the rule has its own ``inputs``. ``inputs(module, args, kwargs, output)``, where given, maps a
call's arguments, and its output where the rule needs what the module returns besides (e.g.
attention probabilities), to the ``x`` its factor function takes (e.g. the rows a positional
embedding reads); by default the first positional tensor (or the keyword ``input``).
``output(out)``, where given, picks from the module's output the tensor whose gradient is ``g``
(e.g. :func:`first_output`: the logits of a router that returns a tuple); by default the output
itself, which must be a tensor. Add a
test of the new function against per-sequence autograd (``tests/test_fast_gradients.py``,
``test_layer_factors_equal_per_sequence_autograd``) and of a model using it against
:func:`ge_utils.stats.exact.exact_gradient_stats`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ge_utils.stats.factors import Factor

SMALL_MODULE_NUMEL = 2**20  # most parameters (in the set) of a module handled by the fallback

FactorFn = Callable[[nn.Module, Tensor, Tensor, frozenset[str]], dict[str, Factor]]
InputFn = Callable[[nn.Module, tuple, dict, object], Tensor]
OutputFn = Callable[[object], Tensor]


@dataclass(frozen=True)
class LayerRule:
    """A registered factor function: ``name`` (for messages), ``match(module)``, ``factors``,
    ``single_use``, ``inputs`` and ``output`` (see the module docstring)."""

    name: str
    match: Callable[[nn.Module], bool]
    factors: FactorFn
    single_use: bool
    inputs: InputFn | None = None
    output: OutputFn | None = None


_RULES: list[LayerRule] = []


def _same_forward(cls: type) -> Callable[[nn.Module], bool]:
    def match(module: nn.Module) -> bool:
        return isinstance(module, cls) and type(module).forward is cls.forward

    return match


def register_layer(
    kind: type | Callable[[nn.Module], bool],
    *,
    single_use: bool = False,
    name: str | None = None,
    inputs: InputFn | None = None,
    output: OutputFn | None = None,
) -> Callable[[FactorFn], FactorFn]:
    """Decorator: register ``factors`` for modules of class ``kind`` (matched when their
    ``forward`` is ``kind.forward``) or for the modules a predicate ``kind(module)`` accepts."""
    match = _same_forward(kind) if isinstance(kind, type) else kind
    label = name or getattr(kind, "__name__", repr(kind))

    def decorate(factors: FactorFn) -> FactorFn:
        _RULES.append(LayerRule(label, match, factors, single_use, inputs, output))
        return factors

    return decorate


def rule_for(module: nn.Module) -> LayerRule | None:
    """The most recently registered rule that matches ``module``; None: use the fallback."""
    return next((r for r in reversed(_RULES) if r.match(module)), None)


def first_output(out: object) -> Tensor:
    """A module's output, or the first of its outputs (a rule's ``output``)."""
    return out[0] if isinstance(out, tuple | list) else out


def promote(t: Tensor) -> Tensor:
    """Floating rows in at least float32 (half precisions promoted); others unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t


def _bias(module: nn.Module, g: Tensor, wanted: frozenset[str]) -> dict[str, Factor]:
    if "bias" in wanted and getattr(module, "bias", None) is not None:
        return {"bias": Factor.dense(promote(g).sum(1))}
    return {}


@register_layer(nn.Linear, single_use=True)
def linear_factors(
    module: nn.Module, x: Tensor, g: Tensor, wanted: frozenset[str]
) -> dict[str, Factor]:
    """``y = W a + b``: ``grad_W f_i = sum_t g_t a_t^T``, ``grad_b f_i = sum_t g_t``."""
    out = {"weight": Factor.outer(promote(g), promote(x))} if "weight" in wanted else {}
    return out | _bias(module, g, wanted)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@register_layer(_is_conv1d, single_use=True, name="Conv1D")
def conv1d_factors(
    module: nn.Module, x: Tensor, g: Tensor, wanted: frozenset[str]
) -> dict[str, Factor]:
    """transformers' ``Conv1D``, ``y = a W + b`` with W (d_in, d_out):
    ``grad_W f_i = sum_t a_t g_t^T``, ``grad_b f_i = sum_t g_t``."""
    out = {"weight": Factor.outer(promote(x), promote(g))} if "weight" in wanted else {}
    return out | _bias(module, g, wanted)


_SCALE_IS_FACTOR: dict[type, bool] = {}  # per scaled-embedding class: checked once per process


def _embedding_scale(module: nn.Module) -> Tensor | None:
    """The scalar ``s`` (in the weight's dtype) of an ``nn.Embedding`` subclass whose output is
    ``s E[id_t]``: its ``embed_scale``, checked once per class on a few ids (Gemma's and others'
    ``*ScaledWordEmbedding``); None for any other module, ``nn.Embedding`` itself included."""
    if not isinstance(module, nn.Embedding) or type(module).forward is nn.Embedding.forward:
        return None
    weight, scale = module.weight, getattr(module, "embed_scale", None)
    if not isinstance(scale, Tensor | float | int) or torch.as_tensor(scale).numel() != 1:
        return None
    # in the weight's dtype from the start: a Python float made a float32 tensor first would
    # be rounded to float32 in a float64 model (BioGPT's sqrt(d))
    scale = torch.as_tensor(scale, dtype=weight.dtype, device=weight.device).reshape(())
    known = _SCALE_IS_FACTOR.get(type(module))
    if known is None:
        ids = torch.arange(min(module.num_embeddings, 8), device=weight.device)[None]
        with torch.no_grad():
            out = type(module).forward(module, ids)  # without hooks, like _Bare
            expected = nn.functional.embedding(ids, weight, module.padding_idx) * scale
        known = out.shape == expected.shape and bool(torch.allclose(out, expected, atol=0))
        _SCALE_IS_FACTOR[type(module)] = known
    return scale if known else None


def _is_embedding(module: nn.Module) -> bool:
    embedding = _same_forward(nn.Embedding)(module) or _embedding_scale(module) is not None
    return embedding and not module.scale_grad_by_freq


@register_layer(_is_embedding, single_use=True, name="Embedding")
def embedding_factors(
    module: nn.Module, x: Tensor, g: Tensor, wanted: frozenset[str]
) -> dict[str, Factor]:
    """``y_t = s E[id_t]`` (``s = 1`` for ``nn.Embedding``; a scaled subclass's
    ``embed_scale``): ``grad_E f_i = s sum_t e_{id_t} g_t^T``; the ``padding_idx`` row's
    gradient is zero by definition. (``scale_grad_by_freq`` embeddings use the fallback.)"""
    ids = x[..., 0].long()
    scale = _embedding_scale(module)
    g = promote(g) if scale is None else promote(g) * promote(scale)
    if module.padding_idx is not None:
        g = g * (ids != module.padding_idx)[..., None].to(g.dtype)
    return {"weight": Factor.onehot(ids, g)} if "weight" in wanted else {}


def mask_positions(mask: Tensor) -> Tensor:
    """(N, S) long positions counted over the non-padding entries of an attention mask (N, S),
    as OPT computes them: ``cumsum(mask) * mask - 1`` (-1 on padding)."""
    return (torch.cumsum(mask, dim=1) * mask - 1).long()


_OFFSET_POSITIONS: dict[type, bool] = {}  # per positional-embedding class: checked once


def offset_position_ids(
    module: nn.Module, args: tuple, kwargs: dict, output: object = None
) -> Tensor:
    """(N, T) rows that ``module(attention_mask, cache_length=0, position_ids=None)`` reads, as
    OPT's learned positional embedding computes them: ``position_ids + offset`` when given,
    else ``mask_positions(attention_mask)`` without the first ``cache_length`` columns, plus
    ``offset``."""
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    bound.apply_defaults()
    mask, cache = list(bound.arguments.values())[1:3]
    positions = bound.arguments.get("position_ids")
    if positions is None:
        positions = mask_positions(mask)[:, cache:]
    return positions + module.offset


def _is_offset_positions(module: nn.Module) -> bool:
    """An ``nn.Embedding`` subclass with an integer ``offset`` (OPT's, BioGPT's
    ``*LearnedPositionalEmbedding``) whose forward reads the rows
    :func:`offset_position_ids` names: checked once per class on a padded mask, with and
    without a cache, and with positions given where its forward takes ``position_ids`` (BART's
    kind, which counts positions without the mask, fails it)."""
    if not isinstance(module, nn.Embedding) or type(module).forward is nn.Embedding.forward:
        return False
    offset = getattr(module, "offset", None)
    if type(offset) is not int or module.scale_grad_by_freq:
        return False
    if not 1 <= offset <= module.num_embeddings - 4:  # the check reads rows offset - 1 to
        return False  # offset + 3 (one out of range: a device-side assert on a GPU)
    known = _OFFSET_POSITIONS.get(type(module))
    if known is None:
        weight = module.weight
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], device=weight.device)
        calls: list[tuple[tuple, dict]] = [((mask, 0), {}), ((mask, 2), {})]
        if "position_ids" in inspect.signature(type(module).forward).parameters:
            given = torch.tensor([[3, 0, 1, 0, 2], [0, 1, 0, 1, 2]], device=weight.device)
            calls.append(((mask, 0), {"position_ids": given}))
        try:
            with torch.no_grad():
                known = all(
                    torch.equal(
                        type(module).forward(module, *args, **kwargs),  # without hooks
                        nn.functional.embedding(
                            offset_position_ids(module, args, kwargs), weight
                        ),
                    )
                    for args, kwargs in calls
                )
        except (IndexError, RuntimeError, TypeError, ValueError):  # not called that way
            known = False
        _OFFSET_POSITIONS[type(module)] = known
    return known


# y_t = E[p_t + offset]: the embedding's factor (above) with the ids p_t + offset, so that
# <grad_E f_i, grad_E f_j> = sum_{t, s: p_t = p_s} g_{i,t} . g_{j,s}
register_layer(
    _is_offset_positions,
    single_use=True,
    name="OffsetPositionalEmbedding",
    inputs=offset_position_ids,
)(embedding_factors)


class _Bare(nn.Module):
    """Runs ``inner.forward`` directly: the module's own computation without its hooks (whose
    output changes, if any, lie downstream of the output gradient that the recorder sees)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args: Tensor) -> Any:
        return self.inner.forward(*args)


_SLOPE_IS_NORMALIZED: dict[type, bool] = {}  # per RMSNorm class: checked once per process


@dataclass(frozen=True)
class NormSlope:
    """``sum_t g_t * x_hat_t`` (the gradient of a norm's elementwise weight) for rows ``x``,
    ``g`` (..., N, T, D) with any leading axes: (..., N, D), products in at least float32.
    ``x_hat`` as the norm computes it before its affine map, in ``x``'s dtype: ``"layer"``
    (``nn.LayerNorm``), ``"rms"`` (``nn.RMSNorm``) or ``"rms32"`` (``x / rms`` with the rms in
    float32, as transformers' ``*RMSNorm`` classes). Hashable, so that the recorder can compute
    the norms of several layers with equal settings in one call (:meth:`Factor.deferred`)."""

    kind: str
    shape: tuple[int, ...]
    eps: float | None

    def normalize(self, x: Tensor) -> Tensor:
        if self.kind == "layer":
            return nn.functional.layer_norm(x, self.shape, eps=self.eps)
        if self.kind == "rms":
            return nn.functional.rms_norm(x, self.shape, eps=self.eps)
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def __call__(self, x: Tensor, g: Tensor) -> Tensor:
        return (promote(g) * promote(self.normalize(x))).sum(-2)


def _normalized(module: nn.Module, x: Tensor) -> NormSlope | None:
    """How the norm ``module`` normalizes ``x`` before its elementwise affine map, so that the
    weight's gradient is ``sum_t g_t * x_hat_t`` (and a bias's ``sum_t g_t``). None when a class
    named ``*RMSNorm`` turns out not to be ``s(w) * x_hat`` with ``ds/dw = 1`` (checked once per
    class with a forward-mode derivative)."""
    forward = type(module).forward
    if forward is nn.LayerNorm.forward:
        return NormSlope("layer", tuple(module.normalized_shape), module.eps)
    if forward is nn.RMSNorm.forward:
        return NormSlope("rms", tuple(module.normalized_shape), module.eps)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    slope = NormSlope("rms32", tuple(x.shape[-1:]), float(eps))
    known = _SLOPE_IS_NORMALIZED.get(type(module))
    if known is None:
        weight = module.weight.detach()
        direction = torch.linspace(0.5, 1.5, weight.numel(), dtype=weight.dtype)
        direction = direction.to(weight.device).reshape(weight.shape)

        def forward_of(w: Tensor) -> Tensor:
            return torch.func.functional_call(_Bare(module), {"inner.weight": w}, (x,))

        try:
            _, derivative = torch.func.jvp(forward_of, (weight,), (direction,))
        except RuntimeError:  # forward-mode AD cannot run it: treat as unknown
            known = False
        else:
            expected = (direction * slope.normalize(x)).float()
            tol = 1e-3 * float(expected.abs().max())
            known = bool(torch.allclose(derivative.float(), expected, rtol=1e-3, atol=tol))
        _SLOPE_IS_NORMALIZED[type(module)] = known
    return slope if known else None


def _is_norm(module: nn.Module) -> bool:
    forward = type(module).forward
    if forward is nn.LayerNorm.forward or forward is nn.RMSNorm.forward:
        return True
    names = [n for n, _ in module.named_parameters(recurse=False)]
    return type(module).__name__.endswith("RMSNorm") and names == ["weight"]


@register_layer(_is_norm, name="LayerNorm/RMSNorm")
def norm_factors(
    module: nn.Module, x: Tensor, g: Tensor, wanted: frozenset[str]
) -> dict[str, Factor]:
    """``y = s(w) * x_hat + b`` (LayerNorm: ``x_hat = (x - mean) / std``; RMSNorm: ``x / rms``):
    ``grad_w f_i = sum_t g_t * x_hat_t`` (deferred: the recorder may compute several norm
    layers' together), ``grad_b f_i = sum_t g_t``. An ``*RMSNorm`` class that fails the slope
    check goes to :func:`small_module_factors`."""
    slope = _normalized(module, x)
    if slope is None:
        return small_module_factors(module, x, g, wanted)
    out = {}
    if "weight" in wanted and getattr(module, "weight", None) is not None:
        out["weight"] = Factor.deferred(slope, x, g)
    return out | _bias(module, g, wanted)


def small_module_factors(
    module: nn.Module, x: Tensor, g: Tensor, wanted: frozenset[str]
) -> dict[str, Factor]:
    """The fallback for any module: per-sequence gradients ``(d m(x_i) / d p)^T g_i`` of the
    wanted parameters (N, numel each), by vmap over sequences (a loop where vmap cannot run the
    module). Exact for any module that treats sequences independently."""
    names: dict[str, Tensor] = dict(module.named_parameters(recurse=False))
    ordered = [n for n in names if n in wanted]
    if not x.is_floating_point():  # token ids, given as (N, T, 1) rows: the module reads (N, T)
        x = x[..., 0]
    with torch.enable_grad():
        try:
            per_seq = _small_grads_vmap(module, names, ordered, x, g)
        except RuntimeError:
            per_seq = _small_grads_loop(module, [names[n] for n in ordered], x, g)
    flat = (promote(t.reshape(len(x), -1)) for t in per_seq)
    return {n: Factor.dense(v) for n, v in zip(ordered, flat, strict=True)}


def _small_grads_vmap(
    module: nn.Module, names: dict[str, Tensor], wanted: list[str], x: Tensor, g: Tensor
) -> list[Tensor]:
    """Vectorized over sequences, in at least float32 (parameters and rows promoted)."""
    dtype = torch.promote_types((x if x.is_floating_point() else g).dtype, torch.float32)
    bare = _Bare(module)
    fixed = {f"inner.{n}": p.detach().to(dtype) for n, p in names.items() if n not in wanted}

    def contribution(free: dict[str, Tensor], xi: Tensor, gi: Tensor) -> Tensor:
        out = torch.func.functional_call(bare, {**fixed, **free}, (xi[None],))
        return (out * gi[None].to(out.dtype)).sum()

    free = {f"inner.{n}": names[n].detach().to(dtype) for n in wanted}
    per_seq = torch.func.vmap(torch.func.grad(contribution), in_dims=(None, 0, 0))
    grads = per_seq(free, x.to(dtype) if x.is_floating_point() else x, g.to(dtype))
    return [grads[f"inner.{n}"] for n in wanted]


def _small_grads_loop(
    module: nn.Module, params: list[Tensor], x: Tensor, g: Tensor
) -> list[Tensor]:
    """One vector-Jacobian product per sequence, in the module's own precision."""
    rows = []
    for i in range(len(x)):
        out = module.forward(x[i : i + 1])  # without hooks, like _Bare
        rows.append(torch.autograd.grad(out, params, g[i : i + 1].to(out.dtype)))
    return [torch.stack(col) for col in zip(*rows, strict=True)]
