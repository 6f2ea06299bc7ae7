#!/usr/bin/env bash
# Build contexta.pyz (a shiv zipapp of the single module contexta_ops.py) and print its path, size
# and sha256.  Needs python3 and, the first time, PyPI access to install shiv into .build/.
#
# Two builds of the same source are byte-identical: shiv runs with --reproducible and a build id
# derived from the source, and the final archive is rewritten with fixed timestamps.
#
# shiv's own launcher extracts the archive into ~/.shiv before running anything, and dies where
# HOME is unset, read-only or not a directory, or where the disk is full.  contexta_ops is one
# pure-Python module, so the launcher is replaced by one that runs it straight from the archive,
# after proving it against contexta_ops.digests.json (every member's sha256, also what
# `contexta.pyz self-check` checks).  The module sits at the archive's root, so a script can put the
# .pyz itself on sys.path and `import contexta_ops`.
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
import hashlib, json, os, re, sys, zipfile

LAUNCHER = b"""# -*- coding: utf-8 -*-
# contexta.pyz launcher (see build.sh).  Written so that Python 2.7 to 3.7 can read it far enough to
# say they are too old.  It proves contexta_ops.py against the sha256 recorded at build time before
# compiling it (zipimport checks no CRC: one flipped bit could run different code), then runs it
# straight from the archive: nothing is extracted.  The compiled module is kept in a cache
# ($CONTEXTA_OPS_BYTECODE_CACHE, else $XDG_CACHE_HOME/contexta-ops or ~/.cache/contexta-ops; "off" for
# none) when that can be written, and used only when its own sha256 still matches.
import sys

NAME = "contexta-ops"
MODULE = "contexta_ops.py"
DIGESTS = "contexta_ops.digests.json"


def _fail(message, code):
    sys.stderr.write("%s: error: %s\\n" % (NAME, message))
    sys.exit(code)


if sys.version_info < (3, 8):
    _fail("needs Python 3.8 or newer, this is %d.%d" % tuple(sys.version_info[:2]), 3)

# A Ctrl-C that lands inside the imports below can be raised in one of importlib's callbacks,
# where Python prints it as "Exception ignored" and goes on running.  Held until the module is
# loaded, it arrives as one KeyboardInterrupt where _run's caller turns it into one line.
import signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def _read_proven(archive):
    import hashlib
    import json
    import zipfile
    member = DIGESTS
    try:
        with zipfile.ZipFile(archive) as zipped:
            recorded = json.loads(zipped.read(member).decode("utf-8"))["members"]
            member = MODULE
            source = zipped.read(member)
    except Exception:  # a damaged header, a bad CRC, undecodable JSON: all the same to an operator
        source, recorded = None, {}
    if source is None or hashlib.sha256(source).hexdigest() != recorded.get(member):
        _fail("contexta.pyz is damaged (member %s): copy it again" % member, 3)
    return source


def _code(source, filename):
    import hashlib
    import marshal
    import os
    cache = os.environ.get("CONTEXTA_OPS_BYTECODE_CACHE")
    if cache == "off":
        return compile(source, filename, "exec")
    if not cache:
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                             "contexta-ops")
    from importlib.util import MAGIC_NUMBER
    path = os.path.join(cache, "contexta_ops-%s-%s.code" % (hashlib.sha256(source).hexdigest()[:24],
                                                            MAGIC_NUMBER.hex()))
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        if hashlib.sha256(data[32:]).digest() == data[:32]:
            return marshal.loads(data[32:])
    except (OSError, ValueError, EOFError, TypeError):
        pass
    code = compile(source, filename, "exec")
    try:
        blob = marshal.dumps(code)
        os.makedirs(cache, 0o700, exist_ok=True)
        partial = "%s.%d" % (path, os.getpid())
        with open(partial, "wb") as handle:
            handle.write(hashlib.sha256(blob).digest() + blob)
        os.replace(partial, path)
        for name in os.listdir(cache):  # one entry per interpreter: an older build's goes
            if name.startswith("contexta_ops-") and name.endswith(MAGIC_NUMBER.hex() + ".code") and \\
                    os.path.join(cache, name) != path:
                os.unlink(os.path.join(cache, name))
    except OSError:
        pass
    return code


def _version(archive):
    \"\"\"`--version` from the digests recorded at build time, without loading the module at all.\"\"\"
    import json
    import zipfile
    try:
        with zipfile.ZipFile(archive) as zipped:
            return json.loads(zipped.read(DIGESTS).decode("utf-8"))["version"]
    except Exception:
        return None


def _run():
    import os
    import types
    archive = os.path.dirname(os.path.abspath(__file__))
    if sys.argv[1:] == ["--version"]:  # rescue scripts ask often; the answer needs no module
        version = _version(archive)
        if version:
            sys.stdout.write("%s %s\\n" % (NAME, version))
            return 0
    filename = os.path.join(archive, MODULE)
    code = _code(_read_proven(archive), filename)
    module = types.ModuleType("contexta_ops")
    module.__file__ = filename
    sys.modules["contexta_ops"] = module
    exec(code, module.__dict__)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    exit_code = module.main()
    # Done: a Ctrl-C now would only turn the verdict into a bare "KeyboardInterrupt" from the
    # interpreter's own exit (Python 3.14 prints one there).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    return exit_code


try:
    sys.exit(_run())
except KeyboardInterrupt:
    _fail("interrupted", 130)
"""
source, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(source) as built:
    members = [(info.filename, built.read(info.filename)) for info in built.infolist()]
# Our launcher as __main__.py; the module at the archive's root, where `import contexta_ops` finds it
# with the .pyz itself on sys.path (shiv puts it under site-packages/).
module = dict(members)["site-packages/contexta_ops.py"]
members = [("__main__.py", LAUNCHER), ("contexta_ops.py", module)] + [
    (name, data) for name, data in members if name not in ("__main__.py", "site-packages/contexta_ops.py")]
digests = {name: hashlib.sha256(data).hexdigest() for name, data in members}
version = re.search(rb'^__version__ = "([^"]+)"$', module, re.M).group(1).decode()
members.append(("contexta_ops.digests.json", (json.dumps(
    {"members": digests, "source_sha256": digests["contexta_ops.py"], "version": version},
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
