#!/usr/bin/env bash
# The whole test suite on every supported CPython (3.8-3.13): builds contexta.pyz once, then runs
# pytest under each interpreter (two at a time) against that same file.  Extra arguments go to pytest.
# Interpreters: $CONTEXTA_OPS_PYTHONS (space-separated), else those of ~/.pyenv/versions/3.{8..13}.*
# that exist, else python3.  With CONTEXTA_OPS_ALL_PYTHONS=1 (CI) every one of 3.8-3.13 must exist.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
BUILD=$REPO/.build
mkdir -p "$BUILD/logs"

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
  if (( ${#pythons[@]} == 0 )); then
    pythons=("$(command -v python3)")
    echo "run_all: no pyenv interpreters found; testing with $(python3 --version) only" >&2
  fi
fi

# The newest interpreter runs the full crash campaign (every durable step a kill point) and starts
# first, since it takes longest.  The others run every fifth kill point, each from its own offset
# (CONTEXTA_OPS_CAMPAIGN_OFFSET), so that together they cover every point as well.
pythons=("${pythons[@]: -1}" "${pythons[@]:0:${#pythons[@]}-1}")

bash build.sh "$BUILD/contexta.pyz" || { echo "run_all: build failed" >&2; exit 3; }
export OPS_TEST_PYZ=$BUILD/contexta.pyz

run_one() {
  local python=$1 campaign=$2 offset=$3 version venv log
  version=$("$python" -c 'import sys;print("%d.%d" % sys.version_info[:2])')
  venv=$BUILD/venv-$version
  log=$BUILD/logs/pytest-$version.log
  if [[ ! -x $venv/bin/pytest ]]; then
    rm -rf "$venv"
    "$python" -m venv "$venv" >"$log" 2>&1 &&
      "$venv/bin/pip" install -q --disable-pip-version-check pytest >>"$log" 2>&1 ||
      { echo "FAIL  $version  (could not install pytest; see $log)"; return 1; }
  fi
  local start=$SECONDS
  if (cd "$REPO" && CONTEXTA_OPS_CAMPAIGN=$campaign CONTEXTA_OPS_CAMPAIGN_OFFSET=$offset \
      "$venv/bin/python" -m pytest -q -p no:cacheprovider "${@:4}") >"$log" 2>&1; then
    echo "ok    $version  $(tail -n 1 "$log")  [$((SECONDS - start))s, $campaign crash campaign$(
      [[ $campaign == sampled ]] && echo " from offset $offset")]"
  else
    echo "FAIL  $version  $(tail -n 1 "$log")  [$((SECONDS - start))s]"
    tail -n 25 "$log" | sed "s/^/  $version| /"
    return 1
  fi
}

status=0
pids=()
for index in "${!pythons[@]}"; do
  campaign=sampled
  (( index == 0 )) && campaign=full
  run_one "${pythons[$index]}" "$campaign" "$(( index > 0 ? index - 1 : 0 ))" "$@" &
  pids+=($!)
  if (( ${#pids[@]} >= ${CONTEXTA_OPS_JOBS:-2} )); then
    wait "${pids[0]}" || status=1
    pids=("${pids[@]:1}")
  fi
done
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
