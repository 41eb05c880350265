"""The diagnose command on a tiny model saved to disk."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from ge_utils.__main__ import main as cli
from ge_utils.gradients import exact_gradient_stats
from ge_utils.logprobs import tokenize
from ge_utils.models import tiny_causal_lm
from ge_utils.predict import ches_scores

ROWS = [
    {
        "prompt": "The film was a delight.",
        "chosen": "Positive sentiment.",
        "rejected": "Negative sentiment.",
    },
    {
        "prompt": "The food was cold.",
        "chosen": "Negative sentiment based on my judgement.",
        "rejected": "Positive sentiment based on my judgement.",
    },
    {"prompt": "The service was slow.", "chosen": "Negative.", "rejected": "Positive."},
]
COLUMNS = [
    "pair",
    "logp_chosen",
    "logp_rejected",
    "grad_norm2_chosen",
    "grad_norm2_rejected",
    "grad_inner",
    "cosine",
    "inner_over_min_norm2",
    "d_w",
    "d_l",
    "pred_delta_chosen",
    "pred_delta_rejected",
    "pred_delta_margin",
    "case",
    "pred_delta_chosen_over_norm2",
]
ALL_COLUMNS = [*COLUMNS, "ches", "ln_ches", "last_hidden_inner", "edit_distance"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_causal_lm("gpt2", len(tokenizer), seed=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def run(capsys, *args: str) -> tuple[int, str]:
    """The command in-process: exit code and stderr."""
    code = cli(["diagnose", "--no-progress", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("method", ["fast", "exact"])
def test_csv_matches_exact_statistics(tmp_path, model_dir, tokenizer, capsys, method):
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    out = tmp_path / "stats.csv"
    code, err = run(
        capsys,
        *["--model", str(model_dir), "--data", str(data), "--out", str(out)],
        *["--method", method, "--loss", "dpo", "--loss-param", "beta=0.2", "--eta", "0.5"],
    )
    assert code == 0, err
    assert "wrote 3 pairs" in err
    table = pd.read_csv(out)
    assert list(table.columns) == COLUMNS and list(table["pair"]) == [0, 1, 2]

    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    prompts = [r["prompt"] for r in ROWS]
    c = tokenize(tokenizer, prompts, [r["chosen"] for r in ROWS])
    r = tokenize(tokenizer, prompts, [r["rejected"] for r in ROWS])
    exact = exact_gradient_stats(model, c, r)
    for key, col in [
        ("logp_chosen", "logp_chosen"),
        ("logp_rejected", "logp_rejected"),
        ("norm2_chosen", "grad_norm2_chosen"),
        ("norm2_rejected", "grad_norm2_rejected"),
        ("inner", "grad_inner"),
    ]:
        torch.testing.assert_close(torch.tensor(table[col].values), exact[key], rtol=1e-4, atol=0)
    assert (table["d_w"] == 0.1).all() and (table["d_l"] == 0.1).all()  # reference = model
    expected_w = 0.5 * 0.1 * (exact["norm2_chosen"] - exact["inner"])
    torch.testing.assert_close(
        torch.tensor(table["pred_delta_chosen"].values), expected_w, rtol=1e-4, atol=0
    )


def test_command_line_entry_point(tmp_path, model_dir):
    """``python -m ge_utils diagnose`` as a user types it: a CSV on success, and one error line
    without a traceback on bad input."""
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS[:1])
    out = tmp_path / "stats.csv"
    base = [sys.executable, "-m", "ge_utils", "diagnose", "--no-progress", "--data", str(data)]
    ok = subprocess.run(
        [*base, "--model", str(model_dir), "--out", str(out), "--method", "exact"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(pd.read_csv(out)) == 1
    bad = subprocess.run(
        [*base, "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.csv")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: model folder {str(tmp_path / 'missing')!r} does not exist"
    ]


BAD_JSON = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n{"prompt": "p", "chosen": \n'


@pytest.mark.parametrize(
    ("content", "args", "messages"),
    [
        ([{"prompt": "p", "chosen": "a"}], [], ["line 1", "missing field(s) rejected"]),
        ([ROWS[0], {**ROWS[1], "chosen": ""}], [], ["line 2", "empty chosen"]),
        ([ROWS[0], {**ROWS[1], "rejected": 5}], [], ["line 2", "'rejected'", "string"]),
        (BAD_JSON, [], ["line 3", "not valid JSON"]),
        ("\n", [], ["no preference pairs"]),
        (ROWS, ["--loss", "dpx"], ["unknown loss 'dpx'", "known losses: dpo, ipo"]),
        (ROWS, ["--loss-param", "gamma=1"], ["unknown hyperparameter 'gamma'", "allowed: beta"]),
        (ROWS, ["--loss-param", "beta=-1"], ["'beta' must be > 0"]),
        (ROWS, ["--batch-size", "0"], ["--batch-size must be >= 1, got 0"]),
        (ROWS, ["--eta", "-1"], ["--eta (the step size) must be a finite number > 0, got -1.0"]),
        (ROWS, ["--eta", "nan"], ["--eta (the step size) must be a finite number > 0, got nan"]),
        (ROWS, ["--model", "/nonexistent/model"], ["'/nonexistent/model' does not exist"]),
        (ROWS, ["--data", "/nonexistent/pairs.jsonl"], ["/nonexistent/pairs.jsonl", "not exist"]),
    ],
)
def test_bad_input_gives_one_clear_error_and_no_csv(
    tmp_path, model_dir, capsys, content, args, messages
):
    data = tmp_path / "pairs.jsonl"
    if isinstance(content, str):
        data.write_text(content, encoding="utf-8")
    else:
        write_jsonl(data, content)
    out = tmp_path / "stats.csv"
    code, err = run(
        capsys, "--model", str(model_dir), "--data", str(data), "--out", str(out), *args
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for message in messages:
        assert message in lines[0]
    assert list(tmp_path.iterdir()) == [data], "a CSV or a temporary file was left behind"


def test_error_leaves_an_existing_csv_untouched(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a"}])
    out = tmp_path / "stats.csv"
    out.write_text("old results\n", encoding="utf-8")
    code, _ = run(capsys, "--model", str(model_dir), "--data", str(data), "--out", str(out))
    assert code == 2 and out.read_text(encoding="utf-8") == "old results\n"


@pytest.mark.parametrize("value", ["beta", "beta=x"])
def test_malformed_loss_param_is_a_usage_error(capsys, value):
    argv = ["diagnose", "--model", "m", "--data", "d.jsonl", "--out", "o.csv"]
    with pytest.raises(SystemExit) as exit_info:
        cli([*argv, "--loss-param", value])
    assert exit_info.value.code == 2
    assert "--loss-param" in capsys.readouterr().err


def test_scores_all_writes_every_column(tmp_path, model_dir, tokenizer, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    out = tmp_path / "scores.csv"
    args = ["--model", str(model_dir), "--data", str(data), "--out", str(out)]
    code, err = run(capsys, *args, "--scores", "all", "--dtype", "float64")
    assert code == 0, err
    table = pd.read_csv(out)
    assert list(table.columns) == ALL_COLUMNS
    assert table.notna().all().all()
    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    prompts = [r["prompt"] for r in ROWS]
    c = tokenize(tokenizer, prompts, [r["chosen"] for r in ROWS])
    r = tokenize(tokenizer, prompts, [r["rejected"] for r in ROWS])
    expected = ches_scores(model, c, r)
    for key in ("ches", "ln_ches", "last_hidden_inner"):
        torch.testing.assert_close(
            torch.tensor(table[key].values), expected[key], rtol=1e-9, atol=0
        )
    assert table["edit_distance"].tolist() == [1, 1, 1]
    code, err = run(capsys, *args, "--scores", "baselines")
    assert code == 0, err
    assert list(pd.read_csv(out).columns) == ["pair", "last_hidden_inner", "edit_distance"]


@pytest.mark.parametrize("value", ["CHES", "grad", "", "all,ches"])
def test_bad_scores_value_is_one_clear_error(tmp_path, model_dir, capsys, value):
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    out = tmp_path / "scores.csv"
    code, err = run(
        capsys, "--model", str(model_dir), "--data", str(data), "--out", str(out),
        "--scores", value,
    )  # fmt: skip
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: unknown scores {value!r}; expected one of gradient, ches, baselines, all"
    ]
    assert not out.exists()


def test_identical_and_unknown_responses_are_flagged(tmp_path, model_dir, capsys):
    """The word-level tokenizer maps unknown words to one id: " Yes yes." and " No no." both
    become [<unk>, <unk>, .], so the pair's gradients are equal and its predictions exactly 0."""
    rows = [
        ROWS[0],
        {"prompt": "The film was a delight.", "chosen": " Yes yes.", "rejected": " No no."},
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "stats.csv"
    code, err = run(capsys, "--model", str(model_dir), "--data", str(data), "--out", str(out))
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, err
    assert "1 pair(s) (1): chosen and rejected tokenize to the same ids" in warnings[0]
    assert "1 pair(s) (1): a response is mostly the tokenizer's unknown token" in warnings[1]
    table = pd.read_csv(out)
    assert table.loc[1, "pred_delta_chosen"] == 0 and table.loc[1, "pred_delta_rejected"] == 0
    assert pd.isna(table.loc[1, "case"]) and table.loc[0, "case"] in (1, 2, 3)


def test_csv_follows_the_umask(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS[:1])
    out = tmp_path / "stats.csv"
    previous = os.umask(0o022)
    try:
        code, err = run(capsys, "--model", str(model_dir), "--data", str(data), "--out", str(out))
    finally:
        os.umask(previous)
    assert code == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (".", "is a folder; give the path of the CSV file to write"),
        ("missing/stats.csv", "does not exist"),
    ],
)
def test_bad_out_path_fails_before_loading(tmp_path, capsys, monkeypatch, out, message):
    import ge_utils.diagnose as diagnose

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(diagnose, "load_model", never)
    monkeypatch.setattr(diagnose, "load_pairs", never)
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    target = tmp_path / out
    code, err = run(capsys, "--model", "tiny-gpt2", "--data", str(data), "--out", str(target))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --out {target}") and message in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_unwritable_out_folder_fails_before_loading(tmp_path, capsys, monkeypatch):
    import ge_utils.diagnose as diagnose

    monkeypatch.setattr(diagnose, "load_model", lambda *a, **k: pytest.fail("loaded"))
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    code, err = run(capsys, "--model", "m", "--data", str(data), "--out", str(locked / "o.csv"))
    assert code == 2 and f"folder {locked} is not writable" in err
