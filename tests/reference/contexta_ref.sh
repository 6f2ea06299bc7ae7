#!/usr/bin/env bash
# Prints the path of a Python that has the real contexta 1.0.0 and duckdb from PyPI: the reference
# the interoperability tests compare contexta_ops against (tests/conftest.py, fixture contexta_ref).
#
# The interpreter: CPython 3.14, the one contexta requires, when tests/reference/python314.sh
# --find finds one (pyenv, PATH, or that script's build); there contexta runs unpatched.  Else
# 3.13 or 3.12 (pyenv, then PATH) with one workaround, applied by slots_super.py beside this file:
# contexta's slotted dataclasses call zero-argument super(), which fails before 3.14, so each such
# call is given its class.  $CONTEXTA_OPS_REF_PYTHON names the interpreter instead.
#
# Installed once into a venv, .build/contexta-ref-<X.Y>/ (under $CONTEXTA_OPS_REF_HOME when set),
# then reused: a second call only checks a marker.  Safe to run from parallel test processes
# (flock).  The interpreter's path is the last line on stdout; when the reference cannot be had,
# one line on stderr says why (for instance "no network to PyPI") and the exit code is 3.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
HOME_DIR=${CONTEXTA_OPS_REF_HOME:-$(dirname "$(dirname "$here")")/.build}
PACKAGES=(contexta==1.0.0 duckdb)

fail() { echo "$*" >&2; exit 3; }

version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

base=${CONTEXTA_OPS_REF_PYTHON:-}
if [[ -z $base ]]; then
  base=$(bash "$here/python314.sh" --find 2>/dev/null) || base=
fi
if [[ -z $base ]]; then
  for candidate in $(ls -d "$HOME"/.pyenv/versions/3.13.*/bin/python 2>/dev/null | sort -rV) \
                   $(ls -d "$HOME"/.pyenv/versions/3.12.*/bin/python 2>/dev/null | sort -rV) \
                   "$(command -v python3.13 || true)" "$(command -v python3.12 || true)"; do
    if [[ -x $candidate ]] && "$candidate" -c 'import venv, ensurepip' 2>/dev/null; then base=$candidate; break; fi
  done
fi
[[ -n $base ]] || fail "no CPython 3.14, 3.13 or 3.12 to install contexta 1.0.0 into"
version=$(version_of "$base") || fail "$base does not run"
case $version in 3.12|3.13|3.14) ;; *) fail "contexta 1.0.0 needs CPython 3.12+ here, not $version ($base)" ;; esac

venv=$HOME_DIR/contexta-ref-$version
marker=$venv/.contexta-ref-ready
ready() { [[ -f $marker && -x $venv/bin/python ]]; }  # -x: the interpreter the venv links to still exists
if ready; then echo "$venv/bin/python"; exit 0; fi
mkdir -p "$HOME_DIR"
exec 9>"$venv.lock"
flock 9
if ready; then echo "$venv/bin/python"; exit 0; fi  # another process installed it meanwhile

rm -rf "$venv"
log=$venv.log
"$base" -m venv "$venv" >"$log" 2>&1 || fail "could not create a venv with $base; see $log"
pip_args=(install --disable-pip-version-check --retries 2)
[[ $version == 3.14 ]] || pip_args+=(--ignore-requires-python)  # contexta declares >= 3.14
if ! "$venv/bin/pip" "${pip_args[@]}" "${PACKAGES[@]}" >>"$log" 2>&1; then
  rm -rf "$venv"
  if grep -qiE "NewConnectionError|Failed to establish|Name or service not known|Temporary failure in name \
resolution|Network is unreachable|Connection refused|ConnectTimeout|ProxyError|No route to host" "$log"; then
    fail "no network to PyPI (pip could not connect; see $log)"
  fi
  fail "pip could not install ${PACKAGES[*]}: $(grep -m 1 '^ERROR' "$log" || tail -n 1 "$log") (see $log)"
fi
if [[ $version != 3.14 ]]; then
  package=$("$venv/bin/python" -c 'import os, importlib.util as u; print(os.path.dirname(u.find_spec("contexta").origin))')
  "$venv/bin/python" "$here/slots_super.py" "$package" >>"$log" 2>&1 ||
    fail "the slots/super() workaround found nothing to rewrite in $package; see $log"
fi
# The result models are what fails before 3.14 without the workaround: build each one.
"$venv/bin/python" - >>"$log" 2>&1 <<'PY' || fail "contexta 1.0.0 does not work in $venv; see $log"
import duckdb
from contexta.recovery.models import BackupResult, ImportResult, ReplayBatchResult, RestoreResult
results = [ReplayBatchResult(status="ok"), BackupResult(status="ok", backup_ref="b", created_at="t"),
           RestoreResult(status="ok", backup_ref="b"), ImportResult(status="ok")]
assert [result.to_dict()["status"] for result in results] == ["OK"] * 4
assert duckdb.connect().execute("select 42").fetchall() == [(42,)]
PY
touch "$marker"
echo "$venv/bin/python"
