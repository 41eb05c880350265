"""The notebook runner: parameter validation, provenance, atomic outputs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from ge_book.parameters import (
    NotebookSpec,
    RunnerError,
    compatible,
    parse_overrides,
    resolve_parameters,
)

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    sys.executable,
    "-m",
    "ge_utils",
    "run",
    "--no-progress",
    "--notebooks-dir",
    "notebooks",
    "--out-dir",
    "out",
    "--results-dir",
    "res",
]


def make_notebook(path: Path, body: str, params: str = 'profile = "smoke"\nn = 3\nrate = 0.5\n'):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    title = nbformat.v4.new_markdown_cell("# Toy")
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    claims = nbformat.v4.new_code_cell(body)
    claims.metadata["tags"] = ["claims"]
    nb.cells = [title, cell, claims]
    nbformat.write(nb, path)


@pytest.fixture
def project(tmp_path):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    make_notebook(
        nbdir / "toy.ipynb",
        "from ge_utils.claims import ClaimReport\nr = ClaimReport()\n"
        "r.guarantee('n is positive', n > 0, 'n from the parameters', f'n={n}, rate={rate}')\n"
        "print(r)",
    )
    (nbdir / "profiles.yml").write_text("toy:\n  default: {n: 7}\n  paper: {rate: 2}\n")
    return tmp_path


def run(project: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [*RUN, *args]
    env = {**os.environ, "JUPYTER_PREFER_ENV_PATH": "1"}
    return subprocess.run(
        cmd, cwd=project, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_profile_and_overrides_resolve_in_order(project):
    proc = run(project, "toy", "--profile", "default", "-p", "rate", "0.25")
    assert proc.returncode == 0, proc.stderr
    res = json.loads((project / "res" / "toy.json").read_text())
    assert res["provenance"]["parameters"] == {"profile": "default", "n": 7, "rate": 0.25}
    assert res["claims"] == [
        {
            "kind": "guarantee",
            "verdict": "holds",
            "claim": "n is positive",
            "effect": None,
            "interval": None,
            "unit": "",
            "over": "this run",
            "evidence": "conditions: n from the parameters; n=7, rate=0.25",
            "poster": None,
        }
    ]
    nb = nbformat.read(project / "out" / "toy.ipynb", as_version=4)
    assert "provenance" in nb.cells[1].metadata["tags"]
    assert "profile | **default**" in nb.cells[1].source
    assert nb.metadata["ge_provenance"]["wall_time_s"] > 0


def test_yaml_file_overrides_and_p_wins(project):
    (project / "p.yaml").write_text("n: 11\nrate: 1\n")
    proc = run(project, "toy", "--profile", "smoke", "-f", "p.yaml", "-p", "n", "12")
    assert proc.returncode == 0, proc.stderr
    params = json.loads((project / "res" / "toy.json").read_text())["provenance"]["parameters"]
    assert params == {"profile": "smoke", "n": 12, "rate": 1}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["toy", "--profile", "huge"], "unknown profile 'huge'; expected one of smoke, default"),
        (["toy", "-p", "steps", "3"], "toy: unknown parameter 'steps' (from overrides); allowed:"),
        (["toy", "-p", "n", "many"], "toy: parameter 'n' expects int, got str 'many'"),
        (["toy", "-p", "n", "2.5"], "toy: parameter 'n' expects int, got float 2.5"),
        (["nope"], "unknown notebook 'nope'; available: toy"),
        (["toy", "-f", "missing.yaml"], "parameters file 'missing.yaml' does not exist"),
        (["toy", "--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["toy", "-p", "n", "null"], "toy: parameter 'n' expects int, got null (from overrides)"),
        (["toy", "-p", "rate", "fast"], "toy: parameter 'rate' expects float, got str 'fast'"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(project, args, message):
    proc = run(project, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]
    assert not (project / "out").exists() and not (project / "res").exists()


def test_jobs_run_at_once_and_wait_for_what_they_reuse(project):
    """With ``--jobs 2`` notebooks run in two processes, each kernel with its share of the CPU
    threads; ``late`` (metadata ``ge_book.after: [early]``) starts only once ``early`` is done,
    while ``toy`` runs beside ``early``."""
    nbdir = project / "notebooks"
    report = (
        "from ge_utils.claims import ClaimReport\nr = ClaimReport()\n"
        "r.guarantee('{claim}', {test}, 'ordering', 'files')\nprint(r)"
    )
    make_notebook(
        nbdir / "early.ipynb",
        "import os, pathlib, time\ntime.sleep(3)\n"
        "pathlib.Path('early.done').write_text(os.environ.get('OMP_NUM_THREADS', ''))\n"
        + report.format(claim="early ran", test="True"),
    )
    make_notebook(
        nbdir / "late.ipynb",
        "import pathlib\n"
        + report.format(claim="early was done", test="pathlib.Path('early.done').exists()"),
    )
    nb = nbformat.read(nbdir / "late.ipynb", as_version=4)
    nb.metadata["ge_book"] = {"after": ["early"]}
    nbformat.write(nb, nbdir / "late.ipynb")
    env_threads = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        proc = run(project, "late", "toy", "early", "--jobs", "2", timeout=300)
    finally:
        if env_threads is not None:
            os.environ["OMP_NUM_THREADS"] = env_threads
    assert proc.returncode == 0, proc.stderr
    started = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("running")]
    assert started == ["toy", "early", "late"]  # late waited although listed first
    for name in ("late", "toy", "early"):
        claims = json.loads((project / "res" / f"{name}.json").read_text())["claims"]
        assert [c["verdict"] for c in claims] == ["holds"], name
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert (nbdir / "early.done").read_text() == threads
    device = json.loads((project / "res" / "early.json").read_text())["provenance"]["device"]
    assert f"({threads} thread" in device

    nb.metadata["ge_book"] = {"after": ["nowhere"]}
    nbformat.write(nb, nbdir / "late.ipynb")
    proc = run(project, "late", "--jobs", "2")
    assert proc.returncode == 2
    assert "late: metadata ge_book.after must list other notebooks" in proc.stderr


def test_failing_cell_keeps_previous_outputs(project):
    assert run(project, "toy").returncode == 0
    before = (project / "out" / "toy.ipynb").read_bytes()
    make_notebook(project / "notebooks" / "toy.ipynb", "raise RuntimeError('boom')")
    proc = run(project, "toy")
    assert proc.returncode == 2
    assert "RuntimeError: boom" in proc.stderr
    assert (project / "out" / "toy.ipynb").read_bytes() == before
    assert (project / "res" / "toy.failed.ipynb").exists()


def test_killed_run_leaves_previous_outputs_complete(project):
    assert run(project, "toy").returncode == 0
    before = {p.name: p.read_bytes() for p in (project / "out").iterdir()}
    make_notebook(project / "notebooks" / "toy.ipynb", "import time\ntime.sleep(60)")
    cmd = [*RUN, "toy"]
    proc = subprocess.Popen(
        cmd,
        cwd=project,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(8)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert {p.name: p.read_bytes() for p in (project / "out").iterdir()} == before


def test_type_compatibility_rules():
    assert compatible(0.1, 1) and compatible(1, 1) and compatible("a", "b")
    assert not compatible(1, 0.5) and not compatible(True, 1) and not compatible(1, True)
    assert compatible(None, "x") and compatible([1], [2, 3]) and not compatible([1], "x")
    assert compatible(None, None) and not compatible(1, None) and not compatible("a", None)


def _toy_spec() -> NotebookSpec:
    defaults = {"profile": "smoke", "lr": 0.001, "n": 3, "model": "tiny-llama", "suffix": "x"}
    return NotebookSpec("toy", Path("toy.ipynb"), defaults)


@pytest.mark.parametrize("text", ["1e-5", "5e-6", "3E-3", "-2e+1"])
def test_exponent_floats_that_yaml_reads_as_strings_are_floats(tmp_path, text):
    """PyYAML reads ``1e-5`` (no dot) as a string; a float parameter takes it, from ``-p`` and
    from ``-f``."""
    (tmp_path / "p.yaml").write_text(f"lr: {text}\n")
    for overrides in (
        parse_overrides([["lr", text]], None),
        parse_overrides(None, str(tmp_path / "p.yaml")),
    ):
        assert overrides == {"lr": text}
        resolved = resolve_parameters(_toy_spec(), "smoke", {}, overrides)
        assert resolved["lr"] == float(text) and isinstance(resolved["lr"], float)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": "fast"}, "toy: parameter 'lr' expects float, got str 'fast'"),
        ({"lr": "true"}, "toy: parameter 'lr' expects float, got str 'true'"),
        ({"lr": True}, "toy: parameter 'lr' expects float, got bool True"),
        ({"n": "1e3"}, "toy: parameter 'n' expects int, got str '1e3'"),
        ({"n": None}, "toy: parameter 'n' expects int, got null (from overrides)"),
        ({"model": None}, "toy: parameter 'model' expects str, got null"),
        ({"model": ""}, "toy: parameter 'model' must be a non-empty string, got ''"),
        ({"model": "  "}, "toy: parameter 'model' must be a non-empty string, got '  '"),
    ],
)
def test_resolve_refuses_bad_values_with_their_name(overrides, message):
    with pytest.raises(RunnerError) as info:
        resolve_parameters(_toy_spec(), "smoke", {}, overrides)
    assert message in str(info.value)


def test_empty_p_value_is_the_empty_string_not_null():
    """``-p suffix ""`` is an empty suffix (a string parameter whose empty value means
    something), not null."""
    assert parse_overrides([["suffix", ""]], None) == {"suffix": ""}
    assert parse_overrides([["suffix", "null"]], None) == {"suffix": None}
    assert resolve_parameters(_toy_spec(), "smoke", {}, {"suffix": ""})["suffix"] == ""


def test_repository_notebooks_declare_valid_profiles():
    """Every profile in notebooks/profiles.yml names real parameters with the right types."""
    from ge_book.parameters import PROFILES, discover, load_profiles, load_spec, resolve_parameters

    nbdir = ROOT / "notebooks"
    profiles = load_profiles(nbdir)
    assert set(profiles) == set(discover(nbdir))
    for name in profiles:
        spec = load_spec(name, nbdir)
        for profile in PROFILES:
            assert resolve_parameters(spec, profile, profiles, {})["profile"] == profile


def test_every_repository_notebook_takes_a_device():
    """``-p device cuda`` (the book on a GPU) resolves for every notebook at every profile, and
    the device each ran on is in its provenance: every notebook declares ``device``, ``auto``
    by default."""
    from ge_book.parameters import PROFILES, discover, load_profiles, load_spec, resolve_parameters

    nbdir = ROOT / "notebooks"
    profiles = load_profiles(nbdir)
    for name in discover(nbdir):
        spec = load_spec(name, nbdir)
        assert spec.defaults.get("device") == "auto", name
        for profile in PROFILES:
            resolved = resolve_parameters(spec, profile, profiles, {"device": "cuda"})
            assert resolved["device"] == "cuda", (name, profile)


def test_repository_profiles_fit_the_synthetic_statement_pool():
    """Training plus held-out pairs of the synthetic task never exceed its statements (disjoint
    statements), so no profile fails at its first data call."""
    from ge_book.parameters import PROFILES, load_profiles, load_spec, resolve_parameters
    from ge_utils.data import statements

    pool = len(statements())
    nbdir = ROOT / "notebooks"
    profiles = load_profiles(nbdir)
    for name in profiles:
        spec = load_spec(name, nbdir)
        for profile in PROFILES:
            p = resolve_parameters(spec, profile, profiles, {})
            if p.get("dataset", "synthetic") != "synthetic":
                continue
            need = p.get("n_train", 0) + max(p.get("n_eval", 0), p.get("n_pairs", 0))
            assert need <= pool, f"{name} at {profile}: {need} pairs, {pool} statements"


PNG_1x1 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGA"
    "hKmMIQAAAABJRU5ErkJggg=="
)


def executed_chapter(path: Path, with_headline: bool) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A chapter")]
    prov = nbformat.v4.new_markdown_cell("provenance")
    prov.metadata["tags"] = ["provenance"]
    nb.cells.append(prov)
    if with_headline:
        fig = nbformat.v4.new_code_cell("plot()")
        fig.metadata["tags"] = ["headline"]
        fig.outputs = [nbformat.v4.new_output("display_data", data={"image/png": PNG_1x1})]
        nb.cells.append(fig)
    nbformat.write(nb, path)


def test_pages_show_verdicts_headline_and_unbuilt_chapters(tmp_path):
    from ge_book.pages import write_pages

    out, res = tmp_path / "book" / "chapters", tmp_path / "results"
    out.mkdir(parents=True)
    res.mkdir()
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nparts:\n  - chapters:\n"
        "      - file: book/chapters/first\n      - file: book/chapters/second\n"
    )
    (tmp_path / "_config.yml").write_text(
        "repository:\n  url: https://github.com/someone/fork\n  branch: dev\n"
    )
    executed_chapter(out / "first.ipynb", with_headline=True)
    record = {
        "notebook": "first",
        "provenance": {
            "profile": "default",
            "parameters": {"profile": "default", "model": "tiny | model"},
            "device": "cpu (2 threads, x86_64)",
            "torch": "2",
            "transformers": "5",
            "ge_utils": "0.1",
            "python": "3.11",
            "git_commit": "abc123+dirty",
            "date": "today",
            "wall_time_s": 1.5,
        },
        "claims": [
            {"kind": "guarantee", "claim": "margin grows", "verdict": "holds", "evidence": "3/3",
             "effect": None, "interval": None, "over": "3 pairs", "poster": "condition"},
            {"kind": "takeaway", "claim": "chosen falls", "verdict": "does not hold",
             "effect": 1.0, "interval": [0.5, 1.5], "unit": "nats", "over": "4 pairs x 2 seeds",
             "evidence": "+1 nat", "poster": "chosen-falls"},
            {"kind": "takeaway", "claim": "rejected rises", "verdict": "inconclusive",
             "effect": 0.1, "interval": [-0.5, 0.7], "unit": "nats", "over": "4 pairs x 2 seeds",
             "evidence": "", "poster": None},
            {"kind": "consistency", "claim": "norms >= 0", "verdict": "holds", "effect": None,
             "interval": None, "over": "this run", "evidence": "8/8", "poster": None},
        ],
    }
    (res / "first.json").write_text(json.dumps(record))
    (res / "second.json").write_text("{not json")  # a broken results file is "not built"
    chapters = write_pages(out, res, ["second", "first"], tmp_path / "nb", tmp_path, True)
    assert [(c.name, c.built) for c in chapters] == [("first", True), ("second", False)]
    summary = (out / "summary.md").read_text()
    assert (
        "| {doc}`chapters/first`<br>`tiny \\| model`, default | margin grows "  # pipes escaped
        "| {bdg-success}`holds`<br>guarantee | — | 3 pairs |" in summary
    )
    assert (
        "|  | chosen falls | {bdg-danger}`does not hold`<br>takeaway | 1 nats [0.5, 1.5] "
        "| 4 pairs x 2 seeds |" in summary
    )
    assert "{bdg-warning}`inconclusive`<br>takeaway | 0.1 nats [-0.5, 0.7]" in summary
    assert "norms >= 0" not in summary  # consistency checks stay in their chapter
    assert "| second | — | {bdg-secondary}`not built` |" in summary  # no link to a missing page
    assert "1 of 2 chapters built" in summary
    assert "of 3 takeaways and guarantees, 1 hold, 1 do not hold and 1 are inconclusive" in summary
    assert (
        "Of the 2 that speak to a row of the poster, 1 hold, 1 do not hold and 0 are "
        "inconclusive; the other 1 are our own questions" in summary
    )
    assert "| rejected rises *(ours)* |" in summary and "| chosen falls |" in summary
    poster = summary.split("### Every takeaway")[0]
    assert "| The chosen log-probability may decrease under margin-based training | " in poster
    assert "`does not hold`<br>takeaway | 1 nats [0.5, 1.5] | 4 pairs x 2 seeds | " in poster
    assert "| Co-movement" not in poster and "`not measured`" in poster
    assert "```{figure} chapters/headline.png" in summary
    assert (out / "headline.png").read_bytes()[:4] == b"\x89PNG"
    repro = (out / "reproducibility.md").read_text()
    assert "python -m ge_utils run second --profile paper" in repro
    assert "**not built**" in repro and "`abc123+dirty`" in repro
    assert "https://github.com/someone/fork/blob/dev/notebooks/first.ipynb" in repro
    nb = nbformat.read(out / "first.ipynb", as_version=4)
    assert nb.cells[2].metadata["tags"] == ["launch"]
    launch = nb.cells[2].source
    assert (
        "https://colab.research.google.com/github/someone/fork/blob/dev/notebooks/first.ipynb"
        in launch
    )
    assert "https://mybinder.org/v2/gh/someone/fork/dev?labpath=notebooks%2Ffirst.ipynb" in launch
    assert "{download}`download this executed notebook <first.ipynb>`" in launch
    write_pages(out, res, ["first", "second"], tmp_path / "nb", tmp_path, True)
    nb = nbformat.read(out / "first.ipynb", as_version=4)
    assert sum("launch" in c.metadata.get("tags", []) for c in nb.cells) == 1  # replaced


def test_run_writes_pages_and_pages_only_refreshes_links(project):
    assert run(project, "toy").returncode == 0
    summary = (project / "out" / "summary.md").read_text()
    assert "n is positive" in summary and "No headline figure" in summary
    assert "toy" in (project / "out" / "reproducibility.md").read_text()
    nb = nbformat.read(project / "out" / "toy.ipynb", as_version=4)
    assert any("launch" in c.metadata.get("tags", []) for c in nb.cells)
    (project / "_config.yml").write_text("repository:\n  url: https://github.com/me/mine\n")
    proc = run(project, "--pages-only")
    assert proc.returncode == 0, proc.stderr
    assert "1/1 chapters built" in proc.stderr
    nb = nbformat.read(project / "out" / "toy.ipynb", as_version=4)
    launch = next(c for c in nb.cells if "launch" in c.metadata.get("tags", []))
    assert "github.com/me/mine/blob/main/notebooks/toy.ipynb" in launch.source


def test_ge_book_cli_is_the_same_runner(project):
    """``python -m ge_book run`` and ``python -m ge_utils run`` write the same results."""
    args = RUN[4:]
    ours = subprocess.run(
        [sys.executable, "-m", "ge_book", "run", *args, "toy", "--results-dir", "res2"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JUPYTER_PREFER_ENV_PATH": "1"},
    )
    assert ours.returncode == 0, ours.stderr
    assert run(project, "toy").returncode == 0
    first, second = (json.loads((project / d / "toy.json").read_text()) for d in ("res", "res2"))
    assert first["claims"] == second["claims"]
    assert first["provenance"]["parameters"] == second["provenance"]["parameters"]


def test_consistency_checks_fold_into_a_collapsed_block():
    from ge_book.runner import _annotate

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(report)")
    cell.metadata["tags"] = ["claims"]
    text = (
        "[takeaway @chosen-falls] HOLDS: chosen falls | effect -2 nats, 95% CI [-3, -1], "
        "over 4 pairs x 2 seeds | claimed < 0\n"
        "[consistency] HOLDS: norms >= 0 | over this run | 8/8\n"
    )
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
    nb.cells = [nbformat.v4.new_markdown_cell("# T"), cell]
    record = {"profile": "smoke", "parameters": {}, "device": "cpu", "date": "today",
              "git_commit": "abc", "torch": "2", "transformers": "5", "ge_utils": "0.1",
              "python": "3.11"}
    claims = _annotate(nb, record)
    assert [k["kind"] for k in claims] == ["takeaway", "consistency"]
    assert "norms" not in cell.outputs[0]["text"] and "chosen falls" in cell.outputs[0]["text"]
    assert nb.cells[-1].cell_type == "markdown"
    assert nb.cells[-1].source.startswith(":::{dropdown} Consistency checks of the code: 1 of 1")
    assert "norms >= 0 (8/8; over this run)" in nb.cells[-1].source


def test_archive_is_shown_beside_the_build_and_marked_from_another_commit(project):
    """The archive path at smoke size: store a run, show both columns, mark another commit."""
    from ge_book.pages import write_pages

    proc = run(project, "toy", "--profile", "authors", "--archive", "--archive-dir", "arch")
    assert proc.returncode == 0, proc.stderr
    stored = json.loads((project / "arch" / "authors" / "toy.json").read_text())
    assert stored["provenance"]["profile"] == "authors"
    for key in ("device", "git_commit", "date", "wall_time_s", "torch", "python"):
        assert key in stored["provenance"]
    archived_nb = nbformat.read(project / "arch" / "authors" / "toy.ipynb", as_version=4)
    assert all("execution" not in c.metadata for c in archived_nb.cells)
    # A default build: it does not re-execute the archive, and shows it beside its own verdict.
    before = (project / "arch" / "authors" / "toy.json").stat().st_mtime_ns
    proc = run(project, "toy", "--profile", "default", "--archive-dir", "arch")
    assert proc.returncode == 0, proc.stderr
    assert (project / "arch" / "authors" / "toy.json").stat().st_mtime_ns == before
    summary = (project / "out" / "summary.md").read_text()
    assert "authors scale (archived)" in summary
    row = next(line for line in summary.splitlines() if "| n is positive" in line)
    assert row.count("{bdg-success}`holds`") == 2  # this build and the archive
    launch = nbformat.read(project / "out" / "toy.ipynb", as_version=4).cells[2].source
    assert "archived authors-scale run <../arch/authors/toy.ipynb>" in launch
    build = json.loads((project / "res" / "toy.json").read_text())["provenance"]["git_commit"]
    for commit, mark in ((build, "(this build's commit)"),
                         ("0123abc", "({bdg-warning}`another commit` than this build's)")):
        stored["provenance"]["git_commit"] = commit
        (project / "arch" / "authors" / "toy.json").write_text(json.dumps(stored))
        write_pages(project / "out", project / "res", ["toy"], project / "notebooks", project,
                    archive_dir=project / "arch")
        summary = (project / "out" / "summary.md").read_text()
        assert f"commit `{commit}` {mark}" in summary
        assert "`pooled over seeds`" not in summary  # made under this build's interval rule
    # A run stored before intervals were taken at the seed level is marked as such.
    del stored["provenance"]["intervals"]
    stored["claims"][0]["over"] = "4 pairs x 3 seeds"
    (project / "arch" / "authors" / "toy.json").write_text(json.dumps(stored))
    write_pages(project / "out", project / "res", ["toy"], project / "notebooks", project,
                archive_dir=project / "arch")
    summary = (project / "out" / "summary.md").read_text()
    assert "{bdg-warning}`pooled over seeds`: made before intervals" in summary
    row = next(line for line in summary.splitlines() if "| n is positive" in line)
    assert row.endswith("(pooled over seeds) |")


def test_refresh_sources_stores_checked_outputs_and_the_machine(project):
    """``--refresh-sources`` keeps the outputs nbval checks and records the machine they were
    computed on, where scripts/test.sh compares their numbers."""
    path = project / "notebooks" / "toy.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells[2].source = "# NBVAL_CHECK_OUTPUT\n" + nb.cells[2].source
    nbformat.write(nb, path)
    proc = run(project, "--refresh-sources")
    assert proc.returncode == 0, proc.stderr
    stored = nbformat.read(path, as_version=4).cells[2].outputs
    assert "".join(o["text"] for o in stored).startswith("[guarantee] HOLDS: n is positive | ")
    code = "from ge_book.provenance import machine_fingerprint as f; print(f())"
    here = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert (project / "notebooks" / "nbval-machine.txt").read_text() == here
    assert "torch thread" in here and "flags" in here


def test_another_machine_compares_the_kinds_of_claim_lines_only():
    """The sanitizer scripts/test.sh gives nbval off the machine that stored the outputs: a
    verdict or a number may differ there, the claim lines' number, order and kinds may not."""
    from nbval.plugin import get_sanitize_patterns

    cfg = (ROOT / "notebooks" / "nbval-other-machine.cfg").read_text(encoding="utf-8")
    patterns = get_sanitize_patterns(cfg)
    assert len(patterns) == 1

    def clean(text: str) -> str:
        for regex, replace in patterns:
            text = re.sub(regex, replace, text)
        return text

    here = (
        "[takeaway @chosen-falls] HOLDS: chosen falls | effect -1.73 nats, 95% CI [-2.8, -0.68], "
        "over 8 held-out pairs x 2 seeds | claimed < 0\n[guarantee] HOLDS: g | over 2 pairs | e\n"
    )
    there = here.replace("HOLDS: chosen", "INCONCLUSIVE: chosen").replace("-1.73", "-0.42")
    assert clean(here) == clean(there) == "[takeaway @chosen-falls] ...\n[guarantee] ...\n"
    assert clean(here) != clean(here.replace("[guarantee]", "[consistency]"))
    assert clean(here) != clean(here + "[guarantee] HOLDS: h | over 1 pair | e\n")
