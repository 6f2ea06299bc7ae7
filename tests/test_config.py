"""Configuration resolves as Contexta's does: defaults -> file -> CONTEXTA_* -> flags."""

import json
import sys
from pathlib import Path

import pytest

import contexta_ops as ops


def test_defaults_derive_from_the_workspace_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ops.load_config(environ={})
    root = (tmp_path / ".contexta").resolve()
    assert config.workspace.root_path == root
    assert config.metadata.database_path == root / "metadata" / "ledger.db"
    assert config.records.root_path == root / "records"
    assert config.artifacts.root_path == root / "artifacts"
    assert config.recovery.outbox_root == root / "cache" / "outbox"
    assert config.recovery.backup_root == root / "exports" / "backups"
    assert config.recovery.restore_staging_root == root / "cache" / "restore"
    assert config.recovery.create_backup_before_restore is True


def test_code_built_config_matches_the_guides_programs(tmp_path):
    config = ops.UnifiedConfig(project_name="recovery-proj",
                               workspace=ops.WorkspaceConfig(root_path=tmp_path / ".contexta"),
                               recovery=ops.RecoveryConfig(backup_root=tmp_path / "backups",
                                                           create_backup_before_restore=False))
    assert config.workspace.exports_path == tmp_path / ".contexta" / "exports"
    assert config.recovery.backup_root == tmp_path / "backups"
    assert config.recovery.restore_staging_root == tmp_path / ".contexta" / "cache" / "restore"
    assert json.loads(json.dumps(config.to_dict()))["workspace"]["root_path"] == str(tmp_path / ".contexta")


def test_precedence_file_then_environment_then_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config_file = tmp_path / "contexta.json"
    config_file.write_text(json.dumps({
        "profile": "local",
        "workspace": {"root_path": "from-file"},
        "recovery": {"backup_root": "file-backups", "restore_staging_root": "file-staging",
                     "create_backup_before_restore": False},
        "surfaces": {"cli": {"color": False}},
    }))
    environ = {"CONTEXTA_RECOVERY_BACKUP_ROOT": str(tmp_path / "env-backups"),
               "CONTEXTA_RECOVERY_CREATE_BACKUP_BEFORE_RESTORE": "yes",
               "CONTEXTA_SOMETHING_UNRELATED": "x", "CONTEXTA_WORKSPACE_CACHE_PATH": ""}
    config, sources, notes = ops._load_config_with_sources(
        config_file, environ=environ, flags={"staging_root": tmp_path / "flag-staging"})
    assert config.workspace.root_path == tmp_path / "from-file"
    assert config.recovery.backup_root == tmp_path / "env-backups"
    assert config.recovery.restore_staging_root == tmp_path / "flag-staging"
    assert config.recovery.create_backup_before_restore is True
    assert config.workspace.cache_path == tmp_path / "from-file" / "cache"  # empty value ignored
    assert sources["workspace.root_path"] == "config file %s" % config_file
    assert sources["recovery.backup_root"] == "environment CONTEXTA_RECOVERY_BACKUP_ROOT"
    assert sources["recovery.restore_staging_root"] == "flag --staging-root"
    assert sources["recovery.outbox_root"] == "default (follows workspace.cache_path)"
    assert "ignored_environment:CONTEXTA_SOMETHING_UNRELATED" in notes


def test_relative_paths_resolve_against_cwd_not_the_config_file(tmp_path, monkeypatch):
    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    config_file = elsewhere / "c.json"
    config_file.write_text(json.dumps({"workspace": {"root_path": "ws"}}))
    monkeypatch.chdir(tmp_path)
    assert ops.load_config(config_file, environ={}).workspace.root_path == tmp_path / "ws"


def test_null_in_environment_clears_back_to_derived_default(tmp_path):
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"workspace": {"root_path": str(tmp_path / "ws")},
                                       "recovery": {"outbox_root": str(tmp_path / "elsewhere")}}))
    config = ops.load_config(config_file, environ={"CONTEXTA_RECOVERY_OUTBOX_ROOT": "null"})
    assert config.recovery.outbox_root == tmp_path / "ws" / "cache" / "outbox"


def test_test_profile_changes_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ops.load_config(environ={"CONTEXTA_PROFILE": "test"})
    assert config.workspace.root_path == tmp_path / ".contexta-test"
    assert config.recovery.create_backup_before_restore is False


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid"),
    ("[1, 2]", "table/object"),
    ('{"workspace": {"root_path": 5}}', "must be a string"),
    ('{"workspace": {"no_such_key": "x"}}', "unknown setting workspace.no_such_key"),
    ('{"mystery": {}}', "unknown setting mystery"),
    ('{"recovery": {"create_backup_before_restore": "maybe"}}', "must be a bool"),
])
def test_bad_config_files_are_clear_errors(tmp_path, content, fragment):
    config_file = tmp_path / "c.json"
    config_file.write_text(content)
    with pytest.raises(ops.ConfigError) as caught:
        ops.load_config(config_file, environ={})
    assert fragment in str(caught.value)
    assert caught.value.exit_code == ops.EXIT_CANNOT_RUN


def test_bad_environment_value_is_a_clear_error(tmp_path):
    with pytest.raises(ops.ConfigError) as caught:
        ops.load_config(environ={"CONTEXTA_RECOVERY_CREATE_BACKUP_BEFORE_RESTORE": "perhaps"})
    assert "CONTEXTA_RECOVERY_CREATE_BACKUP_BEFORE_RESTORE" in str(caught.value)


def test_config_suffix_must_be_json_or_toml(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("{}")
    with pytest.raises(ops.ConfigError, match=r"\.json or \.toml"):
        ops.load_config(config_file, environ={})


@pytest.mark.skipif(sys.version_info < (3, 11), reason="TOML config needs tomllib (Python 3.11+)")
def test_toml_config_when_tomllib_exists(tmp_path):
    config_file = tmp_path / "c.toml"
    config_file.write_text('[workspace]\nroot_path = "%s"\n[recovery]\nbackup_root = "%s"\n'
                           % (tmp_path / "ws", tmp_path / "bk"))
    config = ops.load_config(config_file, environ={})
    assert config.workspace.root_path == tmp_path / "ws"
    assert config.recovery.backup_root == tmp_path / "bk"


@pytest.mark.skipif(sys.version_info >= (3, 11), reason="only older Pythons lack tomllib")
def test_toml_config_without_tomllib_says_use_json(tmp_path):
    config_file = tmp_path / "c.toml"
    config_file.write_text('[workspace]\nroot_path = "x"\n')
    with pytest.raises(ops.ConfigError, match="use JSON"):
        ops.load_config(config_file, environ={})


def test_cli_global_flags_before_or_after_the_command(cli, fixture_dir):
    ws = fixture_dir / "workspace" / ".contexta"
    before = cli("--json", "--workspace", ws, "--backup-root", fixture_dir / "b1", "backup", "plan")
    after = cli("backup", "plan", "--workspace", ws, "--backup-root", fixture_dir / "b1", "--json")
    assert before.returncode == after.returncode == 0, (before, after)
    assert before.json["workspace_root"] == after.json["workspace_root"] == str(ws)
    assert before.json["backup_root"] == after.json["backup_root"] == str(fixture_dir / "b1")


def test_cli_ignores_unrelated_contexta_variables(cli, fixture_dir):
    ws = fixture_dir / "workspace" / ".contexta"
    result = cli("--workspace", ws, "backup", "plan", "--json", env={"CONTEXTA_FOO_BAR": "1"})
    assert result.returncode == 0, result


def test_cli_config_file_error_is_one_line_exit_3(cli, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = cli("--config", bad, "backup", "list", "--json")
    assert result.returncode == 3
    assert result.json["status"] == "ERROR"
    assert result.json["error"]["code"] == "config_invalid"
    assert len(result.stderr.strip().splitlines()) == 1


def test_every_public_name_exists():
    assert [name for name in ops.__all__ if not hasattr(ops, name)] == []
    assert len(set(ops.__all__)) == len(ops.__all__)
