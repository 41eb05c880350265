"""Cost of the displacement scores, side by side: seconds per 100 pairs.

    python -m benchmarks.bench_predict            # SmolLM2-135M, 8 pairs, CPU (a minute or two)
    python -m benchmarks.bench_predict --quick    # tiny model, seconds

Three ways to score the same pairs, timed in interleaved rounds within one interpreter (so a
shared machine's changing load falls on all three alike; the median round is reported):

- ``ches``: the CHES family (CHES, LN-CHES, last hidden-state inner product): one forward per
  response, no backward (:func:`ge_utils.predict.ches_scores`);
- ``gradient``: the gradient family from the fast statistics (one forward and one backward over
  the 2B responses, :func:`ge_utils.fast_gradients.fast_gradient_stats`);
- ``brute``: the same statistics by brute force (one backward per response, float64 dot products
  of the per-parameter gradients, :func:`ge_utils.gradients.exact_gradient_stats`);
- ``batch``: the batch-aware condition (:func:`ge_utils.predict.first_step_changes`: one DPO
  step of plain SGD on the pairs as one batch, then one forward-mode pass per side).

Ratios are to ``ches``. Pairs are tokenized once, outside the timed region.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import benchmark_pairs, load
from ge_utils.fast_gradients import fast_gradient_stats
from ge_utils.gradients import exact_gradient_stats
from ge_utils.logprobs import tokenize
from ge_utils.predict import ches_scores, first_step_changes
from ge_utils.training import TrainConfig

METHODS = ("ches", "gradient", "brute", "batch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny model, for a smoke check")
    args = parser.parse_args()
    if args.pairs < 1 or args.rounds < 1:
        parser.error("--pairs and --rounds must be >= 1")
    if args.quick:
        args.model = "tiny-llama"
    torch.manual_seed(0)
    model, tok = load(args.model)
    pairs = benchmark_pairs(args.pairs)
    prompts = [p.prompt for p in pairs]
    c = tokenize(tok, prompts, [p.chosen for p in pairs])
    r = tokenize(tok, prompts, [p.rejected for p in pairs])
    step = TrainConfig(
        steps=1, batch_size=args.pairs, lr=1e-3, optimizer="sgd", loss="dpo", progress=False
    )
    fns: dict[str, Callable[[], object]] = {
        "ches": lambda: ches_scores(model, c, r),
        "gradient": lambda: fast_gradient_stats(model, c, r),
        "brute": lambda: exact_gradient_stats(model, c, r),
        "batch": lambda: first_step_changes(model, tok, pairs, step),
    }
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for m in METHODS:
            start = time.perf_counter()
            fns[m]()
            times[m].append(time.perf_counter() - start)
    per100 = {m: statistics.median(t) / args.pairs * 100 for m, t in times.items()}
    print(
        f"model {args.model} on cpu x{torch.get_num_threads()}, {args.pairs} pairs, padded "
        f"lengths {int(c.input_ids.shape[1])}/{int(r.input_ids.shape[1])}, median of "
        f"{args.rounds} interleaved rounds"
    )
    print(f"{'family':>10} {'s / 100 pairs':>14} {'x ches':>8}")
    for m in METHODS:
        print(f"{m:>10} {per100[m]:14.2f} {per100[m] / per100['ches']:8.1f}")


if __name__ == "__main__":
    main()
