"""`repair plan` and `repair` on a large damaged workspace: wall time and peak RSS.

    python3 bench/repair_bench.py [--records 200000] [--keys 20000] [--outbox 100000] [--artifacts 2000]
                                  [--runs 3] [--tool "python3 contexta_ops.py"]

Writes a workspace in Contexta's format to a temporary directory: one segment of RECORDS record lines whose
envelopes carry run, stage, batch and sample refs (KEYS distinct sample refs, so that many index files),
the append path's index files, an outbox of OUTBOX lines, and an artifact store of ARTIFACTS 1 KB bodies.
Then damages every plane: a torn segment tail, one stale index pointer, an orphan body, an abandoned staging
file, and one malformed outbox line in a hundred.  `repair plan` runs on it as it is; `repair` runs on a fresh
copy each time (with its safety backup, into the scratch directory).  Prints the median wall seconds and
peak RSS of each, as one JSON object.
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contexta_ops as ops  # noqa: E402
from artifact_sweep_bench import make_store, measure  # noqa: E402


def make_records(root, count, keys):
    os.makedirs(os.path.join(root, "segments"))
    indexes = {}
    with open(os.path.join(root, "segments", "segment-000001.jsonl"), "wb") as segment:
        for sequence in range(1, count + 1):
            run = "run:bench.r%d" % (sequence % 4)
            stage = "stage:bench.r%d.train" % (sequence % 4)
            batch = "batch:bench.r%d.train.b%d" % (sequence % 4, sequence % 50)
            sample = "sample:bench.r%d.train.b%d.s%d" % (sequence % 4, sequence % 50, sequence % keys)
            envelope = {"record_ref": "record:bench.r%d.m%07d" % (sequence % 4, sequence), "record_type": "metric",
                        "run_ref": run, "stage_execution_ref": stage, "batch_execution_ref": batch,
                        "sample_observation_ref": sample, "producer_ref": "bench", "schema_version": "1.0.0",
                        "recorded_at": "2024-06-01T12:00:00Z", "observed_at": "2024-06-01T12:00:00Z"}
            line = {"appended_at": "2024-06-01T12:00:00Z", "sequence": sequence,
                    "record": {"envelope": envelope, "payload": {"metric_key": "loss", "value": sequence * 0.5,
                                                                 "value_type": "float64"}}}
            segment.write((ops._compact_json(line) + "\n").encode())
            pointer = ops._compact_json({"offset": sequence, "segment_id": 1, "sequence": sequence}) + "\n"
            for family, key in (("run_ref", run), ("record_type", "metric"), ("stage_execution_ref", stage),
                                ("batch_execution_ref", batch), ("sample_observation_ref", sample)):
                indexes.setdefault("%s/%s.jsonl" % (family, key.replace(":", "__")), []).append(pointer)
        segment.write(b'{"appended_at":"2026-11-26T03:48:1')  # torn
    for rel, pointers in indexes.items():
        os.makedirs(os.path.dirname(os.path.join(root, "indexes", rel)), exist_ok=True)
        with open(os.path.join(root, "indexes", rel), "w") as handle:
            handle.write("".join(pointers))
    with open(os.path.join(root, "indexes", "run_ref", "run__bench.r0.jsonl"), "a") as handle:
        handle.write('{"offset":999999999,"segment_id":1,"sequence":999999999}\n')  # stale
    manifest = {"current_segment_id": 1, "current_segment_record_count": count, "last_committed_sequence": count,
                "layout_mode": "jsonl_segments", "layout_version": "1", "next_sequence": count + 1}
    with open(os.path.join(root, "manifest.json"), "wb") as handle:
        handle.write(ops._pretty_json(manifest))


def make_outbox(root, count):
    os.makedirs(root)
    with open(os.path.join(root, ops.OUTBOX_FILE), "wb") as outbox:
        for index in range(count):
            if index % 100 == 99:
                outbox.write(b"not json %d\n" % index)
            else:
                outbox.write(ops._json_line({"replay_ref": "replay:record.1.%d" % index, "family": "RECORD",
                                             "sink_name": "local-jsonl-replay", "payload": {"i": index}}))


def make_workspace(ws, args):
    make_records(os.path.join(ws, "records"), args.records, args.keys)
    make_outbox(os.path.join(ws, "cache", "outbox"), args.outbox)
    store = os.path.join(ws, "artifacts")
    make_store(store, args.artifacts)
    with open(os.path.join(store, "objects", "orphan.bin"), "wb") as handle:
        handle.write(os.urandom(1024))
    with open(os.path.join(store, "staging", "ingest-x-0.part"), "wb") as handle:
        handle.write(b"abandoned")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200000)
    parser.add_argument("--keys", type=int, default=20000)
    parser.add_argument("--outbox", type=int, default=100000)
    parser.add_argument("--artifacts", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tool", default="%s %s" % (sys.executable, Path(__file__).resolve().parents[1] /
                                                     "contexta_ops.py"))
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="contexta-repair-bench-")
    try:
        damaged = os.path.join(scratch, "damaged", ".contexta")
        started = time.monotonic()
        make_workspace(damaged, args)
        old = time.time() - 60
        os.utime(os.path.join(damaged, "cache", "outbox", ops.OUTBOX_FILE), (old, old))
        results = {"records": args.records, "index_files": sum(len(files) for _r, _d, files in os.walk(
            os.path.join(damaged, "records", "indexes"))), "outbox_lines": args.outbox,
            "artifacts": args.artifacts, "made_in_s": round(time.monotonic() - started, 1)}
        ws = os.path.join(scratch, "ws", ".contexta")
        backups = os.path.join(scratch, "bk")

        def fresh_copy():
            shutil.rmtree(os.path.dirname(ws), ignore_errors=True)
            shutil.rmtree(backups, ignore_errors=True)
            shutil.copytree(os.path.dirname(damaged), os.path.dirname(ws), symlinks=True)

        tool = shlex.split(args.tool) + ["--workspace", ws, "--backup-root", backups]
        fresh_copy()
        wall, peak = measure(tool + ["repair", "plan", "--json"], args.runs)
        results["plan"] = {"median_wall_s": round(wall, 3), "median_peak_rss_mib": round(peak, 1)}
        walls, peaks = [], []
        for _ in range(args.runs):  # each repair on a fresh damaged copy
            fresh_copy()
            wall, peak = measure(tool + ["repair", "--json"], 1)
            walls.append(wall)
            peaks.append(peak)
        results["repair"] = {"median_wall_s": round(statistics.median(walls), 3),
                             "median_peak_rss_mib": round(statistics.median(peaks), 1)}
        print(json.dumps(results))
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
