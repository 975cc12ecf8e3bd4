"""Deployments of the pipeline flow: the whole DAG on a schedule, and one deployment per stage.

`cptflow serve` registers them with the Prefect server in PREFECT_API_URL and runs their flow runs in
its own process (a Prefect Runner); `build_deployments` is the part without a server, for tests.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.settings import PREFECT_API_URL

from cptflow.config import PipelineConfig, load_config
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
    none: runs on demand); `<name>-<stage>` for each stage: `only=[stage]` as its default parameters,
    never scheduled. `<name>` is the config's `name`.
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
                name=f"{cfg.name}-{stage}",
                parameters={**parameters, "only": [stage]},
                description=f"Only the {stage} stage of {parameters['config_path']} (its upstream must be done).",
                **{**common, "tags": [*tags, stage]},
            )
        )
    return deployments


def prefect_api_url() -> str | None:
    """The Prefect server `cptflow serve` registers with (None: no server configured)."""
    return PREFECT_API_URL.value()


def serve_deployments(deployments: list[RunnerDeployment], cfg: PipelineConfig) -> None:
    """Run the deployments' flow runs in this process until Ctrl-C, with the config's result storage
    (the runner passes these settings to every flow run it starts)."""
    with result_storage(cfg):
        serve(*deployments)
