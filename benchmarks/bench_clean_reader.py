"""Benchmark: peak memory of clean's Parquet reader against the size of the file it reads (issue 14).

Writes two Parquet files of the same rows, 200,000 and 2,000,000 of them (pyarrow's default row groups
of 1,048,576 rows, so the large file's row groups are 5x the small file's only group), under /tmp,
then reads each in a fresh subprocess through every input shard clean plans for it and records the
peak RSS above the interpreter's own (imports done), for
  - clean: `plan_input_shards` + `read_raw_records` (row groups streamed in ARROW_BATCH_ROWS batches
    through a PARQUET_READ_BUFFER_BYTES buffer; the stage's reader),
  - baseline "row group": the reader before issue 14, `ParquetFile.read_row_group(g).to_pylist()`.
Prints a table, then one JSON line (last line) with the large/small ratio of each: a reader whose
memory does not depend on the file has a ratio near 1. The files are deleted afterwards.

    .venv/bin/python benchmarks/bench_clean_reader.py [--small 200000] [--large 2000000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = np.array(
    "the river rose after three days of rain and town prepared sandbags along bank dose patient clearance "
    "renal hepatic trough peak plasma level weekly monitoring adjusted body weight infusion tablet".split()
)


def write_file(path: Path, rows: int, seed: int = 0) -> int:
    """`rows` documents of about 20 words (~130 bytes), with an id and a score, in one write_table call
    with pyarrow's default row groups (1,048,576 rows at most), as most tools write Parquet."""
    rng = np.random.default_rng(seed)
    words = WORDS[rng.integers(0, len(WORDS), (rows, 20))]
    table = pa.table(
        {
            "id": [f"doc-{i}" for i in range(rows)],
            "text": [" ".join(row) for row in words],
            "score": rng.integers(0, 5, rows),
        }
    )
    del words
    pq.write_table(table, path)
    return path.stat().st_size


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def child(mode: str, path: str) -> None:
    """Read every row of `path` the way `mode` says; print rows, seconds and peak RSS before and after."""
    from cptflow.tasks.clean import SourceConfig, plan_input_shards, read_raw_records

    source = SourceConfig(name="bench", role="general", paths=[path])
    reset_peak_rss()  # imports done: measure what reading adds
    before = rss_mib("VmRSS")
    start, rows = time.perf_counter(), 0
    if mode == "clean":
        for shard in plan_input_shards(source, Path(path).parent):
            for record in read_raw_records(shard, source):
                rows += record.record is not None
    else:  # the pre-issue-14 reader: each row group read whole, then converted whole
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            for record in parquet.read_row_group(group).to_pylist():
                rows += record is not None
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": rows, "seconds": seconds, "rss_start_mib": before, "rss_peak_mib": rss_mib("VmHWM")}))


def measure(mode: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(path)], check=True, capture_output=True, text=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["read_mib"] = result["rss_peak_mib"] - result["rss_start_mib"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=200_000, help="rows of the small file")
    parser.add_argument("--large", type=int, default=2_000_000, help="rows of the large file")
    parser.add_argument("--quick", action="store_true", help="20,000 and 200,000 rows")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.quick:
        args.small, args.large = 20_000, 200_000

    directory = Path(tempfile.mkdtemp(prefix="cptflow-bench-clean-reader-", dir="/tmp"))
    try:
        files = {}
        for label, rows in (("small", args.small), ("large", args.large)):
            path = directory / f"{label}.parquet"
            size = write_file(path, rows)
            groups = pq.ParquetFile(path).metadata.num_row_groups
            files[label] = {"path": path, "rows": rows, "mib": size / 2**20, "row_groups": groups}
        results = {
            mode: {label: measure(mode, f["path"]) for label, f in files.items()} for mode in ("clean", "row_group")
        }
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    for label, f in files.items():
        print(f"{label}: {f['rows']:,} rows, {f['row_groups']} row group(s), {f['mib']:.0f} MiB on disk")
    print(f"{'reader':<34} {'small MiB':>10} {'large MiB':>10} {'ratio':>7} {'large rows/s':>13}")
    summary = {}
    for mode, by_file in results.items():
        small, large = by_file["small"], by_file["large"]
        if small["rows"] != files["small"]["rows"] or large["rows"] != files["large"]["rows"]:
            raise SystemExit(f"{mode}: read {small['rows']} and {large['rows']} rows, expected {files}")
        ratio = large["read_mib"] / max(small["read_mib"], 1.0)
        name = "clean (batches of ARROW_BATCH_ROWS)" if mode == "clean" else "baseline: row group read whole"
        rate = large["rows"] / large["seconds"]
        print(f"{name:<34} {small['read_mib']:>10.0f} {large['read_mib']:>10.0f} {ratio:>7.2f} {rate:>13,.0f}")
        summary[mode] = {
            "small_read_mib": round(small["read_mib"], 1),
            "large_read_mib": round(large["read_mib"], 1),
            "ratio": round(ratio, 2),
            "large_rows_per_s": round(rate),
        }
    print(
        json.dumps(
            {
                "benchmark": "clean_parquet_reader_memory",
                "small_rows": files["small"]["rows"],
                "large_rows": files["large"]["rows"],
                "small_row_groups": files["small"]["row_groups"],
                "large_row_groups": files["large"]["row_groups"],
                "large_file_mib": round(files["large"]["mib"], 1),
                **{f"{mode}_{k}": v for mode, values in summary.items() for k, v in values.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
