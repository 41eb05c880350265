"""Seaborn figures shared by the notebooks: training curves and gradient statistics.

A curve over several training runs (a ``seed`` column with two or more values) draws the mean
of the per-seed means (of all rows, where the seeds have as many) and a band from the verdicts'
rule (:func:`ge_utils.claims.mean_interval`): the
95% Student-t interval of the per-seed means, since the pairs of one seed share its training
run. With one seed the band is the t-interval over the rows (pairs). Bands carry no resampling,
so a figure is the same on every rebuild.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes

from ge_utils.claims import mean_interval

CASE_COLORS = {1: "seagreen", 2: "steelblue", 3: "darkorange", 4: "grey"}
CASE_NAMES = {
    1: "1: chosen up, rejected down",
    2: "2: both down",
    3: "3: both up",
    4: "4: chosen down, rejected up (never to first order)",
}


def setup() -> None:
    """The book's figure style."""
    sns.set_theme(style="whitegrid", context="notebook")
    plt.rcParams["figure.dpi"] = 90


def t_band(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """The 95% Student-t interval of the mean of ``values`` (scipy, through
    :func:`~ge_utils.claims.mean_interval`), as seaborn's ``errorbar`` callable; no band
    (NaN) where one value gives none."""
    est = mean_interval(values)
    if not (np.isfinite(est.low) and np.isfinite(est.high)):
        return float("nan"), float("nan")
    return est.low, est.high


def per_seed(data: pd.DataFrame, keys: Sequence[str], seed: str = "seed") -> pd.DataFrame:
    """``data`` averaged within each seed and value of ``keys`` (numeric columns), where it
    holds two or more seeds: the rows a seed-level band is drawn over. Otherwise ``data``
    itself, whose band is then over its rows."""
    keys = list(dict.fromkeys(k for k in keys if k is not None))
    missing = [k for k in keys if k not in data.columns]
    if missing:
        raise ValueError(f"per_seed: no column {missing} in {list(data.columns)}")
    if seed not in data.columns or data[seed].nunique() < 2:
        return data
    return data.groupby([*keys, seed], sort=False).mean(numeric_only=True).reset_index()


def seed_lineplot(
    data: pd.DataFrame,
    x: str,
    y: str,
    hue: str | None = None,
    style: str | None = None,
    ax: Axes | None = None,
    **kwargs,
) -> Axes:
    """``sns.lineplot`` of the mean of ``y`` over ``x`` with the seed-level 95% band (module
    docstring); ``kwargs`` go to seaborn (``marker``, ``legend``, ...)."""
    if data.empty:
        raise ValueError(f"seed_lineplot: no rows to draw {y} over {x}")
    rows = per_seed(data, [x, hue, style])
    return sns.lineplot(data=rows, x=x, y=y, hue=hue, style=style, errorbar=t_band, ax=ax, **kwargs)


def logprob_curves(
    means: pd.DataFrame, hue: str | None = None, title: str = "", axes: Sequence | None = None
) -> plt.Figure:
    """Held-out chosen/rejected log-probs and margin over steps.

    ``means`` has columns ``step``, ``logp_chosen``, ``logp_rejected``, ``margin`` (nats) and,
    optionally, a ``hue`` column (e.g. the configuration or the loss). Several rows per step
    (pairs, seeds) draw their mean with the seed-level 95% band (module docstring).
    """
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    else:
        fig = axes[0].figure
    for ax, col, label in zip(
        axes,
        ["logp_chosen", "logp_rejected", "margin"],
        [r"chosen $\log\pi(y_w|x)$", r"rejected $\log\pi(y_l|x)$", r"margin $u_w - u_l$"],
        strict=True,
    ):
        seed_lineplot(means, "step", col, hue=hue, marker="o", ax=ax, legend=ax is axes[0])
        ax.set(xlabel="training step", ylabel=f"{label} (nats)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def gradient_curves(means: pd.DataFrame, hue: str | None = None, title: str = "") -> plt.Figure:
    """Means of ``grad_inner``, ``grad_norm2_chosen``/``_rejected`` and ``cosine`` over steps,
    with the seed-level band where ``means`` has rows of several seeds."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    seed_lineplot(means, "step", "grad_inner", hue=hue, marker="o", ax=axes[0])
    axes[0].axhline(0, color="black", lw=0.8)
    axes[0].set(ylabel=r"$\langle g_w, g_l\rangle$", xlabel="training step")
    long = means.melt(
        id_vars=["step"] + ([hue] if hue else []) + (["seed"] if "seed" in means else []),
        value_vars=["grad_norm2_chosen", "grad_norm2_rejected"],
        var_name="response",
        value_name="norm2",
    ).replace({"response": {"grad_norm2_chosen": "chosen", "grad_norm2_rejected": "rejected"}})
    seed_lineplot(long, "step", "norm2", hue=hue, style="response", ax=axes[1], legend=False)
    axes[1].set(ylabel=r"$\|g\|^2$ (solid: chosen, dashed: rejected)", xlabel="training step")
    seed_lineplot(means, "step", "cosine", hue=hue, marker="o", ax=axes[2], legend=False)
    axes[2].axhline(0, color="black", lw=0.8)
    axes[2].set(ylabel=r"cosine$(g_w, g_l)$", xlabel="training step", ylim=(-1.05, 1.05))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def case_fractions(pairs: pd.DataFrame, by: str = "step", title: str = "") -> plt.Figure:
    """Stacked share of pairs in each first-order case, per value of ``by``."""
    counts = pd.crosstab(pairs[by], pairs["case"], normalize="index")
    counts = counts.reindex(columns=[c for c in CASE_NAMES if c in counts.columns])
    fig, ax = plt.subplots(figsize=(8, 4))
    counts.rename(columns=CASE_NAMES).plot.bar(
        stacked=True, ax=ax, color=[CASE_COLORS[c] for c in counts.columns], width=0.8
    )
    ax.set(ylabel="share of pairs", xlabel=by, title=title, ylim=(0, 1))
    ax.tick_params(axis="x", rotation=30)
    ax.legend(title="case", fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    return fig


def loss_grid(means: pd.DataFrame, col_wrap: int = 3, title: str = "") -> plt.Figure:
    """One panel per ``loss``: change since step 0 of the held-out chosen and rejected
    log-probs and of the margin (nats, summed), so every loss reads on one scale; each seed's
    change is from its own step 0, and several seeds draw the seed-level band."""
    cols = ["logp_chosen", "logp_rejected", "margin"]
    runs = ["loss", "seed"] if "seed" in means else ["loss"]
    rel = per_seed(means[[*runs, "step", *cols]], ["loss", "step"])
    rel[cols] = rel[cols] - rel.sort_values("step").groupby(runs)[cols].transform("first")
    long = rel.melt(id_vars=[*runs, "step"], value_vars=cols, var_name="quantity")
    long["quantity"] = long["quantity"].map(
        {"logp_chosen": "chosen", "logp_rejected": "rejected", "margin": "margin"}
    )
    grid = sns.relplot(
        data=long,
        x="step",
        y="value",
        hue="quantity",
        col="loss",
        col_wrap=col_wrap,
        kind="line",
        errorbar=t_band,
        marker="o",
        height=2.6,
        aspect=1.3,
        palette={"chosen": "seagreen", "rejected": "firebrick", "margin": "grey"},
        facet_kws={"sharey": False},
    )
    for ax in grid.axes.flat:
        ax.axhline(0, color="black", lw=0.8)
    grid.set_axis_labels("training step", "change since step 0 (nats)")
    if title:
        grid.figure.suptitle(title, y=1.02)
    return grid.figure


def coefficient_curves(train_means: pd.DataFrame, title: str = "") -> plt.Figure:
    """Per ``loss``, over training: ``d_w/d_l`` and the training pairs' mean ``|g_w|^2``,
    ``|g_l|^2`` and ``<g_w, g_l>`` (columns ``d_ratio``, ``grad_norm2_chosen``,
    ``grad_norm2_rejected``, ``grad_inner``), with the seed-level band over a ``seed``
    column."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    panels = [
        ("d_ratio", r"$d_w / d_l$"),
        ("grad_norm2_chosen", r"$\|g_w\|^2$"),
        ("grad_norm2_rejected", r"$\|g_l\|^2$"),
        ("grad_inner", r"$\langle g_w, g_l\rangle$"),
    ]
    for ax, (col, label) in zip(axes, panels, strict=True):
        seed_lineplot(train_means, "step", col, hue="loss", ax=ax, legend=ax is axes[-1])
        ax.set(xlabel="training step", ylabel=label)
    axes[0].axhline(1, color="black", lw=0.8)
    axes[0].set_yscale("symlog", linthresh=1.0)  # SPPO's d_l, so the ratio, can turn negative
    axes[-1].axhline(0, color="black", lw=0.8)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def token_groups(tokens: pd.DataFrame, title: str = "") -> plt.Figure:
    """Mean held-out log-probs of the contrastive tokens and of the shared ones, per ``loss``
    over steps (columns ``contrastive_chosen``, ``shared_chosen``, ``contrastive_rejected``,
    ``shared_rejected``; nats, summed over each group's tokens), with the seed-level band."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), sharex=True)
    panels = [
        ("contrastive_chosen", "chosen: contrastive token(s)"),
        ("shared_chosen", "chosen: shared tokens"),
        ("contrastive_rejected", "rejected: contrastive token(s)"),
        ("shared_rejected", "rejected: shared tokens"),
    ]
    for ax, (col, label) in zip(axes, panels, strict=True):
        seed_lineplot(tokens, "step", col, hue="loss", ax=ax, legend=ax is axes[-1])
        ax.set(xlabel="training step", ylabel="log-prob (nats)", title=label)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def diagonal_scatter(
    data: pd.DataFrame,
    x: str,
    y: str,
    ax: plt.Axes,
    hue: str | None = None,
    style: str | None = None,
) -> None:
    """Scatter ``y`` against ``x`` on ``ax`` with the diagonal ``y = x`` (a point on it: the
    prediction ``x`` was the realized ``y``) and the axes through 0, which split the points by
    direction. Rows with a missing ``x`` or ``y`` are left out."""
    rows = data.dropna(subset=[x, y])
    if rows.empty:
        raise ValueError(f"diagonal_scatter: no rows with both {x!r} and {y!r}")
    sns.scatterplot(data=rows, x=x, y=y, hue=hue, style=style, ax=ax)
    lim = max(rows[x].abs().max(), rows[y].abs().max()) * 1.1
    ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)


def predicted_vs_realized(probe: pd.DataFrame, title: str = "") -> plt.Figure:
    """Realized against first-order predicted change of each probe log-prob (columns
    ``pred_delta_chosen``, ``real_delta_chosen``, ``pred_delta_rejected``,
    ``real_delta_rejected``; one row per probe pair and step), with the diagonal: on it when
    the first-order view holds for the step that was taken."""
    if probe.empty:
        raise ValueError("predicted_vs_realized: the probe frame has no rows (no probed step?)")
    long = pd.concat(
        [
            probe.assign(
                response=side,
                predicted=probe[f"pred_delta_{side}"],
                realized=probe[f"real_delta_{side}"],
            )
            for side in ("chosen", "rejected")
        ]
    )
    fig, ax = plt.subplots(figsize=(5, 4.2))
    diagonal_scatter(long, "predicted", "realized", ax, hue="response", style="response")
    ax.set(
        xlabel=r"predicted $g\cdot\Delta\theta$ (nats)",
        ylabel="realized change (nats)",
        title=title,
    )
    fig.tight_layout()
    return fig
