"""``python -m ge_utils compare A B``: two runs' claim verdicts side by side."""

import json

import pytest

from ge_book.compare import compare_results, load_results, relative_difference
from ge_utils.__main__ import main


def claim(text: str, verdict: str, effect: float | None = 1.0) -> dict:
    return {"claim": text, "kind": "takeaway", "verdict": verdict, "effect": effect,
            "interval": [0.0, 2.0] if effect is not None else None}  # fmt: skip


def write_run(folder, device: str, chapters: dict[str, list[dict]]):
    folder.mkdir()
    for name, claims in chapters.items():
        results = {"claims": claims, "notebook": f"{name}.ipynb",
                   "provenance": {"profile": "smoke", "device": device}}  # fmt: skip
        (folder / f"{name}.json").write_text(json.dumps(results), encoding="utf-8")
    return folder


def test_same_verdicts_exit_0(tmp_path, capsys):
    run = {"pitfall": [claim("chosen falls", "holds", -6.1), claim("identity", "holds", None)]}
    a = write_run(tmp_path / "cpu", "cpu (2 threads)", run)
    b = write_run(tmp_path / "gpu", "cuda (NVIDIA H200)", run)
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "pitfall: smoke on cpu (2 threads) | smoke on cuda (NVIDIA H200)" in out
    assert "2 claims in both runs, 0 with another verdict; 0 in one run only" in out
    assert "every effect of both runs identical (1 effects)" in out


def test_a_changed_verdict_an_extra_claim_and_a_missing_chapter_exit_1(tmp_path, capsys):
    a = write_run(tmp_path / "a", "cpu", {
        "pitfall": [claim("chosen falls", "holds", -6.0), claim("co-movement", "holds", 0.9)],
        "theorem": [claim("case 1", "holds", None)],
    })  # fmt: skip
    b = write_run(tmp_path / "b", "cuda", {
        "pitfall": [claim("chosen falls", "holds", -6.6), claim("co-movement", "inconclusive", 0.5),
                    claim("new", "holds", 1.0)],
    })  # fmt: skip
    table = compare_results(load_results(a), load_results(b))
    assert table["chapter"].tolist() == ["pitfall"] * 3 + ["theorem"]
    assert table["same_verdict"].tolist() == [True, False, False, False]
    assert table.loc[2, "verdict_a"] == "absent" and table.loc[3, "verdict_b"] == "absent"
    assert table.loc[0, "relative_difference"] == pytest.approx(0.6 / 6.6)
    assert main(["compare", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "[pitfall] co-movement" in out and "A: holds (effect 0.9)" in out
    assert "B: inconclusive (effect 0.5)" in out and "[pitfall] chosen falls" not in out
    assert "theorem: smoke on cpu | absent" in out
    assert "2 claims in both runs, 1 with another verdict; 2 in one run only" in out
    assert "largest relative difference of an effect: 0.444 ([pitfall] co-movement)" in out
    assert main(["compare", str(a), str(b), "--all"]) == 1
    assert "[pitfall] chosen falls" in capsys.readouterr().out


def test_relative_difference():
    assert relative_difference(0.0, 0.0) == 0.0 and relative_difference(2.0, -2.0) == 2.0
    assert relative_difference(1.0, float("nan")) != relative_difference(1.0, float("nan"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "holds no results file"),
        (lambda d: (d.mkdir(), (d / "x.json").write_text("{oops")), "not a readable results"),
        (lambda d: (d.mkdir(), (d / "x.json").write_text('{"claims": 3}')), "no list of claims"),
        (
            lambda d: (d.mkdir(), (d / "x.json").write_text('{"claims": ["x"]}')),
            "x.json: claim 0 must be a mapping with a string 'claim' and 'verdict', got 'x'",
        ),
        (
            lambda d: (d.mkdir(), (d / "x.json").write_text('{"claims": [{"claim": "c"}]}')),
            "claim 0 must be a mapping with a string 'claim' and 'verdict'",
        ),
        (
            lambda d: write_run(d, "cpu", {"x": [claim("c", "holds") | {"effect": "1.0"}]}),
            "x.json: claim 0 ('c'): 'effect' must be a number or null, got '1.0'",
        ),
        (
            lambda d: (
                d.mkdir(),
                (d / "x.json").write_text('{"claims": [], "provenance": "cpu"}'),
            ),
            "x.json: 'provenance' must be a mapping (profile, device, ...), got 'cpu'",
        ),
        (lambda d: d.write_text("{}"), "is a file, not a folder (pass the runner's --results-dir)"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, make, message):
    good = write_run(tmp_path / "good", "cpu", {"pitfall": [claim("c", "holds")]})
    make(tmp_path / "bad")
    assert main(["compare", str(good), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_runs_without_claims_compare_equal(tmp_path, capsys):
    a = write_run(tmp_path / "a", "cpu", {"pitfall": []})
    b = write_run(tmp_path / "b", "cuda", {"pitfall": []})
    table = compare_results(load_results(a), load_results(b))
    assert table.empty and "same_verdict" in table.columns
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "0 claims in both runs, 0 with another verdict; 0 in one run only" in out


def test_a_repeated_claim_text_is_kept_each_time(tmp_path, capsys):
    """Two claims of one chapter with the same text are matched by occurrence, not merged
    (before, the last one silently replaced the first)."""
    twice = [claim("c1", "holds", 1.0), claim("c1", "does not hold", 2.0)]
    a = write_run(tmp_path / "a", "cpu", {"x": twice})
    b = write_run(tmp_path / "b", "cuda", {"x": [twice[0], claim("c1", "holds", 2.0)]})
    table = compare_results(load_results(a), load_results(b))
    assert table["claim"].tolist() == ["c1", "c1 [#2]"]
    assert table["verdict_a"].tolist() == ["holds", "does not hold"]
    assert table["same_verdict"].tolist() == [True, False]
    assert main(["compare", str(a), str(b)]) == 1
    assert "[x] c1 [#2]\n      A: does not hold (effect 2)" in capsys.readouterr().out
