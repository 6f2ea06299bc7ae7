"""Write failures: a full disk (a small tmpfs, really full) and permission errors (root without its
DAC override, so permission bits count) during each operation give exit 3 with one line, leave nothing
half-written, and never touch the source."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import FIXTURE_BACKUP_REF, fill_disk, snapshot

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount small filesystems")


@contextlib.contextmanager
def small_disk(path, size="1m"):
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "none", str(path)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


FULL = ("No space left", "not enough free space")  # found while writing, or foreseen before (statvfs)


def assert_could_not_run(result, fragment=FULL):
    assert result.returncode == 3, result
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    fragments = (fragment,) if isinstance(fragment, str) else fragment
    assert any(each in result.stderr for each in fragments), result.stderr
    assert "/" in result.stderr.split("error:", 1)[-1], "the error names no path: %s" % result.stderr


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def test_backup_onto_a_full_disk(cli, fixture_dir):
    before = snapshot(_ws(fixture_dir))
    with small_disk(fixture_dir / "disk") as disk:
        result = cli("--workspace", _ws(fixture_dir), "--backup-root", disk / "bk", "backup", "create")
        assert_could_not_run(result)
        assert os.listdir(str(disk / "bk")) == []  # the partial backup is gone
        archive = cli("--workspace", _ws(fixture_dir), "backup", "create", "--archive", disk / "b.tar")
        assert_could_not_run(archive)
        assert sorted(os.listdir(str(disk))) == ["bk"]
    assert snapshot(_ws(fixture_dir)) == before


def test_verify_only_with_staging_on_a_full_disk(cli, fixture_dir):
    with small_disk(fixture_dir / "disk") as disk:
        args = ("--backup-root", fixture_dir / "backups", "--staging-root", disk / "stage", "restore", "--verify-only",
                FIXTURE_BACKUP_REF)
        result = cli(*args, "--materialize")
        assert_could_not_run(result)
        assert os.listdir(str(disk / "stage")) == []
        assert cli(*args).returncode == 0  # read in place: staging is never written
        assert os.listdir(str(disk / "stage")) == []


def test_restore_apply_onto_a_full_disk_leaves_the_target_as_it_was(cli, fixture_dir):
    with small_disk(fixture_dir / "disk", "6m") as disk:
        target = disk / ".contexta"
        shutil.copytree(str(_ws(fixture_dir)), str(target))
        (target / "records/segments/segment-000001.jsonl").write_bytes(b"")
        fill_disk(disk, leave=1 << 20)  # room for the safety backup's start, not for a whole new tree
        before = snapshot(target)
        result = cli("--workspace", target, "--backup-root", fixture_dir / "backups", "restore",
                     FIXTURE_BACKUP_REF, "--json")
        assert result.returncode == 3, result
        assert snapshot(target) == before
        assert [name for name in os.listdir(str(disk)) if "restore" in name] == []


def test_replay_onto_a_full_disk_then_again_with_room(cli, fixture_dir):
    with small_disk(fixture_dir / "disk", "6m") as disk:
        ws = disk / ".contexta"
        shutil.copytree(str(_ws(fixture_dir)), str(ws))
        outbox = ws / "cache/outbox/failed_deliveries.jsonl"
        outbox.write_bytes(b"".join((json.dumps({"replay_ref": "r-%d" % i, "family": "RECORD", "payload": {
            "text": "x" * 200}}) + "\n").encode() for i in range(3000)))
        original = outbox.read_bytes()
        fillers = fill_disk(disk, leave=64 << 10)
        result = cli("--workspace", ws, "replay")
        assert_could_not_run(result)
        assert outbox.read_bytes() == original  # the outbox changes only after delivery is durable
        for filler in fillers:
            filler.unlink()
        again = cli("--workspace", ws, "replay", "--json")
        assert again.returncode == 0, again
        delivered = [json.loads(line)["replay_ref"] for line in (ws / "exports/replayed/record.jsonl")
                     .read_text().splitlines()]
        assert sorted(delivered) == sorted("r-%d" % i for i in range(3000))
        assert outbox.read_bytes() == b""


def test_artifact_import_into_a_full_store(cli, fixture_dir):
    with small_disk(fixture_dir / "disk") as disk:
        store = disk / "store"
        big = fixture_dir / "big-package"
        shutil.copytree(str(fixture_dir / "exports/artifact__fixture-proj.tuned.model"), str(big))
        body = big / "artifact__fixture-proj.tuned.model.bin"
        body.write_bytes(os.urandom(4 << 20))
        size = body.stat().st_size
        digest = __import__("hashlib").sha256(body.read_bytes()).hexdigest()
        binding_path = big / "artifact__fixture-proj.tuned.model.binding.json"
        binding_path.write_text(json.dumps(dict(json.loads(binding_path.read_text()), size_bytes=size,
                                                hash_value=digest)))
        result = cli("artifact", "import", big, "--store", store, "--create-store")
        assert_could_not_run(result)
        assert list((store / "staging").glob("*.part")) == [] and list((store / "bindings").iterdir()) == []
        assert cli("artifact", "verify", "--all", "--store", store).returncode == 0


def without_dac_override(cli_args, pyz, **kwargs):
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONTEXTA_OPS_CRASH")}
    return subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, str(pyz)]
                          + [str(arg) for arg in cli_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, **kwargs)


needs_setpriv = pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")


@needs_setpriv
def test_backup_root_without_write_permission(pyz, fixture_dir):
    backup_root = fixture_dir / "bk"
    backup_root.mkdir()
    os.chmod(str(backup_root), 0o555)
    result = without_dac_override(["--workspace", _ws(fixture_dir), "--backup-root", backup_root, "backup",
                                   "create"], pyz)
    assert_could_not_run(result, "Permission denied")
    assert os.listdir(str(backup_root)) == []


@needs_setpriv
def test_unreadable_workspace_file_aborts_the_backup_cleanly(pyz, fixture_dir):
    os.chmod(str(_ws(fixture_dir) / "records/segments/segment-000001.jsonl"), 0o000)
    before = snapshot(_ws(fixture_dir))
    result = without_dac_override(["--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "bk", "backup",
                                   "create"], pyz)
    assert_could_not_run(result, "Permission denied")
    assert os.listdir(str(fixture_dir / "bk")) == []
    assert snapshot(_ws(fixture_dir)) == before


@needs_setpriv
def test_replay_into_an_unwritable_exports_folder(pyz, fixture_dir):
    ws = _ws(fixture_dir)
    os.chmod(str(ws / "exports"), 0o555)
    outbox = ws / "cache/outbox/failed_deliveries.jsonl"
    original = outbox.read_bytes()
    result = without_dac_override(["--workspace", ws, "replay"], pyz)
    assert_could_not_run(result, "Permission denied")
    assert outbox.read_bytes() == original
    os.chmod(str(ws / "exports"), 0o755)
    assert without_dac_override(["--workspace", ws, "replay"], pyz).returncode == 0  # the next run finishes
    assert outbox.read_bytes() == b"" and len((ws / "exports/replayed/record.jsonl").read_text().splitlines()) == 5
