"""The stable codes: every error, problem and warning code the module can emit is pinned in tests/data/codes.txt.

Scripts match on these codes, so adding one is a decision (add it to the list) and renaming or removing one is
a breaking change this test makes visible.  Codes are found in the source: the first argument of
Problem/Notice/StatusWarning, every ``code=`` keyword, ``code`` class attributes and parameter defaults, and the
code given to ``_report_error``.  A code built at run time would escape the list, so that is refused too (passing
on an existing object's code, ``notice.code``, is not building one).
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODES_FILE = REPO / "tests" / "data" / "codes.txt"
CONSTRUCTORS = {"Problem", "Notice", "StatusWarning"}


def _literals(node):
    """The string constants an expression can evaluate to, or None when it can be anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        body, orelse = _literals(node.body), _literals(node.orelse)
        return None if body is None or orelse is None else body | orelse
    return None


def module_codes():
    tree = ast.parse((REPO / "contexta_ops.py").read_text(encoding="utf-8"))
    codes, dynamic = set(), []

    def take(node, where):
        found = _literals(node)
        if found is None:
            dynamic.append("line %d: %s" % (node.lineno, where))
        else:
            codes.update(found)

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.Assign) and any(getattr(t, "id", None) == "code" for t in item.targets):
                    take(item.value, "class %s code" % node.name)
        elif isinstance(node, ast.FunctionDef):
            args = node.args.args[len(node.args.args) - len(node.args.defaults):]
            for arg, default in zip(args + node.args.kwonlyargs, node.args.defaults + node.args.kw_defaults):
                if arg.arg == "code" and default is not None and not (
                        isinstance(default, ast.Constant) and default.value is None):
                    take(default, "default of %s" % node.name)
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            for keyword in node.keywords:
                if keyword.arg == "code" and not isinstance(keyword.value, ast.Name):
                    take(keyword.value, "code= of %s" % name)
            if name in CONSTRUCTORS and node.args and not isinstance(node.args[0], (ast.Name, ast.Attribute)):
                take(node.args[0], name)
            if name == "_report_error" and len(node.args) > 1 and not isinstance(node.args[1], ast.Attribute):
                take(node.args[1], name)
    return codes, dynamic


def pinned_codes():
    lines = CODES_FILE.read_text(encoding="utf-8").splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def test_every_code_is_a_literal():
    _codes, dynamic = module_codes()
    assert dynamic == [], "codes built at run time escape the stable list: %s" % dynamic


def test_the_module_emits_exactly_the_pinned_codes():
    codes, _dynamic = module_codes()
    pinned = pinned_codes()
    assert sorted(codes - pinned) == [], "new codes: add them to tests/data/codes.txt"
    assert sorted(pinned - codes) == [], "codes the module no longer emits (a breaking change for scripts)"


@pytest.mark.parametrize("code", sorted(pinned_codes()))
def test_codes_are_snake_case(code):
    assert code.replace("_", "").isalnum() and code == code.lower(), code
