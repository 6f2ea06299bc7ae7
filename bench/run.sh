#!/usr/bin/env bash
# Benchmarks: builds contexta.pyz, then runs bench/run.py (see its docstring).  Prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash build.sh >/dev/null
exec python3 bench/run.py "$@"
