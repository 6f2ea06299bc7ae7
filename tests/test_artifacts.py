"""Artifacts: Contexta's store byte for byte, hostile packages refused, crash-safe imports."""

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
from helpers import reseal_package, run_ref, snapshot

PACKAGE = "exports/artifact__fixture-proj.tuned.model"
REF = "artifact:fixture-proj.tuned.model"


def _ws_store(fixture_dir):
    return fixture_dir / "workspace" / ".contexta" / "artifacts"


def _package(fixture_dir):
    return fixture_dir / PACKAGE


def _import(cli, store, package, *extra):
    return cli("artifact", "import", package, "--store", store, "--create-store", "--json", *extra)


CONTEXTA_INSPECT = r"""
import json, sys
from contexta.store.artifacts import ArtifactStore, VaultConfig, inspect_store, verify_all, import_export_package
store = ArtifactStore(VaultConfig(root_path=sys.argv[1]))
if len(sys.argv) > 2:
    receipt = import_export_package(store, sys.argv[2])
sweep = verify_all(store)
summary = inspect_store(store)
print(json.dumps({"artifact_count": summary.artifact_count, "verified_count": summary.verified_count,
                  "orphan_count": summary.orphan_count, "missing": list(sweep.missing_refs),
                  "drifted": list(sweep.drifted_refs), "refs": store.list_refs(),
                  "body": str(store.get_artifact(store.list_refs()[0]).path) if store.list_refs() else None}))
"""


def test_contextas_package_imports_here_and_contexta_reads_our_store_as_verified(cli, fixture_dir, tmp_path,
                                                                                  contexta_ref):
    store = tmp_path / "store"
    result = _import(cli, store, _package(fixture_dir))
    assert result.returncode == 0, result
    assert result.json["outcome"] == "imported"
    theirs = run_ref(contexta_ref, CONTEXTA_INSPECT, store)
    assert (theirs["artifact_count"], theirs["verified_count"], theirs["orphan_count"]) == (1, 1, 0)
    assert theirs["body"] == str(store / "objects/checkpoint/0d/artifact__fixture-proj.tuned.model.bin")


def test_our_export_imports_into_contexta_and_verifies(cli, fixture_dir, tmp_path, contexta_ref):
    exported = cli("--workspace", fixture_dir / "workspace/.contexta", "artifact", "export", REF, "--export-root",
                   tmp_path / "out", "--json")
    assert exported.returncode == 0, exported
    package = Path(exported.json["export_directory"])
    assert sorted(os.listdir(str(package))) == sorted(os.listdir(str(_package(fixture_dir))))
    for name in ("manifest.snapshot.json", "artifact__fixture-proj.tuned.model.binding.json",
                 "artifact__fixture-proj.tuned.model.bin"):
        assert (package / name).read_bytes() == (_package(fixture_dir) / name).read_bytes(), name
    ours_meta = json.loads((package / "export.package.json").read_text())
    theirs_meta = json.loads((_package(fixture_dir) / "export.package.json").read_text())
    assert {k: v for k, v in ours_meta.items() if k != "exported_at"} == \
        {k: v for k, v in theirs_meta.items() if k != "exported_at"}
    theirs = run_ref(contexta_ref, CONTEXTA_INSPECT, tmp_path / "their-store", package)
    assert (theirs["verified_count"], theirs["missing"], theirs["drifted"]) == (1, [], [])


CONTEXTA_PUT = r"""
import json, sys
from pathlib import Path
from contexta.contract import ArtifactManifest
from contexta.store.artifacts import ArtifactStore, VaultConfig
store = ArtifactStore(VaultConfig(root_path=sys.argv[1]))
manifest = ArtifactManifest(artifact_ref="artifact:p.r.notes", artifact_kind="report", created_at="2024-01-01T00:00:00Z",
    producer_ref="contexta.recovery.example", run_ref="run:p.r", location_ref=sys.argv[3])
receipt = store.put_artifact(manifest, sys.argv[2])
print(json.dumps({"path": str(receipt.path)}))
"""


def test_put_writes_contextas_binding_and_paths(cli, tmp_path, contexta_ref):
    body = tmp_path / "notes.txt"
    body.write_bytes(b"some notes\n")
    ours = tmp_path / "ours"
    manifest = ops.ArtifactManifest(artifact_ref="artifact:p.r.notes", artifact_kind="report",
                                    created_at="2024-01-01T00:00:00Z", producer_ref="contexta.recovery.example",
                                    run_ref="run:p.r", location_ref="vault://p/r/notes.txt")
    receipt = ops.ArtifactStore(ops.VaultConfig(root_path=ours)).put_artifact(manifest, body)
    theirs = run_ref(contexta_ref, CONTEXTA_PUT, tmp_path / "theirs", body, "vault://p/r/notes.txt")
    assert Path(theirs["path"]).relative_to(tmp_path / "theirs") == receipt.path.relative_to(ours)
    mine = json.loads((ours / "bindings/artifact__p.r.notes.binding.json").read_text())
    contextas = json.loads((tmp_path / "theirs/bindings/artifact__p.r.notes.binding.json").read_text())
    for key in ("binding_id", "created_at"):
        mine.pop(key), contextas.pop(key)
    assert mine == contextas
    verified = run_ref(contexta_ref, CONTEXTA_INSPECT, ours)
    assert verified["verified_count"] == 1 and verified["orphan_count"] == 0


def test_no_suffix_split_for_artifacts_we_put(cli, tmp_path):
    """Contexta stores a suffixless location's body under the source's suffix, where no reader looks (11.14)."""
    body = tmp_path / "notes.txt"
    body.write_bytes(b"free-form notes\n")
    store = tmp_path / "store"
    put = cli("artifact", "put", body, "--store", store, "--create-store", "--ref", "artifact:p.r.notes", "--kind",
              "report", "--location", "vault://p/r/notes", "--json")
    assert put.returncode == 0, put
    assert put.json["path"].endswith("/artifact__p.r.notes")
    verify = cli("artifact", "verify", "--all", "--store", store, "--json")
    assert verify.returncode == 0 and verify.json["orphan_paths"] == []
    again = cli("artifact", "put", body, "--store", store, "--ref", "artifact:p.r.notes", "--kind", "report",
                "--location", "vault://p/r/notes", "--json")
    assert again.returncode == 0 and again.json["bytes_written"] == 0


def _tamper(package, name, data):
    (package / name).write_bytes(data)


def _edit_metadata(package, **changes):
    path = package / "export.package.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("spoil, code, exit_code", [
    (lambda p, t: _tamper(p, "artifact__fixture-proj.tuned.model.bin", b"tampered"), "artifact_integrity", 1),
    (lambda p, t: _edit_metadata(p, body_file="../secret.txt"), "artifact_export_package_invalid", 3),
    (lambda p, t: _edit_metadata(p, body_file="/etc/hostname"), "artifact_export_package_invalid", 3),
    (lambda p, t: _edit_metadata(p, binding_file="../../x.json"), "artifact_export_package_invalid", 3),
    (lambda p, t: _symlink_body(p, t), "artifact_export_package_invalid", 3),
    (lambda p, t: _edit_metadata(p, artifact_ref="artifact:fixture-proj.tuned.other"),
     "artifact_export_package_invalid", 3),
    (lambda p, t: _edit_metadata(p, package_format_version="contexta-artifact-export-v2"),
     "artifact_export_package_invalid", 3),
    (lambda p, t: (p / "artifact__fixture-proj.tuned.model.binding.json").unlink(),
     "artifact_export_package_invalid", 3),
    (lambda p, t: (p / "manifest.snapshot.json").unlink(), "artifact_export_package_invalid", 3),
    (lambda p, t: (p / "export.package.json").unlink(), "artifact_export_package_invalid", 3),
    (lambda p, t: (p / "artifact__fixture-proj.tuned.model.bin").unlink(), "artifact_export_package_invalid", 3),
    (lambda p, t: _tamper(p, "manifest.snapshot.json", b'{"artifact_ref": "nope"}'), "deserialize_invalid_payload", 3),
    (lambda p, t: _tamper(p, "export.package.json", b"{truncated"), "artifact_export_package_invalid", 3),
])
def test_hostile_packages_are_refused_and_the_store_is_unchanged(cli, fixture_dir, tmp_path, spoil, code, exit_code):
    package = _package(fixture_dir)
    secret = package.parent / "secret.txt"
    secret.write_text("not an artifact")
    spoil(package, tmp_path)
    store = _ws_store(fixture_dir)
    before = snapshot(store)
    result = _import(cli, store, package)
    assert result.returncode == exit_code, result
    assert result.json["error"]["code"] == code
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(store) == before
    fresh = _import(cli, tmp_path / "fresh", package)
    assert fresh.returncode == exit_code and not (tmp_path / "fresh").exists()


def _symlink_body(package, tmp_path):
    body = package / "artifact__fixture-proj.tuned.model.bin"
    real = tmp_path / "elsewhere.bin"
    shutil.move(str(body), str(real))
    os.symlink(str(real), str(body))


def _conflicting_package(fixture_dir, tmp_path):
    """The fixture package with a different body, re-sealed so only the conflict remains."""
    return reseal_package(_package(fixture_dir), tmp_path / "pkg2", b"retrained weights" * 100)


def test_conflict_policies(cli, fixture_dir, tmp_path):
    store = _ws_store(fixture_dir)
    same = _import(cli, store, _package(fixture_dir))
    assert same.returncode == 0 and same.json["outcome"] == "idempotent"
    assert _import(cli, store, _package(fixture_dir), "--conflict", "skip").json["outcome"] == "skipped"
    package, size, digest = _conflicting_package(fixture_dir, tmp_path)
    before = snapshot(store)
    refused = _import(cli, store, package)
    assert refused.returncode == 1 and refused.json["error"]["code"] == "artifact_binding_conflict"
    assert snapshot(store) == before
    skipped = _import(cli, store, package, "--conflict", "skip")
    assert skipped.returncode == 0 and skipped.json["outcome"] == "skipped"
    old_body = (store / "objects/checkpoint/0d/artifact__fixture-proj.tuned.model.bin").read_bytes()
    replaced = _import(cli, store, package, "--conflict", "replace")
    assert replaced.returncode == 0 and replaced.json["outcome"] == "replaced"
    quarantine = Path(replaced.json["quarantine_path"])
    assert quarantine.relative_to(store).parts[:2] == ("quarantine", "bound")
    assert quarantine.name.endswith("-artifact__fixture-proj.tuned.model.bin")
    assert quarantine.read_bytes() == old_body
    events = [json.loads(p.read_text()) for p in (store / "history/quarantine").glob("*.json")]
    assert [(e["kind"], e["destination_path"], e["details"]) for e in events] == [
        ("bound_artifact", str(quarantine), {"artifact_ref": REF})]
    imports = [json.loads(p.read_text()) for p in (store / "history/imports").rglob("*.json")]
    assert [e["quarantine_path"] for e in imports if e["outcome"] == "replaced"] == [str(quarantine)]
    binding = json.loads((store / "bindings/artifact__fixture-proj.tuned.model.binding.json").read_text())
    assert (binding["size_bytes"], binding["hash_value"]) == (size, digest)
    assert cli("artifact", "verify", "--all", "--store", store).returncode == 0


def test_verify_all_finds_missing_drift_and_orphans_with_details(cli, fixture_dir):
    store = _ws_store(fixture_dir)
    (store / "objects/report/ed/artifact__fixture-proj.tuned.notes").unlink()
    with open(str(store / "objects/dataset/b9/artifact__fixture-proj.tuned.eval-table.csv"), "ab") as handle:
        handle.write(b"extra\n")
    body = store / "objects/checkpoint/0d/artifact__fixture-proj.tuned.model.bin"
    data = bytearray(body.read_bytes())
    data[0] ^= 1
    body.write_bytes(bytes(data))
    (store / "objects/checkpoint/stray.bin").write_bytes(b"orphan")
    (store / "objects/checkpoint/c6/x.bin.0123.tmp").write_bytes(b"temp")
    result = cli("artifact", "verify", "--all", "--store", store, "--json")
    assert result.returncode == 1
    sweep = result.json
    assert sweep["missing_refs"] == ["artifact:fixture-proj.tuned.notes"]
    assert sorted(sweep["drifted_refs"]) == ["artifact:fixture-proj.tuned.eval-table", REF]
    assert sorted(Path(p).name for p in sweep["orphan_paths"]) == ["stray.bin", "x.bin.0123.tmp"]
    by_code = {problem["code"]: problem for problem in sweep["problems"]}
    assert by_code["artifact_hash_mismatch"]["path"] == str(body)
    assert by_code["artifact_hash_mismatch"]["expected"] != by_code["artifact_hash_mismatch"]["actual"]
    assert by_code["artifact_size_mismatch"]["actual"] == by_code["artifact_size_mismatch"]["expected"] + 6
    assert by_code["artifact_stray_temp"]["path"].endswith(".tmp")
    assert not (store / "history/verification").exists()  # no --record, no writes
    single = cli("artifact", "verify", REF, "--store", store, "--json")
    assert single.returncode == 1 and single.json["status"] == "FAILURE"
    assert single.json["report"]["status"] == "hash_mismatch"


def test_verify_record_writes_contextas_verification_events(cli, fixture_dir):
    store = _ws_store(fixture_dir)
    assert cli("artifact", "verify", "--all", "--record", "--store", store).returncode == 0
    events = sorted((store / "history/verification").rglob("*.json"))
    assert len(events) == 4
    event = json.loads(events[0].read_text())
    assert set(event) == {"artifact_ref", "checked_at", "message", "status", "report"}
    assert set(event["report"]) == {"actual_hash_value", "actual_size_bytes", "artifact_ref", "checked_at", "exists",
                                    "expected_hash_value", "expected_size_bytes", "messages", "status", "verified"}
    assert event["status"] == "verified" and event["report"]["verified"] is True


def test_export_refuses_a_drifted_body(cli, fixture_dir, tmp_path):
    store = _ws_store(fixture_dir)
    body = store / "objects/checkpoint/0d/artifact__fixture-proj.tuned.model.bin"
    body.write_bytes(b"drifted")
    result = cli("artifact", "export", REF, "--store", store, "--export-root", tmp_path / "out", "--json")
    assert result.returncode == 1 and result.json["error"]["code"] == "artifact_integrity"
    assert not (tmp_path / "out" / "artifact__fixture-proj.tuned.model").exists()


@pytest.mark.parametrize("ref, code", [
    ("artifact:Bad.Ref.x", "stable_ref_invalid_value"),
    ("artifact:only.two", "stable_ref_invalid_shape"),
    ("run:a.b", "stable_ref_kind_mismatch"),
    ("artifact:a.b:c", "stable_ref_invalid_text"),
    ("artifact:a_b.c.d", "stable_ref_invalid_value"),
])
def test_put_validates_refs_like_contexta(cli, tmp_path, ref, code):
    body = tmp_path / "b.bin"
    body.write_bytes(b"x")
    result = cli("artifact", "put", body, "--store", tmp_path / "store", "--create-store", "--ref", ref, "--kind",
                 "checkpoint", "--json")
    assert result.returncode == 3 and result.json["error"]["code"] == code
    assert not (tmp_path / "store").exists()


def test_manifest_validation_rules():
    base = dict(artifact_ref="artifact:p.r.m", artifact_kind="checkpoint", created_at="2024-01-01T00:00:00.5Z",
                producer_ref="x.y", run_ref="run:p.r", location_ref="vault://p/r/m.bin")
    manifest = ops.ArtifactManifest(**base)
    assert manifest.created_at == "2024-01-01T00:00:00.500000Z"
    assert ops.ArtifactManifest(**dict(base, created_at="2024-01-01T00:00:00.000Z")).created_at == "2024-01-01T00:00:00Z"
    assert set(manifest.to_dict()) == {"artifact_ref", "run_ref", "deployment_execution_ref", "stage_execution_ref",
                                       "batch_execution_ref", "sample_observation_ref", "operation_context_ref",
                                       "artifact_kind", "created_at", "producer_ref", "location_ref", "hash_value",
                                       "size_bytes", "attributes", "schema_version", "extensions"}
    for bad, code in ((dict(run_ref="run:p.other"), "artifact_ref_prefix_mismatch"),
                      (dict(artifact_kind="Checkpoint"), "artifact_invalid_artifact_kind"),
                      (dict(producer_ref="X"), "artifact_invalid_producer_ref"),
                      (dict(created_at="2024-01-01T00:00:00"), "context_invalid_timestamp"),
                      (dict(size_bytes=-1), "artifact_invalid_size_bytes"),
                      (dict(batch_execution_ref="batch:p.r.s.b"), "artifact_missing_stage_context"),
                      (dict(location_ref="  "), "context_invalid_string")):
        with pytest.raises(ops.ArtifactError) as caught:
            ops.ArtifactManifest(**dict(base, **bad))
        assert caught.value.code == code
    with pytest.raises(ops.ArtifactError) as caught:
        ops.ArtifactManifest.from_dict(dict(base, surprise=1))
    assert caught.value.code == "deserialize_unknown_field"
    assert ops.ArtifactManifest(**dict(base, artifact_kind="my_custom_kind")).artifact_kind == "my_custom_kind"


# -- crash safety ---------------------------------------------------------------------------------

def _trace(cli, args, tmp_path, prepare):
    """The durable steps a command takes, from a traced rehearsal on a fresh copy."""
    rehearsal_root = tmp_path / "rehearsal"
    prepared = prepare(rehearsal_root)
    trace = tmp_path / "trace"
    result = cli(*args(prepared), env={"CONTEXTA_OPS_CRASH_TRACE": str(trace)})
    assert result.returncode == 0, result
    return trace.read_text().split()


def _big_package(root, size_mb=8, body_seed=b"big"):
    store = root / "source"
    body = root / "big.bin"
    root.mkdir(parents=True, exist_ok=True)
    with open(str(body), "wb") as handle:
        block = (body_seed * 400000)[:1 << 20]
        for index in range(size_mb):
            handle.write(block[:-8] + index.to_bytes(8, "big"))
    manifest = ops.ArtifactManifest(artifact_ref="artifact:big.run.model", artifact_kind="checkpoint",
                                    created_at="2024-01-01T00:00:00Z", producer_ref="bench", run_ref="run:big.run",
                                    location_ref="vault://big/run/model.bin")
    ops.ArtifactStore(ops.VaultConfig(root_path=store)).put_artifact(manifest, body)
    return ops.export_artifact(ops.ArtifactStore(ops.VaultConfig(root_path=store)), "artifact:big.run.model",
                               export_root=root / "pkg").export_directory


def _prepare_replace(root):
    first = _big_package(root / "a", 2, b"first")
    second = _big_package(root / "b", 3, b"second")
    target = root / "target"
    ops.import_export_package(ops.ArtifactStore(ops.VaultConfig(root_path=target)), first)
    return target, second


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["import", "replace"])
def test_kill_9_at_every_durable_step_of_an_import_leaves_a_store_that_verifies(cli, tmp_path, scenario):
    def prepare(root):
        if scenario == "import":
            return root / "target", _big_package(root, 4)
        return _prepare_replace(root)

    def args(prepared):
        target, package = prepared
        return ("artifact", "import", package, "--store", target, "--create-store", "--conflict", "replace")

    steps = _trace(cli, args, tmp_path, prepare)
    assert "artifact:binding-written" in steps
    for crash_at in range(1, len(steps) + 1):
        target, package = prepare(tmp_path / ("run%d" % crash_at))
        before = snapshot(target) if target.exists() else {}
        killed = cli(*args((target, package)), env={"CONTEXTA_OPS_CRASH_AT": str(crash_at)})
        assert killed.returncode == -9, (crash_at, killed)
        verify = cli("artifact", "verify", "--all", "--store", target, "--json")
        assert verify.returncode == 0, (crash_at, steps[crash_at - 1], verify)
        refs = {record["artifact_ref"] for record in verify.json["verification_records"]}
        binding = json.loads((target / "bindings/artifact__big.run.model.binding.json").read_text()) \
            if refs else None
        new_size = 4 << 20 if scenario == "import" else 3 << 20
        committed = steps.index("artifact:binding-written") < crash_at
        if committed:
            assert binding["size_bytes"] == new_size
        elif scenario == "import":
            assert refs == set()
        else:
            assert binding["size_bytes"] == 2 << 20
            assert {k: v for k, v in snapshot(target).items() if not k.startswith("staging")} == \
                {k: v for k, v in before.items() if not k.startswith("staging")}
        again = cli(*args((target, package)), "--json")
        assert again.returncode == 0, again
        assert cli("artifact", "verify", "--all", "--store", target).returncode == 0


@pytest.mark.slow
def test_kill_9_at_random_moments_of_a_large_import(cli, pyz, tmp_path):
    package = _big_package(tmp_path / "src", 96)
    target = tmp_path / "target"
    target.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONTEXTA_OPS_CRASH")}
    for delay in (0.05, 0.15, 0.3, 0.5):
        process = subprocess.Popen([sys.executable, str(pyz), "artifact", "import", str(package), "--store",
                                    str(target), "--quiet"], env=env, stderr=subprocess.PIPE)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        verify = cli("artifact", "verify", "--all", "--store", target, "--json")
        assert verify.returncode == 0, (delay, verify)
    final = cli("artifact", "import", package, "--store", target, "--json")
    assert final.returncode == 0 and final.json["outcome"] in ("imported", "idempotent")
    assert list((target / "staging").glob("*.part")) == []
