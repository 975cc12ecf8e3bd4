"""Deployments of the pipeline flow: the whole DAG on a schedule, and one deployment per stage.

`cptflow serve` registers them with the Prefect server in PREFECT_API_URL and runs their flow runs in
its own process (a Prefect Runner); `build_deployments` is the part without a server, for tests.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter, FlowRunFilterState
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy, StateType
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from cptflow.config import PipelineConfig, load_config
from cptflow.flows.crashes import ensure_crash_automation, watch_crashes
from cptflow.flows.pipeline import cptflow_pipeline, result_storage
from cptflow.plan import PIPELINE_STAGES

# Two runs of one deployment would write into the same work directory: the second waits its turn
# (a scheduled run firing while the previous one still trains is queued, not dropped).
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def build_deployments(
    config_path: str | Path,
    cron: str | None = None,
    interval: float | None = None,
    work_dir: str | Path | None = None,
) -> list[RunnerDeployment]:
    """`<name>`: the whole pipeline, on the schedule (cron expression or every `interval` seconds, or
    none: runs on demand); `<name>-<N>-<stage>` for each stage (N its place in the DAG, so that the
    UI's A-Z list reads in pipeline order): `only=[stage]` as its default parameters, never scheduled.
    `<name>` is the config's `name`.
    """
    if cron and interval:
        raise ValueError("give a cron expression or an interval, not both")
    if interval is not None and interval <= 0:
        raise ValueError(f"interval must be a positive number of seconds (got {interval})")
    cfg = load_config(config_path, work_dir)  # a broken config fails here, not at 3 a.m.
    # Absolute paths: the runs start from the server's schedule, in whatever directory the runner has.
    parameters: dict = {"config_path": str(Path(config_path).resolve())}
    if work_dir is not None:
        parameters["work_dir"] = str(Path(work_dir).resolve())
    tags = ["cptflow", cfg.name]
    common = dict(
        tags=tags,
        concurrency_limit=ONE_AT_A_TIME,
        # flows.pipeline is an installed package: the runner imports it the same way from any directory.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )

    when = f"cron '{cron}'" if cron else f"every {timedelta(seconds=interval)}" if interval else "on demand"
    deployments = [
        cptflow_pipeline.to_deployment(
            name=cfg.name,
            cron=cron,
            interval=interval,
            parameters=parameters,
            description=(
                f"The whole cptflow pipeline for {parameters['config_path']} ({when}); finished stages are cached."
            ),
            **common,
        )
    ]
    for stage in PIPELINE_STAGES:
        deployments.append(
            cptflow_pipeline.to_deployment(
                name=stage_deployment_name(cfg.name, stage),
                parameters={**parameters, "only": [stage]},
                description=f"Only the {stage} stage of {parameters['config_path']} (its upstream must be done).",
                **{**common, "tags": [*tags, stage]},
            )
        )
    return deployments


def stage_deployment_name(pipeline: str, stage: str) -> str:
    """`demo-2-quality`: the stage's place in the DAG first, so deployments list in pipeline order."""
    return f"{pipeline}-{PIPELINE_STAGES.index(stage) + 1}-{stage}"


def prefect_api_url() -> str | None:
    """The Prefect server `cptflow serve` registers with (None: no server configured)."""
    return PREFECT_API_URL.value()


def scheduled_runs(deployment_name: str) -> int | None:
    """How many runs the server has scheduled for `<flow>/<deployment>` (None: not registered yet)."""
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(deployment_name)
        except ObjectNotFound:
            return None
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type={"any_": [StateType.SCHEDULED]})),
            limit=5,
        )
        return len(runs)


def watch_schedule(deployment_name: str, within_seconds: float, warn: Callable[[str], None]) -> threading.Thread:
    """Warn once if the server schedules no run of a scheduled deployment within `within_seconds`.

    A server whose scheduler service is off or failing (prefect 3.8 with SQLAlchemy 2.1 logs an error a
    minute and schedules nothing) shows the schedule in the UI and never fires it; only its own log says.
    """

    def check() -> None:
        deadline = time.monotonic() + within_seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # the server may still be starting; keep trying
                if scheduled_runs(deployment_name):
                    return
            time.sleep(5)
        warn(
            f"the Prefect server at {prefect_api_url()} has scheduled no run of {deployment_name} in "
            f"{within_seconds:.0f} s: its scheduler service is off or failing, so the schedule will not fire "
            "(see the server's log; `prefect server start` runs the scheduler, and prefect 3.8 needs SQLAlchemy < 2.1)"
        )

    thread = threading.Thread(target=check, name="cptflow-schedule-check", daemon=True)
    thread.start()
    return thread


def serve_deployments(
    deployments: list[RunnerDeployment], cfg: PipelineConfig, warn: Callable[[str], None] | None = None
) -> None:
    """Run the deployments' flow runs in this process until Ctrl-C, with the config's result storage
    (the runner passes these settings to every flow run it starts). For a scheduled deployment, a
    check that the server's scheduler creates its runs (SCHEDULE_CHECK_SECONDS)."""
    scheduled = [d for d in deployments if d.schedules]
    if scheduled and warn is not None:
        watch_schedule(f"{cptflow_pipeline.name}/{scheduled[0].name}", schedule_check_seconds(), warn)
    # Runs killed without a word (SIGKILL, OOM, a lost machine) are marked Crashed by the server and get
    # their failure report from here while serving.
    ensure_crash_automation()
    watch_crashes(log=warn)
    with result_storage(cfg):
        serve(*deployments)


def schedule_check_seconds() -> float:
    """Two scheduler loops of a default server (60 s each) and some slack; CPTFLOW_SCHEDULE_CHECK_SECONDS."""
    return float(os.environ.get("CPTFLOW_SCHEDULE_CHECK_SECONDS", "150"))
