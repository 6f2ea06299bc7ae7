"""contexta.pyz: one reproducible file that runs anywhere, checks itself, and shows a newcomer around."""

import base64
import hashlib
import json
import os
import pty
import shutil
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest

import contexta_ops as ops
from helpers import DATA, FIXTURE_BACKUP_REF, REPO, fill_disk, flip_byte, snapshot

COMMANDS = [["backup"], ["backup", "plan"], ["backup", "create"], ["backup", "list"], ["backup", "verify"],
            ["backup", "prune"], ["restore"], ["replay"], ["recover"], ["recover", "replay"], ["artifact"],
            ["artifact", "inspect"], ["artifact", "verify"], ["artifact", "export"], ["artifact", "import"],
            ["artifact", "put"], ["status"], ["check"], ["demo"], ["self-check"]]


def _run(pyz, *args, env=None, cwd=None, timeout=300):
    return subprocess.run([sys.executable, str(pyz)] + [str(arg) for arg in args], env=env or _env(), cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)


def _env(**changes):
    """The default environment of an operator: no crash hooks, and the default place of the code cache."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("CONTEXTA_OPS_CRASH", "CONTEXTA_OPS_BYTECODE_CACHE"))}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def test_two_builds_are_byte_identical_and_small(tmp_path, pyz):
    first, second = tmp_path / "a.pyz", tmp_path / "b.pyz"
    for out in (first, second):
        subprocess.run(["bash", str(REPO / "build.sh"), str(out)], check=True, stdout=subprocess.PIPE)
    assert first.read_bytes() == second.read_bytes()
    assert first.stat().st_size < 200 * 1024
    assert first.read_bytes() == pyz.read_bytes()  # the suite runs the very file build.sh makes


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_a_purpose_and_an_example(pyz, command):
    result = _run(pyz, *(command + ["--help"]))
    assert result.returncode == 0, result.stderr
    assert "example:" in result.stdout and "contexta.pyz" in result.stdout


def test_version(pyz):
    result = _run(pyz, "--version")
    assert result.returncode == 0 and result.stdout.strip() == "contexta-ops %s" % ops.__version__


@pytest.mark.parametrize("home", ["/dev/null", "/proc", None], ids=["dev-null", "proc-read-only", "unset"])
def test_runs_without_a_usable_home(pyz, fixture_dir, tmp_path, home):
    """A plain shiv .pyz dies here (it extracts to ~/.shiv); ours imports straight from the archive."""
    env = _env(HOME=home, TMPDIR=tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    verify = _run(pyz, "--backup-root", fixture_dir / "backups", "--staging-root", tmp_path / "stage", "restore",
                  "--verify-only", FIXTURE_BACKUP_REF, "--json", env=env)
    assert verify.returncode == 0, verify.stderr
    status = _run(pyz, "--workspace", fixture_dir / "workspace/.contexta", "--backup-root", tmp_path / "bk",
                  "--staging-root", tmp_path / "stage", "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert _run(pyz, "self-check", env=env).returncode == 0


def _mount_tmpfs(path, size, read_only=False):
    path.mkdir(parents=True, exist_ok=True)
    options = "size=%s" % size + (",ro" if read_only else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "none", str(path)]).returncode:
        pytest.skip("needs root to mount a tmpfs")


def test_runs_from_a_read_only_directory(pyz, fixture_dir, tmp_path):
    place = tmp_path / "ro"
    _mount_tmpfs(place, "4m")
    try:
        shutil.copy(str(pyz), str(place / "contexta.pyz"))
        assert subprocess.run(["mount", "-o", "remount,ro", str(place)]).returncode == 0
        result = _run(place / "contexta.pyz", "--backup-root", fixture_dir / "backups", "--staging-root",
                      tmp_path / "stage", "restore", "--verify-only", FIXTURE_BACKUP_REF, cwd=place,
                      env=_env(HOME=place))
        assert result.returncode == 0, result.stderr
        assert _run(place / "contexta.pyz", "self-check", cwd=place).returncode == 0
    finally:
        subprocess.run(["umount", str(place)])


def test_full_disk_host_still_verifies_with_staging_on_another_disk(pyz, fixture_dir, tmp_path):
    full = tmp_path / "full"
    _mount_tmpfs(full, "1m")
    try:
        assert fill_disk(full)
        env = _env(HOME=full, TMPDIR=full)
        result = _run(pyz, "--backup-root", fixture_dir / "backups", "--staging-root", tmp_path / "stage",
                      "restore", "--verify-only", FIXTURE_BACKUP_REF, "--json", cwd=full, env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["status"] == "SUCCESS"
    finally:
        subprocess.run(["umount", str(full)])


def test_the_compiled_module_is_cached_checked_and_never_required(pyz, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = _env(HOME=home, XDG_CACHE_HOME=None)
    for _ in range(2):
        assert _run(pyz, "self-check", env=env).returncode == 0
    cache = home / ".cache" / "contexta-ops"
    entries = sorted(cache.iterdir())
    assert len(entries) == 1 and entries[0].name.endswith(".code")
    flip_byte(entries[0], 100)  # a damaged cache entry is recompiled, never run
    assert _run(pyz, "self-check", env=env).returncode == 0
    assert sorted(cache.iterdir()) == entries and entries[0].read_bytes()[:32] == hashlib.sha256(
        entries[0].read_bytes()[32:]).digest()
    chosen = tmp_path / "chosen"
    assert _run(pyz, "status", "--help", env=_env(CONTEXTA_OPS_BYTECODE_CACHE=chosen)).returncode == 0
    assert len(list(chosen.iterdir())) == 1
    off = _run(pyz, "status", "--help", env=_env(HOME=tmp_path / "home2", CONTEXTA_OPS_BYTECODE_CACHE="off"))
    assert off.returncode == 0 and not (tmp_path / "home2").exists()
    unusable = _run(pyz, "status", "--help", env=_env(CONTEXTA_OPS_BYTECODE_CACHE="/proc/no-such-cache"))
    assert unusable.returncode == 0 and unusable.stderr == ""


@pytest.mark.parametrize("version", ["2.7", "3.6", "3.7"])
def test_older_pythons_are_told_they_are_too_old(pyz, version):
    found = sorted(Path.home().glob(".pyenv/versions/%s.*/bin/python" % version))
    if not found:
        pytest.skip("no Python %s under ~/.pyenv/versions" % version)
    for args in (["--version"], ["status"], []):
        result = subprocess.run([str(found[-1]), str(pyz)] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, env=_env())
        assert result.returncode == 3
        assert result.stderr == "contexta-ops: error: needs Python 3.8 or newer, this is %s\n" % version


def _member_data_span(pyz, member):
    """Where a member's compressed bytes lie in the file."""
    with zipfile.ZipFile(str(pyz)) as archive:
        info = archive.getinfo(member)
    data = pyz.read_bytes()
    prefix = data.index(b"PK\x03\x04")
    start = prefix + info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    return start, start + info.compress_size


def test_a_damaged_module_is_refused_before_it_is_compiled(pyz, tmp_path, fixture_dir):
    """zipimport checks no CRC; the launcher checks the module's sha256 first: never different code, never a
    traceback - whichever bit of the module, its digests or its headers flipped."""
    import random
    chooser = random.Random(20261126)
    start, end = _member_data_span(pyz, "contexta_ops.py")
    digests_start, digests_end = _member_data_span(pyz, "contexta_ops.digests.json")
    # Anywhere but the launcher itself: the first code Python runs from the archive cannot check itself.
    spots = [chooser.randrange(start, end) for _ in range(40)] + \
        [chooser.randrange(digests_start, digests_end) for _ in range(10)] + \
        [start - 5, start - 20] + [chooser.randrange(start, digests_end) for _ in range(8)]
    outcomes = {}
    for index, spot in enumerate(spots):
        damaged = tmp_path / ("damaged-%d.pyz" % index)
        data = bytearray(pyz.read_bytes())
        data[spot] ^= 1 << chooser.randrange(8)
        damaged.write_bytes(bytes(data))
        result = _run(damaged, "--workspace", fixture_dir / "workspace/.contexta", "status", "--json",
                      env=_env(CONTEXTA_OPS_BYTECODE_CACHE="off"))
        assert "Traceback" not in result.stderr, (spot, result.stderr)
        if result.returncode == 3:
            assert "contexta.pyz is damaged (member " in result.stderr and "copy it again" in result.stderr
        else:  # a bit no run reads (shiv's unused bootstrap, deflate's padding): the code is the same code
            assert result.returncode in (0, 1) and json.loads(result.stdout)["workspace_root"]
            with zipfile.ZipFile(str(damaged)) as copy, zipfile.ZipFile(str(pyz)) as whole:
                for member in ("contexta_ops.py", "contexta_ops.digests.json"):
                    assert copy.read(member) == whole.read(member), (spot, member)
        outcomes[spot] = result.returncode
        damaged.unlink()
    assert sum(1 for spot in spots[:50] if outcomes[spot] == 3) >= 45  # a flip there changes bytes, nearly always


def test_the_module_imports_from_the_archive_root(pyz, tmp_path):
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import contexta_ops; "
             "print(contexta_ops.__file__); print(contexta_ops.__version__)")
    result = subprocess.run([sys.executable, "-c", probe, str(pyz)], stdout=subprocess.PIPE,
                            universal_newlines=True, env=_env(), cwd=str(tmp_path))
    assert result.returncode == 0
    assert result.stdout.split() == [str(pyz / "contexta_ops.py"), ops.__version__]


def test_ctrl_c_while_starting_is_one_line(pyz, tmp_path):
    """Ctrl-C while the launcher proves and compiles the module: 130 and one line.  (Before the interpreter
    has even imported `site`, Python itself reports it; such early tries are not ours to judge.)"""
    import signal
    import time
    ours = 0
    for delay in (0.06, 0.09, 0.12, 0.15, 0.2, 0.3):
        process = subprocess.Popen([sys.executable, str(pyz), "self-check"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, universal_newlines=True,
                                   env=_env(CONTEXTA_OPS_BYTECODE_CACHE="off"))
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=60)
        if "init_import_site" in err:
            continue
        assert "Traceback" not in err, (delay, err)
        if process.returncode == 130:
            assert err == "contexta-ops: error: interrupted\n", err
            ours += 1
        else:  # finished first: the launcher holds a Ctrl-C that comes after, so the verdict stands, unadorned
            assert (process.returncode, err) == (0, ""), (delay, process.returncode, err)
    assert ours, "no try landed while the tool was starting"


def test_self_check_names_a_damaged_member(pyz, tmp_path):
    damaged = tmp_path / "damaged.pyz"
    data = bytearray(pyz.read_bytes())
    with zipfile.ZipFile(str(pyz)) as archive:
        info = archive.getinfo("_bootstrap/environment.py")  # not needed to start, so the tool still runs
    prefix = data.index(b"PK\x03\x04")
    start = prefix + info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 40
    data[start] ^= 0x01
    damaged.write_bytes(bytes(data))
    result = _run(damaged, "self-check", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert [problem["path"] for problem in report["problems"]] == ["_bootstrap/environment.py"]
    assert report["python"].startswith("CPython %d.%d" % sys.version_info[:2])
    assert _run(pyz, "self-check").returncode == 0


def test_demo_exits_0_and_touches_nothing_outside_its_root(pyz, tmp_path):
    home, tmpdir, cwd = tmp_path / "home", tmp_path / "tmp", tmp_path / "cwd"
    for folder in (home, tmpdir, cwd):
        folder.mkdir()
    result = _run(pyz, "demo", "--root", tmp_path / "demo", "--json", cwd=cwd,
                  env=_env(HOME=home, TMPDIR=tmpdir))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "SUCCESS" and len(report["steps"]) == 10
    assert sorted(os.listdir(str(tmp_path))) == ["cwd", "demo", "home", "tmp"]
    assert os.listdir(str(tmpdir)) == os.listdir(str(cwd)) == []
    assert [path.relative_to(home).as_posix() for path in home.rglob("*") if path.is_file()] == [
        ".cache/contexta-ops/" + path.name for path in (home / ".cache/contexta-ops").iterdir()]  # the code cache
    demo = tmp_path / "demo"
    check = _run(pyz, "--workspace", demo / ".contexta", "check", "--json")
    assert check.returncode == 0, check.stdout
    assert _run(pyz, "--workspace", demo / "restored/.contexta", "check").returncode == 0


def test_demo_workspace_is_read_by_contexta(pyz, tmp_path, contexta_ref):
    """The demo workspace is Contexta's format: contexta 1.0.0 itself verifies its backup."""
    from test_interop import CONTEXTA_RESTORE
    from helpers import run_ref
    assert _run(pyz, "demo", "--root", tmp_path / "demo").returncode == 0
    backup = next((tmp_path / "demo" / "backups").glob("demo-*"))
    theirs = run_ref(contexta_ref, CONTEXTA_RESTORE, backup, tmp_path / "scratch", "verify")
    assert theirs["status"] == "SUCCESS"
    assert theirs["plane_results"]["records"] == {"integrity_state": "HEALTHY", "record_count": 50}
    assert theirs["plane_results"]["artifacts"]["verified_count"] == 4


def test_embedded_ledger_is_the_checked_in_contexta_ledger():
    assert ops._empty_ledger_bytes() == (DATA / "empty-ledger.db").read_bytes()
    report = ops.check_metadata_file(DATA / "empty-ledger.db", use_duckdb=False)
    assert report.problems == [] and report.storage_version


def test_progress_only_on_a_terminal(pyz, fixture_dir, tmp_path):
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen([sys.executable, str(pyz), "--workspace", fixture_dir / "workspace/.contexta",
                                    "--backup-root", tmp_path / "bk", "backup", "create"], stdout=subprocess.PIPE,
                                   stderr=slave)
        os.close(slave)
        process.wait(timeout=120)
        shown = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
    assert process.returncode == 0
    assert b"files" in shown and b"done." in shown and b"/s" in shown  # how many, how fast
    quiet = _run(pyz, "--workspace", fixture_dir / "workspace/.contexta", "--backup-root", tmp_path / "bk2",
                 "backup", "create", "--json")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_rescue_script_reads_json_and_exit_code(pyz, fixture_dir):
    result = subprocess.run(["bash", str(REPO / "examples" / "rescue.sh"), str(pyz),
                             str(fixture_dir / "workspace/.contexta"), str(fixture_dir / "backups")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("restorable: %s 50 records 0 problems" % FIXTURE_BACKUP_REF)
    (fixture_dir / "backups" / FIXTURE_BACKUP_REF / "manifest.json").write_text("{")
    broken = subprocess.run(["bash", str(REPO / "examples" / "rescue.sh"), str(pyz),
                             str(fixture_dir / "workspace/.contexta"), str(fixture_dir / "backups")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=_env())
    assert broken.returncode == 3 and broken.stdout.startswith("could not run")


@pytest.mark.parametrize("from_pyz", [True, False], ids=["from-pyz", "from-py"])
def test_rescue_script_imports_the_module(pyz, fixture_dir, tmp_path, from_pyz):
    tool = pyz if from_pyz else tmp_path / "copied" / "contexta_ops.py"
    if not from_pyz:
        tool.parent.mkdir()
        shutil.copy(str(REPO / "contexta_ops.py"), str(tool))
    result = subprocess.run([sys.executable, str(REPO / "examples" / "rescue_import.py"), str(tool),
                             str(fixture_dir / "workspace/.contexta"), str(tmp_path / "bk")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=_env())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "imported from %s" % (str(pyz) + "/contexta_ops.py" if from_pyz else tool)
    assert lines[1].endswith("SUCCESS SUCCESS")


@pytest.mark.parametrize("program, answers", [
    ("backup_restore_verify.py", ["Included sections: config, metadata, records, artifacts, recovery",
                                  "Restore status: SUCCESS", "Restore applied: False"]),
    ("replay_outbox_demo.py", ["Replay status: SUCCESS", "Acknowledged: 1", "Pending: 0", "Dead-lettered: 0"]),
    ("artifact_transfer_demo.py", ["Source artifact: artifact:my-proj.run-01.model", "Import outcome: imported",
                                   "Target artifact count: 1"]),
])
def test_the_guides_programs_through_the_pyz(pyz, tmp_path, program, answers):
    """The guide's three programs, with contexta_ops imported from contexta.pyz itself."""
    runner = ("import runpy, sys\n"
              "sys.path.insert(0, sys.argv[1])\n"
              "import contexta_ops\n"
              "assert contexta_ops.__file__.startswith(sys.argv[1]), contexta_ops.__file__\n"
              "sys.argv = [sys.argv[2], '--root', sys.argv[3]]\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", runner, str(pyz), str(REPO / "examples" / program),
                             str(tmp_path / "root")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, env=_env())
    assert result.returncode == 0, result.stderr
    printed = [line for line in result.stdout.splitlines()
               if not line.startswith(("Workspace:", "Backup ref:", "Backup location:", "Outbox path:",
                                       "Replayed output:", "Export directory:"))]
    assert printed == answers
