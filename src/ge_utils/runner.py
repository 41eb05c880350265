"""Run the book's notebooks with papermill under a named profile.

``python -m ge_utils run [NOTEBOOK ...] [--profile default] [-p NAME VALUE ...] [-f PARAMS.yaml]``

Parameters are resolved in this order, later ones winning: the notebook's own parameters cell
(its values are the smoke profile, so nbval can run the source as is), the profile's values from
``notebooks/profiles.yml``, a YAML file (``-f``), then ``-p`` pairs. Every name and type is
checked against the parameters cell before anything runs. Each executed notebook is written
atomically to ``--out-dir`` (where the book reads it) with a provenance block at its top, and a
results file (provenance + claim verdicts) to ``--results-dir``. A run that fails or is
interrupted leaves the previous complete outputs in place.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import yaml

from ge_utils.claims import parse_verdicts
from ge_utils.io import atomic_write_json, atomic_write_text
from ge_utils.provenance import provenance_markdown, provenance_record

PROFILES = ("smoke", "default", "paper")
CHECK_MARK = "# NBVAL_CHECK_OUTPUT"


class RunnerError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


@dataclass
class NotebookSpec:
    """A source notebook and its declared parameters (name -> default value)."""

    name: str
    path: Path
    defaults: dict[str, Any]


def discover(notebooks_dir: Path) -> dict[str, Path]:
    """Source notebooks by name (file stem), sorted."""
    if not notebooks_dir.is_dir():
        raise RunnerError(f"notebooks folder {str(notebooks_dir)!r} does not exist")
    return {p.stem: p for p in sorted(notebooks_dir.glob("*.ipynb"))}


def declared_parameters(path: Path) -> dict[str, Any]:
    """Parameter names and default values of the cell tagged ``parameters``."""
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise RunnerError(f"{path.name}: expected one cell tagged 'parameters', found {len(cells)}")
    out: dict[str, Any] = {}
    for node in ast.parse(cells[0].source).body:
        if not (isinstance(node, ast.Assign | ast.AnnAssign)):
            continue
        target = node.targets[0] if isinstance(node, ast.Assign) else node.target
        if isinstance(target, ast.Name) and node.value is not None:
            try:
                out[target.id] = ast.literal_eval(node.value)
            except ValueError as exc:
                raise RunnerError(
                    f"{path.name}: parameter {target.id!r} must be a literal value"
                ) from exc
    if "profile" not in out:
        raise RunnerError(f"{path.name}: the parameters cell must declare 'profile'")
    return out


def load_spec(name: str, notebooks_dir: Path) -> NotebookSpec:
    available = discover(notebooks_dir)
    if name.endswith(".ipynb"):
        name = Path(name).stem
    if name not in available:
        known = ", ".join(available) or "none"
        raise RunnerError(f"unknown notebook {name!r}; available: {known}")
    return NotebookSpec(name, available[name], declared_parameters(available[name]))


def load_profiles(notebooks_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    path = notebooks_dir / "profiles.yml"
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise RunnerError(f"{path}: expected a mapping notebook -> profile -> parameters")
    return data


def type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def compatible(default: Any, value: Any) -> bool:
    """Whether ``value`` may replace a parameter whose default is ``default``."""
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, type(default))


def resolve_parameters(
    spec: NotebookSpec,
    profile: str,
    profiles: dict[str, dict[str, dict[str, Any]]],
    overrides: dict[str, Any],
) -> dict[str, Any]:
    """Merge defaults < profile < overrides, checking every name and type."""
    if profile not in PROFILES:
        raise RunnerError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    allowed = ", ".join(sorted(spec.defaults))
    profile_values = (profiles.get(spec.name) or {}).get(profile) or {}
    merged = dict(spec.defaults)
    for source, values in (("profiles.yml", profile_values), ("overrides", overrides)):
        for key, value in values.items():
            if key not in spec.defaults:
                raise RunnerError(
                    f"{spec.name}: unknown parameter {key!r} (from {source}); allowed: {allowed}"
                )
            if not compatible(spec.defaults[key], value):
                raise RunnerError(
                    f"{spec.name}: parameter {key!r} expects {type_name(spec.defaults[key])}, "
                    f"got {type_name(value)} {value!r}"
                )
            merged[key] = value
    if overrides.get("profile", profile) != profile:
        raise RunnerError(f"{spec.name}: use --profile, not -p profile")
    merged["profile"] = profile
    return merged


def parse_overrides(pairs: list[list[str]] | None, yaml_file: str | None) -> dict[str, Any]:
    """``-f`` YAML values, then ``-p NAME VALUE`` pairs (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    if yaml_file:
        path = Path(yaml_file)
        if not path.is_file():
            raise RunnerError(f"parameters file {yaml_file!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise RunnerError(f"parameters file {yaml_file!r} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise RunnerError(f"parameters file {yaml_file!r} must hold a mapping name: value")
        out.update(data)
    for name, raw in pairs or []:
        try:
            out[name] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[name] = raw
    return out


def _annotate(nb: nbformat.NotebookNode, record: dict[str, Any]) -> list[dict]:
    """Insert the provenance block at the top; return the claim verdicts found in outputs."""
    cell = nbformat.v4.new_markdown_cell(provenance_markdown(record))
    cell.metadata["tags"] = ["provenance"]
    first_is_title = nb.cells and nb.cells[0].cell_type == "markdown"
    nb.cells.insert(1 if first_is_title else 0, cell)
    nb.metadata["ge_provenance"] = record
    for c in nb.cells:  # the injected-parameters cell shows what ran; hide the defaults
        if "parameters" in c.metadata.get("tags", []):
            c.metadata["tags"] = [*c.metadata["tags"], "remove-cell"]
    claims: list[dict] = []
    for c in nb.cells:
        if c.cell_type == "code" and "claims" in c.metadata.get("tags", []):
            text = "".join(o.get("text", "") for o in c.get("outputs", []) if o.get("text"))
            claims.extend(parse_verdicts(text))
    return claims


def execute(
    spec: NotebookSpec,
    parameters: dict[str, Any],
    out_dir: Path,
    results_dir: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Execute one notebook; write it and its results atomically. Returns the results record."""
    import papermill

    os.environ.setdefault("JUPYTER_PREFER_ENV_PATH", "1")
    os.environ.pop("MPLBACKEND", None)  # a non-inline backend would drop every figure
    record = provenance_record(parameters["profile"], parameters, parameters.get("device", "cpu"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"ge-run-{spec.name}-") as tmp:
        tmp_nb = Path(tmp) / f"{spec.name}.ipynb"
        start = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(spec.path),
                str(tmp_nb),
                parameters=parameters,
                kernel_name="python3",
                cwd=str(spec.path.parent),
                progress_bar=progress,
            )
        except papermill.PapermillExecutionError as exc:
            failed = results_dir / f"{spec.name}.failed.ipynb"
            shutil.copyfile(tmp_nb, failed)
            raise RunnerError(
                f"{spec.name}: cell {exc.exec_count} failed with {exc.ename}: {exc.evalue} "
                f"(executed notebook kept at {failed}; previous outputs untouched)"
            ) from exc
        record["wall_time_s"] = round(time.perf_counter() - start, 1)
        nb = nbformat.read(tmp_nb, as_version=4)
    claims = _annotate(nb, record)
    results = {"notebook": spec.name, "provenance": record, "claims": claims}
    atomic_write_text(out_dir / f"{spec.name}.ipynb", nbformat.writes(nb))
    atomic_write_json(results_dir / f"{spec.name}.json", results)
    return results


def summary_markdown(records: list[dict[str, Any]]) -> str:
    """A Markdown table of every chapter's claim verdicts, read from the runs' results files."""
    lines = [
        "| chapter | profile | device | claims held | verdicts |",
        "|---|---|---|---|---|",
    ]
    for rec in records:
        prov, claims = rec["provenance"], rec["claims"]
        held = sum(c["holds"] for c in claims)
        verdicts = "<br>".join(
            f"**{'holds' if c['holds'] else 'does not hold'}** ({c['kind']}): {c['claim']}: "
            f"{c['evidence']}"
            for c in claims
        )
        lines.append(
            f"| {{doc}}`chapters/{rec['notebook']}` | {prov['profile']} | {prov['device']} "
            f"| {held}/{len(claims)} | {verdicts} |"
        )
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path, results_dir: Path, names: list[str]) -> None:
    """Write ``out_dir/summary.md`` from the results files of ``names`` that exist."""
    records = []
    for name in names:
        path = results_dir / f"{name}.json"
        if path.exists():
            records.append(json.loads(path.read_text(encoding="utf-8")))
    atomic_write_text(out_dir / "summary.md", summary_markdown(records))


def refresh_source(spec: NotebookSpec) -> None:
    """Re-execute a source notebook at its own (smoke) defaults and keep only checked outputs.

    nbval compares the outputs of cells marked ``# NBVAL_CHECK_OUTPUT``; every other output is
    dropped so the sources stay small.
    """
    import papermill

    os.environ.setdefault("JUPYTER_PREFER_ENV_PATH", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_nb = Path(tmp) / spec.path.name
        papermill.execute_notebook(
            str(spec.path), str(tmp_nb), kernel_name="python3", cwd=str(spec.path.parent)
        )
        nb = nbformat.read(tmp_nb, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        if CHECK_MARK not in cell.source:
            cell.outputs = []
            cell.execution_count = None
    nb.metadata.pop("papermill", None)
    atomic_write_text(spec.path, nbformat.writes(nb))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("notebooks", nargs="*", help="notebook names (file stems); default all")
    parser.add_argument("--profile", default="default", help=f"one of {', '.join(PROFILES)}")
    parser.add_argument(
        "-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"), dest="pairs"
    )
    parser.add_argument("-f", "--parameters-file", help="YAML file of parameter overrides")
    parser.add_argument("--notebooks-dir", default="notebooks", type=Path)
    parser.add_argument("--out-dir", default="book/chapters", type=Path)
    parser.add_argument("--results-dir", default="results", type=Path)
    parser.add_argument("--list", action="store_true", help="list notebooks and parameters")
    parser.add_argument(
        "--refresh-sources",
        action="store_true",
        help="re-execute the sources at smoke and store the outputs nbval checks",
    )
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    try:
        available = discover(args.notebooks_dir)
        names = args.notebooks or list(available)
        if not names:
            raise RunnerError(f"no notebooks in {str(args.notebooks_dir)!r}")
        specs = [load_spec(n, args.notebooks_dir) for n in names]
        if args.list:
            profiles = load_profiles(args.notebooks_dir)
            for s in specs:
                print(f"{s.name}: profiles {', '.join(profiles.get(s.name, {})) or 'none'}")
                for k, v in s.defaults.items():
                    print(f"  {k} = {v!r} ({type_name(v)})")
            return 0
        if args.refresh_sources:
            for s in specs:
                print(f"refreshing {s.path}", file=sys.stderr)
                refresh_source(s)
            return 0
        profiles = load_profiles(args.notebooks_dir)
        overrides = parse_overrides(args.pairs, args.parameters_file)
        plan = [(s, resolve_parameters(s, args.profile, profiles, overrides)) for s in specs]
        for spec, params in plan:
            print(f"running {spec.name} at profile {args.profile}", file=sys.stderr)
            res = execute(spec, params, args.out_dir, args.results_dir, not args.no_progress)
            held = sum(c["holds"] for c in res["claims"])
            print(
                f"{spec.name}: {res['provenance']['wall_time_s']} s, "
                f"{held}/{len(res['claims'])} claims hold -> {args.out_dir / spec.name}.ipynb",
                file=sys.stderr,
            )
        write_summary(args.out_dir, args.results_dir, list(available))
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
