"""When a pipeline run fails: a `pipeline-failure` artifact (stage, error, the command to rerun) and an
optional notification (a JSON webhook and/or a saved Prefect notification block, from `notify:`).

Called by the pipeline flow when a stage raises; nothing here may hide the original error.
"""

from __future__ import annotations

import contextlib
import logging
import shlex

import httpx
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from cptflow.config import PipelineConfig
from cptflow.plan import StageRun

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000  # a traceback-sized message is cut; the full one is in the flow run's logs


def failed_stage(runs: dict[str, StageRun], selected: list[str]) -> str | None:
    """The stage a failed run stopped in: the first selected stage the store does not have as done
    (stages commit their manifest last, so a stage that raised is never done). None: all were done."""
    return next((stage for stage in selected if not runs[stage].is_done()), None)


def rerun_command(config_path: str | None, stage: str | None, work_dir: str | None = None) -> str:
    command = ["cptflow", "run", config_path or "CONFIG"]
    if stage:
        command += ["--from", stage]
    if work_dir:
        command += ["--work-dir", work_dir]
    return shlex.join(command)


def publish_failure(
    cfg: PipelineConfig,
    stage: str | None,
    error: BaseException | str,
    config_path: str | None = None,
    work_dir: str | None = None,
) -> dict:
    """Create the `pipeline-failure` markdown artifact and send the configured notifications.

    Returns the notification payload: {pipeline, stage, error, command, flow_run_id}.
    """
    message = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + " …(cut)"
    command = rerun_command(config_path, stage, work_dir)
    resume = rerun_command(config_path, None, work_dir)
    run_id = flow_run.get_id()
    payload = {"pipeline": cfg.name, "stage": stage, "error": message, "command": command, "flow_run_id": run_id}

    where = f"stage **{stage}**" if stage else "after the last stage (all selected stages were done)"
    markdown = "\n".join(
        [
            f"# cptflow run failed: {cfg.name}",
            "",
            f"Failed in {where}.",
            "",
            "```",
            message,
            "```",
            "",
            "Rerun from the failed stage (stages before it stay cached; it and the ones after it are recomputed):",
            "",
            "```bash",
            command,
            "```",
            "",
            "Or resume without recomputing anything finished (a data stage redoes only its unfinished shards;",
            f"a training stage continues from its latest checkpoint): `{resume}`, or *Retry* on this flow run.",
        ]
    )
    try:
        create_markdown_artifact(
            key="pipeline-failure", markdown=markdown, description=f"cptflow {cfg.name}: failed in {stage}"
        )
    except Exception as err:  # the server being down must not replace the stage's error
        logger.warning("could not create the pipeline-failure artifact: %s", type(err).__name__)
    notify(cfg, payload)
    return payload


def notify(cfg: PipelineConfig, payload: dict) -> None:
    """Send `payload` to the webhook and/or the Prefect block of `cfg.notify`; log, never raise."""
    if cfg.notify.webhook_url is not None:
        with _no_request_logs():
            try:
                response = httpx.post(cfg.notify.webhook_url.get_secret_value(), json=payload, timeout=10)
                response.raise_for_status()
            except httpx.HTTPStatusError as err:
                logger.warning("failure webhook answered HTTP %d", err.response.status_code)
            except Exception as err:  # the URL is a secret: the exception's text may hold it, its type does not
                logger.warning("failure webhook not reached: %s", type(err).__name__)
    if cfg.notify.prefect_block:
        from prefect.blocks.core import Block

        subject = f"cptflow {payload['pipeline']} failed in {payload['stage']}"
        body = f"{payload['error']}\n\nRerun: {payload['command']}"
        with _no_request_logs():
            try:
                block = Block.load(cfg.notify.prefect_block)
                with block.raise_on_failure():
                    block.notify(body, subject=subject)
            except Exception as err:
                logger.warning("notification block %s failed: %s", cfg.notify.prefect_block, type(err).__name__)


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def _no_request_logs():
    """httpx logs every request with its URL at INFO; a webhook URL is a credential (Slack, Teams)."""
    quiet = _DropAll()
    loggers = [logging.getLogger("httpx")]
    for each in loggers:
        each.addFilter(quiet)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(quiet)
