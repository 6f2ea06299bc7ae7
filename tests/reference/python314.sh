#!/usr/bin/env bash
# Prints the path of a CPython 3.14 (contexta 1.0.0 requires >= 3.14, so every host that runs
# Contexta has one), building one from Debian's own packages when none is found.
#
# Looked for, in this order: ~/.pyenv/versions/3.14.*/bin/python, python3.14 on PATH, and an
# earlier build of this script.  `--find` stops there (exit 1 when there is none); otherwise the
# build below runs once and is cached.
#
# The build (about a minute, 25 MB downloaded): apt-get resolves python3.14-minimal,
# libpython3.14-stdlib and python3.14-venv with everything they depend on, down to glibc, from
# Debian unstable (where 3.14 is packaged) as if onto an empty system, and downloads them into a
# private apt state directory - the machine's own apt state and packages are not touched.
# dpkg -x unpacks them under $CONTEXTA_OPS_PY314_HOME/root (default .build/python3.14/root);
# patchelf points the binary's ELF interpreter and rpath at the glibc and libraries unpacked
# there, and ensurepip is pointed at the pip wheel unpacked there, so it runs as an ordinary
# python3.14 on an older Debian: `python3.14 -m venv` and pip work.
# Needs a Debian-like host (apt-get, dpkg, Debian's archive keyring), access to Debian's package
# archive, and patchelf (installed with apt-get when missing, which needs root).
#
# Safe to run from parallel processes (flock).  The interpreter's path is the last line on
# stdout; when there is none and it cannot be built, one line on stderr says why (exit 3).
set -euo pipefail
cd "$(dirname "$0")/../.."
HOME_DIR=${CONTEXTA_OPS_PY314_HOME:-$PWD/.build/python3.14}
ROOT=$HOME_DIR/root
BUILT=$ROOT/usr/bin/python3.14
SUITE=${CONTEXTA_OPS_PY314_SUITE:-sid}

fail() { echo "python314.sh: $*" >&2; exit 3; }

works() {  # a 3.14 that can make venvs with pip
  [[ -x $1 ]] && "$1" -c 'import sys, ssl, sqlite3, zlib, ctypes, ensurepip
sys.exit(sys.version_info[:2] != (3, 14))' >/dev/null 2>&1
}

find_314() {
  local candidate
  for candidate in $(ls -d "$HOME"/.pyenv/versions/3.14.*/bin/python 2>/dev/null | sort -rV) \
                   "$(command -v python3.14 || true)"; do
    if works "$candidate"; then echo "$candidate"; return 0; fi
  done
  if [[ -f $HOME_DIR/.complete ]] && works "$BUILT"; then echo "$BUILT"; return 0; fi
  return 1
}

find_314 && exit 0
[[ ${1:-} == --find ]] && fail "no CPython 3.14 found (pyenv, PATH, or $HOME_DIR); run tests/reference/python314.sh to build one"

mkdir -p "$HOME_DIR"
exec 9>"$HOME_DIR/.lock"
flock 9
find_314 && exit 0  # another process built it while this one waited

command -v apt-get >/dev/null && command -v dpkg >/dev/null || fail "needs apt-get and dpkg (a Debian-like host)"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f $keyring ]] || fail "needs Debian's archive keyring ($keyring)"
log=$HOME_DIR/build.log
: >"$log"
if ! command -v patchelf >/dev/null; then
  { apt-get update -qq && apt-get install -y -qq patchelf; } >>"$log" 2>&1 ||
    fail "could not install patchelf with apt-get (needs root and Debian's archive; see $log)"
fi

apt_dir=$HOME_DIR/apt
rm -rf "$apt_dir" "$ROOT" "$HOME_DIR/.complete"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$ROOT"
: >"$apt_dir/status"  # an empty system: every dependency is downloaded, glibc included
echo "deb [signed-by=$keyring] http://deb.debian.org/debian $SUITE main" >"$apt_dir/sources.list"
APT=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o "Dir::State::status=$apt_dir/status"
     -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null -o Debug::NoLocking=1)
apt-get "${APT[@]}" update -qq --error-on=any >>"$log" 2>&1 || fail "cannot read Debian's $SUITE package lists (no network?); see $log"
# libstdc++6: what binary wheels such as duckdb's load, resolved through the same rpath.
apt-get "${APT[@]}" install --download-only --no-install-recommends -y -qq \
  python3.14-minimal libpython3.14-stdlib python3.14-venv libstdc++6 >>"$log" 2>&1 ||
  fail "could not download python3.14 and its dependencies from Debian $SUITE; see $log"
for deb in "$apt_dir"/cache/archives/*.deb; do dpkg -x "$deb" "$ROOT"; done

loader=$(ls "$ROOT"/usr/lib/*-linux-gnu*/ld-linux*.so.* 2>/dev/null | head -n 1)
[[ -n $loader && -x $BUILT ]] || fail "the unpacked packages hold no python3.14 or no dynamic loader; see $log"
libdir=$(dirname "$loader")
# --force-rpath: DT_RPATH (unlike RUNPATH) also serves the libraries and extension modules loaded later.
patchelf --force-rpath --set-interpreter "$loader" --set-rpath "$libdir:$ROOT/lib/$(basename "$libdir")" "$BUILT"
ensurepip=$ROOT/usr/lib/python3.14/ensurepip/__init__.py
sed -i "s|sysconfig.get_config_var('WHEEL_PKG_DIR')|'$ROOT/usr/share/python-wheels'|" "$ensurepip"
grep -q "'$ROOT/usr/share/python-wheels'" "$ensurepip" || fail "ensurepip in the $SUITE package changed shape; see $ensurepip"
works "$BUILT" || fail "the unpacked python3.14 does not run here; try: $BUILT -c 'import ssl'"
# Debian byte-compiles the standard library when the package is installed; unpacked by hand it has no
# .pyc, and each start would compile what it imports (0.2 s for a dozen modules).  A few test files
# that are invalid on purpose fail to compile: that is expected.
"$BUILT" -m compileall -q -j0 "$ROOT/usr/lib/python3.14" >>"$log" 2>&1 || true
rm -rf "$apt_dir"
touch "$HOME_DIR/.complete"
echo "$BUILT"
