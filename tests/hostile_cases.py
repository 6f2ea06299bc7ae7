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


def by_kind(kind):
    """Checked-in and generated cases of one kind, as pytest params; the big generated ones are marked slow."""
    return [pytest.param(name, marks=[pytest.mark.slow] if case.get("slow") else [])
            for name, case in sorted(ALL_CASES.items()) if case["kind"] == kind]


def corpus_file(name, tmp_path):
    """The case's file: from the checked-in corpus, or generated now under tmp_path."""
    if name in CASES:
        return CORPUS / name
    (tmp_path / "generated").mkdir(exist_ok=True)
    return make_corpus.write_generated(name, tmp_path / "generated")
