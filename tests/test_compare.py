"""What operators compare: the live workspace against a backup (check --against) and two backups (backup diff),
file by file - what `check` alone cannot see, such as one changed digit inside a valid record line."""

import json
from pathlib import Path

from helpers import FIXTURE_BACKUP_REF

SEGMENT = "records/segments/segment-000001.jsonl"


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def _run(cli, fixture_dir, *args):
    return cli("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "bk", *args)


def _backup(cli, fixture_dir, label):
    result = _run(cli, fixture_dir, "backup", "create", "--label", label, "--json")
    assert result.returncode == 0, result
    return result.json["backup_ref"]


def _change_one_digit(path):
    """A different value, same size, every line still valid JSON: invisible to `check`."""
    lines = path.read_bytes().split(b"\n")
    record = json.loads(lines[3])
    text = lines[3].decode()
    value = json.dumps(record["record"]["payload"]["value"])
    changed = value[:-1] + ("1" if value[-1] != "1" else "2")
    lines[3] = text.replace(value, changed, 1).encode()
    path.write_bytes(b"\n".join(lines))


def test_check_against_sees_what_check_cannot(cli, fixture_dir):
    ws = _ws(fixture_dir)
    ref = _backup(cli, fixture_dir, "before")
    _change_one_digit(ws / SEGMENT)
    (ws / "artifacts" / "objects" / "checkpoint" / "new.bin").write_bytes(b"new")
    removed = sorted((ws / "artifacts" / "objects" / "report").rglob("*.*"))[0]
    removed.unlink()
    assert _run(cli, fixture_dir, "check", "--plane", "records").returncode == 0  # every line is still valid
    result = _run(cli, fixture_dir, "check", "--against", ref, "--json")
    assert result.returncode == 1, result
    payload = result.json
    assert [item["path"] for item in payload["changed"]] == ["workspace/" + SEGMENT]
    assert payload["changed"][0]["size_before"] == payload["changed"][0]["size_after"]
    assert payload["changed"][0]["sha256_before"] != payload["changed"][0]["sha256_after"]
    assert [item["path"] for item in payload["removed"]] == ["workspace/" + removed.relative_to(ws).as_posix()]
    assert [item["path"] for item in payload["added"]] == ["workspace/artifacts/objects/checkpoint/new.bin"]
    assert payload["unchanged_count"] > 10 and payload["exit_code"] == 1
    text = _run(cli, fixture_dir, "check", "--against", ref)
    assert "1 changed, 1 removed, 1 added" in text.stdout and "Next: " in text.stdout


def test_check_against_an_untouched_workspace_is_identical(cli, fixture_dir):
    ref = _backup(cli, fixture_dir, "same")
    result = _run(cli, fixture_dir, "check", "--against", ref, "--json")
    assert result.returncode == 0, result
    assert result.json["changed_count"] == result.json["added_count"] == result.json["removed_count"] == 0


def test_backup_diff_between_two_backups_and_against_the_live_workspace(cli, fixture_dir):
    ws = _ws(fixture_dir)
    first = _backup(cli, fixture_dir, "first")
    with open(str(ws / "cache" / "outbox" / "failed_deliveries.jsonl"), "a") as handle:
        handle.write('{"replay_ref": "r-new", "family": "RECORD", "payload": {}}\n')
    second = _backup(cli, fixture_dir, "second")
    diff = _run(cli, fixture_dir, "backup", "diff", first, second, "--json")
    assert diff.returncode == 1, diff
    assert [item["path"] for item in diff.json["changed"]] == ["workspace/cache/outbox/failed_deliveries.jsonl"]
    assert diff.json["changed"][0]["size_after"] > diff.json["changed"][0]["size_before"]
    same = _run(cli, fixture_dir, "backup", "diff", second, "--json")  # against the live workspace
    assert same.returncode == 0 and same.json["right"] == str(ws), same


def test_a_backup_without_checksums_is_hashed_to_compare(cli, fixture_dir):
    ours = _backup(cli, fixture_dir, "ours")
    theirs = fixture_dir / "backups" / FIXTURE_BACKUP_REF
    result = _run(cli, fixture_dir, "backup", "diff", str(theirs), ours, "--json")
    assert result.returncode == 1, result
    changed = {item["path"] for item in result.json["changed"]}
    assert changed == {"workspace/config/resolved.config.json"}
    assert {item["path"] for item in result.json["removed"]} == {"workspace/recovery/outbox/failed_deliveries.jsonl"}
    # the outbox sits where Contexta's backup keeps its cache; the export event came after contexta's backup
    assert "workspace/cache/outbox/failed_deliveries.jsonl" in {item["path"] for item in result.json["added"]}
    assert Path(theirs / "manifest.json").is_file()
