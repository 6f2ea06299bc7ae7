"""Backup and verify-only restore example for Contexta (the operations guide's program).

Identical to the guide's program except for two things: the imports come from
contexta_ops, and the workspace is seeded from the contexta 1.0.0 fixture
instead of being written through ``Contexta(...)``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[1]))  # a contexta_ops already on the path wins

from contexta_ops import RecoveryConfig, UnifiedConfig, WorkspaceConfig  # noqa: E402
from contexta_ops import create_workspace_backup, plan_restore, plan_workspace_backup, restore_workspace  # noqa: E402

PROJECT_NAME = "recovery-proj"
RUN_NAME = "demo-run"
RUN_REF = f"run:{PROJECT_NAME}.{RUN_NAME}"
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "contexta-1.0.0-fixture.tar.gz"


def _resolve_root(root: Path | str | None) -> Path:
    if root is None:
        return Path(tempfile.mkdtemp(prefix="contexta-recovery-demo-"))
    return Path(root)


def _seed_workspace(config: UnifiedConfig) -> None:
    """A workspace written by contexta 1.0.0 itself (2 runs, 50 records, 4 artifacts, an outbox)."""
    scratch = Path(tempfile.mkdtemp(prefix="contexta-fixture-"))
    try:
        with tarfile.open(FIXTURE) as archive:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(scratch, **safe)
        shutil.copytree(scratch / "contexta-fixture" / "workspace" / ".contexta", config.workspace.root_path)
    finally:
        shutil.rmtree(scratch)


def run_example(root: Path | str | None = None) -> dict[str, Any]:
    base_root = _resolve_root(root)
    workspace = base_root / ".contexta"
    backup_root = base_root / "backups"
    restore_staging_root = base_root / "restore-staging"

    config = UnifiedConfig(
        project_name=PROJECT_NAME,
        workspace=WorkspaceConfig(root_path=workspace),
        recovery=RecoveryConfig(
            backup_root=backup_root,
            restore_staging_root=restore_staging_root,
            create_backup_before_restore=False,
        ),
    )

    _seed_workspace(config)
    backup_plan = plan_workspace_backup(config, label="ops-demo")
    backup_result = create_workspace_backup(config, backup_plan)
    restore_plan = plan_restore(config, backup_result.backup_ref, verify_only=True)
    restore_result = restore_workspace(config, restore_plan)

    return {
        "workspace": str(workspace),
        "backup_ref": backup_result.backup_ref,
        "backup_location": str(backup_result.location),
        "included_sections": list(backup_result.included_sections),
        "restore_status": restore_result.status,
        "restore_applied": restore_result.applied,
        "verification_notes": list(restore_result.verification_notes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the Contexta backup/restore recovery example.")
    parser.add_argument("--root", type=Path, default=None, help="Optional demo root directory.")
    args = parser.parse_args()

    result = run_example(args.root)
    print(f"Workspace: {result['workspace']}")
    print(f"Backup ref: {result['backup_ref']}")
    print(f"Backup location: {result['backup_location']}")
    print(f"Included sections: {', '.join(result['included_sections'])}")
    print(f"Restore status: {result['restore_status']}")
    print(f"Restore applied: {result['restore_applied']}")


if __name__ == "__main__":
    main()
