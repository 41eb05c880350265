"""Cost of the TRL integration: DPOTrainer steps with and without it, side by side.

    python -m benchmarks.bench_trl_overhead            # tiny model, then SmolLM2-135M (minutes)
    python -m benchmarks.bench_trl_overhead --quick    # tiny model only (seconds)

Same model (float32, CPU), same pairs, TRL at its best CPU settings (no bf16, no gradient
checkpointing, reference log-probs each step, its default), AdamW lr 5e-6, beta 0.1, a probe
set of ``--probe`` pairs (several sizes: ``--probe 1 2 4``). A shared machine's load changes
over minutes and swamps separate runs, so measured and plain steps alternate within each run,
under the same load:

- **every step**: blocks of ``--block`` measured steps and ``--block`` plain ones (``--rounds``
  + 1 of each; the first two blocks warm up and are left out). Within a block each step after the
  first starts from the probe pass its predecessor ran right after its update, as when every
  step is measured; those steps are compared with the plain ones. Once with the batch
  statistics alone, then with the probe too (once per probe size).
- **every N steps**: measured and plain steps alternate one by one; a measured step then runs
  its own probe passes before and after its update, as with any ``every`` above 1. The cost of
  measuring every N steps is ``1 + (ratio - 1) / N``.

Reported: medians of step seconds (step 1 warms up and is left out) and their ratios. A run of
TRL alone checks that the plain steps cost what TRL alone costs.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable

import torch

from benchmarks.common import at_least, benchmark_pairs, trl_step_times


def run(model_name: str, pairs, probe, steps: int, measures: Callable[[int], bool] | None):
    """Seconds of each optimizer step (step 1 first); ``measures(step)``: whether the
    integration measures that step (None: no integration); ``probe=None``: batch statistics
    only."""
    from ge_utils.trl_integration import attach_entanglement_metrics

    def attach(trainer) -> None:
        if measures is not None:
            callback = attach_entanglement_metrics(trainer, probe=probe, every=1)
            callback.measures = measures

    torch.manual_seed(0)
    return trl_step_times(model_name, pairs, steps, logging_steps=1, setup=attach)


def split(
    times: list[float], measures: Callable[[int], bool], steady: bool, start: int = 2
) -> tuple[float, float]:
    """Median seconds of the plain and of the measured steps ``start``, ``start + 1``, ...
    (with ``steady``, only measured steps whose predecessor was measured too)."""
    plain, measured = [], []
    for step, t in enumerate(times, start=1):
        if step < start:
            continue
        if not measures(step):
            plain.append(t)
        elif not steady or measures(step - 1):
            measured.append(t)
    return statistics.median(plain), statistics.median(measured)


def bench(
    model_name: str, n_pairs: int, n_probes: list[int], block: int, rounds: int, every: int
) -> None:
    pairs = benchmark_pairs(n_pairs)
    probes = {n: benchmark_pairs(n_pairs + n)[n_pairs:] for n in sorted(n_probes)}
    probe = probes[max(probes)]
    sizes = ", ".join(map(str, probes))
    print(f"model {model_name}, {n_pairs} pairs a step, probe of {sizes} pairs")

    def in_block(step: int) -> bool:
        return (step - 2) // block % 2 == 0

    steps, start = 2 + 2 * block * (rounds + 1), 2 + 2 * block
    print(
        f"  every step: blocks of {block} measured and {block} plain steps, {steps} steps, "
        f"from step {start} (the first blocks warm up)"
    )
    runs = [("stats", None)] + [(f"stats + probe {n}", p) for n, p in probes.items()]
    for label, with_probe in runs:
        times = run(model_name, pairs, with_probe, steps, in_block)
        plain, measured = split(times, in_block, steady=True, start=start)
        print(
            f"{label:>18}: plain {plain:7.3f} s, measured {measured:7.3f} s (median)  "
            f"ratio {measured / plain:5.2f}x"
        )
    times = run(model_name, pairs, probe, 13, lambda step: step % 2 == 0)
    plain, measured = split(times, lambda step: step % 2 == 0, steady=False)
    ratio = measured / plain
    print(
        f"  every other step (each measured step with its own probe passes), 13 steps, "
        f"probe {max(probes)}"
    )
    print(
        f"{'stats + probe':>18}: plain {plain:7.3f} s, measured {measured:7.3f} s (median)  "
        f"ratio {ratio:5.2f}x; measuring every {every} steps: {1 + (ratio - 1) / every:5.2f}x"
    )
    alone = statistics.median(run(model_name, pairs, None, 7, None)[1:])
    print(f"{'TRL alone':>18}: {alone:7.3f} s/step (median of steps 2..7, a separate run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=at_least(1), default=8)
    parser.add_argument(
        "--probe",
        type=at_least(1),
        nargs="+",
        default=[4],
        help="probe pairs (several: one run each)",
    )
    parser.add_argument(
        "--block", type=at_least(2), default=4, help="measured (and plain) steps a block"
    )
    parser.add_argument(
        "--rounds", type=at_least(1), default=2, help="measured blocks after the first"
    )
    parser.add_argument("--every", type=at_least(1), default=10)
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    bench("tiny-llama", args.pairs, args.probe, 10, args.rounds, args.every)
    if not args.quick:
        bench(args.model, args.pairs, args.probe, args.block, args.rounds, args.every)


if __name__ == "__main__":
    main()
