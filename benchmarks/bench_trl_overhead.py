"""Cost of the TRL integration: DPOTrainer steps with and without it, side by side.

    python -m benchmarks.bench_trl_overhead            # tiny model, then SmolLM2-135M (minutes)
    python -m benchmarks.bench_trl_overhead --quick    # tiny model only (seconds)

Same model (float32, CPU), same pairs, TRL at its best CPU settings (no bf16, no gradient
checkpointing, reference log-probs each step, its default), AdamW lr 5e-6, beta 0.1, a probe
set of ``--probe`` pairs. Side by side in one run: the integration measures every second step
(``every=2``), so measured and plain steps alternate under the same machine load (a shared
machine's load changes over minutes and swamps separate runs). Reported: the median seconds of
plain and of measured steps (step 1 warms up and is left out), their ratio, which is the cost of
logging every step, and the cost of measuring every N steps, ``1 + (ratio - 1) / N``. A
separate run without the integration is timed too, as a check that the plain steps of the
side-by-side run cost what TRL alone costs.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch

from benchmarks.common import benchmark_pairs, trl_step_times


def run(model_name: str, pairs, probe, steps: int, every: int | None) -> list[float]:
    """Seconds of each optimizer step (step 1 first); ``every=None``: without the integration."""
    from ge_utils.trl_integration import attach_entanglement_metrics

    def attach(trainer) -> None:
        if every is not None:
            attach_entanglement_metrics(trainer, probe=probe, every=every)

    return trl_step_times(model_name, pairs, steps, logging_steps=every, setup=attach)


def bench(model_name: str, n_pairs: int, n_probe: int, steps: int, every: int) -> None:
    pairs = benchmark_pairs(n_pairs)
    probe = benchmark_pairs(n_pairs + n_probe)[n_pairs:]
    torch.manual_seed(0)
    alone = statistics.median(run(model_name, pairs, probe, steps, None)[1:])
    times = run(model_name, pairs, probe, steps, 2)
    plain = statistics.median(times[2::2])  # steps 3, 5, ...
    measured = statistics.median(times[1::2])  # steps 2, 4, ...
    ratio = measured / plain
    print(f"model {model_name}, {n_pairs} pairs a step, probe {n_probe} pairs, {steps} steps")
    print(f"{'TRL DPOTrainer alone':>38}: {alone:8.3f} s/step (median)")
    print(f"{'side by side: plain steps':>38}: {plain:8.3f} s/step (median)")
    print(f"{'side by side: measured steps':>38}: {measured:8.3f} s/step (median)")
    print(f"{'ratio, measuring every step':>38}: {ratio:8.2f}x")
    print(f"{f'ratio, measuring every {every} steps':>38}: {1 + (ratio - 1) / every:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--probe", type=int, default=4)
    parser.add_argument("--steps", type=int, default=7, help="steps per run of --model")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    bench("tiny-llama", args.pairs, args.probe, steps=41, every=args.every)
    if not args.quick:
        bench(args.model, args.pairs, args.probe, steps=args.steps, every=args.every)


if __name__ == "__main__":
    main()
