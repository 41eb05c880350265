"""The shared figures draw what they are given, and refuse an empty frame with a clear error."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ge_utils import plots


def _probe() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "pred_delta_chosen": [0.1, -0.2],
            "real_delta_chosen": [0.12, -0.19],
            "pred_delta_rejected": [-0.3, 0.05],
            "real_delta_rejected": [-0.28, 0.04],
        }
    )


def test_predicted_vs_realized_draws_every_response_and_a_diagonal_spanning_them():
    fig = plots.predicted_vs_realized(_probe(), title="probe")
    ax = fig.axes[0]
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    expected = [(0.1, 0.12), (-0.2, -0.19), (-0.3, -0.28), (0.05, 0.04)]
    assert sorted(map(tuple, points.round(6))) == sorted(expected)
    diagonal = next(line for line in ax.lines if len(set(line.get_xdata())) == 2)
    x, y = np.asarray(diagonal.get_xdata()), np.asarray(diagonal.get_ydata())
    assert np.array_equal(x, y) and x.max() >= 0.3 and x.min() <= -0.3
    assert ax.get_title() == "probe"


def test_predicted_vs_realized_refuses_an_empty_frame():
    with pytest.raises(ValueError, match="no rows"):
        plots.predicted_vs_realized(_probe().iloc[:0])


def test_diagonal_scatter_leaves_out_missing_rows_and_refuses_none():
    data = pd.DataFrame({"pred": [0.5, -1.0, np.nan], "real": [0.4, -2.0, 3.0]})
    fig, ax = plt.subplots()
    plots.diagonal_scatter(data, "pred", "real", ax)
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert sorted(map(tuple, points.round(6))) == [(-1.0, -2.0), (0.5, 0.4)]
    diagonal = next(line for line in ax.lines if len(set(line.get_xdata())) == 2)
    assert np.array_equal(diagonal.get_xdata(), diagonal.get_ydata())
    assert max(diagonal.get_xdata()) == pytest.approx(2.2)  # both columns' range, not 3.0's row
    with pytest.raises(ValueError, match="no rows with both 'pred' and 'real'"):
        plots.diagonal_scatter(data.iloc[2:], "pred", "real", ax)
    plt.close(fig)


def _two_seeds() -> pd.DataFrame:
    """Two seeds x three pairs at two steps; seed 1 sits 10 nats below seed 0."""
    rows = []
    for seed, shift in ((0, 0.0), (1, -10.0)):
        for step in (0, 5):
            for pair, noise in enumerate((-0.5, 0.0, 0.5)):
                rows.append(
                    {"seed": seed, "step": step, "pair": pair, "logp": shift - step + noise}
                )
    return pd.DataFrame(rows)


def _band(ax, x: float) -> tuple[float, float]:
    """Lower and upper edge of the first filled band at ``x``."""
    vertices = ax.collections[0].get_paths()[0].vertices
    at = vertices[np.isclose(vertices[:, 0], x)][:, 1]
    return float(at.min()), float(at.max())


def test_t_band_is_scipys_t_interval_and_draws_nothing_for_one_value():
    values = np.array([1.0, 2.5, 2.0, 4.0])
    ci = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert plots.t_band(values) == pytest.approx((ci.low, ci.high))
    assert all(np.isnan(plots.t_band([3.0])))


def test_seed_lineplot_band_is_over_the_seed_means_not_the_pooled_rows():
    frame = _two_seeds()
    _, ax = plt.subplots()
    plots.seed_lineplot(frame, "step", "logp", ax=ax)
    seed_means = frame[frame["step"] == 5].groupby("seed")["logp"].mean().to_numpy()
    ci = stats.ttest_1samp(seed_means, 0.0).confidence_interval(0.95)
    assert _band(ax, 5) == pytest.approx((ci.low, ci.high))
    pooled = stats.ttest_1samp(frame[frame["step"] == 5]["logp"], 0.0).confidence_interval(0.95)
    assert ci.high - ci.low > 5 * (pooled.high - pooled.low)
    line = ax.lines[0]
    assert np.allclose(line.get_ydata(), [-5.0, -10.0])
    plt.close("all")


def test_seed_lineplot_with_one_seed_bands_over_the_rows():
    frame = _two_seeds().query("seed == 0")
    _, ax = plt.subplots()
    plots.seed_lineplot(frame, "step", "logp", ax=ax)
    ci = stats.ttest_1samp(frame[frame["step"] == 0]["logp"], 0.0).confidence_interval(0.95)
    assert _band(ax, 0) == pytest.approx((ci.low, ci.high))
    plt.close("all")


def test_per_seed_refuses_unknown_columns_and_empty_frames():
    with pytest.raises(ValueError, match="no column"):
        plots.per_seed(_two_seeds(), ["step", "loss"])
    with pytest.raises(ValueError, match="no rows"):
        plots.seed_lineplot(_two_seeds().iloc[:0], "step", "logp")


def test_loss_grid_takes_each_seeds_change_from_its_own_start():
    frame = _two_seeds().groupby(["seed", "step"])["logp"].mean().reset_index()
    frame = frame.assign(
        loss="dpo", logp_chosen=frame["logp"], logp_rejected=2 * frame["logp"], margin=0.0
    )
    fig = plots.loss_grid(frame, col_wrap=1)
    chosen = next(line for line in fig.axes[0].lines if len(line.get_xdata()) == 2)
    assert np.allclose(chosen.get_ydata(), [0.0, -5.0])
    plt.close("all")
