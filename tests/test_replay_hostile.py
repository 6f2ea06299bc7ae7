"""Hostile input to replay (issue 12) and failing closed on a wrong workspace (issue 11), through contexta.pyz.

Deep JSON, NaN and 4,300-digit integers are dead-lettered with a reason that says so and never stop the
batch; a byte-order mark is accepted.  Replay writes only files it owns: a symlink, directory or FIFO where
one of its files belongs is exit 3 naming the path, before anything is delivered.
"""

import hashlib
import json
import os
import stat

import pytest

import contexta_ops as ops


def snapshot(root):
    """Every entry under root (helpers.snapshot, but a FIFO is named, never opened: opening one blocks)."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(str(root)):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                entries[path] = ("link", os.readlink(path))
            elif stat.S_ISFIFO(info.st_mode):
                entries[path] = ("fifo",)
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    entries[path] = ("file", hashlib.sha256(handle.read()).hexdigest(), stat.S_IMODE(info.st_mode))
            else:
                entries[path] = ("dir",)
    return entries


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def _outbox_root(fixture_dir):
    return _ws(fixture_dir) / "cache" / "outbox"


def _line(ref, payload_text, family="RECORD"):
    return ('{"replay_ref": "%s", "family": "%s", "sink_name": "local-jsonl-replay", "payload": %s}\n'
            % (ref, family, payload_text)).encode()


def _dead_letters(fixture_dir):
    path = _outbox_root(fixture_dir) / ops.DEAD_LETTER_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _sink_refs(fixture_dir):
    path = _ws(fixture_dir) / "exports" / "replayed" / "record.jsonl"
    return [json.loads(line)["replay_ref"] for line in path.read_text().splitlines()] if path.exists() else []


# -- values --------------------------------------------------------------------------------------

VALUE_CASES = [
    ("deep", "[" * 100000 + "]" * 100000, "nested deeper than 64 levels"),
    ("nan", '{"v": NaN}', "NaN"),
    ("infinity", '{"v": -Infinity}', "Infinity"),
    ("overflow", '{"v": 1e400}', "too large"),
    ("bigint", '{"v": %s}' % ("7" * 4301), "more than 4300 digits"),
]


def test_hostile_values_are_dead_lettered_saying_why_and_the_batch_goes_on(cli, fixture_dir):
    outbox = _outbox_root(fixture_dir) / ops.OUTBOX_FILE
    lines = [_line("ok-first", '{"v": 1}')]
    lines += [_line(name, text) for name, text, _reason in VALUE_CASES]
    lines += [b"\xef\xbb\xbf" + _line("with-bom", '{"v": 2}'), _line("ok-last", '{"v": "%s"}' % ("9" * 4300))]
    outbox.write_bytes(b"".join(lines))
    result = cli("--workspace", _ws(fixture_dir), "replay", "--json")
    assert result.returncode == 1, result
    assert (result.json["malformed_count"], result.json["dead_lettered_count"]) == (5, 5)
    assert _sink_refs(fixture_dir) == ["ok-first", "with-bom", "ok-last"]
    dead = _dead_letters(fixture_dir)
    refs = [record["replay_ref"] for record in dead]
    assert refs[3] == "overflow"  # it parses: it keeps its own ref; the others cannot be read, so theirs is derived
    assert all(ref.startswith("replay:derived.") for index, ref in enumerate(refs) if index != 3)
    for record, (name, _text, reason) in zip(dead, VALUE_CASES):
        assert reason in record["reason"], (name, record["reason"])
        assert record["malformed"] is True and record["raw_line"].startswith('{"replay_ref": "%s"' % name)
    sink_text = (_ws(fixture_dir) / "exports" / "replayed" / "record.jsonl").read_text()
    assert "Infinity" not in sink_text and "NaN" not in sink_text
    assert outbox.read_bytes() == b""


def test_a_deep_line_pending_is_counted_malformed_by_status_and_check(cli, fixture_dir):
    outbox = _outbox_root(fixture_dir) / ops.OUTBOX_FILE
    outbox.write_bytes(_line("deep", "[" * 100000 + "]" * 100000) + _line("fine", "{}"))
    status = cli("--workspace", _ws(fixture_dir), "replay", "status", "--json")
    assert status.returncode == 1, status
    assert (status.json["malformed_pending"], status.json["pending_count"]) == (1, 2)
    assert any("nested deeper than 64 levels" in problem["message"] for problem in status.json["problems"])
    check = cli("--workspace", _ws(fixture_dir), "check", "--plane", "outbox", "--json")
    assert check.returncode == 1 and check.json["plane_results"]["outbox"]["malformed_pending"] == 1, check
    replay = cli("--workspace", _ws(fixture_dir), "replay", "--json")
    assert replay.returncode == 1 and replay.json["acknowledged_count"] == 1, replay
    status = cli("--workspace", _ws(fixture_dir), "replay", "status", "--json")
    assert (status.json["malformed_dead_lettered"], status.json["pending_count"]) == (1, 0), status
    check = cli("--workspace", _ws(fixture_dir), "check", "--plane", "outbox", "--json")
    assert check.returncode == 1, check  # as replay status: a dead letter waits for a person
    assert [problem["code"] for problem in check.json["problems"]] == ["outbox_dead_letters"]


def test_a_deep_dead_letter_can_be_counted_and_is_never_requeued(cli, fixture_dir):
    (_outbox_root(fixture_dir) / ops.DEAD_LETTER_FILE).write_bytes(_line("deep", "[" * 100000 + "]" * 100000))
    requeue = cli("--workspace", _ws(fixture_dir), "replay", "requeue", "--json")
    assert requeue.returncode == 0 and requeue.json["skipped_malformed"] == 1, requeue
    status = cli("--workspace", _ws(fixture_dir), "replay", "status", "--json")
    assert status.json["malformed_dead_lettered"] == 1, status


# -- files replay does not own -------------------------------------------------------------------

def _outside(fixture_dir):
    outside = fixture_dir / "outside"
    outside.mkdir(exist_ok=True)
    return outside


def _symlinked_sink_file(fixture_dir):
    replayed = _ws(fixture_dir) / "exports" / "replayed"
    replayed.mkdir(parents=True)
    os.symlink(str(_outside(fixture_dir) / "record.jsonl"), str(replayed / "record.jsonl"))
    return replayed / "record.jsonl"


def _symlinked_sink_dir(fixture_dir):
    os.symlink(str(_outside(fixture_dir)), str(_ws(fixture_dir) / "exports" / "replayed"))
    return _ws(fixture_dir) / "exports" / "replayed"


def _symlinked_dead_letters(fixture_dir):
    target = _outside(fixture_dir) / "dead.jsonl"
    target.write_bytes(b"")
    os.symlink(str(target), str(_outbox_root(fixture_dir) / ops.DEAD_LETTER_FILE))
    return _outbox_root(fixture_dir) / ops.DEAD_LETTER_FILE


def _symlinked_outbox(fixture_dir):
    outbox = _outbox_root(fixture_dir) / ops.OUTBOX_FILE
    target = _outside(fixture_dir) / "outbox.jsonl"
    os.rename(str(outbox), str(target))
    os.symlink(str(target), str(outbox))
    return outbox


def _symlinked_outbox_root(fixture_dir):
    root = _outbox_root(fixture_dir)
    target = _outside(fixture_dir) / "outbox-root"
    os.rename(str(root), str(target))
    os.symlink(str(target), str(root))
    return root


def _outbox_is_a_directory(fixture_dir):
    outbox = _outbox_root(fixture_dir) / ops.OUTBOX_FILE
    outbox.unlink()
    outbox.mkdir()
    return outbox


def _outbox_is_a_fifo(fixture_dir):
    outbox = _outbox_root(fixture_dir) / ops.OUTBOX_FILE
    outbox.unlink()
    os.mkfifo(str(outbox))
    return outbox


def _outbox_root_is_a_file(fixture_dir):
    root = _outbox_root(fixture_dir)
    for child in root.iterdir():
        child.unlink()
    root.rmdir()
    root.write_bytes(b"")
    return root


UNOWNED = [_symlinked_sink_file, _symlinked_sink_dir, _symlinked_dead_letters, _symlinked_outbox,
           _symlinked_outbox_root, _outbox_is_a_directory, _outbox_is_a_fifo, _outbox_root_is_a_file]


@pytest.mark.parametrize("make", UNOWNED, ids=[make.__name__.strip("_") for make in UNOWNED])
def test_replay_refuses_paths_it_does_not_own_and_changes_nothing(cli, fixture_dir, make):
    path = make(fixture_dir)
    before = snapshot(fixture_dir)
    commands = [["replay"], ["replay", "--dry-run"]]
    if "sink" not in make.__name__:
        commands.append(["replay", "status"])  # status reads the outbox only
    for command in commands:
        result = cli("--workspace", _ws(fixture_dir), *command, "--json", timeout=60)
        assert result.returncode == 3, (command, result)
        assert result.json["error"]["path"] == str(path), (command, result.json)
        assert str(path) in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert snapshot(fixture_dir) == before, command


@pytest.mark.parametrize("make", [_symlinked_dead_letters, _symlinked_outbox, _outbox_is_a_fifo],
                         ids=["dead_letters", "outbox", "fifo"])
def test_requeue_refuses_paths_it_does_not_own(cli, fixture_dir, make):
    if make is not _symlinked_dead_letters:
        (_outbox_root(fixture_dir) / ops.DEAD_LETTER_FILE).write_bytes(_line("d-1", "{}"))
    path = make(fixture_dir)
    before = snapshot(fixture_dir)
    result = cli("--workspace", _ws(fixture_dir), "replay", "requeue", "--json", timeout=60)
    assert result.returncode == 3 and result.json["error"]["path"] == str(path), result
    assert snapshot(fixture_dir) == before


def test_check_reports_an_outbox_that_is_a_fifo_without_hanging(cli, fixture_dir):
    path = _outbox_is_a_fifo(fixture_dir)
    os.mkfifo(str(_outbox_root(fixture_dir) / ops.REPLAY_LOCK_FILE))
    result = cli("--workspace", _ws(fixture_dir), "check", "--plane", "outbox", "--json", timeout=60)
    assert result.returncode == 1, result
    assert [problem["path"] for problem in result.json["problems"]] == [str(path)]


# -- failing closed ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["replay"], ["replay", "status"], ["replay", "requeue"], ["replay", "--dry-run"]])
def test_a_workspace_that_does_not_exist_is_exit_3(cli, tmp_path, command):
    result = cli("--workspace", tmp_path / "typo", *command, "--json")
    assert result.returncode == 3, result
    assert result.json["error"]["code"] == "workspace_missing"
    assert "does not exist" in result.json["error"]["message"] and str(tmp_path / "typo") in result.stderr
    assert not (tmp_path / "typo").exists()


def test_a_relocated_outbox_root_whose_parent_is_missing_is_exit_3(cli, tmp_path):
    (tmp_path / "ws").mkdir()
    for command in (["replay"], ["replay", "status"], ["replay", "requeue"]):
        result = cli("--workspace", tmp_path / "ws", "--outbox-root", tmp_path / "nowhere" / "outbox", *command,
                     "--json")
        assert result.returncode == 3, (command, result)
        assert result.json["error"]["path"] == str(tmp_path / "nowhere" / "outbox")
    assert os.listdir(str(tmp_path / "ws")) == []


def test_a_relocated_outbox_root_missing_under_an_existing_parent_is_empty(cli, tmp_path):
    (tmp_path / "ws").mkdir()
    result = cli("--workspace", tmp_path / "ws", "--outbox-root", tmp_path / "outbox", "replay", "--json")
    assert result.returncode == 0 and result.json["notes"] == ["outbox_empty"], result


def test_an_existing_workspace_without_an_outbox_is_empty(cli, tmp_path):
    (tmp_path / "ws").mkdir()
    for command, key in ((["replay"], "notes"), (["replay", "requeue"], "notes")):
        result = cli("--workspace", tmp_path / "ws", *command, "--json")
        assert result.returncode == 0, (command, result)
    status = cli("--workspace", tmp_path / "ws", "replay", "status", "--json")
    assert status.returncode == 0 and status.json["status"] == "SUCCESS" and status.json["pending_count"] == 0
    assert os.listdir(str(tmp_path / "ws")) == []
