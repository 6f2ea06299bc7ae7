"""Interoperability with the real contexta 1.0.0: it reads our backups, we read its backups."""

import json
import os
import subprocess
from pathlib import Path

from helpers import FIXTURE_BACKUP_REF, run_ref, snapshot

CONTEXTA_RESTORE = r"""
import json, sys
import json
import os
import subprocess
from pathlib import Path
from contexta.config import RecoveryConfig, UnifiedConfig, WorkspaceConfig
from contexta.recovery import plan_restore, restore_workspace
backup, scratch, verify_only = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "verify"
config = UnifiedConfig(project_name="interop", workspace=WorkspaceConfig(root_path=scratch / ".contexta"),
    recovery=RecoveryConfig(backup_root=backup.parent, restore_staging_root=scratch / "staging",
                            create_backup_before_restore=False))
result = restore_workspace(config, plan_restore(config, backup.name, verify_only=verify_only))
print(json.dumps({"status": result.status, "applied": result.applied,
                  "plane_results": json.loads(json.dumps(dict(result.plane_results), default=str)),
                  "notes": list(result.verification_notes)}))
"""


def _our_backup(cli, fixture_dir):
    result = cli("--workspace", fixture_dir / "workspace" / ".contexta", "--backup-root", fixture_dir / "bk",
                 "backup", "create", "--label", "interop", "--json")
    assert result.returncode == 0, result
    return Path(result.json["location"])


def test_contexta_verifies_our_backup_with_the_expected_counts(cli, fixture_dir, expected, contexta_ref, tmp_path):
    location = _our_backup(cli, fixture_dir)
    theirs = run_ref(contexta_ref, CONTEXTA_RESTORE, location, tmp_path / "scratch", "verify")
    assert theirs["status"] == "SUCCESS"
    assert theirs["plane_results"] == expected["backup_verify_plane_results"]
    assert theirs["notes"][:3] == expected["backup_verify_notes"][:3]
    assert theirs["notes"][3] == "manifest:%s" % location.name


def test_contexta_restores_our_backup_with_the_outbox_where_replay_looks(cli, fixture_dir, contexta_ref, tmp_path):
    location = _our_backup(cli, fixture_dir)
    theirs = run_ref(contexta_ref, CONTEXTA_RESTORE, location, tmp_path / "scratch", "apply")
    assert theirs["applied"] is True
    restored = tmp_path / "scratch" / ".contexta"
    original = fixture_dir / "workspace" / ".contexta"
    assert (restored / "cache/outbox/failed_deliveries.jsonl").read_bytes() == \
        (original / "cache/outbox/failed_deliveries.jsonl").read_bytes()
    ours = {k: v for k, v in snapshot(original).items() if not k.startswith("exports")}
    theirs_tree = {k: v for k, v in snapshot(restored).items() if not k.startswith("config")}
    assert theirs_tree == ours


def test_we_and_contexta_agree_on_its_own_backup(cli, fixture_dir, expected, contexta_ref, tmp_path):
    backup = fixture_dir / "backups" / FIXTURE_BACKUP_REF
    theirs = run_ref(contexta_ref, CONTEXTA_RESTORE, backup, tmp_path / "scratch", "verify")
    ours = cli("--backup-root", backup.parent, "--staging-root", tmp_path / "stage", "restore", "--verify-only",
               FIXTURE_BACKUP_REF, "--json")
    assert ours.returncode == 0, ours
    for plane in ("artifacts", "records"):
        assert {key: ours.json["plane_results"][plane][key] for key in theirs["plane_results"][plane]} == \
            theirs["plane_results"][plane] == expected["backup_verify_plane_results"][plane]


def test_with_duckdb_importable_verify_only_counts_runs(pyz, fixture_dir, expected, contexta_ref, tmp_path):
    """The reference interpreter has duckdb: then the ledger is read for real, read-only, where it lies."""
    backup = fixture_dir / "backups" / FIXTURE_BACKUP_REF
    before = snapshot(backup)
    completed = subprocess.run(
        [contexta_ref, str(pyz), "--backup-root", str(fixture_dir / "backups"), "--staging-root",
         str(tmp_path / "stage"), "restore", "--verify-only", FIXTURE_BACKUP_REF, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
        env={key: value for key, value in os.environ.items() if not key.startswith("CONTEXTA_")})
    assert completed.returncode == 0, completed.stderr
    payload = json.loads(completed.stdout)
    assert payload["plane_results"]["metadata"]["check"] == "duckdb"
    assert payload["plane_results"]["metadata"]["run_count"] == expected["runs"]
    assert "metadata_runs:%d" % expected["runs"] in payload["verification_notes"]
    assert snapshot(backup) == before and not (tmp_path / "stage").exists()  # nothing written, not even a WAL
