"""Token shards: packed fixed-length blocks in Arrow IPC files, their schema, writer and checks.

Written by the `tokenize` stage (mix -> **tokenize** -> cpt), read by `cptflow/token_reader.py`.

File format decision: the Arrow IPC **streaming** format, not the IPC file format. The installed
`datasets` (5.2) opens every `.arrow` file with `pa.ipc.open_stream` (`datasets/table.py`), and an
IPC *file* fails there with "ArrowInvalid: Expected to read 1330795073 metadata bytes" (the
`ARROW1` magic read as a message length; checked on pyarrow 26). The streaming format is also what
`datasets` writes for its own cache files, so `Dataset.from_file(path)` works; plain pyarrow reads
it zero-copy with `pa.ipc.open_stream(pa.memory_map(path))`. What the stream format lacks is a
footer: a stream cut exactly at a record-batch boundary reads as a shorter, valid stream. So
`check_shard` requires the end-of-stream marker as the last 8 bytes and every record batch to read,
and the stage manifest records rows and sha256 of each shard.

Layout: one row per block of `seq_len` tokens; record batches of `rows_per_batch` rows (the last
may be shorter). Columns:
  input_ids      fixed_size_list<uint32>[seq_len]  documents in stream order, BOS (if the
                                                   tokenizer adds one) and EOS per document,
                                                   never overwritten; padding = pad_id
  valid_tokens   int32       == seq_len except in a padded final block (labels -100 after it)
  doc_starts     list<int32> positions in the block where a document starts (for doc masking)
  domain_tokens  int32       tokens of the block that belong to `role: domain` documents
Schema metadata (bytes -> bytes): `cptflow.<key>` for each key of METADATA_KEYS; integers as
decimal text, a missing BOS id as "-1".
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from cptflow.store import atomic_path, sha256_file

SCHEMA_VERSION = 1
METADATA_PREFIX = "cptflow."
# Short key -> type; on disk as b"cptflow.<key>". `version` is the cptflow version that wrote it.
METADATA_KEYS: dict[str, type] = {
    "schema_version": int,
    "tokenizer_fingerprint": str,
    "vocab_size": int,
    "eos_id": int,
    "bos_id": int,
    "pad_id": int,
    "seq_len": int,
    "seed": int,
    "version": str,
}
NO_TOKEN = -1  # how a missing BOS id is written
# A stream ends with a continuation marker and a zero-length message; a stream cut short lacks it.
END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"


class TokenShardError(ValueError):
    """A token shard that cannot be used: wrong tokenizer or layout, truncated or corrupt."""


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the fast tokenizer's full serialization (vocab, merges, normalizer, special tokens,
    post-processor): any change that can change token ids changes it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer: no backend_tokenizer to fingerprint")
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()[:16]


def _encode_metadata(metadata: dict) -> dict[bytes, bytes]:
    values = dict(metadata, schema_version=SCHEMA_VERSION)
    missing = [key for key in METADATA_KEYS if key not in values]
    unknown = [key for key in values if key not in METADATA_KEYS]
    if missing or unknown:
        raise ValueError(f"token shard metadata: missing keys {missing}, unknown keys {unknown}")
    encoded = {}
    for key, kind in METADATA_KEYS.items():
        value = values[key]
        if value is None and key == "bos_id":
            value = NO_TOKEN
        encoded[(METADATA_PREFIX + key).encode()] = str(kind(value)).encode()
    return encoded


def token_schema(seq_len: int, metadata: dict) -> pa.Schema:
    """The Arrow schema of a token shard; `metadata` has the keys of METADATA_KEYS except
    schema_version (added here), and its `seq_len` must agree with `seq_len`."""
    if int(metadata.get("seq_len", seq_len)) != seq_len:
        raise ValueError(f"metadata seq_len {metadata['seq_len']} != schema seq_len {seq_len}")
    return pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.uint32(), seq_len), nullable=False),
            pa.field("valid_tokens", pa.int32(), nullable=False),
            pa.field("doc_starts", pa.list_(pa.int32()), nullable=False),
            pa.field("domain_tokens", pa.int32(), nullable=False),
        ],
        metadata=_encode_metadata(dict(metadata, seq_len=seq_len)),
    )


def _doc_starts_array(doc_starts: list[np.ndarray]) -> pa.ListArray:
    lengths = np.fromiter((len(s) for s in doc_starts), dtype=np.int32, count=len(doc_starts))
    offsets = np.zeros(len(doc_starts) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(doc_starts).astype(np.int32, copy=False) if doc_starts else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


def write_token_shard(
    path: Path,
    input_ids: np.ndarray,
    valid_tokens: np.ndarray,
    doc_starts: list[np.ndarray],
    domain_tokens: np.ndarray,
    metadata: dict,
    rows_per_batch: int,
) -> dict:
    """Write one shard atomically (temp name, fsync, rename); returns {path, rows, tokens, sha256}.

    `input_ids` is (rows, seq_len) uint32; `tokens` counts valid (non-padding) tokens. Identical
    arguments give identical bytes.
    """
    path = Path(path)
    input_ids = np.ascontiguousarray(input_ids, dtype=np.uint32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (rows, seq_len), got shape {input_ids.shape}")
    rows, seq_len = input_ids.shape
    valid_tokens = np.asarray(valid_tokens, dtype=np.int32)
    domain_tokens = np.asarray(domain_tokens, dtype=np.int32)
    if not (len(valid_tokens) == len(doc_starts) == len(domain_tokens) == rows):
        raise ValueError(
            f"row counts differ: input_ids {rows}, valid_tokens {len(valid_tokens)}, "
            f"doc_starts {len(doc_starts)}, domain_tokens {len(domain_tokens)}"
        )
    if rows_per_batch <= 0:
        raise ValueError(f"rows_per_batch must be positive, got {rows_per_batch}")
    schema = token_schema(seq_len, metadata)
    ids_column = pa.FixedSizeListArray.from_arrays(pa.array(input_ids.reshape(-1), pa.uint32()), seq_len)
    table = pa.Table.from_arrays(
        [
            ids_column,
            pa.array(valid_tokens, pa.int32()),
            _doc_starts_array(doc_starts),
            pa.array(domain_tokens, pa.int32()),
        ],
        schema=schema,
    )
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for batch in table.to_batches(max_chunksize=rows_per_batch):
                writer.write_batch(batch)
    return {
        "path": str(path),
        "rows": rows,
        "tokens": int(valid_tokens.sum(dtype=np.int64)),
        "sha256": sha256_file(path),
    }


def open_token_shard(path: Path) -> pa.RecordBatchStreamReader:
    """A zero-copy reader over a shard (memory-mapped); read_all() gives a pyarrow Table."""
    return pa.ipc.open_stream(pa.memory_map(str(path)))


def decode_shard_metadata(path: Path, raw: dict[bytes, bytes] | None) -> dict:
    """Schema metadata (`cptflow.*` keys) to short keys, typed as in METADATA_KEYS; bos_id None = no BOS."""
    raw = raw or {}
    missing = [key for key in METADATA_KEYS if (METADATA_PREFIX + key).encode() not in raw]
    if missing:
        raise TokenShardError(
            f"token shard {path}: schema metadata lacks {', '.join(METADATA_PREFIX + k for k in missing)} "
            f"(not written by cptflow's tokenize stage?)"
        )
    result = {}
    for key, kind in METADATA_KEYS.items():
        text = raw[(METADATA_PREFIX + key).encode()].decode(errors="replace")
        try:
            result[key] = kind(text)
        except ValueError:
            raise TokenShardError(
                f"token shard {path}: {METADATA_PREFIX}{key} is {text!r}, not a {kind.__name__}"
            ) from None
    if result["bos_id"] == NO_TOKEN:
        result["bos_id"] = None
    return result


def read_shard_metadata(path: Path) -> dict:
    """The shard's metadata with short keys (schema_version, tokenizer_fingerprint, vocab_size,
    eos_id, bos_id (None: no BOS), pad_id, seq_len, seed, version), typed; reads only the schema."""
    path = Path(path)
    if not path.is_file():
        raise TokenShardError(f"{path}: token shard does not exist")
    try:
        with pa.memory_map(str(path)) as source:
            schema = pa.ipc.open_stream(source).schema
    except (pa.ArrowInvalid, OSError) as error:
        raise TokenShardError(f"{path}: not a readable Arrow IPC stream (truncated or corrupt): {error}") from None
    return decode_shard_metadata(path, schema.metadata)


def check_shard(path: Path, expected: dict) -> None:
    """Raise TokenShardError unless `path` is a complete token shard matching `expected`.

    `expected` holds any metadata keys (short names, e.g. tokenizer_fingerprint, seq_len, eos_id)
    and optionally `rows` and `sha256` (as listed in the tokenize manifest). Checks the schema
    version and column types, that the stream ends with its end-of-stream marker and that every
    record batch reads.
    """
    path = Path(path)
    metadata = read_shard_metadata(path)
    if metadata["schema_version"] != SCHEMA_VERSION:
        raise TokenShardError(
            f"{path}: token shard schema_version {metadata['schema_version']}, this cptflow reads {SCHEMA_VERSION}"
        )
    for key, want in expected.items():
        if key in ("rows", "sha256"):
            continue
        if key not in METADATA_KEYS:
            raise ValueError(f"check_shard: unknown expected key {key!r}; known: {sorted(METADATA_KEYS)}, rows, sha256")
        if metadata[key] != want:
            hint = (
                " (tokenized with a different tokenizer: rerun the tokenize stage for this model)"
                if key == "tokenizer_fingerprint"
                else ""
            )
            raise TokenShardError(f"{path}: {key} is {metadata[key]!r}, expected {want!r}{hint}")
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(size - len(END_OF_STREAM), 0))
        if handle.read() != END_OF_STREAM:
            raise TokenShardError(
                f"{path}: truncated (no end-of-stream marker; {size} bytes): rerun the tokenize stage"
            )
    reader = open_token_shard(path)
    want_schema = token_schema(metadata["seq_len"], {k: v for k, v in metadata.items() if k != "schema_version"})
    if not reader.schema.equals(want_schema, check_metadata=False):
        raise TokenShardError(
            f"{path}: columns are {reader.schema.to_string(show_schema_metadata=False)!r}, "
            f"expected {want_schema.to_string(show_schema_metadata=False)!r}"
        )
    rows = 0
    try:
        for batch in reader:
            batch.validate(full=False)
            rows += batch.num_rows
    except (pa.ArrowInvalid, OSError) as error:
        raise TokenShardError(f"{path}: corrupt record batch after {rows} rows: {error}") from None
    if "rows" in expected and rows != expected["rows"]:
        raise TokenShardError(f"{path}: {rows} rows, expected {expected['rows']} (truncated or from another run)")
    if "sha256" in expected and sha256_file(path) != expected["sha256"]:
        raise TokenShardError(f"{path}: sha256 differs from the manifest (modified or corrupt)")
