"""Token-wise gradient inner products of one pair: ``<grad log p(y_w,s), grad log p(y_l,t)>``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ge_utils.logprobs import (
    SequenceBatch,
    concat_batches,
    eval_mode,
    hidden_states,
    target_positions,
    token_logprobs,
    unwrap_model,
)
from ge_utils.stats.params import ParamSpec
from ge_utils.stats.recorder import GhostRecorder


def _replicate(batch: SequenceBatch, n: int) -> SequenceBatch:
    return SequenceBatch(
        batch.input_ids.expand(n, -1).clone(),
        batch.attention_mask.expand(n, -1).clone(),
        batch.response_mask.expand(n, -1).clone(),
    )


def tokenwise_inner(
    model: nn.Module,
    chosen: SequenceBatch,
    rejected: SequenceBatch,
    scope: str = "all",
    params: ParamSpec = None,
) -> Tensor:
    """(T_w, T_l) float64 matrix of ``<grad log p(y_w,s), grad log p(y_l,t)>`` for ONE pair
    (one-row batches); T_w, T_l are the response lengths.

    ``scope='head'``: over the output layer's weight (and bias) only, in closed form from one
    forward without backward: the head gradient of token t's log-prob is ``(e_y - p_t) h_t^T``,
    so the matrix is ``(H_w H_l^T) * (G_w G_l^T)``. With tied embeddings this is the output use
    of the shared matrix only. ``params`` must be None.

    ``scope='all'``: over the parameter set, exact, from one forward and one backward over
    ``T_w + T_l`` copies of the two sequences, copy k back-propagating only its own token: the
    cost of a training step on a batch of ``T_w + T_l`` sequences plus ``T_w T_l`` Gram products
    per layer (``T^2 (P + Q)`` each, T the padded length); no gradient vector is stored. Brute
    force needs ``T_w + T_l`` backward passes and as many full gradient vectors.
    """
    if len(chosen) != 1 or len(rejected) != 1:
        raise ValueError("tokenwise_inner takes one chosen and one rejected sequence")
    if scope not in ("head", "all"):
        raise ValueError(f"scope must be 'head' or 'all', got {scope!r}")
    if scope == "head" and params is not None:
        raise ValueError("scope='head' is the output layer; params must be None")
    with eval_mode(model):
        if scope == "head":
            return _tokenwise_head(model, chosen, rejected)
        t_w, t_l = int(chosen.response_lengths[0]), int(rejected.response_lengths[0])
        joint = concat_batches(_replicate(chosen, t_w), _replicate(rejected, t_l))
        with GhostRecorder(model, params, batch=joint) as rec:
            per_token = token_logprobs(model, joint)
            picked = torch.cat(
                [
                    per_token[:t_w][joint.response_mask[:t_w]].reshape(t_w, t_w).diagonal(),
                    per_token[t_w:][joint.response_mask[t_w:]].reshape(t_l, t_l).diagonal(),
                ]
            )
            ii = torch.arange(t_w).repeat_interleave(t_l)
            rec.expect(tokens=(ii, t_w + torch.arange(t_l).repeat(t_w)))
            rec.backward(picked.sum())
            return rec.results()["tokens"].reshape(t_w, t_l)


@torch.no_grad()
def _tokenwise_head(model: nn.Module, chosen: SequenceBatch, rejected: SequenceBatch) -> Tensor:
    head = unwrap_model(model).get_output_embeddings()
    factors = []
    for batch in (chosen, rejected):
        rows, cols = target_positions(batch)
        h = hidden_states(model, batch)[rows, cols]
        probs = torch.softmax(head(h).double(), -1)
        g = -probs
        g[torch.arange(len(g), device=g.device), batch.input_ids[rows, cols + 1]] += 1.0
        factors.append((h.double(), g))
    (h_w, g_w), (h_l, g_l) = factors
    out = (h_w @ h_l.T) * (g_w @ g_l.T)
    if getattr(head, "bias", None) is not None:
        out = out + g_w @ g_l.T
    return out.cpu()
