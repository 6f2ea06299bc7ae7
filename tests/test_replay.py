"""Outbox replay: Contexta's contract, exactly-once delivery, malformed lines that never block the queue."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import contexta_ops as ops
from helpers import delivered_refs, run_ref, snapshot, traced_steps


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def _outbox(fixture_dir):
    return _ws(fixture_dir) / "cache" / "outbox"


def _replay(cli, fixture_dir, *args):
    return cli("--workspace", _ws(fixture_dir), "replay", "--json", *args)


def _sink_lines(fixture_dir, family="record"):
    path = _ws(fixture_dir) / "exports" / "replayed" / ("%s.jsonl" % family)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write_outbox(outbox_root, entries):
    outbox_root.mkdir(parents=True, exist_ok=True)
    lines = []
    for entry in entries:
        lines.append(entry if isinstance(entry, bytes) else (json.dumps(entry) + "\n").encode("utf-8"))
    (outbox_root / ops.OUTBOX_FILE).write_bytes(b"".join(lines))


def _entry(index, sink="local-jsonl-replay", **extra):
    entry = {"replay_ref": "replay:record.test.%d" % index, "family": "RECORD", "sink_name": sink,
             "payload": {"i": index}, "attempts": 0}
    entry.update(extra)
    return entry


def test_fixture_outbox_replays_with_contextas_counts(cli, fixture_dir, expected):
    result = _replay(cli, fixture_dir)
    assert result.returncode == 0, result
    payload = result.json
    assert (payload["status"], payload["acknowledged_count"], payload["pending_count"],
            payload["dead_lettered_count"]) == ("SUCCESS", expected["outbox_entries"], 0, 0)
    assert len(payload["entries"]) == 5 and payload["entries"][0]["attempts"] == 1
    lines = _sink_lines(fixture_dir)
    assert [line["replay_ref"] for line in lines] == ["replay:record.1717243380000.%d" % i for i in range(1, 6)]
    assert {line["payload_type"] for line in lines} == {"MetricRecord"}  # kept, unlike Contexta (11.17)
    assert lines[0]["payload_ref"] == "record:fixture-proj.tuned.m0001"
    assert set(lines[0]) == {"captured_at", "family", "payload", "payload_ref", "payload_type", "sink_name",
                             "replay_ref"}
    assert (_outbox(fixture_dir) / ops.OUTBOX_FILE).read_bytes() == b""


CONTEXTA_REPLAY = r"""
import json, sys
from pathlib import Path
from contexta.config import RecoveryConfig, UnifiedConfig, WorkspaceConfig
from contexta.recovery import replay_outbox
root = Path(sys.argv[1])
config = UnifiedConfig(project_name="p", workspace=WorkspaceConfig(root_path=root / ".contexta"),
                       recovery=RecoveryConfig(outbox_root=root / "outbox"))
result = replay_outbox(config)
lines = [json.loads(l) for l in (root / ".contexta/exports/replayed/record.jsonl").read_text().splitlines()]
print(json.dumps({"acknowledged": result.acknowledged_count, "pending": result.pending_count,
                  "dead": result.dead_lettered_count, "status": result.status, "lines": lines}))
"""


def test_sink_lines_match_contextas_key_for_key(cli, tmp_path, contexta_ref):
    entries = [{"replay_ref": "replay:record.demo.0001", "family": "RECORD", "sink_name": "local-jsonl-replay",
                "payload": {"run_id": "recovery-proj.demo-run", "metric_key": "loss", "value": 0.12}, "attempts": 0},
               _entry(2, payload={"nested": {"list": [1, 2.5, None, "x"]}, "unicode": "한국어"})]
    for side in ("ours", "theirs"):
        _write_outbox(tmp_path / side / "outbox", entries)
    (tmp_path / "ours" / ".contexta").mkdir()
    theirs = run_ref(contexta_ref, CONTEXTA_REPLAY, tmp_path / "theirs")
    ours = cli("--workspace", tmp_path / "ours" / ".contexta", "--outbox-root", tmp_path / "ours" / "outbox",
               "replay", "--json")
    assert ours.returncode == 0, ours
    assert (ours.json["acknowledged_count"], ours.json["pending_count"], ours.json["dead_lettered_count"],
            ours.json["status"]) == (theirs["acknowledged"], theirs["pending"], theirs["dead"], theirs["status"])
    our_lines = [json.loads(line) for line in
                 (tmp_path / "ours/.contexta/exports/replayed/record.jsonl").read_text().splitlines()]
    assert len(our_lines) == len(theirs["lines"])
    for mine, contextas in zip(our_lines, theirs["lines"]):
        assert set(mine) - {"replay_ref"} == set(contextas)
        for key in contextas:
            if key != "captured_at":
                assert mine[key] == contextas[key], key


def test_malformed_lines_go_to_dead_letters_and_the_rest_proceeds(cli, fixture_dir):
    outbox_root = _outbox(fixture_dir)
    no_ref = {"family": "RECORD", "sink_name": "local-jsonl-replay", "payload": {"n": 1}}
    _write_outbox(outbox_root, [
        _entry(1),
        b"this is not json\n",
        b"[1, 2, 3]\n",
        (json.dumps({"replay_ref": "r-nofamily", "payload": {}}) + "\n").encode(),
        (json.dumps({"replay_ref": "r-nopayload", "family": "RECORD"}) + "\n").encode(),
        (json.dumps({"replay_ref": "r-weird", "family": "NOPE", "payload": {}}) + "\n").encode(),
        b'{"replay_ref": "r-badutf8", "family": "RECORD", "payload": "\xff\xfe"}\n',
        no_ref,
        _entry(9, attempts="three"),
        b"\n",
        _entry(10),
        b'{"replay_ref": "r-torn", "family": "REC',
    ])
    old = time.time() - 60  # the torn last line has been still for a minute: not a writer in flight
    os.utime(str(outbox_root / ops.OUTBOX_FILE), (old, old))
    result = _replay(cli, fixture_dir)
    assert result.returncode == 1, result
    payload = result.json
    assert payload["acknowledged_count"] == 4 and payload["malformed_count"] == 7
    assert payload["dead_lettered_count"] == 7 and payload["pending_count"] == 0
    assert any(warning["code"] == "attempts_not_integer" for warning in payload["warnings"])
    dead = [json.loads(line) for line in (outbox_root / ops.DEAD_LETTER_FILE).read_text().splitlines()]
    reasons = [record["reason"] for record in dead]
    assert reasons == ["not JSON", "not a JSON object", "missing family", "missing payload",
                       "unknown family 'NOPE'", "not valid UTF-8", "truncated line (no newline, not JSON)"]
    assert dead[0]["raw_line"] == "this is not json" and "raw_line_base64" in dead[5]
    delivered = [line["replay_ref"] for line in _sink_lines(fixture_dir)]
    derived = [ref for ref in delivered if ref.startswith("replay:derived.")]
    assert len(derived) == 1 and delivered == ["replay:record.test.1", derived[0], "replay:record.test.9",
                                               "replay:record.test.10"]
    # The derived ref is a stable function of the line.
    raw = (json.dumps(no_ref) + "\n").encode()
    assert derived[0] == "replay:derived.%s" % __import__("hashlib").sha256(raw.rstrip(b"\n")).hexdigest()[:16]


def test_a_line_a_writer_is_still_writing_is_left_alone(cli, fixture_dir):
    outbox_root = _outbox(fixture_dir)
    _write_outbox(outbox_root, [_entry(1), b'{"replay_ref": "half-writ'])
    result = _replay(cli, fixture_dir)
    assert result.returncode == 0, result
    assert (outbox_root / ops.OUTBOX_FILE).read_bytes() == b'{"replay_ref": "half-writ\n'


def test_limit_keeps_the_rest_byte_for_byte_in_order(cli, fixture_dir):
    outbox = _outbox(fixture_dir) / ops.OUTBOX_FILE
    original = outbox.read_bytes().splitlines(keepends=True)
    result = _replay(cli, fixture_dir, "--limit", "2")
    assert result.returncode == 0
    assert result.json["acknowledged_count"] == 2 and result.json["pending_count"] == 3
    assert outbox.read_bytes() == b"".join(original[2:])


def test_target_skips_other_sinks_and_keeps_their_order(cli, fixture_dir):
    outbox_root = _outbox(fixture_dir)
    entries = [_entry(1, "a"), _entry(2, "b"), _entry(3, "a"), _entry(4, "b")]
    _write_outbox(outbox_root, entries)
    result = _replay(cli, fixture_dir, "--target", "b")
    assert result.returncode == 0, result
    statuses = [(entry["replay_ref"][-1], entry["status"]) for entry in result.json["entries"]]
    assert statuses == [("1", "SKIPPED"), ("2", "SUCCESS"), ("3", "SKIPPED"), ("4", "SUCCESS")]
    assert result.json["status"] == "DEGRADED"  # Contexta's rule for a batch with skips
    remaining = [json.loads(line)["replay_ref"] for line in (outbox_root / ops.OUTBOX_FILE).read_text().splitlines()]
    assert remaining == ["replay:record.test.1", "replay:record.test.3"]
    assert {line["sink_name"] for line in _sink_lines(fixture_dir)} == {"b"}


class FailingSink:
    name = "flaky"

    def capture(self, *, family, payload):
        raise ConnectionError("sink unavailable")


def test_failures_count_attempts_and_dead_letter_at_the_threshold(fixture_dir):
    outbox_root = _outbox(fixture_dir)
    _write_outbox(outbox_root, [_entry(1, attempts=1), _entry(2, attempts=3), _entry(3)])
    config = ops.load_config(environ={}, workspace=_ws(fixture_dir))
    result = ops.replay_outbox(config, dead_letter_after_failures=3, sinks=[FailingSink()])
    assert result.status == "FAILURE" and result.exit_code == 1
    assert [entry.attempts for entry in result.entries] == [2, 4, 1]
    assert result.dead_lettered_count == 1 and result.pending_count == 2 and "dead_lettered:1" in result.notes
    json.dumps(result.to_dict())  # Contexta's to_dict crashes with entries (11.18)
    pending = [json.loads(line) for line in (outbox_root / ops.OUTBOX_FILE).read_text().splitlines()]
    assert [(entry["replay_ref"][-1], entry["attempts"], entry["last_error"]) for entry in pending] == [
        ("1", 2, "sink unavailable"), ("3", 1, "sink unavailable")]
    dead = json.loads((outbox_root / ops.DEAD_LETTER_FILE).read_text())
    assert dead["replay_ref"] == "replay:record.test.2" and dead["attempts"] == 4


def test_keep_successes_delivers_and_leaves_entries_pending(cli, fixture_dir):
    outbox = _outbox(fixture_dir) / ops.OUTBOX_FILE
    before = outbox.read_bytes()
    result = _replay(cli, fixture_dir, "--keep-successes")
    assert result.returncode == 0 and result.json["acknowledged_count"] == 0 and result.json["pending_count"] == 5
    assert outbox.read_bytes() == before and len(_sink_lines(fixture_dir)) == 5


def test_dry_run_reports_the_real_outcome_and_changes_no_byte(cli, fixture_dir):
    outbox_root = _outbox(fixture_dir)
    _write_outbox(outbox_root, [_entry(1, "a"), b"garbage\n", _entry(2, "b"), _entry(3, "a")])
    before = snapshot(fixture_dir)
    dry = _replay(cli, fixture_dir, "--target", "a", "--dry-run")
    assert snapshot(fixture_dir) == before
    real = _replay(cli, fixture_dir, "--target", "a")
    keys = ("acknowledged_count", "pending_count", "dead_lettered_count", "skipped_count", "malformed_count", "status")
    assert {key: dry.json[key] for key in keys} == {key: real.json[key] for key in keys}
    assert dry.returncode == real.returncode == 1
    assert [e["status"] for e in dry.json["entries"]] == [e["status"] for e in real.json["entries"]]


def test_requeue_moves_dead_letters_back_oldest_first(cli, fixture_dir):
    outbox_root = _outbox(fixture_dir)
    _write_outbox(outbox_root, [])
    dead = [_entry(i, attempts=5) for i in range(1, 5)]
    (outbox_root / ops.DEAD_LETTER_FILE).write_bytes(
        b"".join((json.dumps(entry) + "\n").encode() for entry in dead) + b"not json at all\n")
    first = cli("--workspace", _ws(fixture_dir), "replay", "requeue", "--limit", "2", "--json")
    assert first.returncode == 0 and first.json["requeued_refs"] == ["replay:record.test.1", "replay:record.test.2"]
    by_ref = cli("--workspace", _ws(fixture_dir), "replay", "requeue", "--ref", "replay:record.test.4", "--json")
    assert by_ref.json["requeued_count"] == 1 and by_ref.json["remaining_dead_lettered"] == 2
    pending = [json.loads(line) for line in (outbox_root / ops.OUTBOX_FILE).read_text().splitlines()]
    assert [entry["replay_ref"][-1] for entry in pending] == ["1", "2", "4"]
    assert all("requeued_at" in entry for entry in pending)
    left = (outbox_root / ops.DEAD_LETTER_FILE).read_text().splitlines()
    assert json.loads(left[0])["replay_ref"] == "replay:record.test.3" and left[1] == "not json at all"
    status = cli("--workspace", _ws(fixture_dir), "replay", "status", "--json").json
    assert status["pending_count"] == 3 and status["dead_lettered_count"] == 2
    assert status["malformed_dead_lettered"] == 1 and status["pending_by_family"] == {"RECORD": 3}


def test_status_reports_oldest_failure_and_most_common_error(cli, fixture_dir):
    outbox_root = _outbox(fixture_dir)
    _write_outbox(outbox_root, [_entry(1, failed_at="2024-01-02T00:00:00Z", last_error="timeout"),
                                _entry(2, failed_at="2023-05-01T00:00:00Z", last_error="refused"),
                                _entry(3, "other", failed_at="2024-03-01T00:00:00Z", last_error="timeout")])
    status = cli("--workspace", _ws(fixture_dir), "replay", "status", "--json")
    assert status.returncode == 0
    assert status.json["oldest_failed_at"] == "2023-05-01T00:00:00Z"
    assert (status.json["most_common_last_error"], status.json["most_common_last_error_count"]) == ("timeout", 2)
    assert status.json["pending_by_sink"] == {"local-jsonl-replay": 2, "other": 1}


def test_replay_while_locked_is_exit_4_and_touches_nothing(cli, fixture_dir):
    lock = _outbox(fixture_dir) / ops.REPLAY_LOCK_FILE
    lock.touch()
    before = snapshot(fixture_dir)
    with open(str(lock), "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        result = _replay(cli, fixture_dir)
        dry = _replay(cli, fixture_dir, "--dry-run")
    assert result.returncode == 4 and dry.returncode == 4
    assert snapshot(fixture_dir) == before


def test_lone_surrogate_does_not_empty_the_outbox(cli, fixture_dir):
    """Contexta truncated the outbox, then failed to encode, losing every entry (11.15)."""
    outbox_root = _outbox(fixture_dir)
    _write_outbox(outbox_root, [b'{"replay_ref": "r1", "family": "RECORD", "sink_name": "local-jsonl-replay", '
                                b'"payload": {"s": "\\ud800"}}\n', _entry(2, "elsewhere")])
    result = _replay(cli, fixture_dir, "--target", "local-jsonl-replay")
    assert result.returncode == 0, result
    assert _sink_lines(fixture_dir)[0]["payload"] == {"s": "\ud800"}  # written as a \u escape
    assert json.loads((outbox_root / ops.OUTBOX_FILE).read_text())["replay_ref"] == "replay:record.test.2"


def test_missing_outbox_is_outbox_empty(cli, tmp_path):
    (tmp_path / "ws").mkdir()
    result = cli("--workspace", tmp_path / "ws", "--outbox-root", tmp_path / "none", "replay", "--json")
    assert result.returncode == 0 and result.json["notes"] == ["outbox_empty"]
    assert result.json["status"] == "SUCCESS"


def test_recover_replay_reads_records_and_leaves_the_outbox_alone(cli, fixture_dir):
    """Contexta's `recover replay` replays stored records, read-only; it never drained the outbox (issue 14)."""
    before = snapshot(fixture_dir)
    result = cli("--workspace", _ws(fixture_dir), "recover", "replay", "--json")
    assert result.returncode == 0, result
    assert (result.json["status"], result.json["record_count"]) == ("SUCCESS", 50)
    assert snapshot(fixture_dir) == before
    assert cli("--workspace", _ws(fixture_dir), "recover", "replay", "--limit", "1").returncode == 2


def test_a_dead_letter_keeps_the_entrys_own_replay_ref(cli, fixture_dir):
    outbox_root = _outbox(fixture_dir)
    _write_outbox(outbox_root, [
        {"replay_ref": "r-unknown-family", "family": "NOPE", "payload": {}},
        {"replay_ref": "r-no-payload", "family": "RECORD"},
        {"replay_ref": "  ", "family": "NOPE", "payload": {}},
        {"replay_ref": 7, "payload": {}}])
    result = _replay(cli, fixture_dir)
    assert result.returncode == 1, result
    refs = [json.loads(line)["replay_ref"] for line in (outbox_root / ops.DEAD_LETTER_FILE).read_text().splitlines()]
    assert refs[:2] == ["r-unknown-family", "r-no-payload"]
    assert refs[2].startswith("replay:derived.") and refs[3].startswith("replay:derived.")  # no usable ref of its own
    assert [entry["replay_ref"] for entry in result.json["entries"]] == refs


def test_sink_line_identity_round_trips_through_crash_recovery(tmp_path):
    """The writer (_sink_line) and the readers (crash recovery, the sink index) agree on the identity keys."""
    payloads = [{"b": 1, "a": [1.5, None, "x"]}, {"s": "\ud800 lone surrogate"}, "text", 12345678901234567890,
                {"nested": {"deep": [[{"k": "v"}]]}, "unicode": "한국어"}]
    for index, payload in enumerate(payloads):
        line = ops._sink_line("RECORD", payload, "dict", None, "sink", "ref-%d" % index)
        assert ops._sink_line_identity(line) == ("ref-%d" % index, ops._payload_sha256(payload))
        assert set(json.loads(line)) >= set(ops._SINK_IDENTITY_KEYS)
    sink = ops._JournaledFileSink(tmp_path, "sink")
    sink.open_file("RECORD")
    path = sink.path_for("RECORD")
    line = ops._sink_line("RECORD", payloads[0], "dict", None, "sink", "ref-0")
    sink.deliver("RECORD", line, ("ref-0", ops._payload_sha256(payloads[0])))
    sink.sync()
    sink.close()
    again = ops._JournaledFileSink(tmp_path, "sink")
    again.reopen({path: 0})  # as after a kill: the line is past the last checkpoint
    again.deliver("RECORD", line, ("ref-0", ops._payload_sha256({"a": [1.5, None, "x"], "b": 1})))
    again.sync()
    again.close()
    assert Path(path).read_bytes() == line  # recognized, not written twice


def test_every_replay_command_says_its_status(cli, fixture_dir):
    ws = _ws(fixture_dir)
    outbox_root = _outbox(fixture_dir)
    status = cli("--workspace", ws, "replay", "status", "--json")
    assert status.returncode == 0 and status.json["status"] == "SUCCESS"
    _write_outbox(outbox_root, [_entry(1), b"broken\n"])
    status = cli("--workspace", ws, "replay", "status", "--json")
    assert status.returncode == 1 and status.json["status"] == "DEGRADED"  # a malformed pending line
    assert cli("--workspace", ws, "replay", "--dry-run", "--json").json["status"] == "DEGRADED"
    assert cli("--workspace", ws, "replay", "--json").json["status"] == "DEGRADED"
    status = cli("--workspace", ws, "replay", "status", "--json")
    assert status.returncode == 1 and status.json["status"] == "DEGRADED"  # a dead letter
    assert "dead-lettered" in cli("--workspace", ws, "replay", "status").stdout
    assert cli("--workspace", ws, "replay", "requeue", "--json").json["status"] == "SUCCESS"
    assert cli("--workspace", ws, "replay", "--json").json["status"] == "SUCCESS"
    assert cli("--workspace", ws, "recover", "replay", "--json").json["status"] == "SUCCESS"


# -- crash safety -------------------------------------------------------------------------------

def _big_outbox(outbox_root, count):
    outbox_root.mkdir(parents=True, exist_ok=True)
    with open(str(outbox_root / ops.OUTBOX_FILE), "wb") as handle:
        for index in range(count):
            family = ("RECORD", "CONTEXT", "ARTIFACT")[index % 3]
            handle.write((json.dumps({"replay_ref": "ref-%06d" % index, "family": family,
                                      "sink_name": "local-jsonl-replay", "payload": {"i": index},
                                      "attempts": 0}) + "\n").encode())


def _delivered_refs(ws, killed=False):
    return delivered_refs(ws / "exports" / "replayed", killed)


def _pending_refs(outbox_root):
    path = outbox_root / ops.OUTBOX_FILE
    return [json.loads(line)["replay_ref"] for line in path.read_text().splitlines()] if path.exists() else []


def _assert_exactly_once(ws, outbox_root, count, finished=True):
    """No entry lost, none delivered twice; once a run has finished, none is both delivered and pending.

    Right after a kill an entry may be delivered and still listed as pending: delivery is made
    durable before the outbox changes.  The next run recognizes it and never delivers it again.
    """
    delivered = _delivered_refs(ws, killed=not finished)
    pending = _pending_refs(outbox_root)
    assert len(delivered) == len(set(delivered)), "an entry was delivered twice"
    if finished:
        assert not set(delivered) & set(pending), "an entry is both delivered and pending"
    assert set(delivered) | set(pending) == {"ref-%06d" % i for i in range(count)}, "an entry was lost"


@pytest.mark.slow
def test_kill_9_at_each_durable_step_then_rerun_delivers_each_entry_once(cli, fixture_dir, tmp_path):
    count = 10000  # three sink files and a few checkpoints
    _big_outbox(_outbox(fixture_dir), count)

    def replay_args(root):
        return ("--workspace", _ws(root), "replay")

    steps = traced_steps(cli, fixture_dir, tmp_path, replay_args)
    assert {"replay:checkpoint", "replay:committing", "replay:outbox-replaced"} <= set(steps), steps
    for crash_at in range(1, len(steps) + 1):
        root = tmp_path / ("step%d" % crash_at)
        shutil.copytree(str(fixture_dir), str(root), symlinks=True)
        ws, outbox_root = _ws(root), _outbox(root)
        killed = cli(*replay_args(root), env={"CONTEXTA_OPS_CRASH_AT": str(crash_at)})
        assert killed.returncode == -9, (steps[crash_at - 1], killed)
        _assert_exactly_once(ws, outbox_root, count, finished=False)
        status = cli("--workspace", ws, "replay", "status", "--json").json
        assert status["interrupted_replay"] is True, steps[crash_at - 1]
        again = cli("--workspace", ws, "replay", "--json")
        assert again.returncode == 0, again
        assert _pending_refs(outbox_root) == []
        _assert_exactly_once(ws, outbox_root, count)
        assert not (outbox_root / "replay.journal.json").exists()


@pytest.mark.slow
def test_kill_9_at_random_moments_of_a_large_replay(cli, fixture_dir, pyz):
    ws = _ws(fixture_dir)
    outbox_root = _outbox(fixture_dir)
    count = 60000
    _big_outbox(outbox_root, count)
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONTEXTA_OPS_CRASH")}
    for delay in (0.15, 0.3, 0.45, 0.6, 0.8):
        process = subprocess.Popen([sys.executable, str(pyz), "--workspace", str(ws), "replay", "--quiet"],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        _assert_exactly_once(ws, outbox_root, count, finished=False)
    final = cli("--workspace", ws, "replay", "--json")
    assert final.returncode == 0, final
    assert _pending_refs(outbox_root) == []
    _assert_exactly_once(ws, outbox_root, count)


@pytest.mark.slow
def test_lines_appended_by_a_writer_during_replay_are_kept(cli, fixture_dir, pyz):
    ws = _ws(fixture_dir)
    outbox_root = _outbox(fixture_dir)
    _big_outbox(outbox_root, 60000)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import json,sys,time\n"
        "path=sys.argv[1]\n"
        "for i in range(400):\n"
        "    with open(path,'a') as f:\n"
        "        f.write(json.dumps({'replay_ref':'late-%d'%i,'family':'RECORD','sink_name':'x','payload':{}})+'\\n')\n"
        "    time.sleep(0.002)\n"), str(outbox_root / ops.OUTBOX_FILE)])
    result = cli("--workspace", ws, "replay", "--target", "local-jsonl-replay", "--json")
    writer.wait()
    assert result.returncode == 0, result
    late = [ref for ref in _pending_refs(outbox_root) if ref.startswith("late-")]
    late += [ref for ref in _delivered_refs(ws) if ref.startswith("late-")]
    assert sorted(late) == sorted("late-%d" % i for i in range(400))


def _kill_replay_at(cli, fixture_dir, ws, outbox_root, step):
    """Kill `replay` at its durable step ``step``, learnt from a traced rehearsal on a copy of the outbox."""
    trace = fixture_dir / "trace"
    rehearsal = fixture_dir / "rehearsal"
    shutil.copytree(str(outbox_root), str(rehearsal / "outbox"))
    (rehearsal / "ws").mkdir()
    cli("--workspace", rehearsal / "ws", "--outbox-root", rehearsal / "outbox", "replay",
        env={"CONTEXTA_OPS_CRASH_TRACE": str(trace)})
    crash_at = trace.read_text().split().index(step) + 1
    killed = cli("--workspace", ws, "replay", env={"CONTEXTA_OPS_CRASH_AT": str(crash_at)})
    assert killed.returncode == -9


@pytest.mark.parametrize("step", ["replay:committing", "replay:dead-letters-appended", "replay:new-outbox-written",
                                  "replay:outbox-replaced"])
def test_kill_9_while_committing_dead_letters_each_land_once(cli, fixture_dir, step):
    ws = _ws(fixture_dir)
    outbox_root = _outbox(fixture_dir)
    _write_outbox(outbox_root, [_entry(1), b"bad one\n", _entry(2), b"[]\n", _entry(3)])
    _kill_replay_at(cli, fixture_dir, ws, outbox_root, step)
    again = cli("--workspace", ws, "replay", "--json")
    assert again.returncode == 0, again
    dead = (outbox_root / ops.DEAD_LETTER_FILE).read_text().splitlines()
    assert [json.loads(line)["raw_line"] for line in dead] == ["bad one", "[]"]
    assert sorted(line["replay_ref"][-1] for line in _sink_lines(fixture_dir)) == ["1", "2", "3"]
    assert _pending_refs(outbox_root) == []


def test_lines_appended_to_the_old_outbox_survive_a_kill_right_after_the_swap(cli, fixture_dir):
    """A writer that opened the outbox before the swap appends to the old file; a run killed before carrying
    those lines over leaves the old file under a second name, and the next run carries them."""
    ws = _ws(fixture_dir)
    outbox_root = _outbox(fixture_dir)
    _kill_replay_at(cli, fixture_dir, ws, outbox_root, "replay:outbox-replaced")
    previous = outbox_root / ".replay-previous.jsonl"
    late = b'{"replay_ref": "late-writer", "family": "RECORD", "payload": {"n": 1}}\n'
    with open(str(previous), "ab") as writer:  # the old file, as the late writer still holds it
        writer.write(late)
    again = cli("--workspace", ws, "replay", "--keep-successes", "--json")
    assert again.returncode == 0, again
    assert (outbox_root / "failed_deliveries.jsonl").read_bytes().endswith(late)
    assert not previous.exists()
