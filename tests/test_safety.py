"""Never green when wrong: a restore cannot destroy the only copies or swap a workspace under a live writer,
relocated stores come back where the configuration looks, backup selection survives a restore, backups carry
no journals, incremental backups never link rot, and every command fails closed on a missing root."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import contexta_ops as ops
from helpers import flip_byte, listed, snapshot


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def _run(cli, fixture_dir, *args, backup_root=None, env=None):
    root = backup_root or fixture_dir / "bk"
    return cli("--workspace", _ws(fixture_dir), "--backup-root", root, "--staging-root", fixture_dir / "staging",
               *args, env=env)


def _backup(cli, fixture_dir, *extra, backup_root=None, env=None):
    result = _run(cli, fixture_dir, "backup", "create", *extra, "--json", backup_root=backup_root, env=env)
    assert result.returncode in (0, 1), result
    return result.json


def _break(ws):
    """Damage the workspace the way an incident does: a lost body and a scribbled segment."""
    body = next((ws / "artifacts" / "objects").rglob("*.bin"))
    body.unlink()
    (ws / "records" / "segments" / "segment-000001.jsonl").write_text("not a record\n")


# -- a restore never deletes the backups ---------------------------------------------------------------------

@pytest.mark.parametrize("inside", ["records/backups", "artifacts/keep", "metadata/bk", "cache/outbox/bk"])
def test_a_restore_refuses_when_it_would_delete_the_backups(cli, fixture_dir, inside):
    ws = _ws(fixture_dir)
    backup_root = ws / inside
    created = _backup(cli, fixture_dir, "--label", "good", backup_root=backup_root)
    _break(ws)
    before = snapshot(fixture_dir)
    plan = _run(cli, fixture_dir, "restore", "plan", created["backup_ref"], "--json", backup_root=backup_root)
    assert plan.returncode == 1, plan
    assert {notice["code"] for notice in plan.json["refusals"]} == {"restore_would_delete_backups"}
    result = _run(cli, fixture_dir, "restore", created["backup_ref"], "--json", backup_root=backup_root)
    assert result.returncode == 3, result
    assert result.json["error"]["code"] == "restore_would_delete_backups"
    assert len(result.stderr.strip().splitlines()) == 1 and str(backup_root) in result.stderr
    forced = _run(cli, fixture_dir, "restore", created["backup_ref"], "--force", "--json", backup_root=backup_root)
    assert forced.returncode == 3 and forced.json["error"]["code"] == "restore_would_delete_backups"
    assert snapshot(fixture_dir) == before


def test_a_staging_root_inside_a_replaced_section_is_refused_too(cli, fixture_dir):
    created = _backup(cli, fixture_dir)
    staging = _ws(fixture_dir) / "records" / "staging"
    result = cli("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "bk", "--staging-root", staging,
                 "restore", created["backup_ref"], "--json")
    assert result.returncode == 3 and result.json["error"]["code"] == "restore_would_delete_backups"


def test_the_default_backup_root_inside_the_workspace_survives_a_restore(cli, fixture_dir):
    """exports/backups (Contexta's default) is outside every replaced section: kept, with the safety backup."""
    ws = _ws(fixture_dir)
    created = cli("--workspace", ws, "backup", "create", "--json").json
    _break(ws)
    result = cli("--workspace", ws, "restore", created["backup_ref"], "--json")
    assert result.returncode == 0, result
    names = sorted(path.name for path in (ws / "exports" / "backups").iterdir() if not path.name.startswith("."))
    assert created["backup_ref"] in names and result.json["safety_backup_ref"] in names
    assert cli("--workspace", ws, "backup", "verify", result.json["safety_backup_ref"]).returncode == 0


# -- no restore under a live writer --------------------------------------------------------------------------

def _hold_lock(path, call):
    """A process that holds a lock on ``path`` (``lockf``: DuckDB's kind; ``flock``: ours) until killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,os,sys,time\n"
                               "fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT); fcntl.%s(fd,fcntl.LOCK_EX)\n"
                               "print('locked',flush=True); time.sleep(120)" % call, str(path)], stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"locked"
    return holder


def _interrupted_replay(cli, ws):
    killed = cli("--workspace", ws, "replay", env={"CONTEXTA_OPS_CRASH_AT": "2"})
    assert killed.returncode == -9
    assert (ws / "cache" / "outbox" / "replay.journal.json").exists()


@pytest.mark.parametrize("signal, exit_code, code", [
    ("writer", 4, "workspace_in_use"),
    ("wal", 3, "workspace_unsafe"),
    ("replay_lock", 4, "workspace_in_use"),
    ("replay_journal", 3, "workspace_unsafe"),
    ("artifact_journal", 3, "workspace_unsafe"),
])
def test_no_restore_under_a_live_writer_or_a_half_done_operation(cli, fixture_dir, signal, exit_code, code):
    ws = _ws(fixture_dir)
    created = _backup(cli, fixture_dir, "--label", "good")
    holder = None
    if signal == "writer":
        holder = _hold_lock(ws / "metadata" / "ledger.db", "lockf")
    elif signal == "wal":
        (ws / "metadata" / "ledger.db.wal").write_bytes(b"wal")
    elif signal == "replay_lock":
        holder = _hold_lock(ws / "cache" / "outbox" / ops.REPLAY_LOCK_FILE, "flock")
    elif signal == "replay_journal":
        _interrupted_replay(cli, ws)
    else:
        staging = ws / "artifacts" / "staging"
        (staging / ("x" + ops._WRITE_JOURNAL_SUFFIX)).write_text(json.dumps({"binding": "bindings/x.binding.json"}))
    try:
        before = snapshot(fixture_dir)
        plan = _run(cli, fixture_dir, "restore", "plan", created["backup_ref"], "--json")
        result = _run(cli, fixture_dir, "restore", created["backup_ref"], "--json")
        after = snapshot(fixture_dir)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    assert plan.returncode == 1 and plan.json["refusals"], plan
    assert result.returncode == exit_code, result
    assert result.json["error"]["code"] == code
    assert len(result.stderr.strip().splitlines()) == 1
    assert after == before  # nothing changed: no safety backup, no new tree, no lock files left in the workspace


def test_force_restores_over_a_stale_wal_and_says_so(cli, fixture_dir):
    ws = _ws(fixture_dir)
    created = _backup(cli, fixture_dir)
    (ws / "metadata" / "ledger.db.wal").write_bytes(b"stale")
    result = _run(cli, fixture_dir, "restore", created["backup_ref"], "--force", "--json")
    assert result.returncode == 0, result
    assert "forced_unsafe" in [warning["code"] for warning in result.json["warnings"]]
    assert not (ws / "metadata" / "ledger.db.wal").exists()  # the backup's ledger, without a foreign WAL


# -- relocated stores come back where the configuration looks ----------------------------------------------

def _relocate(fixture_dir, tmp_path, how):
    """Move artifacts, outbox and records out of the workspace; return (global args, environment)."""
    ws = _ws(fixture_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(str(ws / "artifacts"), str(elsewhere / "arts"))
    shutil.move(str(ws / "cache" / "outbox"), str(elsewhere / "outbox"))
    shutil.move(str(ws / "records"), str(elsewhere / "recs"))
    settings = {"artifacts": {"root_path": str(elsewhere / "arts")}, "recovery": {"outbox_root": str(elsewhere / "outbox")},
                "records": {"root_path": str(elsewhere / "recs")}}
    env = {}
    args = []
    if how == "environment":
        env = {"CONTEXTA_ARTIFACTS_ROOT_PATH": str(elsewhere / "arts"),
               "CONTEXTA_RECOVERY_OUTBOX_ROOT": str(elsewhere / "outbox"),
               "CONTEXTA_RECORDS_ROOT_PATH": str(elsewhere / "recs")}
    elif how == "config":
        config_file = tmp_path / "contexta.json"
        config_file.write_text(json.dumps(settings))
        args = ["--config", str(config_file)]
        env = {}
    else:  # the outbox by flag, the rest by a config file
        config_file = tmp_path / "contexta.json"
        config_file.write_text(json.dumps({key: value for key, value in settings.items() if key != "recovery"}))
        args = ["--config", str(config_file), "--outbox-root", str(elsewhere / "outbox")]
    return elsewhere, args, env


@pytest.mark.parametrize("how", ["environment", "config", "flag"])
def test_relocated_stores_are_restored_where_the_configuration_looks(cli, fixture_dir, tmp_path, how):
    ws = _ws(fixture_dir)
    elsewhere, args, env = _relocate(fixture_dir, tmp_path, how)
    original = {name: snapshot(elsewhere / name) for name in ("arts", "outbox", "recs")}
    created = _run(cli, fixture_dir, *args, "backup", "create", "--json", env=env)
    assert created.returncode == 0, created
    shutil.rmtree(str(elsewhere / "arts" / "objects"))
    (elsewhere / "outbox" / "failed_deliveries.jsonl").write_text("")
    (elsewhere / "recs" / "segments" / "segment-000001.jsonl").write_text("garbage\n")
    plan = _run(cli, fixture_dir, *args, "restore", "plan", created.json["backup_ref"], "--json", env=env)
    assert plan.returncode == 0, plan
    assert plan.json["destinations"]["artifacts"] == str(elsewhere / "arts")
    assert plan.json["destinations"]["outbox"] == str(elsewhere / "outbox")
    assert plan.json["destinations"]["records"] == str(elsewhere / "recs")
    result = _run(cli, fixture_dir, *args, "restore", created.json["backup_ref"], "--json", env=env)
    assert result.returncode == 0, result
    assert result.json["post_apply_check"]["status"] == "SUCCESS"
    for name in ("arts", "outbox", "recs"):
        assert snapshot(elsewhere / name) == original[name], name
    for default in ("artifacts", "records", "cache/outbox"):
        assert not (ws / default).exists(), default  # nothing restored where nothing looks
    assert sorted(path.name for path in elsewhere.iterdir()) == ["arts", "outbox", "recs"]  # no leftovers


def test_contexta_finds_relocated_stores_after_our_restore(cli, fixture_dir, tmp_path, contexta_ref, expected):
    elsewhere, args, env = _relocate(fixture_dir, tmp_path, "environment")
    created = _run(cli, fixture_dir, "backup", "create", "--json", env=env)
    shutil.rmtree(str(elsewhere / "arts"))
    shutil.rmtree(str(elsewhere / "outbox"))
    restored = _run(cli, fixture_dir, "restore", created.json["backup_ref"], "--json", env=env)
    assert restored.returncode == 0, restored
    script = r"""
import json, os, sys
from contexta.config import load_config
from contexta.store.artifacts import ArtifactStore, VaultConfig, inspect_store
config = load_config(workspace=sys.argv[1])
summary = inspect_store(ArtifactStore(VaultConfig(root_path=config.artifacts.root_path)))
outbox = os.path.join(str(config.recovery.outbox_root), "failed_deliveries.jsonl")
print(json.dumps({"artifacts": summary.artifact_count, "verified": summary.verified_count,
                  "outbox": sum(1 for line in open(outbox) if line.strip()),
                  "artifact_root": str(config.artifacts.root_path)}))
"""
    full_env = dict({key: value for key, value in os.environ.items() if not key.startswith("CONTEXTA_")}, **env)
    completed = subprocess.run([contexta_ref, "-c", script, str(_ws(fixture_dir))], env=full_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    theirs = json.loads(completed.stdout.strip().splitlines()[-1])
    assert theirs == {"artifacts": expected["artifacts"], "verified": expected["artifacts"],
                      "outbox": expected["outbox_entries"], "artifact_root": str(elsewhere / "arts")}


def test_a_restore_into_another_target_keeps_the_stores_inside_it(cli, fixture_dir, tmp_path):
    """--target elsewhere never touches the configured workspace's relocated stores."""
    elsewhere, args, env = _relocate(fixture_dir, tmp_path, "environment")
    created = _run(cli, fixture_dir, "backup", "create", "--json", env=env)
    before = snapshot(elsewhere)
    target = tmp_path / "scratch" / ".contexta"
    result = _run(cli, fixture_dir, "restore", created.json["backup_ref"], "--target", target, "--json", env=env)
    assert result.returncode == 0, result
    assert snapshot(elsewhere) == before
    assert (target / "artifacts" / "bindings").is_dir() and (target / "cache/outbox/failed_deliveries.jsonl").is_file()


# -- selection survives a restore ------------------------------------------------------------------------------

def test_after_a_restore_defaults_still_pick_the_good_backup(cli, fixture_dir):
    ws = _ws(fixture_dir)
    good = _backup(cli, fixture_dir, "--label", "nightly")
    _break(ws)
    restored = _run(cli, fixture_dir, "restore", good["backup_ref"], "--json")
    assert restored.returncode == 0, restored
    safety = restored.json["safety_backup_ref"]
    listing = {entry["backup_ref"]: entry for entry in _run(cli, fixture_dir, "backup", "list", "--json").json["backups"]}
    assert listing[good["backup_ref"]]["kind"] == "manual" and listing[good["backup_ref"]]["label"] == "nightly"
    assert listing[safety]["kind"] == "safety"
    assert listing[good["backup_ref"]]["last_restored_at"]
    # the newest backup is now the broken workspace's safety copy; defaults and `latest` skip it
    for words in ([], ["latest"], ["nightly"], [good["backup_ref"][:12]]):
        chosen = _run(cli, fixture_dir, "restore", "--verify-only", *words, "--json")
        assert chosen.returncode == 0, chosen
        assert chosen.json["backup_ref"] == good["backup_ref"], words
    pruned = _run(cli, fixture_dir, "backup", "prune", "--keep-last", "1", "--json")
    assert pruned.returncode == 0 and good["backup_ref"] not in pruned.json["removed"]
    assert safety not in pruned.json["removed"]  # safety backups retire by age only
    assert (fixture_dir / "bk" / good["backup_ref"]).is_dir()


def test_prune_keeps_the_backup_last_restored_from_and_the_newest_verified_clean(cli, fixture_dir):
    first = _backup(cli, fixture_dir, "--label", "a")
    assert _run(cli, fixture_dir, "restore", first["backup_ref"]).returncode == 0
    second = _backup(cli, fixture_dir, "--label", "b")
    assert _run(cli, fixture_dir, "restore", "--verify-only", second["backup_ref"]).returncode == 0
    listing = {entry["backup_ref"]: entry for entry in _run(cli, fixture_dir, "backup", "list", "--json").json["backups"]}
    assert listing[second["backup_ref"]]["last_verified_clean_at"]
    assert listing[first["backup_ref"]]["last_verified_clean_at"] is None
    third = _backup(cli, fixture_dir, "--label", "c")
    pruned = _run(cli, fixture_dir, "backup", "prune", "--keep-last", "1", "--json")
    assert pruned.returncode == 0, pruned
    assert pruned.json["removed"] == []
    assert {first["backup_ref"], second["backup_ref"], third["backup_ref"]} <= set(pruned.json["kept"])
    history = (fixture_dir / "bk" / ops._HISTORY_NAME).read_text().splitlines()
    assert [json.loads(line)["event"] for line in history] == ["restored_from", "verified_clean"]
    # the history lives beside the backups; no backup's own bytes changed
    assert _run(cli, fixture_dir, "backup", "verify", second["backup_ref"]).returncode == 0


def test_an_ambiguous_prefix_names_the_candidates(cli, fixture_dir):
    one = _backup(cli, fixture_dir, "--label", "same")
    two = _backup(cli, fixture_dir, "--label", "same")
    result = _run(cli, fixture_dir, "restore", "--verify-only", "same-", "--json")
    assert result.returncode == 3 and result.json["error"]["code"] == "recovery_backup_ambiguous"
    assert one["backup_ref"] in result.stderr and two["backup_ref"] in result.stderr
    labelled = _run(cli, fixture_dir, "restore", "--verify-only", "same", "--json")
    assert labelled.returncode == 0 and labelled.json["backup_ref"] == two["backup_ref"]


# -- what a backup holds ---------------------------------------------------------------------------------------

def test_a_backup_never_carries_a_journal_and_says_when_the_workspace_was_unsafe(cli, fixture_dir):
    ws = _ws(fixture_dir)
    _interrupted_replay(cli, ws)
    (ws / "cache" / "outbox" / "tmpab12cd34").write_text("contexta's half-written temp file")
    (ws / "artifacts" / "staging" / ("z" + ops._WRITE_JOURNAL_SUFFIX)).write_text("{}")
    result = _backup(cli, fixture_dir)
    assert result["status"] == "DEGRADED"
    assert "replay_interrupted" in [warning["code"] for warning in result["warnings"]]
    location = Path(result["location"])
    manifest = json.loads((location / "manifest.json").read_text())
    names = {Path(path).name for path in listed(location)}
    assert not names & {"replay.journal.json", ".replay-kept.tmp", ".replay-dead.tmp", "replay.lock", "tmpab12cd34",
                        "z" + ops._WRITE_JOURNAL_SUFFIX}
    assert "replay_interrupted" in [warning["code"] for warning in manifest["warnings"]]
    # restored, the workspace replays normally: nothing of the interrupted run came back with it
    target = fixture_dir / "restored" / ".contexta"
    restored = _run(cli, fixture_dir, "restore", result["backup_ref"], "--target", target, "--json")
    assert restored.returncode == 0, restored
    replayed = cli("--workspace", target, "replay", "--json")
    assert replayed.returncode == 0, replayed
    assert replayed.json["acknowledged_count"] == 5


def test_incremental_with_verify_unchanged_never_links_a_rotted_base_copy(cli, fixture_dir):
    base = _backup(cli, fixture_dir, "--label", "base")
    member = "workspace/records/segments/segment-000001.jsonl"
    flip_byte(Path(base["location"]) / member)
    result = _backup(cli, fixture_dir, "--incremental", "--verify-unchanged")
    assert result["status"] == "DEGRADED"
    assert "incremental_base_damaged" in [warning["code"] for warning in result["warnings"]]
    fresh = Path(result["location"]) / member
    assert os.stat(str(fresh)).st_ino != os.stat(str(Path(base["location"]) / member)).st_ino
    assert fresh.read_bytes() == (_ws(fixture_dir) / "records/segments/segment-000001.jsonl").read_bytes()
    assert _run(cli, fixture_dir, "backup", "verify", result["backup_ref"]).returncode == 0


def test_incremental_without_verification_says_what_it_linked_unverified(cli, fixture_dir):
    base = _backup(cli, fixture_dir, "--label", "base")
    result = _backup(cli, fixture_dir, "--incremental")
    assert result["kind"] == "incremental"
    assert result["details"]["incremental_base"] == base["backup_ref"]
    assert result["details"]["linked_unverified"] == result["details"]["linked_files"] > 0
    assert any(note.startswith("linked_unverified:") for note in result["notes"])


def test_our_own_manifest_without_checksums_is_a_failure(cli, fixture_dir):
    created = _backup(cli, fixture_dir)
    location = Path(created["location"])
    manifest = json.loads((location / "manifest.json").read_text())
    del manifest["file_list"]
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (location / "manifest.json").write_bytes(data)
    (location / "manifest.json.sha256").write_bytes(ops._manifest_digest(data))
    for args in (("backup", "verify", created["backup_ref"]), ("restore", "--verify-only", created["backup_ref"])):
        result = _run(cli, fixture_dir, *args, "--json")
        assert result.returncode == 1, result
        assert "checksums_missing" in [problem["code"] for problem in result.json["problems"]]


def test_our_directory_backup_without_its_manifest_digest_is_a_failure(cli, fixture_dir):
    created = _backup(cli, fixture_dir)
    (Path(created["location"]) / "manifest.json.sha256").unlink()
    result = _run(cli, fixture_dir, "backup", "verify", created["backup_ref"], "--json")
    assert result.returncode == 1 and "manifest_digest_missing" in [p["code"] for p in result.json["problems"]]


def test_prune_touches_only_backups(cli, fixture_dir):
    _backup(cli, fixture_dir)
    _backup(cli, fixture_dir)
    root = fixture_dir / "bk"
    for name in ("notes", ".git", "nightly-2026-01-01T00-00-00Z"):
        (root / name).mkdir()
        (root / name / "keep.txt").write_text("mine")
    pruned = _run(cli, fixture_dir, "backup", "prune", "--keep-last", "1", "--json")
    assert pruned.returncode == 0 and len(pruned.json["removed"]) == 1
    for name in ("notes", ".git", "nightly-2026-01-01T00-00-00Z"):
        assert (root / name / "keep.txt").read_text() == "mine"


# -- fail closed -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["status"], ["check"], ["backup", "plan"], ["backup", "create"]])
def test_a_missing_workspace_is_exit_3_not_success(cli, tmp_path, command):
    result = cli("--workspace", tmp_path / "typo" / ".contexta", *command, "--json")
    assert result.returncode == 3, result
    assert "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _tiny_filesystem(path, size="1m"):
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", str(path)],
                             stderr=subprocess.PIPE)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % mounted.stderr.decode().strip())


def test_verify_only_and_apply_check_free_space_before_writing(cli, fixture_dir, tmp_path):
    created = _backup(cli, fixture_dir)
    staging = tmp_path / "small"
    _tiny_filesystem(staging, "64k")
    try:
        args = ("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "bk", "--staging-root", staging,
                "restore", "--verify-only", created["backup_ref"], "--json")
        result = cli(*args, "--materialize")
        assert result.returncode == 3, result
        assert result.json["error"]["code"] == "insufficient_space"
        assert str(staging) in result.stderr and "needed" in result.stderr
        assert list(staging.iterdir()) == []
        in_place = cli(*args)  # reads the backup where it lies: staging's size does not matter
        assert in_place.returncode == 0, in_place
        assert list(staging.iterdir()) == []
    finally:
        subprocess.run(["umount", str(staging)])


def test_verify_only_says_whether_the_target_has_room(cli, fixture_dir, tmp_path):
    created = _backup(cli, fixture_dir)
    disk = tmp_path / "small"
    _tiny_filesystem(disk, "1m")
    try:
        result = _run(cli, fixture_dir, "restore", "--verify-only", created["backup_ref"], "--target",
                      disk / ".contexta", "--json")
        assert result.returncode == 0, result  # the backup is sound; the restore would not fit there
        short = [w["message"] for w in result.json["warnings"] if w["code"] == "target_space_short"]
        assert len(short) == 1 and str(disk) in short[0], result
        assert [note for note in result.json["notes"] if note.startswith("target_space:") and str(disk) in note]
        roomy = _run(cli, fixture_dir, "restore", "--verify-only", created["backup_ref"], "--json")
        assert not [w for w in roomy.json["warnings"] if w["code"] == "target_space_short"]
        assert os.listdir(str(disk)) == []
    finally:
        subprocess.run(["umount", str(disk)])


# -- cache/capture is primary data ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def contexta_ref_314():
    """The unpatched contexta 1.0.0 on CPython 3.14: its facade's capture needs 3.14 (see ../shared/tools)."""
    from helpers import REF_SCRIPT
    if not REF_SCRIPT.exists():
        pytest.skip("contexta 1.0.0 on Python 3.14 needs %s (present in CI checkouts beside ../shared)" % REF_SCRIPT)
    completed = subprocess.run(["bash", str(REF_SCRIPT)], env=dict(os.environ, CONTEXTA_REF_PY314="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=1800)
    if completed.returncode != 0:
        pytest.skip("contexta 1.0.0 on Python 3.14 unavailable: %s" % completed.stderr.strip()[-300:])
    return completed.stdout.strip().splitlines()[-1]


FACADE = r"""
import sys
from contexta import Contexta
ctx = Contexta(workspace=sys.argv[1])
with ctx.run("train"):
    for step in range(5):
        ctx.metric("loss", 1.0 / (step + 1))
    ctx.event("epoch", message="done")
with open(sys.argv[2], "wb") as handle:
    handle.write(b"weights" * 100)
with ctx.run("eval"):
    ctx.register_artifact("checkpoint", sys.argv[2])
"""

CONTEXTA_BACKUP_AND_RESTORE = r"""
import json, sys
from pathlib import Path
from contexta.config import RecoveryConfig, UnifiedConfig, WorkspaceConfig
from contexta.recovery import create_workspace_backup, plan_restore, plan_workspace_backup, restore_workspace
workspace, backups, our_backup, scratch = (Path(arg) for arg in sys.argv[1:5])
config = UnifiedConfig(workspace=WorkspaceConfig(root_path=workspace), recovery=RecoveryConfig(backup_root=backups))
theirs = create_workspace_backup(config, plan_workspace_backup(config, label="theirs"))
other = UnifiedConfig(workspace=WorkspaceConfig(root_path=scratch), recovery=RecoveryConfig(
    backup_root=our_backup.parent, restore_staging_root=scratch.parent / "staging", create_backup_before_restore=False))
verified = restore_workspace(other, plan_restore(other, our_backup.name, verify_only=True))
applied = restore_workspace(other, plan_restore(other, our_backup.name))
print(json.dumps({"included_sections": list(theirs.included_sections), "verify": verified.status,
                  "applied": applied.applied}))
"""


def _clean_env():
    return {key: value for key, value in os.environ.items() if not key.startswith("CONTEXTA_")}


def test_cache_capture_is_backed_up_restored_and_checked(cli, tmp_path, contexta_ref_314):
    ws = tmp_path / "proj" / ".contexta"
    made = subprocess.run([contexta_ref_314, "-c", FACADE, str(ws), str(tmp_path / "model.bin")], env=_clean_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert made.returncode == 0, made.stderr
    capture = ws / "cache" / "capture"
    original = snapshot(capture)
    assert {"record.jsonl", "artifact.jsonl"} <= set(original)
    args = ("--workspace", ws, "--backup-root", tmp_path / "bk")
    plan = cli(*args, "backup", "plan", "--json")
    assert "capture" in [section["name"] for section in plan.json["sections"]]
    created = cli(*args, "backup", "create", "--json")
    assert created.returncode == 0, created
    assert {"workspace/cache/capture/record.jsonl", "workspace/cache/capture/artifact.jsonl"} <= set(
        listed(created.json["location"]))
    # contexta's own backup of the same workspace names the same sections; it verifies and restores ours
    theirs = subprocess.run([contexta_ref_314, "-c", CONTEXTA_BACKUP_AND_RESTORE, str(ws), str(tmp_path / "their-bk"),
                             created.json["location"], str(tmp_path / "scratch" / ".contexta")], env=_clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert theirs.returncode == 0, theirs.stderr
    result = json.loads(theirs.stdout.strip().splitlines()[-1])
    assert result == {"included_sections": created.json["included_sections"], "verify": "SUCCESS", "applied": True}
    assert snapshot(tmp_path / "scratch" / ".contexta" / "cache" / "capture") == original
    # ours puts it back in place after damage, and `check` reads every line
    (capture / "record.jsonl").write_text('{"family": "RECORD"}\n{"torn": ')
    checked = cli(*args, "check", "--plane", "capture", "--json")
    assert checked.returncode == 1, checked
    assert [problem["code"] for problem in checked.json["problems"]] == ["capture_line_invalid"]
    restored = cli(*args, "restore", created.json["backup_ref"], "--json")
    assert restored.returncode == 0, restored
    assert snapshot(capture) == original
    assert cli(*args, "check", "--plane", "capture").returncode == 0


def test_a_disk_that_fills_while_writing_is_named_in_the_error(cli, fixture_dir, tmp_path):
    """A gzip archive's size is not known before: the disk fills mid-write, and the one line names where."""
    disk = tmp_path / "disk"
    _tiny_filesystem(disk, "12k")
    try:
        result = _run(cli, fixture_dir, "backup", "create", "--archive", disk / "b.tar.gz", "--gzip")
        assert result.returncode == 3, result
        assert "No space left on device: %s" % disk in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert os.listdir(str(disk)) == []
    finally:
        subprocess.run(["umount", str(disk)])


# -- exactly-once survives a restore --------------------------------------------------------------------------

def test_replay_restore_replay_delivers_each_entry_once(cli, fixture_dir):
    ws = _ws(fixture_dir)
    before = _backup(cli, fixture_dir, "--label", "before-replay")
    first = cli("--workspace", ws, "replay", "--json")
    assert first.returncode == 0 and first.json["acknowledged_count"] == 5, first
    sink = {path.name: path.read_bytes() for path in (ws / "exports" / "replayed").glob("*.jsonl")}
    plan = _run(cli, fixture_dir, "restore", "plan", before["backup_ref"], "--json")
    assert plan.returncode == 0, plan
    warned = [warning for warning in plan.json["warnings"] if warning["code"] == "outbox_already_delivered"]
    assert len(warned) == 1 and warned[0]["message"].startswith("5 of the backup's outbox entries")
    restored = _run(cli, fixture_dir, "restore", before["backup_ref"], "--json")
    assert restored.returncode == 0, restored
    assert len((ws / "cache/outbox/failed_deliveries.jsonl").read_text().splitlines()) == 5  # back, pending
    again = cli("--workspace", ws, "replay", "--json")
    assert again.returncode == 0, again
    assert again.json["acknowledged_count"] == 5 and again.json["already_delivered_count"] == 5
    assert {path.name: path.read_bytes() for path in (ws / "exports" / "replayed").glob("*.jsonl")} == sink
