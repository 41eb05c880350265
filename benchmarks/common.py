"""Shared pieces of the benchmarks: the model, a realistic batch of pairs, timing, peak memory."""

from __future__ import annotations

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


def benchmark_pairs(n_pairs: int = 8, seed: int = 0):
    """``n_pairs`` sentiment pairs, responses of 2 to 12 tokens (suffixes of growing length)."""
    pairs = []
    for i in range(n_pairs):
        k = i % 9  # 0..8 suffix words: 2..12 tokens with SmolLM2
        train, _ = sentiment_pairs(n_pairs, 0, suffix=suffix_of_length(k), seed=seed)
        pairs.append(train[i])
    return pairs


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


def run_isolated(module: str, *args: str) -> dict:
    """Run ``python -m module`` in a fresh interpreter (so peak memory is its own); it prints
    JSON on its last line."""
    out = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=HERE.parent
    )
    if out.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
