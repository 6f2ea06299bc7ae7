"""`recover replay`: Contexta's read-only replay of stored records, checked against contexta 1.0.0's own (issue 14)."""

import json
import os
import shutil
import subprocess

import pytest

import contexta_ops as ops
from helpers import snapshot

CONTEXTA_CLI = "import sys\nfrom contexta.surfaces.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"

FILTERS = [
    [],
    ["--run", "run:fixture-proj.baseline"],
    ["--run", "run:fixture-proj.tuned", "--record-type", "metric"],
    ["--stage", "stage:fixture-proj.baseline.train"],
    ["--record-type", "event"],
    ["--record-type", "span"],
    ["--run", "run:fixture-proj.nothing-here"],
    ["--run", "fixture-proj.baseline"],
]


def _ws(root):
    return root / "workspace" / ".contexta"


def _segment(root):
    return _ws(root) / "records" / "segments" / "segment-000001.jsonl"


def _theirs(contexta_ref, workspace, *args):
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONTEXTA_")}
    completed = subprocess.run([contexta_ref, "-c", CONTEXTA_CLI, "--workspace", str(workspace)] + list(args),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=env,
                               timeout=300)
    return completed


def _copies(fixture_dir, tmp_path):
    """Contexta's CLI opens the workspace read-write; each side gets its own copy."""
    theirs = tmp_path / "theirs"
    shutil.copytree(str(fixture_dir), str(theirs), symlinks=True)
    return fixture_dir, theirs


def _compare(cli, ours_root, theirs_root, contexta_ref, args):
    mine = cli("--workspace", _ws(ours_root), "recover", "replay", *args, "--json")
    their = _theirs(contexta_ref, _ws(theirs_root), "--format", "json", "recover", "replay", *args)
    assert their.returncode == 0, their.stderr
    theirs = json.loads(their.stdout)
    ours = mine.json
    assert ours["record_count"] == theirs["record_count"], args
    assert ours["integrity_state"] == theirs["integrity_state"], args
    assert ours["mode"] == theirs["mode"], args
    assert len(ours["warnings"]) == len(theirs["warnings"]) and ours["warnings"] == theirs["warnings"], args
    assert [gap["code"] for gap in ours["known_gaps"]] == [gap["code"] for gap in theirs["known_gaps"]], args
    assert ours["known_gaps"] == theirs["known_gaps"], args
    assert [(r["sequence"], r["segment_id"], r["offset"], r["appended_at"]) for r in ours["records"]] == [
        (r["sequence"], r["segment_id"], r["offset"], r["appended_at"]) for r in theirs["records"]], args
    assert [r["record"]["envelope"]["record_ref"] for r in ours["records"]] == [
        "record:%s" % r["record"]["envelope"]["record_ref"]["value"] for r in theirs["records"]], args
    return mine


@pytest.mark.parametrize("mode", ["tolerant", "strict"])
def test_counts_and_integrity_match_contextas_for_each_filter(cli, fixture_dir, tmp_path, contexta_ref, mode):
    ours, theirs = _copies(fixture_dir, tmp_path)
    before = snapshot(ours)
    for args in FILTERS:
        result = _compare(cli, ours, theirs, contexta_ref, ["--mode", mode] + args)
        assert result.returncode == 0, result
        assert result.json["status"] == "SUCCESS"
    assert snapshot(ours) == before  # read-only


def test_text_output_is_contextas_five_lines(cli, fixture_dir, tmp_path, contexta_ref):
    ours, theirs = _copies(fixture_dir, tmp_path)
    for args in ([], ["--run", "run:fixture-proj.tuned", "--mode", "strict"]):
        mine = cli("--workspace", _ws(ours), "recover", "replay", *args)
        their = _theirs(contexta_ref, _ws(theirs), "recover", "replay", *args)
        assert mine.returncode == their.returncode == 0, (mine, their.stderr)
        assert mine.stdout == their.stdout
        assert [line.split(":")[0] for line in mine.stdout.splitlines()] == [
            "Replay mode", "Records", "Warnings", "Known gaps", "Integrity"]


def _corrupt(root):
    segment = _segment(root)
    lines = segment.read_bytes().splitlines(keepends=True)
    lines[9] = b'{"appended_at": "2026-11-26T03:48:11Z", "record": \n'  # not JSON
    lines[14] = b"\xff\xfe not utf-8\n"
    lines[20] = b'{"appended_at":"2026-11-26T03:48:11Z","record":{"envelope":{}},"sequence":21}\n'  # no record
    del lines[30]  # a sequence gap
    lines[-1] = lines[-1][:40]  # a torn last line
    segment.write_bytes(b"".join(lines))


def _gap_only(root):
    segment = _segment(root)
    lines = segment.read_bytes().splitlines(keepends=True)
    del lines[5]
    segment.write_bytes(b"".join(lines))


@pytest.mark.parametrize("damage,state", [(_corrupt, "CORRUPTED"), (_gap_only, "DEGRADED")],
                         ids=["corrupted", "gap"])
def test_a_damaged_segment_like_contexta_tolerant_and_strict(cli, fixture_dir, tmp_path, contexta_ref, damage,
                                                            state):
    damage(fixture_dir)
    ours, theirs = _copies(fixture_dir, tmp_path)
    for args in ([], ["--run", "run:fixture-proj.tuned"], ["--record-type", "metric"]):
        tolerant = _compare(cli, ours, theirs, contexta_ref, ["--mode", "tolerant"] + args)
        assert tolerant.returncode == 1 and tolerant.json["status"] == "DEGRADED", tolerant
        assert tolerant.json["integrity_state"] == state
    strict = cli("--workspace", _ws(ours), "recover", "replay", "--mode", "strict", "--json")
    their = _theirs(contexta_ref, _ws(theirs), "--format", "json", "recover", "replay", "--mode", "strict")
    assert their.returncode == 1 and "record_replay_unhealthy_store" in their.stderr
    assert strict.returncode == 1, strict
    assert strict.json["error"]["code"] == "record_replay_unhealthy_store"
    assert state in strict.json["error"]["message"]
    text = cli("--workspace", _ws(ours), "recover", "replay")
    their_text = _theirs(contexta_ref, _ws(theirs), "recover", "replay")
    assert text.stdout == their_text.stdout


def test_the_python_api_gives_contextas_result_fields(fixture_dir):
    records_root = _ws(fixture_dir) / "records"
    result = ops.replay_records(records_root, ops.ScanFilter(run_ref="run:fixture-proj.tuned"), mode="tolerant")
    payload = result.to_dict()
    assert list(payload)[:7] == ["status", "records", "record_count", "mode", "warnings", "known_gaps",
                                 "integrity_state"]
    assert payload["record_count"] == len(payload["records"]) == 25
    assert {record["record"]["envelope"]["run_ref"] for record in payload["records"]} == {"run:fixture-proj.tuned"}
    _corrupt(fixture_dir)
    with pytest.raises(ops.OpsError) as raised:
        ops.replay_records(records_root)  # strict, as Contexta's default
    assert raised.value.code == "record_replay_unhealthy_store" and raised.value.exit_code == 1


def test_a_missing_workspace_is_exit_3_and_a_missing_record_store_is_empty(cli, tmp_path):
    missing = cli("--workspace", tmp_path / "typo", "recover", "replay", "--json")
    assert missing.returncode == 3 and missing.json["error"]["code"] == "workspace_missing", missing
    (tmp_path / "ws").mkdir()
    empty = cli("--workspace", tmp_path / "ws", "recover", "replay", "--json")
    assert empty.returncode == 0 and empty.json["record_count"] == 0, empty
    assert os.listdir(str(tmp_path / "ws")) == []
