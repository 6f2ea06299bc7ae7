#!/usr/bin/env bash
# mypy on contexta_ops.py with the settings in pyproject.toml (targeting Python 3.8).  mypy 1.14 is the last
# release that checks for 3.8; it is installed once into .build/mypy (needs PyPI the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.build/mypy
if [[ ! -x $venv/bin/mypy ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "mypy==1.14.1" 2>&1 | grep -v "^WARNING: Location" >&2 || true
fi
"$venv/bin/mypy"
