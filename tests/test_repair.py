"""`repair`: check finds, repair fixes - each plane's repair against contexta 1.0.0's own functions (or, for the
outbox, our replay) on the same damage, byte for byte; the plan first, a safety backup, refusal under a live
writer, a check after, and nothing changed by a dry run."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import contexta_ops as ops
from helpers import flip_byte, reseal_package, run_ref, snapshot

TORN = b'{"appended_at":"2026-11-26T03:48:1'
SEGMENT = "records/segments/segment-000001.jsonl"
QUARANTINED_SEGMENT = re.compile(r"^segment-000001\.before-tail-repair-\d{8}T\d{6}(\.\d{6})?Z\.jsonl$")
T_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(_\d{6})?Z$")
EVENT_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(_\d{6})?Z-[0-9a-f]{32}\.json$")


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def _repair(cli, fixture_dir, *extra, env=None):
    return cli("--workspace", _ws(fixture_dir), "--backup-root", fixture_dir / "bk", "repair", *extra, "--json",
               env=env)


def _tear_segment(ws):
    with open(str(ws / SEGMENT), "ab") as handle:
        handle.write(TORN)


def _files(root):
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


# -- records ------------------------------------------------------------------------------------------------

CONTEXTA_TAIL_REPAIR = r"""
import json, sys
from contexta.store.records import RecordStore, StoreConfig
report = RecordStore(StoreConfig(root_path=sys.argv[1])).repair_truncated_tails()
print(json.dumps({"repaired_segments": list(report.repaired_segments), "integrity_state": report.integrity_state.value,
                  "quarantined_paths": list(report.quarantined_paths), "rebuilt_indexes": report.rebuilt_indexes}))
"""


def _manifest_ahead(ws):
    """The manifest says line 51 was committed, but it tore (a flush-mode writer, a power cut): contexta's tail
    repair puts the sequence fields back."""
    path = ws / "records" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(last_committed_sequence=51, next_sequence=52, current_segment_record_count=51)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["torn_tail", "torn_tail_manifest_ahead"])
def test_record_tail_repair_matches_contexta_byte_for_byte(cli, fixture_dir, tmp_path, contexta_ref, damage):
    ws = _ws(fixture_dir)
    original = _files(ws / "records")
    _tear_segment(ws)
    with open(str(ws / "records/indexes/run_ref/run__fixture-proj.tuned.jsonl"), "ab") as handle:
        handle.write(b'{"offset":99,"segment_id":1,"sequence":99}\n')  # a pointer at nothing: the rebuild drops it
    if damage == "torn_tail_manifest_ahead":
        _manifest_ahead(ws)
    theirs = tmp_path / "theirs"
    shutil.copytree(str(ws / "records"), str(theirs))
    report = run_ref(contexta_ref, CONTEXTA_TAIL_REPAIR, theirs)
    assert report["repaired_segments"] == [1] and report["integrity_state"] == "HEALTHY"

    result = _repair(cli, fixture_dir, "--plane", "records")
    assert result.returncode == 0, result
    out = result.json
    assert out["status"] == "SUCCESS" and out["applied"] and out["repaired_segments"] == [1]
    assert out["rebuilt_indexes"] and out["integrity_state"] == "HEALTHY"
    assert out["post_apply_check"]["status"] == "SUCCESS" and out["problems"] == []

    ours, contexta = _files(ws / "records"), _files(theirs)
    for name in ("segments/segment-000001.jsonl", "manifest.json"):
        assert ours[name] == contexta[name], name
    assert ours["segments/segment-000001.jsonl"] == original["segments/segment-000001.jsonl"]
    assert {k: v for k, v in ours.items() if k.startswith("indexes/")} == \
        {k: v for k, v in contexta.items() if k.startswith("indexes/")}
    assert sorted(path.name for path in (ws / "records/indexes").iterdir()) == \
        sorted(path.name for path in (theirs / "indexes").iterdir())
    ours_q = [name for name in ours if name.startswith("quarantine/")]
    theirs_q = [name for name in contexta if name.startswith("quarantine/")]
    assert len(ours_q) == len(theirs_q) == 1
    assert QUARANTINED_SEGMENT.match(ours_q[0][len("quarantine/"):]) and QUARANTINED_SEGMENT.match(
        theirs_q[0][len("quarantine/"):])
    assert ours[ours_q[0]] == contexta[theirs_q[0]] == original["segments/segment-000001.jsonl"] + TORN
    assert out["quarantined_paths"] == [str(ws / "records" / ours_q[0])]
    assert set(ours) == set(contexta) - set(theirs_q) | set(ours_q)  # nothing else written or left
    assert os.stat(str(ws / "records/manifest.json")).st_mode & 0o777 == 0o600  # as contexta writes it


CONTEXTA_APPEND = r"""
import json, sys
from contexta.contract import MetricPayload, MetricRecord, RecordEnvelope
from contexta.store.records import RecordStore, StoreConfig
store = RecordStore(StoreConfig(root_path=sys.argv[1]))
for i in range(12):
    batch = "batch:p.r%d.train.b%d" % (i % 2, i % 3) if i % 4 else None
    sample = "sample:p.r%d.train.b%d.s%d" % (i % 2, i % 3, i) if batch and i % 2 else None
    envelope = RecordEnvelope(record_ref="record:p.r%d.m%04d" % (i % 2, i), record_type="metric",
                              recorded_at="2024-06-01T12:00:00Z", observed_at="2024-06-01T12:00:00Z",
                              producer_ref="gen.test", run_ref="run:p.r%d" % (i % 2),
                              stage_execution_ref="stage:p.r%d.train" % (i % 2), batch_execution_ref=batch,
                              sample_observation_ref=sample)
    assert store.append(MetricRecord(envelope=envelope, payload=MetricPayload(metric_key="loss", value=i * 0.5,
                                                                             value_type="float64"))).accepted
print(json.dumps("ok"))
"""

CONTEXTA_REBUILD = r"""
import json, sys
from contexta.store.records import RecordStore, StoreConfig
report = RecordStore(StoreConfig(root_path=sys.argv[1])).rebuild_indexes()
print(json.dumps(report.integrity_state.value))
"""


def test_index_rebuild_keeps_every_family_the_append_path_writes(cli, tmp_path, contexta_ref):
    """Contexta's rebuild drops batch_execution_ref and sample_observation_ref; ours writes all five families
    exactly as the append path did, and the three contexta rebuilds are byte-identical to its own."""
    ws = tmp_path / "ws"
    run_ref(contexta_ref, CONTEXTA_APPEND, ws / "records")
    appended = _files(ws / "records" / "indexes")
    assert any(name.startswith("batch_execution_ref/") for name in appended)
    assert any(name.startswith("sample_observation_ref/") for name in appended)
    shutil.rmtree(str(ws / "records" / "indexes" / "run_ref"))
    flip_byte(ws / "records/indexes/batch_execution_ref/batch__p.r1.train.b1.jsonl")
    theirs = tmp_path / "theirs"
    shutil.copytree(str(ws / "records"), str(theirs))
    assert run_ref(contexta_ref, CONTEXTA_REBUILD, theirs) == "HEALTHY"

    result = cli("--workspace", ws, "--backup-root", tmp_path / "bk", "repair", "--plane", "records", "--json")
    assert result.returncode == 0, result
    assert result.json["rebuilt_indexes"] and result.json["repaired_segments"] == []
    assert _files(ws / "records" / "indexes") == appended
    rebuilt = _files(theirs / "indexes")
    assert {name for name in rebuilt} == {name for name in appended if name.split("/")[0] in (
        "run_ref", "record_type", "stage_execution_ref")}
    assert all(rebuilt[name] == appended[name] for name in rebuilt)


def test_a_corrupt_line_inside_a_segment_is_named_not_repaired(cli, fixture_dir):
    ws = _ws(fixture_dir)
    lines = (ws / SEGMENT).read_bytes().splitlines(keepends=True)
    lines[10] = b'{"sequence": 11, "appended_at"\n'
    (ws / SEGMENT).write_bytes(b"".join(lines) + TORN)
    before = (ws / SEGMENT).read_bytes()
    plan = _repair(cli, fixture_dir, "plan", "--plane", "records")
    assert plan.returncode == 0, plan
    assert "repair_truncated_tails" not in [step["action"] for step in plan.json["steps"]]  # contexta's rule
    assert {problem["code"] for problem in plan.json["left_alone"]} >= {"invalid_json_line", "truncated_line"}
    result = _repair(cli, fixture_dir, "--plane", "records")
    assert result.returncode == 1, result
    assert result.json["status"] == "FAILURE" and "invalid_json_line" in [p["code"] for p in result.json["problems"]]
    assert (ws / SEGMENT).read_bytes() == before
    assert result.json["next_step"]


# -- artifacts ------------------------------------------------------------------------------------------------

CONTEXTA_ARTIFACT_REPAIR = r"""
import json, sys
from contexta.store.artifacts import (ArtifactStore, VaultConfig, build_repair_plan, quarantine_bound_artifact,
                                      quarantine_orphan_body, refresh_verification, remove_abandoned_staging)
store = ArtifactStore(VaultConfig(root_path=sys.argv[1]))
actions = list(build_repair_plan(store).actions)
for action in actions:
    name, _, argument = action.partition(":")
    if name == "refresh_verification":
        refresh_verification(store, argument)
    elif name == "quarantine_bound_artifact":
        quarantine_bound_artifact(store, argument)
    elif name == "quarantine_orphan_body":
        quarantine_orphan_body(store, argument)
remove_abandoned_staging(store)
print(json.dumps(actions))
"""

ORPHAN = "objects/checkpoint/c6/left-behind.bin"
STRAY_TMP = "objects/report/ed/artifact__fixture-proj.tuned.notes.0123456789abcdef0123456789abcdef.tmp"
ABANDONED = "staging/ingest-weights.bin-0123456789abcdef0123456789abcdef.part"
DRIFTED = "objects/checkpoint/0d/artifact__fixture-proj.tuned.model.bin"
MISSING = "objects/dataset/b9/artifact__fixture-proj.tuned.eval-table.csv"


def _damage_artifacts(store, drift=True):
    (store / ORPHAN).write_bytes(b"an orphan body")
    (store / STRAY_TMP).write_bytes(b"half a write")
    (store / ABANDONED).write_bytes(b"half an ingest")
    if drift:
        flip_byte(store / DRIFTED)
        (store / MISSING).unlink()


def _normalized(root, text):
    text = text.replace(str(root), "<root>")
    text = re.sub(r"\d{4}-\d{2}-\d{2}T\d{2}[:-]\d{2}[:-]\d{2}([._]\d{6})?Z", "<TS>", text)
    return re.sub(r"[0-9a-f]{32}", "<uuid>", text)


def _normalized_tree(root):
    """Path -> sorted contents, with the root, timestamps and uuids replaced (contents of JSON files too)."""
    tree = {}
    for rel, data in _files(root).items():
        try:
            content = _normalized(root, data.decode("utf-8"))
        except UnicodeDecodeError:
            content = hashlib.sha256(data).hexdigest()
        tree.setdefault(_normalized(root, rel), []).append(content)
    return {path: sorted(contents) for path, contents in tree.items()}


def test_artifact_repair_matches_contexta_and_keeps_what_contexta_deletes(cli, fixture_dir, tmp_path, contexta_ref):
    store = _ws(fixture_dir) / "artifacts"
    _damage_artifacts(store)
    drifted = (store / DRIFTED).read_bytes()
    theirs = tmp_path / "artifacts"
    shutil.copytree(str(store), str(theirs))
    plan = _repair(cli, fixture_dir, "plan", "--plane", "artifacts")
    assert plan.returncode == 0, plan
    contexta_actions = run_ref(contexta_ref, CONTEXTA_ARTIFACT_REPAIR, theirs)
    assert [action.replace(str(store), "<root>") for action in plan.json["actions"]] == \
        [action.replace(str(theirs), "<root>") for action in contexta_actions]

    result = _repair(cli, fixture_dir, "--plane", "artifacts")
    assert result.returncode == 1, result  # a drifted and a missing body come back only from a backup
    assert result.json["actions"] == plan.json["actions"]
    assert {p["code"] for p in result.json["problems"]} == {"artifact_missing"}
    assert len(result.json["problems"]) == 2

    ours_tree, theirs_tree = _normalized_tree(store), _normalized_tree(theirs)
    ours_tree.pop("staging/contexta-ops.lock")
    kept = [path for path in ours_tree if path.startswith("quarantine/staging/")]
    assert kept == ["quarantine/staging/<TS>/" + _normalized(store, ABANDONED[len("staging/"):])]
    assert ours_tree.pop(kept[0]) == ["half an ingest"]  # contexta deletes it; we keep it
    events = ours_tree.pop("history/quarantine/<TS>-<uuid>.json")
    staging_events = [event for event in events if '"abandoned_staging"' in event]
    assert len(staging_events) == 1
    theirs_events = theirs_tree.pop("history/quarantine/<TS>-<uuid>.json")
    assert sorted(set(events) - set(staging_events)) == sorted(theirs_events)
    assert ours_tree == theirs_tree  # objects, bindings, quarantine/orphans|bound, verification events
    bound = [path for path in store.glob("quarantine/bound/*/*")]
    assert len(bound) == 1 and T_FOLDER.match(bound[0].parent.name)
    assert re.match(r"^[0-9a-f]{32}-artifact__fixture-proj\.tuned\.model\.bin$", bound[0].name)
    assert bound[0].read_bytes() == drifted
    for event in store.glob("history/quarantine/*"):
        assert EVENT_NAME.match(event.name)


def test_artifact_repair_without_drift_leaves_a_clean_check(cli, fixture_dir):
    store = _ws(fixture_dir) / "artifacts"
    _damage_artifacts(store, drift=False)
    (store / "staging" / "ingest-open.part").write_bytes(b"an ingest still open")
    (store / "staging" / "ingest-open.session.json").write_text("{}")
    result = _repair(cli, fixture_dir, "--plane", "artifacts")
    assert result.returncode == 0, result
    assert result.json["post_apply_check"]["status"] == "SUCCESS"
    assert sorted(Path(path).name for path in result.json["quarantined_paths"]) == sorted(
        Path(rel).name for rel in (ORPHAN, STRAY_TMP, ABANDONED))
    for rel in (ORPHAN, STRAY_TMP, ABANDONED):
        assert not (store / rel).exists()
    assert (store / "staging" / "ingest-open.part").exists()  # paired with its session: contexta would delete it


def test_interrupted_artifact_write_is_rolled_back_by_repair(cli, fixture_dir, tmp_path):
    store = _ws(fixture_dir) / "artifacts"
    before = _files(store)
    package, _size, _digest = reseal_package(fixture_dir / "exports" / "artifact__fixture-proj.tuned.model",
                                             tmp_path / "other", b"other weights" * 100)
    args = ("--workspace", _ws(fixture_dir), "artifact", "import", package, "--conflict", "replace")
    rehearsal = tmp_path / "rehearsal"
    shutil.copytree(str(fixture_dir), str(rehearsal), symlinks=True)
    trace = tmp_path / "trace"
    assert cli("--workspace", _ws(rehearsal), *args[2:], env={"CONTEXTA_OPS_CRASH_TRACE": str(trace)}).returncode == 0
    body_in_place = trace.read_text().split().index("artifact:body-in-place") + 1
    assert cli(*args, env={"CONTEXTA_OPS_CRASH_AT": str(body_in_place)}).returncode == -9
    assert list((store / "staging").glob("*" + ops._WRITE_JOURNAL_SUFFIX))
    plan = _repair(cli, fixture_dir, "plan", "--plane", "artifacts")
    assert plan.returncode == 0 and plan.json["steps"][0]["action"] == "finish_interrupted_write", plan
    assert "rolled back" in plan.json["steps"][0]["detail"]
    result = _repair(cli, fixture_dir, "--plane", "artifacts")
    assert result.returncode == 0, result
    assert any(note.startswith("rolled_back:") for note in result.json["notes"])
    after = _files(store)
    after.pop("staging/contexta-ops.lock")
    assert {k: v for k, v in after.items() if not k.startswith("quarantine/")} == before  # as before the import


def test_fifos_are_never_opened_and_links_never_followed(cli, fixture_dir, tmp_path):
    ws = _ws(fixture_dir)
    outside = tmp_path / "outside.txt"
    outside.write_text("not the store's")
    os.mkfifo(str(ws / "records/segments/segment-000002.jsonl"))
    os.mkfifo(str(ws / "artifacts/objects/checkpoint/c6/fifo"))
    os.mkfifo(str(ws / "artifacts/staging/x.part"))
    os.symlink(str(outside), str(ws / "artifacts/objects/checkpoint/c6/link"))
    plan = cli("--workspace", ws, "repair", "plan", "--json", timeout=60)
    assert [step["action"] for step in plan.json["steps"]] == ["quarantine_orphan_body"], plan
    result = _repair(cli, fixture_dir, env=None)
    assert result.returncode == 1, result  # the FIFOs are named, and left for a person
    moved = list((ws / "artifacts/quarantine/orphans").glob("*/checkpoint/c6/link"))
    assert len(moved) == 1 and os.readlink(str(moved[0])) == str(outside) and outside.read_text() == "not the store's"
    left = {problem["path"] for problem in result.json["problems"]}
    assert left == {str(ws / "records/segments/segment-000002.jsonl"), str(ws / "artifacts/objects/checkpoint/c6/fifo"),
                    str(ws / "artifacts/staging/x.part")}


# -- outbox -------------------------------------------------------------------------------------------------------

GOOD = [{"replay_ref": "good-%d" % index, "family": "RECORD", "payload": {"i": index}, "sink_name": "local-jsonl-replay"}
        for index in range(3)]
MALFORMED = [b"not json\n", b"[1, 2]\n", b'{"family": "NOPE", "payload": {}}\n', b"\xff\xfe not utf-8\n",
             b'{"family": "RECORD"}\n', b'{"family": "RECORD", "payload": ' + b"[" * 70 + b"]" * 70 + b"}\n"]
TORN_OUTBOX = b'{"replay_ref": "torn", "fam'


def _outbox_with_malformed_lines(ws):
    outbox = ws / "cache" / "outbox" / ops.OUTBOX_FILE
    good = [(json.dumps(entry) + "\n").encode() for entry in GOOD]
    outbox.write_bytes(good[0] + MALFORMED[0] + MALFORMED[1] + good[1] + b"".join(MALFORMED[2:]) + good[2]
                       + TORN_OUTBOX)
    old = time.time() - 60  # still for a minute: the unterminated last line is torn, not being written
    os.utime(str(outbox), (old, old))
    return outbox, b"".join(good)


def _dead_letters(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record.pop("dead_lettered_at")
    return records


def test_outbox_repair_dead_letters_exactly_as_replay_would_and_delivers_nothing(cli, fixture_dir, tmp_path):
    ws = _ws(fixture_dir)
    outbox, good = _outbox_with_malformed_lines(ws)
    theirs = tmp_path / "replayed-copy"
    shutil.copytree(str(fixture_dir), str(theirs), symlinks=True)
    os.utime(str(_ws(theirs) / "cache/outbox" / ops.OUTBOX_FILE), (time.time() - 60,) * 2)
    replayed = cli("--workspace", _ws(theirs), "replay", "--json")
    assert replayed.json["malformed_count"] == len(MALFORMED) + 1

    result = _repair(cli, fixture_dir, "--plane", "outbox")
    assert result.returncode == 0, result
    assert result.json["dead_lettered_count"] == len(MALFORMED) + 1
    assert outbox.read_bytes() == good
    assert _dead_letters(outbox.parent / ops.DEAD_LETTER_FILE) == \
        _dead_letters(_ws(theirs) / "cache/outbox" / ops.DEAD_LETTER_FILE)
    assert not (ws / "exports" / "replayed").exists()  # nothing delivered
    assert result.json["post_apply_check"]["plane_results"]["outbox"]["malformed_pending"] == 0


def test_outbox_repair_under_a_running_replay_is_exit_4(cli, fixture_dir):
    from test_safety import _hold_lock
    ws = _ws(fixture_dir)
    _outbox_with_malformed_lines(ws)
    holder = _hold_lock(ws / "cache" / "outbox" / ops.REPLAY_LOCK_FILE, "flock")
    try:
        before = snapshot(fixture_dir)
        result = _repair(cli, fixture_dir, "--plane", "outbox")
        after = snapshot(fixture_dir)
        after.pop("workspace/..contexta.contexta-ops.lock", None)  # the workspace lock, beside it: taken first
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 4 and result.json["error"]["code"] == "workspace_in_use", result
    assert after == before


def test_lines_a_writer_appends_during_the_repair_are_kept(pyz, fixture_dir):
    """A writer appending (open, append, close - as contexta's dispatch does) all through the repair loses no
    line: each is in the new outbox exactly once (replay's way of carrying late appends over)."""
    ws = _ws(fixture_dir)
    outbox = ws / "cache" / "outbox" / ops.OUTBOX_FILE
    outbox.write_bytes(b"".join(MALFORMED[:2]) + b"".join((json.dumps(e) + "\n").encode() for e in GOOD) * 20000)
    stop = threading.Event()
    written = []

    def writer():
        index = 0
        while not stop.is_set():
            with open(str(outbox), "ab") as handle:
                handle.write((json.dumps({"replay_ref": "late-%d" % index, "family": "RECORD", "payload": {}})
                              + "\n").encode())
            written.append("late-%d" % index)
            index += 1
            time.sleep(0.001)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        completed = subprocess.run([sys.executable, str(pyz), "--workspace", str(ws), "--backup-root",
                                    str(fixture_dir / "bk"), "repair", "--plane", "outbox", "--json"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    finally:
        time.sleep(0.1)
        stop.set()
        thread.join()
    assert completed.returncode == 0, completed.stderr
    refs = [json.loads(line)["replay_ref"] for line in outbox.read_text().splitlines()]
    late = [ref for ref in refs if ref.startswith("late-")]
    # every appended line, exactly once (a line that reached the old file after the switch comes after its successors)
    assert written and sorted(late) == sorted(written)


# -- the operation: plan, dry run, safety backup, refusal, interruption ----------------------------------------

def _damage_everything(ws):
    _tear_segment(ws)
    _damage_artifacts(ws / "artifacts", drift=False)
    _outbox_with_malformed_lines(ws)


def test_plan_and_dry_run_change_no_byte_and_list_every_step(cli, fixture_dir):
    _damage_everything(_ws(fixture_dir))
    before = snapshot(fixture_dir)
    plan = _repair(cli, fixture_dir, "plan")
    dry = _repair(cli, fixture_dir, "--dry-run")
    assert snapshot(fixture_dir) == before
    assert not (fixture_dir / "bk").exists()
    assert plan.returncode == dry.returncode == 0, (plan, dry)
    assert [step["action"] for step in plan.json["steps"]] == [
        "repair_truncated_tails", "quarantine_orphan_body", "quarantine_orphan_body", "remove_abandoned_staging",
        "dead_letter_malformed"]
    assert [(step["action"], step["path"]) for step in dry.json["steps"]] == \
        [(step["action"], step["path"]) for step in plan.json["steps"]] and dry.json["step_count"] == 5
    assert plan.json["create_safety_backup"] and plan.json["refusals"] == []
    text = cli("--workspace", _ws(fixture_dir), "repair", "plan")
    assert "segment-000001.before-tail-repair-" in text.stdout and "dead_letter.jsonl" in text.stdout
    applied = _repair(cli, fixture_dir)
    assert applied.returncode == 0, applied
    assert [step["action"] for step in applied.json["steps"]] == [step["action"] for step in plan.json["steps"]]
    assert _repair(cli, fixture_dir, "plan").json["step_count"] == 0  # nothing left to do


def test_safety_backup_first_and_a_clean_check_after(cli, fixture_dir):
    ws = _ws(fixture_dir)
    _damage_everything(ws)
    before = snapshot(ws)
    result = _repair(cli, fixture_dir)
    assert result.returncode == 0, result
    ref = result.json["safety_backup_ref"]
    assert ref.startswith("pre-repair-safety-")
    listing = {entry["backup_ref"]: entry for entry in cli("--backup-root", fixture_dir / "bk", "backup", "list",
                                                           "--json").json["backups"]}
    assert listing[ref]["kind"] == "safety"
    assert cli("--backup-root", fixture_dir / "bk", "backup", "verify", ref).returncode == 0
    parts = ("records/", "artifacts/", "cache/outbox/")
    held = {k: v[:2] for k, v in snapshot(fixture_dir / "bk" / ref / "workspace").items() if k.startswith(parts)}
    assert held == {k: v[:2] for k, v in before.items() if k.startswith(parts)}  # the damaged workspace, whole
    checked = cli("--workspace", ws, "check", "--json")  # clean, but for the dead letters waiting for a person
    assert [problem["code"] for problem in checked.json["problems"]] == ["outbox_dead_letters"], checked


def test_no_safety_backup_when_the_configuration_says_so(cli, fixture_dir):
    _damage_everything(_ws(fixture_dir))
    result = _repair(cli, fixture_dir, "--set", "recovery.create_backup_before_restore=false")
    assert result.returncode == 0, result
    assert result.json["safety_backup_ref"] is None and not (fixture_dir / "bk").exists()


def test_a_healthy_workspace_is_left_as_it_is(cli, fixture_dir):
    before = snapshot(_ws(fixture_dir))
    result = _repair(cli, fixture_dir)
    assert result.returncode == 0, result
    assert result.json["steps"] == [] and not result.json["applied"] and result.json["safety_backup_ref"] is None
    assert snapshot(_ws(fixture_dir)) == before


def test_no_repair_under_a_live_writer(cli, fixture_dir):
    from test_safety import _hold_lock
    ws = _ws(fixture_dir)
    _damage_everything(ws)
    holder = _hold_lock(ws / "metadata" / "ledger.db", "lockf")
    try:
        before = snapshot(fixture_dir)
        plan = _repair(cli, fixture_dir, "plan")
        result = _repair(cli, fixture_dir)
        after = snapshot(fixture_dir)
        after.pop("workspace/..contexta.contexta-ops.lock", None)  # the workspace lock, beside it: taken first
    finally:
        holder.kill()
        holder.wait()
    assert plan.returncode == 1 and plan.json["refusals"][0]["code"] == "metadata_in_use", plan
    assert result.returncode == 4 and result.json["error"]["code"] == "workspace_in_use", result
    assert len(result.stderr.strip().splitlines()) == 1
    assert after == before  # no safety backup, no scratch, no journal, no lock files in the stores


def test_a_killed_repair_blocks_a_restore_and_is_finished_by_the_next_repair(cli, fixture_dir):
    ws = _ws(fixture_dir)
    base = cli("--workspace", ws, "--backup-root", fixture_dir / "bk", "backup", "create", "--json").json
    _damage_everything(ws)
    trace = fixture_dir / "trace"
    rehearsal = fixture_dir / "rehearsal"
    shutil.copytree(str(fixture_dir / "workspace"), str(rehearsal / "workspace"), symlinks=True)
    assert cli("--workspace", rehearsal / "workspace/.contexta", "--backup-root", rehearsal / "bk", "repair",
               env={"CONTEXTA_OPS_CRASH_TRACE": str(trace)}).returncode == 0
    committed = trace.read_text().split().index("repair:journal-committed") + 1
    killed = _repair(cli, fixture_dir, env={"CONTEXTA_OPS_CRASH_AT": str(committed + 1)})
    assert killed.returncode == -9
    journal = ops._repair_journal_path(ws)
    assert json.loads(journal.read_text())["state"] == "applying"
    status = cli("--workspace", ws, "--backup-root", fixture_dir / "bk", "status", "--json")
    assert "repair_interrupted" in status.json["in_use"]
    refused = cli("--workspace", ws, "--backup-root", fixture_dir / "bk", "restore", base["backup_ref"], "--json")
    assert refused.returncode == 3 and refused.json["error"]["code"] == "workspace_unsafe", refused
    finished = _repair(cli, fixture_dir)
    assert finished.returncode == 0, finished
    assert "interrupted_repair:finished" in finished.json["notes"]
    assert not journal.exists()
    checked = cli("--workspace", ws, "check", "--json")
    assert [problem["code"] for problem in checked.json["problems"]] in ([], ["outbox_dead_letters"]), checked


def test_library_api(fixture_dir):
    ws = _ws(fixture_dir)
    _tear_segment(ws)
    config = ops.load_config(environ={}, workspace=ws, backup_root=fixture_dir / "bk")
    plan = ops.plan_repair(config, planes=["records"])
    assert plan.actions == ("repair_truncated_tails:%s" % (ws / SEGMENT),) and plan.planes == ("records",)
    assert set(plan.to_dict()) >= {"actions", "steps", "left_alone", "refusals", "create_safety_backup"}
    result = ops.apply_repair(config, plan)
    assert result.status == "SUCCESS" and result.repaired_segments == (1,) and result.applied
    assert set(result.to_dict()) >= {"status", "repaired_segments", "quarantined_paths", "rebuilt_indexes",
                                     "integrity_state", "safety_backup_ref", "post_apply_check"}
    with pytest.raises(ops.UsageError):
        ops.plan_repair(config, planes=["metadata"])
