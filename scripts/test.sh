#!/usr/bin/env bash
# Set up, lint, and run every test: unit tests of ge_utils, each notebook under nbval at the
# smoke profile, a smoke build of the book (tests/test_book.py) and every page of that build
# opened in headless Chromium (tests/test_browser.py; skipped without /usr/bin/chromium unless
# CI is set, where it fails: .ci/run installs Chromium first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export JUPYTER_PREFER_ENV_PATH=1
ruff check src tests benchmarks book/_ext
python -m pytest tests notebooks --nbval-lax --nbval-current-env "$@"
