"""Reads the tokenize stage's Arrow token shards as a torch dataset for training: memory-mapped, zero-copy.

Sits between `tokenize` (which writes `tokens-NNNNN.arrow`) and `cpt` / `sft` (which train on it). It
keeps the curriculum order of the shards, splits samples across data-parallel ranks, and its
`state_dict()` resumes at the exact next sample (resume gaps are a top complaint: litgpt#2021,
torchtune#2294).
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cptflow.token_shards import (
    END_OF_STREAM,
    METADATA_KEYS,
    METADATA_PREFIX,
    SCHEMA_VERSION,
    TokenShardError,
    decode_shard_metadata,
)

logger = logging.getLogger(__name__)

# Keys that every shard of one training set must agree on: mixing tokenizers or block sizes is a bug.
MUST_AGREE = ("schema_version", "tokenizer_fingerprint", "vocab_size", "eos_id", "bos_id", "pad_id", "seq_len")
IGNORE_INDEX = -100  # torch cross_entropy's default ignore_index, which HF models use
_FILE_MAGIC = b"ARROW1"


@dataclass
class _Block:
    """One record batch as numpy views into the shard's memory map (no copy)."""

    input_ids: np.ndarray  # (rows, seq_len) uint32
    valid_tokens: np.ndarray  # (rows,) int32
    doc_offsets: np.ndarray  # (rows + 1,) int32: doc_values[doc_offsets[i]:doc_offsets[i + 1]] are row i's
    doc_values: np.ndarray  # int32
    shard: int
    domain_tokens: np.ndarray  # (rows,) int32: tokens of `role: domain` documents in each row


def shard_metadata(path: Path, schema: pa.Schema) -> dict:
    """The `cptflow.*` schema metadata of a shard with short keys, typed as in `token_shards.METADATA_KEYS`
    (bos_id None: no BOS), refusing another schema version."""
    meta = decode_shard_metadata(path, schema.metadata)
    if meta["schema_version"] != SCHEMA_VERSION:
        raise TokenShardError(
            f"token shard {path}: schema_version {meta['schema_version']}, this cptflow reads {SCHEMA_VERSION}"
        )
    return meta


def _open_batches(path: Path) -> tuple[pa.MemoryMappedFile, pa.Schema, list[pa.RecordBatch]]:
    """Memory-maps an Arrow IPC file (file or streaming format) and returns its record batches.

    The batches reference the map, so nothing is read until a row is touched. A truncated or
    non-Arrow file raises TokenShardError naming the file.
    """
    try:
        size = path.stat().st_size
    except OSError as err:
        raise TokenShardError(f"token shard {path}: cannot be opened ({err})") from err
    if size < 8:
        raise TokenShardError(f"token shard {path}: {size} bytes, too short to be an Arrow IPC file")
    mmap = pa.memory_map(str(path), "r")
    try:
        head = mmap.read_at(8, 0)
        tail = mmap.read_at(8, size - 8)
        if head[:6] == _FILE_MAGIC:
            if tail[-6:] != _FILE_MAGIC:
                raise TokenShardError(
                    f"token shard {path}: Arrow file magic at the start but not at the end: "
                    f"the file is truncated (an interrupted write?)"
                )
            reader = pa.ipc.open_file(mmap)
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            schema = reader.schema
        elif head[:4] == b"\xff\xff\xff\xff":
            if tail != END_OF_STREAM:
                raise TokenShardError(
                    f"token shard {path}: Arrow stream without its end-of-stream marker: "
                    f"the file is truncated (an interrupted write?)"
                )
            reader = pa.ipc.open_stream(mmap)
            batches = list(reader)
            schema = reader.schema
        else:
            raise TokenShardError(f"token shard {path}: not an Arrow IPC file or stream (starts with {bytes(head)!r})")
    except TokenShardError:
        mmap.close()
        raise
    except (pa.ArrowException, OSError) as err:
        mmap.close()
        raise TokenShardError(f"token shard {path}: unreadable Arrow IPC data, truncated or corrupt ({err})") from err
    return mmap, schema, batches


def _check_schema(path: Path, schema: pa.Schema, seq_len: int) -> None:
    input_ids = schema.field("input_ids").type if "input_ids" in schema.names else None
    if not (
        input_ids is not None
        and pa.types.is_fixed_size_list(input_ids)
        and input_ids.value_type == pa.uint32()
        and input_ids.list_size == seq_len
    ):
        raise TokenShardError(
            f"token shard {path}: column input_ids must be fixed_size_list<uint32>[{seq_len}] "
            f"(cptflow.seq_len), found {input_ids}"
        )
    valid = schema.field("valid_tokens").type if "valid_tokens" in schema.names else None
    if valid != pa.int32():
        raise TokenShardError(f"token shard {path}: column valid_tokens must be int32, found {valid}")
    domain = schema.field("domain_tokens").type if "domain_tokens" in schema.names else None
    if domain != pa.int32():
        raise TokenShardError(f"token shard {path}: column domain_tokens must be int32, found {domain}")
    docs = schema.field("doc_starts").type if "doc_starts" in schema.names else None
    if not (
        docs is not None and (pa.types.is_list(docs) or pa.types.is_large_list(docs)) and docs.value_type == pa.int32()
    ):
        raise TokenShardError(f"token shard {path}: column doc_starts must be list<int32>, found {docs}")


def _blocks_of(path: Path, shard: int, batches: list[pa.RecordBatch], seq_len: int) -> list[_Block]:
    blocks = []
    for batch in batches:
        if batch.num_rows == 0:
            continue
        ids = batch.column("input_ids")
        docs = batch.column("doc_starts")
        if ids.null_count or ids.offset or docs.offset:
            raise TokenShardError(f"token shard {path}: sliced or null input_ids rows are not supported")
        valid = batch.column("valid_tokens").to_numpy(zero_copy_only=True)
        if valid.min() < 0 or valid.max() > seq_len:
            raise TokenShardError(f"token shard {path}: valid_tokens outside 0..{seq_len}")
        blocks.append(
            _Block(
                input_ids=ids.values.to_numpy(zero_copy_only=True).reshape(-1, seq_len),
                valid_tokens=valid,
                doc_offsets=docs.offsets.to_numpy(zero_copy_only=True),
                doc_values=docs.values.to_numpy(zero_copy_only=True),
                shard=shard,
                domain_tokens=batch.column("domain_tokens").to_numpy(zero_copy_only=True),
            )
        )
    return blocks


class TokenShardDataset(IterableDataset):
    """The samples (one `seq_len` block each) of token shards, in curriculum order, for one rank.

    - Order: shards in the order given (the curriculum), rows in file order. `shuffle_window > 0`
      permutes samples only inside consecutive windows of that many samples (seeded by seed, epoch and
      window index), so the coarse curriculum order is kept.
    - Ranks: rank r gets positions r, r + world_size, ... of that order. Every rank gets
      `total // world_size` samples; the last `total % world_size` positions of each epoch are dropped
      so that ranks stay in step.
    - Resume: `state_dict()` counts samples yielded by `__iter__` / `iter_blocks`; a new dataset with
      `load_state_dict(state)` continues at the exact next sample. Wrapping in a DataLoader that has
      already fetched more batches than the model consumed (prefetch) is the caller's business: save
      the state at the step boundary with num_workers=0, where a batch is yielded only when asked for.
    - HF Trainer: pass it as `train_dataset` (it has `__len__` and `set_epoch`). The Trainer (through
      accelerate) fetches one batch ahead, so at a checkpoint this state is a batch ahead of the model:
      on resume let the Trainer skip the trained batches (its default, ignore_data_skip=False; exact,
      since the order is deterministic) and do not also load this state. A plain loop saves
      `state_dict()` next to the model and loads it back: no re-reading.
    - One iterator at a time: `__iter__` and `iter_blocks` share one position.
    - DataLoader workers: not supported (num_workers must be 0). Each worker would hold its own copy of
      the state, so the main process could not checkpoint the position, and every worker would yield
      every sample. Reading is memory-mapped and cheap, so the main process keeps up with training.
    - Samples are dicts of LongTensor[seq_len]: `input_ids`, `labels` (= input_ids, -100 from
      `valid_tokens` on; not shifted, HF models shift internally) and `attention_mask`. With
      `document_mask=True`, `position_ids` restart at every document start and `attention_mask` is left
      out: HF models then build a block-diagonal causal mask from the position ids (transformers
      `find_packed_sequence_indices` only runs when attention_mask is None), so attention never crosses
      documents. Padding is always at the end of a block, so causal attention never sees it either.
    """

    def __init__(
        self,
        shard_paths: Sequence[str | Path],
        *,
        expected: Mapping[str, object] | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle_window: int = 0,
        seed: int = 0,
        document_mask: bool = False,
    ):
        if not shard_paths:
            raise ValueError("TokenShardDataset needs at least one shard path")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")
        if shuffle_window < 0:
            raise ValueError(f"shuffle_window must be >= 0 samples, got {shuffle_window}")
        self.shard_paths = [Path(p) for p in shard_paths]
        self.expected = dict(expected or {})
        unknown = sorted(set(self.expected) - set(METADATA_KEYS))
        if unknown:
            raise ValueError(f"expected: unknown metadata keys {unknown}; known: {sorted(METADATA_KEYS)}")
        self.rank = rank
        self.world_size = world_size
        self.shuffle_window = shuffle_window
        self.seed = seed
        self.document_mask = document_mask
        self.epoch = 0
        self.next_index = 0  # position in this rank's sample stream of the current epoch
        self._open()

    # ---- opening and validation -------------------------------------------------------------------

    def _open(self) -> None:
        self._mmaps: list[pa.MemoryMappedFile] = []
        self._blocks: list[_Block] = []
        self.metadata: dict = {}
        reference: Path | None = None
        for shard, path in enumerate(self.shard_paths):
            mmap, schema, batches = _open_batches(path)
            self._mmaps.append(mmap)
            meta = shard_metadata(path, schema)
            for key, want in self.expected.items():
                if meta[key] != want:
                    raise TokenShardError(
                        f"token shard {path}: {METADATA_PREFIX}{key} is {meta[key]!r}, expected {want!r}"
                        + (
                            " (tokenized with a different tokenizer: rerun the tokenize stage for this model)"
                            if key == "tokenizer_fingerprint"
                            else ""
                        )
                    )
            if reference is None:
                reference, self.metadata = path, meta
            else:
                for key in MUST_AGREE:
                    if meta[key] != self.metadata[key]:
                        raise TokenShardError(
                            f"token shard {path}: {METADATA_PREFIX}{key} is {meta[key]!r} but "
                            f"{reference.name} has {self.metadata[key]!r}; all shards of one dataset must agree"
                        )
            seq_len = meta["seq_len"]
            _check_schema(path, schema, seq_len)
            self._blocks.extend(_blocks_of(path, shard, batches, seq_len))
        self.seq_len = self.metadata["seq_len"]
        self.pad_id = self.metadata["pad_id"]
        rows = np.array([len(b.valid_tokens) for b in self._blocks], dtype=np.int64)
        self._block_starts = np.concatenate([[0], np.cumsum(rows)])  # global sample index of each block's row 0
        self._block_start_list = self._block_starts.tolist()  # bisect on a list beats numpy for one index
        self.total_samples = int(self._block_starts[-1])
        self.samples_per_rank = self.total_samples // self.world_size
        dropped = self.total_samples - self.samples_per_rank * self.world_size
        if dropped:
            logger.info(
                "token reader: %d samples, world_size %d: the last %d positions of each epoch are dropped "
                "so that every rank gets %d samples",
                self.total_samples,
                self.world_size,
                dropped,
                self.samples_per_rank,
            )
        self._window_cache: tuple[tuple[int, int], np.ndarray] | None = None

    def close(self) -> None:
        """Releases the memory maps (views handed out before stay valid until they are freed)."""
        for mmap in self._mmaps:
            mmap.close()
        self._mmaps, self._blocks = [], []

    def __getstate__(self) -> dict:
        # Pickling record batches would copy every shard into the pickle; reopen the maps instead.
        state = {k: v for k, v in self.__dict__.items() if k not in ("_mmaps", "_blocks", "_window_cache")}
        return state

    def __setstate__(self, state: dict) -> None:
        epoch, next_index = state["epoch"], state["next_index"]
        self.__dict__.update(state)
        self._open()
        self.epoch, self.next_index = epoch, next_index

    # ---- order ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.samples_per_rank

    def _window_permutation(self, window: int) -> np.ndarray:
        key = (self.epoch, window)
        if self._window_cache is None or self._window_cache[0] != key:
            start = window * self.shuffle_window
            size = min(self.shuffle_window, self.total_samples - start)
            rng = np.random.default_rng([self.seed, self.epoch, window])
            self._window_cache = (key, start + rng.permutation(size))
        return self._window_cache[1]

    def sample_indices(self, start: int, stop: int) -> np.ndarray:
        """Global sample indices (into the concatenated shards) of this rank's positions start..stop-1."""
        positions = np.arange(start, stop, dtype=np.int64) * self.world_size + self.rank
        if self.shuffle_window <= 0 or len(positions) == 0:
            return positions
        windows = positions // self.shuffle_window
        out = np.empty_like(positions)
        for window in np.unique(windows):
            selected = windows == window
            out[selected] = self._window_permutation(int(window))[positions[selected] % self.shuffle_window]
        return out

    def locate(self, index: int) -> tuple[int, int, int]:
        """(shard number, block number, row in block) of global sample `index`."""
        block = bisect_right(self._block_start_list, index) - 1
        return self._blocks[block].shard, block, index - self._block_start_list[block]

    def row(self, index: int) -> np.ndarray:
        """Zero-copy uint32 view of global sample `index` in its shard's memory map."""
        _, block, row = self.locate(index)
        return self._blocks[block].input_ids[row]

    def block_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """(valid_tokens, domain_tokens) of every sample, by global index: which blocks are general
        (replay), domain or mixed, for what reads the stream besides training (sft's replay, EWC's Fisher)."""
        valid = np.concatenate([b.valid_tokens for b in self._blocks]).astype(np.int64)
        domain = np.concatenate([b.domain_tokens for b in self._blocks]).astype(np.int64)
        return valid, domain

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        """Global sample `index` as `__iter__` yields it, without moving the position."""
        return self._sample(index)

    # ---- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Position to resume from: samples already yielded in this epoch, plus what must not change."""
        return {
            "next_index": self.next_index,
            "epoch": self.epoch,
            "world_size": self.world_size,
            "shuffle_window": self.shuffle_window,
            "seed": self.seed,
            "total_samples": self.total_samples,
            "tokenizer_fingerprint": self.metadata.get("tokenizer_fingerprint"),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resumes at `state["next_index"]` of `state["epoch"]`.

        Refuses a state saved with a different world size, shuffle window, seed or set of shards: the
        sample order would differ and the resume would silently skip or repeat data. The rank is not
        stored: ranks move in step, so every rank may load rank 0's state.
        """
        for key in ("world_size", "shuffle_window", "seed", "total_samples", "tokenizer_fingerprint"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(
                    f"token reader state was saved with {key}={state[key]!r}, this dataset has "
                    f"{self.state_dict()[key]!r}: resuming would change the sample order"
                )
        next_index, epoch = int(state["next_index"]), int(state["epoch"])
        if not 0 <= next_index <= self.samples_per_rank:
            raise ValueError(f"token reader state next_index={next_index} outside 0..{self.samples_per_rank}")
        self.epoch, self.next_index = epoch, next_index
        self._window_cache = None

    def set_epoch(self, epoch: int) -> None:
        """Starts epoch `epoch` (windows reshuffled with it). Setting the current epoch keeps the position,
        so the Trainer's set_epoch call after a resume does not rewind."""
        if epoch != self.epoch:
            self.epoch, self.next_index = epoch, 0
            self._window_cache = None

    def _begin_iteration(self) -> None:
        info = get_worker_info()
        if info is not None:
            raise RuntimeError(
                "TokenShardDataset does not support DataLoader workers (num_workers > 0): each worker "
                "would yield every sample and the position could not be checkpointed from the main "
                "process. Use num_workers=0 (reading is memory-mapped and fast)."
            )
        if self.next_index >= self.samples_per_rank and self.samples_per_rank > 0:
            self.set_epoch(self.epoch + 1)  # the previous epoch was read to its last sample

    def _end_of_epoch(self) -> None:
        self.set_epoch(self.epoch + 1)

    # ---- reading ----------------------------------------------------------------------------------

    def _sample(self, index: int) -> dict[str, torch.Tensor]:
        # Built in numpy, handed to torch without a copy: small torch ops cost microseconds each.
        _, block_number, row = self.locate(index)
        block = self._blocks[block_number]
        input_ids = block.input_ids[row].astype(np.int64)
        valid = int(block.valid_tokens[row])
        labels = input_ids.copy()
        labels[valid:] = IGNORE_INDEX
        sample = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
        if self.document_mask:
            starts = block.doc_values[block.doc_offsets[row] : block.doc_offsets[row + 1]]
            positions = np.arange(self.seq_len, dtype=np.int64)
            if len(starts):
                starts = np.union1d(starts, [0])  # a block may begin inside a document
                positions -= starts[np.searchsorted(starts, positions, side="right") - 1]
            sample["position_ids"] = torch.from_numpy(positions)
        else:
            attention_mask = np.zeros(self.seq_len, dtype=np.int64)
            attention_mask[:valid] = 1
            sample["attention_mask"] = torch.from_numpy(attention_mask)
        return sample

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._begin_iteration()
        chunk = 4096  # global indices are computed in chunks: vectorised, and cheap to restart
        while self.next_index < self.samples_per_rank:
            indices = self.sample_indices(self.next_index, min(self.next_index + chunk, self.samples_per_rank))
            for index in indices.tolist():
                sample = self._sample(index)
                self.next_index += 1  # counted before the yield: the consumer holds it now
                yield sample
        self._end_of_epoch()

    def iter_blocks(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Fast path: this rank's samples as numpy arrays of up to `batch_size` rows, in `__iter__` order.

        Yields {"input_ids": uint32 (rows, seq_len), "valid_tokens": int32 (rows,)}. Rows that are
        consecutive in one record batch come back as views into the memory map (no copy); otherwise
        they are gathered into a new array. Advances the same position as `__iter__`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._begin_iteration()
        while self.next_index < self.samples_per_rank:
            stop = min(self.next_index + batch_size, self.samples_per_rank)
            block = bisect_right(self._block_start_list, self.next_index) - 1
            row, end = (self.next_index - self._block_start_list[block], stop - self._block_start_list[block])
            if self.world_size == 1 and self.shuffle_window <= 0 and end <= len(self._blocks[block].valid_tokens):
                # Sequential read inside one record batch: a slice of the map, no index arithmetic.
                ids, valid = self._blocks[block].input_ids[row:end], self._blocks[block].valid_tokens[row:end]
            else:
                ids, valid = self._gather(self.sample_indices(self.next_index, stop))
            self.next_index = stop
            yield {"input_ids": ids, "valid_tokens": valid}
        self._end_of_epoch()

    def _gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        blocks = np.searchsorted(self._block_starts, indices, side="right") - 1
        rows = indices - self._block_starts[blocks]
        ids = np.empty((len(indices), self.seq_len), dtype=np.uint32)
        valid = np.empty(len(indices), dtype=np.int32)
        # One fancy-indexing copy per record batch touched, not one per row.
        change = np.flatnonzero(np.diff(blocks)) + 1
        for lo, hi in zip(np.concatenate([[0], change]), np.concatenate([change, [len(indices)]])):
            block = self._blocks[int(blocks[lo])]
            selected = rows[lo:hi]
            if selected[-1] - selected[0] == hi - lo - 1 and (np.diff(selected) == 1).all():
                ids[lo:hi] = block.input_ids[selected[0] : selected[-1] + 1]
            else:
                np.take(block.input_ids, selected, axis=0, out=ids[lo:hi])
            valid[lo:hi] = block.valid_tokens[selected]
        return ids, valid
