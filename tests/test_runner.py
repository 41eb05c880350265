"""The notebook runner: parameter validation, provenance, atomic outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from ge_utils.runner import compatible

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
        "r.guaranteed('n is positive', n > 0, f'n={n}, rate={rate}')\nprint(r)",
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
            "kind": "guaranteed",
            "claim": "n is positive",
            "holds": True,
            "evidence": "n=7, rate=0.25",
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
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(project, args, message):
    proc = run(project, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]
    assert not (project / "out").exists() and not (project / "res").exists()


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


def test_repository_notebooks_declare_valid_profiles():
    """Every profile in notebooks/profiles.yml names real parameters with the right types."""
    from ge_utils.runner import PROFILES, discover, load_profiles, load_spec, resolve_parameters

    nbdir = ROOT / "notebooks"
    profiles = load_profiles(nbdir)
    assert set(profiles) == set(discover(nbdir))
    for name in profiles:
        spec = load_spec(name, nbdir)
        for profile in PROFILES:
            assert resolve_parameters(spec, profile, profiles, {})["profile"] == profile
