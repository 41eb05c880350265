"""Multi-seed evidence of the loss-family and mitigation chapters, on hand-made histories:
per-pair changes, pairing across losses, intervals against scipy, hinge activity."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ge_utils.claims import paired_difference
from ge_utils.experiments import ComparisonResult
from ge_utils.loss_study import (
    active_share,
    change_table,
    loss_changes,
    paired_change,
    paired_values,
    seed_means,
    stacked,
)
from ge_utils.training import RunResult


def history(seed: int, shift: float, n_pairs: int = 5) -> RunResult:
    """Held-out rows at steps 0, 2, 4 whose chosen log-prob moves by ``shift * (pair + 1)`` per
    logged step (plus a seed offset at step 0), and training rows with d_l on and off."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in (0, 2, 4):
        for pair in range(n_pairs):
            u_w = -1.0 - seed + shift * (pair + 1) * step / 2
            u_l = -5.0 - 0.5 * step + rng.normal(0, 0.01)
            rows.append(
                {
                    "step": step,
                    "split": "eval",
                    "pair": pair,
                    "logp_chosen": u_w,
                    "logp_rejected": u_l,
                    "margin": u_w - u_l,
                    "len_chosen": 3.0,
                    "len_rejected": 7.0,
                    "d_w": 1.0,
                    "d_l": 0.0,
                }
            )
    for step in range(4):
        rows.append(
            {
                "step": step,
                "split": "train",
                "pair": 0,
                "logp_chosen": -1.0,
                "logp_rejected": -2.0,
                "margin": 1.0,
                "len_chosen": 3.0,
                "len_rejected": 7.0,
                "d_w": 1.0,
                "d_l": 1.0 if step == 0 else 0.0,
            }
        )
    steps = pd.DataFrame({"step": [0, 1, 2, 3]})
    return RunResult(steps, pd.DataFrame(rows))


def results(seeds=(0, 1, 2)) -> dict[int, ComparisonResult]:
    empty = pd.DataFrame({"loss": [], "step": [], "pair": []})
    return {
        s: ComparisonResult({"dpo": history(s, -0.5), "cpo": history(s, 0.25)}, empty, empty)
        for s in seeds
    }


def test_loss_changes_are_last_minus_first_per_pair():
    changes = loss_changes(results())
    assert len(changes) == 2 * 3 * 5
    dpo = changes[changes["loss"] == "dpo"].sort_values(["seed", "pair"])
    # two logged intervals of shift * (pair + 1) each
    np.testing.assert_allclose(dpo["d_chosen"], np.tile(-0.5 * 2 * np.arange(1, 6), 3))
    np.testing.assert_allclose(dpo["d_rejected"], -2.0, atol=0.05)
    np.testing.assert_allclose(dpo["d_margin"], dpo["d_chosen"] - dpo["d_rejected"])


def test_paired_values_align_pairs_and_seeds_and_interval_matches_scipy():
    changes = loss_changes(results())
    a, b, seeds = paired_values(changes, "cpo", "dpo")
    np.testing.assert_allclose(a - b, np.tile(0.75 * 2 * np.arange(1, 6), 3))
    np.testing.assert_array_equal(seeds, np.repeat(sorted(changes["seed"].unique()), 5))
    table = change_table(changes, ["dpo", "cpo"])
    assert list(table.index) == ["dpo", "cpo"] and (table["n"] == 15).all()
    assert (table["seeds"] == 3).all()
    # every seed has the same pairs' changes, so the seed means are equal: the pooled interval
    want = stats.ttest_1samp(b, 0.0).confidence_interval(0.95)
    assert table.loc["dpo", "d_chosen"] == pytest.approx(b.mean())
    assert table.loc["dpo", "d_chosen_low"] == pytest.approx(want.low)
    assert table.loc["dpo", "d_chosen_high"] == pytest.approx(want.high)
    est = paired_change(changes, "cpo", "dpo")
    assert est.effect == pytest.approx(np.mean(a - b)) and est.n == 15
    assert est == paired_difference(a, b, seeds)
    with pytest.raises(ValueError, match="no changes of 'ipo'"):
        paired_values(changes, "ipo", "dpo")
    with pytest.raises(ValueError, match="same pairs and seeds"):
        paired_values(changes[~((changes["loss"] == "cpo") & (changes["pair"] == 0))], "cpo", "dpo")


def test_seed_means_start_at_zero_for_every_seed_and_loss():
    means = seed_means(results())
    start = means[means["step"] == 0]
    assert len(start) == 6
    np.testing.assert_allclose(start[["logp_chosen", "logp_rejected", "margin"]], 0.0)


def test_stacked_frames_and_hinge_activity():
    res = results((3, 7))
    train = stacked(res, "train")
    assert set(train["seed"]) == {3, 7} and set(train["loss"]) == {"dpo", "cpo"}
    assert active_share(train, "dpo") == (2, 8)  # step 0 of each seed
    assert set(stacked(res, "eval")["split"]) == {"eval"}
    with pytest.raises(ValueError, match="no training pair rows of 'slic'"):
        active_share(train, "slic")
    with pytest.raises(ValueError, match="unknown frame"):
        stacked(res, "weights")


def test_start_measurements_are_shared_and_equal_to_a_run_alone():
    """loss_comparison measures the common start once: the second objective's step-0 token split
    and answers equal those of the same objective run alone."""
    from ge_utils.experiments import loss_comparison
    from ge_utils.spec import ExperimentSpec
    from ge_utils.training import TrainConfig

    po = TrainConfig(steps=2, batch_size=2, lr=1e-3, eval_every=2, progress=False)
    sft = TrainConfig(steps=2, batch_size=2, lr=1e-3, progress=False)
    spec = ExperimentSpec(model="tiny-llama", n_train=4, n_eval=2, n_probe=0, sft=sft, po=po)
    both = loss_comparison(spec, {"dpo": {}, "ipo": {}}, cache=False)
    alone = loss_comparison(spec, {"ipo": {}}, cache=False)
    for frame in ("tokens", "answers"):
        shared = getattr(both, frame)
        shared = shared[shared["loss"] == "ipo"].reset_index(drop=True)
        pd.testing.assert_frame_equal(shared, getattr(alone, frame))
