"""Backups: Contexta's layout and manifest, checksums, no self-copies, relocated stores, crash safety."""

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import contexta_ops as ops
from helpers import Cli, crash_point, flip_byte, slow_except, traced_steps

CONTEXTA_MANIFEST_KEYS = {"backup_ref", "created_at", "workspace_root", "profile_name", "included_sections",
                          "store_schema_versions", "notes"}


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def _create(cli, fixture_dir, *extra, backup_root=None):
    result = cli("--workspace", _ws(fixture_dir), "--backup-root", backup_root or fixture_dir / "bk",
                 "backup", "create", "--json", *extra)
    return result


def test_backup_has_contexta_layout_manifest_and_every_checksum(cli, fixture_dir):
    result = _create(cli, fixture_dir, "--label", "nightly")
    assert result.returncode == 0, result
    payload = result.json
    assert payload["status"] == "SUCCESS"
    assert payload["included_sections"] == ["config", "metadata", "records", "artifacts", "recovery"]
    assert payload["backup_ref"].startswith("nightly-")
    location = Path(payload["location"])
    manifest = json.loads((location / "manifest.json").read_text(encoding="utf-8"))
    assert CONTEXTA_MANIFEST_KEYS <= set(manifest)
    assert manifest["store_schema_versions"] == {"artifacts": "v1", "metadata": "1", "records": "1"}
    assert manifest["notes"] == ["cache_excluded", "exports_excluded"]
    assert manifest["tool"] == {"name": "contexta-ops", "version": ops.__version__}
    sources = {section["name"]: section["source"] for section in manifest["sections"]}
    assert sources["outbox"] == str(_ws(fixture_dir) / "cache" / "outbox")
    # Every file is listed in SHA256SUMS, sorted, with its real digest, and nothing else is in the backup.
    on_disk = {path.relative_to(location).as_posix() for path in location.rglob("*") if path.is_file()}
    listed = _listed(location)
    assert list(listed) == sorted(listed)
    assert on_disk - {"manifest.json", "manifest.json.sha256", "SHA256SUMS"} == set(listed)
    manifest_bytes = (location / "manifest.json").read_bytes()
    assert (location / "manifest.json.sha256").read_text() == "%s  manifest.json\n" % hashlib.sha256(
        manifest_bytes).hexdigest()
    for rel, digest in listed.items():
        assert digest == hashlib.sha256((location / rel).read_bytes()).hexdigest()
    sums = (location / "SHA256SUMS").read_bytes()
    assert manifest["format"] == "contexta-ops-backup-v2" and "files" not in manifest
    assert manifest["file_list"] == {"name": "SHA256SUMS", "sha256": hashlib.sha256(sums).hexdigest(),
                                     "size": len(sums), "count": len(listed)}
    assert manifest["file_count"] == len(listed)
    assert manifest["total_bytes"] == sum((location / rel).stat().st_size for rel in listed)
    # The outbox and the capture sink's directory are where they live in the workspace; not the whole cache.
    assert (location / "workspace/cache/outbox/failed_deliveries.jsonl").is_file()
    assert not (location / "workspace/recovery").exists()
    assert (location / "workspace/cache/capture").is_dir()
    assert sorted(p.name for p in (location / "workspace/cache").iterdir()) == ["capture", "outbox"]
    # The manifest is Contexta's P-JSON.
    raw = (location / "manifest.json").read_text(encoding="utf-8")
    assert raw == json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _listed(location):
    """path -> sha256 from a backup's SHA256SUMS, in its order (names here need no escaping)."""
    lines = (location / "SHA256SUMS").read_text(encoding="utf-8").splitlines()
    return {line[66:]: line[:64] for line in lines}


def test_sha256sum_checks_a_directory_backup_by_hand(cli, fixture_dir):
    """`sha256sum -c SHA256SUMS` in the backup proves every file, odd names included, and finds a flipped byte."""
    ws = _ws(fixture_dir)
    for name in (b"back\\slash.jsonl", b"new\nline.jsonl", b"carriage\rreturn.jsonl", b"not-utf8-\xff.jsonl"):
        with open(os.fsencode(str(ws / "records" / "quarantine")) + b"/" + name, "wb") as handle:
            handle.write(b"odd name\n")
    created = _create(cli, fixture_dir)
    assert created.returncode == 0, created
    location = Path(created.json["location"])
    checked = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=str(location),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert checked.returncode == 0, checked
    assert checked.stdout.count(b": OK\n") == created.json["file_count"]
    flip_byte(location / "workspace/records/segments/segment-000001.jsonl")
    failed = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=str(location),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert failed.returncode == 1 and failed.stdout == b"workspace/records/segments/segment-000001.jsonl: FAILED\n"


def test_backup_ref_label_is_cleaned_like_contexta():
    ref = ops._build_backup_ref("My Label!/v1.2")
    assert ref.startswith("My-Label--v1-2-")
    assert ops._BACKUP_REF_PATTERN.match(ref).group("label") == "My-Label--v1-2"
    assert ops._build_backup_ref("  ").startswith("backup-")
    assert ops._build_backup_ref("//").startswith("backup-")


def test_default_roots_inside_the_workspace_are_never_copied_into_backups(cli, fixture_dir):
    """Contexta's defaults put backup_root and staging inside the workspace (formats 11.1, 11.2, 11.11)."""
    ws = _ws(fixture_dir)
    (ws / "cache" / "restore" / "old-stage").mkdir(parents=True)
    (ws / "cache" / "restore" / "old-stage" / "x").write_text("staged")
    first = cli("--workspace", ws, "backup", "create", "--include-exports", "--include-cache", "--json")
    assert first.returncode == 0, first
    second = cli("--workspace", ws, "backup", "create", "--include-exports", "--include-cache", "--json")
    assert second.returncode == 0, second
    location = Path(second.json["location"])
    assert location.parent == ws / "exports" / "backups"
    names = [path.relative_to(location).as_posix() for path in location.rglob("*")]
    assert not [name for name in names if "backups" in name or "restore" in name], names
    assert (location / "workspace/cache/capture").is_dir()
    assert second.json["included_sections"][-2:] == ["cache", "exports"]


def test_outbox_beside_the_workspace_does_not_make_the_backup_copy_itself(cli, tmp_path, fixture_dir):
    """The replay demo's layout: outbox_root and backup_root share a parent (formats 11.2)."""
    base = tmp_path / "demo"
    base.mkdir()
    ws = base / ".contexta"
    os.rename(str(_ws(fixture_dir)), str(ws))
    outbox = base / "outbox"
    outbox.mkdir()
    (outbox / "failed_deliveries.jsonl").write_text('{"replay_ref": "r1"}\n')
    result = cli("--workspace", ws, "--outbox-root", outbox, "--backup-root", base / "backups",
                 "backup", "create", "--json")
    assert result.returncode == 0, result
    location = Path(result.json["location"])
    assert (location / "workspace/cache/outbox/failed_deliveries.jsonl").read_text() == '{"replay_ref": "r1"}\n'
    names = [path.relative_to(location).as_posix() for path in location.rglob("*")]
    assert not [name for name in names if "backups" in name]  # it never copied itself (formats 11.2)


def test_relocated_stores_are_backed_up_and_verify(cli, tmp_path, fixture_dir):
    ws = _ws(fixture_dir)
    elsewhere = tmp_path / "bigdisk"
    elsewhere.mkdir()
    os.rename(str(ws / "metadata" / "ledger.db"), str(elsewhere / "ledger.db"))
    os.rename(str(ws / "records"), str(elsewhere / "records"))
    config_file = tmp_path / "contexta.json"
    config_file.write_text(json.dumps({
        "workspace": {"root_path": str(ws)},
        "metadata": {"database_path": str(elsewhere / "ledger.db")},
        "records": {"root_path": str(elsewhere / "records")},
        "recovery": {"backup_root": str(tmp_path / "bk")}}))
    result = cli("--config", config_file, "backup", "create", "--json")
    assert result.returncode == 0, result
    location = Path(result.json["location"])
    assert (location / "workspace/metadata/ledger.db").is_file()
    assert (location / "workspace/records/segments/segment-000001.jsonl").is_file()
    manifest = json.loads((location / "manifest.json").read_text())
    relocated = {section["name"]: section["source"] for section in manifest["sections"] if section["relocated"]}
    assert relocated == {"metadata": str(elsewhere / "ledger.db"), "records": str(elsewhere / "records")}
    verify = cli("--config", config_file, "restore", "--verify-only", result.json["backup_ref"], "--json",
                 "--staging-root", tmp_path / "stage")
    assert verify.returncode == 0, verify
    assert verify.json["plane_results"]["records"]["record_count"] == 50


def test_wal_is_copied_with_the_ledger(cli, fixture_dir):
    ws = _ws(fixture_dir)
    (ws / "metadata" / "ledger.db.wal").write_bytes(b"wal-bytes")
    result = _create(cli, fixture_dir)
    assert result.returncode == 0, result
    location = Path(result.json["location"])
    assert (location / "workspace/metadata/ledger.db.wal").read_bytes() == b"wal-bytes"
    assert "metadata_wal_included" in result.json["notes"]


def test_ledger_locked_by_a_writer_is_a_warning_and_exit_1(cli, fixture_dir):
    """DuckDB holds an fcntl write lock while a read-write connection is open; we see it."""
    ledger = _ws(fixture_dir) / "metadata" / "ledger.db"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl,os,sys,time\n"
                               "fd=os.open(sys.argv[1],os.O_RDWR)\n"
                               "fcntl.lockf(fd,fcntl.LOCK_EX)\n"
                               "print('locked',flush=True)\n"
                               "time.sleep(60)", str(ledger)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        result = _create(cli, fixture_dir)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1, result
    assert result.json["status"] == "DEGRADED"
    assert any(warning["code"] == "metadata_in_use" for warning in result.json["warnings"])


def test_second_backup_while_one_runs_exits_4_and_changes_nothing(cli, fixture_dir):
    lock_path = ops._workspace_lock_path(_ws(fixture_dir))
    with open(str(lock_path), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        result = _create(cli, fixture_dir)
    assert result.returncode == 4, result
    assert result.json["error"]["code"] == "locked"
    assert not (fixture_dir / "bk").exists()


def test_missing_workspace_is_exit_3(cli, tmp_path):
    result = cli("--workspace", tmp_path / "nope", "--backup-root", tmp_path / "bk", "backup", "create", "--json")
    assert result.returncode == 3
    assert result.json["error"]["code"] == "workspace_missing"
    assert not (tmp_path / "bk").exists()


def test_symlinks_inside_the_workspace_are_not_followed(cli, fixture_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not workspace data")
    os.symlink(str(secret), str(_ws(fixture_dir) / "records" / "link-out"))
    result = _create(cli, fixture_dir)
    assert result.returncode == 1, result
    assert any(warning["code"] == "skipped_symlink" for warning in result.json["warnings"])
    location = Path(result.json["location"])
    assert not os.path.lexists(str(location / "workspace/records/link-out"))


def _killed_backup_args(root):
    return ("--workspace", _ws(root), "--backup-root", root / "bk", "backup", "create", "--label", "killed")


@pytest.fixture(scope="module")
def backup_steps(pyz, pristine_fixture, tmp_path_factory):
    """The durable steps of a backup of the fixture, from one traced rehearsal on a copy."""
    root = tmp_path_factory.mktemp("backup-rehearsal")
    return traced_steps(Cli(pyz, root), pristine_fixture, root, _killed_backup_args)


@pytest.mark.parametrize("step", slow_except([("backup:file-copied", 5), ("backup:renamed", 1)], [
    ("backup:file-copied", 1), ("backup:file-copied", 5), ("backup:file-copied", 10), ("backup:file-copied", -1),
    ("backup:files-durable", 1), ("backup:manifest-written", 1), ("backup:renamed", 1), ("backup:complete", 1),
]))
def test_killed_backup_never_looks_like_a_backup_and_is_cleaned_next_time(cli, fixture_dir, backup_steps, step):
    crash_at = crash_point(backup_steps, *step)
    killed = cli(*_killed_backup_args(fixture_dir), env={"CONTEXTA_OPS_CRASH_AT": str(crash_at)})
    listing = cli("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "bk", "backup", "list", "--json")
    entries = listing.json["backups"]
    assert killed.returncode == -9, killed
    complete = [entry for entry in entries if entry["complete"]]
    # complete only once renamed into place
    assert len(complete) == (1 if crash_at >= crash_point(backup_steps, "backup:renamed") else 0)
    for entry in complete:
        verify = cli("--backup-root", fixture_dir / "bk", "backup", "verify", entry["location"], "--json")
        assert verify.returncode == 0, verify
    partial = [entry for entry in entries if not entry["complete"]]
    assert all(not entry["in_progress"] for entry in partial)
    again = _create(cli, fixture_dir, "--label", "again")
    assert again.returncode == 0, again
    leftovers = [name for name in os.listdir(str(fixture_dir / "bk")) if name.endswith(".partial")]
    assert leftovers == []


def test_backup_list_shows_completeness_and_checksums(cli, fixture_dir):
    backup_root = fixture_dir / "backups"  # holds contexta's own fixture backup
    ours = _create(cli, fixture_dir, backup_root=backup_root)
    assert ours.returncode == 0
    (backup_root / "broken-2026-01-01T00-00-00Z").mkdir()
    listing = cli("--backup-root", backup_root, "backup", "list", "--json")
    assert listing.returncode == 0
    by_ref = {entry["backup_ref"]: entry for entry in listing.json["backups"]}
    contexta = by_ref["fixture-2026-11-26T03-48-11_819023Z"]
    assert contexta["complete"] and not contexta["has_checksums"] and contexta["made_by"] == "contexta"
    mine = by_ref[ours.json["backup_ref"]]
    assert mine["complete"] and mine["has_checksums"] and mine["made_by"] == "contexta-ops"
    assert mine["file_count"] == ours.json["file_count"]
    broken = by_ref["broken-2026-01-01T00-00-00Z"]
    assert not broken["complete"] and "manifest" in broken["problem"]
    text = cli("--backup-root", backup_root, "backup", "list")
    assert "no checksums" in text.stdout and "INCOMPLETE" in text.stdout


def test_backup_verify_finds_changed_missing_and_extra_files(cli, fixture_dir):
    created = _create(cli, fixture_dir)
    location = Path(created.json["location"])
    ok = cli("--backup-root", fixture_dir / "bk", "backup", "verify", created.json["backup_ref"], "--json")
    assert ok.returncode == 0 and ok.json["status"] == "SUCCESS"
    assert ok.json["checked_files"] == created.json["file_count"]
    flip_byte(location / "workspace/records/segments/segment-000001.jsonl")
    (location / "workspace/records/manifest.json").unlink()
    (location / "workspace/artifacts/planted.bin").write_bytes(b"x")
    bad = cli("--backup-root", fixture_dir / "bk", "backup", "verify", created.json["backup_ref"], "--json")
    assert bad.returncode == 1
    assert bad.json["changed"] == ["workspace/records/segments/segment-000001.jsonl"]
    assert bad.json["missing"] == ["workspace/records/manifest.json"]
    assert bad.json["extra"] == ["workspace/artifacts/planted.bin"]


def test_backup_verify_of_a_contexta_backup_says_it_cannot_prove_checksums(cli, fixture_dir):
    result = cli("--backup-root", fixture_dir / "backups", "backup", "verify",
                 "fixture-2026-11-26T03-48-11_819023Z", "--json")
    assert result.returncode == 1
    assert result.json["status"] == "DEGRADED"
    assert result.json["warnings"][0]["code"] == "checksums_absent"


def test_backup_plan_changes_nothing(cli, fixture_dir):
    result = cli("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "bk", "backup", "plan", "--json")
    assert result.returncode == 0
    assert not (fixture_dir / "bk").exists()
    assert result.json["estimated_files"] >= 20
    assert result.json["included_sections"] == ["config", "metadata", "records", "artifacts", "recovery"]
