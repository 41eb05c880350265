"""Archived runs: an executed chapter and its results file, kept in git beside the book.

A run too long for a book build (the ``authors`` profile: the authors' schedule on the offline
model, hours on a CPU) is executed once with ``python -m ge_utils run NAME --profile authors
--archive`` and stored as ``archive/<profile>/<name>.ipynb`` and ``<name>.json``. The results
file carries the provenance of that run (profile, parameters, device, commit, date, wall time,
versions); the book shows its verdicts beside this build's, names its device and commit, and
marks an archive made at another commit as such. A book build never executes an archived run:
it only reads these files.

The stored notebook keeps what renders (markdown, code, text and image outputs) and drops the
rest (widget and JavaScript outputs, stderr streams, execution metadata), so an archived
chapter is a few hundred kilobytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nbformat

from ge_utils.io import atomic_write_json, atomic_write_text

ARCHIVE_DIR = Path("archive")
ARCHIVED_PROFILE = "authors"  # the profile whose archive the book shows beside each build
_DROPPED_MIME = ("application/vnd.jupyter.widget", "application/javascript")


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook with only what the book renders (in place; returned for chaining)."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                continue
            data = out.get("data")
            if data is not None:
                for mime in [m for m in data if m.startswith(_DROPPED_MIME)]:
                    del data[mime]
                if not data:
                    continue
            kept.append(out)
        cell.outputs = kept
    return nb


def store(
    nb: nbformat.NotebookNode, results: dict[str, Any], archive_dir: Path, profile: str
) -> Path:
    """Write the stripped notebook and its results to ``archive_dir/profile/`` (atomically)."""
    folder = Path(archive_dir) / profile
    name = results["notebook"]
    atomic_write_text(folder / f"{name}.ipynb", nbformat.writes(strip(nb)))
    atomic_write_json(folder / f"{name}.json", results)
    return folder / f"{name}.ipynb"


def load(archive_dir: Path, name: str, profile: str = ARCHIVED_PROFILE) -> dict[str, Any] | None:
    """The archived results of chapter ``name`` at ``profile``, or None (missing or broken)."""
    path = Path(archive_dir) / profile / f"{name}.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(results, dict) or not isinstance(results.get("claims"), list):
        return None
    return results


def same_commit(a: str | None, b: str | None) -> bool:
    """Whether two provenance commits name the same commit (a ``+dirty`` mark aside)."""
    if not a or not b:
        return False
    return a.removesuffix("+dirty") == b.removesuffix("+dirty")
