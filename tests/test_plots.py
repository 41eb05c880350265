"""The shared figures draw what they are given, and refuse an empty frame with a clear error."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

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
