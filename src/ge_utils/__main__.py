"""Command line: ``python -m ge_utils {run,diagnose,compare} ...``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``main(args) -> int``; only the module of the chosen subcommand is imported. ``run`` (the
notebook runner) and ``compare`` belong to the separate ``ge_book`` package
(``pip install -e .[book]``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

BOOK_EXTRA = "the book tooling is not installed: pip install -e '.[book]'"
BOOK_MODULES = ("ge_book", "papermill", "nbformat")

SUBCOMMANDS = {
    "run": ("ge_book.runner", "execute notebooks with papermill under a profile"),
    "diagnose": ("ge_utils.diagnose", "gradient-entanglement statistics for a JSONL of pairs"),
    "compare": ("ge_book.compare", "two runs' claim verdicts side by side (e.g. CPU and CUDA)"),
}


def load(module: str) -> ModuleType:
    """Import a subcommand's module; a missing ``book`` extra is a one-line error."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] in BOOK_MODULES:
            print(f"error: {BOOK_EXTRA} (missing module {exc.name!r})", file=sys.stderr)
            raise SystemExit(2) from exc
        raise


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; the full arguments only for ``command`` (the others are listed by name)."""
    parser = argparse.ArgumentParser(prog="python -m ge_utils", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            load(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    return int(load(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
