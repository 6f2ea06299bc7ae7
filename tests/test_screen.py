"""The operator's screen: one JSON shape for every command, the next step after every failure, help that
explains itself, suggestions for typos, a reader that stops early, lists that fit the terminal."""

import subprocess
import sys
from pathlib import Path

import pytest

import contexta_ops as ops
from helpers import flip_byte

REF = "artifact:fixture-proj.tuned.model"


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def _global(fixture_dir):
    return ("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "bk", "--staging-root",
            fixture_dir / "staging")


COMMANDS = [
    ["status"], ["check"], ["backup", "plan"], ["backup", "create"], ["backup", "list"], ["backup", "verify", "latest"],
    ["backup", "prune", "--keep-last", "1", "--dry-run"], ["restore", "--verify-only"], ["restore", "plan", "latest"],
    ["replay", "status"], ["replay", "--dry-run"], ["replay", "requeue"], ["artifact", "inspect"],
    ["artifact", "verify", REF], ["artifact", "verify", "--all"], ["artifact", "export", REF, "--export-root", "EXP"],
    ["self-check"], ["restore", "plan", "no-such-backup"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_json_object_says_status_exit_code_and_version(cli, fixture_dir, command):
    assert cli(*_global(fixture_dir), "backup", "create").returncode == 0
    words = [str(fixture_dir / "exported") if word == "EXP" else word for word in command]
    result = cli(*_global(fixture_dir), *words, "--json")
    payload = result.json
    assert payload["exit_code"] == result.returncode, (payload, result)
    assert payload["tool_version"] == ops.__version__
    assert payload["status"] in ("SUCCESS", "DEGRADED", "FAILURE", "ERROR")
    assert (payload["status"] == "SUCCESS") == (result.returncode == 0) or payload["status"] == "DEGRADED"


def test_every_failure_ends_with_the_next_step(cli, fixture_dir):
    good = cli(*_global(fixture_dir), "backup", "create", "--label", "good", "--json").json
    assert cli(*_global(fixture_dir), "restore", "--verify-only", good["backup_ref"]).returncode == 0
    bad = cli(*_global(fixture_dir), "backup", "create", "--label", "bad", "--json").json
    flip_byte(Path(bad["location"]) / "workspace/records/segments/segment-000001.jsonl")
    text = cli(*_global(fixture_dir), "restore", "--verify-only", bad["backup_ref"])
    assert text.returncode == 1
    last = text.stdout.strip().splitlines()[-1]
    assert last.startswith("Next: backup %s verified clean on" % good["backup_ref"]), text.stdout
    assert "restore plan %s" % good["backup_ref"] in last and "--backup-root" in last
    as_json = cli(*_global(fixture_dir), "backup", "verify", bad["backup_ref"], "--json")
    assert as_json.returncode == 1 and good["backup_ref"] in as_json.json["next_step"]
    (_ws(fixture_dir) / "records/segments/segment-000001.jsonl").write_text("broken\n")
    checked = cli(*_global(fixture_dir), "check")
    assert checked.returncode == 1 and checked.stdout.strip().splitlines()[-1].startswith("Next: ")


def test_a_reader_that_stops_early_is_not_an_error(pyz, fixture_dir):
    """`check | head -1` on a workspace with thousands of findings: the check's own exit code, no traceback."""
    objects = _ws(fixture_dir) / "artifacts" / "objects" / "strays"
    objects.mkdir()
    for index in range(4000):
        (objects / ("stray-%05d.bin" % index)).write_bytes(b"x")
    process = subprocess.Popen([sys.executable, str(pyz), "--workspace", str(_ws(fixture_dir)), "check"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 1
    assert first.startswith(b"Check of ")
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


@pytest.mark.parametrize("command, explains", [
    (["restore", "plan"], "BACKUP is one of"), (["restore", "apply"], "BACKUP is one of"),
    (["replay", "status"], "example:"), (["replay", "requeue"], "--ref"),
    (["artifact", "import"], "--conflict says"), (["artifact", "verify"], "REF is an artifact ref"),
    (["backup", "verify"], "a unique prefix of a ref"),
])
def test_each_action_has_its_own_help(pyz, command, explains):
    result = subprocess.run([sys.executable, str(pyz)] + command + ["--help"], stdout=subprocess.PIPE,
                            universal_newlines=True)
    assert result.returncode == 0
    assert "example:\n  contexta.pyz %s" % " ".join(command[:1]) in result.stdout
    assert explains in result.stdout
    assert "usage: contexta.pyz %s" % " ".join(command) in result.stdout


@pytest.mark.parametrize("words, suggestion", [
    (["bakup", "list"], "did you mean 'backup'?"), (["backup", "crate"], "did you mean 'create'?"),
    (["backup", "create", "--labl", "x"], "did you mean '--label'?"), (["status", "--worksapce", "x"],
                                                                      "did you mean '--workspace'?"),
])
def test_a_typo_gets_a_close_match(cli, words, suggestion):
    result = cli(*words)
    assert result.returncode == 2 and suggestion in result.stderr, result


def test_abbreviated_flags_are_refused(cli, fixture_dir):
    result = cli(*_global(fixture_dir), "backup", "create", "--lab", "x", "--json")
    assert result.returncode == 2 and result.json["error"]["code"] == "usage"
    assert not (fixture_dir / "bk").exists()


def test_backup_list_has_a_header_fits_the_terminal_and_survives_quiet(cli, fixture_dir):
    for label in ("first", "second"):
        assert cli(*_global(fixture_dir), "backup", "create", "--label", label).returncode == 0
    wide = cli(*_global(fixture_dir), "backup", "list", env={"COLUMNS": "200"})
    lines = wide.stdout.splitlines()
    assert lines[1].split() [:4] == ["BACKUP", "KIND", "CREATED", "(UTC)"]
    assert len(lines) == 4 and all(len(line) <= 200 for line in lines)
    narrow = cli(*_global(fixture_dir), "backup", "list", "--quiet", env={"COLUMNS": "60"})
    assert narrow.returncode == 0 and len(narrow.stdout.splitlines()) == 4
    assert all(len(line) <= 60 for line in narrow.stdout.splitlines()[1:])


def test_the_demo_says_how_to_try_it_and_that_line_works(cli, tmp_path):
    result = cli("demo", "--root", tmp_path / "demo")
    assert result.returncode == 0, result
    line = [line for line in result.stdout.splitlines() if line.startswith("Try it yourself: ")][0]
    words = line[len("Try it yourself: "):].split()
    assert words[0] == "contexta.pyz" and "--backup-root" in words and "--staging-root" in words
    again = cli(*words[1:])
    assert again.returncode in (0, 1) and "Workspace %s" % (tmp_path / "demo" / ".contexta") in again.stdout
