"""Generate a benchmark workspace in Contexta's format.

    python3 bench/make_workspace.py DIR [--scale 1.0]

At scale 1.0: about 1 GB of artifact bodies from 4 KB to 64 MB, 200,000 records, 100,000 outbox
entries, and contexta 1.0.0's empty ledger.  Bodies are random bytes (no compression shortcuts).
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    started = time.time()
    root = Path(args.root).resolve()
    config = ops.UnifiedConfig(project_name="bench", workspace=ops.WorkspaceConfig(root_path=root / ".contexta"))
    ws = config.workspace.root_path
    ws.mkdir(parents=True)
    database = config.metadata.database_path
    database.parent.mkdir(parents=True)
    database.write_bytes(ops._empty_ledger_bytes())

    records = int(200000 * args.scale)
    segments = config.records.root_path / "segments"
    segments.mkdir(parents=True)
    (config.records.root_path / "indexes" / "record_type").mkdir(parents=True)
    with open(str(segments / "segment-000001.jsonl"), "wb") as segment, \
            open(str(config.records.root_path / "indexes" / "record_type" / "metric.jsonl"), "wb") as index:
        for sequence in range(1, records + 1):
            record = {"envelope": {"completeness_marker": "complete", "correlation_refs": {},
                                   "degradation_marker": "none", "extensions": [],
                                   "observed_at": "2024-06-01T12:03:00Z", "producer_ref": "bench",
                                   "record_ref": "record:bench.run.m%07d" % sequence, "record_type": "metric",
                                   "recorded_at": "2024-06-01T12:03:00Z", "run_ref": "run:bench.run",
                                   "schema_version": "1.0.0"},
                      "payload": {"aggregation_scope": "step", "metric_key": "loss", "tags": {},
                                  "value": sequence / 7.0, "value_type": "float64"}}
            segment.write(ops._json_line({"appended_at": "2024-06-01T12:03:00Z", "record": record,
                                          "sequence": sequence}))
            index.write(ops._json_line({"offset": sequence, "segment_id": 1, "sequence": sequence}))
    (config.records.root_path / "manifest.json").write_bytes(ops._pretty_json({
        "current_segment_id": 1, "current_segment_record_count": records, "last_committed_sequence": records,
        "layout_mode": "jsonl_segments", "layout_version": "1", "next_sequence": records + 1}))

    store = ops.ArtifactStore(ops.VaultConfig.from_unified_config(config))
    scratch = root / "scratch"
    scratch.mkdir()
    total = 0
    number = 0
    for count, size in ARTIFACTS:
        for _ in range(max(1, int(count * args.scale))):
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

    outbox = config.recovery.outbox_root
    outbox.mkdir(parents=True)
    entries = int(100000 * args.scale)
    with open(str(outbox / ops.OUTBOX_FILE), "wb") as handle:
        for index in range(entries):
            handle.write(ops._json_line({
                "replay_ref": "replay:record.1717243380000.%d" % index, "failed_at": "2024-06-01T12:03:00.000000Z",
                "sink_name": "local-jsonl-replay", "family": "RECORD", "payload_type": "MetricRecord",
                "payload_ref": "record:bench.run.m%07d" % (index + 1), "error": "sink unavailable",
                "error_code": "dispatch_error", "attempts": 1,
                "payload": {"metric_key": "loss", "run_id": "bench.run", "value": index / 7.0}}))
    print(json.dumps({"workspace": str(ws), "artifacts": number, "artifact_bytes": total, "records": records,
                      "outbox_entries": entries, "seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
