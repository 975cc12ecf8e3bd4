"""Document shards between data stages: JSON lines, written atomically, plus the per-shard accounting.

Every data stage reads `shards/<name>.jsonl` of its upstream and writes kept, excluded and rejected
documents of the same shard name, so `in = kept + excluded + rejected` can be checked shard by shard.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from cptflow.store import WORK, atomic_write_json, read_json


def dumps_document(doc: dict) -> str:
    # sort_keys + no ASCII escaping: byte-identical output for identical documents, readable text.
    return json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


class JsonlWriter:
    """Writes JSON lines to a temporary file; `close()` renames it into place, `abort()` discards it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.handle = open(self.tmp, "w", encoding="utf-8")
        self.count = 0

    def write(self, record: dict) -> None:
        self.handle.write(dumps_document(record))
        self.handle.write("\n")
        self.count += 1

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort() if exc_type else self.close()


def read_documents(path: Path) -> Iterator[dict]:
    """Documents of a shard written by a stage (trusted: written by us, so any error is a bug)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


@dataclass
class ShardCounts:
    """What happened to the documents of one shard in one stage."""

    shard: str
    source: str
    documents_in: int = 0
    kept: int = 0
    excluded: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    stats: Counter = field(default_factory=Counter)  # stage-specific tallies, e.g. PII replacements
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "shard": self.shard,
            "source": self.source,
            "in": self.documents_in,
            "kept": self.kept,
            "excluded": dict(sorted(self.excluded.items())),
            "rejected": dict(sorted(self.rejected.items())),
            "stats": dict(sorted(self.stats.items())),
            "seconds": round(self.seconds, 4),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ShardCounts":
        return cls(
            shard=data["shard"],
            source=data["source"],
            documents_in=data["in"],
            kept=data["kept"],
            excluded=Counter(data["excluded"]),
            rejected=Counter(data["rejected"]),
            stats=Counter(data["stats"]),
            seconds=data["seconds"],
        )

    def balanced(self) -> bool:
        return self.documents_in == self.kept + sum(self.excluded.values()) + sum(self.rejected.values())


def total_counts(shards: list[ShardCounts]) -> dict:
    """The manifest's `counts`: {"in", "kept", "excluded": {reason: n}, "rejected": {reason: n}}."""
    excluded: Counter = Counter()
    rejected: Counter = Counter()
    for shard in shards:
        excluded.update(shard.excluded)
        rejected.update(shard.rejected)
    return {
        "in": sum(s.documents_in for s in shards),
        "kept": sum(s.kept for s in shards),
        "excluded": dict(sorted(excluded.items())),
        "rejected": dict(sorted(rejected.items())),
    }


def counts_by_source(shards: list[ShardCounts]) -> dict:
    sources = sorted({s.source for s in shards})
    return {name: total_counts([s for s in shards if s.source == name]) for name in sources}


# Per-shard completion markers: a finished shard is never redone after a kill.
def shard_marker(stage_directory: Path, shard: str) -> Path:
    return Path(stage_directory) / WORK / f"{shard}.done.json"


def shard_work_file(stage_directory: Path, shard: str, suffix: str) -> Path:
    return Path(stage_directory) / WORK / f"{shard}.{suffix}"


def load_finished_shard(stage_directory: Path, shard: str) -> ShardCounts | None:
    marker = shard_marker(stage_directory, shard)
    return ShardCounts.from_dict(read_json(marker)) if marker.is_file() else None


def mark_shard_finished(stage_directory: Path, counts: ShardCounts) -> None:
    if not counts.balanced():  # the accounting invariant, checked where the counts are made
        raise AssertionError(f"shard {counts.shard}: documents not accounted for: {counts.as_dict()}")
    atomic_write_json(shard_marker(stage_directory, counts.shard), counts.as_dict())


def finalize_shard(stage_directory: Path, counts: ShardCounts, drops: dict[int, str]) -> ShardCounts:
    """Publish a shard: kept documents minus the stage-wide `drops` (kept-line index → reason).

    Writes `shards/`, `excluded/` (the shard's own exclusions, then the stage-wide ones) and
    `rejected/`, each atomically; rerunning it after a kill rewrites the same bytes.
    """
    directory = Path(stage_directory)
    counts = ShardCounts.from_dict(counts.as_dict())
    with (
        JsonlWriter(directory / "shards" / f"{counts.shard}.jsonl") as kept,
        JsonlWriter(directory / "excluded" / f"{counts.shard}.jsonl") as excluded,
    ):
        with open(shard_work_file(directory, counts.shard, "excluded.jsonl"), encoding="utf-8") as handle:
            for line in handle:
                excluded.handle.write(line)
        with open(shard_work_file(directory, counts.shard, "kept.jsonl"), encoding="utf-8") as handle:
            for index, line in enumerate(handle):
                reason = drops.get(index)
                if reason is None:  # the line as the stage wrote it (dumps_document): no parse, same bytes
                    kept.handle.write(line)
                    kept.count += 1
                else:
                    excluded.write(dict(json.loads(line), reason=reason))
                    counts.kept -= 1
                    counts.excluded[reason] += 1
    rejected_work = shard_work_file(directory, counts.shard, "rejected.jsonl")
    if rejected_work.is_file():
        with (
            JsonlWriter(directory / "rejected" / f"{counts.shard}.jsonl") as rejected,
            open(rejected_work, encoding="utf-8") as handle,
        ):
            for line in handle:
                rejected.handle.write(line)
    if not counts.balanced():
        raise AssertionError(f"shard {counts.shard}: documents not accounted for after commit: {counts.as_dict()}")
    return counts
