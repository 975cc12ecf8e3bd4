"""Which stages exist, what each one's fingerprint is, and whether its committed result is current.

A fingerprint hashes the stage name, its code version, its canonical config, its upstream
fingerprints and (for clean) its input files; it names the stage's directory in the store.
"""

from __future__ import annotations

import time

from cptflow.config import PipelineConfig
from cptflow.gates import verdict_line
from cptflow.stage import StageRun
from cptflow.store import fingerprint, other_done_fingerprints, read_manifest, reset_stage_dir, stage_dir, stage_lock
from cptflow.tasks import clean, cpt, evaluate, mix, perplexity, quality, sft, tokenize

# The pipeline, in DAG order: each stage module declares NAME, UPSTREAM, STAGE_VERSION, Config,
# fingerprint_inputs(cfg) and artifacts(manifest, directory), and does its work with plan / process /
# commit (a data stage, sharded over the runner; optionally REDUCE_ROUNDS and reduce: rounds of steps
# after the shards, such as publishing each shard, mapped over the runner before the commit) or run
# (a training stage, one job). A new stage is one module, one line here and its typed section in
# PipelineConfig (tests/test_layers.py checks the three agree).
STAGE_MODULES = (clean, quality, perplexity, mix, tokenize, cpt, sft, evaluate)

PIPELINE_STAGES = tuple(module.NAME for module in STAGE_MODULES)
DATA_STAGES = tuple(m.NAME for m in STAGE_MODULES if hasattr(m, "process"))  # sharded: plan / process / commit
TRAINING_STAGES = tuple(m.NAME for m in STAGE_MODULES if hasattr(m, "run"))  # one job each: run()
UPSTREAM = {m.NAME: m.UPSTREAM for m in STAGE_MODULES if m.UPSTREAM}
_MODULES = {module.NAME: module for module in STAGE_MODULES}


def stage_module(stage: str):
    """The module in tasks/ that does a stage's work: plan(), process() and commit(), or run()."""
    return _MODULES[stage]


def stage_versions() -> dict[str, int]:
    return {module.NAME: module.STAGE_VERSION for module in STAGE_MODULES}


def stage_payloads(cfg: PipelineConfig) -> dict[str, dict]:
    """What each stage's fingerprint covers (without upstream fingerprints, added in plan_pipeline)."""
    return {module.NAME: module.fingerprint_inputs(cfg) for module in STAGE_MODULES}


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
                "gates": verdict_line(gate_summary(stage, manifest, cfg)) if manifest else "",
            }
        )
    return rows


def gate_summary(stage: str, manifest: dict, cfg: PipelineConfig) -> dict | None:
    """A committed stage's gate verdicts: evaluate's judged under the config as it is now (its limits are
    not in the fingerprint), a training stage's as recorded while it trained."""
    module = stage_module(stage)
    if hasattr(module, "gate_verdict"):
        return module.gate_verdict(manifest, cfg)
    return manifest.get("gates")


def run_data_stage_plain(run: StageRun, cfg: PipelineConfig, force: bool = False) -> str:
    """A data stage without Prefect, shard after shard: the reference the flow must agree with.

    Returns "cached" if the stage was already committed, else "ran".
    """
    with stage_lock(run.path):
        if force:
            reset_stage_dir(run.path)
        if run.is_done():
            return "cached"
        module = stage_module(run.stage)
        started = time.time()
        counts = [module.process(run, cfg, item) for item in module.plan(run, cfg)]
        for plan_round in getattr(module, "REDUCE_ROUNDS", ()):
            for item in plan_round(run, cfg, counts):
                module.reduce(run, cfg, item)
        module.commit(run, cfg, counts, started)
        return "ran"


class StageSelectionError(ValueError):
    pass


def select_stages(
    only: list[str] | None, from_stage: str | None, force: list[str] | None
) -> tuple[list[str], set[str]]:
    """(stages to execute, stages to recompute even if done) from --only/--from/--force."""
    for name in [*(only or []), *([from_stage] if from_stage else []), *(force or [])]:
        if name not in PIPELINE_STAGES:
            raise StageSelectionError(f"unknown stage '{name}' (this pipeline runs: {', '.join(PIPELINE_STAGES)})")
    selected = list(PIPELINE_STAGES)
    forced = set(force or [])
    if from_stage:
        selected = selected[selected.index(from_stage) :]
        forced |= set(selected)
    if only:
        selected = [s for s in selected if s in only]
    return selected, forced
