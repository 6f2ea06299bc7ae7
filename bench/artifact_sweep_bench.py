"""Sweep of a large artifact store: `artifact inspect` and `artifact verify --all` on many small bound bodies.

    python3 bench/artifact_sweep_bench.py [--artifacts 20000] [--runs 3] [--tool "python3 contexta_ops.py"]

Writes a store in Contexta's format straight to a temporary directory (N bodies of 1 KB, their bindings,
one binding event and two verification events each: a store that has been verified twice), then runs each
command RUNS times and prints the median wall seconds and peak RSS.  A sweep lists every entry of the store
(history included) to find special files, so the history is what makes this benchmark large.
To compare two versions: farm-bench --vs 'python3 OLD/contexta_ops.py artifact inspect --store S' -- ...
"""

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contexta_ops as ops  # noqa: E402


def make_store(root, count):
    for name in ("bindings", "objects", "staging", "history/bindings", "history/verification", "quarantine"):
        os.makedirs(os.path.join(root, name), exist_ok=True)
    for number in range(count):
        ref = "artifact:bench.run.a%06d" % number
        body = os.urandom(1024)
        manifest = ops.ArtifactManifest(artifact_ref=ref, artifact_kind="checkpoint",
                                        created_at="2024-06-01T12:04:00Z", producer_ref="bench",
                                        run_ref="run:bench.run", location_ref="vault://b/r/a%06d.bin" % number)
        relative = ops.artifact_object_relpath(ref, "checkpoint", manifest.location_ref)
        os.makedirs(os.path.dirname(os.path.join(root, relative)), exist_ok=True)
        with open(os.path.join(root, relative), "wb") as handle:
            handle.write(body)
        binding = ops.ArtifactBinding(ref, "checkpoint", "binding-" + uuid.uuid4().hex, "a.bin", "copy", len(body),
                                      "sha256", hashlib.sha256(body).hexdigest(), "v1", "2024-06-01T12:04:00Z",
                                      manifest)
        safe = ops.sanitize_component(ref)
        with open(os.path.join(root, "bindings", safe + ".binding.json"), "wb") as handle:
            handle.write(ops._pretty_json(binding.to_dict()))
        for folder, events in (("history/bindings", 1), ("history/verification", 2)):
            os.makedirs(os.path.join(root, folder, safe), exist_ok=True)
            for index in range(events):
                with open(os.path.join(root, folder, safe, "e%d-%s.json" % (index, uuid.uuid4().hex)), "wb") as out:
                    out.write(b"{}\n")


def measure(command, runs):
    walls, peaks = [], []
    for _ in range(runs):
        started = time.monotonic()
        pid = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
        _pid, status, usage = os.wait4(pid, 0)
        walls.append(time.monotonic() - started)
        peaks.append(usage.ru_maxrss / 1024.0)  # KiB on Linux
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            raise SystemExit("%s failed" % " ".join(command))
    return statistics.median(walls), statistics.median(peaks)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tool", default="%s %s" % (sys.executable, Path(__file__).resolve().parents[1] /
                                                     "contexta_ops.py"))
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="contexta-artifact-bench-")
    try:
        store = os.path.join(scratch, "store")
        started = time.monotonic()
        make_store(store, args.artifacts)
        entries = sum(len(files) for _root, _dirs, files in os.walk(store))
        results = {"artifacts": args.artifacts, "files": entries, "made_in_s": round(time.monotonic() - started, 1)}
        for name, action in (("inspect", ["artifact", "inspect"]), ("verify_all", ["artifact", "verify", "--all"])):
            wall, peak = measure(shlex.split(args.tool) + action + ["--store", store, "--json"], args.runs)
            results[name] = {"median_wall_s": round(wall, 3), "median_peak_rss_mib": round(peak, 1)}
        print(json.dumps(results))
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
