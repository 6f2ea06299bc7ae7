"""Make tests/data/empty-ledger.db: the metadata ledger contexta 1.0.0 creates for a new workspace.

    $(../shared/tools/contexta-ref.sh) tests/data/make_empty_ledger.py

contexta_ops embeds this file (zlib, base64) as the demo workspace's ledger when `duckdb` is not
importable; tests/test_demo.py checks the embedded copy is byte for byte this file.
"""

import shutil
import tempfile
from pathlib import Path

from contexta import Contexta
from contexta.config import UnifiedConfig, WorkspaceConfig

scratch = Path(tempfile.mkdtemp())
try:
    context = Contexta(config=UnifiedConfig(project_name="template",
                                            workspace=WorkspaceConfig(root_path=scratch / ".contexta")))
    context.metadata_store.close()
    target = Path(__file__).resolve().parent / "empty-ledger.db"
    shutil.copyfile(str(scratch / ".contexta" / "metadata" / "ledger.db"), str(target))
    print(target, target.stat().st_size)
finally:
    shutil.rmtree(str(scratch))
