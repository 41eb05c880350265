"""Seaborn figures shared by the notebooks: training curves and gradient statistics."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

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


def logprob_curves(
    means: pd.DataFrame, hue: str | None = None, title: str = "", axes: Sequence | None = None
) -> plt.Figure:
    """Held-out chosen/rejected log-probs and margin over steps.

    ``means`` has columns ``step``, ``logp_chosen``, ``logp_rejected``, ``margin`` (nats) and,
    optionally, a ``hue`` column (e.g. the configuration or the loss). Several rows per step
    (pairs, seeds) draw their mean with a 95% bootstrap band (seeded: the figure is the same on
    every rebuild).
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
        sns.lineplot(
            data=means, x="step", y=col, hue=hue, marker="o", ax=ax, legend=ax is axes[0], seed=0
        )
        ax.set(xlabel="training step", ylabel=f"{label} (nats)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def gradient_curves(means: pd.DataFrame, hue: str | None = None, title: str = "") -> plt.Figure:
    """Probe-set means of ``grad_inner``, ``grad_norm2_chosen``/``_rejected`` and ``cosine``."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    sns.lineplot(seed=0, data=means, x="step", y="grad_inner", hue=hue, marker="o", ax=axes[0])
    axes[0].axhline(0, color="black", lw=0.8)
    axes[0].set(ylabel=r"$\langle g_w, g_l\rangle$", xlabel="training step")
    long = means.melt(
        id_vars=["step"] + ([hue] if hue else []),
        value_vars=["grad_norm2_chosen", "grad_norm2_rejected"],
        var_name="response",
        value_name="norm2",
    ).replace({"response": {"grad_norm2_chosen": "chosen", "grad_norm2_rejected": "rejected"}})
    sns.lineplot(
        data=long, x="step", y="norm2", hue=hue, style="response", ax=axes[1], legend=False
    )
    axes[1].set(ylabel=r"$\|g\|^2$ (solid: chosen, dashed: rejected)", xlabel="training step")
    sns.lineplot(
        seed=0, data=means, x="step", y="cosine", hue=hue, marker="o", ax=axes[2], legend=False
    )
    axes[2].axhline(0, color="black", lw=0.8)
    axes[2].set(ylabel=r"cosine$(g_w, g_l)$", xlabel="training step")
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
    log-probs and of the margin (nats, summed), so every loss reads on one scale."""
    cols = ["logp_chosen", "logp_rejected", "margin"]
    rel = means[["loss", "step", *cols]].copy()
    rel[cols] = rel[cols] - rel.groupby("loss")[cols].transform("first")
    long = rel.melt(id_vars=["loss", "step"], value_vars=cols, var_name="quantity")
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
    ``grad_norm2_rejected``, ``grad_inner``)."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    panels = [
        ("d_ratio", r"$d_w / d_l$"),
        ("grad_norm2_chosen", r"$\|g_w\|^2$"),
        ("grad_norm2_rejected", r"$\|g_l\|^2$"),
        ("grad_inner", r"$\langle g_w, g_l\rangle$"),
    ]
    for ax, (col, label) in zip(axes, panels, strict=True):
        sns.lineplot(
            seed=0, data=train_means, x="step", y=col, hue="loss", ax=ax, legend=ax is axes[-1]
        )
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
    ``shared_rejected``; nats, summed over each group's tokens)."""
    means = tokens.groupby(["loss", "step"]).mean(numeric_only=True).reset_index()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), sharex=True)
    panels = [
        ("contrastive_chosen", "chosen: contrastive token(s)"),
        ("shared_chosen", "chosen: shared tokens"),
        ("contrastive_rejected", "rejected: contrastive token(s)"),
        ("shared_rejected", "rejected: shared tokens"),
    ]
    for ax, (col, label) in zip(axes, panels, strict=True):
        sns.lineplot(seed=0, data=means, x="step", y=col, hue="loss", ax=ax, legend=ax is axes[-1])
        ax.set(xlabel="training step", ylabel="log-prob (nats)", title=label)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


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
    sns.scatterplot(data=long, x="predicted", y="realized", hue="response", style="response", ax=ax)
    lim = max(long["predicted"].abs().max(), long["realized"].abs().max()) * 1.1
    ax.plot([-lim, lim], [-lim, lim], color="black", lw=0.8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set(
        xlabel=r"predicted $g\cdot\Delta\theta$ (nats)",
        ylabel="realized change (nats)",
        title=title,
    )
    fig.tight_layout()
    return fig
