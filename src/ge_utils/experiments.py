"""End-to-end experiments the notebooks share: data, model, SFT, then preference optimization.

:func:`sft_then_preference` runs the paper's recipe on the synthetic sentiment task or on any
preference file/dataset, logs what the paper plots (see :mod:`ge_utils.training`) and caches the
histories by a hash of every parameter, so re-executing a notebook with the same parameters does
not retrain.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from ge_utils.data import PreferencePair, load_pairs, sentiment_pairs, sft_examples
from ge_utils.models import cache_dir, load_model
from ge_utils.training import (
    RunResult,
    TrainConfig,
    cached_run,
    config_dict,
    preference_optimization,
    sft,
)


@dataclass
class ExperimentResult:
    """``sft``: SFT loss per step; ``run``: the preference-optimization history."""

    sft: pd.DataFrame
    run: RunResult
    params: dict[str, Any]


def experiment_data(
    dataset: str, config: str, suffix: str | None, n_train: int, n_eval: int, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Train and held-out pairs: ``dataset='synthetic'`` for the sentiment task, else a file or
    a Hugging Face dataset name (shuffled by ``seed``, then split)."""
    if dataset == "synthetic":
        return sentiment_pairs(n_train, n_eval, config, suffix, seed=seed)
    pairs = load_pairs(dataset)
    random.Random(seed).shuffle(pairs)
    if len(pairs) < n_train + n_eval:
        raise ValueError(f"{dataset}: {len(pairs)} pairs, fewer than {n_train} + {n_eval}")
    return pairs[:n_train], pairs[n_train : n_train + n_eval]


def sft_then_preference(
    model: str,
    sft_cfg: TrainConfig,
    po_cfg: TrainConfig,
    dataset: str = "synthetic",
    config: str = "long",
    suffix: str | None = None,
    n_train: int = 64,
    n_eval: int = 16,
    n_probe: int = 4,
    device: str = "auto",
    seed: int = 0,
    cache: bool = True,
) -> ExperimentResult:
    """SFT on the chosen responses of the training pairs, then preference optimization.

    The probe set (gradient statistics) is the first ``n_probe`` held-out pairs. With ``cache``
    the result is stored under ``cache_dir()/runs/<hash>`` and reused.
    """
    params = {
        "model": model,
        "dataset": dataset,
        "config": config,
        "suffix": suffix,
        "n_train": n_train,
        "n_eval": n_eval,
        "n_probe": n_probe,
        "seed": seed,
        "sft": config_dict(sft_cfg),
        "po": config_dict(po_cfg),
        "version": 1,
    }

    def run() -> dict[str, pd.DataFrame]:
        torch.manual_seed(seed)
        train, held = experiment_data(dataset, config, suffix, n_train, n_eval, seed)
        loaded = load_model(model, device=device, seed=seed)
        sft_hist = sft(loaded.model, loaded.tokenizer, sft_examples(train), sft_cfg)
        result = preference_optimization(
            loaded.model, loaded.tokenizer, train, held, po_cfg, probe_pairs=held[:n_probe]
        )
        return {"sft": sft_hist, **result.frames()}

    frames = cached_run(cache_dir() / "runs" if cache else None, params, run)
    return ExperimentResult(frames["sft"], RunResult(frames["steps"], frames["pairs"]), params)
