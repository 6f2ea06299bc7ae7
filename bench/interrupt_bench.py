"""Ctrl-C latency: seconds from SIGINT to exit for each long command, on a workspace of big files.

    python3 bench/interrupt_bench.py [--pyz contexta.pyz] [--files 24] [--mib 64]

Builds a workspace of FILES random bodies of MIB MiB each (plus nothing else) in a temp dir, makes
one backup of it, then runs each command and sends SIGINT once the process holds a data file open
(seen in /proc).  Prints a table; removes the temp dir.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = (("backup create", ["backup", "create"], "ws"), ("backup create --archive", ["backup", "create",
            "--archive", "{root}/a.tar"], "ws"), ("backup verify", ["backup", "verify", "base"], "bk"),
            ("restore --verify-only", ["restore", "base", "--verify-only"], "bk"), ("restore", ["restore", "base"], "bk"))


def reading(pid, root):
    try:
        names = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, name)).startswith(root + "/"):
                return True
        except OSError:
            pass
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyz", default="contexta.pyz")
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="interrupt-bench-"))
    try:
        ws = root / "ws" / ".contexta"
        (ws / "records").mkdir(parents=True)
        blob = os.urandom(args.mib << 20)
        for index in range(args.files):
            (ws / "records" / ("body-%03d.bin" % index)).write_bytes(blob[index:] + blob[:index])
        base = [sys.executable, args.pyz, "--workspace", str(ws), "--backup-root", str(root / "bk"),
                "--staging-root", str(root / "staging")]
        subprocess.run(base + ["backup", "create", "--label", "base", "--quiet"], check=True)
        ref = os.listdir(str(root / "bk"))[0]
        print("%-26s %6s %12s" % ("command (%d x %d MiB)" % (args.files, args.mib), "exit", "SIGINT->exit"))
        for label, command, reads in COMMANDS:
            command = [ref if part == "base" else part.format(root=root) for part in command]
            watched = str(ws) if reads == "ws" else str(root / "bk" / ref)
            process = subprocess.Popen(base + command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            while not reading(process.pid, watched) and process.poll() is None:
                time.sleep(0.005)
            time.sleep(0.3)  # well into the work: copies queued, workers busy
            sent = time.time()
            process.send_signal(signal.SIGINT)
            process.wait()
            print("%-26s %6d %11.2fs" % (label, process.returncode, time.time() - sent))
    finally:
        shutil.rmtree(str(root))


if __name__ == "__main__":
    main()
