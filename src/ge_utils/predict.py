"""Predict, before training, which pairs will lose chosen likelihood: scores and their skill.

Every score is computed on the model *before* a preference step, per pair ``(x, y_w, y_l)``.

**CHES family** (Razin et al., *Unintentional Unalignment*, ICLR 2025; definition read in
princeton-nlp/unintentional-unalignment ``ches/ches.py``). Let ``h_t`` be the final hidden state
that the unembedding reads (HF ``output_hidden_states[-1]``, after the final norm) and
``S_w = sum_t h_t`` over the positions that predict the chosen-response tokens (the last prompt
position through the second-to-last response position, ``|y_w|`` positions); ``S_l`` likewise
on ``(x, y_l)``. Then

    CHES    = <S_w, S_l> - |S_w|^2
    LN-CHES = <S_w, S_l> / (|y_w| |y_l|) - |S_w|^2 / |y_w|^2

Higher means more likely displacement of the chosen response. Forward passes only.

**Baselines**: ``last_hidden_inner = <h_w(T_w), h_l(T_l)>``, the inner product of the final hidden
states at the last response token of each sequence; ``edit_distance``, the Levenshtein distance
between the two responses' token ids (insertions, deletions, substitutions, each cost 1).

**Gradient family** (this paper, PAPER.md section 2), from the exact per-pair statistics
``|g_w|^2, |g_l|^2, <g_w, g_l>`` over the trained parameters (:mod:`ge_utils.fast_gradients`):
the first-order change of the chosen log-prob under a plain step of size ``eta`` on the pair's
loss, ``pred_delta_chosen = eta (d_w |g_w|^2 - d_l <g_w, g_l>)``; the same divided by
``|g_w|^2``; the cosine ``<g_w, g_l> / (|g_w| |g_l|)``; and ``<g_w, g_l> / min(|g_w|^2, |g_l|^2)``.

**Batch-aware gradient condition** (:func:`first_step_predictions`): ``first_step_chosen``, the
first-order change of the chosen log-prob along the first update of DPO on the whole set with
the optimizer actually used. Unlike the per-pair scores it needs the set and the optimizer (and
one training step's compute), so ``--scores`` does not offer it.

Each score is turned into a *displacement score* (higher = the chosen log-prob more likely
falls) by the sign in :data:`SCORES`. Skill is measured against the realized change
``Delta u_w`` of each pair: AUROC for the event ``Delta u_w < 0`` (Mann-Whitney form, equal to
scikit-learn's ``roc_auc_score``) and Spearman's rho (scipy) between the displacement score and
``-Delta u_w``, each with a paired bootstrap interval over pairs
(:func:`ge_utils.claims.bootstrap_interval`), and the paired bootstrap difference of two
scores' AUROCs on the same resamples.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from ge_utils.claims import Estimate, bootstrap_interval
from ge_utils.gradients import ParamSpec, diagnose_pairs
from ge_utils.logprobs import (
    SequenceBatch,
    directional_logps,
    eval_mode,
    hidden_states,
    response_ids,
    target_positions,
    tokenize,
)
from ge_utils.losses import MarginLoss, get_loss
from ge_utils.models import cache_dir, device_key, load_model
from ge_utils.spec import model_fingerprint
from ge_utils.training import (
    TrainConfig,
    cached_run,
    config_dict,
    preference_optimization,
    sft,
)

FAMILIES = ("gradient", "ches", "baselines")
SCORE_CHOICES = (*FAMILIES, "all")


@dataclass(frozen=True)
class Score:
    """A per-pair score: its CSV ``column``, its family, and the ``sign`` that makes
    ``sign * column`` a displacement score (higher = chosen more likely to fall)."""

    column: str
    family: str
    sign: int
    label: str


SCORES: dict[str, Score] = {
    s.column: s
    for s in (
        Score("pred_delta_chosen", "gradient", -1, "-(d_w|g_w|^2 - d_l<g_w,g_l>)"),
        Score("pred_delta_chosen_over_norm2", "gradient", -1, "-(same)/|g_w|^2"),
        Score("cosine", "gradient", 1, "cos(g_w, g_l)"),
        Score("inner_over_min_norm2", "gradient", 1, "<g_w,g_l>/min(|g_w|^2,|g_l|^2)"),
        Score("first_step_chosen", "batch", -1, "-g_w . Delta theta_1 (batch)"),
        Score("ches", "ches", 1, "CHES"),
        Score("ln_ches", "ches", 1, "LN-CHES"),
        Score("last_hidden_inner", "baselines", 1, "<h_w(T), h_l(T)>"),
        Score("edit_distance", "baselines", -1, "-edit distance"),
    )
}


def families_of(scores: str) -> tuple[str, ...]:
    """The families selected by ``--scores`` (``gradient``, ``ches``, ``baselines`` or ``all``)."""
    if scores not in SCORE_CHOICES:
        raise ValueError(f"unknown scores {scores!r}; expected one of {', '.join(SCORE_CHOICES)}")
    return FAMILIES if scores == "all" else (scores,)


# --- CHES family and baselines ----------------------------------------------------------------


def response_hidden_sums(
    model: nn.Module, batch: SequenceBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence (float64, on the CPU): ``S`` (B, H), the sum of the final hidden states at
    the positions that predict response tokens; ``last`` (B, H), the final hidden state at the
    last response token; ``n`` (B,), the response length. Padding on either side is handled by
    the batch's masks; no gradient is kept. Raises ValueError where the hidden states are not
    finite (NaN or inf weights): a score would be NaN without a word."""
    with torch.no_grad():
        h = hidden_states(model, batch).double()
    if not bool(torch.isfinite(h).all()):
        raise ValueError(
            f"the hidden states of {type(model).__name__} are not finite (NaN or inf): "
            "non-finite weights, or an overflow in this dtype"
        )
    rows, cols = target_positions(batch)
    sums = torch.zeros(len(batch), h.shape[-1], dtype=torch.float64, device=h.device)
    sums.index_add_(0, rows, h[rows, cols])
    width = batch.response_mask.shape[1]
    last_col = width - 1 - batch.response_mask.flip(1).int().argmax(dim=1)
    last = h[torch.arange(len(batch), device=h.device), last_col]
    return sums.cpu(), last.cpu(), batch.response_lengths.double().cpu()


def ches_scores(
    model: nn.Module, chosen: SequenceBatch, rejected: SequenceBatch
) -> dict[str, torch.Tensor]:
    """(B,) float64 ``ches``, ``ln_ches`` and ``last_hidden_inner`` (module docstring), from one
    forward over each batch; row i of ``chosen`` pairs with row i of ``rejected``. Eval mode
    (restored afterwards)."""
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected sequences")
    with eval_mode(model):
        s_w, last_w, n_w = response_hidden_sums(model, chosen)
        s_l, last_l, n_l = response_hidden_sums(model, rejected)
    inner, norm2 = (s_w * s_l).sum(1), (s_w * s_w).sum(1)
    return {
        "ches": inner - norm2,
        "ln_ches": inner / (n_w * n_l) - norm2 / n_w**2,
        "last_hidden_inner": (last_w * last_l).sum(1),
    }


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token sequences (unit costs), by dynamic programming:
    ``D[i][j] = min(D[i-1][j] + 1, D[i][j-1] + 1, D[i-1][j-1] + [a_i != b_j])``."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i]
        for j, y in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


# --- all scores of a set of pairs ---------------------------------------------------------------


def score_pairs(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    loss: MarginLoss,
    scores: str = "all",
    template: str = "none",
    eta: float = 1.0,
    batch_size: int = 8,
    method: str = "fast",
    params: ParamSpec = None,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per pair: ``pair`` and the columns of the selected families.

    ``gradient``: every column of :func:`ge_utils.gradients.diagnose_pairs` (statistics over
    ``params``, coefficients of ``loss`` with the model as its own reference, predicted changes
    for a step of size ``eta``, case) plus ``pred_delta_chosen_over_norm2``; ``ches``: ``ches``,
    ``ln_ches``; ``baselines``: ``last_hidden_inner``, ``edit_distance``.
    """
    wanted = families_of(scores)
    n = len(prompts)
    if not (n == len(chosen) == len(rejected)):
        raise ValueError(f"{n} prompts, {len(chosen)} chosen and {len(rejected)} rejected")
    if n == 0:
        raise ValueError("no pairs to score")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    table = pd.DataFrame({"pair": range(n)})
    if "gradient" in wanted:
        grad = diagnose_pairs(
            model, tokenizer, prompts, chosen, rejected, loss, template=template, eta=eta,
            batch_size=batch_size, method=method, params=params, progress=progress,
        )  # fmt: skip
        grad["pred_delta_chosen_over_norm2"] = grad["pred_delta_chosen"] / grad[
            "grad_norm2_chosen"
        ].where(grad["grad_norm2_chosen"] > 0)
        table = table.merge(grad, on="pair")
    if "ches" in wanted or "baselines" in wanted:
        device = next(model.parameters()).device
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            c = tokenize(tokenizer, prompts[sl], chosen[sl], template).to(device)
            r = tokenize(tokenizer, prompts[sl], rejected[sl], template).to(device)
            for key, value in ches_scores(model, c, r).items():
                parts.setdefault(key, []).append(value)
        cols = {k: torch.cat(v).numpy() for k, v in parts.items()}
        if "ches" in wanted:
            table["ches"], table["ln_ches"] = cols["ches"], cols["ln_ches"]
        if "baselines" in wanted:
            table["last_hidden_inner"] = cols["last_hidden_inner"]
            table["edit_distance"] = [
                edit_distance(response_ids(tokenizer, a), response_ids(tokenizer, b))
                for a, b in zip(chosen, rejected, strict=True)
            ]
    return table


def displacement_score(table: pd.DataFrame, name: str) -> np.ndarray:
    """``sign * table[name]`` (:data:`SCORES`): higher means the chosen log-prob more likely
    falls."""
    if name not in SCORES:
        raise ValueError(f"unknown score {name!r}; known: {', '.join(SCORES)}")
    return SCORES[name].sign * table[name].to_numpy(dtype=float)


# --- skill: AUROC, Spearman, paired differences --------------------------------------------------


def _labels(fell: Sequence[bool] | np.ndarray) -> np.ndarray:
    arr = np.asarray(fell)
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError("labels must be booleans or 0/1")
        arr = arr.astype(bool)
    return arr


def auroc(fell: Sequence[bool] | np.ndarray, score: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the positive class ``fell``.

    Mann-Whitney form with mid-ranks for ties: ``(R_1 - n_1 (n_1 + 1) / 2) / (n_1 n_0)``, ``R_1``
    the rank sum of the positives; equal to ``sklearn.metrics.roc_auc_score``. Both classes
    must occur.
    """
    y, s = _labels(fell), np.asarray(score, dtype=float)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be 1-D of one length")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        raise ValueError(f"AUROC needs both classes; got {n1} positive and {n0} negative")
    ranks = stats.rankdata(s)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _auroc_or_half(y: np.ndarray, s: np.ndarray) -> float:
    """AUROC (the formula of :func:`auroc`, without its checks: it runs once per bootstrap
    resample), or 0.5 (no information) for a resample that lost a class."""
    pos = y > 0.5
    n1 = int(pos.sum())
    if n1 == 0 or n1 == pos.size:
        return 0.5
    ranks = stats.rankdata(s)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * (pos.size - n1)))


def _spearman_or_zero(s: np.ndarray, change: np.ndarray) -> float:
    """Spearman's rho of ``s`` and ``-change`` (the Pearson correlation of their mid-ranks, as
    ``scipy.stats.spearmanr``); 0 for a resample where either is constant."""
    a, b = stats.rankdata(s), stats.rankdata(-change)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else 0.0


def _undefined(n: int) -> Estimate:
    return Estimate(math.nan, -math.inf, math.inf, n)


def auroc_estimate(
    fell: np.ndarray, score: np.ndarray, n_resamples: int = 2000, seed: int = 0
) -> Estimate:
    """AUROC with its paired (BCa) bootstrap 95% interval over pairs. With fewer than 2 pairs
    in either class the AUROC is undefined: effect NaN, interval ``[-inf, inf]``."""
    y = _labels(fell)
    n1 = int(y.sum())
    if min(n1, y.size - n1) < 2:
        return _undefined(y.size)
    return bootstrap_interval(
        (y.astype(float), np.asarray(score, float)), _auroc_or_half, n_resamples, seed
    )


def spearman_estimate(
    score: np.ndarray, change: np.ndarray, n_resamples: int = 2000, seed: int = 0
) -> Estimate:
    """Spearman's rho between a displacement score and the realized *fall* ``-change``, with a
    paired bootstrap 95% interval; undefined (NaN) when either is constant."""
    s, c = np.asarray(score, float), np.asarray(change, float)
    if s.size < 3 or np.ptp(s) == 0 or np.ptp(c) == 0:
        return _undefined(s.size)
    return bootstrap_interval((s, c), _spearman_or_zero, n_resamples, seed)


def auroc_difference(
    fell: np.ndarray, a: np.ndarray, b: np.ndarray, n_resamples: int = 2000, seed: int = 0
) -> Estimate:
    """``AUROC(a) - AUROC(b)`` on the same pairs, with a paired bootstrap 95% interval (each
    resample draws the same pairs for both scores)."""
    y = _labels(fell)
    n1 = int(y.sum())
    if min(n1, y.size - n1) < 2:
        return _undefined(y.size)

    def diff(yy: np.ndarray, sa: np.ndarray, sb: np.ndarray) -> float:
        return _auroc_or_half(yy, sa) - _auroc_or_half(yy, sb)

    return bootstrap_interval(
        (y.astype(float), np.asarray(a, float), np.asarray(b, float)), diff, n_resamples, seed
    )


def skill_table(
    table: pd.DataFrame,
    change: Sequence[float] | np.ndarray,
    names: Sequence[str] | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per score: ``auroc`` (event ``change < 0``) and ``rho`` (with ``-change``), each
    with ``_low`` and ``_high`` bounds, and ``n``, ``n_fell``. Scores with a non-finite value
    on some pair are skipped (listed nowhere: check ``table`` first). A non-finite ``change``
    raises ValueError."""
    delta = np.asarray(change, dtype=float)
    if delta.shape != (len(table),):
        raise ValueError(f"{delta.size} changes for {len(table)} scored pairs")
    if not np.isfinite(delta).all():
        bad = np.flatnonzero(~np.isfinite(delta))
        raise ValueError(
            f"change has {len(bad)} non-finite value(s) (NaN or inf), at pair(s) "
            f"{', '.join(str(i) for i in bad[:10])}: drop those pairs from table and change"
        )
    fell = delta < 0
    rows = []
    for name in names if names is not None else [s for s in SCORES if s in table]:
        score = displacement_score(table, name)
        if not np.isfinite(score).all():
            continue
        a = auroc_estimate(fell, score, n_resamples, seed)
        r = spearman_estimate(score, delta, n_resamples, seed)
        rows.append(
            {
                "score": name,
                "family": SCORES[name].family,
                "auroc": a.effect,
                "auroc_low": a.low,
                "auroc_high": a.high,
                "rho": r.effect,
                "rho_low": r.low,
                "rho_high": r.high,
                "n": len(delta),
                "n_fell": int(fell.sum()),
            }
        )
    return pd.DataFrame(rows)


def roc_points(fell: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of ``score`` for ``fell`` (``sklearn.metrics.roc_curve``)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(_labels(fell), np.asarray(score, float))
    return fpr, tpr


# --- one pair set: its scores before training and its realized changes -------------------------

CACHE_VERSION = 4  # bump when a change of code changes cached scores or outcomes
# (3: log-probs of models whose config transforms their logits; 4: no case for a pair whose
# predicted change is exactly 0, where it had case 2)


@dataclass(frozen=True)
class PredictionSetup:
    """What fixes the model a pair set is scored and trained on. Every field is part of the
    cache key of :func:`scored_pairs` and :func:`realized_changes` (``device`` as the kind it
    resolves to, with the CPU's thread count: :func:`ge_utils.models.device_key`); a local model
    folder also by the digest of its files, a cached Hub model by its revision
    (:func:`ge_utils.spec.model_fingerprint`).

    ``sft_steps > 0``: the loaded model is first fine-tuned on the pairs' chosen responses
    (:func:`ge_utils.training.sft`, AdamW at ``sft_lr``, batches of ``batch_size``, seeded), the
    paper's recipe; both the scores and the training runs start from that same model."""

    model: str
    beta: float = 0.1
    template: str = "none"
    dtype: str = "float32"
    train_last_k: int | None = None
    batch_size: int = 8
    method: str = "fast"
    seed: int = 0
    sft_steps: int = 0
    sft_lr: float = 2e-5
    device: str = "auto"


def pairs_digest(pairs: Sequence[Any]) -> str:
    """A stable hash of the pairs' prompt, chosen and rejected texts, in order."""
    blob = json.dumps([[p.prompt, p.chosen, p.rejected] for p in pairs], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load(setup: PredictionSetup, pairs: Sequence[Any]):
    """The model of ``setup``, fine-tuned on the chosen responses of ``pairs`` when
    ``setup.sft_steps > 0`` (deterministic for a seed: every caller starts from the same one)."""
    torch.manual_seed(setup.seed)
    loaded = load_model(
        setup.model, dtype=setup.dtype, device=setup.device, train_last_k=setup.train_last_k,
        seed=setup.seed,
    )  # fmt: skip
    if setup.sft_steps > 0:
        cfg = TrainConfig(
            steps=setup.sft_steps, batch_size=setup.batch_size, lr=setup.sft_lr, seed=setup.seed,
            template=setup.template, progress=False,
        )  # fmt: skip
        sft(loaded.model, loaded.tokenizer, [(p.prompt, p.chosen) for p in pairs], cfg)
    return loaded


def _cache_key(what: str, setup: PredictionSetup, pairs: Sequence[Any], **extra: Any) -> dict:
    """Every input of a cached computation: its kind, the setup (a local model folder with the
    digest of its files, a cached Hub model with its revision:
    :func:`ge_utils.spec.model_fingerprint`), the pairs, the rest."""
    return {
        "what": what, **asdict(setup), **model_fingerprint(setup.model),
        **device_key(setup.device), **extra,
        "pairs": pairs_digest(pairs), "version": CACHE_VERSION,
    }  # fmt: skip


def _cache_root(cache: bool) -> Path | None:
    return cache_dir() / "predict" if cache else None


def scored_pairs(
    setup: PredictionSetup, pairs: Sequence[Any], eta: float, cache: bool = True
) -> pd.DataFrame:
    """Every score (:func:`score_pairs`, ``scores='all'``) of ``pairs`` on the freshly loaded
    model, DPO with ``setup.beta`` and the model as its own reference (``d_w = d_l = beta/2``),
    predicted changes for a plain step of size ``eta``; cached by every input."""
    params = _cache_key("scores", setup, pairs, eta=eta)

    def run() -> dict[str, pd.DataFrame]:
        loaded = _load(setup, pairs)
        table = score_pairs(
            loaded.model, loaded.tokenizer, [p.prompt for p in pairs],
            [p.chosen for p in pairs], [p.rejected for p in pairs],
            get_loss("dpo", beta=setup.beta), scores="all", template=setup.template,
            eta=eta, batch_size=setup.batch_size, method=setup.method,
        )  # fmt: skip
        return {"scores": table}

    return cached_run(_cache_root(cache), params, run)["scores"]


def _outcome_config(
    setup: PredictionSetup, n: int, optimizer: str, lr: float, steps: int
) -> TrainConfig:
    """DPO on the whole set of ``n`` pairs as one batch per step (micro-batches of
    ``setup.batch_size``), evaluated after every step."""
    if n == 0:
        raise ValueError("no pairs to train on")
    return TrainConfig(
        steps=steps, batch_size=setup.batch_size, grad_accum=math.ceil(n / setup.batch_size),
        lr=lr, optimizer=optimizer, seed=setup.seed, template=setup.template, loss="dpo",
        loss_params={"beta": setup.beta}, eval_every=1, stats_method="none", progress=False,
    )  # fmt: skip


def first_step_changes(
    model: nn.Module, tokenizer: Any, pairs: Sequence[Any], cfg: TrainConfig
) -> pd.DataFrame:
    """The first-order change of every pair's chosen and rejected log-prob along the first
    update of ``cfg`` on ``pairs`` (``pred = grad u . Delta theta_1``, exact, by forward mode at
    the starting weights, :func:`ge_utils.logprobs.directional_logps`). The update is the one the
    training code computes (:func:`ge_utils.training.preference_optimization`, one step); the
    model's trainable parameters are then restored, so ``model`` is left as it was. Columns
    ``pair``, ``first_step_chosen``, ``first_step_rejected`` (nats)."""
    if not pairs:
        raise ValueError("no pairs to train on")
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    preference_optimization(model, tokenizer, pairs, pairs[:1], replace(cfg, steps=1))
    now = dict(model.named_parameters())
    delta = {n: now[n].detach() - theta0[n] for n in theta0}
    with torch.no_grad():
        for n, value in theta0.items():
            now[n].copy_(value)
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
    for start in range(0, len(pairs), cfg.batch_size):
        part = pairs[start : start + cfg.batch_size]
        for side, parts in out.items():
            batch = tokenize(
                tokenizer, [p.prompt for p in part], [getattr(p, side) for p in part],
                cfg.template,
            ).to(device)  # fmt: skip
            parts.append(directional_logps(model, batch, theta0, delta)[1].cpu())
    table = pd.DataFrame({"pair": range(len(pairs))})
    for side, parts in out.items():
        table[f"first_step_{side}"] = torch.cat(parts).double().numpy()
    return table


def first_step_predictions(
    setup: PredictionSetup,
    pairs: Sequence[Any],
    optimizer: str,
    lr: float,
    cache: bool = True,
) -> pd.DataFrame:
    """The batch-aware gradient condition: :func:`first_step_changes` for the first update of
    :func:`realized_changes` (DPO on the whole set, ``optimizer`` at ``lr``), from the same
    starting model; cached by every input.

    ``pred_i = grad u_w^i . Delta theta_1``. For plain SGD, ``Delta theta_1 = -lr grad L`` with
    ``L = (1/N) sum_j l_j``, so ``pred_i = (lr/N) sum_j (d_w^j <g_w^i, g_w^j> - d_l^j <g_w^i,
    g_l^j>)``: the per-pair condition (the ``j = i`` term, weight ``1/N``) plus every other
    pair's cross terms. For AdamW, the first step is ``-lr (grad L / (|grad L| + eps) +
    wd theta)`` per coordinate, a sign step. Its cost is one training step and one forward-mode
    pass over the pairs.
    """
    cfg = _outcome_config(setup, len(pairs), optimizer, lr, steps=1)
    params = _cache_key("first_step", setup, pairs, train=config_dict(cfg))

    def run() -> dict[str, pd.DataFrame]:
        loaded = _load(setup, pairs)
        return {"pred": first_step_changes(loaded.model, loaded.tokenizer, pairs, cfg)}

    return cached_run(_cache_root(cache), params, run)["pred"]


def realized_changes(
    setup: PredictionSetup,
    pairs: Sequence[Any],
    optimizer: str,
    lr: float,
    steps: int,
    cache: bool = True,
) -> pd.DataFrame:
    """The realized change of every pair's log-probs after each of ``steps`` DPO steps on the
    whole set (one full batch per step: the loss is the mean over all pairs, accumulated over
    micro-batches of ``setup.batch_size``), with ``optimizer`` (``sgd`` or ``adamw``) at ``lr``.

    The pairs trained on are the pairs scored. Columns ``step, pair, logp_chosen,
    logp_rejected, delta_chosen, delta_rejected`` (change from step 0, nats); cached by every
    input.
    """
    cfg = _outcome_config(setup, len(pairs), optimizer, lr, steps)
    params = _cache_key("outcome", setup, pairs, train=config_dict(cfg))

    def run() -> dict[str, pd.DataFrame]:
        loaded = _load(setup, pairs)
        result = preference_optimization(loaded.model, loaded.tokenizer, pairs, pairs, cfg)
        return {"pairs": result.pairs}

    logged = cached_run(_cache_root(cache), params, run)["pairs"]
    logged = logged[logged["split"] == "eval"][["step", "pair", "logp_chosen", "logp_rejected"]]
    start = logged[logged["step"] == 0].set_index("pair")
    out = logged.copy()
    for side in ("chosen", "rejected"):
        begin = start.loc[out["pair"], f"logp_{side}"].to_numpy()
        out[f"delta_{side}"] = out[f"logp_{side}"].to_numpy() - begin
    return out[out["step"] > 0].reset_index(drop=True)
