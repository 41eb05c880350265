"""Mixture-of-experts layers: the top-k router and the experts of transformers' sparse MoE
blocks (Mixtral's, and any class whose forward computes the same, as Qwen2-MoE's, Qwen3-MoE's
and OLMoE's do), registered with :func:`~ge_utils.stats.layers.register_layer` on import.

Router. ``L_t = W x_t`` (the E logits of token t), then ``p_t = softmax(L_t)``, its k largest
entries at indices ``I_t``, renormalized to sum to one (always in Mixtral, optional elsewhere);
the module returns ``(L, scores, I)``. The weight reaches the loss only through ``L``, so

    grad_W f_i = sum_{t in i} gL_t x_t^T,    gL_t = d f_i / d L_t

the linear rule's outer factor. ``gL_t`` is the scores' gradient pulled back through the
renormalization, the top-k selection (at its indices, which are piecewise constant: fixed) and
the softmax, plus the logits' own gradient where something reads them (an auxiliary loss).
Autograd forms exactly that sum at the logits tensor, and that is where the recorder hooks (the
rule's ``output`` picks the logits from the tuple), so the pull-back is not computed twice. A
class is accepted when its forward, on a probe (checked once per class), returns logits ``x
W^T`` (as its output or the first of its outputs) and the weight's gradient of ``sum_o <out_o,
r_o>`` (random ``r_o`` for every differentiable output) is ``gL^T x`` with ``gL`` read at the
logits: the weight reaches nothing but them.

Experts. Stacked weights ``U`` (E, 2I, H) (``gate_up_proj``) and ``D`` (E, H, I)
(``down_proj``); token t goes to its k experts ``e = I_{t,j}`` with weights ``w_{t,j}``:

    y_t = sum_j w_{t,j} D_e a_{t,j},    a_{t,j} = act(u_g) * u_u,    (u_g; u_u) = U_e x_t

Every (token, slot) row ``s = (t, j)`` is one use of expert ``e_s``'s two matrices:

    grad_{D_e} f_i = sum_{s in i, e_s = e} gD_s a_s^T,    gD_s = w_s g_t
    grad_{U_e} f_i = sum_{s in i, e_s = e} gU_s x_t^T,    gU_s = J_s^T (D_e^T gD_s)

with ``g_t = d f_i / d y_t`` (the module's output gradient) and ``J_s`` the Jacobian of
``act(u_g) * u_u`` at ``U_e x_t``. The rows are labelled by their expert (a grouped factor,
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

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ge_utils.stats.factors import Factor
from ge_utils.stats.layers import _Bare, promote, register_layer

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


def router_logits(out: object) -> Tensor:
    """A router's logits: its output, or the first of its outputs."""
    return out[0] if isinstance(out, tuple | list) else out


def router_rows(module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """The (rows, H) inputs of a router's logits (its first argument, rows flattened)."""
    x = args[0] if args else next(iter(kwargs.values()))
    return x.reshape(-1, module.weight.shape[1])


def _router_probe(module: nn.Module) -> bool:
    """The class's forward returns logits ``x W^T`` through which alone its weight reaches its
    outputs (see the module docstring), on 6 random rows in the weight's dtype (compared in the
    coarser of it and the logits' dtype: some routers compute them in float32), at least
    float32 (:func:`_probe_dtype`)."""
    weight = module.weight.detach().to(_probe_dtype(module.weight.dtype))
    gen = torch.Generator().manual_seed(0)
    x = _random(gen, weight, 6, weight.shape[1])
    w = weight.clone().requires_grad_(True)
    seen: list[Tensor] = []
    try:
        with torch.enable_grad():
            out = torch.func.functional_call(_Bare(module), {"inner.weight": w}, (x,))
            outs = out if isinstance(out, tuple | list) else (out,)
            logits = router_logits(out)
            if not isinstance(logits, Tensor) or not logits.requires_grad:
                return False
            logits.register_hook(seen.append)
            value = sum(
                (o * _random(gen, o, *o.shape)).sum()
                for o in outs
                if isinstance(o, Tensor) and o.requires_grad
            )
            (grad,) = torch.autograd.grad(value, w)
    except (RuntimeError, TypeError, ValueError, IndexError):  # not a router's call
        return False
    if not seen:
        return False
    expected = _cpu64(seen[0]).T @ _cpu64(x)
    linear = nn.functional.linear(_cpu64(x), _cpu64(weight))
    coarse = max(weight.dtype, logits.dtype, key=lambda t: torch.finfo(t).eps)  # float32 logits
    return _close(logits, linear, coarse) and _close(grad, expected, coarse)


def _is_router(module: nn.Module) -> bool:
    """A module with an integer ``top_k`` and one parameter, ``weight`` (E, H), that passes
    :func:`_router_probe` (once per class)."""
    names = [n for n, _ in module.named_parameters(recurse=False)]
    if names != ["weight"] or module.weight.dim() != 2:
        return False
    if type(getattr(module, "top_k", None)) is not int:
        return False
    known = _ROUTER_CHECKED.get(type(module))
    if known is None:
        known = _ROUTER_CHECKED[type(module)] = _router_probe(module)
    return known


@register_layer(
    _is_router, single_use=True, name="TopKRouter", inputs=router_rows, output=router_logits
)
def router_factors(
    module: nn.Module, x: Tensor, g: Tensor, wanted: frozenset[str]
) -> dict[str, Factor]:
    """``L = x W^T`` followed by softmax, top-k and renormalization: ``grad_W f_i = sum_t gL_t
    x_t^T`` with ``g = gL`` the whole gradient reaching the logits (see the module
    docstring). Both in the finer of their dtypes (some routers' logits are float32 whatever
    the model's dtype)."""
    if "weight" not in wanted:
        return {}
    dtype = torch.promote_types(promote(g).dtype, promote(x).dtype)
    return {"weight": Factor.outer(g.to(dtype), x.to(dtype))}


def _gated(act: Callable[[Tensor], Tensor], gate_up: Tensor) -> Tensor:
    """``act(u_g) * u_u`` of rows ``(u_g; u_u)``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


def _experts_reference(
    module: nn.Module, x: Tensor, index: Tensor, weights: Tensor, up: Tensor, down: Tensor
) -> Tensor:
    """``y_t = sum_j w_{t,j} D_e act-gated(U_e x_t)`` (float64, on the CPU) for (T, H) rows
    ``x``."""
    index = index.cpu()
    u = torch.einsum("tkph,th->tkp", _cpu64(up)[index], _cpu64(x))
    a = _gated(module.act_fn, u)
    return torch.einsum("tkhi,tki,tk->th", _cpu64(down)[index], a, _cpu64(weights))


def _experts_probe(module: nn.Module) -> bool:
    """The class's forward is the formula of the module docstring, on 8 random tokens (each
    routed to 2 distinct experts) and small random weights (I = 8, H = 16) in its dtype, at
    least float32 (:func:`_probe_dtype`)."""
    like = module.gate_up_proj.detach()
    like = like.to(_probe_dtype(like.dtype))
    n_experts = like.shape[0]
    gen = torch.Generator().manual_seed(0)
    x = _random(gen, like, 8, 16)
    index = torch.stack([torch.randperm(n_experts, generator=gen)[:2] for _ in range(8)])
    index = index.to(like.device)
    weights = _random(gen, like, 8, index.shape[1]).abs()
    up, down = _random(gen, like, n_experts, 16, 16), _random(gen, like, n_experts, 16, 8)
    params = {"inner.gate_up_proj": up, "inner.down_proj": down}
    try:
        with torch.no_grad():
            got = torch.func.functional_call(_Bare(module), params, (x, index, weights))
            expected = _experts_reference(module, x, index, weights, up, down)
    except (RuntimeError, TypeError, ValueError, IndexError):  # not called like that
        return False
    return isinstance(got, Tensor) and _close(got, expected, like.dtype)


def _is_experts(module: nn.Module) -> bool:
    """A module whose parameters are ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I),
    with an ``act_fn``, not expert-parallel, that passes :func:`_experts_probe` (once per class
    and experts implementation)."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) != {"gate_up_proj", "down_proj"} or not hasattr(module, "act_fn"):
        return False
    up, down = params["gate_up_proj"], params["down_proj"]
    if up.dim() != 3 or down.dim() != 3 or up.shape[1] % 2:
        return False
    n_experts, two_i, hidden = up.shape
    if tuple(down.shape) != (n_experts, hidden, two_i // 2):
        return False
    if getattr(module, "_is_expert_parallel", False):
        return False
    key = (type(module), getattr(getattr(module, "config", None), "_experts_implementation", None))
    known = _EXPERTS_CHECKED.get(key)
    if known is None:
        known = _EXPERTS_CHECKED[key] = _experts_probe(module)
    return known


def experts_rows(module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """A call's ``(hidden_states, top_k_index, top_k_weights)`` as one tensor of rows
    ``[x_t | I_t | w_t]`` (H + 2k values each), in at least float32 and the dtype of the states
    and weights: every value exactly (expert indices below 2^24)."""
    given = dict(zip(EXPERTS_ARGS, args, strict=False)) | kwargs
    if any(name not in given for name in EXPERTS_ARGS):
        raise TypeError(f"{type(module).__name__} must be called with {', '.join(EXPERTS_ARGS)}")
    x, index, weights = (given[name] for name in EXPERTS_ARGS)
    dtype = torch.promote_types(torch.promote_types(x.dtype, weights.dtype), torch.float32)
    with torch.no_grad():
        return torch.cat([x.to(dtype), index.to(dtype), weights.to(dtype)], dim=-1)


@register_layer(_is_experts, name="Experts", inputs=experts_rows)
def experts_factors(
    module: nn.Module, x: Tensor, g: Tensor, wanted: frozenset[str]
) -> dict[str, Factor]:
    """Stacked experts ``y_t = sum_j w_{t,j} D_e act-gated(U_e x_t)``: grouped factors of the
    (token, slot) rows, labelled by expert, ``grad_{D_e} f_i = sum_s gD_s a_s^T`` and
    ``grad_{U_e} f_i = sum_s gU_s x_s^T`` (see the module docstring); ``x`` holds the rows of
    :func:`experts_rows`, the activations are recomputed from them."""
    up, down = module.gate_up_proj.detach(), module.down_proj.detach()
    hidden = up.shape[2]
    k = (x.shape[-1] - hidden) // 2
    n, t = x.shape[:2]
    rows = x.reshape(n * t, -1)
    ids = rows[:, hidden : hidden + k].reshape(-1).long()  # (R,): the expert of row s = (t, j)
    token = torch.arange(n * t, device=x.device).repeat_interleave(k)
    x_s = rows[token, :hidden].to(up.dtype)
    g_down = promote(g).reshape(n * t, hidden)[token] * rows[:, hidden + k :].reshape(-1, 1)
    u = x_s.new_zeros(len(ids), up.shape[1])
    g_a = x_s.new_zeros(len(ids), down.shape[2])
    for expert in ids.unique().tolist():  # as the forward: each expert's rows together
        sel = (ids == expert).nonzero().flatten()
        u[sel] = x_s[sel] @ up[expert].T
        g_a[sel] = g_down[sel].to(down.dtype) @ down[expert]
    a, pull = torch.func.vjp(lambda v: _gated(module.act_fn, v), u)
    (g_up,) = pull(g_a.to(a.dtype))
    ids = ids.reshape(n, t * k)

    def grouped(left: Tensor, right: Tensor) -> Factor:
        shape = (n, t * k, -1)
        return Factor.grouped(ids, promote(left).reshape(shape), promote(right).reshape(shape))

    out = {}
    if "gate_up_proj" in wanted:
        out["gate_up_proj"] = grouped(g_up, x_s)
    if "down_proj" in wanted:
        out["down_proj"] = grouped(g_down, a)
    return out
