"""Fast (ghost) gradient statistics against the floor and brute force, side by side.

    python -m benchmarks.bench_fast_gradients            # SmolLM2-135M, 8 pairs, CPU (minutes)
    python -m benchmarks.bench_fast_gradients --quick    # tiny model, seconds
    python -m benchmarks.bench_fast_gradients --pairs 2 --prompt-tokens 256
        # longer sequences (287 positions): where the Gram products' T^2 shows
    python -m benchmarks.bench_fast_gradients --device cuda --random-init DIR
        # DIR holds a model's config and tokenizer only: random weights of that architecture
        # (same cost as the trained ones) where the weights cannot be copied

Each measurement runs in its own interpreter so its peak memory is its own: max RSS above the RSS
of the loaded model (every weight read once first: a memory-mapped checkpoint is otherwise paged
in by the first method's forward and counted as its memory) and batch on the CPU, peak allocated
CUDA memory above the same on a GPU.
Ratios are to the floor (one plain forward+backward of the same 2B sequences) and to brute force
(the authors' method: one backward per sequence, flattened gradient vectors). Each time ratio is
given twice: from those separate runs, and measured again in one interpreter with the two
methods called in turn (``--repeat`` rounds after a warm-up round), which both see the same load:
the median and range of the per-round ratios (a loaded machine's drift over minutes moves the
first figure, hardly the second). The brute-force run also reports the largest relative
difference between the two methods' statistics.

``kernels``: what one call launches (``benchmarks.common.kernel_count``: CUDA kernels on a GPU;
on the CPU the operations that would each be one), the figure that bounds a small model's
statistics on a GPU. ``fast`` reduces layer by layer (``group=1``, the recorder's CPU default)
and ``fast_grouped`` reduces ``ge_utils.stats.recorder.DEVICE_GROUP`` layers together (its GPU
default), each forced on any device, so that the two differ on a GPU too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import torch

from benchmarks.common import (
    at_least,
    benchmark_pairs,
    in_turn,
    kernel_count,
    load,
    page_in,
    peak_rss_mb,
    rss_mb,
    run_isolated,
    timed,
    with_context,
)
from ge_utils.logprobs import concat_batches, sequence_logprobs, token_logprobs, tokenize
from ge_utils.losses import get_loss
from ge_utils.stats import exact_gradient_stats, fast_gradient_stats, tokenwise_inner
from ge_utils.stats.recorder import DEVICE_GROUP
from ge_utils.training import preference_microstep

METHODS = [
    "floor",
    "fast",
    "fast_grouped",
    "brute",
    "train",
    "train_stats",
    "tok_head_fast",
    "tok_head_brute",
    "tok_all_fast",
    "tok_all_brute",
]


def flat_grad(value: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).flatten()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def load_model_for_bench(name: str, random_init: str | None, device: str):
    """The named model (``benchmarks.common.load``), or random weights from a config folder."""
    if random_init is None:
        model, tok = load(name)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(random_init))
        tok = AutoTokenizer.from_pretrained(random_init)
    return model.to(device=device, dtype=torch.float32).eval(), tok


class Memory:
    """Peak memory (MB) of what runs after construction, above what is held at construction:
    CUDA allocations, or the process's peak RSS above its RSS then (the model paged in first,
    :func:`benchmarks.common.page_in`)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.base = rss_mb()

    def extra_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return peak_rss_mb() - self.base


class Setup:
    """The model, the batch and every method of :data:`METHODS` as a call, on ``args``'s
    model and device (seeded, every weight read first)."""

    def __init__(self, args: argparse.Namespace):
        torch.manual_seed(0)
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = args.device
        model, tok = load_model_for_bench(args.model, args.random_init, args.device)
        pairs = with_context(benchmark_pairs(args.pairs), tok, args.prompt_tokens)
        prompts = [p.prompt for p in pairs]
        c = tokenize(tok, prompts, [p.chosen for p in pairs]).to(args.device)
        r = tokenize(tok, prompts, [p.rejected for p in pairs]).to(args.device)
        pick = int(c.response_lengths.argmax()) if args.tok_pair < 0 else args.tok_pair
        c1, r1 = c.select([pick]), r.select([pick])
        params = [p for p in model.parameters() if p.requires_grad]
        head = [model.get_output_embeddings().weight]
        dpo = get_loss("dpo")
        page_in(model)
        self.model, self.c, self.r, self.c1, self.r1 = model, c, r, c1, r1

        def floor():
            model.zero_grad(set_to_none=True)
            sequence_logprobs(model, concat_batches(c, r)).sum().backward()

        def train(stats: bool):
            model.zero_grad(set_to_none=True)
            ref = (torch.zeros(len(c), device=args.device), torch.zeros(len(r), device=args.device))
            preference_microstep(model, dpo, c, r, ref, len(c), record_stats=stats)

        def tok_brute(plist):
            """One backward per response token; the per-token gradients stored as matrix rows."""
            rows = {}
            for name, batch in (("w", c1), ("l", r1)):
                lp = token_logprobs(model, batch)[0][batch.response_mask[0]]
                rows[name] = torch.empty(len(lp), sum(p.numel() for p in plist), device=args.device)
                for t in range(len(lp)):
                    rows[name][t] = flat_grad(lp[t], plist)
            return rows["w"] @ rows["l"].T

        self.fns: dict[str, Callable[[], object]] = {
            "floor": floor,
            "fast": lambda: fast_gradient_stats(model, c, r, group=1),
            "fast_grouped": lambda: fast_gradient_stats(model, c, r, group=DEVICE_GROUP),
            "brute": lambda: exact_gradient_stats(model, c, r),
            "train": lambda: train(False),
            "train_stats": lambda: train(True),
            "tok_head_fast": lambda: tokenwise_inner(model, c1, r1, scope="head"),
            "tok_head_brute": lambda: tok_brute(head),
            "tok_all_fast": lambda: tokenwise_inner(model, c1, r1, scope="all"),
            "tok_all_brute": lambda: tok_brute(params),
        }

    def synced(self, method: str) -> Callable[[], None]:
        """``method`` as a call that returns once the device has finished it."""

        def call() -> None:
            self.fns[method]()
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()

        return call


def measure(method: str, args: argparse.Namespace) -> dict:
    setup = Setup(args)
    c, r, c1, r1 = setup.c, setup.r, setup.c1, setup.r1
    memory = Memory(args.device)
    out = {
        "method": method,
        "seconds": timed(setup.synced(method), repeat=args.repeat, warmup=1),
        "extra_mb": memory.extra_mb(),
        "kernels": kernel_count(setup.synced(method), args.device),
        "tokens": [int(c.input_ids.shape[1]), int(r.input_ids.shape[1])],
        "response_tokens": [int(c1.response_lengths[0]), int(r1.response_lengths[0])],
        "device": torch.cuda.get_device_name()
        if memory.cuda
        else f"cpu x{torch.get_num_threads()}",
    }
    if method == "brute":  # agreement of the two methods, outside the timed region
        model = setup.model
        exact, fast = exact_gradient_stats(model, c, r), fast_gradient_stats(model, c, r)
        out["max_rel_diff"] = max(
            float(((fast[k] - exact[k]).abs() / exact[k].abs().max()).max())
            for k in ("norm2_chosen", "norm2_rejected", "inner")
        )
    return out


def alternate(pair: str, args: argparse.Namespace) -> dict:
    """Time ratio ``num / den`` (``pair`` = "num,den") measured in one interpreter, the two
    methods called in turn (``--repeat`` rounds, order num-den then den-num, after one untimed
    call of each), so that both see the same load: the median and range of the per-round
    ratios."""
    setup = Setup(args)
    num, den = (setup.synced(m) for m in pair.split(","))
    times = in_turn({"den": den, "num": num}, args.repeat)
    ratios = [n / d for n, d in zip(times["num"], times["den"], strict=True)]
    return {"pair": pair, "ratios": ratios, "median": statistics.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--random-init", metavar="DIR", help="config+tokenizer folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--pairs", type=at_least(1), default=8)
    parser.add_argument("--repeat", type=at_least(1), default=3)
    parser.add_argument(
        "--prompt-tokens",
        type=at_least(0),
        default=0,
        help="lengthen every prompt to at least this many tokens (0: as they are, ~20)",
    )
    parser.add_argument(
        "--tok-pair", type=int, default=-1, help="pair for the token-wise runs (-1: longest)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, for a smoke check")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--alternate", metavar="NUM,DEN", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.model, args.random_init = "tiny-llama", None
    if args.measure:
        print(json.dumps(measure(args.measure, args)))
        return
    if args.alternate:
        print(json.dumps(alternate(args.alternate, args)))
        return
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    forwarded = [
        *("--model", args.model, "--device", args.device, "--threads", str(args.threads)),
        *(
            "--pairs",
            str(args.pairs),
            "--repeat",
            str(args.repeat),
            "--tok-pair",
            str(args.tok_pair),
            "--prompt-tokens",
            str(args.prompt_tokens),
        ),
        *(("--random-init", args.random_init) if args.random_init else ()),
    ]
    res = {}
    for m in methods:
        res[m] = run_isolated("benchmarks.bench_fast_gradients", "--measure", m, *forwarded)
        print(
            f"{m:>15}: {res[m]['seconds']:8.3f} s  +{res[m]['extra_mb']:8.1f} MB", file=sys.stderr
        )
    first = res[methods[0]]
    weights = "random weights" if args.random_init else "trained weights"
    print(
        f"\nmodel {args.random_init or args.model} ({weights}) on {first['device']}, "
        f"{args.pairs} pairs, padded lengths {first['tokens']}, token-wise pair "
        f"{first['response_tokens']} response tokens"
    )
    print(f"{'method':>15} {'seconds':>9} {'extra MB':>9} {'kernels':>8}")
    for m in methods:
        print(f"{m:>15} {res[m]['seconds']:9.3f} {res[m]['extra_mb']:9.1f} {res[m]['kernels']:8d}")
    t = {k: v["seconds"] for k, v in res.items()}
    mb = {k: max(v["extra_mb"], 1.0) for k, v in res.items()}
    ratios = [
        ("fast stats, layer by layer / floor (fwd+bwd)", "fast", "floor"),
        (f"fast, {DEVICE_GROUP} layers together / floor", "fast_grouped", "floor"),
        (f"fast, {DEVICE_GROUP} layers together / layer by layer", "fast_grouped", "fast"),
        ("brute force / fast stats", "brute", "fast"),
        ("training step with stats / without", "train_stats", "train"),
        ("token-wise head: per-token backward / fast", "tok_head_brute", "tok_head_fast"),
        ("token-wise all: per-token gradients / fast", "tok_all_brute", "tok_all_fast"),
    ]
    print(
        f"\n{'ratio':<44} {'time':>7} {'alternating':>22} {'memory':>7}\n"
        f"{'':<44} {'':>7} {'median [min, max]':>22}"
    )
    for label, num, den in ratios:
        if num in t and den in t:
            alt = run_isolated(
                "benchmarks.bench_fast_gradients", "--alternate", f"{num},{den}", *forwarded
            )
            spread = f"{alt['median']:.2f}x [{min(alt['ratios']):.2f}, {max(alt['ratios']):.2f}]"
            print(f"{label:<44} {t[num] / t[den]:6.2f}x {spread:>22} {mb[num] / mb[den]:6.2f}x")
    if "brute" in res:
        print(f"max relative difference fast vs brute force: {res['brute']['max_rel_diff']:.1e}")


if __name__ == "__main__":
    main()
