"""One-file backups (file and pipe), Contexta's CLI zip, hostile archives, incremental backups, prune."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import contexta_ops as ops
from helpers import REPO, snapshot
from hostile_cases import ALL_CASES, by_kind as _by_kind, corpus_file

CASES = {name: case for name, case in ALL_CASES.items() if case["kind"] == "archive"}
CANARY = Path("/tmp/contexta-ops-hostile-canary")


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def _args(fixture_dir, *rest):
    return ("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "bk", "--staging-root",
            fixture_dir / "staging") + rest


def _mutate(ws):
    (ws / "records/segments/segment-000001.jsonl").write_bytes(b"")
    shutil.rmtree(str(ws / "artifacts/objects/report"))


@pytest.mark.parametrize("compress", [False, True])
def test_archive_file_round_trip(cli, fixture_dir, compress):
    ws = _ws(fixture_dir)
    original = snapshot(ws)
    archive = fixture_dir / ("nightly.tar.gz" if compress else "nightly.tar")
    created = cli(*_args(fixture_dir, "backup", "create", "--archive", archive, "--json",
                         *(["--gzip"] if compress else [])))
    assert created.returncode == 0, created
    assert created.json["location"] == str(archive)
    assert [name for name in os.listdir(str(fixture_dir)) if ".partial-" in name] == []
    verified = cli(*_args(fixture_dir, "backup", "verify", archive, "--json"))
    assert verified.returncode == 0 and verified.json["checked_files"] == created.json["file_count"]
    only = cli(*_args(fixture_dir, "restore", archive, "--verify-only", "--json"))
    assert only.returncode == 0, only
    assert only.json["plane_results"]["records"]["record_count"] == 50
    _mutate(ws)
    applied = cli(*_args(fixture_dir, "restore", archive, "--json"))
    assert applied.returncode == 0, applied
    assert snapshot(ws) == original


def test_archive_through_a_pipe(cli, fixture_dir, pyz):
    ws = _ws(fixture_dir)
    original = snapshot(ws)
    base = [sys.executable, str(pyz)] + [str(arg) for arg in _args(fixture_dir)]
    producer = subprocess.Popen(base + ["backup", "create", "--archive", "-", "--gzip", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checker = subprocess.run(base + ["backup", "verify", "-", "--json"], stdin=producer.stdout,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    producer.stdout.close()
    report = producer.stderr.read().decode()
    assert producer.wait() == 0, report
    assert json.loads(report.strip().splitlines()[-1])["status"] == "SUCCESS"  # the JSON went to stderr
    assert checker.returncode == 0, checker.stderr
    assert json.loads(checker.stdout)["status"] == "SUCCESS"
    data = subprocess.run(base + ["backup", "create", "--archive", "-", "--quiet"], stdout=subprocess.PIPE,
                          check=True).stdout
    _mutate(ws)
    applied = subprocess.run(base + ["restore", "-", "--json"], input=data, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    assert applied.returncode == 0, applied.stderr
    assert snapshot(ws) == original


def test_a_flipped_byte_in_an_archive_member_names_it(cli, fixture_dir):
    archive = fixture_dir / "b.tar"
    assert cli(*_args(fixture_dir, "backup", "create", "--archive", archive)).returncode == 0
    data = bytearray(archive.read_bytes())
    body = (_ws(fixture_dir) / "artifacts/objects/checkpoint/0d/artifact__fixture-proj.tuned.model.bin").read_bytes()
    data[data.index(body) + 100] ^= 1
    archive.write_bytes(bytes(data))
    member = "workspace/artifacts/objects/checkpoint/0d/artifact__fixture-proj.tuned.model.bin"
    for command in (("backup", "verify", archive), ("restore", archive, "--verify-only"), ("restore", archive)):
        before = snapshot(_ws(fixture_dir))
        result = cli(*_args(fixture_dir, *command, "--json"))
        assert result.returncode == 1, (command, result)
        assert member in [problem["path"] for problem in result.json["problems"]]
        assert snapshot(_ws(fixture_dir)) == before


def test_contexta_cli_zip_verifies_and_restores(cli, fixture_dir, expected):
    ws = _ws(fixture_dir)
    original = snapshot(ws)
    zip_path = fixture_dir / expected["cli_backup"]
    only = cli(*_args(fixture_dir, "restore", zip_path, "--verify-only", "--json"))
    assert only.returncode == 0, only
    assert only.json["plane_results"]["artifacts"]["verified_count"] == expected["artifacts"]
    assert any(warning["code"] == "checksums_absent" for warning in only.json["warnings"])
    assert any(note.startswith("zip_crc32_checked") for note in only.json["verification_notes"])
    _mutate(ws)
    (ws / "reports").mkdir()
    (ws / "reports/kept.html").write_text("made after the zip")
    applied = cli(*_args(fixture_dir, "restore", zip_path, "--json"))
    assert applied.returncode == 0, applied
    restored = snapshot(ws)
    assert restored.pop("reports/kept.html")[0] == "file" and restored.pop("reports") == ("dir",)
    assert restored == original


def _expected_outcome(name):
    return CASES[name]["exit"], CASES[name]["code"]


def _outside_staging(tree):
    return {k: v for k, v in tree.items() if not k.startswith("staging")}


def _assert_case_details(case, command, result, ws):
    """What a case names beyond its exit code: a problem it must find, a warning it must give."""
    if case.get("problem"):
        assert case["problem"] in [p["code"] for p in result.json["problems"]], (command, result)
    if case.get("warning") and command in ("verify-only", "apply"):
        assert case["warning"] in [w["code"] for w in result.json["warnings"]], (command, result)
    if command == "apply" and result.returncode == 0:
        for path in snapshot(ws):
            mode = os.lstat(str(ws / path)).st_mode
            assert not mode & 0o7002, (path, oct(mode))


@pytest.mark.parametrize("name", _by_kind("archive"))
def test_hostile_archives_are_refused_and_nothing_is_written_outside(cli, fixture_dir, tmp_path, name):
    shutil.rmtree(str(CANARY), ignore_errors=True)
    exit_code, code = _expected_outcome(name)
    path = corpus_file(name, tmp_path)
    ws = _ws(fixture_dir)
    for command in CASES[name]["commands"]:
        before = _outside_staging(snapshot(fixture_dir))
        args = {"verify": ("backup", "verify", path),
                "verify-only": ("restore", path, "--verify-only"),
                "apply": ("restore", path),
                "plan": ("restore", "plan", path)}[command]
        result = cli(*_args(fixture_dir, *args, "--json"))
        assert result.returncode == exit_code, (command, result)
        assert "Traceback" not in result.stderr
        if code is not None:
            assert result.json["error"]["code"] == code, (command, result)
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        _assert_case_details(CASES[name], command, result, ws)
        assert not CANARY.exists()
        assert [n for n in os.listdir(str(ws.parent)) if "restore" in n] == []
        if exit_code != 0:
            after = snapshot(fixture_dir)
            lock = "workspace/..contexta.contexta-ops.lock"  # the (empty) workspace lock may now exist
            assert {k: v for k, v in _outside_staging(after).items() if k != lock} == \
                {k: v for k, v in before.items() if k != lock}, command
            assert not (fixture_dir / "staging").exists() or list((fixture_dir / "staging").iterdir()) == []


def test_incremental_backup_links_unchanged_files_and_stands_alone(cli, fixture_dir):
    ws = _ws(fixture_dir)
    full = cli(*_args(fixture_dir, "backup", "create", "--label", "full", "--json")).json
    incremental = cli(*_args(fixture_dir, "backup", "create", "--label", "inc", "--incremental", "--json"))
    assert incremental.returncode == 0, incremental
    payload = incremental.json
    assert "incremental_from:%s" % full["backup_ref"] in payload["notes"]
    manifest = json.loads((Path(payload["location"]) / "manifest.json").read_text())
    config_size = len((Path(payload["location"]) / "workspace/config/resolved.config.json").read_bytes())
    assert payload["details"]["bytes_linked"] == manifest["total_bytes"] - config_size  # all but the config
    assert payload["bytes_written"] == config_size + sum((Path(payload["location"]) / name).stat().st_size
                                                         for name in ("manifest.json", "SHA256SUMS"))
    segment = Path(payload["location"]) / "workspace/records/segments/segment-000001.jsonl"
    assert os.stat(str(segment)).st_ino == os.stat(str(Path(full["location"]) / segment.relative_to(
        payload["location"]))).st_ino
    # A changed file is copied, not linked; --verify-unchanged compares digests too.
    with open(str(ws / "records/segments/segment-000001.jsonl"), "ab") as handle:
        handle.write(b'{"appended_at":"2026-01-01T00:00:00Z","record":{},"sequence":51}\n')
    third = cli(*_args(fixture_dir, "backup", "create", "--label", "third", "--incremental", "--verify-unchanged",
                       "--json")).json
    changed = Path(third["location"]) / "workspace/records/segments/segment-000001.jsonl"
    assert changed.stat().st_nlink == 1 and changed.read_bytes().endswith(b'"sequence":51}\n')
    # Prune the older ones: the incremental backups still verify and restore on their own.
    pruned = cli(*_args(fixture_dir, "backup", "prune", "--keep-last", "2", "--json"))
    assert pruned.json["removed"] == [full["backup_ref"]]
    for ref in (payload["backup_ref"], third["backup_ref"]):
        assert cli(*_args(fixture_dir, "backup", "verify", ref)).returncode == 0
    original_inc = snapshot(Path(payload["location"]) / "workspace/artifacts")
    _mutate(ws)
    restored = cli(*_args(fixture_dir, "restore", payload["backup_ref"], "--json"))
    assert restored.returncode == 0, restored
    assert snapshot(ws / "artifacts") == original_inc


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a second filesystem")
def test_incremental_copies_when_hard_links_are_impossible(cli, fixture_dir):
    full = cli(*_args(fixture_dir, "backup", "create", "--label", "full", "--json")).json
    location = Path(full["location"])
    moved = location.parent / "moving"
    os.rename(str(location), str(moved))
    location.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "none", str(location)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        subprocess.run(["cp", "-a", str(moved) + "/.", str(location)], check=True)
        result = cli(*_args(fixture_dir, "backup", "create", "--label", "inc", "--incremental", "--json"))
        assert result.returncode == 0, result
        assert any(note.startswith("hardlinks_unavailable") for note in result.json["notes"])
        assert cli(*_args(fixture_dir, "backup", "verify", result.json["backup_ref"])).returncode == 0
    finally:
        subprocess.run(["umount", str(location)])


def test_prune_dry_run_changes_nothing_and_keeps_the_newest(cli, fixture_dir):
    refs = [cli(*_args(fixture_dir, "backup", "create", "--label", "b%d" % i, "--json")).json["backup_ref"]
            for i in range(3)]
    (fixture_dir / "bk" / ".orphan-2026-01-01T00-00-00Z.partial").mkdir()
    before = snapshot(fixture_dir / "bk")
    dry = cli(*_args(fixture_dir, "backup", "prune", "--keep-last", "1", "--dry-run", "--json"))
    assert dry.returncode == 0 and snapshot(fixture_dir / "bk") == before
    assert sorted(dry.json["removed"]) == sorted(refs[:2] + [".orphan-2026-01-01T00-00-00Z.partial"])
    assert dry.json["kept"] == [refs[2]]
    assert cli(*_args(fixture_dir, "backup", "prune")).returncode == 2
    within = cli(*_args(fixture_dir, "backup", "prune", "--keep-within", "1", "--json"))
    assert within.json["removed"] == [".orphan-2026-01-01T00-00-00Z.partial"]  # all three are young
    real = cli(*_args(fixture_dir, "backup", "prune", "--keep-last", "1", "--json"))
    assert sorted(real.json["removed"]) == sorted(refs[:2])
    assert sorted(os.listdir(str(fixture_dir / "bk"))) == sorted([refs[2], ".prune.lock"])


def test_prune_never_deletes_a_backup_being_read(cli, fixture_dir):
    refs = [cli(*_args(fixture_dir, "backup", "create", "--label", "b%d" % i, "--json")).json["backup_ref"]
            for i in range(2)]
    fd = os.open(str(fixture_dir / "bk" / refs[0]), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # what a restore or verification holds while it reads
        result = cli(*_args(fixture_dir, "backup", "prune", "--keep-last", "1", "--json"))
    finally:
        os.close(fd)
    assert result.json["removed"] == [] and result.json["in_use"] == [refs[0]]
    assert cli(*_args(fixture_dir, "backup", "verify", refs[0])).returncode == 0


def test_killed_archive_never_appears_complete(cli, fixture_dir, tmp_path):
    archive = fixture_dir / "b.tar"
    trace = tmp_path / "trace"
    cli(*_args(fixture_dir, "backup", "create", "--archive", tmp_path / "rehearsal.tar"),
        env={"CONTEXTA_OPS_CRASH_TRACE": str(trace)})
    steps = trace.read_text().split()
    for crash_at in (1, len(steps) // 2, steps.index("archive:written") + 1):
        killed = cli(*_args(fixture_dir, "backup", "create", "--archive", archive),
                     env={"CONTEXTA_OPS_CRASH_AT": str(crash_at)})
        assert killed.returncode == -9
        assert not archive.exists()
    done = cli(*_args(fixture_dir, "backup", "create", "--archive", archive))
    assert done.returncode == 0 and [n for n in os.listdir(str(fixture_dir)) if ".partial-" in n] == []
