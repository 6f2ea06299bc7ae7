"""The operations guide's programs, run against contexta_ops with only their imports changed.

`python -m pytest tests/e2e/test_recovery_examples.py -q` is the quick validation the guide asks
operators to re-run after changing the examples or the recovery logic.  Where the reference
contexta 1.0.0 is available, the very same programs (imports switched back) run under it too,
and the answers they print must agree.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

EXAMPLES = REPO / "examples"
OURS_IMPORT = re.compile(r"^from contexta_ops import (.*)$", re.MULTILINE)
VOLATILE = ("Workspace:", "Backup ref:", "Backup location:", "Outbox path:", "Replayed output:",
            "Export directory:")


def _run(python, program, root, cwd=None):
    # Contexta fails on any CONTEXTA_* name it does not know (formats 11.20); keep the test's own out.
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONTEXTA_")}
    completed = subprocess.run([python, str(program), "--root", str(root)], cwd=str(cwd or root.parent), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr
    return completed.stdout.splitlines()


def _answers(lines):
    """The printed answers that do not depend on paths or the clock."""
    return [line for line in lines if not line.startswith(VOLATILE)]


def _as_contexta_program(program, destination, contexta_imports):
    """The same program with its contexta_ops imports replaced by contexta's own."""
    text = program.read_text(encoding="utf-8").replace("Path(__file__).resolve().parents[1]", "Path(%r)" % str(REPO))
    first = OURS_IMPORT.search(text)
    text = text[:first.start()] + contexta_imports + OURS_IMPORT.sub("", text[first.start():])
    destination.write_text(text, encoding="utf-8")
    return destination


BACKUP_IMPORTS = ("from contexta.config import RecoveryConfig, UnifiedConfig, WorkspaceConfig\n"
                  "from contexta.recovery import create_workspace_backup, plan_restore, plan_workspace_backup, "
                  "restore_workspace\n")


def test_backup_restore_verify_program(tmp_path):
    lines = _run(sys.executable, EXAMPLES / "backup_restore_verify.py", tmp_path / "demo")
    assert _answers(lines) == ["Included sections: config, metadata, records, artifacts, recovery",
                               "Restore status: SUCCESS", "Restore applied: False"]
    assert (tmp_path / "demo" / ".contexta" / "cache" / "outbox" / "failed_deliveries.jsonl").is_file()


def test_backup_restore_verify_program_answers_like_contexta(tmp_path, contexta_ref):
    ours = _run(sys.executable, EXAMPLES / "backup_restore_verify.py", tmp_path / "ours")
    program = _as_contexta_program(EXAMPLES / "backup_restore_verify.py", tmp_path / "as_contexta.py",
                                   BACKUP_IMPORTS)
    theirs = _run(contexta_ref, program, tmp_path / "theirs")
    assert _answers(ours) == _answers(theirs)


def test_the_guides_own_backup_program_runs_under_contexta(tmp_path, contexta_ref):
    """Sanity of the reference: the guide's unmodified program (kept in tests/e2e/guide)."""
    lines = _run(contexta_ref, REPO / "tests" / "e2e" / "guide" / "backup_restore_verify.py", tmp_path / "g")
    assert "Restore status: SUCCESS" in lines


REPLAY_IMPORTS = ("from contexta.config import RecoveryConfig, UnifiedConfig, WorkspaceConfig\n"
                  "from contexta.recovery import replay_outbox\n")


def test_replay_outbox_program(tmp_path):
    lines = _run(sys.executable, EXAMPLES / "replay_outbox_demo.py", tmp_path / "demo")
    assert _answers(lines) == ["Replay status: SUCCESS", "Acknowledged: 1", "Pending: 0", "Dead-lettered: 0"]
    assert (tmp_path / "demo" / ".contexta" / "exports" / "replayed" / "record.jsonl").is_file()


def test_replay_outbox_program_answers_like_contexta(tmp_path, contexta_ref):
    ours = _run(sys.executable, EXAMPLES / "replay_outbox_demo.py", tmp_path / "ours")
    program = _as_contexta_program(EXAMPLES / "replay_outbox_demo.py", tmp_path / "as_contexta.py", REPLAY_IMPORTS)
    theirs = _run(contexta_ref, program, tmp_path / "theirs")
    assert _answers(ours) == _answers(theirs)


ARTIFACT_IMPORTS = ("from contexta.contract import ArtifactManifest\n"
                    "from contexta.store.artifacts import ArtifactStore, VaultConfig, export_artifact, "
                    "import_export_package, inspect_store\n")


def test_artifact_transfer_program(tmp_path):
    lines = _run(sys.executable, EXAMPLES / "artifact_transfer_demo.py", tmp_path / "demo")
    assert _answers(lines) == ["Source artifact: artifact:my-proj.run-01.model", "Import outcome: imported",
                               "Target artifact count: 1"]


def test_artifact_transfer_program_answers_like_contexta(tmp_path, contexta_ref):
    ours = _run(sys.executable, EXAMPLES / "artifact_transfer_demo.py", tmp_path / "ours")
    program = _as_contexta_program(EXAMPLES / "artifact_transfer_demo.py", tmp_path / "as_contexta.py",
                                   ARTIFACT_IMPORTS)
    theirs = _run(contexta_ref, program, tmp_path / "theirs")
    assert _answers(ours) == _answers(theirs)
    # And the two stores are the same bytes where Contexta's layout fixes them.
    for rel in ("source-artifacts/objects/checkpoint", "target-artifacts/objects/checkpoint"):
        assert sorted(p.relative_to(tmp_path / "ours").as_posix() for p in (tmp_path / "ours" / rel).rglob("*")) == \
            sorted(p.relative_to(tmp_path / "theirs").as_posix() for p in (tmp_path / "theirs" / rel).rglob("*"))
