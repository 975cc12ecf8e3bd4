"""Which stages exist, what each one's fingerprint is, and whether its committed result is current.

A fingerprint hashes the stage name, its code version, its canonical config, its upstream
fingerprints and (for clean) its input files; it names the stage's directory in the store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from cptflow import __version__
from cptflow.config import PipelineConfig
from cptflow.docshards import ShardCounts, counts_by_source, total_counts
from cptflow.store import STAGES, commit_manifest, fingerprint, now_iso, other_done_fingerprints, read_manifest, stage_dir

# The stages this version of the pipeline runs, in DAG order (later issues extend it).
PIPELINE_STAGES = ("clean", "quality", "perplexity", "mix", "tokenize", "cpt", "sft", "evaluate")
DATA_STAGES = ("clean", "quality", "perplexity", "mix", "tokenize")  # sharded: plan / process / commit
TRAINING_STAGES = ("cpt", "sft", "evaluate")  # one job each: run()
UPSTREAM = {"quality": "clean", "perplexity": "quality", "mix": "perplexity", "tokenize": "mix", "cpt": "tokenize", "sft": "cpt", "evaluate": "sft"}


def stage_module(stage: str):
    """The module in tasks/ that does a stage's work: plan(), process() and commit(), or run()."""
    from cptflow.tasks import clean, cpt, evaluate, mix, perplexity, quality, sft, tokenize

    modules = {"clean": clean, "quality": quality, "perplexity": perplexity, "mix": mix, "tokenize": tokenize}
    modules.update({"cpt": cpt, "sft": sft, "evaluate": evaluate})
    return modules[stage]


def stage_versions() -> dict[str, int]:
    return {stage: stage_module(stage).STAGE_VERSION for stage in PIPELINE_STAGES}


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


def stage_payloads(cfg: PipelineConfig) -> dict[str, dict]:
    """What each stage's fingerprint covers (without upstream fingerprints, added in plan_pipeline)."""
    from cptflow.models import model_fingerprint
    from cptflow.tasks.clean import input_file_fingerprints
    from cptflow.tasks.sft import sft_data_fingerprints

    versions = stage_versions()
    base = Path(cfg.base_dir)
    return {
        "clean": {
            "config": cfg.clean.model_dump(mode="json"),
            "sources": [s.model_dump(mode="json") for s in cfg.sources],
            "inputs": {s.name: input_file_fingerprints(s, base, cfg.input_fingerprint) for s in cfg.sources},
            "version": versions["clean"],
        },
        "quality": {"config": cfg.quality.model_dump(mode="json"), "version": versions["quality"]},
        "perplexity": {
            "config": cfg.perplexity.model_dump(mode="json"),
            "model": model_fingerprint(cfg.perplexity.model or cfg.base_model),
            "version": versions["perplexity"],
        },
        # The held-out sets and the stream order depend on the seed; token counts on the tokenizer.
        "mix": {
            "config": cfg.mix.model_dump(mode="json"),
            "tokenizer": model_fingerprint(cfg.base_model),
            "roles": {s.name: s.role for s in cfg.sources},
            "seed": cfg.seed,
            "version": versions["mix"],
        },
        "tokenize": {
            "config": cfg.tokenize.model_dump(mode="json"),
            "tokenizer": model_fingerprint(cfg.base_model),
            "seed": cfg.seed,
            "version": versions["tokenize"],
        },
        # Training: the weights depend on the base model, the seed and (sft) the instruction files.
        "cpt": {
            "config": cfg.cpt.model_dump(mode="json", exclude={"retries"}),
            "model": model_fingerprint(cfg.base_model),
            "init_adapter": model_fingerprint(str(cfg.resolve(cfg.cpt.init_adapter))) if cfg.cpt.init_adapter else None,
            "processes": cfg.launch.num_processes,  # data order per rank and reduction order differ with it
            "seed": cfg.seed,
            "version": versions["cpt"],
        },
        "sft": {
            "config": cfg.sft.model_dump(mode="json", exclude={"retries"}),
            "data": sft_data_fingerprints(cfg),
            "processes": cfg.launch.num_processes,
            "seed": cfg.seed,
            "version": versions["sft"],
        },
        "evaluate": {"config": cfg.evaluate.model_dump(mode="json"), "seed": cfg.seed, "version": versions["evaluate"]},
    }


def plan_pipeline(cfg: PipelineConfig) -> dict[str, StageRun]:
    payloads = stage_payloads(cfg)
    runs: dict[str, StageRun] = {}
    for stage in PIPELINE_STAGES:
        upstream = UPSTREAM.get(stage)
        payload = dict(payloads[stage], stage=stage, cptflow_stage_api=1)
        if upstream:
            payload["upstream"] = {upstream: runs[upstream].fingerprint}
        stage_fingerprint = fingerprint(payload)
        runs[stage] = StageRun(
            stage=stage,
            fingerprint=stage_fingerprint,
            directory=str(stage_dir(cfg.work_path, stage, stage_fingerprint)),
            upstream_directory=runs[upstream].directory if upstream else None,
            payload=payload,
        )
    directories = {stage: run.directory for stage, run in runs.items()}
    for run in runs.values():
        run.stage_directories.update(directories)
    return runs


def stage_status(cfg: PipelineConfig) -> list[dict]:
    """Per stage: fingerprint, done/stale/missing, manifest path, counts and duration."""
    rows = []
    for stage, run in plan_pipeline(cfg).items():
        manifest = read_manifest(run.path)
        if manifest is not None:
            state = "done"
        elif other_done_fingerprints(cfg.work_path, stage, run.fingerprint):
            state = "stale"  # an older config or input finished; this one has not
        else:
            state = "missing"
        rows.append(
            {
                "stage": stage,
                "fingerprint": run.fingerprint,
                "state": state,
                "manifest": str(run.path / "manifest.json") if manifest is not None else None,
                "counts": manifest.get("counts") if manifest else None,
                "seconds": manifest["timings"]["seconds"] if manifest else None,
            }
        )
    return rows


def commit_data_stage(run: StageRun, shard_counts: list[ShardCounts], started: float, extra: dict | None = None) -> dict:
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
    return commit_manifest(run.path, manifest)


def upstream_shard_path(run: StageRun, shard: str) -> Path:
    """The committed document shard `shard` of the stage before `run`."""
    return Path(run.upstream_directory) / "shards" / f"{shard}.jsonl"


def upstream_shards(run: StageRun) -> list[dict]:
    """The shards the upstream stage committed (name and source), in order."""
    manifest = read_manifest(Path(run.upstream_directory))
    if manifest is None:
        raise RuntimeError(f"{run.stage}: upstream output {run.upstream_directory} is not committed (run the upstream stage first)")
    return [{"shard": s["shard"], "source": s["source"]} for s in manifest["shards"]]


def run_data_stage_plain(run: StageRun, cfg: PipelineConfig, force: bool = False) -> str:
    """A data stage without Prefect, shard after shard: the reference the flow must agree with.

    Returns "cached" if the stage was already committed, else "ran".
    """
    from cptflow.store import reset_stage_dir, stage_lock

    with stage_lock(run.path):
        if force:
            reset_stage_dir(run.path)
        if run.is_done():
            return "cached"
        module = stage_module(run.stage)
        started = time.time()
        counts = [module.process(run, cfg, item) for item in module.plan(run, cfg)]
        module.commit(run, cfg, counts, started)
        return "ran"


assert set(PIPELINE_STAGES) <= set(STAGES)
