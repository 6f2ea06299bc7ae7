"""Hostile artifact stores: special files never opened, symlinks never followed.
Every command finishes (a hang fails the subprocess timeout) and never wedges the store."""

import os
import socket

import pytest

BODY = "objects/checkpoint/0d/artifact__fixture-proj.tuned.model.bin"
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
                                   "staging/ingest-x.part", "quarantine/q"])
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


def test_a_socket_in_objects_is_reported(cli, fixture_dir):
    store = _store(fixture_dir)
    path = store / "objects/checkpoint/sock"
    _socket(path)
    result = cli("artifact", "inspect", "--store", store, "--json", timeout=TIMEOUT)
    assert result.returncode == 1 and ("special_file", str(path)) in _problems(result)
    assert result.json["orphan_count"] == 0  # not a body
