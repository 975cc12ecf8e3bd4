"""Perplexity stage: score each document with a causal LM and keep it by absolute or percentile rules.

Sits between `quality` and `mix` in the DAG; the raw score is stored on every document
(`perplexity`, `perplexity_tokens`) so thresholds can change later without re-running the model.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cptflow.docshards import (
    JsonlWriter,
    ShardCounts,
    load_finished_shard,
    mark_shard_finished,
    read_documents,
    shard_work_file,
)
from cptflow.models import load_causal_lm, load_tokenizer, model_fingerprint, resolve_model_path
from cptflow.stage import (
    Artifact,
    commit_finalized,
    counts_artifact,
    finalize_item,
    plan_finalize,
    upstream_shard_path,
    upstream_shards,
)
from cptflow.store import atomic_path, atomic_write_json, read_json

REASON_ABOVE_MAX = "perplexity_above_max"
REASON_BELOW_BAND = "perplexity_below_band"
REASON_ABOVE_BAND = "perplexity_above_band"
REASON_UNSCORABLE = "perplexity_unscorable"


class PerplexityConfig(BaseModel):
    """The `perplexity:` section of a pipeline config.

    Every document is scored, whatever its source; the keep rules (`max_perplexity`, `keep_band`)
    only drop documents whose `source` is in `apply_to`. Percentile cutoffs are computed over the
    scores of those filtered documents only. With no rule set the stage only annotates.
    """

    model_config = ConfigDict(extra="forbid")

    scorer: Literal["model", "unigram"] = Field(
        default="model",
        description="model: the causal LM's perplexity (a GPU job at scale). unigram: the perplexity of the "
        "document's tokens under token frequencies counted on general (replay) documents, with add-one "
        "smoothing: thousands of documents per second on a CPU, but blind to word order and fluency, so it "
        "ranks documents by how typical their vocabulary is; use it with keep_band (percentiles), since its "
        "values are not on the model's scale.",
    )
    unigram_reference_documents: int = Field(
        default=20_000, gt=0, description="unigram: general documents (first in shard order) whose tokens are counted"
    )
    model: str | None = Field(
        default=None,
        description="Scoring model: a from_pretrained path, hub id or `builtin:` name; "
        "None uses the pipeline's base model (perplexity under the model you will train).",
    )
    apply_to: list[str] | None = Field(
        default=None,
        description="Source names whose documents the keep rules may drop; None = all sources. "
        "Documents of other sources are still scored and always kept.",
    )
    max_length: int = Field(
        default=512,
        gt=1,
        description="Tokens scored per document (special tokens included); longer documents are "
        "truncated, so their score describes their first max_length tokens only.",
    )
    batch_tokens: int | Literal["auto"] = Field(
        default="auto",
        description="Token budget per forward pass: padded length x rows. A document longer than "
        "the budget is scored alone. Peak logits memory is about batch_tokens x vocab x 4 bytes. "
        "auto: 16384 on CUDA, 1024 on CPU (larger CPU batches are memory-bound: measured slower).",
    )
    max_perplexity: float | None = Field(
        default=None, gt=0, description="Drop documents with a perplexity above this (absolute)."
    )
    keep_band: tuple[float, float] | None = Field(
        default=None,
        description="Percentile band to keep, in percent 0-100, inclusive at both ends: (0, 90) "
        "drops the most perplexing 10%, (10, 100) the least perplexing 10%. CCNet's "
        "head/middle/tail buckets are (0, 30), (30, 60), (60, 100).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where the scoring model runs; auto = cuda when available."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Model weights dtype; the loss is always computed in float32.",
    )

    @field_validator("batch_tokens")
    @classmethod
    def _positive_budget(cls, budget: int | str) -> int | str:
        if isinstance(budget, int) and budget <= 0:
            raise ValueError(f"batch_tokens must be a positive number of tokens or 'auto', got {budget}")
        return budget

    @field_validator("keep_band")
    @classmethod
    def _band_in_range(cls, band: tuple[float, float] | None) -> tuple[float, float] | None:
        if band is not None:
            low, high = band
            if not (0 <= low < high <= 100):
                raise ValueError(f"keep_band must satisfy 0 <= low < high <= 100, got {band}")
        return band

    def applies_to(self, source: str) -> bool:
        """Whether the keep rules may drop documents of this source."""
        return self.apply_to is None or source in self.apply_to


@dataclass
class DocumentScore:
    perplexity: float  # exp(mean next-token NLL); nan when fewer than 2 tokens
    tokens: int  # predicted tokens the mean is over (length - 1); 0 when unscorable


_UNSCORABLE = DocumentScore(perplexity=math.nan, tokens=0)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _tokenize(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    # One batched call: fast tokenizers encode the batch in parallel in Rust. The tokenizer's own
    # special-token handling (BOS for Llama-style models) is kept: it is what the model saw.
    encoded = tokenizer(
        list(texts), truncation=True, max_length=max_length, add_special_tokens=True, split_special_tokens=True
    )
    return encoded["input_ids"]


def _length_sorted_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped so that rows x padded length <= batch_tokens (at least one row per batch).

    Longest first: neighbours have similar lengths (little padding) and the biggest batch runs
    first, so an out-of-memory error shows up at once rather than at the end of a shard.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        padded_length = lengths[current[0]] if current else lengths[index]
        if current and (len(current) + 1) * padded_length > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def _score_batch(rows: list[list[int]], model, device: torch.device, pad_id: int) -> list[DocumentScore]:
    lengths = [len(r) for r in rows]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    input_ids = input_ids.to(device)
    # No attention mask: with right padding and causal attention a real token only ever attends to
    # earlier real tokens, and the logits at padded positions are never read. The plain causal
    # path is also faster than a padding mask (13% on CPU SDPA for 27 x 300 tokens).
    logits = model(input_ids=input_ids, use_cache=False).logits

    # Row by row so the float32 copy of bf16 logits is one document, not the whole batch.
    scores = []
    for i, length in enumerate(lengths):
        nll = F.cross_entropy(logits[i, : length - 1].float(), input_ids[i, 1:length], reduction="none")
        mean_nll = nll.double().mean()
        scores.append(DocumentScore(perplexity=float(torch.exp(mean_nll)), tokens=length - 1))
    return scores


def score_texts(
    texts: list[str],
    model,
    tokenizer,
    *,
    max_length: int,
    batch_tokens: int,
    progress: bool = False,
) -> list[DocumentScore]:
    """Perplexity of each text under `model`, in input order, batched by length.

    The model stays on the device and dtype the caller loaded it with. Texts with fewer than two
    tokens after tokenization get `DocumentScore(nan, 0)`.
    """
    if not texts:
        return []
    token_ids = _tokenize(texts, tokenizer, max_length)
    scores: list[DocumentScore] = [_UNSCORABLE] * len(texts)
    scorable = [i for i, ids in enumerate(token_ids) if len(ids) >= 2]
    batches = _length_sorted_batches([len(token_ids[i]) for i in scorable], batch_tokens)

    device = _device_of(model)
    # Padded positions are never attended to by real tokens nor targets: any valid id works.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(scorable), desc="perplexity", unit="doc")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                doc_indices = [scorable[j] for j in batch]
                batch_scores = _score_batch([token_ids[i] for i in doc_indices], model, device, pad_id)
                for doc_index, score in zip(doc_indices, batch_scores):
                    scores[doc_index] = score
                if bar is not None:
                    bar.update(len(batch))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return scores


def score_texts_naive(texts: list[str], model, tokenizer, *, max_length: int) -> list[DocumentScore]:
    """One document per forward pass, no padding: the reference for tests and the benchmark baseline."""
    device = _device_of(model)
    scores = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for text in texts:
                ids = tokenizer(text, truncation=True, max_length=max_length, split_special_tokens=True)["input_ids"]
                if len(ids) < 2:
                    scores.append(_UNSCORABLE)
                    continue
                input_ids = torch.tensor([ids], dtype=torch.long, device=device)
                logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
                mean_nll = F.cross_entropy(logits, input_ids[0, 1:]).double()
                scores.append(DocumentScore(float(torch.exp(mean_nll)), len(ids) - 1))
    finally:
        model.train(was_training)
    return scores


def band_thresholds(perplexities: Sequence[float], cfg: PerplexityConfig) -> tuple[float | None, float | None]:
    """Absolute (low, high) perplexity cutoffs for `cfg.keep_band`; None means no cutoff that side.

    Percentiles use numpy's default linear interpolation over the finite scores (NaN, i.e.
    unscorable, documents are left out), so the same scores always give the same cutoffs. A band
    edge at 0 or 100 gives no cutoff rather than the minimum or maximum score.
    """
    if cfg.keep_band is None:
        return None, None
    values = np.asarray(perplexities, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None, None
    low_pct, high_pct = cfg.keep_band
    low = float(np.percentile(values, low_pct)) if low_pct > 0 else None
    high = float(np.percentile(values, high_pct)) if high_pct < 100 else None
    return low, high


def keep_reason(perplexity: float, low: float | None, high: float | None, cfg: PerplexityConfig) -> str | None:
    """None to keep the document, else the drop reason. Band edges are inclusive (kept).

    Unscorable (NaN) documents are dropped only when some perplexity rule is configured; with no
    rule the stage just annotates. Call only for sources where `cfg.applies_to(source)`.
    """
    if cfg.max_perplexity is None and cfg.keep_band is None:
        return None
    if math.isnan(perplexity):
        return REASON_UNSCORABLE
    if cfg.max_perplexity is not None and perplexity > cfg.max_perplexity:
        return REASON_ABOVE_MAX
    if low is not None and perplexity < low:
        return REASON_BELOW_BAND
    if high is not None and perplexity > high:
        return REASON_ABOVE_BAND
    return None


# ---------------------------------------------------------------------------------------------
# The stage: score each shard, then one commit that applies max perplexity and per-source bands
# ---------------------------------------------------------------------------------------------

_MODEL_LOCK = threading.Lock()  # one scoring model per process, one forward at a time


@functools.lru_cache(maxsize=2)
def _scoring_model(name: str, device: str, dtype: str, trust_remote_code: bool):
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    model = load_causal_lm(name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, tokenizer


def resolve_batch_tokens(section: PerplexityConfig, model) -> int:
    if section.batch_tokens != "auto":
        return section.batch_tokens
    return 16384 if _device_of(model).type == "cuda" else 1024


def scoring_model_name(cfg) -> str:
    return cfg.perplexity.model or cfg.base_model


# ---------------------------------------------------------------------------------------------
# The stage, as the pipeline sees it (cptflow/plan.py lists the stage modules in DAG order)
# ---------------------------------------------------------------------------------------------
STAGE_VERSION = 2
NAME = "perplexity"
UPSTREAM = "quality"
Config = PerplexityConfig


def fingerprint_inputs(cfg) -> dict:
    return {
        "config": cfg.perplexity.model_dump(mode="json"),
        "model": model_fingerprint(cfg.perplexity.model or cfg.base_model),
        "version": STAGE_VERSION,
    }


def artifacts(manifest: dict, directory: Path) -> list[Artifact]:
    """The counts, and the cutoffs each source's band turned into."""
    rows = [{"source": source, **limits} for source, limits in sorted(manifest["thresholds"].items())]
    return [
        counts_artifact(manifest),
        Artifact(key="perplexity-thresholds", description="perplexity cutoffs per source", table=rows),
    ]


def plan(run, cfg) -> list[dict]:
    resolve_model_path(scoring_model_name(cfg))  # build builtin models once, before shards run in parallel
    shards = upstream_shards(run)
    if cfg.perplexity.scorer == "unigram":
        count_reference_tokens(run, cfg, shards)
    return shards


# ---------------------------------------------------------------------------------------------
# The cheap scorer: token frequencies of general text, counted once on a bounded sample
# ---------------------------------------------------------------------------------------------
def _unigram_path(stage_directory: Path) -> Path:
    return Path(stage_directory) / "_work" / "unigram-counts.npy"


def _token_ids(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    ids = tokenizer(
        list(texts), add_special_tokens=False, split_special_tokens=True, return_attention_mask=False, verbose=False
    )["input_ids"]
    return [row[:max_length] for row in ids]


def count_reference_tokens(run, cfg, shards: list[dict]) -> None:
    """Token counts of the first `unigram_reference_documents` general documents (all documents when no
    source is general), in shard order: once per stage, bounded whatever the corpus size."""
    if _unigram_path(run.path).is_file():
        return
    section: PerplexityConfig = cfg.perplexity
    tokenizer = load_tokenizer(resolve_model_path(scoring_model_name(cfg)), trust_remote_code=cfg.trust_remote_code)
    general = {source.name for source in cfg.sources if source.role == "general"}
    chosen = [item for item in shards if item["source"] in general] or shards
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    remaining = section.unigram_reference_documents
    for item in chosen:
        if remaining <= 0:
            break
        documents = read_documents(upstream_shard_path(run, item["shard"]))
        texts = [doc["text"] for doc, _ in zip(documents, range(remaining))]
        remaining -= len(texts)
        for row in _token_ids(texts, tokenizer, section.max_length):
            counts += np.bincount(np.asarray(row, dtype=np.int64), minlength=len(counts))[: len(counts)]
    with atomic_path(_unigram_path(run.path)) as tmp, open(tmp, "wb") as handle:
        np.save(handle, counts)


def unigram_scores(texts: list[str], stage_directory: Path, cfg) -> list[DocumentScore]:
    section: PerplexityConfig = cfg.perplexity
    tokenizer = load_tokenizer(resolve_model_path(scoring_model_name(cfg)), trust_remote_code=cfg.trust_remote_code)
    counts = np.load(_unigram_path(stage_directory))
    log_p = np.log((counts + 1.0) / (counts.sum() + len(counts)))  # add-one: unseen tokens stay finite
    scores = []
    for row in _token_ids(texts, tokenizer, section.max_length):
        if not row:
            scores.append(DocumentScore(float("nan"), 0))
            continue
        scores.append(DocumentScore(float(np.exp(-log_p[np.asarray(row)].mean())), len(row)))
    return scores


def _model_scores(docs: list[dict], section: PerplexityConfig, cfg) -> list[DocumentScore]:
    with _MODEL_LOCK:
        model, tokenizer = _scoring_model(
            resolve_model_path(scoring_model_name(cfg)), section.device, section.dtype, cfg.trust_remote_code
        )
        return score_texts(
            [doc["text"] for doc in docs],
            model,
            tokenizer,
            max_length=section.max_length,
            batch_tokens=resolve_batch_tokens(section, model),
            progress=True,
        )


def perplexity_shard(input_path: Path, shard: str, source: str, cfg, stage_directory: Path) -> ShardCounts:
    """Score one shard into `_work/`: every document with its perplexity (None if unscorable)."""
    finished = load_finished_shard(stage_directory, shard)
    if finished is not None:
        return finished
    started = time.perf_counter()
    section: PerplexityConfig = cfg.perplexity
    counts = ShardCounts(shard=shard, source=source)
    docs = list(read_documents(input_path))
    counts.documents_in = len(docs)
    if section.scorer == "unigram":
        scores = unigram_scores([doc["text"] for doc in docs], stage_directory, cfg)
    else:
        scores = _model_scores(docs, section, cfg)
    kept_scores = []
    with (
        JsonlWriter(shard_work_file(stage_directory, shard, "kept.jsonl")) as kept,
        JsonlWriter(shard_work_file(stage_directory, shard, "excluded.jsonl")),
    ):
        for doc, score in zip(docs, scores):
            ppl = None if math.isnan(score.perplexity) else round(score.perplexity, 4)
            # Every document keeps its raw score; the keep rules are applied by the commit.
            doc = dict(doc, perplexity=ppl, perplexity_tokens=score.tokens)
            counts.kept += 1
            kept.write(doc)
            kept_scores.append(ppl)
    atomic_write_json(shard_work_file(stage_directory, shard, "scores.json"), kept_scores)
    counts.stats["scored_tokens"] = sum(s.tokens for s in scores)
    counts.seconds = time.perf_counter() - started
    mark_shard_finished(stage_directory, counts)
    return counts


def process(run, cfg, item: dict) -> ShardCounts:
    input_path = upstream_shard_path(run, item["shard"])
    return perplexity_shard(input_path, item["shard"], item["source"], cfg, run.path)


def shard_scores(run, shard: str) -> list[float | None]:
    return read_json(shard_work_file(run.path, shard, "scores.json"))


def perplexity_decision(run, cfg, shard_counts: list[ShardCounts]) -> tuple[dict, dict]:
    """Bands are percentiles of each source's own scores: a domain corpus is more perplexing to a
    general model than general text, and one global band would drop mostly domain documents.

    Works from the shards' scores alone: 8 bytes per scored document of one source in memory, one
    shard's score list at a time."""
    section: PerplexityConfig = cfg.perplexity
    thresholds: dict[str, dict] = {}
    for source in sorted({c.source for c in shard_counts}):
        parts = [
            np.asarray([s for s in shard_scores(run, c.shard) if s is not None], dtype=np.float64)
            for c in shard_counts
            if c.source == source
        ]
        values = np.concatenate(parts) if parts else np.zeros(0)
        low, high = band_thresholds(values, section) if section.applies_to(source) else (None, None)
        thresholds[source] = {
            "low": low,
            "high": high,
            "documents": int(values.size),
            "median": float(np.median(values)) if values.size else None,
        }
    drops: dict[str, dict[int, str]] = {}
    for counts in shard_counts:
        limits = thresholds[counts.source]
        drops[counts.shard] = {}
        if not section.applies_to(counts.source):
            continue
        for index, ppl in enumerate(shard_scores(run, counts.shard)):
            reason = keep_reason(float("nan") if ppl is None else ppl, limits["low"], limits["high"], section)
            if reason:
                drops[counts.shard][index] = reason
    return drops, {"thresholds": thresholds, "scoring_model": scoring_model_name(cfg)}


def plan_publish(run, cfg, shard_counts: list[ShardCounts]) -> list[dict]:
    return plan_finalize(run, shard_counts, lambda: perplexity_decision(run, cfg, shard_counts))


REDUCE_ROUNDS = (plan_publish,)  # after the shards: publish each (one task each) under the bands


def reduce(run, cfg, item: dict) -> dict:
    return finalize_item(run, item)


def commit(run, cfg, shard_counts: list[ShardCounts], started: float) -> dict:
    plan_publish(run, cfg, shard_counts)
    return commit_finalized(run, shard_counts, started)
