"""Mix stage: carve held-out eval sets, then order domain and general ("replay") documents into one
training stream whose domain share follows a schedule over the token budget.

Sits between `perplexity` and `tokenize` in the DAG (... -> perplexity -> **mix** -> tokenize -> cpt).
The schedule is a pure function of the position in the budget (no data loader supports a continuous
0.5 -> 0.9 ratio, see shared/references/data.md), so the stream is fixed here, seeded and recorded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cptflow.docshards import (
    JsonlWriter,
    ShardCounts,
    counts_by_source,
    load_finished_shard,
    mark_shard_finished,
    shard_work_file,
)
from cptflow.models import load_tokenizer, model_fingerprint, resolve_model_path
from cptflow.stage import Artifact, commit_data_stage, counts_artifact, upstream_shards
from cptflow.store import atomic_path, atomic_write_json, read_json

ROLES = ("domain", "general")
MIX_SHARD = "mix"  # the stage's one work item: mixing is a single global decision
REASON_DOMAIN_EVAL = "held_out_domain_eval"
REASON_GENERAL_EVAL = "held_out_general_eval"
REASON_UNUSED = "unused_within_budget"
EVAL_SETS = {"domain": "domain_eval", "general": "general_eval"}
STREAM_SHARD_PREFIX = "stream-"
TOKENIZE_BATCH_DOCUMENTS = 1000


class MixEpochsWarning(UserWarning):
    """A role's documents are repeated more than `mix.max_epochs` times (with on_excess_epochs: warn)."""


class MixEpochsError(ValueError):
    """A role's documents would be repeated more than `mix.max_epochs` times (on_excess_epochs: error)."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


class ScheduleConfig(BaseModel):
    """Domain share (fraction 0-1 of training tokens) as a function of the position in the budget.

    linear: start -> end in a straight line; constant: `start` throughout (`end` unused);
    cosine: start -> end along a half cosine (flat at both ends); step: `start` until the first
    step, then from each `(fraction_of_budget, share)` on that share. The general share is 1 - domain.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["linear", "constant", "cosine", "step"] = "linear"
    start: float = Field(0.5, ge=0, le=1, description="domain share (fraction 0-1 of tokens) at position 0")
    end: float = Field(0.9, ge=0, le=1, description="domain share (fraction 0-1 of tokens) at the end of the budget")
    steps: list[tuple[float, float]] = Field(
        default_factory=list,
        description="kind 'step' only: (fraction 0-1 of the budget, domain share 0-1) pairs, fractions increasing",
    )

    @field_validator("steps")
    @classmethod
    def _steps_in_range_and_sorted(cls, steps: list[tuple[float, float]]) -> list[tuple[float, float]]:
        for fraction, share in steps:
            if not 0 <= fraction <= 1:
                raise ValueError(f"step fraction of the budget must be in [0, 1], got {fraction}")
            if not 0 <= share <= 1:
                raise ValueError(f"step domain share must be in [0, 1], got {share}")
        fractions = [fraction for fraction, _ in steps]
        if any(b <= a for a, b in zip(fractions, fractions[1:])):
            raise ValueError(f"step fractions must be strictly increasing, got {fractions}")
        return steps

    @model_validator(mode="after")
    def _steps_only_for_step(self) -> "ScheduleConfig":
        if self.kind == "step" and not self.steps:
            raise ValueError("schedule kind 'step' needs 'steps': [[fraction_of_budget, domain_share], ...]")
        if self.kind != "step" and self.steps:
            raise ValueError(f"'steps' is only used by schedule kind 'step', not '{self.kind}'")
        return self


class MixConfig(BaseModel):
    """The `mix:` section. Give the budget as `budget_tokens` or `budget_epochs`, not both: setting
    only `budget_tokens` switches off the default `budget_epochs`."""

    model_config = ConfigDict(extra="forbid")

    domain_eval_documents: int = Field(50, ge=0, description="documents held out of training as the domain eval set")
    general_eval_documents: int = Field(50, ge=0, description="documents held out of training as the general eval set")
    schedule: ScheduleConfig = ScheduleConfig()
    budget_tokens: int | None = Field(None, gt=0, description="length of the training stream in tokens")
    budget_epochs: float | None = Field(
        1.0,
        gt=0,
        description="length of the training stream in epochs of the domain training documents (their tokens "
        "divided by the schedule's mean domain share)",
    )
    max_epochs: float = Field(4.0, gt=0, description="most epochs (passes, fractional) any role may be repeated")
    on_excess_epochs: Literal["warn", "error"] = Field("warn", description="what a role above max_epochs does")
    window_documents: int = Field(
        200,
        ge=1,
        description="documents per row of the target-vs-realised share table (the share holds to "
        "within 2 points in windows of 200 documents or more)",
    )
    documents_per_shard: int = Field(2000, gt=0, description="documents per published stream shard")

    @model_validator(mode="before")
    @classmethod
    def _budget_tokens_replaces_default_epochs(cls, data):
        if isinstance(data, dict) and data.get("budget_tokens") is not None and "budget_epochs" not in data:
            data = dict(data, budget_epochs=None)
        return data

    @model_validator(mode="after")
    def _exactly_one_budget(self) -> "MixConfig":
        if (self.budget_tokens is None) == (self.budget_epochs is None):
            raise ValueError("give exactly one of budget_tokens (tokens) and budget_epochs (epochs of the domain data)")
        return self


# ---------------------------------------------------------------------------------------------
# Schedule and budget
# ---------------------------------------------------------------------------------------------


def target_share(position: float, cfg: ScheduleConfig) -> float:
    """Target domain share (fraction 0-1 of tokens) at `position` (fraction 0-1 of the budget)."""
    position = min(max(position, 0.0), 1.0)
    if cfg.kind == "constant":
        return cfg.start
    if cfg.kind == "linear":
        return cfg.start + (cfg.end - cfg.start) * position
    if cfg.kind == "cosine":
        return cfg.start + (cfg.end - cfg.start) * (1 - math.cos(math.pi * position)) / 2
    share = cfg.start
    for fraction, step_share in cfg.steps:
        if position >= fraction:
            share = step_share
    return share


def _schedule_samples(cfg: ScheduleConfig, points: int = 10_000) -> list[float]:
    return [target_share((i + 0.5) / points, cfg) for i in range(points)]


def mean_domain_share(cfg: ScheduleConfig) -> float:
    """The schedule's domain share averaged over the budget (midpoint rule, 10,000 points)."""
    samples = _schedule_samples(cfg)
    return sum(samples) / len(samples)


def resolve_budget_tokens(cfg: MixConfig, domain_training_tokens: int) -> int:
    """The stream's length in tokens: `budget_tokens`, or `budget_epochs` passes over the domain
    training tokens at the schedule's mean domain share."""
    if cfg.budget_tokens is not None:
        return cfg.budget_tokens
    share = mean_domain_share(cfg.schedule)
    if share <= 0:
        raise ValueError(
            "mix.budget_epochs counts epochs of the domain data, but the schedule gives domain no share; "
            "set mix.budget_tokens"
        )
    if domain_training_tokens <= 0:
        raise ValueError(
            "mix.budget_epochs counts epochs of the domain data, but there are no domain training documents; "
            "set mix.budget_tokens or add a domain source"
        )
    return max(1, round(cfg.budget_epochs * domain_training_tokens / share))


# ---------------------------------------------------------------------------------------------
# Token counting: the tokenize stage must count the same way
# ---------------------------------------------------------------------------------------------


def document_tokens(texts: Sequence[str], tokenizer) -> list[int]:
    """Tokens each text takes in training, as the tokenize stage makes them: the tokenizer's ids with
    its own special tokens (BOS for Llama-style tokenizers), plus one for the EOS appended after every
    document, i.e. len(tokenizer(text)["input_ids"]) + 1."""
    if not texts:
        return []
    # verbose=False: documents longer than model_max_length are expected (tokenize packs them).
    # split_special_tokens: a literal "</s>" in web text is text, not an end-of-document marker.
    encoded = tokenizer(
        list(texts),
        add_special_tokens=True,
        split_special_tokens=True,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )
    return [len(ids) + 1 for ids in encoded["input_ids"]]


@functools.lru_cache(maxsize=2)
def _tokenizer(name: str, trust_remote_code: bool):
    return load_tokenizer(resolve_model_path(name), trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------------------------------------
# Held-out eval sets and the training stream (pure functions on ids, roles and token counts)
# ---------------------------------------------------------------------------------------------


def held_out_rank(doc_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()


def choose_held_out(doc_ids: Sequence[str], count: int, seed: int) -> list[int]:
    """Indices of the `count` documents with the smallest sha256(f"{seed}:{id}"), in that order:
    the choice depends on the ids alone, not on their order or sharding."""
    ranked = sorted(range(len(doc_ids)), key=lambda i: (held_out_rank(doc_ids[i], seed), doc_ids[i]))
    return ranked[:count]


class PoolDocument(NamedTuple):
    id: str
    role: str
    tokens: int


class StreamEntry(NamedTuple):
    document: int  # index into the pool the stream was built from
    role: str
    epoch: int  # 0 on the first pass over the role's documents
    tokens: int
    target: float  # scheduled domain share at the position this document starts


def _check_pools_cover_schedule(pool_sizes: dict[str, int], schedule: ScheduleConfig) -> None:
    samples = _schedule_samples(schedule, 1000) + [share for _, share in schedule.steps]
    if pool_sizes["domain"] == 0 and max(samples) > 0:
        raise ValueError(
            "mix: the schedule gives domain a share but there are no domain training documents "
            "(add a domain source, or lower mix.domain_eval_documents)"
        )
    if pool_sizes["general"] == 0 and min(samples) < 1:
        raise ValueError(
            "mix: the schedule gives general (replay) a share but there are no general training documents "
            "(add a general source, lower mix.general_eval_documents, or use a constant schedule with start 1.0)"
        )


def build_stream(
    documents: Sequence[PoolDocument], schedule: ScheduleConfig, budget_tokens: int, seed: int
) -> list[StreamEntry]:
    """Order the pool into a training stream of at least `budget_tokens` tokens (the last document may
    run past it) whose domain share follows `schedule`.

    Each role is drawn in a seeded shuffle of its documents (base order: by id, so the input order
    does not matter); an exhausted role starts a new epoch, reshuffled with the epoch number.
    Error feedback, as in Megatron's BlendedDataset but in tokens: `deficit` is the domain tokens
    the schedule asked for so far minus those given, and each step picks the role whose next document
    leaves it closest to zero. The deficit stays within about half the longest document's tokens, so
    a window's share is off by about that over the window's tokens: within 2 points for 200-document
    windows unless single documents exceed ~2% of a window's tokens (whole documents are the unit).
    """
    order: dict[str, list[int]] = {
        role: sorted((i for i, d in enumerate(documents) if d.role == role), key=lambda i: documents[i].id)
        for role in ROLES
    }
    _check_pools_cover_schedule({role: len(order[role]) for role in ROLES}, schedule)
    epoch = {role: -1 for role in ROLES}
    queue: dict[str, list[int]] = {role: [] for role in ROLES}
    cursor = {role: 0 for role in ROLES}

    def peek(role: str) -> int | None:
        if not order[role]:
            return None
        if cursor[role] == len(queue[role]):
            epoch[role] += 1
            queue[role] = list(order[role])
            random.Random(f"{seed}:{role}:{epoch[role]}").shuffle(queue[role])
            cursor[role] = 0
        return queue[role][cursor[role]]

    stream: list[StreamEntry] = []
    total = 0
    deficit = 0.0
    while total < budget_tokens:
        target = target_share(total / budget_tokens, schedule)
        domain, general = peek("domain"), peek("general")
        if general is None:
            role = "domain"
        elif domain is None:
            role = "general"
        else:
            after_domain = deficit - (1 - target) * documents[domain].tokens
            after_general = deficit + target * documents[general].tokens
            role = "domain" if abs(after_domain) <= abs(after_general) else "general"
        index = domain if role == "domain" else general
        tokens = documents[index].tokens
        deficit += target * tokens - (tokens if role == "domain" else 0)
        stream.append(StreamEntry(index, role, epoch[role], tokens, target))
        cursor[role] += 1
        total += tokens
    return stream


def epochs_by_role(stream: Sequence[StreamEntry], documents: Sequence[PoolDocument]) -> dict[str, float]:
    """Passes over each role's training tokens (fractional): stream tokens / pool tokens."""
    pool = Counter()
    for doc in documents:
        pool[doc.role] += doc.tokens
    drawn = Counter()
    for entry in stream:
        drawn[entry.role] += entry.tokens
    return {role: round(drawn[role] / pool[role], 4) if pool[role] else 0.0 for role in ROLES}


def expected_epochs(budget_tokens: int, pool_tokens: dict[str, int], schedule: ScheduleConfig) -> dict[str, float]:
    """Epochs per role the schedule implies before the stream is built (to fail fast)."""
    share = mean_domain_share(schedule)
    wanted = {"domain": budget_tokens * share, "general": budget_tokens * (1 - share)}
    return {role: wanted[role] / pool_tokens[role] if pool_tokens.get(role) else 0.0 for role in ROLES}


def excess_epochs_message(role: str, epochs: float, cfg: MixConfig, pool_documents: int, pool_tokens: int) -> str:
    return (
        f"mix: the {role} training data ({pool_documents:,} documents, {pool_tokens:,} tokens) would be repeated "
        f"{epochs:.2f} epochs, more than mix.max_epochs={cfg.max_epochs:g}. Add {role} data, shorten the budget "
        f"(mix.budget_tokens / mix.budget_epochs), change mix.schedule to give {role} a smaller share, "
        f"or raise mix.max_epochs."
    )


def check_epochs(
    epochs: dict[str, float], cfg: MixConfig, pool_documents: dict[str, int], pool_tokens: dict[str, int]
) -> list[str]:
    """Messages for the roles above `max_epochs`; raises MixEpochsError or warns, per `on_excess_epochs`."""
    messages = [
        excess_epochs_message(role, epochs[role], cfg, pool_documents[role], pool_tokens[role])
        for role in ROLES
        if epochs[role] > cfg.max_epochs
    ]
    for message in messages:
        if cfg.on_excess_epochs == "error":
            raise MixEpochsError(message)
        warnings.warn(message, MixEpochsWarning, stacklevel=2)
    return messages


def schedule_table(stream: Sequence[StreamEntry], window_documents: int) -> list[dict]:
    """Per window of consecutive stream documents: token-weighted target and realised domain share."""
    rows = []
    for window, begin in enumerate(range(0, len(stream), window_documents)):
        entries = stream[begin : begin + window_documents]
        tokens = sum(e.tokens for e in entries)
        domain = sum(e.tokens for e in entries if e.role == "domain")
        target = sum(e.target * e.tokens for e in entries)
        rows.append(
            {
                "window": window,
                "target": round(target / tokens, 4),
                "realised": round(domain / tokens, 4),
                "documents": len(entries),
                "tokens": tokens,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# The stage: one work item that decides everything, then a commit that writes the outputs
# ---------------------------------------------------------------------------------------------


class _Catalogue(NamedTuple):
    """Every upstream document, without its text: where it is, who it is and what it costs."""

    shard: list[int]  # index into the upstream shard list
    offset: list[int]  # byte offset of its line in that shard
    id: list[str]
    source: list[str]
    role: list[str]
    tokens: list[int]
    text_digest: list[bytes]


def _read_catalogue(upstream: Path, shards: list[dict], roles: dict[str, str], tokenizer) -> _Catalogue:
    catalogue = _Catalogue([], [], [], [], [], [], [])

    def flush(texts: list[str]) -> None:
        catalogue.tokens.extend(document_tokens(texts, tokenizer))
        texts.clear()

    for shard_index, item in enumerate(shards):
        texts: list[str] = []
        offset = 0
        with open(upstream / "shards" / f"{item['shard']}.jsonl", "rb") as handle:
            for line in handle:
                doc = json.loads(line)
                if doc["source"] not in roles:
                    raise ValueError(
                        f"mix: document {doc['id']!r} comes from source {doc['source']!r}, "
                        "which is not in the config's sources"
                    )
                catalogue.shard.append(shard_index)
                catalogue.offset.append(offset)
                catalogue.id.append(doc["id"])
                catalogue.source.append(doc["source"])
                catalogue.role.append(roles[doc["source"]])
                catalogue.text_digest.append(hashlib.blake2b(doc["text"].encode(), digest_size=16).digest())
                texts.append(doc["text"])
                offset += len(line)
                if len(texts) >= TOKENIZE_BATCH_DOCUMENTS:
                    flush(texts)
        flush(texts)
    return catalogue


# ---------------------------------------------------------------------------------------------
# The stage, as the pipeline sees it (cptflow/plan.py lists the stage modules in DAG order)
# ---------------------------------------------------------------------------------------------
STAGE_VERSION = 2
NAME = "mix"
UPSTREAM = "perplexity"
Config = MixConfig


def fingerprint_inputs(cfg) -> dict:
    """The held-out sets and the stream order depend on the seed; token counts on the tokenizer."""
    return {
        "config": cfg.mix.model_dump(mode="json"),
        "tokenizer": model_fingerprint(cfg.base_model),
        "roles": {s.name: s.role for s in cfg.sources},
        "seed": cfg.seed,
        "version": STAGE_VERSION,
    }


def artifacts(manifest: dict, directory: Path) -> list[Artifact]:
    """The counts, target vs realised domain share along the stream, and tokens per source."""
    windows = manifest["schedule"]
    step = max(1, len(windows) // 50)  # at most ~50 rows in the UI; the manifest has them all
    rows = [dict(w, target=round(w["target"], 4), realised=round(w["realised"], 4)) for w in windows[::step]]
    tokens = [{"source": s, "stream_tokens": n} for s, n in sorted(manifest.get("tokens_by_source", {}).items())]
    return [
        counts_artifact(manifest),
        Artifact(key="mix-schedule", description="domain share per window: target vs realised", table=rows),
        Artifact(key="mix-tokens", description="training-stream tokens per source", table=tokens),
    ]


def plan(run, cfg) -> list[dict]:
    resolve_model_path(cfg.base_model)  # build a builtin tokenizer once, before the work item runs
    return [{"shard": MIX_SHARD, "source": "all"}]


def mix_documents(run, cfg) -> ShardCounts:
    """Decide held-out sets and the stream into `_work/` (no document text is copied); idempotent."""
    finished = load_finished_shard(run.path, MIX_SHARD)
    if finished is not None:
        return finished
    started = time.perf_counter()
    section: MixConfig = cfg.mix
    shards = upstream_shards(run)
    roles = {source.name: source.role for source in cfg.sources}
    tokenizer = _tokenizer(cfg.base_model, bool(getattr(cfg, "trust_remote_code", False)))
    catalogue = _read_catalogue(Path(run.upstream_directory), shards, roles, tokenizer)
    count = len(catalogue.id)

    held_out: dict[str, list[int]] = {}
    wanted = {"domain": section.domain_eval_documents, "general": section.general_eval_documents}
    for role in ROLES:
        members = [i for i in range(count) if catalogue.role[i] == role]
        held_out[role] = [
            members[j] for j in choose_held_out([catalogue.id[i] for i in members], wanted[role], cfg.seed)
        ]
    held_out_set = {i for role in ROLES for i in held_out[role]}

    pool_index = [i for i in range(count) if i not in held_out_set]  # pool position -> catalogue index
    pool = [PoolDocument(catalogue.id[i], catalogue.role[i], catalogue.tokens[i]) for i in pool_index]
    pool_documents = Counter(d.role for d in pool)
    pool_tokens: Counter = Counter()
    for doc in pool:
        pool_tokens[doc.role] += doc.tokens
    budget = resolve_budget_tokens(section, pool_tokens["domain"])
    if section.on_excess_epochs == "error":  # fail before building a stream that would be refused
        check_epochs(expected_epochs(budget, pool_tokens, section.schedule), section, pool_documents, pool_tokens)
    stream = build_stream(pool, section.schedule, budget, cfg.seed)
    epochs = epochs_by_role(stream, pool)
    messages = check_epochs(epochs, section, pool_documents, pool_tokens)

    used = {pool_index[e.document] for e in stream}
    eval_digests = {catalogue.text_digest[i] for i in held_out_set}
    leaked = [catalogue.id[i] for i in used if catalogue.text_digest[i] in eval_digests]
    assert not (used & held_out_set) and not leaked, f"mix: held-out text in the training stream: {leaked[:5]}"

    # Accounting per upstream shard, for the per-source counts of the manifest.
    per_shard = [ShardCounts(shard=item["shard"], source=item["source"]) for item in shards]
    unused: list[int] = []
    for i in range(count):
        counts = per_shard[catalogue.shard[i]]
        counts.documents_in += 1
        if i in held_out_set:
            counts.excluded[REASON_DOMAIN_EVAL if catalogue.role[i] == "domain" else REASON_GENERAL_EVAL] += 1
        elif i in used:
            counts.kept += 1
        else:
            counts.excluded[REASON_UNUSED] += 1
            unused.append(i)
    tokens_by_source: Counter = Counter()
    stream_documents_by_source: Counter = Counter()
    for entry in stream:
        i = pool_index[entry.document]
        tokens_by_source[catalogue.source[i]] += entry.tokens
        stream_documents_by_source[catalogue.source[i]] += 1

    def eval_summary(role: str) -> dict:
        return {
            "documents": len(held_out[role]),
            "tokens": sum(catalogue.tokens[i] for i in held_out[role]),
            "path": f"eval/{EVAL_SETS[role]}.jsonl",
        }

    table = schedule_table(stream, section.window_documents)
    report = {
        "budget_tokens": budget,
        "stream_documents": len(stream),
        "stream_tokens": sum(e.tokens for e in stream),
        "counts_by_source": counts_by_source(per_shard),
        "schedule": table,
        "largest_share_error": round(max((abs(row["target"] - row["realised"]) for row in table), default=0.0), 4),
        "tokens_by_source": dict(sorted(tokens_by_source.items())),
        "sources": {
            name: {
                "role": roles[name],
                "stream_documents": stream_documents_by_source[name],
                "stream_tokens": tokens_by_source[name],
                "training_tokens": sum(d.tokens for d, i in zip(pool, pool_index) if catalogue.source[i] == name),
            }
            for name in sorted(set(catalogue.source))
        },
        "epochs_by_role": epochs,
        "eval": {EVAL_SETS[role]: eval_summary(role) for role in ROLES},
        "warnings": messages,
        "token_counting": "len(tokenizer(text)['input_ids']) + 1: the tokenizer's special tokens (BOS) plus 1 EOS",
    }
    with atomic_path(shard_work_file(run.path, MIX_SHARD, "catalogue.npy")) as tmp, open(tmp, "wb") as handle:
        np.save(
            handle, np.asarray([catalogue.shard, catalogue.offset, catalogue.tokens], dtype=np.int64).reshape(3, count)
        )
    stream_rows = [(pool_index[e.document], e.epoch) for e in stream]
    with atomic_path(shard_work_file(run.path, MIX_SHARD, "stream.npy")) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.asarray(stream_rows, dtype=np.int64).reshape(len(stream_rows), 2))
    atomic_write_json(
        shard_work_file(run.path, MIX_SHARD, "decisions.json"),
        {
            "upstream_shards": shards,
            "is_domain": [role == "domain" for role in catalogue.role],
            "held_out": held_out,
            "unused": unused,
            "excluded": dict(sorted(sum((c.excluded for c in per_shard), Counter()).items())),
            "report": report,
        },
    )
    total = ShardCounts(shard=MIX_SHARD, source="all", documents_in=count, kept=len(used))
    for counts in per_shard:
        total.excluded.update(counts.excluded)
    total.stats.update(stream_documents=len(stream), stream_tokens=report["stream_tokens"])
    total.seconds = time.perf_counter() - started
    mark_shard_finished(run.path, total)
    return total


def process(run, cfg, item: dict) -> ShardCounts:
    return mix_documents(run, cfg)


class _UpstreamReader:
    """Reads upstream documents by (shard, byte offset); the stream visits them in shuffled order."""

    def __init__(self, upstream: Path, shards: list[dict]):
        self.handles = [open(upstream / "shards" / f"{item['shard']}.jsonl", "rb") for item in shards]

    def read(self, shard: int, offset: int) -> dict:
        handle = self.handles[shard]
        handle.seek(offset)
        return json.loads(handle.readline())

    def close(self) -> None:
        for handle in self.handles:
            handle.close()


def stream_shard_name(index: int) -> str:
    return f"{STREAM_SHARD_PREFIX}{index:05d}"


def commit(run, cfg, shard_counts: list[ShardCounts], started: float) -> dict:
    """Publish `shards/stream-NNNNN.jsonl` (the training stream in order, each document with `role`,
    `epoch` and `tokens`), `eval/domain_eval.jsonl` and `eval/general_eval.jsonl`, and
    `excluded/mix.jsonl` with the documents left unused within the budget. Held-out documents are
    counted as excluded but written only to `eval/`, not to `excluded/`.

    The manifest's `shards` are the stream shards in order (so `upstream_shards()` gives tokenize
    its inputs). A stream shard's `in`/`kept` are the distinct documents that first appear in it; the
    excluded documents (held out, unused) are counted on the last stream shard. Repeats show in the
    stats (`stream_documents`, `stream_tokens`, `domain_tokens`). `counts_by_source` is per source.
    """
    section: MixConfig = cfg.mix
    decisions = read_json(shard_work_file(run.path, MIX_SHARD, "decisions.json"))
    shard_index, offsets, tokens = np.load(shard_work_file(run.path, MIX_SHARD, "catalogue.npy")).tolist()
    stream = np.load(shard_work_file(run.path, MIX_SHARD, "stream.npy")).tolist()
    is_domain = decisions["is_domain"]
    role_of = lambda i: "domain" if is_domain[i] else "general"  # noqa: E731
    reader = _UpstreamReader(Path(run.upstream_directory), decisions["upstream_shards"])
    try:
        for role in ROLES:
            with JsonlWriter(run.path / "eval" / f"{EVAL_SETS[role]}.jsonl") as writer:
                for i in decisions["held_out"][role]:
                    writer.write(dict(reader.read(shard_index[i], offsets[i]), role=role, tokens=tokens[i]))
        with JsonlWriter(run.path / "excluded" / f"{MIX_SHARD}.jsonl") as writer:
            for i in decisions["unused"]:
                writer.write(
                    dict(
                        reader.read(shard_index[i], offsets[i]), role=role_of(i), tokens=tokens[i], reason=REASON_UNUSED
                    )
                )
        final: list[ShardCounts] = []
        stream_shards = []
        seen: set[int] = set()
        for number, begin in enumerate(range(0, len(stream), section.documents_per_shard)):
            rows = stream[begin : begin + section.documents_per_shard]
            counts = ShardCounts(shard=stream_shard_name(number), source="mix")
            with JsonlWriter(run.path / "shards" / f"{counts.shard}.jsonl") as writer:
                for i, epoch in rows:
                    writer.write(
                        dict(reader.read(shard_index[i], offsets[i]), role=role_of(i), epoch=epoch, tokens=tokens[i])
                    )
                    if i not in seen:
                        seen.add(i)
                        counts.kept += 1
                    counts.stats["stream_documents"] += 1
                    counts.stats["stream_tokens"] += tokens[i]
                    counts.stats["domain_tokens"] += tokens[i] if is_domain[i] else 0
            counts.documents_in = counts.kept
            final.append(counts)
            stream_shards.append(
                {"shard": counts.shard, "documents": len(rows), "tokens": counts.stats["stream_tokens"]}
            )
    finally:
        reader.close()

    final[-1].excluded.update(decisions["excluded"])
    final[-1].documents_in += sum(decisions["excluded"].values())
    # The work item's time, shared out over the stream shards by rows (for the docs/s figures).
    seconds = sum(c.seconds for c in shard_counts)
    for counts in final:
        counts.seconds = seconds * counts.stats["stream_documents"] / len(stream)
    published = (sum(c.documents_in for c in final), len(seen))
    decided = (sum(c.documents_in for c in shard_counts), sum(c.kept for c in shard_counts))
    if published != decided:
        raise AssertionError(f"mix: published (in, kept) {published} differ from the decided {decided}")
    return commit_data_stage(
        run, final, started, extra=dict(decisions["report"], stream_shards=stream_shards, tokenizer=cfg.base_model)
    )


def stream_shard_paths(mix_directory: Path) -> list[Path]:
    """The committed training stream's shards, in stream order."""
    manifest = read_json(Path(mix_directory) / "manifest.json")
    return [Path(mix_directory) / "shards" / f"{s['shard']}.jsonl" for s in manifest["shards"]]
