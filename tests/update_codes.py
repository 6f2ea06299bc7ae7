"""Print the codes the module emits that tests/data/codes.txt lacks, and those it lists but the module no
longer emits; with --write, add the new ones (removals stay a decision made by hand)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_codes import CODES_FILE, module_codes, pinned_codes  # noqa: E402

codes, dynamic = module_codes()
pinned = pinned_codes()
for line in dynamic:
    print("dynamic code at", line)
for code in sorted(codes - pinned):
    print("new", code)
for code in sorted(pinned - codes):
    print("gone", code)
if "--write" in sys.argv[1:]:
    lines = CODES_FILE.read_text(encoding="utf-8").splitlines()
    header = [line for line in lines if line.startswith("#")]
    CODES_FILE.write_text("\n".join(header + sorted(pinned | codes)) + "\n", encoding="utf-8")
