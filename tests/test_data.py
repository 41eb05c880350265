"""Synthetic sentiment data and generic preference files."""

import json

import pytest

from ge_utils.data import (
    CONFIG_SUFFIXES,
    PROMPT_TEMPLATE,
    load_pairs,
    pairs_frame,
    sentiment_pairs,
    sentiment_responses,
    sft_examples,
    statements,
    suffix_family,
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
    family = suffix_family(4)
    assert family == [".", " sentiment.", " sentiment based.", " sentiment based on.", family[-1]]
    assert family[-1] == " sentiment based on my."
    assert [len(f.split()) for f in suffix_family()] == [1, *range(1, len(suffix_family()))]


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
            assert p.prompt == PROMPT_TEMPLATE.format(statement=p.statement)
            pos, neg = sentiment_responses(config)
            assert (p.chosen, p.rejected) == ((pos, neg) if p.label == "Positive" else (neg, pos))
    assert not {p.statement for p in train} & {p.statement for p in test}
    assert sft_examples(train)[0] == (train[0].prompt, train[0].chosen)
    frame = pairs_frame(train)
    assert list(frame.columns) == ["prompt", "chosen", "rejected", "label", "statement"]
    assert frame.iloc[3].tolist() == [
        train[3].prompt,
        train[3].chosen,
        train[3].rejected,
        train[3].label,
        train[3].statement,
    ]


def test_larger_sets_and_custom_template():
    train, test = sentiment_pairs(1000, 200, "single_bare", seed=0, template="Q: {statement} A:")
    assert len({p.statement for p in train}) == 1000
    assert sum(p.label == "Positive" for p in test) == 100
    assert train[0].prompt == f"Q: {train[0].statement} A:"
    with pytest.raises(ValueError, match="must contain"):
        sentiment_pairs(2, 2, template="no placeholder")


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
    csv_pairs = load_pairs(write(tmp_path / "x.csv", 'prompt,chosen,rejected\n"q, 1",yes,no\n'))
    assert [(p.prompt, p.chosen, p.rejected) for p in csv_pairs] == [("q, 1", "yes", "no")]
    json_pairs = load_pairs(write(tmp_path / "x.json", json.dumps(rows)))
    assert json_pairs == pairs


def test_hf_datasets_path_on_a_local_folder(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "prefs"
    folder.mkdir()
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(3)]
    write(folder / "train.jsonl", "\n".join(json.dumps(r) for r in rows))
    pairs = load_pairs(folder)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in rows
    ]


GOOD = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
USER = '[{"role": "user", "content": "p"}]'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"prompt": "p", "chosen": "a"}', "line 1: missing field[(]s[)] rejected"),
        (GOOD + '\n\n{"prompt": "p", "chosen": "a", "rejected": "  "}', "line 3: empty rejected"),
        ('{"prompt": "", "chosen": "a", "rejected": "b"}', "line 1: empty prompt"),
        ('{"prompt": "p", "chosen": 3, "rejected": "b"}', "line 1: field 'chosen' must be .* int"),
        ('{"prompt": null, "chosen": "a", "rejected": "b"}', "line 1: field 'prompt' must be"),
        ("[1, 2]", "line 1: expected an object"),
        (GOOD + "\n{oops", "line 2 is not valid JSON"),
        ("", "no preference pairs"),
        ("\n  \n", "no preference pairs"),
        (
            '{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}], '
            '"chosen": "a", "rejected": "b"}',
            r"line 1: a conversational prompt must be one user message.*\['system', 'user'\]",
        ),
        (
            '{"prompt": ' + USER + ', "chosen": [{"role": "user", "content": "a"}], '
            '"rejected": "b"}',
            "line 1: field 'chosen' has no assistant message",
        ),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_pairs(write(tmp_path / "bad.jsonl", text))


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.csv", "prompt,chosen\nq,yes\n", "header lacks column[(]s[)] rejected"),
        ("bad.csv", "prompt,chosen,rejected\nq,yes,no\nq2,yes\n", "line 3: field 'rejected'"),
        ("bad.csv", "", "no preference pairs"),
        ("bad.json", '{"prompt": "p"}', "expected a JSON list"),
        ("bad.json", "[" + GOOD + ",\n]", "not valid JSON .*line 2"),
        ("bad.json", "[" + GOOD + ', {"prompt": "p"}]', "row 2: missing field"),
        ("bad.txt", "prompt,chosen,rejected", "unsupported preference file type '.txt'"),
    ],
)
def test_malformed_csv_and_json(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message):
        load_pairs(write(tmp_path / name, text))


def test_missing_file_and_uncached_hub_name_fail_fast(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(tmp_path / "nope.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="cannot be reached"):
        load_pairs("someone/not-cached-dataset")
