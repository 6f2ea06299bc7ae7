"""Library parity with contexta 1.0.0: the result classes its recovery package exports, with the same
fields and answers; VaultConfig holding exactly the artifact settings."""

import dataclasses

import contexta_ops as ops
from helpers import run_ref

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
