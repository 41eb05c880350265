"""Shared pieces of the benchmarks: the model, a realistic batch of pairs, timing, peak memory."""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ge_utils.data import sentiment_pairs, suffix_of_length
from ge_utils.models import load_model

HERE = Path(__file__).resolve().parent


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``low``, else a clear error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def benchmark_pairs(n_pairs: int = 8, seed: int = 0):
    """``n_pairs`` sentiment pairs, responses of 2 to 12 tokens (suffixes of growing length)."""
    pairs = []
    for i in range(n_pairs):
        k = i % 9  # 0..8 suffix words: 2..12 tokens with SmolLM2
        train, _ = sentiment_pairs(n_pairs, 0, suffix=suffix_of_length(k), seed=seed)
        pairs.append(train[i])
    return pairs


CONTEXT = (
    "Here is a customer review from an online shop, copied as it was written, with the "
    "shop's notes on delivery, returns and the product's details left out. "
)


def with_context(pairs, tokenizer, prompt_tokens: int):
    """``pairs`` whose prompts are preceded by :data:`CONTEXT`, repeated until each prompt has
    at least ``prompt_tokens`` tokens (0: the pairs as they are): longer sequences, the same
    responses."""
    out = []
    for p in pairs:
        prompt = p.prompt
        while prompt_tokens and len(tokenizer(prompt)["input_ids"]) < prompt_tokens:
            prompt = CONTEXT + prompt
        out.append(dataclasses.replace(p, prompt=prompt))
    return out


def load(name: str):
    loaded = load_model(name, device="cpu")
    return loaded.model, loaded.tokenizer


def timed(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """The process's resident memory now (Linux; elsewhere its peak so far)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def in_turn(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each of ``fns`` in each of ``rounds`` rounds, called in turn (the order
    reversed every other round) so that all see the machine's same load, after one untimed
    round that warms them up."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for k in range(rounds + 1):
        for name in names if k % 2 == 0 else names[::-1]:
            seconds = timed(fns[name], repeat=1, warmup=0)
            if k > 0:
                times[name].append(seconds)
    return times


def page_in(model) -> None:
    """Read every parameter once: weights loaded from a memory-mapped checkpoint enter the
    process's resident memory only when first read (about 500 MB for SmolLM2-135M in float32),
    which would otherwise be counted as the memory of whatever runs first."""
    for p in model.parameters():
        p.detach().sum()


NO_KERNEL_OPS = frozenset(
    "aten::" + op
    for op in (
        "as_strided view reshape _reshape_alias _unsafe_view transpose t permute slice select "
        "narrow expand squeeze unsqueeze detach alias resolve_conj resolve_neg empty "
        "empty_strided empty_like resize_ promote_types result_type is_same_size to"
    ).split()
)


def kernel_count(fn: Callable[[], object], device: str) -> int:
    """How many kernels one call of ``fn`` launches: on CUDA, the kernels the profiler saw;
    on the CPU, the ATen operations that compute (not views, allocations or a cast to the
    same type) and call no other such operation (what would be one kernel each on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
    events = prof.events()
    if cuda:
        return sum(1 for e in events if e.device_type.name == "CUDA")

    def computes(e) -> bool:
        return e.name.startswith("aten::") and e.name not in NO_KERNEL_OPS

    return sum(1 for e in events if computes(e) and not any(map(computes, e.cpu_children)))


def run_isolated(module: str, *args: str) -> dict:
    """Run ``python -m module`` in a fresh interpreter (so peak memory is its own); it prints
    JSON on its last line."""
    out = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=HERE.parent
    )
    if out.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def trl_step_times(
    model_name: str,
    pairs,
    steps: int,
    precompute: bool = False,
    logging_steps: int | None = None,
    setup: Callable[[object], object] | None = None,
) -> list[float]:
    """Seconds of each optimizer step of TRL's DPOTrainer at its best CPU settings (fp32, no
    gradient checkpointing, AdamW lr 5e-6, beta 0.1, constant schedule), the batch being
    ``pairs``. ``setup(trainer)`` runs before training (e.g. to attach a callback)."""
    import tempfile

    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

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
            logging_steps=logging_steps or 10**6,
            lr_scheduler_type="constant",
            precompute_ref_log_probs=precompute,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = DPOTrainer(
            model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[Clock()]
        )
        if setup is not None:
            setup(trainer)
        trainer.train()
    return times
