#!/usr/bin/env bash
# Set up, lint, and run every test: unit tests of ge_utils, each notebook under nbval at the
# smoke profile, a smoke build of the book (tests/test_book.py) and every page of that build
# opened in headless Chromium (tests/test_browser.py; skipped without /usr/bin/chromium unless
# CI is set, where it fails: .ci/run installs Chromium first).
#
# nbval compares the claim lines the notebooks print with those stored in them. Their numbers
# come from a few dozen Adam steps on tiny models, which amplify the last bits of float
# rounding (they differ between CPU types and thread counts) into other numbers: they are
# compared only on the machine that stored them (notebooks/nbval-machine.txt, written by
# `python -m ge_utils run --refresh-sources`); elsewhere, each line's kind is compared
# (notebooks/nbval-other-machine.cfg) and this script says so.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export JUPYTER_PREFER_ENV_PATH=1
ruff check src tests benchmarks book/_ext
nbval=(--nbval-lax --nbval-current-env)
stored=$(cat notebooks/nbval-machine.txt 2>/dev/null || echo "no record")
here=$(python -c "from ge_book.provenance import machine_fingerprint; print(machine_fingerprint())")
if [ "$here" != "$stored" ]; then
  echo "note: the notebooks' outputs were stored on another machine ($stored; here: $here):" \
    "nbval compares the kinds of their claim lines, not the numbers" >&2
  nbval+=(--nbval-sanitize-with notebooks/nbval-other-machine.cfg)
fi
python -m pytest tests notebooks "${nbval[@]}" "$@"
