"""Start-up benchmark: how long a rescue script waits for each call of contexta.pyz.

    python3 bench/startup_bench.py [--pyz contexta.pyz] [--python PYTHON] [--runs 30]

Times, alternating so that drift hits every command alike, `PYTHON -c pass` (the floor), `PYTHON
contexta.pyz --version`, `help` and `status --json` on an empty directory, each with the code
cache warm and with `CONTEXTA_OPS_BYTECODE_CACHE=off` (every call compiles the module).  Prints the
median wall time of each and its ratio to the floor, and the archive's size; the targets of issue 15
are `--version` within 2x of the floor and an archive under 1 MB.  Writes only into a temporary
directory it removes.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyz", default="contexta.pyz")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--runs", type=int, default=30)
    options = parser.parse_args()
    pyz = os.path.abspath(options.pyz)
    if not os.path.isfile(pyz):
        sys.exit("no %s: run `bash build.sh` first" % pyz)
    scratch = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    try:
        workspace = scratch / "empty" / ".contexta"
        cache = scratch / "cache"
        warm = dict(os.environ, CONTEXTA_OPS_BYTECODE_CACHE=str(cache))
        cold = dict(os.environ, CONTEXTA_OPS_BYTECODE_CACHE="off")
        cases = [
            ("python -c pass", [options.python, "-c", "pass"], warm),
            ("--version", [options.python, pyz, "--version"], warm),
            ("help (cache warm)", [options.python, pyz, "--help"], warm),
            ("help (no cache)", [options.python, pyz, "--help"], cold),
            ("status --json (cache warm)", [options.python, pyz, "--workspace", str(workspace), "status", "--json"], warm),
            ("status --json (no cache)", [options.python, pyz, "--workspace", str(workspace), "status", "--json"], cold),
        ]
        for _, command, env in cases:  # fills the cache, and the OS's page cache
            subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times = {name: [] for name, _, _ in cases}
        for _ in range(options.runs):
            for name, command, env in cases:
                start = time.perf_counter()
                subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - start)
        floor = statistics.median(times["python -c pass"])
        print("python: %s" % options.python)
        print("%-28s %10s %8s" % ("command", "median ms", "x floor"))
        for name, _, _ in cases:
            median = statistics.median(times[name])
            print("%-28s %10.1f %8.2f" % (name, median * 1000, median / floor))
        print("archive: %d bytes (%.2f MB)" % (os.path.getsize(pyz), os.path.getsize(pyz) / 1e6))
    finally:
        shutil.rmtree(str(scratch), ignore_errors=True)


if __name__ == "__main__":
    main()
