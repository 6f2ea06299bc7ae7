"""Replay benchmark: entries/s and peak RSS of `contexta.pyz replay`, and of contexta 1.0.0's replay_outbox.

    python3 bench/replay_bench.py [--pyz contexta.pyz] [--sizes 100000,1000000] [--contexta PYTHON]

Each run gets a fresh workspace and outbox of dispatch-shaped entries (three families) and is timed
twice: the first replay (every entry delivered, the sink index built as it goes), then a re-replay
after the same outbox is put back, as a restore would (every entry recognized in the sink, none
delivered again).  Peak RSS comes from /usr/bin/time -v when present, else from the child's rusage.
Prints a table; writes nothing else.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONTEXTA_REPLAY = """
import sys
from pathlib import Path
from contexta.config import RecoveryConfig, UnifiedConfig, WorkspaceConfig
from contexta.recovery import replay_outbox
root = Path(sys.argv[1])
config = UnifiedConfig(project_name="bench", workspace=WorkspaceConfig(root_path=root / ".contexta"),
                       recovery=RecoveryConfig(outbox_root=root / "outbox"))
result = replay_outbox(config)
print(result.acknowledged_count)
"""


def write_outbox(outbox_root, count):
    outbox_root.mkdir(parents=True)
    families = ("RECORD", "CONTEXT", "ARTIFACT")
    with open(outbox_root / "failed_deliveries.jsonl", "w", encoding="utf-8") as handle:
        for index in range(count):
            handle.write(json.dumps({
                "replay_ref": "replay:record.1717243380000.%d" % index, "failed_at": "2024-06-01T12:03:00.000000Z",
                "sink_name": "local-jsonl-replay", "family": families[index % 3], "payload_type": "MetricRecord",
                "payload_ref": "record:bench.run.m%07d" % index, "error": "sink unavailable",
                "error_code": "dispatch_error", "attempts": 1,
                "payload": {"metric_key": "loss", "run_id": "bench.run", "value": index / 7.0}},
                sort_keys=True, separators=(",", ":")) + "\n")


def timed(command, env=None):
    """(seconds, peak RSS in MB, stdout) of one child process."""
    time_bin = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    if time_bin:
        completed = subprocess.run([time_bin, "-v"] + command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   universal_newlines=True, env=env)
        elapsed = time.perf_counter() - start
        peak_kb = next((int(line.split(":")[1]) for line in completed.stderr.splitlines()
                        if "Maximum resident set size" in line), 0)
    else:
        completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                                   env=env)
        elapsed = time.perf_counter() - start
        peak_kb = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before)
    if completed.returncode != 0:
        raise SystemExit("failed: %s\n%s" % (" ".join(command), completed.stderr[-2000:]))
    return elapsed, peak_kb / 1024.0, completed.stdout


def median_runs(root, size, command, env, repeat, again=False):
    """Median seconds and largest peak RSS over `repeat` runs, each on a fresh workspace and outbox.

    With `again`, each run is followed by a re-replay of the same outbox put back, timed on its own:
    returns ((seconds, peak) of the first replays, (seconds, peak) of the re-replays or None).
    """
    original = root / "outbox.original"
    if not original.exists():
        write_outbox(root / "outbox", size)
        os.rename(str(root / "outbox" / "failed_deliveries.jsonl"), str(original))
    first, second = [], []
    for _ in range(repeat):
        for path in (root / "outbox", root / ".contexta"):
            shutil.rmtree(str(path), ignore_errors=True)
            path.mkdir()
        shutil.copyfile(str(original), str(root / "outbox" / "failed_deliveries.jsonl"))
        first.append(timed(command, env=env)[:2])
        if again:
            shutil.copyfile(str(original), str(root / "outbox" / "failed_deliveries.jsonl"))
            second.append(timed(command, env=env)[:2])

    def summary(runs):
        return (sorted(seconds for seconds, _peak in runs)[len(runs) // 2], max(peak for _s, peak in runs)) \
            if runs else None
    return summary(first), summary(second)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyz", default=str(Path(__file__).resolve().parents[1] / "contexta.pyz"))
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--contexta", help="a Python with contexta 1.0.0 (default: ../shared/tools/contexta-ref.sh)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is shown")
    parser.add_argument("--contexta-max", type=int, default=100000,
                        help="largest outbox to give contexta (it holds every entry in memory)")
    args = parser.parse_args()
    contexta = args.contexta
    ref_script = Path(__file__).resolve().parents[2] / "shared" / "tools" / "contexta-ref.sh"
    if contexta is None and ref_script.exists():
        contexta = subprocess.run(["bash", str(ref_script)], stdout=subprocess.PIPE,
                                  universal_newlines=True).stdout.strip() or None
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONTEXTA_")}
    print("%-10s %-26s %10s %12s %10s" % ("entries", "tool", "seconds", "entries/s", "peak MB"))
    row = "%-10d %-26s %10.2f %12.0f %10.1f"
    for size in [int(item) for item in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="replay-bench-") as scratch:
            root = Path(scratch)
            ours_command = [sys.executable, args.pyz, "--workspace", str(root / ".contexta"),
                            "--outbox-root", str(root / "outbox"), "replay", "--quiet"]
            (seconds, peak), again = median_runs(root, size, ours_command, env, args.repeat, again=True)
            print(row % (size, "contexta-ops", seconds, size / seconds, peak))
            print(row % (size, "contexta-ops, outbox again", again[0], size / again[0], again[1]))
            ours = seconds
            if contexta and size <= args.contexta_max:
                (seconds, peak), _ = median_runs(root, size, [contexta, "-c", CONTEXTA_REPLAY, str(root)], env,
                                                 args.repeat)
                print((row + "   (ours %.1fx faster)") % (size, "contexta", seconds, size / seconds, peak,
                                                          seconds / ours))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
