"""Contexta parity: the guide's command line as Contexta spells it, and backups whose config and sections
read as Contexta's own - checked against contexta 1.0.0 itself where it has the same feature."""

import json
import os
import subprocess
import zipfile
from pathlib import Path

from helpers import FIXTURE_BACKUP_REF, snapshot


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def _contexta_cli(contexta_ref, *args, cwd=None):
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONTEXTA_")}
    completed = subprocess.run([contexta_ref, "-m", "contexta"] + [str(arg) for arg in args], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_backup_create_output_writes_contexta_s_zip_which_contexta_restores(cli, fixture_dir, tmp_path,
                                                                           contexta_ref):
    ws = _ws(fixture_dir)
    original = snapshot(ws)
    ours = cli("--workspace", ws, "--backup-root", tmp_path / "bk", "backup", "create", "--label", "v1.2",
               "--output", tmp_path / "ours", "--json")
    assert ours.returncode == 0, ours
    zip_path = tmp_path / "ours.zip"
    assert ours.json["location"] == str(zip_path) and ours.json["details"]["backup_path"] == str(zip_path)
    theirs = _contexta_cli(contexta_ref, "--workspace", ws, "--format", "json", "backup", "create",
                           "--output", tmp_path / "theirs")
    with zipfile.ZipFile(str(zip_path)) as archive, zipfile.ZipFile(theirs["backup_path"]) as reference:
        assert archive.testzip() is None
        assert {info.filename for info in archive.infolist()} == {info.filename for info in reference.infolist()}
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in archive.infolist() if
                   not info.filename.endswith("/"))
    verified = _contexta_cli(contexta_ref, "--format", "json", "restore", "apply", zip_path, "--verify-only",
                             "--target-workspace", tmp_path / "scratch" / ".contexta")
    assert verified["verified"] is True
    applied = _contexta_cli(contexta_ref, "--format", "json", "restore", "apply", zip_path,
                            "--target-workspace", tmp_path / "scratch" / ".contexta")
    assert applied["restored"] is True
    def content(tree):  # contexta extracts with zipfile, which keeps no modes
        return {path: entry[:2] for path, entry in tree.items()}

    assert content(snapshot(tmp_path / "scratch" / ".contexta")) == content(original)
    assert snapshot(ws) == original
    again = cli("--staging-root", tmp_path / "stage", "restore", "--verify-only", zip_path, "--json")
    assert again.returncode == 0 and again.json["status"] == "SUCCESS", again


def test_backup_output_never_zips_itself_or_the_backups_inside_the_workspace(cli, fixture_dir):
    ws = _ws(fixture_dir)
    assert cli("--workspace", ws, "backup", "create", "--json").returncode == 0  # into exports/backups
    first = cli("--workspace", ws, "backup", "create", "--output", ws / "exports" / "backups" / "one", "--json")
    second = cli("--workspace", ws, "backup", "create", "--output", ws / "exports" / "backups" / "two", "--json")
    assert first.returncode == 0 and second.returncode == 0, second
    with zipfile.ZipFile(second.json["location"]) as archive:
        names = [info.filename for info in archive.infolist()]
    assert not [name for name in names if name.startswith(".contexta/exports/backups/")]
    assert os.path.getsize(first.json["location"]) == os.path.getsize(second.json["location"])


def test_restore_apply_takes_contexta_s_target_workspace_flag(cli, fixture_dir, tmp_path):
    ws = _ws(fixture_dir)
    created = cli("--workspace", ws, "--backup-root", tmp_path / "bk", "backup", "create", "--json").json
    target = tmp_path / "elsewhere" / ".contexta"
    result = cli("--backup-root", tmp_path / "bk", "restore", "apply", created["backup_ref"],
                 "--target-workspace", target, "--format", "json")
    assert result.returncode == 0, result
    assert result.json["target_workspace"] == str(target) and result.json["applied"] is True
    assert snapshot(target / "records") == snapshot(ws / "records")


def test_contexta_s_global_flags(cli, fixture_dir, tmp_path):
    ws = _ws(fixture_dir)
    as_format = cli("--workspace", ws, "status", "--format", "json")
    assert as_format.returncode in (0, 1) and as_format.json["workspace_root"] == str(ws)
    moved = cli("--workspace", ws, "--set", "recovery.backup_root=%s" % (tmp_path / "set-bk"), "backup", "create",
                "--json")
    assert moved.returncode == 0 and Path(moved.json["location"]).parent == tmp_path / "set-bk"
    test_profile = cli("--profile", "test", "backup", "plan", "--json", cwd=fixture_dir / "workspace")
    assert test_profile.returncode == 3  # the test profile's workspace is .contexta-test, which is not there
    assert ".contexta-test" in test_profile.json["error"]["message"]
    unknown = cli("--workspace", ws, "--set", "nowhere.key=1", "status", "--json")
    assert unknown.returncode == 3 and unknown.json["error"]["code"] == "unknown_config_field"


def test_resolved_config_holds_every_section_contexta_writes(cli, fixture_dir, tmp_path):
    contexta_made = json.loads((fixture_dir / "backups" / FIXTURE_BACKUP_REF / "workspace/config/resolved.config.json")
                               .read_text())
    created = cli("--workspace", _ws(fixture_dir), "--backup-root", tmp_path / "bk", "backup", "create", "--json")
    ours = json.loads((Path(created.json["location"]) / "workspace/config/resolved.config.json").read_text())
    assert sorted(ours) == sorted(contexta_made)
    for section in ("contract", "capture", "interpretation", "surfaces", "retention", "security"):
        assert ours[section] == contexta_made[section], section
    for section in ("metadata", "records", "artifacts", "recovery", "workspace"):
        assert sorted(ours[section]) == sorted(contexta_made[section]), section
    assert created.json["included_sections"] == ["config", "metadata", "records", "artifacts", "recovery"]
