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
from ge_utils.fast_gradients import fast_gradient_stats
from ge_utils.gradients import condition_table, one_step_change, pair_logps
from ge_utils.logprobs import sequence_logprobs, tokenize
from ge_utils.losses import get_loss
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
    sft_cfg: TrainConfig | None,
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
    dtype: str = "float32",
    lora_rank: int | None = None,
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
        loaded = load_model(model, dtype=dtype, device=device, lora_rank=lora_rank, seed=seed)
        sft_hist = pd.DataFrame({"step": [], "sft_loss": []})
        if sft_cfg is not None:  # None: the model is already fine-tuned (e.g. an Instruct model)
            sft_hist = sft(loaded.model, loaded.tokenizer, sft_examples(train), sft_cfg)
        result = preference_optimization(
            loaded.model, loaded.tokenizer, train, held, po_cfg, probe_pairs=held[:n_probe]
        )
        return {"sft": sft_hist, **result.frames()}

    frames = cached_run(cache_dir() / "runs" if cache else None, params, run)
    return ExperimentResult(frames["sft"], RunResult(frames["steps"], frames["pairs"]), params)


def condition_study(
    model: str,
    sft_cfg: TrainConfig,
    po_cfg: TrainConfig,
    losses: list[str],
    n_pairs: int = 16,
    step_size: float = 1e-3,
    dataset: str = "synthetic",
    config: str = "long",
    suffix: str | None = None,
    n_train: int = 64,
    device: str = "auto",
    seed: int = 0,
    cache: bool = True,
) -> pd.DataFrame:
    """Predicted against realized one-step changes, at every logged checkpoint of a DPO run.

    After SFT (whose model is the reference), DPO trains with ``po_cfg``; at each logged step,
    for ``n_pairs`` held-out pairs and each loss in ``losses``: the statistics (fast method),
    the first-order predictions and case, and the realized changes after one plain SGD step on
    each pair alone (:func:`ge_utils.gradients.one_step_change`). The step size is set so that
    the median predicted ``|Delta u_w|`` is ``step_size`` nats. One row per (step, loss, pair).
    """
    for name in losses:
        get_loss(name)
    params = {
        "kind": "condition_study",
        "model": model,
        "losses": losses,
        "n_pairs": n_pairs,
        "step_size": step_size,
        "dataset": dataset,
        "config": config,
        "suffix": suffix,
        "n_train": n_train,
        "seed": seed,
        "sft": config_dict(sft_cfg),
        "po": config_dict(po_cfg),
    }

    def run() -> dict[str, pd.DataFrame]:
        torch.manual_seed(seed)
        train, held = experiment_data(dataset, config, suffix, n_train, n_pairs, seed)
        loaded = load_model(model, device=device, seed=seed)
        net, tok = loaded.model, loaded.tokenizer
        sft(net, tok, sft_examples(train), sft_cfg)
        dev = next(net.parameters()).device
        prompts = [p.prompt for p in held]
        c = tokenize(tok, prompts, [p.chosen for p in held], po_cfg.template).to(dev)
        r = tokenize(tok, prompts, [p.rejected for p in held], po_cfg.template).to(dev)
        with torch.no_grad():
            ref = (sequence_logprobs(net.eval(), c), sequence_logprobs(net, r))
        frames: list[pd.DataFrame] = []

        def measure(step: int, m: torch.nn.Module) -> None:
            stats = fast_gradient_stats(m, c, r)
            for name in losses:
                loss = get_loss(name)
                d_w, d_l = loss.coefficients(
                    pair_logps(stats["logp_chosen"], stats["logp_rejected"], c, r, ref)
                )
                unit = condition_table(stats, d_w, d_l).pred_delta_chosen.abs().median()
                eta = step_size / unit if unit > 0 else step_size
                table = condition_table(stats, d_w, d_l, eta)
                realized = one_step_change(m, c, r, loss, eta, ref)
                table = table.join(realized.drop(columns="pair"))
                table.insert(0, "pair", range(len(table)))
                table.insert(0, "eta", eta)
                table.insert(0, "loss", name)
                table.insert(0, "step", step)
                frames.append(table)

        result = preference_optimization(net, tok, train, held, po_cfg, on_log=measure)
        return {"condition": pd.concat(frames, ignore_index=True), **result.frames()}

    return cached_run(cache_dir() / "runs" if cache else None, params, run)["condition"]
