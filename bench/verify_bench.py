"""Verify-only in place: time, peak memory and bytes written, against contexta 1.0.0 and the physical limit.

    python3 bench/verify_bench.py [--shape 300mb|1gb] [--runs 3] [--dir /tmp/contexta-verify-bench]

Shapes (bench/make_workspace.py):
  300mb  ~300 MB of artifact bodies (4 KB to 64 MB), 200,000 records in 100 segments, 100,000 outbox entries
  1gb    ~1 GB of artifact bodies, 200,000 records in one segment, 100,000 outbox entries (bench/run.sh's)

One backup directory of the workspace is made with contexta.pyz; then, for --runs rounds, in turn:

  verify-only     contexta.pyz restore --verify-only (reads the backup in place)
  contexta        contexta 1.0.0's own verify-only restore_workspace of the same backup (it copies the
                  backup into staging, then replays and inspects there)
  baseline        cp -a of the workspace, sync, then `openssl dgst -sha256` of every copied file
  materialize     contexta.pyz restore --verify-only --materialize (the copy into staging, as before)

Each ratio is the median of the ratios of one round (the machine's speed drifts; a round runs its commands
back to back).  Peak RSS and "File system outputs" (512-byte blocks the kernel saw written) come from
/usr/bin/time -v.  Targets: verify-only >= 35x faster than contexta, no slower than the baseline, peak RSS
<= 64 MB, < 8 MB written.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from run import CONTEXTA_VERIFY, REF_SCRIPT, generated_workspace, measure_io as measure  # noqa: E402

SHAPES = {"300mb": ["--artifact-mb", "330", "--segments", "100"], "1gb": []}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="300mb")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "contexta-verify-bench"))
    parser.add_argument("--pyz", default=str(REPO / "contexta.pyz"))
    parser.add_argument("--no-materialize", action="store_true", help="skip the --materialize rows")
    args = parser.parse_args()
    base = Path(args.dir)
    workspace = generated_workspace(base / ("source-%s" % args.shape), SHAPES[args.shape])
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONTEXTA_")}
    pyz = [sys.executable, args.pyz]
    backups = base / ("backups-%s" % args.shape)
    if not backups.is_dir() or not any(backups.iterdir()):
        subprocess.run(pyz + ["--workspace", workspace, "--backup-root", backups, "backup", "create", "--label",
                              "bench", "--quiet"], env=env, check=True)
    ref = sorted(path.name for path in backups.iterdir() if not path.name.startswith("."))[-1]
    contexta = subprocess.run(["bash", str(REF_SCRIPT)], stdout=subprocess.PIPE,
                              universal_newlines=True).stdout.strip() if REF_SCRIPT.exists() else None
    out = base / "out"
    results = {}

    def record(name, command, environ=env):
        results.setdefault(name, []).append(measure(command, environ))

    for run in range(args.runs):
        shutil.rmtree(str(out), ignore_errors=True)
        out.mkdir(parents=True)
        subprocess.run(["sync"])
        record("verify-only", pyz + ["--backup-root", backups, "--staging-root", out / "stage", "restore", ref,
                                     "--verify-only", "--quiet"])
        if contexta:
            record("contexta", [contexta, "-c", CONTEXTA_VERIFY, out / "ctxws", backups, out / "ctx-stage", ref])
        subprocess.run(["sync"])
        record("baseline", ["bash", "-c", 'cp -a "$0" "$1" && sync && find "$1" -type f -print0 | '
                                          'xargs -0 openssl dgst -sha256 >/dev/null', workspace, out / "copy"])
        if not args.no_materialize:
            subprocess.run(["sync"])
            record("materialize", pyz + ["--backup-root", backups, "--staging-root", out / "stage", "restore",
                                         ref, "--verify-only", "--materialize", "--quiet"])
    shutil.rmtree(str(out), ignore_errors=True)

    def paired(name, versus):
        return statistics.median(b[0] / a[0] for a, b in zip(results[name], results[versus]))

    print("shape %s: %s, backup %s; %d round(s), medians" % (args.shape, workspace, ref, args.runs))
    print("%-14s %9s %9s %12s  %s" % ("measure", "seconds", "peak MB", "written MB", "ratio"))
    for name in ("verify-only", "contexta", "baseline", "materialize"):
        if name not in results:
            continue
        values = results[name]
        ratio = ""
        if name == "verify-only" and "contexta" in results:
            speedup = paired(name, "contexta")
            ratio = "%.1fx faster than contexta (>= 35x %s)" % (speedup, "met" if speedup >= 35 else "MISSED")
        if name in ("verify-only", "materialize") and "baseline" in results:
            versus = 1 / paired(name, "baseline")
            ratio += "%s%.2fx the baseline%s" % ("; " if ratio else "", versus, "" if name != "verify-only" else
                                                 " (<= 1.0x %s)" % ("met" if versus <= 1.0 else "MISSED"))
        if name == "verify-only":
            written = max(value[2] for value in values)
            ratio += "; written < 8 MB %s" % ("met" if written < 8e6 else "MISSED")
            ratio += "; RSS <= 64 MB %s" % ("met" if max(value[1] for value in values) <= 64 else "MISSED")
        print("%-14s %9.2f %9.1f %12.1f  %s" % (name, statistics.median(v[0] for v in values),
                                               max(v[1] for v in values), max(v[2] for v in values) / 1e6, ratio))


if __name__ == "__main__":
    main()
