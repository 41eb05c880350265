"""Packaging: the science package ``ge_utils`` needs none of the book tooling.

``ge_book`` (runner, pages, provenance) is installed with the ``book`` extra; ``pip install .``
without extras must not pull papermill, nbformat or jupyter-book, and every ``ge_utils`` module
must import without them.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK_ONLY = ("papermill", "nbformat", "jupyter-book")

# Runs first in a child interpreter: any import of the book tooling fails as if not installed.
BLOCKER = """
import importlib.abc, sys
BLOCKED = {"papermill", "nbformat", "jupyter_book", "myst_nb"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


def blocked_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_blocker_blocks():
    proc = blocked_python("import papermill")
    assert proc.returncode != 0 and "(blocked)" in proc.stderr


def test_every_ge_utils_module_imports_without_book_tooling():
    proc = blocked_python(
        "import importlib, pkgutil, ge_utils\n"
        "names = [m.name for m in pkgutil.iter_modules(ge_utils.__path__)]\n"
        "names.remove('__main__')\n"
        "for n in names:\n"
        "    importlib.import_module('ge_utils.' + n)\n"
        "print(len(names), 'trl_integration' in names)\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, has_trl = proc.stdout.split()
    assert int(count) >= 10 and has_trl == "True"


def test_run_without_book_extra_is_one_clear_line():
    code = "import runpy\nrunpy.run_module('ge_utils', run_name='__main__', alter_sys=True)\n"
    proc = blocked_python(code, "run", "--list")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install -e '.[book]'" in lines[0], proc.stderr
    other = blocked_python(code, "diagnose", "--help")  # the science subcommand still works
    assert other.returncode == 0, other.stderr[-2000:]
    book = blocked_python("from ge_book.__main__ import main\nmain(['run', '--list'])\n")
    assert book.returncode == 2 and "pip install -e '.[book]'" in book.stderr, book.stderr


def test_core_dependencies_exclude_book_tooling():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _requirement_names(project["dependencies"])
    assert not core & set(BOOK_ONLY)
    assert set(BOOK_ONLY) <= _requirement_names(project["optional-dependencies"]["book"])


def test_wheel_metadata_requires_book_tooling_only_with_the_extra(tmp_path):
    """The metadata ``pip install .`` would record, built now from pyproject.toml (setuptools'
    PEP 517 hook, no network): papermill etc. only under ``extra == "book"``."""
    code = (
        "import sys\nfrom setuptools import build_meta\n"
        "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = tmp_path / proc.stdout.strip().splitlines()[-1] / "METADATA"
    requires = [
        line.removeprefix("Requires-Dist: ")
        for line in info.read_text(encoding="utf-8").splitlines()
        if line.startswith("Requires-Dist: ")
    ]
    unconditional = [r for r in requires if "extra ==" not in r]
    assert "torch>=2.4" in unconditional
    assert not _requirement_names(unconditional) & set(BOOK_ONLY), unconditional
    book = [r for r in requires if re.search(r"extra\s*==\s*['\"]book['\"]", r)]
    assert set(BOOK_ONLY) <= _requirement_names(book)


def test_both_packages_are_discovered():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = config["packages"]["find"]["include"]
    assert "ge_utils*" in include and "ge_book*" in include
    assert (ROOT / "src" / "ge_book" / "__init__.py").is_file()
