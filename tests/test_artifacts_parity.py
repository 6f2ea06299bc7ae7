"""Library parity with contexta 1.0.0: the module-level names its artifact and recovery packages export,
with the same signatures, result fields and answers on the fixture store."""

import dataclasses
import hashlib
import inspect
import json

import pytest

import contexta_ops as ops
from helpers import run_ref

REFS = ["artifact:fixture-proj.baseline.model", "artifact:fixture-proj.tuned.eval-table",
        "artifact:fixture-proj.tuned.model", "artifact:fixture-proj.tuned.notes"]
UNBOUND = "artifact:fixture-proj.tuned.nothing"
OTHER_CLAIM = "0" * 64

CONTEXTA_READS = r"""
import hashlib, json, sys
from contexta.contract import ArtifactManifest
from contexta.store.artifacts import (ArtifactStore, VaultConfig, artifact_exists, get_artifact, list_refs,
                                      read_artifact_bytes, verify_artifact)
store = ArtifactStore(VaultConfig(root_path=sys.argv[1]))
refs = list_refs(store)
out = {"refs": refs, "exists": {}, "paths": {}, "digests": {}, "reports": {}, "claimed": {}}
for ref in refs + [sys.argv[2]]:
    out["exists"][ref] = artifact_exists(store, ref)
for ref in refs:
    handle = get_artifact(store, ref)
    out["paths"][ref] = [str(handle.path), handle.binding.binding_id]
    out["digests"][ref] = hashlib.sha256(read_artifact_bytes(store, ref)).hexdigest()
    report = verify_artifact(store, ref)
    out["reports"][ref] = [report.status.value, report.verified, report.exists, report.actual_size_bytes,
                           report.expected_size_bytes, report.actual_hash_value, report.expected_hash_value,
                           list(report.messages)]
    snapshot = handle.binding.manifest_snapshot.to_dict()
    snapshot["hash_value"] = sys.argv[3]
    claimed = verify_artifact(store, ref, manifest=snapshot)
    out["claimed"][ref] = [claimed.status.value, claimed.expected_hash_value]
errors = {}
for name, call in (("unbound", lambda: verify_artifact(store, sys.argv[2])),
                   ("mismatch", lambda: verify_artifact(store, refs[0], manifest=get_artifact(store, refs[1]).binding.manifest_snapshot)),
                   ("get_unbound", lambda: get_artifact(store, sys.argv[2]))):
    try:
        call()
    except Exception as exc:
        errors[name] = exc.code
out["errors"] = errors
print(json.dumps(out))
"""


def _ours(store_root):
    store = ops.ArtifactStore(ops.VaultConfig(root_path=store_root))
    refs = ops.list_refs(store)
    out = {"refs": refs, "exists": {}, "paths": {}, "digests": {}, "reports": {}, "claimed": {}}
    for ref in refs + [UNBOUND]:
        out["exists"][ref] = ops.artifact_exists(store, ref)
    for ref in refs:
        handle = ops.get_artifact(store, ref)
        out["paths"][ref] = [str(handle.path), handle.binding.binding_id]
        out["digests"][ref] = hashlib.sha256(ops.read_artifact_bytes(store, ref)).hexdigest()
        report = ops.verify_artifact(store, ref)
        out["reports"][ref] = [report.status, report.verified, report.exists, report.actual_size_bytes,
                               report.expected_size_bytes, report.actual_hash_value, report.expected_hash_value,
                               list(report.messages)]
        snapshot = handle.binding.manifest_snapshot.to_dict()
        snapshot["hash_value"] = OTHER_CLAIM
        claimed = ops.verify_artifact(store, ref, manifest=snapshot)
        out["claimed"][ref] = [claimed.status, claimed.expected_hash_value]
    errors = {}
    for name, call in (("unbound", lambda: ops.verify_artifact(store, UNBOUND)),
                       ("mismatch", lambda: ops.verify_artifact(
                           store, refs[0], manifest=ops.get_artifact(store, refs[1]).binding.manifest_snapshot)),
                       ("get_unbound", lambda: ops.get_artifact(store, UNBOUND))):
        with pytest.raises(ops.ArtifactError) as caught:
            call()
        errors[name] = caught.value.code
    out["errors"] = errors
    return out


def test_read_functions_answer_as_contexta_does(fixture_dir, contexta_ref):
    store_root = fixture_dir / "workspace" / ".contexta" / "artifacts"
    ours = _ours(store_root)
    theirs = run_ref(contexta_ref, CONTEXTA_READS, store_root, UNBOUND, OTHER_CLAIM)
    assert ours == json.loads(json.dumps(theirs))
    assert ours["refs"] == REFS
    assert all(status == "hash_mismatch" for status, _claim in ours["claimed"].values())


def test_the_store_methods_are_the_module_functions(fixture_dir):
    store = ops.ArtifactStore(ops.VaultConfig(root_path=fixture_dir / "workspace" / ".contexta" / "artifacts"))
    assert store.list_refs() == ops.list_refs(store) == REFS
    assert store.artifact_exists(REFS[0]) and not store.artifact_exists(UNBOUND)
    assert store.read_artifact_bytes(REFS[3]) == ops.read_artifact_bytes(store, REFS[3])
    assert store.verify_artifact(REFS[0], manifest=None).verified


def test_signatures_match_contexta(contexta_ref):
    script = r"""
import inspect, json
import contexta.store.artifacts as artifacts
names = ["verify_artifact", "read_artifact_bytes", "artifact_exists", "get_artifact", "list_refs"]
print(json.dumps({name: list(inspect.signature(getattr(artifacts, name)).parameters) for name in names}))
"""
    theirs = run_ref(contexta_ref, script)
    ours = {name: list(inspect.signature(getattr(ops, name)).parameters) for name in theirs}
    assert ours == theirs
    assert set(theirs) <= set(ops.__all__)


CONTEXTA_RESULTS = r"""
import dataclasses, json
from contexta.recovery import ImportResult, RecoveryResult
base = RecoveryResult("success", warnings=("w",), notes=("n",), details={"b": 1, "a": 2})
result = ImportResult(status="degraded", source_root="/src", target_workspace="/ws", created_run_count=2,
                      created_artifact_count=3, created_record_count=4, loss_notes=("lost",),
                      verification_notes=("v",))
print(json.dumps({"base": base.to_dict(), "import_base": RecoveryResult.to_dict(result),
                  "fields": {cls.__name__: [f.name for f in dataclasses.fields(cls)] for cls in (RecoveryResult, ImportResult)},
                  "import": {f.name: str(getattr(result, f.name)) if f.name.endswith(("root", "workspace")) else getattr(result, f.name)
                             for f in dataclasses.fields(result) if f.name != "details"}}))
"""


def test_recovery_result_and_import_result_match_contexta(contexta_ref):
    theirs = run_ref(contexta_ref, CONTEXTA_RESULTS)
    base = ops.RecoveryResult("success", warnings=("w",), notes=("n",), details={"b": 1, "a": 2})
    assert base.to_dict() == theirs["base"]
    result = ops.ImportResult(status="degraded", source_root="/src", target_workspace="/ws", created_run_count=2,
                              created_artifact_count=3, created_record_count=4, loss_notes=("lost",),
                              verification_notes=("v",))
    assert {cls.__name__: [f.name for f in dataclasses.fields(cls)]
            for cls in (ops.RecoveryResult, ops.ImportResult)} == theirs["fields"]
    assert isinstance(result, ops.RecoveryResult)
    ours = result.to_dict()
    assert {key: ours[key] for key in theirs["import_base"]} == theirs["import_base"]
    expected = {key: (list(value) if isinstance(value, list) else value) for key, value in theirs["import"].items()}
    assert {key: ours[key] for key in expected} == expected
    assert {"RecoveryResult", "ImportResult"} <= set(ops.__all__)


# -- 7. VaultConfig follows ArtifactStoreConfig ----------------------------------------------------------

def test_vault_config_has_exactly_the_artifact_settings():
    assert [f.name for f in dataclasses.fields(ops.VaultConfig)] == \
        [f.name for f in dataclasses.fields(ops.ArtifactStoreConfig)]


def test_vault_config_from_unified_config_takes_every_setting(tmp_path):
    settings = dict(root_path=tmp_path / "a", default_ingest_mode="move", verification_mode="strict",
                    create_missing_dirs=False, layout_version="v9", chunk_size_bytes=4096, read_only=True)
    config = ops.UnifiedConfig(artifacts=ops.ArtifactStoreConfig(**settings))
    vault = ops.VaultConfig.from_unified_config(config)
    assert {f.name: getattr(vault, f.name) for f in dataclasses.fields(vault)} == settings
