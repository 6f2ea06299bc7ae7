"""Helpers shared by the tests: paths, the CLI runner, tree snapshots, byte flips, the reference contexta."""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
FIXTURE_TARBALL = DATA / "contexta-1.0.0-fixture.tar.gz"
SHARED = REPO.parent / "shared"
REF_SCRIPT = SHARED / "tools" / "contexta-ref.sh"
FIXTURE_BACKUP_REF = "fixture-2026-11-26T03-48-11_819023Z"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def extract(tarball, destination):
    with tarfile.open(str(tarball)) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(str(destination), filter="data")
        else:
            archive.extractall(str(destination))


class CliResult:
    def __init__(self, completed):
        self.returncode = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr

    @property
    def json(self):
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert len(lines) == 1, "expected exactly one JSON line on stdout, got %r" % self.stdout
        return json.loads(lines[0])

    def __repr__(self):
        return "<rc=%s stdout=%r stderr=%r>" % (self.returncode, self.stdout[-2000:], self.stderr[-2000:])


class Cli:
    """Runs the real contexta.pyz in a subprocess, as an operator or a rescue script would."""

    def __init__(self, pyz_path, cwd):
        self.pyz = pyz_path
        self.cwd = cwd

    def __call__(self, *args, env=None, cwd=None, timeout=300, input=None):
        full_env = dict(os.environ)
        full_env.pop("CONTEXTA_OPS_CRASH_AT", None)
        full_env.update(env or {})
        completed = subprocess.run([sys.executable, str(self.pyz)] + [str(arg) for arg in args],
                                   cwd=str(cwd or self.cwd), env=full_env, input=input,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                                   universal_newlines=True)
        result = CliResult(completed)
        assert "Traceback" not in result.stderr, result
        return result


def run_ref(contexta_ref, script, *args, cwd=None):
    """Run a small program under the reference contexta; return its JSON output."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONTEXTA_")}
    completed = subprocess.run([contexta_ref, "-c", script] + [str(arg) for arg in args], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def snapshot(root):
    """Every entry under root: type, content digest and mode for files, target for links."""
    root = Path(root)
    entries = {}
    for dirpath, dirnames, filenames in os.walk(str(root)):
        dirnames.sort()
        for name in dirnames + sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            info = os.lstat(str(path))
            if stat.S_ISLNK(info.st_mode):
                entries[rel] = ("link", os.readlink(str(path)))
            elif stat.S_ISDIR(info.st_mode):
                entries[rel] = ("dir",)
            else:
                entries[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), stat.S_IMODE(info.st_mode))
    return entries


def flip_byte(path, offset=None):
    data = bytearray(Path(path).read_bytes())
    index = len(data) // 2 if offset is None else offset
    data[index] ^= 0x01
    Path(path).write_bytes(bytes(data))


def reseal_package(source_package, destination, body_bytes):
    """Copy an export package, give its model a new body and re-seal the binding to match.

    Only the content then differs from the source, so an import meets a genuine conflict
    rather than a broken package. Returns (package, size, digest).
    """
    import contexta_ops as ops

    shutil.copytree(str(source_package), str(destination))
    body = Path(destination) / "artifact__fixture-proj.tuned.model.bin"
    body.write_bytes(body_bytes)
    size, digest = ops.sha256_file(body)
    binding_path = Path(destination) / "artifact__fixture-proj.tuned.model.binding.json"
    binding = json.loads(binding_path.read_text())
    binding.update(size_bytes=size, hash_value=digest)
    binding_path.write_text(json.dumps(binding))
    return Path(destination), size, digest


def listed(location):
    """path -> sha256 of every file a v2 backup directory lists in SHA256SUMS, in its order (escapes undone)."""
    entries = {}
    for line in (Path(location) / "SHA256SUMS").read_bytes().splitlines():
        name = line[66:].decode("utf-8", "surrogateescape")
        if line.startswith(b"\\"):
            name = line[67:].decode("utf-8", "surrogateescape")
            name = name.replace("\\\\", "\0").replace("\\n", "\n").replace("\\r", "\r").replace("\0", "\\")
        entries[name] = line[1:65].decode() if line.startswith(b"\\") else line[:64].decode()
    return entries


def reseal(location, change_manifest=None, add=()):
    """Re-hash every listed file that is still there (and the members ``add`` names) into SHA256SUMS, then make
    the manifest's file_list, total_bytes and digest match (after ``change_manifest(manifest)``, if given): only
    the edited bytes differ, so only the planes can object."""
    location = Path(location)
    lines = []
    total = 0
    for path in sorted((set(listed(location)) | set(add))):
        if not (location / path).is_file():
            continue
        data = (location / path).read_bytes()
        total += len(data)
        assert "\\" not in path and "\n" not in path
        lines.append("%s  %s\n" % (hashlib.sha256(data).hexdigest(), path))
    sums = "".join(lines).encode("utf-8", "surrogateescape")
    (location / "SHA256SUMS").write_bytes(sums)
    manifest = json.loads((location / "manifest.json").read_text(encoding="utf-8"))
    manifest["file_list"].update(sha256=hashlib.sha256(sums).hexdigest(), size=len(sums), count=len(lines))
    manifest["total_bytes"] = total
    if change_manifest is not None:
        change_manifest(manifest)
    raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (location / "manifest.json").write_bytes(raw)
    (location / "manifest.json.sha256").write_text("%s  manifest.json\n" % hashlib.sha256(raw).hexdigest())
