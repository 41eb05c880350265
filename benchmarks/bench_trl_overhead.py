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
  statistics alone, then with the probe too (once per probe size), then with a probe of the
  step's own first ``--batch-probe`` pairs (``probe=k``: factors kept from TRL's backward, one
  forward after the update).
- **every N steps**: measured and plain steps alternate one by one; a measured step then runs
  its own probe passes before and after its update, as with any ``every`` above 1. The cost of
  measuring every N steps is ``1 + (ratio - 1) / N``.

Reported: medians of step seconds (step 1 warms up and is left out) and their ratios. A run of
TRL alone checks that the plain steps cost what TRL alone costs.

First, for each probe size, what a probe costs and why (``--pieces`` prints only this): each
piece of the probe timed alone against a plain forward of the same sequences, in turn
(``--rounds`` + 1 rounds, the first warms up): the forward and backward that record the factors
(``_logps_and_factors``), their contraction with an update (``GhostRecorder.directional``), the
copy of the trainable parameters into kept memory; with the forward's floating-point operations
(``torch.utils.flop_counter``) per second against this machine's rate on a large matrix product
and the rate at which it streams memory: whether the probe is bound by arithmetic or by reading
the weights. The probe is tokenized here as in ``ge_utils`` (TRL's tokenization of the same
pairs may differ by a token).
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable

import torch

from benchmarks.common import at_least, benchmark_pairs, in_turn, load, page_in, trl_step_times


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


def machine_rates() -> tuple[float, float]:
    """This CPU's float32 rate on a 2048 x 2048 matrix product (FLOP/s) and the rate at which
    it reads 256 MiB (bytes/s), medians of 5."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    big = torch.ones(2**26)
    times = in_turn({"mm": lambda: a @ b, "read": big.sum}, 5)
    return 2 * 2048**3 / statistics.median(times["mm"]), 2**28 / statistics.median(times["read"])


def probe_pieces(model_name: str, n_probe: int, rounds: int) -> None:
    """Print each piece of a probe of ``n_probe`` pairs against a forward of its sequences."""
    from torch.utils.flop_counter import FlopCounterMode

    from ge_utils.logprobs import concat_batches, eval_mode, sequence_logprobs, tokenize
    from ge_utils.trl_integration import _logps_and_factors, _Update

    model, tok = load(model_name)
    page_in(model)
    pairs = benchmark_pairs(100 + n_probe)[100:]
    prompts = [p.prompt for p in pairs]
    joint = concat_batches(
        tokenize(tok, prompts, [p.chosen for p in pairs]),
        tokenize(tok, prompts, [p.rejected for p in pairs]),
    )
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    kept = {n: p.clone() for n, p in params.items()}
    _, recorder = _logps_and_factors(model, joint)

    def forward() -> None:
        with eval_mode(model), torch.no_grad():
            sequence_logprobs(model, joint)

    def copy() -> None:
        for n, p in params.items():
            kept[n].copy_(p)

    pieces = {
        "a forward (the unit)": forward,
        "forward + backward with factors": lambda: _logps_and_factors(model, joint),
        "contraction with an update": lambda: recorder.directional(_Update(params, kept)),
        "copy of the parameters": copy,
    }
    times = in_turn(pieces, rounds)
    with FlopCounterMode(display=False) as flops:
        forward()
    unit = statistics.median(times["a forward (the unit)"])
    weights = sum(p.numel() * p.element_size() for p in params.values())
    tokens = int(joint.attention_mask.sum())
    print(
        f"probe of {n_probe} pair{'s' * (n_probe > 1)} ({len(joint)} sequences, {tokens} tokens, "
        f"padded to {joint.input_ids.numel()}), each piece / a forward of them (median of "
        f"{rounds} rounds):"
    )
    for name, seconds in times.items():
        ratios = [t / u for t, u in zip(seconds, times["a forward (the unit)"], strict=True)]
        ms = 1e3 * statistics.median(seconds)
        print(f"{name:>34}: {ms:7.1f} ms  {statistics.median(ratios):5.2f}x")
    mm_rate, read_rate = machine_rates()
    print(
        f"{'the forward':>34}: {flops.get_total_flops() / unit / 1e9:6.0f} GFLOP/s "
        f"(a 2048^2 matrix product: {mm_rate / 1e9:.0f}); reads the weights at "
        f"{weights / unit / 1e9:.1f} GB/s (memory streams at {read_rate / 1e9:.1f})"
    )


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
    model_name: str,
    n_pairs: int,
    n_probes: list[int],
    block: int,
    rounds: int,
    every: int,
    batch_probes: list[int],
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
    runs += [(f"stats + batch {k}", k) for k in sorted(batch_probes)]
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
    parser.add_argument(
        "--batch-probe",
        type=at_least(1),
        nargs="*",
        default=[2],
        help="pairs of each step's own batch to follow (probe=k; several: one run each)",
    )
    parser.add_argument("--every", type=at_least(1), default=10)
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    parser.add_argument("--pieces", action="store_true", help="only the probe's pieces")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for model in ["tiny-llama"] + ([] if args.quick else [args.model]):
        print(f"model {model}")
        for n in sorted(args.probe):
            probe_pieces(model, n, args.rounds)
        if not args.pieces:
            bench(model, args.pairs, args.probe, 10 if model == "tiny-llama" else args.block,
                  args.rounds, args.every, args.batch_probe)  # fmt: skip


if __name__ == "__main__":
    main()
