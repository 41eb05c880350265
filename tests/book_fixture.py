"""The smoke build of the whole book, shared by tests/test_book.py and tests/test_browser.py.

``build_smoke_book(folder)`` copies the book's configuration and prose pages into ``folder``,
executes every notebook at the smoke profile through the runner, and builds the book with
``jupyter-book build -W -n --keep-going``. It records both steps and never raises on their
failure: tests/test_book.py asserts on them, tests/test_browser.py skips its checks when the
build failed (test_book reports why). conftest.py exposes it as the session fixture
``smoke_book``, so the book is built once per test run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BookBuild:
    root: Path  # the temporary project: _config.yml, _toc.yml, book/, results/
    run: subprocess.CompletedProcess  # python -m ge_utils run --profile smoke
    build: subprocess.CompletedProcess  # jupyter-book build -W -n --keep-going .
    run_seconds: float
    build_seconds: float

    @property
    def html(self) -> Path:
        return self.root / "_build" / "html"

    @property
    def ok(self) -> bool:
        return self.run.returncode == 0 and self.build.returncode == 0

    def log_tail(self, n: int = 3000) -> str:
        return (self.run.stderr + self.build.stdout + self.build.stderr)[-n:]


def build_smoke_book(folder: Path) -> BookBuild:
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, folder / name)
    shutil.copytree(
        ROOT / "book",
        folder / "book",
        ignore=shutil.ignore_patterns("chapters", "__pycache__"),
    )
    env = {**os.environ, "JUPYTER_PREFER_ENV_PATH": "1"}
    env.pop("MPLBACKEND", None)  # the inline backend puts figures in the notebooks
    start = time.perf_counter()
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
            str(folder / "book/chapters"),
            "--results-dir",
            str(folder / "results"),
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    run_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if run.returncode != 0:
        build = subprocess.CompletedProcess([], 1, "", "not built: the runner failed")
    else:
        jb = Path(sys.executable).with_name("jupyter-book")
        build = subprocess.run(
            [str(jb), "build", "-W", "-n", "--keep-going", "."],
            cwd=folder,
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
    return BookBuild(folder, run, build, run_seconds, time.perf_counter() - start)
