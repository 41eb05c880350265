"""Smoke build of the whole book: every notebook through the runner, then Jupyter Book -W."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_book_builds_at_smoke_with_warnings_as_errors(tmp_path):
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "book", tmp_path / "book", ignore=shutil.ignore_patterns("chapters"))
    env = {**os.environ, "JUPYTER_PREFER_ENV_PATH": "1"}
    env.pop("MPLBACKEND", None)  # the inline backend puts figures in the notebooks
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "ge_utils",
            "run",
            "--profile",
            "smoke",
            "--no-progress",
            "--notebooks-dir",
            str(ROOT / "notebooks"),
            "--out-dir",
            str(tmp_path / "book/chapters"),
            "--results-dir",
            str(tmp_path / "results"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    jb = Path(sys.executable).with_name("jupyter-book")
    build = subprocess.run(
        [str(jb), "build", "-W", "-n", "--keep-going", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert build.returncode == 0, (build.stdout + build.stderr)[-3000:]
    html = tmp_path / "_build" / "html"
    intro = (html / "book" / "intro.html").read_text(encoding="utf-8")
    assert "What this build reproduced" in intro and "claims held" in intro
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    for entry in (c for part in toc["parts"] for c in part["chapters"]):
        page = (html / entry["file"]).with_suffix(".html").read_text(encoding="utf-8")
        assert "Provenance of this page" in page
        assert "Smoke profile" in page
        assert "Traceback" not in page and "output_error" not in page
        assert "HOLDS" in page
        assert "<img" in page, f"{entry['file']}: no figure rendered"
