"""Many small files: time and peak memory of backup, incremental, verify-only and restore (no timed tests).

    python3 bench/files_bench.py [--files 100000] [--runs 3] [--dir /tmp/contexta-files-bench]

The workspace is contexta 1.0.0's fixture (tests/data) plus --files files of 512 bytes in the artifact
store's history/ (bench/make_workspace.py --small-files: 100 per directory).  Each measurement is the
median of --runs runs; a command and its baseline run in turn (A B A B ...) and each ratio is taken pair
by pair, so both see the same machine:

  backup create                     vs  cp -a of the workspace, then sync      target <= 2.0x
  backup create --incremental       vs  cp -al of the newest backup            target <= 3.0x
  (unchanged workspace)
  restore --verify-only                                                        (time reported)
  restore BACKUP --target NEW                                                  (time reported)
  peak RSS of each (/usr/bin/time -v)                                          target <= 64 MB

Outputs are kept until the end (deleting a tree of 100,000 files costs the next run on this disk).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import contexta_ops as ops  # noqa: E402
import make_workspace  # noqa: E402
from run import measure  # noqa: E402

FIXTURE = REPO / "tests" / "data" / "contexta-1.0.0-fixture.tar.gz"


def build(base, files):
    source = base / ("source-%d" % files)
    workspace = source / "contexta-fixture" / "workspace" / ".contexta"
    if workspace.is_dir():
        return workspace
    shutil.rmtree(str(source), ignore_errors=True)
    source.mkdir(parents=True)
    with tarfile.open(str(FIXTURE)) as archive:
        archive.extractall(str(source))
    config = ops.UnifiedConfig(workspace=ops.WorkspaceConfig(root_path=workspace))
    make_workspace.write_small_files(config, files, 512)
    return workspace


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/contexta-files-bench")
    parser.add_argument("--pyz", default=str(REPO / "contexta.pyz"))
    parser.add_argument("--keep", action="store_true", help="keep the outputs")
    args = parser.parse_args()
    base = Path(args.dir)
    workspace = build(base, args.files)
    out = base / "out"
    shutil.rmtree(str(out), ignore_errors=True)
    out.mkdir(parents=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONTEXTA_")}
    pyz = [sys.executable, args.pyz]
    results = {}

    def record(name, command, environ=None):
        subprocess.run(["sync"])  # nobody pays for the previous command's dirty pages
        results.setdefault(name, []).append(measure(command, environ))

    for run in range(args.runs):
        backups = out / ("bk-%d" % run)
        record("cp -a + sync", ["sh", "-c", 'cp -a "$0" "$1" && sync', workspace, out / ("cp-%d" % run)])
        record("backup create", pyz + ["--workspace", workspace, "--backup-root", backups, "backup", "create",
                                       "--label", "full", "--quiet"], env)
        full = next(backups.iterdir())
        record("cp -al of the backup", ["cp", "-al", full, out / ("cpal-%d" % run)])
        record("backup create --incremental", pyz + ["--workspace", workspace, "--backup-root", backups, "backup",
                                                     "create", "--label", "inc", "--incremental", "--quiet"], env)
        record("restore --verify-only", pyz + ["--backup-root", backups, "--staging-root", out / "stage", "restore",
                                               full, "--verify-only", "--quiet"], env)
        record("restore --target NEW", pyz + ["--workspace", workspace, "--backup-root", backups, "--staging-root",
                                              out / "stage", "restore", full, "--target",
                                              out / ("restored-%d" % run) / ".contexta", "--quiet"], env)

    def median(name):
        return statistics.median(seconds for seconds, _ in results[name]), max(peak for _, peak in results[name])

    def paired(name, versus):
        return statistics.median(a[0] / b[0] for a, b in zip(results[name], results[versus]))

    print("workspace: %s (%d small files + the fixture), %d run(s) each, medians" % (workspace, args.files,
                                                                                     args.runs))
    print("%-34s %9s %9s %9s  %s" % ("measure", "seconds", "peak MB", "ratio", "target"))
    rows = (("cp -a + sync", None, None), ("backup create", "cp -a + sync", 2.0), ("cp -al of the backup", None, None),
            ("backup create --incremental", "cp -al of the backup", 3.0), ("restore --verify-only", None, None),
            ("restore --target NEW", None, None))
    for name, versus, limit in rows:
        seconds, peak = median(name)
        ratio = target = ""
        if versus:
            value = paired(name, versus)
            ratio = "%.2fx" % value
            target = "<= %.1fx %s" % (limit, "met" if value <= limit else "MISSED")
        if not name.startswith("cp"):
            target += "%sRSS <= 64 MB %s" % ("; " if target else "", "met" if peak <= 64 else "MISSED")
        print("%-34s %9.2f %9.1f %9s  %s" % (name, seconds, peak, ratio, target))
    if not args.keep:
        shutil.rmtree(str(out), ignore_errors=True)


if __name__ == "__main__":
    main()
