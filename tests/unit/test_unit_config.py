"""Pure helpers, called directly: setting values and the order configuration sources win in.

Every load_config call passes its own ``environ`` dict, so the test process's environment plays no
part.  Expected values follow the formats reference (shared contexta-formats.md, section 2).
"""

import json

import pytest

import contexta_ops as ops

ENV = "environment CONTEXTA_X"
FILE = "config file /etc/contexta.json"


@pytest.mark.parametrize("text, value", [
    ("true", True), (" Yes ", True), ("ON", True), ("1", True),
    ("false", False), ("No", False), ("off", False), ("0", False),
])
def test_environment_booleans(text, value):
    assert ops._coerce_setting("recovery.create_backup_before_restore", "bool", text, ENV) is value


def test_environment_ints_and_strings_are_converted_and_stripped():
    assert ops._coerce_setting("records.max_segment_bytes", "int", " 4096 ", ENV) == 4096
    assert ops._coerce_setting("recovery.backup_root", "path", " /srv/backups ", ENV) == "/srv/backups"
    assert ops._coerce_setting("records.durability_mode", "str", "fsync", ENV) == "fsync"


def test_file_values_keep_their_json_type():
    assert ops._coerce_setting("recovery.create_backup_before_restore", "bool", False, FILE) is False
    assert ops._coerce_setting("records.max_segment_bytes", "int", 7, FILE) == 7
    assert ops._coerce_setting("recovery.backup_root", "path", "/srv/b", FILE) == "/srv/b"
    assert ops._coerce_setting("recovery.backup_root", "path", None, FILE) is None


@pytest.mark.parametrize("kind, value, origin, fragment", [
    ("bool", "perhaps", ENV, "environment CONTEXTA_X: a.b='perhaps' is not a valid bool"),
    ("int", "4k", ENV, "environment CONTEXTA_X: a.b='4k' is not a valid int"),
    ("bool", "true", FILE, "a.b must be a bool, not 'true'"),
    ("int", True, FILE, "int, not True"),
    ("int", "7", FILE, "int, not '7'"),
    ("path", 5, FILE, "a.b must be a string, not 5"),
    ("path", "  ", FILE, "a.b must be a string, not '  '"),
    ("str", "", FILE, "a.b must be a str, not ''"),
])
def test_bad_values_are_config_errors_naming_source_and_setting(kind, value, origin, fragment):
    with pytest.raises(ops.ConfigError) as caught:
        ops._coerce_setting("a.b", kind, value, origin)
    assert fragment in str(caught.value)
    assert str(caught.value).startswith(origin + ": a.b")


def test_defaults_follow_the_workspace_and_ignore_the_process_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTEXTA_RECOVERY_BACKUP_ROOT", str(tmp_path / "from-process-env"))
    config = ops.load_config(environ={}, workspace=tmp_path / "ws")
    assert config.recovery.backup_root == tmp_path / "ws" / "exports" / "backups"
    assert config.recovery.outbox_root == tmp_path / "ws" / "cache" / "outbox"
    assert config.metadata.database_path == tmp_path / "ws" / "metadata" / "ledger.db"
    assert config.recovery.create_backup_before_restore is True


def test_each_source_beats_the_one_before(tmp_path):
    config_file = tmp_path / "contexta.json"
    config_file.write_text(json.dumps({"workspace": {"root_path": str(tmp_path / "file-ws")},
                                       "recovery": {"backup_root": str(tmp_path / "file-bk"),
                                                    "outbox_root": str(tmp_path / "file-outbox"),
                                                    "create_backup_before_restore": False}}))
    file_only = ops.load_config(config_file, environ={})
    assert (file_only.workspace.root_path, file_only.recovery.backup_root, file_only.recovery.outbox_root) == \
        (tmp_path / "file-ws", tmp_path / "file-bk", tmp_path / "file-outbox")
    assert file_only.recovery.create_backup_before_restore is False

    environ = {"CONTEXTA_WORKSPACE_ROOT_PATH": str(tmp_path / "env-ws"),
               "CONTEXTA_RECOVERY_BACKUP_ROOT": str(tmp_path / "env-bk"),
               "CONTEXTA_RECOVERY_CREATE_BACKUP_BEFORE_RESTORE": "on"}
    with_env = ops.load_config(config_file, environ=environ)
    assert (with_env.workspace.root_path, with_env.recovery.backup_root, with_env.recovery.outbox_root) == \
        (tmp_path / "env-ws", tmp_path / "env-bk", tmp_path / "file-outbox")
    assert with_env.recovery.create_backup_before_restore is True

    with_flags = ops.load_config(config_file, environ=environ, workspace=tmp_path / "flag-ws",
                                 outbox_root=tmp_path / "flag-outbox")
    assert (with_flags.workspace.root_path, with_flags.recovery.backup_root, with_flags.recovery.outbox_root) == \
        (tmp_path / "flag-ws", tmp_path / "env-bk", tmp_path / "flag-outbox")


def test_empty_environment_values_are_ignored_and_null_clears(tmp_path):
    config_file = tmp_path / "contexta.json"
    config_file.write_text(json.dumps({"recovery": {"backup_root": str(tmp_path / "file-bk"),
                                                    "outbox_root": str(tmp_path / "file-outbox")}}))
    config = ops.load_config(config_file, workspace=tmp_path / "ws", environ={
        "CONTEXTA_RECOVERY_BACKUP_ROOT": "", "CONTEXTA_RECOVERY_OUTBOX_ROOT": "None"})
    assert config.recovery.backup_root == tmp_path / "file-bk"
    assert config.recovery.outbox_root == tmp_path / "ws" / "cache" / "outbox"


def test_unknown_contexta_variables_are_ignored_and_the_test_profile_applies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ops.load_config(environ={"CONTEXTA_NO_SUCH_SETTING": "1", "CONTEXTA_PROFILE": "test"})
    assert config.workspace.root_path == tmp_path / ".contexta-test"
    assert config.recovery.create_backup_before_restore is False
    with pytest.raises(ops.ConfigError, match="unsupported profile 'staging'"):
        ops.load_config(environ={"CONTEXTA_PROFILE": "staging"})
