"""Smoke build of the whole book: every notebook through the runner, then Jupyter Book -W.

The build itself is the session fixture ``smoke_book`` (tests/book_fixture.py), shared with
the browser test.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def plain_text(page: str) -> str:
    """The page's text without tags, entities, typographic quotes or repeated spaces."""
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    for fancy, plain in (("\u2018", "'"), ("\u2019", "'"), ("\u201c", '"'), ("\u201d", '"')):
        text = text.replace(fancy, plain)
    return " ".join(text.split())


def chapter_entries(toc_path: Path) -> list[str]:
    """The ``file`` entries of _toc.yml that are generated chapters (book/chapters/...)."""
    toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    return [f for f in files if f.startswith("book/chapters/")]


def test_book_builds_at_smoke_with_warnings_as_errors(smoke_book):
    assert smoke_book.run.returncode == 0, smoke_book.run.stderr[-3000:]
    assert smoke_book.build.returncode == 0, smoke_book.log_tail()
    site = smoke_book.html
    for entry in chapter_entries(ROOT / "_toc.yml"):
        page = (site / entry).with_suffix(".html").read_text(encoding="utf-8")
        assert "Provenance of this page" in page
        assert "Smoke profile" in page
        assert "Traceback" not in page and "output_error" not in page
        assert re.search(r"\] (HOLDS|DOES NOT HOLD|INCONCLUSIVE): ", page), f"{entry}: no verdict"
        assert "<img" in page, f"{entry}: no figure rendered"
        name = Path(entry).name
        assert "Run this chapter yourself" in page
        assert f"notebooks/{name}.ipynb" in page  # launch links point at the source notebook
        assert f"{name}.ipynb" in {p.name for p in (site / "_downloads").rglob("*.ipynb")}


def test_landing_page_is_generated_from_this_build(smoke_book):
    assert smoke_book.ok, smoke_book.log_tail()
    root, site = smoke_book.root, smoke_book.html
    intro = (site / "book" / "intro.html").read_text(encoding="utf-8")
    assert "What this build reproduced" in intro
    assert 'id="headline-figure"' in intro and "headline.png" in intro
    assert (site / "_images" / "headline.png").stat().st_size > 1000
    text = plain_text(intro)
    results = sorted((root / "results").glob("*.json"))
    assert {r.stem for r in results} >= {Path(e).name for e in chapter_entries(ROOT / "_toc.yml")}
    for result in results:
        record = json.loads(result.read_text(encoding="utf-8"))
        assert record["claims"], f"{result.name}: no verdicts"
        chapter = plain_text(
            (site / "book" / "chapters" / f"{result.stem}.html").read_text(encoding="utf-8")
        )
        for claim in record["claims"]:
            row = " ".join(claim["claim"].split())
            if claim["kind"] == "consistency":  # in its chapter's collapsed block, not counted
                assert row not in text, f"{result.stem}: consistency {row!r} on the landing page"
                assert row in chapter, f"{result.stem}: consistency {row!r} not in its chapter"
            else:
                assert row in text, f"{result.stem}: {claim['claim']!r} not on the landing page"
                assert claim["verdict"] in ("holds", "does not hold", "inconclusive")
    assert "`not built`" not in (root / "book" / "chapters" / "summary.md").read_text()
    assert "The poster's takeaways" in text and "95% CI" in text


def test_reproducibility_page_lists_every_chapter(smoke_book):
    assert smoke_book.ok, smoke_book.log_tail()
    page = plain_text((smoke_book.html / "book" / "reproducibility.html").read_text("utf-8"))
    for entry in chapter_entries(ROOT / "_toc.yml"):
        name = Path(entry).name
        assert f"python -m ge_utils run {name} --profile default" in page
        assert f"python -m ge_utils run {name} --profile paper" in page
    assert "differs from the paper profile" in page
    assert "torch " in page and "git commit" in page
