#!/usr/bin/env bash
# Build contexta.pyz (shiv zipapp of the single module contexta_ops.py) and print its path, size
# and sha256.  Needs python3 and, the first time, PyPI access to install shiv into .build/.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
OUT=${1:-contexta.pyz}
BUILD=.build
SHIV_VERSION=1.0.8

if [[ ! -x $BUILD/tools/bin/shiv ]]; then
  "$PYTHON" -m venv "$BUILD/tools" >&2
  "$BUILD/tools/bin/pip" install -q --disable-pip-version-check "shiv==$SHIV_VERSION" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
fi

site=$BUILD/site
rm -rf "$site"
mkdir -p "$site"
cp contexta_ops.py "$site/"
# Fixed timestamps and a fixed build id: two builds of the same source are byte-identical.
export SOURCE_DATE_EPOCH=315532800
build_id=$(cat contexta_ops.py | "$PYTHON" -c "import hashlib,sys;print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
"$BUILD/tools/bin/shiv" --site-packages "$site" --reproducible --compressed \
  --entry-point contexta_ops:main --python "/usr/bin/env python3" \
  --build-id "$build_id" --output-file "$OUT" >&2

size=$(wc -c <"$OUT")
sha=$("$PYTHON" -c "import hashlib,sys;print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())" "$OUT")
echo "$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT") $size bytes sha256 $sha"
