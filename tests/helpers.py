"""Helpers shared by the tests: paths, the CLI runner, tree snapshots, byte flips, the reference contexta."""

import errno
import hashlib
import io
import json
import locale
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
FIXTURE_TARBALL = DATA / "contexta-1.0.0-fixture.tar.gz"
REF_SCRIPT = REPO / "tests" / "reference" / "contexta_ref.sh"
SHARED_REF_SCRIPT = REPO.parent / "shared" / "tools" / "contexta-ref.sh"  # a fallback, where it exists
FIXTURE_BACKUP_REF = "fixture-2026-11-26T03-48-11_819023Z"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def fill_disk(directory, leave=0):
    """Fill the filesystem holding ``directory`` until a write fails with ENOSPC (or about ``leave`` bytes are left).

    Writes filler-N files of up to 1 MiB each with os.write: nothing waits in a buffer to fail later, when a
    file is closed (Python 3.14's larger default buffer did that to a single buffered filler), and no one
    file has to take all the space.  Returns the filler files, which the caller removes to make room again.
    """
    fillers = []
    block = b"\0" * 65536
    while True:
        path = Path(directory) / ("filler-%d" % len(fillers))
        try:
            fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                return fillers
            raise
        fillers.append(path)
        try:
            written = 0
            while written < (1 << 20):
                size = len(block)
                if leave:
                    info = os.statvfs(str(directory))
                    free = info.f_bavail * info.f_frsize
                    if free <= leave:
                        return fillers
                    size = min(size, max(free - leave, 4096))
                try:
                    written += os.write(fd, block[:size])
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        return fillers
                    raise
        finally:
            os.close(fd)


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
    """Runs contexta.pyz's commands in processes of their own, as an operator or a rescue script would.

    Each command runs in a child forked from a server that loaded contexta_ops from the built pyz
    once (tests/forkserver.py): a real process, its exit status and stdio as subprocess gives them,
    ~80 ms of start-up less.  ``python contexta.pyz`` itself runs instead with OPS_TEST_EXEC=1, and
    for an ``env`` that the interpreter reads at start-up (PYTHON*, LC_*, LANG).
    """

    def __init__(self, pyz_path, cwd):
        self.pyz = pyz_path
        self.cwd = cwd

    def __call__(self, *args, env=None, cwd=None, timeout=300, input=None):
        full_env = dict(os.environ)
        full_env.pop("CONTEXTA_OPS_CRASH_AT", None)
        full_env.update(env or {})
        argv = [sys.executable, str(self.pyz)] + [str(arg) for arg in args]
        if os.environ.get("OPS_TEST_EXEC") == "1" or any(key.startswith(("PYTHON", "LC_", "LANG")) for key in env or ()):
            completed = subprocess.run(argv, cwd=str(cwd or self.cwd), env=full_env, input=input,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                                       universal_newlines=True)
        else:
            completed = _fork_server(self.pyz).run(argv, full_env, str(cwd or self.cwd), timeout, input)
        result = CliResult(completed)
        assert "Traceback" not in result.stderr, result
        return result


_FORK_SERVERS = {}


def close_fork_servers():
    """End each server (its stdin closed ends its loop) and reap it."""
    for server in _FORK_SERVERS.values():
        server.process.stdin.close()
        server.process.wait()
    _FORK_SERVERS.clear()


def _fork_server(pyz):
    server = _FORK_SERVERS.get(str(pyz))
    if server is None or server.process.poll() is not None:
        server = _FORK_SERVERS[str(pyz)] = _ForkServer(pyz)
    return server


class _ForkServer:
    """The test side of tests/forkserver.py: one command at a time, with subprocess.run's results and timeout."""

    def __init__(self, pyz):
        env = dict(os.environ)
        for key in ("CONTEXTA_OPS_CRASH_AT", "CONTEXTA_OPS_CRASH_TRACE"):
            env.pop(key, None)
        self.process = subprocess.Popen([sys.executable, str(REPO / "tests" / "forkserver.py"), str(pyz)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._pending = b""

    def _line(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.process.stdout], [], [], wait)[0]:
                return None
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("tests/forkserver.py ended (exit %s)" % self.process.wait())
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode("ascii").split()

    def run(self, argv, env, cwd, timeout, input):
        if not os.path.isdir(cwd):  # where subprocess.run would raise, before anything ran
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), cwd)
        io_dir = tempfile.mkdtemp(prefix="ops-cli-")
        try:
            stdin = None
            if input is not None:
                stdin = os.path.join(io_dir, "stdin")
                with open(stdin, "w", encoding=locale.getpreferredencoding(False)) as handle:
                    handle.write(input)
            stdout, stderr = os.path.join(io_dir, "stdout"), os.path.join(io_dir, "stderr")
            for path in (stdout, stderr):
                open(path, "wb").close()
            request = {"args": argv[2:], "env": env, "cwd": cwd, "stdin": stdin, "stdout": stdout, "stderr": stderr}
            self.process.stdin.write(json.dumps(request).encode("utf-8") + b"\n")
            self.process.stdin.flush()
            pid = int(self._line()[1])
            exited = self._line(timeout)
            if exited is None:
                os.kill(pid, signal.SIGKILL)
                self._line()
                raise subprocess.TimeoutExpired(argv, timeout)
            return subprocess.CompletedProcess(argv, int(exited[1]), _text(stdout), _text(stderr))
        finally:
            shutil.rmtree(io_dir)


def _text(path):
    """A captured stream decoded as subprocess.run(universal_newlines=True) decodes it."""
    with open(path, "rb") as handle:
        return io.TextIOWrapper(io.BytesIO(handle.read()), encoding=locale.getpreferredencoding(False)).read()


def run_ref(contexta_ref, script, *args, cwd=None):
    """Run a small program under the reference contexta; return its JSON output."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONTEXTA_")}
    completed = subprocess.run([contexta_ref, "-c", script] + [str(arg) for arg in args], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def slow_except(fast, values):
    """parametrize values: those in ``fast`` as they are, the others marked slow (run_all.sh runs them all)."""
    return [value if value in fast else pytest.param(value, marks=pytest.mark.slow) for value in values]


def traced_steps(cli, fixture_dir, tmp_path, args_for):
    """The durable steps (CONTEXTA_OPS_CRASH_TRACE) of one run, learnt from an identical copy run to completion."""
    rehearsal = tmp_path / "rehearsal"
    shutil.copytree(str(fixture_dir), str(rehearsal), symlinks=True)
    trace = tmp_path / "trace"
    result = cli(*args_for(rehearsal), env={"CONTEXTA_OPS_CRASH_TRACE": str(trace)})
    assert result.returncode == 0, result
    return trace.read_text().split()


def crash_point(steps, name, occurrence=1):
    """The CONTEXTA_OPS_CRASH_AT that kills a run at the ``occurrence``-th step called ``name`` (-1: the last)."""
    numbers = [number for number, seen in enumerate(steps, start=1) if seen == name]
    assert numbers, "%s is not among the traced steps %s" % (name, sorted(set(steps)))
    return numbers[occurrence - 1 if occurrence > 0 else occurrence]


def jsonl_objects(path, killed=False):
    """The JSON value of each line of a file the tool appends to (a sink file, the outbox on requeue).

    Only newline-terminated lines count.  A SIGKILL that lands during a large write() stops it at a
    page boundary, so the file can end in half a line; that line was never written as far as the
    tool is concerned (its journal does not cover it, and the next run cuts it off or completes it).
    With ``killed`` such a torn last line is left out; without it - after a run that finished - a
    torn line fails the test.
    """
    complete, _, torn = Path(path).read_bytes().rpartition(b"\n")
    assert killed or not torn, "%s ends in a torn line %r after a finished run" % (path, torn[-200:])
    return [json.loads(line) for line in complete.decode("utf-8").splitlines()]


def delivered_refs(replayed_dir, killed=False):
    """The replay_ref of every line in the sink files under ``replayed_dir`` (<exports>/replayed)."""
    return [line["replay_ref"] for path in sorted(Path(replayed_dir).glob("*.jsonl"))
            for line in jsonl_objects(path, killed)]


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
            elif not stat.S_ISREG(info.st_mode):  # a FIFO would block the read below
                entries[rel] = ("special", stat.S_IFMT(info.st_mode))
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
