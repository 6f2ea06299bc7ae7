"""Crash campaign: every mutating operation killed with SIGKILL at each of its durable steps and at moments
spread over its run, then checked: the workspace is the old or the new one, no entry is lost or delivered
twice, nothing incomplete lists as complete or verifies, and the next invocation cleans up or resumes.

With CONTEXTA_OPS_CAMPAIGN=full (tests/run_all.sh sets it for one interpreter per run) every step is a
kill point - more than 200 in all; otherwise every fifth, starting at CONTEXTA_OPS_CAMPAIGN_OFFSET (0-4;
run_all.sh gives each interpreter its own), so that the interpreters of a run together cover every point.
The steps are learnt from a traced rehearsal of each operation, never counted by hand.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import contexta_ops as ops
from helpers import Cli, delivered_refs, jsonl_objects, reseal_package, snapshot

pytestmark = pytest.mark.slow

FULL = os.environ.get("CONTEXTA_OPS_CAMPAIGN") == "full"
STRIDE = 5
OFFSET = int(os.environ.get("CONTEXTA_OPS_CAMPAIGN_OFFSET") or 0) % STRIDE
FULL_TIMED_FRACTIONS = (0.15, 0.35, 0.55, 0.75)  # kills at moments spread over a run, beside the steps
TIMED_FRACTIONS = FULL_TIMED_FRACTIONS if FULL else (0.5,)


def kill_points(step_count, full=FULL, offset=OFFSET):
    """The 1-based durable steps to kill at: every one in a full campaign, else every fifth from ``offset``."""
    return list(range(1 if full else 1 + offset, step_count + 1, 1 if full else STRIDE))


def _ws(root):
    return root / "fx" / "workspace" / ".contexta"


def _config(root, **flags):
    return ops.load_config(environ={}, workspace=_ws(root), backup_root=root / "bk", **flags)


class Operation:
    """One mutating operation under test; subclasses say how to set it up and what must hold."""

    name = ""

    def __init__(self, cli, pristine):
        self.cli = cli
        self.pristine = pristine

    def prepare(self, root):
        shutil.copytree(str(self.pristine), str(root / "fx"), symlinks=True)
        self.setup(root)

    def setup(self, root):
        pass

    def args(self, root):
        raise NotImplementedError

    def after_kill(self, root):
        """What must hold right after the kill (may run read-only commands)."""

    def resume(self, root):
        """Run the next invocation and check the final state."""
        result = self.cli(*self.args(root), "--json")
        assert result.returncode == 0, result

    def verify_all_complete_backups(self, root):
        """Every backup that lists as complete verifies (checked in-process: the checks need no new process)."""
        config = ops.UnifiedConfig(recovery=ops.RecoveryConfig(backup_root=root / "bk"))
        listing = [entry.to_dict() for entry in ops.list_backups(config)]
        for entry in listing:
            if entry["complete"]:
                result = ops.verify_backup(config, entry["location"])
                assert result.status == "SUCCESS", (entry, result)
        return listing


class BackupCreate(Operation):
    name = "backup create"
    extra = ()

    def setup(self, root):
        self.before = snapshot(_ws(root))

    def args(self, root):
        return ("--workspace", _ws(root), "--backup-root", root / "bk", "backup", "create") + self.extra

    def after_kill(self, root):
        assert snapshot(_ws(root)) == self.before  # the source is never touched
        self.verify_all_complete_backups(root)

    def resume(self, root):
        Operation.resume(self, root)
        listing = self.verify_all_complete_backups(root)
        assert all(entry["complete"] for entry in listing), listing  # leftovers cleaned


class IncrementalBackup(BackupCreate):
    name = "backup create --incremental"
    extra = ("--incremental",)

    def setup(self, root):
        config = _config(root)
        ops.create_workspace_backup(config, ops.plan_workspace_backup(config, label="base"))
        BackupCreate.setup(self, root)


class ArchiveCreate(BackupCreate):
    name = "backup create --archive"

    def args(self, root):
        return ("--workspace", _ws(root), "backup", "create", "--archive", root / "b.tar")

    def after_kill(self, root):
        assert snapshot(_ws(root)) == self.before
        if (root / "b.tar").exists():  # only ever complete: renamed into place when whole
            assert ops.verify_backup(_config(root), str(root / "b.tar")).status == "SUCCESS"

    def resume(self, root):
        if not (root / "b.tar").exists():
            Operation.resume(self, root)
        assert ops.verify_backup(_config(root), str(root / "b.tar")).status == "SUCCESS"
        assert [name for name in os.listdir(str(root)) if ".partial-" in name] == []


class RestoreApply(Operation):
    name = "restore apply"

    def setup(self, root):
        config = _config(root)
        self.source = self.make_source(root, config)
        self.new = snapshot(_ws(root))
        ws = _ws(root)
        with open(str(ws / "records/segments/segment-000001.jsonl"), "ab") as handle:
            handle.write(b'{"appended_at":"2026-01-01T00:00:00Z","record":{},"sequence":51}\n')
        shutil.rmtree(str(ws / "artifacts/objects/report"))
        (ws / "exports/made-after.txt").write_text("kept")
        self.old = snapshot(ws)

    def make_source(self, root, config):
        return ops.create_workspace_backup(config, ops.plan_workspace_backup(config, label="base")).backup_ref

    def args(self, root):
        return ("--workspace", _ws(root), "--backup-root", root / "bk", "restore", self.source)

    def state(self, root):
        current = snapshot(_ws(root))
        if current == self.old:
            return "old"
        current.pop("exports/made-after.txt", None)
        return "new" if current == self.new else "neither"

    def after_kill(self, root):
        assert self.state(root) in ("old", "new")

    def resume(self, root):
        Operation.resume(self, root)
        assert self.state(root) == "new"
        assert [name for name in os.listdir(str(_ws(root).parent)) if "restore" in name] == []
        self.verify_all_complete_backups(root)


class ArchiveRestore(RestoreApply):
    name = "restore apply from an archive"

    def make_source(self, root, config):
        archive = root / "b.tar.gz"
        ops.create_backup_archive(config, ops.plan_workspace_backup(config), archive, compress=True)
        return str(archive)


class PartialRestore(RestoreApply):
    """--only artifacts: the same switch-over, for one part; the rest must come through byte for byte."""

    name = "restore apply --only artifacts"

    def setup(self, root):
        config = _config(root)
        self.source = self.make_source(root, config)
        ws = _ws(root)
        backed_up = snapshot(ws)
        shutil.rmtree(str(ws / "artifacts/objects/report"))
        (ws / "records/quarantine/kept.txt").write_text("not the backup's, not artifacts: kept")
        with open(str(ws / "cache/outbox/failed_deliveries.jsonl"), "a") as handle:
            handle.write('{"replay_ref": "late", "family": "RECORD", "payload": {}}\n')
        (ws / "exports/made-after.txt").write_text("kept")
        self.old = snapshot(ws)
        self.new = {path: entry for path, entry in self.old.items() if not path.startswith("artifacts")}
        self.new.update({path: entry for path, entry in backed_up.items() if path.startswith("artifacts")})
        self.new.pop("exports/made-after.txt")

    def args(self, root):
        return RestoreApply.args(self, root) + ("--only", "artifacts")


class RelocatedRestore(RestoreApply):
    """Stores relocated outside the workspace: one restore swaps several trees under one journal."""

    name = "restore apply of relocated stores"

    def setup(self, root):
        ws = _ws(root)
        self.elsewhere = root / "elsewhere"
        self.elsewhere.mkdir()
        for live, moved in (("artifacts", "arts"), ("cache/outbox", "outbox"), ("records", "recs")):
            shutil.move(str(ws / live), str(self.elsewhere / moved))
        self.config_file = root / "contexta.json"
        self.config_file.write_text(json.dumps({
            "artifacts": {"root_path": str(self.elsewhere / "arts")}, "records": {"root_path": str(self.elsewhere / "recs")},
            "recovery": {"outbox_root": str(self.elsewhere / "outbox"), "backup_root": str(root / "bk")}}))
        config = ops.load_config(self.config_file, environ={}, workspace=ws)
        self.source = ops.create_workspace_backup(config, ops.plan_workspace_backup(config, label="base")).backup_ref
        self.new = self.snapshot_all(root)
        with open(str(self.elsewhere / "recs/segments/segment-000001.jsonl"), "ab") as handle:
            handle.write(b'{"appended_at":"2026-01-01T00:00:00Z","record":{},"sequence":51}\n')
        shutil.rmtree(str(self.elsewhere / "arts/objects/report"))
        (self.elsewhere / "outbox/failed_deliveries.jsonl").write_text("")
        (ws / "exports/made-after.txt").write_text("kept")
        self.old = self.snapshot_all(root)

    def snapshot_all(self, root):
        trees = {"ws": _ws(root), "arts": self.elsewhere / "arts", "outbox": self.elsewhere / "outbox",
                 "recs": self.elsewhere / "recs"}
        return {name: snapshot(path) for name, path in trees.items()}

    def args(self, root):
        return ("--config", self.config_file, "--workspace", _ws(root), "restore", self.source)

    def state(self, root):
        current = self.snapshot_all(root)
        if current == self.old:
            return "old"
        current["ws"].pop("exports/made-after.txt", None)
        return "new" if current == self.new else "neither"

    def after_kill(self, root):
        """Several trees cannot swap in one step: between two swaps each tree is whole, old or new, and the
        journal that names them all is there for the next run to finish with."""
        if self.state(root) in ("old", "new"):
            return
        assert ops._journal_path(_ws(root)).exists()
        current = self.snapshot_all(root)
        current["ws"].pop("exports/made-after.txt", None)
        old = dict(self.old, ws={k: v for k, v in self.old["ws"].items() if k != "exports/made-after.txt"})
        for name, tree in current.items():
            assert tree in (old[name], self.new[name]), name

    def resume(self, root):
        RestoreApply.resume(self, root)
        assert sorted(os.listdir(str(self.elsewhere))) == ["arts", "outbox", "recs"]  # no copy left behind


class Replay(Operation):
    name = "replay"
    count = 3000

    def setup(self, root):
        outbox = _ws(root) / "cache/outbox/failed_deliveries.jsonl"
        with open(str(outbox), "wb") as handle:
            for index in range(self.count):
                handle.write((json.dumps({"replay_ref": "ref-%05d" % index, "family": ("RECORD", "CONTEXT")[index % 2],
                                          "sink_name": "local-jsonl-replay", "payload": {"i": index}}) + "\n").encode())

    def args(self, root):
        return ("--workspace", _ws(root), "replay")

    def refs(self, root, killed=False):
        delivered = delivered_refs(_ws(root) / "exports/replayed", killed)
        outbox = _ws(root) / "cache/outbox/failed_deliveries.jsonl"
        pending = [json.loads(line)["replay_ref"] for line in outbox.read_text().splitlines()]
        return delivered, pending

    def after_kill(self, root):
        delivered, pending = self.refs(root, killed=True)
        assert len(delivered) == len(set(delivered)), "delivered twice"
        assert set(delivered) | set(pending) == {"ref-%05d" % i for i in range(self.count)}, "lost"

    def resume(self, root):
        Operation.resume(self, root)
        delivered, pending = self.refs(root)
        assert pending == [] and sorted(delivered) == ["ref-%05d" % i for i in range(self.count)]


class Requeue(Operation):
    name = "replay requeue"

    def setup(self, root):
        outbox = _ws(root) / "cache/outbox"
        (outbox / "failed_deliveries.jsonl").write_bytes(b"".join(
            (json.dumps({"replay_ref": "p-%d" % i, "family": "RECORD", "payload": {}}) + "\n").encode()
            for i in range(10)))
        (outbox / "dead_letter.jsonl").write_bytes(b"".join(
            (json.dumps({"replay_ref": "d-%d" % i, "family": "RECORD", "payload": {}, "attempts": 5}) + "\n").encode()
            for i in range(50)))

    def args(self, root):
        return ("--workspace", _ws(root), "replay", "requeue")

    def places(self, root, killed=False):
        outbox = _ws(root) / "cache/outbox"
        found = {}
        for name in ("failed_deliveries.jsonl", "dead_letter.jsonl"):
            # requeue appends to the outbox in place (a kill can tear its last line); it replaces dead_letter
            for line in jsonl_objects(outbox / name, killed and name == "failed_deliveries.jsonl"):
                found.setdefault(line["replay_ref"], []).append(name)
        journal = outbox / "requeue.journal.json"
        journaled = {json.loads(line)["replay_ref"] for line in json.loads(journal.read_text())["lines"]} \
            if journal.exists() else set()
        return found, journaled

    def after_kill(self, root):
        found, journaled = self.places(root, killed=True)
        assert all(len(places) == 1 for places in found.values()), found  # never in both
        expected = {"p-%d" % i for i in range(10)} | {"d-%d" % i for i in range(50)}
        assert set(found) | journaled == expected  # what is in neither file is in the journal

    def resume(self, root):
        Operation.resume(self, root)
        found, journaled = self.places(root)
        assert journaled == set()
        assert sorted(found) == sorted({"p-%d" % i for i in range(10)} | {"d-%d" % i for i in range(50)})
        assert all(places == ["failed_deliveries.jsonl"] for places in found.values())


class ArtifactImport(Operation):
    name = "artifact import"
    conflict = "error"

    def setup(self, root):
        self.store = root / "store"
        self.store.mkdir()  # an empty store: a kill before the import made anything leaves one to verify
        self.package = root / "fx" / "exports" / "artifact__fixture-proj.tuned.model"

    def args(self, root):
        return ("artifact", "import", self.package, "--store", self.store, "--conflict", self.conflict)

    def binding_size(self):
        path = self.store / "bindings" / "artifact__fixture-proj.tuned.model.binding.json"
        return json.loads(path.read_text())["size_bytes"] if path.exists() else None

    def after_kill(self, root):
        result = self.cli("artifact", "verify", "--all", "--store", self.store, "--json")
        assert result.returncode == 0, result  # the next command rolled the write back or forward
        assert self.binding_size() in self.allowed_sizes()

    def allowed_sizes(self):
        return (None, 13000)

    def resume(self, root):
        result = self.cli(*self.args(root), "--json")
        assert result.returncode == 0, result
        assert self.binding_size() == 13000
        assert self.cli("artifact", "verify", "--all", "--store", self.store).returncode == 0


class ArtifactReplace(ArtifactImport):
    name = "artifact import --conflict replace"
    conflict = "replace"

    def setup(self, root):
        ArtifactImport.setup(self, root)
        other, _, _ = reseal_package(self.package, root / "other-package", b"older weights" * 300)
        ops.import_export_package(ops.ArtifactStore(ops.VaultConfig(root_path=self.store)), other)

    def allowed_sizes(self):
        return (3900, 13000)


class Prune(Operation):
    name = "backup prune"

    def setup(self, root):
        config = _config(root)
        for index in range(4):
            ops.create_workspace_backup(config, ops.plan_workspace_backup(config, label="b%d" % index))
        self.newest = ops.list_backups(config)[-1].backup_ref

    def args(self, root):
        return ("--backup-root", root / "bk", "backup", "prune", "--keep-last", "1")

    def after_kill(self, root):
        listing = self.verify_all_complete_backups(root)
        assert self.newest in [entry["backup_ref"] for entry in listing if entry["complete"]]

    def resume(self, root):
        Operation.resume(self, root)
        listing = self.verify_all_complete_backups(root)
        assert [entry["backup_ref"] for entry in listing] == [self.newest]


class Repair(Operation):
    """Every plane damaged at once: a torn segment tail with the manifest ahead of it, a stale index pointer,
    an orphan body, a stray temp body, an abandoned staging file, malformed outbox lines and a torn outbox tail.
    After any kill each file Contexta reads is the damaged or the repaired one - all of them one or the other
    once the journal is gone - and the next run ends with every plane repaired and a clean check."""

    name = "repair"
    expected = None
    NOT_DATA = re.compile(r"(^|/)(tmp[0-9a-f]{8})(/|$)|(^|/)(contexta-ops|replay)\.lock$")

    def setup(self, root):
        self.damage(_ws(root))
        self.old = self.view(root)
        if self.expected is None:  # what a whole run leaves, from a run of its own (timestamps aside)
            other = root.parent / (root.name + "-expected")
            shutil.copytree(str(self.pristine), str(other / "fx"), symlinks=True)
            self.damage(_ws(other))
            config = _config(other)
            result = ops.apply_repair(config, ops.plan_repair(config))
            assert result.status == "SUCCESS", result
            Repair.expected = self.view(other)
            shutil.rmtree(str(other))
        self.new = Repair.expected
        assert self.new != self.old

    @staticmethod
    def damage(ws):
        with open(str(ws / "records/segments/segment-000001.jsonl"), "ab") as handle:
            handle.write(b'{"appended_at":"2026-11-26T03:48:1')
        manifest = json.loads((ws / "records/manifest.json").read_text())
        manifest.update(last_committed_sequence=51, next_sequence=52, current_segment_record_count=51)
        (ws / "records/manifest.json").write_text(json.dumps(manifest))
        with open(str(ws / "records/indexes/run_ref/run__fixture-proj.tuned.jsonl"), "ab") as handle:
            handle.write(b'{"offset":99,"segment_id":1,"sequence":99}\n')
        (ws / "artifacts/objects/checkpoint/c6/left-behind.bin").write_bytes(b"orphan")
        (ws / "artifacts/objects/report/ed/notes.0123abcd.tmp").write_bytes(b"half a write")
        (ws / "artifacts/staging/ingest-w-0123.part").write_bytes(b"half an ingest")
        outbox = ws / "cache/outbox/failed_deliveries.jsonl"
        with open(str(outbox), "ab") as handle:
            handle.write(b'not json\n{"family": "NOPE", "payload": {}}\n{"replay_ref": "torn", "fam')
        os.utime(str(outbox), (time.time() - 60,) * 2)

    def args(self, root):
        return ("--workspace", _ws(root), "--backup-root", root / "bk", "repair")

    def view(self, root):
        """Each file of the workspace Contexta reads: path and content, with timestamps, uuids and the root masked."""
        ws = _ws(root)
        found = {}
        for rel, entry in snapshot(ws).items():
            if self.NOT_DATA.search(rel) or entry[0] != "file":
                continue
            text = (ws / rel).read_bytes().decode("utf-8", "replace").replace(str(root), "<root>")
            found.setdefault(self.mask(rel), []).append(self.mask(text))
        return {path: sorted(contents) for path, contents in found.items()}

    @staticmethod
    def mask(text):
        text = re.sub(r"\d{4}-?\d{2}-?\d{2}T\d{2}[:-]?\d{2}[:-]?\d{2}([._]\d{6})?Z", "<TS>", text)
        return re.sub(r"[0-9a-f]{32}", "<uuid>", text)

    def after_kill(self, root):
        current = self.view(root)
        if current in (self.old, self.new):
            return
        journal = ops._repair_journal_path(_ws(root))
        assert json.loads(journal.read_text())["state"] == "applying", "half repaired without a committed journal"
        for path in set(current) | set(self.old) | set(self.new):  # between renames: every file old or new
            assert set(current.get(path, [])) <= set(self.old.get(path, [])) | set(self.new.get(path, [])), path
        self.verify_all_complete_backups(root)

    def resume(self, root):
        Operation.resume(self, root)
        assert self.view(root) == self.new
        assert not ops._repair_journal_path(_ws(root)).exists()
        leftovers = [rel for rel in snapshot(_ws(root)) if re.search(r"(^|/)tmp[0-9a-f]{8}(/|$)", rel)]
        assert leftovers == []
        self.verify_all_complete_backups(root)


OPERATIONS = [BackupCreate, IncrementalBackup, ArchiveCreate, RestoreApply, ArchiveRestore, PartialRestore,
              RelocatedRestore, Replay, Requeue, ArtifactImport, ArtifactReplace, Prune, Repair]


@pytest.fixture(scope="module")
def rehearsal(pyz, pristine_fixture, tmp_path_factory):
    """The durable steps of an operation and how long it took, from a traced run on its own copy (once each)."""
    learnt = {}

    def steps_and_duration(operation_class):
        if operation_class not in learnt:
            root = tmp_path_factory.mktemp("rehearsal")
            operation = operation_class(Cli(pyz, root), pristine_fixture)
            operation.prepare(root)
            trace = root / "trace"
            started = time.monotonic()
            result = operation.cli(*operation.args(root), env={"CONTEXTA_OPS_CRASH_TRACE": str(trace)})
            assert result.returncode == 0, result
            learnt[operation_class] = trace.read_text().split(), time.monotonic() - started
            shutil.rmtree(str(root))
        return learnt[operation_class]

    return steps_and_duration


@pytest.mark.parametrize("operation_class", OPERATIONS, ids=[op.name for op in OPERATIONS])
def test_kill_9_everywhere(cli, pristine_fixture, pyz, tmp_path, operation_class, rehearsal):
    operation = operation_class(cli, pristine_fixture)
    steps, duration = rehearsal(operation_class)
    for crash_at in kill_points(len(steps)):
        root = tmp_path / ("step%d" % crash_at)
        operation.prepare(root)
        killed = cli(*operation.args(root), env={"CONTEXTA_OPS_CRASH_AT": str(crash_at)})
        assert killed.returncode == -9, (steps[crash_at - 1], killed)
        operation.after_kill(root)
        operation.resume(root)
        shutil.rmtree(str(root))  # a full campaign would otherwise leave gigabytes behind
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONTEXTA_OPS_CRASH")}
    for fraction in TIMED_FRACTIONS:
        root = tmp_path / ("timed%d" % int(fraction * 100))
        operation.prepare(root)
        process = subprocess.Popen([sys.executable, str(pyz)] + [str(arg) for arg in operation.args(root)],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(duration * fraction)
        process.send_signal(signal.SIGKILL)
        process.wait()
        operation.after_kill(root)
        operation.resume(root)
        shutil.rmtree(str(root))


def test_campaign_size(rehearsal):
    """A full campaign kills at more than 200 points, and the five offsets of a sampled one share them out."""
    steps = {operation_class.name: len(rehearsal(operation_class)[0]) for operation_class in OPERATIONS}
    full_points = sum(len(kill_points(count, full=True)) + len(FULL_TIMED_FRACTIONS) for count in steps.values())
    assert full_points >= 200, steps
    for name, count in steps.items():
        shares = [kill_points(count, full=False, offset=offset) for offset in range(STRIDE)]
        assert sorted(sum(shares, [])) == kill_points(count, full=True), (name, shares)
    this_run = sum(len(kill_points(count)) + len(TIMED_FRACTIONS) for count in steps.values())
    assert this_run >= (full_points if FULL else 10), steps
