"""Partial restore: --only SECTION and --path PATTERN replace what they name, with the same plan, safety backup,
atomic switch-over and check as a whole restore; everything else stays byte for byte."""

import json
import shutil

import pytest

from helpers import snapshot


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def _run(cli, fixture_dir, *args, env=None):
    return cli("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "bk", *args, env=env)


def _backup(cli, fixture_dir):
    result = _run(cli, fixture_dir, "backup", "create", "--json")
    assert result.returncode == 0, result
    return result.json["backup_ref"]


def _part(tree, prefix):
    return {path: entry for path, entry in tree.items() if path == prefix or path.startswith(prefix + "/")}


def _damage(ws):
    body = sorted((ws / "artifacts" / "objects" / "checkpoint").rglob("*.bin"))[0]
    body.write_bytes(b"rotted")
    with open(str(ws / "records" / "segments" / "segment-000001.jsonl"), "ab") as handle:
        handle.write(b'{"appended_at":"2026-01-01T00:00:00Z","record":{},"sequence":51}\n')
    (ws / "cache" / "outbox" / "failed_deliveries.jsonl").write_text("")
    return body


@pytest.mark.parametrize("only, restored, untouched", [
    (["artifacts"], ["artifacts"], ["records", "cache/outbox", "metadata"]),
    (["records,outbox"], ["records", "cache/outbox"], ["artifacts", "metadata"]),
    (["records", "--only", "outbox"], ["records", "cache/outbox"], ["artifacts", "metadata"]),
])
def test_only_restores_the_named_parts_and_nothing_else(cli, fixture_dir, only, restored, untouched):
    ws = _ws(fixture_dir)
    original = snapshot(ws)
    ref = _backup(cli, fixture_dir)
    _damage(ws)
    damaged = snapshot(ws)
    plan = _run(cli, fixture_dir, "restore", "plan", ref, "--only", *only, "--json")
    assert plan.returncode == 0, plan
    assert set(plan.json["replaced"]) == set(restored)
    result = _run(cli, fixture_dir, "restore", ref, "--only", *only, "--json")
    assert result.returncode in (0, 1), result
    assert result.json["applied"] is True and result.json["safety_backup_ref"]
    now = snapshot(ws)
    for part in restored:
        assert _part(now, part) == _part(original, part), part
    for part in untouched:
        assert _part(now, part) == _part(damaged, part), part
    assert now.get("exports/backups") == damaged.get("exports/backups")


def test_path_restores_only_the_matching_files(cli, fixture_dir):
    ws = _ws(fixture_dir)
    original = snapshot(ws)
    ref = _backup(cli, fixture_dir)
    body = _damage(ws)
    report = sorted((ws / "artifacts" / "objects" / "report").rglob("*"))[-1]
    report.write_bytes(b"also rotted, but not asked for")
    damaged = snapshot(ws)
    pattern = "artifacts/objects/checkpoint/*"
    plan = _run(cli, fixture_dir, "restore", "plan", ref, "--path", pattern, "--json")
    assert plan.returncode == 0, plan
    assert plan.json["paths"] == [pattern] and plan.json["lost"] == []
    result = _run(cli, fixture_dir, "restore", ref, "--path", pattern, "--json")
    assert result.returncode == 1, result  # applied; its check still sees what nobody restored
    assert result.json["applied"] is True
    assert "problems_left_alone" in [warning["code"] for warning in result.json["warnings"]]
    assert "artifact_size_mismatch" in [problem["code"] for problem in result.json["problems"]]
    assert not [problem for problem in result.json["problems"] if body.name in problem["path"]]
    now = snapshot(ws)
    changed = {path for path in set(now) | set(damaged) if now.get(path) != damaged.get(path)}
    assert changed == {body.relative_to(ws).as_posix()}
    assert now[body.relative_to(ws).as_posix()] == original[body.relative_to(ws).as_posix()]


def test_a_partial_restore_that_would_break_the_workspace_is_refused(cli, fixture_dir, tmp_path):
    """Bodies alone, without the bindings made since: the future workspace is checked before any switch."""
    ws = _ws(fixture_dir)
    ref = _backup(cli, fixture_dir)
    new_body = tmp_path / "weights.bin"
    new_body.write_bytes(b"fresh weights" * 100)
    put = _run(cli, fixture_dir, "artifact", "put", new_body, "--ref", "artifact:fixture-proj.tuned.fresh",
               "--kind", "checkpoint")
    assert put.returncode == 0, put
    before = snapshot(ws)
    result = _run(cli, fixture_dir, "restore", ref, "--path", "artifacts/objects/*", "--json")
    assert result.returncode == 1, result
    assert result.json["applied"] is False
    assert "artifact_missing" in [problem["code"] for problem in result.json["problems"]]
    assert snapshot(ws) == before
    listing = _run(cli, fixture_dir, "backup", "list", "--json").json["backups"]
    assert [entry["kind"] for entry in listing] == ["manual"]  # refused before the safety backup


def test_only_with_a_relocated_store_restores_it_where_it_is_configured(cli, fixture_dir, tmp_path):
    ws = _ws(fixture_dir)
    arts = tmp_path / "arts"
    shutil.move(str(ws / "artifacts"), str(arts))
    env = {"CONTEXTA_ARTIFACTS_ROOT_PATH": str(arts)}
    original = snapshot(arts)
    ref = _run(cli, fixture_dir, "backup", "create", "--json", env=env).json["backup_ref"]
    shutil.rmtree(str(arts / "objects"))
    (ws / "cache" / "outbox" / "failed_deliveries.jsonl").write_text("")
    result = _run(cli, fixture_dir, "restore", ref, "--only", "artifacts", "--json", env=env)
    assert result.returncode == 0, result
    assert snapshot(arts) == original
    assert (ws / "cache" / "outbox" / "failed_deliveries.jsonl").read_text() == ""
    assert not (ws / "artifacts").exists()


def test_unknown_parts_are_a_usage_error(cli, fixture_dir):
    ref = _backup(cli, fixture_dir)
    result = _run(cli, fixture_dir, "restore", ref, "--only", "everything", "--json")
    assert result.returncode == 2 and "metadata, records, artifacts, outbox, capture" in result.json["error"]["message"]
