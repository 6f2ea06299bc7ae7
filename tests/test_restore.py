"""Restore: verify-only proves restorability; apply switches over atomically; bad input changes nothing."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import contexta_ops as ops
from helpers import FIXTURE_BACKUP_REF, crash_point, flip_byte, reseal, slow_except, snapshot, traced_steps


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def _args(fixture_dir, *rest):
    return ("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "bk",
            "--staging-root", fixture_dir / "staging") + rest


def _backup(cli, fixture_dir):
    result = cli(*_args(fixture_dir, "backup", "create", "--json"))
    assert result.returncode == 0, result
    return result.json


def test_verify_only_of_contexta_backup_gives_contexta_counts(cli, fixture_dir, expected):
    before = snapshot(fixture_dir)
    result = cli("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "backups",
                 "--staging-root", fixture_dir / "staging", "restore", "--verify-only", FIXTURE_BACKUP_REF, "--json")
    assert result.returncode == 0, result
    payload = result.json
    assert payload["status"] == "SUCCESS" and payload["applied"] is False
    planes = payload["plane_results"]
    assert list(planes) == ["artifacts", "metadata", "records"]
    want = expected["backup_verify_plane_results"]
    assert {key: planes["artifacts"][key] for key in want["artifacts"]} == want["artifacts"]
    assert {key: planes["records"][key] for key in want["records"]} == want["records"]
    assert planes["metadata"]["run_count"] in (None, want["metadata"]["run_count"])
    assert "record_replay:50" in payload["verification_notes"]
    assert "manifest:%s" % FIXTURE_BACKUP_REF in payload["verification_notes"]
    assert any(warning["code"] == "checksums_absent" for warning in payload["warnings"])
    # Target and backup untouched, no staging left behind (the empty staging root itself may remain); beside
    # the backups, the history now says when this one verified clean.
    after = snapshot(fixture_dir)
    history = "backups/" + ops._HISTORY_NAME
    assert {k: v for k, v in after.items() if not k.startswith("staging") and k != history} == before
    assert json.loads((fixture_dir / history).read_text())["event"] == "verified_clean"
    assert not (fixture_dir / "staging").exists()  # read in place: staging is never touched


def test_verify_only_of_our_backup_checks_every_checksum(cli, fixture_dir):
    created = _backup(cli, fixture_dir)
    result = cli(*_args(fixture_dir, "restore", "--verify-only", "--json"))
    assert result.returncode == 0, result
    assert result.json["backup_ref"] == created["backup_ref"]
    assert "checksums_verified:%d" % created["file_count"] in result.json["verification_notes"]
    assert "newest complete backup" in result.stderr
    assert result.json["warnings"] == []


@pytest.mark.parametrize("member", [
    "workspace/metadata/ledger.db",
    "workspace/records/segments/segment-000001.jsonl",
    "workspace/artifacts/objects/checkpoint/0d/artifact__fixture-proj.tuned.model.bin",
    "workspace/artifacts/bindings/artifact__fixture-proj.tuned.notes.binding.json",
    "workspace/cache/outbox/failed_deliveries.jsonl",
    "workspace/config/resolved.config.json",
])
def test_one_flipped_byte_in_any_plane_fails_naming_the_file(cli, fixture_dir, member):
    created = _backup(cli, fixture_dir)
    flip_byte(Path(created["location"]) / member)
    result = cli(*_args(fixture_dir, "restore", "--verify-only", created["backup_ref"], "--json"))
    assert result.returncode == 1, result
    assert result.json["status"] == "FAILURE"
    assert member in [problem["path"] for problem in result.json["problems"]]
    assert member in cli(*_args(fixture_dir, "restore", "--verify-only", created["backup_ref"])).stdout


@pytest.mark.parametrize("member, code", [
    ("workspace/artifacts/objects/checkpoint/0d/artifact__fixture-proj.tuned.model.bin", "artifact_hash_mismatch"),
    ("workspace/metadata/ledger.db", "metadata_not_duckdb"),
])
def test_damage_in_a_contexta_backup_is_found_by_planes(cli, fixture_dir, member, code):
    location = fixture_dir / "backups" / FIXTURE_BACKUP_REF
    flip_byte(location / member, offset=9 if member.endswith(".db") else None)
    result = cli("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "backups", "restore",
                 "--verify-only", FIXTURE_BACKUP_REF, "--json", "--staging-root", fixture_dir / "staging")
    assert result.returncode == 1, result
    assert (code, member) in [(p["code"], p["path"]) for p in result.json["problems"]]


def test_records_damage_states(cli, fixture_dir):
    created = _backup(cli, fixture_dir)
    segment = Path(created["location"]) / "workspace/records/segments/segment-000001.jsonl"
    lines = segment.read_bytes().splitlines(keepends=True)
    segment.write_bytes(b"".join(lines[:10] + lines[11:49]) + lines[49][:30])  # a gap, then a torn tail
    reseal(created["location"])  # so only the planes can object
    result = cli(*_args(fixture_dir, "restore", "--verify-only", created["backup_ref"], "--json"))
    assert result.returncode == 1
    codes = {problem["code"] for problem in result.json["problems"]}
    assert {"sequence_gap", "truncated_line", "manifest_sequence_mismatch"} <= codes
    assert result.json["plane_results"]["records"]["integrity_state"] == "CORRUPTED"


def _mutate(ws):
    with open(str(ws / "records/segments/segment-000001.jsonl"), "ab") as handle:
        handle.write(b'{"appended_at":"2026-01-01T00:00:00Z","record":{},"sequence":51}\n')
    for body in (ws / "artifacts/objects/report").rglob("*"):
        if body.is_file():
            body.unlink()
    (ws / "artifacts/objects/stray.bin").write_bytes(b"new")
    (ws / "cache/outbox/failed_deliveries.jsonl").write_text("")
    (ws / "exports").mkdir(exist_ok=True)
    (ws / "exports/made-after-backup.txt").write_text("keep me")


def test_apply_restores_byte_for_byte_and_keeps_what_the_backup_lacks(cli, fixture_dir):
    ws = _ws(fixture_dir)
    (ws / "reports").mkdir()
    (ws / "reports/summary.html").write_text("<p>report</p>")
    original = snapshot(ws)
    created = _backup(cli, fixture_dir)
    _mutate(ws)
    plan = cli(*_args(fixture_dir, "restore", "plan", created["backup_ref"], "--json"))
    assert plan.returncode == 0, plan
    assert set(plan.json["replaced"]) == {"artifacts", "metadata", "records", "cache/outbox", "cache/capture"}
    assert {"exports", "reports"} <= set(plan.json["kept"])
    assert plan.json["lost"] == ["artifacts/objects/stray.bin"]
    result = cli(*_args(fixture_dir, "restore", created["backup_ref"], "--json"))
    assert result.returncode == 0, result
    assert result.json["applied"] is True and result.json["status"] == "SUCCESS"
    assert result.json["post_apply_check"]["status"] == "SUCCESS"
    restored = snapshot(ws)
    assert restored.pop("exports/made-after-backup.txt")[0] == "file"
    assert restored == original
    # The safety backup holds the workspace as it was just before, and verifies on its own.
    safety = result.json["safety_backup_ref"]
    assert safety.startswith("pre-restore-safety-")
    verify = cli(*_args(fixture_dir, "backup", "verify", safety, "--json"))
    assert verify.returncode == 0, verify
    leftovers = [name for name in os.listdir(str(ws.parent)) if "restore" in name]
    assert leftovers == []


def test_apply_of_contexta_backup_puts_the_outbox_back_where_it_lived(cli, fixture_dir):
    """Contexta's own restore leaves the outbox at recovery/outbox, where replay never looks (11.3)."""
    ws = _ws(fixture_dir)
    original_outbox = (ws / "cache/outbox/failed_deliveries.jsonl").read_bytes()
    shutil.rmtree(str(ws / "cache"))
    result = cli("--workspace", ws, "--backup-root", fixture_dir / "backups", "restore", FIXTURE_BACKUP_REF,
                 "--json")
    assert result.returncode == 0, result
    assert (ws / "cache/outbox/failed_deliveries.jsonl").read_bytes() == original_outbox
    assert not (ws / "recovery").exists() and not (ws / "config").exists()


def test_apply_into_another_target_backs_up_that_target(cli, fixture_dir, tmp_path):
    """Contexta's safety backup covers the configured workspace, not the target (11.6)."""
    created = _backup(cli, fixture_dir)
    other = tmp_path / "other" / "mydata"
    other.mkdir(parents=True)
    (other / "only-copy.txt").write_text("precious")
    result = cli(*_args(fixture_dir, "restore", created["backup_ref"], "--target", other, "--json"))
    assert result.returncode == 0, result
    assert (other / "only-copy.txt").read_text() == "precious"  # kept: not a section of the backup
    safety = Path(fixture_dir / "bk" / result.json["safety_backup_ref"])
    manifest = json.loads((safety / "manifest.json").read_text())
    assert manifest["workspace_root"] == str(other)


def test_apply_with_contexta_default_roots_keeps_every_backup(cli, fixture_dir):
    """With backup_root and staging inside the workspace, Contexta's restore destroyed everything (11.1)."""
    ws = _ws(fixture_dir)
    created = cli("--workspace", ws, "backup", "create", "--json")
    assert created.returncode == 0, created
    _mutate(ws)
    result = cli("--workspace", ws, "restore", created.json["backup_ref"], "--json")
    assert result.returncode == 0, result
    backups = {entry["backup_ref"]: entry for entry in cli("--workspace", ws, "backup", "list", "--json").json["backups"]}
    assert backups[created.json["backup_ref"]]["complete"]
    assert backups[result.json["safety_backup_ref"]]["complete"]
    for ref in backups:
        assert cli("--workspace", ws, "backup", "verify", ref, "--json").returncode == 0


def test_apply_refuses_a_backup_that_fails_verification_unless_forced(cli, fixture_dir):
    ws = _ws(fixture_dir)
    created = _backup(cli, fixture_dir)
    _mutate(ws)
    before = snapshot(ws)
    flip_byte(Path(created["location"]) / "workspace/records/manifest.json")
    refused = cli(*_args(fixture_dir, "restore", created["backup_ref"], "--json"))
    assert refused.returncode == 1 and refused.json["applied"] is False
    assert "refused_verification_failed" in refused.json["notes"]
    assert snapshot(ws) == before
    forced = cli(*_args(fixture_dir, "restore", created["backup_ref"], "--force", "--json"))
    assert forced.returncode == 1 and forced.json["applied"] is True
    assert any(warning["code"] == "forced" for warning in forced.json["warnings"])


@pytest.mark.parametrize("step", slow_except([("restore:journal-written", 1), ("restore:switched", 1)], [
    ("backup:file-copied", 1), ("backup:file-copied", 12), ("backup:manifest-written", 1),
    ("backup:renamed", 1), ("backup:complete", 1), ("restore:new-tree-durable", 1),
    ("restore:journal-written", 1), ("restore:switched", 1), ("restore:old-removed", 1),
]))
def test_kill_9_during_apply_leaves_old_or_new_and_next_run_finishes(cli, fixture_dir, tmp_path, step):
    ws = _ws(fixture_dir)
    created = _backup(cli, fixture_dir)
    new_state = snapshot(ws)
    _mutate(ws)
    old_state = snapshot(ws)

    def restore_args(root):
        return ("--workspace", _ws(root), "--backup-root", root / "bk", "--staging-root", root / "staging",
                "restore", created["backup_ref"])

    crash_at = crash_point(traced_steps(cli, fixture_dir, tmp_path, restore_args), *step)
    killed = cli(*restore_args(fixture_dir), env={"CONTEXTA_OPS_CRASH_AT": str(crash_at)})
    assert killed.returncode == -9, killed
    state = snapshot(ws)
    kept_extra = {"exports/made-after-backup.txt"}
    assert state == old_state or {k: v for k, v in state.items() if k not in kept_extra} == new_state
    finished = cli(*(restore_args(fixture_dir) + ("--json",)))
    assert finished.returncode == 0, finished
    final = snapshot(ws)
    assert {k: v for k, v in final.items() if k not in kept_extra} == new_state
    assert [name for name in os.listdir(str(ws.parent)) if "restore" in name] == []
    listing = cli("--backup-root", fixture_dir / "bk", "backup", "list", "--json").json["backups"]
    assert all(entry["complete"] for entry in listing)  # the killed safety backup was cleaned up


def test_interrupted_switch_without_exchange_is_finished_by_the_next_run(fixture_dir, monkeypatch):
    """Where renameat2 is missing, the switch is two renames; the journal covers the gap between them."""
    ws = _ws(fixture_dir)
    config = ops.load_config(environ={}, workspace=ws, backup_root=fixture_dir / "bk")
    plan = ops.plan_workspace_backup(config, label="base")
    ops.create_workspace_backup(config, plan)
    new_tree = ws.parent / (ops._new_tree_prefix(ws) + "abc")
    shutil.copytree(str(ws), str(new_tree))
    (new_tree / "marker").write_text("new")
    monkeypatch.setattr(ops, "_rename_exchange", lambda a, b: False)
    monkeypatch.setattr(ops, "_crash_point", _stop_after_old_moved_aside)
    with pytest.raises(_Stop):
        ops._switch_over(ws, [ops._Unit(ws, "workspace", new_tree)], "base")
    assert not ws.exists()
    assert ops._resume_interrupted_restore(ws) == "finished"
    assert (ws / "marker").read_text() == "new"
    assert not ops._journal_path(ws).exists()


class _Stop(Exception):
    pass


def _stop_after_old_moved_aside(name):
    if name == "restore:old-moved-aside":
        raise _Stop(name)


@pytest.mark.parametrize("make_bad, code", [
    (lambda fx: "no-such-backup-2026-01-01T00-00-00Z", "recovery_backup_not_found"),
    (lambda fx: "../escape", "recovery_backup_not_found"),
    (lambda fx: _corrupt_manifest(fx, b"{not json"), "recovery_manifest_invalid"),
    (lambda fx: _corrupt_manifest(fx, b"[1, 2, 3]"), "recovery_manifest_invalid"),
    (lambda fx: _corrupt_manifest(fx, b'{"files": [{"path": "../../etc/passwd", "size": 1, "sha256": "00"}]}'),
     "recovery_manifest_invalid"),
    (lambda fx: _corrupt_manifest(fx, None), "recovery_manifest_missing"),
    (lambda fx: _remove_workspace_dir(fx), "recovery_backup_workspace_missing"),
])
@pytest.mark.parametrize("verify_only", [True, False])
def test_bad_input_is_exit_3_and_changes_nothing(cli, fixture_dir, make_bad, code, verify_only):
    ref = make_bad(fixture_dir)
    before = snapshot(fixture_dir)
    args = ("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "backups",
            "--staging-root", fixture_dir / "staging", "restore", ref, "--json")
    result = cli(*(args + (("--verify-only",) if verify_only else ())))
    assert result.returncode == 3, result
    assert result.json["error"]["code"] == code
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(fixture_dir) == before


def _corrupt_manifest(fixture_dir, content):
    manifest = fixture_dir / "backups" / FIXTURE_BACKUP_REF / "manifest.json"
    if content is None:
        manifest.unlink()
    else:
        manifest.write_bytes(content)
    return FIXTURE_BACKUP_REF


def _remove_workspace_dir(fixture_dir):
    shutil.rmtree(str(fixture_dir / "backups" / FIXTURE_BACKUP_REF / "workspace"))
    return FIXTURE_BACKUP_REF


def run_without_dac_override(command, **kwargs):
    """Run as root minus the capabilities that make permission bits meaningless to root."""
    return subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] + command,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, **kwargs)


needs_setpriv = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                   reason="needs root and setpriv to make a file unreadable to the tool")


@needs_setpriv
def test_unreadable_backup_file_is_exit_3_and_leaves_no_staging(pyz, fixture_dir):
    segment = fixture_dir / "backups" / FIXTURE_BACKUP_REF / "workspace/records/segments/segment-000001.jsonl"
    os.chmod(str(segment), 0o000)
    staging = fixture_dir / "staging"
    before = snapshot(_ws(fixture_dir))
    completed = run_without_dac_override(
        [sys.executable, str(pyz), "--workspace", str(_ws(fixture_dir)), "--backup-root",
         str(fixture_dir / "backups"), "--staging-root", str(staging), "restore", "--verify-only",
         FIXTURE_BACKUP_REF, "--json"])
    assert completed.returncode == 3, completed
    error = json.loads(completed.stdout)["error"]
    assert error["path"] == str(segment) and "Permission denied" in error["message"]
    assert "Traceback" not in completed.stderr and len(completed.stderr.strip().splitlines()) == 1
    assert not staging.exists()
    assert snapshot(_ws(fixture_dir)) == before


def test_apply_while_locked_is_exit_4_and_changes_nothing(cli, fixture_dir):
    created = _backup(cli, fixture_dir)
    _mutate(_ws(fixture_dir))
    before = snapshot(fixture_dir)
    with open(str(ops._workspace_lock_path(_ws(fixture_dir))), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        result = cli(*_args(fixture_dir, "restore", created["backup_ref"], "--json"))
    assert result.returncode == 4, result
    assert snapshot(fixture_dir) == before


def test_restore_usage_errors_are_exit_2(cli, fixture_dir):
    assert cli(*_args(fixture_dir, "restore")).returncode == 2
    assert cli(*_args(fixture_dir, "restore", "plan")).returncode == 2
    assert cli(*_args(fixture_dir, "restore", "a", "b")).returncode == 2
    result = cli(*_args(fixture_dir, "restore", "--bogus", "--json"))
    assert result.returncode == 2 and result.json["error"]["code"] == "usage"


def test_seed_spelling_restore_apply_verify_only(cli, fixture_dir):
    created = _backup(cli, fixture_dir)
    result = cli(*_args(fixture_dir, "restore", "apply", created["backup_ref"], "--verify-only", "--json"))
    assert result.returncode == 0 and result.json["applied"] is False
