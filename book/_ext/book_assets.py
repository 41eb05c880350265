"""Make the built book self-contained and free of browser console errors.

1. MathJax from the book itself, not a CDN. Sphinx loads MathJax 3 from ``mathjax_path``, by
   default a CDN address, which fails without network (console errors in the browser test).
   This extension copies the MathJax 3.2.2 ES5 build shipped by the PyPI package
   ``django-static-mathjax`` (pinned in requirements.txt; it installs the plain ``mathjax``
   static files, Django is not needed) into ``_build/html/_static/mathjax/``, and
   ``_config.yml`` sets ``mathjax_path: mathjax/tex-mml-chtml.js`` (relative to ``_static``).
2. No script twice. Jupyter Book 1 registers the inline settings of sphinx-thebe and
   sphinx-togglebutton twice (same body, different priority); the repeated
   ``const THEBE_JS_URL`` is a JavaScript error on every page. Identical scripts are kept once.

Enabled in ``_config.yml`` under ``sphinx.local_extensions``; tests/test_browser.py checks the
result in Chromium.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

# Files of the ES5 build the CHTML page component never loads (SVG output, full bundles, Node).
UNUSED = ("*svg*", "*-full*", "node-main.js", "mml-chtml.js", "tex-chtml.js")


def mathjax_source() -> Path:
    """The installed MathJax 3 ES5 folder (``.../mathjax/static/mathjax/es5``)."""
    spec = importlib.util.find_spec("mathjax")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        es5 = Path(loc) / "static" / "mathjax" / "es5"
        if (es5 / "tex-mml-chtml.js").is_file():
            return es5
    raise ExtensionError(
        "book_assets: MathJax files not found; install the pinned requirements "
        "(pip install -r requirements.txt provides django-static-mathjax)"
    )


def _check(app: Sphinx) -> None:
    mathjax_source()  # fail at the start of the build, not after it
    path = app.config.mathjax_path
    if "://" in path or path.startswith("//"):
        raise ExtensionError(f"book_assets: mathjax_path {path!r} points at a remote host")


def _copy(app: Sphinx, exc: Exception | None) -> None:
    if exc is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / "mathjax"
    shutil.copytree(
        mathjax_source(), target, ignore=shutil.ignore_patterns(*UNUSED), dirs_exist_ok=True
    )


def _dedupe_scripts(app: Sphinx, pagename, templatename, context: dict, doctree) -> None:
    seen: set = set()
    kept = []
    for js in context.get("script_files") or []:
        attributes = getattr(js, "attributes", {}) or {}
        key = (str(getattr(js, "filename", js) or ""), tuple(sorted(attributes.items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    context["script_files"] = kept


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", _check)
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
