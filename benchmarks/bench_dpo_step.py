"""One DPO step of ge_utils' training loop against TRL's DPOTrainer, side by side.

    python -m benchmarks.bench_dpo_step            # SmolLM2-135M, 8 pairs a step (minutes)
    python -m benchmarks.bench_dpo_step --quick    # tiny model

Same model (float32, CPU), same pairs, same batch (8 pairs = 16 sequences), same optimizer
(AdamW, lr 5e-6, beta 0.1). TRL runs at its best CPU settings (no bf16, no gradient
checkpointing), once computing reference log-probs every step (its default) and once with
``precompute_ref_log_probs`` (as ge_utils always does). The median step time after the first
step is reported.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import benchmark_pairs, load, trl_step_times
from ge_utils.training import TrainConfig, preference_optimization


def ours(model_name: str, pairs, steps: int, record_stats: bool) -> float:
    model, tok = load(model_name)
    cfg = TrainConfig(
        steps=steps,
        batch_size=len(pairs),
        lr=5e-6,
        eval_every=10**6,
        stats_method="none",
        train_stats=record_stats,
        progress=False,
    )
    res = preference_optimization(model, tok, pairs, pairs[:1], cfg)
    return statistics.median(res.steps["seconds"].iloc[1:])


def trl(model_name: str, pairs, steps: int, precompute: bool) -> float:
    return statistics.median(trl_step_times(model_name, pairs, steps, precompute)[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    model = "tiny-llama" if args.quick else args.model
    torch.manual_seed(0)
    pairs = benchmark_pairs(args.pairs)
    rows = {
        "ge_utils": ours(model, pairs, args.steps, record_stats=False),
        "ge_utils + every pair's gradient stats": ours(model, pairs, args.steps, True),
        "TRL DPOTrainer (ref each step)": trl(model, pairs, args.steps, precompute=False),
        "TRL DPOTrainer (precomputed ref)": trl(model, pairs, args.steps, precompute=True),
    }
    base = rows["ge_utils"]
    print(f"model {model}, {args.pairs} pairs a step, median of steps 2..{args.steps}")
    for name, sec in rows.items():
        print(f"{name:>40}: {sec:7.2f} s/step  ({sec / base:.2f}x ge_utils)")


if __name__ == "__main__":
    main()
