"""Exact gradient-entanglement statistics, the slow and obvious way: the reference.

One backward pass per sequence and float64 dot products of the per-parameter gradients:
``|g_w|^2 = sum_p <grad_p u_w, grad_p u_w>`` and likewise ``|g_l|^2`` and ``<g_w, g_l>``. Every
faster method is tested against this.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ge_utils.logprobs import SequenceBatch, eval_mode, sequence_logprobs
from ge_utils.stats.params import ParamSpec, parameter_set
from ge_utils.stats.record import PairStats


def _grads(value: torch.Tensor, params: Sequence[nn.Parameter]) -> list[torch.Tensor | None]:
    """Gradient of a scalar with respect to each parameter (None where it does not depend)."""
    return [
        None if g is None else g.detach()
        for g in torch.autograd.grad(value, params, allow_unused=True)
    ]


def _dot64(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> float:
    """``<a, b>`` over lists of per-parameter gradients, each cast to float64 before its product
    (one parameter at a time: no flattened copy of the whole gradient)."""
    return math.fsum(
        float(torch.dot(x.double().flatten(), y.double().flatten()))
        for x, y in zip(a, b, strict=True)
        if x is not None and y is not None
    )


def exact_gradient_stats(
    model: nn.Module, chosen: SequenceBatch, rejected: SequenceBatch, params: ParamSpec = None
) -> PairStats:
    """Per-pair ``logp_chosen``, ``logp_rejected`` (nats), ``norm2_chosen`` (``|g_w|^2``),
    ``norm2_rejected`` (``|g_l|^2``) and ``inner`` (``<g_w, g_l>``): float64 (B,) on the CPU.

    Row i of ``chosen`` pairs with row i of ``rejected``. One backward pass per sequence, in eval
    mode (dropout off; the previous mode is restored); per-parameter products in float64.
    ``params`` selects the parameter set (:func:`ge_utils.stats.params.parameter_set`).
    """
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected sequences")
    plist = [p for _, p in parameter_set(model, params)]
    out: dict[str, list[float]] = {
        k: [] for k in ("logp_chosen", "logp_rejected", "norm2_chosen", "norm2_rejected", "inner")
    }
    with eval_mode(model):
        for i in range(len(chosen)):
            u_w = sequence_logprobs(model, chosen.select([i]))[0]
            g_w = _grads(u_w, plist)
            u_l = sequence_logprobs(model, rejected.select([i]))[0]
            g_l = _grads(u_l, plist)
            out["logp_chosen"].append(float(u_w.detach()))
            out["logp_rejected"].append(float(u_l.detach()))
            out["norm2_chosen"].append(_dot64(g_w, g_w))
            out["norm2_rejected"].append(_dot64(g_l, g_l))
            out["inner"].append(_dot64(g_w, g_l))
    return PairStats(**{k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()})
