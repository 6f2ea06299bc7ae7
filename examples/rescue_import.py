"""A rescue script that imports contexta_ops as a library - from contexta.pyz itself, or from the copied .py.

    python3 examples/rescue_import.py PATH/TO/contexta.pyz-or-contexta_ops.py WORKSPACE BACKUP_ROOT

The .pyz is a zip with contexta_ops.py at its root, so putting the .pyz itself on sys.path imports it
straight from the archive.  Prints the backup it took and whether it verifies.
"""

import os
import sys

tool, workspace, backup_root = sys.argv[1:4]
sys.path.insert(0, os.path.abspath(tool) if tool.endswith(".pyz") else os.path.dirname(os.path.abspath(tool)))

import contexta_ops  # noqa: E402

config = contexta_ops.load_config(workspace=workspace, backup_root=backup_root)
backup = contexta_ops.create_workspace_backup(config, contexta_ops.plan_workspace_backup(config, label="rescue"))
check = contexta_ops.restore_workspace(config, contexta_ops.plan_restore(config, backup.backup_ref, verify_only=True))
print("imported from", contexta_ops.__file__)
print(backup.backup_ref, backup.status, check.status)
sys.exit(contexta_ops.EXIT_OK if check.status == "SUCCESS" else contexta_ops.EXIT_PROBLEMS)
