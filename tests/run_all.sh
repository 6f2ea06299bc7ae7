#!/usr/bin/env bash
# The whole test suite on every supported CPython (3.8-3.14): builds contexta.pyz once, then runs
# pytest under each interpreter (two at a time) against that same file.  Extra arguments go to pytest.
# Interpreters: $CONTEXTA_OPS_PYTHONS (space-separated), else those of ~/.pyenv/versions/3.{8..13}.*
# that exist plus the CPython 3.14 that tests/reference/python314.sh finds or builds (a line starting
# with WARNING when it cannot), else python3.  With CONTEXTA_OPS_ALL_PYTHONS=1 (CI) every one of
# 3.8-3.13 must exist.  The interop tests use tests/reference/contexta_ref.sh (contexta 1.0.0 from PyPI).
# The last two lines: every skipped test with its reason, then the totals over all interpreters.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
BUILD=$REPO/.build
LOGS=$BUILD/logs
mkdir -p "$LOGS"
rm -f "$LOGS"/junit-*.xml

if [[ -n ${CONTEXTA_OPS_PYTHONS:-} ]]; then
  read -r -a pythons <<<"$CONTEXTA_OPS_PYTHONS"
else
  pythons=()
  for minor in 8 9 10 11 12 13; do
    found=$(ls -d "$HOME"/.pyenv/versions/3.$minor.*/bin/python 2>/dev/null | sort -V | tail -n 1)
    if [[ -n $found ]]; then
      pythons+=("$found")
    elif [[ ${CONTEXTA_OPS_ALL_PYTHONS:-} == 1 ]]; then
      echo "run_all: no Python 3.$minor under ~/.pyenv/versions" >&2
      exit 3
    fi
  done
  if python314=$(bash tests/reference/python314.sh 2>"$LOGS/python314.err" | tail -n 1) && [[ -n $python314 ]]; then
    pythons+=("$python314")
  else
    echo "WARNING: no CPython 3.14, the Python contexta requires, so the suite runs without it:" \
      "$(tail -n 1 "$LOGS/python314.err")"
  fi
  if (( ${#pythons[@]} == 0 )); then
    pythons=("$(command -v python3)")
    echo "run_all: no pyenv interpreters found; testing with $(python3 --version) only" >&2
  fi
fi

# The newest interpreter - 3.14, our users' - runs the full crash campaign (every durable step a kill
# point) and the scale test, with every command started as `python contexta.pyz` (OPS_TEST_EXEC=1)
# in trees on disk (OPS_TEST_ON_DISK=1); it starts first, since it takes longest.  The others run
# every fifth kill point, each from its own offset (CONTEXTA_OPS_CAMPAIGN_OFFSET), so that together
# they cover every point as well, with commands forked from a loaded module (tests/forkserver.py)
# in trees on /dev/shm where it has room (tests/conftest.py).
pythons=("${pythons[@]: -1}" "${pythons[@]:0:${#pythons[@]}-1}")

bash build.sh "$BUILD/contexta.pyz" || { echo "run_all: build failed" >&2; exit 3; }
export OPS_TEST_PYZ=$BUILD/contexta.pyz
# Install the reference contexta once, before the parallel runs; where it cannot be had, the
# interop tests skip and say why in the summary.
bash tests/reference/contexta_ref.sh >"$LOGS/contexta-ref.out" 2>&1

run_one() {
  local python=$1 campaign=$2 offset=$3 version venv log
  version=$("$python" -c 'import sys;print("%d.%d" % sys.version_info[:2])')
  venv=$BUILD/venv-$version
  log=$LOGS/pytest-$version.log
  if ! "$venv/bin/python" -c "import pytest" 2>/dev/null; then
    rm -rf "$venv"
    "$python" -m venv "$venv" >"$log" 2>&1 &&
      "$venv/bin/pip" install -q --disable-pip-version-check pytest >>"$log" 2>&1 ||
      { echo "FAIL  $version  (could not install pytest; see $log)"; return 1; }
  fi
  local start=$SECONDS
  local faithful=0
  [[ $campaign == full ]] && faithful=1
  if (cd "$REPO" && CONTEXTA_OPS_CAMPAIGN=$campaign CONTEXTA_OPS_CAMPAIGN_OFFSET=$offset \
      OPS_TEST_EXEC=$faithful OPS_TEST_ON_DISK=$faithful "$venv/bin/python" -m pytest -q -p no:cacheprovider --junitxml="$LOGS/junit-$version.xml" "${@:4}") \
      >"$log" 2>&1; then
    echo "ok    $version  $(tail -n 1 "$log")  [$((SECONDS - start))s, $campaign crash campaign$(
      [[ $campaign == sampled ]] && echo " from offset $offset"), $(
      [[ $faithful == 1 ]] && echo "python contexta.pyz, on disk" || echo "forked, in RAM where it fits")]"
  else
    echo "FAIL  $version  $(tail -n 1 "$log")  [$((SECONDS - start))s]"
    tail -n 25 "$log" | sed "s/^/  $version| /"
    return 1
  fi
}

status=0
running=0
for index in "${!pythons[@]}"; do
  campaign=sampled
  (( index == 0 )) && campaign=full
  run_one "${pythons[$index]}" "$campaign" "$(( index > 0 ? (index - 1) % 5 : 0 ))" "$@" &  # 5: the campaign's stride
  running=$((running + 1))
  if (( running >= ${CONTEXTA_OPS_JOBS:-2} )); then
    wait -n || status=1  # whichever ends first frees its place (3.14 takes as long as three others)
    running=$((running - 1))
  fi
done
while (( running > 0 )); do
  wait -n || status=1
  running=$((running - 1))
done
"${PYTHON:-python3}" tests/run_summary.py "$LOGS"/junit-*.xml
exit $status
