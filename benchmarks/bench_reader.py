"""Benchmark: sequential read throughput of the token shard reader (`cptflow.token_reader`) in tokens/s.

Writes random uint32 token shards in the tokenize stage's schema (seq_len 2048) to a temp dir, then
reads them in order, each path touching every token (a sum), on fresh memory maps each repeat:
  - pyarrow scan: memory_map + open_stream + zero-copy numpy per record batch (the ceiling),
  - bulk: `TokenShardDataset.iter_blocks` (the target, >= 100 M tokens/s),
  - bulk -> torch int64: the same, converted to what a model takes,
  - per-sample: `iter(TokenShardDataset)` dicts of LongTensors (input_ids, labels, attention_mask),
  - DataLoader: per-sample path through `torch.utils.data.DataLoader(batch_size=8, num_workers=0)`.
Files are in the page cache (just written): this measures the reader, not the disk. Prints a table,
then one JSON line (last line).

    .venv/bin/python benchmarks/bench_reader.py [--tokens 50000000] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from cptflow.token_reader import TokenShardDataset  # noqa: E402

SEQ_LEN = 2048
TARGET = 1e8


def write_shards(directory: Path, total_tokens: int, rows_per_shard: int, rows_per_batch: int) -> list[Path]:
    metadata = {
        f"cptflow.{k}": str(v)
        for k, v in {
            "schema_version": 1,
            "tokenizer_fingerprint": "bench",
            "vocab_size": 32000,
            "eos_id": 2,
            "bos_id": 1,
            "pad_id": 3,
            "seq_len": SEQ_LEN,
            "seed": 0,
            "version": "bench",
        }.items()
    }
    schema = pa.schema(
        [
            ("input_ids", pa.list_(pa.uint32(), SEQ_LEN)),
            ("valid_tokens", pa.int32()),
            ("doc_starts", pa.list_(pa.int32())),
            ("domain_tokens", pa.int32()),
        ],
        metadata=metadata,
    )
    rng = np.random.default_rng(0)
    rows_left = -(-total_tokens // SEQ_LEN)
    paths = []
    while rows_left:
        path = directory / f"tokens-{len(paths):05d}.arrow"
        shard_rows = min(rows_per_shard, rows_left)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for lo in range(0, shard_rows, rows_per_batch):
                n = min(rows_per_batch, shard_rows - lo)
                ids = rng.integers(0, 32000, n * SEQ_LEN, dtype=np.uint32)
                writer.write_batch(
                    pa.record_batch(
                        [
                            pa.FixedSizeListArray.from_arrays(pa.array(ids), SEQ_LEN),
                            pa.array(np.full(n, SEQ_LEN, np.int32)),
                            pa.array([[0, 700, 1500]] * n, pa.list_(pa.int32())),
                            pa.array(np.zeros(n, np.int32)),
                        ],
                        schema=schema,
                    )
                )
        paths.append(path)
        rows_left -= shard_rows
    return paths


def pyarrow_scan(paths: list[Path]) -> tuple[int, int]:
    tokens, checksum = 0, 0
    for path in paths:
        with pa.memory_map(str(path)) as source:
            for batch in pa.ipc.open_stream(source):
                ids = batch.column("input_ids").values.to_numpy(zero_copy_only=True)
                checksum += int(ids.sum(dtype=np.uint64))
                tokens += ids.size
    return tokens, checksum


def bulk(paths: list[Path], batch_rows: int) -> tuple[int, int]:
    tokens, checksum = 0, 0
    for block in TokenShardDataset(paths).iter_blocks(batch_rows):
        ids = block["input_ids"]
        checksum += int(ids.sum(dtype=np.uint64))
        tokens += ids.size
    return tokens, checksum


def bulk_torch(paths: list[Path], batch_rows: int) -> tuple[int, int]:
    tokens, checksum = 0, 0
    for block in TokenShardDataset(paths).iter_blocks(batch_rows):
        ids = torch.from_numpy(block["input_ids"].astype(np.int64))
        checksum += int(ids.sum())
        tokens += ids.numel()
    return tokens, checksum


def per_sample(paths: list[Path]) -> tuple[int, int]:
    tokens, checksum = 0, 0
    for sample in TokenShardDataset(paths):
        checksum += int(sample["input_ids"].sum())
        tokens += sample["input_ids"].numel()
    return tokens, checksum


def dataloader(paths: list[Path]) -> tuple[int, int]:
    tokens, checksum = 0, 0
    for batch in DataLoader(TokenShardDataset(paths), batch_size=8, num_workers=0):
        checksum += int(batch["input_ids"].sum())
        tokens += batch["input_ids"].numel()
    return tokens, checksum


def timed(fn, repeats: int) -> tuple[float, int, int]:
    """Median tokens/s over repeats (each on fresh memory maps), tokens, checksum."""
    rates, tokens, checksum = [], 0, 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens, checksum = fn()
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates), tokens, checksum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=50_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows-per-batch", type=int, default=256, help="rows per Arrow record batch")
    parser.add_argument("--rows-per-shard", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="5 M tokens, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats = 5_000_000, 1
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="cptflow-bench-reader-") as tmp:
        start = time.perf_counter()
        paths = write_shards(Path(tmp), args.tokens, args.rows_per_shard, args.rows_per_batch)
        write_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in paths)
        start = time.perf_counter()
        ds = TokenShardDataset(paths)
        open_ms = (time.perf_counter() - start) * 1e3
        tokens = len(ds) * SEQ_LEN
        del ds
        runs = {
            "pyarrow_scan": lambda: pyarrow_scan(paths),
            f"bulk (iter_blocks {args.rows_per_batch})": lambda: bulk(paths, args.rows_per_batch),
            "bulk (iter_blocks 8)": lambda: bulk(paths, 8),
            "bulk -> torch int64 (iter_blocks 8)": lambda: bulk_torch(paths, 8),
            "per-sample torch dicts": lambda: per_sample(paths),
            "DataLoader batch 8, workers 0": lambda: dataloader(paths),
        }
        results = {}
        for name, fn in runs.items():
            results[name] = timed(fn, args.repeats)
        checksums = {r[2] for r in results.values()}  # every path read the same tokens
        if len(checksums) != 1 or any(r[1] != tokens for r in results.values()):
            raise SystemExit(f"paths disagree: checksums {checksums}, tokens {[r[1] for r in results.values()]}")

    print(
        f"{tokens / 1e6:.1f} M tokens in {len(paths)} shards ({size / 2**20:.0f} MiB, seq_len {SEQ_LEN}, "
        f"{args.rows_per_batch} rows/record batch); written in {write_s:.1f} s; dataset open {open_ms:.1f} ms; "
        f"median of {args.repeats}, page cache warm"
    )
    print(f"{'path':<40} {'M tokens/s':>12} {'samples/s':>12}")
    for name, (rate, _, _) in results.items():
        print(f"{name:<40} {rate / 1e6:>12.1f} {rate / SEQ_LEN:>12.0f}")
    bulk_rate = results[f"bulk (iter_blocks {args.rows_per_batch})"][0]
    print(
        json.dumps(
            {
                "benchmark": "shard_reader",
                "tokens": tokens,
                "seq_len": SEQ_LEN,
                "shards": len(paths),
                "rows_per_record_batch": args.rows_per_batch,
                "repeats": args.repeats,
                "bulk_tokens_per_s": round(bulk_rate),
                "bulk_batch8_tokens_per_s": round(results["bulk (iter_blocks 8)"][0]),
                "bulk_torch_tokens_per_s": round(results["bulk -> torch int64 (iter_blocks 8)"][0]),
                "per_sample_tokens_per_s": round(results["per-sample torch dicts"][0]),
                "dataloader_tokens_per_s": round(results["DataLoader batch 8, workers 0"][0]),
                "pyarrow_scan_tokens_per_s": round(results["pyarrow_scan"][0]),
                "open_ms": round(open_ms, 2),
                "target": TARGET,
                "meets_target": bulk_rate >= TARGET,
            }
        )
    )


if __name__ == "__main__":
    main()
