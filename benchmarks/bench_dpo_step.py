"""One DPO step of ge_utils' training loop against TRL's DPOTrainer, side by side.

    python -m benchmarks.bench_dpo_step            # SmolLM2-135M, 8 pairs a step (minutes)
    python -m benchmarks.bench_dpo_step --quick    # tiny model

Same model (float32, CPU), same pairs, same batch (8 pairs = 16 sequences), same optimizer
(AdamW, lr 5e-6, beta 0.1). TRL runs at its best CPU settings (no bf16, no gradient
checkpointing), once computing reference log-probs every step (its default) and once with
``precompute_ref_log_probs`` (as ge_utils always does). The median step time after the first
step is reported. A loaded machine's speed drifts over minutes, so the four configurations run
in turn for ``--rounds`` rounds (the order reversed every other round) and each ratio is the
median, with the range, of the per-round ratios (after a short untimed run of each).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from benchmarks.common import at_least, benchmark_pairs, load, trl_step_times
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
    parser.add_argument("--pairs", type=at_least(1), default=8)
    parser.add_argument("--steps", type=at_least(2), default=4)
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    model = "tiny-llama" if args.quick else args.model
    torch.manual_seed(0)
    pairs = benchmark_pairs(args.pairs)
    configs: dict[str, Callable[[int], float]] = {
        "ge_utils": lambda n: ours(model, pairs, n, record_stats=False),
        "ge_utils + every pair's gradient stats": lambda n: ours(model, pairs, n, True),
        "TRL DPOTrainer (ref each step)": lambda n: trl(model, pairs, n, precompute=False),
        "TRL DPOTrainer (precomputed ref)": lambda n: trl(model, pairs, n, precompute=True),
    }
    for run in configs.values():  # a short untimed run of each: first-call costs paid
        run(2)
    secs: dict[str, list[float]] = {name: [] for name in configs}
    for k in range(args.rounds):
        for name in list(configs)[:: 1 if k % 2 == 0 else -1]:
            secs[name].append(configs[name](args.steps))
    print(
        f"model {model}, {args.pairs} pairs a step, median of steps 2..{args.steps}, "
        f"{args.rounds} rounds"
    )
    for name, times in secs.items():
        ratios = [t / b for t, b in zip(times, secs["ge_utils"], strict=True)]
        print(
            f"{name:>40}: {statistics.median(times):7.2f} s/step  "
            f"{statistics.median(ratios):.2f}x ge_utils [{min(ratios):.2f}, {max(ratios):.2f}]"
        )


if __name__ == "__main__":
    main()
