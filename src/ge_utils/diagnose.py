"""``python -m ge_utils diagnose``: gradient-entanglement statistics of preference pairs.

Reads preference pairs (a JSONL file of ``{"prompt", "chosen", "rejected"}`` rows, or anything
:func:`ge_utils.data.load_pairs` reads), computes for each pair the summed log-probs,
``|g_w|^2``, ``|g_l|^2``, ``<g_w, g_l>``, cosine, the loss coefficients, the first-order predicted
changes and the case, and writes one CSV row per pair (atomically: an error leaves no CSV and
an existing one untouched; the file follows the umask). User errors print one ``error: ...``
line and return exit code 2.

``--scores`` picks the score families of :mod:`ge_utils.predict`: ``gradient`` (the statistics
above and ``pred_delta_chosen_over_norm2``), ``ches`` (``ches``, ``ln_ches``), ``baselines``
(``last_hidden_inner``, ``edit_distance``) or ``all``.

Pairs the statistics cannot tell apart are flagged on stderr (``warning: ...``): chosen and
rejected responses that tokenize to the same ids (equal gradients, every prediction 0), and
responses that are mostly the tokenizer's unknown token. A pair whose predicted chosen or
rejected change is exactly 0 has no direction, so its ``case`` is left empty.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from ge_utils.data import PreferencePair, load_pairs
from ge_utils.io import atomic_open
from ge_utils.logprobs import response_ids
from ge_utils.losses import LOSSES, get_loss
from ge_utils.models import load_model
from ge_utils.predict import SCORE_CHOICES, families_of, score_pairs

UNKNOWN_SHARE = 0.5  # warn when more than this share of a response's tokens are unknown


def _loss_param(text: str) -> tuple[str, float]:
    """``key=value`` with a numeric value, for ``--loss-param``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not a number") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="Hugging Face name, local folder, smollm2-135m-instruct, tiny-llama or tiny-gpt2; "
        "a saved LoRA adapter folder (TRL with peft) is measured over its adapter weights",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="JSONL (or JSON, CSV) file of prompt/chosen/rejected, or a dataset folder or name",
    )
    parser.add_argument("--split", default="train", help="dataset split (folder or Hub name)")
    parser.add_argument("--out", required=True, type=Path, help="CSV to write")
    parser.add_argument("--loss", default="dpo", help=f"one of {', '.join(LOSSES)}")
    parser.add_argument(
        "--loss-param",
        action="append",
        type=_loss_param,
        default=[],
        metavar="KEY=VALUE",
        help="loss hyperparameter, e.g. beta=0.2 (repeatable)",
    )
    parser.add_argument(
        "--scores",
        default="gradient",
        metavar="{" + ",".join(SCORE_CHOICES) + "}",
        help="score families: gradient statistics (default), ches (CHES, LN-CHES: forward only), "
        "baselines (last hidden-state inner product, token edit distance) or all",
    )
    parser.add_argument("--template", default="none", choices=["none", "chat"])
    parser.add_argument(
        "--method",
        default="fast",
        choices=["fast", "exact"],
        help="fast: one batched backward; exact: one backward per sequence (reference)",
    )
    parser.add_argument("--eta", type=float, default=1.0, help="step size of the prediction")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--train-last-k",
        type=int,
        default=None,
        metavar="K",
        help="gradients over the last K blocks and the final norm only (default: all parameters)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--no-progress", action="store_true")


def _pair_list(index: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in index[:limit])
    return shown + (f" and {len(index) - limit} more" if len(index) > limit else "")


def response_warnings(tokenizer, pairs: list[PreferencePair]) -> list[str]:
    """Warnings (one line each) about pairs whose chosen and rejected responses tokenize to the
    same ids, and pairs with a response more than half unknown tokens (0-based pair indices)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    same, unknown = [], []
    for i, p in enumerate(pairs):
        ids_w, ids_l = response_ids(tokenizer, p.chosen), response_ids(tokenizer, p.rejected)
        if ids_w == ids_l:
            same.append(i)
        if unk is not None and any(
            ids and sum(t == unk for t in ids) > UNKNOWN_SHARE * len(ids) for ids in (ids_w, ids_l)
        ):
            unknown.append(i)
    out = []
    if same:
        out.append(
            f"{len(same)} pair(s) ({_pair_list(same)}): chosen and rejected tokenize to the same "
            "ids, so their gradients are equal, every prediction is 0 and no case is given"
        )
    if unknown:
        out.append(
            f"{len(unknown)} pair(s) ({_pair_list(unknown)}): a response is mostly the "
            f"tokenizer's unknown token {tokenizer.unk_token!r}; is this the model's data?"
        )
    return out


def check_out_path(out: Path) -> None:
    """Raise OSError unless a file can be written at ``out``: it is not a folder and its
    parent folder exists and is writable (checked before any loading or scoring)."""
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give the path of the CSV file to write")
    parent = out.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: folder {parent} is not writable")


def main(args: argparse.Namespace) -> int:
    """Run the command; 0 on success, 2 on a user error (one ``error:`` line on stderr)."""
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if not (math.isfinite(args.eta) and args.eta > 0):
            raise ValueError(f"--eta (the step size) must be a finite number > 0, got {args.eta}")
        families_of(args.scores)  # a bad value fails before any loading
        check_out_path(args.out)
        loss = get_loss(args.loss, **dict(args.loss_param))
        pairs = load_pairs(args.data, split=args.split)
        loaded = load_model(
            args.model, dtype=args.dtype, device=args.device, train_last_k=args.train_last_k
        )
        for line in response_warnings(loaded.tokenizer, pairs):
            print(f"warning: {line}", file=sys.stderr)
        table = score_pairs(
            loaded.model,
            loaded.tokenizer,
            [p.prompt for p in pairs],
            [p.chosen for p in pairs],
            [p.rejected for p in pairs],
            loss,
            scores=args.scores,
            template=args.template,
            eta=args.eta,
            batch_size=args.batch_size,
            method=args.method,
            progress=not args.no_progress,
        )
        with atomic_open(args.out, "w", encoding="utf-8", newline="") as fh:
            table.to_csv(fh, index=False)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print("error: out of GPU memory; try a smaller --batch-size", file=sys.stderr)
        return 2
    print(f"wrote {len(table)} pairs to {args.out}", file=sys.stderr)
    return 0
