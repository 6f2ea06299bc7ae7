"""Verify-only reads a backup where it lies - directory, tar, tar.gz, zip - and writes nothing, finding what
copying it into staging first (--materialize) finds."""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FIXTURE_BACKUP_REF, flip_byte, reseal, snapshot

SEGMENT = "workspace/records/segments/segment-000001.jsonl"


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def _args(fixture_dir, *rest):
    return ("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "bk", "--staging-root",
            fixture_dir / "staging") + rest


def _sources(cli, fixture_dir, expected):
    """Every kind of backup of the fixture workspace: ours (directory, tar, tar.gz) and Contexta's (dir, zip)."""
    created = cli(*_args(fixture_dir, "backup", "create", "--json"))
    assert created.returncode == 0, created
    for name, extra in (("b.tar", ()), ("b.tar.gz", ("--gzip",))):
        assert cli(*_args(fixture_dir, "backup", "create", "--archive", fixture_dir / name, *extra)).returncode == 0
    return {"directory": Path(created.json["location"]), "tar": fixture_dir / "b.tar",
            "tar.gz": fixture_dir / "b.tar.gz", "contexta": fixture_dir / "backups" / FIXTURE_BACKUP_REF,
            "zip": fixture_dir / expected["cli_backup"]}


def _verdict(result):
    payload = result.json
    return (result.returncode, payload["status"], payload["plane_results"],
            [note for note in payload["verification_notes"]], sorted(json.dumps(p, sort_keys=True)
                                                                     for p in payload["problems"]),
            sorted(w["code"] for w in payload["warnings"]))


def _blocks_written(command):
    """(exit code, bytes the command and its children sent to storage), from the kernel's own accounting."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock
    completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return completed.returncode, (resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock - before) * 512


@pytest.mark.parametrize("kind", ["directory", "tar", "tar.gz", "contexta", "zip"])
def test_verify_only_reads_in_place_and_writes_nothing(cli, pyz, fixture_dir, expected, kind):
    source = _sources(cli, fixture_dir, expected)[kind]
    subprocess.run(["sync"])
    before = snapshot(fixture_dir)
    command = [sys.executable, str(pyz)] + [str(arg) for arg in _args(fixture_dir, "restore", source,
                                                                       "--verify-only", "--quiet")]
    returncode, written = _blocks_written(command)
    assert returncode == 0
    assert written < 256 << 10, written  # the backup history line, at most: nothing staged, nothing extracted
    after = snapshot(fixture_dir)
    after.pop("backups/.contexta-ops-history.jsonl", None)
    after.pop("bk/.contexta-ops-history.jsonl", None)
    assert after == before and not (fixture_dir / "staging").exists()


def _damage(fixture_dir, location, how):
    ws_segment = location / SEGMENT
    if how == "flipped-segment":
        flip_byte(ws_segment)
    elif how == "gap-and-torn-tail":
        lines = ws_segment.read_bytes().splitlines(keepends=True)
        ws_segment.write_bytes(b"".join(lines[:10] + lines[11:49]) + lines[49][:30])
        reseal(location)
    elif how == "orphan-and-missing-body":
        (location / "workspace/artifacts/objects/stray.bin").write_bytes(b"no binding")
        os.unlink(str(location / "workspace/artifacts/objects/checkpoint/0d/artifact__fixture-proj.tuned.model.bin"))
        reseal(location, add=["workspace/artifacts/objects/stray.bin"])
    elif how == "index-pointer":
        # the first index with such a pointer (in name order: a directory's own order differs between filesystems)
        index = next(path for path in sorted((location / "workspace/records/indexes").glob("*/*.jsonl"))
                     if b'"offset":3,' in path.read_bytes())
        index.write_bytes(index.read_bytes().replace(b'"offset":3,', b'"offset":4,', 1))
        reseal(location)
    elif how == "bad-binding":
        binding = next((location / "workspace/artifacts/bindings").glob("*.json"))
        binding.write_bytes(b"[1, 2]")
        reseal(location)


@pytest.mark.parametrize("how", ["none", "flipped-segment", "gap-and-torn-tail", "orphan-and-missing-body",
                                 "index-pointer", "capture-line", "bad-binding"])
def test_in_place_finds_what_materializing_finds(cli, fixture_dir, how):
    if how == "capture-line":  # the capture sink's only copy of what contexta's facade captured
        (_ws(fixture_dir) / "cache/capture/record.jsonl").write_bytes(b'{"family": "RECORD"}\n{"torn": ')
    created = cli(*_args(fixture_dir, "backup", "create", "--json"))
    location = Path(created.json["location"])
    _damage(fixture_dir, location, how)
    in_place = cli(*_args(fixture_dir, "restore", location, "--verify-only", "--json"))
    staged = cli(*_args(fixture_dir, "restore", location, "--verify-only", "--materialize", "--json"))
    assert _verdict(in_place) == _verdict(staged), (in_place, staged)
    assert (in_place.returncode == 0) == (how == "none"), in_place
    wanted = {"index-pointer": "index_pointer_invalid", "capture-line": "capture_line_invalid",
              "bad-binding": "binding_invalid", "orphan-and-missing-body": "artifact_orphan",
              "gap-and-torn-tail": "truncated_line", "flipped-segment": "checksum_mismatch"}.get(how)
    assert wanted is None or wanted in [p["code"] for p in in_place.json["problems"]], in_place
    assert "read_in_place" in in_place.json["notes"] and "materialized_in_staging" in staged.json["notes"]


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "contexta", "zip"])
def test_in_place_agrees_with_materializing_for_every_kind(cli, fixture_dir, expected, kind):
    source = _sources(cli, fixture_dir, expected)[kind]
    in_place = cli(*_args(fixture_dir, "restore", source, "--verify-only", "--json"))
    staged = cli(*_args(fixture_dir, "restore", source, "--verify-only", "--materialize", "--json"))
    assert in_place.returncode == 0 and _verdict(in_place) == _verdict(staged), (in_place, staged)


def _write_segments(segments, sizes, late, bad):
    """Segments of the given line counts, the sequences in ``late`` skipped, a non-JSON line after ``bad``."""
    sequence = 0
    padding = "x" * 400
    for number, count in enumerate(sizes, start=1):
        with open(str(segments / ("segment-%06d.jsonl" % number)), "wb") as handle:
            for line in range(count):
                sequence += 2 if sequence + 1 in late else 1
                handle.write(json.dumps({"appended_at": "2026-01-01T00:00:00Z", "record": {"pad": padding},
                                         "sequence": sequence}, separators=(",", ":")).encode() + b"\n")
                if sequence == bad:
                    handle.write(b"not json\n")
    return sequence


def test_segments_and_pieces_on_worker_processes_are_stitched_exactly(cli, fixture_dir):
    """Forty segments of ~460 KB (a worker each) and one of ~19 MB (checked in pieces on every worker), with a
    gap at a segment's start, one inside the big one and a bad line near a piece boundary: verify-only finds
    exactly what `check` finds reading them whole, named by member and line."""
    ws = _ws(fixture_dir)
    segments = ws / "records" / "segments"
    shutil.rmtree(str(segments))
    segments.mkdir()
    sizes = [1000] * 40 + [40000]
    last = _write_segments(segments, sizes, late={20001, 58000}, bad=58500)
    manifest = json.loads((ws / "records/manifest.json").read_text())
    manifest["last_committed_sequence"] = last
    (ws / "records/manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(str(ws / "records/indexes"))
    check = cli("--workspace", ws, "check", "--plane", "records", "--json")
    created = cli(*_args(fixture_dir, "backup", "create", "--json"))
    result = cli(*_args(fixture_dir, "restore", created.json["backup_ref"], "--verify-only", "--json"))
    assert result.returncode == 1
    found = [(p["code"], p["path"].rsplit("/", 1)[1], p["message"]) for p in result.json["problems"]]
    assert found == [("sequence_gap", "segment-000021.jsonl", "line 1: sequence 20002 follows 20000"),
                     ("sequence_gap", "segment-000041.jsonl", "line 17999: sequence 58001 follows 57999"),
                     ("invalid_json_line", "segment-000041.jsonl", "line 18499 is not JSON")]
    assert found == [(p["code"], p["path"].rsplit("/", 1)[1], p["message"]) for p in check.json["problems"]]
    records = result.json["plane_results"]["records"]
    assert (records["record_count"], records["segment_count"], records["highest_sequence"]) == (80000, 41, last)


def test_materialize_goes_only_with_verify_only(cli, fixture_dir):
    result = cli(*_args(fixture_dir, "restore", FIXTURE_BACKUP_REF, "--materialize", "--json"))
    assert result.returncode == 2 and result.json["error"]["code"] == "usage"
