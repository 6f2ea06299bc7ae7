"""Ctrl-C in the middle of every long command: exit 130 with one line, and nothing half-made is left
looking complete (no new complete backup, no archive, nothing in staging, the workspace as it was).

The workspace is generated here (about 1 GB in 1,000 files) so each command is still reading when the
signal comes; the signal is sent once the process has a data file open (seen in /proc), not after a guess.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to see open files")]

FILES = 1000


@pytest.fixture(scope="module")
def big(pristine_fixture, tmp_path_factory):
    """A copy of the fixture workspace with ~1 GB more records, and one complete backup of it."""
    root = tmp_path_factory.mktemp("interrupt")
    ws = root / "workspace" / ".contexta"
    shutil.copytree(str(pristine_fixture / "workspace" / ".contexta"), str(ws))
    quarantine = ws / "records" / "quarantine"
    blob = os.urandom(1 << 20)
    for index in range(FILES):
        (quarantine / ("chunk-%04d.bin" % index)).write_bytes(blob[index:] + blob[:index])
    return root


def _base(pyz, root):
    return [sys.executable, str(pyz), "--workspace", str(root / "workspace" / ".contexta"), "--backup-root",
            str(root / "bk"), "--staging-root", str(root / "staging")]


def _listing(path):
    """Names, sizes and mtimes below path (cheap to compare for a gigabyte)."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(str(path)):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            info = os.lstat(full)
            entries[os.path.relpath(full, str(path))] = (info.st_size, info.st_mtime_ns, info.st_mode)
    return entries


def _complete_backups(pyz, root):
    listed = subprocess.run(_base(pyz, root) + ["backup", "list", "--json"], stdout=subprocess.PIPE,
                            universal_newlines=True, check=True).stdout
    return sorted(entry["backup_ref"] for entry in json.loads(listed)["backups"] if entry["complete"])


def _reading_data(pid, roots):
    """True once the process (any thread) holds a file open under one of ``roots``."""
    fd_dir = "/proc/%d/fd" % pid
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        if any(target.startswith(str(root) + "/") for root in roots):
            return True
    return False


def _interrupt(pyz, root, args, roots):
    process = subprocess.Popen(_base(pyz, root) + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as at a terminal
    deadline = time.time() + 60
    while not _reading_data(process.pid, roots) and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the command finished before it could be interrupted: %r" % (
        process.communicate(),)
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=30)
    return process.returncode, err


@pytest.fixture(scope="module")
def base_backup(pyz, big):
    created = subprocess.run(_base(pyz, big) + ["backup", "create", "--label", "base", "--json"],
                             stdout=subprocess.PIPE, universal_newlines=True)
    assert created.returncode == 0
    return json.loads(created.stdout)["backup_ref"]


@pytest.mark.parametrize("command", ["backup create", "backup create --archive", "backup verify",
                                     "restore --verify-only", "restore"])
def test_ctrl_c_exits_130_in_one_line_and_leaves_nothing_half_made(pyz, big, base_backup, command):
    ws = big / "workspace" / ".contexta"
    backup = big / "bk" / base_backup
    archive = big / "nightly.tar"
    args, reads = {
        "backup create": (["backup", "create"], [ws]),
        "backup create --archive": (["backup", "create", "--archive", str(archive)], [ws]),
        "backup verify": (["backup", "verify", base_backup], [backup]),
        "restore --verify-only": (["restore", base_backup, "--verify-only"], [backup]),
        "restore": (["restore", base_backup], [backup]),
    }[command]
    backups = _complete_backups(pyz, big)
    before = _listing(ws)
    returncode, err = _interrupt(pyz, big, args, reads)
    assert returncode == 130, err
    assert err.strip().splitlines() == ["contexta-ops: error: interrupted"]
    assert _complete_backups(pyz, big) == backups
    assert [name for name in os.listdir(str(big / "bk")) if name.startswith(".")] == []  # no partial backup
    assert not (big / "staging").exists() or os.listdir(str(big / "staging")) == []
    assert [name for name in os.listdir(str(big)) if name != "workspace" and name != "bk"
            and name != "staging"] == []  # no archive, complete or partial
    assert sorted(os.listdir(str(ws.parent))) == [".contexta"] or \
        sorted(os.listdir(str(ws.parent))) == ["..contexta.contexta-ops.lock", ".contexta"]
    assert _listing(ws) == before
