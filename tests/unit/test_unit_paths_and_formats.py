"""Pure helpers, called directly: artifact object paths, refusing unsafe paths, JSON bytes, sizes.

Expected values come from the formats reference (shared contexta-formats.md, sections 0 and 7) and
from the rules each helper documents, not from running the code.
"""

import hashlib
import sys
from pathlib import Path, PurePosixPath

import pytest

import contexta_ops as ops


@pytest.mark.parametrize("value, expected", [
    ("artifact:my-proj.run-01.model", "artifact__my-proj.run-01.model"),
    ("checkpoint", "checkpoint"),
    ("a b/c", "a_b_c"),
    ("a  //\tb", "a_b"),
    ("x:y:z", "x__y__z"),
    (".hidden_", "hidden"),
    ("_:a", "a"),
    ("...", "artifact"),
    ("日本", "artifact"),
    ("", "artifact"),
])
def test_sanitize_component(value, expected):
    assert ops.sanitize_component(value) == expected


LOCATIONS = [
    ("vault://my-proj/run-01/model.bin", ".bin"),
    ("vault://p/r/model.tar.gz", ".tar.gz"),
    ("vault://p/r/weights.v1.2", ".v1.2"),
    ("vault://p/r/model", ""),
    ("vault://p/r/.hidden", ""),
    ("vault://p/r/..a.b", ".b"),
    ("vault://p/r/name.", "."),
    ("vault://p/r/a.b.", ".b."),
    ("vault://p/r/...", ""),
    ("vault://p/r/a..b", "..b"),
    ("vault://p/r/dir.d/", ".d"),
    ("model.bin", ".bin"),
    ("", ""),
]


@pytest.mark.parametrize("location, suffix", LOCATIONS)
def test_location_suffix(location, suffix):
    assert ops._location_suffix(location) == suffix


def test_location_suffix_is_what_purepath_gives_on_3_14():
    """Contexta takes "".join(PurePath(location_ref).suffixes) on 3.14, which it requires; before 3.14 a name
    ending in '.' had no suffix."""
    differs = sorted(location for location, _ in LOCATIONS
                     if "".join(PurePosixPath(location).suffixes) != ops._location_suffix(location))
    assert differs == ([] if sys.version_info >= (3, 14) else ["vault://p/r/a.b.", "vault://p/r/name."])


@pytest.mark.parametrize("location", [None, 5, b"model.bin"])
def test_location_suffix_of_a_non_string_is_empty(location):
    assert ops._location_suffix(location) == ""


def test_artifact_object_relpath_matches_contextas_example():
    assert ops.artifact_object_relpath("artifact:my-proj.run-01.model", "checkpoint",
                                       "vault://my-proj/run-01/model.bin") == \
        "objects/checkpoint/cb/artifact__my-proj.run-01.model.bin"


def test_artifact_object_relpath_hashes_the_unsanitized_ref_and_sanitizes_the_kind():
    ref = "artifact:p.r.üx"
    prefix = hashlib.sha256(ref.encode("utf-8")).hexdigest()[:2]
    assert ops.artifact_object_relpath(ref, "my kind", "vault://p/r/x") == "objects/my_kind/%s/artifact__p.r._x" % prefix


@pytest.mark.parametrize("relative, expected", [
    ("a/b.txt", "/root/a/b.txt"),
    ("a\\b", "/root/a/b"),
    (".hidden/...", "/root/.hidden/..."),
])
def test_safe_join_keeps_paths_under_the_root(relative, expected):
    assert ops._safe_join_text("/root/", relative) == expected
    assert ops.safe_join(Path("/root"), relative) == Path(expected)


@pytest.mark.parametrize("relative", [
    "", "/etc/passwd", "\\windows", "C:evil", "a/../b", "..", "./a", "a/./b", "a//b", "a/", "a\x00b",
    "a\\..\\b", None, 5, b"a",
])
def test_safe_join_refuses_what_could_leave_the_root(relative):
    for join in (ops._safe_join_text, ops.safe_join):
        with pytest.raises(ops.OpsError) as caught:
            join("/root", relative)
        assert caught.value.code == "unsafe_path"


@pytest.mark.parametrize("path, root, inside", [
    ("/a/b", "/a", True),
    ("/a", "/a", True),
    ("/a/b/", "/a/b", True),
    ("/a/b", "/a/", True),
    ("/x", "/", True),
    ("/ab", "/a", False),
    ("/a/../b", "/a", False),
    ("/a", "/a/b", False),
    (Path("/srv/ws/exports/backups"), Path("/srv/ws"), True),
])
def test_is_within(path, root, inside):
    assert ops._is_within(path, root) is inside


def test_outermost_drops_paths_inside_others():
    assert ops._outermost(["a/b", "a", "c", "a/b/c", "ab", "c"]) == ("a", "ab", "c")
    assert ops._outermost(["records/segments", "records-old"]) == ("records-old", "records/segments")
    assert ops._outermost([]) == ()


def test_pretty_json_bytes():
    payload = {"b": 1, "a": [1, "é"], "p": Path("/srv/x")}
    assert ops._pretty_json(payload) == (
        b'{\n  "a": [\n    1,\n    "\xc3\xa9"\n  ],\n  "b": 1,\n  "p": "/srv/x"\n}\n')


def test_pretty_json_falls_back_to_escapes_for_names_that_are_not_utf8():
    assert ops._pretty_json({"name": "caf\udce9"}) == b'{\n  "name": "caf\\udce9"\n}\n'


def test_compact_json_line():
    assert ops._compact_json({"b": 1, "a": "é", "p": Path("/x"), "n": None, "l": [1, 2]}) == \
        '{"a":"é","b":1,"l":[1,2],"n":null,"p":"/x"}'


@pytest.mark.parametrize("count, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KB"), (1536, "1.5 KB"), (10 * 1024 * 1024, "10.0 MB"),
    (3 * 1024 ** 3 // 2, "1.5 GB"), (5 * 1024 ** 4, "5.0 TB"), (2048 * 1024 ** 4, "2048.0 TB"),
])
def test_human_bytes(count, text):
    assert ops._human_bytes(count) == text


def test_an_os_error_names_both_paths_when_it_has_two():
    """A failed rename or link has a source and a destination: the one line names both."""
    import errno
    moved = OSError(errno.EXDEV, "Invalid cross-device link", "/backups/a", None, "/workspace/b")
    assert ops._os_error_message(moved) == "Invalid cross-device link: /backups/a -> /workspace/b"
    opened = OSError(errno.ENOENT, "No such file or directory", "/workspace/x")
    assert ops._os_error_message(opened) == "No such file or directory: /workspace/x"
    assert ops._os_error_message(OSError("no errno at all")) == "no errno at all"
