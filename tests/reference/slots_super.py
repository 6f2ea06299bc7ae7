"""Let contexta 1.0.0 run on Python 3.12/3.13: name the class in zero-argument super() of slotted dataclasses.

contexta declares Python >= 3.14.  Before 3.14, ``@dataclass(slots=True)`` returns a new class, but
the methods keep the ``__class__`` cell of the class their body defined, so a zero-argument
``super()`` in them fails with "TypeError: super(type, obj): obj must be an instance or subtype of
type" (contexta's recovery result models do this in ``__post_init__`` and ``to_dict``).  3.14
updates the cell.  Here each such call becomes ``super(ClassName, self)``: the module-level name is
the new class, so the call means what it means on 3.14.  Nothing else changes.

Usage: python slots_super.py SITE_PACKAGES/contexta  (prints how many calls it rewrote)
"""

import ast
import sys
from pathlib import Path


def _is_slotted_dataclass(node):
    for decorator in node.decorator_list:
        if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", getattr(decorator.func, "attr", "")) \
                == "dataclass":
            if any(k.arg == "slots" and getattr(k.value, "value", False) is True for k in decorator.keywords):
                return True
    return False


def _rewrites(tree):
    """(line, column, end column, replacement) of every zero-argument super() to rewrite."""
    found = []
    for cls in ast.walk(tree):
        if not (isinstance(cls, ast.ClassDef) and _is_slotted_dataclass(cls)):
            continue
        for method in cls.body:
            if not isinstance(method, ast.FunctionDef) or not method.args.args:
                continue
            first = method.args.args[0].arg
            for node in ast.walk(method):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "super" and not node.args \
                        and not node.keywords:
                    found.append((node.lineno, node.col_offset, node.end_col_offset,
                                  "super(%s, %s)" % (cls.name, first)))
    return found


def patch_file(path):
    text = path.read_text(encoding="utf-8")
    rewrites = _rewrites(ast.parse(text))
    if not rewrites:
        return 0
    lines = text.splitlines(keepends=True)
    for line, start, end, replacement in sorted(rewrites, reverse=True):  # right to left keeps offsets valid
        source = lines[line - 1].encode("utf-8")  # ast offsets count UTF-8 bytes
        lines[line - 1] = (source[:start] + replacement.encode("utf-8") + source[end:]).decode("utf-8")
    path.write_text("".join(lines), encoding="utf-8")
    return len(rewrites)


def main(package):
    count = sum(patch_file(path) for path in sorted(Path(package).rglob("*.py")))
    print("rewrote %d zero-argument super() calls in slotted dataclasses" % count)
    return 0 if count else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
