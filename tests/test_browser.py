"""The built book in a real browser: every page opened in headless Chromium.

The smoke book (session fixture ``smoke_book``, built once per test run) is served on
localhost by ``http.server`` in a thread and every HTML page is opened with Playwright driving
Debian's Chromium (``/usr/bin/chromium``, or ``$GE_CHROMIUM``; Playwright's own browser download
is not used). Each page must:

- load with no console error, no uncaught page error, no failed request and no HTTP error;
- request nothing from another host: the book is self-contained (MathJax is served from
  ``_static/mathjax``, see book/_ext/book_assets.py), so no external request is filtered;
- show no rendered error output, traceback, docutils system message or MathJax error;
- have every image loaded with a non-zero natural size;
- link only to local pages and files that exist (HTTP 200) and to anchors that exist there.

Chapter pages must also carry the Colab / Binder launch links of their source notebook, as
configured in ``_config.yml``. Screenshots of the landing page, the reproducibility page and
one chapter are saved under ``artifacts/screenshots/``.

``test_the_check_finds_broken_pages`` runs the same checker on a two-page site with every kind
of fault, so a check that silently stopped working would fail there.

Without Chromium or the playwright package the tests fail when ``CI`` is set and are skipped
otherwise.
"""

from __future__ import annotations

import base64
import functools
import http.server
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("GE_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SKIP_DIRS = {"_static", "_sources", "_downloads", "_images"}
ERROR_SELECTORS = (
    "div.output.error, div.output.traceback, .cell_output .traceback, "
    ".system-message, .problematic, mjx-merror"
)
# Resolves when MathJax has typeset the page (or at once where the page has no math).
MATHJAX_DONE = """() => (window.MathJax && MathJax.startup && MathJax.startup.promise)
    ? MathJax.startup.promise.then(() => true) : true"""
# Loads every image eagerly and reports each one's natural size.
IMAGES = """async () => {
    const imgs = [...document.images];
    for (const i of imgs) { i.loading = 'eager'; }
    await Promise.all(imgs.map(i => i.decode().catch(() => null)));
    return imgs.map(i => ({src: i.currentSrc || i.src, w: i.naturalWidth, h: i.naturalHeight}));
}"""
LINKS = "() => [...document.querySelectorAll('a[href]')].map(a => a.href)"
PNG_1x1 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGA"
    "hKmMIQAAAABJRU5ErkJggg=="
)


def require_browser() -> None:
    problems = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append(
            "the Python package playwright is not installed (pip install -r requirements.txt)"
        )
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        problems.append(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    if problems:
        message = "browser test cannot run: " + "; ".join(problems)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def chromium_available() -> None:
    """Checked before the book is built, so a skip costs nothing."""
    require_browser()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="session")
def served_book(chromium_available, smoke_book) -> Iterator[str]:
    if not smoke_book.ok:
        pytest.skip("the smoke book did not build; tests/test_book.py reports why")
    server, base = serve(smoke_book.html)
    try:
        yield base
    finally:
        server.shutdown()
        server.server_close()


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs) -> None:
        for key, value in attrs:
            if key in ("id", "name") and value:
                self.ids.add(value)


def html_pages(site: Path) -> list[str]:
    pages = []
    for path in sorted(site.rglob("*.html")):
        rel = path.relative_to(site)
        if rel.parts[0] not in SKIP_DIRS:
            pages.append(rel.as_posix())
    return pages


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
            kind = response.headers.get("Content-Type", "")
            return response.status, body.decode("utf-8", "replace") if "html" in kind else ""
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def check_links(base: str, links: dict[str, set[str]]) -> list[str]:
    """Every local href answers 200 and every fragment names an id on its target page."""
    problems = []
    ids: dict[str, set[str] | None] = {}
    for href, sources in sorted(links.items()):
        page, fragment = urldefrag(href)
        if page not in ids:
            status, body = fetch(page)
            if status != 200:
                problems.append(f"{page} -> HTTP {status} (linked from {sorted(sources)[0]})")
                ids[page] = None
                continue
            if body:
                parser = _Ids()
                parser.feed(body)
                ids[page] = parser.ids
            else:
                ids[page] = None
        known = ids[page]
        if fragment and known is not None and unquote(fragment) not in known:
            problems.append(f"{href}: no anchor #{fragment} (linked from {sorted(sources)[0]})")
    return problems


@dataclass
class SiteReport:
    problems: list[str] = field(default_factory=list)
    hrefs: dict[str, list[str]] = field(default_factory=dict)  # page -> every href on it
    n_images: int = 0
    n_links: int = 0


def inspect_site(
    base: str, pages: list[str], screenshots: dict[str, Path] | None = None
) -> SiteReport:
    """Open each page of the site served at ``base`` in Chromium and report what is wrong.

    Requests to any other host are aborted and reported, never sent.
    """
    from playwright.sync_api import sync_playwright

    host = urlsplit(base).netloc
    report = SiteReport()
    links: dict[str, set[str]] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.route(lambda url: urlsplit(url).netloc != host, lambda route: route.abort())
            for rel in pages:
                events: list[str] = []
                page = context.new_page()
                page.on(
                    "console",
                    lambda m, ev=events: m.type == "error" and ev.append(f"console: {m.text}"),
                )
                page.on("pageerror", lambda e, ev=events: ev.append(f"page error: {e}"))
                page.on(
                    "requestfailed",
                    lambda r, ev=events: ev.append(f"failed: {r.url} ({r.failure})"),
                )
                page.on(
                    "response",
                    lambda r, ev=events: r.status >= 400 and ev.append(f"HTTP {r.status}: {r.url}"),
                )
                page.on(
                    "request",
                    lambda r, ev=events: (
                        urlsplit(r.url).netloc != host
                        and not r.url.startswith(("data:", "blob:", "about:"))
                        and ev.append(f"external request: {r.url}")
                    ),
                )
                response = page.goto(f"{base}/{rel}", wait_until="load")
                if response is None or response.status != 200:
                    events.append(f"HTTP {response.status if response else '?'} for the page")
                page.wait_for_load_state("networkidle")  # index.html redirects to the intro
                page.evaluate(MATHJAX_DONE)
                page.wait_for_load_state("networkidle")  # fonts MathJax asked for
                errors = page.locator(ERROR_SELECTORS)
                if errors.count():
                    events.append(f"rendered error: {errors.first.inner_text()[:200]!r}")
                if "Traceback (most recent call last)" in page.inner_text("body"):
                    events.append("a traceback is shown")
                for img in page.evaluate(IMAGES):
                    report.n_images += 1
                    if not (img["w"] > 0 and img["h"] > 0):
                        events.append(f"image not loaded: {img['src']}")
                hrefs = page.evaluate(LINKS)
                report.hrefs[rel] = hrefs
                for href in hrefs:
                    if urlsplit(href).netloc == host:
                        links.setdefault(href, set()).add(rel)
                if screenshots and rel in screenshots:
                    page.screenshot(path=str(screenshots[rel]), full_page=True)
                report.problems += [f"{rel}: {e}" for e in events]
                page.close()
        finally:
            browser.close()
    report.problems += check_links(base, links)
    report.n_links = len(links)
    return report


def serve(folder: Path):
    """A quiet HTTP server for ``folder`` on a free localhost port, in a daemon thread."""
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_every_page_renders_in_chromium(served_book, smoke_book):
    start = time.perf_counter()
    pages = html_pages(smoke_book.html)
    assert "book/intro.html" in pages and "book/reproducibility.html" in pages
    chapters = [r for r in pages if r.startswith("book/chapters/")]
    assert chapters, "no chapter pages"
    shot = "book/chapters/pitfall.html" if "book/chapters/pitfall.html" in pages else chapters[0]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    screenshots = {
        "book/intro.html": SCREENSHOTS / "landing.png",
        "book/reproducibility.html": SCREENSHOTS / "reproducibility.png",
        shot: SCREENSHOTS / f"chapter-{Path(shot).stem}.png",
    }
    for path in screenshots.values():
        path.unlink(missing_ok=True)
    report = inspect_site(served_book, pages, screenshots)
    problems = report.problems
    repo = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))["repository"]
    owner_name = repo["url"].removeprefix("https://github.com/").strip("/")
    for rel in chapters:
        name = Path(rel).stem
        hrefs = report.hrefs[rel]
        colab = (
            f"https://colab.research.google.com/github/{owner_name}/blob/{repo['branch']}"
            f"/notebooks/{name}.ipynb"
        )
        binder = f"https://mybinder.org/v2/gh/{owner_name}/{repo['branch']}?labpath=notebooks"
        if colab not in hrefs:
            problems.append(f"{rel}: no Colab link {colab}")
        if not any(h.startswith(binder) and h.endswith(f"{name}.ipynb") for h in hrefs):
            problems.append(f"{rel}: no Binder link")
    elapsed = time.perf_counter() - start
    print(
        f"browser check: {len(pages)} pages, {report.n_images} images, {report.n_links} local "
        f"links in {elapsed:.1f} s"
    )
    assert not problems, "\n".join(problems)
    assert report.n_images > 0
    for path in screenshots.values():
        assert path.stat().st_size > 0, f"no screenshot {path}"


def test_the_check_finds_broken_pages(chromium_available, tmp_path):
    """The checker itself: a page with every kind of fault is reported for each of them."""
    (tmp_path / "ok.png").write_bytes(base64.b64decode(PNG_1x1))
    (tmp_path / "good.html").write_text(
        '<html><body><p id="here">fine</p><img src="ok.png"><a href="good.html#here">x</a>'
        "</body></html>"
    )
    (tmp_path / "bad.html").write_text(
        "<html><head><script>console.error('boom')</script>"
        '<script src="https://cdn.example.org/x.js"></script></head><body>'
        '<div class="output error">Traceback (most recent call last)</div>'
        '<img src="missing.png"><a href="nowhere.html">x</a><a href="good.html#gone">y</a>'
        "<script>undefinedFunction()</script></body></html>"
    )
    server, base = serve(tmp_path)
    try:
        good = inspect_site(base, ["good.html"])
        bad = inspect_site(base, ["bad.html"])
    finally:
        server.shutdown()
        server.server_close()
    assert good.problems == [] and good.n_images == 1
    text = "\n".join(bad.problems)
    for expected in (
        "console: boom",
        "page error: ",
        "external request: https://cdn.example.org/x.js",
        "rendered error: ",
        "a traceback is shown",
        "image not loaded: ",
        "nowhere.html -> HTTP 404",
        "no anchor #gone",
    ):
        assert expected in text, f"{expected!r} not reported:\n{text}"
