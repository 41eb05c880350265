"""Closed forms behind the paper's theorems, checked against autograd.

Theorem 1 (single token) on a softmax output layer ``p = softmax(W h)`` with ``W`` (V, d) and the
hidden state ``h`` (d,) held fixed: for two different tokens a, b the gradients of their
log-probs with respect to ``W`` are ``g_a = (e_a - p) h^T`` and ``g_b = (e_b - p) h^T``, so

    <g_a, g_b>           = (|p|^2 - p_a - p_b) |h|^2
    |g_a|^2              = (1 - 2 p_a + |p|^2) |h|^2
    |g_a|^2 - <g_a, g_b> = (1 - p_a + p_b) |h|^2 > 0

so ``<g_a, g_b> < min(|g_a|^2, |g_b|^2)``: a DPO step on a single-token pair is always in case 1
(chosen up, rejected down) for this layer. The inner product itself is negative when
``p_a + p_b > |p|^2``, which holds whenever a or b is the most likely token (then
``|p|^2 <= max_i p_i``), but not in general: a third token holding most of the mass makes it
positive, while case 1 still holds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pandas as pd
import torch

from ge_utils.gradients import classify_cases
from ge_utils.models import resolve_device


@dataclass
class HeadDraws:
    """A batch of N random softmax output layers and token pairs.

    ``weight`` (N, V, d), ``hidden`` (N, d), ``token_a``/``token_b`` (N,) with ``a != b``.
    """

    weight: torch.Tensor
    hidden: torch.Tensor
    token_a: torch.Tensor
    token_b: torch.Tensor

    def to(self, device: torch.device | str) -> HeadDraws:
        return HeadDraws(
            *(t.to(device) for t in (self.weight, self.hidden, self.token_a, self.token_b))
        )


def random_head_draws(
    n: int,
    vocab_size: int,
    hidden_dim: int,
    logit_scale: float = 1.0,
    seed: int = 0,
    chosen_boost: float = 0.0,
) -> HeadDraws:
    """N independent draws in float64; ``logit_scale`` sets how peaked the softmax is.

    ``chosen_boost > 0`` moves row a of ``W`` along ``h`` so that token a's logit exceeds every
    other logit by ``chosen_boost``, imitating a model fine-tuned to prefer the chosen answer.
    """
    if n < 1 or vocab_size < 2 or hidden_dim < 1:
        raise ValueError(
            f"need n >= 1, vocab_size >= 2, hidden_dim >= 1; got {n}, {vocab_size}, {hidden_dim}"
        )
    if not logit_scale > 0:
        raise ValueError(f"logit_scale must be positive, got {logit_scale}")
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, vocab_size, hidden_dim, generator=gen, dtype=torch.float64)
    weight *= logit_scale / hidden_dim**0.5
    hidden = torch.randn(n, hidden_dim, generator=gen, dtype=torch.float64)
    token_a = torch.randint(0, vocab_size, (n,), generator=gen)
    shift = torch.randint(1, vocab_size, (n,), generator=gen)
    token_b = (token_a + shift) % vocab_size
    if chosen_boost > 0:
        rows = torch.arange(n)
        logits = torch.einsum("nvd,nd->nv", weight, hidden)
        target = logits.scatter(1, token_a[:, None], -torch.inf).amax(1) + chosen_boost
        shift_a = (target - logits[rows, token_a])[:, None]
        weight[rows, token_a] += shift_a * hidden / (hidden * hidden).sum(-1, keepdim=True)
    return HeadDraws(weight, hidden, token_a, token_b)


def _log_probs(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(torch.einsum("nvd,nd->nv", weight, hidden), dim=-1)


def head_gradient_stats_autograd(draws: HeadDraws, include_hidden: bool = False) -> dict:
    """Per-draw ``norm2_a, norm2_b, inner`` (N,) of the log-prob gradients, by autograd.

    Over ``W`` only (the theorem's setting) or, with ``include_hidden``, over ``W`` and ``h``
    (a first step outside the theorem: the hidden state also moves).
    """
    weight = draws.weight.clone().requires_grad_(True)
    hidden = draws.hidden.clone().requires_grad_(include_hidden)
    inputs = (weight, hidden) if include_hidden else (weight,)
    logp = _log_probs(weight, hidden)
    rows = torch.arange(logp.shape[0], device=logp.device)
    # Draws are independent, so the gradient of the sum holds every draw's own gradient.
    grads_a = torch.autograd.grad(logp[rows, draws.token_a].sum(), inputs, retain_graph=True)
    grads_b = torch.autograd.grad(logp[rows, draws.token_b].sum(), inputs)

    def per_draw(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x * y).flatten(1).sum(1)

    return {
        "norm2_a": sum(per_draw(g, g) for g in grads_a),
        "norm2_b": sum(per_draw(g, g) for g in grads_b),
        "inner": sum(per_draw(ga, gb) for ga, gb in zip(grads_a, grads_b, strict=True)),
    }


def head_gradient_stats_closed_form(draws: HeadDraws) -> dict:
    """The same statistics over ``W`` from the closed forms in the module docstring."""
    p = _log_probs(draws.weight, draws.hidden).exp()
    rows = torch.arange(p.shape[0], device=p.device)
    p_a, p_b = p[rows, draws.token_a], p[rows, draws.token_b]
    # Written without cancellation: 1 - p_a is the mass of the other tokens.
    rest = p.clone()
    rest[rows, draws.token_a] = 0.0
    q_a = rest.sum(-1)
    rest[rows, draws.token_b] = 0.0
    others2 = (rest * rest).sum(-1)
    q_b = q_a - p_b + p_a
    h2 = (draws.hidden * draws.hidden).sum(-1)
    return {
        "norm2_a": (q_a * q_a + p_b * p_b + others2) * h2,
        "norm2_b": (q_b * q_b + p_a * p_a + others2) * h2,
        "inner": (others2 - p_a * q_a - p_b * q_b) * h2,
        "p_a": p_a,
        "p_b": p_b,
    }


def realized_head_step(draws: HeadDraws, step: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Realized changes ``(Delta log p_a, Delta log p_b)`` after one plain gradient step of the
    output layer alone on the pair: ``W <- W + eta (g_a - g_b)`` with ``h`` fixed, the direction
    of a DPO step (whose gradient is ``-C (g_a - g_b)`` with ``C > 0``).

    ``eta = step / |h|^2`` per draw, so the first-order changes ``eta (|g_a|^2 - <g_a, g_b>)``
    are ``step (1 - p_a + p_b)`` nats: at most ``2 step``.
    """
    if not step > 0:
        raise ValueError(f"step must be positive, got {step}")
    logp = _log_probs(draws.weight, draws.hidden)
    probs = logp.exp()
    rows = torch.arange(len(draws.hidden), device=probs.device)
    e_ab = torch.zeros_like(probs)
    e_ab[rows, draws.token_a] += 1.0
    e_ab[rows, draws.token_b] -= 1.0
    eta = step / (draws.hidden * draws.hidden).sum(-1)
    # g_a - g_b = (e_a - p) h^T - (e_b - p) h^T = (e_a - e_b) h^T
    new_weight = draws.weight + eta[:, None, None] * e_ab[:, :, None] * draws.hidden[:, None, :]
    new_logp = _log_probs(new_weight, draws.hidden)
    delta = new_logp - logp
    return delta[rows, draws.token_a], delta[rows, draws.token_b]


def dpo_case(norm2_w: torch.Tensor, norm2_l: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """DPO case (d_w = d_l) from the statistics: 1 ideal, 2 both down, 3 both up (4 impossible)."""
    return classify_cases(norm2_w - inner, inner - norm2_l)


def theorem1_table(
    n_draws: int,
    vocab_size: int,
    hidden_dim: int,
    logit_scales: list[float],
    seed: int = 0,
    chosen_boost: float = 0.0,
    step: float = 1e-3,
    device: str = "auto",
) -> pd.DataFrame:
    """One row per random output layer and token pair, for each logit scale and setting.

    Setting ``random`` draws plain random layers; ``chosen boosted`` (when ``chosen_boost > 0``)
    makes the chosen token the most likely by ``chosen_boost`` nats, as after fine-tuning.

    Columns: statistics by autograd over ``W`` (``inner``, ``norm2_a``, ``norm2_b``, ``cosine``),
    the closed-form error (``closed_form_error``: largest absolute difference divided by
    ``max(|g_a|^2, |g_b|^2)``; autograd itself loses all precision in ``e_a - p`` when
    ``p_a`` rounds to 1), ``p_a``, ``p_b``, ``top_is_a_or_b``, ``case`` (over ``W``) and
    ``case_h_moves`` (over ``W`` and ``h``), and ``realized_a``/``realized_b``: the realized
    log-prob changes of a plain gradient step of the output layer alone
    (:func:`realized_head_step` with ``step``). Draws are made in chunks of at most 2**25 weights
    (256 MiB in float64) to bound memory, on the CPU (the same draws on every device), and
    computed on ``device`` (``auto``: CUDA when available).
    """
    dev = resolve_device(device)
    chunk = max(1, min(256, 2**25 // (vocab_size * hidden_dim)))
    settings = {"random": 0.0} | ({"chosen boosted": chosen_boost} if chosen_boost > 0 else {})
    frames = []
    for (i, scale), (k, (setting, boost)) in itertools.product(
        enumerate(logit_scales), enumerate(settings.items())
    ):
        for j, start in enumerate(range(0, n_draws, chunk)):
            n = min(chunk, n_draws - start)
            draw_seed = seed + 7919 * i + 104729 * k + j
            draws = random_head_draws(n, vocab_size, hidden_dim, scale, draw_seed, boost).to(dev)
            auto = head_gradient_stats_autograd(draws)
            closed = head_gradient_stats_closed_form(draws)
            moving = head_gradient_stats_autograd(draws, include_hidden=True)
            scale_ab = (auto["norm2_a"] * auto["norm2_b"]).sqrt()
            largest = torch.maximum(auto["norm2_a"], auto["norm2_b"])
            err = torch.stack(
                [(auto[k] - closed[k]).abs() / largest for k in ("inner", "norm2_a", "norm2_b")]
            ).amax(0)
            probs = _log_probs(draws.weight, draws.hidden).exp()
            realized_a, realized_b = realized_head_step(draws, step)
            top = probs.argmax(-1)
            columns = {
                "inner": auto["inner"],
                "norm2_a": auto["norm2_a"],
                "norm2_b": auto["norm2_b"],
                "cosine": auto["inner"] / scale_ab,
                "closed_form_error": err,
                "p_a": closed["p_a"],
                "p_b": closed["p_b"],
                "top_is_a_or_b": (top == draws.token_a) | (top == draws.token_b),
                "case": dpo_case(auto["norm2_a"], auto["norm2_b"], auto["inner"]),
                "case_h_moves": dpo_case(moving["norm2_a"], moving["norm2_b"], moving["inner"]),
                "realized_a": realized_a,
                "realized_b": realized_b,
            }
            frames.append(
                pd.DataFrame(
                    {"logit_scale": scale, "setting": setting}
                    | {name: t.cpu().numpy() for name, t in columns.items()}
                )
            )
    return pd.concat(frames, ignore_index=True)
