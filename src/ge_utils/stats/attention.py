"""Attention sinks: GPT-OSS's per-head learned logit ``s_h``, registered with
:func:`~ge_utils.stats.layers.register_layer` on import (the attention's projections are linear
layers, with their own rule).

Each query q of head h attends to the keys k with probabilities ``P_qk`` of the logits
``[A_q1, ..., A_qT, s_h]``: the sink takes a share ``P_q0 = 1 - sum_k P_qk`` and brings no value,
so ``o_q = sum_k P_qk v_k``. As ``d P_qk / d s_h = -P_qk P_q0``,

    d o_q / d s_h = -P_q0 o_q,    grad_{s_h} f_i = -sum_{q in i} P_q0 (G_q . o_q)

with ``G_q = d f_i / d o_q`` the gradient at the head's output, which is ``g_q W_o`` (the
output gradient ``g`` of the module pulled back through its output projection ``o_proj``,
whose bias plays no part), per head. The module returns its output and the probabilities
``P`` (eager attention), from which ``o = P V`` and ``P_q0`` follow, with ``V`` recomputed
from the module's input by its ``v_proj`` (key-value heads repeated over their query heads):
the rule keeps the input and ``P`` (which autograd keeps anyway) and computes the sinks'
per-sequence gradients (N, heads) after the backward, dense. Exact while nothing reads the
returned probabilities' gradient (the decoder layer discards them) and without attention
dropout; other attention implementations return no probabilities, and are refused.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ge_utils.stats.factors import Factor
from ge_utils.stats.layers import first_output, promote, register_layer

EAGER_HINT = (
    " (load the model with attn_implementation='eager', or leave the attention sinks out of "
    "the parameter set: params=...)"
)


@functools.cache
def _sink_forward() -> object | None:
    """The ``forward`` of transformers' GPT-OSS attention, ``None`` where it is missing."""
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention
    except ImportError:
        return None
    return GptOssAttention.forward


def _is_sink_attention(module: nn.Module) -> bool:
    """GPT-OSS's attention (its own ``forward``), whose only own parameter is ``sinks``."""
    forward = _sink_forward()
    names = [n for n, _ in module.named_parameters(recurse=False)]
    return forward is not None and type(module).forward is forward and names == ["sinks"]


def sink_rows(module: nn.Module, args: tuple, kwargs: dict, output: object = None) -> Tensor:
    """A call's input states ``x`` (N, T, H) and returned probabilities ``P`` (N, heads, T, T)
    as one tensor of rows ``[x_q | P_q]`` (N, T, H + heads T), in the finer of their dtypes."""
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, Tensor):
        name = type(module).__name__
        raise TypeError(f"{name} must be called with its hidden states{EAGER_HINT}")
    probs = output[1] if isinstance(output, tuple | list) and len(output) > 1 else None
    if not isinstance(probs, Tensor):
        raise TypeError(
            f"the attention sinks of {type(module).__name__} need its attention probabilities, "
            f"which only the eager attention returns{EAGER_HINT}"
        )
    if module.training and module.attention_dropout > 0:
        raise TypeError(
            f"the attention sinks of {type(module).__name__} cannot be measured under attention "
            f"dropout (model.eval(), or attention_dropout=0){EAGER_HINT}"
        )
    n, _, t, _ = probs.shape
    dtype = torch.promote_types(x.dtype, probs.dtype)
    with torch.no_grad():
        return torch.cat([x.to(dtype), probs.to(dtype).transpose(1, 2).reshape(n, t, -1)], -1)


@register_layer(
    _is_sink_attention, name="AttentionSinks", inputs=sink_rows, output=first_output
)
def sink_factors(
    module: nn.Module, x: Tensor, g: Tensor, wanted: frozenset[str]
) -> dict[str, Factor]:
    """``grad_{s_h} f_i = -sum_{q in i} P_q0 (G_q . o_q)`` (see the module docstring), dense
    (N, heads); ``x`` holds the rows of :func:`sink_rows`."""
    if "sinks" not in wanted:
        return {}
    v_proj, o_proj = module.v_proj, module.o_proj
    n, t = x.shape[:2]
    hidden = v_proj.in_features
    heads, d = module.sinks.shape[0], module.head_dim
    states = x[..., :hidden].to(v_proj.weight.dtype)
    probs = x[..., hidden:].reshape(n, t, heads, t).transpose(1, 2)  # (N, heads, T, T)
    with torch.no_grad():
        values = v_proj(states).reshape(n, t, -1, d).transpose(1, 2)  # (N, kv heads, T, d)
        values = values.repeat_interleave(module.num_key_value_groups, dim=1)
        out = promote(probs) @ promote(values)  # o = P V: (N, heads, T, d)
        grad_out = promote(g) @ promote(o_proj.weight.detach())  # G = g W_o: (N, T, heads d)
        grad_out = grad_out.reshape(n, t, heads, d).transpose(1, 2)
        sink_share = 1 - promote(probs).sum(-1)  # P_q0: (N, heads, T)
        per_seq = -(sink_share * (grad_out * out).sum(-1)).sum(-1)
    return {"sinks": Factor.dense(per_seq)}
