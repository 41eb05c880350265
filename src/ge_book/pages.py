"""Generated book pages, written by the runner after every run (or alone with ``--pages-only``).

Into the chapters folder: ``summary.md`` (headline figure, one row per takeaway of the poster
with every line that speaks to it, then every takeaway and guarantee by chapter, for the landing
page), ``headline.png`` (the image of the cell tagged ``headline``), ``reproducibility.md``
(how each chapter was produced and how to rerun it), and each chapter's launch box (Colab, Binder
and download links to ``notebooks/<name>.ipynb`` of the repository named in ``_config.yml``).
All are read from this build's executed notebooks and results files; a chapter without them
shows as "not built".
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import yaml

from ge_book.archive import ARCHIVE_DIR, ARCHIVED_PROFILE, load, same_commit
from ge_book.parameters import RunnerError, load_profiles, load_spec, resolve_parameters
from ge_utils.claims import INTERVALS, POSTER, VERDICTS
from ge_utils.io import atomic_write_text

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


def launch_markdown(name: str, repo: Repository | None, archived: str | None = None) -> str:
    """The chapter's box of launch buttons and download links (tagged ``launch``);
    ``archived``: the path of the chapter's archived run, relative to the chapter page."""
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
    if archived:
        links.append(f"{{download}}`the archived {ARCHIVED_PROFILE}-scale run <{archived}>`")
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


def archived_link(name: str, out_dir: Path, archive_dir: Path) -> str | None:
    """The archived notebook of chapter ``name`` relative to ``out_dir``, if there is one."""
    path = Path(archive_dir) / ARCHIVED_PROFILE / f"{name}.ipynb"
    if not path.is_file():
        return None
    return os.path.relpath(path.resolve(), Path(out_dir).resolve())


def add_launch_cell(
    nb: nbformat.NotebookNode, name: str, repo: Repository | None, archived: str | None = None
) -> None:
    """Replace the chapter's ``launch`` cell, placed right after its provenance block."""
    nb.cells = [c for c in nb.cells if LAUNCH_TAG not in c.metadata.get("tags", [])]
    cell = nbformat.v4.new_markdown_cell(launch_markdown(name, repo, archived))
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
    archived: dict[str, Any] | None = None  # results of the archived run (ARCHIVED_PROFILE)

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
    out_dir: Path,
    results_dir: Path,
    names: list[str],
    book_dir: Path,
    archive_dir: Path = ARCHIVE_DIR,
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
        chapters.append(Chapter(name, name in toc, rendered, results, load(archive_dir, name)))
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
    records = [(c, k) for c in built for k in c.results["claims"]]
    counted = [(c, k) for c, k in records if k.get("kind") in ("takeaway", "guarantee")]
    n_consistency = len(records) - len(counted)
    on_poster = [(c, k) for c, k in counted if k.get("poster")]
    lines += [
        f"This build: {len(built)} of {len(chapters)} chapters built "
        f"(profile {', '.join(profiles) or 'none'}); of {len(counted)} takeaways and guarantees, "
        f"{_tally(counted)}. Of the {len(on_poster)} that speak to a row of the poster, "
        f"{_tally(on_poster)}; the other {len(counted) - len(on_poster)} are our own questions "
        f"beyond the poster (marked *ours* below). {n_consistency} consistency checks of the "
        "code are listed in each chapter, not counted here.",
        "",
        "### The poster's takeaways",
        "",
        f"The last column is the archived run at the `{ARCHIVED_PROFILE}` profile (the authors' "
        "schedule on the offline model; never re-executed by a build) where one exists.",
        "",
        f"| takeaway of the poster | verdict | effect [95% CI] | over | chapter "
        f"| {ARCHIVED_PROFILE} scale (archived) |",
        "|---|---|---|---|---|---|",
    ]
    for key, title in POSTER.items():
        tagged = [(c, k) for c, k in counted if k.get("poster") == key]
        if not tagged:
            lines.append(
                f"| {_cell(title)} | {{bdg-secondary}}`not measured` | — | — | — | — |"
            )
        for i, (c, k) in enumerate(tagged):
            lines.append(
                f"| {_cell(title) if i == 0 else ''} | {_badge(k)} | {_effect(k)} "
                f"| {_cell(k.get('over', ''))} | {c.short_link} | {_archived_cell(c, k)} |"
            )
    lines += _archive_notes(chapters)
    lines += [
        "",
        "### Every takeaway and guarantee, by chapter",
        "",
        f"| chapter (model, profile) | claim | verdict | effect [95% CI] | over "
        f"| {ARCHIVED_PROFILE} scale (archived) |",
        "|---|---|---|---|---|---|",
    ]
    for ch in chapters:
        if not ch.built:
            lines.append(
                f"| {ch.link} | — | {{bdg-secondary}}`not built` "
                f"| run `{_command(ch.name, 'default')}` | — | — |"
            )
            continue
        head = f"{ch.link}<br>`{_cell(ch.model)}`, {_cell(ch.provenance.get('profile', '?'))}"
        shown = [k for k in ch.results["claims"] if k.get("kind") in ("takeaway", "guarantee")]
        if not shown:
            lines.append(
                f"| {head} | — | **no verdicts** | the claims cell printed none | — | — |"
            )
        for i, k in enumerate(shown):
            ours = "" if k.get("poster") else " *(ours)*"
            lines.append(
                f"| {head if i == 0 else ''} | {_cell(k.get('claim', ''))}{ours} "
                f"| {_badge(k)} | {_effect(k)} | {_cell(k.get('over', ''))} "
                f"| {_archived_cell(ch, k)} |"
            )
    return "\n".join(lines) + "\n"


def _tally(records: list[tuple[Chapter, dict[str, Any]]]) -> str:
    """``"a hold, b do not hold and c are inconclusive"`` of ``records``' verdicts."""
    n = {v: sum(k.get("verdict") == v for _, k in records) for v in VERDICTS}
    return (
        f"{n['holds']} hold, {n['does not hold']} do not hold and {n['inconclusive']} are "
        "inconclusive"
    )


def _build_commit(chapters: list[Chapter]) -> str | None:
    commits = {c.provenance.get("git_commit") for c in chapters if c.built}
    return next(iter(commits)) if len(commits) == 1 else None


def _archived_cell(ch: Chapter, k: dict[str, Any]) -> str:
    """The archived run's verdict and effect for the same claim of the same chapter."""
    if ch.archived is None:
        return "—"
    match = next((a for a in ch.archived["claims"] if a.get("claim") == k.get("claim")), None)
    if match is None:
        return "not in the archive"
    pooled = _pooled_over_seeds(ch.archived) and SEEDS.search(match.get("over", ""))
    return f"{_badge(match)} {_effect(match)}" + (" (pooled over seeds)" if pooled else "")


SEEDS = re.compile(r"\b(?:[2-9]|\d\d+) seeds\b")


def _pooled_over_seeds(archived: dict[str, Any]) -> bool:
    """Whether a stored run's intervals predate seed-level intervals: over several seeds they
    count the pairs of every seed as independent, and can be too narrow."""
    return (archived.get("provenance") or {}).get("intervals") != INTERVALS


def _archive_notes(chapters: list[Chapter]) -> list[str]:
    """One line per archived run: its device, commit, date and wall time, and whether it was
    made at this build's commit."""
    archived = [c for c in chapters if c.archived is not None]
    if not archived:
        return ["", f"*No archived `{ARCHIVED_PROFILE}` run in this repository.*"]
    build = _build_commit(chapters)
    lines = ["", f"Archived `{ARCHIVED_PROFILE}` runs:", ""]
    for c in archived:
        prov = c.archived.get("provenance") or {}
        commit = prov.get("git_commit", "?")
        when = (
            "this build's commit"
            if same_commit(commit, build)
            else "{bdg-warning}`another commit` than this build's"
        )
        wall = prov.get("wall_time_s")
        wall_text = f"{wall / 3600:.1f} h" if isinstance(wall, int | float) else "?"
        pooled = (
            "; {bdg-warning}`pooled over seeds`: made before intervals were taken at the seed "
            "level, its intervals over several seeds count every pair as independent, so they can "
            "be narrower and its verdicts firmer than this build's rule allows"
            if _pooled_over_seeds(c.archived)
            else ""
        )
        lines.append(
            f"- {c.short_link}: {_cell(prov.get('device', '?'))}, commit `{_cell(commit)}` "
            f"({when}), {_cell(prov.get('date', '?'))}, {wall_text}{pooled}"
        )
    return lines


BADGES = {
    "holds": "{bdg-success}`holds`",
    "does not hold": "{bdg-danger}`does not hold`",
    "inconclusive": "{bdg-warning}`inconclusive`",
}


def _badge(k: dict[str, Any]) -> str:
    """The verdict badge and the line's kind."""
    badge = BADGES.get(k.get("verdict", ""), f"`{_cell(k.get('verdict', '?'))}`")
    return f"{badge}<br>{_cell(k.get('kind', ''))}"


def _num(x: float) -> str:
    return "∞" if x == math.inf else "−∞" if x == -math.inf else f"{x:.3g}"


def _effect(k: dict[str, Any]) -> str:
    """``effect unit [low, high]``, or a dash for a line without an effect size."""
    if k.get("effect") is None or not k.get("interval"):
        return "—"
    low, high = k["interval"]
    unit = f" {_cell(k['unit'])}" if k.get("unit") else ""
    return f"{_num(k['effect'])}{unit} [{_num(low)}, {_num(high)}]"


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
    archive_dir: Path = ARCHIVE_DIR,
) -> list[Chapter]:
    """Write the generated parts of the landing and reproducibility pages into ``out_dir``.

    Also saves the headline figure (the first chapter, in book order, whose executed notebook
    has an image in a cell tagged ``headline``) as ``out_dir/headline.png``. With
    ``refresh_launch``, rewrites each executed notebook's launch box from ``_config.yml``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    repo = book_repository(book_dir)
    chapters = collect_chapters(out_dir, results_dir, names, book_dir, archive_dir)
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
            add_launch_cell(nb, ch.name, repo, archived_link(ch.name, out_dir, archive_dir))
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
