"""The artifact commands fail closed on a store that is not there, say their status, and count bytes as
Contexta does."""

import json
import shutil

import pytest

PACKAGE = "exports/artifact__fixture-proj.tuned.model"
REF = "artifact:fixture-proj.tuned.model"
BODY = "objects/checkpoint/0d/artifact__fixture-proj.tuned.model.bin"

ACTIONS = {
    "inspect": lambda fx, tmp: ("artifact", "inspect"),
    "verify-all": lambda fx, tmp: ("artifact", "verify", "--all"),
    "verify-ref": lambda fx, tmp: ("artifact", "verify", REF),
    "export": lambda fx, tmp: ("artifact", "export", REF, "--export-root", tmp / "out"),
    "import": lambda fx, tmp: ("artifact", "import", fx / PACKAGE),
    "put": lambda fx, tmp: ("artifact", "put", fx / PACKAGE / "manifest.snapshot.json", "--ref", "artifact:p.r.m",
                            "--kind", "report"),
}


def _ws(fixture_dir):
    return fixture_dir / "workspace" / ".contexta"


# -- 4. fail closed ------------------------------------------------------------------------------------

@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_a_workspace_that_does_not_exist_is_refused(cli, fixture_dir, tmp_path, action):
    missing = tmp_path / "nowhere" / ".contexta"
    result = cli("--workspace", missing, *ACTIONS[action](fixture_dir, tmp_path), "--json")
    assert result.returncode == 3, result
    assert "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.json["error"]["path"] == str(missing)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_a_store_that_does_not_exist_is_refused(cli, fixture_dir, tmp_path, action):
    missing = tmp_path / "no-store"
    result = cli(*ACTIONS[action](fixture_dir, tmp_path), "--store", missing, "--json")
    assert result.returncode == 3, result
    assert result.json["error"]["code"] == "artifact_store_not_found"
    assert result.json["error"]["path"] == str(missing)
    assert "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not missing.exists()


@pytest.mark.parametrize("action", ["import", "put"])
def test_create_store_makes_a_new_store(cli, fixture_dir, tmp_path, action):
    store = tmp_path / "new" / "store"
    result = cli(*ACTIONS[action](fixture_dir, tmp_path), "--store", store, "--create-store", "--json")
    assert result.returncode == 0, result
    assert cli("artifact", "verify", "--all", "--store", store).returncode == 0


def test_a_relocated_store_that_does_not_exist_is_refused(cli, fixture_dir, tmp_path):
    env = {"CONTEXTA_ARTIFACTS_ROOT_PATH": str(tmp_path / "unmounted" / "artifacts")}
    for action in ("inspect", "verify-all", "import"):
        result = cli("--workspace", _ws(fixture_dir), *ACTIONS[action](fixture_dir, tmp_path), "--json", env=env)
        assert result.returncode == 3, (action, result)
        assert result.json["error"]["code"] == "artifact_store_not_found"
    assert not (tmp_path / "unmounted").exists()


def test_a_workspace_without_an_artifact_store(cli, fixture_dir, tmp_path):
    """Reading finds nothing and says so; writing creates the store where Contexta would."""
    workspace = _ws(fixture_dir)
    shutil.rmtree(str(workspace / "artifacts"))
    for action in ("inspect", "verify-all"):
        result = cli("--workspace", workspace, *ACTIONS[action](fixture_dir, tmp_path), "--json")
        assert result.returncode == 0, result
        assert result.json["status"] == "SUCCESS"
        assert "artifact_store_absent" in result.json["notes"]
    assert not (workspace / "artifacts").exists()
    imported = cli("--workspace", workspace, *ACTIONS["import"](fixture_dir, tmp_path), "--json")
    assert imported.returncode == 0 and imported.json["outcome"] == "imported"
    assert (workspace / "artifacts" / BODY).is_file()


# -- 8. every artifact command has a status; exit codes agree ------------------------------------------

@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_every_artifact_result_has_a_status(cli, fixture_dir, tmp_path, action):
    store = _ws(fixture_dir) / "artifacts"
    result = cli(*ACTIONS[action](fixture_dir, tmp_path), "--store", store, "--json")
    assert result.returncode == 0, result
    assert result.json["status"] == "SUCCESS"
    if action == "verify-ref":  # Contexta's own report keeps its status field
        assert result.json["report"]["status"] == "verified"


def test_problems_give_status_failure_and_exit_1(cli, fixture_dir, tmp_path):
    store = _ws(fixture_dir) / "artifacts"
    (store / BODY).write_bytes(b"drifted")
    for action in ("inspect", "verify-all", "verify-ref"):
        result = cli(*ACTIONS[action](fixture_dir, tmp_path), "--store", store, "--json")
        assert result.returncode == 1, (action, result)
        assert result.json["status"] == "FAILURE"


# -- 6. bytes_written as Contexta counts it --------------------------------------------------------------

@pytest.mark.parametrize("policy, outcome", [("error", "idempotent"), ("skip", "skipped"),
                                             ("replace", "idempotent")])
def test_reimporting_an_identical_package_writes_0_bytes_even_when_it_repairs_the_body(cli, fixture_dir, policy,
                                                                                       outcome):
    store = _ws(fixture_dir) / "artifacts"
    package = fixture_dir / PACKAGE
    plain = cli("artifact", "import", package, "--store", store, "--conflict", policy, "--json")
    assert plain.returncode == 0 and (plain.json["outcome"], plain.json["bytes_written"]) == (outcome, 0)
    (store / BODY).unlink()
    repaired = cli("artifact", "import", package, "--store", store, "--conflict", policy, "--json")
    assert repaired.returncode == 0, repaired
    assert (repaired.json["outcome"], repaired.json["bytes_written"]) == (outcome, 0)
    assert repaired.json["notes"] == ["damaged_body_restored_from_package"]
    assert (store / BODY).read_bytes() == (package / "artifact__fixture-proj.tuned.model.bin").read_bytes()
    events = [json.loads(path.read_text()) for path in (store / "history/imports").rglob("*.json")]
    assert sorted((event["outcome"], event["bytes_written"]) for event in events) == [(outcome, 0)] * 2
    assert cli("artifact", "verify", "--all", "--store", store).returncode == 0
