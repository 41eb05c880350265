"""Cost of the mitigations against a DPO training micro-step, side by side.

    python -m benchmarks.bench_mitigations            # SmolLM2-135M, 8 pairs (minutes)
    python -m benchmarks.bench_mitigations --quick    # tiny model

Same model (float32, CPU), same long-suffix pairs, forward and backward of one micro-step
(no optimizer update). The objectives take turns each round, so a slower or busier machine slows
every one of them alike; the median over the rounds and its ratio to DPO are reported.
"""

from __future__ import annotations

import argparse

from ge_utils.experiments import step_costs

OBJECTIVES = ["dpo", "normalized_dpo", "masked_dpo", "oracle_masked_dpo", "cpo", "dpop", "sppo"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few rounds")
    parser.add_argument("--model", default=None, help="model name (default: SmolLM2-135M)")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per micro-step")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds")
    args = parser.parse_args()
    model = args.model or ("tiny-llama" if args.quick else "smollm2-135m-instruct")
    rounds = args.rounds or (3 if args.quick else 7)
    costs = step_costs(model, {name: {} for name in OBJECTIVES}, args.pairs, rounds)
    print(f"{model}, {args.pairs} pairs, median of {rounds} rounds")
    print(f"{'objective':<20} {'s/micro-step':>13} {'ratio':>7}")
    for name, row in costs.iterrows():
        print(f"{name:<20} {row['seconds']:>13.3f} {row['ratio']:>6.2f}x")


if __name__ == "__main__":
    main()
