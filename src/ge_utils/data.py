"""Preference data: the synthetic sentiment task of the paper and generic pair files.

Synthetic sentiment (PAPER.md §4): ``x`` is a statement with an unambiguous sentiment, ``y_w``
its true sentiment and ``y_l`` the false one, in one of the response configurations

- ``single``: ``Positive.`` / ``Negative.`` (the poster's strings; 2 tokens for SmolLM2),
- ``single_bare``: ``Positive`` / ``Negative`` (one token each: Theorem 1's setting),
- ``short``: ``Positive sentiment.`` / ``Negative sentiment.``,
- ``long``: ``Positive sentiment based on my judgement.`` / ``Negative ...``,

or ``mixed_length``: the chosen and the rejected response of a pair in two different of the
formats ``single``, ``short``, ``long`` (all six ordered combinations in turn, for each label),
so that |y_w| != |y_l| (R-DPO's length term is active, and length-averaged margins differ from
summed ones); or any suffix (``suffix=" sentiment based on my careful judgement"``) for a sweep
over suffix length (:func:`suffix_of_length`, :func:`suffix_family`). Prompts are raw text
(:data:`PROMPT_TEMPLATE`); ``ge_utils.logprobs.tokenize(template="chat")`` puts the same text in
a user message of the model's chat template instead.

Views: a list of :class:`PreferencePair` (``pairs_frame`` for a DataFrame) for preference
optimization, ``sft_examples`` (prompt, gold response) for supervised fine-tuning.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

PROMPT_TEMPLATE = "What is the sentiment of this statement? {statement}\nAnswer:"
LABELS = ("Positive", "Negative")
CONFIG_SUFFIXES = {
    "single": ".",
    "single_bare": "",
    "short": " sentiment.",
    "long": " sentiment based on my judgement.",
}
MIXED_LENGTH = "mixed_length"
MIXED_FORMATS = list(itertools.permutations(("single", "short", "long"), 2))
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


def suffix_family(max_words: int = len(SWEEP_WORDS)) -> list[str]:
    """Suffixes of 0, 1, ..., ``max_words`` words (each ending with a period), for a sweep."""
    if not 0 <= max_words <= len(SWEEP_WORDS):
        raise ValueError(f"max_words must be in 0..{len(SWEEP_WORDS)}, got {max_words}")
    return [suffix_of_length(k) for k in range(max_words + 1)]


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


def response_label(config: str = "long", suffix: str | None = None) -> str:
    """The responses of a configuration (or ``suffix``) as a title: ``'"Positive." vs
    "Negative."'``; ``mixed_length`` names itself."""
    if config == MIXED_LENGTH and suffix is None:
        return "mixed-length responses"
    pos, neg = sentiment_responses(config, suffix)
    return f'"{pos}" vs "{neg}"'


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
    mixed = config == MIXED_LENGTH and suffix is None
    pos_resp, neg_resp = sentiment_responses("long" if mixed else config, suffix)
    by_label = {lab: [s for s in pool if s[1] == lab] for lab in LABELS}
    # Alternate labels so any prefix of the list is balanced.
    interleaved = [
        x for pair in zip(by_label["Positive"], by_label["Negative"], strict=True) for x in pair
    ]

    def pair(k: int, statement: str, label: str) -> PreferencePair:
        good, bad = (pos_resp, neg_resp) if label == "Positive" else (neg_resp, pos_resp)
        if mixed:  # k // 2: labels alternate, so each label meets every format combination
            fmt_w, fmt_l = MIXED_FORMATS[(k // 2) % len(MIXED_FORMATS)]
            side = LABELS.index(label)
            good, bad = sentiment_responses(fmt_w)[side], sentiment_responses(fmt_l)[1 - side]
        return PreferencePair(template.format(statement=statement), good, bad, label, statement)

    chosen = interleaved[: n_train + n_test]
    train = [pair(k, *x) for k, x in enumerate(chosen[:n_train])]
    test = [pair(n_train + k, *x) for k, x in enumerate(chosen[n_train:])]
    return train, test


def sft_examples(pairs: Sequence[PreferencePair]) -> list[tuple[str, str]]:
    """The SFT view: ``(prompt, gold response)``."""
    return [(p.prompt, p.chosen) for p in pairs]


def pairs_frame(pairs: Sequence[PreferencePair]) -> pd.DataFrame:
    """The pairs as a DataFrame with columns prompt, chosen, rejected, label, statement."""
    import pandas as pd

    columns = [f.name for f in fields(PreferencePair)]
    return pd.DataFrame([asdict(p) for p in pairs], columns=columns)


# --- generic preference files and datasets ------------------------------------------------------

PAIR_FIELDS = ("prompt", "chosen", "rejected")


def _is_messages(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _response_text(value: object, where: str, field: str) -> str:
    """A response given as a string, or as TRL's conversational list of messages (the content
    of its final assistant message)."""
    if isinstance(value, str):
        return value
    if _is_messages(value):
        assistant = [m.get("content") for m in value if m.get("role") == "assistant"]
        if assistant and isinstance(assistant[-1], str):
            return assistant[-1]
        raise ValueError(f"{where}: field {field!r} has no assistant message with string content")
    raise ValueError(
        f"{where}: field {field!r} must be a string or a list of chat messages, "
        f"got {type(value).__name__}"
    )


def _prompt_text(value: object, where: str) -> str:
    """A prompt given as a string, or as a conversational list holding one user message.

    Multi-turn prompts and system messages are refused rather than silently dropped: the
    package scores a response given a single user turn (``tokenize(template="chat")``).
    """
    if isinstance(value, str):
        return value
    if _is_messages(value):
        roles = [m.get("role") for m in value]
        if roles != ["user"] or not isinstance(value[0].get("content"), str):
            raise ValueError(
                f"{where}: a conversational prompt must be one user message with string "
                f"content, got roles {roles}"
            )
        return value[0]["content"]
    raise ValueError(
        f"{where}: field 'prompt' must be a string or a list of chat messages, "
        f"got {type(value).__name__}"
    )


def pairs_from_records(
    records: Sequence[object], source: str, locations: Sequence[str] | None = None
) -> list[PreferencePair]:
    """Validate ``prompt/chosen/rejected`` records into pairs.

    Errors name ``source`` and the record's location (``locations[i]``, default ``row i``,
    1-based). Prompts and responses must be non-empty strings or conversational messages.
    """
    if locations is not None and len(locations) != len(records):
        raise ValueError(f"{len(locations)} locations for {len(records)} records")
    out = []
    for i, rec in enumerate(records):
        where = f"{source}: {locations[i] if locations is not None else f'row {i + 1}'}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected an object with fields prompt, chosen, rejected")
        missing = [f for f in PAIR_FIELDS if f not in rec]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        texts = {
            "prompt": _prompt_text(rec["prompt"], where),
            "chosen": _response_text(rec["chosen"], where, "chosen"),
            "rejected": _response_text(rec["rejected"], where, "rejected"),
        }
        for name, text in texts.items():
            if not text.strip():
                raise ValueError(f"{where}: empty {name}")
        out.append(PreferencePair(texts["prompt"], texts["chosen"], texts["rejected"]))
    if not out:
        raise ValueError(f"{source}: no preference pairs")
    return out


def _read_jsonl(path: Path) -> tuple[list[object], list[str]]:
    """The records of a JSON-lines file (blank lines skipped) and their ``line n`` locations."""
    records, locations = [], []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {n} is not valid JSON ({exc.msg})") from exc
            locations.append(f"line {n}")
    return records, locations


def _read_csv(path: Path) -> tuple[list[object], list[str]]:
    """The rows of a CSV file with a header line, and their ``line n`` locations."""
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is not None:
            missing = [f for f in PAIR_FIELDS if f not in reader.fieldnames]
            if missing:
                raise ValueError(f"{path}: header lacks column(s) {', '.join(missing)}")
        records: list[object] = []
        locations = []
        for row in reader:
            records.append(row)
            locations.append(f"line {reader.line_num}")
    return records, locations


def load_pairs(source: str | os.PathLike, split: str = "train") -> list[PreferencePair]:
    """Preference pairs from a file, a local dataset folder or a Hugging Face dataset name.

    Files: ``.jsonl`` (one object per line), ``.json`` (a list of objects) or ``.csv`` (a header
    with prompt, chosen, rejected). Each field is a string, or TRL's conversational format: the
    prompt a list with one user message, chosen/rejected lists of messages whose final
    assistant message is the response. A folder or a Hub name goes through the ``datasets``
    package (``split`` picks the split); a Hub name that is not cached fails at once when the
    Hub cannot be reached (or ``HF_HUB_OFFLINE=1``).
    """
    path = Path(source)
    if path.is_dir():
        return _load_dataset_pairs(str(path), split, local=True)
    if path.suffix in (".jsonl", ".json", ".csv"):
        if not path.is_file():
            raise FileNotFoundError(f"preference data file {str(path)!r} does not exist")
        locations: list[str] | None = None
        if path.suffix == ".jsonl":
            records, locations = _read_jsonl(path)
        elif path.suffix == ".csv":
            records, locations = _read_csv(path)
        else:
            try:
                records = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
            if not isinstance(records, list):
                raise ValueError(f"{path}: expected a JSON list of objects")
        return pairs_from_records(records, str(path), locations)
    if path.is_file():
        raise ValueError(f"unsupported preference file type {path.suffix!r} in {str(path)!r}")
    return _load_dataset_pairs(str(source), split, local=False)


def _load_dataset_pairs(name: str, split: str, local: bool) -> list[PreferencePair]:
    """Pairs from ``datasets.load_dataset(name, split=split)``.

    A Hub name with a prepared copy in the local cache reads the copy its cache key names
    (:func:`ge_utils.hub.cached_dataset_revision`); online, a copy that cannot be read is
    downloaded again at that revision, never a newer one. A name not cached downloads the Hub's
    current revision (an error when the Hub cannot be reached)."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"loading {name!r} needs the datasets package: pip install datasets"
        ) from exc
    from ge_utils.hub import cached_dataset_revision, hub_offline_mode, hub_reachable, offline_error

    revision = None if local else cached_dataset_revision(name)
    if not local and revision is None and hub_reachable():
        ds = datasets.load_dataset(name, split=split)
    else:
        from unittest import mock

        try:  # cache only: datasets would otherwise retry the network for half a minute
            with hub_offline_mode(), mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True):
                ds = datasets.load_dataset(name, split=split)
        except Exception as exc:  # datasets raises many types; all mean "cannot load offline"
            if local:
                raise ValueError(f"cannot load the dataset folder {name!r}: {exc}") from exc
            if revision is None or not hub_reachable():
                raise offline_error("dataset", name) from exc
            ds = datasets.load_dataset(name, split=split, revision=revision)
    return pairs_from_records(list(ds), f"{name}[{split}]")
