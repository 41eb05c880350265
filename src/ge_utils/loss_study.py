"""Objectives compared over several seeds: per-pair evidence for the loss-family and mitigation
chapters.

A notebook runs :func:`ge_utils.experiments.loss_comparison` once per seed
(:func:`ge_utils.experiments.over_seeds`; each seed draws its own statements, so its own
training and held-out pairs, data order and tiny-model initialization). The evidence is then per
held-out pair: for pair ``i`` of seed ``s`` and objective ``o``, the change from the first to the
last logged step

    Delta u_w(o, s, i) = u_w(o, s, i, T) - u_w(o, s, i, 0),

the same for ``u_l`` and the margin ``u_w - u_l`` (summed response log-probs, nats). Every
objective of a seed sees the same held-out pairs from the same start, so two objectives compare
by the paired difference ``Delta u_w(a, s, i) - Delta u_w(b, s, i)`` on the same ``(s, i)``
(:func:`paired_values`). Intervals are left to :mod:`ge_utils.claims`, at the seed level: the
pairs of one seed share its training runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ge_utils.claims import Estimate, mean_interval, paired_difference
from ge_utils.experiments import ComparisonResult, experiment_data, pair_changes, realized_cases
from ge_utils.logprobs import tokenize
from ge_utils.mitigations import normalized_step_check
from ge_utils.models import load_model
from ge_utils.spec import ExperimentSpec

Results = Mapping[int, ComparisonResult]


def loss_changes(results: Results) -> pd.DataFrame:
    """One row per (loss, seed, held-out pair): :func:`ge_utils.experiments.pair_changes` of
    every objective (``d_chosen``, ``d_rejected``, ``d_margin`` in nats, from the first to the
    last logged step), with a ``loss`` column."""
    if not results:
        raise ValueError("no results: give at least one seed")
    names = list(next(iter(results.values())).runs)
    frames = [
        pair_changes({s: r.runs[name] for s, r in results.items()}).assign(loss=name)
        for name in names
    ]
    return pd.concat(frames, ignore_index=True)


def paired_values(
    changes: pd.DataFrame, a: str, b: str, column: str = "d_chosen"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``column`` of losses ``a`` and ``b`` aligned on the same (seed, pair), and each row's seed
    (for :func:`ge_utils.claims.paired_difference`); a pair missing from either loss raises
    ``ValueError``."""
    wide = changes.pivot_table(index=["seed", "pair"], columns="loss", values=column)
    for name in (a, b):
        if name not in wide.columns:
            raise ValueError(f"no changes of {name!r}; losses: {', '.join(wide.columns)}")
    both = wide[[a, b]]
    if both.isna().any().any():
        raise ValueError(f"{a} and {b} were not measured on the same pairs and seeds")
    return both[a].to_numpy(), both[b].to_numpy(), both.index.get_level_values("seed").to_numpy()


def paired_change(
    changes: pd.DataFrame, a: str, b: str, column: str = "d_chosen"
) -> Estimate:
    """The mean paired difference of ``column`` between losses ``a`` and ``b`` on the same
    (seed, pair), with its seed-level interval (:func:`paired_values`,
    :func:`ge_utils.claims.paired_difference`)."""
    return paired_difference(*paired_values(changes, a, b, column))


def change_table(changes: pd.DataFrame, order: Sequence[str] | None = None) -> pd.DataFrame:
    """Per loss: mean change of the held-out chosen and rejected log-probs and of the margin,
    each with its seed-level 95% interval (``*_low``, ``*_high``; see
    :func:`ge_utils.claims.mean_interval`), ``n`` (pairs x seeds) and ``seeds``."""
    rows = []
    for loss, group in changes.groupby("loss", sort=False):
        row: dict[str, Any] = {"loss": loss, "n": len(group), "seeds": group["seed"].nunique()}
        for col in ("d_chosen", "d_rejected", "d_margin"):
            est = mean_interval(group[col].to_numpy(), group["seed"].to_numpy())
            row.update({col: est.effect, f"{col}_low": est.low, f"{col}_high": est.high})
        rows.append(row)
    table = pd.DataFrame(rows).set_index("loss")
    return table.reindex(list(order)) if order is not None else table


def seed_means(results: Results) -> pd.DataFrame:
    """Per (seed, loss, step): the held-out means of ``logp_chosen``, ``logp_rejected`` and
    ``margin`` minus their value at the first logged step of that seed and loss, so a plot that
    averages over seeds shows the mean change and its spread."""
    frames = []
    for seed, result in results.items():
        means = result.means("eval")
        cols = ["logp_chosen", "logp_rejected", "margin"]
        means[cols] = means[cols] - means.groupby("loss")[cols].transform("first")
        frames.append(means.assign(seed=seed))
    return pd.concat(frames, ignore_index=True)


def stacked(results: Results, what: str) -> pd.DataFrame:
    """A frame of every seed's result with a ``seed`` column: ``what`` is ``"train"`` (training
    pair rows), ``"eval"`` (held-out pair rows), ``"tokens"``, ``"answers"`` or ``"cases"``
    (realized held-out cases)."""
    frames = []
    for seed, result in results.items():
        if what in ("train", "eval"):
            frame = result.pairs(what)
        elif what in ("tokens", "answers"):
            frame = getattr(result, what)
        elif what == "cases":
            frame = pd.concat(
                [realized_cases(run).assign(loss=name) for name, run in result.runs.items()],
                ignore_index=True,
            )
        else:
            raise ValueError(f"unknown frame {what!r}: train, eval, tokens, answers or cases")
        frames.append(frame.assign(seed=seed))
    return pd.concat(frames, ignore_index=True)


def active_share(train: pd.DataFrame, loss: str) -> tuple[int, int]:
    """``(k, n)``: of the ``n`` training pair-steps of ``loss``, ``k`` had ``d_l > 0``. For a
    hinge loss (SLiC-HF, RRHF) ``d_l = 1[hinge active]`` (over ``|y_l|`` for RRHF), so ``k`` counts
    the pair-steps whose margin term trained the model at all."""
    rows = train[train["loss"] == loss]
    if rows.empty:
        raise ValueError(f"no training pair rows of {loss!r}")
    return int((rows["d_l"] > 0).sum()), len(rows)


def normalized_guarantee(
    spec: ExperimentSpec,
    seeds: Sequence[int],
    n_pairs: int,
    beta: float = 0.1,
    step_size: float = 1e-2,
) -> pd.DataFrame:
    """:func:`ge_utils.mitigations.normalized_step_check` on the first ``n_pairs`` held-out pairs
    of every seed, at the spec's model as loaded (before SFT; the policy is its own reference,
    so the DPO weight is ``beta / 2``). One row per (seed, pair)."""
    if not 1 <= n_pairs <= spec.n_eval:
        raise ValueError(f"n_pairs must be in 1..{spec.n_eval} (n_eval), got {n_pairs}")
    frames = []
    for seed in seeds:
        s = spec.with_seed(seed)
        _, held = experiment_data(s)
        held = held[:n_pairs]
        loaded = load_model(
            s.model,
            dtype=s.dtype,
            device=s.device,
            lora=s.lora,
            train_last_k=s.train_last_k,
            seed=seed,
        )
        net, tok = loaded.model, loaded.tokenizer
        device = next(net.parameters()).device
        prompts = [p.prompt for p in held]
        chosen = tokenize(tok, prompts, [p.chosen for p in held], s.po.template).to(device)
        rejected = tokenize(tok, prompts, [p.rejected for p in held], s.po.template).to(device)
        table = normalized_step_check(net, chosen, rejected, beta=beta, step_size=step_size)
        frames.append(table.assign(seed=seed))
    return pd.concat(frames, ignore_index=True)
