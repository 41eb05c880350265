"""The shared SFT-then-preference experiment: runs on a tiny model and is cached."""

import pandas as pd

import ge_utils.experiments as experiments
from ge_utils.training import TrainConfig


def test_tiny_experiment_runs_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GE_UTILS_CACHE", str(tmp_path))
    sft_cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, progress=False)
    po_cfg = TrainConfig(
        steps=3, batch_size=4, lr=1e-3, eval_every=3, progress=False, train_stats=True
    )
    kwargs = dict(
        model="tiny-llama",
        sft_cfg=sft_cfg,
        po_cfg=po_cfg,
        n_train=8,
        n_eval=4,
        n_probe=2,
        device="cpu",
    )
    first = experiments.sft_then_preference(**kwargs)
    assert len(first.sft) == 2 and len(first.run.steps) == 3
    assert set(first.run.pairs["split"]) == {"eval", "probe", "train"}

    def boom(*args, **kw):
        raise AssertionError("retrained despite the cache")

    monkeypatch.setattr(experiments, "preference_optimization", boom)
    again = experiments.sft_then_preference(**kwargs)
    pd.testing.assert_frame_equal(
        first.run.pairs.reset_index(drop=True), again.run.pairs, check_dtype=False
    )
