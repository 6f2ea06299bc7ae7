"""Exactly-once across a restore: the sink index recognizes entries the sink already holds (issue 11).

The sink files (exports/replayed/<family>.jsonl) live outside backups by default, so a restore brings the
outbox back with entries the sink already has.  The index beside the sink files remembers (replay_ref,
payload sha256) of every line; it may lag behind the sink but never claims a line the sink does not hold.
"""

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pytest

import contexta_ops as ops
from helpers import snapshot


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def _outbox(fixture_dir):
    return _ws(fixture_dir) / "cache" / "outbox" / ops.OUTBOX_FILE


def _sink(fixture_dir, family="record"):
    return _ws(fixture_dir) / "exports" / "replayed" / ("%s.jsonl" % family)


def _index(fixture_dir):
    return _ws(fixture_dir) / "exports" / "replayed" / ops.SINK_INDEX_FILE


def _sink_refs(fixture_dir, family="record"):
    path = _sink(fixture_dir, family)
    return [json.loads(line)["replay_ref"] for line in path.read_text().splitlines()] if path.exists() else []


def _run(cli, fixture_dir, *args):
    return cli("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "bk", *args)


def _entry(ref, payload, family="RECORD"):
    return (json.dumps({"replay_ref": ref, "family": family, "sink_name": "local-jsonl-replay",
                        "payload": payload}) + "\n").encode()


def test_replay_restore_replay_delivers_each_entry_once(cli, fixture_dir, expected):
    backup = _run(cli, fixture_dir, "backup", "create", "--label", "before-replay", "--json")
    assert backup.returncode == 0, backup
    first = _run(cli, fixture_dir, "replay", "--json")
    assert first.returncode == 0 and first.json["already_delivered_count"] == 0, first
    restored = _run(cli, fixture_dir, "restore", backup.json["backup_ref"], "--json")
    assert restored.returncode == 0, restored
    assert len(_outbox(fixture_dir).read_text().splitlines()) == expected["outbox_entries"]  # the outbox came back
    again = _run(cli, fixture_dir, "replay", "--json")
    assert again.returncode == 0, again
    payload = again.json
    assert payload["status"] == "SUCCESS"
    assert (payload["acknowledged_count"], payload["already_delivered_count"], payload["delivered_count"],
            payload["pending_count"]) == (5, 5, 0, 0)
    assert all(entry["status"] == "SUCCESS" and "already in the sink" in entry["detail"]
               for entry in payload["entries"])
    refs = _sink_refs(fixture_dir)
    assert len(refs) == 5 and len(set(refs)) == 5  # not one of them twice
    assert _outbox(fixture_dir).read_bytes() == b""


def test_same_ref_with_another_payload_is_delivered(cli, fixture_dir):
    outbox = _outbox(fixture_dir)
    outbox.write_bytes(_entry("r-1", {"v": 1}) + _entry("r-2", {"v": 2}))
    assert _run(cli, fixture_dir, "replay").returncode == 0
    outbox.write_bytes(_entry("r-1", {"v": 1}) + _entry("r-2", {"v": "changed"}) + _entry("r-3", {"v": 3}))
    result = _run(cli, fixture_dir, "replay", "--json")
    assert result.returncode == 0, result
    assert (result.json["already_delivered_count"], result.json["delivered_count"]) == (1, 2)
    assert _sink_refs(fixture_dir) == ["r-1", "r-2", "r-2", "r-3"]


def test_keys_match_whatever_the_payloads_key_order_and_spacing(cli, fixture_dir):
    outbox = _outbox(fixture_dir)
    outbox.write_bytes(b'{"replay_ref": "r-1", "family": "RECORD", "payload": {"a": 1, "b": [1.5, "x"]}}\n')
    assert _run(cli, fixture_dir, "replay").returncode == 0
    outbox.write_bytes(b'{"payload":{"b":[1.5,"x"],"a":1},"family":"RECORD","replay_ref":"r-1"}\n')
    assert _run(cli, fixture_dir, "replay", "--json").json["already_delivered_count"] == 1


def test_the_index_is_rebuilt_when_missing_or_damaged(cli, fixture_dir):
    assert _run(cli, fixture_dir, "replay").returncode == 0
    original = _outbox(fixture_dir).with_name("original")
    for damage in ("delete", "garbage"):
        if damage == "delete":
            _index(fixture_dir).unlink()
        else:
            _index(fixture_dir).write_bytes(b"this is not a database" * 100)
        _outbox(fixture_dir).write_bytes(_entry("replay:record.1717243380000.3", _payload_of_fixture(fixture_dir, 2)))
        result = _run(cli, fixture_dir, "replay", "--json")
        assert result.returncode == 0, (damage, result)
        assert result.json["already_delivered_count"] == 1, damage
    assert len(_sink_refs(fixture_dir)) == 5
    assert not original.exists()


def _payload_of_fixture(fixture_dir, index):
    return json.loads(_sink(fixture_dir).read_text().splitlines()[index])["payload"]


def test_a_replaced_or_shrunk_sink_file_is_indexed_afresh(cli, fixture_dir):
    outbox = _outbox(fixture_dir)
    outbox.write_bytes(_entry("r-1", {"v": 1}) + _entry("r-2", {"v": 2}))
    assert _run(cli, fixture_dir, "replay").returncode == 0
    sink = _sink(fixture_dir)
    lines = sink.read_bytes().splitlines(keepends=True)
    sink.unlink()
    sink.write_bytes(lines[1])  # a new file holding only r-2
    outbox.write_bytes(_entry("r-1", {"v": 1}) + _entry("r-2", {"v": 2}))
    result = _run(cli, fixture_dir, "replay", "--json")
    assert (result.json["already_delivered_count"], result.json["delivered_count"]) == (1, 1), result
    assert _sink_refs(fixture_dir) == ["r-2", "r-1"]
    with open(str(sink), "r+b") as handle:  # shrunk in place: the same inode, less than was indexed
        handle.truncate(len(lines[1]))
    outbox.write_bytes(_entry("r-1", {"v": 1}))
    result = _run(cli, fixture_dir, "replay", "--json")
    assert (result.json["already_delivered_count"], result.json["delivered_count"]) == (0, 1), result
    assert _sink_refs(fixture_dir) == ["r-2", "r-1"]


def test_lines_other_writers_append_to_the_sink_are_caught_up(cli, fixture_dir):
    outbox = _outbox(fixture_dir)
    outbox.write_bytes(_entry("r-1", {"v": 1}))
    assert _run(cli, fixture_dir, "replay").returncode == 0
    with open(str(_sink(fixture_dir)), "ab") as handle:  # appended behind the index's back
        handle.write(ops._sink_line("RECORD", {"v": 2}, "dict", None, "someone-else", "r-2"))
    outbox.write_bytes(_entry("r-2", {"v": 2}) + _entry("r-1", {"v": 1}))
    result = _run(cli, fixture_dir, "replay", "--json")
    assert result.json["already_delivered_count"] == 2, result


def test_a_torn_foreign_tail_is_ended_before_our_line(cli, fixture_dir):
    sink = _sink(fixture_dir)
    sink.parent.mkdir(parents=True)
    sink.write_bytes(b'{"replay_ref": "torn-by-some')
    _outbox(fixture_dir).write_bytes(_entry("r-1", {"v": 1}))
    assert _run(cli, fixture_dir, "replay").returncode == 0
    assert sink.read_bytes().splitlines()[0] == b'{"replay_ref": "torn-by-some'
    assert json.loads(sink.read_bytes().splitlines()[1])["replay_ref"] == "r-1"


def test_duplicates_inside_one_outbox_are_delivered_once(cli, fixture_dir):
    _outbox(fixture_dir).write_bytes(_entry("r-1", {"v": 1}) * 3 + _entry("r-2", {"v": 2}))
    result = _run(cli, fixture_dir, "replay", "--json")
    assert (result.json["delivered_count"], result.json["already_delivered_count"]) == (2, 2), result
    assert _sink_refs(fixture_dir) == ["r-1", "r-2"]


def test_dry_run_counts_what_the_sink_already_has_and_writes_nothing(cli, fixture_dir):
    outbox = _outbox(fixture_dir)
    outbox.write_bytes(_entry("r-1", {"v": 1}))
    assert _run(cli, fixture_dir, "replay").returncode == 0
    outbox.write_bytes(_entry("r-1", {"v": 1}) + _entry("r-2", {"v": 2}) + _entry("r-2", {"v": 2}))
    _index(fixture_dir).unlink()  # the dry run must not create it either
    before = snapshot(fixture_dir)
    dry = _run(cli, fixture_dir, "replay", "--dry-run", "--json")
    assert snapshot(fixture_dir) == before
    real = _run(cli, fixture_dir, "replay", "--json")
    for key in ("acknowledged_count", "already_delivered_count", "delivered_count", "pending_count", "status"):
        assert dry.json[key] == real.json[key], key
    assert real.json["already_delivered_count"] == 2


# -- the read-only question restore plan asks --------------------------------------------------

def _config(fixture_dir):
    return ops.load_config(environ={}, workspace=_ws(fixture_dir))


def test_already_delivered_count_for_a_backups_outbox_changes_nothing(cli, fixture_dir):
    outbox_lines = _outbox(fixture_dir).read_bytes().splitlines(keepends=True)
    assert _run(cli, fixture_dir, "replay").returncode == 0
    extra = [_entry("never-delivered", {"v": 0}), b"not json\n"]
    for situation in ("fresh", "stale", "missing"):
        if situation == "stale":  # a line the index has not seen yet
            with open(str(_sink(fixture_dir)), "ab") as handle:
                handle.write(ops._sink_line("RECORD", {"v": 9}, "dict", None, "x", "late"))
            extra.append(_entry("late", {"v": 9}))
        if situation == "missing":
            _index(fixture_dir).unlink()
        before = snapshot(fixture_dir)
        count = ops.sink_entries_already_delivered(_config(fixture_dir), iter(outbox_lines + extra))
        assert count == (5 if situation == "fresh" else 6), situation
        assert snapshot(fixture_dir) == before, situation


def test_already_delivered_count_without_any_sink_is_zero(fixture_dir):
    lines = _outbox(fixture_dir).read_bytes().splitlines(keepends=True)
    assert ops.sink_entries_already_delivered(_config(fixture_dir), lines) == 0
    assert not (_ws(fixture_dir) / "exports" / "replayed").exists()


# -- crash safety of the index -------------------------------------------------------------------

def _index_keys(path, scratch):
    """What the index claims: its committed transactions, read from a copy (a kill may leave a WAL to recover)."""
    import shutil
    if scratch.exists():
        shutil.rmtree(str(scratch))
    scratch.mkdir()
    for suffix in ("", "-wal", "-journal"):
        if Path(str(path) + suffix).exists():
            shutil.copy(str(path) + suffix, str(scratch / ("index" + suffix)))
    connection = sqlite3.connect(str(scratch / "index"))
    try:
        return {(ref, bytes(digest)) for ref, digest in connection.execute(
            "SELECT replay_ref, payload_sha256 FROM delivered")}
    finally:
        connection.close()


def _sink_keys(fixture_dir):
    keys = set()
    for path in (_ws(fixture_dir) / "exports" / "replayed").glob("*.jsonl"):
        for line in path.read_bytes().splitlines():
            entry = json.loads(line)
            canonical = json.dumps(entry["payload"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            keys.add((entry["replay_ref"], hashlib.sha256(canonical.encode("utf-8")).digest()))
    return keys


@pytest.mark.slow
def test_the_index_never_claims_a_line_the_sink_lacks_at_any_kill(cli, fixture_dir, tmp_path):
    outbox = _outbox(fixture_dir)
    entries = b"".join(_entry("r-%05d" % i, {"i": i}, ("RECORD", "CONTEXT")[i % 2]) for i in range(9000))
    trace = tmp_path / "trace"
    rehearsal = tmp_path / "rehearsal"
    rehearsal.mkdir()
    (rehearsal / ops.OUTBOX_FILE).write_bytes(entries)
    (tmp_path / "rws").mkdir()
    cli("--workspace", tmp_path / "rws", "--outbox-root", rehearsal, "replay",
        env={"CONTEXTA_OPS_CRASH_TRACE": str(trace)})
    steps = trace.read_text().split()
    assert "replay:sink-index-committed" in steps
    for crash_at in range(1, len(steps) + 1):
        outbox.write_bytes(entries)
        for path in (_ws(fixture_dir) / "exports" / "replayed").glob("*"):
            path.unlink()
        killed = cli("--workspace", _ws(fixture_dir), "replay", env={"CONTEXTA_OPS_CRASH_AT": str(crash_at)})
        assert killed.returncode == -9, (crash_at, killed)
        if _index(fixture_dir).exists():
            claimed = _index_keys(_index(fixture_dir), tmp_path / "copy")
            assert claimed <= _sink_keys(fixture_dir), steps[crash_at - 1]
        again = _run(cli, fixture_dir, "replay", "--json")
        assert again.returncode == 0, again
        refs = _sink_refs(fixture_dir, "record") + _sink_refs(fixture_dir, "context")
        assert sorted(refs) == ["r-%05d" % i for i in range(9000)], steps[crash_at - 1]
        assert _index_keys(_index(fixture_dir), tmp_path / "copy") == _sink_keys(fixture_dir)
