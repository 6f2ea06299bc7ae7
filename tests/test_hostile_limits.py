"""Backups and workspaces built to make the tool fill a disk, plant privileges, escape or hang: members
larger than declared, zip bombs, JSON nested 100,000 deep, setuid modes, unsafe restore targets, a
symlinked workspace/, FIFOs where files belong.  Each gets its documented exit code and one line, and
nothing is modified."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

from helpers import snapshot
from hostile_cases import corpus_file, make_corpus
from test_faults import small_disk

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount small filesystems")
SEGMENT = "workspace/records/segments/segment-000001.jsonl"
DEEP = 100000


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def _args(fixture_dir, *rest):
    return ("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "bk", "--staging-root",
            fixture_dir / "staging") + rest


def _one_line(result, exit_code, code=None):
    assert result.returncode == exit_code, result
    if exit_code == 3:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    if code is not None:
        assert result.json["error"]["code"] == code, result


def _codes(result):
    return [problem["code"] for problem in result.json["problems"]]


def _backup(cli, fixture_dir):
    created = cli(*_args(fixture_dir, "backup", "create", "--json"))
    assert created.returncode == 0, created
    return created.json["backup_ref"], fixture_dir / "bk" / created.json["backup_ref"]


# -- sizes: nothing is read, staged or inflated past what was declared ---------------------------------------

@needs_root
def test_a_member_far_larger_than_its_manifest_says_is_never_staged(cli, fixture_dir, tmp_path):
    archive = corpus_file("tar-member-50-mib-manifest-says-less.tar", tmp_path)
    with small_disk(fixture_dir / "staging", "16m") as staging:
        for command in (("restore", archive, "--verify-only"), ("backup", "verify", archive)):
            result = cli(*_args(fixture_dir, *command, "--json"))
            assert result.returncode == 1, result  # a full disk (exit 3) before the mismatch is what it was
            mismatch = [p for p in result.json["problems"] if p["code"] == "size_mismatch"]
            assert [p["path"] for p in mismatch] == [SEGMENT], result
            assert mismatch[0]["actual"] == 50 << 20
            assert os.listdir(str(staging)) == []


@needs_root
def test_a_zip_bomb_is_refused_before_anything_is_inflated(cli, fixture_dir, tmp_path):
    bomb = make_corpus.write_zip_bomb(tmp_path, size=64 << 20)
    assert bomb.stat().st_size < 1 << 20
    with small_disk(fixture_dir / "staging", "16m") as staging:
        result = cli(*_args(fixture_dir, "restore", bomb, "--verify-only", "--materialize", "--json"))
        _one_line(result, 3, "insufficient_space")
        needed = re.search(r"\((\d+) bytes\)", result.stderr)
        assert str(staging) in result.stderr and int(needed.group(1)) > 64 << 20, result  # where, how much
        assert os.listdir(str(staging)) == []
        in_place = cli(*_args(fixture_dir, "restore", bomb, "--verify-only", "--target", staging / "ws", "--json"))
        assert in_place.returncode == 0, in_place  # inflated as it streams, up to what the zip declares; not kept
        assert "target_space_short" in [w["code"] for w in in_place.json["warnings"]]
        assert os.listdir(str(staging)) == []
    with small_disk(fixture_dir / "disk", "16m") as disk:
        target = disk / ".contexta"
        shutil.copytree(str(_ws(fixture_dir)), str(target))
        before = snapshot(disk)
        result = cli(*_args(fixture_dir, "restore", bomb, "--target", target, "--json"))
        _one_line(result, 3, "insufficient_space")
        assert {k: v for k, v in snapshot(disk).items() if k != "..contexta.contexta-ops.lock"} == before
        assert not (fixture_dir / "bk").exists()  # refused before the safety backup too


# -- JSON nested 100,000 deep, wherever it is read ------------------------------------------------------------

def test_a_record_line_nested_deep_is_a_problem_naming_its_segment(cli, fixture_dir):
    ws = _ws(fixture_dir)
    segment = ws / "records/segments/segment-000001.jsonl"
    with open(str(segment), "ab") as handle:
        handle.write(b'{"sequence": 51, "appended_at": "x", "record": ' + b"[" * DEEP + b"]" * DEEP + b"}\n")
    check = cli("--workspace", ws, "check", "--json")
    assert check.returncode == 1, check
    assert {"code": "invalid_json_line", "path": str(segment)} in [
        {"code": p["code"], "path": p["path"]} for p in check.json["problems"]]
    _ref, location = _backup(cli, fixture_dir)
    only = cli(*_args(fixture_dir, "restore", location, "--verify-only", "--json"))
    assert only.returncode == 1 and "invalid_json_line" in _codes(only), only


def test_a_toml_config_nested_deep_is_refused_in_one_line(cli, fixture_dir, tmp_path):
    pytest.importorskip("tomllib")
    config = tmp_path / "deep.toml"
    config.write_text("[workspace]\nroot_path = " + "[" * DEEP + "]" * DEEP + "\n")
    _one_line(cli("--config", config, "status", "--json"), 3, "config_invalid")


# -- modes: permission bits only, and the result says what was masked -------------------------------------

def test_setuid_and_world_writable_modes_in_a_backup_are_never_applied(cli, fixture_dir):
    ref, location = _backup(cli, fixture_dir)
    os.chmod(str(location / SEGMENT), 0o6777)  # a v2 backup's copies carry the modes a restore applies
    os.chmod(str(location / "workspace/records/segments"), 0o1777)
    for command in (("restore", ref, "--verify-only"), ("restore", ref)):
        result = cli(*_args(fixture_dir, *command, "--json"))
        assert result.returncode == 0, result
        masked = [w["message"] for w in result.json["warnings"] if w["code"] == "mode_masked"]
        assert len(masked) == 1 and masked[0].startswith("2 ") and "workspace/records/segments" in masked[0]
    ws = _ws(fixture_dir)
    assert stat.S_IMODE(os.stat(str(ws / "records/segments/segment-000001.jsonl")).st_mode) == 0o775
    assert stat.S_IMODE(os.stat(str(ws / "records/segments")).st_mode) == 0o775


# -- restore targets a swap by rename must not or cannot replace ----------------------------------------------

def test_restore_to_the_root_directory_is_refused(cli, fixture_dir):
    ref, _location = _backup(cli, fixture_dir)
    before = sorted(os.listdir("/"))
    _one_line(cli(*_args(fixture_dir, "restore", "plan", ref, "--target", "/", "--json")), 3,
              "restore_target_refused")
    _one_line(cli(*_args(fixture_dir, "restore", ref, "--target", "/", "--json")), 3, "restore_target_refused")
    assert sorted(os.listdir("/")) == before
    assert os.listdir(str(fixture_dir / "bk")) == [ref]  # no safety backup of / either


@needs_root
def test_restore_onto_a_mount_point_is_refused(cli, fixture_dir):
    ref, _location = _backup(cli, fixture_dir)
    with small_disk(fixture_dir / "mnt", "16m") as mount:
        shutil.copytree(str(_ws(fixture_dir)), str(mount / "copy"))
        before, beside = snapshot(mount), sorted(os.listdir(str(fixture_dir)))
        for command in (("restore", "plan", ref), ("restore", ref)):
            _one_line(cli(*_args(fixture_dir, *command, "--target", mount, "--json")), 3, "restore_target_refused")
        assert snapshot(mount) == before and sorted(os.listdir(str(fixture_dir))) == beside
        assert cli(*_args(fixture_dir, "restore", ref, "--target", mount, "--verify-only")).returncode == 0
        inside = cli(*_args(fixture_dir, "restore", ref, "--target", mount / "copy", "--json"))
        assert inside.returncode == 0, inside  # a directory inside the mount is fine


def test_a_backup_whose_workspace_is_a_symlink_is_refused(cli, fixture_dir):
    ref, location = _backup(cli, fixture_dir)
    os.rename(str(location / "workspace"), str(fixture_dir / "elsewhere"))
    os.symlink(str(fixture_dir / "elsewhere"), str(location / "workspace"))
    before = snapshot(fixture_dir)
    for command in (("backup", "verify", ref), ("restore", ref, "--verify-only"), ("restore", "plan", ref),
                    ("restore", ref)):
        _one_line(cli(*_args(fixture_dir, *command, "--json")), 3, "archive_unsafe")
    assert snapshot(fixture_dir) == before


# -- FIFOs and other special files where files belong: named, never opened ----------------------------------

@pytest.mark.parametrize("where", ["records/segments/segment-000002.jsonl", "records/indexes/run_ref/pipe.jsonl",
                                   "records/manifest.json", "reports/pipe.html", "metadata/ledger.db.wal"])
def test_check_names_a_fifo_instead_of_blocking_on_it(cli, fixture_dir, where):
    ws = _ws(fixture_dir)
    fifo = ws / where
    fifo.parent.mkdir(parents=True, exist_ok=True)
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(str(fifo))
    result = cli("--workspace", ws, "check", "--json", timeout=60)
    assert result.returncode == 1, result
    assert {"code": "unexpected_special", "path": str(fifo)} in [
        {"code": p["code"], "path": p["path"]} for p in result.json["problems"]], result


def test_a_directory_backup_holding_fifos_is_verified_without_blocking(cli, fixture_dir):
    ref, location = _backup(cli, fixture_dir)
    os.mkfifo(str(location / "workspace/records/segments/segment-000002.jsonl"))
    for command in (("backup", "verify", ref), ("restore", ref, "--verify-only")):
        result = cli(*_args(fixture_dir, *command, "--json"), timeout=60)
        assert result.returncode == 1 and "unexpected_special" in _codes(result), result
    os.unlink(str(location / "manifest.json.sha256"))
    os.mkfifo(str(location / "manifest.json.sha256"))
    result = cli(*_args(fixture_dir, "backup", "verify", ref, "--json"), timeout=60)
    assert result.returncode == 1, result
    os.unlink(str(location / "manifest.json"))
    os.mkfifo(str(location / "manifest.json"))
    _one_line(cli(*_args(fixture_dir, "backup", "verify", ref, "--json"), timeout=60), 3,
              "recovery_manifest_unreadable")


def test_directories_a_restore_creates_are_never_world_writable_whatever_the_umask(pyz, fixture_dir, tmp_path):
    members = [(member, data) for member, data in make_corpus.valid_members() if not member.isdir()]
    make_corpus.write_tar("no-directories.tar", members, out=tmp_path)
    result = subprocess.run([sys.executable, str(pyz)] + [str(arg) for arg in _args(
        fixture_dir, "restore", tmp_path / "no-directories.tar")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, preexec_fn=lambda: os.umask(0))
    assert result.returncode == 0, result.stderr
    assert (_ws(fixture_dir) / "records/segments/segment-000001.jsonl").read_bytes() == make_corpus.SEGMENT
    for dirpath, _dirnames, _filenames in os.walk(str(_ws(fixture_dir))):
        assert not os.stat(dirpath).st_mode & 0o002, dirpath


@pytest.mark.slow
def test_a_record_line_longer_than_64_mib_is_a_problem_not_a_memory_bomb(cli, fixture_dir):
    ws = _ws(fixture_dir)
    segment = ws / "records/segments/segment-000001.jsonl"
    with open(str(segment), "ab") as handle:
        handle.write(b'{"sequence": 51, "appended_at": "x", "record": {"note": "')
        for _ in range(65):
            handle.write(b"x" * (1 << 20))
        handle.write(b'"}}\n')
    check = cli("--workspace", ws, "check", "--json")
    assert check.returncode == 1, check
    assert ("invalid_json_line", str(segment), "line 51 is longer than %d bytes" % (64 << 20)) in [
        (p["code"], p["path"], p["message"]) for p in check.json["problems"]]


@pytest.mark.parametrize("archive", [False, True], ids=["directory", "archive"])
def test_files_from_before_1970_survive_a_round_trip(cli, fixture_dir, archive):
    ws = _ws(fixture_dir)
    old = ws / "records/manifest.json"
    os.utime(str(old), ns=(-315619200 * 10 ** 9, -315619200 * 10 ** 9))  # 1960-01-01
    os.utime(str(ws / "records/quarantine"), ns=(-1, -1))
    original = snapshot(ws)
    target = [fixture_dir / "b.tar"] if archive else []
    created = cli(*_args(fixture_dir, "backup", "create", "--json", *(["--archive"] + target if archive else [])))
    assert created.returncode == 0, created
    ref = target[0] if archive else created.json["backup_ref"]
    assert cli(*_args(fixture_dir, "backup", "verify", ref)).returncode == 0
    old.write_bytes(b"{}")
    restored = cli(*_args(fixture_dir, "restore", ref, "--json"))
    assert restored.returncode == 0, restored
    assert snapshot(ws) == original and os.stat(str(old)).st_mtime_ns == -315619200 * 10 ** 9
