#!/usr/bin/env bash
# Set up, execute every notebook at a profile (default: the offline CPU reference run),
# and build the book from an empty _build/ with warnings as errors.
# Usage: bash scripts/book.sh [PROFILE]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export JUPYTER_PREFER_ENV_PATH=1
python -m ge_utils run --profile "${1:-default}" --jobs 2  # two chapters at once, one per core
rm -rf _build
jupyter-book build -W -n --keep-going .
echo "book built: $(pwd)/_build/html/index.html"
