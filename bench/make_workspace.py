"""Generate a benchmark workspace in Contexta's format.

    python3 bench/make_workspace.py DIR [--scale 1.0] [--artifact-mb MB] [--records N] [--segments N]
                                        [--outbox N] [--small-files N] [--small-bytes B]

At scale 1.0: about 1 GB of artifact bodies from 4 KB to 64 MB, 200,000 records in one segment,
100,000 outbox entries, and contexta 1.0.0's empty ledger.  Bodies are random bytes (no compression
shortcuts).  The options reshape it:

  --artifact-mb 300 --segments 100     ~300 MB of bodies (same size mix), records in 100 segments
  --artifact-mb 0 --records 0 --outbox 0 --small-files 100000
                                       100,000 files of --small-bytes (512) in the artifact store's
                                       history/ (event files, 100 per directory: how a store collects
                                       many small files), plus an empty ledger

Prints a JSON summary.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contexta_ops as ops  # noqa: E402

# (count, size in bytes) at scale 1.0: 512 + 256 + 128 + 64 + 32 + 8 MB = ~1 GB
ARTIFACTS = ((8, 64 << 20), (16, 16 << 20), (64, 2 << 20), (512, 128 << 10), (2048, 16 << 10), (2048, 4 << 10))
ARTIFACT_MB = 1000
SMALL_PER_DIRECTORY = 100


def write_records(config, records, segments):
    """``records`` lines spread over ``segments`` files, one record_type index pointing into them."""
    root = config.records.root_path
    (root / "segments").mkdir(parents=True)
    (root / "indexes" / "record_type").mkdir(parents=True)
    per_segment = max(1, -(-records // max(segments, 1)))
    segment_id = 0
    with open(str(root / "indexes" / "record_type" / "metric.jsonl"), "wb") as index:
        for first in range(1, records + 1, per_segment):
            segment_id += 1
            with open(str(root / "segments" / ("segment-%06d.jsonl" % segment_id)), "wb") as segment:
                for offset, sequence in enumerate(range(first, min(first + per_segment, records + 1)), start=1):
                    segment.write(ops._json_line({"appended_at": "2024-06-01T12:03:00Z",
                                                  "record": record(sequence), "sequence": sequence}))
                    index.write(ops._json_line({"offset": offset, "segment_id": segment_id, "sequence": sequence}))
    (root / "manifest.json").write_bytes(ops._pretty_json({
        "current_segment_id": max(segment_id, 1), "current_segment_record_count": records - (
            (segment_id - 1) * per_segment if segment_id else 0),
        "last_committed_sequence": records, "layout_mode": "jsonl_segments", "layout_version": "1",
        "next_sequence": records + 1}))


def record(sequence):
    return {"envelope": {"completeness_marker": "complete", "correlation_refs": {}, "degradation_marker": "none",
                         "extensions": [], "observed_at": "2024-06-01T12:03:00Z", "producer_ref": "bench",
                         "record_ref": "record:bench.run.m%07d" % sequence, "record_type": "metric",
                         "recorded_at": "2024-06-01T12:03:00Z", "run_ref": "run:bench.run", "schema_version": "1.0.0"},
            "payload": {"aggregation_scope": "step", "metric_key": "loss", "tags": {}, "value": sequence / 7.0,
                        "value_type": "float64"}}


def write_artifacts(root, config, factor):
    store = ops.ArtifactStore(ops.VaultConfig.from_unified_config(config))
    scratch = root / "scratch"
    scratch.mkdir()
    total = number = 0
    for count, size in ARTIFACTS if factor > 0 else ():
        for _ in range(max(1, int(count * factor))):
            number += 1
            body = scratch / ("a%05d.bin" % number)
            with open(str(body), "wb") as handle:
                left = size
                while left:
                    chunk = os.urandom(min(left, 4 << 20))
                    handle.write(chunk)
                    left -= len(chunk)
            store.put_artifact(ops.ArtifactManifest(
                artifact_ref="artifact:bench.run.a%05d" % number, artifact_kind="checkpoint",
                created_at="2024-06-01T12:04:00Z", producer_ref="bench", run_ref="run:bench.run",
                location_ref="vault://bench/run/a%05d.bin" % number), body, mode="move")
            total += size
    scratch.rmdir()
    return number, total


def write_small_files(config, count, size):
    """History event files of ``size`` bytes: valid JSON, padded, 100 per directory."""
    history = config.artifacts.root_path / "history" / "bindings"
    for number in range(count):
        directory = history / ("artifact__bench.run.s%05d" % (number // SMALL_PER_DIRECTORY))
        if number % SMALL_PER_DIRECTORY == 0:
            directory.mkdir(parents=True, exist_ok=True)
        head = b'{"action": "put", "artifact_ref": "artifact:bench.run.s%07d", "pad": "' % number
        body = head + b"x" * max(0, size - len(head) - 3) + b'"}\n'
        fd = os.open(str(directory / ("2024-06-01T12-04-00Z-%032x.json" % number)),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, body)
        os.close(fd)


def write_outbox(config, entries):
    outbox = config.recovery.outbox_root
    outbox.mkdir(parents=True)
    with open(str(outbox / ops.OUTBOX_FILE), "wb") as handle:
        for index in range(entries):
            handle.write(ops._json_line({
                "replay_ref": "replay:record.1717243380000.%d" % index, "failed_at": "2024-06-01T12:03:00.000000Z",
                "sink_name": "local-jsonl-replay", "family": "RECORD", "payload_type": "MetricRecord",
                "payload_ref": "record:bench.run.m%07d" % (index + 1), "error": "sink unavailable",
                "error_code": "dispatch_error", "attempts": 1,
                "payload": {"metric_key": "loss", "run_id": "bench.run", "value": index / 7.0}}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--scale", type=float, default=1.0, help="scales every count below (default 1.0)")
    parser.add_argument("--artifact-mb", type=float, help="MB of artifact bodies, same size mix (default 1000)")
    parser.add_argument("--records", type=int, help="record lines (default 200,000)")
    parser.add_argument("--segments", type=int, default=1, help="segment files the records are spread over")
    parser.add_argument("--outbox", type=int, help="outbox entries (default 100,000)")
    parser.add_argument("--small-files", type=int, default=0, help="small files in the artifact store's history/")
    parser.add_argument("--small-bytes", type=int, default=512)
    args = parser.parse_args()
    started = time.time()
    root = Path(args.root).resolve()
    config = ops.UnifiedConfig(project_name="bench", workspace=ops.WorkspaceConfig(root_path=root / ".contexta"))
    config.workspace.root_path.mkdir(parents=True)
    database = config.metadata.database_path
    database.parent.mkdir(parents=True)
    database.write_bytes(ops._empty_ledger_bytes())
    records = int(200000 * args.scale) if args.records is None else args.records
    write_records(config, records, args.segments)
    artifact_mb = ARTIFACT_MB * args.scale if args.artifact_mb is None else args.artifact_mb
    artifacts, artifact_bytes = write_artifacts(root, config, artifact_mb / ARTIFACT_MB)
    entries = int(100000 * args.scale) if args.outbox is None else args.outbox
    write_outbox(config, entries)
    write_small_files(config, args.small_files, args.small_bytes)
    print(json.dumps({"workspace": str(config.workspace.root_path), "artifacts": artifacts,
                      "artifact_bytes": artifact_bytes, "records": records, "segments": args.segments,
                      "outbox_entries": entries, "small_files": args.small_files,
                      "seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
