"""Run the book's notebooks with papermill under a named profile.

``python -m ge_book run [NOTEBOOK ...] [--profile default] [-p NAME VALUE ...] [-f PARAMS.yaml]``
(``python -m ge_utils run`` is the same command).

Parameters are resolved by :mod:`ge_book.parameters`. Each executed notebook is written
atomically to ``--out-dir`` (where the book reads it) with a provenance block at its top, and a
results file (provenance + claim verdicts) to ``--results-dir``. A run that fails or is
interrupted leaves the previous complete outputs in place. After every run, and alone with
``--pages-only``, the runner writes the generated pages (:mod:`ge_book.pages`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import nbformat

from ge_book.archive import ARCHIVE_DIR, store
from ge_book.pages import (
    Repository,
    add_launch_cell,
    archived_link,
    book_repository,
    write_pages,
)
from ge_book.parameters import (
    PROFILES,
    NotebookSpec,
    RunnerError,
    discover,
    load_profiles,
    load_spec,
    parse_overrides,
    resolve_parameters,
    type_name,
)
from ge_book.provenance import machine_fingerprint, provenance_markdown, provenance_record
from ge_utils.claims import parse_verdicts
from ge_utils.io import atomic_write_json, atomic_write_text

CHECK_MARK = "# NBVAL_CHECK_OUTPUT"
# the machine that stored the checked outputs (scripts/test.sh compares numbers only on it)
NBVAL_MACHINE = "nbval-machine.txt"


def _papermill() -> ModuleType:
    """papermill, imported when a notebook runs (a missing ``book`` extra is a RunnerError)."""
    try:
        import papermill
    except ModuleNotFoundError as exc:
        raise RunnerError("papermill is not installed: pip install -e '.[book]'") from exc
    return papermill


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
            _fold_consistency(c)
    checks = [k for k in claims if k["kind"] == "consistency"]
    if checks:
        nb.cells.append(nbformat.v4.new_markdown_cell(consistency_markdown(checks)))
    return claims


def _fold_consistency(cell: nbformat.NotebookNode) -> None:
    """Drop the consistency lines from a claims cell's printed output (they go in a collapsed
    block at the end of the chapter: checks of the code, not of the paper)."""
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream" and out.get("text"):
            kept = [
                line for line in out["text"].splitlines(keepends=True)
                if not line.startswith("[consistency")
            ]
            out["text"] = "".join(kept)


def consistency_markdown(checks: list[dict]) -> str:
    """A collapsed block listing the chapter's consistency checks with their verdicts."""
    held = sum(k["verdict"] == "holds" for k in checks)
    rows = "\n".join(
        f"- **{k['verdict']}**: {k['claim']} ({k['evidence']}; over {k['over']})" for k in checks
    )
    return (
        f":::{{dropdown}} Consistency checks of the code: {held} of {len(checks)} hold\n"
        "Identities of this run's own statistics (a squared norm is non-negative, "
        "Cauchy-Schwarz, a coefficient that holds by construction). They check the code, "
        "not the paper, and are not counted as takeaways.\n\n"
        f"{rows}\n:::\n"
    )


def execute(
    spec: NotebookSpec,
    parameters: dict[str, Any],
    out_dir: Path,
    results_dir: Path,
    progress: bool = True,
    repo: Repository | None = None,
    archive_dir: Path = ARCHIVE_DIR,
    archive: bool = False,
) -> dict[str, Any]:
    """Execute one notebook; write it and its results atomically. Returns the results record.

    ``repo`` (from ``_config.yml``) sets the chapter's launch and download links. With
    ``archive`` the executed notebook and its results are also stored under
    ``archive_dir/<profile>/`` (:mod:`ge_book.archive`), to be kept in git.
    """
    papermill = _papermill()

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
    if archive:
        store(nbformat.from_dict(nb), results, archive_dir, parameters["profile"])
    add_launch_cell(nb, spec.name, repo, archived_link(spec.name, out_dir, archive_dir))
    atomic_write_text(out_dir / f"{spec.name}.ipynb", nbformat.writes(nb))
    atomic_write_json(results_dir / f"{spec.name}.json", results)
    return results


def refresh_source(spec: NotebookSpec) -> None:
    """Re-execute a source notebook at its own (smoke) defaults and keep only checked outputs.

    nbval compares the outputs of cells marked ``# NBVAL_CHECK_OUTPUT``; every other output is
    dropped so the sources stay small.
    """
    papermill = _papermill()

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
        if not cell.metadata.get("tags", True):  # papermill adds empty tag lists
            del cell.metadata["tags"]
        if cell.cell_type != "code":
            continue
        if CHECK_MARK not in cell.source:
            cell.outputs = []
            cell.execution_count = None
    nb.metadata.pop("papermill", None)
    atomic_write_text(spec.path, nbformat.writes(nb) + "\n")


def _report(res: dict[str, Any], args: argparse.Namespace) -> None:
    held = sum(c.get("verdict") == "holds" for c in res["claims"])
    print(
        f"{res['notebook']}: {res['provenance']['wall_time_s']} s, "
        f"{held}/{len(res['claims'])} claims hold -> {args.out_dir / res['notebook']}.ipynb",
        file=sys.stderr,
    )


def _execute_in_worker(
    spec: NotebookSpec, parameters: dict[str, Any], threads: int, **kwargs: Any
) -> dict[str, Any]:
    """:func:`execute` in a worker process whose kernels use ``threads`` CPU threads (unless
    ``OMP_NUM_THREADS`` is set), without a progress bar."""
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # as the provenance records
    return execute(spec, parameters, progress=False, **kwargs)


def _run_parallel(
    plan: list[tuple[NotebookSpec, dict[str, Any]]], args: argparse.Namespace, kwargs: dict
) -> None:
    """Run the plan in ``args.jobs`` worker processes, the CPU threads shared among them. A
    notebook starts once those it runs after (``NotebookSpec.after``, when in the plan) are
    done, so it finds their training runs in the cache. After a failure nothing new starts;
    the running notebooks finish and the first error is raised."""
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    planned = {spec.name for spec, _ in plan}
    pending, done = list(plan), set()
    running: dict[Future, str] = {}
    error: RunnerError | None = None
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        while running or (pending and error is None):
            ready = [
                (s, p) for s, p in pending if all(a in done or a not in planned for a in s.after)
            ]
            while error is None and ready and len(running) < args.jobs:
                spec, params = ready.pop(0)
                pending.remove((spec, params))
                print(f"running {spec.name} at profile {args.profile}", file=sys.stderr)
                running[pool.submit(_execute_in_worker, spec, params, threads, **kwargs)] = (
                    spec.name
                )
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                try:
                    _report(future.result(), args)
                    done.add(name)
                except RunnerError as exc:
                    error = error or exc
    if error is not None:
        raise error


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
    parser.add_argument(
        "--book-dir",
        default=".",
        type=Path,
        help="folder of the book's _config.yml and _toc.yml (repository links, chapter order)",
    )
    parser.add_argument("--list", action="store_true", help="list notebooks and parameters")
    parser.add_argument(
        "--pages-only",
        action="store_true",
        help="execute nothing: rewrite the generated pages (verdict and reproducibility tables, "
        "headline figure, launch links) from the executed notebooks and results already there",
    )
    parser.add_argument(
        "--refresh-sources",
        action="store_true",
        help="re-execute the sources at smoke and store the outputs nbval checks, with this "
        f"machine's fingerprint in NOTEBOOKS_DIR/{NBVAL_MACHINE}",
    )
    parser.add_argument(
        "--archive",
        action="store_true",
        help="also store the executed notebook and its results under ARCHIVE_DIR/<profile>/ "
        "(kept in git; the book shows the authors-profile archive beside each build)",
    )
    parser.add_argument("--archive-dir", default=str(ARCHIVE_DIR), type=Path)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="notebooks run at once, each in its own process, the CPU threads shared among them "
        "(a notebook waits for those whose cached runs it reuses: metadata ge_book.after)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        if args.jobs < 1:
            raise RunnerError(f"--jobs must be >= 1, got {args.jobs}")
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
            atomic_write_text(args.notebooks_dir / NBVAL_MACHINE, machine_fingerprint() + "\n")
            return 0
        if args.pages_only:
            chapters = write_pages(
                args.out_dir,
                args.results_dir,
                list(available),
                args.notebooks_dir,
                args.book_dir,
                refresh_launch=True,
                archive_dir=args.archive_dir,
            )
            built = sum(c.built for c in chapters)
            print(f"pages written: {built}/{len(chapters)} chapters built", file=sys.stderr)
            return 0
        profiles = load_profiles(args.notebooks_dir)
        overrides = parse_overrides(args.pairs, args.parameters_file)
        repo = book_repository(args.book_dir)
        plan = [(s, resolve_parameters(s, args.profile, profiles, overrides)) for s in specs]
        jobs = dict(
            out_dir=args.out_dir, results_dir=args.results_dir, repo=repo,
            archive_dir=args.archive_dir, archive=args.archive,
        )  # fmt: skip
        if args.jobs == 1:
            for spec, params in plan:
                print(f"running {spec.name} at profile {args.profile}", file=sys.stderr)
                _report(execute(spec, params, progress=not args.no_progress, **jobs), args)
        else:
            _run_parallel(plan, args, jobs)
        write_pages(
            args.out_dir,
            args.results_dir,
            list(available),
            args.notebooks_dir,
            args.book_dir,
            archive_dir=args.archive_dir,
        )
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
