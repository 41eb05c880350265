"""Two runs of the book side by side: ``python -m ge_utils compare A B``.

``A`` and ``B`` are results folders the runner wrote (``--results-dir``: one
``<chapter>.json`` per executed notebook, holding its provenance and claim verdicts), e.g. the
same profile executed on the CPU and on CUDA::

    python -m ge_utils run --profile smoke -p device cpu --out-dir /tmp/cpu --results-dir /tmp/cpu
    python -m ge_utils run --profile smoke -p device cuda --out-dir /tmp/gpu --results-dir /tmp/gpu
    python -m ge_utils compare /tmp/cpu /tmp/gpu

Claims are matched by chapter and text. For each, the verdict and effect in both runs and the
effect's difference relative to its size; printed: each chapter's profile and device in both
runs, every claim whose verdict differs (or every claim, ``--all``), and the largest relative
difference of an effect. Exit status as ``diff``'s: 0 when every verdict is the same, 1 when one
differs or a claim or chapter is in one run only, 2 for unreadable input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from ge_book.parameters import RunnerError

ABSENT = "absent"


COLUMNS = [
    "chapter", "kind", "claim", "verdict_a", "verdict_b", "effect_a", "effect_b",
    "relative_difference", "same_verdict",
]  # fmt: skip


def check_results(path: Path, data: Any) -> None:
    """Raise RunnerError unless ``data`` (read from ``path``) has the shape of the runner's
    results: a mapping with a list of claims, each a mapping with a string ``claim`` and
    ``verdict`` and an ``effect`` that is null or a number, and a ``provenance`` that, where
    present, is a mapping."""
    if not isinstance(data, dict) or not isinstance(data.get("claims"), list):
        raise RunnerError(f"{path}: not a results file of the runner (no list of claims)")
    if not isinstance(data.get("provenance") or {}, dict):
        raise RunnerError(
            f"{path}: 'provenance' must be a mapping (profile, device, ...), "
            f"got {data['provenance']!r}"
        )
    for i, c in enumerate(data["claims"]):
        if not (
            isinstance(c, dict) and isinstance(c.get("claim"), str)
            and isinstance(c.get("verdict"), str)
        ):  # fmt: skip
            raise RunnerError(
                f"{path}: claim {i} must be a mapping with a string 'claim' and 'verdict', "
                f"got {c!r}"
            )
        effect = c.get("effect")
        if effect is not None and (isinstance(effect, bool) or not isinstance(effect, int | float)):
            raise RunnerError(
                f"{path}: claim {i} ({c['claim']!r}): 'effect' must be a number or null, "
                f"got {effect!r}"
            )


def load_results(folder: Path) -> dict[str, dict[str, Any]]:
    """Chapter name -> the runner's results of that chapter, for every ``*.json`` in ``folder``
    (each checked by :func:`check_results`)."""
    if not folder.exists():
        raise RunnerError(f"results folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise RunnerError(
            f"results folder {str(folder)!r} is a file, not a folder (pass the runner's "
            "--results-dir)"
        )
    out = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RunnerError(f"{path}: not a readable results file ({exc})") from exc
        check_results(path, data)
        out[path.stem] = data
    if not out:
        raise RunnerError(f"results folder {str(folder)!r} holds no results file (*.json)")
    return out


def _claims(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Claims by text; a text repeated within the chapter is kept each time, its n-th
    occurrence as ``text [#n]``."""
    out: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for c in results["claims"]:
        text = c["claim"]
        seen[text] = seen.get(text, 0) + 1
        out[text if seen[text] == 1 else f"{text} [#{seen[text]}]"] = c
    return out


def _effect(claim: dict[str, Any] | None) -> float:
    value = (claim or {}).get("effect")
    return float(value) if isinstance(value, int | float) else math.nan


def relative_difference(a: float, b: float) -> float:
    """``|b - a| / max(|a|, |b|)``: 0 for equal effects (both 0 too), NaN where either is
    missing."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(b - a) / scale


def compare_results(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per (chapter, claim) of either run, chapters in ``a``'s order then ``b``'s:
    ``chapter, kind, claim, verdict_a, verdict_b, effect_a, effect_b, relative_difference,
    same_verdict`` (a claim or chapter missing from one run has the verdict ``absent``; no claim
    in either run: no rows, the same columns). A claim text repeated within a chapter is matched
    by occurrence (:func:`_claims`)."""
    rows = []
    for chapter in [*a, *(n for n in b if n not in a)]:
        claims_a = _claims(a[chapter]) if chapter in a else {}
        claims_b = _claims(b[chapter]) if chapter in b else {}
        for text in [*claims_a, *(t for t in claims_b if t not in claims_a)]:
            ca, cb = claims_a.get(text), claims_b.get(text)
            va = ca["verdict"] if ca else ABSENT
            vb = cb["verdict"] if cb else ABSENT
            ea, eb = _effect(ca), _effect(cb)
            rows.append(
                {
                    "chapter": chapter,
                    "kind": (ca or cb or {}).get("kind", ""),
                    "claim": text,
                    "verdict_a": va,
                    "verdict_b": vb,
                    "effect_a": ea,
                    "effect_b": eb,
                    "relative_difference": relative_difference(ea, eb),
                    "same_verdict": va == vb,
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def _run_of(results: dict[str, Any] | None) -> str:
    if results is None:
        return ABSENT
    prov = results.get("provenance") or {}
    return f"{prov.get('profile', '?')} on {prov.get('device', '?')}"


def report(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]], every: bool) -> str:
    """The text :func:`main` prints."""
    table = compare_results(a, b)
    lines = ["chapter: run A | run B"]
    for chapter in dict.fromkeys([*a, *b]):
        lines.append(f"  {chapter}: {_run_of(a.get(chapter))} | {_run_of(b.get(chapter))}")
    differ = table[~table["same_verdict"]]
    shown = table if every else differ
    if len(shown):
        lines.append("")
        lines.append("every claim:" if every else "claims whose verdict differs:")
        for r in shown.itertuples():
            lines.append(
                f"  [{r.chapter}] {r.claim}\n"
                f"      A: {r.verdict_a} (effect {r.effect_a:.4g})   "
                f"B: {r.verdict_b} (effect {r.effect_b:.4g})   "
                f"relative difference {r.relative_difference:.2g}"
            )
    both = table[(table["verdict_a"] != ABSENT) & (table["verdict_b"] != ABSENT)]
    lines.append("")
    lines.append(
        f"{len(both)} claims in both runs, {int((~both['same_verdict']).sum())} with another "
        f"verdict; {len(table) - len(both)} in one run only"
    )
    effects = both.dropna(subset=["relative_difference"])
    if len(effects) and effects["relative_difference"].max() == 0:
        lines.append(f"every effect of both runs identical ({len(effects)} effects)")
    elif len(effects):
        top = effects.loc[effects["relative_difference"].idxmax()]
        lines.append(
            f"largest relative difference of an effect: {top['relative_difference']:.3g} "
            f"([{top['chapter']}] {top['claim']})"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", type=Path, help="results folder of run A (the runner's --results-dir)")
    parser.add_argument("b", type=Path, help="results folder of run B")
    parser.add_argument("--all", action="store_true", help="list every claim, not only those "
                        "whose verdict differs")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    try:
        a, b = load_results(args.a), load_results(args.b)
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(a, b, args.all))
    return 0 if bool(compare_results(a, b)["same_verdict"].all()) else 1
