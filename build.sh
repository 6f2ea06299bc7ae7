#!/usr/bin/env bash
# Build contexta.pyz (a shiv zipapp of the single module contexta_ops.py) and print its path, size
# and sha256.  Needs python3 and, the first time, PyPI access to install shiv into .build/.
#
# Two builds of the same source are byte-identical: shiv runs with --reproducible and a build id
# derived from the source, and the final archive is rewritten with fixed timestamps.
#
# shiv's own launcher extracts the archive into ~/.shiv before running anything, and dies where
# HOME is unset, read-only or not a directory, or where the disk is full.  contexta_ops is one
# pure-Python module, so the launcher is replaced by one that imports it straight from the archive:
# nothing is extracted or written.  contexta_ops.digests.json records every member's sha256 for
# `contexta.pyz self-check`.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
OUT=${1:-contexta.pyz}
BUILD=.build
SHIV_VERSION=1.0.8

# Builds may run at once (parallel test sessions each build one): they take turns, and each works
# in a temp dir of its own, so none sees another's half-made shiv venv, site dir or archive.
mkdir -p "$BUILD"
exec 9>"$BUILD/build.lock"
flock 9
work=$(mktemp -d "$BUILD/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

if [[ ! -x $BUILD/tools/bin/shiv ]]; then
  rm -rf "$BUILD/tools"
  "$PYTHON" -m venv "$BUILD/tools" >&2
  "$BUILD/tools/bin/pip" install -q --disable-pip-version-check "shiv==$SHIV_VERSION" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
fi

site=$work/site
mkdir -p "$site"
cp contexta_ops.py "$site/"
export SOURCE_DATE_EPOCH=315532800
build_id=$("$PYTHON" -c "import hashlib,sys;print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())" \
  contexta_ops.py)
"$BUILD/tools/bin/shiv" --site-packages "$site" --reproducible --compressed \
  --entry-point contexta_ops:main --python "/usr/bin/env python3" \
  --build-id "$build_id" --output-file "$work/shiv.pyz" 2>&1 | grep -v "overridden the default build-id" >&2 || true

"$PYTHON" - "$work/shiv.pyz" "$OUT" <<'PY'
import hashlib, json, os, sys, zipfile

LAUNCHER = b'''# -*- coding: utf-8 -*-
"""contexta.pyz launcher: runs contexta_ops straight from this archive (see build.sh).

Nothing is extracted or written.  CONTEXTA_OPS_BYTECODE_CACHE=DIR opts in to keeping the compiled
module in DIR between runs (for scripts that call the tool many times); any failure there is
ignored and the module is compiled in memory as usual.
"""
import hashlib
import marshal
import os
import sys
import types
import zipfile

archive = os.path.dirname(os.path.abspath(__file__))
module_path = os.path.join(archive, "site-packages", "contexta_ops.py")
sys.path.insert(0, os.path.dirname(module_path))
cache = os.environ.get("CONTEXTA_OPS_BYTECODE_CACHE")
if cache:
    with zipfile.ZipFile(archive) as zipped:
        source = zipped.read("site-packages/contexta_ops.py")
    cached = os.path.join(cache, "contexta_ops-%s-%s.marshal" % (
        hashlib.sha256(source).hexdigest()[:24], sys.implementation.cache_tag))
    try:
        with open(cached, "rb") as handle:
            code = marshal.loads(handle.read())
    except (OSError, ValueError, EOFError, TypeError):
        code = compile(source, module_path, "exec")
        try:
            os.makedirs(cache, exist_ok=True)
            partial = "%s.%d" % (cached, os.getpid())
            with open(partial, "wb") as handle:
                handle.write(marshal.dumps(code))
            os.replace(partial, cached)
        except OSError:
            pass
    module = types.ModuleType("contexta_ops")
    module.__file__ = module_path
    sys.modules["contexta_ops"] = module
    exec(code, module.__dict__)
import contexta_ops  # noqa: E402

sys.exit(contexta_ops.main())
'''
source, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(source) as built:
    members = [(info.filename, built.read(info.filename)) for info in built.infolist()]
members = [(name, LAUNCHER if name == "__main__.py" else data) for name, data in members]
digests = {name: hashlib.sha256(data).hexdigest() for name, data in members}
members.append(("contexta_ops.digests.json", (json.dumps(
    {"members": digests, "source_sha256": digests["site-packages/contexta_ops.py"]},
    indent=2, sort_keys=True) + "\n").encode()))
partial = "%s.partial-%d" % (target, os.getpid())
with open(partial, "wb") as out:
    out.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            archive.writestr(info, data, compresslevel=9)
os.chmod(partial, 0o755)
os.replace(partial, target)
PY

size=$(wc -c <"$OUT")
sha=$("$PYTHON" -c "import hashlib,sys;print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())" "$OUT")
echo "$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT") $size bytes sha256 $sha"
