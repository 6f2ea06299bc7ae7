"""The hostile-input corpus (tests/hostile/corpus, made by make_corpus.py): every file gets its documented
exit code and a one-line error, never a traceback, and nothing is modified.  Hostile workspaces (symlink
loops, names that are not UTF-8 or hold newlines) are made here, since a checkout cannot carry them."""

import json
import os
import shutil
import time

import pytest

from helpers import FIXTURE_BACKUP_REF, snapshot
from hostile_cases import ALL_CASES, CASES, CORPUS, FAST, GENERATED, by_kind as _by_kind, corpus_file


def test_the_corpus_is_large_and_complete():
    assert len(CASES) >= 40
    assert sorted(os.listdir(str(CORPUS))) == sorted(CASES)
    assert len(ALL_CASES) == len(CASES) + len(GENERATED)  # no generated case hides a checked-in one


def _one_line_error(result, code):
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    if code is not None:
        assert result.json["error"]["code"] == code


def test_the_fast_loop_keeps_cases_that_exist():
    """A renamed case must not drop out of the fast loop unnoticed."""
    for kind, names in FAST.items():
        assert names <= {name for name, case in ALL_CASES.items() if case["kind"] == kind}, kind


@pytest.mark.parametrize("name", _by_kind("manifest"))
def test_hostile_backup_manifests(cli, fixture_dir, tmp_path, name):
    """Every reader gives the same verdict: verify, verify-only, restore and its plan."""
    case = ALL_CASES[name]
    backup = fixture_dir / "backups" / FIXTURE_BACKUP_REF
    shutil.copy(str(corpus_file(name, tmp_path)), str(backup / "manifest.json"))
    for command in (("backup", "verify", FIXTURE_BACKUP_REF), ("restore", FIXTURE_BACKUP_REF, "--verify-only"),
                    ("restore", FIXTURE_BACKUP_REF), ("restore", "plan", FIXTURE_BACKUP_REF)):
        before = snapshot(fixture_dir)
        result = cli("--workspace", fixture_dir / "workspace/.contexta", "--backup-root", fixture_dir / "backups",
                     "--staging-root", fixture_dir / "staging", *command, "--json")
        assert result.returncode == case["exit"], (command, result)
        _one_line_error(result, case["code"])
        assert snapshot(fixture_dir) == before, command


@pytest.mark.parametrize("name", _by_kind("outbox"))
def test_hostile_outbox_lines_never_block_the_queue(cli, fixture_dir, name):
    outbox = fixture_dir / "workspace/.contexta/cache/outbox/failed_deliveries.jsonl"
    shutil.copy(str(CORPUS / name), str(outbox))
    old = time.time() - 60  # a torn last line that has been still this long is not a writer in flight
    os.utime(str(outbox), (old, old))
    result = cli("--workspace", fixture_dir / "workspace/.contexta", "replay", "--json")
    assert result.returncode == CASES[name]["exit"], result
    assert "Traceback" not in result.stderr
    payload = result.json
    assert payload["malformed_count"] >= 1 and payload["dead_lettered_count"] == payload["malformed_count"]
    assert payload["acknowledged_count"] == 1 and payload["pending_count"] == 0
    assert outbox.read_bytes() == b""
    dead = (outbox.parent / "dead_letter.jsonl").read_text().splitlines()
    assert all(json.loads(line)["malformed"] and json.loads(line)["reason"] for line in dead)


@pytest.mark.parametrize("name", _by_kind("config"))
def test_hostile_config_files(cli, fixture_dir, tmp_path, name):
    path = corpus_file(name, tmp_path)
    before = snapshot(fixture_dir)
    result = cli("--config", path, "status", "--json")
    assert result.returncode == 3, result
    _one_line_error(result, None)
    assert result.json["error"]["code"] in ("config_invalid", "unknown_config_field")
    assert snapshot(fixture_dir) == before


def test_a_symlink_loop_inside_the_workspace(cli, fixture_dir):
    ws = fixture_dir / "workspace/.contexta"
    os.symlink(str(ws / "records"), str(ws / "records" / "loop"))
    os.symlink("loop2", str(ws / "artifacts" / "loop2"))  # a link to itself
    backup = cli("--workspace", ws, "--backup-root", fixture_dir / "bk", "backup", "create", "--json")
    assert backup.returncode == 1 and backup.json["status"] == "DEGRADED"  # said, not followed
    assert sum(warning["code"] == "skipped_symlink" for warning in backup.json["warnings"]) == 2
    check = cli("--workspace", ws, "check", "--json")
    assert "Traceback" not in check.stderr
    assert [p["code"] for p in check.json["problems"]] == []  # outside objects/, links are not artifacts
    status = cli("--workspace", ws, "--backup-root", fixture_dir / "bk", "status", "--json")
    assert status.returncode == 0


@pytest.mark.parametrize("archive", [False, True], ids=["directory", "archive"])
def test_names_that_are_not_utf8_or_hold_newlines_survive_a_round_trip(cli, fixture_dir, archive):
    ws = fixture_dir / "workspace/.contexta"
    odd = [b"records/quarantine/not-utf8-\xff\xfe.jsonl", b"records/quarantine/new\nline.jsonl",
           "records/quarantine/ünïcödé.jsonl".encode()]
    for index, name in enumerate(odd):
        with open(os.fsencode(str(ws)) + b"/" + name, "wb") as handle:
            handle.write(b"line %d\n" % index)
    original = snapshot(ws)
    target = fixture_dir / "bk" / "b.tar" if archive else None
    args = ["--workspace", ws, "--backup-root", fixture_dir / "bk", "--staging-root", fixture_dir / "stage"]
    (fixture_dir / "bk").mkdir()
    created = cli(*args, "backup", "create", "--json", *(["--archive", target] if archive else []))
    assert created.returncode == 0, created
    ref = str(target) if archive else created.json["backup_ref"]
    assert cli(*args, "backup", "verify", ref).returncode == 0
    shutil.rmtree(str(ws / "records"))
    restored = cli(*args, "restore", ref, "--json")
    assert restored.returncode == 0, restored
    assert snapshot(ws) == original
