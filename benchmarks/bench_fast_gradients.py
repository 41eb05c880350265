"""Fast (ghost) gradient statistics against the floor and brute force, side by side.

    python -m benchmarks.bench_fast_gradients            # SmolLM2-135M, 8 pairs (minutes)
    python -m benchmarks.bench_fast_gradients --quick    # tiny model, seconds

Each measurement runs in its own interpreter so its peak memory (max RSS) is its own; memory is
reported above the RSS of the loaded model and batch. Ratios are to the floor (one plain
forward+backward of the same 16 sequences) and to brute force (the authors' method: one backward
per sequence, flattened gradient vectors).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks.common import benchmark_pairs, load, peak_rss_mb, run_isolated, timed
from ge_utils.fast_gradients import fast_gradient_stats, tokenwise_inner
from ge_utils.gradients import exact_gradient_stats
from ge_utils.logprobs import concat_batches, sequence_logprobs, token_logprobs, tokenize
from ge_utils.losses import get_loss
from ge_utils.training import preference_microstep

METHODS = [
    "floor",
    "fast",
    "brute",
    "train",
    "train_stats",
    "tok_head_fast",
    "tok_head_brute",
    "tok_all_fast",
    "tok_all_brute",
]


def flat_grad(value, params):
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).flatten()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def measure(method: str, model_name: str, n_pairs: int, repeat: int) -> dict:
    torch.manual_seed(0)
    model, tok = load(model_name)
    pairs = benchmark_pairs(n_pairs)
    prompts = [p.prompt for p in pairs]
    c = tokenize(tok, prompts, [p.chosen for p in pairs])
    r = tokenize(tok, prompts, [p.rejected for p in pairs])
    longest = int(c.response_lengths.argmax())
    c1, r1 = c.select([longest]), r.select([longest])
    params = [p for p in model.parameters() if p.requires_grad]
    head = [model.get_output_embeddings().weight]
    dpo = get_loss("dpo")
    base_rss = peak_rss_mb()

    def floor():
        model.zero_grad(set_to_none=True)
        sequence_logprobs(model, concat_batches(c, r)).sum().backward()

    def train(stats: bool):
        model.zero_grad(set_to_none=True)
        ref = (torch.zeros(len(c)), torch.zeros(len(r)))
        preference_microstep(model, dpo, c, r, ref, len(c), record_stats=stats)

    def tok_brute(plist):
        rows = {}
        for name, batch in (("w", c1), ("l", r1)):
            lp = token_logprobs(model, batch)[0][batch.response_mask[0]]
            rows[name] = torch.stack([flat_grad(lp[t], plist) for t in range(len(lp))])
        return rows["w"] @ rows["l"].T

    fns = {
        "floor": floor,
        "fast": lambda: fast_gradient_stats(model, c, r),
        "brute": lambda: exact_gradient_stats(model, c, r),
        "train": lambda: train(False),
        "train_stats": lambda: train(True),
        "tok_head_fast": lambda: tokenwise_inner(model, c1, r1, scope="head"),
        "tok_head_brute": lambda: tok_brute(head),
        "tok_all_fast": lambda: tokenwise_inner(model, c1, r1, scope="all"),
        "tok_all_brute": lambda: tok_brute(params),
    }
    seconds = timed(fns[method], repeat=repeat, warmup=1)
    return {
        "method": method,
        "seconds": seconds,
        "extra_mb": peak_rss_mb() - base_rss,
        "tokens": [int(c.input_ids.shape[1]), int(r.input_ids.shape[1])],
        "response_tokens": [int(c1.response_lengths[0]), int(r1.response_lengths[0])],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny model, for a smoke check")
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = "tiny-llama" if args.quick else args.model
    if args.measure:
        print(json.dumps(measure(args.measure, model, args.pairs, args.repeat)))
        return
    res = {}
    for m in METHODS:
        res[m] = run_isolated(
            "benchmarks.bench_fast_gradients",
            "--measure",
            m,
            "--model",
            model,
            "--pairs",
            str(args.pairs),
            "--repeat",
            str(args.repeat),
        )
        print(
            f"{m:>15}: {res[m]['seconds']:8.3f} s  +{res[m]['extra_mb']:7.0f} MB", file=sys.stderr
        )
    t, mb = ({k: v[f] for k, v in res.items()} for f in ("seconds", "extra_mb"))
    print(
        f"\nmodel {model}, {args.pairs} pairs, padded lengths {res['floor']['tokens']}, "
        f"token-wise pair {res['floor']['response_tokens']} response tokens"
    )
    print(
        f"fast stats / floor (fwd+bwd)       time {t['fast'] / t['floor']:.2f}x  "
        f"memory {mb['fast'] / max(mb['train'], 1):.2f}x of a training step"
    )
    print(
        f"brute force / fast                 time {t['brute'] / t['fast']:.2f}x  "
        f"memory {mb['brute'] / max(mb['fast'], 1):.2f}x"
    )
    print(f"training step with stats / without time {t['train_stats'] / t['train']:.2f}x")
    print(
        "token-wise head: per-token backward / fast  time "
        f"{t['tok_head_brute'] / t['tok_head_fast']:.1f}x"
    )
    print(
        "token-wise all: fast / per-token gradients  time "
        f"{t['tok_all_fast'] / t['tok_all_brute']:.2f}x  "
        f"memory {mb['tok_all_fast'] / max(mb['tok_all_brute'], 1):.2f}x"
    )


if __name__ == "__main__":
    main()
