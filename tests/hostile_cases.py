"""The hostile-input cases: the checked-in corpus (tests/hostile/corpus, indexed by cases.json) and the
ones make_corpus.py generates at test time because they are too big or too deep to check in."""

import json
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "tests" / "hostile"))
import make_corpus  # noqa: E402

CORPUS = REPO / "tests" / "hostile" / "corpus"
CASES = json.loads((REPO / "tests" / "hostile" / "cases.json").read_text())
GENERATED = make_corpus.GENERATED
ALL_CASES = dict(CASES, **GENERATED)
__all__ = ["ALL_CASES", "CASES", "CORPUS", "GENERATED", "by_kind", "corpus_file", "make_corpus"]


# The fast loop (pytest -m "not slow") keeps one or two cases of each class of manifest and archive
# attack - escape, link, special file, mode bits, flipped byte, truncation, lying size, bomb, depth,
# valid - and run_all.sh runs every case.  Kinds not named here run every case in both.
FAST = {
    "manifest": {"manifest-backup-ref-escapes.json", "manifest-file-listed-twice.json",
                 "manifest-file-mode-beyond-permissions.json", "manifest-file-size-is-a-bool.json",
                 "manifest-nested-100000-deep.json", "manifest-not-utf8.json", "manifest-truncated.json"},
    "archive": {"tar-dotdot-member.tar", "tar-fifo.tar", "tar-flipped-data-byte.tar", "tar-hardlink-escape.tar",
                "tar-manifest-nested-100000-deep.tar", "tar-member-50-mib-manifest-says-less.tar",
                "tar-setuid-modes.tar", "tar-symlink-escape.tar", "tar-truncated.tar.gz", "tar-valid.tar",
                "zip-bomb-with-a-lying-size.zip", "zip-dotdot-member.zip", "zip-setuid-modes.zip", "zip-valid.zip"},
}


def by_kind(kind):
    """Checked-in and generated cases of one kind, as pytest params: the big generated ones, and those of a
    kind in FAST that FAST does not name, marked slow."""
    fast = FAST.get(kind)
    return [pytest.param(name, marks=[pytest.mark.slow] if case.get("slow") or fast is not None and name not in fast
                         else []) for name, case in sorted(ALL_CASES.items()) if case["kind"] == kind]


def corpus_file(name, tmp_path):
    """The case's file: from the checked-in corpus, or generated now under tmp_path."""
    if name in CASES:
        return CORPUS / name
    (tmp_path / "generated").mkdir(exist_ok=True)
    return make_corpus.write_generated(name, tmp_path / "generated")
