"""Token-wise gradient inner products of one pair: ``<grad log p(y_w,s), grad log p(y_l,t)>``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ge_utils.logprobs import (
    SequenceBatch,
    check_output_logits,
    eval_mode,
    hidden_states,
    output_logits,
    target_positions,
    token_logprobs,
    unwrap_model,
)
from ge_utils.stats.factors import Factor, factor_grid
from ge_utils.stats.params import ParamSpec
from ge_utils.stats.recorder import GhostRecorder

Uses = dict[str, list[Factor]]  # parameter name -> per-copy factors of each of its uses


def _one_token_copies(batch: SequenceBatch, first: int, stop: int) -> SequenceBatch:
    """Copies ``first .. stop - 1`` of a one-row batch, copy k keeping only response token k in
    its response mask (so it predicts, and back-propagates, that token alone)."""
    cols = batch.response_mask[0].nonzero().flatten()[first:stop]
    n = len(cols)
    response = torch.zeros((n, batch.input_ids.shape[1]), dtype=torch.bool, device=cols.device)
    response[torch.arange(n, device=cols.device), cols] = True
    return SequenceBatch(
        batch.input_ids.expand(n, -1).clone(), batch.attention_mask.expand(n, -1).clone(), response
    )


def _token_factors(model: nn.Module, params: ParamSpec, copies: SequenceBatch) -> Uses:
    """Per-copy gradient factors of each copy's one response log-prob: one forward and one
    backward to the layer outputs (``.grad`` untouched)."""
    with GhostRecorder(model, params, batch=copies, keep_factors=True) as rec:
        rec.backward(token_logprobs(model, copies).sum())
        return {rec.names[pid]: uses for pid, uses in rec.uses.items()}


def _grid(u: Uses, v: Uses, shape: tuple[int, int]) -> Tensor:
    """``shape`` = (copies of u, copies of v) float64 inner products of the gradients whose
    factors are ``u`` and ``v``: every pair of uses of each parameter (tied weights add cross
    terms); zero where no parameter of the set takes part."""
    total = torch.zeros(shape, dtype=torch.float64)
    for name, uses in u.items():
        for a in uses:
            for b in v.get(name, []):
                total += factor_grid(a, b).double().cpu()
    return total


def tokenwise_inner(
    model: nn.Module,
    chosen: SequenceBatch,
    rejected: SequenceBatch,
    scope: str = "all",
    params: ParamSpec = None,
    chunk: int = 16,
) -> Tensor:
    """(T_w, T_l) float64 matrix of ``<grad log p(y_w,s), grad log p(y_l,t)>`` for ONE pair
    (one-row batches); T_w, T_l are the response lengths.

    ``scope='head'``: over the output layer's weight (and bias) only, in closed form from one
    forward without backward: the head gradient of token t's log-prob is ``(e_y - p_t) h_t^T``,
    so the matrix is ``(H_w H_l^T) * (G_w G_l^T)``. With tied embeddings this is the output use
    of the shared matrix only. ``params`` must be None.

    ``scope='all'``: over the parameter set, exact, from forwards and backwards of
    ``T_w + T_l`` copies of the two sequences, copy k back-propagating only its own token
    (``chunk`` copies at a time): the cost of a training step on a batch of ``T_w + T_l``
    sequences plus, per layer, the products of the stacked rows of every chosen copy with every
    rejected copy (:func:`~ge_utils.stats.factors.factor_grid`, ``T_w T_l T^2 (P + Q)``, T the
    padded length). The rejected copies go first and only their per-layer factors are kept
    (layer inputs and output gradients); then each chunk of chosen copies is multiplied with
    them and dropped. Peak memory: one chunk's forward and backward plus the rejected factors;
    no gradient vector is stored. Brute force needs ``T_w + T_l`` backward passes and as many
    full gradient vectors.
    """
    if len(chosen) != 1 or len(rejected) != 1:
        raise ValueError("tokenwise_inner takes one chosen and one rejected sequence")
    if scope not in ("head", "all"):
        raise ValueError(f"scope must be 'head' or 'all', got {scope!r}")
    if scope == "head" and params is not None:
        raise ValueError("scope='head' is the output layer; params must be None")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    with eval_mode(model):
        if scope == "head":
            return _tokenwise_head(model, chosen, rejected)
        t_w, t_l = int(chosen.response_lengths[0]), int(rejected.response_lengths[0])
        kept = []
        for k in range(0, t_l, chunk):
            copies = _one_token_copies(rejected, k, k + chunk)
            kept.append((_token_factors(model, params, copies), len(copies)))
        rows = []
        for k in range(0, t_w, chunk):
            copies = _one_token_copies(chosen, k, k + chunk)
            mine = _token_factors(model, params, copies)
            rows.append(torch.cat([_grid(mine, v, (len(copies), n)) for v, n in kept], dim=1))
            del mine  # freed before the next chunk's forward
        return torch.cat(rows)


def _tokenwise_head(model: nn.Module, chosen: SequenceBatch, rejected: SequenceBatch) -> Tensor:
    """``<grad_W log p_s, grad_W log p_t>`` of the output layer ``z = W h + b``: ``(h_s . h_t)
    (g_s . g_t)`` (plus ``g_s . g_t`` for the bias) with ``g = d log p(y) / dz``, ``e_y - p`` for
    plain logits, through the logit transform of :func:`~ge_utils.logprobs.output_logits`
    (by autograd on the logits alone) otherwise."""
    lm = unwrap_model(model)
    head = lm.get_output_embeddings()
    check_output_logits(model)
    factors = []
    for batch in (chosen, rejected):
        rows, cols = target_positions(batch)
        with torch.no_grad():
            h = hidden_states(model, batch)[rows, cols]
            z = head(h).double()
        with torch.enable_grad():
            z.requires_grad_(True)
            logits = output_logits(lm, z, head=False)
            targets = batch.input_ids[rows, cols + 1][:, None]
            lp = torch.log_softmax(logits, -1).gather(1, targets).sum()
            (g,) = torch.autograd.grad(lp, z)
        factors.append((h.double(), g))
    (h_w, g_w), (h_l, g_l) = factors
    out = (h_w @ h_l.T) * (g_w @ g_l.T)
    if getattr(head, "bias", None) is not None:
        out = out + g_w @ g_l.T
    return out.cpu()
