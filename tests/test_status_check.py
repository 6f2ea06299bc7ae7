"""`status` confirms the workspace (with real in-use signals); `check` verifies it after any operation."""

import fcntl
import json
import subprocess
import sys

import pytest

import contexta_ops as ops
from helpers import crash_point, traced_steps


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def _status(cli, fixture_dir, *extra, env=None):
    return cli("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "bk", "--staging-root",
               fixture_dir / "stage", "status", "--json", *extra, env=env)


def _check(cli, fixture_dir, *extra):
    return cli("--workspace", _ws(fixture_dir), "check", "--json", *extra)


def test_status_of_the_fixture_workspace(cli, fixture_dir, expected):
    result = _status(cli, fixture_dir)
    assert result.returncode == 0, result
    status = result.json
    assert status["record_count"] == expected["records"]
    assert status["artifact_binding_count"] == expected["artifacts"]
    assert status["outbox_pending_count"] == expected["outbox_entries"]
    paths = {entry["name"]: entry for entry in status["paths"]}
    assert list(paths) == ["workspace", "metadata database", "records", "artifacts", "reports", "exports", "cache",
                           "outbox", "backup root", "staging root"]
    assert paths["workspace"]["source"] == "flag --workspace"
    assert paths["records"]["source"] == "default (follows workspace.records_path)"
    assert paths["metadata database"]["exists"] and paths["metadata database"]["kind"] == "file"
    assert paths["records"]["file_count"] == 7 and not paths["reports"]["exists"]
    assert status["in_use"] == [] and status["warnings"] == []


def test_status_provenance_from_config_file_and_environment(cli, fixture_dir, tmp_path):
    config_file = tmp_path / "contexta.json"
    config_file.write_text(json.dumps({"workspace": {"root_path": str(_ws(fixture_dir))},
                                       "recovery": {"backup_root": str(tmp_path / "bk")}}))
    result = cli("--config", config_file, "status", "--json",
                 env={"CONTEXTA_RECOVERY_RESTORE_STAGING_ROOT": str(tmp_path / "stage"), "CONTEXTA_NOISE": "1"})
    assert result.returncode == 0, result
    sources = {entry["setting"]: entry["source"] for entry in result.json["paths"]}
    assert sources["workspace.root_path"] == "config file %s" % config_file
    assert sources["recovery.backup_root"] == "config file %s" % config_file
    assert sources["recovery.restore_staging_root"] == "environment CONTEXTA_RECOVERY_RESTORE_STAGING_ROOT"
    assert "ignored_environment:CONTEXTA_NOISE" in result.json["notes"]


def test_status_warns_about_roots_inside_the_workspace(cli, fixture_dir):
    result = cli("--workspace", _ws(fixture_dir), "status", "--json")
    assert result.returncode == 1
    warnings = {warning["code"]: warning["unsafe"] for warning in result.json["warnings"]}
    assert warnings == {"backup_root_inside_workspace": True, "staging_root_inside_workspace": False}


def test_status_sees_a_wal_file(cli, fixture_dir):
    (_ws(fixture_dir) / "metadata" / "ledger.db.wal").write_bytes(b"wal")
    result = _status(cli, fixture_dir)
    assert result.returncode == 0 and result.json["in_use"] == ["metadata_wal_present"]


def test_status_sees_a_writer_holding_the_ledger(cli, fixture_dir):
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,os,sys,time\n"
                               "fd=os.open(sys.argv[1],os.O_RDWR); fcntl.lockf(fd,fcntl.LOCK_EX)\n"
                               "print('locked',flush=True); time.sleep(60)",
                               str(_ws(fixture_dir) / "metadata" / "ledger.db")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        result = _status(cli, fixture_dir)
        checked = _check(cli, fixture_dir, "--plane", "metadata")
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1 and "metadata_locked_by_writer" in result.json["in_use"]
    assert checked.returncode == 0 and checked.json["plane_results"]["metadata"]["check"] == "file_level_in_use"


@pytest.mark.parametrize("lock, signal", [("workspace", "workspace_lock_held"), ("replay", "replay_running")])
def test_status_sees_held_locks(cli, fixture_dir, lock, signal):
    path = ops._workspace_lock_path(_ws(fixture_dir)) if lock == "workspace" else \
        _ws(fixture_dir) / "cache" / "outbox" / ops.REPLAY_LOCK_FILE
    with open(str(path), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        result = _status(cli, fixture_dir)
    assert result.returncode == 1 and signal in result.json["in_use"]
    assert _status(cli, fixture_dir).json["in_use"] == []


def test_status_sees_an_interrupted_restore_and_replay(cli, fixture_dir, tmp_path):
    ws = _ws(fixture_dir)
    replay_steps = traced_steps(cli, fixture_dir, tmp_path / "replay", lambda root: ("--workspace", _ws(root),
                                                                                   "replay"))
    created = cli("--workspace", ws, "--backup-root", fixture_dir / "bk", "backup", "create", "--json").json
    trace = tmp_path / "trace"
    cli("--workspace", ws, "--backup-root", fixture_dir / "bk", "restore", created["backup_ref"],
        env={"CONTEXTA_OPS_CRASH_TRACE": str(trace)})
    journal_step = crash_point(trace.read_text().split(), "restore:journal-written")
    killed = cli("--workspace", ws, "--backup-root", fixture_dir / "bk", "restore", created["backup_ref"],
                 env={"CONTEXTA_OPS_CRASH_AT": str(journal_step)})
    assert killed.returncode == -9
    killed_replay = cli("--workspace", ws, "replay",
                        env={"CONTEXTA_OPS_CRASH_AT": str(crash_point(replay_steps, "replay:committing"))})
    assert killed_replay.returncode == -9
    result = _status(cli, fixture_dir)
    assert result.returncode == 1
    assert {"restore_interrupted", "replay_interrupted"} <= set(result.json["in_use"])
    refused = cli("--workspace", ws, "--backup-root", fixture_dir / "bk", "restore", created["backup_ref"], "--json")
    assert refused.returncode == 3 and refused.json["error"]["code"] == "workspace_unsafe"  # the replay's journal
    assert cli("--workspace", ws, "replay").returncode in (0, 1)
    finished = cli("--workspace", ws, "--backup-root", fixture_dir / "bk", "restore", created["backup_ref"], "--json")
    assert finished.returncode == 0
    assert "restore_interrupted" not in _status(cli, fixture_dir).json["in_use"]


def test_check_is_clean_on_the_fixture(cli, fixture_dir):
    result = _check(cli, fixture_dir)
    assert result.returncode == 0, result
    planes = result.json["plane_results"]
    assert list(planes) == ["artifacts", "metadata", "records", "reports", "outbox", "capture"]
    assert planes["records"]["record_count"] == 50 and planes["artifacts"]["verified_count"] == 4
    assert planes["outbox"]["pending_count"] == 5


def _segment(fixture_dir):
    return _ws(fixture_dir) / "records" / "segments" / "segment-000001.jsonl"


def _truncate_last_line(fixture_dir):
    data = _segment(fixture_dir).read_bytes()
    _segment(fixture_dir).write_bytes(data[:-40])
    return _segment(fixture_dir), "truncated_line"


def _sequence_gap(fixture_dir):
    lines = _segment(fixture_dir).read_bytes().splitlines(keepends=True)
    _segment(fixture_dir).write_bytes(b"".join(lines[:20] + lines[21:]))
    return _segment(fixture_dir), "sequence_gap"


def _index_past_the_end(fixture_dir):
    index = _ws(fixture_dir) / "records" / "indexes" / "record_type" / "metric.jsonl"
    with open(str(index), "ab") as handle:
        handle.write(b'{"offset":99,"segment_id":1,"sequence":99}\n')
    return index, "index_pointer_invalid"


def _drift(fixture_dir):
    body = _ws(fixture_dir) / "artifacts/objects/dataset/b9/artifact__fixture-proj.tuned.eval-table.csv"
    body.write_bytes(body.read_bytes().replace(b"0.9", b"0.1", 1))
    return body, "artifact_hash_mismatch"


def _missing(fixture_dir):
    body = _ws(fixture_dir) / "artifacts/objects/report/ed/artifact__fixture-proj.tuned.notes"
    body.unlink()
    return body, "artifact_missing"


def _orphan(fixture_dir):
    stray = _ws(fixture_dir) / "artifacts/objects/checkpoint/stray.bin"
    stray.write_bytes(b"nobody binds me")
    return stray, "artifact_orphan"


def _bad_outbox_line(fixture_dir):
    outbox = _ws(fixture_dir) / "cache/outbox/failed_deliveries.jsonl"
    with open(str(outbox), "ab") as handle:
        handle.write(b"[not, json\n")
    return outbox, "outbox_line_malformed"


@pytest.mark.parametrize("damage", [_truncate_last_line, _sequence_gap, _index_past_the_end, _drift, _missing,
                                    _orphan, _bad_outbox_line])
def test_check_names_the_damaged_file(cli, fixture_dir, damage):
    path, code = damage(fixture_dir)
    result = _check(cli, fixture_dir)
    assert result.returncode == 1, result
    assert (code, str(path)) in [(p["code"], p["path"]) for p in result.json["problems"]]
    assert str(path) in cli("--workspace", _ws(fixture_dir), "check").stdout


def test_check_of_one_plane_ignores_the_others(cli, fixture_dir):
    _orphan(fixture_dir)
    assert _check(cli, fixture_dir, "--plane", "records").returncode == 0
    assert _check(cli, fixture_dir, "--plane", "artifacts").returncode == 1
    assert cli("--workspace", _ws(fixture_dir), "check", "--plane", "bogus").returncode == 2


def test_check_of_a_missing_workspace_is_exit_3(cli, tmp_path):
    result = cli("--workspace", tmp_path / "nope", "check", "--json")
    assert result.returncode == 3 and result.json["error"]["code"] == "workspace_missing"


def test_restore_apply_reports_the_post_apply_check(cli, fixture_dir):
    ws = _ws(fixture_dir)
    _bad_outbox_line(fixture_dir)  # carried faithfully by the backup; the three verify planes do not look at it
    created = cli("--workspace", ws, "--backup-root", fixture_dir / "bk", "backup", "create", "--json").json
    result = cli("--workspace", ws, "--backup-root", fixture_dir / "bk", "restore", created["backup_ref"], "--json")
    assert result.returncode == 1
    payload = result.json
    assert payload["applied"] is True and payload["status"] == "FAILURE"
    post = payload["post_apply_check"]
    assert post["status"] == "FAILURE" and set(post["planes"]) == set(ops.CHECK_PLANES)
    assert [p["code"] for p in post["problems"]] == ["outbox_line_malformed"]
