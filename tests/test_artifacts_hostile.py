"""Hostile artifact stores and packages: special files never opened, symlinks never followed, names the
filesystem cannot hold refused before anything is written, JSON too deep or too large reported by name.
Every command finishes (a hang fails the subprocess timeout) and never wedges the store."""

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

import contexta_ops as ops
from helpers import snapshot

PACKAGE = "exports/artifact__fixture-proj.tuned.model"
REF = "artifact:fixture-proj.tuned.model"
BODY = "objects/checkpoint/0d/artifact__fixture-proj.tuned.model.bin"
BINDING = "bindings/artifact__fixture-proj.tuned.model.binding.json"
TIMEOUT = 30


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


def _store(fixture_dir):
    return _ws(fixture_dir) / "artifacts"


def _fifo(path):
    if path.exists():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(str(path))


def _socket(path):
    """A Unix socket at ``path`` (bound by a relative name: socket addresses are short)."""
    here = os.getcwd()
    os.chdir(str(path.parent))
    try:
        server = socket.socket(socket.AF_UNIX)
        server.bind(path.name)
        server.close()
    finally:
        os.chdir(here)


def _problems(result):
    return [(problem["code"], problem["path"]) for problem in result.json["problems"]]


# -- 1. special files and symlinks ------------------------------------------------------------------

@pytest.mark.parametrize("where", [BODY, "objects/checkpoint/0d/stray.fifo", "bindings/zz.binding.json",
                                   "bindings/not-a-binding", "history/bindings/artifact__fixture-proj.tuned.model/x.json",
                                   "staging/abc.contexta-ops-write.json", "staging/ingest-x.part", "quarantine/q"])
def test_a_fifo_anywhere_in_the_store_is_reported_and_never_opened(cli, fixture_dir, where):
    store = _store(fixture_dir)
    fifo = store / where
    _fifo(fifo)
    for command in (("artifact", "inspect", "--store", store), ("artifact", "verify", "--all", "--store", store),
                    ("--workspace", _ws(fixture_dir), "check", "--plane", "artifacts")):
        result = cli(*command, "--json", timeout=TIMEOUT)
        assert result.returncode == 1, (command, result)
        assert ("special_file", str(fifo)) in _problems(result), (command, result.json["problems"])
    assert fifo.exists()  # reported, never removed by a reading command


def test_a_fifo_body_verifies_as_missing_and_export_refuses_it(cli, fixture_dir, tmp_path):
    store = _store(fixture_dir)
    _fifo(store / BODY)
    single = cli("artifact", "verify", REF, "--store", store, "--json", timeout=TIMEOUT)
    assert single.returncode == 1
    assert (single.json["report"]["status"], single.json["report"]["exists"]) == ("missing", False)
    assert "FIFO" in single.json["report"]["messages"][0]
    exported = cli("artifact", "export", REF, "--store", store, "--export-root", tmp_path / "out", "--json",
                   timeout=TIMEOUT)
    assert exported.returncode == 3 and exported.json["error"]["code"] == "special_file"
    assert exported.json["error"]["path"] == str(store / BODY)


def test_a_socket_in_objects_is_reported(cli, fixture_dir):
    store = _store(fixture_dir)
    path = store / "objects/checkpoint/sock"
    _socket(path)
    result = cli("artifact", "inspect", "--store", store, "--json", timeout=TIMEOUT)
    assert result.returncode == 1 and ("special_file", str(path)) in _problems(result)
    assert result.json["orphan_count"] == 0  # not a body


def test_writes_refuse_a_fifo_where_a_journal_belongs(cli, fixture_dir):
    store = _store(fixture_dir)
    fifo = store / "staging/abc.contexta-ops-write.json"
    _fifo(fifo)
    before = snapshot(store)
    result = cli("artifact", "import", fixture_dir / PACKAGE, "--store", store, "--json", timeout=TIMEOUT)
    assert result.returncode == 3, result
    assert (result.json["error"]["code"], result.json["error"]["path"]) == ("special_file", str(fifo))
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(store) == before


def test_a_symlinked_body_or_binding_is_never_followed(cli, fixture_dir, tmp_path):
    store = _store(fixture_dir)
    body = store / BODY
    outside = tmp_path / "outside.bin"
    shutil.move(str(body), str(outside))
    os.symlink(str(outside), str(body))  # same bytes, through a link
    binding = store / "bindings/artifact__fixture-proj.tuned.notes.binding.json"
    outside_binding = tmp_path / "outside.binding.json"
    shutil.move(str(binding), str(outside_binding))
    os.symlink(str(outside_binding), str(binding))
    result = cli("artifact", "verify", "--all", "--store", store, "--json", timeout=TIMEOUT)
    assert result.returncode == 1
    problems = _problems(result)
    assert ("symlink_not_followed", str(body)) in problems
    assert ("symlink_not_followed", str(binding)) in problems
    assert REF in result.json["missing_refs"]
    single = cli("artifact", "verify", REF, "--store", store, "--json", timeout=TIMEOUT)
    assert single.returncode == 1 and single.json["report"]["exists"] is False
    assert "symbolic link" in single.json["report"]["messages"][0]


# -- 2. names the filesystem cannot hold --------------------------------------------------------------

def _package_with_location(fixture_dir, tmp_path, location):
    package = tmp_path / "long-package"
    shutil.copytree(str(fixture_dir / PACKAGE), str(package))
    for name in ("manifest.snapshot.json", "artifact__fixture-proj.tuned.model.binding.json"):
        document = json.loads((package / name).read_text())
        (document.get("manifest_snapshot") or document)["location_ref"] = location
        (package / name).write_text(json.dumps(document))
    return package


def test_an_object_name_longer_than_name_max_is_refused_before_anything_is_written(cli, fixture_dir, tmp_path):
    store = tmp_path / "store"
    first = cli("artifact", "import", fixture_dir / PACKAGE, "--store", store, "--create-store", "--json")
    assert first.returncode == 0, first
    package = _package_with_location(fixture_dir, tmp_path, "vault://p/r/model." + "x" * 250)
    # a different ref, so the import is new rather than a conflict
    for name in ("manifest.snapshot.json", "artifact__fixture-proj.tuned.model.binding.json", "export.package.json"):
        text = (package / name).read_text().replace("fixture-proj.tuned.model", "fixture-proj.tuned.longname")
        (package / name).write_text(text)
    for member in package.glob("artifact__fixture-proj.tuned.model.*"):
        member.rename(package / member.name.replace(".model.", ".longname."))
    before = snapshot(store)
    result = cli("artifact", "import", package, "--store", store, "--json")
    assert result.returncode == 3, result
    assert result.json["error"]["code"] == "artifact_name_too_long", result
    assert len(result.stderr.strip().splitlines()) == 1
    assert "artifact__fixture-proj.tuned.longname.xxxx" in result.stderr
    assert snapshot(store) == before
    after = cli("artifact", "inspect", "--store", store, "--json")
    assert after.returncode == 0, after
    assert snapshot(store) == before


def test_a_kind_too_long_for_its_folder_name_is_refused(cli, tmp_path):
    """Refs are short enough by Contexta's rules; an artifact kind has no length limit."""
    body = tmp_path / "b.bin"
    body.write_bytes(b"x")
    store = tmp_path / "store"
    store.mkdir()
    result = cli("artifact", "put", body, "--store", store, "--ref", "artifact:p.r.m", "--kind", "k" * 300, "--json")
    assert result.returncode == 3 and result.json["error"]["code"] == "artifact_name_too_long", result
    assert "k" * 300 in result.stderr
    assert os.listdir(str(store)) == []


def test_a_journal_left_by_an_overlong_write_no_longer_wedges_the_store(cli, fixture_dir):
    """What an earlier version left after a failed import: a journal whose body name cannot exist."""
    store = _store(fixture_dir)
    journal = {"binding_id": "binding-0", "binding": "bindings/artifact__p.r.m.binding.json",
               "body": "objects/checkpoint/aa/artifact__p.r.m." + "x" * 300, "body_ino": 1,
               "staged": "staging/ingest-m-0.part", "events": []}
    (store / "staging" / ("0" * 32 + ".contexta-ops-write.json")).write_text(json.dumps(journal))
    (store / "objects/checkpoint/aa").mkdir()  # so the name itself, not a missing folder, is what fails
    result = cli("artifact", "inspect", "--store", store, "--json")
    assert result.returncode == 0, result
    assert result.json["notes"] == ["rolled_back:bindings/artifact__p.r.m.binding.json"]
    assert list((store / "staging").glob("*.json")) == []


def test_a_failure_after_the_journal_rolls_back_at_once(cli, fixture_dir, tmp_path):
    """A replace whose quarantine folder cannot be made fails after its journal: nothing may stay behind."""
    store = tmp_path / "store"
    from helpers import reseal_package
    other, _size, _digest = reseal_package(fixture_dir / PACKAGE, tmp_path / "other", b"older weights" * 300)
    assert cli("artifact", "import", other, "--store", store, "--create-store").returncode == 0
    (store / "quarantine").rmdir()
    (store / "quarantine").write_bytes(b"not a folder")
    before = snapshot(store)
    result = cli("artifact", "import", fixture_dir / PACKAGE, "--store", store, "--conflict", "replace", "--json")
    assert result.returncode == 3, result
    assert len(result.stderr.strip().splitlines()) == 1 and str(store / "quarantine") in result.stderr
    assert snapshot(store) == before
    assert cli("artifact", "verify", "--all", "--store", store).returncode == 0


# -- 3. JSON too deep or too large -----------------------------------------------------------------------

def _deep(levels):
    return "[" * levels + "]" * levels


def _sparse(path, size):
    """A file of ``size`` bytes that costs no disk: large input made at test time."""
    with open(str(path), "wb") as handle:
        handle.truncate(size)


@pytest.mark.parametrize("spoil", ["deep", "large"])
def test_a_deep_or_large_binding_is_a_problem_naming_it(cli, fixture_dir, spoil):
    store = _store(fixture_dir)
    binding = store / BINDING
    if spoil == "deep":
        binding.write_text(_deep(100000))
    else:
        _sparse(binding, (64 << 20) + 1)
    for command in (("artifact", "inspect"), ("artifact", "verify", "--all")):
        result = cli(*command, "--store", store, "--json", timeout=TIMEOUT)
        assert result.returncode == 1, result
        assert ("binding_invalid", str(binding)) in _problems(result)
    single = cli("artifact", "verify", REF, "--store", store, "--json", timeout=TIMEOUT)
    assert single.returncode == 3 and single.json["error"]["path"] == str(binding)
    assert single.json["error"]["code"] == "artifact_store_invalid_binding"


@pytest.mark.parametrize("spoil", ["deep", "large", "not-an-object", "unsafe-path"])
def test_a_bad_write_journal_is_a_problem_for_readers_and_stops_writers(cli, fixture_dir, spoil):
    store = _store(fixture_dir)
    journal = store / "staging" / ("f" * 32 + ".contexta-ops-write.json")
    if spoil == "deep":
        journal.write_text(_deep(100000))
    elif spoil == "large":
        _sparse(journal, (64 << 20) + 1)
    elif spoil == "not-an-object":
        journal.write_text('{"binding": "bindings/x.binding.json"}')
    else:
        journal.write_text(json.dumps({"binding_id": "b", "binding": "bindings/x.binding.json",
                                       "body": "../../../../outside", "body_ino": 1, "staged": "staging/x.part",
                                       "events": []}))
    before = snapshot(store)
    for command in (("artifact", "inspect"), ("artifact", "verify", "--all")):
        result = cli(*command, "--store", store, "--json", timeout=TIMEOUT)
        assert result.returncode == 1, result
        assert ("artifact_write_journal_invalid", str(journal)) in _problems(result)
    imported = cli("artifact", "import", fixture_dir / PACKAGE, "--store", store, "--json", timeout=TIMEOUT)
    assert imported.returncode == 3, imported
    assert imported.json["error"]["code"] == "artifact_write_journal_invalid"
    assert imported.json["error"]["path"] == str(journal)
    assert len(imported.stderr.strip().splitlines()) == 1
    assert snapshot(store) == before


@pytest.mark.parametrize("member", ["export.package.json", "manifest.snapshot.json",
                                    "artifact__fixture-proj.tuned.model.binding.json"])
@pytest.mark.parametrize("spoil", ["deep", "large"])
def test_a_deep_or_large_package_file_is_refused_naming_it(cli, fixture_dir, tmp_path, member, spoil):
    package = fixture_dir / PACKAGE
    if spoil == "deep":
        (package / member).write_text(_deep(100000))
    else:
        _sparse(package / member, (64 << 20) + 1)
    store = _store(fixture_dir)
    before = snapshot(store)
    result = cli("artifact", "import", package, "--store", store, "--json", timeout=TIMEOUT)
    assert result.returncode == 3, result
    assert result.json["error"]["code"] == "artifact_export_package_invalid"
    assert result.json["error"]["path"] == str(package / member)
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(store) == before


def _nested(levels):
    value = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def test_a_manifest_whose_binding_would_nest_too_deeply_is_refused(cli, fixture_dir, tmp_path):
    """A manifest within the limit, wrapped in a binding and a journal, would be a file no reader takes."""
    package = fixture_dir / PACKAGE
    for name in ("manifest.snapshot.json", "artifact__fixture-proj.tuned.model.binding.json"):
        document = json.loads((package / name).read_text())
        (document.get("manifest_snapshot") or document)["attributes"] = {"deep": _nested(61)}
        (package / name).write_text(json.dumps(document))
    result = cli("artifact", "import", package, "--store", tmp_path / "store", "--create-store", "--json")
    assert result.returncode == 3, result
    assert result.json["error"]["code"] == "artifact_export_package_invalid"
    assert result.json["error"]["path"] == str(package / "manifest.snapshot.json")
    assert not (tmp_path / "store").exists()


def test_put_keeps_every_document_it_writes_readable(tmp_path):
    body = tmp_path / "b.bin"
    body.write_bytes(b"x")
    store = ops.ArtifactStore(ops.VaultConfig(root_path=tmp_path / "store"))
    manifest = dict(artifact_ref="artifact:p.r.m", artifact_kind="checkpoint", created_at="2024-01-01T00:00:00Z",
                    producer_ref="x.y", run_ref="run:p.r", location_ref="vault://p/r/m.bin")
    with pytest.raises(ops.ArtifactError) as caught:
        store.put_artifact(dict(manifest, attributes={"deep": _nested(61)}), body)
    assert caught.value.code == "artifact_manifest_too_large"
    receipt = store.put_artifact(dict(manifest, attributes={"deep": _nested(50)}), body)
    assert ops.verify_artifact(store, receipt.binding.artifact_ref).verified
