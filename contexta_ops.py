"""contexta-ops: keep Contexta workspaces alive when something has gone wrong.

One self-contained module (standard library only, CPython 3.8+) that backs up a
Contexta 1.0.0 workspace, proves a backup is restorable, restores it, re-delivers
failed outbox messages, and verifies and moves artifacts between stores.  It
reads and writes the same bytes as Contexta, and fixes the defects listed in
Contexta's format notes instead of repeating them.

Commands (each also a public function a rescue script can import)::

    status                              which workspace, from where, in what state
    check [--against BACKUP]            verify the live workspace, plane by plane, or file by file
    backup plan | create | list | verify BACKUP | diff A [B] | prune
    restore [BACKUP] --verify-only      prove a backup restorable in place, write nothing
    restore plan BACKUP                 what would be replaced, kept and lost, and where it goes
    restore BACKUP [--target DIR]       verify, safety-backup, switch over atomically
    restore BACKUP --only P | --path G  the same for some parts or files; the rest stays as it is
    replay [status | requeue]           re-deliver failed outbox entries, exactly once
    recover replay                      Contexta's read-only replay of stored records
    artifact inspect | verify | export | import | put
    repair plan | repair [--plane P]    fix what check finds: torn tails, indexes, strays, bad lines
    demo | self-check                   a sample workspace; the archive's own digests

Sections, in order: deviations from Contexta; errors; primitives;
configuration; reading Contexta's stores; backup (directories, archives,
retention); restore (verify in place, apply, partial); comparisons; outbox
replay; artifacts; status and check; repair; demo and self-check; the command
line.

Every command takes the global flags ``--workspace --config --backup-root
--staging-root --outbox-root --json --quiet`` before or after its name.
``--json`` prints exactly one JSON object on stdout.  Exit codes: 0 success,
1 ran but found problems, 2 usage, 3 could not run (nothing changed), 4 locked.
"""

from __future__ import annotations

import argparse
import array
import base64
import bisect
import collections
import contextlib
import dataclasses
import enum
import errno
import fnmatch
import functools
import gzip
import hashlib
import io
import json
import marshal
import os
import re
import shutil
import stat
import struct
import sys
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    NoReturn,
    Optional,
    Pattern,
    Sequence,
    Set,
    Tuple,
    Type,
    Union,
)

try:  # POSIX only; every lock degrades to a clear error without it.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__version__ = "0.1.0"
TOOL_NAME = "contexta-ops"

__all__ = [
    # errors and exit codes
    "OpsError", "UsageError", "ConfigError", "BackupError", "RestoreError", "ArchiveDamagedError", "ReplayError",
    "ArtifactError", "ConflictError", "IntegrityError", "LockedError",
    "EXIT_OK", "EXIT_PROBLEMS", "EXIT_USAGE", "EXIT_CANNOT_RUN", "EXIT_LOCKED",
    # primitives
    "atomic_write_bytes", "sha256_file", "safe_join", "open_regular", "open_regular_fd", "read_regular",
    "json_loads", "InputRefusedError", "JsonInputError", "SpecialFileError", "Problem", "Notice",
    # configuration
    "UnifiedConfig", "WorkspaceConfig", "MetadataStoreConfig", "RecordStoreConfig",
    "ArtifactStoreConfig", "RecoveryConfig", "load_config",
    # reading Contexta's stores
    "scan_records", "RecordsReport", "replay_records", "ScanFilter", "RecordReplayResult", "RecordReplayError",
    "check_metadata_file", "MetadataReport",
    "scan_artifact_bindings", "ArtifactsReport", "ArtifactCheck", "artifact_object_relpath", "sanitize_component",
    "RecoveryResult", "ImportResult",
    # backup
    "BackupPlan", "BackupSection", "BackupResult", "BackupVerifyResult", "BackupListEntry", "PruneResult",
    "plan_workspace_backup", "create_workspace_backup", "create_backup_archive", "create_cli_zip", "list_backups",
    "verify_backup", "prune_backups",
    # restore
    "RestorePlan", "RestoreResult", "plan_restore", "restore_workspace", "restore_workspace_forced",
    # comparisons
    "DiffResult", "diff_backups", "check_against",
    # outbox replay
    "ReplayBatchResult", "ReplayEntryResult", "OutboxStatus", "RequeueResult", "LocalJsonlSink", "SinkReceipt",
    "replay_outbox", "outbox_status", "requeue_dead_letters", "sink_entries_already_delivered", "SinkIndexError",
    # artifacts
    "ArtifactStore", "VaultConfig", "ArtifactManifest", "ArtifactBinding", "ArtifactHandle", "ArtifactPutReceipt",
    "VerificationReport", "VerificationRecord", "StoreSummary", "SweepReport", "ExportReceipt", "ImportReceipt",
    "ImportOutcome", "inspect_store", "verify_artifact", "verify_all", "export_artifact", "import_export_package",
    "verify_export_package", "get_artifact", "artifact_exists", "read_artifact_bytes", "list_refs",
    # repair
    "RepairError", "RepairPlan", "RepairResult", "RepairStep", "REPAIR_PLANES", "plan_repair", "apply_repair",
    # status, check, demo, self-check
    "CheckResult", "WorkspaceStatus", "PathStatus", "StatusWarning", "DemoResult", "SelfCheckResult",
    "check_workspace", "workspace_status", "build_demo_workspace", "run_demo", "self_check",
    # command line
    "main",
]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_CANNOT_RUN = 3
EXIT_LOCKED = 4

# ---------------------------------------------------------------------------
# Deviations from Contexta 1.0.0 (on purpose; the code refers to them as D1-D8)
# ---------------------------------------------------------------------------
#
# D1 Backups hold the outbox and the capture sink's files, not the whole
#    cache; relocated stores are copied too, stored at their default place;
#    every file is listed with size and sha256; journals, locks and temp files
#    are never copied; a backup is built as .partial and renamed when whole.
# D2 A restore verifies before it changes anything, backs up the target it
#    replaces (not the configured one), builds the new copy beside it and
#    swaps atomically, keeps what the backup does not hold, puts each part
#    where the target's configuration looks, never deletes a backup, and
#    refuses while a writer or an interrupted operation is at the workspace.
# D3 Verification reads the backup with its own layout and defaults, never
#    the ambient environment, and any problem is a FAILURE.
# D4 Contexta's CLI zips are verified for real (CRC-32 and planes) and
#    restored into the target named, whatever the zip's folder is called.
# D5 Replay streams the outbox, dead-letters a malformed line instead of
#    stopping, replaces the outbox atomically, delivers to the file sink
#    exactly once, filters by target, escapes lone surrogates, and keeps
#    payload_type and payload_ref.
# D6 Artifact import proves a package first: body_file is a plain name inside
#    it, the body matches binding and manifest; a body is stored under its
#    location_ref's suffix, where every reader looks.
# D7 Unknown CONTEXTA_* variables are noted and ignored, not fatal.
# D8 Repair keeps a copy of everything it takes away: abandoned staging files
#    go to quarantine instead of being deleted, and `<id>.part` is paired
#    with `<id>.session.json` (Contexta's pairing sees every .part as
#    abandoned).  A repaired segment replaces the old one atomically.  Index
#    rebuilds write the five families the append path writes, with its key
#    rule (Contexta's rebuild drops batch_execution_ref and
#    sample_observation_ref).


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class OpsError(Exception):
    """A failure that stops a command cleanly: one line, a stable code, an exit status.

    ``code`` is stable across releases (scripts may match on it); ``path`` names
    the file or directory at fault when there is one.
    """

    code = "ops_error"
    exit_code = EXIT_CANNOT_RUN

    def __init__(self, message: str, code: Optional[str] = None, path: Any = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.path = None if path is None else str(path)

    def to_dict(self) -> Dict[str, Any]:
        payload = {"code": self.code, "message": str(self)}
        if self.path is not None:
            payload["path"] = self.path
        return payload


class UsageError(OpsError):
    code = "usage"
    exit_code = EXIT_USAGE


class ConfigError(OpsError):
    code = "config_invalid"


class BackupError(OpsError):
    code = "backup_failed"


class RestoreError(OpsError):
    code = "restore_failed"


class ArchiveDamagedError(RestoreError):
    """An archive that is recognizably ours but damaged where we must read it first (exit 1, like any damage)."""

    code = "archive_corrupt"
    exit_code = EXIT_PROBLEMS


class ReplayError(OpsError):
    code = "replay_failed"


class ArtifactError(OpsError):
    code = "artifact_invalid"


class ConflictError(ArtifactError):
    """An import or put that would overwrite a different body (exit 1: the store is fine, the request is not)."""

    code = "artifact_binding_conflict"
    exit_code = EXIT_PROBLEMS


class IntegrityError(ArtifactError):
    """A body that does not match what its binding or manifest claims; nothing was written."""

    code = "artifact_integrity"
    exit_code = EXIT_PROBLEMS


class LockedError(OpsError):
    code = "locked"
    exit_code = EXIT_LOCKED


# ---------------------------------------------------------------------------
# Shared primitives: time, JSON, durable writes, hashing, paths, locks, progress
# ---------------------------------------------------------------------------

_CHUNK = 1 << 20


def _utc_timestamp(moment: Optional[datetime] = None) -> str:
    """Contexta's TS: UTC isoformat with ``Z``; no fraction when microseconds are 0."""
    moment = moment or datetime.now(timezone.utc)
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _path_safe_timestamp(ts: str) -> str:
    """Contexta's T: a TS usable in file names."""
    return ts.replace(":", "-").replace(".", "_")


def _parse_timestamp(ts: str) -> Optional[datetime]:
    if not isinstance(ts, str) or not ts.endswith("Z"):
        return None
    try:
        return datetime.fromisoformat(ts[:-1] + "+00:00")
    except ValueError:
        return None


def _pretty_json(payload: Any) -> bytes:
    """Contexta's P-JSON bytes.  Names that are not UTF-8 fall back to \\u escapes."""
    try:
        text = json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False, default=str)
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=True, default=str)
        return (text + "\n").encode("ascii")


# One encoder each: json.dumps with options builds a new encoder per call, which dominates hot loops.
_COMPACT_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
_COMPACT_ASCII_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


# Limits every reader of untrusted JSON shares (outbox lines, manifests, config, packages, bindings, records).
# Contexta's own documents nest a handful of levels; 64 leaves room and stays far below the interpreter's
# recursion limit, which a deeper value would hit later in whatever walks it (json.dumps, ==).
_JSON_MAX_DEPTH = 64
_JSON_MAX_INT_DIGITS = 4300  # CPython 3.11+'s default, applied on every version alike
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKETS = re.compile(r"[\[\]{}]")
_JSON_LONG_DIGITS = re.compile(r"\d{%d}" % (_JSON_MAX_INT_DIGITS + 1))


class InputRefusedError(ValueError):
    """Input we will not take, with the reason as a phrase (``is larger than 1048576 bytes``)."""


class JsonInputError(InputRefusedError):
    """JSON we will not take, with the reason as a phrase (``is nested deeper than 64 levels``)."""


def _json_depth(text: str) -> int:
    depth = deepest = 0
    for bracket in _JSON_BRACKETS.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _refuse_constant(name: str) -> Any:
    raise JsonInputError("holds %s, which standard JSON does not allow" % name)


def _checked_int(digits: str) -> int:
    if len(digits.lstrip("-")) > _JSON_MAX_INT_DIGITS:
        raise JsonInputError("holds an integer of more than %d digits" % _JSON_MAX_INT_DIGITS)
    return int(digits)


# Built once: json.loads with options builds a decoder per call, which shows in loops of a million lines.
_JSON_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_JSON_CHECKING_INTS = json.JSONDecoder(parse_constant=_refuse_constant, parse_int=_checked_int)


def json_loads(data: Union[bytes, str], max_bytes: Optional[int] = None) -> Any:
    """Parse untrusted JSON within shared limits, or raise :class:`JsonInputError` saying why not.

    Refused: more than ``max_bytes``, bytes that are not UTF-8, nesting deeper
    than 64 levels, integers of more than 4,300 digits, and ``NaN``/``Infinity``
    (Python writes them, JSON has no such values).  A leading UTF-8 byte-order
    mark, which editors add, is ignored.  The same rules on every Python.
    """
    if isinstance(data, (bytes, bytearray)):
        if max_bytes is not None and len(data) > max_bytes:
            raise JsonInputError("is larger than %d bytes" % max_bytes)
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonInputError("is not valid UTF-8 (byte %d)" % exc.start)
    else:
        text = data
    if text.startswith("\ufeff"):
        text = text[1:]
    if text.count("[") + text.count("{") > _JSON_MAX_DEPTH and _json_depth(text) > _JSON_MAX_DEPTH:
        raise JsonInputError("is nested deeper than %d levels" % _JSON_MAX_DEPTH)
    long_digits = len(text) > _JSON_MAX_INT_DIGITS and _JSON_LONG_DIGITS.search(text) is not None
    try:
        if long_digits:
            return _JSON_CHECKING_INTS.decode(text)
        return _JSON_DECODER.decode(text)
    except JsonInputError:
        raise
    except RecursionError:
        raise JsonInputError("is nested too deeply")
    except ValueError as exc:
        raise JsonInputError("is not valid JSON (%s)" % exc)


def _compact_json(payload: Any) -> str:
    """Contexta's C-JSONL line, without the newline."""
    return _COMPACT_ENCODER.encode(payload)


def _jsonable(value: Any) -> Any:
    """Turn result objects into plain JSON values (paths become strings)."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    if hasattr(value, "to_dict") and not isinstance(value, type):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (dict, Mapping)):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(item) for item in value]
    return value


def _fields_dict(obj: Any) -> Dict[str, Any]:
    """``to_dict`` for our dataclasses: every field, in declaration order."""
    return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


class _Record:
    """Base of our dataclasses: ``to_dict`` gives every field as plain JSON values."""

    def to_dict(self) -> Dict[str, Any]:
        return _fields_dict(self)


def _named(exc: OSError, path: Any) -> OSError:
    """``exc`` naming ``path`` when it named nothing (a write that found the disk full, say)."""
    if exc.filename is not None:
        return exc
    named = OSError(exc.errno, exc.strerror or str(exc), str(path))
    named.__cause__ = exc
    return named


@contextlib.contextmanager
def _naming(path: Any) -> Iterator[None]:
    """Every OSError raised inside names ``path`` if it named nothing."""
    try:
        yield
    except OSError as exc:
        raise _named(exc, path)


def _fsync_dir(path: Any) -> None:
    fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Any, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so a crash leaves the old file or the new one.

    Temp file in the same directory, fsync, rename over, fsync the directory.
    The temp name starts with ``tmp`` so Contexta's readers ignore a stray one.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix="tmp", dir=str(path.parent))
    try:
        with _naming(path), os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode & ~_umask())
        os.replace(tmp_name, str(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


_UMASK: Optional[int] = None


def _umask() -> int:
    global _UMASK
    if _UMASK is None:
        current = os.umask(0o022)
        os.umask(current)
        _UMASK = current
    return _UMASK


_BUFFERS = threading.local()


def _chunk_buffer() -> Tuple[bytearray, memoryview]:
    """This thread's reusable read buffer: allocating (and zeroing) 1 MiB per file costs more than hashing it."""
    buffer = getattr(_BUFFERS, "buffer", None)
    if buffer is None:
        buffer = _BUFFERS.buffer = bytearray(_CHUNK)
        _BUFFERS.view = memoryview(buffer)
    return buffer, _BUFFERS.view


def _chunks(reader: Any) -> Iterator[memoryview]:
    """A reader's bytes, a buffer at a time (each chunk is valid until the next one is asked for)."""
    buffer, view = _chunk_buffer()
    while True:
        count = reader.readinto(buffer)
        if not count:
            return
        yield view[:count]


def _hash_stream(handle: Any) -> Tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    for chunk in _chunks(handle):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


class SpecialFileError(OSError):
    """A path we were to read is a FIFO, device or socket: opening or reading it could block forever."""


def open_regular_fd(path: Any, *, follow_symlinks: bool = True) -> int:
    """Open a regular file for reading, never anything else (a FIFO would block ``open`` forever).

    ``O_NONBLOCK`` makes opening a FIFO return at once; ``fstat`` on the open
    descriptor then proves what it is.  Raises :class:`SpecialFileError`
    (an ``OSError`` naming the path) for anything but a regular file.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(str(path), flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise SpecialFileError(errno.ELOOP, "is a symbolic link, which is never followed here", str(path))
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "directory" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "special file"
            raise SpecialFileError(errno.EINVAL, "is a %s, not a regular file" % kind, str(path))
        if fcntl is not None and flags & getattr(os, "O_NONBLOCK", 0):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: Any, *, follow_symlinks: bool = True) -> Any:
    """:func:`open_regular_fd` as a binary file object."""
    return os.fdopen(open_regular_fd(path, follow_symlinks=follow_symlinks), "rb")


# The largest JSON document read whole that is not a backup manifest (config, journal, binding, package file).
_JSON_FILE_LIMIT = 64 << 20


def read_regular(path: Any, limit: Optional[int] = _JSON_FILE_LIMIT, *, follow_symlinks: bool = True) -> bytes:
    """A regular file's bytes, at most ``limit`` of them (:class:`InputRefusedError` beyond that)."""
    with open_regular(path, follow_symlinks=follow_symlinks) as handle:
        if limit is None:
            return handle.read()
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise InputRefusedError("is larger than %d bytes" % limit)
    return data


def sha256_file(path: Any, *, follow_symlinks: bool = True) -> Tuple[int, str]:
    """Size and lowercase sha256 of a regular file, read in constant memory (never a FIFO or device)."""
    fd = open_regular_fd(path, follow_symlinks=follow_symlinks)
    try:
        expected = os.fstat(fd).st_size
        if expected < _CHUNK:  # most files: one read, no buffer
            data = os.read(fd, expected + 1)
            if len(data) <= expected:
                return len(data), hashlib.sha256(data).hexdigest()
            os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as handle:
            return _hash_stream(handle)
    finally:
        os.close(fd)


def _copy_stream_hashed(reader: Any, destination: Any, durable: bool = False) -> Tuple[int, str]:
    """Copy a readable stream (an archive member, a body being ingested) to a new file, hashing on the way."""
    digest = hashlib.sha256()
    size = 0
    with _naming(destination), open(destination, "xb") as out:
        for chunk in _chunks(reader):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
        if durable:
            out.flush()
            os.fsync(out.fileno())
    return size, digest.hexdigest()


def _kernel_copy(source_fd: int, destination_fd: int) -> int:
    """Copy a whole file inside the kernel (copy_file_range), or by reads and writes where it cannot."""
    total = 0
    if hasattr(os, "copy_file_range"):
        try:
            while True:
                copied = os.copy_file_range(source_fd, destination_fd, 1 << 30)
                if not copied:
                    return total
                total += copied
        except OSError as exc:
            if total or exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
    while True:
        chunk = os.read(source_fd, _CHUNK)
        if not chunk:
            return total
        os.write(destination_fd, chunk)
        total += len(chunk)


# Files up to this size are read with one call and copied in batches: one worker round trip per file
# costs more than copying it (a workspace may hold a million small files).
_SMALL_FILE = 256 << 10
_COPY_BATCH_FILES = 128
_COPY_BATCH_BYTES = 8 << 20
_SOURCE_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_NOFOLLOW", 0))
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _open_source_file(source: str) -> Tuple[int, os.stat_result]:
    """A file a walk saw as regular, opened without following a link or blocking on a FIFO put there since."""
    try:
        fd = os.open(source, _SOURCE_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SpecialFileError(errno.ELOOP, "became a symbolic link while it was read", source)
        raise
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise SpecialFileError(errno.EINVAL, "is a %s, not a regular file" % _special_kind(opened.st_mode), source)
    except BaseException:
        os.close(fd)
        raise
    return fd, opened


def _read_all(fd: int, expected: int) -> bytes:
    """A small file's bytes: one read when its size is what the walk saw (the usual case)."""
    data = os.read(fd, expected + 1)
    if len(data) == expected + 1 or 0 < len(data) < expected:  # grew, or a short read: read on to the end
        chunks = [data]
        while True:
            more = os.read(fd, _CHUNK)
            if not more:
                break
            chunks.append(more)
        data = b"".join(chunks)
    return data


def _stamp(fd: int, path: str, mode: int, mtime_ns: int) -> None:
    """Give a file we just created its mode (exactly, whatever the umask) and its mtime."""
    if mode & _umask() or mode & ~0o777:
        os.fchmod(fd, mode)
    if os.utime in os.supports_fd:
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    else:  # pragma: no cover - every Linux has futimens
        os.utime(path, ns=(mtime_ns, mtime_ns))


def _write_new_file(destination: str, data: bytes, mode: int, mtime_ns: int) -> None:
    """Create ``destination`` (never overwriting) holding ``data``, with ``mode`` and ``mtime_ns``."""
    try:
        fd = os.open(destination, _NEW_FILE_FLAGS, mode & 0o777)
        try:
            written = os.write(fd, data)
            if written < len(data):  # a short write (a disk filling up): finish it, or fail naming the file
                view = memoryview(data)[written:]
                while view:
                    view = view[os.write(fd, view):]
            _stamp(fd, destination, mode, mtime_ns)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _named(exc, destination)


def _changed(seen: Tuple[int, int], size_read: int, after: os.stat_result) -> bool:
    """A concurrent writer: the bytes read, or the file's size or mtime after reading, differ from what was seen."""
    return size_read != seen[0] or after.st_size != seen[0] or after.st_mtime_ns != seen[1]


def _copy_file(source: str, destination: str, seen: Tuple[int, int], mode: int,
               mtime_ns: int) -> Tuple[int, str, bool]:
    """Copy a file to a new one and prove the bytes written: (size, sha256, changed while it was read).

    ``seen`` is the (size, mtime_ns) the source had when it was walked.  A
    small file is read with one call, written with one and hashed in memory.
    A large one is copied inside the kernel (copy_file_range), then the copy is
    hashed: it is still in the page cache, so proving it costs a memory read -
    the same work as `cp` followed by `openssl dgst` on the copy.  The copy gets
    ``mode`` and ``mtime_ns``, set through its descriptor.
    """
    fd, _opened = _open_source_file(source)
    try:
        if seen[0] <= _SMALL_FILE:
            data = _read_all(fd, seen[0])
            after = os.fstat(fd)
            _write_new_file(destination, data, mode, mtime_ns)
            return len(data), hashlib.sha256(data).hexdigest(), _changed(seen, len(data), after)
        out = os.open(destination, (_NEW_FILE_FLAGS & ~os.O_WRONLY) | os.O_RDWR, mode & 0o777)
        try:
            with _naming(destination):
                _kernel_copy(fd, out)
                after = os.fstat(fd)
                os.lseek(out, 0, os.SEEK_SET)
                with os.fdopen(os.dup(out), "rb", buffering=0) as written:
                    size, digest = _hash_stream(written)
                _stamp(out, destination, mode, mtime_ns)
        finally:
            os.close(out)
    finally:
        os.close(fd)
    return size, digest, _changed(seen, size, after)


def _run_jobs(jobs: Sequence[Tuple[Callable[..., Any], Tuple[Any, ...]]]) -> List[Any]:
    """A worker thread's task: a batch of jobs, results in the same order."""
    return [job(*args) for job, args in jobs]


class _Batches:
    """Runs file jobs (copies, hashes) on two threads while the caller walks on; results come back in order.

    Jobs on small files travel in batches, large ones one by one (one worker
    round trip per file would cost more than the job); reading, copying and
    hashing release the GIL, so the walk and the jobs overlap.  Callbacks run
    on the caller's thread, in submission order.  At most ``window`` tasks are
    in flight, which bounds memory.
    """

    def __init__(self, window: int = 16) -> None:
        import concurrent.futures
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        self.window = window
        self.batch: List[Tuple[Callable[..., Any], Tuple[Any, ...]]] = []
        self.batch_done: List[Callable[[Any], None]] = []
        self.batch_bytes = 0
        self.pending: List[Tuple[Any, List[Callable[[Any], None]]]] = []

    def submit(self, on_done: Callable[[Any], None], size: int, job: Callable[..., Any], *args: Any) -> None:
        """Run ``job(*args)`` on a file of ``size`` bytes; ``on_done(result)`` runs on this thread."""
        if size > _SMALL_FILE:
            self._flush()
            self._send([(job, args)], [on_done])
            return
        self.batch.append((job, args))
        self.batch_done.append(on_done)
        self.batch_bytes += size
        if len(self.batch) >= _COPY_BATCH_FILES or self.batch_bytes >= _COPY_BATCH_BYTES:
            self._flush()

    def later(self, then: Callable[[Any], Any], size: int, job: Callable[..., Any], *args: Any) -> "_Later":
        """:meth:`submit`, returning what to wait for: its ``result()`` is ``then(job's result)``, run here."""
        waiting = _Later(self, then)
        self.submit(waiting.settle, size, job, *args)
        return waiting

    def _flush(self) -> None:
        if self.batch:
            self._send(self.batch, self.batch_done)
            self.batch, self.batch_done, self.batch_bytes = [], [], 0

    def _send(self, jobs: List[Tuple[Callable[..., Any], Tuple[Any, ...]]],
              callbacks: List[Callable[[Any], None]]) -> None:
        self.pending.append((self.pool.submit(_run_jobs, jobs), callbacks))
        while len(self.pending) > self.window:
            self.settle_oldest()

    def settle_oldest(self) -> bool:
        """Wait for the oldest task and run its callbacks; False when nothing is in flight."""
        if not self.pending:
            self._flush()
            if not self.pending:
                return False
        future, callbacks = self.pending.pop(0)
        for on_done, result in zip(callbacks, future.result()):  # raises the worker's exception, if any, here
            on_done(result)
        return True

    def finish(self) -> None:
        try:
            while self.settle_oldest():
                pass
        finally:
            self.close()

    def close(self) -> None:
        for future, _callbacks in self.pending:
            future.cancel()
        self.pool.shutdown(wait=True)
        self.pending = []
        self.batch, self.batch_done = [], []


class _Later:
    """One job's result, waited for by settling the oldest tasks until it is in."""

    __slots__ = ("batches", "then", "value", "done")

    def __init__(self, batches: _Batches, then: Callable[[Any], Any]) -> None:
        self.batches = batches
        self.then = then
        self.value: Any = None
        self.done = False

    def settle(self, value: Any) -> None:
        self.value, self.done = self.then(value), True

    def result(self) -> Any:
        while not self.done:
            if not self.batches.settle_oldest():
                raise AssertionError("a job was lost")
        return self.value


def _sync_filesystem(path: Any) -> None:
    """Make everything written under ``path`` durable: one syncfs(2) of its filesystem (``sync`` elsewhere).

    One flush of the filesystem costs far less than an fsync per file, and
    leaves every file and directory as durable.  An error is fatal.
    """
    fd = os.open(str(path), os.O_RDONLY)
    try:
        syncfs = _libc_function("syncfs")
        if syncfs is None:
            os.sync()
        elif syncfs(fd) != 0:
            import ctypes
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error), str(path))
    finally:
        os.close(fd)


def _libc_function(name: str) -> Any:
    """A libc function by name (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # only here: importing it costs every command's start-up
    try:  # the process's own symbols hold libc's; find_library would run ldconfig in a subprocess to say so
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        pass
    import ctypes.util
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


def _set_file_times_and_mode(path: Any, mode: int, mtime_ns: int) -> None:
    os.chmod(path, stat.S_IMODE(mode))
    os.utime(path, ns=(mtime_ns, mtime_ns))


def safe_join(root: Any, relative: str) -> Path:
    """Join a relative path from untrusted input under ``root``, or refuse.

    Refuses absolute paths, ``..`` components, empty names and NUL bytes, so a
    manifest, archive or package can never make us write outside ``root``.
    """
    return Path(_safe_join_text(str(root), relative))


def _safe_join_text(root: str, relative: Any) -> str:
    """:func:`safe_join` on strings, for the hot loops that place thousands of files."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise OpsError("unsafe path %r" % (relative,), code="unsafe_path")
    if relative.startswith("/") or relative.startswith("\\") or relative[1:2] == ":":
        raise OpsError("unsafe absolute path %r" % (relative,), code="unsafe_path")
    parts = relative.replace("\\", "/").split("/")
    if "" in parts or "." in parts or ".." in parts:
        raise OpsError("unsafe path %r" % (relative,), code="unsafe_path")
    return root.rstrip("/") + "/" + "/".join(parts)


def _is_within(path: Any, root: Any) -> bool:
    """True when ``path`` is ``root`` or lies below it (both taken as given, absolute)."""
    path_text = os.path.normpath(str(path))
    root_text = os.path.normpath(str(root))
    if path_text == root_text:
        return True
    return path_text.startswith(root_text.rstrip(os.sep) + os.sep)


def _relative_posix(path: Any, root: Any) -> str:
    return Path(os.path.relpath(str(path), str(root))).as_posix()


def _remove_tree(path: Any) -> None:
    """Remove a file or a tree; missing is fine.  Read-only dirs are made writable first."""
    path = str(path)
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
        return
    if not os.path.isdir(path):
        return

    def _retry_writable(func: Callable[..., Any], failed: str, _exc: Any) -> None:
        parent = os.path.dirname(failed)
        with contextlib.suppress(OSError):
            os.chmod(parent, stat.S_IRWXU)
        func(failed)

    shutil.rmtree(path, onerror=_retry_writable)


def _tree_size(root: Any, excludes: Sequence[Path] = (), skip: Optional[Pattern[str]] = None) -> Tuple[int, int]:
    """(file count, byte count) below ``root``, not following symlinks."""
    count = 0
    total = 0
    for _relative, entry_stat, kind in _walk_tree(Path(root), excludes, skip):
        if kind == "file":
            count += 1
            total += entry_stat.st_size
    return count, total


def _kind_of(mode: int) -> str:
    """``dir``, ``file``, ``symlink`` or ``special`` for an lstat mode."""
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "symlink" if stat.S_ISLNK(mode) else "special"


def _sorted_names(directory: str, excluded: Set[str], skip: Optional[Pattern[str]]) -> List[str]:
    """A directory's entry names in walk order: each directory's name carries a trailing ``/``.

    Sorting ``name/`` rather than ``name`` puts a directory exactly where the
    paths below it sort (``a.txt`` < ``a/x`` < ``a0``), so a depth-first walk
    yields every path in plain string order.  Only names are held, one string
    per entry: the stat comes when the entry is yielded.
    """
    try:
        with os.scandir(directory) as handle:
            names = [entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name
                     for entry in handle
                     if not (skip is not None and skip.match(entry.name))
                     and not (excluded and entry.path in excluded)]
    except FileNotFoundError:
        return []
    names.sort()
    return names


def _walk_tree(root: Path, excludes: Sequence[Path] = (),
               skip: Optional[Pattern[str]] = None) -> Iterator[Tuple[str, os.stat_result, str]]:
    """Yield ``(relative posix path, lstat, kind)`` for everything below ``root``, depth first.

    A directory comes right before what it holds, and paths come out in plain
    string order (what backup lists are sorted by, so two walks can be merged).
    ``kind`` is ``dir``, ``file``, ``symlink`` or ``special``.  Symlinks are never
    followed; paths in ``excludes`` and names matching ``skip`` (and everything
    below them) are skipped.
    """
    excluded = {os.path.normpath(str(path)) for path in excludes}
    top = os.path.normpath(str(root))  # so every path below it is normalized too, and compares with `excluded`
    stack: List[Tuple[str, Iterator[str]]] = [(top.rstrip("/") + "/", iter(_sorted_names(top, excluded, skip)))]
    prefixes = [""]
    while stack:
        directory, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            prefixes.pop()
            continue
        if name.endswith("/"):
            name = name[:-1]
        path = directory + name
        try:
            entry_stat = os.lstat(path)
        except FileNotFoundError:
            continue  # removed since the directory was listed
        relative = prefixes[-1] + name
        kind = _kind_of(entry_stat.st_mode)
        yield relative, entry_stat, kind
        if kind == "dir":
            stack.append((path + "/", iter(_sorted_names(path, excluded, skip))))
            prefixes.append(relative + "/")


class _Lock:
    """An exclusive or shared ``flock`` held for the life of a ``with`` block.

    Locks a lock file (created if needed) or a directory itself.  When the lock
    is held elsewhere we raise :class:`LockedError` at once (exit 4) and have
    changed nothing.  ``flock`` locks vanish with the process, so a kill -9
    never leaves a stale lock behind.
    """

    def __init__(self, path: Any, *, what: str, exclusive: bool = True, directory: bool = False) -> None:
        self.path = Path(path)
        self.what = what
        self.exclusive = exclusive
        self.directory = directory
        self.fd: Optional[int] = None

    def __enter__(self) -> "_Lock":
        if fcntl is None:  # pragma: no cover - not POSIX
            raise OpsError("locking needs a POSIX system (fcntl)", code="unsupported_platform")
        if self.directory:
            self.fd = os.open(str(self.path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        elif not self.exclusive:
            self.fd = os.open(str(self.path), os.O_RDONLY)  # readers lock what they read, even read-only media
        else:
            self.fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        mode = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            self.fd = None
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise LockedError("%s is locked by another run (%s)" % (self.what, self.path), path=self.path)
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _lock_is_held(path: Any, *, directory: bool = False) -> bool:
    """True when another process holds a flock on ``path`` (checked without blocking)."""
    if fcntl is None or not os.path.exists(str(path)):
        return False
    # O_NONBLOCK: a FIFO put where a lock file belongs must not hang the check (it is then no lock of ours)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(str(path), flags)
    except OSError:
        return False
    try:
        if not (stat.S_ISREG(os.fstat(fd).st_mode) or directory):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _posix_lock_is_held(path: Any) -> bool:
    """True when another process holds a POSIX write lock on ``path``.

    DuckDB takes an ``fcntl`` record lock on its database file while a
    read-write connection is open; that is how we see a live writer.
    """
    if fcntl is None or not os.path.isfile(str(path)):
        return False
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return False


def _crash_point(name: str) -> None:
    """Test hook: ``CONTEXTA_OPS_CRASH_AT=N`` kills the process at its Nth durable step.

    Lets the crash campaign stop a run right before or after any rename or
    fsync that matters, deterministically, with a real SIGKILL.
    ``CONTEXTA_OPS_CRASH_TRACE=FILE`` appends the name of every step reached.
    """
    if not _CRASH_HOOKED:  # read once: the hot loops pass here for every file
        return
    target = os.environ.get("CONTEXTA_OPS_CRASH_AT")
    trace = os.environ.get("CONTEXTA_OPS_CRASH_TRACE")
    if not target and not trace:
        return
    _crash_point.count += 1  # type: ignore[attr-defined]
    if trace:
        with open(trace, "a", encoding="utf-8") as handle:
            handle.write(name + "\n")
    if target and _crash_point.count == int(target):  # type: ignore[attr-defined]
        os.kill(os.getpid(), 9)


def _crash_hook_wanted() -> bool:
    return bool(os.environ.get("CONTEXTA_OPS_CRASH_AT") or os.environ.get("CONTEXTA_OPS_CRASH_TRACE"))


_crash_point.count = 0  # type: ignore[attr-defined]
_CRASH_HOOKED = _crash_hook_wanted()


def _write_quietly(stream: Any, text: str) -> None:
    """Write and flush; a reader gone away (EPIPE) ends the output, not the command's verdict."""
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError):  # no second complaint when Python flushes at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


class _Progress:
    """Progress of one phase on stderr - name, amount, rate, ETA - only on a terminal and never with --json/--quiet.

    Updated at most five times a second, so hot loops may call ``advance`` freely.
    """

    enabled = False

    def __init__(self, label: str, total_bytes: int = 0, unit: str = "files") -> None:
        self.label = label
        self.total_bytes = total_bytes
        self.unit = unit
        self.files = 0
        self.bytes = 0
        self.started = time.monotonic()
        self._last = 0.0

    def advance(self, nbytes: int, files: int = 1) -> None:
        self.files += files
        self.bytes += nbytes
        if not _Progress.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        _write_quietly(sys.stderr, "\r%s   " % self._line(now))

    def _line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-6)
        if self.bytes:
            amount = "%d %s, %s" % (self.files, self.unit, _human_bytes(self.bytes))
            rate = "%s/s" % _human_bytes(int(self.bytes / elapsed))
        else:
            amount = "%d %s" % (self.files, self.unit)
            rate = "%d/s" % (self.files / elapsed)
        tail = ""
        if self.total_bytes and self.bytes:
            share = min(self.bytes / self.total_bytes, 1.0)
            remaining = (self.total_bytes - self.bytes) / max(self.bytes / elapsed, 1)
            tail = " (%d%%, ETA %ds)" % (share * 100, max(remaining, 0))
        return "%s: %s, %s%s" % (self.label, amount, rate, tail)

    def finish(self) -> None:
        if _Progress.enabled and (self.bytes or self.files):
            _write_quietly(sys.stderr, "\r%s, done.   \n" % self._line(time.monotonic()))

    @staticmethod
    def phase(text: str) -> None:
        """One line saying what a long command does next (on a terminal only)."""
        if _Progress.enabled:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return ("%d %s" % (value, unit)) if unit == "B" else ("%.1f %s" % (value, unit))
        value /= 1024
    return "%d B" % count  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing found wrong, naming the file: what a verifier reports."""

    code: str
    path: str
    message: str
    expected: Any = None
    actual: Any = None

    def to_dict(self) -> Dict[str, Any]:
        payload = {"code": self.code, "path": self.path, "message": self.message}
        if self.expected is not None or self.actual is not None:
            payload["expected"] = self.expected
            payload["actual"] = self.actual
        return payload

    def line(self) -> str:
        return "%s: %s" % (self.path, self.message)


@dataclasses.dataclass(frozen=True)
class Notice:
    """A warning that does not stop a command: a stable code for scripts, a sentence for people."""

    code: str
    message: str

    def to_dict(self) -> Dict[str, Any]:
        return {"code": self.code, "message": self.message}

    def __str__(self) -> str:
        return "%s: %s" % (self.code, self.message)


# ---------------------------------------------------------------------------
# Configuration, resolved the way Contexta resolves it
# ---------------------------------------------------------------------------
#
# Defaults -> profile -> --config FILE -> CONTEXTA_* environment -> flags.
# Relative paths resolve against the process cwd (never the config file's
# directory), derived paths follow their parents, exactly as in Contexta.

def _resolve_path(value: Any) -> Path:
    raw = Path(os.path.expanduser(str(value))) if str(value).startswith("~") else Path(value)
    if not raw.is_absolute():
        raw = Path.cwd() / raw
    return raw.resolve()


def _optional_path(value: Any) -> Optional[Path]:
    return None if value is None else _resolve_path(value)


# The default of a path setting that follows another one (``metadata_path`` follows ``root_path``): None
# until the config is built, when ``__post_init__`` fills it in.  Typed Any so the fields can be ``Path``.
_DERIVED: Any = None


class _PathSection(_Record):
    """A config table whose path settings become absolute when it is built, as in Contexta."""

    _path_fields: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in self._path_fields:
            object.__setattr__(self, name, _optional_path(getattr(self, name)))


@dataclasses.dataclass(frozen=True)
class WorkspaceConfig(_PathSection):
    """Workspace root and its derived store paths (Contexta's ``workspace`` table)."""

    root_path: Path = Path(".contexta")
    metadata_path: Path = _DERIVED
    records_path: Path = _DERIVED
    artifacts_path: Path = _DERIVED
    reports_path: Path = _DERIVED
    exports_path: Path = _DERIVED
    cache_path: Path = _DERIVED
    create_missing_dirs: bool = True

    def __post_init__(self) -> None:
        root = _resolve_path(self.root_path)
        object.__setattr__(self, "root_path", root)
        for name in ("metadata", "records", "artifacts", "reports", "exports", "cache"):
            field_name = name + "_path"
            value = getattr(self, field_name)
            object.__setattr__(self, field_name, _optional_path(value) or root / name)


@dataclasses.dataclass(frozen=True)
class MetadataStoreConfig(_PathSection):
    _path_fields = ("database_path",)

    storage_adapter: str = "duckdb"
    database_path: Path = _DERIVED
    auto_create: bool = True
    read_only: bool = False
    auto_migrate: bool = False


@dataclasses.dataclass(frozen=True)
class RecordStoreConfig(_PathSection):
    _path_fields = ("root_path",)

    root_path: Path = _DERIVED
    max_segment_bytes: int = 1048576
    durability_mode: str = "fsync"
    layout_mode: str = "jsonl_segments"
    layout_version: str = "1"
    enable_indexes: bool = True
    read_only: bool = False


@dataclasses.dataclass(frozen=True)
class ArtifactStoreConfig(_PathSection):
    _path_fields = ("root_path",)

    root_path: Path = _DERIVED
    default_ingest_mode: str = "copy"
    verification_mode: str = "manifest_if_available"
    create_missing_dirs: bool = True
    layout_version: str = "v1"
    chunk_size_bytes: int = 1048576
    read_only: bool = False


@dataclasses.dataclass(frozen=True)
class RecoveryConfig(_PathSection):
    """Where backups, restore staging and the outbox live (Contexta's ``recovery`` table)."""

    _path_fields = ("outbox_root", "backup_root", "restore_staging_root")

    outbox_root: Path = _DERIVED
    backup_root: Path = _DERIVED
    restore_staging_root: Path = _DERIVED
    replay_mode_default: str = "tolerant"
    require_plan_before_apply: bool = True
    create_backup_before_restore: bool = True


@dataclasses.dataclass(frozen=True)
class UnifiedConfig(_Record):
    """The parts of Contexta's configuration this tool uses, with Contexta's names.

    Build one in code exactly as the guide's programs do::

        UnifiedConfig(project_name="p", workspace=WorkspaceConfig(root_path=ws),
                      recovery=RecoveryConfig(backup_root=bk))
    """

    config_version: str = "1"
    profile_name: str = "local"
    project_name: str = "default"
    workspace: WorkspaceConfig = dataclasses.field(default_factory=WorkspaceConfig)
    metadata: MetadataStoreConfig = dataclasses.field(default_factory=MetadataStoreConfig)
    records: RecordStoreConfig = dataclasses.field(default_factory=RecordStoreConfig)
    artifacts: ArtifactStoreConfig = dataclasses.field(default_factory=ArtifactStoreConfig)
    recovery: RecoveryConfig = dataclasses.field(default_factory=RecoveryConfig)
    # Contexta's other sections (capture, surfaces, ...), carried as given, never read: a backup's
    # resolved.config.json holds every section Contexta writes.
    foreign_sections: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.profile_name not in ("local", "test"):
            raise ConfigError("unsupported profile_name %r (local or test)" % (self.profile_name,))
        ws = self.workspace
        if self.metadata.database_path is None:
            object.__setattr__(self, "metadata", dataclasses.replace(
                self.metadata, database_path=ws.metadata_path / "ledger.db"))
        if self.records.root_path is None:
            object.__setattr__(self, "records", dataclasses.replace(self.records, root_path=ws.records_path))
        if self.artifacts.root_path is None:
            object.__setattr__(self, "artifacts", dataclasses.replace(self.artifacts, root_path=ws.artifacts_path))
        recovery = self.recovery
        if recovery.outbox_root is None:
            recovery = dataclasses.replace(recovery, outbox_root=ws.cache_path / "outbox")
        if recovery.backup_root is None:
            recovery = dataclasses.replace(recovery, backup_root=ws.exports_path / "backups")
        if recovery.restore_staging_root is None:
            recovery = dataclasses.replace(recovery, restore_staging_root=ws.cache_path / "restore")
        object.__setattr__(self, "recovery", recovery)


# Field types of every setting we read from a file or the environment.
_CONFIG_SCHEMA: Dict[str, Dict[str, str]] = {
    "workspace": {"root_path": "path", "metadata_path": "path", "records_path": "path",
                  "artifacts_path": "path", "reports_path": "path", "exports_path": "path",
                  "cache_path": "path", "create_missing_dirs": "bool"},
    "metadata": {"storage_adapter": "str", "database_path": "path", "auto_create": "bool",
                 "read_only": "bool", "auto_migrate": "bool"},
    "records": {"root_path": "path", "max_segment_bytes": "int", "durability_mode": "str",
                "layout_mode": "str", "layout_version": "str", "enable_indexes": "bool", "read_only": "bool"},
    "artifacts": {"root_path": "path", "default_ingest_mode": "str", "verification_mode": "str",
                  "create_missing_dirs": "bool", "layout_version": "str", "chunk_size_bytes": "int",
                  "read_only": "bool"},
    "recovery": {"outbox_root": "path", "backup_root": "path", "restore_staging_root": "path",
                 "replay_mode_default": "str", "require_plan_before_apply": "bool",
                 "create_backup_before_restore": "bool"},
}
_SECTION_CLASSES = {"workspace": WorkspaceConfig, "metadata": MetadataStoreConfig, "records": RecordStoreConfig,
                    "artifacts": ArtifactStoreConfig, "recovery": RecoveryConfig}
# Contexta sections this tool does not use: accepted in a config file, not read, written into backups'
# resolved.config.json with Contexta's defaults under what a config file gave.
_FOREIGN_SECTIONS = ("contract", "capture", "interpretation", "surfaces", "retention", "security")
_FOREIGN_DEFAULTS: Dict[str, Any] = {
    "contract": {"compatibility_mode": "strict", "deterministic_serialization": True, "schema_version": "1.0.0",
                 "validation_mode": "strict"},
    "capture": {"capture_code_revision": True, "capture_config_snapshot": True, "capture_environment_snapshot": True,
                "capture_installed_packages": True, "dispatch_failure_mode": "raise", "producer_ref": "sdk.python.local",
                "retry_attempts": 0, "retry_backoff_seconds": 0.0, "write_degraded_marker_on_partial_failure": True},
    "interpretation": {
        "alert": {"default_severity": "warning", "stop_on_first_trigger": False},
        "anomaly": {"min_baseline_runs": 3, "monitored_metrics": [], "z_score_threshold": 2.5},
        "comparison": {"include_unchanged_metrics": False, "metric_selection": "latest",
                       "missing_stage_severity": "warning"},
        "diagnostics": {"detect_degraded_records": True, "expected_terminal_stage_names": ["evaluate", "package"],
                        "require_metrics_for_completed_stages": True},
        "reports": {"include_completeness_notes": True, "include_evidence_summary": True,
                    "include_lineage_summary": True},
        "search": {"case_sensitive": False, "default_limit": 50, "text_match_fields": ["name", "tags", "status"]},
        "trend": {"default_window_runs": 20, "metric_aggregation": "latest"}},
    "surfaces": {"cli": {"color": True, "default_output_format": "text", "verbosity": "normal"},
                 "export": {"csv_delimiter": ",", "html_inline_charts": True, "include_completeness_notes": True},
                 "html": {"enabled": True, "inline_charts": True},
                 "http": {"enabled": False, "host": "127.0.0.1", "open_browser": False, "port": 8765},
                 "notebook": {"enabled": True}},
    "retention": {"artifact_retention_mode": "manual", "cache_ttl_days": 7, "export_ttl_days": None,
                  "records_compaction_enabled": False, "report_ttl_days": None},
    "security": {"allow_unredacted_local_exports": False, "encryption_provider": None,
                 "environment_variable_allowlist": [], "redaction_mode": "safe_default",
                 "secret_key_patterns": ["token", "secret", "password", "passwd", "key"]},
}
# Contexta's `test` profile, where it differs from `local`.
_TEST_PROFILE: Dict[str, Dict[str, Any]] = {
    "workspace": {"root_path": ".contexta-test"}, "records": {"durability_mode": "flush"},
    "artifacts": {"verification_mode": "strict"}, "recovery": {"create_backup_before_restore": False},
}
_TEST_PROFILE_FOREIGN: Dict[str, Dict[str, Any]] = {
    "capture": {"capture_environment_snapshot": False, "capture_installed_packages": False,
                "capture_code_revision": False},
    "surfaces": {"html": {"enabled": False, "inline_charts": True}, "notebook": {"enabled": False}},
    "security": {"redaction_mode": "strict"},
}
_TOP_LEVEL_KEYS = ("config_version", "profile_name", "project_name", "profile", "overlays")
# Flags and the setting each one overrides.
_FLAG_SETTINGS = {"workspace": "workspace.root_path", "backup_root": "recovery.backup_root",
                  "staging_root": "recovery.restore_staging_root", "outbox_root": "recovery.outbox_root"}
_DERIVED_FROM = {
    "workspace.metadata_path": "workspace.root_path", "workspace.records_path": "workspace.root_path",
    "workspace.artifacts_path": "workspace.root_path", "workspace.reports_path": "workspace.root_path",
    "workspace.exports_path": "workspace.root_path", "workspace.cache_path": "workspace.root_path",
    "metadata.database_path": "workspace.metadata_path", "records.root_path": "workspace.records_path",
    "artifacts.root_path": "workspace.artifacts_path", "recovery.outbox_root": "workspace.cache_path",
    "recovery.backup_root": "workspace.exports_path", "recovery.restore_staging_root": "workspace.cache_path",
}


def _env_name(dotted: str) -> str:
    return "CONTEXTA_" + dotted.upper().replace(".", "_")


def _coerce_setting(dotted: str, kind: str, value: Any, origin: str) -> Any:
    """Check one value's type; strings from the environment and --set are converted."""
    if value is None:
        return None
    if isinstance(value, str) and origin.startswith(("environment", "flag --set")):
        text = value.strip()
        if kind == "bool":
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
        elif kind == "int":
            try:
                return int(text)
            except ValueError:
                pass
        else:
            return text
        raise ConfigError("%s: %s=%r is not a valid %s" % (origin, dotted, value, kind))
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in ("str", "path") and isinstance(value, str) and value.strip():
        return value
    raise ConfigError("%s: %s must be a %s, not %r" % (origin, dotted, "string" if kind == "path" else kind, value))


def _read_config_file(path: Path) -> Dict[str, Any]:
    suffix = path.suffix.lower()
    try:
        raw = read_regular(path, 1 << 20)
    except OSError as exc:
        raise ConfigError("cannot read config file %s: %s" % (path, exc.strerror or exc), path=path)
    except InputRefusedError as exc:
        raise ConfigError("config file %s %s" % (path, exc), path=path)
    try:
        if suffix == ".json":
            data = json_loads(raw)
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:
                raise ConfigError("config file %s is TOML, which needs Python 3.11+; use JSON here" % path,
                                  code="config_toml_unsupported", path=path)
            data = tomllib.loads(raw.decode("utf-8"))
        else:
            raise ConfigError("config file %s must end in .json or .toml" % path, path=path)
    except ValueError as exc:
        raise ConfigError("config file %s is not valid: %s" % (path, exc), path=path)
    except RecursionError:
        raise ConfigError("config file %s is not valid: nested too deeply" % path, path=path)
    if not isinstance(data, dict):
        raise ConfigError("config file %s must hold a table/object at the top" % path, path=path)
    return data


def _load_config_with_sources(
    config_file: Any = None,
    *,
    environ: Optional[Mapping[str, str]] = None,
    flags: Optional[Mapping[str, Any]] = None,
    profile: Optional[str] = None,
    overrides: Sequence[str] = (),
) -> Tuple[UnifiedConfig, Dict[str, str], List[str]]:
    """Resolve the configuration; also say where each path came from.

    Precedence, lowest first, as in Contexta: defaults, the profile, the config
    file, ``CONTEXTA_*`` variables, ``overrides`` (``--set KEY=VALUE``), then
    the flags.  Returns ``(config, sources, notes)``: ``sources`` maps dotted
    names to ``default``, ``config file …``, ``environment CONTEXTA_…`` or
    ``flag --…``; ``notes`` lists ignored ``CONTEXTA_*`` names.
    """
    environ = os.environ if environ is None else environ
    settings: Dict[str, Dict[str, Any]] = {section: {} for section in _CONFIG_SCHEMA}
    foreign: Dict[str, Any] = {}
    top: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    notes: List[str] = []
    selected_profile = profile

    def put(dotted: str, value: Any, origin: str) -> None:
        section, key = dotted.split(".", 1)
        value = _coerce_setting(dotted, _CONFIG_SCHEMA[section][key], value, origin)
        if value is None:  # null/none clears a path back to its derived default
            settings[section].pop(key, None)
            sources.pop(dotted, None)
        else:
            settings[section][key] = value
            sources[dotted] = origin

    profile = "local"
    if config_file is not None:
        path = _resolve_path(config_file)
        data = _read_config_file(path)
        origin = "config file %s" % path
        for key, value in data.items():
            if key in _CONFIG_SCHEMA:
                if not isinstance(value, dict):
                    raise ConfigError("%s: [%s] must be a table" % (origin, key), path=path)
                for inner_key, inner_value in value.items():
                    if inner_key not in _CONFIG_SCHEMA[key]:
                        raise ConfigError("%s: unknown setting %s.%s" % (origin, key, inner_key),
                                          code="unknown_config_field", path=path)
                    put("%s.%s" % (key, inner_key), inner_value, origin)
            elif key in _FOREIGN_SECTIONS:
                if not isinstance(value, dict):
                    raise ConfigError("%s: [%s] must be a table" % (origin, key), path=path)
                foreign[key] = value
            elif key in ("profile", "profile_name"):
                profile = value
            elif key in _TOP_LEVEL_KEYS:
                top[key] = value
            else:
                raise ConfigError("%s: unknown setting %s" % (origin, key), code="unknown_config_field", path=path)

    known_env = {_env_name("%s.%s" % (section, key)): "%s.%s" % (section, key)
                 for section, keys in _CONFIG_SCHEMA.items() for key in keys}
    for name in sorted(environ):
        if not name.startswith("CONTEXTA_"):
            continue
        value = environ[name]
        if name in known_env:
            if value == "":
                continue
            cleared = value.strip().lower() in ("null", "none")
            put(known_env[name], None if cleared else value, "environment %s" % name)
        elif name == "CONTEXTA_PROFILE" and value:
            profile = value.strip()
        elif name == "CONTEXTA_PROJECT_NAME" and value:
            top["project_name"] = value
        elif not name.startswith("CONTEXTA_OPS_"):
            notes.append("ignored_environment:%s" % name)

    for override in overrides:
        dotted, equals, value = override.partition("=")
        dotted = dotted.strip()
        section = dotted.split(".", 1)[0]
        if not equals or "." not in dotted:
            raise ConfigError("--set %s: expected KEY=VALUE with a dotted KEY (recovery.backup_root=/srv/bk)"
                              % override, code="config_invalid")
        if section in _FOREIGN_SECTIONS:
            foreign.setdefault(section, {})[dotted.split(".", 1)[1]] = value  # carried, never read
        elif dotted.split(".", 1)[1] in _CONFIG_SCHEMA.get(section, {}):
            cleared = value.strip().lower() in ("null", "none")
            put(dotted, None if cleared else value, "flag --set %s" % dotted)
        else:
            raise ConfigError("--set %s: unknown setting %s" % (override, dotted), code="unknown_config_field")
    for flag, dotted in _FLAG_SETTINGS.items():
        value = (flags or {}).get(flag)
        if value is not None:
            put(dotted, str(value), "flag --%s" % flag.replace("_", "-"))

    if selected_profile is not None:
        profile = selected_profile
    if profile not in ("local", "test"):
        raise ConfigError("unsupported profile %r (local or test)" % (profile,))
    if profile == "test":
        for section, values in _TEST_PROFILE.items():
            for key, value in values.items():
                settings[section].setdefault(key, value)
        top.setdefault("project_name", "test")
    sections = {name: cls(**settings[name]) for name, cls in _SECTION_CLASSES.items()}
    project = top.get("project_name", "default")
    if not isinstance(project, str) or not project.strip():
        raise ConfigError("project_name must be a non-blank string")
    config = UnifiedConfig(profile_name=profile, project_name=project, foreign_sections=foreign, **sections)
    for section, keys in _CONFIG_SCHEMA.items():
        for key, kind in keys.items():
            dotted = "%s.%s" % (section, key)
            if kind == "path" and dotted not in sources:
                parent = _DERIVED_FROM.get(dotted)
                sources[dotted] = "default" if parent is None else "default (follows %s)" % parent
    return config, sources, notes


def load_config(
    config_file: Any = None,
    *,
    environ: Optional[Mapping[str, str]] = None,
    workspace: Any = None,
    backup_root: Any = None,
    staging_root: Any = None,
    outbox_root: Any = None,
    profile: Optional[str] = None,
    overrides: Sequence[str] = (),
) -> UnifiedConfig:
    """Resolve a :class:`UnifiedConfig` from defaults, a file, ``CONTEXTA_*`` and overrides.

    ``profile`` is Contexta's (``local`` or ``test``); ``overrides`` are
    ``KEY=VALUE`` strings as Contexta's ``--set`` takes them.  Unrelated
    ``CONTEXTA_*`` variables are ignored (Contexta fails on them).
    """
    flags = {"workspace": workspace, "backup_root": backup_root,
             "staging_root": staging_root, "outbox_root": outbox_root}
    return _load_config_with_sources(config_file, environ=environ, flags=flags, profile=profile,
                                     overrides=overrides)[0]


# ---------------------------------------------------------------------------
# Reading Contexta's stores: records, metadata header, artifact bindings
# ---------------------------------------------------------------------------
#
# These checks read files only (no DuckDB needed) and report problems that
# name the file.  Restore verification runs them on a staged backup; `check`
# runs the very same functions on a live workspace.

_PROBLEMS_PER_FILE = 20


def _display_under(root: Path, display: Optional[Callable[[str], str]]) -> Callable[[str], str]:
    if display is not None:
        return display
    return lambda relative: str(root / relative) if relative else str(root)


@dataclasses.dataclass
class RecordsReport(_Record):
    """What a scan of a record store found (Contexta's TOLERANT replay, plus index checks)."""

    present: bool = False
    record_count: int = 0
    integrity_state: str = "HEALTHY"
    segment_count: int = 0
    highest_sequence: int = 0
    last_committed_sequence: Optional[int] = None
    index_pointer_count: int = 0
    problems: List[Problem] = dataclasses.field(default_factory=list)

    def plane_result(self) -> Dict[str, Any]:
        return {"record_count": self.record_count, "integrity_state": self.integrity_state,
                "segment_count": self.segment_count, "last_committed_sequence": self.last_committed_sequence,
                "highest_sequence": self.highest_sequence}


_CORRUPTING_RECORD_CODES = {"invalid_json_line", "truncated_line", "records_manifest_invalid",
                            "record_store_layout_mismatch"}


def _special_kind(mode: int) -> str:
    return "directory" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(
        mode) else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file"


def _special_problem(shown: str, mode: int) -> Problem:
    """A store file that is not a regular file: named, never opened (a FIFO would block the reader forever)."""
    return Problem("unexpected_special", shown, "is a %s, not a regular file; it is not read"
                   % _special_kind(mode))


def _not_regular_mode(path: Any) -> Optional[int]:
    """The mode of ``path`` (symlinks followed) when it exists and is not a regular file, else None."""
    try:
        mode = os.stat(str(path)).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else mode


class _ProblemSink:
    """Collects problems, capping how many one file may contribute."""

    def __init__(self, problems: List[Problem]) -> None:
        self.problems = problems
        self.per_file: Dict[str, int] = {}

    def add(self, problem: Problem) -> None:
        seen = self.per_file.get(problem.path, 0)
        self.per_file[problem.path] = seen + 1
        if seen < _PROBLEMS_PER_FILE:
            self.problems.append(problem)
        elif seen == _PROBLEMS_PER_FILE:
            self.problems.append(Problem("more_problems", problem.path,
                                         "further problems in this file are not listed"))


def scan_records(records_root: Any, *, check_indexes: bool = False,
                 display: Optional[Callable[[str], str]] = None) -> RecordsReport:
    """Scan a Contexta record store line by line, in constant memory per line.

    Mirrors Contexta's integrity rules: bad UTF-8/JSON or a line without an
    integer ``sequence`` is ``invalid_json_line`` (``truncated_line`` when it is
    the unterminated last line), a non-contiguous sequence is ``sequence_gap``,
    and the manifest must agree with the highest sequence.  With
    ``check_indexes`` every index pointer must name a real line whose sequence
    matches.  The rules live in :class:`_RecordsCheck`, which verification
    also feeds straight from a backup's bytes.
    """
    root = Path(records_root)
    check = _RecordsCheck(_display_under(root, display))
    if not root.is_dir():
        return check.report
    check.present()
    manifest_path = root / "manifest.json"
    if os.path.lexists(str(manifest_path)):
        odd = _not_regular_mode(manifest_path)
        if odd is not None:
            check.special("manifest.json", odd)
        else:
            try:
                check.manifest(read_regular(manifest_path))
            except (OSError, ValueError):
                check.manifest(None)
    segments_dir = root / "segments"
    for path in sorted(segments_dir.glob("segment-*.jsonl")) if segments_dir.is_dir() else []:
        _feed_store_file(check, path, "segments/" + path.name, "segment")
    indexes_dir = root / "indexes"
    for path in sorted(indexes_dir.glob("*/*.jsonl")) if check_indexes and indexes_dir.is_dir() else []:
        _feed_store_file(check, path, _relative_posix(path, root), "index")
    return check.finish()


def _feed_store_file(check: "_RecordsCheck", path: Path, rel: str, role: str) -> None:
    """A segment or index file of a live store, scanned here (a FIFO is named, never opened)."""
    if role == "segment" and _segment_id(rel) is None:
        check.segment(rel, None)
        return
    try:
        handle = open_regular(path)
    except SpecialFileError:
        check.special(rel, os.stat(str(path)).st_mode)
        if role == "segment":
            check.segment(rel, _SegmentScan())  # present, with no lines
        return
    with handle:
        scan = _scan_stream(handle, role)
    if role == "segment":
        check.segment(rel, scan)
    else:
        check.index(rel, scan)


def _segment_id(rel: str) -> Optional[int]:
    """The number of ``segments/segment-NNNNNN.jsonl``, or None when its name has none."""
    try:
        return int(rel[len("segments/segment-"):-len(".jsonl")])
    except ValueError:
        return None


# -- line scanners: a store file checked line by line as its bytes come -------------------------------------
#
# Each scanner is fed a file's bytes in chunks (from a live file, a backup
# member as it is hashed, or a worker process reading a backup in place) and
# keeps, per line, only what a later check needs: a segment's sequence of each
# line (8 bytes), an index's pointers (32 bytes each).  Problems carry their
# line number within what was fed, so a file scanned in pieces is stitched
# together exactly.  At most _PROBLEMS_PER_FILE + 1 are kept per piece.

_LINE_LIMIT = _JSON_FILE_LIMIT  # a line longer than this is a problem, read past and never held whole
_AN_OBJECT = object()  # what the record decoder makes of a nested object it need not keep


def _record_object(value: Dict[str, Any]) -> Any:
    """Keep only the objects that can be the record line itself (it holds ``sequence``)."""
    return value if "sequence" in value else _AN_OBJECT


# The record lines' decoder: nested objects are dropped as soon as they are parsed (a third of the cost of
# json.loads, which builds and frees every one); NaN and Infinity are refused as json_loads refuses them.
_RECORD_DECODER = json.JSONDecoder(object_hook=_record_object, parse_constant=_refuse_constant)
_INDEX_LINE = re.compile(rb'\{"offset":(\d{1,18}),"segment_id":(\d{1,18}),"sequence":(-?\d{1,18})\}\n?')
_CAPTURE_DECODER = json.JSONDecoder(object_pairs_hook=len, parse_constant=_refuse_constant)


def _needs_strict_parse(text: str) -> bool:
    """A line json_loads must read: deeply nested, or long enough to hide a huge integer."""
    return len(text) > _JSON_MAX_INT_DIGITS or text.count("[") + text.count("{") > _JSON_MAX_DEPTH


_RECORD_SCAN: Callable[[str, int], Tuple[Any, int]] = getattr(_RECORD_DECODER, "scan_once")
_INDEX_LINES = re.compile(rb'^\{"offset":(\d{1,18}),"segment_id":(\d{1,18}),"sequence":(-?\d{1,18})\}\n', re.MULTILINE)


class _LineFault(NamedTuple):
    """A problem of one line of a store file: its code, the line, the message after ``line N``."""

    code: str
    line: int = 0
    text: str = ""
    expected: Any = None
    actual: Any = None


def _record_sequence(raw: Optional[bytes]) -> Tuple[Optional[int], Optional[_LineFault]]:
    """(sequence, fault) of one segment line: (n, None) for a record line, (None, None) for a blank one."""
    if raw is None:
        return None, _LineFault(code="invalid_json_line", text=" is longer than %d bytes" % _LINE_LIMIT)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, _LineFault(code="invalid_json_line", text=" is not valid UTF-8")
    if not text.strip():
        return None, None
    try:  # as Contexta reads them (json, nested as deep as the interpreter allows); long ones by json_loads' rules
        line = json_loads(text) if len(text) > _JSON_MAX_INT_DIGITS else _RECORD_DECODER.decode(text)
    except (ValueError, RecursionError):
        if not raw.endswith(b"\n"):
            return None, _LineFault(code="truncated_line", text=" is cut off (no newline, not JSON)")
        return None, _LineFault(code="invalid_json_line", text=" is not JSON")
    try:
        sequence = int(line["sequence"])
        record = line["record"]
        if not (isinstance(record, dict) or record is _AN_OBJECT) or "appended_at" not in line:
            raise ValueError
    except (KeyError, TypeError, ValueError, OverflowError):
        return None, _LineFault(code="invalid_json_line", text=" is not a record line (sequence, appended_at, record)")
    return sequence, None


# Whole record lines for the readers that keep them (recover replay, repair), judged by the same rules.
_WHOLE_RECORD_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _segment_line_json(raw: bytes) -> Tuple[Any, str]:
    """A segment line's JSON value and "", or None and what is wrong with it (Contexta's rules).

    ``blank`` (skipped silently), ``not_utf8``, ``truncated_line`` (the
    unterminated last line, not JSON) or ``invalid_json_line``.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    if not text.strip():
        return None, "blank"
    try:
        return (json_loads(text) if len(text) > _JSON_MAX_INT_DIGITS else _WHOLE_RECORD_DECODER.decode(text)), ""
    except (ValueError, RecursionError):
        return None, "invalid_json_line" if raw.endswith(b"\n") else "truncated_line"


def _decode_segment_line(raw: Optional[bytes], line_number: int,
                         where: str) -> Tuple[Optional[Dict[str, Any]], Optional[int], Optional[Problem]]:
    """``(line, sequence, None)`` for a record line, ``(None, None, None)`` for a blank one, else the problem."""
    if raw is None:
        return None, None, Problem("invalid_json_line", where, "line %d is longer than %d bytes"
                                   % (line_number, _LINE_LIMIT))
    payload, fault = _segment_line_json(raw)
    if fault == "blank":
        return None, None, None
    if fault:
        text = {"not_utf8": " is not valid UTF-8", "truncated_line": " is cut off (no newline, not JSON)"}
        return None, None, Problem("truncated_line" if fault == "truncated_line" else "invalid_json_line", where,
                                   "line %d%s" % (line_number, text.get(fault, " is not JSON")))
    try:
        sequence = int(payload["sequence"])
        if not isinstance(payload["record"], dict) or "appended_at" not in payload:
            raise ValueError
    except (KeyError, TypeError, ValueError, OverflowError):
        return None, None, Problem("invalid_json_line", where,
                                   "line %d is not a record line (sequence, appended_at, record)" % line_number)
    return payload, sequence, None


def _lines_within(handle: Any, limit: int = _LINE_LIMIT) -> Iterator[Optional[bytes]]:
    """Each line of a store file, or None for one longer than ``limit`` bytes (read past, never held whole)."""
    while True:
        raw = handle.readline(limit + 1)
        if not raw:
            return
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw
            continue
        while raw and not raw.endswith(b"\n"):
            raw = handle.readline(_CHUNK)
        yield None


def _index_pointer(raw: Optional[bytes]) -> Optional[Tuple[int, int, int]]:
    """(offset, segment_id, sequence) of one index line, or None when it is not an index pointer."""
    if raw is None:
        return None
    match = _INDEX_LINE.fullmatch(raw)
    if match is not None:
        return int(match.group(1)), int(match.group(2)), int(match.group(3))
    try:
        pointer = json_loads(raw)
        values = (int(pointer["offset"]), int(pointer["segment_id"]), int(pointer["sequence"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError):
        return None
    return values if all(_INT63_MIN <= value <= _INT63_MAX for value in values) else None


class _LineScan:
    """Splits a file's bytes into lines as they come; a subclass checks each line."""

    def __init__(self) -> None:
        self.lines = 0
        self.tail: List[bytes] = []  # the start of a line still coming, in pieces (joined once it ends)
        self.tail_size = 0
        self.overlong = False
        self.problems: List[_LineFault] = []
        self.more = False

    def feed(self, data: Any) -> None:
        pieces = bytes(data).split(b"\n")
        last = pieces.pop()
        first = 0
        if pieces and (self.tail or self.overlong):  # the line carried over from the chunk before ends here
            self._extend(pieces[0])
            self._end_line(b"\n")
            first = 1
        self.ended(pieces, first)
        self._extend(last)

    def ended(self, pieces: List[bytes], first: int) -> None:
        """Whole lines (their newlines split off), from ``pieces[first]`` on."""
        for index in range(first, len(pieces)):
            self.lines += 1
            self.line(pieces[index] + b"\n")

    def finish(self) -> "_LineScan":
        if self.tail or self.overlong:
            self._end_line(b"")
        return self

    def _extend(self, piece: bytes) -> None:
        if self.overlong or not piece:
            return
        self.tail.append(piece)
        self.tail_size += len(piece)
        if self.tail_size > _LINE_LIMIT:  # never held whole: the rest of it, up to its newline, is skipped
            self.overlong = True
            self.tail, self.tail_size = [], 0

    def _end_line(self, newline: bytes) -> None:
        self.lines += 1
        if self.overlong:
            self.overlong = False
            self.line(None)
            return
        raw = b"".join(self.tail) + newline
        self.tail, self.tail_size = [], 0
        self.line(raw)

    def line(self, raw: Optional[bytes]) -> None:
        raise NotImplementedError

    def problem(self, fault: _LineFault) -> None:
        """A fault of the line just read (its number is filled in here)."""
        if len(self.problems) <= _PROBLEMS_PER_FILE:
            self.problems.append(fault._replace(line=self.lines))
        else:
            self.more = True

    def absorb(self, piece: "_LineScan") -> None:
        """Append the scan of the lines that follow (a file scanned in pieces, joined in order)."""
        self._absorb_problems(piece, [])
        self.lines += piece.lines

    def _absorb_problems(self, piece: "_LineScan", extra: List[_LineFault]) -> None:
        shifted = [fault._replace(line=self.lines + fault.line) for fault in piece.problems] + extra
        merged = self.problems + sorted(shifted, key=lambda fault: fault.line)
        self.more = self.more or piece.more or len(merged) > _PROBLEMS_PER_FILE + 1
        self.problems = merged[:_PROBLEMS_PER_FILE + 1]


class _SegmentScan(_LineScan):
    """A record segment (or a run of whole lines of one): its records, their sequences, its problems."""

    def __init__(self) -> None:
        super().__init__()
        self.records = 0
        self.first: Optional[int] = None
        self.first_line = 0
        self.last: Optional[int] = None
        self.highest = 0
        self.sequences = array.array("q")  # each line's sequence, -1 where it holds none (for index checks)

    def ended(self, pieces: List[bytes], first: int) -> None:
        """The common case, fast: a compact record line, parsed once with no Python call per value."""
        scan = _RECORD_SCAN
        append = self.sequences.append
        for index in range(first, len(pieces)):
            raw = pieces[index]
            self.lines += 1
            try:
                text = raw.decode("utf-8")
                if len(text) > _JSON_MAX_INT_DIGITS:
                    raise ValueError
                value, end = scan(text, 0)
                if end != len(text) and text[end:].strip():
                    raise ValueError
                sequence = value["sequence"]
                record = value["record"]
                if type(sequence) is not int or "appended_at" not in value or not (
                        type(record) is dict or record is _AN_OBJECT):
                    raise ValueError
            except Exception:  # anything unusual: the general path says exactly what is wrong
                self.line(raw + b"\n")
                continue
            append(sequence)
            last = self.last
            if last is not None and sequence != last + 1:
                self.problem(_LineFault(code="sequence_gap", text=": sequence %d follows %d" % (sequence, last),
                                        expected=last + 1, actual=sequence))
            if self.first is None:
                self.first, self.first_line = sequence, self.lines
            self.last = sequence
            if sequence > self.highest:
                self.highest = sequence
            self.records += 1

    def line(self, raw: Optional[bytes]) -> None:
        sequence, fault = _record_sequence(raw)
        self.sequences.append(-1 if sequence is None else sequence)
        if fault is not None:
            self.problem(fault)
        if sequence is None:
            return
        if self.last is not None and sequence != self.last + 1:
            self.problem(_LineFault(code="sequence_gap", text=": sequence %d follows %d" % (sequence, self.last),
                                    expected=self.last + 1, actual=sequence))
        if self.first is None:
            self.first, self.first_line = sequence, self.lines
        self.last = sequence
        self.highest = max(self.highest, sequence)
        self.records += 1

    def absorb(self, piece: "_LineScan") -> None:
        assert isinstance(piece, _SegmentScan)
        gap = []
        if self.last is not None and piece.first is not None and piece.first != self.last + 1:
            gap = [_LineFault(code="sequence_gap", line=self.lines + piece.first_line, text=": sequence %d follows %d"
                              % (piece.first, self.last), expected=self.last + 1, actual=piece.first)]
        self._absorb_problems(piece, gap)
        if self.first is None and piece.first is not None:
            self.first, self.first_line = piece.first, self.lines + piece.first_line
        if piece.last is not None:
            self.last = piece.last
        self.highest = max(self.highest, piece.highest)
        self.records += piece.records
        self.sequences.extend(piece.sequences)
        self.lines += piece.lines


class _IndexScan(_LineScan):
    """An index file: its pointers (line, offset, segment, sequence), checked once every segment is known."""

    def __init__(self) -> None:
        super().__init__()
        self.pointer_count = 0
        self.pointers = array.array("q")

    def ended(self, pieces: List[bytes], first: int) -> None:
        """The common case, fast: every line a compact pointer, matched in one pass over the chunk."""
        region = b"\n".join(pieces[first:]) + b"\n" if len(pieces) > first else b""
        found = _INDEX_LINES.findall(region)
        if len(found) != len(pieces) - first:
            _LineScan.ended(self, pieces, first)
            return
        base = self.lines
        self.pointers.extend(value for number, (offset, segment_id, sequence) in enumerate(found, start=base + 1)
                             for value in (number, int(offset), int(segment_id), int(sequence)))
        self.lines += len(found)
        self.pointer_count += len(found)

    def line(self, raw: Optional[bytes]) -> None:
        if raw is not None and not raw.strip():
            return
        self.pointer_count += 1
        pointer = _index_pointer(raw)
        if pointer is None:
            self.problem(_LineFault(code="index_line_invalid", text=" is not an index pointer"))
        else:
            self.pointers.extend((self.lines,) + pointer)

    def absorb(self, piece: "_LineScan") -> None:
        assert isinstance(piece, _IndexScan)
        self._absorb_problems(piece, [])
        self.pointer_count += piece.pointer_count
        pointers = piece.pointers
        for start in range(0, len(pointers), 4):
            pointers[start] += self.lines
        self.pointers.extend(pointers)
        self.lines += piece.lines


class _CaptureScan(_LineScan):
    """A capture sink file: every line a JSON object."""

    def __init__(self) -> None:
        super().__init__()
        self.line_count = 0
        self.invalid_count = 0

    def line(self, raw: Optional[bytes]) -> None:
        if raw is not None and not raw.strip():
            return
        self.line_count += 1
        try:
            if raw is None:
                raise JsonInputError("is longer than %d bytes" % _LINE_LIMIT)
            text = raw.decode("utf-8")
            if _needs_strict_parse(text):
                valid = isinstance(json_loads(text), dict)
            else:
                valid = text.lstrip().startswith("{") and _CAPTURE_DECODER.decode(text) is not None
            why = "is not a JSON object"
        except (ValueError, RecursionError) as exc:
            valid, why = False, str(exc) if isinstance(exc, JsonInputError) else "is not valid JSON (%s)" % exc
        if not valid:
            self.invalid_count += 1
            if raw is not None and not raw.endswith(b"\n"):
                why = "is cut off (no newline) and " + why
            if len(self.problems) < _PROBLEMS_PER_FILE:
                self.problems.append(_LineFault(code="capture_line_invalid", line=self.lines, text=" " + why))

    def absorb(self, piece: "_LineScan") -> None:
        assert isinstance(piece, _CaptureScan)
        self.problems = (self.problems + [fault._replace(line=self.lines + fault.line)
                                          for fault in piece.problems])[:_PROBLEMS_PER_FILE]
        self.line_count += piece.line_count
        self.invalid_count += piece.invalid_count
        self.lines += piece.lines


_SCANNERS: Dict[str, Callable[[], _LineScan]] = {"segment": _SegmentScan, "index": _IndexScan,
                                                  "capture": _CaptureScan}


def _scan_stream(handle: Any, role: str) -> Any:
    """A whole file scanned from an open handle."""
    scan = _SCANNERS[role]()
    while True:
        data = handle.read(_CHUNK)
        if not data:
            return scan.finish()
        scan.feed(data)


class _RecordsCheck:
    """Contexta's integrity rules for a record store, fed its files in any order and decided at the end."""

    def __init__(self, show: Callable[[str], str]) -> None:
        self.show = show
        self.report = RecordsReport()
        self.sink = _ProblemSink(self.report.problems)
        self.early: List[Problem] = []  # the manifest's and special files' problems, reported first
        self.manifest_present = False
        self.segments: Dict[str, Optional[List[_SegmentScan]]] = {}
        self.indexes: Dict[str, _IndexScan] = {}

    def present(self) -> None:
        self.report.present = True

    def special(self, rel: str, mode: int) -> None:
        self.present()
        self.early.append(_special_problem(self.show(rel), mode))
        if rel == "manifest.json":
            self.manifest_present = True

    def manifest(self, data: Optional[bytes]) -> None:
        """records/manifest.json's bytes (None when it could not be read)."""
        self.present()
        self.manifest_present = True
        shown = self.show("manifest.json")
        try:
            manifest = json_loads(data) if data is not None else None
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict):
            self.early.append(Problem("records_manifest_invalid", shown, "record manifest is not a JSON object"))
            return
        if manifest.get("layout_mode") != "jsonl_segments" or str(manifest.get("layout_version")) != "1":
            self.early.append(Problem("record_store_layout_mismatch", shown,
                                      "record manifest layout is not jsonl_segments version 1",
                                      expected="jsonl_segments/1", actual="%s/%s" % (
                                          manifest.get("layout_mode"), manifest.get("layout_version"))))
        committed = manifest.get("last_committed_sequence")
        if isinstance(committed, int) and not isinstance(committed, bool):
            self.report.last_committed_sequence = committed
        else:
            self.early.append(Problem("records_manifest_invalid", shown, "last_committed_sequence is not an integer"))

    def segment(self, rel: str, scan: Optional[_SegmentScan]) -> None:
        """A segment, whole or one more run of its lines (in order); None: its name has no number."""
        self.present()
        pieces = self.segments.setdefault(rel, [] if scan is not None else None)
        if pieces is not None and scan is not None:
            pieces.append(scan)

    def index(self, rel: str, scan: _IndexScan) -> None:
        self.present()
        self.indexes[rel] = scan

    def finish(self) -> RecordsReport:
        report = self.report
        for problem in self.early:
            self.sink.add(problem)
        sequences: Dict[int, "array.array[int]"] = {}
        expected: Optional[int] = None
        report.segment_count = len(self.segments)
        for rel in sorted(self.segments):
            pieces = self.segments[rel]
            segment_id = _segment_id(rel)
            if pieces is None or segment_id is None:
                self.sink.add(Problem("segment_name_invalid", self.show(rel), "segment file name has no number"))
                continue
            sequences[segment_id], expected = self._stitch(rel, pieces, expected)
        if self.manifest_present:
            committed = report.last_committed_sequence
            if committed is not None and committed != report.highest_sequence:
                self.sink.add(Problem("manifest_sequence_mismatch", self.show("manifest.json"),
                                      "last_committed_sequence %d but the segments end at %d"
                                      % (committed, report.highest_sequence),
                                      expected=committed, actual=report.highest_sequence))
        elif report.record_count:
            self.sink.add(Problem("records_manifest_missing", self.show("manifest.json"),
                                  "record manifest is missing"))
        for rel in sorted(self.indexes):
            self._check_index(rel, self.indexes[rel], sequences)
        codes = {problem.code for problem in report.problems}
        if codes & _CORRUPTING_RECORD_CODES:
            report.integrity_state = "CORRUPTED"
        elif codes:
            report.integrity_state = "DEGRADED"
        return report

    def _stitch(self, rel: str, pieces: Sequence[_SegmentScan],
                expected: Optional[int]) -> Tuple["array.array[int]", Optional[int]]:
        """One segment's pieces in order: continuity across them and from the segment before, problems by line."""
        shown = self.show(rel)
        found: List[Tuple[int, int, Problem]] = []
        offset = 0
        joined = array.array("q")
        for order, scan in enumerate(pieces):
            if expected is not None and scan.first is not None and scan.first != expected:
                line = offset + scan.first_line
                found.append((line, -1, Problem("sequence_gap", shown, "line %d: sequence %d follows %d"
                                                % (line, scan.first, expected - 1), expected=expected,
                                                actual=scan.first)))
            found += [(offset + line, order, Problem(code, shown, "line %d%s" % (offset + line, text),
                                                     expected=exp, actual=act))
                      for code, line, text, exp, act in scan.problems]
            if scan.last is not None:
                expected = scan.last + 1
            offset += scan.lines
            self.report.record_count += scan.records
            self.report.highest_sequence = max(self.report.highest_sequence, scan.highest)
            joined.extend(scan.sequences)
        for _line, _order, problem in sorted(found, key=lambda item: (item[0], item[1])):
            self.sink.add(problem)  # each piece kept one more than the sink shows: it says when there are more
        return joined, expected

    def _check_index(self, rel: str, scan: _IndexScan, sequences: Mapping[int, "array.array[int]"]) -> None:
        shown = self.show(rel)
        self.report.index_pointer_count += scan.pointer_count
        found = [(line, Problem(code, shown, "line %d%s" % (line, text))) for code, line, text, _e, _a in scan.problems]
        fields = iter(scan.pointers)
        current: Optional[int] = None
        lines: Optional["array.array[int]"] = None
        count = 0
        for line, offset, segment_id, sequence in zip(fields, fields, fields, fields):
            if segment_id != current:
                current, lines = segment_id, sequences.get(segment_id)
                count = len(lines) if lines is not None else 0
            if lines is not None and 0 < offset <= count and lines[offset - 1] == sequence:
                continue  # the common case, decided with as little as possible
            if len(found) > 2 * _PROBLEMS_PER_FILE + 1:
                break  # more than the sink shows already, whichever come first by line
            if lines is None:
                problem = Problem("index_pointer_invalid", shown, "line %d points into segment %d, which does "
                                  "not exist" % (line, segment_id))
            elif not 0 < offset <= count:
                problem = Problem("index_pointer_invalid", shown, "line %d points at line %d of segment %d, which "
                                  "has %d lines" % (line, offset, segment_id, count))
            else:
                found_sequence = lines[offset - 1]
                problem = Problem("index_pointer_invalid", shown, "line %d expects sequence %d at segment %d line "
                                  "%d, found %s" % (line, sequence, segment_id, offset, found_sequence
                                                    if found_sequence >= 0 else "no record"),
                                  expected=sequence, actual=found_sequence)
            found.append((line, problem))
        for _line, problem in sorted(found, key=lambda item: item[0]):
            self.sink.add(problem)


# -- Contexta's record replay (`recover replay`) -------------------------------------
#
# Contexta's RecordStore.replay, read-only: every segment line in order, the
# records a filter selects, and the same warnings, known gaps and integrity
# state.  STRICT refuses an unhealthy store; TOLERANT reports what it found.
# Records are given as stored (refs as text), one at a time, so a large store
# is replayed in flat memory.  Lines are decoded with our JSON limits, so a
# line Contexta would take only because Python's json does (NaN, nesting
# deep enough to crash it) is a known gap here.

_RECORD_TYPES = ("event", "metric", "span", "degraded")
_REPLAY_MODES = ("strict", "tolerant")
_GAPS_KEPT = 10000


class RecordReplayError(OpsError):
    """STRICT replay of a record store that is not healthy (exit 1: it ran, and found the store damaged)."""

    code = "record_replay_unhealthy_store"
    exit_code = EXIT_PROBLEMS


@dataclasses.dataclass(frozen=True)
class ScanFilter:
    """Which records a replay selects (Contexta's ScanFilter refs and type), each compared with the envelope's."""

    run_ref: Optional[str] = None
    stage_execution_ref: Optional[str] = None
    batch_execution_ref: Optional[str] = None
    sample_observation_ref: Optional[str] = None
    record_type: Optional[str] = None

    def matches(self, envelope: Mapping[str, Any]) -> bool:
        for field in ("run_ref", "stage_execution_ref", "batch_execution_ref", "sample_observation_ref",
                      "record_type"):
            wanted = getattr(self, field)
            if wanted is not None and envelope.get(field) != wanted:
                return False
        return True


@dataclasses.dataclass(frozen=True)
class RecordReplayResult(_Record):
    """Contexta's ReplayResult fields (``records`` as stored), plus ours: full counts when the lists are capped."""

    status: str
    records: Tuple[Dict[str, Any], ...] = ()
    record_count: int = 0
    mode: str = "strict"
    warnings: Tuple[str, ...] = ()
    known_gaps: Tuple[Dict[str, Any], ...] = ()
    integrity_state: str = "HEALTHY"
    warning_count: int = 0
    known_gap_count: int = 0
    records_root: str = ""


class _RecordReplayScan:
    """One pass over a record store with Contexta's replay rules; selected records go to ``on_record``."""

    def __init__(self, root: Path, scan_filter: ScanFilter) -> None:
        self.root = root
        self.filter = scan_filter
        self.record_count = 0
        self.highest = 0
        self.expected: Optional[int] = None
        self.warnings: List[str] = []
        self.gaps: List[Dict[str, Any]] = []
        self.warning_count = 0
        self.gap_count = 0
        self.corrupted = False
        self.sizes: Dict[str, int] = {}  # segment name -> bytes read: a second pass reads no further

    def run(self, on_record: Optional[Callable[[Dict[str, Any]], None]],
            sizes: Optional[Mapping[str, int]] = None) -> None:
        for segment_id, path in _record_segments(self.root):
            limit = None if sizes is None else sizes.get(path.name, 0)
            with open_regular(path, follow_symlinks=False) as handle:
                read = 0
                for line_number, raw in enumerate(handle, start=1):
                    if limit is not None and read + len(raw) > limit:
                        break
                    read += len(raw)
                    stored = self.take(raw, segment_id, line_number)
                    if stored is not None and self.filter.matches(stored["record"]["envelope"]):
                        self.record_count += 1
                        if on_record is not None:
                            on_record(stored)
                self.sizes[path.name] = read
        if sizes is None:
            committed = _records_manifest_sequence(self.root)
            if committed != self.highest:
                self.warn("manifest sequence mismatch: committed=%s, observed=%d" % (committed, self.highest))

    def take(self, raw: bytes, segment_id: int, line_number: int) -> Optional[Dict[str, Any]]:
        """The stored record on one line, or None (a blank line silently, a bad one as a known gap)."""
        payload, fault = _segment_line_json(raw)
        if fault == "blank":
            return None
        if fault == "not_utf8":
            self.gap("invalid_json_line", "Segment line is not valid UTF-8.", segment_id, line_number,
                     "segment %d line %d is not valid UTF-8" % (segment_id, line_number))
            return None
        if fault:
            self.gap(fault, "Segment line could not be decoded as JSON.", segment_id, line_number,
                     "%s at segment %d line %d" % (fault, segment_id, line_number))
            return None
        stored = _stored_record(payload, segment_id, line_number)
        if stored is None:
            self.gap("invalid_json_line", "Stored line could not be materialized into a canonical record.",
                     segment_id, line_number, "materialization failed at segment %d line %d"
                     % (segment_id, line_number))
            return None
        sequence = stored["sequence"]
        if self.expected is not None and sequence != self.expected:
            self.gap("sequence_gap", "Replay detected a non-contiguous sequence.", segment_id, line_number,
                     "sequence gap before segment %d line %d: expected %d, got %d"
                     % (segment_id, line_number, self.expected, sequence),
                     start_sequence=self.expected, end_sequence=sequence - 1)
        self.expected = sequence + 1
        self.highest = max(self.highest, sequence)
        return stored

    def warn(self, warning: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < _GAPS_KEPT:
            self.warnings.append(warning)

    def gap(self, code: str, message: str, segment_id: int, line_number: int, warning: str,
            start_sequence: Optional[int] = None, end_sequence: Optional[int] = None) -> None:
        self.gap_count += 1
        self.corrupted = self.corrupted or code != "sequence_gap"
        if len(self.gaps) < _GAPS_KEPT:
            self.gaps.append({"code": code, "message": message, "segment_id": segment_id, "line_number": line_number,
                              "start_sequence": start_sequence, "end_sequence": end_sequence, "details": {}})
        self.warn(warning)

    @property
    def integrity_state(self) -> str:
        if not self.warning_count and not self.gap_count:
            return "HEALTHY"
        return "CORRUPTED" if self.corrupted else "DEGRADED"


def _stored_record(payload: Any, segment_id: int, line_number: int) -> Optional[Dict[str, Any]]:
    """Contexta's StoredRecord fields of one segment line, or None where Contexta could not materialize it.

    The checks are structural (sequence, timestamp, envelope refs and type, a
    payload mapping); Contexta's deserializers also check each record kind's fields.
    """
    if not isinstance(payload, dict):
        return None
    try:
        sequence = int(payload["sequence"])
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    appended_at = payload.get("appended_at")
    record = payload.get("record")
    if not isinstance(record, dict) or sequence < 1 or not isinstance(appended_at, str) or not appended_at.strip():
        return None
    envelope = record.get("envelope")
    if (not isinstance(envelope, dict) or envelope.get("record_type") not in _RECORD_TYPES
            or not isinstance(record.get("payload"), dict) or not isinstance(envelope.get("run_ref"), str)
            or not isinstance(envelope.get("record_ref"), str)):
        return None
    return {"sequence": sequence, "segment_id": segment_id, "offset": line_number, "appended_at": appended_at,
            "record": record}


def _record_segments(root: Path) -> List[Tuple[int, Path]]:
    """A record store's segment files with their numbers, in Contexta's order (names that carry none are left out)."""
    segments_dir = root / "segments"
    found = []
    for path in sorted(segments_dir.glob("segment-*.jsonl")) if segments_dir.is_dir() else []:
        with contextlib.suppress(ValueError):
            found.append((int(path.stem[len("segment-"):]), path))
    return found


def _records_manifest_sequence(root: Path) -> Any:
    """The manifest's last_committed_sequence: 0 without a manifest (as the store Contexta would bootstrap)."""
    try:
        manifest = json_loads(read_regular(root / "manifest.json", follow_symlinks=False))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError):
        return None
    return manifest.get("last_committed_sequence") if isinstance(manifest, dict) else None


def _normalized_filter(scan_filter: Optional[ScanFilter]) -> ScanFilter:
    """Contexta's normalization: refs stripped (blank is no filter), the record type lower-cased and checked."""
    values = {field.name: (getattr(scan_filter, field.name) or "").strip() or None
              for field in dataclasses.fields(ScanFilter)} if scan_filter is not None else {}
    record_type = values.get("record_type")
    if record_type is not None:
        values["record_type"] = record_type = record_type.lower()
        if record_type not in _RECORD_TYPES:
            raise UsageError("record_type must be one of %s" % ", ".join(_RECORD_TYPES))
    return ScanFilter(**values)


def _scan_record_store(records_root: Any, scan_filter: Optional[ScanFilter], mode: str,
                       on_record: Optional[Callable[[Dict[str, Any]], None]]) -> Tuple[RecordReplayResult, Dict[str, int]]:
    """Replay's first pass: the result (without records), and how far each segment was read."""
    if mode not in _REPLAY_MODES:
        raise UsageError("replay mode must be strict or tolerant, not %r" % (mode,))
    root = Path(records_root)
    scan = _RecordReplayScan(root, _normalized_filter(scan_filter))
    scan.run(on_record)
    state = scan.integrity_state
    if mode == "strict" and state != "HEALTHY":
        raise RecordReplayError(
            "strict replay refused: the record store %s is %s (%d warnings, %d known gaps); "
            "`recover replay --mode tolerant` lists them" % (root, state, scan.warning_count, scan.gap_count),
            path=root)
    result = RecordReplayResult(
        status="SUCCESS" if state == "HEALTHY" else "DEGRADED", record_count=scan.record_count, mode=mode,
        warnings=tuple(scan.warnings), known_gaps=tuple(scan.gaps), integrity_state=state,
        warning_count=scan.warning_count, known_gap_count=scan.gap_count, records_root=str(root))
    return result, scan.sizes


def replay_records(records_root: Any, scan_filter: Optional[ScanFilter] = None, *,
                   mode: str = "strict") -> RecordReplayResult:
    """Contexta's record replay, read-only: the selected records, warnings, known gaps and integrity.

    ``mode`` ``strict`` (Contexta's default here) raises
    :class:`RecordReplayError` on a store that is not healthy; ``tolerant``
    returns what it could read and says what it could not.  Holds every
    selected record in memory, as Contexta does; ``recover replay --json``
    streams them instead.
    """
    records: List[Dict[str, Any]] = []
    result, _sizes = _scan_record_store(records_root, scan_filter, mode, records.append)
    return dataclasses.replace(result, records=tuple(records))


@dataclasses.dataclass
class MetadataReport(_Record):
    """What we can tell about the DuckDB ledger without (or with) DuckDB."""

    present: bool = False
    database_file: str = ""
    size_bytes: int = 0
    storage_version: Optional[int] = None
    creator_version: Optional[str] = None
    wal_present: bool = False
    run_count: Optional[int] = None
    check: str = "file_level"
    problems: List[Problem] = dataclasses.field(default_factory=list)

    def plane_result(self) -> Dict[str, Any]:
        return {"run_count": self.run_count, "check": self.check, "database_file": self.database_file,
                "size_bytes": self.size_bytes, "storage_version": self.storage_version,
                "wal_present": self.wal_present}


_DUCKDB_MAGIC = b"DUCK"
_DUCKDB_MIN_SIZE = 3 * 4096  # main header plus two database headers


def check_metadata_file(database_path: Any, *, display: Optional[Callable[[str], str]] = None,
                        use_duckdb: bool = True) -> MetadataReport:
    """Check the metadata ledger: present, DuckDB magic, plausible size; count runs if DuckDB is importable.

    Bytes 8-11 of a DuckDB file are ``DUCK`` and bytes 12-19 the storage version;
    a stdlib tool can prove no more than that, and says so (``check: file_level``).
    """
    path = Path(database_path)
    shown = display(path.name) if display else str(path)
    report = MetadataReport(database_file=shown)
    report.wal_present = os.path.isfile(str(path) + ".wal")
    odd = [(where, mode) for where, mode in ((shown, _not_regular_mode(path)),
                                             (shown + ".wal", _not_regular_mode(str(path) + ".wal")))
           if mode is not None]
    report.problems += [_special_problem(where, mode) for where, mode in odd]
    if odd:
        return report  # DuckDB would open both files, and block on a FIFO
    if not path.is_file():
        report.problems.append(Problem("metadata_missing", shown, "metadata ledger is missing"))
        return report
    with open_regular(path) as handle:
        header = handle.read(_LEDGER_HEADER)
    if not _judge_ledger_header(report, path.stat().st_size, header):
        return report
    if use_duckdb and _posix_lock_is_held(path):
        report.check = "file_level_in_use"  # a writer holds it; DuckDB would refuse a second opener
    elif use_duckdb:
        _count_runs_with_duckdb(path, report, shown)
    return report


_LEDGER_HEADER = 128  # the bytes of a ledger its file-level check reads


def _judge_ledger_header(report: MetadataReport, size: int, header: bytes) -> bool:
    """What a ledger's size and first bytes prove (DUCK magic, storage version, creator); True when sound."""
    shown = report.database_file
    report.present = True
    report.size_bytes = size
    if len(header) < 20 or header[8:12] != _DUCKDB_MAGIC:
        report.problems.append(Problem("metadata_not_duckdb", shown, "not a DuckDB file (no DUCK magic at byte 8)",
                                       expected="DUCK", actual=header[8:12].hex() if len(header) >= 12 else None))
        return False
    report.storage_version = struct.unpack("<Q", header[12:20])[0]
    creator = header[52:84].split(b"\x00", 1)[0]
    report.creator_version = creator.decode("ascii", "replace") or None
    if size < _DUCKDB_MIN_SIZE:
        report.problems.append(Problem("metadata_truncated", shown, "ledger is %d bytes, shorter than its headers"
                                       % size, expected=_DUCKDB_MIN_SIZE, actual=size))
        return False
    return True


def _count_runs_with_duckdb(path: Path, report: MetadataReport, shown: str) -> None:
    try:
        import duckdb  # optional, never required
    except ImportError:
        return
    try:
        connection = duckdb.connect(str(path), read_only=True)
        try:
            report.run_count = int(connection.execute("SELECT count(*) FROM runs").fetchone()[0])
        finally:
            connection.close()
        report.check = "duckdb"
    except Exception as exc:  # duckdb raises its own hierarchy; any failure is a finding
        report.problems.append(Problem("metadata_unreadable", shown,
                                       "DuckDB could not read the ledger: %s" % str(exc).splitlines()[0]))


_UNSAFE_COMPONENT = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_component(value: str) -> str:
    """Contexta's S(x): ``:`` -> ``__``, other unsafe runs -> ``_``, stripped of ``._``."""
    cleaned = _UNSAFE_COMPONENT.sub("_", value.replace(":", "__")).strip("._")
    return cleaned or "artifact"


def _location_suffix(location_ref: Any) -> str:
    """``"".join(PurePath(location_ref).suffixes)`` as CPython 3.14 computes it, on any version.

    contexta 1.0.0 requires 3.14, where a name ending in ``.`` keeps that dot
    as a suffix (``model.`` -> ``.``; 3.8-3.13 gave none).
    """
    if not isinstance(location_ref, str):
        return ""
    parts = [part for part in location_ref.split("/") if part]
    name = parts[-1].lstrip(".") if parts else ""
    return "".join("." + suffix for suffix in name.split(".")[1:])


def artifact_object_relpath(artifact_ref: str, artifact_kind: str, location_ref: Any) -> str:
    """Where Contexta keeps an artifact's body, relative to the store root."""
    ref_hash = hashlib.sha256(artifact_ref.encode("utf-8")).hexdigest()
    return "objects/%s/%s/%s%s" % (sanitize_component(artifact_kind), ref_hash[:2],
                                   sanitize_component(artifact_ref), _location_suffix(location_ref))


@dataclasses.dataclass
class ArtifactCheck:
    """The verification of one bound artifact body (Contexta's VerificationReport fields)."""

    artifact_ref: str
    artifact_kind: str
    path: str
    status: str
    expected_size_bytes: Optional[int]
    actual_size_bytes: Optional[int]
    expected_hash_value: Optional[str]
    actual_hash_value: Optional[str]
    binding_size_bytes: int = 0
    body_kind: str = "missing"  # what is at the body's place: file, missing, symbolic link, FIFO, ...

    @property
    def verified(self) -> bool:
        return self.status == "verified"

    def to_dict(self) -> Dict[str, Any]:
        payload = _fields_dict(self)
        payload["verified"] = self.verified
        return payload


@dataclasses.dataclass
class ArtifactsReport(_Record):
    """A sweep of an artifact store: Contexta's StoreSummary counts plus every finding."""

    present: bool = False
    artifact_count: int = 0
    total_size_bytes: int = 0
    kinds: Dict[str, int] = dataclasses.field(default_factory=dict)
    verified_count: int = 0
    missing_count: int = 0
    drift_count: int = 0
    orphan_count: int = 0
    checks: List[ArtifactCheck] = dataclasses.field(default_factory=list)
    orphan_paths: List[str] = dataclasses.field(default_factory=list)
    stray_temp_paths: List[str] = dataclasses.field(default_factory=list)
    problems: List[Problem] = dataclasses.field(default_factory=list)

    def plane_result(self) -> Dict[str, Any]:
        return {"artifact_count": self.artifact_count, "verified_count": self.verified_count,
                "missing_count": self.missing_count, "drift_count": self.drift_count,
                "orphan_count": self.orphan_count}


def _mode_kind(mode: int) -> str:
    """What an ``lstat`` mode is, in the words a message uses."""
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    return "socket" if stat.S_ISSOCK(mode) else "device"


def _path_kind(path: Any) -> str:
    """:func:`_mode_kind` of what is at ``path`` (a symlink is not followed), or ``missing``."""
    try:
        return _mode_kind(os.lstat(str(path)).st_mode)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):  # no such name can be there
            return "missing"
        raise


def _irregular_problem(shown: str, kind: str, what: str) -> Problem:
    """A symlink or special file where a store keeps regular files: reported, never followed or opened."""
    if kind == "symbolic link":
        return Problem("symlink_not_followed", shown, "%s is a symbolic link, which is never followed" % what)
    return Problem("special_file", shown, "%s is a %s, not a regular file; it was not opened" % (what, kind))


def _read_json_document(path: Path) -> Any:
    """A store's or a package's JSON file: a regular file (never a symlink or FIFO), within the shared limits.

    The size is checked before reading, so an oversized file costs nothing.
    """
    with open_regular(path, follow_symlinks=False) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > _JSON_FILE_LIMIT:
            raise InputRefusedError("is larger than %d bytes" % _JSON_FILE_LIMIT)
        data = handle.read(size + 1)
        if len(data) > size:  # grew since: read on, up to the limit
            data += handle.read(_JSON_FILE_LIMIT + 1 - len(data))
    return json_loads(data, max_bytes=_JSON_FILE_LIMIT)


def _read_binding(path: Path) -> Dict[str, Any]:
    """A binding file's object, checked for the keys verification needs (ValueError if not)."""
    return _parse_binding(_read_json_document(path))


def _parse_binding(binding: Any) -> Dict[str, Any]:
    """:func:`_read_binding` of a binding's parsed JSON (ValueError when it is not one)."""
    if not isinstance(binding, dict):
        raise ValueError("binding is not a JSON object")
    snapshot = binding.get("manifest_snapshot")
    if not isinstance(snapshot, dict):
        raise ValueError("binding has no manifest_snapshot object")
    for key in ("artifact_ref", "artifact_kind"):
        if not isinstance(binding.get(key), str) or not isinstance(snapshot.get(key), str):
            raise ValueError("binding or its snapshot lacks %s" % key)
        if binding[key] != snapshot[key]:
            raise ValueError("%s differs between binding and manifest snapshot" % key)
    size = binding.get("size_bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError("size_bytes is not a non-negative integer")
    if not isinstance(snapshot.get("location_ref"), str):
        raise ValueError("manifest snapshot has no location_ref")
    return binding


def _expected_claims(binding: Mapping[str, Any]) -> Tuple[Optional[int], Optional[str]]:
    """Contexta verifies against the manifest's claims when present, else the binding's."""
    snapshot = binding["manifest_snapshot"]
    size = snapshot.get("size_bytes")
    digest = snapshot.get("hash_value")
    return (size if size is not None else binding.get("size_bytes"),
            digest if digest is not None else binding.get("hash_value"))


def _unchecked_body(binding: Mapping[str, Any]) -> ArtifactCheck:
    """A bound body's check before its file is looked at: where it belongs, what it must hold; status missing."""
    snapshot = binding["manifest_snapshot"]
    rel = artifact_object_relpath(snapshot["artifact_ref"], snapshot["artifact_kind"], snapshot.get("location_ref"))
    expected_size, expected_hash = _expected_claims(binding)
    return ArtifactCheck(artifact_ref=binding["artifact_ref"], artifact_kind=binding["artifact_kind"], path=rel,
                         status="missing", expected_size_bytes=expected_size, actual_size_bytes=None,
                         expected_hash_value=expected_hash, actual_hash_value=None,
                         binding_size_bytes=binding["size_bytes"])


def _judge_body(check: ArtifactCheck, size: int, digest: str) -> ArtifactCheck:
    """The body's size and sha256 against what its binding claims."""
    check.body_kind = "file"
    check.actual_size_bytes, check.actual_hash_value = size, digest
    if check.expected_size_bytes is not None and size != check.expected_size_bytes:
        check.status = "size_mismatch"
    elif check.expected_hash_value is not None and digest != check.expected_hash_value:
        check.status = "hash_mismatch"
    else:
        check.status = "verified"
    return check


def _evaluate_body(root: Path, binding: Mapping[str, Any],
                   digests: Optional[Mapping[str, Tuple[int, str]]] = None) -> ArtifactCheck:
    """One binding's body in a live store, judged (a link or special file at its place is named, never opened)."""
    check = _unchecked_body(binding)
    body = root / check.path
    check.body_kind = _path_kind(body)
    if check.body_kind != "file":
        return check
    if digests is not None and check.path in digests:
        return _judge_body(check, *digests[check.path])
    try:
        return _judge_body(check, *sha256_file(body, follow_symlinks=False))
    except SpecialFileError:  # replaced since the lstat
        check.body_kind = _path_kind(body)
        return check


def scan_artifact_bindings(store_root: Any, *, digests: Optional[Mapping[str, Tuple[int, str]]] = None,
                           display: Optional[Callable[[str], str]] = None) -> ArtifactsReport:
    """Verify every bound body of an artifact store and find orphans (Contexta's rules).

    Bodies are hashed in chunks; ``digests`` (store-relative path -> (size,
    sha256)) lets a caller that has just hashed the files skip a second read.
    An orphan is any file under ``objects/`` that no binding points at; stray
    ``*.tmp`` files are orphans too and are also listed as temp files.  The
    rules live in :class:`_ArtifactsCheck`, which verification also feeds
    straight from a backup's bytes.
    """
    root = Path(store_root)
    check = _ArtifactsCheck(_display_under(root, display))
    if not root.is_dir():
        return check.report
    check.present()
    bindings_dir = root / "bindings"
    seen: Set[str] = set()  # the bindings judged by name, so the walk below does not name them again
    for path in sorted(bindings_dir.glob("*.binding.json")) if bindings_dir.is_dir() else []:
        seen.add("bindings/" + path.name)
        kind = _path_kind(path)
        if kind != "file":
            check.binding(path.name, None, None, kind=kind)
            continue
        try:
            check.binding(path.name, _read_binding(path), None)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            check.binding(path.name, None, str(exc))
    for rel, kind in _store_entries(str(root)):
        if rel in seen:
            continue
        if kind == "file" and rel.startswith("objects/") and check.expects(rel):
            try:
                found = digests[rel] if digests is not None and rel in digests else \
                    sha256_file(root / rel, follow_symlinks=False)
            except SpecialFileError:  # replaced since it was listed
                check.other_entry(rel, _path_kind(root / rel))
                continue
            check.body(rel, *found)
        else:
            check.other_entry(rel, kind)
    return check.finish()


class _ArtifactsCheck:
    """Contexta's rules for an artifact store, fed its bindings and entries and decided at the end.

    Bindings come before bodies in path order (``bindings/`` < ``objects/``);
    a body met before its binding (an archive in another order) waits, by
    path, until the end.  Problems come out in binding order, then orphans,
    then links and special files, which are named and never opened.
    """

    def __init__(self, show: Callable[[str], str]) -> None:
        self.show = show
        self.report = ArtifactsReport()
        self.expected: Dict[str, List[ArtifactCheck]] = {}  # body path -> the checks of the bindings naming it
        self.refs: Set[str] = set()
        # per binding, in order: its problems and whether it has a check (whose verdict comes later)
        self.binding_problems: List[Tuple[List[Problem], bool]] = []
        self.objects: List[Tuple[str, Optional[Tuple[int, str]]]] = []  # unbound (so far) object files
        self.irregular: List[Tuple[str, str]] = []  # (path, kind) of links and special files no binding names

    def present(self) -> None:
        self.report.present = True

    def expects(self, rel: str) -> bool:
        return rel in self.expected

    def binding(self, name: str, binding: Optional[Dict[str, Any]], error: Optional[str],
                kind: str = "file") -> None:
        """``bindings/<name>``, parsed by :func:`_read_binding` (or why it could not be, or what it is instead)."""
        self.present()
        report = self.report
        report.artifact_count += 1
        shown = self.show("bindings/" + name)
        problems: List[Problem] = []
        if binding is None:
            problems.append(Problem("binding_invalid", shown, "unreadable binding: %s" % error) if kind == "file"
                            else _irregular_problem(shown, kind, "binding"))
            self.binding_problems.append((problems, False))
            return
        self.binding_problems.append((problems, True))
        expected_name = "%s.binding.json" % sanitize_component(binding["artifact_ref"])
        if name != expected_name or binding["artifact_ref"] in self.refs:
            problems.append(Problem("binding_misplaced", shown, "binds %s, whose binding belongs in bindings/%s%s"
                                    % (binding["artifact_ref"], expected_name,
                                       " (bound twice)" if binding["artifact_ref"] in self.refs else "")))
        self.refs.add(binding["artifact_ref"])
        report.kinds[binding["artifact_kind"]] = report.kinds.get(binding["artifact_kind"], 0) + 1
        report.total_size_bytes += binding["size_bytes"]
        check = _unchecked_body(binding)
        report.checks.append(check)
        self.expected.setdefault(check.path, []).append(check)

    def body(self, rel: str, size: int, digest: str) -> None:
        """A regular file under objects/: a bound body (judged) or, so far, an orphan."""
        self.present()
        if rel not in self.expected:
            self.objects.append((rel, (size, digest)))
        for check in self.expected.get(rel, ()):
            _judge_body(check, size, digest)

    def other_entry(self, rel: str, kind: str) -> None:
        """Any other store entry: an unhashed file (an orphan under objects/), a link or a special file.

        A link or special file at a bound body's place leaves that body
        missing, said as what it is; elsewhere a special file, or a link where
        bodies and bindings live, is a problem of its own.
        """
        self.present()
        if kind == "file":
            if rel.startswith("objects/"):
                self.objects.append((rel, None))
            return
        if rel in self.expected:
            for check in self.expected[rel]:
                check.body_kind = kind
        elif kind != "symbolic link" or rel.split("/", 1)[0] in ("objects", "bindings"):
            self.irregular.append((rel, kind))

    def finish(self) -> ArtifactsReport:
        report = self.report
        orphans = []
        for rel, found in self.objects:
            if rel not in self.expected:
                orphans.append(rel)
            elif found is not None:  # a body whose binding came after it
                for check in self.expected[rel]:
                    _judge_body(check, *found)
        checks = iter(report.checks)
        for problems, has_check in self.binding_problems:
            report.problems += problems
            if has_check:
                _count_artifact_check(report, next(checks), self.show)
        report.kinds = dict(sorted(report.kinds.items()))
        for rel in sorted(orphans):
            report.orphan_paths.append(self.show(rel))
            is_temp = rel.endswith(".tmp")
            if is_temp:
                report.stray_temp_paths.append(self.show(rel))
            report.problems.append(Problem("artifact_stray_temp" if is_temp else "artifact_orphan", self.show(rel),
                                           "interrupted write left a temp file" if is_temp
                                           else "body that no binding points at"))
        report.orphan_count = len(report.orphan_paths)
        report.problems.extend(_irregular_problem(self.show(rel), kind, "store entry")
                               for rel, kind in sorted(self.irregular))
        return report


def _count_artifact_check(report: ArtifactsReport, check: ArtifactCheck, show: Callable[[str], str]) -> None:
    if check.status == "verified":
        report.verified_count += 1
        return
    if check.status == "missing":
        report.missing_count += 1
        what = "body of %s" % check.artifact_ref
        report.problems.append(Problem("artifact_missing", show(check.path), "%s is missing" % what)
                               if check.body_kind == "missing" else _irregular_problem(show(check.path),
                                                                                       check.body_kind, what))
        return
    report.drift_count += 1
    if check.status == "size_mismatch":
        report.problems.append(Problem("artifact_size_mismatch", show(check.path),
                                       "body of %s is %s bytes, bound as %s" % (
                                           check.artifact_ref, check.actual_size_bytes, check.expected_size_bytes),
                                       expected=check.expected_size_bytes, actual=check.actual_size_bytes))
    else:
        report.problems.append(Problem("artifact_hash_mismatch", show(check.path),
                                       "body of %s has sha256 %s, bound as %s" % (
                                           check.artifact_ref, check.actual_hash_value, check.expected_hash_value),
                                       expected=check.expected_hash_value, actual=check.actual_hash_value))


# Folders below this depth are read whole rather than held open, so a hostile nesting cannot use up descriptors.
_LAZY_LISTING_DEPTH = 32


def _store_entries(root: str) -> Iterator[Tuple[str, str]]:
    """``(relative path, kind)`` of everything below ``root`` but folders, never following a link.

    Kinds come from the directory listing itself (``d_type``): a store holds
    hundreds of thousands of files, and a ``stat`` of each would double the
    cost of a sweep.  Only an entry that is none of folder, file or link is
    asked what it is.  Listings are read as they are walked, so memory does
    not grow with the widest folder (``history/verification`` has one
    subfolder per artifact).
    """
    stack: List[Tuple[str, Iterator[Any]]] = [("", _listing(root, lazy=True))]
    while stack:
        prefix, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        relative = prefix + entry.name
        if entry.is_dir(follow_symlinks=False):
            stack.append((relative + "/", _listing(entry.path, lazy=len(stack) < _LAZY_LISTING_DEPTH)))
        elif entry.is_file(follow_symlinks=False):
            yield relative, "file"
        elif entry.is_symlink():
            yield relative, "symbolic link"
        else:
            yield relative, _mode_kind(entry.stat(follow_symlinks=False).st_mode)


def _listing(directory: str, lazy: bool) -> Iterator[Any]:
    """A folder's entries: read as iterated (one open descriptor), or all at once (none held open)."""
    try:
        entries = os.scandir(directory)
    except (FileNotFoundError, NotADirectoryError):  # removed or replaced while we walked
        return iter(())
    return entries if lazy else iter(list(entries))


# -- the result every recovery job returns ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RecoveryResult(_Record):
    """Contexta's base of recovery results: a status (upper case), warnings, notes and details."""

    status: str
    warnings: Tuple[Any, ...] = ()
    notes: Tuple[str, ...] = ()
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", str(self.status).strip().upper())
        object.__setattr__(self, "warnings", tuple(self.warnings))
        object.__setattr__(self, "notes", tuple(str(note) for note in self.notes))
        object.__setattr__(self, "details", dict(sorted((self.details or {}).items())))


@dataclasses.dataclass(frozen=True)
class ImportResult(RecoveryResult):
    """Contexta's result of importing a workspace (its fields; this tool does not make one itself)."""

    source_root: Optional[Path] = None
    target_workspace: Optional[Path] = None
    created_run_count: int = 0
    created_artifact_count: int = 0
    created_record_count: int = 0
    loss_notes: Tuple[str, ...] = ()
    verification_notes: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        RecoveryResult.__post_init__(self)
        for name in ("source_root", "target_workspace"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else Path(value))
        for name in ("loss_notes", "verification_notes"):
            object.__setattr__(self, name, tuple(str(note) for note in getattr(self, name)))


# ---------------------------------------------------------------------------
# Backup
# ---------------------------------------------------------------------------
#
# Layout (Contexta's, so contexta 1.0.0's own restore verifies it):
#
#   <backup_root>/<backup_ref>/manifest.json        written last
#   <backup_root>/<backup_ref>/workspace/config/resolved.config.json
#   <backup_root>/<backup_ref>/workspace/<path each section has in the live workspace>
#
# Unlike Contexta, the outbox is stored where it lives (``cache/outbox``), not
# as the whole parent directory; relocated stores are stored at their default
# place.  A backup is built as ``.<ref>.partial`` beside its final name and
# renamed into place only when complete, so an interrupted one never looks
# like a backup.
#
# Format v2 lists every file in ``SHA256SUMS`` beside the manifest, one line
# per file in plain string order of paths (``<sha256>  workspace/<path>``,
# GNU escaping for names holding ``\``, a newline or a carriage return), so
# ``sha256sum -c SHA256SUMS`` checks a backup by hand.  The list is written
# while the files are copied and read while they are verified, never held
# whole; the manifest records its sha256, line count and the bytes it lists.
# Sizes, modes and mtimes come from the copies themselves (which carry the
# source's) or from archive headers.  Format v1 listed every file, with size,
# mode and mtime, inside manifest.json: still read, never written.

BACKUP_FORMAT = "contexta-ops-backup-v2"
_FORMAT_V1 = "contexta-ops-backup-v1"  # listed every file inside manifest.json; still read, never written
_OUR_FORMATS = (BACKUP_FORMAT, _FORMAT_V1)
_MANIFEST_NAME = "manifest.json"
_MANIFEST_DIGEST_NAME = "manifest.json.sha256"  # sha256sum format; proves the manifest itself
_LIST_NAME = "SHA256SUMS"  # every file's sha256, `sha256sum -c` format, sorted; its digest is in the manifest
_PARTIAL_SUFFIX = ".partial"
_BACKUP_REF_PATTERN = re.compile(r"^(?P<label>.+)-(?P<ts>\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:_\d{6})?Z)$")
_SAFETY_LABEL = "pre-restore-safety"
# manual: `backup create`; safety: taken by a restore before it replaces a workspace; incremental: hard-links
# what an earlier backup holds; imported: made elsewhere (by Contexta, or by hand).  Defaults, `latest` and
# --keep-last never pick or count safety backups: after a restore, the newest backup is the broken workspace.
BACKUP_KINDS = ("manual", "safety", "incremental", "imported")


@dataclasses.dataclass(frozen=True)
class _SectionPart:
    """One entry of the backup registry: a part of the workspace that backups copy and restores put back.

    ``setting`` (plus ``subpath``) is where the configuration keeps it, so a
    relocated store is found - and restored - where Contexta looks for it;
    ``default_path`` is its place in a default workspace and in a backup.
    """

    name: str              # ours, and --only's (metadata, records, artifacts, outbox, capture, cache, exports)
    section: str           # Contexta's name for it in included_sections
    setting: str
    default_path: str
    subpath: str = ""
    optional: bool = False  # copied only with --include-<name>
    plane: Optional[str] = None  # the check plane that proves it

    def locate(self, config: "UnifiedConfig") -> Path:
        path = _setting(config, self.setting)
        return path / self.subpath if self.subpath else path


# In Contexta's section order.  `recovery` is Contexta's name for the outbox's directory (the whole cache,
# there); ours holds what in it is data: the outbox and the capture sink's files, which Contexta's own facade
# (`Contexta(...).metric(...)`) writes and nowhere else.  cache/restore is restore staging; exports/ holds
# outputs (replay sink copies, export packages, often the backups themselves) and is opt-in, as in Contexta.
_SECTION_PARTS = (
    _SectionPart("metadata", "metadata", "workspace.metadata_path", "metadata", plane="metadata"),
    _SectionPart("records", "records", "records.root_path", "records", plane="records"),
    _SectionPart("artifacts", "artifacts", "artifacts.root_path", "artifacts", plane="artifacts"),
    _SectionPart("outbox", "recovery", "recovery.outbox_root", "cache/outbox", plane="outbox"),
    _SectionPart("capture", "recovery", "workspace.cache_path", "cache/capture", subpath="capture", plane="capture"),
    _SectionPart("cache", "cache", "workspace.cache_path", "cache", optional=True),
    _SectionPart("exports", "exports", "workspace.exports_path", "exports", optional=True),
)
_PARTS_BY_NAME = {part.name: part for part in _SECTION_PARTS}
_CONTEXTA_SECTIONS = ("config", "metadata", "records", "artifacts", "recovery", "cache", "exports")

# Never copied, wherever they are: our own journals, locks and temp files, Contexta's atomic-write temp
# files (`tmp` + 8 characters) and record-index rebuild scratch.  Restoring a journal would make the next
# replay or artifact command "finish" work that belongs to a workspace that no longer exists.
_NEVER_COPIED = re.compile(
    r"^(?:replay\.journal\.json|requeue\.journal\.json|replay\.lock|\.replay-kept\.tmp|\.replay-dead\.tmp"
    r"|\.replay-previous\.jsonl"
    r"|contexta-ops\.lock|.*\.contexta-ops-write\.json|\.contexta-ops-sink-index\.sqlite.*|tmp[a-z0-9_]{8}"
    r"|\.tmp-indexes)$")


def _setting(config: "UnifiedConfig", dotted: str) -> Path:
    """A path setting by its dotted name (``records.root_path``)."""
    section, key = dotted.split(".")
    path: Path = getattr(getattr(config, section), key)
    return path


@dataclasses.dataclass(frozen=True)
class BackupSection(_Record):
    """One source copied into a backup: the registry part, Contexta's section name, where from, where to."""

    name: str
    source: Path
    path: str
    kind: str = "dir"
    relocated: bool = False
    section: str = ""


@dataclasses.dataclass(frozen=True)
class BackupPlan(_Record):
    """What ``create_workspace_backup`` will copy (Contexta's fields first).  Planning changes nothing."""

    backup_ref: str
    workspace_root: Path
    backup_root: Path
    included_sections: Tuple[str, ...]
    estimated_bytes: int
    notes: Tuple[str, ...] = ()
    sections: Tuple[BackupSection, ...] = ()
    excluded_paths: Tuple[Path, ...] = ()
    warnings: Tuple[Notice, ...] = ()
    estimated_files: int = 0
    kind: str = "manual"
    label: str = "backup"


@dataclasses.dataclass(frozen=True)
class BackupResult(RecoveryResult):
    """Contexta's BackupResult fields; status is DEGRADED (exit 1) when the copy may be inconsistent."""

    backup_ref: str = ""
    created_at: str = ""
    location: Optional[Path] = None
    included_sections: Tuple[str, ...] = ()
    bytes_written: int = 0
    verification_notes: Tuple[str, ...] = ()
    file_count: int = 0
    kind: str = "manual"


def _clean_label(label: Optional[str]) -> str:
    """Contexta's label cleaning: Unicode letters and digits, ``-`` and ``_``; ``backup`` when nothing is left."""
    stem = (label or "backup").strip() or "backup"
    return "".join(char if char.isalnum() or char in "-_" else "-" for char in stem).strip("-_") or "backup"


def _build_backup_ref(label: Optional[str], moment: Optional[datetime] = None) -> str:
    """``<label>-<T>``, Contexta's backup ref."""
    return "%s-%s" % (_clean_label(label), _path_safe_timestamp(_utc_timestamp(moment)))


def _stored_path(path: Path, workspace_root: Path, default: str) -> Tuple[str, bool]:
    """Where a section goes in the backup: its live path when inside the workspace."""
    if _is_within(path, workspace_root) and os.path.normpath(str(path)) != os.path.normpath(str(workspace_root)):
        return "workspace/" + _relative_posix(path, workspace_root), False
    return "workspace/" + default, True


def _backup_sections(config: UnifiedConfig, include: Iterable[str] = ()) -> List[BackupSection]:
    """The registry's parts this configuration has, with the optional ones in ``include``, in backup order."""
    ws = config.workspace.root_path
    included = set(include)
    sections: List[BackupSection] = []
    for part in _SECTION_PARTS:
        if part.optional and part.name not in included:
            continue
        source = part.locate(config)
        path, relocated = _stored_path(source, ws, part.default_path)
        sections.append(BackupSection(part.name, source, path, "dir", relocated, part.section))
        if part.name == "metadata":
            sections += _ledger_sections(config, sections[-1])
    return sections


def _ledger_sections(config: UnifiedConfig, metadata_dir: BackupSection) -> List[BackupSection]:
    """The ledger and its WAL, as one unit, when they live outside the metadata directory."""
    ws = config.workspace.root_path
    database = config.metadata.database_path
    if _is_within(database, config.workspace.metadata_path):
        return []
    wal = Path(str(database) + ".wal")
    if _is_within(database, ws):
        return [BackupSection("metadata", source, path, "file", False, "metadata") for source, path in (
            (database, _stored_path(database, ws, "metadata/ledger.db")[0]),
            (wal, _stored_path(wal, ws, "metadata/ledger.db.wal")[0]))]
    return [BackupSection("metadata", database, metadata_dir.path + "/ledger.db", "file", True, "metadata"),
            BackupSection("metadata", wal, metadata_dir.path + "/ledger.db.wal", "file", True, "metadata")]


def _section_excludes(config: UnifiedConfig, sections: Sequence[BackupSection], section: BackupSection,
                      extra: Sequence[Path] = ()) -> List[Path]:
    """Never copy our own output, staging, or another section's source into a section."""
    excludes = [config.recovery.backup_root, config.recovery.restore_staging_root] + list(extra)
    for other in sections:
        if other is not section and other.source != section.source and _is_within(other.source, section.source):
            excludes.append(other.source)
    return [path for path in excludes if _is_within(path, section.source)]


def _workspace_signals(config: UnifiedConfig) -> List[Tuple[Notice, bool]]:
    """Signs that a workspace is in use or mid-operation, each with whether a live process holds it.

    The one list `status` shows, a backup records and a restore refuses on: a
    writer's file handle on a swapped-out tree would lose its writes, and a
    journal describes work on the tree it was written for.
    """
    database = config.metadata.database_path
    outbox_root = config.recovery.outbox_root
    store = ArtifactStore(VaultConfig.from_unified_config(config))
    workspace = config.workspace.root_path
    checks = (
        (_posix_lock_is_held(database), True,
         Notice("metadata_in_use", "%s is open by a writer (DuckDB lock held)" % database)),
        (os.path.exists(str(database) + ".wal"), False,
         Notice("metadata_wal_present", "%s.wal exists: a DuckDB writer is open or stopped without a checkpoint"
                % database)),
        (_lock_is_held(_workspace_lock_path(workspace)), True,
         Notice("workspace_lock_held", "another backup or restore holds %s" % _workspace_lock_path(workspace))),
        (_journal_path(workspace).exists(), False,
         Notice("restore_interrupted", "a restore was interrupted; the next backup or restore finishes or rolls "
                "it back (%s)" % _journal_path(workspace))),
        (os.path.lexists(str(_repair_journal_path(workspace))), False,
         Notice("repair_interrupted", "a repair was interrupted; the next `repair` finishes or rolls it back (%s)"
                % _repair_journal_path(workspace))),
        (_lock_is_held(outbox_root / REPLAY_LOCK_FILE), True,
         Notice("replay_running", "a replay holds %s" % (outbox_root / REPLAY_LOCK_FILE))),
        ((outbox_root / _REPLAY_JOURNAL).exists() or (outbox_root / _REQUEUE_JOURNAL).exists(), False,
         Notice("replay_interrupted", "a replay or requeue was interrupted; the next `replay` finishes it (%s)"
                % outbox_root)),
        (_lock_is_held(store.root_path / _STORE_LOCK), True,
         Notice("artifact_write_running", "an artifact put or import holds %s" % (store.root_path / _STORE_LOCK))),
        (bool(_interrupted_artifact_writes(store)), False,
         Notice("artifact_write_interrupted", "an artifact put/import was interrupted; the next artifact command "
                "rolls it back or finishes it")),
    )
    return [(notice, held) for found, held, notice in checks if found]


def _unsafe_workspace_notices(config: UnifiedConfig) -> List[Notice]:
    """What a backup taken now records as unsafe (its own lock, a resumed restore and the ledger lock aside)."""
    return [notice for notice, _held in _workspace_signals(config)
            if notice.code not in ("workspace_lock_held", "restore_interrupted", "metadata_in_use",
                                   "metadata_wal_present")]


def _metadata_in_use_warnings(config: UnifiedConfig) -> Tuple[List[Notice], List[str]]:
    """(warnings, notes) about a ledger a writer may have open."""
    database = config.metadata.database_path
    warnings: List[Notice] = []
    notes: List[str] = []
    if _posix_lock_is_held(database):
        warnings.append(Notice("metadata_in_use", "%s is locked by another process (a DuckDB writer); "
                               "the copy may not be consistent - close the writer and back up again" % database))
    if os.path.isfile(str(database) + ".wal"):
        notes.append("metadata_wal_included")
    return warnings, notes


def plan_workspace_backup(config: UnifiedConfig, *, label: Optional[str] = None, include_cache: bool = False,
                          include_exports: bool = False, kind: str = "manual", estimate: bool = True) -> BackupPlan:
    """Plan a backup of the configured workspace.  Reads sizes only; creates nothing.

    The plan is the one record of what is copied (``sections``: every source
    and where it goes) and what is not (``excluded``), and the backup follows it.
    ``estimate=False`` skips sizing the sources (a walk of every file): an
    incremental backup links what it can, so the estimate would go unused.
    """
    ws = config.workspace.root_path
    if not ws.is_dir():
        raise BackupError("workspace %s does not exist" % ws, code="workspace_missing", path=ws)
    if kind not in BACKUP_KINDS:
        raise UsageError("backup kind must be one of %s, not %r" % (", ".join(BACKUP_KINDS), kind))
    include = [name for name, wanted in (("cache", include_cache), ("exports", include_exports)) if wanted]
    sections = _backup_sections(config, include)
    names = [name for name in _CONTEXTA_SECTIONS
             if name == "config" or any(section.section == name for section in sections)]
    notes = [name + "_excluded" for name in ("cache", "exports") if name not in include]
    warnings, in_use_notes = _metadata_in_use_warnings(config)
    warnings += _unsafe_workspace_notices(config)
    notes += in_use_notes
    excluded: List[Path] = []
    for root_name, root in (("backup_root", config.recovery.backup_root),
                            ("restore_staging_root", config.recovery.restore_staging_root)):
        if _is_within(root, ws):
            notes.append("%s_inside_workspace_excluded" % root_name)
            excluded.append(root)
    notes += ["relocated:%s:%s" % (section.name, section.source) for section in sections if section.relocated]
    files, total = _size_sources(config, sections) if estimate else (0, 0)
    return BackupPlan(backup_ref=_build_backup_ref(label), workspace_root=ws, backup_root=config.recovery.backup_root,
                      included_sections=tuple(names), estimated_bytes=total, notes=tuple(notes),
                      sections=tuple(sections), excluded_paths=tuple(excluded), warnings=tuple(warnings),
                      estimated_files=files, kind=kind, label=_clean_label(label))


def _size_sources(config: UnifiedConfig, sections: Sequence[BackupSection]) -> Tuple[int, int]:
    """(files, bytes) the sections hold: what a full backup of them copies."""
    files = 0
    total = 0
    seen: Set[str] = set()
    for section in sections:
        if str(section.source) in seen:
            continue
        seen.add(str(section.source))
        if section.kind == "file":
            if section.source.is_file():
                files += 1
                total += section.source.stat().st_size
        elif section.source.is_dir():
            count, size = _tree_size(section.source, _section_excludes(config, sections, section), _NEVER_COPIED)
            files += count
            total += size
    return files, total


def _resolved_config_mapping(config: UnifiedConfig) -> Dict[str, Any]:
    """Every section Contexta writes into resolved.config.json, ours resolved, the rest carried over."""
    mapping: Dict[str, Any] = _jsonable(config.to_dict())
    foreign = mapping.pop("foreign_sections")
    for section, defaults in _FOREIGN_DEFAULTS.items():
        values = json_loads(json.dumps(defaults))  # a deep copy
        patch = _TEST_PROFILE_FOREIGN.get(section, {}) if config.profile_name == "test" else {}
        values.update(patch)
        if isinstance(foreign.get(section), dict):
            values.update(foreign[section])
        mapping[section] = values
    return mapping


class _Entry(NamedTuple):
    """One directory or file a backup holds: its member path and where it comes from."""

    kind: str                       # "dir" or "file"
    member: str
    source: Optional[str]           # None: a directory the backup makes itself, or a file given as ``data``
    stat: Optional[os.stat_result]  # None with ``source``
    data: Optional[bytes] = None    # a file the backup writes itself (resolved.config.json)


class _MountNode:
    """A place in a backup's ``workspace/`` tree: a section mounted there, or a directory on the way to one."""

    __slots__ = ("kind", "source", "stat", "data", "children")

    def __init__(self, kind: str, source: Optional[str] = None, source_stat: Optional[os.stat_result] = None,
                 data: Optional[bytes] = None) -> None:
        self.kind = kind  # "dir" or "file" (a section), "bytes" (written by the backup) or "virtual"
        self.source = source
        self.stat = source_stat
        self.data = data
        self.children: Dict[str, "_MountNode"] = {}


class _SectionWalk:
    """Everything the planned sections hold, in plain string order of member paths; what it skipped.

    Sections are mounted in one tree at the paths they have in the backup
    (``workspace/records``, ``workspace/cache/outbox``, ...) and the tree is
    walked depth first, real directories and mounted sections merged, so the
    files come out in the order of the backup's list whatever the sections.
    A section mounted inside another one (the outbox inside an included cache)
    takes its place there; sources of other sections, the backup and staging
    roots are never walked into.
    """

    def __init__(self, config: UnifiedConfig, plan: BackupPlan, extra_excludes: Sequence[Path] = (),
                 config_bytes: Optional[bytes] = None) -> None:
        self.config = config
        self.plan = plan
        self.warnings: List[Notice] = []
        self.copied_sections: List[BackupSection] = []
        self.excluded = {os.path.normpath(str(path)) for path in
                         [config.recovery.backup_root, config.recovery.restore_staging_root] + list(extra_excludes)
                         + [section.source for section in plan.sections]}
        self.root = _MountNode("virtual")
        if config_bytes is not None:
            self._mount(_CONFIG_MEMBER, _MountNode("bytes", data=config_bytes))
        self._mount_sections()

    @property
    def copied(self) -> List[str]:
        """Contexta's section names, in its order.  Like Contexta, `recovery` counts when the outbox's
        directory exists, even empty."""
        names = {section.section for section in self.copied_sections}
        if os.path.isdir(str(self.config.recovery.outbox_root.parent)):
            names.add("recovery")
        return [name for name in _CONTEXTA_SECTIONS if name == "config" or name in names]

    def _mount_sections(self) -> None:
        done: Set[str] = set()
        for section in self.plan.sections:
            if str(section.source) in done:
                continue
            done.add(str(section.source))
            try:
                source_stat = os.lstat(str(section.source))
            except FileNotFoundError:
                continue
            if _kind_of(source_stat.st_mode) != section.kind:
                self.warnings.append(Notice("skipped_section", "%s (%s) is not a %s" % (
                    section.name, section.source, section.kind)))
            elif not self._mount(section.path, _MountNode(section.kind, str(section.source), source_stat)):
                self.warnings.append(Notice("skipped_section", "%s (%s) would land on %s, where another section "
                                            "already is" % (section.name, section.source, section.path)))
            else:
                self.copied_sections.append(section)

    def _mount(self, member: str, node: _MountNode) -> bool:
        parts = member.split("/")[1:]  # below workspace/
        here = self.root
        for part in parts[:-1]:
            child = here.children.get(part)
            if child is None:
                child = here.children[part] = _MountNode("virtual")
            elif child.kind in ("file", "bytes"):
                return False
            here = child
        existing = here.children.get(parts[-1])
        if existing is not None:
            if existing.kind != "virtual" or node.kind != "dir":
                return False
            node.children = existing.children  # a section mounted above one placed before it
        here.children[parts[-1]] = node
        return True

    def _items(self, node: Optional[_MountNode], real_dir: Optional[str]) -> Iterator[Tuple[str, Optional[_MountNode]]]:
        """(sort key, mounted node or None for a real entry) of one directory of the tree, in walk order."""
        names = _sorted_names(real_dir, self.excluded, _NEVER_COPIED) if real_dir is not None else []
        if node is None or not node.children:
            return ((name, None) for name in names)
        items: List[Tuple[str, Optional[_MountNode]]] = []
        for key in names:
            name = key[:-1] if key.endswith("/") else key
            child = node.children.get(name)
            if child is None:
                items.append((key, None))
            elif child.source is not None and os.path.normpath(child.source) != os.path.join(real_dir or "", name):
                self.warnings.append(Notice("section_shadowed", "%s%s was not copied: the backup keeps a section "
                                            "from %s in its place" % (real_dir, name, child.source)))
        items += [(name if child.kind in ("file", "bytes") else name + "/", child)
                  for name, child in node.children.items()]
        items.sort(key=lambda item: item[0])
        return iter(items)

    def entries(self) -> Iterator[_Entry]:
        yield _Entry("dir", "workspace", None, None)
        stack: List[Tuple[str, Optional[str], Iterator[Tuple[str, Optional[_MountNode]]]]] = [
            ("workspace/", None, self._items(self.root, None))]
        last_file = ""
        while stack:
            prefix, real_dir, items = stack[-1]
            item = next(items, None)
            if item is None:
                stack.pop()
                continue
            key, node = item
            name = key[:-1] if key.endswith("/") else key
            entry = self._entry(prefix + name, real_dir, name, node)
            if entry is None:
                continue
            if entry.kind == "file":
                if entry.member <= last_file:  # a directory turned file (or back) while it was listed
                    self.warnings.append(Notice("changed_during_backup", "%s changed while the walk passed it "
                                                "and was not copied" % entry.source))
                    continue
                last_file = entry.member
            yield entry
            if entry.kind == "dir":
                stack.append((entry.member + "/", entry.source + "/" if entry.source is not None else None,
                              self._items(node, entry.source)))

    def _entry(self, member: str, real_dir: Optional[str], name: str,
               node: Optional[_MountNode]) -> Optional[_Entry]:
        """What one name of the tree is: a mounted section, a real entry, or a directory the backup makes."""
        if node is not None and node.kind != "virtual":
            return _Entry("dir" if node.kind == "dir" else "file", member, node.source, node.stat, node.data)
        path = real_dir + name if real_dir is not None else None
        try:
            entry_stat = os.lstat(path) if path is not None else None
        except FileNotFoundError:
            entry_stat = None
        kind = _kind_of(entry_stat.st_mode) if entry_stat is not None else "gone"
        if node is not None and kind != "dir":  # on the way to a section: a directory the backup makes
            return _Entry("dir", member, None, None)
        if kind in ("file", "dir"):
            return _Entry(kind, member, path, entry_stat)
        if kind != "gone":
            self.warnings.append(Notice("skipped_special_file" if kind == "special" else "skipped_symlink",
                                        "%s is a %s and was not copied" % (path, kind)))
        return None


def _list_line(member: str, sha256: str) -> bytes:
    """One line of SHA256SUMS, as GNU sha256sum writes it (names holding \\, newline or CR escaped)."""
    if "\\" in member or "\n" in member or "\r" in member:
        return ("\\%s  %s\n" % (sha256, member.translate(_LIST_ESCAPES))).encode("utf-8", "surrogateescape")
    return ("%s  %s\n" % (sha256, member)).encode("utf-8", "surrogateescape")


_LIST_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r"})


class _ListWriter:
    """Writes SHA256SUMS as files are proven, in walk order; counts and hashes what it writes."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.count = 0
        self.total_bytes = 0
        self.size = 0
        self.lines: List[bytes] = []

    def add(self, member: str, size: int, sha256: str) -> None:
        self.lines.append(_list_line(member, sha256))
        self.count += 1
        self.total_bytes += size
        if len(self.lines) >= 1024:
            self._flush()

    def _flush(self) -> None:
        data = b"".join(self.lines)
        self.lines = []
        self.digest.update(data)
        self.handle.write(data)
        self.size += len(data)

    def summary(self) -> Dict[str, Any]:
        """The manifest's ``file_list``: the list's name, sha256, size and line count."""
        self._flush()
        return {"name": _LIST_NAME, "sha256": self.digest.hexdigest(), "size": self.size, "count": self.count}


class _PreviousBackup:
    """The newest complete backup, as an incremental backup sees it: files it may hard-link instead of copy.

    Its list and the walk are both in path order, so they are merged: nothing
    of the base is held but the next line of its list.
    """

    def __init__(self, backup: "_DirectoryBackup", listing: Iterator["_Listed"]) -> None:
        self.location = str(backup.location)
        self.backup_ref = backup.backup_ref
        self.listing = listing
        self.head: Optional[_Listed] = None
        self.damaged: List[str] = []
        self.unreadable: Optional[str] = None

    def _listed(self, member: str) -> Optional["_Listed"]:
        """The base's line for ``member``, reading its list forward (the walk asks in path order)."""
        while True:
            head = self.head
            if head is None:
                try:
                    head = self.head = next(self.listing, None)
                except RestoreError as exc:  # a damaged list: nothing more is linked from it
                    self.unreadable = self.unreadable or str(exc)
                    self.listing = iter(())
                if head is None:
                    return None
            if head.path >= member:
                if head.path != member:
                    return None
                self.head = None
                return head
            self.head = None

    def reusable(self, entry: _Entry, verify_unchanged: bool) -> Optional[Tuple[str, str]]:
        """(the base's copy, its sha256) for a file unchanged since (same size, mtime and mode; sha256 too
        when asked), else None.

        With ``verify_unchanged`` both the live file and the base copy are
        hashed: a base copy that rotted since it was written is never linked
        (the damage would spread to every later backup); ``damaged`` counts them.
        """
        listed = self._listed(entry.member)
        walked = entry.stat
        if listed is None or walked is None or entry.source is None:
            return None
        unchanged = (walked.st_size, walked.st_mtime_ns, stat.S_IMODE(walked.st_mode))
        if listed.size is not None and (listed.size, listed.mtime_ns, listed.mode) != unchanged:
            return None  # a v1 base recorded them
        copy = self.location + "/" + entry.member
        try:
            copy_stat = os.lstat(copy)
        except FileNotFoundError:
            return None
        same = stat.S_ISREG(copy_stat.st_mode) and (
            copy_stat.st_size, copy_stat.st_mtime_ns, stat.S_IMODE(copy_stat.st_mode)) == unchanged
        if not verify_unchanged:
            return (copy, listed.sha256) if same else None
        recorded = (walked.st_size, listed.sha256)
        if sha256_file(entry.source) != recorded:
            return None  # the file changed since the base was taken
        if not same or sha256_file(copy) != recorded:  # unchanged here, so the base's copy is what changed
            self.damaged.append(copy)
            return None
        return copy, listed.sha256


def _newest_previous_backup(backup_root: Path) -> Tuple[Optional[_PreviousBackup], List[Notice]]:
    """The newest complete backup with checksums whose list is intact, opening manifests newest first."""
    names = [name for name in os.listdir(str(backup_root)) if _BACKUP_REF_PATTERN.match(name)]
    skipped: List[Notice] = []
    for name in sorted(names, key=_ref_timestamp, reverse=True):
        try:
            backup = _DirectoryBackup(backup_root / name)
        except RestoreError:
            continue
        if not backup.has_checksums:
            continue
        fault = backup.list_fault()
        if fault is None:
            return _PreviousBackup(backup, iter(backup.listing())), skipped
        skipped.append(Notice("incremental_base_damaged", "%s was not used as a base: %s" % (name, fault)))
    return None, skipped


class _BackupWriter:
    """Copies what a walk yields into a partial backup directory, proving every byte it writes.

    Each file's line goes into SHA256SUMS in walk order, once its copy is
    proven (copies finish out of order on the workers).  With a previous
    backup, an unchanged file is hard-linked from it instead (copied where
    links are impossible), and keeps its recorded digest.
    """

    def __init__(self, partial: Path, progress: _Progress, previous: Optional[_PreviousBackup] = None,
                 verify_unchanged: bool = False) -> None:
        self.root = str(partial) + "/"
        self.partial = partial
        self.progress = progress
        self.previous = previous
        self.verify_unchanged = verify_unchanged
        self.list_handle = open(str(partial / _LIST_NAME), "xb")
        self.listing = _ListWriter(self.list_handle)
        self.slots: Deque[List[Any]] = collections.deque()  # [member, size, sha256]: None until proven
        self.directories: List[Tuple[str, int, int]] = []
        self.bytes_written = 0
        self.bytes_linked = 0
        self.links_failed = 0
        self.linked = 0
        self.warnings: List[Notice] = []
        self.copier = _Batches()

    def add(self, entry: _Entry) -> None:
        destination = self.root + entry.member  # our own walk: already safe
        if entry.kind == "dir":
            try:
                os.mkdir(destination)
            except FileNotFoundError:
                os.makedirs(destination)
            except FileExistsError:
                pass
            if entry.stat is not None:
                self.directories.append((destination, entry.stat.st_mode, entry.stat.st_mtime_ns))
            return
        if entry.data is not None:
            _write_new_file(destination, entry.data, 0o644, time.time_ns())
            self.bytes_written += len(entry.data)
            self._done(entry.member, len(entry.data), hashlib.sha256(entry.data).hexdigest())
            return
        assert entry.source is not None and entry.stat is not None
        if self.previous is not None and self._link(entry, destination):
            return
        slot: List[Any] = [entry.member, None, None]
        self.slots.append(slot)
        source = entry.source

        def copied(result: Tuple[int, str, bool]) -> None:
            size, digest, changed = result
            _crash_point("backup:file-copied")
            if changed:
                self.warnings.append(Notice("changed_during_backup", "%s changed while it was copied" % source))
            slot[1], slot[2] = size, digest
            self.bytes_written += size
            self.progress.advance(size)

        walked = entry.stat
        self.copier.submit(copied, walked.st_size, _copy_file, source, destination,
                           (walked.st_size, walked.st_mtime_ns), stat.S_IMODE(walked.st_mode), walked.st_mtime_ns)
        self._drain()

    def _link(self, entry: _Entry, destination: str) -> bool:
        assert self.previous is not None and entry.stat is not None
        reusable = self.previous.reusable(entry, self.verify_unchanged)
        if reusable is None:
            return False
        try:
            os.link(reusable[0], destination)
        except OSError:
            self.links_failed += 1
            return False
        self.linked += 1
        self.bytes_linked += entry.stat.st_size
        self.progress.advance(entry.stat.st_size)
        self._done(entry.member, entry.stat.st_size, reusable[1])
        _crash_point("backup:file-linked")
        return True

    def _done(self, member: str, size: int, digest: str) -> None:
        if self.slots:  # behind a copy still running: its line comes first
            self.slots.append([member, size, digest])
            self._drain()
        else:
            self.listing.add(member, size, digest)

    def _drain(self) -> None:
        """Write the lines of every proven file at the head of the walk order; bound how many wait."""
        slots = self.slots
        while True:
            while slots and slots[0][1] is not None:
                member, size, digest = slots.popleft()
                self.listing.add(member, size, digest)
            if len(slots) <= 8192 or not self.copier.settle_oldest():
                return

    def finish(self) -> Dict[str, Any]:
        """Wait for the copies, write the last lines, give directories their modes and times, make it durable."""
        self.copier.finish()
        self._drain()
        assert not self.slots, "a copy was never proven"
        summary = self.listing.summary()
        self.list_handle.close()
        for directory, mode, mtime_ns in reversed(self.directories):
            os.chmod(directory, stat.S_IMODE(mode) | stat.S_IRWXU)
            os.utime(directory, ns=(mtime_ns, mtime_ns))
        _sync_filesystem(self.partial)
        return summary

    def close(self) -> None:
        """Stop after a failure: no copy left running, the list closed."""
        self.copier.close()
        self.list_handle.close()


def _clean_stale_partials(backup_root: Path) -> List[str]:
    """Remove ``.<ref>.partial`` leftovers of killed runs (a running one holds its lock)."""
    removed: List[str] = []
    if not backup_root.is_dir():
        return removed
    for entry in sorted(os.listdir(str(backup_root))):
        path = backup_root / entry
        if entry.startswith(".") and entry.endswith(_PARTIAL_SUFFIX) and path.is_dir():
            if not _lock_is_held(path, directory=True):
                _remove_tree(path)
                removed.append(entry)
    return removed


def _workspace_lock_path(workspace_root: Path) -> Path:
    """The lock beside (not inside) a workspace, so it survives the workspace being swapped."""
    return workspace_root.parent / (".%s.contexta-ops.lock" % workspace_root.name)


def _workspace_lock(workspace_root: Path) -> _Lock:
    return _Lock(_workspace_lock_path(workspace_root), what="workspace %s" % workspace_root)


def create_workspace_backup(config: UnifiedConfig, plan: BackupPlan, *, incremental: bool = False,
                            verify_unchanged: bool = False) -> BackupResult:
    """Write the planned backup: every file hashed and fsynced, manifest last, renamed into place.

    Holds the workspace lock (exit 4 if another backup or restore runs) and
    finishes or rolls back an interrupted restore of this workspace first.
    ``incremental`` hard-links files unchanged since the newest complete
    backup (same path, size, mtime and mode; and sha256 with
    ``verify_unchanged``); the result is a complete backup all the same.
    """
    workspace_root = Path(plan.workspace_root)
    if not workspace_root.is_dir():
        raise BackupError("workspace %s does not exist" % workspace_root, code="workspace_missing",
                          path=workspace_root)
    with _workspace_lock(workspace_root):
        _resume_interrupted_restore(workspace_root, _relocated_roots(config, workspace_root))
        return _write_backup(config, plan, incremental, verify_unchanged)


def _write_backup(config: UnifiedConfig, plan: BackupPlan, incremental: bool = False,
                  verify_unchanged: bool = False) -> BackupResult:
    backup_root = Path(plan.backup_root)
    backup_root.mkdir(parents=True, exist_ok=True)
    cleaned = _clean_stale_partials(backup_root)
    previous, skipped_bases = _newest_previous_backup(backup_root) if incremental else (None, [])
    if incremental and previous is None:
        files, total = _size_sources(config, plan.sections)
        plan = dataclasses.replace(plan, notes=plan.notes + ("incremental_without_base:full copy",),
                                   estimated_files=files, estimated_bytes=total)
    elif incremental:
        plan = dataclasses.replace(plan, kind="incremental")
    final = backup_root / plan.backup_ref
    if final.exists():
        raise BackupError("backup %s already exists" % final, code="backup_exists", path=final)
    if previous is None:  # an incremental backup links what it can: its size is not known in advance
        _require_space({backup_root: plan.estimated_bytes}, "for backup %s" % plan.backup_ref)
    partial = backup_root / (".%s%s" % (plan.backup_ref, _PARTIAL_SUFFIX))
    partial.mkdir()
    progress = _Progress("backup %s" % plan.backup_ref, plan.estimated_bytes)
    try:
        with _Lock(partial, what="partial backup %s" % partial, directory=True):
            result = _fill_backup(config, plan, partial, final, progress, previous, verify_unchanged,
                                  skipped_bases)
    except BaseException:
        _remove_tree(partial)
        raise
    finally:
        progress.finish()
    if cleaned:
        result = dataclasses.replace(result, notes=result.notes + tuple("removed_stale_partial:%s" % name
                                                                        for name in cleaned))
    return result


_CONFIG_MEMBER = "workspace/config/resolved.config.json"


def _backup_manifest(config: UnifiedConfig, plan: BackupPlan, created_at: str, walk: _SectionWalk,
                     file_list: Mapping[str, Any], total_bytes: int, warnings: List[Notice]) -> Dict[str, Any]:
    """Contexta's manifest keys, then ours: tool, sections with their sources, and the list of files.

    ``file_list`` proves SHA256SUMS (its sha256, size and line count);
    ``total_bytes`` (what the listed files add up to) bounds what a reader
    stages or reads while it streams them.
    """
    return {
        "backup_ref": plan.backup_ref,
        "created_at": created_at,
        "workspace_root": str(plan.workspace_root),
        "profile_name": config.profile_name,
        "included_sections": walk.copied,
        "store_schema_versions": {"metadata": "1", "records": config.records.layout_version,
                                  "artifacts": config.artifacts.layout_version},
        "notes": [note for note in plan.notes if note in ("cache_excluded", "exports_excluded")],
        "format": BACKUP_FORMAT,
        "tool": {"name": TOOL_NAME, "version": __version__},
        "kind": plan.kind,
        "label": plan.label,
        "sections": [section.to_dict() for section in walk.copied_sections],
        "file_list": dict(file_list),
        "file_count": file_list["count"],
        "total_bytes": total_bytes,
        "warnings": [warning.to_dict() for warning in warnings],
    }


def _manifest_digest(manifest_bytes: bytes) -> bytes:
    return _digest_line(hashlib.sha256(manifest_bytes).hexdigest())


def _digest_line(sha256: str) -> bytes:
    return ("%s  %s\n" % (sha256, _MANIFEST_NAME)).encode("ascii")


def _manifest_digest_problems(manifest_bytes: bytes, digest_bytes: Optional[bytes], required: bool) -> List[Problem]:
    """The manifest against its recorded sha256 (absent is fine for older and Contexta backups)."""
    if digest_bytes is None:
        return [Problem("manifest_digest_missing", _MANIFEST_DIGEST_NAME,
                        "the manifest's sha256 is missing (archive cut short?)")] if required else []
    if digest_bytes != _manifest_digest(manifest_bytes):
        return [Problem("checksum_mismatch", _MANIFEST_NAME, "manifest.json does not match manifest.json.sha256")]
    return []


def _fill_backup(config: UnifiedConfig, plan: BackupPlan, partial: Path, final: Path, progress: _Progress,
                 previous: Optional[_PreviousBackup] = None, verify_unchanged: bool = False,
                 base_notices: Sequence[Notice] = ()) -> BackupResult:
    warnings, notes = _metadata_in_use_warnings(config)
    warnings += _unsafe_workspace_notices(config)
    walk = _SectionWalk(config, plan, extra_excludes=[partial],
                        config_bytes=_pretty_json(_resolved_config_mapping(config)))
    writer = _BackupWriter(partial, progress, previous, verify_unchanged)
    try:
        for entry in walk.entries():
            writer.add(entry)
        file_list = writer.finish()
    except BaseException:
        writer.close()
        raise
    _crash_point("backup:files-durable")
    details: Dict[str, Any] = {"format": BACKUP_FORMAT, "bytes_linked": writer.bytes_linked,
                               "sections": [section.to_dict() for section in walk.copied_sections]}
    if previous is not None:
        notes.append("incremental_from:%s" % previous.backup_ref)
        notes.append("bytes_linked:%d" % writer.bytes_linked)
        details.update(incremental_base=previous.backup_ref, linked_files=writer.linked,
                       linked_unverified=0 if verify_unchanged else writer.linked)
        if not verify_unchanged and writer.linked:
            notes.append("linked_unverified:%d from %s (matched by size, mtime and mode; --verify-unchanged "
                         "hashes them)" % (writer.linked, previous.backup_ref))
        if previous.damaged:
            warnings.append(Notice("incremental_base_damaged", "%d file(s) of the base backup %s no longer match "
                                   "its list (first: %s); they were copied fresh - verify that backup"
                                   % (len(previous.damaged), previous.backup_ref, previous.damaged[0])))
        if previous.unreadable:
            warnings.append(Notice("incremental_base_damaged", "the list of the base backup %s could not be read "
                                   "to its end (%s); the rest was copied fresh" % (previous.backup_ref,
                                                                                   previous.unreadable)))
    if writer.links_failed:
        notes.append("hardlinks_unavailable:%d files copied instead" % writer.links_failed)
    created_at = _utc_timestamp()
    warnings += list(base_notices) + walk.warnings + writer.warnings
    manifest_bytes = _pretty_json(_backup_manifest(config, plan, created_at, walk, file_list,
                                                   writer.listing.total_bytes, warnings))
    for name, data in ((_MANIFEST_NAME, manifest_bytes), (_MANIFEST_DIGEST_NAME, _manifest_digest(manifest_bytes))):
        with _naming(partial / name), open(str(partial / name), "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    _fsync_dir(partial)
    _crash_point("backup:manifest-written")
    os.rename(str(partial), str(final))
    _crash_point("backup:renamed")
    _fsync_dir(final.parent)
    _crash_point("backup:complete")
    return BackupResult(
        status="DEGRADED" if warnings else "SUCCESS",
        warnings=tuple(warnings),
        notes=tuple(plan.notes) + tuple(note for note in notes if note not in plan.notes),
        details=details,
        backup_ref=plan.backup_ref,
        created_at=created_at,
        location=final,
        included_sections=tuple(walk.copied),
        bytes_written=writer.bytes_written + len(manifest_bytes) + file_list["size"],
        verification_notes=("manifest_written", "checksums_recorded:%d" % file_list["count"]),
        file_count=file_list["count"],
        kind=plan.kind,
    )


# -- one-file backups ----------------------------------------------------------
#
# The same backup as one tar (optionally gzipped): manifest.json first, then
# SHA256SUMS, then every directory and file under workspace/ in the list's
# order.  The manifest leads, so files are read twice: once to hash them (the
# list and the walk are spooled to unlinked temp files beside the archive),
# once to write them (checked against the first read; a file that changed in
# between aborts the archive).

ARCHIVE_STDOUT = "-"


class _HashingReader:
    """Reads a file for tarfile while hashing it."""

    def __init__(self, handle: Any, progress: _Progress) -> None:
        self.handle = handle
        self.progress = progress
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        self.size += len(data)
        self.progress.advance(len(data), files=0)
        return data


def _tar_info(name: str, kind: str, size: int, mode: int, mtime_ns: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if kind == "dir" else tarfile.REGTYPE
    info.size = size if kind == "file" else 0
    info.mode = stat.S_IMODE(mode)
    info.mtime = mtime_ns / 1e9
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def create_backup_archive(config: UnifiedConfig, plan: BackupPlan, destination: Any,
                          compress: bool = False) -> BackupResult:
    """Write the planned backup as one tar file (``-`` streams it to stdout); temp name, renamed when complete."""
    workspace_root = Path(plan.workspace_root)
    if not workspace_root.is_dir():
        raise BackupError("workspace %s does not exist" % workspace_root, code="workspace_missing",
                          path=workspace_root)
    to_stdout = str(destination) == ARCHIVE_STDOUT
    final = None if to_stdout else _resolve_path(destination)
    if final is not None and (final.exists() or final.is_symlink()):
        raise BackupError("archive %s already exists" % final, code="backup_exists", path=final)
    if final is not None and not final.parent.is_dir():
        raise BackupError("directory %s does not exist" % final.parent, code="archive_directory_missing",
                          path=final.parent)
    with _workspace_lock(workspace_root):
        _resume_interrupted_restore(workspace_root, _relocated_roots(config, workspace_root))
        if final is None:
            return _write_archive(config, plan, sys.stdout.buffer, None, compress)
        if not compress:
            _require_space({final.parent: plan.estimated_bytes}, "for archive %s" % final)
        prefix = ".%s.partial-" % final.name
        for stale in final.parent.glob(prefix + "*"):
            if not _lock_is_held(stale):
                stale.unlink()
        partial = final.parent / (prefix + uuid.uuid4().hex[:12])
        try:
            with _naming(partial), open(partial, "xb") as out, _Lock(partial, what="partial archive %s" % partial):
                result = _write_archive(config, plan, out, final, compress, exclude=[partial])
                out.flush()
                os.fsync(out.fileno())
            _crash_point("archive:written")
            os.rename(str(partial), str(final))
            _fsync_dir(final.parent)
            _crash_point("archive:renamed")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(partial))
            raise
        return dataclasses.replace(result, location=final)


class _Spool:
    """Records of a first pass kept on disk for the second (an unlinked temp file): a million cost no memory."""

    def __init__(self, directory: Optional[str]) -> None:
        self.handle = tempfile.TemporaryFile(dir=directory)
        self.batch: List[Tuple[Any, ...]] = []

    def add(self, record: Tuple[Any, ...]) -> None:
        self.batch.append(record)
        if len(self.batch) >= 1024:
            self._flush()

    def _flush(self) -> None:
        if self.batch:
            data = marshal.dumps(self.batch)
            self.handle.write(struct.pack("<I", len(data)) + data)
            self.batch = []

    def __iter__(self) -> Iterator[Tuple[Any, ...]]:
        self._flush()
        self.handle.seek(0)
        while True:
            head = self.handle.read(4)
            if not head:
                return
            yield from marshal.loads(self.handle.read(struct.unpack("<I", head)[0]))

    def close(self) -> None:
        self.handle.close()


def _hash_file(source: str, seen: Tuple[int, int]) -> Tuple[int, str, bool]:
    """(size, sha256, changed while read) of a file a walk saw as regular with ``seen`` (size, mtime_ns)."""
    fd, _opened = _open_source_file(source)
    try:
        if seen[0] <= _SMALL_FILE:
            data = _read_all(fd, seen[0])
            return len(data), hashlib.sha256(data).hexdigest(), _changed(seen, len(data), os.fstat(fd))
        with os.fdopen(os.dup(fd), "rb", buffering=0) as handle:
            size, digest = _hash_stream(handle)
        return size, digest, _changed(seen, size, os.fstat(fd))
    finally:
        os.close(fd)


def _write_archive(config: UnifiedConfig, plan: BackupPlan, out: Any, final: Optional[Path], compress: bool,
                   exclude: Sequence[Path] = ()) -> BackupResult:
    """Hash every file into SHA256SUMS (spooled beside the archive), then write manifest, list and members."""
    warnings, notes = _metadata_in_use_warnings(config)
    warnings += _unsafe_workspace_notices(config)
    config_bytes = _pretty_json(_resolved_config_mapping(config))
    walk = _SectionWalk(config, plan, extra_excludes=list(exclude) + ([final] if final else []),
                        config_bytes=config_bytes)
    scratch = str(final.parent) if final is not None else None
    now_ns = time.time_ns()
    entries = _Spool(scratch)
    list_spool = tempfile.TemporaryFile(dir=scratch)
    try:
        listing = _ListWriter(list_spool)
        hashing = _Progress("hash %s" % plan.backup_ref, plan.estimated_bytes)
        for entry in walk.entries():
            if entry.kind == "dir":
                entries.add(("dir", entry.member, "", 0) + (
                    (stat.S_IMODE(entry.stat.st_mode), entry.stat.st_mtime_ns) if entry.stat else (0o755, now_ns)))
                continue
            if entry.data is not None:
                size, digest, changed = len(entry.data), hashlib.sha256(entry.data).hexdigest(), False
                entries.add(("data", entry.member, "", size, 0o644, now_ns, digest))
            else:
                assert entry.source is not None and entry.stat is not None
                size, digest, changed = _hash_file(entry.source, (entry.stat.st_size, entry.stat.st_mtime_ns))
                entries.add(("file", entry.member, entry.source, size, stat.S_IMODE(entry.stat.st_mode),
                             entry.stat.st_mtime_ns, digest))
            if changed:
                warnings.append(Notice("changed_during_backup", "%s changed while it was read" % entry.source))
            listing.add(entry.member, size, digest)
            hashing.advance(size)
        hashing.finish()
        file_list = listing.summary()
        created_at = _utc_timestamp()
        warnings += walk.warnings
        manifest = _backup_manifest(config, plan, created_at, walk, file_list, listing.total_bytes, warnings)
        manifest["archive"] = {"compression": "gzip" if compress else None}
        manifest_bytes = _pretty_json(manifest)
        list_spool.seek(0)
        _write_tar(out, compress, manifest_bytes, list_spool, file_list["size"], entries, config_bytes,
                   _Progress("write %s" % plan.backup_ref, listing.total_bytes), now_ns)
    finally:
        entries.close()
        list_spool.close()
    return BackupResult(
        status="DEGRADED" if warnings else "SUCCESS", warnings=tuple(warnings),
        notes=tuple(plan.notes) + tuple(note for note in notes if note not in plan.notes),
        details={"format": BACKUP_FORMAT, "archive": "tar+gzip" if compress else "tar"},
        backup_ref=plan.backup_ref, created_at=created_at, location=final,
        included_sections=tuple(walk.copied),
        bytes_written=listing.total_bytes + len(manifest_bytes) + file_list["size"],
        verification_notes=("manifest_written", "checksums_recorded:%d" % file_list["count"]),
        file_count=file_list["count"])


class _GzipWriter:
    """gzip onto ``out`` with nothing left to flush at finalization.

    Newer Pythons' gzip.GzipFile buffers its writes and flushes again when collected: after a
    write failed (a full disk) that second flush prints a traceback of its own.
    Here an abandoned stream is simply dropped, and the header (mtime 0) is
    zlib's, the same on every Python.
    """

    def __init__(self, out: Any, level: int = 6) -> None:
        self._out = out
        self._deflate = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)

    def write(self, data: bytes) -> int:
        self._out.write(self._deflate.compress(data))
        return len(data)

    def close(self) -> None:
        self._out.write(self._deflate.flush())


def _write_tar(out: Any, compress: bool, manifest_bytes: bytes, list_spool: Any, list_size: int, entries: _Spool,
               config_bytes: bytes, writing: _Progress, now_ns: int) -> None:
    """manifest.json, SHA256SUMS, every member in the list's order (each checked against its first read),
    and the manifest's digest last."""
    compressor = _GzipWriter(out) if compress else None
    stream: Any = compressor if compressor is not None else out
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_tar_info(_MANIFEST_NAME, "file", len(manifest_bytes), 0o644, now_ns), io.BytesIO(manifest_bytes))
        tar.addfile(_tar_info(_LIST_NAME, "file", list_size, 0o644, now_ns), list_spool)
        for kind, member, source, size, mode, mtime_ns, *digest in entries:
            if kind == "dir":
                tar.addfile(_tar_info(member, "dir", 0, mode, mtime_ns))
                continue
            if kind == "data":
                tar.addfile(_tar_info(member, "file", size, mode, mtime_ns), io.BytesIO(config_bytes))
                continue
            with open_regular(source, follow_symlinks=False) as handle:
                reader = _HashingReader(handle, writing)
                tar.addfile(_tar_info(member, "file", size, mode, mtime_ns), reader)
            if (reader.size, reader.digest.hexdigest()) != (size, digest[0]):
                raise BackupError("%s changed between hashing and archiving; the archive is abandoned - quiet "
                                  "the workspace and run again" % source, code="source_changed", path=source)
            _crash_point("archive:member-written")
        digest_line = _manifest_digest(manifest_bytes)
        tar.addfile(_tar_info(_MANIFEST_DIGEST_NAME, "file", len(digest_line), 0o644, now_ns),
                    io.BytesIO(digest_line))
    if compressor is not None:
        compressor.close()
    writing.finish()


# -- Contexta's CLI zip ---------------------------------------------------------
#
# `contexta backup create --output FILE` writes a zip of the whole workspace
# under one folder named like it (shutil.make_archive).  We write that very
# layout, so contexta's own `restore apply FILE.zip` takes it - but never the
# zip itself, earlier zips, or backups and staging kept inside the workspace.

def create_cli_zip(config: UnifiedConfig, destination: Any, label: Optional[str] = None) -> BackupResult:
    """The workspace as contexta 1.0.0's CLI zips it; temp name, renamed when complete.

    ``destination`` gets ``.zip`` appended unless it ends so (Contexta cuts a
    dotted label short instead: ``v1.2`` became ``v1.zip``).
    """
    workspace_root = config.workspace.root_path
    if not workspace_root.is_dir():
        raise BackupError("workspace %s does not exist" % workspace_root, code="workspace_missing",
                          path=workspace_root)
    final = _resolve_path(destination)
    if not final.name.endswith(".zip"):
        final = final.with_name(final.name + ".zip")
    if os.path.lexists(str(final)):
        raise BackupError("archive %s already exists" % final, code="backup_exists", path=final)
    if not final.parent.is_dir():
        raise BackupError("directory %s does not exist" % final.parent, code="archive_directory_missing",
                          path=final.parent)
    excluded = [config.recovery.backup_root, config.recovery.restore_staging_root, final]
    _require_space({final.parent: _tree_size(workspace_root, excluded, _NEVER_COPIED)[1]}, "for zip %s" % final)
    with _workspace_lock(workspace_root):
        _resume_interrupted_restore(workspace_root, _relocated_roots(config, workspace_root))
        warnings = _unsafe_workspace_notices(config) + _metadata_in_use_warnings(config)[0]
        partial = final.parent / (".%s.partial-%s" % (final.name, uuid.uuid4().hex[:12]))
        try:
            with _naming(partial):
                files, size, sections = _write_cli_zip(workspace_root, partial, excluded + [partial])
            _crash_point("zip:written")
            os.rename(str(partial), str(final))
            _fsync_dir(final.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(partial))
            raise
    return BackupResult(
        status="DEGRADED" if warnings else "SUCCESS", warnings=tuple(warnings), notes=("contexta_cli_zip",),
        details={"format": "contexta-cli-zip", "backup_path": str(final), "label": label,
                 "workspace": str(workspace_root)},
        backup_ref=final.stem, created_at=_utc_timestamp(), location=final, included_sections=tuple(sections),
        bytes_written=final.stat().st_size, verification_notes=("zip_crc32_recorded:%d" % files,),
        file_count=files)


def _write_cli_zip(workspace_root: Path, partial: Path, excluded: Sequence[Path]) -> Tuple[int, int, List[str]]:
    """(files, bytes, top-level names): every directory and file, sorted, under ``<workspace name>/``."""
    top = workspace_root.name
    files = 0
    total = 0
    sections: List[str] = []
    with open(partial, "xb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as out:
        out.write(str(workspace_root), top + "/")
        for rel, entry_stat, kind in _walk_tree(workspace_root, excluded, _NEVER_COPIED):
            if kind not in ("dir", "file"):
                continue  # links and special files are never archived (a restore would refuse them)
            if "/" not in rel:
                sections.append(rel)
            if kind == "dir":
                out.write(str(workspace_root / rel), "%s/%s/" % (top, rel))
                continue
            with open_regular(workspace_root / rel) as source:
                info = zipfile.ZipInfo.from_file(str(workspace_root / rel), "%s/%s" % (top, rel),
                                                 strict_timestamps=False)
                info.compress_type = zipfile.ZIP_DEFLATED
                with out.open(info, "w") as member:
                    shutil.copyfileobj(source, member, _CHUNK)
            files += 1
            total += entry_stat.st_size
            _crash_point("zip:member-written")
        raw.flush()
        os.fsync(raw.fileno())
    return files, total, sections


# -- reading a backup back ---------------------------------------------------

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_INT63_MAX = (1 << 63) - 1  # sizes and nanosecond times: what a signed 64-bit field (stat, tar, zip) holds
_INT63_MIN = -(1 << 63)  # a file from before 1970 has a negative mtime
_MANIFEST_LIMIT = 256 << 20
# A v1 manifest lists its files itself, ~2 KB each in memory once parsed; past this it is refused before it is
# parsed.  A v2 list (SHA256SUMS) is streamed: it needs no cap on its lines, only on each line's length.
_MANIFEST_MAX_FILES = 1000000
_LIST_LINE_LIMIT = 32 << 10  # a digest and one path (PATH_MAX is 4096 bytes; escaping at most doubles it)
_LIST_LINE = re.compile(rb"(\\?)([0-9a-f]{64})  ([^\n]*)\n")
_LIST_UNESCAPE = re.compile(r"\\(.?)", re.DOTALL)
_LIST_UNESCAPED = {"\\": "\\", "n": "\n", "r": "\r"}
# One path component a directory may be named by: no separator, no control character, not . or ..
_BACKUP_REF_TEXT = re.compile(r"(?!\.\.?$)[^/\\\x00-\x1f\x7f]{1,255}")


@dataclasses.dataclass(frozen=True)
class _Member:
    """One entry of a backup, whatever holds it: a directory, a tar archive or a zip."""

    path: str
    kind: str
    size: int
    mode: int
    mtime_ns: int
    opener: Optional[Callable[[], Any]] = None
    on_disk: Optional[str] = None  # a directory backup's file, which can be copied in the kernel

    def open(self) -> Any:
        assert self.opener is not None
        return self.opener()


class _Listed(NamedTuple):
    """One file a backup's list names: its member path and sha256; v1 manifests also recorded the rest."""

    path: str
    sha256: str
    size: Optional[int] = None
    mode: Optional[int] = None
    mtime_ns: Optional[int] = None


# An empty, ``.`` or ``..`` component (a leading separator makes an empty one), with either separator.
_UNSAFE_COMPONENTS = re.compile(r"(?:^|[/\\])\.{0,2}(?:[/\\]|$)")


def _member_path_fault(path: Any) -> Optional[str]:
    """Why a listed path cannot name a backup member (absolute, ``..``, empty parts, outside workspace/), or None.

    The rules of :func:`safe_join`, without building a path (a list may name a million).
    """
    if not isinstance(path, str) or "\x00" in path or path[1:2] == ":" or _UNSAFE_COMPONENTS.search(path):
        return "%s is not a safe relative path" % _shown(path)
    if not path.startswith("workspace/"):
        return "%s is outside workspace/" % _shown(path)
    return None


def _unescape_list_name(name: str) -> Optional[str]:
    """A GNU-escaped name (``\\\\``, ``\\n``, ``\\r``) as it is, or None when it holds another escape."""
    try:
        return _LIST_UNESCAPE.sub(lambda match: _LIST_UNESCAPED[match.group(1)], name)
    except KeyError:
        return None


class _ListReader:
    """A v2 backup's SHA256SUMS, read a line at a time: every line checked as it comes, the whole at the end.

    Each line is ``<sha256>  <member path>`` (GNU escaping when it starts
    with a backslash), at most 32 KiB, naming a safe path below workspace/,
    after the line before it in string order (so no path twice).  A line that
    is not is refused (``recovery_manifest_invalid``), like a bad manifest.
    Once read to its end, ``problems`` says whether the list matches the
    sha256, size and line count the manifest recorded for it.
    """

    def __init__(self, opener: Callable[[], Any], file_list: Mapping[str, Any], shown: str) -> None:
        self.opener = opener
        self.expected = file_list
        self.shown = shown
        self.problems: List[Problem] = []

    def _invalid(self, message: str) -> RestoreError:
        return RestoreError("backup list %s: %s" % (self.shown, message), code="recovery_manifest_invalid",
                            path=self.shown)

    def __iter__(self) -> Iterator[_Listed]:
        limit = self.expected["size"]
        digest = hashlib.sha256()
        count = size = 0
        last = ""
        with self.opener() as handle:
            while True:
                raw = handle.readline(_LIST_LINE_LIMIT + 1)
                if not raw:
                    break
                digest.update(raw)
                count += 1
                size += len(raw)
                if size > limit:
                    raise self._invalid("is longer than the %d bytes the manifest records" % limit)
                match = _LIST_LINE.fullmatch(raw)
                if match is None:
                    raise self._invalid("line %d is not `<sha256>  workspace/<path>` ending in a newline%s" % (
                        count, " (longer than %d bytes)" % _LIST_LINE_LIMIT if len(raw) > _LIST_LINE_LIMIT else ""))
                escaped, hex_digest, name = match.groups()
                path: Optional[str] = name.decode("utf-8", "surrogateescape")
                if escaped and path is not None:
                    path = _unescape_list_name(path)
                fault = "holds an unknown escape" if path is None else _member_path_fault(path)
                if fault is None and path is not None and path <= last:
                    fault = "%s is not after %s (the list is sorted, each path once)" % (_shown(path), _shown(last))
                if fault is not None or path is None:
                    raise self._invalid("line %d: %s" % (count, fault))
                last = path
                yield _Listed(path, hex_digest.decode("ascii"))
        self.problems = self._end_problems(digest.hexdigest(), size, count)

    def _end_problems(self, actual: str, size: int, count: int) -> List[Problem]:
        if actual != self.expected["sha256"] or size != self.expected["size"]:
            return [Problem("checksum_mismatch", _LIST_NAME, "%s does not match the sha256 and size the manifest "
                            "records for it" % _LIST_NAME, expected=self.expected["sha256"], actual=actual)]
        if count != self.expected["count"]:
            return [Problem("checksum_mismatch", _MANIFEST_NAME, "the manifest says %s holds %d lines, it holds %d"
                            % (_LIST_NAME, self.expected["count"], count), expected=self.expected["count"],
                            actual=count)]
        return []


class _ManifestListing:
    """A v1 manifest's own list of files, sorted by path (it is in memory anyway)."""

    problems: List[Problem] = []

    def __init__(self, files: Sequence[Mapping[str, Any]]) -> None:
        self.files = files

    def __iter__(self) -> Iterator[_Listed]:
        for entry in sorted(self.files, key=lambda item: item["path"]):
            yield _Listed(entry["path"], entry["sha256"], entry["size"], entry.get("mode"), entry.get("mtime_ns"))


def _manifest_error(location: Any, message: str) -> RestoreError:
    return RestoreError("backup manifest %s: %s" % (Path(location) / _MANIFEST_NAME, message),
                        code="recovery_manifest_invalid", path=Path(location) / _MANIFEST_NAME)


def _is_int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _shown(value: Any) -> str:
    """A value from untrusted input, short enough for a one-line message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _validate_manifest(manifest: Any, location: Any) -> Dict[str, Any]:
    """Check every manifest key a reader uses, by type and by range, before anything is written.

    Every reader (backup directory, tar file, tar on stdin, list, incremental
    base) goes through here, so ``backup verify``, ``restore plan``,
    ``--verify-only`` and restore accept and refuse the same manifests.
    """
    if not isinstance(manifest, dict):
        raise _manifest_error(location, "is not a JSON object")
    wrong = (_manifest_header_fault(manifest) or _manifest_files_fault(manifest) or _manifest_list_fault(manifest)
             or _manifest_sections_fault(manifest))
    if wrong:
        raise _manifest_error(location, wrong)
    return manifest


def _manifest_header_fault(manifest: Dict[str, Any]) -> Optional[str]:
    if "backup_ref" in manifest and not (isinstance(manifest["backup_ref"], str)
                                         and _BACKUP_REF_TEXT.fullmatch(manifest["backup_ref"])):
        return "backup_ref %s is not a backup name (one path component, no control characters)" % _shown(
            manifest["backup_ref"])
    for key in ("created_at", "format"):
        if key in manifest and not isinstance(manifest[key], str):
            return "%s is not a string" % key
    for key in ("file_count", "total_bytes"):
        if key in manifest and not _is_int_in(manifest[key], 0, _INT63_MAX):
            return "%s is not a non-negative integer below 2**63" % key
    sections = manifest.get("included_sections", [])
    if not isinstance(sections, list) or not all(isinstance(item, str) for item in sections):
        return "included_sections is not a list of strings"
    return None


def _manifest_files_fault(manifest: Dict[str, Any]) -> Optional[str]:
    if "files" not in manifest:
        return None
    files = manifest["files"]
    if not isinstance(files, list):
        return "files is not a list"
    if len(files) > _MANIFEST_MAX_FILES:
        return "lists %d files, more than the %d a backup may hold" % (len(files), _MANIFEST_MAX_FILES)
    seen: Set[str] = set()
    for index, entry in enumerate(files):
        wrong = _manifest_file_fault(entry)
        if wrong:
            return "files[%d]%s" % (index, wrong)
        if entry["path"] in seen:
            return "files lists %s twice" % _shown(entry["path"])
        seen.add(entry["path"])
    return None


def _manifest_list_fault(manifest: Dict[str, Any]) -> Optional[str]:
    """A v2 manifest's ``file_list``: what proves SHA256SUMS; ``total_bytes`` bounds what its files may hold."""
    if "file_list" not in manifest:
        return None
    file_list = manifest["file_list"]
    if not isinstance(file_list, dict) or file_list.get("name") != _LIST_NAME:
        return "file_list is not an object naming %s" % _LIST_NAME
    if not isinstance(file_list.get("sha256"), str) or not _SHA256_HEX.fullmatch(file_list["sha256"]):
        return "file_list.sha256 is not a sha256 hex digest"
    for key in ("size", "count"):
        if not _is_int_in(file_list.get(key), 0, _INT63_MAX):
            return "file_list.%s is not a non-negative integer below 2**63" % key
    if "files" in manifest:
        return "lists its files twice (files and file_list)"
    if "total_bytes" not in manifest:
        return "has a file_list but no total_bytes"
    return None


def _manifest_file_fault(entry: Any) -> Optional[str]:
    if not isinstance(entry, dict):
        return " is not an object"
    path_fault = _member_path_fault(entry.get("path"))
    if path_fault:
        return ".path " + path_fault
    if not _is_int_in(entry.get("size"), 0, _INT63_MAX):
        return ".size is not a non-negative integer below 2**63"
    if not isinstance(entry.get("sha256"), str) or not _SHA256_HEX.fullmatch(entry["sha256"]):
        return ".sha256 is not a sha256 hex digest"
    if "mode" in entry and not _is_int_in(entry["mode"], 0, 0o7777):
        return ".mode is not a permission mode (an integer from 0 to 0o7777)"
    if "mtime_ns" in entry and not _is_int_in(entry["mtime_ns"], _INT63_MIN, _INT63_MAX):
        return ".mtime_ns is not a 64-bit integer"
    return None


def _manifest_sections_fault(manifest: Dict[str, Any]) -> Optional[str]:
    if "sections" not in manifest:
        return None
    if not isinstance(manifest["sections"], list):
        return "sections is not a list"
    for index, entry in enumerate(manifest["sections"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            return "sections[%d] is not a section object" % index
        try:
            safe_join("/", entry["path"])
        except (OpsError, KeyError):
            return "sections[%d].path is not a safe relative path" % index
        if not entry["path"].startswith("workspace/"):
            return "sections[%d].path %s is outside workspace/" % (index, _shown(entry["path"]))
    return None


def _refuse_oversized_manifest(raw: bytes, location: Any) -> None:
    """Size and entry count, checked before parsing: parsing is what costs the memory."""
    if len(raw) > _MANIFEST_LIMIT:
        raise _manifest_error(location, "is larger than %d bytes" % _MANIFEST_LIMIT)
    if raw.count(b'"sha256"') > _MANIFEST_MAX_FILES:
        raise _manifest_error(location, "lists more than the %d files a backup may hold" % _MANIFEST_MAX_FILES)


def _parse_manifest_bytes(raw: bytes, location: Any) -> Dict[str, Any]:
    _refuse_oversized_manifest(raw, location)
    try:
        manifest = json_loads(raw)
    except ValueError as exc:
        raise _manifest_error(location, str(exc))
    return _validate_manifest(manifest, location)


def _read_manifest_file(path: Path, location: Path) -> bytes:
    """A backup directory's manifest, refused unread when it is larger than any manifest may be."""
    try:
        with open_regular(path, follow_symlinks=False) as handle:
            if os.fstat(handle.fileno()).st_size > _MANIFEST_LIMIT:
                raise _manifest_error(location, "is larger than %d bytes" % _MANIFEST_LIMIT)
            return handle.read(_MANIFEST_LIMIT + 1)
    except OSError as exc:
        raise RestoreError("cannot read %s: %s" % (path, exc.strerror or exc),
                           code="recovery_manifest_unreadable", path=path)


class _Expected:
    """A backup's list matched against its members as they come, holding as little as the format allows.

    A v2 list and the members of a v2 backup are both in path order: they are
    merged, holding one line.  A v1 manifest's list is in memory anyway, and the
    members of its archives came in an older order: matched by lookup.
    Listed paths passed over without a member collect in ``missing`` (the
    caller drains it); :meth:`rest` gives those never reached.
    """

    def __init__(self, listing: Any, ordered: bool) -> None:
        self.listing = listing
        self.ordered = ordered
        self.missing: List[str] = []
        self.head: Optional[_Listed] = None
        self.last = ""
        self.iterator: Iterator[_Listed] = iter(listing) if ordered else iter(())
        self.by_path: Dict[str, _Listed] = {} if ordered else {entry.path: entry for entry in listing}

    def take(self, path: str) -> Optional[_Listed]:
        """The list's entry for a member file, or None when the list does not name it (here)."""
        if not self.ordered:
            return self.by_path.pop(path, None)
        if path <= self.last:
            return None  # out of the list's order (or twice): never matched
        self.last = path
        while True:
            head = self.head
            if head is None:
                head = next(self.iterator, None)
            self.head = None
            if head is None:
                return None
            if head.path == path:
                return head
            if head.path > path:
                self.head = head
                return None
            self.missing.append(head.path)

    def rest(self) -> Iterator[str]:
        """Listed paths no member matched, after the last member (reads the list to its end)."""
        if not self.ordered:
            yield from sorted(self.by_path)
            return
        if self.head is not None:
            yield self.head.path
            self.head = None
        for entry in self.iterator:
            yield entry.path

    @property
    def problems(self) -> List[Problem]:
        """What the list itself holds against the manifest, once read to its end."""
        return list(self.listing.problems)


class _BackupSource:
    """What verify and restore read, whatever holds the backup: a directory, a tar archive or a zip."""

    kind = ""
    location: Optional[Path] = None
    manifest: Dict[str, Any]
    manifest_bytes = b""
    backup_ref = ""
    shown = ""

    @property
    def made_by(self) -> str:
        return TOOL_NAME if self.manifest.get("format") in _OUR_FORMATS else "contexta"

    @property
    def has_checksums(self) -> bool:
        """Whether the backup lists every file's sha256: ours do (v2 in SHA256SUMS, v1 in the manifest)."""
        return "file_list" in self.manifest or "files" in self.manifest

    @property
    def list_streams(self) -> bool:
        """A v2 list: read as a stream, in the members' order."""
        return "file_list" in self.manifest

    def listing(self) -> Any:
        """The files the backup lists, in path order: an iterable of :class:`_Listed` whose ``problems``
        say, once it is read to its end, whether it matches what the manifest records for it."""
        if "files" in self.manifest:
            return _ManifestListing(self.manifest["files"])
        return _ListReader(self._list_opener(), self.manifest["file_list"], self._list_shown())

    def _list_opener(self) -> Callable[[], Any]:
        raise NotImplementedError

    def _list_shown(self) -> str:
        return "%s/%s" % (self.shown, _LIST_NAME)

    def expected(self) -> Optional[_Expected]:
        """The list, ready to be matched against the members; None for a backup without checksums."""
        return _Expected(self.listing(), ordered=self.list_streams) if self.has_checksums else None

    @property
    def declared_bytes(self) -> Optional[int]:
        """What the backup says its files add up to (what a restore will write), when it says so."""
        if "file_list" in self.manifest:
            total: int = self.manifest["total_bytes"]
            return total
        if "files" in self.manifest:
            return sum(entry["size"] for entry in self.manifest["files"])
        return None

    @property
    def budget(self) -> Optional[int]:
        """What members may hold in all (a v2 list records no sizes: its total bounds every read)."""
        return self.declared_bytes if self.list_streams else None

    def members(self) -> Iterator[_Member]:
        raise NotImplementedError

    def prescan(self) -> List[Problem]:
        """Problems found before anything is written (archives from a file: names, types, sizes)."""
        return []

    def manifest_problems(self) -> List[Problem]:
        """After a full pass: the manifest against its digest, where the format carries one."""
        return []

    def read_member(self, path: str) -> Optional[bytes]:
        """A small member's bytes when they can be read out of order (directories only), else None."""
        return None


class _DirectoryBackup(_BackupSource):
    """A backup directory (ours or Contexta's), opened and validated without changing it."""

    kind = "directory"
    location: Path

    def __init__(self, location: Path) -> None:
        self.location = location
        self.shown = str(location)
        manifest_path = location / _MANIFEST_NAME
        if not os.path.lexists(str(manifest_path)):
            raise RestoreError("backup %s has no manifest.json (incomplete or not a backup)" % location,
                               code="recovery_manifest_missing", path=manifest_path)
        raw = _read_manifest_file(manifest_path, location)
        self.manifest = _parse_manifest_bytes(raw, location)
        self.manifest_bytes = raw
        workspace = location / "workspace"
        if workspace.is_symlink():
            raise RestoreError("backup %s: workspace/ is a symbolic link, which is never followed; nothing was "
                               "written" % location, code="archive_unsafe", path=workspace)
        if not workspace.is_dir():
            raise RestoreError("backup %s has no workspace/ directory" % location,
                               code="recovery_backup_workspace_missing", path=workspace)
        if self.list_streams and not os.path.lexists(str(location / _LIST_NAME)):
            raise RestoreError("backup %s has no %s, where its manifest says its files are listed" % (
                location, _LIST_NAME), code="recovery_manifest_invalid", path=location / _LIST_NAME)
        self.backup_ref = self.manifest.get("backup_ref") or location.name

    def _list_opener(self) -> Callable[[], Any]:
        return functools.partial(open_regular, self.location / _LIST_NAME, follow_symlinks=False)

    def list_fault(self) -> Optional[str]:
        """Why the list does not match what the manifest records for it (hashed whole, in place), or None."""
        if not self.list_streams:
            return None
        expected = self.manifest["file_list"]
        try:
            if sha256_file(self.location / _LIST_NAME) == (expected["size"], expected["sha256"]):
                return None
        except OSError as exc:
            return "%s cannot be read: %s" % (_LIST_NAME, exc.strerror or exc)
        return "%s does not match the sha256 its manifest records" % _LIST_NAME

    def members(self) -> Iterator[_Member]:
        root = self.location / "workspace"
        yield _Member("workspace", "dir", 0, stat.S_IMODE(root.stat().st_mode), root.stat().st_mtime_ns)
        for rel, entry_stat, kind in _walk_tree(root):
            on_disk = os.path.join(str(root), rel)
            yield _Member("workspace/" + rel, kind, entry_stat.st_size, entry_stat.st_mode,
                          entry_stat.st_mtime_ns, functools.partial(open_regular, on_disk, follow_symlinks=False),
                          on_disk)

    def manifest_problems(self) -> List[Problem]:
        sidecar = self.location / _MANIFEST_DIGEST_NAME
        digest = None
        if os.path.lexists(str(sidecar)):
            digest = self.read_member(_MANIFEST_DIGEST_NAME, 4096) or b""  # unreadable: it cannot match
        return _manifest_digest_problems(self.manifest_bytes, digest, required=self.made_by == TOOL_NAME)

    def read_member(self, path: str, limit: int = _JSON_FILE_LIMIT) -> Optional[bytes]:
        try:
            return read_regular(self.location / path, limit, follow_symlinks=False)
        except (OSError, InputRefusedError):
            return None


# Archive read errors that mean "damaged", as opposed to our own I/O failing.
_ARCHIVE_DAMAGE: Tuple[Type[BaseException], ...] = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) + (
    (gzip.BadGzipFile,) if hasattr(gzip, "BadGzipFile") else ())


def _unsafe_member(location: Any, name: Any, why: str) -> RestoreError:
    return RestoreError("archive %s: member %s refused: %s; nothing was written" % (location, _shown(name), why),
                        code="archive_unsafe", path=location)


def _member_mtime_ns(seconds: Any) -> Optional[int]:
    """An archive header's mtime in nanoseconds, or None when it is not a time (NaN, 1e30)."""
    try:
        mtime_ns = int(seconds * 1e9)
    except (TypeError, ValueError, OverflowError):
        return None
    return mtime_ns if _INT63_MIN <= mtime_ns <= _INT63_MAX else None


# Extended headers (pax, GNU long names) hold a path or a few attributes; tarfile reads one into memory whole.
_TAR_EXTENDED_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                       tarfile.GNUTYPE_LONGLINK)
_TAR_EXTENDED_LIMIT = 1 << 20


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose extended header, if any, is refused (as damage) beyond 1 MiB instead of read whole."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _TAR_EXTENDED_TYPES and self.size > _TAR_EXTENDED_LIMIT:
            raise tarfile.HeaderError("extended header of %d bytes (at most %d are read)"
                                      % (self.size, _TAR_EXTENDED_LIMIT))
        return super()._proc_member(archive)  # type: ignore[misc]


def _checked_member_name(location: Any, name: str) -> str:
    """A member name that stays inside the workspace tree, or refusal (absolute, ``..``, odd bytes)."""
    if name != "workspace" and not name.startswith("workspace/"):
        raise _unsafe_member(location, name, "outside workspace/")
    try:
        safe_join("/", name)
    except OpsError:
        raise _unsafe_member(location, name, "absolute, '..' or empty path component")
    return name


def _walk_key(name: str, kind: str) -> str:
    """Where a member sorts in walk order: a directory as ``name/``, where what it holds sorts."""
    return name + "/" if kind == "dir" else name


class _Window:
    """``size`` bytes of a stream from where it stands: what a reader of one archive member may see."""

    def __init__(self, handle: Any, size: int) -> None:
        self.handle = handle
        self.left = size

    def readline(self, limit: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        line: bytes = self.handle.readline(self.left if limit < 0 else min(limit, self.left))
        self.left -= len(line)
        return line

    def __enter__(self) -> "_Window":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.handle.close()


class _TarBackup(_BackupSource):
    """A one-file backup (tar, or tar.gz), read as a stream: manifest.json first, then members in order.

    In a v2 archive SHA256SUMS comes second, then the members in its order
    (which is enforced: a member out of order is refused).  From a file the
    list is read again through a second handle; from stdin, which is read
    exactly once, it is spooled to a temporary file.
    """

    kind = "archive"

    def __init__(self, location: Optional[Path], stream: Any = None) -> None:
        self.location = location
        self.stream = stream
        self.shown = str(location) if location is not None else "stdin"
        self.list_offset = 0
        self.spool: Optional[Any] = None
        self._ready: Optional[tarfile.TarFile] = None
        self._ready, self.manifest = self._open()
        self.backup_ref = self.manifest.get("backup_ref") or (location.name if location else "stdin")

    def _open(self) -> Tuple[tarfile.TarFile, Dict[str, Any]]:
        stream = self.stream
        if self.location is not None:
            stream = open_regular(self.location)
        head = stream.peek(512)[:512] if hasattr(stream, "peek") else b""
        looks_like_archive = head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar"
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_BoundedTarInfo)
            first = tar.next()
        except _ARCHIVE_DAMAGE as exc:
            if looks_like_archive:
                raise ArchiveDamagedError("archive %s is damaged before its first member (%s)" % (self.shown, exc),
                                          path=self.location)
            raise RestoreError("%s is not a backup directory or archive (%s)" % (self.shown, exc),
                               code="recovery_backup_invalid", path=self.location)
        if first is None or first.name != _MANIFEST_NAME or not first.isreg():
            raise RestoreError("archive %s does not begin with manifest.json (not a contexta-ops backup)"
                               % self.shown, code="recovery_manifest_missing", path=self.location)
        if first.size > _MANIFEST_LIMIT:
            raise _manifest_error(self.shown, "is larger than %d bytes" % _MANIFEST_LIMIT)
        try:
            raw = tar.extractfile(first).read()  # type: ignore[union-attr]
            _refuse_oversized_manifest(raw, self.shown)
            manifest = json_loads(raw)
        except _ARCHIVE_DAMAGE + (ValueError,) as exc:
            raise ArchiveDamagedError("archive %s: member manifest.json is damaged (%s)" % (self.shown, exc),
                                      path=self.location)
        self.manifest_bytes = raw
        self.manifest_digest: Optional[bytes] = None
        manifest = _validate_manifest(manifest, self.shown)
        if "file_list" in manifest:
            self._find_list(tar, manifest["file_list"]["size"])
        elif "files" not in manifest:  # every archive we write lists them; without them no size is bounded
            raise _manifest_error(self.shown, "lists no files, which an archive backup must")
        return tar, manifest

    def _find_list(self, tar: tarfile.TarFile, size: int) -> None:
        """SHA256SUMS, right after the manifest: its place noted (a file) or its bytes spooled (stdin)."""
        try:
            info = tar.next()
            if info is None or info.name != _LIST_NAME or not info.isreg() or info.size != size:
                raise tarfile.TarError("%s does not follow manifest.json with the %d bytes the manifest records"
                                       % (_LIST_NAME, size))
            self.list_offset = info.offset_data
            if self.location is None and self.spool is None:
                self.spool = tempfile.TemporaryFile()
                member = tar.extractfile(info)
                assert member is not None
                shutil.copyfileobj(member, self.spool, _CHUNK)
        except _ARCHIVE_DAMAGE as exc:
            raise ArchiveDamagedError("archive %s: %s" % (self.shown, exc), path=self.location)

    def _list_opener(self) -> Callable[[], Any]:
        return self._open_list

    def _open_list(self) -> Any:
        size = self.manifest["file_list"]["size"]
        if self.spool is not None:
            self.spool.seek(0)
            return _Window(_Unclosed(self.spool), size)
        assert self.location is not None
        handle = open_regular(self.location)
        if handle.peek(2)[:2] == b"\x1f\x8b":
            handle = gzip.GzipFile(fileobj=handle, mode="rb")  # the list is near the start: little to inflate
        handle.seek(self.list_offset)
        return _Window(handle, size)

    def members(self) -> Iterator[_Member]:
        if self._ready is not None:
            tar, self._ready = self._ready, None
        elif self.location is not None:
            tar = self._open()[0]
        else:
            raise RestoreError("a backup read from stdin can be read only once", code="archive_stream_consumed")
        ordered = self.list_streams
        seen: Set[str] = set()
        last_key = ""
        with contextlib.closing(tar):
            while True:
                info = tar.next()
                if info is None:
                    return
                if info.name == _MANIFEST_DIGEST_NAME and info.isreg() and info.size < 4096:
                    self.manifest_digest = tar.extractfile(info).read()  # type: ignore[union-attr]
                    continue
                name = _checked_member_name(self.shown, info.name)
                if info.isdir():
                    kind = "dir"
                elif info.isreg():
                    kind = "file"
                else:
                    raise _unsafe_member(self.shown, name, "links, devices and fifos are never restored")
                if ordered:  # v2: in the list's order, so duplicates are found without holding every name
                    key = _walk_key(name, kind)
                    if key <= last_key:
                        raise _unsafe_member(self.shown, name, "it appears twice" if key == last_key else
                                             "it is out of order (a v2 archive holds its members in path order)")
                    last_key = key
                elif name in seen:
                    raise _unsafe_member(self.shown, name, "it appears twice")
                else:
                    seen.add(name)
                mtime_ns = _member_mtime_ns(info.mtime)
                if mtime_ns is None:
                    raise _unsafe_member(self.shown, name, "its mtime %s is not a time from 1677 to 2262"
                                         % _shown(info.mtime))
                yield _Member(name, kind, info.size, info.mode, mtime_ns, functools.partial(tar.extractfile, info))

    def prescan(self) -> List[Problem]:
        """Every member's name, type and size against the manifest, before anything is written."""
        if self.location is None:
            return []  # a stream is checked member by member as it is written into staging
        problems: List[Problem] = []
        by_path = {entry["path"]: entry for entry in self.manifest.get("files", ())}
        left = self.budget
        last = "the archive's start"
        try:
            for member in self.members():
                last = member.path
                if member.kind != "file":
                    continue
                entry = by_path.get(member.path)
                if entry is not None and entry["size"] != member.size:
                    problems.append(Problem("size_mismatch", member.path, "archive says %d bytes, manifest says %d"
                                            % (member.size, entry["size"]), expected=entry["size"],
                                            actual=member.size))
                if left is not None:
                    if member.size > left:
                        problems.append(_over_budget(member, left))
                    left -= member.size
        except _ARCHIVE_DAMAGE as exc:
            problems.append(Problem("archive_corrupt", last, "archive is damaged at or after this member: %s"
                                    % (exc or type(exc).__name__)))
        return problems

    def manifest_problems(self) -> List[Problem]:
        """After a full pass: the manifest against the digest member that ends every archive we write."""
        return _manifest_digest_problems(self.manifest_bytes, self.manifest_digest,
                                         required=self.made_by == TOOL_NAME)


class _Unclosed:
    """A file that a ``with`` block may read but must not close (a spool read more than once)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def readline(self, limit: int = -1) -> bytes:
        line: bytes = self.handle.readline(limit)
        return line

    def close(self) -> None:
        pass


def _over_budget(member: _Member, left: int) -> Problem:
    return Problem("size_mismatch", member.path, "%d bytes, more than the %d the manifest's total_bytes leaves "
                   "for it; not read" % (member.size, max(left, 0)), expected=max(left, 0), actual=member.size)


class _ZipBackup(_BackupSource):
    """Contexta's CLI zip backup: the whole workspace under one top folder, no manifest, no checksums.

    Its members are read in walk order (a zip reads in any order), so every
    reader sees every kind of backup in the same order.
    """

    kind = "zip"
    location: Path

    @property
    def made_by(self) -> str:
        return "contexta-cli-zip"

    @property
    def has_checksums(self) -> bool:
        return False

    def __init__(self, location: Path) -> None:
        self.location = location
        self.shown = str(location)
        try:
            self.zip = zipfile.ZipFile(open_regular(location))
            infos = self.zip.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise RestoreError("%s is not a backup directory or archive (%s)" % (location, exc),
                               code="recovery_backup_invalid", path=location)
        self.entries: List[Tuple[str, str, zipfile.ZipInfo]] = []
        tops: Set[str] = set()
        seen: Set[str] = set()
        for info in infos:
            name = info.filename.rstrip("/")
            if not name or name.startswith("/") or "\\" in name or "\x00" in name or any(
                    part in ("", ".", "..") for part in name.split("/")):
                raise _unsafe_member(location, info.filename, "absolute, '..' or empty path component")
            if name in seen:
                raise _unsafe_member(location, name, "it appears twice")
            seen.add(name)
            mode = info.external_attr >> 16
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise _unsafe_member(location, name, "links, devices and fifos are never restored")
            _refuse_unreadable_zip_member(location, info)
            tops.add(name.split("/", 1)[0])
            kind = "dir" if info.filename.endswith("/") or stat.S_ISDIR(mode) else "file"
            self.entries.append((name, kind, info))
        if len(tops) != 1:
            raise RestoreError("zip %s must hold exactly one top folder (the workspace), not %d"
                               % (location, len(tops)), code="recovery_backup_invalid", path=location)
        self.entries.sort(key=lambda entry: _walk_key(entry[0], entry[1]))
        self.top = tops.pop()
        sections = sorted({name.split("/")[1] for name, _kind, _info in self.entries if "/" in name})
        self.manifest = {"backup_ref": location.stem, "included_sections": sections, "format": "contexta-cli-zip",
                         "workspace_root": self.top}
        self.backup_ref = location.stem

    @property
    def declared_bytes(self) -> Optional[int]:
        """What the zip's central directory says its members inflate to (zipfile stops each one there)."""
        return sum(info.file_size for _name, kind, info in self.entries if kind == "file")

    def members(self) -> Iterator[_Member]:
        yield _Member("workspace", "dir", 0, 0o755, int(self.location.stat().st_mtime_ns))
        for name, kind, info in self.entries:
            if name == self.top:
                continue
            mode = (info.external_attr >> 16) or (0o755 if kind == "dir" else 0o644)
            mtime = int(time.mktime(info.date_time + (0, 0, -1)) * 1e9)
            yield _Member("workspace/" + name[len(self.top) + 1:], kind, info.file_size, mode, mtime,
                          functools.partial(self.zip.open, info))


def _refuse_unreadable_zip_member(location: Path, info: zipfile.ZipInfo) -> None:
    """Encrypted members and compression methods contexta never writes are refused by name, up front."""
    why = None
    if info.flag_bits & 0x1:
        why = "is encrypted"
    elif info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        why = "is compressed with method %d" % info.compress_type
    if why:
        raise RestoreError("zip %s: member %s %s; contexta-ops reads stored and deflated, unencrypted zips "
                           "(what contexta writes); nothing was written" % (location, _shown(info.filename), why),
                           code="archive_unsupported", path=location)


_STDIN_BACKUP: List[_TarBackup] = []


def _open_source(location: Any) -> Any:
    """A backup directory, tar archive, Contexta CLI zip, or ``-`` (a tar on stdin, opened once)."""
    if str(location) == ARCHIVE_STDOUT:
        if not _STDIN_BACKUP:
            _STDIN_BACKUP.append(_TarBackup(None, sys.stdin.buffer))
        return _STDIN_BACKUP[0]
    location = Path(location)
    if location.is_dir():
        return _DirectoryBackup(location)
    with open_regular(location) as handle:
        magic = handle.read(4)
    if magic[:2] == b"PK":
        return _ZipBackup(location)
    return _TarBackup(location)


def _source_lock(backup: Any) -> Any:
    """A shared lock on the backup being read, so prune never deletes it underneath us."""
    if backup.location is None:
        return contextlib.ExitStack()
    return _Lock(backup.location, what="backup %s" % backup.location, exclusive=False,
                 directory=backup.kind == "directory")


def _looks_like_path(backup: str) -> bool:
    return "/" in backup or os.sep in backup or backup.startswith(".") or backup.startswith("~")


def _locate_backup(config: UnifiedConfig, backup: Optional[str]) -> Path:
    """A backup by ref, ``latest``, label, unique prefix, or path; None means ``latest``.

    ``latest`` is the newest complete backup that is not a safety backup: right
    after a restore, the newest backup of all is the broken workspace's.
    """
    backup_root = config.recovery.backup_root
    if backup is None or backup == "latest":
        candidates = [entry for entry in list_backups(config) if entry.complete and entry.kind != "safety"]
        if not candidates:
            raise RestoreError("no complete backup under %s (safety backups are only chosen by name)" % backup_root,
                               code="recovery_backup_not_found", path=backup_root)
        return Path(candidates[-1].location)
    if not isinstance(backup, str) or not backup or "\x00" in backup:
        raise RestoreError("invalid backup reference %r" % (backup,), code="recovery_invalid_backup_ref")
    if backup == ARCHIVE_STDOUT:
        return Path(ARCHIVE_STDOUT)
    if _looks_like_path(backup):
        location = _resolve_path(backup)
    else:
        location = backup_root / backup
        if not os.path.lexists(str(location)):
            location = _resolve_path(backup) if os.path.exists(backup) else _match_backup(config, backup)
    if not location.exists():
        raise RestoreError("backup %s not found%s" % (
            backup, "" if _looks_like_path(backup) else " under %s" % backup_root),
            code="recovery_backup_not_found", path=location)
    if not (location.is_dir() or location.is_file()):
        raise RestoreError("backup %s is not a backup directory or archive" % location,
                           code="recovery_backup_invalid", path=location)
    return location


def _match_backup(config: UnifiedConfig, name: str) -> Path:
    """The newest complete backup labelled ``name``, else the one whose ref starts with ``name``."""
    complete = [entry for entry in list_backups(config) if entry.complete]
    labelled = [entry for entry in complete if entry.label == name]
    if labelled:
        return Path(labelled[-1].location)
    prefixed = [entry for entry in complete if entry.location.name.startswith(name)]
    if len(prefixed) > 1:
        raise RestoreError("%r matches %d backups (%s%s); give more of the ref" % (
            name, len(prefixed), ", ".join(entry.location.name for entry in prefixed[-5:]),
            ", ..." if len(prefixed) > 5 else ""), code="recovery_backup_ambiguous", path=config.recovery.backup_root)
    return Path(prefixed[0].location) if prefixed else config.recovery.backup_root / name


def _open_backup(config: UnifiedConfig, backup: Optional[str]) -> Any:
    return _open_source(_locate_backup(config, backup))


@dataclasses.dataclass(frozen=True)
class BackupListEntry(_Record):
    """One row of ``backup list``."""

    backup_ref: str
    location: Path
    created_at: Optional[str]
    complete: bool
    in_progress: bool
    size_bytes: int
    file_count: int
    included_sections: Tuple[str, ...]
    has_checksums: bool
    made_by: Optional[str]
    problem: Optional[str] = None
    kind: Optional[str] = None
    label: Optional[str] = None
    last_verified_clean_at: Optional[str] = None
    last_restored_at: Optional[str] = None


def _ref_timestamp(name: str) -> str:
    match = _BACKUP_REF_PATTERN.match(name)
    return match.group("ts") if match else ""


def _ref_label(name: str) -> str:
    match = _BACKUP_REF_PATTERN.match(name)
    return match.group("label") if match else name


def _backup_kind(backup: _BackupSource) -> str:
    """The kind a backup's manifest records; for older and foreign backups, what its name and maker say."""
    kind = backup.manifest.get("kind")
    if isinstance(kind, str) and kind in BACKUP_KINDS:
        return kind
    if _ref_label(backup.backup_ref) == _SAFETY_LABEL:
        return "safety"  # Contexta labels its own safety backups the same way
    return "manual" if backup.made_by == TOOL_NAME else "imported"


# Beside the backups, never inside one (a backup's bytes never change): when each last verified clean and
# was last restored from.  prune keeps both; `backup list` shows them.
_HISTORY_NAME = ".contexta-ops-history.jsonl"
_HISTORY_EVENTS = ("verified_clean", "restored_from")


def _record_backup_event(config: UnifiedConfig, backup: _BackupSource, event: str) -> bool:
    """Append one event for a backup of the backup root to the history there; False when it is not recorded.

    A backup elsewhere (an archive on a stick, another host's directory) has no
    history: nothing is written beside it.
    """
    location = backup.location
    if location is None or location.parent != config.recovery.backup_root:
        return False
    line = _json_line({"event": event, "backup_ref": backup.backup_ref, "location": str(location),
                       "at": _utc_timestamp()})
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(str(location.parent / _HISTORY_NAME), flags, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


def _backup_history(backup_root: Path) -> Dict[str, Dict[str, str]]:
    """location -> {event: newest time}, read leniently (a torn or foreign line is skipped)."""
    history: Dict[str, Dict[str, str]] = {}
    try:
        handle = open_regular(backup_root / _HISTORY_NAME, follow_symlinks=False)
    except OSError:
        return history
    with handle:
        for raw in handle:
            try:
                event = json_loads(raw, max_bytes=1 << 16)
            except ValueError:
                continue
            if not (isinstance(event, dict) and event.get("event") in _HISTORY_EVENTS
                    and isinstance(event.get("location"), str) and isinstance(event.get("at"), str)):
                continue
            slot = history.setdefault(event["location"], {})
            if event["at"] > slot.get(event["event"], ""):
                slot[event["event"]] = event["at"]
    return history


def list_backups(config: UnifiedConfig) -> List[BackupListEntry]:
    """Every backup and leftover under the backup root, oldest first (complete or not)."""
    backup_root = config.recovery.backup_root
    entries: List[BackupListEntry] = []
    if not backup_root.is_dir():
        return entries
    history = _backup_history(backup_root)
    for name in os.listdir(str(backup_root)):
        location = backup_root / name
        if not location.is_dir() or location.is_symlink():
            continue
        if name.startswith("."):
            if name.endswith(_PARTIAL_SUFFIX):
                count, size = _tree_size(location)
                entries.append(BackupListEntry(name[1:-len(_PARTIAL_SUFFIX)], location, None, False,
                                               _lock_is_held(location, directory=True), size, count, (), False,
                                               None, "partial backup (interrupted or still being written)"))
            continue
        try:
            backup = _DirectoryBackup(location)
        except RestoreError as exc:
            count, size = _tree_size(location)
            entries.append(BackupListEntry(name, location, None, False, False, size, count, (), False, None,
                                           str(exc)))
            continue
        manifest = backup.manifest
        if "total_bytes" in manifest and "file_count" in manifest:
            count, size = manifest["file_count"], manifest["total_bytes"]
        else:
            count, size = _tree_size(location / "workspace")
        events = history.get(str(location), {})
        label = manifest.get("label")
        entries.append(BackupListEntry(
            backup.backup_ref, location, manifest.get("created_at"), True, False, size, count,
            tuple(manifest.get("included_sections", [])), backup.has_checksums, backup.made_by,
            kind=_backup_kind(backup), label=label if isinstance(label, str) else _ref_label(name),
            last_verified_clean_at=events.get("verified_clean"), last_restored_at=events.get("restored_from")))
    entries.sort(key=lambda entry: (entry.created_at or "", _ref_timestamp(entry.location.name), entry.location.name))
    return entries


@dataclasses.dataclass(frozen=True)
class BackupVerifyResult(_Record):
    """``backup verify``: every file re-hashed against the manifest."""

    status: str
    backup_ref: str
    location: Path
    checked_files: int = 0
    checked_bytes: int = 0
    missing: Tuple[str, ...] = ()
    extra: Tuple[str, ...] = ()
    changed: Tuple[str, ...] = ()
    problems: Tuple[Problem, ...] = ()
    warnings: Tuple[Notice, ...] = ()


def _declared_size(member: _Member, listed: Optional[_Listed]) -> int:
    """The most bytes a member may hold: the size its list records (v1), else its header's (or its stat's)."""
    return member.size if listed is None or listed.size is None else listed.size


class _BoundedReader:
    """A member's reader that stops one byte past its declared size, so a lying member is never read whole."""

    def __init__(self, handle: Any, declared: int) -> None:
        self.handle = handle
        self.left = declared + 1

    def readinto(self, buffer: Any) -> int:
        if self.left <= 0:
            return 0
        count = self.handle.readinto(memoryview(buffer)[:self.left]) or 0
        self.left -= count
        return count


def _compare_member(member: _Member, listed: Optional[_Listed], size: int, digest: str,
                    problems: List[Problem]) -> None:
    """A member's bytes, as read, against its header and its list."""
    declared = _declared_size(member, listed)
    if size > declared:
        problems.append(Problem("size_mismatch", member.path, "holds more than the %d bytes declared; "
                                "reading stopped there" % declared, expected=declared, actual=size))
        return
    if size != member.size:
        problems.append(Problem("size_mismatch", member.path, "%d bytes, the archive said %d"
                                % (size, member.size), expected=member.size, actual=size))
    if listed is None:
        return
    if listed.size is not None and size != listed.size:
        problems.append(Problem("checksum_mismatch", member.path, "size %d, manifest says %d"
                                % (size, listed.size), expected=listed.size, actual=size))
    elif digest != listed.sha256:
        problems.append(Problem("checksum_mismatch", member.path, "sha256 %s, the list says %s"
                                % (digest, listed.sha256), expected=listed.sha256, actual=digest))


def _admit_member(member: _Member, expected: Optional[_Expected], left: Optional[int],
                  problems: List[Problem]) -> Tuple[bool, Optional[_Listed]]:
    """Whether a member file is to be read, and its list entry: listed, within its size, within the budget."""
    listed = None
    if expected is not None:
        listed = expected.take(member.path)
        if expected.missing:
            problems += [Problem("missing_file", path, "file listed in the backup is missing")
                         for path in expected.missing]
            del expected.missing[:]
        if listed is None:
            problems.append(Problem("unexpected_file", member.path, "file is not in the backup's list of files"))
            return False, None
    if listed is not None and listed.size is not None and member.size > listed.size:
        problems.append(Problem("size_mismatch", member.path, "%d bytes, more than the %d the manifest says; not "
                                "read" % (member.size, listed.size), expected=listed.size, actual=member.size))
        return False, listed
    if left is not None and member.size > left:
        problems.append(_over_budget(member, left))
        return False, listed
    return True, listed


def _check_members(members: Iterable[_Member], expected: Optional[_Expected],
                   on_file: Callable[[_Member, Optional[_Listed]], Any], problems: List[Problem],
                   budget: Optional[int] = None) -> Tuple[int, int]:
    """Walk a backup's members once, hashing each file through ``on_file`` and comparing it to the list.

    ``on_file`` returns ``(size, sha256)`` or a future of it (copies running on
    worker threads); results are compared in member order.  Records missing,
    extra and changed files as problems; returns (files, bytes).  Nothing is
    read past what the list (v1), the header, or - for a v2 list, which records
    no sizes - the manifest's ``budget`` of total bytes allows.
    """
    counted = [0, 0]
    pending: Deque[Tuple[_Member, Optional[_Listed], Any]] = collections.deque()
    left = budget

    def settle(keep: int) -> None:
        while len(pending) > keep:
            member, listed, result = pending.popleft()
            size, digest = result.result() if hasattr(result, "result") else result
            counted[0] += 1
            counted[1] += size
            _compare_member(member, listed, size, digest, problems)

    last = "the archive's start"
    iterator = iter(members)
    try:
        while True:
            member = next(iterator, None)
            if member is None:
                break
            last = member.path
            if member.kind == "dir":
                continue
            if member.kind != "file":
                problems.append(Problem("unexpected_symlink" if member.kind == "symlink" else "unexpected_special",
                                        member.path, "a backup holds only files and directories; this is a %s"
                                        % member.kind))
                continue
            admitted, listed = _admit_member(member, expected, left, problems)
            if not admitted:
                continue
            if left is not None:
                left -= member.size
            pending.append((member, listed, on_file(member, listed)))
            settle(keep=512)
        settle(keep=0)
    except _ARCHIVE_DAMAGE as exc:
        problems.append(Problem("archive_corrupt", last, "archive is damaged at or after this member: %s"
                                % (exc or type(exc).__name__)))
        return counted[0], counted[1]  # nothing after the damage can be trusted or counted missing
    if expected is not None:
        problems += [Problem("missing_file", path, "file listed in the backup is missing") for path in expected.rest()]
        problems += expected.problems
    return counted[0], counted[1]


def _iter_listed_files(backup: Any) -> Iterator[Tuple[str, Optional[int], Optional[str]]]:
    """Every file a backup holds, as ``(member path, size, sha256)``, in plain string order of paths.

    For the comparison commands (backup diff, check --against): two backups,
    or a backup and a workspace walk, are compared by merging two such streams,
    in memory that does not grow with them.  ``backup`` is a location (as the
    commands take it: a backup directory, a tar or tar.gz, a Contexta CLI zip)
    or an opened source.  What each yields:

    - ours, v2 (directory or archive): the list's sha256; the size of the
      member (its stat, or its tar header: the archive is read through, its
      data skipped), None when the member is missing.
    - ours, v1: the manifest's recorded size and sha256 (sorted in memory,
      where a v1 manifest is anyway).
    - Contexta's directory backup (no checksums): each file's size, sha256 None.
    - Contexta's CLI zip: the central directory's size, and ``crc32:<8 hex>``
      instead of a sha256 (that is all a zip records; never compare it to one).

    The list is checked line by line as it streams (a bad line raises
    :class:`RestoreError`, exit 3); a list that does not match its manifest's
    digest shows up only once read to its end - run ``backup verify`` to prove
    a backup, this only reports what it lists.  A directory backup is held
    under a shared lock, so prune leaves it alone meanwhile.
    """
    source = backup if isinstance(backup, _BackupSource) else _open_source(backup)
    with _source_lock(source):
        if isinstance(source, _ZipBackup):
            for member in source.members():
                if member.kind == "file":
                    info = source.zip.getinfo(source.top + member.path[len("workspace"):])
                    yield member.path, member.size, "crc32:%08x" % info.CRC
        elif not source.has_checksums:
            for member in source.members():
                if member.kind == "file":
                    yield member.path, member.size, None
        elif not source.list_streams:
            for listed in source.listing():
                yield listed.path, listed.size, listed.sha256
        else:
            files = (member for member in source.members() if member.kind == "file")
            current: Optional[_Member] = next(files, None)
            for listed in source.listing():
                while current is not None and current.path < listed.path:
                    current = next(files, None)
                size = current.size if current is not None and current.path == listed.path else None
                yield listed.path, size, listed.sha256


def verify_backup(config: UnifiedConfig, backup: Optional[str]) -> BackupVerifyResult:
    """Re-hash every file of a backup against its list: missing, extra, changed.  Changes nothing."""
    source = _open_backup(config, backup)
    progress = _Progress("verify %s" % source.backup_ref, int(source.manifest.get("total_bytes") or 0))
    problems: List[Problem] = _own_format_problems(source)
    warnings: List[Notice] = []
    if not source.has_checksums and not problems:
        warnings.append(Notice("checksums_absent", "this backup was made by %s and records no checksums; "
                               "`restore --verify-only` checks it by planes instead" % source.made_by))

    def hash_member(member: _Member, listed: Optional[_Listed]) -> Tuple[int, str]:
        with member.open() as handle:
            size, digest = _hash_stream(_BoundedReader(handle, _declared_size(member, listed)))
        progress.advance(size)
        return size, digest

    with _source_lock(source):
        files, total = _check_members(source.members(), source.expected(), hash_member, problems, source.budget)
        if not any(problem.code == "archive_corrupt" for problem in problems):
            problems += source.manifest_problems()
    progress.finish()
    status = "FAILURE" if problems else ("SUCCESS" if source.has_checksums else "DEGRADED")
    return BackupVerifyResult(
        status=status, backup_ref=source.backup_ref, location=source.location, checked_files=files,
        checked_bytes=total,
        missing=tuple(p.path for p in problems if p.code == "missing_file"),
        extra=tuple(p.path for p in problems if p.code.startswith("unexpected_")),
        changed=tuple(p.path for p in problems if p.code in ("checksum_mismatch", "size_mismatch")),
        problems=tuple(problems), warnings=tuple(warnings))



# -- retention --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PruneResult(_Record):
    """``backup prune``: what was (or, with ``dry_run``, would be) removed, kept, and skipped as in use."""

    status: str
    dry_run: bool
    removed: Tuple[str, ...] = ()
    kept: Tuple[str, ...] = ()
    in_use: Tuple[str, ...] = ()
    notes: Tuple[str, ...] = ()


_DELETING_MARK = ".deleting-"


def prune_backups(config: UnifiedConfig, keep_last: Optional[int] = None, keep_within: Optional[float] = None,
                  dry_run: bool = False) -> PruneResult:
    """Delete old backups and incomplete leftovers under the backup root.

    Keeps the newest ``keep_last`` complete backups that are not safety
    backups, every one younger than ``keep_within`` days, and always: the
    newest such backup, the one most recently restored from, and the newest one
    that verified clean.  Safety backups retire only by age.  Only backups and
    our own interrupted ``.partial`` copies are touched; anything else under the
    backup root stays.  A backup a restore or verification is reading (it
    holds a shared lock) is skipped.
    A backup is renamed out of sight before it is deleted, so a half-deleted
    one never lists as complete.  Hard links shared with other backups (from
    incremental backups) stay valid: deleting a link never touches the data.
    """
    if keep_last is None and keep_within is None:
        raise UsageError("prune needs --keep-last N and/or --keep-within DAYS")
    if (keep_last is not None and keep_last < 1) or (keep_within is not None and keep_within < 0):
        raise UsageError("--keep-last must be 1 or more and --keep-within 0 or more")
    backup_root = config.recovery.backup_root
    entries = list_backups(config)
    complete = [entry for entry in entries if entry.complete]
    regular = [entry for entry in complete if entry.kind != "safety"]
    keep: Set[str] = set()
    if regular:
        keep.add(str(regular[-1].location))
    if keep_last is not None:
        keep |= {str(entry.location) for entry in regular[-keep_last:]}
    if keep_within is not None:
        cutoff = datetime.now(timezone.utc).timestamp() - keep_within * 86400
        for entry in complete:
            created = _parse_timestamp(entry.created_at or "")
            if created is None or created.timestamp() >= cutoff:
                keep.add(str(entry.location))
    restored = [entry for entry in complete if entry.last_restored_at]
    if restored:  # the state an operator last chose to go back to
        keep.add(str(max(restored, key=lambda entry: entry.last_restored_at or "").location))
    verified = [entry for entry in complete if entry.last_verified_clean_at]
    if verified:
        keep.add(str(verified[-1].location))
    # Safety backups are not counted by --keep-last; only their age (--keep-within) retires them.
    doomed = [entry for entry in complete if str(entry.location) not in keep
              and (entry.kind != "safety" or keep_within is not None)]
    doomed += [entry for entry in entries if not entry.complete and not entry.in_progress
               and entry.location.name.startswith(".") and entry.location.name.endswith(_PARTIAL_SUFFIX)]
    removed: List[str] = []
    in_use: List[str] = []
    notes: List[str] = []
    if dry_run:
        removed = [entry.location.name for entry in doomed]
    elif backup_root.is_dir():
        with _Lock(backup_root / ".prune.lock", what="backup root %s (another prune)" % backup_root):
            for leftover in sorted(backup_root.glob(".*" + _DELETING_MARK + "*")):
                _remove_tree(leftover)
                notes.append("finished_interrupted_delete:%s" % leftover.name)
            for entry in doomed:
                if _delete_backup(entry.location):
                    removed.append(entry.location.name)
                else:
                    in_use.append(entry.location.name)
    return PruneResult(status="SUCCESS", dry_run=dry_run, removed=tuple(removed),
                       kept=tuple(entry.location.name for entry in complete if str(entry.location) in keep),
                       in_use=tuple(in_use), notes=tuple(notes))


def _delete_backup(location: Path) -> bool:
    """Rename a backup out of sight under its exclusive lock, then delete it; False when it is in use."""
    try:
        with _Lock(location, what="backup %s" % location, directory=True):
            doomed = location.parent / (".%s%s%s" % (location.name, _DELETING_MARK, uuid.uuid4().hex[:8]))
            os.rename(str(location), str(doomed))
            _fsync_dir(location.parent)
            _crash_point("prune:renamed")
    except LockedError:
        return False
    _remove_tree(doomed)
    _crash_point("prune:deleted")
    return True



# ---------------------------------------------------------------------------
# Restore
# ---------------------------------------------------------------------------
#
# Verify-only reads the backup where it lies and writes nothing (below, "in
# place"); --materialize copies it into a staging directory outside the
# target first.  Apply builds the new workspace beside the target (same
# filesystem), hashing every byte against the backup's list as it is written
# and checking each plane there (records, artifacts, metadata, capture),
# hard-links in what the backup does not hold (exports/, reports/, the rest
# of cache/), writes a journal, and swaps the two directories - atomically
# with renameat2(RENAME_EXCHANGE) where the kernel has it, else with two
# renames.  A kill -9 at any moment leaves the complete old or the complete
# restored workspace, and the next run finishes or rolls back from the journal.

_PLANES = ("artifacts", "metadata", "records")


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where each part of a backup goes in a workspace, and which paths a restore replaces."""

    recovery_dest: Optional[str]          # Contexta's `recovery` section -> this workspace path
    replaced: Tuple[str, ...]             # workspace-relative paths the restore replaces whole
    metadata_db: str
    records_root: str
    artifacts_root: str
    outbox_root: str
    notes: Tuple[str, ...] = ()
    reports_root: str = "reports"
    part_roots: Tuple[Tuple[str, str], ...] = ()  # (workspace-relative path in the backup, registry part)
    selection: Optional["_Selection"] = None      # a partial restore: only these parts and paths

    def workspace_path(self, member_path: str, is_dir: bool = False) -> Optional[str]:
        """The workspace-relative path of a backup member, or None when it is not restored."""
        if member_path == "workspace":
            return ""
        rest = member_path[len("workspace/"):]
        if rest == "config" or rest.startswith("config/"):
            return None  # resolved.config.json documents the backup; nothing reads it back
        if rest == "recovery" or rest.startswith("recovery/"):
            if self.recovery_dest is None:
                return None
            rest = (self.recovery_dest + rest[len("recovery"):]).strip("/")
        if self.selection is not None and not self.selection.takes(rest, is_dir):
            return None
        return rest

    def selected(self, selection: "_Selection") -> "_Layout":
        """This layout, restoring only what ``selection`` names (and replacing only that)."""
        roots = [rel for rel, part in self.part_roots if selection.parts is None or part in selection.parts]
        replaced = []
        for root in roots:
            for path in self.replaced:
                if _is_within("/" + root, "/" + path):
                    replaced.append(root)  # e.g. only capture, of a cache the backup holds whole
                elif _is_within("/" + path, "/" + root):
                    replaced.append(path)
        return dataclasses.replace(self, replaced=_outermost(replaced),
                                   selection=dataclasses.replace(selection, roots=tuple(roots)))


    def member_path(self, workspace_path: str) -> str:
        """The backup member a workspace-relative path came from (to name problems by)."""
        dest = self.recovery_dest
        if dest is not None and (workspace_path == dest or workspace_path.startswith(dest + "/")):
            return "workspace/recovery" + workspace_path[len(dest):]
        return "workspace/" + workspace_path


@dataclasses.dataclass(frozen=True)
class _Selection:
    """A partial restore: registry parts (--only) and path patterns (--path) of a default-shaped workspace."""

    parts: Optional[FrozenSet[str]] = None
    patterns: Tuple[str, ...] = ()
    roots: Tuple[str, ...] = ()  # the chosen parts' places in the backup, filled by _Layout.selected

    @classmethod
    def of(cls, only: Sequence[str] = (), paths: Sequence[str] = ()) -> Optional["_Selection"]:
        """The selection --only and --path name, or None for a whole restore."""
        if not only and not paths:
            return None
        unknown = sorted(set(only) - set(RESTORE_PARTS))
        if unknown:
            raise UsageError("--only takes %s, not %s" % (", ".join(RESTORE_PARTS), ", ".join(unknown)))
        parts = None
        if only:
            parts = frozenset(only) | (frozenset(("ledger", "ledger_wal")) if "metadata" in only else frozenset())
        return cls(parts, tuple(paths))

    def matches(self, rel: Optional[str]) -> bool:
        """A file at this workspace-relative path of the backup's shape is selected."""
        if rel is None:
            return False
        if self.parts is not None and not any(_is_within("/" + rel, "/" + root) for root in self.roots):
            return False
        return not self.patterns or any(fnmatch.fnmatchcase(rel, pattern) for pattern in self.patterns)

    def takes(self, rel: str, is_dir: bool) -> bool:
        if not is_dir:
            return self.matches(rel)
        if self.patterns:
            return False  # directories are made as the parents of what is placed
        return any(_is_within("/" + rel, "/" + root) or root.startswith(rel + "/") for root in self.roots)


# What --only can name: the parts a workspace's data lives in.
RESTORE_PARTS = ("metadata", "records", "artifacts", "outbox", "capture")

# Where each registry part sits in a default-shaped workspace tree, which is how Contexta's CLI zip holds it.
_DEFAULT_PART_ROOTS = tuple((part.default_path, part.name) for part in _SECTION_PARTS) + (("reports", "reports"),)


def _layout_for(backup: _BackupSource, member_dirs: Sequence[str]) -> _Layout:
    """How a backup's ``workspace/`` tree maps onto a workspace: which paths hold which part."""
    manifest = backup.manifest
    if backup.kind == "zip":
        # Contexta's CLI zip is the whole workspace: restore what it holds, keep what it lacks.
        return _Layout(None, _outermost(name for name in manifest["included_sections"] if name != "config"),
                       "metadata/ledger.db", "records", "artifacts", "cache/outbox", ("zip_crc32_checked",),
                       part_roots=_DEFAULT_PART_ROOTS)
    if backup.made_by == TOOL_NAME and manifest.get("sections") is not None:
        paths: Dict[str, List[str]] = {}
        part_roots: List[Tuple[str, str]] = []
        for section in manifest["sections"]:
            rel = section["path"][len("workspace/"):]
            name = "outbox" if section["name"] == "recovery" else section["name"]  # before the registry
            if name == "metadata" and rel.endswith((".db", ".wal")):
                name = "ledger_wal" if rel.endswith(".wal") else "ledger"
            paths.setdefault(name, []).append(rel)
            part_roots.append((rel, name))
        metadata_dirs = paths.get("metadata", [])
        metadata_db = (paths.get("ledger") or [(metadata_dirs[0] if metadata_dirs else "metadata") + "/ledger.db"])[0]
        return _Layout(None, _outermost(rel for rel, _name in part_roots), metadata_db,
                       (paths.get("records") or ["records"])[0], (paths.get("artifacts") or ["artifacts"])[0],
                       (paths.get("outbox") or ["cache/outbox"])[0], part_roots=tuple(part_roots))
    # A backup made by Contexta: sections sit at fixed names; `recovery` is the parent of the outbox
    # (the whole cache, by default), which goes back where it came from, capture files and outbox included.
    live = _contexta_backup_config(backup)
    included = manifest.get("included_sections", [])
    notes: List[str] = []
    root = live.get("root_path")
    replaced: List[str] = [name for name in ("metadata", "records", "artifacts", "cache", "exports")
                           if name in included]
    outbox_root = live.get("outbox_root")
    recovery_rel = "cache"
    outbox_rel = "cache/outbox"
    if outbox_root and root:
        parent = os.path.dirname(os.path.normpath(outbox_root))
        if _is_within(parent, root) and os.path.normpath(parent) != os.path.normpath(root):
            recovery_rel = _relative_posix(parent, root)
        outbox_rel = recovery_rel + "/" + os.path.basename(os.path.normpath(outbox_root))
    recovery_dest: Optional[str] = recovery_rel
    if "recovery" in included:
        if "cache" in included and _is_within("/" + recovery_rel, "/cache"):
            recovery_dest = None
            notes.append("recovery_section_covered_by_cache")
        else:
            replaced += [recovery_rel + "/" + name for name in member_dirs]
            notes.append("recovery_section_restored_to:%s" % recovery_rel)
    roots = [("metadata", "metadata"), ("records", "records"), ("artifacts", "artifacts"), ("exports", "exports"),
             ("cache", "cache"), (outbox_rel, "outbox")]
    if recovery_dest is not None:
        roots += [(recovery_dest, "cache"), (recovery_dest + "/capture", "capture")]
    return _Layout(recovery_dest, _outermost(replaced), "metadata/ledger.db", "records", "artifacts", outbox_rel,
                   tuple(notes), part_roots=tuple(roots))


def _outermost(paths: Iterable[str]) -> Tuple[str, ...]:
    """Drop paths that lie inside another path of the set."""
    unique = sorted(set(paths))
    kept: List[str] = []
    for path in unique:
        if not any(path == outer or path.startswith(outer + "/") for outer in kept):
            kept.append(path)
    return tuple(kept)


def _contexta_backup_config(backup: _BackupSource) -> Dict[str, str]:
    """Workspace paths from a Contexta backup's resolved.config.json, when it is readable."""
    raw = backup.read_member("workspace/config/resolved.config.json")
    try:
        data = json_loads(raw) if raw else {}
    except ValueError:
        data = {}
    workspace = data.get("workspace") if isinstance(data, dict) else None
    recovery = data.get("recovery") if isinstance(data, dict) else None
    live: Dict[str, str] = {}
    if isinstance(workspace, dict):
        for key in ("root_path", "records_path", "artifacts_path"):
            if isinstance(workspace.get(key), str):
                live[key] = workspace[key]
    if isinstance(recovery, dict) and isinstance(recovery.get("outbox_root"), str):
        live["outbox_root"] = recovery["outbox_root"]
    return live


def _recovery_children(backup: Any) -> List[str]:
    if backup.kind != "directory":
        return []
    recovery = backup.location / "workspace" / "recovery"
    return sorted(os.listdir(str(recovery))) if recovery.is_dir() else []


@dataclasses.dataclass(frozen=True)
class RestorePlan(_Record):
    """What a restore will do (Contexta's fields first).  Planning changes nothing.

    ``destinations`` says where each part of the backup goes, by the target's
    configuration (a relocated store goes back where it is configured);
    ``refusals`` are why an apply would refuse, before it changes anything.
    """

    backup_ref: str
    source_root: Path
    target_workspace: Path
    staging_root: Path
    create_safety_backup: bool
    verify_only: bool = False
    notes: Tuple[str, ...] = ()
    made_by: str = TOOL_NAME
    has_checksums: bool = True
    replaced: Tuple[str, ...] = ()
    kept: Tuple[str, ...] = ()
    lost: Tuple[str, ...] = ()
    lost_count: int = 0
    replaced_file_count: int = 0
    backup_file_count: int = 0
    warnings: Tuple[Notice, ...] = ()
    destinations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    refusals: Tuple[Notice, ...] = ()
    kind: str = "manual"
    only: Tuple[str, ...] = ()   # a partial restore: these parts (--only) ...
    paths: Tuple[str, ...] = ()  # ... and the files matching these patterns (--path)
    materialize: bool = False  # verify-only: copy into staging first, as before (default: read in place)
    sample_percent: Optional[float] = None  # verify-only: read this share of the files that are not plane input


@dataclasses.dataclass(frozen=True)
class RestoreResult(RecoveryResult):
    """Contexta's RestoreResult fields, plus every problem found (each naming its file)."""

    backup_ref: str = ""
    target_workspace: Optional[Path] = None
    applied: bool = False
    plane_results: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    safety_backup_ref: Optional[str] = None
    verification_notes: Tuple[str, ...] = ()
    problems: Tuple[Problem, ...] = ()
    source_root: Optional[Path] = None
    post_apply_check: Optional[Mapping[str, Any]] = None


_LOST_LISTED = 200


# -- where a restore puts things --------------------------------------------------
#
# A backup's workspace/ tree is shaped like a default workspace.  A restore puts
# each part where the *target's* configuration keeps it: a store relocated by a
# CONTEXTA_* variable, a config file or a flag goes back to that place, which is
# where contexta itself will look.  Everything a restore replaces is a "unit":
# the workspace directory, and each relocated store outside it (a directory, or
# the ledger file).  Each unit gets a new copy built beside it; one journal then
# lists every swap, so a run killed between two swaps is finished by the next.

def _part_location(config: UnifiedConfig, part: str) -> Path:
    """Where a configuration keeps a registry part, the ledger file or its WAL."""
    if part == "ledger":
        return config.metadata.database_path
    if part == "ledger_wal":
        return Path(str(config.metadata.database_path) + ".wal")
    if part == "reports":
        return config.workspace.reports_path
    return _PARTS_BY_NAME[part].locate(config)


class _Routes:
    """Where each workspace-relative path of a backup lands, by the target's configuration."""

    def __init__(self, layout: _Layout, config: UnifiedConfig, target: Path) -> None:
        self.target = target
        roots = list(layout.part_roots)
        metadata_dirs = [rel for rel, part in roots if part == "metadata"]
        if metadata_dirs and not any(part == "ledger" for _rel, part in roots):
            roots += [(metadata_dirs[0] + "/ledger.db", "ledger"), (metadata_dirs[0] + "/ledger.db.wal", "ledger_wal")]
        self.rules = sorted(((rel, part, _part_location(config, part)) for rel, part in roots),
                            key=lambda rule: -len(rule[0]))

        self.texts = [(rel, rel + "/", str(location)) for rel, _part, location in self.rules]

    def destination(self, ws_rel: str) -> Path:
        return Path(self.destination_text(ws_rel))

    def destination_text(self, ws_rel: str) -> str:
        """:meth:`destination` as text, for the loops that route every file of a backup."""
        for rel, below, location in self.texts:
            if ws_rel == rel:
                return location
            if ws_rel.startswith(below):
                return _safe_join_text(location, ws_rel[len(below):])
        return _safe_join_text(str(self.target), ws_rel) if ws_rel else str(self.target)

    def source_of(self, path: Path) -> Optional[str]:
        """The inverse: the backup-shaped workspace-relative path that lands at ``path``, if any."""
        for rel, _part, location in sorted(self.rules, key=lambda rule: -len(str(rule[2]))):
            if _is_within(path, location):
                rest = _relative_posix(path, location)
                return rel if rest == "." else rel + "/" + rest
        return _relative_posix(path, self.target) if _is_within(path, self.target) else None

    def held(self, replaced: Sequence[str], paths: "_BackupPaths") -> Dict[str, Path]:
        """Each part the backup holds, and where it goes."""
        held: Dict[str, Path] = {}
        for rel, part, location in sorted(self.rules, key=lambda rule: rule[0]):
            inside = any(rel == outer or rel.startswith(outer + "/") for outer in replaced)
            if inside and rel in paths.held_rules:
                held.setdefault(part, location)
        return held


class _BackupPaths:
    """Every file a restore puts back, known in memory that grows by 8 bytes a file, not by its path.

    One pass over the backup's list (or, without one, its members) counts the
    files, notes which route rules hold any, and keeps a 64-bit hash of each
    destination, sorted in 256 buckets: enough to tell whether a file of the
    target is one the restore brings back (a false "yes" needs two of a
    million paths to share a 64-bit hash).
    """

    def __init__(self, backup: _BackupSource, layout: "_Layout", routes: _Routes) -> None:
        self.count = 0
        self.held_rules: Set[str] = set()
        rules = [(rel, rel + "/") for rel, _part, _location in routes.rules]
        buckets = [array.array("q") for _ in range(256)]
        for member_path in _backup_file_paths(backup):
            ws_rel = layout.workspace_path(member_path)
            if not ws_rel:
                continue
            self.count += 1
            for rel, below in rules:
                if rel not in self.held_rules and (ws_rel == rel or ws_rel.startswith(below)):
                    self.held_rules.add(rel)
            key = hash(routes.destination_text(ws_rel))
            buckets[key & 0xFF].append(key)
        self.buckets = [array.array("q", sorted(bucket)) for bucket in buckets]

    def __contains__(self, destination: object) -> bool:
        key = hash(destination)
        bucket = self.buckets[key & 0xFF]
        index = bisect.bisect_left(bucket, key)
        return index < len(bucket) and bucket[index] == key


def _backup_file_paths(backup: _BackupSource) -> Iterator[str]:
    """The member path of every file a backup holds: from its list, else (no checksums) from its members."""
    if backup.has_checksums:
        return (listed.path for listed in backup.listing())
    return (member.path for member in backup.members() if member.kind == "file")


@dataclasses.dataclass
class _Unit:
    """One thing a restore replaces: the workspace directory, or a relocated store (a directory or file)."""

    root: Path
    kind: str                   # "workspace", "dir", "file", or "remove" (a stale WAL the backup lacks)
    new: Optional[Path] = None  # the copy built beside it

    def contains(self, path: Path) -> bool:
        return _is_within(path, self.root)


def _restore_units(routes: _Routes, layout: _Layout, paths: _BackupPaths, target: Path) -> List[_Unit]:
    """The workspace, then every relocated store the backup holds, each replaced whole."""
    held = routes.held(layout.replaced, paths)
    units = [_Unit(target, "workspace")]
    for part, location in sorted(held.items()):
        if _is_within(location, target):
            continue
        if _is_within(target, location):
            raise RestoreError("%s %s (configured for %s) contains the workspace %s; a restore cannot replace it"
                               % (part, location, target, target), code="restore_layout_unsupported", path=location)
        for other in units[1:]:
            if _is_within(location, other.root) or _is_within(other.root, location):
                raise RestoreError("relocated stores %s and %s lie inside one another; restore them separately"
                                   % (other.root, location), code="restore_layout_unsupported", path=location)
        units.append(_Unit(location, "file" if part in ("ledger", "ledger_wal") else "dir"))
    ledger = held.get("ledger")
    if ledger is not None and not _is_within(ledger, target) and "ledger_wal" not in held:
        wal = Path(str(ledger) + ".wal")
        if os.path.lexists(str(wal)):
            units.append(_Unit(wal, "remove"))  # a WAL belongs to the ledger it was written for
    return units


def _replaced_inside(routes: _Routes, layout: _Layout, target: Path) -> Tuple[str, ...]:
    """Target-relative paths the workspace unit replaces (the rest of the workspace is kept)."""
    inside = []
    for rel in layout.replaced:
        destination = routes.destination(rel)
        if _is_within(destination, target) and destination != target:
            inside.append(_relative_posix(destination, target))
    for rel, _part, location in routes.rules:
        if any(rel.startswith(outer + "/") for outer in layout.replaced) and _is_within(location, target) \
                and location != target:
            inside.append(_relative_posix(location, target))
    return _outermost(inside)


def _protected_inside(config: UnifiedConfig, backup: _BackupSource, units: Sequence[_Unit],
                      replaced_inside: Sequence[str], target: Path) -> List[Notice]:
    """Backups and staging a restore would delete: they lie in something it replaces whole."""
    doomed = [target / rel for rel in replaced_inside] + [unit.root for unit in units[1:]]
    protected = [("backup root", config.recovery.backup_root), ("staging root", config.recovery.restore_staging_root)]
    if backup.location is not None:
        protected.append(("backup %s" % backup.backup_ref, backup.location))
    found = []
    for what, path in protected:
        for replaced in doomed:
            if _is_within(path, replaced):
                found.append(Notice("restore_would_delete_backups",
                                    "the %s %s lies inside %s, which the restore replaces: it would be deleted with "
                                    "it; put backups and staging outside the stores (--backup-root, --staging-root)"
                                    % (what, path, replaced)))
                break
    return found


def _unsafe_for_restore(target_config: UnifiedConfig) -> List[Tuple[Notice, bool]]:
    """What makes replacing this workspace now unsafe (a restore finishes an interrupted restore itself)."""
    return [(notice, held) for notice, held in _workspace_signals(target_config)
            if notice.code != "restore_interrupted"]


def _refuse_unsafe_restore(target_config: UnifiedConfig, *, ignore_workspace_lock: bool) -> None:
    """Refuse, changing nothing, while a writer or an interrupted operation is at the workspace."""
    signals = [(notice, held) for notice, held in _unsafe_for_restore(target_config)
               if not (ignore_workspace_lock and notice.code == "workspace_lock_held")]
    _refuse_signals(target_config.workspace.root_path, signals, RestoreError, ", or use --force")


def _refuse_signals(workspace: Path, signals: Sequence[Tuple[Notice, bool]], error: Type[OpsError],
                    override: str = "") -> None:
    """Raise for the first sign of a writer or a half-done operation: exit 4 when a live process holds one."""
    if not signals:
        return
    reasons = "; ".join(notice.message for notice, _held in signals)
    message = ("workspace %s is in use or mid-operation (%s); nothing was changed - stop the writer or finish the "
               "operation first%s" % (workspace, reasons, override))
    if any(held for _notice, held in signals):
        raise LockedError(message, code="workspace_in_use", path=workspace)
    raise error(message, code="workspace_unsafe", path=workspace)


def plan_restore(config: UnifiedConfig, backup_ref: Optional[str] = None, target_workspace: Any = None,
                 verify_only: bool = False, materialize: bool = False, *, only: Sequence[str] = (),
                 paths: Sequence[str] = (), sample_percent: Optional[float] = None) -> RestorePlan:
    """Open and validate a backup and say what a restore would replace, keep and lose.  Changes nothing.

    ``backup_ref`` is a ref under the backup root, ``latest``, a label, a
    unique prefix of a ref, or a path to a backup; None picks the newest
    complete backup that is not a safety backup.  A verify-only restore reads
    the backup in place (nothing is written, nothing replaced or lost), or,
    with ``materialize``, copies it into staging first.  ``sample_percent``
    (verify-only, in place) makes it a spot check: see :func:`_verify_in_place`.
    ``only`` (parts of RESTORE_PARTS) and ``paths`` (patterns of backup-shaped
    workspace paths, ``artifacts/objects/checkpoint/*``) make it partial:
    everything else stays as it is, byte for byte.
    """
    selection = _Selection.of(only, paths)
    target = _resolve_path(target_workspace) if target_workspace is not None else config.workspace.root_path
    materialize = materialize and verify_only
    if sample_percent is not None:
        _check_sample(sample_percent, verify_only, materialize)
    if not verify_only:
        _refuse_unsafe_target(target)
    backup = _open_backup(config, backup_ref)
    warnings: List[Notice] = []
    notes = ["verify_only" if verify_only else "apply_restore"]
    if verify_only:
        notes.append("materialized_in_staging" if materialize else "read_in_place")
    if sample_percent is not None:
        notes.append("sample:%g%%" % sample_percent)
    if backup_ref is None or backup_ref == "latest":
        notes.append("newest_complete_backup:%s" % backup.backup_ref)
    if backup.location is not None and _is_within(target, backup.location):
        raise RestoreError("target %s lies inside the backup %s" % (target, backup.location),
                           code="restore_target_inside_backup", path=target)
    if backup.location is not None and _is_within(backup.location, target):
        warnings.append(Notice("backup_inside_target", "%s is inside %s; it is kept through the restore, "
                               "but copy backups off this disk" % (backup.location, target)))
    staging_root = config.recovery.restore_staging_root
    if materialize and _is_within(staging_root, target):
        staging_root = Path(tempfile.gettempdir())
        warnings.append(Notice("staging_root_inside_target", "staging in %s instead of %s (set --staging-root)"
                               % (staging_root, config.recovery.restore_staging_root)))
    if not backup.has_checksums:
        warnings.append(Notice("checksums_absent", "backup made by %s carries no checksums; it is verified "
                               "structurally%s and by planes" % (backup.made_by,
                                                                 " (zip CRC-32)" if backup.kind == "zip" else "")))
    if not verify_only:
        notes.append("new_tree_built_beside_target")

    layout = _layout_for(backup, _recovery_children(backup))
    notes += list(layout.notes)
    if selection is not None:
        layout = layout.selected(selection)
        notes += ["only:%s" % part for part in only] + ["path:%s" % pattern for pattern in paths]
    target_config = _config_for_target(config, target)
    routes = _Routes(layout, target_config, target)
    backup_paths = _BackupPaths(backup, layout, routes)
    units = _restore_units(routes, layout, backup_paths, target)
    replaced_inside = _replaced_inside(routes, layout, target)
    destinations = {part: str(location) for part, location in sorted(routes.held(layout.replaced,
                                                                                  backup_paths).items())}
    refusals: List[Notice] = []
    if not verify_only:
        refusals += _protected_inside(config, backup, units, replaced_inside, target)
        refusals += [notice for notice, _held in _unsafe_for_restore(target_config)]
    if not verify_only:
        warnings += _already_delivered_notices(backup, layout, target_config)
    chosen = None if selection is None or not selection.patterns else (
        lambda path: selection.matches(routes.source_of(Path(path))))
    replaced_count, lost_count, lost = (0, 0, []) if verify_only else _count_lost(target, replaced_inside, units[1:],
                                                                                  backup_paths, chosen)
    safety = bool(config.recovery.create_backup_before_restore) and not verify_only
    return RestorePlan(
        backup_ref=backup.backup_ref, source_root=backup.location or Path(ARCHIVE_STDOUT), target_workspace=target,
        staging_root=staging_root, create_safety_backup=safety, verify_only=verify_only, notes=tuple(notes),
        made_by=backup.made_by, has_checksums=backup.has_checksums, replaced=replaced_inside,
        kept=tuple(_kept_roots(target, replaced_inside)) if target.is_dir() else (), lost=tuple(lost),
        lost_count=lost_count, replaced_file_count=replaced_count, backup_file_count=backup_paths.count,
        warnings=tuple(warnings), destinations=destinations, refusals=tuple(refusals),
        kind=_backup_kind(backup), only=tuple(only), paths=tuple(paths), materialize=materialize,
        sample_percent=sample_percent)


def _check_sample(sample_percent: float, verify_only: bool, materialize: bool) -> None:
    """A spot check reads a backup in place; anything else needs every byte."""
    if not verify_only or materialize:
        raise UsageError("--sample goes with --verify-only, read in place (not with --materialize or an apply: "
                         "a restore writes every byte, so it proves every byte)")
    if not 0 < sample_percent <= 100:
        raise UsageError("--sample must be a percentage above 0 and at most 100, not %g" % sample_percent)


def _already_delivered_notices(backup: _BackupSource, layout: _Layout, target_config: UnifiedConfig) -> List[Notice]:
    """Entries in the backup's outbox that the target's replay sink already holds (delivered since the backup).

    Replay recognizes them and acknowledges them without a second delivery;
    the plan says so.  Read where the backup can be read out of order (a
    directory); an archive is not streamed twice for this.
    """
    if layout.selection is not None and not layout.selection.matches(layout.outbox_root + "/" + OUTBOX_FILE):
        return []
    raw = backup.read_member(layout.member_path(layout.outbox_root + "/" + OUTBOX_FILE))
    if not raw:
        return []
    try:
        count = sink_entries_already_delivered(target_config, raw.splitlines(True))
    except OpsError as exc:
        return [Notice("outbox_already_delivered_unknown", "cannot tell which outbox entries the live sink "
                       "already holds: %s" % exc)]
    if not count:
        return []
    return [Notice("outbox_already_delivered", "%d of the backup's outbox entries are already in the live replay "
                   "sink (%s): replay will acknowledge them without delivering them again"
                   % (count, Path(target_config.workspace.exports_path) / "replayed"))]


def _count_lost(target: Path, replaced_inside: Sequence[str], relocated: Sequence[_Unit], restored: _BackupPaths,
                chosen: Optional[Callable[[str], bool]] = None) -> Tuple[int, int, List[str]]:
    """(files replaced, files replaced that the backup does not have, the first of those).

    ``chosen`` narrows "replaced" to the files a partial restore selects."""
    replaced_count = 0
    lost: List[str] = []
    lost_count = 0
    roots = [target / rel for rel in replaced_inside] + [unit.root for unit in relocated]
    for base in roots:
        if base.is_file() or base.is_symlink():
            candidates: Iterable[str] = [str(base)]
        elif base.is_dir():
            candidates = (str(base / sub) for sub, _st, kind in _walk_tree(base) if kind != "dir")
        else:
            candidates = []
        for path in candidates:
            if chosen is not None and not chosen(path):
                continue
            replaced_count += 1
            if path not in restored:
                lost_count += 1
                if len(lost) < _LOST_LISTED:
                    lost.append(_relative_posix(path, target) if _is_within(path, target) else path)
    return replaced_count, lost_count, lost


def _kept_roots(target: Path, replaced: Sequence[str], prefix: str = "") -> List[str]:
    """The largest subtrees of the target a restore leaves alone."""
    kept: List[str] = []
    directory = target / prefix if prefix else target
    try:
        names = sorted(os.listdir(str(directory)))
    except OSError:
        return kept
    for name in names:
        rel = prefix + name
        if rel in replaced:
            continue
        if any(path.startswith(rel + "/") for path in replaced) and (target / rel).is_dir():
            kept += _kept_roots(target, replaced, rel + "/")
        else:
            kept.append(rel)
    return kept


_RESTORABLE_MODE_BITS = 0o775


class _Verification:
    """What materializing and checking one backup (or a restored workspace) found.

    Problems are named by backup member while verifying a backup, and by
    absolute path when ``live_root`` is the workspace being checked.
    """

    def __init__(self, live_root: Optional[Path] = None, layout: Optional[_Layout] = None,
                 route: Optional[Callable[[str], str]] = None) -> None:
        self.live_root = live_root
        self.layout = layout
        self.route = route  # where a restore puts each workspace-relative path; None: the stage's own tree
        self.problems: List[Problem] = []
        self.digests: Dict[str, Tuple[int, str]] = {}  # artifact bodies just hashed, to skip a second read
        self.files = 0
        self.bytes = 0
        self.plane_results: Dict[str, Any] = {}
        self.plane_notes: List[str] = []
        self.masked_modes = 0
        self.first_masked: Optional[str] = None

    def restorable_mode(self, path: str, mode: int) -> int:
        """The permission bits a restore applies: never setuid, setgid, sticky or world-writable."""
        wanted = mode & 0o7777
        kept = wanted & _RESTORABLE_MODE_BITS
        if kept != wanted:
            self.masked_modes += 1
            self.first_masked = self.first_masked or path
        return kept

    def notices(self) -> List[Notice]:
        """Warnings for the result: modes that were not applied as the backup asked."""
        if not self.masked_modes:
            return []
        return [Notice("mode_masked", "%d file(s) or directories asked for setuid, setgid, sticky or world-writable "
                       "bits, which a restore never applies (first: %s)" % (self.masked_modes, self.first_masked))]

    def path_in(self, tree: Path, ws_rel: str) -> Path:
        """Where a workspace-relative path of the backup was materialized."""
        if self.route is not None:
            return Path(self.route(ws_rel))
        return tree / ws_rel if ws_rel else tree

    def display(self, store_root: str) -> Callable[[str], str]:
        def show(rel: str) -> str:
            ws_rel = store_root.rstrip("/") + "/" + rel if rel else store_root
            if self.live_root is not None:
                return str(self.live_root / ws_rel)
            return self.layout.member_path(ws_rel) if self.layout is not None else "workspace/" + ws_rel
        return show


def _materialize(backup: _BackupSource, layout: _Layout, stage: Path, verification: _Verification,
                 label: str) -> None:
    """Copy the backup into ``stage`` as a workspace tree, hashing each file against the list.

    Nothing is read past what the list, an archive header or the manifest's
    total declares; the callers have checked that what the backup declares
    fits (``_require_space``).  A directory backup's small files are copied in
    batches on two threads, large ones inside the kernel.
    """
    # Whatever the umask, no directory of a restored tree is world-writable (a workspace member may narrow it).
    os.chmod(str(stage), stat.S_IMODE(os.stat(str(stage)).st_mode) & _RESTORABLE_MODE_BITS)
    progress = _Progress(label, int(backup.manifest.get("total_bytes") or 0))
    directories: List[Tuple[str, int, int]] = []
    copier = _Batches()
    made: Set[str] = set()
    bodies = layout.artifacts_root + "/objects/"

    def copy_member(member: _Member, listed: Optional[_Listed]) -> Any:
        declared = _declared_size(member, listed)
        ws_rel = layout.workspace_path(member.path)
        if ws_rel is None:
            with member.open() as handle:
                size, digest = _hash_stream(_BoundedReader(handle, declared))
            progress.advance(size)
            return size, digest
        destination = str(verification.path_in(stage, ws_rel))
        parent = os.path.dirname(destination)
        if parent not in made:
            os.makedirs(parent, 0o755, exist_ok=True)
            made.add(parent)
        mode = verification.restorable_mode(member.path, member.mode if listed is None or listed.mode is None
                                            else listed.mode)
        mtime_ns = member.mtime_ns if listed is None or listed.mtime_ns is None else listed.mtime_ns

        def place(result: Tuple[int, str, bool]) -> Tuple[int, str]:
            size, digest = result[0], result[1]
            if ws_rel.startswith(bodies):
                verification.digests[ws_rel] = (size, digest)
            progress.advance(size)
            return size, digest

        if member.on_disk is not None:  # a directory backup's file: copied on the workers
            return copier.later(place, member.size, _copy_file, member.on_disk, destination,
                                (member.size, member.mtime_ns), mode, mtime_ns)
        with member.open() as handle:
            size, digest = _copy_stream_hashed(_BoundedReader(handle, declared), destination)
        if size > declared:  # a lying member's first bytes are never left where a forced restore would keep them
            os.unlink(destination)
            return size, digest
        _set_file_times_and_mode(destination, mode, mtime_ns)
        return place((size, digest, False))

    def members_making_directories() -> Iterator[_Member]:
        """Create directories as the walk meets them, so empty ones survive too."""
        for member in backup.members():
            if member.kind == "dir":
                ws_rel = layout.workspace_path(member.path, is_dir=True)
                if ws_rel is not None:
                    directory = str(verification.path_in(stage, ws_rel))
                    if directory not in made:
                        os.makedirs(directory, 0o755, exist_ok=True)
                        made.add(directory)
                    directories.append((directory, verification.restorable_mode(member.path, member.mode),
                                        member.mtime_ns))
            yield member

    try:
        files, total = _check_members(members_making_directories(), backup.expected(), copy_member,
                                      verification.problems, backup.budget)
    finally:
        copier.close()  # an interrupted run waits for the copies running, not for the queue
        progress.finish()
    verification.files += files
    verification.bytes += total
    for directory, mode, mtime_ns in reversed(directories):
        os.chmod(directory, mode | stat.S_IRWXU)
        os.utime(directory, ns=(mtime_ns, mtime_ns))


def _check_planes(tree: Path, layout: _Layout, verification: _Verification, *, has_metadata: bool,
                  digests: Optional[Mapping[str, Tuple[int, str]]] = None) -> None:
    """Records (index pointers too), artifacts and metadata of a workspace-shaped tree, into plane_results.

    A restore runs this on the tree it builds, `check` on a live workspace;
    verify-only feeds the same checks from the backup's bytes (:class:`_PlaneFeed`).
    """
    records = scan_records(verification.path_in(tree, layout.records_root), check_indexes=True,
                           display=verification.display(layout.records_root))
    artifact_digests = None
    if digests is not None:
        prefix = layout.artifacts_root + "/"
        artifact_digests = {rel[len(prefix):]: value for rel, value in digests.items() if rel.startswith(prefix)}
    artifacts = scan_artifact_bindings(verification.path_in(tree, layout.artifacts_root), digests=artifact_digests,
                                       display=verification.display(layout.artifacts_root))
    metadata = None
    database = verification.path_in(tree, layout.metadata_db)
    if has_metadata or database.exists():
        metadata = check_metadata_file(database, display=lambda _name: _ledger_shown(layout, verification))
    _record_planes(verification, records, artifacts, metadata)


def _ledger_shown(layout: _Layout, verification: _Verification) -> str:
    return verification.display(os.path.dirname(layout.metadata_db))(os.path.basename(layout.metadata_db))


def _record_planes(verification: _Verification, records: RecordsReport, artifacts: ArtifactsReport,
                   metadata: Optional[MetadataReport]) -> None:
    """The planes' reports into plane_results (Contexta's shape, keys sorted), problems and notes."""
    verification.plane_results["records"] = records.plane_result()
    verification.problems += records.problems
    if not records.present:
        verification.plane_notes.append("records_absent")
    verification.plane_results["artifacts"] = artifacts.plane_result()
    verification.problems += artifacts.problems
    if metadata is None:
        verification.plane_results["metadata"] = {"run_count": None, "check": "absent"}
        verification.plane_notes.append("metadata_absent")
    else:
        verification.plane_results["metadata"] = metadata.plane_result()
        verification.problems += metadata.problems
        if metadata.run_count is not None:
            verification.plane_notes.append("metadata_runs:%d" % metadata.run_count)
        else:
            verification.plane_notes.append("metadata_file_level:%s" % ("ok" if not metadata.problems else "failed"))
    verification.plane_notes += ["record_replay:%d" % records.record_count,
                                 "artifact_count:%d" % artifacts.artifact_count]
    verification.plane_results = {key: verification.plane_results[key] for key in _PLANES}


def _own_format_problems(backup: _BackupSource) -> List[Problem]:
    """Our own manifest must carry its checksums: without them nothing proves the copy (only Contexta's
    backups, which never had any, are verified structurally)."""
    if backup.made_by == TOOL_NAME and not backup.has_checksums:
        return [Problem("checksums_missing", _MANIFEST_NAME, "a %s manifest that lists no files (`file_list` or "
                        "`files`): the backup's checksums are lost, so its content cannot be proven"
                        % backup.manifest.get("format"))]
    return []


def _verify_into(backup: _BackupSource, layout: _Layout, stage: Path, label: str,
                 route: Optional[Callable[[str], str]] = None, check_planes: bool = True) -> _Verification:
    verification = _Verification(layout=layout, route=route)
    _materialize(backup, layout, stage, verification, label)
    verification.problems += _own_format_problems(backup)
    if not any(problem.code == "archive_corrupt" for problem in verification.problems):
        verification.problems += backup.manifest_problems()
    if check_planes:
        _check_backup_planes(backup, layout, stage, verification)
    return verification


def _check_backup_planes(backup: _BackupSource, layout: _Layout, stage: Path, verification: _Verification) -> None:
    """Every plane of a restored (or staged) tree, named by the backup members the files came from."""
    parts = layout.selection.parts if layout.selection is not None else None
    has_metadata = "metadata" in backup.manifest.get("included_sections", []) and (parts is None or "metadata" in parts)
    _check_planes(stage, layout, verification, has_metadata=has_metadata, digests=verification.digests)
    for rel in [rel for rel, part in layout.part_roots if part == "capture"]:
        root = verification.path_in(stage, rel)
        capture = _check_capture(root, lambda path: layout.member_path(
            rel + "/" + _relative_posix(path, root)), verification.problems)
        if capture["present"]:
            verification.plane_notes.append("capture_lines:%d" % capture["line_count"])


def _verification_notes(backup: _BackupSource, verification: _Verification) -> Tuple[str, ...]:
    notes = list(verification.plane_notes)
    notes.append("manifest:%s" % backup.backup_ref)
    if backup.has_checksums:
        notes.append("checksums_verified:%d" % verification.files)
    else:
        notes.append("checksums_absent")
    if backup.kind == "zip":
        notes.append("zip_crc32_checked:%d" % verification.files)
    return tuple(notes)


# -- verify-only, in place ---------------------------------------------------------
#
# Verify-only reads the backup where it lies (a directory, a tar, a tar.gz, a
# zip: streaming, never extracting) and writes nothing.  Every member is
# hashed against the list as it is read, and the same bytes feed the plane
# checks: record segments and indexes and capture files line by line, the
# records manifest, bindings against the bodies' digests, the ledger's header.
# A directory backup is read in parallel: record, index and capture files by
# worker processes (parsing JSON lines is CPU work; each worker reads its file
# in place and hashes it on the way), the rest by two hashing threads.

_KEPT_WHOLE = ("records_manifest", "binding")  # members whose bytes a plane check parses


def _digest_member(reader: Any, role: str, declared: int) -> Tuple[int, str, Any]:
    """(size, sha256, what the plane check of ``role`` needs) of a member read to its end (at most declared+1)."""
    scan = _SCANNERS[role]() if role in _SCANNERS else None
    keep = role in _KEPT_WHOLE and declared <= _JSON_FILE_LIMIT
    kept: List[bytes] = []
    digest = hashlib.sha256()
    size = 0
    for chunk in _chunks(reader):
        digest.update(chunk)
        if scan is not None:
            scan.feed(chunk)
        if keep or (role == "ledger" and size < _LEDGER_HEADER):
            kept.append(bytes(chunk if keep else chunk[:_LEDGER_HEADER - size]))
        size += len(chunk)
    payload = scan.finish() if scan is not None else (b"".join(kept) if kept or keep else None)
    return size, digest.hexdigest(), payload


def _digest_backup_file(path: str, role: str, declared: int) -> Tuple[int, str, Any]:
    """:func:`_digest_member` of a directory backup's file, read in place (a worker's job, thread or process)."""
    fd, _opened = _open_source_file(path)
    try:
        with os.fdopen(os.dup(fd), "rb", buffering=0) as handle:
            return _digest_member(_BoundedReader(handle, declared), role, declared)
    finally:
        os.close(fd)


# A store file larger than this is checked in line-aligned pieces of about this size, on every worker at once;
# one smaller than _ALONE is checked by a hashing thread in its turn (a worker's round trip would cost more).
_PIECE = 8 << 20
_ALONE = 64 << 10


def _scan_piece(path: str, role: str, start: int, end: int, limit: int) -> _LineScan:
    """A worker process's job: check the lines of a store file that start in [start, end), read in place.

    Nothing is read at or past ``limit``.  Pieces cut at the same offsets
    cover every line exactly once, so their scans join (``absorb``) into the
    whole file's.
    """
    scan = _SCANNERS[role]()
    fd, _opened = _open_source_file(path)
    try:
        with os.fdopen(os.dup(fd), "rb", buffering=0) as handle:
            position = _line_start_from(handle, start, limit)
            at_line_start = True
            while position < min(end, limit):
                data = handle.read(min(_CHUNK, min(end, limit) - position))
                if not data:
                    return scan.finish()
                scan.feed(data)
                position += len(data)
                at_line_start = data.endswith(b"\n")
            while not at_line_start and position < limit:  # the line under way at ``end`` is this piece's too
                data = handle.read(min(1 << 16, limit - position))
                newline = data.find(b"\n")
                scan.feed(data if newline < 0 else data[:newline + 1])
                position += len(data)
                if not data or newline >= 0:
                    break
    finally:
        os.close(fd)
    return scan.finish()


def _line_start_from(handle: Any, start: int, limit: int) -> int:
    """Position ``handle`` at the first line starting at or after ``start``; return that offset."""
    if start <= 0:
        return 0
    handle.seek(start - 1)
    position = start - 1
    while position < limit:
        data = handle.read(min(1 << 16, limit - position))
        if not data:
            break
        newline = data.find(b"\n")
        if newline >= 0:
            position += newline + 1
            handle.seek(position)
            return position
        position += len(data)
    return limit


def _quiet_worker() -> None:
    """A worker process leaves Ctrl-C to its parent, which stops it (and says so once)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _StoreWorkers:
    """Processes that check store files line by line, one per processor (at most four).

    Forked before any thread of this process starts (so no lock is copied
    held); where fork is missing, or one processor is all there is, jobs run in
    the caller and the hashing threads.
    """

    def __init__(self) -> None:
        self.pool: Any = None
        try:
            processors = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            processors = os.cpu_count() or 1
        import multiprocessing
        if processors > 1 and "fork" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("fork")
            self.pool = context.Pool(min(processors, 4), initializer=_quiet_worker)

    def start(self, job: Callable[..., Any], *args: Any) -> Any:
        """``job(*args)`` on a worker; its ``get()`` gives the result (or raises the worker's exception)."""
        assert self.pool is not None
        return self.pool.apply_async(job, args)

    def close(self, failed: bool) -> None:
        if self.pool is not None:
            if failed:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()


class _StoreJobs:
    """The segment, index and capture files of a directory backup, sent to the workers before the walk reaches
    them (in path order they come after the artifacts, which the hashing threads read meanwhile).

    A small file is one job (read, hashed and checked by one worker); a large
    one is checked in pieces on every worker while a hashing thread proves it.
    A member is taken only if it is what was sent (same size): anything else
    is read again in its turn.
    """

    def __init__(self, workers: _StoreWorkers, batches: _Batches) -> None:
        self.workers = workers
        self.batches = batches
        self.sent: Dict[str, Tuple[int, List[Any], Optional[_Later]]] = {}

    def send(self, backup: _BackupSource, planes: "_PlaneFeed", budget: Optional[int]) -> None:
        assert backup.location is not None
        for ws_root in planes.store_roots():
            member_root = planes.layout.member_path(ws_root)
            for rel, entry_stat, kind in _walk_tree(backup.location / member_root):
                member = member_root + "/" + rel
                role = planes.role(planes.layout.workspace_path(member))[0]
                size = entry_stat.st_size
                if kind == "file" and role in _SCANNERS and _ALONE <= size and (budget is None or size <= budget):
                    self.sent[member] = (size,) + self._send(str(backup.location / member), role, size)

    def _send(self, path: str, role: str, size: int) -> Tuple[List[Any], Optional[_Later]]:
        if size <= _PIECE:
            return [self.workers.start(_digest_backup_file, path, role, size)], None
        pieces = [self.workers.start(_scan_piece, path, role, start, start + _PIECE, size + 1)
                  for start in range(0, size, _PIECE)]
        return pieces, self.batches.later(lambda result: result, size, _digest_backup_file, path, "", size)

    def take(self, member: _Member, declared: int, then: Callable[[Any], Any]) -> Optional["_Sent"]:
        sent = self.sent.pop(member.path, None)
        if sent is None or sent[0] != declared:
            return None
        return _Sent(sent[1], sent[2], then)


class _Sent:
    """A store file's result from the workers, taken (and passed through ``then``) in its member's turn."""

    __slots__ = ("pieces", "hashing", "then")

    def __init__(self, pieces: List[Any], hashing: Optional[_Later], then: Callable[[Any], Any]) -> None:
        self.pieces = pieces
        self.hashing = hashing
        self.then = then

    def result(self) -> Any:
        if self.hashing is None:
            return self.then(self.pieces[0].get())  # raises the worker's exception (an unreadable file, say) here
        size, digest, _payload = self.hashing.result()
        whole = self.pieces[0].get()
        for piece in self.pieces[1:]:
            whole.absorb(piece.get())
        return self.then((size, digest, whole))


class _PlaneFeed:
    """The plane checks of a backup being read: which member feeds which check, and the checks themselves."""

    def __init__(self, layout: _Layout, verification: _Verification) -> None:
        self.layout = layout
        self.verification = verification
        self.records = _RecordsCheck(verification.display(layout.records_root))
        self.artifacts = _ArtifactsCheck(verification.display(layout.artifacts_root))
        self.roots = [(layout.records_root, "records"), (layout.artifacts_root, "artifacts")] + [
            (rel, "capture") for rel, part in layout.part_roots if part == "capture"]
        self.captures: Dict[str, Dict[str, Any]] = {}
        self.ledger: Optional[Tuple[int, bytes, Optional[str]]] = None  # size, header, path in place
        self.wal = False

    def store_roots(self) -> List[str]:
        """Where the files checked line by line live (workspace-relative)."""
        return [root for root, plane in self.roots if plane != "artifacts"]

    def role(self, ws_rel: Optional[str]) -> Tuple[str, str]:
        """(role, path within its store) of a member file: what it feeds, if anything."""
        layout = self.layout
        if ws_rel is None:
            return "", ""
        if ws_rel == layout.metadata_db:
            return "ledger", ""
        if ws_rel == layout.metadata_db + ".wal":
            return "wal", ""
        for root, plane in self.roots:
            if not ws_rel.startswith(root + "/"):
                continue
            rel = ws_rel[len(root) + 1:]
            if plane == "capture":
                return "capture", root + "\0" + rel
            if plane == "records":
                return _records_role(rel), rel
            if rel.startswith("bindings/") and rel.endswith(".binding.json") and rel.count("/") == 1:
                return "binding", rel[len("bindings/"):]
            return ("body", rel) if rel.startswith("objects/") else ("", "")
        return "", ""

    def watch(self, members: Iterable[_Member]) -> Iterator[_Member]:
        """The members, passed on; a store is present when the backup holds its directory (or anything below)."""
        for member in members:
            ws_rel = self.layout.workspace_path(member.path)
            if ws_rel is not None and member.kind == "dir":
                self.verification.restorable_mode(member.path, member.mode)  # what a restore would mask, said
            if ws_rel is not None:
                for root, plane in self.roots:
                    if ws_rel == root or ws_rel.startswith(root + "/"):
                        if plane == "records":
                            self.records.present()
                        elif plane == "artifacts":
                            self.artifacts.present()
                        else:
                            self.captures.setdefault(root, _capture_result(True))
            yield member

    def feed(self, role: str, rel: str, member: _Member, size: int, digest: str, payload: Any) -> None:
        """One member's bytes, as read and hashed (only members within their declared size come here)."""
        if role == "segment":
            self.records.segment(rel, payload)
        elif role == "index":
            self.records.index(rel, payload)
        elif role == "records_manifest":
            self.records.manifest(payload)
        elif role == "segment_unnamed":
            self.records.segment(rel, None)
        elif role == "binding":
            try:
                if payload is None:
                    raise InputRefusedError("is larger than %d bytes" % _JSON_FILE_LIMIT)
                self.artifacts.binding(rel, _parse_binding(json_loads(payload)), None)
            except (ValueError, UnicodeDecodeError) as exc:
                self.artifacts.binding(rel, None, str(exc))
        elif role == "body":
            self.artifacts.body(rel, size, digest)
        elif role == "ledger":
            self.ledger = (size, payload or b"", member.on_disk)
        elif role == "wal":
            self.wal = True
        elif role == "capture":
            root, _sep, within = rel.partition("\0")
            _count_capture(self.captures.setdefault(root, _capture_result(True)), payload,
                           self.layout.member_path(root + "/" + within), self.verification.problems)

    def finish(self, has_metadata: bool) -> None:
        """Decide every plane (index pointers need every segment, bodies every binding) into the verification."""
        verification = self.verification
        metadata = None
        if has_metadata or self.ledger is not None:
            metadata = MetadataReport(database_file=_ledger_shown(self.layout, verification), wal_present=self.wal)
            if self.ledger is None:
                metadata.problems.append(Problem("metadata_missing", metadata.database_file,
                                                 "metadata ledger is missing"))
            elif _judge_ledger_header(metadata, self.ledger[0], self.ledger[1]) and self.ledger[2] is not None:
                path = Path(self.ledger[2])  # DuckDB reads the ledger where it lies, read-only
                if _posix_lock_is_held(path):
                    metadata.check = "file_level_in_use"
                else:
                    _count_runs_with_duckdb(path, metadata, metadata.database_file)
        _record_planes(verification, self.records.finish(), self.artifacts.finish(), metadata)
        for root in sorted(self.captures):
            verification.plane_notes.append("capture_lines:%d" % self.captures[root]["line_count"])


def _records_role(rel: str) -> str:
    """What a file of a record store is to its check (as the live check globs them)."""
    if rel == "manifest.json":
        return "records_manifest"
    if rel.startswith("segments/segment-") and rel.endswith(".jsonl") and rel.count("/") == 1:
        return "segment" if _segment_id(rel) is not None else "segment_unnamed"
    if rel.startswith("indexes/") and rel.endswith(".jsonl") and rel.count("/") == 2:
        return "index"
    return ""


# A spot check (--sample, restic's --read-data-subset) still reads every file a plane check parses (records,
# indexes, bindings, capture, the ledger): they are the structure, and partial input would make them cry wolf.
# Of the other files - artifact bodies above all, most of a backup's bytes - it reads each with this chance and
# takes the rest at their listed sha256, so bodies are still judged against their bindings, by the list's word.
_SAMPLED_ROLES = ("", "body")


# Below this many bytes a backup is verified by this process and its hashing threads alone: forking and
# stopping a pool of workers costs more than they would save.
_WORKERS_FROM = 16 << 20


def _verify_in_place(backup: _BackupSource, layout: _Layout, plan: "RestorePlan") -> RestoreResult:
    """Prove a backup where it lies: every byte hashed against its list, every plane checked, nothing written.

    With ``plan.sample_percent``, a spot check: only that share of the files
    no plane parses is read (see _SAMPLED_ROLES); the result says how many
    were taken on the list's word, warns ``verify_partial``, and is never
    recorded as a clean verification.
    """
    verification = _Verification(layout=layout)
    chance = None if plan.sample_percent is None else plan.sample_percent / 100.0
    import random  # here: only a spot check needs it, and start-up is paid on every call
    draw = random.Random(os.urandom(16)).random  # a different sample each run, as restic draws its subset
    trusted = [0, 0]  # files and bytes taken at their listed sha256
    planes = _PlaneFeed(layout, verification)
    progress = _Progress("verify %s: hashing and checking, in place" % backup.backup_ref,
                         int(backup.declared_bytes or 0))
    workers = (_StoreWorkers() if backup.kind == "directory" and (backup.declared_bytes or 0) >= _WORKERS_FROM
               else None)  # forked before the threads start
    batches = _Batches()
    jobs = _StoreJobs(workers, batches) if workers is not None and workers.pool is not None else None

    def on_file(member: _Member, listed: Optional[_Listed]) -> Any:
        declared = _declared_size(member, listed)
        ws_rel = layout.workspace_path(member.path)
        role, rel = planes.role(ws_rel)
        if ws_rel is not None:
            verification.restorable_mode(member.path, member.mode if listed is None or listed.mode is None
                                         else listed.mode)
        if chance is not None and listed is not None and role in _SAMPLED_ROLES and not draw() < chance:
            trusted[0] += 1
            trusted[1] += member.size
            if member.size <= declared:
                planes.feed(role, rel, member, member.size, listed.sha256, None)
            progress.advance(member.size)
            return member.size, listed.sha256

        def then(result: Tuple[int, str, Any]) -> Tuple[int, str]:
            size, digest, payload = result
            if size <= declared:  # a lying member is a problem, never a plane's input
                planes.feed(role, rel, member, size, digest, payload)
            progress.advance(size)
            return size, digest

        if member.on_disk is None:  # an archive's member: read here, as the archive streams
            with member.open() as handle:
                return then(_digest_member(_BoundedReader(handle, declared), role, declared))
        sent = jobs.take(member, declared, then) if jobs is not None else None
        if sent is not None:
            return sent
        return batches.later(then, member.size, _digest_backup_file, member.on_disk, role, declared)

    failed = True
    try:
        if jobs is not None:
            jobs.send(backup, planes, backup.budget)
        files, total = _check_members(planes.watch(backup.members()), backup.expected(), on_file,
                                      verification.problems, backup.budget)
        failed = False
    finally:
        batches.close()
        if workers is not None:
            workers.close(failed)
        progress.finish()
    verification.files, verification.bytes = files, total
    verification.problems += _own_format_problems(backup)
    if not any(problem.code == "archive_corrupt" for problem in verification.problems):
        verification.problems += backup.manifest_problems()
    _Progress.phase("verify %s: index pointers, bodies against bindings, orphans, the ledger" % backup.backup_ref)
    planes.finish(has_metadata="metadata" in backup.manifest.get("included_sections", []))
    space_note, space_warning = _target_space(plan, backup.declared_bytes or verification.bytes)
    details = {"made_by": backup.made_by, "read": "in_place", "verified_files": verification.files,
               "verified_bytes": verification.bytes}
    if chance is not None:
        details.update(sampled_percent=plan.sample_percent, trusted_files=trusted[0], trusted_bytes=trusted[1])
        space_warning += (Notice("verify_partial", "a spot check: %d of %d files (%s of %s) were taken at their "
                                 "listed sha256 without being read; run it without --sample to prove every byte"
                                 % (trusted[0], verification.files, _human_bytes(trusted[1]),
                                    _human_bytes(verification.bytes))),)
    return RestoreResult(
        status="FAILURE" if verification.problems else "SUCCESS", notes=plan.notes + (space_note,),
        warnings=plan.warnings + tuple(verification.notices()) + space_warning,
        details=details,
        backup_ref=backup.backup_ref, target_workspace=plan.target_workspace, applied=False,
        plane_results=verification.plane_results, verification_notes=_verification_notes(backup, verification),
        problems=tuple(verification.problems), source_root=backup.location)


def _target_space(plan: "RestorePlan", needed: int) -> Tuple[str, Tuple[Notice, ...]]:
    """Whether the restore target's filesystem has room for what the backup holds (statvfs): a note, and a
    warning when it has not."""
    place = Path(plan.target_workspace).parent
    while not place.exists() and place != place.parent:
        place = place.parent
    fs = os.statvfs(str(place))
    free = fs.f_bavail * fs.f_frsize
    note = "target_space:%d bytes needed, %d free on the filesystem of %s" % (needed, free, place)
    if needed <= free:
        return note, ()
    return note, (Notice("target_space_short", "a restore into %s needs %s (what the backup declares), but the "
                         "filesystem of %s has %s free; free space there or restore elsewhere (--target)"
                         % (plan.target_workspace, _human_bytes(needed), place, _human_bytes(free))),)


def _stale_dirs(parent: Path, prefix: str, files: bool = False) -> List[Path]:
    """Our own leftovers beside ``parent``'s entries: directories (and, with ``files``, files) named ``prefix*``."""
    try:
        names = os.listdir(str(parent))
    except OSError:
        return []
    found = []
    for name in sorted(names):
        if not name.startswith(prefix):
            continue
        mode = os.lstat(str(parent / name)).st_mode
        if stat.S_ISDIR(mode) or (files and stat.S_ISREG(mode)):
            found.append(parent / name)
    return found


def restore_workspace(config: UnifiedConfig, plan: RestorePlan) -> RestoreResult:
    """Verify a backup (always) and, unless ``plan.verify_only``, apply it to the target.

    Verification failure gives status FAILURE (exit 1) and, for an apply,
    leaves the target untouched.  Use :func:`restore_workspace_forced` to apply
    a backup that failed verification.
    """
    return _restore(config, plan, force=False)


def restore_workspace_forced(config: UnifiedConfig, plan: RestorePlan) -> RestoreResult:
    """Apply even when verification finds problems (the result still lists them)."""
    return _restore(config, plan, force=True)


def _restore(config: UnifiedConfig, plan: RestorePlan, force: bool) -> RestoreResult:
    backup = _open_source(plan.source_root)
    layout = _layout_for(backup, _recovery_children(backup))
    selection = _Selection.of(plan.only, plan.paths)
    if selection is not None:
        layout = layout.selected(selection)
    with _source_lock(backup):
        if plan.verify_only:
            result = _verify_only(backup, layout, plan)
            if result.status == "SUCCESS" and plan.sample_percent is None:  # a spot check proves less
                _record_backup_event(config, backup, "verified_clean")
            return result
        target = Path(plan.target_workspace)
        _refuse_unsafe_target(target)
        refused = backup.prescan()  # archives: every member's name, type and size before anything is touched
        if refused and not force:
            return RestoreResult(
                status="FAILURE", warnings=plan.warnings, notes=plan.notes + ("refused_verification_failed",),
                details={"made_by": backup.made_by}, backup_ref=backup.backup_ref, target_workspace=target,
                applied=False, problems=tuple(refused), source_root=backup.location)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _workspace_lock(target):
            target_config = _config_for_target(config, target)
            _resume_interrupted_restore(target, _relocated_roots(target_config, target))
            result = _apply(config, backup, layout, plan, target, force)
        if result.applied:
            _record_backup_event(config, backup, "restored_from")
        return result


def _verify_only(backup: _BackupSource, layout: _Layout, plan: RestorePlan) -> RestoreResult:
    if not plan.materialize:
        return _verify_in_place(backup, layout, plan)
    return _verify_materialized(backup, layout, plan)


def _verify_materialized(backup: _BackupSource, layout: _Layout, plan: RestorePlan) -> RestoreResult:
    """The old verify-only (``--materialize``): copy the backup into staging, check it there, remove staging."""
    staging_root = Path(plan.staging_root)
    staging_root.mkdir(parents=True, exist_ok=True)
    prefix = ".contexta-ops-verify-"
    for stale in _stale_dirs(staging_root, prefix):
        if not _lock_is_held(stale, directory=True):
            _remove_tree(stale)
    _require_space({staging_root: backup.declared_bytes or 0}, "to stage %s for verification" % backup.backup_ref)
    stage = staging_root / ("%s%s-%s" % (prefix, sanitize_component(backup.backup_ref)[:64], uuid.uuid4().hex[:12]))
    stage.mkdir()
    try:
        with _Lock(stage, what="staging %s" % stage, directory=True):
            verification = _verify_into(backup, layout, stage, "verify %s" % backup.backup_ref)
    finally:
        _remove_tree(stage)
    return RestoreResult(
        status="FAILURE" if verification.problems else "SUCCESS", notes=plan.notes,
        warnings=plan.warnings + tuple(verification.notices()),
        details={"made_by": backup.made_by, "staged_files": verification.files, "staged_bytes": verification.bytes},
        backup_ref=backup.backup_ref, target_workspace=plan.target_workspace, applied=False,
        plane_results=verification.plane_results, verification_notes=_verification_notes(backup, verification),
        problems=tuple(verification.problems), source_root=backup.location)


def _require_space(needs: Mapping[Path, int], purpose: str) -> None:
    """Refuse before writing when a filesystem lacks the room (statvfs); say how much is needed where."""
    by_device: Dict[int, Tuple[Path, int]] = {}
    for path, amount in needs.items():
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        device = os.stat(str(existing)).st_dev
        shown, total = by_device.get(device, (existing, 0))
        by_device[device] = (shown, total + amount)
    for shown, amount in by_device.values():
        fs = os.statvfs(str(shown))
        free = fs.f_bavail * fs.f_frsize
        if amount > free:
            raise OpsError("not enough free space %s: %s (%d bytes) needed on the filesystem of %s, %s free; "
                           "nothing was written" % (purpose, _human_bytes(amount), amount, shown, _human_bytes(free)),
                           code="insufficient_space", path=shown)


def _refuse_unsafe_target(target: Path) -> None:
    """Refuse, before anything is written, a target a restore must not or cannot replace.

    A restore builds the new tree beside the target and swaps the two by
    rename: beside ``/`` there is nothing, and a mount point cannot be renamed.
    """
    if os.path.realpath(str(target)) == "/":
        raise RestoreError("restore target %s is the root directory; refusing to replace it" % target,
                           code="restore_target_refused", path=target)
    if os.path.ismount(str(target)):
        raise RestoreError("restore target %s is a mount point, which a restore cannot swap out; restore into a "
                           "directory inside it (--target)" % target, code="restore_target_refused", path=target)


def _journal_path(target: Path) -> Path:
    return target.parent / (".%s.contexta-ops-restore.json" % target.name)


def _new_tree_prefix(target: Path) -> str:
    return ".%s.contexta-ops-restore-" % target.name


def _relocated_roots(target_config: UnifiedConfig, target: Path) -> List[Path]:
    """Stores this configuration keeps outside the workspace (a restore replaces them there)."""
    locations = [part.locate(target_config) for part in _SECTION_PARTS if not part.optional]
    locations += [target_config.metadata.database_path]
    return [location for location in locations if not _is_within(location, target)]


def _apply(config: UnifiedConfig, backup: _BackupSource, layout: _Layout, plan: RestorePlan, target: Path,
           force: bool) -> RestoreResult:
    warnings = list(plan.warnings)
    notes = list(plan.notes)
    target_config = _config_for_target(config, target)
    routes = _Routes(layout, target_config, target)
    units = _restore_units(routes, layout, _BackupPaths(backup, layout, routes), target)
    replaced_inside = _replaced_inside(routes, layout, target)
    deleting = _protected_inside(config, backup, units, replaced_inside, target)
    if deleting:
        raise RestoreError(deleting[0].message + "; nothing was changed", code="restore_would_delete_backups",
                           path=target)
    if force:
        warnings += [Notice("forced_unsafe", notice.message) for notice, _held in _unsafe_for_restore(target_config)
                     if notice.code != "workspace_lock_held"]
    else:
        _refuse_unsafe_restore(target_config, ignore_workspace_lock=True)
    needs = {target.parent: backup.declared_bytes or 0}
    if plan.create_safety_backup and target.is_dir():
        needs[config.recovery.backup_root] = _tree_size(target, [config.recovery.backup_root])[1]
    _require_space(needs, "to restore %s into %s" % (backup.backup_ref, target))

    token = uuid.uuid4().hex[:12]
    for unit in units:
        if unit.kind != "remove":
            unit.new = unit.root.parent / (_new_tree_prefix(unit.root) + token)
    safety_ref = None
    try:
        for unit in units:
            if unit.kind in ("workspace", "dir") and unit.new is not None:
                unit.root.parent.mkdir(parents=True, exist_ok=True)
                unit.new.mkdir()
        route = functools.partial(_route_into_units, routes, units)
        new_tree = units[0].new
        assert new_tree is not None
        selection = layout.selection
        verification = _verify_into(backup, layout, new_tree, "restore %s" % backup.backup_ref, route=route,
                                    check_planes=selection is None)
        warnings += verification.notices()
        if selection is not None:  # a part alone proves little: check the whole future workspace, before any swap
            _link_partial(routes, units, target, replaced_inside, selection)
            future = _Verification(layout=layout, route=functools.partial(_future_path, routes, units))
            _check_backup_planes(backup, layout, new_tree, future)
            verification.plane_results, verification.plane_notes = future.plane_results, future.plane_notes
            for problem in future.problems:  # only what this restore writes can refuse it
                if selection.matches(problem.path[len("workspace/"):]):
                    verification.problems.append(problem)
            left = [problem for problem in future.problems if problem not in verification.problems]
            if left:
                warnings.append(Notice("problems_left_alone", "%d problem(s) in what this partial restore keeps "
                                       "as it is, e.g. %s; the check after it lists them" % (len(left), left[0].line())))
        verification_notes = _verification_notes(backup, verification)
        if verification.problems and not force:
            _remove_new_trees(units)
            return RestoreResult(
                status="FAILURE", warnings=tuple(warnings), notes=tuple(notes + ["refused_verification_failed"]),
                details={"made_by": backup.made_by}, backup_ref=backup.backup_ref, target_workspace=target,
                applied=False, plane_results=verification.plane_results, verification_notes=verification_notes,
                problems=tuple(verification.problems), source_root=backup.location)
        if verification.problems:
            warnings.append(Notice("forced", "applied although verification found %d problem(s)"
                                   % len(verification.problems)))
        if plan.create_safety_backup and target.is_dir() and any(os.scandir(str(target))):
            safety_ref = _safety_backup(config, target)
            notes.append("safety_backup:%s" % safety_ref)
        if target.is_dir() and selection is None:
            linked = _link_kept(target, new_tree, replaced_inside, skip=[new_tree])
            notes.append("kept_entries:%d" % linked)
        for unit in units:
            if unit.new is not None and os.path.lexists(str(unit.new)):
                _sync_filesystem(unit.new.parent)
        _crash_point("restore:new-tree-durable")
    except BaseException:
        _remove_new_trees(units)
        if safety_ref is not None:  # the workspace is unchanged: its safety copy would only be a leftover
            _delete_backup(config.recovery.backup_root / safety_ref)
        raise
    try:
        _switch_over(target, units, backup.backup_ref)
    except OSError:
        _resume_interrupted_restore(target)  # undo at once what the journal describes
        raise
    post = check_workspace(target_config)
    _finish_restore(target)
    problems = list(verification.problems) + list(post.problems)
    return RestoreResult(
        status="FAILURE" if problems else "SUCCESS", warnings=tuple(warnings), notes=tuple(notes),
        details={"made_by": backup.made_by, "staged_files": verification.files,
                 "destinations": dict(plan.destinations)},
        backup_ref=backup.backup_ref, target_workspace=target, applied=True,
        plane_results=verification.plane_results, safety_backup_ref=safety_ref,
        verification_notes=verification_notes, problems=tuple(problems), source_root=backup.location,
        post_apply_check=post.to_dict())


def _link_partial(routes: _Routes, units: Sequence[_Unit], target: Path, replaced_inside: Sequence[str],
                  selection: _Selection) -> None:
    """Fill every new copy with what a partial restore keeps: all but the selected parts, or the selected files."""
    chosen = (lambda path: selection.matches(routes.source_of(path))) if selection.patterns else None
    for unit in units:
        if unit.new is None or unit.kind == "remove" or not unit.root.is_dir():
            continue
        if unit.kind == "workspace":
            _link_kept(target, unit.new, () if chosen else replaced_inside, skip=[unit.new], drop=chosen)
        elif chosen is not None:  # a relocated store: replaced whole, unless only some of its files are chosen
            _link_kept(unit.root, unit.new, (), skip=[], drop=chosen)


def _future_path(routes: _Routes, units: Sequence[_Unit], ws_rel: str) -> str:
    """Where a part will be once the restore switches over: in a new copy, or where it already is."""
    destination = routes.destination(ws_rel)
    for unit in sorted(units, key=lambda each: -len(str(each.root))):
        if unit.new is not None and unit.kind != "remove" and unit.contains(destination):
            rest = _relative_posix(destination, unit.root)
            return str(unit.new) if rest == "." else str(unit.new / rest)
    return str(destination)


def _route_into_units(routes: _Routes, units: Sequence[_Unit], ws_rel: str) -> str:
    """Where a path of the backup is built: its destination, moved into the new copy of its unit."""
    destination = routes.destination(ws_rel)
    for unit in sorted(units, key=lambda each: -len(str(each.root))):
        if unit.new is not None and unit.contains(destination):
            rest = _relative_posix(destination, unit.root)
            return str(unit.new) if rest == "." else str(unit.new / rest)
    raise RestoreError("backup path %s has no place in the restore of %s" % (ws_rel, routes.target),
                       code="restore_layout_unsupported", path=destination)


def _remove_new_trees(units: Sequence[_Unit]) -> None:
    for unit in units:
        if unit.new is not None:
            _remove_tree(unit.new)


def _config_for_target(config: UnifiedConfig, target: Path) -> UnifiedConfig:
    """The configuration of the workspace a restore targets: the configured one, or defaults under it.

    A --target elsewhere gets every store inside it: the configured relocated
    stores belong to the configured workspace, which a restore elsewhere must
    not touch.
    """
    if target == config.workspace.root_path:
        return config
    return UnifiedConfig(profile_name=config.profile_name, project_name=config.project_name,
                         workspace=WorkspaceConfig(root_path=target),
                         recovery=RecoveryConfig(backup_root=config.recovery.backup_root,
                                                 restore_staging_root=config.recovery.restore_staging_root))


def _safety_backup(config: UnifiedConfig, target: Path, label: str = _SAFETY_LABEL) -> str:
    """Back up the target actually being replaced, not the configured workspace (D2)."""
    target_config = _config_for_target(config, target)
    plan = plan_workspace_backup(target_config, label=label, kind="safety")
    result = _write_backup(target_config, plan)
    return result.backup_ref


def _link_kept(old_root: Path, new_root: Path, replaced: Sequence[str], skip: Sequence[Path],
               drop: Optional[Callable[[Path], bool]] = None) -> int:
    """Carry over what the backup does not hold: hard links (copies across devices), never the data twice.

    ``drop`` names single files a partial restore replaces (or removes) within what is otherwise kept."""
    excludes = [old_root / rel for rel in replaced] + list(skip)
    directories: List[Tuple[Path, os.stat_result]] = []
    count = 0
    for rel, entry_stat, kind in _walk_tree(old_root, excludes):
        source = old_root / rel
        destination = new_root / rel
        if kind == "dir":
            if not destination.exists():
                destination.mkdir()
                directories.append((destination, entry_stat))
            continue
        if os.path.lexists(str(destination)) or (drop is not None and drop(source)):
            continue  # the backup's copy wins
        if kind == "file":
            try:
                os.link(str(source), str(destination))
            except OSError:
                shutil.copy2(str(source), str(destination))
        elif kind == "symlink":
            os.symlink(os.readlink(str(source)), str(destination))
        else:
            continue
        count += 1
    for directory, dir_stat in reversed(directories):
        os.chmod(str(directory), stat.S_IMODE(dir_stat.st_mode))
        os.utime(str(directory), ns=(dir_stat.st_mtime_ns, dir_stat.st_mtime_ns))
    return count


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _rename_exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where that is not available."""
    renameat2 = _libc_function("renameat2")
    if renameat2 is None:
        return False
    import ctypes
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(str(first)), _AT_FDCWD, os.fsencode(str(second)), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
        return False
    raise OSError(error, os.strerror(error), str(first))


def _lstat_ino(path: Any) -> Optional[int]:
    try:
        return os.lstat(str(path)).st_ino
    except FileNotFoundError:
        return None


def _switch_over(target: Path, units: Sequence[_Unit], backup_ref: str) -> None:
    """Put every new copy in place; the journal, written first, lets any later run finish or undo this."""
    entries: List[Dict[str, Any]] = []
    for unit in units:
        token = unit.new.name.rsplit("-", 1)[-1] if unit.new is not None else uuid.uuid4().hex[:12]
        entries.append({"target": str(unit.root), "new": None if unit.new is None else str(unit.new),
                        "old": str(unit.root.parent / (_new_tree_prefix(unit.root) + "old-" + token)),
                        "old_ino": _lstat_ino(unit.root),
                        "new_ino": None if unit.new is None else _lstat_ino(unit.new)})
    journal = {"version": 2, "backup_ref": backup_ref, "started_at": _utc_timestamp(), "units": entries}
    atomic_write_bytes(_journal_path(target), _pretty_json(journal))
    _crash_point("restore:journal-written")
    for entry in entries:
        _switch_unit(entry)
        _crash_point("restore:switched")
        _fsync_dir(Path(entry["target"]).parent)


def _switch_unit(entry: Mapping[str, Any]) -> None:
    """One swap: renameat2(RENAME_EXCHANGE) where there is one, else two renames (the journal covers the gap)."""
    target, new, old = entry["target"], entry["new"], entry["old"]
    if new is None:
        if os.path.lexists(target):
            os.rename(target, old)  # removed: kept aside until the restore is finished
    elif entry["old_ino"] is None:
        os.rename(new, target)
    elif not _rename_exchange(Path(new), Path(target)):  # exchanged: the new path now holds the old copy
        os.rename(target, old)
        _crash_point("restore:old-moved-aside")
        os.rename(new, target)


def _journal_units(journal_path: Path) -> List[Dict[str, Any]]:
    """The swaps a restore journal describes (a journal of one swap, older format, included)."""
    try:
        journal = json_loads(read_regular(journal_path))
        units = journal["units"] if "units" in journal else [
            {key: journal[key] for key in ("target", "new", "old", "old_ino", "new_ino")}]
        for unit in units:
            if not (isinstance(unit["target"], str) and isinstance(unit["old"], str)
                    and isinstance(unit["new"], (str, type(None)))):
                raise TypeError("paths")
    except (OSError, ValueError, KeyError, TypeError):
        raise RestoreError("restore journal %s is unreadable; inspect %s by hand" % (journal_path, journal_path.parent),
                           code="restore_journal_invalid", path=journal_path)
    return list(units)


def _unit_switched(unit: Mapping[str, Any]) -> bool:
    current = _lstat_ino(unit["target"])
    if unit["new"] is None:
        return current is None or current != unit["old_ino"]
    return current is not None and current == unit["new_ino"]


def _unit_started(unit: Mapping[str, Any]) -> bool:
    """Switched, or halfway through two renames: the old copy moved aside, the new one not yet in place."""
    return _unit_switched(unit) or (unit["old_ino"] is not None and _lstat_ino(unit["target"]) is None
                                    and _lstat_ino(unit["old"]) == unit["old_ino"])


def _finish_restore(target: Path) -> None:
    """Remove every replaced copy and the journal once every new one is in place."""
    journal_path = _journal_path(target)
    for unit in _journal_units(journal_path):
        for leftover in (unit["new"], unit["old"]):
            if leftover is not None and os.path.lexists(leftover):
                _remove_tree(leftover)
                _crash_point("restore:old-removed")
    os.unlink(str(journal_path))
    _fsync_dir(target.parent)


def _resume_interrupted_restore(target: Path, relocated: Sequence[Path] = ()) -> Optional[str]:
    """Finish or roll back a restore of ``target`` that was killed; the caller holds the workspace lock.

    Every new copy was complete and durable before the journal was written.
    If any swap began, the rest are done (finished); if none did, the new
    copies are removed (rolled back).  Which copy sits where is decided by
    inode, so this is right at every point of the switch-over.  Without a
    journal, copies left by a run killed earlier are removed.
    """
    journal_path = _journal_path(target)
    if not journal_path.exists():
        for root in [target] + list(relocated):
            for stale in _stale_dirs(root.parent, _new_tree_prefix(root), files=True):
                _remove_tree(stale)  # built by a run killed before its journal existed
        return None
    units = _journal_units(journal_path)
    if any(_unit_started(unit) for unit in units):
        for unit in units:
            if not _unit_switched(unit):
                _finish_unit_switch(unit, journal_path)
            _fsync_dir(Path(unit["target"]).parent)
        _finish_restore(target)
        return "finished"
    for unit in units:
        if unit["old_ino"] is not None and _lstat_ino(unit["target"]) is None and _lstat_ino(unit["old"]) == unit["old_ino"]:
            os.rename(unit["old"], unit["target"])  # moved aside, never replaced
        if unit["new"] is not None and _lstat_ino(unit["new"]) == unit["new_ino"]:
            _remove_tree(unit["new"])
        _fsync_dir(Path(unit["target"]).parent)
    os.unlink(str(journal_path))
    _fsync_dir(target.parent)
    return "rolled_back"


def _finish_unit_switch(unit: Mapping[str, Any], journal_path: Path) -> None:
    if unit["new"] is not None and _lstat_ino(unit["new"]) != unit["new_ino"]:
        raise RestoreError("cannot tell how the restore of %s ended (journal %s): its new copy %s is gone; "
                           "inspect by hand" % (unit["target"], journal_path, unit["new"]),
                           code="restore_journal_inconsistent", path=journal_path)
    if unit["new"] is not None and _lstat_ino(unit["target"]) is None:
        os.rename(unit["new"], unit["target"])
    else:
        _switch_unit(unit)



# ---------------------------------------------------------------------------
# Comparisons: a backup against another, or against the live workspace
# ---------------------------------------------------------------------------
#
# `check` proves each store is sound; it cannot see a changed digit inside a
# valid record line.  These compare file by file (size, then sha256).  One side
# goes into an on-disk index (sqlite3), the other streams past it, so memory
# stays flat whatever the number of files.

_DIFF_LISTED = 1000  # entries listed per kind; the counts cover them all


@dataclasses.dataclass(frozen=True)
class DiffResult(_Record):
    """``backup diff`` and ``check --against``: files added, removed and changed from ``left`` to ``right``."""

    status: str
    left: str
    right: str
    added_count: int = 0
    removed_count: int = 0
    changed_count: int = 0
    unchanged_count: int = 0
    added: Tuple[Mapping[str, Any], ...] = ()
    removed: Tuple[Mapping[str, Any], ...] = ()
    changed: Tuple[Mapping[str, Any], ...] = ()
    truncated: bool = False
    notes: Tuple[str, ...] = ()

    @property
    def identical(self) -> bool:
        return not (self.added_count or self.removed_count or self.changed_count)


# (path inside the backup's workspace/, size, sha256 - or a callable that computes it only when needed)
_ListedFile = Tuple[str, Optional[int], Any]


def _backup_files(backup: _BackupSource) -> Iterator[_ListedFile]:
    """A backup's files as its list records them; without a list (Contexta's backups), hashed as they are read."""
    if backup.has_checksums:
        yield from _iter_listed_files(backup)
        return
    for member in backup.members():
        if member.kind == "file":
            with member.open() as handle:
                size, digest = _hash_stream(handle)
            yield member.path, size, digest


def _live_files(config: UnifiedConfig) -> Iterator[_ListedFile]:
    """The live workspace as a backup of it would list it, each digest computed only when asked for."""
    plan = plan_workspace_backup(config)
    for entry in _SectionWalk(config, plan).entries():
        if entry.kind == "file" and entry.source is not None and entry.stat is not None:  # not written by a backup
            source = entry.source
            yield entry.member, entry.stat.st_size, functools.partial(lambda path: sha256_file(path)[1], source)


def _compare(left: Iterable[_ListedFile], right: Iterable[_ListedFile], left_name: str, right_name: str,
             skip: Callable[[str], bool]) -> DiffResult:
    import sqlite3
    counts = {"added": 0, "removed": 0, "changed": 0, "unchanged": 0}
    listed: Dict[str, List[Mapping[str, Any]]] = {"added": [], "removed": [], "changed": []}

    def note(kind: str, item: Mapping[str, Any]) -> None:
        counts[kind] += 1
        if len(listed[kind]) < _DIFF_LISTED:
            listed[kind].append(item)

    with tempfile.TemporaryDirectory(prefix="contexta-ops-diff-") as scratch:
        index = sqlite3.connect(os.path.join(scratch, "left.sqlite"))
        try:
            index.execute("CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER, sha256 TEXT, seen INTEGER)")
            index.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, 0)",
                              ((path, size, digest() if callable(digest) else digest)
                               for path, size, digest in left if not skip(path)))
            for path, size, digest in right:
                if skip(path):
                    continue
                found = index.execute("SELECT size, sha256 FROM files WHERE path = ?", (path,)).fetchone()
                if found is None:
                    note("added", {"path": path, "size": size})
                    continue
                index.execute("UPDATE files SET seen = 1 WHERE path = ?", (path,))
                before_size, before_sha = found
                after_sha = None if size != before_size else (digest() if callable(digest) else digest)
                if size != before_size or after_sha != before_sha:
                    note("changed", {"path": path, "size_before": before_size, "size_after": size,
                                     "sha256_before": before_sha, "sha256_after": after_sha})
                else:
                    counts["unchanged"] += 1
            for path, size in index.execute("SELECT path, size FROM files WHERE seen = 0 ORDER BY path"):
                note("removed", {"path": path, "size": size})
        finally:
            index.close()
    differs = counts["added"] or counts["removed"] or counts["changed"]
    return DiffResult(
        status="DEGRADED" if differs else "SUCCESS", left=left_name, right=right_name,
        added_count=counts["added"], removed_count=counts["removed"], changed_count=counts["changed"],
        unchanged_count=counts["unchanged"], added=tuple(listed["added"]), removed=tuple(listed["removed"]),
        changed=tuple(listed["changed"]), truncated=any(counts[kind] > _DIFF_LISTED for kind in listed))


def _not_workspace_data(path: str) -> bool:
    """The resolved config documents a backup; the live workspace has none."""
    return path == _CONFIG_MEMBER


def diff_backups(config: UnifiedConfig, left: str, right: Optional[str] = None) -> DiffResult:
    """Files added, removed and changed from backup ``left`` to backup ``right`` (or the live workspace).

    Listed digests are compared as they are; live files are hashed only when
    their size matches.  Changes nothing.
    """
    old = _open_backup(config, left)
    with _source_lock(old):
        if right is None:
            if not config.workspace.root_path.is_dir():
                raise OpsError("workspace %s does not exist" % config.workspace.root_path, code="workspace_missing",
                               path=config.workspace.root_path)
            return _compare(_backup_files(old), _live_files(config), old.backup_ref,
                            str(config.workspace.root_path), _not_workspace_data)
        new = _open_backup(config, right)
        with _source_lock(new):
            return _compare(_backup_files(old), _backup_files(new), old.backup_ref, new.backup_ref, lambda path: False)


def check_against(config: UnifiedConfig, backup: str) -> DiffResult:
    """The live workspace against a backup, file by file: what changed, went missing or is new since it."""
    return diff_backups(config, backup, None)


# ---------------------------------------------------------------------------
# Outbox replay
# ---------------------------------------------------------------------------
#
# Same contract as contexta.recovery.replay_outbox, none of its losses:
# the outbox is streamed once (flat memory); unchanged lines keep their bytes
# and their order; a malformed line is dead-lettered with its raw text instead
# of stopping the batch.  Exactly-once delivery to the built-in file sink
# comes from checkpoints: sink files, the kept-lines and dead-letter temp files
# are fsynced, then ``replay.journal.json`` records their sizes and the outbox
# offset reached.  A run killed at any moment is finished by the next one,
# which first truncates everything back to the last checkpoint, so nothing
# past a checkpoint is ever written twice.  The outbox is replaced atomically
# and lines a writer appends meanwhile are carried over.
#
# Exactly-once also survives a restore: the sink files live outside backups,
# so a restored outbox holds entries the sink already has.  An index beside
# the sink files (SQLite) remembers (replay_ref, payload sha256) of every
# line; such entries are acknowledged without a second delivery.
#
# Replay writes only files it owns: a symlink, directory or FIFO where one of
# its files belongs stops the run before anything is delivered.

OUTBOX_FILE = "failed_deliveries.jsonl"
DEAD_LETTER_FILE = "dead_letter.jsonl"
REPLAY_LOCK_FILE = "replay.lock"
SINK_INDEX_FILE = ".contexta-ops-sink-index.sqlite"
_REPLAY_JOURNAL = "replay.journal.json"
_REPLAY_KEPT_TMP = ".replay-kept.tmp"
_REPLAY_DEAD_TMP = ".replay-dead.tmp"
# The replaced outbox keeps this second name until the lines a writer appended to it late are carried
# over: a run killed in between leaves them reachable for the next one, not only in an open file.
_REPLAY_PREVIOUS = ".replay-previous.jsonl"
_REQUEUE_JOURNAL = "requeue.journal.json"
PAYLOAD_FAMILIES = ("CONTEXT", "RECORD", "ARTIFACT", "DEGRADATION")
_SINK_FILES = tuple("%s.jsonl" % family.lower() for family in PAYLOAD_FAMILIES)
DEFAULT_REPLAY_SINK = "local-jsonl-replay"
_CHECKPOINT_LINES = 4096
_CHECKPOINT_BYTES = 8 << 20
_IN_FLIGHT_SECONDS = 2.0
_ENTRY_RESULTS_KEPT = 10000
_BATCH_LINES = 128  # keys looked up in the sink index at once
_BATCH_BYTES = 48 << 10  # outbox lines decided together (about 128 of Contexta's): one lookup for all of them

# What identifies a delivered entry in a sink line.  The writer (_sink_line) and
# every reader (crash recovery, the sink index) use these names, so they cannot drift apart.
_SINK_REF_KEY = "replay_ref"
_SINK_PAYLOAD_KEY = "payload"
_SINK_IDENTITY_KEYS = (_SINK_REF_KEY, _SINK_PAYLOAD_KEY)


@dataclasses.dataclass(frozen=True)
class ReplayEntryResult(_Record):
    """One entry's outcome (Contexta's fields)."""

    replay_ref: str
    family: str
    target: str
    status: str
    detail: str = ""
    attempts: int = 0


@dataclasses.dataclass(frozen=True)
class ReplayBatchResult(RecoveryResult):
    """Contexta's ReplayBatchResult fields (and a ``to_dict`` that works), plus our counts.

    ``entries`` holds the first 10,000 entry results; counts cover them all.
    ``already_delivered_count``: entries the sink already held (same replay_ref
    and payload), acknowledged without a second delivery.
    """

    entries: Tuple[ReplayEntryResult, ...] = ()
    acknowledged_count: int = 0
    pending_count: int = 0
    dead_lettered_count: int = 0
    delivered_count: int = 0
    already_delivered_count: int = 0
    failed_count: int = 0
    skipped_count: int = 0
    malformed_count: int = 0
    dry_run: bool = False

    @property
    def exit_code(self) -> int:
        """0 when everything selected was delivered; 1 when anything failed or was dead-lettered."""
        return EXIT_PROBLEMS if (self.failed_count or self.dead_lettered_count) else EXIT_OK


@dataclasses.dataclass(frozen=True)
class SinkReceipt:
    status: str = "SUCCESS"
    detail: str = ""


def _json_line(payload: Any) -> bytes:
    """C-JSONL bytes; a lone surrogate falls back to a \\u escape instead of failing (D5)."""
    try:
        return (_compact_json(payload) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (_COMPACT_ASCII_ENCODER.encode(payload) + "\n").encode("ascii")


# Sink lines refuse NaN and Infinity: a payload such as 1e400 parses to an infinite float,
# which would reach the sink as non-standard JSON that no strict reader accepts.
_SINK_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                                 default=str)
_SINK_ASCII_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                                       default=str)
_NOT_FINITE = "holds a number too large for a float (it reads as Infinity), which standard JSON does not allow"


# The same encoding, made once: JSONEncoder.encode builds a new C encoder on every call, which
# dominated replay's loop.  Without markers it cannot detect a cycle; values parsed from JSON have none.
_C_MAKE_ENCODER = getattr(json.encoder, "c_make_encoder", None)
_REPLAY_ENCODER = None if _C_MAKE_ENCODER is None else _C_MAKE_ENCODER(
    None, str, json.encoder.encode_basestring, None, ":", ",", True, False, False)


def _sink_json(value: Any) -> bytes:
    """C-JSONL bytes of a value, NaN/Infinity refused (ValueError); a lone surrogate becomes a \\u escape."""
    try:
        return _SINK_ENCODER.encode(value).encode("utf-8")
    except UnicodeEncodeError:
        return _SINK_ASCII_ENCODER.encode(value).encode("ascii")


def _parsed_json(value: Any) -> bytes:
    """:func:`_sink_json` of a value parsed from JSON (so free of cycles), the fast way where there is one."""
    if _REPLAY_ENCODER is None:
        return _sink_json(value)
    try:
        return "".join(_REPLAY_ENCODER(value, 0)).encode("utf-8")
    except UnicodeEncodeError:
        return _SINK_ASCII_ENCODER.encode(value).encode("ascii")


def _payload_sha256(payload: Any) -> bytes:
    """The digest that identifies a payload: sha256 of its canonical compact JSON (sorted keys)."""
    return hashlib.sha256(_sink_json(payload)).digest()


def _sink_line(family: str, payload: Any, payload_type: Any, payload_ref: Any, sink_name: str,
               replay_ref: Optional[str] = None) -> bytes:
    """Contexta's sink line; replays also say which outbox entry they delivered."""
    return _sink_line_around(_sink_json(payload), family, payload_type, payload_ref, sink_name, replay_ref)


def _sink_line_around(payload_json: bytes, family: str, payload_type: Any, payload_ref: Any, sink_name: str,
                      replay_ref: Optional[str]) -> bytes:
    """The sink line around a payload already encoded (replay encodes each payload once, for its digest too).

    The keys around the payload sort before and after it, so the line is what
    encoding the whole mapping with sorted keys gives.
    """
    values = (payload_ref, payload_type, replay_ref, sink_name)
    if replay_ref is not None and all(value is None or isinstance(value, str) for value in values):
        tail = _LINE_TAIL % tuple(_encode_text(value) for value in values)  # the common case, without an encoder
    else:
        after = {"payload_ref": payload_ref, "payload_type": payload_type, "sink_name": sink_name}
        if replay_ref is not None:
            after[_SINK_REF_KEY] = replay_ref
        tail = _parsed_json(after)[1:]
    return b"".join((_sink_line_head(family), payload_json, b",", tail, b"\n"))


_LINE_TAIL = b'"payload_ref":%s,"payload_type":%s,"' + _SINK_REF_KEY.encode() + b'":%s,"sink_name":%s}'


def _encode_text(value: Optional[str]) -> bytes:
    """A JSON string (or null), as _parsed_json gives it."""
    if value is None:
        return b"null"
    try:
        return json.encoder.encode_basestring(value).encode("utf-8")
    except UnicodeEncodeError:
        return json.encoder.encode_basestring_ascii(value).encode("ascii")


_LINE_HEADS: Dict[Tuple[str, str], bytes] = {}


def _sink_line_head(family: str) -> bytes:
    """``{"captured_at":...,"family":...,"payload":``, made once per millisecond and family."""
    key = (_capture_timestamp(), family)
    head = _LINE_HEADS.get(key)
    if head is None:
        if len(_LINE_HEADS) > 64:
            _LINE_HEADS.clear()
        head = _LINE_HEADS[key] = (_sink_json({"captured_at": key[0], "family": family})[:-1]
                                   + b',"%s":' % _SINK_PAYLOAD_KEY.encode())
    return head


def _sink_line_identity(raw: bytes) -> Optional[Tuple[str, bytes]]:
    """(replay_ref, payload sha256) of a whole sink line, or None for a line no replay wrote."""
    if not raw.endswith(b"\n"):
        return None
    try:
        line = json_loads(raw)
    except ValueError:
        return None
    if not isinstance(line, dict) or not isinstance(line.get(_SINK_REF_KEY), str) or _SINK_PAYLOAD_KEY not in line:
        return None
    try:
        return line[_SINK_REF_KEY], hashlib.sha256(_parsed_json(line[_SINK_PAYLOAD_KEY])).digest()
    except ValueError:
        return None


_TIMESTAMP_CACHE: Dict[int, str] = {}


def _capture_timestamp() -> str:
    """A TS for sink lines, formatted afresh once per millisecond (formatting dominated the replay loop)."""
    millisecond = time.time_ns() // 1000000
    text = _TIMESTAMP_CACHE.get(millisecond)
    if text is None:
        _TIMESTAMP_CACHE.clear()
        text = _TIMESTAMP_CACHE[millisecond] = _utc_timestamp(
            datetime.fromtimestamp(millisecond / 1e3, timezone.utc))
    return text


class LocalJsonlSink:
    """Contexta's local JSONL sink: one line per payload in ``<root>/<family lower>.jsonl``.

    ``capture`` is there for scripts; replay recognizes this sink and writes
    through its own journaled path instead, which is what makes delivery
    exactly-once.
    """

    def __init__(self, storage_root: Any, *, name: str = "local-jsonl") -> None:
        self.storage_root = Path(storage_root)
        self.name = name

    def file_path_for(self, family: str) -> Path:
        return self.storage_root / ("%s.jsonl" % family.lower())

    def capture(self, *, family: str, payload: Any) -> SinkReceipt:
        family = str(family).upper()
        if family not in PAYLOAD_FAMILIES:
            raise ReplayError("unknown payload family %r" % family, code="sink_family_not_supported")
        self.storage_root.mkdir(parents=True, exist_ok=True)
        target = self.file_path_for(family)
        with open(target, "ab") as handle:
            handle.write(_sink_line(family, payload, type(payload).__name__, None, self.name))
            handle.flush()
            os.fsync(handle.fileno())
        return SinkReceipt("SUCCESS", "appended payload to %s" % target.name)


_FILE_SINK_RECEIPTS = {family: SinkReceipt("SUCCESS", "appended payload to %s.jsonl" % family.lower())
                       for family in PAYLOAD_FAMILIES}


def _refuse_unowned(path: Path, kind: str = "file") -> None:
    """Refuse (exit 3, nothing changed) a path where replay keeps a file or directory but finds something else.

    A symlink would make replay write (or replace) a file elsewhere; a FIFO
    would block it; a directory cannot be appended to.  Missing is fine.
    """
    try:
        mode = os.lstat(str(path)).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        why = "is a symbolic link; replay never writes through one"
    elif (kind == "directory" and stat.S_ISDIR(mode)) or (kind == "file" and stat.S_ISREG(mode)):
        return
    else:
        found = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                 else "a file" if stat.S_ISREG(mode) else "a special file")
        why = "is %s, not a %s" % (found, "regular file" if kind == "file" else kind)
    raise ReplayError("%s %s: nothing was changed" % (path, why), code="replay_unsafe_path", path=path)


_OUTBOX_OWNED_FILES = (OUTBOX_FILE, DEAD_LETTER_FILE, REPLAY_LOCK_FILE, _REPLAY_JOURNAL, _REPLAY_KEPT_TMP,
                       _REPLAY_DEAD_TMP, _REQUEUE_JOURNAL)
_INDEX_SIDE_FILES = ("", "-wal", "-shm", "-journal")


def _refuse_unowned_outbox(outbox_root: Path) -> None:
    _refuse_unowned(outbox_root, "directory")
    for name in _OUTBOX_OWNED_FILES:
        _refuse_unowned(outbox_root / name)


def _refuse_unowned_sink(storage_root: Path) -> None:
    _refuse_unowned(storage_root, "directory")
    for name in _SINK_FILES:
        _refuse_unowned(storage_root / name)
    for suffix in _INDEX_SIDE_FILES:
        _refuse_unowned(storage_root / (SINK_INDEX_FILE + suffix))


_OPEN_FLAGS = {"ab": os.O_WRONLY | os.O_APPEND | os.O_CREAT, "a+b": os.O_RDWR | os.O_APPEND | os.O_CREAT,
               "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC}


def _open_owned(path: Any, mode: str = "ab") -> Any:
    """Open one of replay's own files for writing, never through a symlink and never blocking on a FIFO."""
    flags = (_OPEN_FLAGS[mode] | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = os.open(str(path), flags, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            _refuse_unowned(Path(path))
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            _refuse_unowned(Path(path))
        if fcntl is not None:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~getattr(os, "O_NONBLOCK", 0))
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


class _JournaledFileSink:
    """The built-in sink as replay drives it: append handles whose sizes the journal records.

    After a crash, lines written past the last checkpoint are not rewritten:
    the resumed run re-derives its decisions and recognizes each such line
    (same replay_ref and payload, in order) as already delivered.  Only a
    line the crash tore in half is cut off.
    """

    def __init__(self, storage_root: Path, name: str) -> None:
        self.storage_root = storage_root
        self.name = name
        self.handles: Dict[str, Any] = {}
        self.pending_bytes = 0
        self.recovered: Dict[str, int] = {}  # path -> offset of the next line written before a crash
        self.paths: Dict[str, str] = {}

    def reopen(self, sizes: Mapping[str, int]) -> None:
        for path, size in sizes.items():
            handle = _open_owned(path, "a+b")
            end = handle.seek(0, os.SEEK_END)
            if end > size:
                self.recovered[path] = size
            self.handles[path] = handle

    def path_for(self, family: str) -> str:
        path = self.paths.get(family)
        if path is None:
            path = self.paths[family] = str(self.storage_root / ("%s.jsonl" % family.lower()))
        return path

    def needs_new_file(self, family: str) -> bool:
        return self.path_for(family) not in self.handles

    def open_file(self, family: str) -> None:
        self.storage_root.mkdir(parents=True, exist_ok=True)
        _refuse_unowned(self.storage_root, "directory")  # made by someone else in between
        path = self.path_for(family)
        handle = self.handles[path] = _open_owned(path, "a+b")
        end = handle.seek(0, os.SEEK_END)
        if end:
            handle.seek(end - 1)
            if handle.read(1) != b"\n":  # a line another writer tore: end it, so ours stays whole
                handle.write(b"\n")

    def deliver(self, family: str, line: bytes, identity: Tuple[str, bytes]) -> None:
        path = self.path_for(family)
        handle = self.handles[path]
        if path in self.recovered and self._already_written(path, handle, identity):
            return
        try:
            handle.write(line)
        except OSError as exc:  # per line, a try costs nothing; a context manager would
            raise _named(exc, path)
        self.pending_bytes += len(line)

    def _already_written(self, path: str, handle: Any, identity: Tuple[str, bytes]) -> bool:
        position = self.recovered[path]
        handle.seek(position)
        existing = handle.readline()
        if _sink_line_identity(existing) == identity:
            self.recovered[path] = position + len(existing)
            handle.seek(0, os.SEEK_END)
            if self.recovered[path] >= handle.tell():
                del self.recovered[path]
            return True
        handle.truncate(position)  # not this entry's line: a torn tail, never a delivered line
        handle.seek(0, os.SEEK_END)
        del self.recovered[path]
        return False

    def sync(self) -> Dict[str, int]:
        """fsync every sink file; the sizes delivered so far, for the journal."""
        sizes = {}
        for path, handle in self.handles.items():
            with _naming(path):
                handle.flush()
                os.fsync(handle.fileno())
            sizes[path] = self.recovered.get(path, handle.seek(0, os.SEEK_END))
        self.pending_bytes = 0
        return sizes

    def close(self) -> None:
        for path, handle in self.handles.items():
            if path in self.recovered:  # written before a crash by decisions this run did not repeat
                handle.truncate(self.recovered[path])
                os.fsync(handle.fileno())
            handle.close()
        self.handles.clear()
        self.recovered.clear()


def _truncate_to(path: Any, size: int) -> None:
    """Cut a file back to a checkpointed size (creating it empty if it vanished)."""
    with _open_owned(path, "ab") as handle:
        if handle.tell() > size:
            handle.truncate(size)
        handle.flush()
        os.fsync(handle.fileno())


# -- the sink index -------------------------------------------------------------

_INDEX_VERSION = 1
_INDEX_TAIL_BYTES = 4096  # the last bytes indexed, hashed: a file replaced or rewritten no longer matches
_INDEX_LOOKUP_CHUNK = 500  # refs per query (older SQLite allows at most 999 parameters)
_INDEX_INSERT = "INSERT OR IGNORE INTO delivered (replay_ref, payload_sha256, family) VALUES (?, ?, ?)"
_INDEX_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS sink_files (family INTEGER PRIMARY KEY, name TEXT NOT NULL, inode INTEGER NOT NULL,"
    " indexed_bytes INTEGER NOT NULL, tail_sha256 BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS delivered (replay_ref TEXT NOT NULL, payload_sha256 BLOB NOT NULL,"
    " family INTEGER NOT NULL, PRIMARY KEY (replay_ref, payload_sha256, family)) WITHOUT ROWID",
)

# (replay_ref, payload sha256, index of the family in PAYLOAD_FAMILIES): one sink line's identity in its file.
_SinkKey = Tuple[str, bytes, int]


class SinkIndexError(ReplayError):
    """The sink index could not be read or written (it is a cache: removing it makes the next run rebuild it)."""

    code = "replay_sink_index_failed"


@contextlib.contextmanager
def _index_errors(sink: Any) -> Iterator[None]:
    """SQLite failing under the built-in sink's index (a full disk, say) ends the run in one line (exit 3)."""
    try:
        yield
    except Exception as exc:
        if type(exc).__module__ != "sqlite3" or not isinstance(sink, LocalJsonlSink):
            raise
        path = _sink_index_path(sink.storage_root)
        raise SinkIndexError("sink index %s failed: %s (it only caches what the sink files hold: if it is "
                             "damaged, delete it and the next replay rebuilds it)" % (path, exc), path=path)


class _SinkIndex:
    """(replay_ref, payload sha256) of the lines in the built-in sink's files, in one SQLite file.

    The sink files are the truth; the index follows them and may lag behind.
    Per file it keeps the inode, how many bytes it has read and a digest of
    the last 4 KB of those: a file that shrank or was replaced is indexed
    afresh, lines appended by anyone are read on the next run.  It never
    claims a line that is not durably in its file: lines are added after the
    file is fsynced, in one transaction with the new byte count.
    """

    def __init__(self, connection: Any, storage_root: Path) -> None:
        self.db = connection
        self.storage_root = storage_root
        self.pending: Dict[_SinkKey, None] = {}  # added since the last flush, in order
        self.files: Dict[int, Tuple[int, int, bytes]] = {
            family: (inode, indexed, bytes(tail)) for family, inode, indexed, tail in connection.execute(
                "SELECT family, inode, indexed_bytes, tail_sha256 FROM sink_files")}

    @classmethod
    def open(cls, path: Path, storage_root: Path, *, durable: bool) -> "_SinkIndex":
        """Open (creating) an index; a damaged one or one of another version is replaced by an empty one."""
        import sqlite3
        for attempt in (1, 2):
            connection = sqlite3.connect(str(path), isolation_level=None)
            try:
                if durable:  # one writer (replay holds its lock): no shared memory; a WAL commits cheaply
                    connection.execute("PRAGMA locking_mode=EXCLUSIVE")
                    connection.execute("PRAGMA journal_mode=WAL")
                    connection.execute("PRAGMA synchronous=NORMAL")  # a commit lost to power is a lag, no more
                else:
                    connection.execute("PRAGMA journal_mode=OFF")
                    connection.execute("PRAGMA synchronous=OFF")
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, _INDEX_VERSION):
                    raise sqlite3.DatabaseError("sink index version %s" % version)
                for statement in _INDEX_SCHEMA:
                    connection.execute(statement)
                connection.execute("PRAGMA user_version=%d" % _INDEX_VERSION)
                index = cls(connection, storage_root)
                connection.execute("BEGIN")
                return index
            except sqlite3.DatabaseError as exc:
                connection.close()
                if attempt == 2 or isinstance(exc, sqlite3.OperationalError):  # damaged is rebuilt; busy is not
                    raise
                for suffix in _INDEX_SIDE_FILES:  # a cache: rebuilt from the sink files
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(str(path) + suffix)
        raise AssertionError("unreachable")

    # -- following the sink files ----------------------------------------------

    def valid_start(self, family: int, fd: int, file_stat: os.stat_result) -> int:
        """Where reading the file may resume: what is indexed, when it is still this file's start; else 0."""
        known = self.files.get(family)
        if known is None:
            return 0
        inode, indexed, tail = known
        if inode == file_stat.st_ino and indexed <= file_stat.st_size and _tail_sha256(fd, indexed) == tail:
            return indexed
        return 0

    def forget(self, family: int) -> None:
        self.db.execute("DELETE FROM delivered WHERE family = ?", (family,))
        self.db.execute("DELETE FROM sink_files WHERE family = ?", (family,))
        self.files.pop(family, None)

    def read_lines(self, family: int, handle: Any, start: int, end: int) -> int:
        """Index the whole lines of ``handle`` between ``start`` and ``end``; the offset after the last one."""
        handle.seek(start)
        position = start
        rows: List[_SinkKey] = []
        for raw in handle:
            if position + len(raw) > end or not raw.endswith(b"\n"):
                break
            position += len(raw)
            identity = _sink_line_identity(raw)
            if identity is not None:
                rows.append((identity[0], identity[1], family))
                if len(rows) >= _CHECKPOINT_LINES:
                    self.db.executemany(_INDEX_INSERT, rows)
                    rows = []
        self.db.executemany(_INDEX_INSERT, rows)
        return position

    def mark(self, family: int, fd: int, inode: int, indexed: int) -> None:
        """Record that the file's first ``indexed`` bytes are in the index (effective at the next commit)."""
        tail = _tail_sha256(fd, indexed)
        self.db.execute("INSERT OR REPLACE INTO sink_files (family, name, inode, indexed_bytes, tail_sha256) "
                        "VALUES (?, ?, ?, ?, ?)", (family, _SINK_FILES[family], inode, indexed, tail))
        self.files[family] = (inode, indexed, tail)

    # -- lines delivered now -----------------------------------------------------

    def add(self, key: _SinkKey) -> None:
        self.pending[key] = None

    def flush(self) -> None:
        if self.pending:
            self.db.executemany(_INDEX_INSERT, self.pending)
            self.pending.clear()

    def commit(self) -> None:
        self.flush()
        self.db.execute("COMMIT")
        self.db.execute("BEGIN")

    def lookup(self, keys: Sequence[_SinkKey], families: Optional[Set[int]] = None) -> Set[_SinkKey]:
        """Which of ``keys`` the index holds (only in ``families``, when given)."""
        pending = self.pending
        found = {key for key in keys if key in pending} if pending else set()
        refs = list({key[0] for key in keys})
        wanted: Optional[Set[_SinkKey]] = None  # built only when a row comes back: a first replay finds none
        for first in range(0, len(refs), _INDEX_LOOKUP_CHUNK):
            chunk = refs[first:first + _INDEX_LOOKUP_CHUNK]
            for ref, digest, family in self.db.execute(_lookup_query(len(chunk)), chunk):
                key = (ref, bytes(digest), family)
                wanted = set(keys) if wanted is None else wanted
                if key in wanted and (families is None or family in families):
                    found.add(key)
        return found

    def close(self, *, compact: bool = False) -> None:
        """Close; ``compact`` leaves a plain database file (no WAL beside it) that a reader can open read-only."""
        try:
            if compact:
                self.commit()
                self.db.execute("COMMIT")
                self.db.execute("PRAGMA journal_mode=DELETE")
        finally:
            self.db.close()


@functools.lru_cache(maxsize=None)
def _lookup_query(count: int) -> str:
    return ("SELECT replay_ref, payload_sha256, family FROM delivered WHERE replay_ref IN (%s)"
            % ",".join("?" * count))


def _tail_sha256(fd: int, end: int) -> bytes:
    start = max(0, end - _INDEX_TAIL_BYTES)
    return hashlib.sha256(os.pread(fd, end - start, start)).digest()


def _sink_index_path(storage_root: Path) -> Path:
    return storage_root / SINK_INDEX_FILE


def _open_sink_file(storage_root: Path, family: int) -> Optional[Any]:
    """One of the sink's files for reading (never through a symlink), or None when there is none."""
    try:
        return open_regular(storage_root / _SINK_FILES[family], follow_symlinks=False)
    except FileNotFoundError:
        return None
    except SpecialFileError:
        _refuse_unowned(storage_root / _SINK_FILES[family])
        raise


class _ReplaySinkIndex:
    """The index as a replay keeps it: caught up first, then grown with each checkpoint."""

    def __init__(self, storage_root: Path) -> None:
        storage_root.mkdir(parents=True, exist_ok=True)
        _refuse_unowned(storage_root, "directory")
        self.index = _SinkIndex.open(_sink_index_path(storage_root), storage_root, durable=True)
        self.storage_root = storage_root

    def catch_up(self, limits: Mapping[str, int]) -> None:
        """Index what the sink files hold beyond the index: up to ``limits`` (journaled sizes, by path) if given.

        Bytes past a journaled size are an interrupted run's, recognized line
        by line as that run's decisions are repeated (or cut off), never here.
        """
        changed = False
        for family, name in enumerate(_SINK_FILES):
            handle = _open_sink_file(self.storage_root, family)
            if handle is None:
                if family in self.index.files:
                    self.index.forget(family)
                    changed = True
                continue
            with handle:
                fd = handle.fileno()
                file_stat = os.fstat(fd)
                start = self.index.valid_start(family, fd, file_stat)
                if start == 0 and family in self.index.files:
                    self.index.forget(family)
                    changed = True
                end = min(file_stat.st_size, limits.get(str(self.storage_root / name), file_stat.st_size))
                if end > start:
                    os.fsync(fd)  # what the index claims must be durable first
                    position = self.index.read_lines(family, handle, start, end)
                    if position > start or family not in self.index.files:
                        self.index.mark(family, fd, file_stat.st_ino, position)
                        changed = True
        if changed:
            self.index.commit()
            _crash_point("replay:sink-index-caught-up")

    def commit(self, file_sink: "_JournaledFileSink", sizes: Mapping[str, int]) -> None:
        """After a checkpoint is journaled: the lines delivered so far, and the sizes that hold them."""
        for path, size in sizes.items():
            family = _SINK_FILES.index(os.path.basename(path))
            handle = file_sink.handles[path]
            self.index.mark(family, handle.fileno(), os.fstat(handle.fileno()).st_ino, size)
        self.index.commit()
        _crash_point("replay:sink-index-committed")


class _SinkIndexView:
    """The index as a reader may use it, changing no file: the live index where it is current, else a temporary one.

    The live index is opened read-only, and only when it is a plain database
    file (no WAL or journal beside it: replay leaves it so).  What it lacks -
    a file it has not seen, a tail appended since - is indexed into a
    temporary database in a temporary directory.
    """

    def __init__(self, storage_root: Path) -> None:
        _refuse_unowned_sink(storage_root)
        self.scratch = tempfile.mkdtemp(prefix="contexta-ops-sink-index-")
        try:
            self.temp = _SinkIndex.open(Path(self.scratch) / "index.sqlite", storage_root, durable=False)
            self.live = self._open_live(storage_root)
            self.live_families: Set[int] = set()
            for family in range(len(PAYLOAD_FAMILIES)):
                self._follow(storage_root, family)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open_live(storage_root: Path) -> Optional[_SinkIndex]:
        import sqlite3
        import urllib.parse
        path = _sink_index_path(storage_root)
        if any(os.path.lexists(str(path) + suffix) for suffix in _INDEX_SIDE_FILES[1:]):
            return None
        try:
            with open_regular(path, follow_symlinks=False) as handle:
                header = handle.read(20)
        except (FileNotFoundError, SpecialFileError):
            return None
        if len(header) < 20 or header[18:20] != b"\x01\x01":  # a rollback-journal database, as replay leaves it
            return None
        try:
            connection = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(str(path)), uri=True,
                                         isolation_level=None)
        except sqlite3.Error:
            return None
        try:
            if connection.execute("PRAGMA user_version").fetchone()[0] == _INDEX_VERSION:
                return _SinkIndex(connection, storage_root)
        except sqlite3.Error:
            pass
        connection.close()
        return None

    def _follow(self, storage_root: Path, family: int) -> None:
        handle = _open_sink_file(storage_root, family)
        if handle is None:
            return
        with handle:
            file_stat = os.fstat(handle.fileno())
            start = self.live.valid_start(family, handle.fileno(), file_stat) if self.live is not None else 0
            if start:
                self.live_families.add(family)
            if file_stat.st_size > start:
                self.temp.read_lines(family, handle, start, file_stat.st_size)

    def add(self, key: _SinkKey) -> None:
        self.temp.add(key)

    def flush(self) -> None:
        self.temp.flush()

    def lookup(self, keys: Sequence[_SinkKey]) -> Set[_SinkKey]:
        found = self.temp.lookup(keys)
        if self.live is not None and self.live_families:
            found |= self.live.lookup(keys, self.live_families)
        return found

    def close(self) -> None:
        for index in (getattr(self, "live", None), getattr(self, "temp", None)):
            if index is not None:
                index.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


_FAMILY_INDEX = {family: index for index, family in enumerate(PAYLOAD_FAMILIES)}


def _sink_key(line: "_OutboxLine") -> _SinkKey:
    return (line.replay_ref, hashlib.sha256(line.payload_json).digest(), _FAMILY_INDEX[line.family])


def sink_entries_already_delivered(config: Any, outbox_lines: Iterable[bytes]) -> int:
    """How many of these outbox lines the built-in sink already holds (same replay_ref and payload).

    For ``restore plan``: a backup's outbox brings back entries delivered since
    it was taken; replay acknowledges them without a second delivery.  Changes
    no file: reads the live sink index where it is current, and indexes what
    it lacks in a temporary directory.
    """
    storage_root = Path(config.workspace.exports_path) / "replayed"
    if not os.path.lexists(str(storage_root)):
        return 0
    with _index_errors(LocalJsonlSink(storage_root)):
        return _count_already_delivered(storage_root, outbox_lines)


def _count_already_delivered(storage_root: Path, outbox_lines: Iterable[bytes]) -> int:
    view = _SinkIndexView(storage_root)
    try:
        count = 0
        batch: List[_SinkKey] = []
        for raw in outbox_lines:
            line = _parse_outbox_line(raw) if raw.strip() else None
            if line is not None and not line.reason:
                batch.append(_sink_key(line))
            if len(batch) >= _BATCH_LINES:
                count += _count_found(view, batch)
                batch = []
        return count + _count_found(view, batch)
    finally:
        view.close()


def _count_found(view: _SinkIndexView, keys: List[_SinkKey]) -> int:
    found = view.lookup(keys) if keys else set()
    return sum(1 for key in keys if key in found)


def _outbox_root(config: Any) -> Path:
    """The outbox root, refusing a workspace that is not there (a typo must not read as an empty outbox).

    An outbox inside the workspace needs the workspace; one relocated outside
    it needs at least its parent directory.
    """
    outbox_root = getattr(getattr(config, "recovery", None), "outbox_root", None)
    if outbox_root is None:
        raise ReplayError("config.recovery.outbox_root is not configured", code="recovery_outbox_root_missing")
    outbox_root = Path(outbox_root)
    workspace = getattr(getattr(config, "workspace", None), "root_path", None)
    if workspace is not None and _is_within(outbox_root, workspace):
        _require_workspace(Path(workspace))
    elif not os.path.lexists(str(outbox_root)) and not os.path.isdir(str(outbox_root.parent)):
        raise ReplayError("outbox root %s does not exist, nor does its parent directory" % outbox_root,
                          code="recovery_outbox_root_missing", path=outbox_root)
    if os.path.lexists(str(outbox_root)) and not os.path.isdir(str(outbox_root)):
        raise ReplayError("outbox root %s is not a directory" % outbox_root, code="recovery_outbox_root_invalid",
                          path=outbox_root)
    cache = getattr(getattr(config, "workspace", None), "cache_path", None)
    if cache is not None and os.path.islink(str(Path(cache) / "outbox")):
        # The configuration resolves symlinks, as Contexta's does: the default place is where one shows.
        _refuse_unowned(Path(cache) / "outbox", "directory")
    return outbox_root


def _require_workspace(workspace: Path) -> None:
    if not os.path.isdir(str(workspace)):
        what = "is not a directory" if os.path.lexists(str(workspace)) else "does not exist"
        raise ReplayError("workspace %s %s" % (workspace, what), code="workspace_missing", path=workspace)


def _complete_lines_end(path: Path) -> int:
    """Where this run stops reading: after the last whole line.

    An unterminated last line counts when it is a JSON object, or when the
    file has been still for a while (then it is a torn write, dead-lettered as
    truncated); otherwise a writer may be halfway through it, and it is left.
    """
    with open_regular(path, follow_symlinks=False) as handle:
        file_stat = os.fstat(handle.fileno())
        size = file_stat.st_size
        if size == 0:
            return 0
        position = size
        tail = b""
        while position > 0:
            step = min(65536, position)
            position -= step
            handle.seek(position)
            tail = handle.read(step) + tail
            newline = tail.rfind(b"\n")
            if newline >= 0:
                last_line_start = position + newline + 1
                break
        else:
            last_line_start = 0
        if last_line_start == size:
            return size
        handle.seek(last_line_start)
        unterminated = handle.read()
    try:
        if isinstance(json_loads(unterminated), dict):
            return size
    except ValueError:
        pass
    if time.time() - file_stat.st_mtime >= _IN_FLIGHT_SECONDS:
        return size
    return last_line_start


@dataclasses.dataclass
class _ReplayParams:
    target: Optional[str]
    limit: Optional[int]
    acknowledge_successes: bool
    dead_letter_after_failures: Optional[int]


class _ReplayRun:
    """One pass over the outbox: decide, deliver, checkpoint, commit."""

    def __init__(self, outbox_root: Path, params: _ReplayParams, sink: Any, dry_run: bool) -> None:
        self.outbox_root = outbox_root
        self.outbox = outbox_root / OUTBOX_FILE
        self.dead_letter = outbox_root / DEAD_LETTER_FILE
        self.journal_path = outbox_root / _REPLAY_JOURNAL
        self.kept_path = outbox_root / _REPLAY_KEPT_TMP
        self.dead_path = outbox_root / _REPLAY_DEAD_TMP
        self.params = params
        self.dry_run = dry_run
        self.sink = sink
        self.file_sink: Optional[_JournaledFileSink] = None
        if isinstance(sink, LocalJsonlSink) and not dry_run:
            self.file_sink = _JournaledFileSink(sink.storage_root, sink.name)
        self.index: Optional[_ReplaySinkIndex] = None
        self.index_view: Optional[_SinkIndexView] = None
        self.sink_name = getattr(sink, "name", DEFAULT_REPLAY_SINK)
        self.journal: Dict[str, Any] = {}
        self.counts = {"acknowledged": 0, "delivered": 0, "already": 0, "failed": 0, "skipped": 0, "dead": 0,
                       "malformed": 0, "kept_lines": 0, "selected": 0, "lines": 0}
        self.entries: List[ReplayEntryResult] = []
        self.warnings: List[Notice] = []
        self.kept: Any = None
        self.dead: Any = None
        self.offset = 0
        self.since_checkpoint = 0

    def open_index(self, limits: Mapping[str, int]) -> None:
        """The built-in sink's index, caught up with its files; a dry run reads it without changing a byte."""
        try:
            import sqlite3  # noqa: F401 - part of the standard library, but a Python may be built without it
        except ImportError:
            self.warnings.append(Notice("sink_index_unavailable", "this Python has no sqlite3: entries the sink "
                                        "already holds from before a restore are not recognized"))
            return
        if self.file_sink is not None:
            self.index = _ReplaySinkIndex(self.file_sink.storage_root)
            self.index.catch_up(limits)
        elif self.dry_run and isinstance(self.sink, LocalJsonlSink):
            self.index_view = _SinkIndexView(self.sink.storage_root)

    # -- starting and resuming --------------------------------------------

    def start(self) -> None:
        self.offset = 0
        scan_end = _complete_lines_end(self.outbox)
        outbox_stat = os.lstat(str(self.outbox))
        self.journal = {"version": 1, "state": "delivering", "started_at": _utc_timestamp(),
                        "params": dataclasses.asdict(self.params), "sink_name": self.sink_name,
                        "builtin_sink": None if self.file_sink is None else str(self.file_sink.storage_root),
                        "outbox_ino": outbox_stat.st_ino, "scan_end": scan_end}
        self.open_index({})
        if self.dry_run:
            return
        self.kept = _open_owned(self.kept_path, "wb")
        self.dead = _open_owned(self.dead_path, "wb")
        self.checkpoint()

    def resume(self, journal: Dict[str, Any]) -> None:
        """Roll everything back to the last checkpoint and carry on from there."""
        self.journal = journal
        point = journal["checkpoint"]
        if os.lstat(str(self.outbox)).st_ino != journal["outbox_ino"]:
            raise ReplayError("the outbox %s was replaced since an interrupted replay; its journal %s no longer "
                              "applies - inspect both by hand" % (self.outbox, self.journal_path),
                              code="replay_journal_stale", path=self.journal_path)
        _truncate_to(self.kept_path, point["kept"])
        _truncate_to(self.dead_path, point["dead"])
        self.counts.update(point["counts"])
        self.offset = point["offset"]
        if self.file_sink is not None:
            self.file_sink.reopen(point["sinks"])
        self.open_index(point["sinks"])
        self.kept = _open_owned(self.kept_path, "ab")
        self.dead = _open_owned(self.dead_path, "ab")

    def checkpoint(self) -> None:
        """Make everything so far durable, then record how far that is (the index follows the journal)."""
        sinks = self.file_sink.sync() if self.file_sink is not None else {}
        for handle in (self.kept, self.dead):
            with _naming(handle.name):
                handle.flush()
                os.fsync(handle.fileno())
        self.journal["checkpoint"] = {"offset": self.offset, "sinks": sinks, "kept": self.kept.tell(),
                                      "dead": self.dead.tell(), "counts": dict(self.counts)}
        atomic_write_bytes(self.journal_path, _pretty_json(self.journal))
        self.since_checkpoint = 0
        _crash_point("replay:checkpoint")
        if self.index is not None and self.file_sink is not None:
            self.index.commit(self.file_sink, sinks)

    # -- deciding and delivering -------------------------------------------

    def deliver_all(self) -> None:
        scan_end = self.journal["scan_end"]
        limit = self.params.limit
        checkpoints = not self.dry_run
        file_sink = self.file_sink
        counts = self.counts
        with open_regular(self.outbox, follow_symlinks=False) as outbox:
            outbox.seek(self.offset)
            for batch in _line_batches(outbox, self.offset, scan_end):
                lines = [_parse_outbox_line(raw) for raw in batch]
                keys, known = self.already_in_sink(lines)
                for raw, line, key in zip(batch, lines, keys):
                    if limit is not None and counts["selected"] >= limit:
                        break  # the rest is carried over byte for byte at commit
                    counts["lines"] += 1
                    self.handle_line(raw, line, key, known)
                    self.offset += len(raw)
                    self.since_checkpoint += 1
                    if self.since_checkpoint >= _CHECKPOINT_LINES or (
                            file_sink is not None and file_sink.pending_bytes >= _CHECKPOINT_BYTES):
                        if checkpoints:
                            self.checkpoint()
                        elif self.index_view is not None:
                            self.index_view.flush()
                            self.since_checkpoint = 0
                else:
                    continue
                break
        if not self.dry_run:
            self.journal["carry_from"] = self.offset
            self.checkpoint()

    def already_in_sink(self, lines: Sequence["_OutboxLine"]) -> Tuple[List[Optional[_SinkKey]], Set[_SinkKey]]:
        """Each line's key in the built-in sink (None where it will not go there), and the keys the sink holds."""
        index = self.index.index if self.index is not None else self.index_view
        if index is None:
            return [None] * len(lines), set()
        target = self.params.target
        keys = [_sink_key(line) if not line.reason and (
            target is None or line.entry.get("sink_name") == target) else None  # type: ignore[union-attr]
            for line in lines]
        wanted = [key for key in keys if key is not None]
        return keys, (index.lookup(wanted) if wanted else set())

    def keep(self, raw: bytes) -> None:
        self.counts["kept_lines"] += 1
        if self.kept is not None:
            try:
                self.kept.write(raw if raw.endswith(b"\n") else raw + b"\n")
            except OSError as exc:
                raise _named(exc, self.kept_path)

    def dead_letter_line(self, record: Mapping[str, Any]) -> None:
        self.counts["dead"] += 1
        if self.dead is not None:
            try:
                self.dead.write(_json_line(record))
            except OSError as exc:
                raise _named(exc, self.dead_path)

    def record(self, *fields: Any) -> None:
        """Keep an entry's result (built only while under the cap: memory stays flat)."""
        if len(self.entries) < _ENTRY_RESULTS_KEPT:
            self.entries.append(ReplayEntryResult(*fields))

    def handle_line(self, raw: bytes, line: "_OutboxLine", key: Optional[_SinkKey], known: Set[_SinkKey]) -> None:
        if not raw.strip():
            return  # blank lines vanish, as in Contexta
        replay_ref = line.replay_ref
        if line.reason:
            self.counts["malformed"] += 1
            self.dead_letter_line(_malformed_record(raw, line.reason, replay_ref))
            self.record(replay_ref, "UNKNOWN", self.sink_name, "FAILURE", "dead-lettered: %s" % line.reason, 0)
            return
        entry = line.entry
        assert entry is not None
        changed = entry.get("replay_ref") != replay_ref
        if changed:
            entry["replay_ref"] = replay_ref
        attempts = entry.get("attempts", 0)
        if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 0:
            self.warnings.append(Notice("attempts_not_integer", "%s has attempts=%r, counted as 0"
                                        % (replay_ref, attempts)))
            attempts = 0
        target = self.params.target
        if target is not None and entry.get("sink_name") != target:
            self.counts["skipped"] += 1
            self.record(replay_ref, str(entry["family"]), target, "SKIPPED",
                        "entry target does not match selected target", attempts)
            self.keep(_json_line(entry) if changed else raw)
            return
        self.counts["selected"] += 1
        if key is not None and key in known:
            self.counts["already"] += 1
            self.record(replay_ref, str(entry["family"]), self.sink_name, "SUCCESS", "already in the sink (%s): "
                        "acknowledged, not delivered again" % _SINK_FILES[key[2]], attempts)
        elif self.file_sink is not None:
            # Our own file sink failing to write is fatal (never retried); the journal lets
            # the next run finish the batch.
            receipt = self.send(line, replay_ref, key, known)
            self.delivered(entry, replay_ref, attempts, receipt)
        else:
            try:
                receipt = self.send(line, replay_ref, key, known)
            except Exception as exc:  # a script's sink failed this entry: count it and requeue it
                self.fail(entry, replay_ref, attempts, str(exc) or type(exc).__name__)
                return
            self.delivered(entry, replay_ref, attempts, receipt)
        if self.params.acknowledge_successes:
            self.counts["acknowledged"] += 1
        else:
            self.keep(_json_line(entry) if changed else raw)

    def delivered(self, entry: Dict[str, Any], replay_ref: str, attempts: int, receipt: Any) -> None:
        self.counts["delivered"] += 1
        if len(self.entries) < _ENTRY_RESULTS_KEPT:
            status = getattr(receipt, "status", "SUCCESS")
            status = str(getattr(status, "value", status)).upper()  # a script's sink may return an enum
            self.record(replay_ref, str(entry["family"]), self.sink_name, status,
                        str(getattr(receipt, "detail", "")), attempts)

    def send(self, line: "_OutboxLine", replay_ref: str, key: Optional[_SinkKey], known: Set[_SinkKey]) -> Any:
        entry = line.entry
        assert entry is not None
        if self.dry_run:
            self.remember(key, known)
            return SinkReceipt("SUCCESS", "dry run: would deliver to %s" % self.sink_name)
        if self.file_sink is not None:
            family = line.family
            if self.file_sink.needs_new_file(family):
                self.file_sink.open_file(family)
                self.checkpoint()  # the new file's starting size is journaled before it grows
            payload_type = entry.get("payload_type") or type(entry["payload"]).__name__
            identity = (replay_ref, key[1] if key is not None else hashlib.sha256(line.payload_json).digest())
            self.file_sink.deliver(family, _sink_line_around(line.payload_json, family, payload_type,
                                                             entry.get("payload_ref"), self.sink_name, replay_ref),
                                   identity)
            self.remember(key, known)  # only once its line is written: the next checkpoint makes both durable
            return _FILE_SINK_RECEIPTS[family]
        return self.sink.capture(family=line.family, payload=entry["payload"])

    def remember(self, key: Optional[_SinkKey], known: Set[_SinkKey]) -> None:
        """An entry just delivered: known to the index from now on, and to the rest of this batch."""
        if key is not None:
            (self.index.index if self.index is not None else self.index_view).add(key)  # type: ignore[union-attr]
            known.add(key)

    def fail(self, entry: Dict[str, Any], replay_ref: str, attempts: int, error: str) -> None:
        updated = dict(entry)
        updated["attempts"] = attempts + 1
        updated["last_replayed_at"] = _utc_timestamp()
        updated["last_error"] = error
        self.counts["failed"] += 1
        self.record(replay_ref, str(entry["family"]), self.sink_name, "FAILURE", error, attempts + 1)
        threshold = self.params.dead_letter_after_failures
        if threshold is not None and attempts + 1 >= threshold:
            self.dead_letter_line(updated)
        else:
            self.keep(_json_line(updated))

    # -- committing ------------------------------------------------------------

    def commit(self) -> int:
        """Dead letters first, then the new outbox by atomic rename; returns the pending line count."""
        self.journal["state"] = "committing"
        if "dead_letter_size" not in self.journal:
            self.journal["dead_letter_size"] = self.dead_letter.stat().st_size if self.dead_letter.exists() else 0
        atomic_write_bytes(self.journal_path, _pretty_json(self.journal))
        _crash_point("replay:committing")
        return self.finish_commit()

    def finish_commit(self) -> int:
        for handle in (self.kept, self.dead):
            if handle is not None:
                handle.close()
        if self.file_sink is not None:
            self.file_sink.close()
        self.close_index(compact=True)
        if self.dead_path.exists() and self.dead_path.stat().st_size:
            _truncate_to(self.dead_letter, self.journal["dead_letter_size"])
            with _open_owned(self.dead_letter) as out, open_regular(self.dead_path, follow_symlinks=False) as source:
                shutil.copyfileobj(source, out, _CHUNK)
                out.flush()
                os.fsync(out.fileno())
            _crash_point("replay:dead-letters-appended")
        pending = self.counts["kept_lines"]
        fd, tmp_name = tempfile.mkstemp(prefix="tmp", dir=str(self.outbox_root))
        old = open_regular(self.outbox, follow_symlinks=False)
        try:
            with os.fdopen(fd, "wb") as out:
                with open_regular(self.kept_path, follow_symlinks=False) as kept:
                    shutil.copyfileobj(kept, out, _CHUNK)
                old.seek(self.journal["carry_from"])
                copied_end, lines = _copy_lines(old, out)
                pending += lines
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp_name, stat.S_IMODE(os.fstat(old.fileno()).st_mode))
            _crash_point("replay:new-outbox-written")
            previous = self.outbox_root / _REPLAY_PREVIOUS
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(previous))  # left by a run killed before its journal named it
            self.journal["carry"] = {"previous": _REPLAY_PREVIOUS, "from": copied_end}
            atomic_write_bytes(self.journal_path, _pretty_json(self.journal))
            os.link(str(self.outbox), str(previous))
            os.replace(tmp_name, str(self.outbox))
            _fsync_dir(self.outbox_root)
            _crash_point("replay:outbox-replaced")
            pending += _carry_late_appends(old, copied_end, self.outbox)
            _crash_point("replay:late-appends-carried")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        finally:
            old.close()
        self.cleanup()
        return pending

    def abandon(self) -> None:
        """Close every handle of a failed run without letting a failing flush escape later.

        What reached disk stays for the journal; a close whose flush fails still releases the file.
        """
        handles = [self.kept, self.dead] + (list(self.file_sink.handles.values()) if self.file_sink else [])
        for handle in handles:
            if handle is not None and not handle.closed:
                with contextlib.suppress(OSError, ValueError):
                    handle.close()
        with contextlib.suppress(Exception):  # what the index did not commit is rolled back: a lag, no more
            self.close_index()

    def close_index(self, compact: bool = False) -> None:
        if self.index is not None:
            index, self.index = self.index, None
            index.index.close(compact=compact)
        if self.index_view is not None:
            view, self.index_view = self.index_view, None
            view.close()

    def cleanup(self) -> None:
        for path in (self.kept_path, self.dead_path, self.outbox_root / _REPLAY_PREVIOUS):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(path))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(self.journal_path))
        _fsync_dir(self.outbox_root)


_SETTLE_SECONDS = 0.05
_SETTLE_LIMIT_SECONDS = 2.0


def _carry_from_previous(outbox_root: Path, journal: Mapping[str, Any], outbox: Path) -> int:
    """After a kill between the outbox's swap and its carry-over: carry what writers appended to the old one."""
    carry = journal.get("carry")
    previous = outbox_root / _REPLAY_PREVIOUS
    if not isinstance(carry, dict) or not isinstance(carry.get("from"), int) or _path_kind(previous) != "file":
        return 0
    with open_regular(previous, follow_symlinks=False) as old:
        return _carry_late_appends(old, carry["from"], outbox)


def _carry_late_appends(old: Any, copied_end: int, outbox: Path) -> int:
    """Move lines a writer appended to the replaced outbox file into the new one; their count.

    A writer that opened the old file just before the rename still appends to
    it.  Writers open, append and close, so once the old file has stayed the
    same size for a moment, nobody is left writing to it.  A line still
    unterminated then will never be finished; it is carried over as it is.
    """
    lines = 0
    deadline = time.monotonic() + _SETTLE_LIMIT_SECONDS
    while True:
        settled = time.monotonic() > deadline
        if os.fstat(old.fileno()).st_size > copied_end:
            old.seek(copied_end)
            with _open_owned(outbox) as out:
                copied_end, added = _copy_lines(old, out, finish=settled)
                out.flush()
                os.fsync(out.fileno())
            lines += added
        if settled:
            return lines
        size = os.fstat(old.fileno()).st_size
        time.sleep(_SETTLE_SECONDS)
        if os.fstat(old.fileno()).st_size == size:
            deadline = 0  # still for a moment: one last pass, which also carries a torn tail


def _copy_lines(source: Any, out: Any, finish: bool = False) -> Tuple[int, int]:
    """Copy whole lines from the current position; (offset after the last one copied, lines copied).

    A final unterminated line is left where it is - a writer may be halfway
    through it - unless ``finish``, when it is copied and terminated.
    """
    start = source.tell()
    lines = 0
    pending = b""
    while True:
        chunk = source.read(_CHUNK)
        if not chunk:
            break
        chunk = pending + chunk
        cut = chunk.rfind(b"\n") + 1
        out.write(chunk[:cut])
        lines += chunk.count(b"\n", 0, cut)
        start += cut
        pending = chunk[cut:]
    if pending and finish:
        out.write(pending + b"\n")
        start += len(pending)
        lines += 1
    return start, lines


def _derived_replay_ref(raw: bytes) -> str:
    """A stable ref for an entry that has none: a hash of its line."""
    return "replay:derived.%s" % hashlib.sha256(raw.rstrip(b"\r\n")).hexdigest()[:16]


class _OutboxLine:
    """One outbox line, decided: what replay, status and requeue read from it."""

    __slots__ = ("entry", "family", "reason", "replay_ref", "payload_json")

    def __init__(self, entry: Optional[Dict[str, Any]], family: str, reason: str, replay_ref: str,
                 payload_json: bytes) -> None:
        self.entry = entry  # the JSON object, when the line is one
        self.family = family  # upper-cased, when the line can be replayed
        self.reason = reason  # why it cannot be replayed; "" when it can
        self.replay_ref = replay_ref  # its own, or one derived from the line's bytes
        self.payload_json = payload_json  # the payload's canonical compact JSON, when it can be replayed


def _parse_outbox_line(raw: bytes) -> _OutboxLine:
    """Decide one outbox line; a line that cannot be replayed gets a reason that says why."""
    try:
        entry = json_loads(raw)  # a leading byte-order mark is accepted
    except JsonInputError as exc:
        return _OutboxLine(None, "", _unparsable_reason(raw, str(exc)), _derived_replay_ref(raw), b"")
    if not isinstance(entry, dict):
        return _OutboxLine(None, "", "not a JSON object", _derived_replay_ref(raw), b"")
    own_ref = entry.get("replay_ref")
    replay_ref = own_ref if isinstance(own_ref, str) and own_ref.strip() else _derived_replay_ref(raw)
    family = str(entry.get("family")).upper()
    if "family" not in entry:
        reason = "missing family"
    elif "payload" not in entry:
        reason = "missing payload"
    elif family not in PAYLOAD_FAMILIES:
        reason = "unknown family %r" % (entry["family"],)
    else:
        try:
            return _OutboxLine(entry, family, "", replay_ref, _parsed_json(entry["payload"]))
        except ValueError:
            reason = "payload " + _NOT_FINITE
    return _OutboxLine(entry, "", reason, replay_ref, b"")


def _unparsable_reason(raw: bytes, refusal: str) -> str:
    """Why json_loads refused a line, as a dead letter's reason ("line is nested deeper than 64 levels")."""
    if refusal.startswith("is not valid JSON"):
        return "truncated line (no newline, not JSON)" if not raw.endswith(b"\n") else "not JSON"
    if refusal.startswith("is not valid UTF-8"):
        return "not valid UTF-8"
    return "line %s" % refusal


def _malformed_record(raw: bytes, reason: str, replay_ref: str) -> Dict[str, Any]:
    record: Dict[str, Any] = {"replay_ref": replay_ref, "malformed": True, "reason": reason,
                              "dead_lettered_at": _utc_timestamp()}
    try:
        record["raw_line"] = raw.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError:
        record["raw_line_base64"] = base64.b64encode(raw.rstrip(b"\r\n")).decode("ascii")
    return record


def _resolve_replay_sink(config: Any, target: Optional[str], sinks: Optional[Sequence[Any]]) -> Any:
    if sinks:
        if target is None:
            return sinks[0]
        for sink in sinks:
            if getattr(sink, "name", None) == target:
                return sink
        raise ReplayError("no sink named %r was provided" % target, code="recovery_replay_target_missing")
    return LocalJsonlSink(Path(config.workspace.exports_path) / "replayed", name=target or DEFAULT_REPLAY_SINK)


def replay_outbox(config: Any, target: Optional[str] = None, limit: Optional[int] = None,
                  acknowledge_successes: bool = True, dead_letter_after_failures: Optional[int] = None,
                  sinks: Optional[Sequence[Any]] = None, *, dry_run: bool = False) -> ReplayBatchResult:
    """Re-deliver the outbox's failed deliveries (``contexta.recovery.replay_outbox``'s contract).

    Holds ``flock(<outbox_root>/replay.lock)`` (exit 4 if held).  First
    finishes a replay that was killed, then replays.  Delivery to the built-in
    sink (or a :class:`LocalJsonlSink` passed in ``sinks``) is exactly-once
    across crashes; a script's own sink is called at least once per entry.
    ``dry_run`` reports what would happen and changes no byte.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ReplayError("limit must be a non-negative integer", code="replay_invalid_limit")
    if dead_letter_after_failures is not None and (
            not isinstance(dead_letter_after_failures, int) or dead_letter_after_failures < 1):
        raise ReplayError("dead_letter_after_failures must be a positive integer", code="replay_invalid_threshold")
    outbox_root = _outbox_root(config)
    params = _ReplayParams(target, limit, acknowledge_successes, dead_letter_after_failures)
    sink = _resolve_replay_sink(config, target, sinks)
    _refuse_unowned_outbox(outbox_root)
    if isinstance(sink, LocalJsonlSink):
        _refuse_unowned_sink(sink.storage_root)
    if not (outbox_root / OUTBOX_FILE).is_file() and not (outbox_root / _REPLAY_JOURNAL).exists():
        return ReplayBatchResult(status="SUCCESS", notes=("outbox_empty",), dry_run=dry_run)
    lock_path = outbox_root / REPLAY_LOCK_FILE
    if dry_run:
        if _lock_is_held(lock_path):
            raise LockedError("outbox %s is locked by another replay (%s)" % (outbox_root, lock_path), path=lock_path)
        return _replay_once(outbox_root, params, sink, dry_run=True, notes=[])
    with _Lock(lock_path, what="outbox %s" % outbox_root):
        notes = []
        _finish_interrupted_requeue(outbox_root)
        resumed = _finish_interrupted_replay(config, outbox_root, sinks)
        if resumed is not None:
            notes.append("resumed_interrupted_replay:acknowledged=%d" % resumed.acknowledged_count)
        if not (outbox_root / OUTBOX_FILE).is_file():
            return ReplayBatchResult(status="SUCCESS", notes=tuple(notes + ["outbox_empty"]))
        return _replay_once(outbox_root, params, sink, dry_run=False, notes=notes)


def _replay_once(outbox_root: Path, params: _ReplayParams, sink: Any, dry_run: bool,
                 notes: List[str]) -> ReplayBatchResult:
    run = _ReplayRun(outbox_root, params, sink, dry_run)
    try:
        with _index_errors(sink):
            run.start()
            progress = _Progress("replay %s" % run.outbox)
            run.deliver_all()
            progress.finish()
            if dry_run:
                pending = run.counts["kept_lines"] + _count_lines_from(run.outbox, run.offset)
                run.close_index()
            else:
                pending = run.commit()
    except BaseException:
        run.abandon()
        raise
    return _replay_result(run, pending, notes, dry_run)


def _line_batches(handle: Any, offset: int, scan_end: int) -> Iterator[List[bytes]]:
    """The lines from ``offset`` (the handle's position) to ``scan_end``, a batch at a time (the last one cut there)."""
    while offset < scan_end:
        batch = handle.readlines(_BATCH_BYTES)
        if not batch:
            return
        end = offset + sum(len(raw) for raw in batch)
        if end > scan_end:  # the batch runs past where this run stops: keep what lies before it
            kept = []
            for raw in batch:
                if offset >= scan_end:
                    break
                kept.append(raw[:scan_end - offset])
                offset += len(kept[-1])
            yield kept
            return
        offset = end
        yield batch


def _count_lines_from(path: Path, offset: int) -> int:
    with open(path, "rb") as handle:
        handle.seek(offset)
        count = 0
        last = b"\n"
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (0 if last == b"\n" else 1)


def _replay_result(run: _ReplayRun, pending: int, notes: List[str], dry_run: bool) -> ReplayBatchResult:
    counts = run.counts
    results = counts["delivered"] + counts["already"] + counts["failed"] + counts["skipped"] + counts["malformed"]
    failures = counts["failed"] + counts["malformed"]
    status = "DEGRADED" if (failures or counts["skipped"]) else "SUCCESS"
    if results and failures == results:
        status = "FAILURE"
    notes = list(notes)
    if counts["dead"]:
        notes.append("dead_lettered:%d" % counts["dead"])
    if dry_run:
        notes.append("dry_run")
    if len(run.entries) < results:
        notes.append("entry_results_truncated:%d" % (results - len(run.entries)))
    return ReplayBatchResult(
        status=status, warnings=tuple(run.warnings[:100]), notes=tuple(notes),
        details={"outbox": str(run.outbox), "sink_name": run.sink_name, "lines_read": counts["lines"]},
        entries=tuple(run.entries), acknowledged_count=counts["acknowledged"], pending_count=pending,
        dead_lettered_count=counts["dead"], delivered_count=counts["delivered"],
        already_delivered_count=counts["already"], failed_count=counts["failed"], skipped_count=counts["skipped"],
        malformed_count=counts["malformed"], dry_run=dry_run)


def _finish_interrupted_replay(config: Any, outbox_root: Path,
                               sinks: Optional[Sequence[Any]]) -> Optional[ReplayBatchResult]:
    """Complete a replay that was killed, from its journal, before anything else happens."""
    journal_path = outbox_root / _REPLAY_JOURNAL
    if not journal_path.exists():
        for leftover in (_REPLAY_KEPT_TMP, _REPLAY_DEAD_TMP, _REPLAY_PREVIOUS):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(outbox_root / leftover))
        return None
    try:
        journal = json_loads(read_regular(journal_path, follow_symlinks=False))
        params = _ReplayParams(**journal["params"])
        journal["checkpoint"]["offset"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ReplayError("replay journal %s is unreadable; inspect the outbox by hand" % journal_path,
                          code="replay_journal_invalid", path=journal_path)
    if journal.get("builtin_sink"):
        sink: Any = LocalJsonlSink(Path(journal["builtin_sink"]), name=journal["sink_name"])
    else:
        sink = _resolve_replay_sink(config, params.target, sinks)
    run = _ReplayRun(outbox_root, params, sink, dry_run=False)
    try:
        with _index_errors(sink):
            return _resume_replay(run, journal)
    except BaseException:
        run.abandon()
        raise


def _resume_replay(run: "_ReplayRun", journal: Dict[str, Any]) -> ReplayBatchResult:
    if journal.get("state") == "committing":
        if os.lstat(str(run.outbox)).st_ino != journal["outbox_ino"]:  # the new outbox was already in place
            _carry_from_previous(run.outbox_root, journal, run.outbox)
            run.cleanup()
            return ReplayBatchResult(status="SUCCESS", acknowledged_count=journal["checkpoint"]["counts"][
                "acknowledged"])
        run.journal = journal
        run.counts.update(journal["checkpoint"]["counts"])
        pending = run.finish_commit()
    else:
        run.resume(journal)
        run.deliver_all()
        pending = run.commit()
    return _replay_result(run, pending, [], False)


@dataclasses.dataclass(frozen=True)
class OutboxStatus(_Record):
    """``replay status``: what is pending and dead-lettered, by family and sink.

    ``status`` is DEGRADED when anything is dead-lettered or a pending line cannot be replayed.
    """

    status: str
    outbox_root: Path
    pending_count: int = 0
    pending_by_family: Mapping[str, int] = dataclasses.field(default_factory=dict)
    pending_by_sink: Mapping[str, int] = dataclasses.field(default_factory=dict)
    dead_lettered_count: int = 0
    dead_lettered_by_family: Mapping[str, int] = dataclasses.field(default_factory=dict)
    dead_lettered_by_sink: Mapping[str, int] = dataclasses.field(default_factory=dict)
    malformed_pending: int = 0
    malformed_dead_lettered: int = 0
    oldest_failed_at: Optional[str] = None
    most_common_last_error: Optional[str] = None
    most_common_last_error_count: int = 0
    replay_running: bool = False
    interrupted_replay: bool = False
    problems: Tuple[Problem, ...] = ()


_ERRORS_TRACKED = 1000


def outbox_status(config: Any) -> OutboxStatus:
    """Count the outbox and dead-letter queue in one streaming pass each.  Changes nothing.

    An outbox file that is a symlink, directory or FIFO is an error (exit 3), as for replay.
    """
    outbox_root = _outbox_root(config)
    _refuse_unowned_outbox(outbox_root)
    return _tally_outbox(outbox_root)


class _QueueTally:
    """Counts of one queue file (the outbox or the dead letters)."""

    def __init__(self) -> None:
        self.count = 0
        self.malformed = 0
        self.by_family: Dict[str, int] = {}
        self.by_sink: Dict[str, int] = {}

    def take(self, line: _OutboxLine) -> None:
        self.count += 1
        if line.reason:
            self.malformed += 1
            return
        assert line.entry is not None
        sink = str(line.entry.get("sink_name"))
        self.by_family[line.family] = self.by_family.get(line.family, 0) + 1
        self.by_sink[sink] = self.by_sink.get(sink, 0) + 1


def _queue_lines(path: Path, problems: List[Problem]) -> Iterator[Tuple[int, _OutboxLine]]:
    """(line number, decided line) of a queue file; one that is not a regular file is a problem, never opened."""
    try:
        handle = open_regular(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    except SpecialFileError as exc:
        problems.append(Problem("replay_unsafe_path", str(path), "%s; replay refuses it" % exc.strerror))
        return
    with handle:
        for line_number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield line_number, _parse_outbox_line(raw)


def _tally_outbox(outbox_root: Path) -> OutboxStatus:
    problems: List[Problem] = []
    errors: Dict[str, int] = {}
    oldest: Optional[str] = None
    pending, dead = _QueueTally(), _QueueTally()
    outbox = outbox_root / OUTBOX_FILE
    for line_number, line in _queue_lines(outbox, problems):
        pending.take(line)
        if line.reason:
            problems.append(Problem("outbox_line_malformed", str(outbox), "line %d: %s" % (line_number, line.reason)))
            continue
        assert line.entry is not None
        failed_at = line.entry.get("failed_at")
        if isinstance(failed_at, str) and (oldest is None or failed_at < oldest):
            oldest = failed_at
        error = line.entry.get("last_error", line.entry.get("error"))
        if isinstance(error, str) and (error in errors or len(errors) < _ERRORS_TRACKED):
            errors[error] = errors.get(error, 0) + 1
    for _line_number, line in _queue_lines(outbox_root / DEAD_LETTER_FILE, problems):
        dead.take(line)
    common = max(errors.items(), key=lambda item: item[1]) if errors else (None, 0)
    return OutboxStatus(
        status="DEGRADED" if (problems or dead.count) else "SUCCESS",
        outbox_root=outbox_root, pending_count=pending.count, pending_by_family=dict(sorted(pending.by_family.items())),
        pending_by_sink=dict(sorted(pending.by_sink.items())), malformed_pending=pending.malformed,
        dead_lettered_count=dead.count, dead_lettered_by_family=dict(sorted(dead.by_family.items())),
        dead_lettered_by_sink=dict(sorted(dead.by_sink.items())), malformed_dead_lettered=dead.malformed,
        oldest_failed_at=oldest, most_common_last_error=common[0], most_common_last_error_count=common[1],
        replay_running=_replay_lock_held(outbox_root / REPLAY_LOCK_FILE),
        interrupted_replay=os.path.lexists(str(outbox_root / _REPLAY_JOURNAL)), problems=tuple(problems[:100]))


def _replay_lock_held(lock_path: Path) -> bool:
    """Whether a replay or requeue holds the lock; a lock path that is not a plain file is never opened."""
    try:
        return stat.S_ISREG(os.lstat(str(lock_path)).st_mode) and _lock_is_held(lock_path)
    except FileNotFoundError:
        return False


@dataclasses.dataclass(frozen=True)
class RequeueResult(_Record):
    """``replay requeue``: dead letters moved back to the end of the outbox, oldest first."""

    status: str
    requeued_count: int = 0
    remaining_dead_lettered: int = 0
    requeued_refs: Tuple[str, ...] = ()
    skipped_malformed: int = 0
    notes: Tuple[str, ...] = ()



def requeue_dead_letters(config: Any, limit: Optional[int] = None, ref: Optional[str] = None) -> RequeueResult:
    """Move dead letters back to pending (oldest first), like an SQS redrive.  Malformed ones stay.

    The lines to move are written to a journal first; then the dead-letter
    file is replaced without them, then they are appended to the outbox.  A
    run killed in between is completed by the next replay or requeue.
    """
    outbox_root = _outbox_root(config)
    _refuse_unowned_outbox(outbox_root)
    dead_path = outbox_root / DEAD_LETTER_FILE
    if not dead_path.is_file():
        return RequeueResult(status="SUCCESS", notes=("dead_letter_empty",))
    with _Lock(outbox_root / REPLAY_LOCK_FILE, what="outbox %s" % outbox_root):
        _finish_interrupted_requeue(outbox_root)
        moved: List[bytes] = []
        refs: List[str] = []
        remaining = 0
        skipped = 0
        fd, tmp_name = tempfile.mkstemp(prefix="tmp", dir=str(outbox_root))
        try:
            with os.fdopen(fd, "wb") as rest, open_regular(dead_path, follow_symlinks=False) as source:
                for raw in source:
                    if not raw.strip():
                        continue
                    line = _parse_outbox_line(raw)
                    entry = line.entry
                    wanted = (limit is None or len(moved) < limit) and (ref is None or line.replay_ref == ref)
                    if wanted and line.reason:
                        skipped += 1
                    if wanted and entry is not None and not line.reason:
                        entry["requeued_at"] = _utc_timestamp()
                        moved.append(_json_line(entry))
                        refs.append(str(entry.get("replay_ref")))
                    else:
                        remaining += 1
                        rest.write(raw if raw.endswith(b"\n") else raw + b"\n")
                rest.flush()
                os.fsync(rest.fileno())
            if not moved:
                os.unlink(tmp_name)
                return RequeueResult(status="SUCCESS", remaining_dead_lettered=remaining, skipped_malformed=skipped,
                                     notes=("nothing_to_requeue",))
            journal = {"lines": [text.decode("utf-8") for text in moved], "dead_ino": os.lstat(str(dead_path)).st_ino}
            atomic_write_bytes(outbox_root / _REQUEUE_JOURNAL, _pretty_json(journal))
            _crash_point("requeue:journal-written")
            os.replace(tmp_name, str(dead_path))
            _fsync_dir(outbox_root)
            _crash_point("requeue:dead-letters-replaced")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        _finish_interrupted_requeue(outbox_root)
    return RequeueResult(status="SUCCESS", requeued_count=len(moved), remaining_dead_lettered=remaining,
                         requeued_refs=tuple(refs[:1000]), skipped_malformed=skipped)


def _finish_interrupted_requeue(outbox_root: Path) -> None:
    """Append journaled lines to the outbox unless they are already there (caller holds the lock)."""
    journal_path = outbox_root / _REQUEUE_JOURNAL
    if not journal_path.exists():
        return
    journal = json_loads(read_regular(journal_path, follow_symlinks=False))
    dead_path = outbox_root / DEAD_LETTER_FILE
    if dead_path.exists() and os.lstat(str(dead_path)).st_ino == journal["dead_ino"]:
        os.unlink(str(journal_path))  # killed before the dead letters were replaced: nothing moved
        return
    data = "".join(journal["lines"]).encode("utf-8")
    outbox = outbox_root / OUTBOX_FILE
    with _open_owned(outbox, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        already = 0
        if "appended_at" in journal and size >= journal["appended_at"]:
            handle.seek(journal["appended_at"])
            present = handle.read(len(data))
            while already < len(present) and present[already] == data[already]:
                already += 1
        if already < len(data):
            if already == 0:
                journal["appended_at"] = size
                atomic_write_bytes(journal_path, _pretty_json(journal))
            handle.seek(0, os.SEEK_END)
            handle.write(data[already:])
            handle.flush()
            os.fsync(handle.fileno())
    _crash_point("requeue:appended")
    os.unlink(str(journal_path))
    _fsync_dir(outbox_root)


# ---------------------------------------------------------------------------
# Artifacts: verification and transfer
# ---------------------------------------------------------------------------
#
# Contexta's artifact store, byte for byte: object paths, binding JSON,
# history events and export packages.  What we fix: a package is verified
# completely (names, refs, size and sha256 of the body against its binding)
# before anything is written; every write goes through a temp file and a
# rename; and each put/import is journaled in ``staging/`` (which Contexta's
# orphan sweep never looks at), with the binding as its commit point, so the
# next artifact command rolls an interrupted one back - or forward, once its
# binding is written.  Bodies always sit where readers look (D6).

PACKAGE_FORMAT_VERSION = "contexta-artifact-export-v1"
_ARTIFACT_DIRS = ("bindings", "objects", "staging", "exports", "history/bindings", "quarantine")
_STORE_LOCK = "staging/contexta-ops.lock"
_WRITE_JOURNAL_SUFFIX = ".contexta-ops-write.json"
# Where a manifest's object sits inside a write journal: journal > events > event > payload > binding > manifest.
_MANIFEST_DEPTH_IN_JOURNAL = 5
_REF_KIND = re.compile(r"^[a-z][a-z0-9_]*$")
_REF_COMPONENT = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_LOWER_SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
_PRODUCER_REF = re.compile(r"^[a-z][a-z0-9-]*(?:\.[a-z][a-z0-9-]*)*$")
_TIMESTAMP = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?Z$")
_REF_COMPONENT_COUNTS = {"project": (1,), "run": (2,), "deployment": (2,), "stage": (3,), "batch": (4,),
                         "sample": (4, 5), "op": (4, 5), "record": (3,), "artifact": (3,)}
_OPTIONAL_REF_KINDS = (("deployment_execution_ref", "deployment"), ("stage_execution_ref", "stage"),
                       ("batch_execution_ref", "batch"), ("sample_observation_ref", "sample"),
                       ("operation_context_ref", "op"))


def _validate_ref(field_name: str, value: Any, kind: str) -> List[str]:
    """Contexta's StableRef rules; the ref's dotted components."""
    if not isinstance(value, str):
        raise ArtifactError("%s must be a string" % field_name, code="stable_ref_invalid_text")
    if value.count(":") != 1:
        raise ArtifactError("%s %r must be kind:value with exactly one ':'" % (field_name, value),
                            code="stable_ref_invalid_text")
    ref_kind, ref_value = value.split(":")
    if not _REF_KIND.match(ref_kind):
        raise ArtifactError("%s %r has an invalid kind" % (field_name, value), code="stable_ref_invalid_kind")
    if ref_kind != kind:
        raise ArtifactError("%s %r must be a %s: ref" % (field_name, value, kind), code="stable_ref_kind_mismatch")
    if len(value) > 255:
        raise ArtifactError("%s is longer than 255 characters" % field_name, code="stable_ref_too_long")
    components = ref_value.split(".")
    for component in components:
        if len(component) > 63 or not _REF_COMPONENT.match(component):
            raise ArtifactError("%s %r: component %r is not lowercase letters, digits and inner dashes (<= 63)"
                                % (field_name, value, component), code="stable_ref_invalid_value")
    if len(components) not in _REF_COMPONENT_COUNTS[kind]:
        raise ArtifactError("%s %r must have %s dotted component(s)" % (
            field_name, value, " or ".join(str(n) for n in _REF_COMPONENT_COUNTS[kind])),
            code="stable_ref_invalid_shape")
    return components


def _normalize_timestamp(field_name: str, value: Any) -> str:
    if isinstance(value, datetime):
        return _utc_timestamp(value if value.tzinfo else value.replace(tzinfo=timezone.utc))
    match = _TIMESTAMP.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ArtifactError("%s must be an ISO-8601 UTC timestamp ending in Z, not %r" % (field_name, value),
                            code="context_invalid_timestamp")
    year, month, day, hour, minute, second = (int(group) for group in match.groups()[:6])
    micros = int((match.group(7) or "0").ljust(6, "0"))
    try:
        moment = datetime(year, month, day, hour, minute, second, micros, tzinfo=timezone.utc)
    except ValueError:
        raise ArtifactError("%s %r is not a real date and time" % (field_name, value),
                            code="context_invalid_timestamp")
    return _utc_timestamp(moment)


def _required_text(field_name: str, value: Any, code: str = "context_invalid_string") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ArtifactError("%s must be a non-blank string" % field_name, code=code)
    return value.strip()


@dataclasses.dataclass(frozen=True)
class ArtifactManifest:
    """Contexta's ArtifactManifest, validated by Contexta's rules (refs, kinds, prefixes, timestamps)."""

    artifact_ref: str
    artifact_kind: str
    created_at: Any
    producer_ref: str
    run_ref: str
    location_ref: str
    deployment_execution_ref: Optional[str] = None
    stage_execution_ref: Optional[str] = None
    batch_execution_ref: Optional[str] = None
    sample_observation_ref: Optional[str] = None
    operation_context_ref: Optional[str] = None
    hash_value: Optional[str] = None
    size_bytes: Optional[int] = None
    attributes: Optional[Mapping[str, Any]] = None
    schema_version: str = "1.0.0"
    extensions: Sequence[Any] = ()

    def __post_init__(self) -> None:
        artifact = _validate_ref("artifact_ref", self.artifact_ref, "artifact")
        run = _validate_ref("run_ref", self.run_ref, "run")
        components = {}
        for field_name, kind in _OPTIONAL_REF_KINDS:
            value = getattr(self, field_name)
            if value is not None:
                components[field_name] = _validate_ref(field_name, value, kind)
        if not isinstance(self.artifact_kind, str) or not _LOWER_SNAKE.match(self.artifact_kind.strip()):
            raise ArtifactError("artifact_kind %r must be lower_snake_case" % (self.artifact_kind,),
                                code="artifact_invalid_artifact_kind")
        if not isinstance(self.producer_ref, str) or not _PRODUCER_REF.match(self.producer_ref.strip()):
            raise ArtifactError("producer_ref %r must be dotted lowercase tokens" % (self.producer_ref,),
                                code="artifact_invalid_producer_ref")
        if artifact[:-1] != run:
            raise ArtifactError("artifact_ref must be run_ref + '.' + an artifact key (%s vs %s)"
                                % (self.artifact_ref, self.run_ref), code="artifact_ref_prefix_mismatch")
        _check_context_prefixes(run, components)
        if self.size_bytes is not None and (not isinstance(self.size_bytes, int) or isinstance(self.size_bytes, bool)
                                            or self.size_bytes < 0):
            raise ArtifactError("size_bytes must be a non-negative integer", code="artifact_invalid_size_bytes")
        if self.hash_value is not None:
            object.__setattr__(self, "hash_value", _required_text("hash_value", self.hash_value))
        attributes = self.attributes or {}
        if not isinstance(attributes, Mapping) or not all(isinstance(k, str) and k.strip() for k in attributes):
            raise ArtifactError("attributes must be an object with non-blank string keys",
                                code="record_invalid_mapping")
        if not isinstance(self.extensions, (list, tuple)) or not all(isinstance(e, dict) for e in self.extensions):
            raise ArtifactError("extensions must be a list of objects", code="context_invalid_extensions")
        object.__setattr__(self, "artifact_kind", self.artifact_kind.strip())
        object.__setattr__(self, "producer_ref", self.producer_ref.strip())
        object.__setattr__(self, "created_at", _normalize_timestamp("created_at", self.created_at))
        object.__setattr__(self, "location_ref", _required_text("location_ref", self.location_ref))
        object.__setattr__(self, "schema_version", _required_text("schema_version", self.schema_version))
        object.__setattr__(self, "attributes", {key.strip(): attributes[key] for key in sorted(attributes)})
        object.__setattr__(self, "extensions", tuple(self.extensions))

    def to_dict(self) -> Dict[str, Any]:
        payload = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        payload["attributes"] = dict(self.attributes or {})
        payload["extensions"] = [dict(extension) for extension in self.extensions]
        return payload

    @classmethod
    def from_dict(cls, data: Any) -> "ArtifactManifest":
        """Contexta's deserialization: unknown keys are refused, omitted optional keys take defaults."""
        if not isinstance(data, Mapping):
            raise ArtifactError("an artifact manifest must be a JSON object", code="deserialize_invalid_payload")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArtifactError("unknown manifest field(s): %s" % ", ".join(unknown), code="deserialize_unknown_field")
        fields: Dict[str, Any] = {key: (() if key == "extensions" and value is None else value)
                                  for key, value in data.items()}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise ArtifactError("invalid artifact manifest: %s" % exc, code="deserialize_invalid_payload")


def _check_context_prefixes(run: List[str], refs: Mapping[str, List[str]]) -> None:
    stage = refs.get("stage_execution_ref")
    batch = refs.get("batch_execution_ref")
    if stage is not None and stage[:len(run)] != run:
        raise ArtifactError("stage_execution_ref must share run_ref's prefix", code="artifact_ref_prefix_mismatch")
    if batch is not None and stage is None:
        raise ArtifactError("batch_execution_ref requires stage_execution_ref", code="artifact_missing_stage_context")
    if batch is not None and batch[:len(stage)] != stage:  # type: ignore[arg-type]
        raise ArtifactError("batch_execution_ref must share stage_execution_ref's prefix",
                            code="artifact_ref_prefix_mismatch")
    for name in ("sample_observation_ref", "operation_context_ref"):
        value = refs.get(name)
        if value is None:
            continue
        if stage is None:
            raise ArtifactError("%s requires stage_execution_ref" % name, code="artifact_missing_stage_context")
        owner = batch if batch is not None else stage
        if value[:len(owner)] != owner:
            raise ArtifactError("%s must share the stage/batch prefix" % name, code="artifact_ref_prefix_mismatch")


@dataclasses.dataclass(frozen=True)
class ArtifactBinding:
    """The binding file of one artifact (Contexta's keys)."""

    artifact_ref: str
    artifact_kind: str
    binding_id: str
    source_name: str
    ingest_mode: str
    size_bytes: int
    hash_algorithm: Optional[str]
    hash_value: Optional[str]
    layout_version: str
    created_at: str
    manifest_snapshot: ArtifactManifest

    def to_dict(self) -> Dict[str, Any]:
        payload = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        payload["manifest_snapshot"] = self.manifest_snapshot.to_dict()
        return payload

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ArtifactBinding":
        try:
            binding = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)
                             if f.name != "manifest_snapshot"},
                          manifest_snapshot=ArtifactManifest.from_dict(data["manifest_snapshot"]))
        except KeyError as exc:
            raise ArtifactError("binding lacks %s" % exc, code="artifact_store_invalid_binding")
        if binding.artifact_ref != binding.manifest_snapshot.artifact_ref or \
                binding.artifact_kind != binding.manifest_snapshot.artifact_kind:
            raise ArtifactError("binding and its manifest snapshot name different artifacts",
                                code="artifact_store_binding_manifest_mismatch")
        if not isinstance(binding.size_bytes, int) or isinstance(binding.size_bytes, bool) or binding.size_bytes < 0:
            raise ArtifactError("binding size_bytes is not a non-negative integer",
                                code="artifact_store_invalid_binding")
        return binding


@dataclasses.dataclass(frozen=True)
class VaultConfig(_Record):
    """Contexta's artifact-plane config: where the store is and how it ingests."""

    root_path: Any = None
    default_ingest_mode: str = "copy"
    verification_mode: str = "manifest_if_available"
    create_missing_dirs: bool = True
    layout_version: str = "v1"
    chunk_size_bytes: int = 1048576
    read_only: bool = False

    def __post_init__(self) -> None:
        if self.root_path is None:
            raise ArtifactError("VaultConfig needs a root_path", code="artifact_store_missing_root_path")
        object.__setattr__(self, "root_path", _resolve_path(self.root_path))
        if self.verification_mode not in ("none", "stored", "manifest_if_available", "strict"):
            raise ArtifactError("unknown verification_mode %r" % self.verification_mode,
                                code="artifact_store_invalid_verification_mode")

    @classmethod
    def from_unified_config(cls, config: UnifiedConfig) -> "VaultConfig":
        """The ``artifacts`` table, setting for setting (the two classes hold the same fields)."""
        return cls(**{f.name: getattr(config.artifacts, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class ArtifactHandle:
    binding: ArtifactBinding
    path: Path


class _StatusRecord(_Record):
    """A result whose JSON also says ``status``, after Contexta's fields: FAILURE when it holds problems."""

    @property
    def status(self) -> str:
        return "FAILURE" if getattr(self, "problems", ()) else "SUCCESS"

    def to_dict(self) -> Dict[str, Any]:
        payload = _fields_dict(self)
        payload["status"] = self.status
        return payload


@dataclasses.dataclass(frozen=True)
class ArtifactPutReceipt(_StatusRecord):
    binding: ArtifactBinding
    path: Path
    bytes_written: int


@dataclasses.dataclass(frozen=True)
class VerificationReport(_Record):
    """Contexta's VerificationReport of one body, plus where it is."""

    artifact_ref: str
    status: str
    verified: bool
    exists: bool
    actual_size_bytes: Optional[int]
    expected_size_bytes: Optional[int]
    actual_hash_value: Optional[str]
    expected_hash_value: Optional[str]
    checked_at: str
    messages: Tuple[str, ...] = ()
    path: str = ""


@dataclasses.dataclass(frozen=True)
class VerificationRecord(_Record):
    artifact_ref: str
    status: str
    checked_at: str
    message: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class StoreSummary(_StatusRecord):
    """Contexta's StoreSummary, plus the findings behind its counts."""

    artifact_count: int
    total_size_bytes: int
    kinds: Mapping[str, int]
    verified_count: int
    missing_count: int
    drift_count: int
    orphan_count: int
    problems: Tuple[Problem, ...] = ()
    notes: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SweepReport(_StatusRecord):
    """Contexta's SweepReport, plus each problem's path, expected and actual size and digest."""

    verification_records: Tuple[VerificationRecord, ...] = ()
    missing_refs: Tuple[str, ...] = ()
    drifted_refs: Tuple[str, ...] = ()
    orphan_paths: Tuple[str, ...] = ()
    problems: Tuple[Problem, ...] = ()
    reports: Tuple[VerificationReport, ...] = ()
    notes: Tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        return not self.problems


@dataclasses.dataclass(frozen=True)
class ExportReceipt(_StatusRecord):
    artifact_ref: str
    export_directory: Path
    body_path: Path
    binding_path: Path
    package_metadata_path: Path


class ImportOutcome(str, enum.Enum):
    IMPORTED = "imported"
    SKIPPED = "skipped"
    REPLACED = "replaced"
    IDEMPOTENT = "idempotent"


_CONFLICT_POLICIES = ("error", "skip", "replace")


@dataclasses.dataclass(frozen=True)
class ImportReceipt(_StatusRecord):
    """Contexta's ImportReceipt (``outcome.value`` is imported/skipped/replaced/idempotent).

    ``bytes_written`` counts as Contexta's does: 0 whenever the binding stays as it was
    (idempotent, skipped), even when a damaged body was restored (a note says so).
    """

    artifact_ref: str
    outcome: ImportOutcome
    bytes_written: int
    mapping_loss_report: Optional[Mapping[str, Any]] = None
    quarantine_path: Optional[Path] = None
    notes: Tuple[str, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        payload = _StatusRecord.to_dict(self)
        payload["outcome"] = self.outcome.value
        return payload


_VERIFICATION_MESSAGES = {
    "missing": "artifact body is missing at the canonical object path",
    "size_mismatch": "artifact body size does not match the expected size",
    "hash_mismatch": "artifact body hash does not match the expected hash",
    "verified": "artifact body matches the current verification claims",
}
_NOT_A_BODY_MESSAGE = "artifact body at the canonical object path is a %s, not a regular file; it was not read"


def _event_name() -> str:
    return "%s-%s.json" % (_path_safe_timestamp(_utc_timestamp()), uuid.uuid4().hex)


@contextlib.contextmanager
def _name_errors(path: Any) -> Iterator[None]:
    """Give an OS error raised without a file name (a full disk on write or fsync) the path it concerns."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def _write_store_file(path: Path, data: bytes) -> None:
    """Contexta writes its store's JSON files owner-only; ours go through a temp file and a rename."""
    with _name_errors(path):
        atomic_write_bytes(path, data, mode=0o600)


def _sync_dir(path: Path) -> None:
    with _name_errors(path):
        _fsync_dir(path)


def _problem_error(problem: Problem) -> ArtifactError:
    """A finding that stops a command which cannot go on without the file (exit 3, naming it)."""
    code = problem.code
    return ArtifactError("%s: %s" % (problem.path, problem.message), code=code, path=problem.path)


def _binding_document(path: Path) -> Dict[str, Any]:
    """A binding a command cannot go on without: its object, or an error naming the file."""
    kind = _path_kind(path)
    if kind != "file":
        raise _problem_error(_irregular_problem(str(path), kind, "binding"))
    try:
        return _read_binding(path)
    except (OSError, ValueError) as exc:
        raise ArtifactError("binding %s is invalid: %s" % (path, exc), code="artifact_store_invalid_binding",
                            path=path)


def _name_limits(path: Path) -> Tuple[int, int]:
    """(NAME_MAX, PATH_MAX) of the filesystem that will hold ``path``, asked of its nearest existing folder."""
    anchor = path.parent
    while not anchor.is_dir() and anchor != anchor.parent:
        anchor = anchor.parent
    limits = []
    for name, fallback in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)):
        try:
            limits.append(os.pathconf(str(anchor), name) or fallback)
        except (OSError, ValueError):
            limits.append(fallback)
    return limits[0], limits[1]


def _check_names_fit(paths: Iterable[Path]) -> None:
    """Refuse, before anything is written, a write naming a file this filesystem cannot hold."""
    for path in paths:
        name_max, path_max = _name_limits(path)
        for name in path.parts:
            if len(os.fsencode(name)) > name_max:
                raise ArtifactError("cannot store %s: the name %s is %d bytes, longer than the %d this filesystem "
                                    "allows" % (path, name, len(os.fsencode(name)), name_max),
                                    code="artifact_name_too_long", path=path)
        if len(os.fsencode(str(path))) >= path_max:
            raise ArtifactError("cannot store %s: the path is %d bytes, longer than the %d this system allows"
                                % (path, len(os.fsencode(str(path))), path_max), code="artifact_name_too_long",
                                path=path)


def _check_manifest_storable(manifest: ArtifactManifest, code: str = "artifact_manifest_too_large",
                             path: Any = None) -> None:
    """Refuse a manifest that, wrapped in its binding and write journal, would nest deeper than any reader takes."""
    depth = _json_depth(_compact_json(manifest.to_dict()))
    if depth + _MANIFEST_DEPTH_IN_JOURNAL > _JSON_MAX_DEPTH:
        raise ArtifactError("%smanifest of %s nests %d levels; its binding and write journal would be deeper than "
                            "the %d levels every reader accepts" % ("%s: " % path if path else "",
                                                                    manifest.artifact_ref, depth, _JSON_MAX_DEPTH),
                            code=code, path=path)


class ArtifactStore:
    """Contexta's artifact store layout, read and written byte-compatibly and crash-safely.

    Opening changes nothing; directories are created by the first write.
    """

    def __init__(self, config: Optional[VaultConfig] = None) -> None:
        if config is None:
            raise ArtifactError("ArtifactStore needs a VaultConfig with a root_path",
                                code="artifact_store_missing_root_path")
        self.config = config
        self.root_path = Path(config.root_path)

    # -- paths -------------------------------------------------------------------

    def binding_path(self, artifact_ref: str) -> Path:
        return self.root_path / "bindings" / ("%s.binding.json" % sanitize_component(artifact_ref))

    def object_path(self, manifest: ArtifactManifest) -> Path:
        return self.root_path / artifact_object_relpath(manifest.artifact_ref, manifest.artifact_kind,
                                                        manifest.location_ref)

    def _planned_paths(self, manifest: ArtifactManifest) -> List[Path]:
        """The files a put or import of ``manifest`` creates (besides temp and journal names of fixed length)."""
        history = self.root_path / "history" / "imports" / sanitize_component(manifest.artifact_ref)
        return [self.binding_path(manifest.artifact_ref), self.object_path(manifest), history / _event_name()]

    # -- reading -------------------------------------------------------------------

    def load_binding(self, artifact_ref: str) -> Optional[ArtifactBinding]:
        path = self.binding_path(artifact_ref)
        if _path_kind(path) == "missing":
            return None
        data = _binding_document(path)
        try:
            return ArtifactBinding.from_dict(data)
        except ArtifactError as exc:
            code = exc.code
            raise ArtifactError("binding %s: %s" % (path, exc), code=code, path=path)

    def get_artifact(self, artifact_ref: str) -> ArtifactHandle:
        return get_artifact(self, artifact_ref)

    def artifact_exists(self, artifact_ref: str) -> bool:
        return artifact_exists(self, artifact_ref)

    def read_artifact_bytes(self, artifact_ref: str) -> bytes:
        return read_artifact_bytes(self, artifact_ref)

    def list_refs(self) -> List[str]:
        return list_refs(self)

    def verify_artifact(self, artifact_ref: str, *, manifest: Any = None) -> VerificationReport:
        return verify_artifact(self, artifact_ref, manifest=manifest)

    def inspect_store(self) -> StoreSummary:
        return inspect_store(self)

    def verify_all(self, record: bool = True) -> SweepReport:
        return verify_all(self, record=record)

    def export_artifact(self, artifact_ref: str, *, export_root: Any = None) -> ExportReceipt:
        return export_artifact(self, artifact_ref, export_root=export_root)

    def import_export_package(self, package_root: Any, *, conflict_policy: str = "error") -> ImportReceipt:
        return import_export_package(self, package_root, conflict_policy=conflict_policy)

    # -- writing -------------------------------------------------------------------

    def put_artifact(self, manifest: Any, source: Any, *, mode: Optional[str] = None,
                     source_name: Optional[str] = None) -> ArtifactPutReceipt:
        """Ingest a file (copy, or move with ``mode="move"``) under Contexta's verification rules."""
        manifest = manifest if isinstance(manifest, ArtifactManifest) else ArtifactManifest.from_dict(manifest)
        mode = (mode or self.config.default_ingest_mode).lower()
        if mode not in ("copy", "move"):
            raise ArtifactError("ingest mode %r is not supported here (copy or move)" % mode,
                                code="artifact_store_invalid_ingest_mode")
        source_path = _resolve_path(source)
        if not source_path.is_file():
            raise ArtifactError("source %s is not a file" % source_path, code="artifact_store_missing_source",
                                path=source_path)
        _check_manifest_storable(manifest)
        _check_names_fit(self._planned_paths(manifest))
        with self._writing():
            staged, size, digest = self._stage_body(source_path)
            try:
                existing = self.load_binding(manifest.artifact_ref)
                if existing is not None:
                    existing_path = self.object_path(existing.manifest_snapshot)
                    if _path_kind(existing_path) == "file" and \
                            (existing.size_bytes, existing.hash_value) == (size, digest):
                        return ArtifactPutReceipt(existing, existing_path, 0)
                    raise ConflictError("%s is already bound to a different body" % manifest.artifact_ref)
                self._check_claims(manifest, size, digest)
                binding = self._new_binding(manifest, source_name or source_path.name, mode, size, digest)
                path, _quarantine = self._commit(binding, staged, events=[("bindings", {
                    "action": "put", "artifact_ref": binding.artifact_ref, "binding": binding.to_dict(),
                    "path": str(self.object_path(manifest)), "recorded_at": _utc_timestamp()})])
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(str(staged))
        if mode == "move":
            os.unlink(str(source_path))
        return ArtifactPutReceipt(binding, path, size)

    def _check_claims(self, manifest: ArtifactManifest, size: int, digest: str) -> None:
        mode = self.config.verification_mode
        if mode == "strict" and (manifest.size_bytes is None or manifest.hash_value is None):
            raise ArtifactError("strict verification needs size_bytes and hash_value in the manifest",
                                code="artifact_store_strict_verification_missing_claims")
        if mode in ("manifest_if_available", "strict"):
            if manifest.size_bytes is not None and manifest.size_bytes != size:
                raise IntegrityError("body is %d bytes, manifest says %d" % (size, manifest.size_bytes),
                                     code="artifact_store_size_mismatch")
            if manifest.hash_value is not None and manifest.hash_value != digest:
                raise IntegrityError("body sha256 %s, manifest says %s" % (digest, manifest.hash_value),
                                     code="artifact_store_hash_mismatch")

    def _new_binding(self, manifest: ArtifactManifest, source_name: str, mode: str, size: int,
                     digest: str) -> ArtifactBinding:
        return ArtifactBinding(artifact_ref=manifest.artifact_ref, artifact_kind=manifest.artifact_kind,
                               binding_id="binding-%s" % uuid.uuid4().hex, source_name=source_name,
                               ingest_mode=mode, size_bytes=size, hash_algorithm="sha256", hash_value=digest,
                               layout_version=self.config.layout_version, created_at=_utc_timestamp(),
                               manifest_snapshot=manifest)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the store's write lock, having first finished whatever a killed writer left.

        A journal that cannot be acted on (unreadable, or not a regular file)
        stops every write until a person has judged it: exit 3, naming it.
        """
        if self.config.read_only:
            raise ArtifactError("artifact store %s is read-only" % self.root_path, code="artifact_store_read_only")
        journals, problems = _write_journals(self)
        if problems:
            raise _problem_error(problems[0])
        for name in _ARTIFACT_DIRS:
            (self.root_path / name).mkdir(parents=True, exist_ok=True)
        with _Lock(self.root_path / _STORE_LOCK, what="artifact store %s" % self.root_path):
            journals, problems = _write_journals(self)  # again, under the lock
            if problems:
                raise _problem_error(problems[0])
            _recover_artifact_writes(self, journals)
            yield

    def _stage_body(self, source: Path, expected: Optional[Tuple[int, str]] = None) -> Tuple[Path, int, str]:
        """Copy a body into staging/, hashing it; with ``expected``, refuse anything else."""
        staged = self.root_path / "staging" / ("ingest-%s-%s.part" % (sanitize_component(source.name)[:64],
                                                                      uuid.uuid4().hex))
        try:
            reader = open_regular(source, follow_symlinks=expected is None)  # a package's body is never a link
        except SpecialFileError as exc:
            raise ArtifactError("%s %s" % (source, exc.strerror), code="artifact_store_missing_source", path=source)
        progress = _Progress("copy %s" % source.name, os.fstat(reader.fileno()).st_size)
        try:
            with reader, _name_errors(staged):
                size, digest = _copy_stream_hashed(_ProgressReader(reader, progress, source), staged, durable=True)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(staged))
            raise
        finally:
            progress.finish()
        _crash_point("artifact:body-staged")
        if expected is not None and (size, digest) != expected:
            os.unlink(str(staged))
            raise IntegrityError("%s changed while it was copied (now %d bytes, sha256 %s)" % (source, size, digest),
                                 path=source)
        return staged, size, digest

    def _commit(self, binding: ArtifactBinding, staged: Path, events: Sequence[Tuple[str, Mapping[str, Any]]],
                replaced: Optional[ArtifactBinding] = None) -> Tuple[Path, Optional[Path]]:
        """Journal, (quarantine the old body,) move the body into place, write the binding, then the events.

        The binding write is the commit point: a run killed before it is rolled
        back by the next command, one killed after it rolled forward.  A step
        that fails here rolls the whole write back at once, so an error leaves
        the store as it was.  Returns the body's path and, for a replace, where
        the old body went.
        """
        body = self.object_path(binding.manifest_snapshot)
        binding_path = self.binding_path(binding.artifact_ref)
        journal: Dict[str, Any] = {
            "binding_id": binding.binding_id, "binding": _relative_posix(binding_path, self.root_path),
            "body": _relative_posix(body, self.root_path), "body_ino": os.stat(str(staged)).st_ino,
            "staged": _relative_posix(staged, self.root_path)}
        old_body = quarantine = None
        if _path_kind(binding_path) == "file":  # a replace, or a damaged body restored under its binding
            journal["old_binding"] = read_regular(binding_path, follow_symlinks=False).decode("utf-8")
        if replaced is not None:
            old_body = self.object_path(replaced.manifest_snapshot)
            if _path_kind(old_body) == "file":
                quarantine = self.bound_quarantine_path(old_body)
                journal["quarantine"] = {"from": _relative_posix(old_body, self.root_path),
                                         "to": _relative_posix(quarantine, self.root_path)}
        journal["events"] = []
        for category, payload in events:
            payload = dict(payload)
            if category == "quarantine":
                if quarantine is None:
                    continue
                payload.update(source_path=str(old_body), destination_path=str(quarantine))
                folder = "history/quarantine"
            else:
                folder = "history/%s/%s" % (category, sanitize_component(binding.artifact_ref))
            if "quarantine_path" in payload:
                payload["quarantine_path"] = None if quarantine is None else str(quarantine)
            journal["events"].append({"path": "%s/%s" % (folder, _event_name()), "payload": payload})
        journal_path = self.root_path / "staging" / (uuid.uuid4().hex + _WRITE_JOURNAL_SUFFIX)
        journal_bytes = self._checked_journal_bytes(journal, journal_path)
        _write_store_file(journal_path, journal_bytes)
        _crash_point("artifact:journal-written")
        try:
            self._apply(journal_path, journal, staged, binding)
        except BaseException:
            with contextlib.suppress(Exception):  # if even this fails, the next command rolls back from the journal
                _roll_back_write(self, journal_path, journal)
            raise
        return body, quarantine

    def bound_quarantine_path(self, body: Path) -> Path:
        """Contexta's place for a bound body taken out of service, its name cut to what the filesystem allows."""
        name = "%s-%s" % (uuid.uuid4().hex, body.name)
        while len(os.fsencode(name)) > _name_limits(body)[0]:
            name = name[:-1]
        return self.root_path / "quarantine" / "bound" / _path_safe_timestamp(_utc_timestamp()) / name

    def _checked_journal_bytes(self, journal: Mapping[str, Any], journal_path: Path) -> bytes:
        """The journal as it will be written, proven readable and every name it holds storable, or refusal."""
        data = _pretty_json(journal)
        try:
            json_loads(data, max_bytes=_JSON_FILE_LIMIT)
        except JsonInputError as exc:
            raise ArtifactError("the write journal of %s %s; its manifest is too large to store"
                                % (journal["binding"], exc), code="artifact_manifest_too_large")
        names = [journal["body"], journal["binding"]] + [event["path"] for event in journal["events"]]
        if "quarantine" in journal:
            names.append(journal["quarantine"]["to"])
        _check_names_fit([journal_path] + [self.root_path / name for name in names])
        return data

    def _apply(self, journal_path: Path, journal: Mapping[str, Any], staged: Path, binding: ArtifactBinding) -> None:
        """The journaled steps of a write, in order; each durable step is a crash point."""
        root = self.root_path
        quarantine = journal.get("quarantine")
        if quarantine is not None:
            source, destination = root / quarantine["from"], root / quarantine["to"]
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(str(source), str(destination))
            _sync_dir(destination.parent)
            _sync_dir(source.parent)
            _crash_point("artifact:old-body-quarantined")
        body = root / journal["body"]
        body.parent.mkdir(parents=True, exist_ok=True)
        os.replace(str(staged), str(body))
        _sync_dir(body.parent)
        _crash_point("artifact:body-in-place")
        _write_store_file(root / journal["binding"], _pretty_json(binding.to_dict()))
        _crash_point("artifact:binding-written")
        _finish_artifact_write(self, journal_path, journal)


class _ProgressReader:
    """A reader that reports progress as it is read, and names its file when reading fails."""

    def __init__(self, reader: Any, progress: _Progress, path: Path) -> None:
        self.reader = reader
        self.progress = progress
        self.path = path

    def readinto(self, buffer: Any) -> int:
        with _name_errors(self.path):
            count = self.reader.readinto(buffer)
        if count:
            self.progress.advance(count, files=0)
        return count


# -- write journals: recovery of a killed or failed put/import ------------------------------------

_JOURNAL_PATH_KEYS = ("binding", "body", "staged")


def _checked_journal(data: Any) -> Dict[str, Any]:
    """A write journal's object, each path in it store-relative and safe (ValueError saying what is wrong)."""
    if not isinstance(data, dict):
        raise ValueError("is not a JSON object")
    for key in ("binding_id",) + _JOURNAL_PATH_KEYS:
        if not isinstance(data.get(key), str):
            raise ValueError("has no %s text" % key)
    if not isinstance(data.get("body_ino"), int) or isinstance(data["body_ino"], bool):
        raise ValueError("has no body_ino number")
    events = data.get("events")
    if not isinstance(events, list) or not all(isinstance(event, dict) and isinstance(event.get("payload"), dict)
                                               for event in events):
        raise ValueError("has no list of events with payloads")
    quarantine = data.get("quarantine", {})
    if not isinstance(quarantine, dict) or not isinstance(data.get("old_binding", ""), str):
        raise ValueError("has an invalid quarantine or old_binding")
    paths = [data[key] for key in _JOURNAL_PATH_KEYS] + [event.get("path") for event in events]
    paths += [quarantine.get(key) for key in ("from", "to") if quarantine]
    for relative in paths:
        try:
            _safe_join_text("", relative)
        except OpsError as exc:
            raise ValueError("holds an %s" % exc)
    return data


def _write_journals(store: ArtifactStore) -> Tuple[List[Tuple[Path, Dict[str, Any]]], List[Problem]]:
    """The write journals in staging/: those that can be acted on, and a problem for each that cannot."""
    staging = store.root_path / "staging"
    journals: List[Tuple[Path, Dict[str, Any]]] = []
    problems: List[Problem] = []
    for path in sorted(staging.glob("*" + _WRITE_JOURNAL_SUFFIX)) if staging.is_dir() else []:
        kind = _path_kind(path)
        if kind != "file":
            problems.append(_irregular_problem(str(path), kind, "store entry"))
            continue
        try:
            journals.append((path, _checked_journal(_read_json_document(path))))
        except (OSError, ValueError) as exc:
            problems.append(Problem("artifact_write_journal_invalid", str(path), "write journal %s; it is left in "
                                    "place: judge it, then remove it" % (getattr(exc, "strerror", None) or exc)))
    return journals, problems


def _journal_committed(store: ArtifactStore, journal: Mapping[str, Any]) -> bool:
    """Whether the journal's binding is the one on disk (its commit point was reached)."""
    binding_path = store.root_path / journal["binding"]
    if _path_kind(binding_path) != "file":
        return False
    try:
        binding = _read_json_document(binding_path)
    except (OSError, ValueError):
        return False
    return isinstance(binding, dict) and binding.get("binding_id") == journal["binding_id"]


def _finish_artifact_write(store: ArtifactStore, journal_path: Path, journal: Mapping[str, Any]) -> None:
    """After the commit point: write any missing history event, then forget the journal."""
    for event in journal["events"]:
        path = store.root_path / event["path"]
        if _path_kind(path) == "missing":
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_store_file(path, _pretty_json(event["payload"]))
    _crash_point("artifact:events-written")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(str(store.root_path / journal["staged"]))
    os.unlink(str(journal_path))
    _sync_dir(journal_path.parent)


def _unlink_quietly(path: Path) -> None:
    """Remove a file that may not be there (or whose name cannot even exist)."""
    try:
        os.unlink(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
            raise


def _roll_back_write(store: ArtifactStore, journal_path: Path, journal: Mapping[str, Any]) -> None:
    """Undo a put or import, committed or not: binding as it was, new body and events gone, old body back.

    The binding goes first, so a run killed half-way through this leaves an
    uncommitted write, which the next command rolls back the same way.
    """
    root = store.root_path
    binding_path = root / journal["binding"]
    if "old_binding" in journal:
        _write_store_file(binding_path, journal["old_binding"].encode("utf-8"))
    elif _journal_committed(store, journal):
        os.unlink(str(binding_path))
        _sync_dir(binding_path.parent)
    for event in journal["events"]:
        _unlink_quietly(root / event["path"])
    body = root / journal["body"]
    if _path_kind(body) == "file" and os.lstat(str(body)).st_ino == journal["body_ino"]:
        os.unlink(str(body))
    quarantine = journal.get("quarantine")
    if quarantine:
        if _path_kind(root / quarantine["to"]) == "file":
            os.replace(str(root / quarantine["to"]), str(root / quarantine["from"]))
        _remove_empty_parents(root / quarantine["to"], root / "quarantine")
    _unlink_quietly(root / journal["staged"])
    _unlink_quietly(journal_path)
    _sync_dir(journal_path.parent)


def _recover_artifact_writes(store: ArtifactStore, journals: Sequence[Tuple[Path, Dict[str, Any]]],
                             remove_stale_parts: bool = True) -> List[str]:
    """Roll back uncommitted writes a killed run left, roll committed ones forward; say what was done.

    ``remove_stale_parts=False`` leaves body copies that never reached a journal (repair quarantines them)."""
    done: List[str] = []
    for journal_path, journal in journals:
        if _journal_committed(store, journal):
            _finish_artifact_write(store, journal_path, journal)
            done.append("rolled_forward:%s" % journal["binding"])
        else:
            _roll_back_write(store, journal_path, journal)
            done.append("rolled_back:%s" % journal["binding"])
    for stale in (store.root_path / "staging").glob("ingest-*.part") if remove_stale_parts else ():
        if not stale.with_suffix(".session.json").exists():  # with one, it is Contexta's own staged ingest
            os.unlink(str(stale))  # a body copy that never reached its journal
    return done


def _remove_empty_parents(path: Path, stop: Path) -> None:
    """Remove the now-empty folders a rolled-back write created, up to (not including) ``stop``."""
    parent = path.parent
    while parent != stop and _is_within(parent, stop):
        try:
            os.rmdir(str(parent))
        except OSError:
            return
        parent = parent.parent


def _interrupted_artifact_writes(store: ArtifactStore) -> List[str]:
    staging = store.root_path / "staging"
    return sorted(path.name for path in staging.glob("*" + _WRITE_JOURNAL_SUFFIX)) if staging.is_dir() else []


def _recover_before_reading(store: ArtifactStore) -> Tuple[List[str], List[Problem]]:
    """Verification sees the store as the last complete write left it: finish a killed writer first.

    Returns what was done, and a problem for each journal that cannot be acted on.
    """
    journals, problems = _write_journals(store)
    if not journals:
        return [], problems
    if store.config.read_only:
        return ["interrupted_write_pending:%s" % path.name for path, _journal in journals], problems
    with _Lock(store.root_path / _STORE_LOCK, what="artifact store %s" % store.root_path):
        journals, problems = _write_journals(store)
        return _recover_artifact_writes(store, journals), problems


# -- reading -----------------------------------------------------------------------------------------

def _report_from_check(check: ArtifactCheck, root: Path, checked_at: str) -> VerificationReport:
    message = _VERIFICATION_MESSAGES[check.status] if check.body_kind in ("file", "missing") \
        else _NOT_A_BODY_MESSAGE % check.body_kind
    return VerificationReport(
        artifact_ref=check.artifact_ref, status=check.status, verified=check.verified,
        exists=check.actual_size_bytes is not None, actual_size_bytes=check.actual_size_bytes,
        expected_size_bytes=check.expected_size_bytes, actual_hash_value=check.actual_hash_value,
        expected_hash_value=check.expected_hash_value, checked_at=checked_at,
        messages=(message,), path=str(root / check.path))


def _binding_not_found(store: ArtifactStore, artifact_ref: str) -> ArtifactError:
    return ArtifactError("no artifact bound as %s in %s" % (artifact_ref, store.root_path),
                         code="artifact_store_binding_not_found", path=store.binding_path(artifact_ref))


def get_artifact(store: ArtifactStore, artifact_ref: str) -> ArtifactHandle:
    """The binding and body path of a bound artifact (Contexta's); the body must be a regular file."""
    binding = store.load_binding(artifact_ref)
    if binding is None:
        raise _binding_not_found(store, artifact_ref)
    path = store.object_path(binding.manifest_snapshot)
    kind = _path_kind(path)
    if kind == "missing":
        raise ArtifactError("body of %s is missing at %s" % (artifact_ref, path),
                            code="artifact_store_body_not_found", path=path)
    if kind != "file":
        raise _problem_error(_irregular_problem(str(path), kind, "body of %s" % artifact_ref))
    return ArtifactHandle(binding, path)


def artifact_exists(store: ArtifactStore, artifact_ref: str) -> bool:
    """Whether ``artifact_ref`` is bound and its body is in place (any other trouble is raised)."""
    try:
        get_artifact(store, artifact_ref)
    except ArtifactError as exc:
        if exc.code in ("artifact_store_binding_not_found", "artifact_store_body_not_found"):
            return False
        raise
    return True


def read_artifact_bytes(store: ArtifactStore, artifact_ref: str) -> bytes:
    """A bound body's bytes, read whole (a symlink or special file is refused, never followed)."""
    return read_regular(get_artifact(store, artifact_ref).path, None, follow_symlinks=False)


def list_refs(store: ArtifactStore) -> List[str]:
    """Every bound ref, in binding file order (Contexta's); an unreadable binding is an error naming it."""
    bindings = store.root_path / "bindings"
    paths = sorted(bindings.glob("*.binding.json")) if bindings.is_dir() else []
    return [_binding_document(path)["artifact_ref"] for path in paths]


def verify_artifact(store: ArtifactStore, artifact_ref: str, *, manifest: Any = None) -> VerificationReport:
    """Re-hash one bound body against its claims (Contexta's statuses).

    With ``manifest`` (an :class:`ArtifactManifest` or its dict) its claims and
    object path are checked instead of the binding's snapshot, as in Contexta.
    """
    _recover_before_reading(store)
    path = store.binding_path(artifact_ref)
    if _path_kind(path) == "missing":
        raise _binding_not_found(store, artifact_ref)
    binding = _binding_document(path)
    if manifest is not None:
        claims = manifest if isinstance(manifest, ArtifactManifest) else ArtifactManifest.from_dict(manifest)
        if claims.artifact_ref != binding["artifact_ref"]:
            raise ArtifactError("the verification manifest is for %s, not %s" % (claims.artifact_ref, artifact_ref),
                                code="artifact_store_verification_manifest_mismatch")
        binding = dict(binding, manifest_snapshot=claims.to_dict())
    return _report_from_check(_evaluate_body(store.root_path, binding), store.root_path, _utc_timestamp())


def _sweep(store: ArtifactStore) -> Tuple[ArtifactsReport, List[str]]:
    """Finish killed writes, then scan: every finding (journals included) and what recovery did."""
    notes, journal_problems = _recover_before_reading(store)
    report = scan_artifact_bindings(store.root_path)
    report.problems += [problem for problem in journal_problems if problem not in report.problems]
    if not report.present:
        notes.append("artifact_store_absent")
    return report, notes


def inspect_store(store: ArtifactStore) -> StoreSummary:
    """Counts of every bound artifact's state, and orphans (Contexta's StoreSummary)."""
    report, notes = _sweep(store)
    return StoreSummary(artifact_count=report.artifact_count, total_size_bytes=report.total_size_bytes,
                        kinds=report.kinds, verified_count=report.verified_count,
                        missing_count=report.missing_count, drift_count=report.drift_count,
                        orphan_count=report.orphan_count, problems=tuple(report.problems), notes=tuple(notes))


def verify_all(store: ArtifactStore, record: bool = True) -> SweepReport:
    """Verify every body; with ``record`` append Contexta's verification history events."""
    report, notes = _sweep(store)
    checked_at = _utc_timestamp()
    reports = tuple(_report_from_check(check, store.root_path, checked_at) for check in report.checks)
    records = tuple(VerificationRecord(item.artifact_ref, item.status, item.checked_at, item.messages[0])
                    for item in reports)
    if record and reports:
        with store._writing():
            for verification in reports:
                path, payload = _verification_event(store, verification)
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_store_file(path, _pretty_json(payload))
    return SweepReport(
        verification_records=records,
        missing_refs=tuple(check.artifact_ref for check in report.checks if check.status == "missing"),
        drifted_refs=tuple(check.artifact_ref for check in report.checks
                           if check.status in ("size_mismatch", "hash_mismatch")),
        orphan_paths=tuple(report.orphan_paths), problems=tuple(report.problems), reports=reports,
        notes=tuple(notes))


def _verification_event(store: ArtifactStore, report: VerificationReport) -> Tuple[Path, Dict[str, Any]]:
    """Contexta's verification history event of one report: where it goes, and what it says."""
    event_report = {key: value for key, value in report.to_dict().items() if key != "path"}
    event_report["messages"] = list(report.messages)
    payload = {"artifact_ref": report.artifact_ref, "status": report.status, "checked_at": report.checked_at,
               "message": report.messages[0] if report.messages else None, "report": event_report}
    folder = store.root_path / "history" / "verification" / sanitize_component(report.artifact_ref)
    return folder / ("%s-%s.json" % (_path_safe_timestamp(report.checked_at), uuid.uuid4().hex)), payload


# -- export and import ---------------------------------------------------------------------------------

def export_artifact(store: ArtifactStore, artifact_ref: str, export_root: Any = None) -> ExportReceipt:
    """Write Contexta's four-file export package, from a body proven to match its binding."""
    handle = get_artifact(store, artifact_ref)
    binding = handle.binding
    root = _resolve_path(export_root) if export_root is not None else store.root_path / "exports"
    safe_ref = sanitize_component(artifact_ref)
    directory = root / safe_ref
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    body_path = directory / handle.path.name
    binding_path = directory / ("%s.binding.json" % safe_ref)
    manifest_path = directory / "manifest.snapshot.json"
    metadata_path = directory / "export.package.json"
    tmp_body = directory / ("tmp-%s.part" % uuid.uuid4().hex)
    try:
        progress = _Progress("export %s" % handle.path.name, binding.size_bytes)
        with open_regular(handle.path, follow_symlinks=False) as reader, _name_errors(tmp_body):
            size, digest = _copy_stream_hashed(_ProgressReader(reader, progress, handle.path), tmp_body,
                                               durable=True)
        progress.finish()
        expected_size, expected_hash = _expected_claims(binding.to_dict())
        if (expected_size is not None and size != expected_size) or (
                expected_hash is not None and digest != expected_hash):
            raise IntegrityError("body of %s at %s does not match its binding (%d bytes, sha256 %s); not exported"
                                 % (artifact_ref, handle.path, size, digest), path=handle.path)
        shutil.copystat(str(handle.path), str(tmp_body))
        # Only now touch the package: without export.package.json it is invalid until complete again.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(metadata_path))
        os.replace(str(tmp_body), str(body_path))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(tmp_body))
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(str(directory))
        raise
    _write_store_file(binding_path, _pretty_json(binding.to_dict()))
    _write_store_file(manifest_path, _pretty_json(binding.manifest_snapshot.to_dict()))
    _write_store_file(metadata_path, _pretty_json({
        "package_format_version": PACKAGE_FORMAT_VERSION, "artifact_ref": artifact_ref,
        "artifact_kind": binding.artifact_kind, "exported_at": _utc_timestamp(), "body_file": body_path.name,
        "binding_file": binding_path.name, "manifest_file": manifest_path.name,
        "source_layout_version": binding.layout_version}))
    if not store.config.read_only:
        with store._writing():
            event_dir = store.root_path / "history" / "exports" / safe_ref
            event_dir.mkdir(parents=True, exist_ok=True)
            _write_store_file(event_dir / _event_name(), _pretty_json({
                "artifact_ref": artifact_ref, "export_directory": str(directory), "exported_at": _utc_timestamp(),
                "package_format_version": PACKAGE_FORMAT_VERSION}))
    return ExportReceipt(artifact_ref, directory, body_path, binding_path, metadata_path)


def _package_member(root: Path, metadata: Mapping[str, Any], key: str, default: Optional[str] = None) -> Path:
    """A file the package names: a plain name of a regular file inside the package, or refusal."""
    name = metadata.get(key, default)
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or "\\" in name \
            or "\x00" in name:
        raise ArtifactError("export package %s: %s %r is not a plain file name inside the package"
                            % (root, key, name), code="artifact_export_package_invalid", path=root)
    path = root / name
    try:
        member_stat = os.lstat(str(path))
    except FileNotFoundError:
        raise ArtifactError("export package %s: %s %s is missing" % (root, key, name),
                            code="artifact_export_package_invalid", path=path)
    if not stat.S_ISREG(member_stat.st_mode):
        raise ArtifactError("export package %s: %s %s is not a regular file (symlinks are refused)"
                            % (root, key, name), code="artifact_export_package_invalid", path=path)
    return path


def _read_package_json(path: Path) -> Dict[str, Any]:
    try:
        data = _read_json_document(path)
    except (OSError, ValueError) as exc:
        raise ArtifactError("%s %s" % (path, getattr(exc, "strerror", None) or exc),
                            code="artifact_export_package_invalid", path=path)
    if not isinstance(data, dict):
        raise ArtifactError("%s is not a JSON object" % path, code="artifact_export_package_invalid", path=path)
    return data


@dataclasses.dataclass(frozen=True)
class _VerifiedPackage:
    root: Path
    manifest: ArtifactManifest
    body: Path
    size: int
    digest: str


def verify_export_package(package_root: Any) -> _VerifiedPackage:
    """Everything an import checks before it writes a byte: names, refs, size and sha256."""
    root = _resolve_path(package_root)
    if not root.is_dir():
        raise ArtifactError("export package %s is not a directory" % root, code="artifact_export_package_not_found",
                            path=root)
    metadata = _read_package_json(_package_member(root, {}, "metadata", "export.package.json"))
    if metadata.get("package_format_version") != PACKAGE_FORMAT_VERSION:
        raise ArtifactError("export package %s has format %r, not %s" % (
            root, metadata.get("package_format_version"), PACKAGE_FORMAT_VERSION),
            code="artifact_export_package_invalid", path=root / "export.package.json")
    body = _package_member(root, metadata, "body_file")
    binding_data = _read_package_json(_package_member(root, metadata, "binding_file"))
    manifest_path = _package_member(root, metadata, "manifest_file", "manifest.snapshot.json")
    manifest = ArtifactManifest.from_dict(_read_package_json(manifest_path))
    _check_manifest_storable(manifest, code="artifact_export_package_invalid", path=manifest_path)
    binding = ArtifactBinding.from_dict(binding_data)
    for key in ("artifact_ref", "artifact_kind"):
        values = {metadata.get(key), binding_data.get(key), getattr(manifest, key),
                  getattr(binding.manifest_snapshot, key)}
        if len(values) != 1:
            raise ArtifactError("export package %s: %s differs between its files (%s)" % (
                root, key, ", ".join(sorted(str(value) for value in values))),
                code="artifact_export_package_invalid", path=root)
    size, digest = sha256_file(body, follow_symlinks=False)
    claims = [("binding", binding.size_bytes, binding.hash_value),
              ("manifest", manifest.size_bytes, manifest.hash_value)]
    for source, claimed_size, claimed_hash in claims:
        if claimed_size is not None and claimed_size != size:
            raise IntegrityError("export package %s: body %s is %d bytes, its %s says %d; nothing imported"
                                 % (root, body.name, size, source, claimed_size), path=body)
        if claimed_hash is not None and claimed_hash != digest:
            raise IntegrityError("export package %s: body %s has sha256 %s, its %s says %s; nothing imported"
                                 % (root, body.name, digest, source, claimed_hash), path=body)
    if binding.hash_value is None:
        raise IntegrityError("export package %s: the binding carries no hash to prove the body" % root,
                             path=root / str(metadata.get("binding_file")))
    return _VerifiedPackage(root, manifest, body, size, digest)


def import_export_package(store: ArtifactStore, package_root: Any, conflict_policy: str = "error") -> ImportReceipt:
    """Import a package only after proving it (see :func:`verify_export_package`); Contexta's outcomes."""
    policy = getattr(conflict_policy, "value", conflict_policy)
    if policy not in _CONFLICT_POLICIES:
        raise ArtifactError("conflict policy must be one of %s" % ", ".join(_CONFLICT_POLICIES),
                            code="artifact_store_invalid_conflict_policy")
    package = verify_export_package(package_root)
    manifest = package.manifest
    _check_names_fit(store._planned_paths(manifest))
    loss_report = {"package_root": str(package.root)}

    def event(outcome: ImportOutcome, written: int) -> Tuple[str, Dict[str, Any]]:
        return ("imports", {"artifact_ref": manifest.artifact_ref, "bytes_written": written,
                            "conflict_policy": policy, "imported_at": _utc_timestamp(),
                            "mapping_loss_report": loss_report, "outcome": outcome.value,
                            "quarantine_path": None, "source_kind": "export_package"})

    with store._writing():
        existing = store.load_binding(manifest.artifact_ref)
        same = existing is not None and (existing.size_bytes, existing.hash_value) == (package.size, package.digest)
        if existing is None:
            outcome = ImportOutcome.IMPORTED
        elif same or policy == "skip":
            outcome = ImportOutcome.SKIPPED if policy == "skip" else ImportOutcome.IDEMPOTENT
        elif policy == "error":
            raise ConflictError("%s is already bound to a different body (size %d, sha256 %s); use --conflict "
                                "skip or replace" % (manifest.artifact_ref, existing.size_bytes, existing.hash_value))
        else:
            outcome = ImportOutcome.REPLACED
        restore = same and not _body_matches(store, existing, package)  # same binding, body missing or drifted
        if outcome in (ImportOutcome.SKIPPED, ImportOutcome.IDEMPOTENT) and not restore:
            _write_event(store, manifest.artifact_ref, event(outcome, 0))
            return ImportReceipt(manifest.artifact_ref, outcome, 0, loss_report)
        staged, size, digest = store._stage_body(package.body, expected=(package.size, package.digest))
        written = 0 if restore else size  # Contexta counts bytes bound: none when the binding stays
        try:
            binding = existing if restore else store._new_binding(manifest, package.body.name, "copy", size, digest)
            assert binding is not None
            events = [event(outcome, written)]
            if outcome is ImportOutcome.REPLACED:
                events.insert(0, ("quarantine", {"kind": "bound_artifact", "recorded_at": _utc_timestamp(),
                                                 "details": {"artifact_ref": manifest.artifact_ref}}))
            if not restore:  # a new binding: Contexta's put event
                events.append(("bindings", {"action": "put", "artifact_ref": binding.artifact_ref,
                                            "binding": binding.to_dict(), "path": str(store.object_path(manifest)),
                                            "recorded_at": _utc_timestamp()}))
            _body, quarantine = store._commit(binding, staged, events,
                                              replaced=existing if outcome is ImportOutcome.REPLACED else None)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(staged))
    notes = ("damaged_body_restored_from_package",) if restore else ()
    return ImportReceipt(manifest.artifact_ref, outcome, written, loss_report, quarantine, notes)


def _body_matches(store: ArtifactStore, binding: Optional[ArtifactBinding], package: _VerifiedPackage) -> bool:
    if binding is None:
        return False
    body = store.object_path(binding.manifest_snapshot)
    return _path_kind(body) == "file" and sha256_file(body, follow_symlinks=False) == (package.size, package.digest)


def _write_event(store: ArtifactStore, artifact_ref: str, event: Tuple[str, Mapping[str, Any]]) -> None:
    folder = store.root_path / "history" / event[0] / sanitize_component(artifact_ref)
    folder.mkdir(parents=True, exist_ok=True)
    _write_store_file(folder / _event_name(), _pretty_json(event[1]))


# ---------------------------------------------------------------------------
# The guide's first and last steps: status and check of a live workspace
# ---------------------------------------------------------------------------
#
# `status` confirms which workspace the next command would touch: every path
# and where its value came from, whether anything is using or half-way
# through changing it, and the counts that are cheap to read.  It hashes
# nothing.  `check` verifies the live workspace with the very same plane
# checks verify-only runs on a staged backup, and changes nothing.

CHECK_PLANES = ("metadata", "records", "artifacts", "reports", "outbox", "capture")


@dataclasses.dataclass(frozen=True)
class CheckResult(_Record):
    """``check``: each plane's result in restore's shape, and every problem naming its file."""

    status: str
    workspace_root: Path
    planes: Tuple[str, ...]
    plane_results: Mapping[str, Any]
    problems: Tuple[Problem, ...] = ()
    notes: Tuple[str, ...] = ()


def _workspace_layout(config: UnifiedConfig) -> _Layout:
    """A layout whose paths are the configured (absolute) ones, for checking a live workspace."""
    return _Layout(None, (), str(config.metadata.database_path), str(config.records.root_path),
                   str(config.artifacts.root_path), str(config.recovery.outbox_root),
                   reports_root=str(config.workspace.reports_path))


def check_workspace(config: UnifiedConfig, planes: Optional[Sequence[str]] = None) -> CheckResult:
    """Verify a live workspace, plane by plane, reading only.  Status FAILURE names each problem."""
    workspace = config.workspace.root_path
    if not workspace.is_dir():
        raise OpsError("workspace %s does not exist" % workspace, code="workspace_missing", path=workspace)
    selected = tuple(plane for plane in CHECK_PLANES if planes is None or plane in planes)
    unknown = set(planes or ()) - set(CHECK_PLANES)
    if unknown:
        raise UsageError("unknown plane(s): %s (choose from %s)" % (", ".join(sorted(unknown)),
                                                                   ", ".join(CHECK_PLANES)))
    layout = _workspace_layout(config)
    verification = _Verification(live_root=workspace)
    notes: List[str] = []
    if set(selected) & set(_PLANES):
        # A workspace used only through contexta's facade never made a ledger: absent, not missing.
        has_metadata = config.workspace.metadata_path.exists() or os.path.lexists(str(config.metadata.database_path))
        _check_planes(Path("/"), layout, verification, has_metadata=has_metadata)
        verification.plane_results = {key: value for key, value in verification.plane_results.items()
                                      if key in selected}
        verification.problems = [problem for problem in verification.problems
                                 if _plane_of(problem, config) in selected]
        notes += verification.plane_notes
        if "artifacts" in selected:
            store = ArtifactStore(VaultConfig.from_unified_config(config))
            for name in _interrupted_artifact_writes(store):
                verification.problems.append(Problem(
                    "artifact_write_interrupted", str(store.root_path / "staging" / name),
                    "a put or import was killed; the next artifact command rolls it back or finishes it"))
            verification.problems += _write_journals(store)[1]  # journals no command can act on
    if "reports" in selected:
        verification.plane_results["reports"] = _check_reports(config.workspace.reports_path, verification.problems)
    if "outbox" in selected:
        outbox = _tally_outbox(config.recovery.outbox_root)
        verification.plane_results["outbox"] = {
            "pending_count": outbox.pending_count, "dead_lettered_count": outbox.dead_lettered_count,
            "malformed_pending": outbox.malformed_pending, "interrupted_replay": outbox.interrupted_replay}
        verification.problems += list(outbox.problems)
        if outbox.dead_lettered_count:  # undelivered data waiting for a person, as `replay status` says (exit 1)
            verification.problems.append(Problem(
                "outbox_dead_letters", str(Path(config.recovery.outbox_root) / DEAD_LETTER_FILE),
                "%d entr%s dead-lettered: fix what made them fail, then `replay requeue`"
                % (outbox.dead_lettered_count, "y is" if outbox.dead_lettered_count == 1 else "ies are")))
    if "capture" in selected:
        capture = _PARTS_BY_NAME["capture"].locate(config)
        verification.plane_results["capture"] = _check_capture(capture, str, verification.problems)
    return CheckResult(status="FAILURE" if verification.problems else "SUCCESS", workspace_root=workspace,
                       planes=selected, plane_results=verification.plane_results,
                       problems=tuple(verification.problems), notes=tuple(notes))


def _check_capture(capture_root: Path, show: Callable[[str], str], problems: List[Problem]) -> Dict[str, Any]:
    """Every line of the capture sink's files is a JSON object: contexta's facade keeps its only copy there."""
    result = _capture_result(capture_root.is_dir())
    for rel, _entry_stat, kind in _walk_tree(capture_root) if capture_root.is_dir() else ():
        path = capture_root / rel
        if kind == "dir":
            continue
        if kind != "file":
            problems.append(Problem("special_file", show(str(path)), "a %s where capture files are kept" % kind))
            continue
        try:
            with open_regular(path) as handle:
                scan = _scan_stream(handle, "capture")
        except OSError as exc:
            result["file_count"] += 1
            result["invalid_count"] += 1
            problems.append(Problem("capture_unreadable", show(str(path)), "cannot be read: %s"
                                    % (exc.strerror or exc)))
            continue
        _count_capture(result, scan, show(str(path)), problems)
    return result


def _capture_result(present: bool) -> Dict[str, Any]:
    return {"present": present, "file_count": 0, "line_count": 0, "invalid_count": 0}


def _count_capture(result: Dict[str, Any], scan: "_CaptureScan", shown: str, problems: List[Problem]) -> None:
    """One capture file's scan into the plane's counts and problems."""
    result["present"] = True
    result["file_count"] += 1
    result["line_count"] += scan.line_count
    result["invalid_count"] += scan.invalid_count
    problems += [Problem(code, shown, "line %d%s" % (line, text)) for code, line, text, _e, _a in scan.problems]


def _plane_of(problem: Problem, config: UnifiedConfig) -> str:
    for plane, root in (("records", config.records.root_path), ("artifacts", config.artifacts.root_path)):
        if _is_within(problem.path, root):
            return plane
    return "metadata"


def _check_reports(reports_root: Path, problems: List[Problem]) -> Dict[str, Any]:
    """Every report file can be read to its end."""
    result = {"present": reports_root.is_dir(), "file_count": 0, "size_bytes": 0, "unreadable_count": 0}
    for rel, entry_stat, kind in _walk_tree(reports_root) if reports_root.is_dir() else ():
        if kind == "special":
            problems.append(_special_problem(str(reports_root / rel), entry_stat.st_mode))
        if kind != "file":
            continue
        result["file_count"] += 1
        result["size_bytes"] += entry_stat.st_size
        try:
            with open_regular(reports_root / rel, follow_symlinks=False) as handle:
                while handle.read(_CHUNK):
                    pass
        except OSError as exc:
            result["unreadable_count"] += 1
            problems.append(Problem("report_unreadable", str(reports_root / rel),
                                    "cannot be read: %s" % (exc.strerror or exc)))
    return result


@dataclasses.dataclass(frozen=True)
class PathStatus(_Record):
    name: str
    setting: str
    path: Path
    source: str
    exists: bool
    kind: Optional[str]
    size_bytes: int
    file_count: int


@dataclasses.dataclass(frozen=True)
class StatusWarning(Notice):
    """A :class:`Notice` of ``status``; ``unsafe`` ones make the next operation risky (exit 1)."""

    unsafe: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return {"code": self.code, "message": self.message, "unsafe": self.unsafe}


@dataclasses.dataclass(frozen=True)
class WorkspaceStatus(_Record):
    """``status``: which workspace, from where, in what state.  Exit 1 when a warning is ``unsafe``."""

    status: str
    workspace_root: Path
    paths: Tuple[PathStatus, ...]
    in_use: Tuple[str, ...]
    record_count: Optional[int]
    artifact_binding_count: int
    outbox_pending_count: int
    outbox_dead_lettered_count: int
    newest_backups: Tuple[BackupListEntry, ...]
    warnings: Tuple[StatusWarning, ...] = ()
    notes: Tuple[str, ...] = ()


_STATUS_PATHS = (("workspace", "workspace.root_path"), ("metadata database", "metadata.database_path"),
                 ("records", "records.root_path"), ("artifacts", "artifacts.root_path"),
                 ("reports", "workspace.reports_path"), ("exports", "workspace.exports_path"),
                 ("cache", "workspace.cache_path"), ("outbox", "recovery.outbox_root"),
                 ("backup root", "recovery.backup_root"), ("staging root", "recovery.restore_staging_root"))


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    count = 0
    with open(path, "rb") as handle:
        for raw in handle:
            if raw.strip():
                count += 1
    return count


def workspace_status(config: UnifiedConfig, sources: Optional[Mapping[str, str]] = None,
                     notes: Sequence[str] = ()) -> WorkspaceStatus:
    """Paths with provenance, in-use signals, cheap counts, newest backups.  Reads metadata only."""
    sources = sources or {}
    workspace = config.workspace.root_path
    if not workspace.is_dir():
        raise OpsError("workspace %s does not exist (%s); check --workspace, --config and CONTEXTA_* variables"
                       % (workspace, sources.get("workspace.root_path", "default")), code="workspace_missing",
                       path=workspace)
    paths = []
    for name, dotted in _STATUS_PATHS:
        path = _setting(config, dotted)
        kind = "dir" if path.is_dir() else ("file" if path.is_file() else None)
        count, size = _tree_size(path) if kind == "dir" else ((1, path.stat().st_size) if kind else (0, 0))
        paths.append(PathStatus(name, dotted, path, sources.get(dotted, "default"), kind is not None, kind,
                                size, count))
    warnings: List[StatusWarning] = []
    in_use: List[str] = []
    for notice, _held in _workspace_signals(config):
        in_use.append("metadata_locked_by_writer" if notice.code == "metadata_in_use" else notice.code)
        if notice.code == "metadata_in_use":
            notice = Notice(notice.code, notice.message + "; a backup now may not be consistent, a restore would "
                                                          "replace it under the writer")
        if notice.code != "metadata_wal_present":  # a crashed writer's WAL is copied with its ledger
            warnings.append(StatusWarning(notice.code, notice.message, True))
    if not _lock_is_held(_workspace_lock_path(workspace)) and not _journal_path(workspace).exists():
        leftovers = [path for root in [workspace] + _relocated_roots(config, workspace)
                     for path in _stale_dirs(root.parent, _new_tree_prefix(root), files=True)]
        if leftovers:
            warnings.append(StatusWarning("restore_leftover", "%d copy(ies) left by a restore killed before its "
                                          "switch-over, e.g. %s; the next backup or restore removes them"
                                          % (len(leftovers), leftovers[0]), False))
    if _is_within(config.recovery.backup_root, workspace):
        warnings.append(StatusWarning("backup_root_inside_workspace", "backup_root %s is inside the workspace; a "
                                      "lost or replaced workspace takes its backups with it"
                                      % config.recovery.backup_root, True))
    if _is_within(config.recovery.restore_staging_root, workspace):
        warnings.append(StatusWarning("staging_root_inside_workspace", "staging_root %s is inside the workspace "
                                      "(verify-only stages elsewhere; set --staging-root)"
                                      % config.recovery.restore_staging_root, False))
    record_count = None
    with contextlib.suppress(OSError, ValueError, UnicodeDecodeError, TypeError):
        manifest = json_loads(read_regular(config.records.root_path / "manifest.json"))
        record_count = int(manifest["last_committed_sequence"])
    bindings = config.artifacts.root_path / "bindings"
    binding_count = len(list(bindings.glob("*.binding.json"))) if bindings.is_dir() else 0
    backups = [entry for entry in list_backups(config)]
    unsafe = any(warning.unsafe for warning in warnings)
    return WorkspaceStatus(
        status="DEGRADED" if unsafe else "SUCCESS", workspace_root=workspace, paths=tuple(paths),
        in_use=tuple(in_use), record_count=record_count, artifact_binding_count=binding_count,
        outbox_pending_count=_count_lines(config.recovery.outbox_root / OUTBOX_FILE),
        outbox_dead_lettered_count=_count_lines(config.recovery.outbox_root / DEAD_LETTER_FILE),
        newest_backups=tuple(backups[-5:]), warnings=tuple(warnings), notes=tuple(notes))


# ---------------------------------------------------------------------------
# Repair: check finds, repair fixes
# ---------------------------------------------------------------------------
#
# `repair` fixes what `check` finds that a machine can fix without guessing,
# each the way contexta 1.0.0's own repair functions do it, with the same
# bytes: a torn last line of a record segment is cut (the whole segment is
# copied to quarantine first) and the manifest's sequence fields follow it;
# the derived record indexes are rebuilt from the segments; orphan bodies,
# drifted bound bodies and abandoned staging files move into the artifact
# store's quarantine with a history event; bindings whose body is missing or
# drifted get a fresh verification event; malformed outbox lines go to the
# dead-letter file exactly as replay would put them there, and nothing is
# delivered.  What it cannot fix (a corrupt line inside a segment, a missing
# body) it names and leaves alone.  Nothing is deleted without a copy but the
# old index files, which are derived from the segments and rebuilt from them.
#
# The plan comes first and changes nothing.  An apply holds the workspace lock
# and the stores' own locks, refuses under a live writer as a restore does,
# takes a safety backup, then writes every new file whole into a scratch
# directory inside its store (named like a temp file, so backups and Contexta
# skip it).  A journal beside the workspace lists the scratch directories
# before they exist, then - once every new file is durable - every rename;
# the renames follow.  A run killed before that commit leaves the workspace as
# it was (the next run removes the scratch); one killed after it is finished
# by the next run.  Then `check` runs on the result.

REPAIR_PLANES = ("records", "artifacts", "outbox")
_REPAIR_SAFETY_LABEL = "pre-repair-safety"
# The families contexta's append path indexes, in its order; its rebuild writes the first three only, and
# makes their folders even when they stay empty.
_INDEX_FAMILIES = ("run_ref", "record_type", "stage_execution_ref", "batch_execution_ref", "sample_observation_ref")
_ALWAYS_REBUILT_FAMILIES = ("run_ref", "stage_execution_ref", "record_type")
_INDEX_BUFFER_BYTES = 8 << 20
_STEPS_LISTED = 1000
_LINES_NAMED = 20


class RepairError(OpsError):
    code = "repair_failed"


@dataclasses.dataclass(frozen=True)
class RepairStep(_Record):
    """One thing a repair does: on which plane, Contexta's name for it, to what, and where the copy goes."""

    plane: str
    action: str
    path: str
    detail: str = ""
    destination: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class RepairPlan(_Record):
    """What a repair would do (``actions`` as contexta's RepairPlan lists them).  Planning changes nothing.

    ``steps`` holds the first 1,000 steps (``step_count`` counts them all, ``step_counts`` by plane);
    ``left_alone`` is what the planes hold that no step fixes; ``refusals``
    are why an apply would refuse, before it changes anything.
    """

    actions: Tuple[str, ...]
    workspace_root: Path
    planes: Tuple[str, ...] = REPAIR_PLANES
    steps: Tuple[RepairStep, ...] = ()
    step_count: int = 0
    step_counts: Mapping[str, int] = dataclasses.field(default_factory=dict)  # plane -> steps
    left_alone: Tuple[Problem, ...] = ()
    create_safety_backup: bool = True
    refusals: Tuple[Notice, ...] = ()
    notes: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RepairResult(RecoveryResult):
    """What a repair did: contexta's RepairReport fields for records, restore's safety backup and check after.

    FAILURE (exit 1) when the check after the repair still finds problems; ``problems`` lists them.
    """

    workspace_root: Optional[Path] = None
    planes: Tuple[str, ...] = ()
    applied: bool = False
    actions: Tuple[str, ...] = ()
    steps: Tuple[RepairStep, ...] = ()
    repaired_segments: Tuple[int, ...] = ()
    quarantined_paths: Tuple[str, ...] = ()
    rebuilt_indexes: bool = False
    integrity_state: Optional[str] = None
    dead_lettered_count: int = 0
    safety_backup_ref: Optional[str] = None
    post_apply_check: Optional[Mapping[str, Any]] = None
    problems: Tuple[Problem, ...] = ()


@dataclasses.dataclass
class _Job:
    """One fix: what it shows, Contexta's action lines, and how it writes its new files into a scratch directory.

    ``prepare`` returns the journal's rename steps; None when the fix is made
    before planning (an interrupted artifact write, finished by its own journal).
    ``unchanged`` are (path, inode, size, mtime_ns) that must still hold at the
    commit (size and mtime None where appends are expected).
    """

    plane: str
    steps: List[RepairStep]
    actions: List[str]
    prepare: Optional[Callable[[Path], List[Dict[str, Any]]]] = None
    unchanged: List[Tuple[Path, int, Optional[int], Optional[int]]] = dataclasses.field(default_factory=list)
    segment_id: Optional[int] = None
    dead_lettered: int = 0


class _RepairWork:
    """Everything one repair of some planes would do, and what it leaves alone."""

    def __init__(self, config: UnifiedConfig, planes: Sequence[str]) -> None:
        self.config = config
        self.planes = tuple(planes)
        self.jobs: List[_Job] = []
        self.left_alone: List[Problem] = []
        self.notes: List[str] = []
        self.stamp = _path_safe_timestamp(_utc_timestamp())  # Contexta's T, one per run, for quarantine folders
        self.committed = False

    def add(self, job: _Job) -> None:
        self.jobs.append(job)

    @property
    def steps(self) -> List[RepairStep]:
        return [step for job in self.jobs for step in job.steps]

    @property
    def actions(self) -> List[str]:
        return [action for job in self.jobs for action in job.actions]

    def planes_with_jobs(self, preparing: bool = False) -> List[str]:
        return [plane for plane in self.planes
                if any(job.plane == plane and (job.prepare is not None or not preparing) for job in self.jobs)]

    def store_root(self, plane: str) -> Path:
        roots = {"records": self.config.records.root_path, "artifacts": self.config.artifacts.root_path,
                 "outbox": self.config.recovery.outbox_root}
        return Path(roots[plane])


def _repair_journal_path(workspace_root: Path) -> Path:
    """Beside the workspace, with its lock: a journal names files in every store, relocated ones included."""
    return workspace_root.parent / (".%s.contexta-ops-repair.json" % workspace_root.name)


def _repair_planes(planes: Optional[Sequence[str]]) -> Tuple[str, ...]:
    unknown = sorted(set(planes or ()) - set(REPAIR_PLANES))
    if unknown:
        raise UsageError("unknown plane(s): %s (choose from %s)" % (", ".join(unknown), ", ".join(REPAIR_PLANES)))
    return tuple(plane for plane in REPAIR_PLANES if not planes or plane in planes)


def _rename_step(source: Path, destination: Path, replace: bool = False) -> Dict[str, Any]:
    """A journal step: move the file now at ``source`` (by inode) to ``destination``."""
    return {"op": "rename", "from": str(source), "to": str(destination), "ino": os.lstat(str(source)).st_ino,
            "replace": replace}


def _scratch_file(scratch: Path, data: bytes, mode: int = 0o600) -> Path:
    """A new file in the scratch directory (fsynced with the rest before the commit)."""
    path = scratch / uuid.uuid4().hex
    with _naming(path), open(str(path), "xb") as handle:
        handle.write(data)
    os.chmod(str(path), mode)
    return path


def _unchanged(path: Path, whole: bool = True) -> Tuple[Path, int, Optional[int], Optional[int]]:
    found = os.lstat(str(path))
    return (path, found.st_ino, found.st_size if whole else None, found.st_mtime_ns if whole else None)


# -- records: torn tails, the manifest, indexes ------------------------------------------------------------

class _IndexSink:
    """The pointer lines contexta's append path writes for each record: hashed, and written when given a folder."""

    def __init__(self, directory: Optional[Path] = None) -> None:
        self.directory = directory
        self.digests: Dict[str, Any] = {}
        self.pending: Dict[str, List[bytes]] = {}
        self.pending_bytes = 0

    def add(self, line: Mapping[str, Any], sequence: int, segment_id: int, line_number: int) -> None:
        envelope = line["record"].get("envelope")
        if not isinstance(envelope, dict):
            return
        pointer = (_compact_json({"offset": line_number, "segment_id": segment_id, "sequence": sequence})
                   + "\n").encode("utf-8")
        for family in _INDEX_FAMILIES:
            key = envelope.get(family)
            if key is None or key == "":
                continue
            rel = "%s/%s.jsonl" % (family, _UNSAFE_COMPONENT.sub("_", str(key).replace(":", "__")))
            digest = self.digests.get(rel)
            if digest is None:
                digest = self.digests[rel] = hashlib.sha256()
            digest.update(pointer)
            if self.directory is not None:
                self.pending.setdefault(rel, []).append(pointer)
                self.pending_bytes += len(pointer)
                if self.pending_bytes >= _INDEX_BUFFER_BYTES:
                    self.flush()

    def flush(self) -> None:
        assert self.directory is not None
        for rel, pointers in self.pending.items():
            path = self.directory / rel
            path.parent.mkdir(exist_ok=True)
            with _naming(path), open(str(path), "ab") as handle:
                handle.write(b"".join(pointers))
        self.pending = {}
        self.pending_bytes = 0

    def finish(self) -> None:
        """Write what is buffered, and the families Contexta's rebuild always makes, empty or not."""
        self.flush()
        assert self.directory is not None
        for family in _ALWAYS_REBUILT_FAMILIES:
            (self.directory / family).mkdir(exist_ok=True)

    def expected(self) -> Dict[str, str]:
        return {rel: digest.hexdigest() for rel, digest in self.digests.items()}


@dataclasses.dataclass
class _SegmentPass:
    """One read of a segment: where a torn last line starts, corrupt lines before it, what the kept part holds."""

    path: Path
    segment_id: int
    stat: os.stat_result
    lines: int = 0
    tail_at: Optional[int] = None
    tail_bytes: int = 0
    corrupt_lines: int = 0
    last_sequence: int = 0


def _segment_paths(root: Path) -> List[Tuple[Path, int]]:
    """Segments in name order, as Contexta reads them; one whose name has no number is left to `check`."""
    segments = root / "segments"
    found = []
    for path in sorted(segments.glob("segment-*.jsonl")) if segments.is_dir() else []:
        try:
            found.append((path, int(path.stem[len("segment-"):])))
        except ValueError:
            continue
    return found


def _pass_segment(path: Path, segment_id: int, index: _IndexSink) -> Optional[_SegmentPass]:
    """Read a segment once; None when it is not a regular file (check names it)."""
    try:
        handle = open_regular(path)
    except SpecialFileError:
        return None
    with handle:
        result = _SegmentPass(path, segment_id, os.fstat(handle.fileno()))
        start = 0
        for line_number, raw in enumerate(_lines_within(handle), start=1):
            end = handle.tell()
            result.lines = line_number
            line, sequence, problem = _decode_segment_line(raw, line_number, str(path))
            if problem is not None and problem.code == "truncated_line":
                result.tail_at, result.tail_bytes = start, end - start
            elif problem is not None:
                result.corrupt_lines += 1
            if line is not None and sequence is not None:
                result.last_sequence = sequence
                index.add(line, sequence, segment_id, line_number)
            start = end
    return result


def _records_manifest(path: Path) -> Optional[Dict[str, Any]]:
    """The record manifest's fields as Contexta reads them (``int``/``str``), or None when it cannot be read so."""
    try:
        data = json_loads(read_regular(path))
        return {"layout_mode": str(data["layout_mode"]), "layout_version": str(data["layout_version"]),
                "current_segment_id": int(data["current_segment_id"]), "next_sequence": int(data["next_sequence"]),
                "last_committed_sequence": int(data["last_committed_sequence"]),
                "current_segment_record_count": int(data["current_segment_record_count"])}
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return None


def _plan_records(work: _RepairWork) -> None:
    root = Path(work.config.records.root_path)
    if not root.is_dir():
        work.notes.append("records_absent")
        return
    report = scan_records(root)
    if any(problem.code == "record_store_layout_mismatch" for problem in report.problems):
        work.left_alone += report.problems  # Contexta refuses such a store; so do we
        work.notes.append("records_layout_unknown")
        return
    index = _IndexSink()
    passes = [found for found in (_pass_segment(path, number, index) for path, number in _segment_paths(root))
              if found is not None]
    fixed: Set[Tuple[str, str]] = set()
    manifest_path = root / "manifest.json"
    manifest = _records_manifest(manifest_path)
    for segment in passes:
        if segment.tail_at is None:
            continue
        if segment.corrupt_lines:
            work.notes.append("tail_not_cut:%s has %d corrupt line(s) before its torn tail (Contexta's rule)"
                              % (segment.path, segment.corrupt_lines))
            continue
        work.add(_tail_job(root, segment))
        fixed.add(("truncated_line", str(segment.path)))
        if manifest is not None and manifest["current_segment_id"] == segment.segment_id:
            manifest = dict(manifest, next_sequence=segment.last_sequence + 1,
                            last_committed_sequence=segment.last_sequence,
                            current_segment_record_count=segment.lines - 1)
            if segment.last_sequence == report.highest_sequence:
                fixed.add(("manifest_sequence_mismatch", str(manifest_path)))
            if read_regular(manifest_path) != _pretty_json(manifest):  # Contexta rewrites it whole
                work.add(_manifest_job(manifest_path, manifest))
    differences = _index_differences(root / "indexes", index.expected())
    if differences:
        work.add(_index_job(root, passes, index.expected(), differences))
    work.left_alone += [problem for problem in report.problems if (problem.code, problem.path) not in fixed]


def _tail_job(root: Path, segment: _SegmentPass) -> _Job:
    """Contexta's repair_truncated_tails for one segment: the whole segment to quarantine, then the cut."""
    assert segment.tail_at is not None
    compact = _utc_timestamp().replace(":", "").replace("-", "")  # Contexta's quarantine stamp
    destination = root / "quarantine" / ("segment-%06d.before-tail-repair-%s.jsonl" % (segment.segment_id, compact))
    path, found, keep = segment.path, segment.stat, segment.tail_at

    def prepare(scratch: Path) -> List[Dict[str, Any]]:
        copy = scratch / (path.name + ".whole")
        _copy_file(str(path), str(copy), (found.st_size, found.st_mtime_ns), stat.S_IMODE(found.st_mode),
                   found.st_mtime_ns)
        cut = scratch / path.name
        _copy_prefix(path, cut, keep)
        os.chmod(str(cut), stat.S_IMODE(found.st_mode))
        return [_rename_step(copy, destination), _rename_step(cut, path, replace=True)]

    step = RepairStep("records", "repair_truncated_tails", str(path), "cut the torn last line (line %d, %d bytes, "
                      "not JSON); the whole segment is copied to quarantine first" % (segment.lines, segment.tail_bytes),
                      str(destination))
    return _Job("records", [step], ["repair_truncated_tails:%s" % path], prepare, [_unchanged(path)],
                segment_id=segment.segment_id)


def _copy_prefix(source: Path, destination: Path, length: int) -> None:
    """The first ``length`` bytes of a file, into a new file."""
    with open_regular(source) as reader, _naming(destination), open(str(destination), "xb") as out:
        left = length
        while left:
            chunk = reader.read(min(_CHUNK, left))
            if not chunk:
                raise RepairError("%s shrank while it was repaired; nothing was changed" % source,
                                  code="repair_source_changed", path=source)
            out.write(chunk)
            left -= len(chunk)


def _manifest_job(path: Path, manifest: Mapping[str, Any]) -> _Job:
    mode = stat.S_IMODE(os.lstat(str(path)).st_mode)

    def prepare(scratch: Path) -> List[Dict[str, Any]]:
        return [_rename_step(_scratch_file(scratch, _pretty_json(dict(manifest)), mode), path, replace=True)]

    detail = "last_committed_sequence %d, next_sequence %d, current_segment_record_count %d" % (
        manifest["last_committed_sequence"], manifest["next_sequence"], manifest["current_segment_record_count"])
    return _Job("records", [RepairStep("records", "update_manifest", str(path), detail)],
                ["update_manifest:%s" % path], prepare, [_unchanged(path)])


def _index_differences(indexes: Path, expected: Mapping[str, str]) -> List[str]:
    """How the index tree differs from the one the segments give; empty when every file is exactly that."""
    if _path_kind(indexes) == "missing":
        return ["indexes/ is missing"] if expected else []
    if _path_kind(indexes) != "directory":
        return ["indexes is a %s" % _path_kind(indexes)]
    found: Dict[str, str] = {}
    differences = []
    for rel, _found_stat, kind in _walk_tree(indexes):
        if kind == "dir":
            if rel not in _INDEX_FAMILIES:
                differences.append("%s/ is not an index family" % rel)
        elif kind != "file":
            differences.append("%s is a %s" % (rel, kind))
        else:
            found[rel] = sha256_file(indexes / rel, follow_symlinks=False)[1]
    for rel in sorted(set(found) | set(expected)):
        if rel not in expected:
            differences.append("%s points at no record" % rel)
        elif rel not in found:
            differences.append("%s is missing" % rel)
        elif found[rel] != expected[rel]:
            differences.append("%s differs" % rel)
    return differences


def _index_job(root: Path, passes: Sequence[_SegmentPass], expected: Mapping[str, str],
               differences: Sequence[str]) -> _Job:
    """Contexta's rebuild_indexes, with all five families and the append path's key rule (D8), swapped in whole."""
    indexes = root / "indexes"
    segments = [(found.path, found.segment_id) for found in passes]

    def prepare(scratch: Path) -> List[Dict[str, Any]]:
        new = scratch / "indexes"
        new.mkdir()
        sink = _IndexSink(new)
        for path, number in segments:
            _pass_segment(path, number, sink)
        sink.finish()
        if sink.expected() != expected:
            raise RepairError("the segments under %s changed while their indexes were rebuilt; nothing was changed"
                              % root, code="repair_source_changed", path=root)
        return [{"op": "swap_dir", "target": str(indexes), "new": str(new), "old": str(scratch / "indexes-old"),
                 "old_ino": _lstat_ino(indexes), "new_ino": _lstat_ino(new)}]

    detail = "%d difference(s) from the segments, e.g. %s; rebuilt from the segments" % (
        len(differences), "; ".join(differences[:3]))
    return _Job("records", [RepairStep("records", "rebuild_indexes", str(indexes), detail)],
                ["rebuild_indexes:%s" % indexes], prepare, [_unchanged(found.path) for found in passes])


# -- artifacts: contexta's repair plan, with nothing deleted ---------------------------------------------

def _plan_artifacts(work: _RepairWork) -> None:
    store = ArtifactStore(VaultConfig.from_unified_config(work.config))
    root = store.root_path
    if not root.is_dir():
        work.notes.append("artifacts_absent")
        return
    journals, unusable = _write_journals(store)
    work.left_alone += unusable
    owned: Set[str] = set()  # files an uncommitted write journal removes itself
    for path, journal in journals:
        committed = _journal_committed(store, journal)
        if not committed:
            owned.update((journal["body"], journal["staged"]))
        how = ("rolled forward: its binding is in place; missing history events are written" if committed
               else "rolled back: its binding was never written; the binding and body go back to what they were")
        work.add(_Job("artifacts", [RepairStep("artifacts", "finish_interrupted_write", str(path), how)],
                      ["finish_interrupted_write:%s" % path]))
    report = scan_artifact_bindings(root)
    bodies = {check.path for check in report.checks}
    count = len(work.jobs)
    for check in report.checks:
        if check.status != "verified":
            work.add(_verification_job(store, check))
        if check.status in ("size_mismatch", "hash_mismatch") and check.body_kind == "file":
            work.add(_bound_quarantine_job(store, check))
    strays = [_relative_posix(path, root) for path in report.orphan_paths]
    # A link among the bodies goes too (Contexta's sweep follows it and moves it); a FIFO or device is left to a
    # person - `check` flags one wherever it is in the store.
    strays += [_relative_posix(problem.path, root) for problem in report.problems
               if problem.code == "symlink_not_followed" and _is_within(problem.path, root / "objects")
               and _relative_posix(problem.path, root) not in bodies]
    for rel in sorted(set(strays) - owned, key=lambda each: each.split("/")):  # Contexta sorts paths by part
        work.add(_orphan_job(store, rel, work.stamp))
    for path in _abandoned_staging(store, owned):
        work.add(_staging_job(store, path, work.stamp))
    if report.artifact_count == 0 and len(work.jobs) == count:
        work.notes.append("noop:artifact_store_healthy_or_empty")
    moved = {"artifact_orphan", "artifact_stray_temp", "symlink_not_followed"}
    work.left_alone += [problem for problem in report.problems if not (
        problem.code in moved and _is_within(problem.path, root / "objects")
        and _relative_posix(problem.path, root) not in bodies)]


def _event_job_step(scratch: Path, path: Path, payload: Mapping[str, Any]) -> Dict[str, Any]:
    """A history event, written in scratch and renamed into place with the rest."""
    return _rename_step(_scratch_file(scratch, _pretty_json(dict(payload))), path)


def _quarantine_event(store: ArtifactStore, kind: str, source: Path, destination: Path,
                      details: Mapping[str, Any]) -> Tuple[Path, Dict[str, Any]]:
    """Contexta's quarantine history event: where it goes and what it says."""
    return store.root_path / "history" / "quarantine" / _event_name(), {
        "kind": kind, "recorded_at": _utc_timestamp(), "source_path": str(source),
        "destination_path": str(destination), "details": dict(details)}


def _verification_job(store: ArtifactStore, check: ArtifactCheck) -> _Job:
    """Contexta's refresh_verification: one verification event with the body's state now."""
    def prepare(scratch: Path) -> List[Dict[str, Any]]:
        path, payload = _verification_event(store, _report_from_check(check, store.root_path, _utc_timestamp()))
        return [_event_job_step(scratch, path, payload)]

    folder = store.root_path / "history" / "verification" / sanitize_component(check.artifact_ref)
    step = RepairStep("artifacts", "refresh_verification", check.artifact_ref, "body is %s%s; a verification event "
                      "records it" % (check.status, "" if check.body_kind in ("file", "missing")
                                      else " (a %s)" % check.body_kind), str(folder))
    return _Job("artifacts", [step], ["refresh_verification:%s" % check.artifact_ref], prepare)


def _bound_quarantine_job(store: ArtifactStore, check: ArtifactCheck) -> _Job:
    """Contexta's quarantine_bound_artifact: the drifted body is kept aside; the binding stays (it reads missing)."""
    body = store.root_path / check.path
    destination = store.bound_quarantine_path(body)

    def prepare(scratch: Path) -> List[Dict[str, Any]]:
        event = _quarantine_event(store, "bound_artifact", body, destination, {"artifact_ref": check.artifact_ref})
        return [_rename_step(body, destination), _event_job_step(scratch, *event)]

    step = RepairStep("artifacts", "quarantine_bound_artifact", str(body), "body of %s does not match its binding "
                      "(%s); it is kept in quarantine and reads as missing until a backup or package brings it back"
                      % (check.artifact_ref, check.status), str(destination))
    return _Job("artifacts", [step], ["quarantine_bound_artifact:%s" % check.artifact_ref], prepare,
                [_unchanged(body)])


def _orphan_job(store: ArtifactStore, rel: str, stamp: str) -> _Job:
    """Contexta's quarantine_orphan_body (a stray temp file or a link under objects/ goes the same way)."""
    source = store.root_path / rel
    destination = store.root_path / "quarantine" / "orphans" / stamp / rel[len("objects/"):]

    def prepare(scratch: Path) -> List[Dict[str, Any]]:
        event = _quarantine_event(store, "orphan_body", source, destination, {"orphan_path": str(source)})
        return [_rename_step(source, destination), _event_job_step(scratch, *event)]

    kind = _path_kind(source)
    what = ("an interrupted write's temp file" if rel.endswith(".tmp") and kind == "file"
            else "a body no binding points at" if kind == "file" else "a symbolic link where bodies are kept")
    step = RepairStep("artifacts", "quarantine_orphan_body", str(source), what + "; moved to quarantine",
                      str(destination))
    return _Job("artifacts", [step], ["quarantine_orphan_body:%s" % source], prepare, [_unchanged(source)])


def _abandoned_staging(store: ArtifactStore, owned: Set[str]) -> List[Path]:
    """``<id>.part`` without ``<id>.session.json``, and a session without its part: no ingest can finish them."""
    staging = store.root_path / "staging"
    try:
        names = set(os.listdir(str(staging)))
    except OSError:
        return []
    found = []
    for name in sorted(names):
        if name.endswith(".part"):
            partner = name[:-len(".part")] + ".session.json"
        elif name.endswith(".session.json"):
            partner = name[:-len(".session.json")] + ".part"
        else:
            continue
        if partner not in names and "staging/" + name not in owned and _path_kind(staging / name) == "file":
            found.append(staging / name)
    return found


def _staging_job(store: ArtifactStore, source: Path, stamp: str) -> _Job:
    """Contexta's remove_abandoned_staging, except that the file is kept in quarantine (D8)."""
    destination = store.root_path / "quarantine" / "staging" / stamp / source.name

    def prepare(scratch: Path) -> List[Dict[str, Any]]:
        event = _quarantine_event(store, "abandoned_staging", source, destination, {"staging_path": str(source)})
        return [_rename_step(source, destination), _event_job_step(scratch, *event)]

    step = RepairStep("artifacts", "remove_abandoned_staging", str(source), "no ingest session can finish it; moved "
                      "to quarantine, not deleted", str(destination))
    return _Job("artifacts", [step], ["remove_abandoned_staging:%s" % source], prepare, [_unchanged(source)])


# -- outbox: malformed lines to the dead-letter file, as replay puts them there ---------------------------

def _outbox_lines(outbox: Path, scan_end: int) -> Iterator[Tuple[int, bytes, Optional[_OutboxLine]]]:
    """``(line number, raw line, the line decided - when it is malformed - or None)`` up to ``scan_end``, as
    replay reads them."""
    with open_regular(outbox) as handle:
        offset = 0
        for line_number, raw in enumerate(handle, start=1):
            if offset >= scan_end:
                return
            if offset + len(raw) > scan_end:
                raw = raw[:scan_end - offset]
            offset += len(raw)
            line = _parse_outbox_line(raw) if raw.strip() else None
            yield line_number, raw, line if line is not None and line.reason else None


def _plan_outbox(work: _RepairWork) -> None:
    root = Path(work.config.recovery.outbox_root)
    outbox = root / OUTBOX_FILE
    kind = _path_kind(outbox)
    if kind != "file":
        if kind != "missing":
            work.left_alone.append(_irregular_problem(str(outbox), kind, "the outbox"))
        return
    scan_end = _complete_lines_end(outbox)
    named: List[str] = []
    count = 0
    for line_number, _raw, malformed in _outbox_lines(outbox, scan_end):
        if malformed is not None:
            count += 1
            if len(named) < _LINES_NAMED:
                named.append("line %d (%s)" % (line_number, malformed.reason))
    if os.stat(str(outbox)).st_size > scan_end:
        work.notes.append("outbox_tail_in_flight:%s ends in a line a writer may still be writing; it is left" % outbox)
    if count:
        work.add(_outbox_job(root, outbox, scan_end, count, named))


def _outbox_job(root: Path, outbox: Path, scan_end: int, count: int, named: Sequence[str]) -> _Job:
    dead_letter = root / DEAD_LETTER_FILE

    def prepare(scratch: Path) -> List[Dict[str, Any]]:
        kept, dead = scratch / "kept", scratch / "dead"
        found = 0
        with _naming(kept), open(str(kept), "xb") as keep, open(str(dead), "xb") as bury:
            for _line_number, raw, malformed in _outbox_lines(outbox, scan_end):
                if malformed is None:
                    keep.write(raw if raw.endswith(b"\n") else raw + b"\n")
                else:  # as replay buries it: its reason, and its own replay_ref when it has one
                    found += 1
                    bury.write(_json_line(_malformed_record(raw, malformed.reason, malformed.replay_ref)))
        if found != count:
            raise RepairError("the outbox %s changed while it was repaired; nothing was changed" % outbox,
                              code="repair_source_changed", path=outbox)
        return [{"op": "outbox", "outbox": str(outbox), "outbox_ino": os.lstat(str(outbox)).st_ino,
                 "kept": str(kept), "dead": str(dead), "final": str(scratch / OUTBOX_FILE),
                 "dead_letter": str(dead_letter), "carry_from": scan_end,
                 "dead_letter_size": os.stat(str(dead_letter)).st_size if dead_letter.exists() else 0}]

    step = RepairStep("outbox", "dead_letter_malformed", str(outbox), "%d malformed line(s) move to %s with their raw "
                      "text and reason, as replay would put them; nothing is delivered: %s%s"
                      % (count, DEAD_LETTER_FILE, ", ".join(named), ", ..." if count > len(named) else ""),
                      str(dead_letter))
    return _Job("outbox", [step], ["dead_letter_malformed:%s" % outbox], prepare, [_unchanged(outbox, whole=False)],
                dead_lettered=count)


# -- planning and refusing ------------------------------------------------------------------------------

_PLANNERS: Dict[str, Callable[[_RepairWork], None]] = {
    "records": _plan_records, "artifacts": _plan_artifacts, "outbox": _plan_outbox}


def _plan_work(config: UnifiedConfig, planes: Sequence[str]) -> _RepairWork:
    work = _RepairWork(config, planes)
    _plan_into(work)
    return work


def _plan_into(work: _RepairWork) -> None:
    for plane in work.planes:
        _PLANNERS[plane](work)


def _repair_blockers(config: UnifiedConfig, planes: Sequence[str]) -> List[Tuple[Notice, bool]]:
    """What makes repairing now unsafe: a restore's and a repair's own journals it finishes itself, and an
    interrupted artifact write when it repairs the artifacts (finishing those is one of its steps)."""
    handled = {"restore_interrupted", "repair_interrupted"}
    if "artifacts" in planes:
        handled.add("artifact_write_interrupted")
    return [(notice, held) for notice, held in _workspace_signals(config) if notice.code not in handled]


def plan_repair(config: UnifiedConfig, planes: Optional[Sequence[str]] = None) -> RepairPlan:
    """Say what a repair of ``planes`` (records, artifacts, outbox; default all) would do.  Changes nothing."""
    selected = _repair_planes(planes)
    workspace = config.workspace.root_path
    if not workspace.is_dir():
        raise OpsError("workspace %s does not exist" % workspace, code="workspace_missing", path=workspace)
    work = _plan_work(config, selected)
    if os.path.lexists(str(_repair_journal_path(workspace))):
        work.notes.append("interrupted_repair:the next repair finishes or rolls it back first (%s)"
                          % _repair_journal_path(workspace))
    return RepairPlan(
        actions=tuple(work.actions), workspace_root=workspace, planes=selected,
        steps=tuple(work.steps[:_STEPS_LISTED]), step_count=len(work.steps),
        step_counts={plane: sum(len(job.steps) for job in work.jobs if job.plane == plane) for plane in selected},
        left_alone=tuple(work.left_alone),
        create_safety_backup=bool(config.recovery.create_backup_before_restore),
        refusals=tuple(notice for notice, _held in _repair_blockers(config, selected)), notes=tuple(work.notes))


# -- applying -----------------------------------------------------------------------------------------------

def apply_repair(config: UnifiedConfig, plan: RepairPlan) -> RepairResult:
    """Repair the planes ``plan`` found work in: safety backup, journaled renames, then `check` on the result.

    Holds the workspace lock and the stores' own locks (exit 4 while another
    run holds one), refuses under a live writer as a restore does, and first
    finishes a restore or repair that was killed.  The work is planned again
    under the locks, so what changed since ``plan`` is repaired as it is now;
    the result lists what was done.  FAILURE (exit 1) when the check
    afterwards still finds problems.
    """
    selected = _repair_planes(plan.planes)
    workspace = config.workspace.root_path
    if not workspace.is_dir():
        raise OpsError("workspace %s does not exist" % workspace, code="workspace_missing", path=workspace)
    notes: List[str] = []
    with _workspace_lock(workspace):
        resumed = _resume_interrupted_restore(workspace, _relocated_roots(config, workspace))
        if resumed is not None:
            notes.append("interrupted_restore:%s" % resumed)
        resumed = _resume_interrupted_repair(config)
        if resumed is not None:
            notes.append("interrupted_repair:%s" % resumed)
        _refuse_signals(workspace, [(notice, held) for notice, held in _repair_blockers(config, selected)
                                    if notice.code != "workspace_lock_held"], RepairError)
        work = _RepairWork(config, [plane for plane in selected if plan.step_counts.get(plane)])
        safety_ref = None
        if work.planes and plan.create_safety_backup and any(os.scandir(str(workspace))):
            safety_ref = _safety_backup(config, workspace, _REPAIR_SAFETY_LABEL)
        changed: List[str] = []
        try:
            if work.planes:
                _repair_under_store_locks(work, changed)
        finally:
            if safety_ref is not None and not changed and not work.committed:
                _delete_backup(config.recovery.backup_root / safety_ref)  # nothing changed: only a leftover
                safety_ref = None
        if safety_ref is not None:
            notes.append("safety_backup:%s" % safety_ref)
        post = check_workspace(config, planes=selected)
    return _repair_result(work, selected, notes + changed, safety_ref, post)


def _repair_under_store_locks(work: _RepairWork, changed: List[str]) -> None:
    """Take the stores' own locks, finish killed artifact writes, plan again and carry the plan out."""
    config = work.config
    with contextlib.ExitStack() as locks:
        if "artifacts" in work.planes:
            store = ArtifactStore(VaultConfig.from_unified_config(config))
            (store.root_path / "staging").mkdir(exist_ok=True)
            locks.enter_context(_Lock(store.root_path / _STORE_LOCK, what="artifact store %s" % store.root_path))
            journals, _unusable = _write_journals(store)
            changed += _recover_artifact_writes(store, journals, remove_stale_parts=False)
        if "outbox" in work.planes:
            outbox_root = Path(config.recovery.outbox_root)
            locks.enter_context(_Lock(outbox_root / REPLAY_LOCK_FILE, what="outbox %s" % outbox_root))
        _plan_into(work)
        if any(job.prepare is not None for job in work.jobs):
            _carry_out(config, work)


def _repair_result(work: _RepairWork, planes: Tuple[str, ...], notes: List[str], safety_ref: Optional[str],
                   post: CheckResult) -> RepairResult:
    steps = work.steps
    records = post.plane_results.get("records")
    # Dead letters are where repair puts malformed lines: they wait for a person (`replay requeue`), and the
    # check still lists them, but they are not damage the repair left behind.
    damage = [problem for problem in post.problems if problem.code != "outbox_dead_letters"]
    return RepairResult(
        status="FAILURE" if damage else "SUCCESS", notes=tuple(notes + work.notes),
        details={"step_count": len(steps)}, workspace_root=post.workspace_root, planes=planes,
        applied=work.committed, actions=tuple(work.actions), steps=tuple(steps[:_STEPS_LISTED]),
        repaired_segments=tuple(job.segment_id for job in work.jobs if job.segment_id is not None),
        quarantined_paths=tuple(step.destination for step in steps if step.destination is not None
                                and step.action not in ("dead_letter_malformed", "refresh_verification")),
        rebuilt_indexes=any(step.action == "rebuild_indexes" for step in steps),
        integrity_state=records.get("integrity_state") if isinstance(records, dict) else None,
        dead_lettered_count=sum(job.dead_lettered for job in work.jobs), safety_backup_ref=safety_ref,
        post_apply_check=post.to_dict(), problems=post.problems)


def _carry_out(config: UnifiedConfig, work: _RepairWork) -> None:
    """Write every new file into scratch, prove nothing moved meanwhile, commit the journal, do the renames."""
    journal_path = _repair_journal_path(config.workspace.root_path)
    scratch = {plane: work.store_root(plane) / ("tmp%s" % uuid.uuid4().hex[:8]) for plane in work.planes_with_jobs(preparing=True)}
    journal: Dict[str, Any] = {"version": 1, "state": "preparing", "started_at": _utc_timestamp(),
                               "workspace": str(config.workspace.root_path),
                               "scratch": [str(path) for path in scratch.values()], "steps": []}
    atomic_write_bytes(journal_path, _pretty_json(journal))
    _crash_point("repair:journal-prepared")
    try:
        for path in scratch.values():
            path.mkdir()
        for job in work.jobs:
            if job.prepare is not None:
                journal["steps"] += job.prepare(scratch[job.plane])
        for path in scratch.values():
            _sync_filesystem(path)
        _crash_point("repair:scratch-durable")
        _require_unchanged(work)
        journal["state"] = "applying"
        atomic_write_bytes(journal_path, _pretty_json(journal))
    except BaseException:
        _roll_back_repair(journal_path, journal)
        raise
    work.committed = True
    _crash_point("repair:journal-committed")
    _finish_repair(journal_path, journal)


def _require_unchanged(work: _RepairWork) -> None:
    for job in work.jobs:
        for path, ino, size, mtime_ns in job.unchanged:
            try:
                now = os.lstat(str(path))
            except FileNotFoundError:
                now = None
            if now is None or now.st_ino != ino or size is not None and (now.st_size, now.st_mtime_ns) != (
                    size, mtime_ns):
                raise RepairError("%s changed while the repair was prepared (is a writer running?); nothing was "
                                  "changed - repair again" % path, code="repair_source_changed", path=path)


def _roll_back_repair(journal_path: Path, journal: Mapping[str, Any]) -> None:
    """Before the commit nothing in the stores changed: remove the scratch directories, then the journal."""
    for path in journal["scratch"]:
        _remove_tree(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(str(journal_path))
    _fsync_dir(journal_path.parent)


def _finish_repair(journal_path: Path, journal: Mapping[str, Any]) -> None:
    """Do every journaled step not yet done (each knows by inode whether it is), then clean up."""
    for step in journal["steps"]:
        _ROLL_FORWARD[step["op"]](step)
    for path in journal["scratch"]:
        _remove_tree(path)
    _crash_point("repair:scratch-removed")
    os.unlink(str(journal_path))
    _fsync_dir(journal_path.parent)
    _crash_point("repair:finished")


def _journal_inconsistent(step: Mapping[str, Any], why: str) -> RepairError:
    return RepairError("cannot finish the interrupted repair: %s (step %s); inspect it by hand"
                       % (why, _compact_json(dict(step))), code="repair_journal_inconsistent", path=step.get("to"))


def _durable_makedirs(directory: Path) -> None:
    """Create a folder and its missing parents, each made durable in its parent."""
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir()
        _fsync_dir(path.parent)


def _roll_rename(step: Mapping[str, Any]) -> None:
    source, destination = Path(step["from"]), Path(step["to"])
    if _lstat_ino(destination) == step["ino"]:
        return
    if _lstat_ino(source) != step["ino"]:
        raise _journal_inconsistent(step, "%s is neither where it was nor where it goes" % source)
    if not step["replace"] and os.path.lexists(str(destination)):
        raise _journal_inconsistent(step, "%s already exists" % destination)
    _durable_makedirs(destination.parent)
    os.replace(str(source), str(destination))
    _fsync_dir(destination.parent)
    if source.parent != destination.parent:
        _fsync_dir(source.parent)
    _crash_point("repair:renamed")


def _roll_swap(step: Mapping[str, Any]) -> None:
    """The rebuilt index tree in place of the old one (renameat2 exchange, else two renames)."""
    target = Path(step["target"])
    current = _lstat_ino(target)
    if current == step["new_ino"]:
        return
    if step["old_ino"] is not None and current is None and _lstat_ino(step["old"]) == step["old_ino"]:
        os.rename(step["new"], str(target))  # killed between the two renames
    elif current == step["old_ino"] and _lstat_ino(step["new"]) == step["new_ino"]:
        _switch_unit(step)
    else:
        raise _journal_inconsistent(step, "%s is neither the old nor the rebuilt index tree" % target)
    _fsync_dir(target.parent)
    _crash_point("repair:indexes-switched")


def _roll_outbox(step: Mapping[str, Any]) -> None:
    """Dead letters appended (once: cut back to the journaled size first), then the outbox replaced atomically,
    then lines a writer appended to the old file meanwhile carried over (replay's way)."""
    outbox = Path(step["outbox"])
    if _lstat_ino(outbox) != step["outbox_ino"]:
        return  # already replaced
    _truncate_to(step["dead_letter"], step["dead_letter_size"])
    with _naming(step["dead_letter"]), open(step["dead_letter"], "ab") as out, open(step["dead"], "rb") as source:
        shutil.copyfileobj(source, out, _CHUNK)
        out.flush()
        os.fsync(out.fileno())
    _crash_point("repair:dead-letters-appended")
    with open_regular(outbox) as old:
        with _naming(step["final"]), open(step["final"], "wb") as out:
            with open(step["kept"], "rb") as kept:
                shutil.copyfileobj(kept, out, _CHUNK)
            old.seek(step["carry_from"])
            copied_end, _lines = _copy_lines(old, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(step["final"], stat.S_IMODE(os.fstat(old.fileno()).st_mode))
        _crash_point("repair:new-outbox-written")
        os.replace(step["final"], str(outbox))
        _fsync_dir(outbox.parent)
        _crash_point("repair:outbox-replaced")
        _carry_late_appends(old, copied_end, outbox)


_ROLL_FORWARD: Dict[str, Callable[[Mapping[str, Any]], None]] = {
    "rename": _roll_rename, "swap_dir": _roll_swap, "outbox": _roll_outbox}
_STEP_PATHS = ("from", "to", "target", "new", "old", "outbox", "kept", "dead", "final", "dead_letter")


def _resume_interrupted_repair(config: UnifiedConfig) -> Optional[str]:
    """Finish (after its commit) or roll back (before it) a repair that was killed; the caller holds the
    workspace lock.  ``finished``, ``rolled_back`` or None."""
    journal_path = _repair_journal_path(config.workspace.root_path)
    if not os.path.lexists(str(journal_path)):
        return None
    journal = _read_repair_journal(journal_path, config)
    if journal["state"] == "applying":
        _finish_repair(journal_path, journal)
        return "finished"
    _roll_back_repair(journal_path, journal)
    return "rolled_back"


def _read_repair_journal(journal_path: Path, config: UnifiedConfig) -> Dict[str, Any]:
    """The journal, every path in it inside one of this configuration's stores (anything else is refused)."""
    roots = [config.records.root_path, config.artifacts.root_path, config.recovery.outbox_root]
    try:
        journal = json_loads(read_regular(journal_path, follow_symlinks=False))
        if journal["state"] not in ("preparing", "applying") or not all(
                step["op"] in _ROLL_FORWARD for step in journal["steps"]):
            raise ValueError("unknown state or step")
        paths = list(journal["scratch"]) + [step[key] for step in journal["steps"] for key in _STEP_PATHS
                                            if key in step]
        for path in paths:
            if not isinstance(path, str) or not os.path.isabs(path) or not any(_is_within(path, root)
                                                                             for root in roots):
                raise ValueError("a path outside the stores")
    except (OSError, ValueError, KeyError, TypeError):
        raise RepairError("repair journal %s is unreadable or names paths outside this workspace's stores; inspect "
                          "it by hand" % journal_path, code="repair_journal_invalid", path=journal_path)
    return dict(journal)


# ---------------------------------------------------------------------------
# The first five minutes: a demo workspace, and the archive's self-check
# ---------------------------------------------------------------------------
#
# `demo` builds a small, realistic workspace in Contexta's exact format and
# walks the guide's operator flow over it, touching nothing outside its root.
# Its ledger is a real one: written by DuckDB when `duckdb` is importable,
# otherwise a copy of the empty ledger contexta 1.0.0 creates, embedded here
# (tests/data/empty-ledger.db, made with tests/data/make_empty_ledger.py).

_EMPTY_LEDGER = (
    "eNrt3E2MG2cZAOCxdzf7kyabn5YmTaOqEgdASrS7LZu2EhKo7QFBpapqD/wax57dddi1rbF3SU6tKgSICxIXuCBuXMoBTkiVkHpr"
    "UpX0SMqNExInhAQnJDM/no3XHm+y2YRkl+fJxh7PNzPfzPe+M/bMfPatX9ycePvd2S+98tbLX/vbRHBXtpYuLlxcHF/+Qv3SC4uL"
    "z4cvLuy+nO/+4T9f+PzvTpz/9uuXP51+7/i/AgAAAOCBOH32re+89/PfniwVF0+Vtwcns6eZ7OlVTQcAAAAHxq1LV68+/a1XXstf"
    "94YEzv8BAADgwPvzF19+/vEzP6z2X07Ug2O1oFwPSvWg3AiCVhA/T25UG83+lYFaUpL8xYUbQToYT7ESpNP0emFwZD2sr4ZRMm0y"
    "80T/dVp+4nK1W1urhFfD2ma30Wp2er3rwcjIG/FsM/GcUbgSxoNne73VIFhLLk3Ug+los1kpKpjtdKurYWHRXFZBs7oRjpQdbUX1"
    "MKo0mvW4/rjw2I4Z42VG3bBeqXZHZjwSl3U3OyPjH2tXr623qvXKlU6rOVTa630UzMQNNnE9KN0Igo+CUrKNvV7SnPGofKCcD0zk"
    "A1P5wJF8YDofSBeb1PNOXykMZnq9lSBIa40neur1N7762lfe+EZluJ0rCyvBbD04k6z2QvLwueThl6Xk8SdT6eOJ5HEmeTjRn2A1"
    "KAfBfKfbipLm3gqjTryoUpBkwTPJigQrwavZdaPjW4uVhfhff9psmrn+NP1saiQD+0qpJ+phe711bSNsdofyqrhkt+Q62o5aV8Ja"
    "tzCL5gcWV5hKY1Pzf55j03vIsT2m1ofTO3LrmTy3Ctv6cCRY2NxqRK1mum2dZrXdWWt1swQrLEkSbHKvR6+jtWq7uxkVp8Gdwj11"
    "L4eUouD+aL44uIXbeSiCe3KjsRpVk2StrDWSqq4lgR0dmwR1Ov7rdMN2pVEfDdFK1NrIt2f0DajbGlt2tB52alGj3S0qHHcAmKu2"
    "2+uN4myZa7a6Yefu3n7y7bmLfJkcf8AoSqV/ntqRSufyVBpp2UORRjP9N470sLD9YrcjwWThW8hcLQqr3Yd8FPj92R2hO5WHLt+s"
    "QxGxU/HWbIXNarOWfGasxe/QaewKRidRnBoTxceicD3L5sKDerXTCce9tx/PCpN5N1r1cM/hPnIv4Z7cLe6/Or8j7k8PxH2oSQ5F"
    "BszmsUsDf/tVEu8jY+I912ltRrUxZxnx57jVsPiz47HtPOleaxechGTtem/7/fS+EmFqbEaUw+Cn5R0ZcTrPiO22OhSJMBl/KEtz"
    "IB3YLfy7nh+MOaI/5I/3d454Jj7jn0lbLcgadzX4OAhuBj/+R683/0k+aWklvSwQBl/e71WHLHYqfMAVXk/2hTAtis/bbmSvkp37"
    "aja1Fj4AFYbpkS0cGBsmu+87Jwa759h97b5a+ADvvpOa/v8m1tOaXoUqdKgU6zvFekrTP6AKM5OSrJ5eS5VkKpTNml6Fj1Y2z2p6"
    "FarQAWLcAaKU1lxP7n2tBvNr2UqW+itZ+lNwZvCHqgeHbwY/e/aTZLZe70pQ+mx29zNf2tvpfcodS+tP2F+7gYrD7K7mcN3n4rqX"
    "FpaWLywuXlhafnNhcPhm8NePJz4JzvWX+fU9V17Ow5G0+h62NG/UXYJV3k925Ktztxt/F+uT90y+f8lT2k6ebI3LO+56f/hE0sAD"
    "Iz74TP/+a+lKkN7adv3OnY+DWuH29/p3pPitnd16j2/39Ng8JJ08TneqG+31sNK63Amjrdv9forGJ+k2ex+/fzCbdbwv7FHSr37M"
    "dxPSlSruPDIfhd2wmfYpqq0nfcmGJzgZhfVqLZ2gHbVWGuvhA+1oMtq/ZGa3rkW/ObYj4c7nCVcQjkORf/Od2lq4Ua1shN1qvdqt"
    "Jrk3PC7Ju/it6PFkTcJKv3Bsn+KxXYCTyJW3W347XiMh+OOTSQhK2WyNZJL9fbcn2wGGvtszPLLfkXpv+9ZctpRH4ws8+9spjuy2"
    "U7z/VPEXd4Yb8VDsEU92utFmrbsZVdeToMf/VxvxqLQD/riy3XpUzyQTfj/Jg5H0af2gGadIYdmxbNFhNG5Puj/dqifDNDwDwX32"
    "dnALN/VRifHgLwABAAdLft6vO4+L9Q8r1gAAADz48/78dWnouTwwnPtg5Lf/AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAHh2/Dv7yfv3df/+9FA+XkxGlUjp+"
    "sV9e7j+X+s/n8nFT2ZilhaXlC4uLF5aW31xYfmlp8aXnli5eWl5efPG5b6bl35sorrek6QEAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAADgkfVfvjOqRg=="
)
_DEMO_PROJECT = "demo-proj"
_DEMO_RUNS = (("baseline", 0.81), ("tuned", 0.93))


def _empty_ledger_bytes() -> bytes:
    return zlib.decompress(base64.b64decode("".join(_EMPTY_LEDGER)))


def build_demo_workspace(config: UnifiedConfig) -> Dict[str, int]:
    """Write a sample workspace: ledger, record segment and indexes, artifacts, a failed-delivery outbox."""
    ws = config.workspace.root_path
    if ws.exists() and any(ws.iterdir()):
        raise OpsError("demo workspace %s already exists and is not empty" % ws, code="demo_root_not_empty", path=ws)
    database = config.metadata.database_path
    database.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(database, _empty_ledger_bytes())
    runs_in_ledger = _demo_ledger_rows(database)
    records = _demo_records(config.records.root_path)
    store = ArtifactStore(VaultConfig.from_unified_config(config))
    scratch = ws / "cache" / "demo-bodies"
    scratch.mkdir(parents=True)
    bodies = {("baseline", "model", "checkpoint", "model.bin"): bytes(range(256)) * 64,
              ("tuned", "model", "checkpoint", "model.bin"): b"tuned-weights" * 1000,
              ("tuned", "eval-table", "dataset", "eval.csv"):
                  b"id,label,score\n" + b"".join(b"%d,1,0.9\n" % i for i in range(200)),
              ("tuned", "notes", "report", None): b"free-form notes without a suffix\n"}
    for (run, name, kind, file_name), body in bodies.items():
        source = scratch / ("%s-%s" % (run, name))
        source.write_bytes(body)
        store.put_artifact(ArtifactManifest(
            artifact_ref="artifact:%s.%s.%s" % (_DEMO_PROJECT, run, name), artifact_kind=kind,
            created_at="2024-06-01T12:04:00Z", producer_ref="contexta-ops.demo",
            run_ref="run:%s.%s" % (_DEMO_PROJECT, run),
            location_ref="vault://%s/%s/%s" % (_DEMO_PROJECT, run, file_name or name)), source)
    _remove_tree(scratch)
    outbox = config.recovery.outbox_root
    outbox.mkdir(parents=True, exist_ok=True)
    entries = [{"replay_ref": "replay:record.1717243380000.%d" % i, "failed_at": "2024-06-01T12:03:00.000000Z",
                "sink_name": "local-jsonl-replay", "family": "RECORD", "payload_type": "MetricRecord",
                "payload_ref": "record:%s.tuned.m%04d" % (_DEMO_PROJECT, i), "error": "sink unavailable",
                "error_code": "dispatch_error", "attempts": 1,
                "payload": {"metric_key": "loss", "run_id": "%s.tuned" % _DEMO_PROJECT, "value": 0.1 * i}}
               for i in range(1, 6)]
    atomic_write_bytes(outbox / OUTBOX_FILE, b"".join(_json_line(entry) for entry in entries))
    return {"runs_in_ledger": runs_in_ledger, "records": records, "artifacts": len(bodies),
            "outbox_entries": len(entries)}


def _demo_ledger_rows(database: Path) -> int:
    """With DuckDB at hand, the demo's project and runs go into the ledger as Contexta writes them."""
    try:
        import duckdb  # optional, never required
    except ImportError:
        return 0
    connection = duckdb.connect(str(database))
    try:
        project_ref = "project:" + _DEMO_PROJECT
        connection.execute("INSERT INTO projects VALUES (?, ?, ?, ?)", [
            project_ref, _DEMO_PROJECT, "2024-06-01T12:00:00Z", _compact_json({
                "created_at": "2024-06-01T12:00:00Z", "extensions": [], "name": _DEMO_PROJECT,
                "project_ref": project_ref, "schema_version": "1.0.0", "tags": {}})])
        for run, _accuracy in _DEMO_RUNS:
            run_ref = "run:%s.%s" % (_DEMO_PROJECT, run)
            connection.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)", [
                run_ref, project_ref, run, "2024-06-01T12:00:00Z", "completed", _compact_json({
                    "ended_at": "2024-06-01T12:05:00Z", "extensions": [], "name": run, "project_ref": project_ref,
                    "run_ref": run_ref, "schema_version": "1.0.0", "started_at": "2024-06-01T12:00:00Z",
                    "status": "completed"})])
        connection.execute("CHECKPOINT")
    finally:
        connection.close()
    return len(_DEMO_RUNS)


def _demo_records(root: Path) -> int:
    """A record segment with Contexta's canonical metric lines, its indexes and manifest."""
    (root / "segments").mkdir(parents=True)
    for folder in ("cursors/replay", "quarantine"):
        (root / folder).mkdir(parents=True)
    lines = []
    indexes: Dict[str, List[bytes]] = {}
    sequence = 0
    for run, accuracy in _DEMO_RUNS:
        for step in range(1, 26):
            sequence += 1
            run_ref = "run:%s.%s" % (_DEMO_PROJECT, run)
            stage_ref = "stage:%s.%s.train" % (_DEMO_PROJECT, run)
            record = {"envelope": {"completeness_marker": "complete", "correlation_refs": {},
                                   "degradation_marker": "none", "extensions": [],
                                   "observed_at": "2024-06-01T12:03:00Z", "producer_ref": "contexta-ops.demo",
                                   "record_ref": "record:%s.%s.m%04d" % (_DEMO_PROJECT, run, step),
                                   "record_type": "metric", "recorded_at": "2024-06-01T12:03:00Z",
                                   "run_ref": run_ref, "schema_version": "1.0.0", "stage_execution_ref": stage_ref},
                      "payload": {"aggregation_scope": "step", "metric_key": "accuracy", "tags": {},
                                  "value": accuracy * step / 25, "value_type": "float64"}}
            lines.append(_json_line({"appended_at": "2024-06-01T12:03:00Z", "record": record, "sequence": sequence}))
            pointer = _json_line({"offset": sequence, "segment_id": 1, "sequence": sequence})
            for family, key in (("run_ref", run_ref), ("record_type", "metric"), ("stage_execution_ref", stage_ref)):
                indexes.setdefault("%s/%s.jsonl" % (family, _UNSAFE_INDEX_KEY.sub("_", key.replace(":", "__"))),
                                   []).append(pointer)
    atomic_write_bytes(root / "segments" / "segment-000001.jsonl", b"".join(lines))
    for rel, pointers in indexes.items():
        (root / "indexes" / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(root / "indexes" / rel, b"".join(pointers))
    atomic_write_bytes(root / "manifest.json", _pretty_json({
        "current_segment_id": 1, "current_segment_record_count": sequence, "last_committed_sequence": sequence,
        "layout_mode": "jsonl_segments", "layout_version": "1", "next_sequence": sequence + 1}))
    return sequence


_UNSAFE_INDEX_KEY = re.compile(r"[^A-Za-z0-9._-]+")


@dataclasses.dataclass(frozen=True)
class DemoResult(_Record):
    status: str
    root: Path
    steps: Tuple[Mapping[str, Any], ...]


def run_demo(root: Any = None) -> DemoResult:
    """Build a sample workspace under ``root`` (a new temp dir by default) and walk the guide's flow on it."""
    root = _resolve_path(root) if root is not None else Path(tempfile.mkdtemp(prefix="contexta-ops-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    config = UnifiedConfig(project_name=_DEMO_PROJECT, workspace=WorkspaceConfig(root_path=root / ".contexta"),
                           recovery=RecoveryConfig(backup_root=root / "backups",
                                                   restore_staging_root=root / "staging"))
    steps: List[Dict[str, Any]] = []

    def step(name: str, status: str, summary: str, result: Any = None) -> None:
        steps.append({"step": name, "status": status, "summary": summary,
                      "result": None if result is None else _jsonable(result)})

    built = build_demo_workspace(config)
    step("build", "SUCCESS", "workspace %s: %d records, %d artifacts, %d outbox entries, %d runs in the ledger" % (
        config.workspace.root_path, built["records"], built["artifacts"], built["outbox_entries"],
        built["runs_in_ledger"]))
    status = workspace_status(config)
    step("1 confirm the workspace (status)", status.status, "%d records, %d artifact bindings, %d pending in the outbox" % (
        status.record_count or 0, status.artifact_binding_count, status.outbox_pending_count), status)
    backup = create_workspace_backup(config, plan_workspace_backup(config, label="demo"))
    step("2 back it up (backup create)", backup.status, "%s: %d files, each with its sha256" % (
        backup.backup_ref, backup.file_count), backup)
    verified = restore_workspace(config, plan_restore(config, backup.backup_ref, verify_only=True))
    step("3 prove it restorable (restore --verify-only)", verified.status, ", ".join(verified.verification_notes),
         verified)
    target = root / "restored" / ".contexta"
    plan = plan_restore(config, backup.backup_ref, target_workspace=target)
    step("4 read what a restore would do (restore plan)", "SUCCESS", "replaces %s; keeps %s; loses %d file(s)" % (
        ", ".join(plan.replaced), ", ".join(plan.kept) or "nothing", plan.lost_count), plan)
    applied = restore_workspace(config, plan)
    step("5 apply into a second workspace (restore --target)", applied.status, "applied to %s; post-apply check %s" % (
        target, (applied.post_apply_check or {}).get("status")), applied)
    checked = check_workspace(config)
    step("6 check the workspace (check)", checked.status, "%d problems over %s" % (
        len(checked.problems), ", ".join(checked.planes)), checked)
    replayed = replay_outbox(config)
    step("replay the outbox (replay)", replayed.status, "%d acknowledged, %d pending, %d dead-lettered" % (
        replayed.acknowledged_count, replayed.pending_count, replayed.dead_lettered_count), replayed)
    store = ArtifactStore(VaultConfig.from_unified_config(config))
    sweep = verify_all(store, record=False)
    step("verify every artifact (artifact verify --all)", "SUCCESS" if sweep.clean else "FAILURE",
         "%d verified, %d missing, %d drifted, %d orphans" % (
             sum(1 for item in sweep.reports if item.verified), len(sweep.missing_refs), len(sweep.drifted_refs),
             len(sweep.orphan_paths)), sweep)
    ref = "artifact:%s.tuned.model" % _DEMO_PROJECT
    exported = export_artifact(store, ref, export_root=root / "exports")
    second = ArtifactStore(VaultConfig(root_path=root / "second-store"))
    imported = import_export_package(second, exported.export_directory)
    summary = inspect_store(second)
    step("move an artifact to another store (artifact export / import)", "SUCCESS" if not summary.problems
         else "FAILURE", "%s: %s into %s; it now holds %d verified" % (
             ref, imported.outcome.value, second.root_path, summary.verified_count), imported)
    overall = "SUCCESS" if all(item["status"] in ("SUCCESS",) for item in steps) else "FAILURE"
    return DemoResult(status=overall, root=root, steps=tuple(steps))


@dataclasses.dataclass(frozen=True)
class SelfCheckResult(_Record):
    """``self-check``: the archive's members against the digests recorded when it was built."""

    status: str
    version: str
    python: str
    platform: str
    archive: Optional[str]
    members_checked: int = 0
    problems: Tuple[Problem, ...] = ()
    notes: Tuple[str, ...] = ()


ARCHIVE_DIGESTS = "contexta_ops.digests.json"


def _running_archive() -> Optional[str]:
    """The contexta.pyz this module was loaded from (``<pyz>/contexta_ops.py``), if any."""
    candidate = os.path.dirname(os.path.abspath(__file__))
    return candidate if os.path.isfile(candidate) and zipfile.is_zipfile(candidate) else None


def self_check() -> SelfCheckResult:
    """Re-hash every member of the running contexta.pyz against the digests its build recorded."""
    import platform
    python = "%s %s" % (platform.python_implementation(), platform.python_version())
    archive = _running_archive()
    base = functools.partial(SelfCheckResult, version=__version__, python=python, platform=platform.platform())
    if archive is None:
        return base(status="SUCCESS", archive=None, notes=(
            "not running from contexta.pyz: nothing to check beyond %s itself (sha256 %s)" % (
                __file__, sha256_file(__file__)[1]),))
    problems: List[Problem] = []
    checked = 0
    try:
        with zipfile.ZipFile(archive) as zipped:
            digests = json_loads(zipped.read(ARCHIVE_DIGESTS))["members"]
            names = {info.filename for info in zipped.infolist()} - {ARCHIVE_DIGESTS}
            for name in sorted(names | set(digests)):
                if name not in names:
                    problems.append(Problem("member_missing", name, "recorded at build time, now missing"))
                    continue
                if name not in digests:
                    problems.append(Problem("member_unexpected", name, "not recorded at build time"))
                    continue
                try:
                    digest = hashlib.sha256(zipped.read(name)).hexdigest()
                except _ARCHIVE_DAMAGE as exc:
                    problems.append(Problem("member_damaged", name, "cannot be read: %s" % exc))
                    continue
                checked += 1
                if digest != digests[name]:
                    problems.append(Problem("member_changed", name, "sha256 %s, built as %s" % (digest, digests[name]),
                                            expected=digests[name], actual=digest))
    except (KeyError, ValueError, zipfile.BadZipFile, OSError) as exc:
        problems.append(Problem("archive_unreadable", archive, "cannot read the archive's digests: %s" % exc))
    return base(status="FAILURE" if problems else "SUCCESS", archive=archive, members_checked=checked,
                problems=tuple(problems))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
#
# Thin: parse, resolve the configuration, call the public function a script
# would call, print its result.  Text goes to stdout for people; with --json
# exactly one JSON object goes to stdout and everything else to stderr.

_PROG = "contexta.pyz"


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors raise instead of exiting, so --json can still answer in JSON."""

    def error(self, message: str) -> NoReturn:
        raise UsageError("%s%s (see `%s --help`)" % (message, _close_match(message), self.prog))


_KNOWN_OPTIONS: Set[str] = set()  # every option of every command, filled as the parser is built


def _close_match(message: str) -> str:
    """"; did you mean ...?" for a mistyped command, action or flag (argparse's own words are parsed)."""
    import difflib
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        options = re.findall(r"'([^']*)'", choice.group(2)) or [part.strip() for part in choice.group(2).split(",")]
        found = difflib.get_close_matches(choice.group(1), options, 1)
    else:
        unknown = re.search(r"unrecognized arguments: (.*)", message)
        words = [word.split("=", 1)[0] for word in (unknown.group(1).split() if unknown else []) if word.startswith("-")]
        found = [match for word in words for match in difflib.get_close_matches(word, sorted(_KNOWN_OPTIONS), 1)]
    return "; did you mean %s?" % " / ".join("'%s'" % each for each in found) if found else ""


def _global_options() -> argparse.ArgumentParser:
    """Flags every command accepts, before or after its name (SUPPRESS keeps either placement)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("global options")
    group.add_argument("--workspace", metavar="DIR", default=argparse.SUPPRESS,
                       help="workspace root (default .contexta)")
    group.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                       help="Contexta config file (.json; .toml on Python 3.11+)")
    group.add_argument("--backup-root", metavar="DIR", default=argparse.SUPPRESS, help="where backups live")
    group.add_argument("--staging-root", metavar="DIR", default=argparse.SUPPRESS,
                       help="scratch space for verify-only restores")
    group.add_argument("--outbox-root", metavar="DIR", default=argparse.SUPPRESS, help="recovery outbox directory")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print exactly one JSON object on stdout")
    group.add_argument("--format", choices=("text", "json"), default=argparse.SUPPRESS,
                       help="Contexta's spelling: --format json is --json")
    group.add_argument("--profile", choices=("local", "test"), default=argparse.SUPPRESS,
                       help="Contexta's configuration profile (default local)")
    group.add_argument("--set", action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS,
                       help="a setting, as CONTEXTA_* would give it (recovery.backup_root=/srv/bk); repeatable")
    group.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress and no report on success")
    return common


_BACKUP_FORMS = """BACKUP is one of:
  a ref under --backup-root      nightly-2026-11-26T03-00-00Z
  latest                         the newest complete backup that is not a safety backup
  a label                        the newest backup made with --label LABEL
  a unique prefix of a ref       nightly-2026-11
  a path                         a backup directory, a .tar or .tar.gz archive, or Contexta's CLI zip
  -                              a tar archive on stdin"""
_REF_FORM = "REF is an artifact ref, artifact:<project>.<run>.<key> (artifact:proj.run-01.model)."
_PACKAGE_FORM = ("PACKAGE is a directory holding Contexta's export package (export.package.json, the body, its\n"
                 "binding and manifest.snapshot.json), as `artifact export` writes it.")
_REPAIR_FORM = """What each plane's repair does (nothing is deleted without a copy):
  records    cut a torn last line of a segment (the whole segment is copied to quarantine/ first),
             fix the manifest's sequence fields to match, rebuild the indexes from the segments
  artifacts  finish killed writes; move orphan bodies, drifted bodies and abandoned staging files
             into quarantine/ with a history event; record a verification event for missing and
             drifted bodies
  outbox     move malformed pending lines to dead_letter.jsonl with their raw text, as replay would;
             nothing is delivered
A corrupt line inside a segment or a missing body is named, not repaired: those come back from a backup."""
_CONFLICT_FORM = """--conflict says what happens when the store already binds REF to a different body:
  error    (default) exit 1, nothing changes
  skip     keep the store's body, report skipped
  replace  bind the package's body; the old one is kept in quarantine/bound/"""


def _add_command(subparsers: Any, name: str, purpose: str, example: str, common: argparse.ArgumentParser,
                 handler: Optional[Callable[[argparse.Namespace, "_Output"], int]] = None,
                 hidden: bool = False, explain: str = "", **kwargs: Any) -> argparse.ArgumentParser:
    """One command or action: its own help with an example, the global flags, and the function that runs it."""
    if not hidden:
        kwargs["help"] = purpose
    epilog = (explain + "\n\n" if explain else "") + "example:\n  " + example
    parser = subparsers.add_parser(name, description=purpose, parents=[common], epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                   **kwargs)
    if handler is not None:
        parser.set_defaults(handler=handler)
    return parser


def _all_options(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in parser._actions:
        yield from action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_options(sub)


def _add_actions(parser: argparse.ArgumentParser, name: str) -> Any:
    """Sub-actions of a command; the command alone is a usage error that lists them (from the parser)."""
    actions = parser.add_subparsers(dest=name.replace("-", "_") + "_action", metavar="ACTION", parser_class=_Parser,
                                    prog=parser.prog)

    def needs_action(_args: argparse.Namespace, _out: "_Output") -> int:
        visible = [choice.dest for choice in actions._choices_actions]
        listed = ", ".join(visible[:-1]) + (" or " if len(visible) > 1 else "") + visible[-1]
        raise UsageError("%s needs an action: %s (see `%s %s --help`)" % (name, listed, _PROG, name))

    parser.set_defaults(handler=needs_action)
    return actions


# Commands whose first word may be omitted: `restore BACKUP` runs a restore, `replay` alone replays.
_DEFAULT_ACTIONS = {"restore": "run", "replay": "run", "repair": "run"}


def _build_parser() -> argparse.ArgumentParser:
    common = _global_options()
    parser = _Parser(prog=_PROG, parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                     description=__doc__.split("\n\n")[0], allow_abbrev=False,
                     epilog="exit codes: 0 success, 1 problems found, 2 usage, 3 could not run, 4 locked")
    parser.add_argument("--version", action="version", version="%s %s" % (TOOL_NAME, __version__))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    backup = _add_command(commands, "backup", "Back up a workspace, list and verify backups.",
                          "%s backup create --label nightly" % _PROG, common)
    backup_actions = _add_actions(backup, "backup")
    for action, purpose, example, handler in (
            ("plan", "Show what a backup would copy; changes nothing.", "backup plan --include-exports",
             _cmd_backup_plan),
            ("create", "Write a complete, checksummed backup.", "backup create --label before-upgrade",
             _cmd_backup_create)):
        sub = _add_command(backup_actions, action, purpose, "%s %s" % (_PROG, example), common, handler)
        sub.add_argument("--label", help="label that starts the backup ref")
        sub.add_argument("--include-cache", action="store_true", help="also copy cache/ (the outbox always is)")
        sub.add_argument("--include-exports", action="store_true", help="also copy exports/")
        if action == "create":
            sub.add_argument("--archive", metavar="FILE", help="write one tar file instead (- streams to stdout)")
            sub.add_argument("--output", metavar="FILE.zip",
                             help="write Contexta's CLI zip of the whole workspace instead (contexta's spelling)")
            sub.add_argument("--gzip", action="store_true", help="gzip the archive")
            sub.add_argument("--incremental", action="store_true",
                             help="hard-link files unchanged since the newest complete backup")
            sub.add_argument("--verify-unchanged", action="store_true",
                             help="with --incremental, also compare sha256 before linking")
    _add_command(backup_actions, "list", "List backups: ref, time, size, sections, checksums, complete.",
                 "%s backup list --json" % _PROG, common, _cmd_backup_list)
    verify = _add_command(backup_actions, "verify", "Re-hash every file of a backup against its manifest.",
                          "%s backup verify nightly-2026-11-26T03-00-00Z" % _PROG, common, _cmd_backup_verify,
                          explain=_BACKUP_FORMS)
    verify.add_argument("backup", metavar="BACKUP", help="backup ref, a backup directory or archive, or - (stdin)")
    diff = _add_command(backup_actions, "diff", "Files added, removed and changed between two backups, or a backup "
                        "and the live workspace.", "%s backup diff nightly-2026-11-25 nightly-2026-11-26" % _PROG,
                        common, _cmd_backup_diff, explain=_BACKUP_FORMS)
    diff.add_argument("left", metavar="BACKUP", help="the earlier side")
    diff.add_argument("right", metavar="BACKUP", nargs="?", help="the later side (default: the live workspace)")
    prune = _add_command(backup_actions, "prune", "Delete old backups and leftovers; never the newest complete one.",
                         "%s backup prune --keep-last 7 --keep-within 30 --dry-run" % _PROG, common, _cmd_backup_prune)
    prune.add_argument("--keep-last", type=int, metavar="N", help="keep the newest N complete backups")
    prune.add_argument("--keep-within", type=float, metavar="DAYS", help="keep backups younger than DAYS")
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")

    restore = _add_command(
        commands, "restore", "Prove a backup restorable (--verify-only), plan a restore, or apply one.",
        "%s restore --verify-only\n  %s restore plan nightly-2026-11-26T03-00-00Z\n"
        "  %s restore nightly-2026-11-26T03-00-00Z --target /srv/ml/.contexta" % (_PROG, _PROG, _PROG), common,
        usage="%s restore [plan|apply] [BACKUP] [--verify-only] [--target DIR] [--force]" % _PROG,
        explain=_BACKUP_FORMS)
    restore_actions = _add_actions(restore, "restore")
    for action, purpose, example, handler, hidden in (
            ("plan", "Say what a restore would replace, keep and lose; changes nothing.",
             "restore plan nightly-2026-11-26T03-00-00Z", _cmd_restore_plan, False),
            ("apply", "Verify a backup, safety-back-up the target, switch over atomically, check the result.",
             "restore apply nightly-2026-11-26T03-00-00Z --target /srv/ml/.contexta", _cmd_restore_run, False),
            ("run", "Verify a backup and apply it (`restore BACKUP`).", "restore nightly-2026-11-26T03-00-00Z",
             _cmd_restore_run, True)):
        sub = _add_command(restore_actions, action, purpose, "%s %s" % (_PROG, example), common, handler,
                           hidden=hidden, explain=_BACKUP_FORMS)
        sub.add_argument("backup", nargs="?", metavar="BACKUP",
                         help="backup ref, a backup directory or archive, a Contexta CLI zip, or - (stdin)")
        sub.add_argument("--verify-only", action="store_true",
                         help="prove the backup restorable, reading it in place; never touch the target")
        sub.add_argument("--materialize", action="store_true",
                         help="with --verify-only: copy the backup into --staging-root first, and check it there")
        sub.add_argument("--sample", metavar="PERCENT", type=_percent,
                         help="with --verify-only: a spot check that reads only PERCENT of the artifact bodies and "
                              "other files no plane parses (chosen at random), taking the rest at their listed "
                              "sha256; says it was partial")
        sub.add_argument("--target", "--target-workspace", dest="target", metavar="DIR",
                         help="workspace to restore into (default: --workspace; --target-workspace is Contexta's "
                              "spelling)")
        sub.add_argument("--force", action="store_true", help="apply even when verification finds problems")
        sub.add_argument("--only", action="append", metavar="PART[,PART]",
                         help="restore only these parts: %s; the rest stays as it is" % ", ".join(RESTORE_PARTS))
        sub.add_argument("--path", action="append", metavar="PATTERN", dest="paths",
                         help="restore only the files matching PATTERN (a workspace path as the backup lists it, "
                              "after workspace/: 'artifacts/objects/checkpoint/*'); repeatable")

    _add_command(commands, "status", "Confirm the workspace: paths and their sources, in-use signals, counts.",
                 "%s --workspace /srv/ml/.contexta status" % _PROG, common, _cmd_status)
    check = _add_command(commands, "check", "Verify the live workspace, plane by plane (after any operation).",
                         "%s check --plane records --plane artifacts" % _PROG, common, _cmd_check)
    check.add_argument("--plane", action="append", choices=CHECK_PLANES, metavar="PLANE",
                       help="one of %s; repeat for several (default: all)" % ", ".join(CHECK_PLANES))
    check.add_argument("--against", metavar="BACKUP",
                       help="compare every file with a backup's list (size, sha256): changed, missing, new")
    repair = _add_command(
        commands, "repair", "Fix what check finds: torn record tails, indexes, stray artifact files, malformed outbox "
        "lines.", "%s repair plan\n  %s repair --plane records --dry-run\n  %s repair" % (_PROG, _PROG, _PROG), common,
        usage="%s repair [plan|apply] [--plane PLANE] [--dry-run]" % _PROG, explain=_REPAIR_FORM)
    repair_actions = _add_actions(repair, "repair")
    for action, purpose, example, handler, hidden in (
            ("plan", "Say what a repair would cut, rebuild and quarantine; changes nothing.", "repair plan",
             _cmd_repair_plan, False),
            ("apply", "Safety-back-up, repair with a journal, check the result.", "repair apply --plane outbox",
             _cmd_repair_run, False),
            ("run", "Repair (`repair`).", "repair --dry-run", _cmd_repair_run, True)):
        sub = _add_command(repair_actions, action, purpose, "%s %s" % (_PROG, example), common, handler,
                           hidden=hidden, explain=_REPAIR_FORM)
        sub.add_argument("--plane", action="append", choices=REPAIR_PLANES, metavar="PLANE",
                         help="one of %s; repeat for several (default: all)" % ", ".join(REPAIR_PLANES))
        sub.add_argument("--dry-run", action="store_true", help="show the plan; change nothing (as `repair plan`)")
    demo = _add_command(commands, "demo", "Build a sample workspace and walk the operator flow on it.",
                        "%s demo --root /tmp/contexta-demo" % _PROG, common, _cmd_demo)
    demo.add_argument("--root", metavar="DIR", help="where to build it (default: a new temporary directory)")
    _add_command(commands, "self-check", "Check this contexta.pyz against the digests recorded when it was built.",
                 "%s self-check" % _PROG, common, _cmd_self_check)

    replay = _add_command(
        commands, "replay", "Re-deliver failed outbox entries; `status` counts them; `requeue` redrives dead letters.",
        "%s replay --dead-letter-after 5\n  %s replay status\n  %s replay requeue --limit 100"
        % (_PROG, _PROG, _PROG), common,
        usage="%s replay [status|requeue] [--limit N] [--target NAME] [--dead-letter-after N] "
              "[--keep-successes] [--dry-run] [--ref REF]" % _PROG)
    replay_actions = _add_actions(replay, "replay")
    _add_replay_options(_add_command(replay_actions, "run", "Re-deliver failed outbox entries (`replay`).",
                                     "%s replay --dead-letter-after 5" % _PROG, common, _cmd_replay_run,
                                     hidden=True))
    _add_command(replay_actions, "status", "Count pending and dead-lettered entries by family and sink.",
                 "%s replay status --json" % _PROG, common, _cmd_replay_status)
    requeue = _add_command(replay_actions, "requeue", "Move dead letters back to pending, oldest first.",
                           "%s replay requeue --limit 100" % _PROG, common, _cmd_replay_requeue)
    requeue.add_argument("--limit", type=int, metavar="N", help="requeue at most N dead letters")
    requeue.add_argument("--ref", metavar="REF", help="requeue only dead letters with this replay_ref")
    recover = _add_command(commands, "recover", "Contexta's record recovery: `recover replay` reads stored records.",
                           "%s recover replay --mode strict" % _PROG, common)
    recover_actions = _add_actions(recover, "recover")
    records = _add_command(recover_actions, "replay",
                           "Replay stored records read-only, as Contexta does: counts, warnings, known gaps, "
                           "integrity (outbox re-delivery is `replay`).",
                           "%s recover replay --run run:proj.run-01 --record-type metric --json" % _PROG, common,
                           _cmd_recover_replay)
    records.add_argument("--mode", choices=_REPLAY_MODES, default="tolerant",
                         help="strict refuses a store that is not healthy (exit 1); default tolerant")
    records.add_argument("--run", metavar="RUN_REF", help="only records of this run (run:<project>.<run>)")
    records.add_argument("--stage", metavar="STAGE_REF", help="only records of this stage execution")
    records.add_argument("--record-type", choices=_RECORD_TYPES, help="only records of this type")

    artifact = _add_command(commands, "artifact", "Verify artifact bodies; export, import and put artifacts.",
                            "%s artifact verify --all" % _PROG, common)
    artifact_actions = _add_actions(artifact, "artifact")
    for name, purpose, example, handler in (
            ("inspect", "Count bound artifacts by state, and orphans.", "artifact inspect --json",
             _cmd_artifact_inspect),
            ("verify", "Re-hash bodies against their bindings: one REF, or --all.", "artifact verify --all --record",
             _cmd_artifact_verify),
            ("export", "Write Contexta's export package of one artifact.",
             "artifact export artifact:proj.run-01.model --export-root /media/usb", _cmd_artifact_export),
            ("import", "Import an export package, after proving it.", "artifact import /media/usb/pkg --conflict skip",
             _cmd_artifact_import),
            ("put", "Ingest a file as an artifact.",
             "artifact put model.bin --ref artifact:proj.run-01.model --kind checkpoint", _cmd_artifact_put)):
        explain = {"verify": _REF_FORM, "export": _REF_FORM, "put": _REF_FORM.replace("REF", "--ref"),
                   "import": _PACKAGE_FORM + "\n\n" + _CONFLICT_FORM}.get(name, "")
        sub = _add_command(artifact_actions, name, purpose, "%s %s" % (_PROG, example), common, handler,
                           explain=explain)
        sub.add_argument("--store", metavar="DIR", help="a bare artifact store root (default: the workspace's)")
        if name == "verify":
            sub.add_argument("ref", nargs="?", metavar="REF")
            sub.add_argument("--all", action="store_true", help="every bound artifact, and orphans")
            sub.add_argument("--record", action="store_true", help="append verification history events")
        elif name == "export":
            sub.add_argument("ref", metavar="REF")
            sub.add_argument("--export-root", metavar="DIR", help="default: <store>/exports")
        elif name == "import":
            sub.add_argument("package", metavar="PACKAGE")
            sub.add_argument("--conflict", choices=_CONFLICT_POLICIES, default="error",
                             help="error, skip or replace (see below)")
        if name in ("import", "put"):
            sub.add_argument("--create-store", action="store_true",
                             help="create the --store root (or a relocated store) if it does not exist")
        if name == "put":
            sub.add_argument("file", metavar="FILE")
            sub.add_argument("--ref", required=True, help="artifact:<project>.<run>.<key>")
            sub.add_argument("--kind", required=True, help="artifact kind, e.g. checkpoint")
            sub.add_argument("--run", help="run ref (default: the artifact ref's run)")
            sub.add_argument("--location", help="location_ref (default: vault://<project>/<run>/<file name>)")
    _KNOWN_OPTIONS.update(_all_options(parser))
    return parser


def _add_replay_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, metavar="N", help="replay at most N entries")
    parser.add_argument("--target", metavar="NAME", help="only entries whose sink_name is NAME; others stay pending")
    parser.add_argument("--dead-letter-after", type=int, metavar="N", help="dead-letter an entry after N attempts")
    parser.add_argument("--keep-successes", action="store_true", help="deliver but leave entries pending")
    parser.add_argument("--dry-run", action="store_true", help="report what would happen; change no byte")


def _with_default_action(parser: argparse.ArgumentParser, argv: List[str]) -> List[str]:
    """``restore BACKUP`` -> ``restore run BACKUP``: insert the hidden default action where none is named.

    Walks the words as argparse would (an option that takes a value consumes the
    next word), so global flags may still come before or after the command.
    """
    def value_options(*parsers: argparse.ArgumentParser) -> Set[str]:
        return {option for each in parsers for action in each._actions for option in action.option_strings
                if action.nargs != 0}

    def actions_of(each: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
        return next(action.choices for action in each._actions if isinstance(action, argparse._SubParsersAction))

    takes_value = value_options(parser)
    command_at: Optional[int] = None
    actions: Dict[str, argparse.ArgumentParser] = {}
    index = 0
    while index < len(argv):
        word = argv[index]
        if word == "--":
            break
        if word.startswith("-"):
            index += 2 if word in takes_value else 1
            continue
        if command_at is not None:
            if word in actions:
                return argv
            break
        if word not in _DEFAULT_ACTIONS:
            return argv
        command_at = index
        actions = actions_of(actions_of(parser)[word])
        takes_value |= value_options(*actions.values())
        index += 1
    if command_at is None:
        return argv
    rest = argv[command_at + 1:]
    if index >= len(argv) and any(word in ("-h", "--help") for word in rest):
        return argv  # `restore --help` shows the command's own help, with its actions
    return argv[:command_at + 1] + [_DEFAULT_ACTIONS[argv[command_at]]] + rest


def _option(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


def _config_from_args(args: argparse.Namespace) -> UnifiedConfig:
    return _config_and_sources_from_args(args)[0]


def _config_and_sources_from_args(args: argparse.Namespace) -> Tuple[UnifiedConfig, Dict[str, str], List[str]]:
    flags = {name: _option(args, name) for name in _FLAG_SETTINGS}
    return _load_config_with_sources(_option(args, "config"), flags=flags, profile=_option(args, "profile"),
                                     overrides=_option(args, "set", ()))


class _Output:
    """Where a command's words go: stdout for the report, stderr for notes; JSON keeps stdout to itself.

    Every JSON object carries ``status``, ``exit_code`` and ``tool_version``; every
    failure ends with the next step an operator can take.  A reader that stops
    early (``check | head -1``) is not an error: the exit code stays the result's.
    """

    def __init__(self, as_json: bool, quiet: bool) -> None:
        self.as_json = as_json
        self.quiet = quiet
        self.lines: List[str] = []
        self.stdout = sys.stdout
        self.always = False  # a listing prints even with --quiet: it is what was asked for

    def say(self, line: str = "") -> None:
        self.lines.append(line)

    def to_stderr(self) -> None:
        """When stdout carries data (an archive), the report and the JSON go to stderr."""
        self.stdout = sys.stderr

    def note(self, line: str) -> None:
        if not self.quiet:
            _write_quietly(sys.stderr, line + "\n")

    def finish(self, payload: Any, exit_code: int, next_step: Optional[str] = None) -> int:
        """Print the report (``payload`` becomes JSON only when asked for); returns ``exit_code``."""
        ok = exit_code == EXIT_OK
        if next_step and not ok:
            self.say("Next: " + next_step)
        if self.as_json:
            document = _jsonable(payload)
            if isinstance(document, dict):
                document.setdefault("status", "SUCCESS" if ok else "FAILURE")
                document["exit_code"] = exit_code
                document["tool_version"] = __version__
                if next_step and not ok:
                    document["next_step"] = next_step
            _write_quietly(self.stdout, json.dumps(document, sort_keys=False, default=str) + "\n")
            if not ok:
                _write_quietly(sys.stderr, "".join(line + "\n" for line in self.lines))
        elif not self.quiet or not ok or self.always:
            _write_quietly(self.stdout, "".join(line + "\n" for line in self.lines))
        return exit_code


def _global_flags(args: argparse.Namespace) -> str:
    """The global flags of this run, to repeat in a suggested next command."""
    words = []
    for name in ("workspace", "config", "backup_root", "staging_root", "outbox_root"):
        value = _option(args, name)
        if value is not None:
            words += ["--" + name.replace("_", "-"), str(value)]
    return " ".join(_shell_quote(word) for word in words)


def _shell_quote(word: str) -> str:
    import shlex
    return shlex.quote(word)


def _suggest(args: argparse.Namespace, command: str) -> str:
    flags = _global_flags(args)
    return "`%s %s%s`" % (_PROG, flags + " " if flags else "", command)


def _other_good_backup(config: UnifiedConfig, failed: Optional[str]) -> Optional[BackupListEntry]:
    """The backup to reach for when ``failed`` (or the workspace) is bad: verified clean newest, else newest."""
    candidates = [entry for entry in list_backups(config) if entry.complete and entry.kind != "safety"
                  and entry.backup_ref != failed and entry.location.name != failed]
    verified = [entry for entry in candidates if entry.last_verified_clean_at]
    chosen = verified or candidates
    return chosen[-1] if chosen else None


def _next_step_for_bad_data(args: argparse.Namespace, config: UnifiedConfig, failed: Optional[str]) -> str:
    """After a backup or a workspace failed verification: the next backup to look at, and how."""
    other = _other_good_backup(config, failed)
    if other is None:
        return ("no other complete backup under %s; read the problems above, then `check` the live workspace"
                % config.recovery.backup_root)
    if other.last_verified_clean_at:
        return "backup %s verified clean on %s; %s" % (other.backup_ref, other.last_verified_clean_at,
                                                        _suggest(args, "restore plan " + other.backup_ref))
    return "prove the next backup first: %s" % _suggest(args, "restore --verify-only " + other.backup_ref)


def _status_exit(status: str) -> int:
    return EXIT_OK if status == "SUCCESS" else EXIT_PROBLEMS


def _say_list(out: _Output, title: str, items: Sequence[Any]) -> None:
    if items:
        out.say(title)
        for item in items:
            out.say("  " + (item.line() if isinstance(item, Problem) else str(item)))


def _cmd_backup_plan(args: argparse.Namespace, out: _Output) -> int:
    plan = plan_workspace_backup(_config_from_args(args), label=args.label, include_cache=args.include_cache,
                                 include_exports=args.include_exports)
    out.say("Backup plan %s" % plan.backup_ref)
    out.say("  workspace: %s" % plan.workspace_root)
    out.say("  into:      %s" % (plan.backup_root / plan.backup_ref))
    for section in plan.sections:
        out.say("  %-9s %s -> %s%s" % (section.name, section.source, section.path,
                                       "  (relocated)" if section.relocated else ""))
    out.say("  about %d files, %s" % (plan.estimated_files, _human_bytes(plan.estimated_bytes)))
    _say_list(out, "Notes:", plan.notes)
    _say_list(out, "Warnings:", plan.warnings)
    return out.finish(plan, EXIT_OK)


def _cmd_backup_create(args: argparse.Namespace, out: _Output) -> int:
    if args.output is not None and (args.archive is not None or args.incremental or args.gzip):
        raise UsageError("--output writes Contexta's zip; it does not combine with --archive, --gzip or --incremental")
    if args.archive is not None and args.incremental:
        raise UsageError("--incremental makes a backup directory; it does not combine with --archive")
    if args.archive is None and (args.gzip or args.verify_unchanged and not args.incremental):
        raise UsageError("--gzip goes with --archive, --verify-unchanged with --incremental")
    config = _config_from_args(args)
    if args.output is not None:
        result = create_cli_zip(config, args.output, label=args.label)
        out.say("Backup %s (Contexta's CLI zip): %s" % (result.backup_ref, result.status))
        out.say("  location: %s" % result.location)
        out.say("  %d files, %s" % (result.file_count, _human_bytes(result.bytes_written)))
        _say_list(out, "Warnings:", result.warnings)
        return out.finish(result, _status_exit(result.status))
    plan = plan_workspace_backup(config, label=args.label, include_cache=args.include_cache,
                                 include_exports=args.include_exports, estimate=not args.incremental)
    if args.archive is not None:
        if args.archive == ARCHIVE_STDOUT:
            out.to_stderr()  # stdout carries the archive
        result = create_backup_archive(config, plan, args.archive, compress=args.gzip)
    else:
        result = create_workspace_backup(config, plan, incremental=args.incremental,
                                         verify_unchanged=args.verify_unchanged)
    out.say("Backup %s: %s" % (result.backup_ref, result.status))
    out.say("  location: %s" % result.location)
    out.say("  sections: %s" % ", ".join(result.included_sections))
    out.say("  %d files, %s, every file checksummed" % (result.file_count, _human_bytes(result.bytes_written)))
    _say_list(out, "Warnings:", result.warnings)
    return out.finish(result, _status_exit(result.status))


def _cmd_backup_list(args: argparse.Namespace, out: _Output) -> int:
    config = _config_from_args(args)
    entries = list_backups(config)
    out.always = True  # the list is what was asked for, --quiet or not
    out.say("Backups in %s" % config.recovery.backup_root)
    if entries:
        for line in _backup_table(entries, shutil.get_terminal_size((120, 24)).columns):
            out.say(line)
    else:
        out.say("  (none)")
    return out.finish({"status": "SUCCESS", "backup_root": config.recovery.backup_root,
                       "backups": [entry.to_dict() for entry in entries]}, EXIT_OK)


def _backup_table(entries: Sequence[BackupListEntry], width: int) -> List[str]:
    """One row per backup under a header; on a narrow terminal the least telling columns go, then the ref is cut
    from the left (its end, the time, stays)."""
    header = ("BACKUP", "KIND", "CREATED (UTC)", "SIZE", "STATE", "VERIFIED", "SECTIONS")
    rows = [header]
    for entry in entries:
        state = "complete" if entry.complete else ("writing" if entry.in_progress else "INCOMPLETE")
        if entry.complete and not entry.has_checksums:
            state += ", no checksums"
        rows.append((entry.backup_ref, entry.kind or "-", (entry.created_at or "-")[:19].replace("T", " "),
                     _human_bytes(entry.size_bytes), state, (entry.last_verified_clean_at or "-")[:10],
                     ",".join(entry.included_sections)))
    columns = list(range(len(header)))
    widths = {index: max(len(row[index]) for row in rows) for index in columns}

    def total() -> int:
        return 2 + sum(widths[index] for index in columns) + 2 * (len(columns) - 1)

    for dropped in (6, 5, 1, 3):  # sections, verified, kind, size
        if total() <= width:
            break
        columns.remove(dropped)
    widths[0] = max(12, widths[0] - max(total() - width, 0))

    def cell(text: str, index: int) -> str:
        size = widths[index]
        if len(text) > size:
            text = "~" + text[len(text) - size + 1:]
        return text.rjust(size) if index == 3 else text.ljust(size)

    return [("  " + "  ".join(cell(row[index], index) for index in columns)).rstrip()[:max(width, 20)]
            for row in rows]


def _cmd_backup_prune(args: argparse.Namespace, out: _Output) -> int:
    config = _config_from_args(args)
    pruned = prune_backups(config, keep_last=args.keep_last, keep_within=args.keep_within, dry_run=args.dry_run)
    out.say("Prune of %s%s" % (config.recovery.backup_root, " (dry run, nothing removed)" if pruned.dry_run else ""))
    _say_list(out, "Would remove:" if pruned.dry_run else "Removed:", pruned.removed)
    _say_list(out, "Kept:", pruned.kept)
    _say_list(out, "In use, skipped:", pruned.in_use)
    _say_list(out, "Notes:", pruned.notes)
    return out.finish(pruned, EXIT_OK)


def _cmd_backup_verify(args: argparse.Namespace, out: _Output) -> int:
    config = _config_from_args(args)
    result = verify_backup(config, args.backup)
    out.say("Backup %s: %s" % (result.backup_ref, result.status))
    out.say("  %d files, %s re-hashed" % (result.checked_files, _human_bytes(result.checked_bytes)))
    _say_list(out, "Problems:", result.problems)
    _say_list(out, "Warnings:", result.warnings)
    next_step = _next_step_for_bad_data(args, config, result.backup_ref) if result.status == "FAILURE" else (
        "this backup has no checksums: %s checks it by planes" % _suggest(args, "restore --verify-only "
                                                                          + args.backup))
    return out.finish(result, _status_exit(result.status), next_step)


_METADATA_CHECK_TEXT = {
    "duckdb": "%(run_count)s runs (read with DuckDB)",
    "absent": "not present",
    "file_level": "checked at file level (DuckDB header; DuckDB not importable here)",
    "file_level_in_use": "checked at file level (a writer holds the ledger)",
}


def _say_planes(out: _Output, plane_results: Mapping[str, Any]) -> None:
    if "metadata" in plane_results:
        metadata = plane_results["metadata"]
        out.say("  metadata:  " + _METADATA_CHECK_TEXT.get(metadata.get("check"), "%(check)s") % metadata)
    if "records" in plane_results:
        records = plane_results["records"]
        out.say("  records:   %s records, %s" % (records.get("record_count"), records.get("integrity_state")))
    if "artifacts" in plane_results:
        artifacts = plane_results["artifacts"]
        out.say("  artifacts: %s bound, %s verified, %s missing, %s drifted, %s orphans" % (
            artifacts.get("artifact_count"), artifacts.get("verified_count"), artifacts.get("missing_count"),
            artifacts.get("drift_count"), artifacts.get("orphan_count")))


def _partial(args: argparse.Namespace) -> Dict[str, Tuple[str, ...]]:
    """--only and --path, as plan_restore takes them."""
    only = tuple(part.strip() for value in (args.only or ()) for part in value.split(",") if part.strip())
    return {"only": only, "paths": tuple(args.paths or ())}


def _cmd_restore_plan(args: argparse.Namespace, out: _Output) -> int:
    if args.backup is None:
        raise UsageError("restore plan needs a BACKUP")
    config = _config_from_args(args)
    _check_materialize(args)
    plan = plan_restore(config, args.backup, args.target, verify_only=bool(args.verify_only),
                        materialize=args.materialize, sample_percent=args.sample, **_partial(args))
    out.say("Restore plan: %s (made by %s%s) -> %s" % (plan.backup_ref, plan.made_by,
                                                       "" if plan.has_checksums else ", no checksums",
                                                       plan.target_workspace))
    _say_list(out, "Replaced:", plan.replaced)
    _say_list(out, "Kept as they are:", plan.kept)
    out.say("Lost: %d file(s) in replaced sections that the backup does not have" % plan.lost_count)
    for path in plan.lost:
        out.say("  " + path)
    out.say("Safety backup first: %s" % ("yes" if plan.create_safety_backup else "no"))
    if plan.destinations:
        out.say("Destinations (by the target's configuration):")
        for part, location in plan.destinations.items():
            out.say("  %-10s %s" % (part, location))
    _say_list(out, "Warnings:", plan.warnings)
    refused = bool(plan.refusals) and not (args.force and all(
        notice.code != "restore_would_delete_backups" for notice in plan.refusals))
    _say_list(out, "An apply would refuse:" if refused else "Overridden by --force:", plan.refusals)
    next_step = ("move the backups out of the stores, or stop the writer / finish the interrupted operation "
                 "(%s shows which), then plan again" % _suggest(args, "status"))
    return out.finish(plan, EXIT_PROBLEMS if refused else EXIT_OK, next_step)


def _percent(text: str) -> float:
    """--sample's value: 10, 10% or 0.5%."""
    try:
        value = float(text[:-1] if text.endswith("%") else text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a percentage: %r (say 10 or 10%%)" % text)
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError("%s is not a percentage above 0 and at most 100" % text)
    return value


def _check_materialize(args: argparse.Namespace) -> None:
    if args.materialize and not args.verify_only:
        raise UsageError("--materialize goes with --verify-only (a restore always builds the new tree)")


def _cmd_restore_run(args: argparse.Namespace, out: _Output) -> int:
    if args.backup is None and not args.verify_only:
        raise UsageError("restore needs a BACKUP to apply; `restore --verify-only` alone checks the newest")
    config = _config_from_args(args)
    _check_materialize(args)
    plan = plan_restore(config, args.backup, args.target, verify_only=args.verify_only, materialize=args.materialize,
                        sample_percent=args.sample, **_partial(args))
    if args.backup is None:
        out.note("using the newest complete backup: %s" % plan.backup_ref)
    result = restore_workspace_forced(config, plan) if args.force else restore_workspace(config, plan)
    what = "verify-only" if args.verify_only else ("applied to %s" % result.target_workspace if result.applied
                                                   else "NOT applied")
    out.say("Restore %s, %s: %s" % (result.backup_ref, what, result.status))
    _say_planes(out, result.plane_results)
    if result.safety_backup_ref:
        out.say("  safety backup: %s" % result.safety_backup_ref)
    _say_list(out, "Problems:", result.problems)
    _say_list(out, "Warnings:", result.warnings)
    if result.applied:
        next_step = ("the restore is applied but its check found problems; the safety backup %s holds what was "
                     "there before" % result.safety_backup_ref if result.safety_backup_ref else
                     "the restore is applied but its check found problems; read them above")
    else:
        next_step = _next_step_for_bad_data(args, config, result.backup_ref)
    return out.finish(result, _status_exit(result.status), next_step)


def _check_limit(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 0:
        raise UsageError("--limit must be 0 or more")


def _replay_config(args: argparse.Namespace) -> UnifiedConfig:
    """The configuration, for a replay command: a workspace that does not exist is exit 3, never an empty outbox."""
    config = _config_from_args(args)
    _require_workspace(Path(config.workspace.root_path))
    return config


def _cmd_replay_status(args: argparse.Namespace, out: _Output) -> int:
    status = outbox_status(_replay_config(args))
    out.say("Outbox %s: %s" % (status.outbox_root, status.status))
    out.say("  pending:        %d %s" % (status.pending_count, _counts_text(status.pending_by_family)))
    out.say("  by sink:        %s" % _counts_text(status.pending_by_sink))
    out.say("  dead-lettered:  %d %s" % (status.dead_lettered_count, _counts_text(status.dead_lettered_by_family)))
    out.say("  oldest failed_at: %s" % (status.oldest_failed_at or "-"))
    if status.most_common_last_error:
        out.say("  most common error (%d): %s" % (status.most_common_last_error_count, status.most_common_last_error))
    if status.malformed_pending:
        out.say("  malformed pending lines: %d (the next replay dead-letters them)" % status.malformed_pending)
    if status.interrupted_replay:
        out.say("  an interrupted replay will be finished by the next `replay`")
    _say_list(out, "Problems:", status.problems)
    return out.finish(status, _status_exit(status.status), "%s looks at the dead letters again"
                      % _suggest(args, "replay requeue"))


def _cmd_replay_requeue(args: argparse.Namespace, out: _Output) -> int:
    _check_limit(args)
    result = requeue_dead_letters(_replay_config(args), limit=args.limit, ref=args.ref)
    out.say("Requeued %d dead letter(s); %d remain dead-lettered" % (result.requeued_count,
                                                                   result.remaining_dead_lettered))
    if result.skipped_malformed:
        out.say("  %d malformed dead letter(s) cannot be requeued" % result.skipped_malformed)
    return out.finish(result, EXIT_OK)


def _cmd_replay_run(args: argparse.Namespace, out: _Output) -> int:
    _check_limit(args)
    result = replay_outbox(_replay_config(args), target=args.target, limit=args.limit,
                           acknowledge_successes=not args.keep_successes,
                           dead_letter_after_failures=args.dead_letter_after, dry_run=args.dry_run)
    out.say("Replay%s: %s" % (" (dry run, nothing changed)" if result.dry_run else "", result.status))
    out.say("  acknowledged %d, failed %d, skipped %d, dead-lettered %d (malformed %d), pending %d" % (
        result.acknowledged_count, result.failed_count, result.skipped_count, result.dead_lettered_count,
        result.malformed_count, result.pending_count))
    if result.already_delivered_count:
        out.say("  %d already in the sink: acknowledged, not delivered again" % result.already_delivered_count)
    for entry in result.entries:
        if entry.status not in ("SUCCESS", "DEGRADED"):
            out.say("  %-8s %s %s" % (entry.status, entry.replay_ref, entry.detail))
    _say_list(out, "Notes:", result.notes)
    _say_list(out, "Warnings:", result.warnings)
    return out.finish(result, result.exit_code, "%s shows the errors; fix the sink and replay again; %s brings dead "
                      "letters back" % (_suggest(args, "replay status"), _suggest(args, "replay requeue")))


def _cmd_recover_replay(args: argparse.Namespace, out: _Output) -> int:
    """Contexta's five lines; with --json the result object, its records streamed (a second, bounded pass)."""
    config = _replay_config(args)
    scan_filter = _normalized_filter(ScanFilter(run_ref=args.run, stage_execution_ref=args.stage,
                                                record_type=args.record_type))
    root = Path(config.records.root_path)
    result, sizes = _scan_record_store(root, scan_filter, args.mode, None)
    if out.as_json:
        _stream_record_replay(out.stdout, result, root, scan_filter, sizes)
        return _status_exit(result.status)
    out.say("Replay mode: %s" % result.mode)
    out.say("Records: %d" % result.record_count)
    out.say("Warnings: %d" % result.warning_count)
    out.say("Known gaps: %d" % result.known_gap_count)
    out.say("Integrity: %s" % result.integrity_state)
    return out.finish(result, _status_exit(result.status))


def _stream_record_replay(stream: Any, result: RecordReplayResult, root: Path, scan_filter: ScanFilter,
                          sizes: Mapping[str, int]) -> None:
    """The result as one JSON object, each record written as it is read again (memory stays flat)."""
    head = {"status": result.status, "records": []}
    stream.write(json.dumps(head)[:-2])
    written = [0]

    def emit(stored: Dict[str, Any]) -> None:
        stream.write((", " if written[0] else "") + json.dumps(stored))
        written[0] += 1

    _RecordReplayScan(root, scan_filter).run(emit, sizes)
    tail = result.to_dict()
    del tail["status"], tail["records"]
    tail.update(record_count=written[0], exit_code=_status_exit(result.status), tool_version=__version__)
    stream.write("], " + json.dumps(tail)[1:] + "\n")
    stream.flush()


def _store_from_args(args: argparse.Namespace, writing: bool = False) -> ArtifactStore:
    """The store a command works on.  Fail closed: a store that is not there is refused, not taken as empty.

    The one exception is the workspace's own store inside an existing workspace:
    reading it finds nothing and says so; writing creates it, as Contexta does.
    ``--create-store`` lets import and put create any other store root.
    """
    if args.store:
        store = ArtifactStore(VaultConfig(root_path=args.store))
    else:
        config = _config_from_args(args)
        workspace = config.workspace.root_path
        if not workspace.is_dir():
            raise OpsError("workspace %s does not exist" % workspace, code="workspace_missing", path=workspace)
        store = ArtifactStore(VaultConfig.from_unified_config(config))
        if _is_within(store.root_path, workspace) and _path_kind(store.root_path) == "missing":
            return store
    if store.root_path.is_dir() or (writing and _option(args, "create_store")):
        return store
    if store.root_path.exists():
        raise ArtifactError("artifact store %s is not a directory" % store.root_path,
                            code="artifact_store_not_found", path=store.root_path)
    raise ArtifactError("artifact store %s does not exist%s" % (store.root_path, " (--create-store creates it)"
                                                                if writing else ""),
                        code="artifact_store_not_found", path=store.root_path)


def _cmd_artifact_inspect(args: argparse.Namespace, out: _Output) -> int:
    store = _store_from_args(args)
    summary = inspect_store(store)
    out.say("Artifact store %s" % store.root_path)
    out.say("  %d bound %s, %s" % (summary.artifact_count, _counts_text(summary.kinds),
                                   _human_bytes(summary.total_size_bytes)))
    out.say("  %d verified, %d missing, %d drifted, %d orphans" % (
        summary.verified_count, summary.missing_count, summary.drift_count, summary.orphan_count))
    _say_list(out, "Problems:", summary.problems)
    _say_list(out, "Notes:", summary.notes)
    return out.finish(summary, EXIT_PROBLEMS if summary.problems else EXIT_OK, _ARTIFACT_NEXT_STEP)


_ARTIFACT_NEXT_STEP = ("bodies that are missing or drifted come back from a backup (`restore plan BACKUP --only "
                       "artifacts` shows what it replaces) or from an export package (`artifact import`)")


def _cmd_artifact_verify(args: argparse.Namespace, out: _Output) -> int:
    if args.all == (args.ref is not None):
        raise UsageError("artifact verify takes one REF or --all")
    store = _store_from_args(args)
    if args.ref is not None:
        report = verify_artifact(store, args.ref)
        out.say("%s: %s" % (report.artifact_ref, report.status))
        out.say("  %s" % report.path)
        out.say("  size   expected %s, actual %s" % (report.expected_size_bytes, report.actual_size_bytes))
        out.say("  sha256 expected %s, actual %s" % (report.expected_hash_value, report.actual_hash_value))
        # Contexta's report keeps its own `status` (verified, missing, ...); the command's verdict sits above it.
        return out.finish({"status": "SUCCESS" if report.verified else "FAILURE", "artifact_ref": report.artifact_ref,
                           "report": report.to_dict()}, EXIT_OK if report.verified else EXIT_PROBLEMS,
                          _ARTIFACT_NEXT_STEP)
    sweep = verify_all(store, record=args.record)
    out.say("Artifact store %s: %d verified of %d; %d missing, %d drifted, %d orphans" % (
        store.root_path, sum(1 for item in sweep.reports if item.verified), len(sweep.reports),
        len(sweep.missing_refs), len(sweep.drifted_refs), len(sweep.orphan_paths)))
    _say_list(out, "Problems:", sweep.problems)
    _say_list(out, "Notes:", sweep.notes)
    return out.finish(sweep, EXIT_OK if sweep.clean else EXIT_PROBLEMS, _ARTIFACT_NEXT_STEP)


def _cmd_artifact_export(args: argparse.Namespace, out: _Output) -> int:
    receipt = export_artifact(_store_from_args(args), args.ref, export_root=args.export_root)
    out.say("Exported %s to %s" % (receipt.artifact_ref, receipt.export_directory))
    return out.finish(receipt, EXIT_OK)


def _cmd_artifact_import(args: argparse.Namespace, out: _Output) -> int:
    receipt = import_export_package(_store_from_args(args, writing=True), args.package, conflict_policy=args.conflict)
    out.say("Import of %s: %s (%s written)" % (receipt.artifact_ref, receipt.outcome.value,
                                                _human_bytes(receipt.bytes_written)))
    if receipt.quarantine_path:
        out.say("  replaced body kept at %s" % receipt.quarantine_path)
    _say_list(out, "Notes:", receipt.notes)
    return out.finish(receipt, EXIT_OK)


def _cmd_artifact_put(args: argparse.Namespace, out: _Output) -> int:
    store = _store_from_args(args, writing=True)
    receipt = store.put_artifact(_manifest_for_put(args), args.file)
    out.say("Put %s at %s (%s written)" % (receipt.binding.artifact_ref, receipt.path,
                                           _human_bytes(receipt.bytes_written)))
    return out.finish(receipt, EXIT_OK)


def _manifest_for_put(args: argparse.Namespace) -> ArtifactManifest:
    components = _validate_ref("--ref", args.ref, "artifact")
    run_ref = args.run or "run:%s.%s" % (components[0], components[1])
    location = args.location or "vault://%s/%s/%s" % (components[0], components[1], Path(args.file).name)
    return ArtifactManifest(artifact_ref=args.ref, artifact_kind=args.kind, created_at=_utc_timestamp(),
                            producer_ref="contexta-ops", run_ref=run_ref, location_ref=location)


def _cmd_status(args: argparse.Namespace, out: _Output) -> int:
    config, sources, notes = _config_and_sources_from_args(args)
    status = workspace_status(config, sources, notes)
    out.say("Workspace %s" % status.workspace_root)
    for entry in status.paths:
        state = ("%s, %d files, %s" % (entry.kind, entry.file_count, _human_bytes(entry.size_bytes))
                 if entry.exists else "missing")
        out.say("  %-18s %s  [%s]  (%s)" % (entry.name, entry.path, state, entry.source))
    out.say("  in use:            %s" % (", ".join(status.in_use) or "no sign of it"))
    out.say("  records:           %s" % ("-" if status.record_count is None else status.record_count))
    out.say("  artifact bindings: %d" % status.artifact_binding_count)
    out.say("  outbox:            %d pending, %d dead-lettered" % (status.outbox_pending_count,
                                                                  status.outbox_dead_lettered_count))
    out.say("  newest backups:")
    for backup in reversed(status.newest_backups):
        out.say("    %-46s %s %s" % (backup.backup_ref, "complete" if backup.complete else "INCOMPLETE",
                                     "checksums" if backup.has_checksums else "no-checksums"))
    if not status.newest_backups:
        out.say("    (none)")
    for warning in status.warnings:
        out.say("%s %s" % ("UNSAFE:" if warning.unsafe else "warning:", warning.message))
    _say_list(out, "Notes:", status.notes)
    return out.finish(status, _status_exit(status.status), "resolve each UNSAFE line before a backup or restore: "
                      "stop the writer, or let the interrupted command finish (run it again)")


def _say_diff(out: _Output, result: DiffResult) -> None:
    out.say("Diff %s -> %s: %d changed, %d removed, %d added, %d unchanged" % (
        result.left, result.right, result.changed_count, result.removed_count, result.added_count,
        result.unchanged_count))
    _say_list(out, "Changed:", ["%s  (%s -> %s)" % (item["path"], _human_bytes(item["size_before"]),
                                                   _human_bytes(item["size_after"])) for item in result.changed])
    _say_list(out, "Removed (only in %s):" % result.left, ["%s  (%s)" % (item["path"], _human_bytes(item["size"]))
                                                          for item in result.removed])
    _say_list(out, "Added (only in %s):" % result.right, ["%s  (%s)" % (item["path"], _human_bytes(item["size"]))
                                                         for item in result.added])
    if result.truncated:
        out.say("(%d entries listed per kind; --json has the counts of all)" % _DIFF_LISTED)


def _cmd_backup_diff(args: argparse.Namespace, out: _Output) -> int:
    result = diff_backups(_config_from_args(args), args.left, args.right)
    _say_diff(out, result)
    return out.finish(result, EXIT_OK if result.identical else EXIT_PROBLEMS)


def _cmd_check(args: argparse.Namespace, out: _Output) -> int:
    config = _config_from_args(args)
    if args.against is not None:
        against = check_against(config, args.against)
        _say_diff(out, against)
        return out.finish(against, EXIT_OK if against.identical else EXIT_PROBLEMS,
                          "%s shows what a restore of %s would replace" % (_suggest(args, "restore plan " + args.against),
                                                                           args.against))
    result = check_workspace(config, planes=args.plane)
    out.say("Check of %s: %s" % (result.workspace_root, result.status))
    _say_planes(out, result.plane_results)
    if "reports" in result.plane_results:
        reports = result.plane_results["reports"]
        out.say("  reports:   %d files readable of %d" % (reports["file_count"] - reports["unreadable_count"],
                                                         reports["file_count"]))
    if "outbox" in result.plane_results:
        outbox = result.plane_results["outbox"]
        out.say("  outbox:    %d pending (%d malformed), %d dead-lettered" % (
            outbox["pending_count"], outbox["malformed_pending"], outbox["dead_lettered_count"]))
    _say_list(out, "Problems:", result.problems)
    return out.finish(result, _status_exit(result.status), _next_step_for_bad_data(args, config, None))


def _say_repair_steps(out: _Output, steps: Sequence[RepairStep], step_count: int) -> None:
    for step in steps:
        out.say("  %-9s %-25s %s" % (step.plane, step.action, step.path))
        if step.detail:
            out.say("      %s" % step.detail)
        if step.destination:
            out.say("      -> %s" % step.destination)
    if step_count > len(steps):
        out.say("  ... and %d more step(s)" % (step_count - len(steps)))


def _cmd_repair_plan(args: argparse.Namespace, out: _Output) -> int:
    plan = plan_repair(_config_from_args(args), planes=args.plane)
    dry = " (dry run, nothing changed)" if args.dry_run else ""
    out.say("Repair plan for %s (%s)%s: %d step(s)" % (plan.workspace_root, ", ".join(plan.planes), dry,
                                                       plan.step_count))
    _say_repair_steps(out, plan.steps, plan.step_count)
    if not plan.step_count:
        out.say("  nothing to repair")
    _say_list(out, "Left alone (repair cannot fix these):", plan.left_alone)
    if plan.step_count:
        out.say("Safety backup first: %s" % ("yes" if plan.create_safety_backup else
                                             "no (recovery.create_backup_before_restore is off)"))
    _say_list(out, "An apply would refuse:", plan.refusals)
    _say_list(out, "Notes:", plan.notes)
    return out.finish(plan, EXIT_PROBLEMS if plan.refusals else EXIT_OK,
                      "stop the writer or finish the interrupted operation (%s shows which), then plan again"
                      % _suggest(args, "status"))


def _cmd_repair_run(args: argparse.Namespace, out: _Output) -> int:
    if args.dry_run:
        return _cmd_repair_plan(args, out)
    config = _config_from_args(args)
    result = apply_repair(config, plan_repair(config, planes=args.plane))
    steps = int(result.details.get("step_count", 0))
    out.say("Repair of %s (%s): %s, %s" % (result.workspace_root, ", ".join(result.planes), result.status,
                                           "%d step(s) applied" % steps if result.applied else "nothing to repair"))
    _say_repair_steps(out, result.steps, steps)
    if result.safety_backup_ref:
        out.say("  safety backup: %s" % result.safety_backup_ref)
    check = result.post_apply_check or {}
    out.say("Check after the repair: %s" % check.get("status"))
    _say_planes(out, check.get("plane_results", {}))
    outbox = check.get("plane_results", {}).get("outbox")
    if outbox:
        out.say("  outbox:    %d pending (%d malformed), %d dead-lettered" % (
            outbox["pending_count"], outbox["malformed_pending"], outbox["dead_lettered_count"]))
    _say_list(out, "Problems:", result.problems)
    _say_list(out, "Notes:", result.notes)
    backup = (" (the safety backup %s holds what was there before)" % result.safety_backup_ref
              if result.safety_backup_ref else "")
    return out.finish(result, _status_exit(result.status),
                      "the check still finds what a repair cannot fix%s; %s" % (
                          backup, _next_step_for_bad_data(args, config, None)))


def _cmd_demo(args: argparse.Namespace, out: _Output) -> int:
    result = run_demo(args.root)
    out.say("Demo in %s: %s" % (result.root, result.status))
    for step in result.steps:
        out.say("  %-60s %-8s %s" % (step["step"], step["status"], step["summary"]))
    out.say("Try it yourself: %s --workspace %s --backup-root %s --staging-root %s status" % (
        _PROG, _shell_quote(str(result.root / ".contexta")), _shell_quote(str(result.root / "backups")),
        _shell_quote(str(result.root / "staging"))))
    return out.finish(result, _status_exit(result.status), "the demo's steps above name what failed")


def _cmd_self_check(args: argparse.Namespace, out: _Output) -> int:
    result = self_check()
    out.say("%s %s on %s (%s): %s" % (TOOL_NAME, result.version, result.python, result.platform, result.status))
    out.say("  archive: %s, %d members checked" % (result.archive or "(not running from an archive)",
                                                  result.members_checked))
    _say_list(out, "Problems:", result.problems)
    _say_list(out, "Notes:", result.notes)
    return out.finish(result, _status_exit(result.status))


def _counts_text(counts: Mapping[str, int]) -> str:
    return "(%s)" % ", ".join("%s %d" % item for item in counts.items()) if counts else ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; return its exit code (also the entry point of ``contexta.pyz``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv or "--format=json" in argv or any(
        word == "--format" and following == "json" for word, following in zip(argv, argv[1:]))
    out = _Output(as_json, "--quiet" in argv)
    try:
        parser = _build_parser()
        args = parser.parse_args(_with_default_action(parser, argv))
        out = _Output(bool(_option(args, "json")) or _option(args, "format") == "json", bool(_option(args, "quiet")))
        _Progress.enabled = sys.stderr.isatty() and not out.as_json and not out.quiet
        if args.command is None:
            parser.print_help(sys.stderr)
            raise UsageError("a command is needed")
        if args.command in ("backup", "restore", "replay", "recover", "artifact", "check", "repair"):
            _release_startup_memory()
        handler: Callable[[argparse.Namespace, _Output], int] = args.handler
        return handler(args, out)
    except OpsError as exc:
        return _report_error(out, exc.code, str(exc), exc.exit_code, exc.path)
    except OSError as exc:
        return _report_error(out, "os_error", _os_error_message(exc), EXIT_CANNOT_RUN, exc.filename)
    except KeyboardInterrupt:
        return _report_error(out, "interrupted", "interrupted", 130)
    except Exception as exc:  # a bug: still one line, with a way to see the traceback
        if os.environ.get("CONTEXTA_OPS_DEBUG"):
            raise
        return _report_error(out, "internal_error", "%s: %s (CONTEXTA_OPS_DEBUG=1 shows the traceback)"
                             % (type(exc).__name__, exc), EXIT_CANNOT_RUN)


def _os_error_message(exc: OSError) -> str:
    """The one line for an OSError: its reason and the path, or both paths of a rename or a link."""
    reason = exc.strerror or str(exc)
    if not exc.filename:
        return reason
    if exc.filename2:
        return "%s: %s -> %s" % (reason, exc.filename, exc.filename2)
    return "%s: %s" % (reason, exc.filename)


def _release_startup_memory() -> None:
    """Hand back to the OS what compiling this module at start-up freed (glibc keeps it otherwise).

    Started from contexta.pyz, the module is compiled on every run; returning
    that memory keeps the peak RSS of the heavy commands well under 64 MB.
    """
    import gc
    gc.collect()
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def _report_error(out: _Output, code: str, message: str, exit_code: int, path: Any = None) -> int:
    _write_quietly(sys.stderr, "%s: error: %s\n" % (TOOL_NAME, message))
    if out.as_json:
        error = {"code": code, "message": message}
        if path is not None:
            error["path"] = str(path)
        _write_quietly(sys.stdout, json.dumps({"status": "ERROR", "exit_code": exit_code, "tool_version": __version__,
                                               "error": error}) + "\n")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
