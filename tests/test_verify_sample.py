"""restore --verify-only --sample PERCENT: a spot check that reads every file a plane parses and only a share of
the rest, takes the others at their listed sha256, and says it was partial (issue 15)."""

import json
from pathlib import Path

import pytest

from helpers import flip_byte

BODY = "workspace/artifacts/objects/checkpoint/0d/artifact__fixture-proj.tuned.model.bin"
SEGMENT = "workspace/records/segments/segment-000001.jsonl"
TINY = "0.0001"  # one file in a million: the fixture's dozen bodies are all taken on the list's word


def _args(fixture_dir, *rest):
    return ("--workspace", fixture_dir / "workspace" / ".contexta", "--backup-root", fixture_dir / "bk") + rest


@pytest.fixture
def backup(cli, fixture_dir):
    created = cli(*_args(fixture_dir, "backup", "create", "--json"))
    assert created.returncode == 0, created
    return Path(created.json["location"])


def _sample(cli, fixture_dir, backup, percent, *extra):
    return cli(*_args(fixture_dir, "restore", backup, "--verify-only", "--sample", percent, "--json", *extra))


def test_a_full_sample_reads_everything_and_finds_a_flipped_body(cli, fixture_dir, backup):
    flip_byte(backup / BODY)
    result = _sample(cli, fixture_dir, backup, "100%")
    assert result.returncode == 1 and result.json["status"] == "FAILURE"
    assert any(problem["path"] == BODY for problem in result.json["problems"])
    assert result.json["details"]["trusted_files"] == 0
    assert "sample:100%" in result.json["notes"]


def test_a_small_sample_says_it_was_partial_and_is_not_a_clean_verification(cli, fixture_dir, backup):
    flip_byte(backup / BODY)  # not read at this sample: the spot check cannot see it, and must say so
    result = _sample(cli, fixture_dir, backup, TINY)
    assert result.returncode == 0, result.stderr
    details = result.json["details"]
    assert details["sampled_percent"] == pytest.approx(0.0001)
    assert 0 < details["trusted_files"] < details["verified_files"]
    assert [w["code"] for w in result.json["warnings"]].count("verify_partial") == 1
    assert "without --sample" in next(w["message"] for w in result.json["warnings"] if w["code"] == "verify_partial")
    history = fixture_dir / "bk" / ".contexta-ops-history.jsonl"
    events = [json.loads(line)["event"] for line in history.read_text().splitlines()] if history.exists() else []
    assert "verified_clean" not in events
    full = cli(*_args(fixture_dir, "restore", backup, "--verify-only", "--json"))
    assert full.returncode == 1 and any(problem["path"] == BODY for problem in full.json["problems"])


def test_plane_files_are_always_read_even_in_a_tiny_sample(cli, fixture_dir, backup):
    flip_byte(backup / SEGMENT)
    result = _sample(cli, fixture_dir, backup, TINY)
    assert result.returncode == 1 and result.json["status"] == "FAILURE"
    assert any(problem["path"] == SEGMENT for problem in result.json["problems"])


def test_an_unread_body_is_still_judged_against_its_binding_by_the_list(cli, fixture_dir, backup):
    body = backup / BODY
    body.write_bytes(body.read_bytes()[:-1])  # one byte short: the binding's size_bytes no longer holds
    result = _sample(cli, fixture_dir, backup, TINY)
    assert result.returncode == 1
    codes = {problem["code"] for problem in result.json["problems"]}
    assert "artifact_size_mismatch" in codes, result.json["problems"]


@pytest.mark.parametrize("extra, message", [
    (("--sample", "0"), "above 0"), (("--sample", "101"), "at most 100"), (("--sample", "ten"), "not a percentage"),
    (("--sample", "5", "--materialize"), "--sample goes with --verify-only"),
])
def test_bad_samples_are_usage_errors(cli, fixture_dir, backup, extra, message):
    before = sorted(path.name for path in (fixture_dir / "bk").iterdir())
    result = cli(*_args(fixture_dir, "restore", backup, "--verify-only", *extra))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert sorted(path.name for path in (fixture_dir / "bk").iterdir()) == before


def test_a_sample_is_refused_for_an_apply(cli, fixture_dir, backup, tmp_path):
    result = cli(*_args(fixture_dir, "restore", backup, "--target", tmp_path / "new", "--sample", "10"))
    assert result.returncode == 2 and "--sample goes with --verify-only" in result.stderr
    assert not (tmp_path / "new").exists()
