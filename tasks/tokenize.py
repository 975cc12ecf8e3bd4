"""Tokenize stage: the base model's tokenizer over the mixed stream, packed into fixed blocks in Arrow shards.

Between `mix` and `cpt` in the DAG: documents in curriculum order get BOS (as the tokenizer adds it)
and EOS, are concatenated in stream order and cut into blocks of `seq_len` tokens; no token is ever
overwritten or lost (see cptflow/token_shards.py for the shard format).
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cptflow import __version__, fast_bpe
from cptflow.docshards import ShardCounts, load_finished_shard, mark_shard_finished, read_documents, shard_work_file
from cptflow.models import load_tokenizer, model_fingerprint, resolve_model_path
from cptflow.stage import Artifact, commit_data_stage, counts_artifact, upstream_shard_path, upstream_shards
from cptflow.store import WORK, atomic_path, atomic_write_json, read_json
from cptflow.token_shards import tokenizer_fingerprint, write_token_shard
from cptflow.tokenization import document_token_ids

logger = logging.getLogger(__name__)

REASON_FINAL_BLOCK_DROPPED = "final_block_dropped"
ROLES = ("domain", "general")
SHARDS_DIR = "shards"


class TokenizeConfig(BaseModel):
    """The `tokenize:` section of a pipeline config."""

    model_config = ConfigDict(extra="forbid")

    seq_len: int = Field(
        default=512,
        gt=1,
        description="Tokens per packed block (one training row); at most the base model's max_position_embeddings.",
    )
    final_block: Literal["pad", "drop"] = Field(
        default="pad",
        description="The last, partial block: pad it with pad_id (valid_tokens says where the "
        "padding starts, its labels are -100) or drop its tokens. Both are counted in the manifest.",
    )
    rows_per_batch: int = Field(default=256, gt=0, description="Blocks per Arrow record batch.")
    blocks_per_shard: int = Field(default=2048, gt=0, description="Blocks per output shard file.")
    batch_documents: int = Field(default=1000, gt=0, description="Documents per tokenizer call.")
    encoder: Literal["auto", "tiktoken", "huggingface"] = Field(
        default="auto",
        description="What turns text into ids. tiktoken: an exact tiktoken equivalent of a byte-level "
        "BPE tokenizer (GPT-2, Llama 3, Qwen2 families), 2-3x faster, checked against the tokenizer "
        "on a probe and on every 100th document; an error if the tokenizer does not convert. "
        "huggingface: the fast tokenizer itself. auto: tiktoken where it converts and agrees, else "
        "huggingface. The ids are the same either way.",
    )


# ---------------------------------------------------------------------------------------------
# Tokenizing
# ---------------------------------------------------------------------------------------------


CHECK_EVERY = fast_bpe.CHECK_EVERY
EncoderMismatch = fast_bpe.EncoderMismatch  # the fast encoder and the tokenizer gave different ids


def encode_documents(texts: list[str], tokenizer, encoder=None) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens uint32, lengths int64, documents checked): `document_token_ids`, flattened.

    With a fast encoder (cptflow.fast_bpe) every CHECK_EVERY-th document is also encoded by the
    tokenizer itself; a difference raises EncoderMismatch rather than change the token stream.
    """
    if encoder is None:
        ids = document_token_ids(texts, tokenizer)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum())), lengths, 0
    return fast_bpe.encode_checked(encoder, texts, tokenizer)


def tokenizer_bos_id(tokenizer) -> int | None:
    """The BOS id if the tokenizer prepends one to every text, else None (a defined but unused
    bos_token, as in GPT-2, is not a BOS for the shards)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def shard_metadata(tokenizer, seq_len: int, seed: int) -> dict:
    """What every output shard records about how its tokens were made (see token_shards.METADATA_KEYS)."""
    eos = tokenizer.eos_token_id
    return {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "eos_id": eos,
        "bos_id": tokenizer_bos_id(tokenizer),
        # Padding is masked by valid_tokens; EOS is a safe id when the tokenizer defines no pad.
        "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        "seq_len": seq_len,
        "seed": seed,
        "version": __version__,
    }


@functools.lru_cache(maxsize=2)
def _stage_tokenizer(model_path: str, trust_remote_code: bool):
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{model_path}: the tokenize stage needs a fast (Rust) tokenizer, got {type(tokenizer).__name__}"
        )
    # Shared by the shard threads without a lock: a call only mutates the Rust tokenizer when its
    # truncation/padding settings differ from the call's ("Already borrowed" errors otherwise), so
    # settle them here with one call like ours. Concurrent calls overlap one thread's Python-side
    # list conversion with another's Rust encode: measured 1.3x the wall time of a single caller.
    tokenizer(["a"], add_special_tokens=True, return_attention_mask=False)
    return tokenizer


def stage_tokenizer(cfg):
    return _stage_tokenizer(resolve_model_path(cfg.base_model), cfg.trust_remote_code)


@functools.lru_cache(maxsize=2)
def _stage_encoder(model_path: str, trust_remote_code: bool, choice: str) -> tuple[object | None, str]:
    encoder, why = None, "tokenize.encoder = huggingface"
    if choice != "huggingface":
        encoder, why = fast_bpe.choose_encoder(_stage_tokenizer(model_path, trust_remote_code), choice)
    if why:
        if choice == "tiktoken":
            raise ValueError(
                f"tokenize.encoder = tiktoken, but {model_path}'s tokenizer has no exact tiktoken equivalent: {why}"
            )
        logger.info("tokenize: the Hugging Face tokenizer encodes (no tiktoken equivalent: %s)", why)
    else:
        logger.info("tokenize: the tiktoken encoder encodes (exact equivalent of %s's tokenizer)", model_path)
    return encoder, why


def stage_encoder_choice(cfg) -> dict:
    """What the manifest records: {"name": "tiktoken" | "huggingface", "reason": why not tiktoken ("" if it ran)}."""
    encoder, why = _stage_encoder(resolve_model_path(cfg.base_model), cfg.trust_remote_code, cfg.tokenize.encoder)
    return {"name": "huggingface" if encoder is None else "tiktoken", "reason": why}


def stage_encoder(cfg):
    """The fast encoder for the base model's tokenizer, or None to use the tokenizer itself."""
    return _stage_encoder(resolve_model_path(cfg.base_model), cfg.trust_remote_code, cfg.tokenize.encoder)[0]


def model_context_length(cfg) -> int | None:
    """max_position_embeddings of the base model (None if its config names no limit)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(cfg.base_model), trust_remote_code=cfg.trust_remote_code)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


# ---------------------------------------------------------------------------------------------
# Packing: documents in stream order -> blocks of seq_len tokens (numpy, no loop per token)
# ---------------------------------------------------------------------------------------------


def _packing_path(directory: Path, name: str) -> Path:
    return Path(directory) / f"packing-{name.strip('_')}.npy"


class Packing:
    """Where every block starts and ends in the concatenated token stream, and what is in it.

    Built from per-document lengths and roles only; the tokens themselves are gathered per
    output shard, so memory is one output shard plus a few numbers per document.
    """

    ARRAYS = ("lengths", "is_domain", "doc_start", "_domain_before")  # what save() keeps, per document

    def __init__(self, lengths: np.ndarray, is_domain: np.ndarray, seq_len: int, final_block: str, *, saved=None):
        self.seq_len = seq_len
        if saved is not None:  # memory-mapped arrays of save(): no pass over the documents
            for name in self.ARRAYS:
                setattr(self, name, saved[name])
        else:
            self.lengths = np.asarray(lengths, dtype=np.int64)
            self.is_domain = np.asarray(is_domain, dtype=bool)
            self.doc_start = np.zeros(len(self.lengths), dtype=np.int64)
            np.cumsum(self.lengths[:-1], out=self.doc_start[1:])
            # Domain tokens before each document (and after the last): D(p) below is exact at any p.
            self._domain_before = np.zeros(len(self.lengths) + 1, dtype=np.int64)
            np.cumsum(self.lengths * self.is_domain, out=self._domain_before[1:])
        self.total_tokens = int(self.doc_start[-1] + self.lengths[-1]) if len(self.lengths) else 0
        full, remainder = divmod(self.total_tokens, seq_len)
        self.blocks = full + (1 if remainder and final_block == "pad" else 0)
        # Tokens that end up in blocks (the rest is the dropped tail) and padding of the last block.
        self.valid_end = min(self.total_tokens, self.blocks * seq_len)
        self.padded_tokens = self.blocks * seq_len - self.valid_end
        self.dropped_tokens = self.total_tokens - self.valid_end

    def save(self, directory: Path) -> None:
        """Its per-document arrays as .npy files (25 bytes per document), for the tasks that write shards."""
        for name in self.ARRAYS:
            _save_npy(_packing_path(directory, name), getattr(self, name))

    @classmethod
    def load(cls, directory: Path, seq_len: int, final_block: str) -> "Packing":
        saved = {name: np.load(_packing_path(directory, name), mmap_mode="r") for name in cls.ARRAYS}
        return cls(None, None, seq_len, final_block, saved=saved)

    def domain_tokens_before(self, positions: np.ndarray) -> np.ndarray:
        """Domain tokens in stream positions [0, p) for each p."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(self.lengths) == 0:
            return np.zeros_like(positions)
        doc = np.clip(np.searchsorted(self.doc_start, positions, side="right") - 1, 0, None)
        inside = np.minimum(positions - self.doc_start[doc], self.lengths[doc])
        return self._domain_before[doc] + self.is_domain[doc] * inside

    def block_rows(self, first: int, stop: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """valid_tokens, doc_starts (per block) and domain_tokens of blocks [first, stop)."""
        starts = np.arange(first, stop, dtype=np.int64) * self.seq_len
        ends = np.minimum(starts + self.seq_len, self.valid_end)
        valid = (ends - starts).astype(np.int32)
        domain = (self.domain_tokens_before(ends) - self.domain_tokens_before(starts)).astype(np.int32)
        lo = np.searchsorted(self.doc_start, starts, side="left")
        hi = np.searchsorted(self.doc_start, ends, side="left")
        doc_starts = [(self.doc_start[a:b] - s).astype(np.int32) for a, b, s in zip(lo, hi, starts)]
        return valid, doc_starts, domain

    def documents_dropped(self) -> np.ndarray:
        """Mask of documents with no token in any block (they start in a dropped tail)."""
        return self.doc_start >= self.valid_end


class TokenStream:
    """The per-shard token arrays of `_work/`, memory-mapped, addressed as one stream."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=self.offsets[1:])

    def read_into(self, out: np.ndarray, start: int, stop: int) -> None:
        """Copy stream positions [start, stop) into out[: stop - start]."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        written = 0
        for index in range(max(first, 0), len(self.arrays)):
            lo, hi = self.offsets[index], self.offsets[index + 1]
            if lo >= stop:
                break
            a, b = max(start, lo) - lo, min(stop, hi) - lo
            if b > a:
                out[written : written + b - a] = self.arrays[index][a:b]
                written += b - a

    def shard_of(self, positions: np.ndarray) -> np.ndarray:
        """Index of the input shard holding each stream position."""
        return np.searchsorted(self.offsets, positions, side="right") - 1


# ---------------------------------------------------------------------------------------------
# The stage: tokenize each stream shard into _work/ (parallel), then pack and write sequentially
# ---------------------------------------------------------------------------------------------
STAGE_VERSION = 2
NAME = "tokenize"
UPSTREAM = "mix"
Config = TokenizeConfig


def fingerprint_inputs(cfg) -> dict:
    return {
        "config": cfg.tokenize.model_dump(mode="json"),
        "tokenizer": model_fingerprint(cfg.base_model),
        "seed": cfg.seed,
        "version": STAGE_VERSION,
    }


def artifacts(manifest: dict, directory: Path) -> list[Artifact]:
    return [counts_artifact(manifest)]


def plan(run, cfg) -> list[dict]:
    section: TokenizeConfig = cfg.tokenize
    limit = model_context_length(cfg)  # also builds a builtin model once, before shards run in parallel
    if limit is not None and section.seq_len > limit:
        raise ValueError(
            f"tokenize.seq_len = {section.seq_len} tokens exceeds the context of the base model "
            f"{cfg.base_model!r} (max_position_embeddings = {limit}); set tokenize.seq_len <= {limit}"
        )
    stage_tokenizer(cfg)
    stage_encoder(cfg)  # a tokenizer that does not convert fails here under `encoder: tiktoken`
    return upstream_shards(run)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def tokenize_shard(input_path: Path, shard: str, source: str, cfg, stage_directory: Path) -> ShardCounts:
    """Tokenize one stream shard into `_work/<shard>.{tokens,lengths,domain}.npy`; idempotent after a kill."""
    finished = load_finished_shard(stage_directory, shard)
    if finished is not None:
        return finished
    started = time.perf_counter()
    tokenizer, encoder = stage_tokenizer(cfg), stage_encoder(cfg)
    try:
        counts, tokens, lengths, is_domain = _tokenize_documents(input_path, shard, source, cfg, tokenizer, encoder)
    except EncoderMismatch as error:
        logger.warning("tokenize %s: %s; encoding the shard again with the Hugging Face tokenizer", shard, error)
        counts, tokens, lengths, is_domain = _tokenize_documents(input_path, shard, source, cfg, tokenizer, None)
        counts.stats["encoder_fallbacks"] += 1
    _save_npy(shard_work_file(stage_directory, shard, "tokens.npy"), tokens)
    _save_npy(shard_work_file(stage_directory, shard, "lengths.npy"), lengths)
    _save_npy(shard_work_file(stage_directory, shard, "domain.npy"), is_domain)
    counts.kept = counts.documents_in  # a document can only leave in commit (final_block: drop)
    counts.stats["tokens"] = len(tokens)
    counts.stats["domain_tokens"] = int(lengths[is_domain].sum())
    counts.seconds = time.perf_counter() - started
    mark_shard_finished(stage_directory, counts)
    return counts


def _tokenize_documents(input_path: Path, shard: str, source: str, cfg, tokenizer, encoder):
    section: TokenizeConfig = cfg.tokenize
    counts = ShardCounts(shard=shard, source=source)
    token_parts: list[np.ndarray] = []
    length_parts: list[np.ndarray] = []
    domain_parts: list[np.ndarray] = []
    documents = read_documents(input_path)
    while batch := list(itertools.islice(documents, section.batch_documents)):
        roles = [doc["role"] for doc in batch]
        if unknown := set(roles) - set(ROLES):
            raise ValueError(f"{input_path}: documents with role {sorted(unknown)}; expected one of {ROLES}")
        tokens, lengths, checked = encode_documents([doc["text"] for doc in batch], tokenizer, encoder)
        token_parts.append(tokens)
        length_parts.append(lengths)
        domain_parts.append(np.array([role == "domain" for role in roles], dtype=bool))
        counts.documents_in += len(batch)
        counts.stats["encoder_checked_documents"] += checked
    if encoder is not None:
        counts.stats["tiktoken_documents"] = counts.documents_in
    tokens = np.concatenate(token_parts) if token_parts else np.zeros(0, np.uint32)
    lengths = np.concatenate(length_parts) if length_parts else np.zeros(0, np.int64)
    is_domain = np.concatenate(domain_parts) if domain_parts else np.zeros(0, bool)
    return counts, tokens, lengths, is_domain


def process(run, cfg, item: dict) -> ShardCounts:
    input_path = upstream_shard_path(run, item["shard"])
    return tokenize_shard(input_path, item["shard"], item["source"], cfg, run.path)


def output_shard_name(index: int) -> str:
    return f"tokens-{index:05d}.arrow"


def _packing_dir(run) -> Path:
    return run.path / WORK / "packed"


def plan_packing(run, cfg, shard_counts: list[ShardCounts]) -> list[dict]:
    """Decide where every block starts (from the documents' lengths and roles alone; kept in `_work/`),
    then one item per output shard k = blocks [k * blocks_per_shard, (k + 1) * blocks_per_shard)."""
    section: TokenizeConfig = cfg.tokenize
    decided = _packing_dir(run) / "packing.json"
    if not decided.is_file():

        def work(counts: ShardCounts, suffix: str) -> np.ndarray:
            return np.load(shard_work_file(run.path, counts.shard, suffix), mmap_mode="r")

        doc_lengths = [work(c, "lengths.npy") for c in shard_counts]
        packing = Packing(
            np.concatenate(doc_lengths) if doc_lengths else np.zeros(0, np.int64),
            np.concatenate([work(c, "domain.npy") for c in shard_counts]) if shard_counts else np.zeros(0, bool),
            section.seq_len,
            section.final_block,
        )
        packing.save(_packing_dir(run))
        atomic_write_json(decided, {"blocks": packing.blocks})  # last: the decision is whole
    blocks = read_json(decided)["blocks"]
    per_shard = section.blocks_per_shard
    return [
        {"name": output_shard_name(index), "first": first, "stop": min(first + per_shard, blocks)}
        for index, first in enumerate(range(0, blocks, per_shard))
    ]


def _stream(run, shard_counts_or_names) -> TokenStream:
    names = [getattr(c, "shard", c) for c in shard_counts_or_names]
    return TokenStream([np.load(shard_work_file(run.path, name, "tokens.npy"), mmap_mode="r") for name in names])


REDUCE_ROUNDS = (plan_packing,)  # after the shards: write each output shard (one task each)


def reduce(run, cfg, item: dict) -> dict:
    """Write one output shard of blocks [first, stop); one written before a kill is reused."""
    section: TokenizeConfig = cfg.tokenize
    seq_len = section.seq_len
    path = run.path / SHARDS_DIR / item["name"]
    record_path = _packing_dir(run) / f"{item['name']}.json"
    if path.is_file() and record_path.is_file():
        record = read_json(record_path)
        # The record is written after the shard's atomic rename: a shard with its record is whole.
        if record.get("bytes") == path.stat().st_size:
            return record
    packing = Packing.load(_packing_dir(run), seq_len, section.final_block)
    stream = _stream(run, [s["shard"] for s in upstream_shards(run)])
    metadata = shard_metadata(stage_tokenizer(cfg), seq_len, cfg.seed)
    first, stop = item["first"], item["stop"]
    input_ids = np.full((stop - first) * seq_len, metadata["pad_id"], dtype=np.uint32)
    stream.read_into(input_ids, first * seq_len, min(stop * seq_len, packing.valid_end))
    valid, doc_starts, domain = packing.block_rows(first, stop)
    written = write_token_shard(
        path, input_ids.reshape(-1, seq_len), valid, doc_starts, domain, metadata, section.rows_per_batch
    )
    record = {
        "name": path.name,
        "path": f"{SHARDS_DIR}/{path.name}",
        "rows": written["rows"],
        "tokens": written["tokens"],
        "sha256": written["sha256"],
        "bytes": path.stat().st_size,
    }
    atomic_write_json(record_path, record)
    return record


def commit(run, cfg, shard_counts: list[ShardCounts], started: float) -> dict:
    """The manifest, from the packing decision and the output shards' records (any shard the runner did
    not write is written here, as when the stage runs without a runner)."""
    section: TokenizeConfig = cfg.tokenize
    metadata = shard_metadata(stage_tokenizer(cfg), section.seq_len, cfg.seed)
    records = [reduce(run, cfg, item) for item in plan_packing(run, cfg, shard_counts)]
    token_shards = [{k: v for k, v in r.items() if k != "bytes"} for r in records]
    known = {r["path"]: {"path": r["path"], "bytes": r["bytes"], "sha256": r["sha256"]} for r in records}
    packing = Packing.load(_packing_dir(run), section.seq_len, section.final_block)
    final = _account(shard_counts, packing, _stream(run, shard_counts))
    domain_in_shards = int(packing.domain_tokens_before(np.array([packing.valid_end]))[0])
    summary = {
        "seq_len": section.seq_len,
        "final_block": section.final_block,
        "tokens": packing.total_tokens,
        "tokens_in_shards": packing.valid_end,
        "blocks": packing.blocks,
        "padded_tokens": packing.padded_tokens,
        "dropped_tokens": packing.dropped_tokens,
        "domain_tokens": domain_in_shards,
        "domain_share": round(domain_in_shards / packing.valid_end, 6) if packing.valid_end else None,
    }
    return commit_data_stage(
        run,
        final,
        started,
        extra={
            "token_shards": token_shards,
            "token_metadata": metadata,
            "packing": summary,
            "encoder": stage_encoder_choice(cfg),  # shards that fell back count in encoder_fallbacks
        },
        known_outputs=known,
    )


def _account(shard_counts: list[ShardCounts], packing: Packing, stream: TokenStream) -> list[ShardCounts]:
    """Per input shard: blocks starting in it, padding (on the shard of the last token), dropped
    tokens and whole documents lost to `final_block: drop`."""
    final = [ShardCounts.from_dict(c.as_dict()) for c in shard_counts]
    if not final:
        return final
    block_shard = stream.shard_of(np.arange(packing.blocks, dtype=np.int64) * packing.seq_len)
    blocks_per_input = np.bincount(block_shard, minlength=len(final))
    docs_per_input = np.array([c.documents_in for c in shard_counts], dtype=np.int64)
    doc_shard = np.repeat(np.arange(len(final)), docs_per_input)
    dropped_docs = np.bincount(doc_shard[packing.documents_dropped()], minlength=len(final))
    for index, counts in enumerate(final):
        lo, hi = stream.offsets[index], stream.offsets[index + 1]
        counts.stats["blocks"] = int(blocks_per_input[index])
        counts.stats["dropped_tokens"] = int(max(0, hi - max(lo, packing.valid_end)))
        counts.stats["padded_tokens"] = packing.padded_tokens if lo < packing.valid_end <= hi else 0
        if dropped_docs[index]:
            counts.kept -= int(dropped_docs[index])
            counts.excluded[REASON_FINAL_BLOCK_DROPPED] += int(dropped_docs[index])
    return final
