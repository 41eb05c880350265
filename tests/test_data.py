"""Synthetic sentiment data and generic preference files."""

import json

import pytest

from ge_utils.data import (
    CONFIG_SUFFIXES,
    load_pairs,
    sentiment_pairs,
    sentiment_responses,
    sft_examples,
    statements,
    suffix_of_length,
)


def test_poster_strings_are_the_defaults():
    assert sentiment_responses("single") == ("Positive.", "Negative.")
    assert sentiment_responses("short") == ("Positive sentiment.", "Negative sentiment.")
    assert sentiment_responses("long") == (
        "Positive sentiment based on my judgement.",
        "Negative sentiment based on my judgement.",
    )
    assert sentiment_responses("single_bare") == ("Positive", "Negative")
    assert sentiment_responses(suffix=suffix_of_length(2)) == (
        "Positive sentiment based.",
        "Negative sentiment based.",
    )
    assert suffix_of_length(0) == "."


@pytest.mark.parametrize("config", list(CONFIG_SUFFIXES))
def test_pairs_are_deterministic_balanced_and_disjoint(config):
    train, test = sentiment_pairs(40, 20, config, seed=7)
    again_train, again_test = sentiment_pairs(40, 20, config, seed=7)
    assert train == again_train and test == again_test
    assert sentiment_pairs(40, 20, config, seed=8)[0] != train
    for split in (train, test):
        labels = [p.label for p in split]
        assert labels.count("Positive") == labels.count("Negative")
        for p in split:
            assert p.statement in p.prompt
            pos, neg = sentiment_responses(config)
            assert (p.chosen, p.rejected) == ((pos, neg) if p.label == "Positive" else (neg, pos))
    assert not {p.statement for p in train} & {p.statement for p in test}
    assert sft_examples(train)[0] == (train[0].prompt, train[0].chosen)


def test_statements_have_lexical_variety():
    items = statements(0)
    assert len(items) == len(set(items)) >= 1000
    assert len({s.split()[-1] for s, _ in items}) > 20


def test_bad_configuration_and_sizes():
    with pytest.raises(ValueError, match="unknown response configuration 'medium'"):
        sentiment_responses("medium")
    with pytest.raises(ValueError, match="n_train"):
        sentiment_pairs(10**6, 1)
    with pytest.raises(ValueError, match="suffix length"):
        suffix_of_length(99)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_load_jsonl_csv_and_conversational(tmp_path):
    rows = [
        {"prompt": "p1", "chosen": "a", "rejected": "b"},
        {
            "prompt": [{"role": "user", "content": "p2"}],
            "chosen": [{"role": "assistant", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "d"}],
        },
    ]
    pairs = load_pairs(write(tmp_path / "x.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("p1", "a", "b"), ("p2", "c", "d")]
    csv_pairs = load_pairs(write(tmp_path / "x.csv", "prompt,chosen,rejected\nq,yes,no\n"))
    assert (csv_pairs[0].prompt, csv_pairs[0].chosen) == ("q", "yes")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"prompt": "p", "chosen": "a"}', "row 1: missing field"),
        ('{"prompt": "p", "chosen": "a", "rejected": "  "}', "row 1: empty rejected"),
        ('{"prompt": "p", "chosen": 3, "rejected": "b"}', "row 1: field 'chosen' must be"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{oops', "line 2 is not valid JSON"),
        ("", "no preference pairs"),
    ],
)
def test_malformed_files_name_the_row(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_pairs(write(tmp_path / "bad.jsonl", text))


def test_missing_file_and_uncached_hub_name_fail_fast(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(tmp_path / "nope.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="cannot be reached"):
        load_pairs("someone/not-cached-dataset")
