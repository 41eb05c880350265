"""Preference data: the synthetic sentiment task of the paper and generic pair files.

Synthetic sentiment (PAPER.md §4): ``x`` is a statement with an unambiguous sentiment, ``y_w``
its true sentiment and ``y_l`` the false one, in one of the response configurations

- ``single``: ``Positive.`` / ``Negative.`` (the poster's strings; 2 tokens for SmolLM2),
- ``single_bare``: ``Positive`` / ``Negative`` (one token each: Theorem 1's setting),
- ``short``: ``Positive sentiment.`` / ``Negative sentiment.``,
- ``long``: ``Positive sentiment based on my judgement.`` / ``Negative ...``,

or any suffix (``suffix=" sentiment based on my careful judgement"``) for a sweep over suffix
length (:func:`suffix_of_length`).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PROMPT_TEMPLATE = "What is the sentiment of this statement? {statement}\nAnswer:"
LABELS = ("Positive", "Negative")
CONFIG_SUFFIXES = {
    "single": ".",
    "single_bare": "",
    "short": " sentiment.",
    "long": " sentiment based on my judgement.",
}
SWEEP_WORDS = ["sentiment", "based", "on", "my", "own", "careful", "judgement", "of", "it"]

SUBJECTS = [
    "The movie",
    "This restaurant",
    "The new phone",
    "My hotel room",
    "The concert",
    "This book",
    "The customer service",
    "The coffee here",
    "Our flight",
    "The software update",
    "The museum tour",
    "This laptop",
    "The pizza",
    "The school play",
    "The city park",
    "The train ride",
    "This album",
    "The dentist visit",
    "The wedding venue",
    "The video game",
    "The hiking trail",
    "This podcast",
    "The delivery",
    "The yoga class",
    "The car rental",
    "The bakery",
    "This jacket",
    "The conference",
    "The theme park",
    "The online course",
]
POSITIVE = [
    "was an absolute delight",
    "exceeded all my expectations",
    "made my whole week",
    "was wonderful from start to finish",
    "left me smiling for hours",
    "was worth every penny",
    "was a real joy",
    "impressed everyone in our group",
    "was better than I had hoped",
    "felt warm and welcoming",
    "was simply fantastic",
    "turned out to be a lovely surprise",
    "was brilliant in every way",
    "made me very happy",
    "was excellent and well organized",
    "deserves all the praise it gets",
    "was fun and memorable",
    "was a pleasure to experience",
    "was outstanding",
    "brightened my day",
]
NEGATIVE = [
    "was a complete waste of time",
    "left me deeply disappointed",
    "was a total mess",
    "ruined my whole week",
    "was far worse than I feared",
    "made me angry",
    "was a frustrating ordeal",
    "felt cold and unwelcoming",
    "was simply awful",
    "turned out to be a nasty surprise",
    "was terrible in every way",
    "made me very unhappy",
    "was sloppy and badly organized",
    "deserves every bad review it gets",
    "was dull and forgettable",
    "was painful to sit through",
    "was dreadful",
    "spoiled my day",
    "was not worth a single penny",
    "broke my heart in the worst way",
]


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response."""

    prompt: str
    chosen: str
    rejected: str
    label: str = ""
    statement: str = ""


def suffix_of_length(k: int) -> str:
    """A suffix of ``k`` words after the label word, ending with a period (k = 0: ``"."``)."""
    if not 0 <= k <= len(SWEEP_WORDS):
        raise ValueError(f"suffix length must be in 0..{len(SWEEP_WORDS)}, got {k}")
    return "".join(" " + w for w in SWEEP_WORDS[:k]) + "."


def sentiment_responses(config: str = "long", suffix: str | None = None) -> tuple[str, str]:
    """The (positive, negative) responses of a configuration, or of an explicit ``suffix``."""
    if suffix is None:
        if config not in CONFIG_SUFFIXES:
            known = ", ".join(CONFIG_SUFFIXES)
            raise ValueError(f"unknown response configuration {config!r}; known: {known}")
        suffix = CONFIG_SUFFIXES[config]
    if not isinstance(suffix, str):
        raise TypeError(f"suffix must be a string, got {type(suffix).__name__}")
    return LABELS[0] + suffix, LABELS[1] + suffix


def statements(seed: int = 0) -> list[tuple[str, str]]:
    """Every ``(statement, label)`` of the generator, shuffled by ``seed``; balanced."""
    items = [(f"{s} {p}.", "Positive") for s, p in itertools.product(SUBJECTS, POSITIVE)]
    items += [(f"{s} {p}.", "Negative") for s, p in itertools.product(SUBJECTS, NEGATIVE)]
    rng = random.Random(seed)
    rng.shuffle(items)
    return items


def sentiment_pairs(
    n_train: int,
    n_test: int,
    config: str = "long",
    suffix: str | None = None,
    seed: int = 0,
    template: str = PROMPT_TEMPLATE,
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Balanced train and test preference pairs with disjoint statements.

    Deterministic for a ``seed``; ``template`` must contain ``{statement}``.
    """
    if "{statement}" not in template:
        raise ValueError("the prompt template must contain '{statement}'")
    pool = statements(seed)
    if n_train < 0 or n_test < 0 or n_train + n_test > len(pool):
        raise ValueError(f"need 0 <= n_train + n_test <= {len(pool)}, got {n_train} + {n_test}")
    pos_resp, neg_resp = sentiment_responses(config, suffix)
    by_label = {lab: [s for s in pool if s[1] == lab] for lab in LABELS}
    # Alternate labels so any prefix of the list is balanced.
    interleaved = [
        x for pair in zip(by_label["Positive"], by_label["Negative"], strict=True) for x in pair
    ]

    def pair(statement: str, label: str) -> PreferencePair:
        good, bad = (pos_resp, neg_resp) if label == "Positive" else (neg_resp, pos_resp)
        return PreferencePair(template.format(statement=statement), good, bad, label, statement)

    train = [pair(*x) for x in interleaved[:n_train]]
    test = [pair(*x) for x in interleaved[n_train : n_train + n_test]]
    return train, test


def sft_examples(pairs: Sequence[PreferencePair]) -> list[tuple[str, str]]:
    """The SFT view: ``(prompt, gold response)``."""
    return [(p.prompt, p.chosen) for p in pairs]


# --- generic preference files and datasets ------------------------------------------------------


def _message_text(value: object, where: str, field: str) -> str:
    """A response given as a string or as TRL's conversational list of messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        assistant = [m for m in value if m.get("role") == "assistant"]
        last = (assistant or value)[-1]
        content = last.get("content")
        if isinstance(content, str):
            return content
    raise ValueError(f"{where}: field {field!r} must be a string or a list of chat messages")


def _prompt_text(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        user = [m.get("content") for m in value if m.get("role") == "user"]
        if user and isinstance(user[-1], str):
            return user[-1]
    raise ValueError(f"{where}: field 'prompt' must be a string or a list of chat messages")


def pairs_from_records(records: Sequence[dict], source: str) -> list[PreferencePair]:
    """Validate ``prompt/chosen/rejected`` records; errors name the row (1-based)."""
    out = []
    for i, rec in enumerate(records, start=1):
        where = f"{source}: row {i}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected an object with prompt, chosen, rejected")
        missing = [f for f in ("prompt", "chosen", "rejected") if f not in rec]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        prompt = _prompt_text(rec["prompt"], where)
        chosen = _message_text(rec["chosen"], where, "chosen")
        rejected = _message_text(rec["rejected"], where, "rejected")
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise ValueError(f"{where}: empty {name} response")
        out.append(PreferencePair(prompt, chosen, rejected))
    if not out:
        raise ValueError(f"{source}: no preference pairs")
    return out


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {n} is not valid JSON ({exc.msg})") from exc
    return records


def load_pairs(source: str | os.PathLike, split: str = "train") -> list[PreferencePair]:
    """Preference pairs from a ``.jsonl``, ``.json`` or ``.csv`` file, or a Hugging Face dataset
    name (needs the ``datasets`` package and network or a local cache)."""
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".csv"):
        if not path.is_file():
            raise FileNotFoundError(f"preference data file {str(path)!r} does not exist")
        if path.suffix == ".jsonl":
            records = _read_jsonl(path)
        elif path.suffix == ".json":
            try:
                records = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc.msg})") from exc
            if not isinstance(records, list):
                raise ValueError(f"{path}: expected a JSON list of objects")
        else:
            with path.open(encoding="utf-8", newline="") as fh:
                records = list(csv.DictReader(fh))
        return pairs_from_records(records, str(path))
    return _load_hub_pairs(str(source), split)


def _load_hub_pairs(name: str, split: str) -> list[PreferencePair]:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"loading {name!r} from the Hub needs `pip install datasets`") from exc
    from ge_utils.hub import hub_reachable, offline_error

    if not hub_reachable():
        from unittest import mock

        try:  # cache only: datasets would otherwise retry the network for half a minute
            with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True):
                ds = datasets.load_dataset(name, split=split)
        except Exception as exc:  # datasets raises many types; all mean "not cached"
            raise offline_error("dataset", name) from exc
    else:
        ds = datasets.load_dataset(name, split=split)
    return pairs_from_records(list(ds), f"{name}[{split}]")
