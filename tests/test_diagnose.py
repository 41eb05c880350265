"""The diagnose command on a tiny model saved to disk."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from ge_utils.gradients import exact_gradient_stats
from ge_utils.logprobs import tokenize
from ge_utils.models import tiny_causal_lm

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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_causal_lm("gpt2", len(tokenizer), seed=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def diagnose(*args):
    return subprocess.run(
        [sys.executable, "-m", "ge_utils", "diagnose", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("method", ["fast", "exact"])
def test_csv_matches_exact_statistics(tmp_path, model_dir, tokenizer, method):
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    out = tmp_path / "stats.csv"
    proc = diagnose(
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--method",
        method,
        "--loss",
        "dpo",
        "--loss-param",
        "beta=0.2",
    )
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out)
    assert len(table) == 3
    for col in [
        "logp_chosen",
        "logp_rejected",
        "grad_norm2_chosen",
        "grad_norm2_rejected",
        "grad_inner",
        "cosine",
        "case",
    ]:
        assert col in table.columns
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    c = tokenize(tokenizer, [r["prompt"] for r in ROWS], [r["chosen"] for r in ROWS])
    r = tokenize(tokenizer, [r["prompt"] for r in ROWS], [r["rejected"] for r in ROWS])
    exact = exact_gradient_stats(model, c, r)
    torch.testing.assert_close(
        torch.tensor(table["grad_inner"].values), exact["inner"], rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        torch.tensor(table["logp_chosen"].values), exact["logp_chosen"], rtol=1e-5, atol=1e-6
    )
    assert (table["d_w"] == 0.1).all()  # beta/2 when the reference is the model itself


@pytest.mark.parametrize(
    ("rows", "args", "message"),
    [
        ([{"prompt": "p", "chosen": "a"}], [], "row 1: missing field(s) rejected"),
        ([ROWS[0], {**ROWS[1], "chosen": ""}], [], "row 2: empty chosen response"),
        (ROWS, ["--loss", "dpx"], "unknown loss 'dpx'"),
        (ROWS, ["--loss-param", "gamma=1"], "unknown hyperparameter 'gamma'"),
        (ROWS, ["--model", "/nonexistent/model"], "does not exist"),
    ],
)
def test_bad_input_gives_one_clear_error_and_no_csv(tmp_path, model_dir, rows, args, message):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "stats.csv"
    base = ["--model", str(model_dir), "--data", str(data), "--out", str(out)]
    proc = diagnose(*base, *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in proc.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [data]
