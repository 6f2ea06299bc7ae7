"""Fixtures: the contexta 1.0.0 fixture tree, the built contexta.pyz, and the reference contexta."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import FIXTURE_TARBALL, REF_SCRIPT, REPO, SHARED_REF_SCRIPT, Cli, close_fork_servers, extract  # noqa: E402

_RAM_TREES_NEED = 8 << 30  # the largest tests' trees, two sessions at once (run_all.sh), with room to spare


def pytest_configure(config):
    """The tests' trees on a RAM-backed filesystem (/dev/shm) where there is one with room.

    The suite writes and fsyncs a few GB in small files; on a virtual disk the
    waiting alone made the fast loop half as slow again.  The files, renames,
    locks and kill -9s are as real there.  An explicit --basetemp, or
    OPS_TEST_ON_DISK=1 (run_all.sh sets it for one interpreter), keeps them where
    pytest puts them, on the disk that holds the system's temp directory.
    """
    if config.option.basetemp or os.environ.get("OPS_TEST_ON_DISK") == "1":
        return
    try:
        shm = os.statvfs("/dev/shm")
    except OSError:
        return
    if shm.f_bavail * shm.f_frsize >= _RAM_TREES_NEED and os.access("/dev/shm", os.W_OK):
        config.option.basetemp = config.ops_ram_trees = tempfile.mkdtemp(prefix="contexta-ops-tests-", dir="/dev/shm")


def pytest_unconfigure(config):
    close_fork_servers()
    ram_trees = getattr(config, "ops_ram_trees", None)
    if ram_trees:  # RAM is not a place to leave them; a failure's message carries what it found
        shutil.rmtree(ram_trees, ignore_errors=True)


def pytest_collection_modifyitems(items):
    """Every test that compares against the real contexta 1.0.0 is marked interop (`pytest -m interop`)."""
    for item in items:
        if "contexta_ref" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.interop)


@pytest.fixture(scope="session", autouse=True)
def bytecode_cache(tmp_path_factory):
    """Hundreds of CLI runs: let contexta.pyz keep its compiled module (an opt-in operators have too)."""
    os.environ["CONTEXTA_OPS_BYTECODE_CACHE"] = str(tmp_path_factory.mktemp("bytecode"))


@pytest.fixture(scope="session")
def pristine_fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    extract(FIXTURE_TARBALL, root)
    return root / "contexta-fixture"


@pytest.fixture
def fixture_dir(pristine_fixture, tmp_path):
    """A private copy of the fixture: workspace/.contexta, backups/, cli-backup.zip, exports/."""
    destination = tmp_path / "fx"
    shutil.copytree(str(pristine_fixture), str(destination), symlinks=True)
    return destination


@pytest.fixture(scope="session")
def expected(pristine_fixture):
    return json.loads((pristine_fixture / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def pyz(tmp_path_factory):
    """The built contexta.pyz: $OPS_TEST_PYZ (CI builds it once), else built here with build.sh."""
    given = os.environ.get("OPS_TEST_PYZ")
    if given:
        return Path(given).resolve()
    out = tmp_path_factory.mktemp("build") / "contexta.pyz"
    subprocess.run(["bash", str(REPO / "build.sh"), str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


@pytest.fixture
def cli(pyz, tmp_path):
    return Cli(pyz, tmp_path)


def _reference_python(script):
    """(interpreter, None) from a script that provides contexta 1.0.0, or (None, why not)."""
    try:
        completed = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   universal_newlines=True, timeout=900)
    except subprocess.TimeoutExpired:
        return None, "%s timed out installing contexta 1.0.0" % script.name
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        return None, (completed.stderr.strip().splitlines() or ["%s failed" % script.name])[-1]
    return lines[-1], None


@pytest.fixture(scope="session")
def contexta_ref():
    """Python with the real contexta 1.0.0 (tests/reference/contexta_ref.sh), or a skip that says why."""
    python, reason = _reference_python(REF_SCRIPT)
    if python is None and SHARED_REF_SCRIPT.exists():
        python = _reference_python(SHARED_REF_SCRIPT)[0]
    if python is None:
        pytest.skip("interop: %s" % reason)
    return python
