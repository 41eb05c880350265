"""Cost of the TRL integration: DPOTrainer steps with and without it, side by side.

    python -m benchmarks.bench_trl_overhead            # tiny model, then SmolLM2-135M (minutes)
    python -m benchmarks.bench_trl_overhead --quick    # tiny model only (seconds)

Same model (float32, CPU), same pairs, TRL at its best CPU settings (no bf16, no gradient
checkpointing, reference log-probs each step, its default), AdamW lr 5e-6, beta 0.1. Three
runs per model: without the integration, with it measuring every step (``every=1``: the
worst case, logging every step) and measuring every N steps, each with a probe set of
``--probe`` pairs. Reported: mean seconds per optimizer step over steps 2.. (step 1 warms up),
and the ratio to the run without it. Where a run is too short to contain a measured step
after the first (SmolLM2 by default), the every-N time is derived from the measured per-step
cost instead, ``off + (every_step - off) / N``, and marked so.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

from benchmarks.common import benchmark_pairs, load


def run(model_name: str, pairs, probe, steps: int, every: int | None) -> float:
    """Mean seconds per step over steps 2..steps; ``every=None``: without the integration."""
    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ge_utils.trl_integration import attach_entanglement_metrics

    transformers.logging.set_verbosity_error()
    model, tok = load(model_name)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.t)

    data = Dataset.from_list(
        [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs] * steps
    )
    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=len(pairs),
            max_steps=steps,
            learning_rate=5e-6,
            beta=0.1,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=every or 10**6,
            lr_scheduler_type="constant",
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = DPOTrainer(
            model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[Clock()]
        )
        if every is not None:
            attach_entanglement_metrics(trainer, probe=probe, every=every)
        trainer.train()
    return statistics.mean(times[1:])


def bench(model_name: str, n_pairs: int, n_probe: int, steps: int, every: int) -> None:
    pairs = benchmark_pairs(n_pairs)
    probe = benchmark_pairs(n_pairs + n_probe)[n_pairs:]
    torch.manual_seed(0)
    off = run(model_name, pairs, probe, steps, None)
    each = run(model_name, pairs, probe, steps, 1)
    if steps > every:
        every_n, how = run(model_name, pairs, probe, steps, every), "measured"
    else:
        every_n, how = off + (each - off) / every, "derived"
    print(f"model {model_name}, {n_pairs} pairs a step, probe {n_probe} pairs")
    print(f"mean seconds per step over steps 2..{steps}")
    print(f"{'TRL DPOTrainer':>36}: {off:8.3f} s/step")
    print(f"{'+ integration, every step':>36}: {each:8.3f} s/step  ({each / off:.2f}x)")
    label = f"+ integration, every {every} steps"
    print(f"{label:>36}: {every_n:8.3f} s/step  ({every_n / off:.2f}x, {how})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--probe", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="steps per run of --model")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    bench("tiny-llama", args.pairs, args.probe, steps=4 * args.every + 1, every=args.every)
    if not args.quick:
        bench(args.model, args.pairs, args.probe, steps=args.steps, every=args.every)


if __name__ == "__main__":
    main()
