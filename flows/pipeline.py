"""The cptflow DAG as one Prefect flow: clean → quality → perplexity → mix → tokenize → cpt → sft → evaluate.

Stages pass small records (paths, fingerprints, counts). Each data stage is a subflow that maps its
shards over the configured task runner (then its steps over all shards, such as quality's LSH bands),
then commits with a task cached by the stage fingerprint.
Each training stage is one task, cached the same way; a retry resumes from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import prefect.runtime
from prefect import flow, tags, task, unmapped
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from cptflow.config import PipelineConfig, RunnerConfig, load_config
from cptflow.docshards import ShardCounts
from cptflow.flows.crashes import (
    describe_holders,
    ensure_crash_automation,
    report_crashed_runs,
    slot_holders,
    slot_lease_seconds,
)
from cptflow.flows.failure import (
    failed_stage,
    publish_failure,
    quiet_worker_console,
    shard_results,
    warn_if_low_space,
)
from cptflow.gates import GateBreach, enforce
from cptflow.plan import (
    DATA_STAGES,
    PIPELINE_STAGES,
    UPSTREAM,
    StageRun,
    StageSelectionError,
    gate_summary,
    plan_pipeline,
    select_stages,
    stage_module,
)
from cptflow.store import read_manifest, reset_stage_dir, stage_lock
from cptflow.training import TrainingReporter
from cptflow.training_process import is_deterministic, launch_stage


class LocalDaskCluster:
    """One local Dask cluster for a whole pipeline run, started when the first data stage needs it: its
    workers import cptflow once, not once per stage (`runner: {kind: dask}` without an address)."""

    def __init__(self, runner: RunnerConfig):
        self.runner, self.cluster = runner, None

    def address(self) -> str:
        if self.cluster is None:
            from distributed import LocalCluster

            self.cluster = LocalCluster(
                n_workers=self.runner.dask_workers, threads_per_worker=1, processes=True, dashboard_address=None
            )
        return self.cluster.scheduler_address

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None


def make_task_runner(runner: RunnerConfig, dask_cluster: LocalDaskCluster | None = None):
    if runner.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=runner.max_workers)
    if runner.kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        # The initializer keeps a worker's Prefect tracebacks off the terminal under `cptflow run`.
        return ProcessPoolTaskRunner(max_workers=runner.max_workers, initializer=quiet_worker_console)
    if runner.kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ImportError("runner.kind 'ray' needs prefect-ray and ray: pip install 'cptflow[ray]'") from None
        # No address: a local Ray instance for the stage, sized like the other runners.
        local = {"num_cpus": runner.max_workers} if runner.max_workers and not runner.ray_address else None
        return RayTaskRunner(address=runner.ray_address, init_kwargs=local)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ImportError("runner.kind 'dask' needs prefect-dask: pip install 'cptflow[dask]'") from None
    if runner.dask_address:
        return DaskTaskRunner(address=runner.dask_address)
    if dask_cluster is not None:
        return DaskTaskRunner(address=dask_cluster.address())
    return DaskTaskRunner(cluster_kwargs={"n_workers": runner.dask_workers, "threads_per_worker": 1, "processes": True})


def _stage_report(run: StageRun, state: str) -> dict:
    manifest = read_manifest(run.path) or {}
    return {
        "stage": run.stage,
        "state": state,
        "fingerprint": run.fingerprint,
        "directory": run.directory,
        "counts": manifest.get("counts"),
        "seconds": (manifest.get("timings") or {}).get("seconds"),
        "result": training_summary(manifest),
    }


def training_summary(manifest: dict) -> str | None:
    """One line for a training stage's result: held-out perplexities, or the forgetting table's gist."""
    if "perplexity" in manifest:
        p = manifest["perplexity"]
        return " · ".join(
            f"{m}: domain {p[m]['domain']:.2f} general {p[m]['general']:.2f}" for m in ("base", "cpt", "sft")
        )
    if "eval" in manifest and "train" in manifest:
        evals = ", ".join(f"{name} ppl {values['perplexity']:.2f}" for name, values in manifest["eval"].items())
        return f"{manifest['train']['steps']} steps, {manifest['train']['tokens']} tokens; {evals}"
    return None


@task(name="shard", cache_policy=NO_CACHE, persist_result=False, task_run_name="{stage}-{shard_name}")
def process_shard(stage: str, shard_name: str, item: dict, run: StageRun, cfg: PipelineConfig) -> ShardCounts:
    """One shard of a data stage; a shard finished before a kill returns its recorded counts at once."""
    return stage_module(stage).process(run, cfg, item)


@task(name="reduce", cache_policy=NO_CACHE, persist_result=False, task_run_name="{stage}-{item_name}")
def reduce_step(stage: str, item_name: str, item: dict, run: StageRun, cfg: PipelineConfig) -> dict:
    """One step after the shards of a data stage (an LSH band, publishing a shard); one finished before a
    kill is not redone."""
    return stage_module(stage).reduce(run, cfg, item)


def _stage_cache_key(context, parameters) -> str:
    run: StageRun = parameters["run"]
    return f"cptflow-{run.stage}-{run.fingerprint}"  # no RUN_ID: a new flow run hits the cache too


@task(name="commit-stage", cache_key_fn=_stage_cache_key, persist_result=True, task_run_name="{stage}")
def commit_stage(
    stage: str, run: StageRun, cfg: PipelineConfig, shard_counts: list[ShardCounts] | None, started: float
) -> dict:
    """Global decisions (duplicates, percentile bands), final shards, manifest."""
    if run.is_done():  # the Prefect cache was lost but the store has the result: no work
        return {"stage": stage, "fingerprint": run.fingerprint, "state": "cached"}
    stage_module(stage).commit(run, cfg, shard_counts, started)
    # Its artifacts are published by the pipeline run (run_stage), so that they sit on the run page.
    # Small and independent of the work directory: the cache key is the fingerprint alone.
    return {"stage": stage, "fingerprint": run.fingerprint, "state": "ran"}


def handoff(report: dict) -> dict:
    """What a stage returns to the pipeline flow, which passes it to the next stage as `upstream`.

    Prefect links a returned value and its direct members to the run that returned it, and draws an
    edge wherever a linked object turns up in another run's inputs. The report sits one level down,
    so the strings it shares with other stages' inputs (stage names, fingerprints, "ran") draw none.
    """
    return {"report": report}


@flow(name="data-stage", flow_run_name="{stage}", log_prints=True)
def data_stage(
    stage: str, run: StageRun, cfg: PipelineConfig, force: bool = False, upstream: dict | None = None
) -> dict:
    """Map a data stage's shards over the configured task runner, then commit it.

    `upstream` is the previous stage's result: unused here (the store holds the data), but passing it
    is what makes Prefect draw the edge between the two stages in the run graph.
    """
    logger = get_run_logger()
    # One run at a time does a stage's work; a second one waits here, then finds it committed.
    with stage_lock(run.path):
        if force:
            reset_stage_dir(run.path)
        done = run.is_done()
        shard_counts, started = None, time.time()
        if not done:
            items = stage_module(stage).plan(run, cfg)
            names = [item["shard"] for item in items]
            logger.info("%s: %d shards → %s", stage, len(items), run.directory)
            futures = process_shard.map(
                stage=unmapped(stage), shard_name=names, item=items, run=unmapped(run), cfg=unmapped(cfg)
            )
            shard_counts = shard_results(stage, futures)  # a dead worker: WorkerKilled, with its signal
            # Rounds of steps after the shards (quality's LSH bands, then publishing each shard), each step
            # a task on the runner; the commit finds their results in the stage's `_work/`.
            for plan_round in getattr(stage_module(stage), "REDUCE_ROUNDS", ()):
                items = plan_round(run, cfg, shard_counts)
                names = [item["name"] for item in items]
                reduced = reduce_step.map(
                    stage=unmapped(stage), item_name=names, item=items, run=unmapped(run), cfg=unmapped(cfg)
                )
                shard_results(stage, reduced)
        # The store is the truth: a stage not committed there is recomputed even if Prefect has a record.
        state = commit_stage.with_options(refresh_cache=not done)(
            stage, run, cfg, shard_counts, started, return_state=True
        )
    ran = state.result()["state"] == "ran" and state.name != "Cached"
    report = _stage_report(run, "ran" if ran else "cached")
    logger.info("%s: %s (%s)", stage, report["state"], run.fingerprint)
    return handoff(report)


SPARK_HISTORY = 400  # loss values a progress bar remembers (bounded, whatever the number of steps)
SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """The loss curve in one line of block characters: `width` buckets (means), scaled min → max."""
    if not values:
        return ""
    size = max(1, -(-len(values) // width))
    means = [sum(chunk) / len(chunk) for chunk in (values[i : i + size] for i in range(0, len(values), size))]
    low, high = min(means), max(means)
    span = (high - low) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - low) / span * len(SPARKS)))] for v in means)


def lora_summary(targets: dict | None) -> str:
    """'LoRA on 7 layers per block (q_proj, ...) x 2 blocks', and the linear layers left without."""
    if not targets:
        return "LoRA continued from the upstream adapter"
    per_block = targets["per_block"]
    line = f"LoRA on {sum(per_block.values())} layers per block ({', '.join(per_block)}) x {targets['blocks']} blocks"
    return line + (f"; not wrapped: {', '.join(targets['not_wrapped'])}" if targets["not_wrapped"] else "")


class PrefectTrainingReporter(TrainingReporter):
    """Training progress in the UI: a progress bar updated in place (step, loss, LR per group, tokens/s),
    the optimizer's parameter groups, and every log line in the run log."""

    def __init__(self, stage: str):
        self.stage = stage
        self.progress_id = None
        self.losses: list[float] = []  # the last SPARK_HISTORY losses, for the progress bar's curve
        self.logger = get_run_logger()

    def on_start(self, info: dict) -> None:
        self.total_steps = info["total_steps"]
        self.progress_id = create_progress_artifact(
            0.0, key=f"{self.stage}-progress", description=f"{self.stage}: starting"
        )
        create_table_artifact(
            key=f"{self.stage}-param-groups",
            table=info["param_groups"],
            description=f"{self.stage}: optimizer parameter groups; {lora_summary(info.get('lora_targets'))}",
        )
        self.logger.info("%s: %d steps; param groups %s", self.stage, info["total_steps"], info["param_groups"])

    def on_log(self, record: dict) -> None:
        self.losses = [*self.losses, record["loss"]][-SPARK_HISTORY:]
        lrs = " ".join(f"{group}={lr:.3g}" for group, lr in record["lr"].items())
        line = (
            f"step {record['step']}/{record['total_steps']} loss {record['loss']:.4f} lr {lrs} "
            f"tokens/s {record['tokens_per_s']:.0f}"
        )
        self.logger.info("%s: %s", self.stage, line)
        if self.progress_id is not None:
            update_progress_artifact(
                self.progress_id,
                100.0 * record["step"] / record["total_steps"],
                description=f"{self.stage}: {line} · loss {sparkline(self.losses)}",
            )

    # The eval table and the best checkpoint are published once, when the stage commits
    # (publish_artifacts): one new artifact version per eval would crowd the run graph.
    def on_eval(self, step: int, results: dict) -> None:
        self.logger.info("%s: eval at step %d: %s", self.stage, step, results)

    def on_checkpoint(self, path: Path, best: Path | None) -> None:
        self.logger.info("%s: checkpoint %s (best so far: %s)", self.stage, path, best)


def ensure_concurrency_limit(name: str, limit: int) -> None:
    """Create the global concurrency limit `name` with `limit` slots unless it exists (the UI can change it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            except ObjectAlreadyExists:  # another run created it first
                pass


@contextlib.contextmanager
def local_slot(name: str, limit: int, on_wait, directory: Path | None = None) -> None:
    """One of `limit` slots named `name` on this machine: a flock on one of `limit` files (under
    PREFECT_HOME), tried in turn until one is free. Dies with its holder, whatever kills it."""
    from prefect.settings import PREFECT_HOME

    directory = Path(directory or Path(PREFECT_HOME.value()) / "cptflow-slots")
    directory.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for index in range(limit):
            handle = open(directory / f"{name}-{index}.lock", "a+b")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield
            finally:
                handle.close()  # releases the lock
            return
        if not waited:
            on_wait()
            waited = True
        time.sleep(1.0)


SLOT_WAIT_REPORT_SECONDS = 60.0  # how often a waiting stage says again who holds the slot


@contextlib.contextmanager
def server_slot(name: str, stage: str, logger):
    """A slot of the server's global concurrency limit `name`, as a lease the server takes back about a
    minute after its holder dies (flows/crashes.py). While the limit is full, the stage says which run
    holds it and since when, and says it again every SLOT_WAIT_REPORT_SECONDS until it gets one."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    lease = slot_lease_seconds()
    acquired = threading.Event()

    def say_who_holds_it() -> None:
        while not acquired.is_set():
            with get_client(sync_client=True) as client:
                limit = client.read_global_concurrency_limit_by_name(name)
            if limit.active_slots < limit.limit:  # free now: the acquisition loop takes it
                return
            try:
                found = slot_holders(name)
                for _ in range(5):  # the holder's `acquired` event may still be on its way to the server
                    if found or acquired.wait(2.0):
                        break
                    found = slot_holders(name)
                holders = describe_holders(found, lease)
            except Exception:  # naming the holder is a courtesy, not part of the wait
                holders = "its holder could not be read from the server"
            if acquired.is_set():
                return
            logger.info("%s: waiting for a slot of concurrency limit '%s': %s", stage, name, holders)
            acquired.wait(SLOT_WAIT_REPORT_SECONDS)

    reporter = threading.Thread(target=say_who_holds_it, name="cptflow-slot-wait", daemon=True)
    reporter.start()
    try:
        # A renewal that fails once (a server restart) must not kill a training run: the lease is renewed
        # again at the next interval.
        with concurrency(name, occupy=1, strict=True, lease_duration=lease, raise_on_lease_renewal_failure=False):
            acquired.set()
            logger.info("%s: holds a slot of concurrency limit '%s'", stage, name)
            yield
    finally:
        acquired.set()


@contextlib.contextmanager
def gpu_slot(cfg: PipelineConfig, stage: str):
    """A slot of `gpu_concurrency` while a stage trains.

    With a Prefect server (PREFECT_API_URL), its global concurrency limit: visible and adjustable in
    the UI, shared by every worker. With the temporary server `cptflow run` starts on its own, a lock
    file instead: that server keeps its slot leases in memory and runs no lease reaper, so a run
    killed while training would hold the slot for good.
    """
    from prefect.settings import PREFECT_API_URL

    slot, logger = cfg.gpu_concurrency, get_run_logger()
    if not slot.name:
        yield
    elif PREFECT_API_URL.value():
        ensure_concurrency_limit(slot.name, slot.limit)
        with server_slot(slot.name, stage, logger):
            yield
    else:

        def on_wait() -> None:
            logger.info("%s: waiting for a slot of the local limit '%s' (another run is training)", stage, slot.name)

        with local_slot(slot.name, slot.limit, on_wait):
            yield


def retry_unless_deterministic(task, task_run, state) -> bool:
    """Prefect's retry condition for a training stage: a retry resumes from the latest checkpoint, which
    helps after a kill or an out-of-memory, never after bad data, a bad config or a broken template."""
    error = state.result(raise_on_failure=False)
    return not (isinstance(error, BaseException) and is_deterministic(error))


@task(
    name="train-stage",
    cache_key_fn=_stage_cache_key,
    persist_result=True,
    task_run_name="{stage}",
    retry_condition_fn=retry_unless_deterministic,
)
def training_stage(stage: str, run: StageRun, cfg: PipelineConfig, upstream: dict | None = None) -> dict:
    """cpt, sft or evaluate; a retry (or a rerun after a crash) resumes from the latest checkpoint.

    Runs as a torchrun / accelerate process tree (cptflow/training_process.py, cptflow/launch.py)
    whose output streams into this
    task's log, or inline (`launch.launcher: inline`). Holds a slot of the global concurrency limit
    `gpu_concurrency.name` while it trains, so two scheduled runs never train on the same GPU at once.
    """
    logger = get_run_logger()
    with stage_lock(run.path):  # a second run of the same stage waits, then finds it done
        if run.is_done():
            return handoff({"stage": stage, "fingerprint": run.fingerprint, "state": "cached"})
        reporter = PrefectTrainingReporter(stage)
        with gpu_slot(cfg, stage):
            if cfg.launch.launcher == "inline":
                manifest = stage_module(stage).run(run, cfg, reporter=reporter)
            else:
                manifest = launch_stage(stage, run, cfg, reporter, log=logger.log)
    publish_artifacts(manifest, run.path)
    return handoff({"stage": stage, "fingerprint": run.fingerprint, "state": "ran"})


def run_stage(
    stage: str,
    runs: dict[str, StageRun],
    cfg: PipelineConfig,
    selected: list[str],
    forced: set[str],
    upstream: dict | None = None,
    dask_cluster: LocalDaskCluster | None = None,
) -> tuple[dict, dict]:
    """(the stage's report, what the next stage receives as `upstream`): the value Prefect returned for
    this stage, so that the graph draws the edge `stage → next stage`."""
    run = runs[stage]
    if stage not in selected:
        report = _stage_report(run, "done" if run.is_done() else "not run")
        return report, handoff(report)
    warn_if_low_space(stage, runs, cfg, forced)  # a warning only: the estimate is rough
    if stage in DATA_STAGES:
        runner = make_task_runner(cfg.runner, dask_cluster)
        result = data_stage.with_options(name=stage, task_runner=runner)(
            stage, run, cfg, force=stage in forced, upstream=upstream
        )
        # On the pipeline run, not the stage's subflow: its page carries every data stage's counts, cached
        # or recomputed, one card per kind.
        publish_artifacts(read_manifest(run.path), run.path)
        return result["report"], result
    if stage in forced:
        reset_stage_dir(run.path)
    done = run.is_done()
    retries = getattr(getattr(cfg, stage), "retries", 0)
    state = training_stage.with_options(refresh_cache=not done, retries=retries)(
        stage, run, cfg, upstream=upstream, return_state=True
    )
    result = state.result()
    outcome = result.get("report", result)  # a cache record from before handoff() holds the report itself
    ran = outcome["state"] == "ran" and state.name != "Cached"
    enforce_gates(stage, run, cfg)
    return _stage_report(run, "ran" if ran else "cached"), result


def enforce_gates(stage: str, run: StageRun, cfg: PipelineConfig) -> None:
    """A committed stage's gates: warn of each breach; fail the run (GateBreach) where they say fail.
    Run on a cached stage too: evaluate's limits are judged under the config as it is now."""
    manifest = read_manifest(run.path)
    summary = gate_summary(stage, manifest, cfg) if manifest else None
    if summary:
        enforce(stage, summary, run.directory, warn=get_run_logger().warning)


# The stage parameters as an enum: the UI's run form offers the stages to pick, in DAG order.
StageName = Literal[PIPELINE_STAGES]  # type: ignore[valid-type]


def pipeline_run_name() -> str:
    """`<pipeline>-<UTC date and time>` (e.g. demo-20261203-0412), not Prefect's random two words."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    parameters = prefect.runtime.flow_run.parameters
    try:
        name = load_config(parameters["config_path"], parameters.get("work_dir")).name
    except Exception:  # a broken config fails the run itself, with its own message: not its name
        name = "cptflow"
    return f"{name}-{stamp}"


@contextlib.contextmanager
def run_tags(cfg: PipelineConfig, selected: list[str]):
    """Tags of a run started here (CLI, Python): the pipeline's name and the stages it runs; a
    deployment's runs carry its tags already."""
    with tags("cptflow", cfg.name, *selected):
        yield


@flow(name="cptflow-pipeline", flow_run_name=pipeline_run_name, log_prints=True)
def cptflow_pipeline(
    config_path: str,
    only: list[StageName] | None = None,
    from_stage: StageName | None = None,
    force: list[StageName] | None = None,
    work_dir: str | None = None,
) -> list[dict]:
    """Curate, mix, tokenize, train and evaluate, as configured in `config_path`."""
    cfg = load_config(config_path, work_dir)
    selected, forced = select_stages(only, from_stage, force)
    runs = plan_pipeline(cfg)
    check_upstreams_available(runs, selected)

    look_after_crashed_runs()
    reports, upstream = [], None
    local_dask = cfg.runner.kind == "dask" and not cfg.runner.dask_address
    dask_cluster = LocalDaskCluster(cfg.runner) if local_dask else None
    try:
        # The tag marks the stages' subflows as cptflow's too: the crash automation watches them as well.
        with tags("cptflow", cfg.name):
            for stage in PIPELINE_STAGES:  # each stage receives the one before it: the graph is the chain
                report, upstream = run_stage(stage, runs, cfg, selected, forced, upstream, dask_cluster)
                reports.append(report)
    except Exception as error:  # a stage failed: say which one, and how to rerun from it
        publish_failure(
            cfg,
            error.stage if isinstance(error, GateBreach) else failed_stage(runs, selected),
            error,
            config_path=config_path,
            work_dir=work_dir,
            runs=runs,
            only=only,
            from_stage=from_stage,
            force=force,
        )
        raise
    finally:
        if dask_cluster is not None:
            dask_cluster.close()

    publish_run_summary(cfg, reports)
    look_after_crashed_runs()  # one marked Crashed while this run worked (a killed run's server came back)
    return reports


def look_after_crashed_runs() -> None:
    """The server's crash automation in place, and a failure report on every run it marked Crashed
    (a killed run cannot write its own). Never fails the run: a warning says what went wrong."""
    logger = get_run_logger()
    try:
        ensure_crash_automation()
        report_crashed_runs(logger.warning)
    except Exception as error:
        logger.warning("could not check for crashed runs on the Prefect server: %s: %s", type(error).__name__, error)


def check_upstreams_available(runs: dict[str, StageRun], selected: list[str]) -> None:
    """--only a stage whose upstream is neither done nor selected cannot run: say so before any work."""
    for stage in selected:
        upstream = UPSTREAM.get(stage)
        if upstream and upstream not in selected and not runs[upstream].is_done():
            raise StageSelectionError(
                f"stage '{stage}' needs the output of '{upstream}' ({runs[upstream].fingerprint}), which is not done; "
                f"run with --from {upstream} or without --only"
            )


# ----------------------------------------------------------------------------------------------------
# Artifacts (keys: lowercase letters, digits and dashes only)
# ----------------------------------------------------------------------------------------------------
def publish_artifacts(manifest: dict, directory: Path) -> None:
    """The artifacts the stage module declares for its committed result (cptflow.stage.Artifact)."""
    for artifact in stage_module(manifest["stage"]).artifacts(manifest, Path(directory)):
        if artifact.table is not None:
            create_table_artifact(key=artifact.key, table=artifact.table, description=artifact.description)
        elif artifact.markdown is not None:
            create_markdown_artifact(key=artifact.key, markdown=artifact.markdown, description=artifact.description)
        else:
            create_link_artifact(
                key=artifact.key, link=artifact.link, link_text=artifact.link_text, description=artifact.description
            )


def publish_run_summary(cfg: PipelineConfig, reports: list[dict]) -> None:
    lines = [
        f"# cptflow run: {cfg.name}",
        "",
        "| stage | state | in | kept | excluded | rejected | seconds | fingerprint |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        counts = report.get("counts") or {}
        excluded = sum((counts.get("excluded") or {}).values()) if counts else ""
        rejected = sum((counts.get("rejected") or {}).values()) if counts else ""
        lines.append(
            f"| {report['stage']} | {report['state']} | {counts.get('in', '')} | "
            f"{counts.get('kept', '')} | {excluded} | "
            f"{rejected} | {report.get('seconds') or ''} | `{report['fingerprint']}` |"
        )
    results = [f"- **{r['stage']}**: {r['result']}" for r in reports if r.get("result")]
    if results:
        lines += ["", "## Training and evaluation", "", *results]
    evaluate = read_manifest(Path(reports[-1]["directory"])) if reports[-1]["stage"] == "evaluate" else None
    if evaluate:
        lines += ["", "## Forgetting (held-out perplexity)", "", evaluate["forgetting_table"]]
    lines += ["", f"Work directory: `{cfg.work_path}`", "", "Rerun one stage: `cptflow run CONFIG --from STAGE`."]
    create_markdown_artifact(key="pipeline-summary", markdown="\n".join(lines), description=f"cptflow {cfg.name}")


@contextlib.contextmanager
def result_storage(cfg: PipelineConfig):
    """Prefect settings for the config's result storage, around a flow call or `serve` (whose runner
    hands its settings to every flow-run process it starts)."""
    from prefect.settings import (
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    updates = {}
    if cfg.results.block:
        updates[PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK] = cfg.results.block
    elif cfg.results.local_path:
        updates[PREFECT_RESULTS_LOCAL_STORAGE_PATH] = cfg.resolve(cfg.results.local_path)
    with temporary_settings(updates=updates):
        yield


def run_pipeline(config_path: str | Path, **options) -> list[dict]:
    cfg = load_config(config_path, options.get("work_dir"))
    selected, _ = select_stages(options.get("only"), options.get("from_stage"), options.get("force"))
    with result_storage(cfg), run_tags(cfg, selected):
        return cptflow_pipeline(config_path=str(config_path), **options)
