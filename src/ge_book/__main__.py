"""Command line: ``python -m ge_book run ...`` (the same as ``python -m ge_utils run ...``)."""

from __future__ import annotations

import argparse
import sys

from ge_utils.__main__ import load


def main(argv: list[str] | None = None) -> int:
    runner = load("ge_book.runner")  # a missing book extra is a one-line error
    parser = argparse.ArgumentParser(prog="python -m ge_book", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runner.add_arguments(sub.add_parser("run", help="execute notebooks with papermill"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return int(runner.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
