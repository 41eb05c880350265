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

Without Chromium or the playwright package the test fails when ``CI`` is set and is skipped
otherwise.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
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
    handler = functools.partial(_Quiet, directory=str(smoke_book.html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
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


def test_every_page_renders_in_chromium(served_book, smoke_book):
    from playwright.sync_api import sync_playwright

    start = time.perf_counter()
    base = served_book
    host = urlsplit(base).netloc
    pages = html_pages(smoke_book.html)
    assert "book/intro.html" in pages and "book/reproducibility.html" in pages
    chapters = [r for r in pages if r.startswith("book/chapters/")]
    assert chapters, "no chapter pages"
    shot = "book/chapters/pitfall.html" if "book/chapters/pitfall.html" in pages else chapters[0]
    repo = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))["repository"]
    problems: list[str] = []
    links: dict[str, set[str]] = {}
    n_images = 0
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            for rel in pages:
                url = f"{base}/{rel}"
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
                response = page.goto(url, wait_until="load")
                if response is None or response.status != 200:
                    events.append(f"HTTP {response.status if response else '?'} for the page")
                page.wait_for_load_state("networkidle")  # index.html redirects to the intro
                page.evaluate(MATHJAX_DONE)
                page.wait_for_load_state("networkidle")  # fonts MathJax asked for
                errors = page.locator(ERROR_SELECTORS)
                if errors.count():
                    events.append(f"rendered error: {errors.first.inner_text()[:200]!r}")
                body = page.inner_text("body")
                if "Traceback (most recent call last)" in body:
                    events.append("a traceback is shown")
                for img in page.evaluate(IMAGES):
                    n_images += 1
                    if not (img["w"] > 0 and img["h"] > 0):
                        events.append(f"image not loaded: {img['src']}")
                hrefs = page.evaluate(LINKS)
                for href in hrefs:
                    if urlsplit(href).netloc == host:
                        links.setdefault(href, set()).add(rel)
                if rel in chapters:
                    name = Path(rel).stem
                    colab = (
                        "https://colab.research.google.com/github/"
                        f"{repo['url'].removeprefix('https://github.com/')}/blob/"
                        f"{repo['branch']}/notebooks/{name}.ipynb"
                    )
                    if colab not in hrefs:
                        events.append(f"no Colab link {colab}")
                    if not any(h.startswith("https://mybinder.org/v2/gh/") for h in hrefs):
                        events.append("no Binder link")
                if rel == "book/intro.html":
                    headline = page.locator("#headline-figure img")
                    if headline.count() != 1:
                        events.append("no headline figure")
                    page.screenshot(path=str(SCREENSHOTS / "landing.png"), full_page=True)
                elif rel == "book/reproducibility.html":
                    page.screenshot(path=str(SCREENSHOTS / "reproducibility.png"), full_page=True)
                elif rel == shot:
                    path = SCREENSHOTS / f"chapter-{Path(rel).stem}.png"
                    page.screenshot(path=str(path), full_page=True)
                problems += [f"{rel}: {e}" for e in events]
                page.close()
        finally:
            browser.close()
    problems += check_links(base, links)
    elapsed = time.perf_counter() - start
    print(
        f"browser check: {len(pages)} pages, {n_images} images, {len(links)} local links "
        f"in {elapsed:.1f} s"
    )
    assert not problems, "\n".join(problems)
    assert n_images > 0
    assert (SCREENSHOTS / "landing.png").stat().st_size > 0
