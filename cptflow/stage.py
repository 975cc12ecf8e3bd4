"""What every stage is handed and the helpers every data stage shares: its StageRun, how it reads the
shards its upstream committed, and how it commits its own manifest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cptflow import __version__
from cptflow.docshards import ShardCounts, counts_by_source, finalize_shard, shard_work_file, total_counts
from cptflow.store import WORK, atomic_write_json, commit_manifest, file_entry, now_iso, read_json, read_manifest


@dataclass(frozen=True)
class StageRun:
    """Everything a worker needs to find a stage's inputs and outputs (small, picklable)."""

    stage: str
    fingerprint: str
    directory: str
    upstream_directory: str | None
    payload: dict = field(compare=False, hash=False, repr=False)
    # Every stage's directory in this plan: training stages also read mix's eval sets, evaluate reads cpt's adapter.
    stage_directories: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def path(self) -> Path:
        return Path(self.directory)

    def is_done(self) -> bool:
        return read_manifest(self.path) is not None


def commit_data_stage(
    run: StageRun,
    shard_counts: list[ShardCounts],
    started: float,
    extra: dict | None = None,
    known_outputs: dict[str, dict] | None = None,
) -> dict:
    """Write the manifest of a data stage: config, inputs, counts (total, per source, per shard), timings."""
    for counts in shard_counts:
        if not counts.balanced():
            raise AssertionError(f"{run.stage}: shard {counts.shard} does not balance: {counts.as_dict()}")
    totals = total_counts(shard_counts)
    shard_seconds = sum(c.seconds for c in shard_counts)
    finished = time.time()
    stats: dict[str, int] = {}
    for counts in shard_counts:
        for key, value in counts.stats.items():
            stats[key] = stats.get(key, 0) + value
    manifest = {
        "stage": run.stage,
        "fingerprint": run.fingerprint,
        "cptflow_version": __version__,
        "payload": run.payload,
        "counts": totals,
        "counts_by_source": counts_by_source(shard_counts),
        "shards": [c.as_dict() for c in shard_counts],
        "stats": dict(sorted(stats.items())),
        "timings": {
            "finished": now_iso(),
            "seconds": round(finished - started, 3),
            "shard_seconds": round(shard_seconds, 3),
            "docs_per_s_per_worker": round(totals["in"] / shard_seconds, 1) if shard_seconds else None,
        },
    }
    manifest.update(extra or {})
    return commit_manifest(run.path, manifest, known_outputs)


# ---------------------------------------------------------------------------------------------
# Commits decide, workers write: a stage-wide decision (which documents to drop) is made once from
# per-shard summaries and kept in `_work/`; publishing each shard (dropping the decided documents,
# hashing the outputs) is one `finalize` item per shard, mapped over the runner like the shards.
# ---------------------------------------------------------------------------------------------
FINALIZE = "finalize"


def _decision_path(run: StageRun) -> Path:
    return run.path / WORK / "decision.json"


def plan_finalize(
    run: StageRun, shard_counts: list[ShardCounts], decide: Callable[[], tuple[dict, dict]]
) -> list[dict]:
    """One finalize item per shard. `decide()` -> ({shard: {kept-line index: reason}}, manifest extras) runs
    once: its drops go to `_work/<shard>.drops.json`, its extras to `_work/decision.json`, written last."""
    if not _decision_path(run).is_file():
        drops, extra = decide()
        for counts in shard_counts:
            decided = {str(index): reason for index, reason in sorted(drops.get(counts.shard, {}).items())}
            atomic_write_json(shard_work_file(run.path, counts.shard, "drops.json"), decided)
        atomic_write_json(_decision_path(run), extra)
    return [{"step": FINALIZE, "name": c.shard, "counts": c.as_dict()} for c in shard_counts]


def finalize_item(run: StageRun, item: dict) -> dict:
    """Publish one shard without its decided drops; returns (and keeps in `_work/`) its final counts and
    the entries of the files it wrote. A shard finished before a kill is not written again."""
    shard = item["name"]
    record_path = shard_work_file(run.path, shard, "final.json")
    if record_path.is_file():
        return read_json(record_path)
    drops = {int(index): reason for index, reason in read_json(shard_work_file(run.path, shard, "drops.json")).items()}
    final = finalize_shard(run.path, ShardCounts.from_dict(item["counts"]), drops)
    written = [run.path / kind / f"{shard}.jsonl" for kind in ("shards", "excluded", "rejected")]
    record = {"counts": final.as_dict(), "outputs": [file_entry(p, run.path) for p in written if p.is_file()]}
    atomic_write_json(record_path, record)
    return record


def commit_finalized(run: StageRun, shard_counts: list[ShardCounts], started: float) -> dict:
    """The manifest of a stage whose shards went through finalize (any not yet published is published here,
    as when the stage runs without a runner: plan.run_data_stage_plain)."""
    items = [{"step": FINALIZE, "name": c.shard, "counts": c.as_dict()} for c in shard_counts]
    records = [finalize_item(run, item) for item in items]
    known = {entry["path"]: entry for record in records for entry in record["outputs"]}
    final = [ShardCounts.from_dict(record["counts"]) for record in records]
    return commit_data_stage(run, final, started, read_json(_decision_path(run)), known_outputs=known)


def upstream_shard_path(run: StageRun, shard: str) -> Path:
    """The committed document shard `shard` of the stage before `run`."""
    return Path(run.upstream_directory) / "shards" / f"{shard}.jsonl"


def upstream_shards(run: StageRun) -> list[dict]:
    """The shards the upstream stage committed (name and source), in order."""
    manifest = read_manifest(Path(run.upstream_directory))
    if manifest is None:
        raise RuntimeError(
            f"{run.stage}: upstream output {run.upstream_directory} is not committed (run the upstream stage first)"
        )
    return [{"shard": s["shard"], "source": s["source"]} for s in manifest["shards"]]


@dataclass(frozen=True)
class Artifact:
    """An artifact a stage shows in the Prefect UI once it has committed, as plain data: a stage module
    says what to show, flows/ publishes it (Prefect is imported nowhere else). Keys: lowercase, dashes."""

    key: str
    description: str
    table: list[dict] | None = None
    markdown: str | None = None
    link: str | None = None
    link_text: str | None = None


def counts_table(manifest: dict) -> list[dict]:
    """A data stage's documents in, kept and dropped per reason (total and per source), and throughput."""
    by_source = manifest["counts_by_source"]
    sources = sorted(by_source)

    def row(measure: str, pick) -> dict:
        values = {"measure": measure, "total": pick(manifest["counts"])}
        values.update({name: pick(by_source[name]) for name in sources})
        return values

    rows = [row("documents in", lambda c: c["in"]), row("kept", lambda c: c["kept"])]
    for kind in ("excluded", "rejected"):
        reasons = sorted({r for c in [manifest["counts"], *by_source.values()] for r in c[kind]})
        rows += [row(f"{kind}: {reason}", lambda c, k=kind, r=reason: c[k].get(r, 0)) for reason in reasons]
    timing = manifest["timings"]
    rows.append({"measure": "docs/s per worker", "total": timing["docs_per_s_per_worker"]})
    rows.append({"measure": "seconds (wall)", "total": timing["seconds"]})
    return rows


def counts_artifact(manifest: dict) -> Artifact:
    """The `<stage>-counts` table every data stage publishes."""
    stage = manifest["stage"]
    description = f"{stage} ({manifest['fingerprint']}): documents in, kept, dropped per reason, throughput"
    return Artifact(key=f"{stage}-counts", description=description, table=counts_table(manifest))
