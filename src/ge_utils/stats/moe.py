"""Mixture-of-experts layers: the top-k router and the experts of transformers' sparse MoE
blocks (Mixtral's and GPT-OSS's, and any class whose forward computes the same, as Qwen2-MoE's,
Qwen3-MoE's and OLMoE's do), registered with :func:`~ge_utils.stats.layers.register_layer` on
import.

Router. ``L_t = W x_t (+ b)`` (the E logits of token t; GPT-OSS's has the bias), then ``p_t =
softmax(L_t)``, its k largest entries at indices ``I_t``, renormalized to sum to one (always in
Mixtral, optional elsewhere; GPT-OSS takes the top k first and the softmax of those); the module
returns ``(L, scores, I)``. The weight and the bias reach the loss only through ``L``, so

    grad_W f_i = sum_{t in i} gL_t x_t^T,    grad_b f_i = sum_{t in i} gL_t,    gL_t = d f_i / d L_t

the linear rule's factors. ``gL_t`` is the scores' gradient pulled back through the
renormalization, the top-k selection (at its indices, which are piecewise constant: fixed) and
the softmax, plus the logits' own gradient where something reads them (an auxiliary loss).
Autograd forms exactly that sum at the logits tensor, and that is where the recorder hooks (the
rule's ``output`` picks the logits from the tuple), so the pull-back is not computed twice. A
class is accepted when its forward, on a probe (checked once per class), returns logits ``x
W^T (+ b)`` (as its output or the first of its outputs) and the gradients of ``sum_o <out_o,
r_o>`` (random ``r_o`` for every differentiable output) are ``gL^T x`` and ``sum_t gL_t`` with
``gL`` read at the logits: the weight and the bias reach nothing but them.

Experts. Stacked weights ``U`` (E, 2I, H) (``gate_up_proj``) and ``D`` (E, H, I)
(``down_proj``); token t goes to its k experts ``e = I_{t,j}`` with weights ``w_{t,j}``:

    y_t = sum_j w_{t,j} D_e a_{t,j},    a_{t,j} = act(u_g) * u_u,    (u_g; u_u) = U_e x_t

Every (token, slot) row ``s = (t, j)`` is one use of expert ``e_s``'s two matrices:

    grad_{D_e} f_i = sum_{s in i, e_s = e} gD_s a_s^T,    gD_s = w_s g_t
    grad_{U_e} f_i = sum_{s in i, e_s = e} gU_s x_t^T,    gU_s = J_s^T (D_e^T gD_s)

with ``g_t = d f_i / d y_t`` (the module's output gradient) and ``J_s`` the Jacobian of
``act(u_g) * u_u`` at ``U_e x_t``. GPT-OSS's layout (:class:`ExpertsLayout`) stores the blocks
transposed, ``U`` (E, H, 2I) and ``D`` (E, I, H) applied as ``x U_e`` and ``a D_e``, adds
biases ``b_e`` (E, 2I) and ``c_e`` (E, H) to the two products (``grad_{b_e} f_i = sum_s gU_s``,
``grad_{c_e} f_i = sum_s gD_s``: grouped factors with a right side of ones), and computes ``a``
with its own ``_apply_gate`` (gate and up interleaved, both clamped): the rule takes the
class's ``_apply_gate`` (every transformers experts class has one) or its ``act_fn``.

The rows are labelled by their expert (a grouped factor,
:meth:`~ge_utils.stats.factors.Factor.grouped`), so that the inner product over a 3-D parameter
is a Gram product with a same-expert mask:

    <grad f_i, grad f_j> = sum_{s in i, r in j} [e_s = e_r] (gD_s . gD_r) (a_s . a_r)

(and likewise ``(gU_s . gU_r) (x_s . x_r)`` for ``U``). The module's hooks do not see ``a``
and ``U_e x_t``, which are internal to its forward: the rule recomputes them from the captured
``(hidden_states, top_k_index, top_k_weights)`` with the module's own weights and activation in
its dtype, as the forward computed them, so the factors are exact; ``gU`` is one
vector-Jacobian product over all rows. The routing weights' own gradient reaches the router
through its scores (above). A padding row has ``g_t = 0``: its rows contribute nothing. A class
is accepted when its forward, on a probe with small random weights (checked once per class and
experts implementation: transformers' eager loop, batched or grouped matrix products), equals
this formula; expert parallelism is not supported.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ge_utils.stats.factors import Factor
from ge_utils.stats.layers import _Bare, first_output, promote, register_layer

EXPERTS_ARGS = ("hidden_states", "top_k_index", "top_k_weights")
PROBE_EPS = 64  # a probe's values agree within this many epsilons of their dtype (relative)

_ROUTER_CHECKED: dict[type, bool] = {}  # per router class: checked once per process
_EXPERTS_CHECKED: dict[tuple[type, str | None], bool] = {}  # per class and implementation


def _close(got: Tensor, expected: Tensor, dtype: torch.dtype) -> bool:
    """``got`` equals ``expected`` within ``PROBE_EPS`` epsilons of ``dtype``, relative to the
    largest value of ``expected``."""
    if got.shape != expected.shape:
        return False
    got, expected = _cpu64(got), _cpu64(expected)
    tol = PROBE_EPS * torch.finfo(dtype).eps * float(expected.abs().max())
    return bool((got - expected).abs().max() <= tol)


def _probe_dtype(dtype: torch.dtype) -> torch.dtype:
    """A probe's dtype for a module in ``dtype``: at least float32, so that a class checked in
    bfloat16 or float16 meets the tolerance of float32 (64 bfloat16 epsilons are half the
    largest value: a wrong formula could pass), not of its own dtype."""
    return torch.promote_types(dtype, torch.float32)


def _cpu64(t: Tensor) -> Tensor:
    """``t`` in float64 on the CPU (where float64 exists whatever the device)."""
    return t.detach().cpu().double()


def _random(gen: torch.Generator, like: Tensor, *shape: int) -> Tensor:
    """Normal values of ``shape`` in ``like``'s dtype and on its device."""
    return torch.randn(shape, generator=gen).to(device=like.device, dtype=like.dtype)


def router_rows(module: nn.Module, args: tuple, kwargs: dict, output: object = None) -> Tensor:
    """The (rows, H) inputs of a router's logits (its first argument, rows flattened)."""
    x = args[0] if args else next(iter(kwargs.values()))
    return x.reshape(-1, module.weight.shape[1])


def _router_probe(module: nn.Module) -> bool:
    """The class's forward returns logits ``x W^T (+ b)`` through which alone its weight (and
    bias) reach its outputs (see the module docstring), on 6 random rows in the weight's dtype
    (compared in the coarser of it and the logits' dtype: some routers compute them in
    float32), at least float32 (:func:`_probe_dtype`)."""
    dtype = _probe_dtype(module.weight.dtype)
    own = {n: p.detach().to(dtype) for n, p in module.named_parameters(recurse=False)}
    gen = torch.Generator().manual_seed(0)
    x = _random(gen, own["weight"], 6, own["weight"].shape[1])
    free = {f"inner.{n}": p.clone().requires_grad_(True) for n, p in own.items()}
    seen: list[Tensor] = []
    try:
        with torch.enable_grad():
            out = torch.func.functional_call(_Bare(module), free, (x,))
            outs = out if isinstance(out, tuple | list) else (out,)
            logits = first_output(out)
            if not isinstance(logits, Tensor) or not logits.requires_grad:
                return False
            logits.register_hook(seen.append)
            value = sum(
                (o * _random(gen, o, *o.shape)).sum()
                for o in outs
                if isinstance(o, Tensor) and o.requires_grad
            )
            grads = dict(zip(free, torch.autograd.grad(value, list(free.values())), strict=True))
    except (RuntimeError, TypeError, ValueError, IndexError):  # not a router's call
        return False
    if not seen:
        return False
    g_logits = _cpu64(seen[0])
    bias = own.get("bias")
    linear = nn.functional.linear(
        _cpu64(x), _cpu64(own["weight"]), None if bias is None else _cpu64(bias)
    )
    coarse = max(dtype, logits.dtype, key=lambda t: torch.finfo(t).eps)  # float32 logits
    close = _close(logits, linear, coarse)
    close = close and _close(grads["inner.weight"], g_logits.T @ _cpu64(x), coarse)
    return close and (bias is None or _close(grads["inner.bias"], g_logits.sum(0), coarse))


def _is_router(module: nn.Module) -> bool:
    """A module with an integer ``top_k`` and the parameters ``weight`` (E, H) and, optionally,
    ``bias`` (E,) (GPT-OSS's), that passes :func:`_router_probe` (once per class)."""
    names = [n for n, _ in module.named_parameters(recurse=False)]
    if names not in (["weight"], ["weight", "bias"]) or module.weight.dim() != 2:
        return False
    if type(getattr(module, "top_k", None)) is not int:
        return False
    known = _ROUTER_CHECKED.get(type(module))
    if known is None:
        known = _ROUTER_CHECKED[type(module)] = _router_probe(module)
    return known


@register_layer(
    _is_router, single_use=True, name="TopKRouter", inputs=router_rows, output=first_output
)
def router_factors(
    module: nn.Module, x: Tensor, g: Tensor, wanted: frozenset[str]
) -> dict[str, Factor]:
    """``L = x W^T (+ b)`` followed by softmax and top-k (in either order) and renormalization:
    ``grad_W f_i = sum_t gL_t x_t^T``, ``grad_b f_i = sum_t gL_t``, with ``g = gL`` the whole
    gradient reaching the logits (see the module docstring). In the finer of their dtypes (some
    routers' logits are float32 whatever the model's dtype)."""
    dtype = torch.promote_types(promote(g).dtype, promote(x).dtype)
    out = {"weight": Factor.outer(g.to(dtype), x.to(dtype))} if "weight" in wanted else {}
    if "bias" in wanted:
        out["bias"] = Factor.dense(g.to(dtype).sum(1))
    return out


@dataclass(frozen=True)
class ExpertsLayout:
    """How a class stores its experts: ``transposed`` (GPT-OSS: ``U`` (E, H, 2I) and ``D``
    (E, I, H), applied as ``x U_e``; else Mixtral's (E, 2I, H) and (E, H, I), applied as ``U_e
    x``), with ``bias`` (``gate_up_proj_bias`` (E, 2I) and ``down_proj_bias`` (E, H)) or not."""

    transposed: bool
    bias: bool

    @property
    def names(self) -> tuple[str, ...]:
        return ("gate_up_proj", "down_proj") + (
            ("gate_up_proj_bias", "down_proj_bias") if self.bias else ()
        )


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a module whose own parameters are stacked experts (see
    :class:`ExpertsLayout`; the shapes tell the two orientations apart), else ``None``."""
    params = dict(module.named_parameters(recurse=False))
    bias = "gate_up_proj_bias" in params
    if set(params) != set(ExpertsLayout(False, bias).names):
        return None
    up, down = params["gate_up_proj"], params["down_proj"]
    if up.dim() != 3 or down.dim() != 3 or down.shape[0] != up.shape[0]:
        return None
    n_experts, a, b = up.shape
    if down.shape[1:] == (b, a // 2) and a % 2 == 0:
        layout, inner, hidden = ExpertsLayout(False, bias), a // 2, b
    elif down.shape[1:] == (b // 2, a) and b % 2 == 0:
        layout, inner, hidden = ExpertsLayout(True, bias), b // 2, a
    else:
        return None
    if bias and (
        params["gate_up_proj_bias"].shape != (n_experts, 2 * inner)
        or params["down_proj_bias"].shape != (n_experts, hidden)
    ):
        return None
    return layout


def _gate(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The class's gated activation of ``(S, 2I)`` rows: its ``_apply_gate`` (transformers'
    experts classes: ``act(gate) * up`` of the two halves by default; GPT-OSS's interleaves
    them and clamps), else ``act_fn`` of the first half times the second."""
    apply_gate = getattr(module, "_apply_gate", None)
    if callable(apply_gate):
        return apply_gate

    def gated(gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return module.act_fn(gate) * up

    return gated


def _experts_reference(
    module: nn.Module,
    layout: ExpertsLayout,
    x: Tensor,
    index: Tensor,
    weights: Tensor,
    params: dict[str, Tensor],
) -> Tensor:
    """``y_t = sum_j w_{t,j} (D_e act-gated(U_e x_t + b_e) + c_e)`` (float64, on the CPU) for
    (T, H) rows ``x``, in ``layout``."""
    index = index.cpu()
    p = {n: _cpu64(t)[index] for n, t in params.items()}  # each slot's expert's blocks
    up_eq, down_eq = ("tkhp,th->tkp", "tkih,tki->tkh") if layout.transposed else (
        "tkph,th->tkp", "tkhi,tki->tkh")
    u = torch.einsum(up_eq, p["gate_up_proj"], _cpu64(x))
    if layout.bias:
        u = u + p["gate_up_proj_bias"]
    y = torch.einsum(down_eq, p["down_proj"], _gate(module)(u))
    if layout.bias:
        y = y + p["down_proj_bias"]
    return torch.einsum("tkh,tk->th", y, _cpu64(weights))


def _experts_probe(module: nn.Module) -> bool:
    """The class's forward is the formula of the module docstring in its layout
    (:func:`experts_layout`), on 8 random tokens (each routed to 2 distinct experts) and small
    random weights (I = 8, H = 16) in its dtype, at least float32 (:func:`_probe_dtype`)."""
    layout = experts_layout(module)
    if layout is None:
        return False
    like = module.gate_up_proj.detach()
    like = like.to(_probe_dtype(like.dtype))
    n_experts = like.shape[0]
    gen = torch.Generator().manual_seed(0)
    x = _random(gen, like, 8, 16)
    index = torch.stack([torch.randperm(n_experts, generator=gen)[:2] for _ in range(8)])
    index = index.to(like.device)
    weights = _random(gen, like, 8, index.shape[1]).abs()
    shapes = {
        "gate_up_proj": (16, 16),  # 2I = H = 16 either way
        "down_proj": (8, 16) if layout.transposed else (16, 8),
        "gate_up_proj_bias": (16,),
        "down_proj_bias": (16,),
    }
    params = {n: _random(gen, like, n_experts, *shapes[n]) for n in layout.names}
    try:
        with torch.no_grad():
            bare = {f"inner.{n}": t for n, t in params.items()}
            got = torch.func.functional_call(_Bare(module), bare, (x, index, weights))
            expected = _experts_reference(module, layout, x, index, weights, params)
    except (RuntimeError, TypeError, ValueError, IndexError):  # not called like that
        return False
    return isinstance(got, Tensor) and _close(got, expected, like.dtype)


def _is_experts(module: nn.Module) -> bool:
    """A module of stacked experts (:func:`experts_layout`), not expert-parallel, with an
    ``_apply_gate`` or an ``act_fn``, that passes :func:`_experts_probe` (once per class and
    experts implementation)."""
    layout = experts_layout(module)
    if layout is None or getattr(module, "_is_expert_parallel", False):
        return False
    if not callable(getattr(module, "_apply_gate", None)) and not hasattr(module, "act_fn"):
        return False
    key = (type(module), getattr(getattr(module, "config", None), "_experts_implementation", None))
    known = _EXPERTS_CHECKED.get(key)
    if known is None:
        known = _EXPERTS_CHECKED[key] = _experts_probe(module)
    return known


def _experts_arg_names(module: nn.Module) -> tuple[str, ...]:
    """The names of the class's three arguments (states, expert indices, routing weights):
    those of its ``forward``'s signature (Mixtral's ``top_k_index``, GPT-OSS's
    ``router_indices``), else :data:`EXPERTS_ARGS`."""
    try:
        params = list(inspect.signature(type(module).forward).parameters)[1:4]
    except (TypeError, ValueError):
        return EXPERTS_ARGS
    return tuple(params) if len(params) == 3 and not params[0].startswith("*") else EXPERTS_ARGS


def experts_rows(
    module: nn.Module, args: tuple, kwargs: dict, output: object = None
) -> Tensor:
    """A call's (states, expert indices, routing weights) as one tensor of rows ``[x_t | I_t |
    w_t]`` (H + 2k values each), in at least float32 and the dtype of the states and weights:
    every value exactly (expert indices below 2^24)."""
    names = _experts_arg_names(module)
    given = dict(zip(names, args, strict=False)) | kwargs
    if any(given.get(name) is None for name in names):
        raise TypeError(f"{type(module).__name__} must be called with {', '.join(names)}")
    x, index, weights = (given[name] for name in names)
    dtype = torch.promote_types(torch.promote_types(x.dtype, weights.dtype), torch.float32)
    with torch.no_grad():
        return torch.cat([x.to(dtype), index.to(dtype), weights.to(dtype)], dim=-1)


@register_layer(_is_experts, name="Experts", inputs=experts_rows)
def experts_factors(
    module: nn.Module, x: Tensor, g: Tensor, wanted: frozenset[str]
) -> dict[str, Factor]:
    """Stacked experts ``y_t = sum_j w_{t,j} (D_e act-gated(U_e x_t + b_e) + c_e)``: grouped
    factors of the (token, slot) rows, labelled by expert, ``grad_{D_e} f_i = sum_s gD_s
    a_s^T``, ``grad_{U_e} f_i = sum_s gU_s x_s^T`` (each the other way round in a transposed
    layout), ``grad_{c_e} f_i = sum_s gD_s``, ``grad_{b_e} f_i = sum_s gU_s`` (see the module
    docstring); ``x`` holds the rows of :func:`experts_rows`, the activations are recomputed
    from them."""
    layout = experts_layout(module)
    assert layout is not None  # the rule matched
    up, down = module.gate_up_proj.detach(), module.down_proj.detach()
    hidden = up.shape[1] if layout.transposed else up.shape[2]
    k = (x.shape[-1] - hidden) // 2
    n, t = x.shape[:2]
    rows = x.reshape(n * t, -1)
    ids = rows[:, hidden : hidden + k].reshape(-1).long()  # (R,): the expert of row s = (t, j)
    token = torch.arange(n * t, device=x.device).repeat_interleave(k)
    x_s = rows[token, :hidden].to(up.dtype)
    g_down = promote(g).reshape(n * t, hidden)[token] * rows[:, hidden + k :].reshape(-1, 1)
    u = x_s.new_zeros(len(ids), 2 * down.shape[1 if layout.transposed else 2])
    g_a = x_s.new_zeros(len(ids), u.shape[1] // 2)
    for expert in ids.unique().tolist():  # as the forward: each expert's rows together
        sel = (ids == expert).nonzero().flatten()
        u_e, d_e = (up[expert], down[expert].T) if layout.transposed else (
            up[expert].T, down[expert])
        u[sel] = x_s[sel] @ u_e
        g_a[sel] = g_down[sel].to(down.dtype) @ d_e
    if layout.bias:
        u = u + module.gate_up_proj_bias.detach()[ids]
    a, pull = torch.func.vjp(_gate(module), u)
    (g_up,) = pull(g_a.to(a.dtype))
    ids = ids.reshape(n, t * k)

    def grouped(left: Tensor, right: Tensor) -> Factor:
        shape = (n, t * k, -1)
        return Factor.grouped(ids, promote(left).reshape(shape), promote(right).reshape(shape))

    ones = g_down.new_ones(len(g_down), 1)
    pairs = {  # (left, right) of each parameter's (E, P, Q) blocks
        "gate_up_proj": (x_s, g_up) if layout.transposed else (g_up, x_s),
        "down_proj": (a, g_down) if layout.transposed else (g_down, a),
        "gate_up_proj_bias": (g_up, ones),
        "down_proj_bias": (g_down, ones),
    }
    return {name: grouped(*pairs[name]) for name in layout.names if name in wanted}
