"""What gradient statistics predict for one step, the one-step check, and the diagnosis of pairs.

For pair i, ``g_w = grad u_w`` and ``g_l = grad u_l`` are the gradients of the summed response
log-probs of its chosen and rejected sequence over a parameter set; :mod:`ge_utils.stats`
computes ``|g_w|^2, |g_l|^2, <g_w, g_l>`` (exactly, by per-sequence backward passes, or fast,
from one forward and backward), and this module re-exports its exact reference
(:func:`exact_gradient_stats`) and :func:`parameter_set`.

The first-order change of a gradient step of size ``eta`` on a loss with coefficients
``d_w, d_l`` (``grad loss = -d_w g_w + d_l g_l``) is

    Delta u_w ~ eta (d_w |g_w|^2 - d_l <g_w, g_l>)
    Delta u_l ~ eta (d_w <g_w, g_l> - d_l |g_l|^2)

and its case: 1 chosen up and rejected down (ideal), 2 both down, 3 both up, 4 chosen down and
rejected up. Case 4 is impossible when ``d_w, d_l > 0``: it needs
``<g_w, g_l> > (d_w/d_l) |g_w|^2`` and ``<g_w, g_l> > (d_l/d_w) |g_l|^2``, whose product
contradicts Cauchy-Schwarz; it can occur when a coefficient is negative (e.g. IPO past its
target margin). With ``d_w = d_l = C`` the margin grows to first order,
``Delta(u_w - u_l) ~ eta C |g_w - g_l|^2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ge_utils.logprobs import (
    SequenceBatch,
    check_texts,
    eval_mode,
    sequence_logprobs,
    tokenize,
)
from ge_utils.losses import MarginLoss
from ge_utils.objective import pair_logps
from ge_utils.stats.exact import exact_gradient_stats
from ge_utils.stats.params import ParamSpec, parameter_set
from ge_utils.stats.record import STAT_KEYS, PairStats
from ge_utils.stats.strategies import get_strategy

__all__ = [
    "STAT_KEYS",
    "ParamSpec",
    "case4_count",
    "classify_cases",
    "condition_table",
    "diagnose_pairs",
    "exact_gradient_stats",
    "margin_falls_count",
    "one_step_change",
    "pair_logps",
    "parameter_set",
    "sign_agreement",
    "stats_method",
]


def classify_cases(delta_w: torch.Tensor, delta_l: torch.Tensor) -> torch.Tensor:
    """(B,) long case from the signs of the (predicted or realized) changes, each (B,): 1, 2, 3
    or 4 (see the module docstring), on their device. A change of exactly 0 counts as "not
    up"."""
    case = torch.full(delta_w.shape, 4, dtype=torch.long, device=delta_w.device)
    case[(delta_w > 0) & (delta_l <= 0)] = 1
    case[(delta_w <= 0) & (delta_l <= 0)] = 2
    case[(delta_w > 0) & (delta_l > 0)] = 3
    return case


def sign_agreement(
    predicted: pd.Series, realized: pd.Series, clear: float | None = None
) -> pd.Series:
    """Whether each predicted change has the realized change's sign (both > 0, or both <= 0),
    per row. ``clear``: only the clear predictions, those with ``|predicted|`` above ``clear``
    times the median ``|predicted|`` (e.g. 0.05; near-zero predictions have no direction to
    agree with); None: every row."""
    if len(predicted) != len(realized):
        raise ValueError(f"{len(predicted)} predicted but {len(realized)} realized changes")
    if clear is not None:
        keep = predicted.abs() > clear * predicted.abs().median()
        predicted, realized = predicted[keep], realized[keep]
    return predicted.gt(0) == realized.gt(0)


def case4_count(table: pd.DataFrame) -> tuple[int, int]:
    """``(k, n)``: of the ``n`` rows of a :func:`condition_table` with ``d_w, d_l > 0``, the
    ``k`` predicted in case 4, which Cauchy-Schwarz forbids there (module docstring): a check of
    the statistics, ``k`` must be 0."""
    positive = table[(table["d_w"] > 0) & (table["d_l"] > 0)]
    return int((positive["case"] == 4).sum()), len(positive)


def margin_falls_count(
    table: pd.DataFrame, eta: float | pd.Series, rtol: float = 1e-6
) -> tuple[int, int]:
    """``(k, n)``: of the ``n`` rows of a :func:`condition_table` with ``d_w = d_l``, the ``k``
    whose predicted margin change is negative beyond rounding. There it is
    ``eta d |g_w - g_l|^2 >= 0`` (module docstring), so ``k`` must be 0: a check of the
    statistics. ``eta``: the step size the table's predictions were made with (one, or one per
    row). Rounding: ``rtol eta |d| (|g_w|^2 + |g_l|^2)`` per row (statistics summed in float32:
    ``|g_w - g_l|^2`` is their difference, which rounds to about 1e-7 of its terms)."""
    equal = table["d_w"] == table["d_l"]
    rows = table[equal]
    step = eta[equal] if isinstance(eta, pd.Series) else eta
    scale = step * rows["d_w"].abs() * (rows["grad_norm2_chosen"] + rows["grad_norm2_rejected"])
    return int((rows["pred_delta_margin"] < -rtol * scale).sum()), len(rows)


def condition_table(
    stats: Mapping[str, torch.Tensor], d_w: torch.Tensor, d_l: torch.Tensor, eta: float = 1.0
) -> pd.DataFrame:
    """One row per pair: the statistics, the loss coefficients, the first-order predicted
    changes for a plain gradient step of size ``eta`` and the case.

    Columns: ``logp_chosen, logp_rejected, grad_norm2_chosen, grad_norm2_rejected, grad_inner,
    cosine, inner_over_min_norm2, d_w, d_l, pred_delta_chosen, pred_delta_rejected,
    pred_delta_margin, case``.
    """
    n_w, n_l, inner = (stats[k].double().cpu() for k in ("norm2_chosen", "norm2_rejected", "inner"))
    d_w, d_l = d_w.double().cpu(), d_l.double().cpu()
    pred_w = eta * (d_w * n_w - d_l * inner)
    pred_l = eta * (d_w * inner - d_l * n_l)
    return pd.DataFrame(
        {
            "logp_chosen": stats["logp_chosen"].double().cpu().numpy(),
            "logp_rejected": stats["logp_rejected"].double().cpu().numpy(),
            "grad_norm2_chosen": n_w.numpy(),
            "grad_norm2_rejected": n_l.numpy(),
            "grad_inner": inner.numpy(),
            "cosine": (inner / (n_w * n_l).sqrt()).numpy(),
            "inner_over_min_norm2": (inner / torch.minimum(n_w, n_l)).numpy(),
            "d_w": d_w.numpy(),
            "d_l": d_l.numpy(),
            "pred_delta_chosen": pred_w.numpy(),
            "pred_delta_rejected": pred_l.numpy(),
            "pred_delta_margin": (pred_w - pred_l).numpy(),
            "case": classify_cases(pred_w, pred_l).numpy(),
        }
    )


def one_step_change(
    model: nn.Module,
    chosen: SequenceBatch,
    rejected: SequenceBatch,
    loss: MarginLoss,
    lr: float,
    ref: tuple[torch.Tensor, torch.Tensor] | None = None,
    params: ParamSpec = None,
) -> pd.DataFrame:
    """Realized one-step changes, one pair at a time.

    For each pair i: one plain SGD step of size ``lr`` on that pair's loss over the parameter
    set, the realized ``Delta u_w, Delta u_l``, then the parameters are restored bit-exactly. One
    pair per step keeps the comparison with that pair's first-order prediction exact (a batch
    step would add cross-pair inner products). ``ref`` holds reference log-probs ``(ref_w,
    ref_l)``, each (B,); None makes the policy its own (detached) reference, as in
    :func:`diagnose_pairs`. Returns columns ``pair, realized_delta_chosen,
    realized_delta_rejected`` (nats) and ``realized_case``; eval mode throughout.
    """
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected sequences")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    plist = [p for _, p in parameter_set(model, params)]
    saved = [p.detach().clone() for p in plist]
    rows = []
    with eval_mode(model):
        for i in range(len(chosen)):
            c, r = chosen.select([i]), rejected.select([i])
            u_w, u_l = sequence_logprobs(model, c), sequence_logprobs(model, r)
            ref_i = None if ref is None else (ref[0][i : i + 1], ref[1][i : i + 1])
            value = loss.loss(pair_logps(u_w, u_l, c, r, ref_i)).sum()
            grads = torch.autograd.grad(value, plist, allow_unused=True)
            with torch.no_grad():
                try:
                    for p, g in zip(plist, grads, strict=True):
                        if g is not None:
                            p.sub_(lr * g)
                    new_w, new_l = sequence_logprobs(model, c), sequence_logprobs(model, r)
                finally:
                    for p, s in zip(plist, saved, strict=True):
                        p.copy_(s)
            rows.append(
                {
                    "pair": i,
                    "realized_delta_chosen": float(new_w - u_w.detach()),
                    "realized_delta_rejected": float(new_l - u_l.detach()),
                }
            )
    out = pd.DataFrame(rows)
    out["realized_case"] = classify_cases(
        torch.tensor(out["realized_delta_chosen"].values),
        torch.tensor(out["realized_delta_rejected"].values),
    ).numpy()
    return out


StatsMethod = Callable[..., PairStats]


def stats_method(method: str) -> StatsMethod:
    """``f(model, chosen, rejected, params) -> PairStats`` of the registered statistics strategy
    ``method`` (``exact`` or ``fast``; see :func:`ge_utils.stats.strategies.get_strategy`)."""
    return get_strategy(method).pair_stats


def _reference_logps(
    ref_model: nn.Module, chosen: SequenceBatch, rejected: SequenceBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (B,) of both sides under ``ref_model`` in eval mode."""
    device = next(ref_model.parameters()).device
    with eval_mode(ref_model):
        with torch.no_grad():
            return (
                sequence_logprobs(ref_model, chosen.to(device)),
                sequence_logprobs(ref_model, rejected.to(device)),
            )


def diagnose_pairs(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    loss: MarginLoss,
    template: str = "none",
    eta: float = 1.0,
    ref_model: nn.Module | None = None,
    batch_size: int = 8,
    method: str = "exact",
    params: ParamSpec = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Gradient statistics and first-order case of every pair: :func:`condition_table` plus a
    ``pair`` column (0-based index into the inputs).

    Tokenizes ``batch_size`` pairs at a time (``template`` as in
    :func:`ge_utils.logprobs.tokenize`), computes the statistics with ``method`` (``"exact"``:
    :func:`exact_gradient_stats`; ``"fast"``: :func:`ge_utils.stats.fast_gradient_stats`)
    over ``params``, and the loss coefficients. Reference log-probs come from ``ref_model`` (in
    eval mode, restored afterwards), or from ``model`` itself when it is None: then every reward
    is 0 and, e.g. for DPO, ``d_w = d_l = beta / 2``. ``progress`` shows a bar over batches.

    A pair whose predicted chosen or rejected change is exactly 0 (e.g. chosen and rejected
    tokenize to the same ids) has no direction: its ``case`` is missing (``<NA>``; the column
    is pandas' nullable ``Int64``). Arguments are checked before any computation: TypeError
    unless ``prompts``, ``chosen`` and ``rejected`` are sequences of strings and ``loss`` is a
    :class:`~ge_utils.losses.MarginLoss`.
    """
    check_texts(prompts=prompts, chosen=chosen, rejected=rejected)
    if not isinstance(loss, MarginLoss):
        raise TypeError(
            "loss must be a MarginLoss (e.g. ge_utils.losses.get_loss('dpo')), "
            f"got {type(loss).__name__} {loss!r:.60}"
        )
    if not (len(prompts) == len(chosen) == len(rejected)):
        raise ValueError(
            f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected responses"
        )
    if len(prompts) == 0:
        raise ValueError("no pairs to diagnose")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not (math.isfinite(eta) and eta > 0):
        raise ValueError(f"eta (the step size) must be a finite number > 0, got {eta!r}")
    compute = stats_method(method)
    device = next(model.parameters()).device
    frames = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="pairs", unit="batch", disable=not progress):
        sl = slice(start, start + batch_size)
        c = tokenize(tokenizer, prompts[sl], chosen[sl], template)
        r = tokenize(tokenizer, prompts[sl], rejected[sl], template)
        stats = compute(model, c.to(device), r.to(device), params)
        ref = None if ref_model is None else _reference_logps(ref_model, c, r)
        p = pair_logps(stats["logp_chosen"], stats["logp_rejected"], c, r, ref)
        d_w, d_l = loss.coefficients(p)
        table = condition_table(stats, d_w, d_l, eta)
        table.insert(0, "pair", range(start, start + len(table)))
        frames.append(table)
    table = pd.concat(frames, ignore_index=True)
    no_direction = (table["pred_delta_chosen"] == 0) | (table["pred_delta_rejected"] == 0)
    table["case"] = table["case"].astype("Int64").mask(no_direction)
    return table
