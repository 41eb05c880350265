"""Run the book's notebooks with papermill under a named profile.

``python -m ge_utils run [NOTEBOOK ...] [--profile default] [-p NAME VALUE ...] [-f PARAMS.yaml]``

Parameters are resolved in this order, later ones winning: the notebook's own parameters cell
(its values are the smoke profile, so nbval can run the source as is), the profile's values from
``notebooks/profiles.yml``, a YAML file (``-f``), then ``-p`` pairs. Every name and type is
checked against the parameters cell before anything runs. Each executed notebook is written
atomically to ``--out-dir`` (where the book reads it) with a provenance block at its top, and a
results file (provenance + claim verdicts) to ``--results-dir``. A run that fails or is
interrupted leaves the previous complete outputs in place.

After every run, and alone with ``--pages-only``, the runner writes the generated parts of the
book into ``--out-dir``: ``summary.md`` (headline figure and one row per takeaway, for the landing
page), ``headline.png`` (the image of the cell tagged ``headline``), ``reproducibility.md``
(how each chapter was produced and how to rerun it), and each chapter's launch box (Colab,
Binder and download links to ``notebooks/<name>.ipynb`` of the repository named in
``_config.yml``). Chapters without results show as "not built".
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
    repo: Repository | None = None,
) -> dict[str, Any]:
    """Execute one notebook; write it and its results atomically. Returns the results record.

    ``repo`` (from ``_config.yml``) sets the chapter's launch and download links.
    """
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
    add_launch_cell(nb, spec.name, repo)
    results = {"notebook": spec.name, "provenance": record, "claims": claims}
    atomic_write_text(out_dir / f"{spec.name}.ipynb", nbformat.writes(nb))
    atomic_write_json(results_dir / f"{spec.name}.json", results)
    return results


# ---------------------------------------------------------------------------------------------
# Generated book pages: the landing page's headline figure and verdict table, the
# reproducibility table, and each chapter's launch / download box. All read from this build's
# executed notebooks (out_dir) and results files; a chapter without them shows as "not built".

SUMMARY_FILE = "summary.md"  # included by book/intro.md
REPRO_FILE = "reproducibility.md"  # included by book/reproducibility.md
HEADLINE_FILE = "headline.png"
HEADLINE_TAG = "headline"
LAUNCH_TAG = "launch"
COLAB = "https://colab.research.google.com/github"
BINDER = "https://mybinder.org/v2/gh"


@dataclass
class Repository:
    """Where the source notebooks live, from ``repository`` in the book's ``_config.yml``."""

    url: str
    branch: str

    @property
    def github_path(self) -> str | None:
        """``owner/name`` for a github.com URL, else None (no Colab/Binder links then)."""
        prefix = "https://github.com/"
        if not self.url.startswith(prefix):
            return None
        path = self.url[len(prefix) :].strip("/").removesuffix(".git")
        return path if path.count("/") == 1 else None

    def source_url(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/blob/{self.branch}/notebooks/{name}.ipynb"

    def raw_url(self, name: str) -> str | None:
        gh = self.github_path
        if gh is None:
            return None
        return f"https://raw.githubusercontent.com/{gh}/{self.branch}/notebooks/{name}.ipynb"

    def colab_url(self, name: str) -> str | None:
        gh = self.github_path
        return f"{COLAB}/{gh}/blob/{self.branch}/notebooks/{name}.ipynb" if gh else None

    def binder_url(self, name: str) -> str | None:
        gh = self.github_path
        if gh is None:
            return None
        return f"{BINDER}/{gh}/{self.branch}?labpath=notebooks%2F{name}.ipynb"


def book_repository(book_dir: Path) -> Repository | None:
    """The ``repository: {url, branch}`` of ``book_dir/_config.yml``, or None when absent."""
    path = book_dir / "_config.yml"
    if not path.is_file():
        return None
    repo = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("repository") or {}
    if not repo.get("url"):
        return None
    return Repository(str(repo["url"]), str(repo.get("branch") or "main"))


def toc_chapters(book_dir: Path, out_dir: Path) -> list[str]:
    """Names of the chapters listed in ``_toc.yml`` under ``out_dir``, in book order."""
    path = book_dir / "_toc.yml"
    if not path.is_file():
        return []
    try:
        prefix = out_dir.resolve().relative_to(book_dir.resolve()).as_posix()
    except ValueError:
        return []
    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            f = node.get("file")
            if isinstance(f, str):
                stem = f.removesuffix(".ipynb").removesuffix(".md")
                if stem.rpartition("/")[0] == prefix:
                    names.append(stem.rpartition("/")[2])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(yaml.safe_load(path.read_text(encoding="utf-8")))
    return names


def _cell(text: Any) -> str:
    """Table-cell text: no pipes, no line breaks."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _command(name: str, profile: str) -> str:
    return f"python -m ge_utils run {name} --profile {profile}"


def launch_markdown(name: str, repo: Repository | None) -> str:
    """The chapter's box of launch buttons and download links (tagged ``launch``)."""
    links = []
    if repo is not None:
        colab, binder, raw = repo.colab_url(name), repo.binder_url(name), repo.raw_url(name)
        if colab:
            links.append(f"[Open in Colab]({colab}) (GPU: *Runtime > Change runtime type*)")
        if binder:
            links.append(f"[Launch on Binder]({binder}) (CPU)")
        links.append(f"[source notebook]({repo.source_url(name)})")
        if raw:
            links.append(f"[download the source]({raw})")
    links.append(f"{{download}}`download this executed notebook <{name}.ipynb>`")
    body = " · ".join(links)
    setup = ""
    if repo is not None:
        setup = (
            "\n\nThe links open `notebooks/" + name + ".ipynb` of the repository, with its smoke "
            "parameters; set `profile` and the other values in its parameters cell. On Colab, "
            f'install the package first: `!pip install "ge_utils @ git+{repo.url}@{repo.branch}"`.'
        )
    return (
        "```{admonition} Run this chapter yourself\n"
        ":class: tip\n\n"
        f"{body}{setup}\n\n"
        f"Locally, from the repository root: `{_command(name, 'default')}` "
        f"(offline, CPU) or `{_command(name, 'paper')}` (the authors' setting, on a GPU). "
        "See {doc}`../reproducibility`.\n"
        "```"
    )


def add_launch_cell(nb: nbformat.NotebookNode, name: str, repo: Repository | None) -> None:
    """Replace the chapter's ``launch`` cell, placed right after its provenance block."""
    nb.cells = [c for c in nb.cells if LAUNCH_TAG not in c.metadata.get("tags", [])]
    cell = nbformat.v4.new_markdown_cell(launch_markdown(name, repo))
    cell.metadata["tags"] = [LAUNCH_TAG]
    where = next(
        (i + 1 for i, c in enumerate(nb.cells) if "provenance" in c.metadata.get("tags", [])),
        1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0,
    )
    nb.cells.insert(where, cell)


def headline_png(nb: nbformat.NotebookNode) -> tuple[bytes, str] | None:
    """The first PNG output of the first cell tagged ``headline`` that has one, and its caption.

    The caption is the Markdown cell right before that cell, when it has no MyST roles (they
    would not resolve on another page).
    """
    import base64

    for i, c in enumerate(nb.cells):
        if c.cell_type != "code" or HEADLINE_TAG not in c.metadata.get("tags", []):
            continue
        for out in c.get("outputs", []):
            data = out.get("data", {}).get("image/png")
            if data:
                png = base64.b64decode(data if isinstance(data, str) else "".join(data))
                before = nb.cells[i - 1] if i > 0 else None
                caption = ""
                if before is not None and before.cell_type == "markdown":
                    text = " ".join(before.source.split())
                    if "{" not in text and "```" not in text and not text.startswith("#"):
                        caption = text
                return png, caption
    return None


@dataclass
class Chapter:
    """What this build has for one chapter: its executed notebook and results, if any."""

    name: str
    in_toc: bool
    rendered: bool  # executed notebook present in out_dir
    results: dict[str, Any] | None

    @property
    def built(self) -> bool:
        return self.results is not None

    @property
    def link(self) -> str:
        """The chapter's title as a link, or its name where there is no page to link to."""
        return f"{{doc}}`chapters/{self.name}`" if self.in_toc and self.rendered else self.name

    @property
    def short_link(self) -> str:
        """The chapter's name as a link (compact tables)."""
        if self.in_toc and self.rendered:
            return f"{{doc}}`{self.name} <chapters/{self.name}>`"
        return self.name

    @property
    def provenance(self) -> dict[str, Any]:
        return (self.results or {}).get("provenance") or {}

    @property
    def model(self) -> str:
        params = self.provenance.get("parameters") or {}
        return str(params["model"]) if params.get("model") else "none (closed form)"


def collect_chapters(
    out_dir: Path, results_dir: Path, names: list[str], book_dir: Path
) -> list[Chapter]:
    """Every chapter, in book order (then any notebook not in the table of contents)."""
    toc = toc_chapters(book_dir, out_dir)
    ordered = [n for n in toc if n in names] + [n for n in names if n not in toc]
    ordered += [n for n in toc if n not in ordered]
    chapters = []
    for name in ordered:
        path = results_dir / f"{name}.json"
        results = None
        if path.is_file():
            try:
                results = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                results = None
        if results is not None and not isinstance(results.get("claims"), list):
            results = None
        rendered = (out_dir / f"{name}.ipynb").is_file()
        chapters.append(Chapter(name, name in toc, rendered, results))
    return chapters


def summary_markdown(
    chapters: list[Chapter], headline: tuple[Chapter, str, str] | None = None
) -> str:
    """The landing page's generated part: headline figure, then one row per takeaway."""
    lines: list[str] = []
    if headline is not None:
        ch, image, caption = headline
        lines += [
            f"```{{figure}} {image}",
            ":name: headline-figure",
            ":width: 100%",
            "",
            f"Headline figure of this build, from {ch.link} at profile "
            f"**{ch.provenance.get('profile', '?')}** on model `{ch.model}`. {caption}".rstrip(),
            "```",
            "",
        ]
    else:
        lines += [
            f"*No headline figure in this build: no built chapter has an image in a cell tagged "
            f"`{HEADLINE_TAG}`.*",
            "",
        ]
    built = [c for c in chapters if c.built]
    profiles = sorted({c.provenance.get("profile", "?") for c in built})
    n_claims = sum(len(c.results["claims"]) for c in built)
    n_held = sum(bool(k.get("holds")) for c in built for k in c.results["claims"])
    lines += [
        f"This build: {len(built)} of {len(chapters)} chapters built "
        f"(profile {', '.join(profiles) or 'none'}); {n_held} of {n_claims} takeaways hold.",
        "",
        "| chapter (model, profile) | takeaway | verdict | evidence |",
        "|---|---|---|---|",
    ]
    for ch in chapters:
        if not ch.built:
            lines.append(
                f"| {ch.link} | — | {{bdg-secondary}}`not built` "
                f"| run `{_command(ch.name, 'default')}` |"
            )
            continue
        head = f"{ch.link}<br>`{_cell(ch.model)}`, {_cell(ch.provenance.get('profile', '?'))}"
        if not ch.results["claims"]:
            lines.append(f"| {head} | — | **no verdicts** | the claims cell printed none |")
        for i, k in enumerate(ch.results["claims"]):
            badge = "{bdg-success}`holds`" if k.get("holds") else "{bdg-danger}`does not hold`"
            lines.append(
                f"| {head if i == 0 else ''} | {_cell(k.get('claim', ''))} "
                f"| {badge}<br>{_cell(k.get('kind', ''))} | {_cell(k.get('evidence', ''))} |"
            )
    return "\n".join(lines) + "\n"


def _paper_differences(ch: Chapter, notebooks_dir: Path) -> str:
    """This build's parameters that differ from the notebook's paper profile."""
    params = ch.provenance.get("parameters") or {}
    try:
        spec = load_spec(ch.name, notebooks_dir)
        paper = resolve_parameters(spec, "paper", load_profiles(notebooks_dir), {})
    except (RunnerError, OSError, yaml.YAMLError):
        return "paper profile not available"
    diffs = [
        f"`{k}` {params[k]!r} (paper: {paper[k]!r})"
        for k in sorted(params)
        if k in paper and k != "profile" and params[k] != paper[k]
    ]
    return _cell("; ".join(diffs)) if diffs else "none: this build used the paper profile"


def reproducibility_markdown(
    chapters: list[Chapter], notebooks_dir: Path, repo: Repository | None
) -> str:
    """The reproducibility page's generated part: how each chapter was produced, how to rerun."""
    lines = [
        "| chapter | profile | model | device | wall time | commit |",
        "|---|---|---|---|---|---|",
    ]
    for ch in chapters:
        p = ch.provenance
        if not ch.built:
            lines.append(f"| {ch.short_link} | **not built** | — | — | — | — |")
            continue
        wall = p.get("wall_time_s")
        wall_text = f"{wall:.1f} s" if isinstance(wall, int | float) else "n/a"
        commit = str(p.get("git_commit", "unknown"))
        lines.append(
            f"| {ch.short_link} | {_cell(p.get('profile', '?'))} | `{_cell(ch.model)}` "
            f"| {_cell(p.get('device', '?'))} | {wall_text} "
            f"| `{_cell(commit[:8] + ('+dirty' if commit.endswith('+dirty') else ''))}` |"
        )
    for ch in chapters:
        p = ch.provenance
        lines += ["", f"### {ch.name}", "", "| | |", "|---|---|"]
        if ch.built:
            params = ", ".join(
                f"`{k}={v!r}`" for k, v in sorted((p.get("parameters") or {}).items())
            )
            lines += [
                f"| chapter | {ch.link} |",
                f"| profile | **{_cell(p.get('profile', '?'))}** |",
                f"| parameters | {_cell(params)} |",
                f"| differs from the paper profile | {_paper_differences(ch, notebooks_dir)} |",
                f"| device | {_cell(p.get('device', '?'))} |",
                f"| wall time | {_cell(p.get('wall_time_s', 'n/a'))} s |",
                f"| date | {_cell(p.get('date', '?'))} |",
                f"| git commit | `{_cell(p.get('git_commit', 'unknown'))}` |",
                f"| versions | torch {_cell(p.get('torch', '?'))}, transformers "
                f"{_cell(p.get('transformers', '?'))}, ge_utils {_cell(p.get('ge_utils', '?'))}, "
                f"Python {_cell(p.get('python', '?'))} |",
            ]
        else:
            lines.append("| status | **not built**: no results file in this build |")
        if ch.in_toc and ch.rendered:
            lines.append(
                f"| executed notebook | {{download}}`{ch.name}.ipynb <chapters/{ch.name}.ipynb>` |"
            )
        if repo is not None:
            lines.append(f"| source notebook | [{ch.name}.ipynb]({repo.source_url(ch.name)}) |")
        lines += [
            f"| rerun, default scale | `{_command(ch.name, 'default')}` |",
            f"| rerun, paper scale | `{_command(ch.name, 'paper')}` (GPU) |",
        ]
    return "\n".join(lines) + "\n"


def write_pages(
    out_dir: Path,
    results_dir: Path,
    names: list[str],
    notebooks_dir: Path = Path("notebooks"),
    book_dir: Path = Path("."),
    refresh_launch: bool = False,
) -> list[Chapter]:
    """Write the generated parts of the landing and reproducibility pages into ``out_dir``.

    Also saves the headline figure (the first chapter, in book order, whose executed notebook
    has an image in a cell tagged ``headline``) as ``out_dir/headline.png``. With
    ``refresh_launch``, rewrites each executed notebook's launch box from ``_config.yml``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    repo = book_repository(book_dir)
    chapters = collect_chapters(out_dir, results_dir, names, book_dir)
    headline = None
    for ch in chapters:
        if not ch.rendered:
            continue
        path = out_dir / f"{ch.name}.ipynb"
        try:
            nb = nbformat.read(path, as_version=4)
        except (OSError, ValueError):
            continue
        if refresh_launch:
            add_launch_cell(nb, ch.name, repo)
            atomic_write_text(path, nbformat.writes(nb))
        found = headline_png(nb)
        if headline is None and found is not None and ch.built and ch.in_toc:
            tmp = out_dir / f".{HEADLINE_FILE}.tmp"
            tmp.write_bytes(found[0])
            os.replace(tmp, out_dir / HEADLINE_FILE)
            headline = (ch, f"chapters/{HEADLINE_FILE}", found[1])
    if headline is None:
        (out_dir / HEADLINE_FILE).unlink(missing_ok=True)
    atomic_write_text(out_dir / SUMMARY_FILE, summary_markdown(chapters, headline))
    atomic_write_text(out_dir / REPRO_FILE, reproducibility_markdown(chapters, notebooks_dir, repo))
    return chapters


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
        if args.pages_only:
            chapters = write_pages(
                args.out_dir,
                args.results_dir,
                list(available),
                args.notebooks_dir,
                args.book_dir,
                refresh_launch=True,
            )
            built = sum(c.built for c in chapters)
            print(f"pages written: {built}/{len(chapters)} chapters built", file=sys.stderr)
            return 0
        profiles = load_profiles(args.notebooks_dir)
        overrides = parse_overrides(args.pairs, args.parameters_file)
        repo = book_repository(args.book_dir)
        plan = [(s, resolve_parameters(s, args.profile, profiles, overrides)) for s in specs]
        for spec, params in plan:
            print(f"running {spec.name} at profile {args.profile}", file=sys.stderr)
            res = execute(spec, params, args.out_dir, args.results_dir, not args.no_progress, repo)
            held = sum(c["holds"] for c in res["claims"])
            print(
                f"{spec.name}: {res['provenance']['wall_time_s']} s, "
                f"{held}/{len(res['claims'])} claims hold -> {args.out_dir / spec.name}.ipynb",
                file=sys.stderr,
            )
        write_pages(
            args.out_dir, args.results_dir, list(available), args.notebooks_dir, args.book_dir
        )
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
