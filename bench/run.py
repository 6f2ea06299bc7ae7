"""Benchmarks against the physical limit and against contexta 1.0.0; prints a table (no timed tests).

    bash bench/run.sh [--scale 1.0] [--runs 3] [--dir /tmp/contexta-bench]

On a generated workspace (scale 1.0: ~1 GB of artifacts from 4 KB to 64 MB, 200,000 records,
100,000 outbox entries), each measurement is the median of --runs runs, interleaved with its
baseline so both see the same machine:

  baseline      cp -a of the workspace, sync, then `openssl dgst -sha256` of every copied file:
                the physical limit for "copy and prove"
  backup        contexta.pyz backup create                 target <= 1.0 x baseline
  verify-only   contexta.pyz restore --verify-only         target <= 1.0 x baseline, >= 35 x contexta's
                (reads the backup in place; bench/verify_bench.py also measures what it writes)
  incremental   contexta.pyz backup create --incremental   target <= 0.1 x backup
  replay        contexta.pyz replay (100,000 entries)      target >= 10 x contexta's
  peak RSS      /usr/bin/time -v                           target <= 64 MB

contexta 1.0.0's own create_workspace_backup, verify-only restore_workspace and replay_outbox run
on the same data when ../shared/tools/contexta-ref.sh is available.  Outputs are kept until the
end (deleting 1 GB trees between runs makes the next run pay for the deletion on this disk).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REF_SCRIPT = REPO.parent / "shared" / "tools" / "contexta-ref.sh"

CONTEXTA_BACKUP = """
import sys
from pathlib import Path
from contexta.config import RecoveryConfig, UnifiedConfig, WorkspaceConfig
from contexta.recovery import create_workspace_backup, plan_workspace_backup
config = UnifiedConfig(project_name="bench", workspace=WorkspaceConfig(root_path=Path(sys.argv[1])),
                       recovery=RecoveryConfig(backup_root=Path(sys.argv[2]), restore_staging_root=Path(sys.argv[3])))
print(create_workspace_backup(config, plan_workspace_backup(config, label="ctx")).backup_ref)
"""
CONTEXTA_VERIFY = """
import sys
from pathlib import Path
from contexta.config import RecoveryConfig, UnifiedConfig, WorkspaceConfig
from contexta.recovery import plan_restore, restore_workspace
config = UnifiedConfig(project_name="bench", workspace=WorkspaceConfig(root_path=Path(sys.argv[1])),
                       recovery=RecoveryConfig(backup_root=Path(sys.argv[2]), restore_staging_root=Path(sys.argv[3]),
                                               create_backup_before_restore=False))
result = restore_workspace(config, plan_restore(config, sys.argv[4], verify_only=True))
print(result.status, dict(result.plane_results))
"""
CONTEXTA_REPLAY = """
import sys
from pathlib import Path
from contexta.config import RecoveryConfig, UnifiedConfig, WorkspaceConfig
from contexta.recovery import replay_outbox
config = UnifiedConfig(project_name="bench", workspace=WorkspaceConfig(root_path=Path(sys.argv[1])),
                       recovery=RecoveryConfig(outbox_root=Path(sys.argv[2])))
print(replay_outbox(config).acknowledged_count)
"""


def measure(command, env=None):
    """Seconds and peak RSS (MB) of one command, via /usr/bin/time -v."""
    return measure_io(command, env)[:2]


def measure_io(command, env=None):
    """Seconds, peak RSS (MB) and bytes written ("File system outputs") of one command, via /usr/bin/time -v."""
    start = time.perf_counter()
    completed = subprocess.run(["/usr/bin/time", "-v"] + [str(part) for part in command], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit("failed (%d): %s\n%s" % (completed.returncode, " ".join(map(str, command)),
                                                  completed.stderr[-3000:]))
    fields = dict(line.strip().rsplit(": ", 1) for line in completed.stderr.splitlines() if ": " in line)
    return (seconds, int(fields["Maximum resident set size (kbytes)"]) / 1024.0,
            int(fields["File system outputs"]) * 512)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "contexta-bench"))
    parser.add_argument("--pyz", default=str(REPO / "contexta.pyz"))
    parser.add_argument("--keep", action="store_true", help="keep the outputs")
    args = parser.parse_args()
    base = Path(args.dir)
    source = base / ("source-%s" % args.scale)
    if not (source / ".contexta").is_dir():
        shutil.rmtree(str(source), ignore_errors=True)
        subprocess.run([sys.executable, str(HERE / "make_workspace.py"), str(source), "--scale", str(args.scale)],
                       check=True, stdout=subprocess.DEVNULL)
    workspace = source / ".contexta"
    out = base / "out"
    shutil.rmtree(str(out), ignore_errors=True)
    out.mkdir(parents=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONTEXTA_")}
    contexta = None
    if REF_SCRIPT.exists():
        contexta = subprocess.run(["bash", str(REF_SCRIPT)], stdout=subprocess.PIPE,
                                  universal_newlines=True).stdout.strip() or None
    pyz = [sys.executable, args.pyz]
    results = {}

    def record(name, value):
        results.setdefault(name, []).append(value)

    def outbox_copy(run, tag):
        root = out / ("replay-%s-%d" % (tag, run))
        shutil.copytree(str(workspace / "cache" / "outbox"), str(root / "outbox"))
        return root

    first_backup = None
    for run in range(args.runs):
        subprocess.run(["sync"])
        record("baseline", measure(["bash", "-c", 'cp -a "$0" "$1" && sync && find "$1" -type f -print0 | '
                                    'xargs -0 openssl dgst -sha256 >/dev/null', workspace, out / ("copy-%d" % run)]))
        record("backup", measure(pyz + ["--workspace", workspace, "--backup-root", out / ("ours-%d" % run),
                                        "backup", "create", "--label", "bench", "--quiet"], env))
        ours = out / ("ours-%d" % run)
        first_backup = first_backup or next(ours.iterdir())
        record("verify-only", measure(pyz + ["--backup-root", ours, "--staging-root", out / ("stage-%d" % run),
                                             "restore", "--verify-only", "--quiet"], env))
        record("incremental", measure(pyz + ["--workspace", workspace, "--backup-root", ours, "backup", "create",
                                             "--label", "inc", "--incremental", "--quiet"], env))
        root = outbox_copy(run, "ours")
        record("replay", measure(pyz + ["--workspace", root / ".contexta", "--outbox-root", root / "outbox",
                                        "replay", "--quiet"], env))
        if contexta:
            ctx = out / ("ctx-%d" % run)
            record("contexta backup", measure([contexta, "-c", CONTEXTA_BACKUP, workspace, ctx, ctx / "staging"],
                                              env))
            ref = next(path.name for path in ctx.iterdir() if path.name.startswith("ctx-"))
            record("contexta verify-only", measure([contexta, "-c", CONTEXTA_VERIFY, out / ("ctxws-%d" % run), ctx,
                                                    out / ("ctx-stage-%d" % run), ref], env))
            root = outbox_copy(run, "ctx")
            record("contexta replay", measure([contexta, "-c", CONTEXTA_REPLAY, root / ".contexta",
                                               root / "outbox"], env))

    def median(name):
        values = results.get(name)
        if not values:
            return None, None
        return statistics.median(seconds for seconds, _ in values), max(peak for _, peak in values)

    baseline = median("baseline")[0]
    rows = [("baseline: cp -a, sync, openssl sha256", "baseline", None, None),
            ("backup create", "backup", ("baseline", 1.0, "<="), None),
            ("restore --verify-only", "verify-only", ("baseline", 1.0, "<="), ("contexta verify-only", 35)),
            ("backup create --incremental (unchanged)", "incremental", ("backup", 0.1, "<="), None),
            ("replay, 100k entries", "replay", None, ("contexta replay", 10)),
            ("contexta 1.0.0 create_workspace_backup", "contexta backup", ("baseline", None, ""), None),
            ("contexta 1.0.0 verify-only restore", "contexta verify-only", ("baseline", None, ""), None),
            ("contexta 1.0.0 replay_outbox", "contexta replay", None, None)]
    print("workspace: %s (scale %s), %d run(s) each, medians" % (workspace, args.scale, args.runs))
    print("%-42s %9s %9s %11s  %s" % ("measure", "seconds", "peak MB", "ratio", "target"))
    for label, name, versus, faster_than in rows:
        seconds, peak = median(name)
        if seconds is None:
            print("%-42s %9s" % (label, "n/a"))
            continue
        ratio, target = "", ""
        if versus:
            reference = median(versus[0])[0]
            ratio = "%.2fx %s" % (seconds / reference, "base" if versus[0] == "baseline" else versus[0])
            if versus[1] is not None:
                met = seconds / reference <= versus[1]
                target = "<= %.1fx %s" % (versus[1], "met" if met else "MISSED")
        if faster_than and median(faster_than[0])[0]:
            speedup = median(faster_than[0])[0] / seconds
            met = speedup >= faster_than[1]
            target += "%s>= %dx faster than contexta: %.1fx %s" % ("; " if target else "", faster_than[1], speedup,
                                                                   "met" if met else "MISSED")
        if name in ("backup", "verify-only", "incremental", "replay"):
            target += "; RSS <= 64 MB %s" % ("met" if peak <= 64 else "MISSED")
        print("%-42s %9.2f %9.1f %11s  %s" % (label, seconds, peak, ratio, target))
    json.dump({name: values for name, values in results.items()}, open(str(base / "results.json"), "w"), indent=1)
    if not args.keep:
        shutil.rmtree(str(out), ignore_errors=True)


if __name__ == "__main__":
    main()
