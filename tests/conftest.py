"""Fixtures: the contexta 1.0.0 fixture tree, the built contexta.pyz, and the reference contexta."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import FIXTURE_TARBALL, REF_SCRIPT, REPO, Cli, extract  # noqa: E402


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


@pytest.fixture(scope="session")
def contexta_ref():
    """Python with the real contexta 1.0.0, or a skip that says why."""
    if not REF_SCRIPT.exists():
        pytest.skip("interop with contexta 1.0.0 needs %s (present in CI checkouts beside ../shared)" % REF_SCRIPT)
    try:
        completed = subprocess.run(["bash", str(REF_SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   universal_newlines=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("contexta-ref.sh timed out installing contexta 1.0.0")
    if completed.returncode != 0:
        pytest.skip("contexta-ref.sh could not provide contexta 1.0.0: %s" % completed.stderr.strip()[-300:])
    return completed.stdout.strip().splitlines()[-1]
