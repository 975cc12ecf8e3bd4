"""When a pipeline run fails: what the user reads and where the rest goes.

* `failure_report` / `failure_lines`: the stage, the cause in one line (cptflow/failures.py), the path
  involved and its free space, the command that resumes; the CLI prints it, the `pipeline-failure`
  artifact holds the same lines, and an optional notification goes out (a JSON webhook and/or a saved
  Prefect notification block, from `notify:`).
* `run_log`: during `cptflow run`, every log record is kept for a log file written when the run fails
  (the full tracebacks), and Prefect's per-run tracebacks stay off the terminal unless --debug.
* `warn_if_low_space`: before a stage writes, a warning when the work directory's file system has less
  free space than the stage is estimated to need.

Called by the pipeline flow and the CLI; nothing here may hide the original error.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import shlex
import signal
import tempfile
import time
import traceback
from concurrent.futures import BrokenExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger
from prefect.logging.configuration import ensure_logging_setup
from prefect.logging.handlers import PrefectConsoleHandler
from prefect.runtime import deployment, flow_run

from cptflow.config import PipelineConfig
from cptflow.failures import (
    WorkerKilled,
    classify_failure,
    error_text,
    human_bytes,
    low_space_message,
    model_weight_bytes,
    signal_text,
    tree_bytes,
)
from cptflow.plan import DATA_STAGES, PIPELINE_STAGES, StageRun
from cptflow.store import atomic_write_text

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000  # a traceback-sized message is cut; the full one is in the log file and the run's logs


def failed_stage(runs: dict[str, StageRun], selected: list[str]) -> str | None:
    """The stage a failed run stopped in: the first selected stage the store does not have as done
    (stages commit their manifest last, so a stage that raised is never done). None: all were done."""
    return next((stage for stage in selected if not runs[stage].is_done()), None)


def rerun_command(config_path: str | None, stage: str | None, work_dir: str | None = None) -> str:
    """`cptflow run CONFIG --from STAGE`: recompute the failed stage and everything after it."""
    command = ["cptflow", "run", config_path or "CONFIG"]
    if stage:
        command += ["--from", stage]
    if work_dir:
        command += ["--work-dir", work_dir]
    return shlex.join(command)


def resume_command(
    config_path: str | None,
    stage: str | None,
    *,
    only: list[str] | None = None,
    from_stage: str | None = None,
    force: list[str] | None = None,
    work_dir: str | None = None,
) -> str:
    """The command that continues a failed run where it stopped: the stages it finished stay cached, the
    failed stage keeps its finished shards (a training stage its latest checkpoint), and the stages after
    it that the failed command was to recompute (--from, --force) are still recomputed.

    --from and --force would reset the failed stage itself, so they become a --force per later stage."""
    forced = set(force or [])
    if from_stage:
        forced |= set(PIPELINE_STAGES[PIPELINE_STAGES.index(from_stage) :])
    after = PIPELINE_STAGES[PIPELINE_STAGES.index(stage) + 1 :] if stage in PIPELINE_STAGES else ()
    command = ["cptflow", "run", config_path or "CONFIG"]
    for name in only or []:
        command += ["--only", name]
    for name in after:
        if name in forced and (not only or name in only):
            command += ["--force", name]
    if work_dir:
        command += ["--work-dir", work_dir]
    return shlex.join(command)


def failure_report(
    cfg: PipelineConfig,
    stage: str | None,
    error: BaseException | str,
    *,
    runs: dict[str, StageRun] | None = None,
    config_path: str | None = None,
    work_dir: str | None = None,
    only: list[str] | None = None,
    from_stage: str | None = None,
    force: list[str] | None = None,
) -> dict:
    """What a failed run says, as plain data: pipeline, stage, cause (kind and one line), path, free
    space, hint, the command that resumes, the one that recomputes the stage, the error message."""
    directory = runs[stage].directory if runs and stage in runs else None
    if isinstance(error, BaseException):
        cause = classify_failure(error, fallback_path=directory or cfg.work_path)
        message = error_text(error)
    else:
        cause, message = None, str(error)
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + " …(cut)"
    return {
        "pipeline": cfg.name,
        "stage": stage,
        "kind": cause.kind if cause else "error",
        "cause": cause.summary if cause else message.splitlines()[0] if message else "",
        "path": cause.path if cause else directory,
        "free_bytes": cause.free_bytes if cause else None,
        "total_bytes": cause.total_bytes if cause else None,
        "hint": cause.hint if cause else None,
        "resume": resume_command(config_path, stage, only=only, from_stage=from_stage, force=force, work_dir=work_dir),
        "command": rerun_command(config_path, stage, work_dir),
        "error": message,
        "log": None,
    }


def failure_lines(report: dict) -> list[str]:
    """The short block a failed run prints (and its artifact shows): one fact a line."""
    where = f"in stage '{report['stage']}'" if report["stage"] else "after its stages (all selected stages were done)"
    lines = [f"cptflow run failed {where} (pipeline {report['pipeline']})", f"  cause:  {report['cause']}"]
    if report["path"]:
        space = ""
        if report["free_bytes"] is not None:
            space = f" ({human_bytes(report['free_bytes'])} free of {human_bytes(report['total_bytes'])} there now)"
        lines.append(f"  path:   {report['path']}{space}")
    if report["hint"]:
        lines.append(f"  fix:    {report['hint']}")
    if report["kind"] == "gate_breach":  # the same weights breach again: the rerun waits for a change
        lines.append(f"  rerun:  {report['resume']} (after changing the limit or the training)")
    else:
        lines.append(f"  resume: {report['resume']}")
    if report["stage"] and report["kind"] != "gate_breach":
        kept = "its finished shards" if report["stage"] in DATA_STAGES else "its latest checkpoint"
        lines.append(f"          (keeps {kept}; to recompute the stage instead: {report['command']})")
    if report["log"]:
        lines.append(f"  log:    {report['log']} (the full traceback; --debug prints it here)")
    else:
        lines.append("  log:    the flow run's logs (Prefect UI); `cptflow run --debug` prints the traceback")
    return lines


def publish_failure(
    cfg: PipelineConfig,
    stage: str | None,
    error: BaseException | str,
    config_path: str | None = None,
    work_dir: str | None = None,
    *,
    runs: dict[str, StageRun] | None = None,
    only: list[str] | None = None,
    from_stage: str | None = None,
    force: list[str] | None = None,
) -> dict:
    """Create the `pipeline-failure` markdown artifact and send the configured notifications.

    Under `cptflow run` (an active run_log) the log file is written now, so the artifact names it.
    Returns the notification payload: {pipeline, stage, error, command, flow_run_id}.
    """
    report = failure_report(
        cfg,
        stage,
        error,
        runs=runs,
        config_path=config_path,
        work_dir=work_dir,
        only=only,
        from_stage=from_stage,
        force=force,
    )
    if _ACTIVE_LOG is not None:
        report["log"] = _ACTIVE_LOG.save(error if isinstance(error, BaseException) else None)
        _ACTIVE_LOG.report = report
    run_id = flow_run.get_id()
    payload = {
        "pipeline": cfg.name,
        "stage": stage,
        "error": report["cause"],
        "command": report["command"],
        "flow_run_id": run_id,
    }
    markdown = failure_markdown(cfg.name, stage, report, retry=deployment.get_id() is not None)
    try:
        create_markdown_artifact(
            key="pipeline-failure", markdown=markdown, description=f"cptflow {cfg.name}: failed in {stage}"
        )
    except Exception as err:  # the server being down must not replace the stage's error
        logger.warning("could not create the pipeline-failure artifact: %s", type(err).__name__)
    notify(cfg, payload)
    return payload


def failure_markdown(pipeline: str, stage: str | None, report: dict, *, retry: bool, crashed: bool = False) -> str:
    """The `pipeline-failure` artifact: the short block, then the commands that work for this run (*Retry*
    only where the run has a deployment: `prefect flow-run retry` needs one)."""
    if stage:
        where = f"{'Crashed' if crashed else 'Failed'} in stage **{stage}**."
    else:
        where = "Failed after the last stage (all selected stages were done)."
    return "\n".join(
        [
            f"# cptflow run {'crashed' if crashed else 'failed'}: {pipeline}",
            "",
            where,
            "",
            "```",
            *failure_lines(report),
            "```",
            "",
            "Resume (stages before it stay cached; a data stage redoes only its unfinished shards, a training",
            "stage continues from its latest checkpoint)" + (", or *Retry* on this flow run:" if retry else ":"),
            "",
            "```bash",
            report["resume"],
            "```",
            "",
            "Rerun from the failed stage (it and the ones after it are recomputed):",
            "",
            "```bash",
            report["command"],
            "```",
            *(["", "Error message:", "", "```", report["error"], "```"] if report["error"] != report["cause"] else []),
        ]
    )


# ----------------------------------------------------------------------------------------------------
# A worker process that died
# ----------------------------------------------------------------------------------------------------
def shard_results(stage: str, futures) -> list:
    """`future.result()` of every mapped task; a worker process of the pool that died (SIGKILL, often the
    out-of-memory killer) raises WorkerKilled naming the stage and the signal, not BrokenProcessPool."""
    try:
        return [future.result() for future in futures]
    except BrokenExecutor as error:
        number = _dead_worker_signal()
        how = f"was killed by {signal_text(number)}" if number else f"died ({type(error).__name__})"
        raise WorkerKilled(f"a worker process of {stage} {how}", number) from error


def _dead_worker_signal(wait_seconds: float = 5.0) -> int | None:
    """The signal that ended a worker of this flow's process pool: SIGKILL if any was killed by it (the
    pool SIGTERMs the others once it breaks), else another one. Read while the pool still exists.

    The pool breaks when a worker's pipe closes, a moment before the kernel lets its exit status be
    read: poll until every worker has one, SIGKILL shows, or `wait_seconds` pass."""
    context = FlowRunContext.get()
    executor = getattr(getattr(context, "task_runner", None), "_executor", None)
    processes = getattr(executor, "_processes", None) or {}
    deadline = time.monotonic() + wait_seconds
    while True:
        codes = [process.exitcode for process in list(processes.values())]
        signals = {-code for code in codes if code is not None and code < 0}
        if signal.SIGKILL in signals or all(code is not None for code in codes) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if signal.SIGKILL in signals:
        return int(signal.SIGKILL)
    return min(signals - {signal.SIGTERM}, default=int(signal.SIGTERM) if signal.SIGTERM in signals else None)


# ----------------------------------------------------------------------------------------------------
# Free space before a stage writes
# ----------------------------------------------------------------------------------------------------
# Bytes a stage writes per byte of its basis, with headroom over the demo's (`du` of each stage
# directory): clean 4.4 MB from 2.1 MB of input, quality 4.1 from 4.4, perplexity 3.9, mix 3.8, tokenize
# 2.5; a data stage keeps its documents plus excluded/ and rejected/. Compressed inputs count 4x (text
# is about 4x its gzip). cpt keeps checkpoints of adapter, fp32 embeddings and optimizer state: 28 MB
# for the 7 MB tiny model. evaluate exports a merged model, about the base's size.
SPACE_FACTORS = {"clean": 2.0, "quality": 1.2, "perplexity": 1.2, "mix": 1.2, "tokenize": 1.0, "sft": 1.2}
COMPRESSED_SUFFIXES = (".gz", ".zst", ".bz2", ".xz", ".parquet")
COMPRESSION_FACTOR = 4.0
MODEL_FACTORS = {"cpt": 5.0, "evaluate": 1.2}
MODEL_FLOOR_BYTES = {"builtin": 64 << 20, "unknown": 1 << 30}  # a hub model not on this disk: at least 1 GiB


def space_estimate(stage: str, runs: dict[str, StageRun], cfg: PipelineConfig) -> tuple[int, str]:
    """(bytes the stage may write, what the estimate is based on): rough, meant to warn, never to stop."""
    run = runs[stage]
    if stage == "clean":
        total = 0.0
        for files in (run.payload.get("inputs") or {}).values():
            for entry in files:
                size = entry.get("bytes", 0)
                total += size * (COMPRESSION_FACTOR if str(entry.get("path", "")).endswith(COMPRESSED_SUFFIXES) else 1)
        return int(
            total * SPACE_FACTORS["clean"]
        ), f"{SPACE_FACTORS['clean']:g} x its {human_bytes(total)} of input text"
    if stage in MODEL_FACTORS:
        weights = model_weight_bytes(cfg.base_model)
        if weights:
            return int(
                weights * MODEL_FACTORS[stage]
            ), f"{MODEL_FACTORS[stage]:g} x the base model's {human_bytes(weights)}"
        if cfg.base_model.startswith("builtin:"):
            return MODEL_FLOOR_BYTES["builtin"], "a floor for the builtin tiny model"
        return MODEL_FLOOR_BYTES["unknown"], "a floor: the base model's size on disk is not known"
    upstream = tree_bytes(run.upstream_directory) if run.upstream_directory else 0
    factor = SPACE_FACTORS.get(stage, 1.0)
    return int(upstream * factor), f"{factor:g} x its upstream's {human_bytes(upstream)}"


def warn_if_low_space(stage: str, runs: dict[str, StageRun], cfg: PipelineConfig, forced: set[str]) -> str | None:
    """Before `stage` writes: a warning in the run log (and so on the terminal) when the work directory's
    file system has less free space than the estimate. Never fails the run. Returns the warning."""
    run = runs[stage]
    if run.is_done() and stage not in forced:
        return None  # cached: writes nothing
    needed, basis = space_estimate(stage, runs, cfg)
    message = low_space_message(stage, cfg.work_path, needed, basis)
    if message:
        get_run_logger().warning(message)
    return message


# ----------------------------------------------------------------------------------------------------
# The run's log file, and a terminal without tracebacks
# ----------------------------------------------------------------------------------------------------
MAX_LOG_RECORDS = 50_000  # kept in memory for the log file; a longer run keeps its last ones
QUIET_CONSOLE_ENV = "CPTFLOW_QUIET_CONSOLE"  # process-pool workers read it (they are started mid-run)
FAILED_STATE = re.compile(r"Finished in state (Failed|Crashed)")
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")  # get_run_logger(), and the engines' own lines


class QuietConsole(logging.Filter):
    """Keeps off the terminal what the failure block sums up and the log file holds: the ERROR records of
    flow and task runs (Prefect's "Encountered exception during execution" with a traceback, once per
    failed shard and once per enclosing flow; a training process's traceback) and "Finished in state
    Failed" lines. Warnings and progress stay."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = 0  # ERROR records kept off the terminal

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(RUN_LOGGERS):
            return True
        if record.levelno >= logging.ERROR:
            self.hidden += 1
            return False
        return not FAILED_STATE.match(str(record.msg))


def _console_handlers() -> list[logging.Handler]:
    loggers = [
        logging.getLogger(),
        *(obj for obj in logging.root.manager.loggerDict.values() if isinstance(obj, logging.Logger)),
    ]
    return [handler for each in loggers for handler in each.handlers if isinstance(handler, PrefectConsoleHandler)]


def quiet_worker_console() -> None:
    """The initializer of a process-pool worker: the same quiet console as the CLI, when it asked for it."""
    if os.environ.get(QUIET_CONSOLE_ENV) == "1":
        ensure_logging_setup()  # a fresh worker may not have imported prefect.main, which sets logging up
        for handler in _console_handlers():
            handler.addFilter(QuietConsole())


class _RunLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        record.where = f"{record.name} [{run}]" if run else record.name
        return super().format(record)


class RunLog(logging.Handler):
    """Every record of a `cptflow run` that reaches the root logger, kept in memory (bounded) and written
    to `<work_dir>/logs/cptflow-run-<UTC time>.log` when the run fails: atomically (temp file, then rename),
    and in the system's temporary directory when the work directory cannot take it (full, read-only)."""

    def __init__(self, work_path: Path):
        super().__init__(logging.NOTSET)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.name_ = f"cptflow-run-{stamp}-{os.getpid()}.log"
        self.path = Path(work_path) / "logs" / self.name_
        self.fallback = Path(tempfile.gettempdir()) / "cptflow-logs" / self.name_
        self.records: collections.deque[str] = collections.deque(maxlen=MAX_LOG_RECORDS)
        self.seen = 0
        self.saved: Path | None = None
        self.report: dict | None = None  # what publish_failure reported, for the CLI to print
        self.quiet: QuietConsole | None = None  # the terminal's filter, if any (run_log sets it)
        self.setFormatter(_RunLogFormatter("%(asctime)s %(levelname)-7s %(where)s - %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a record whose arguments do not format: keep what it has
            text = f"{record.levelname} {record.name} - {record.msg!r} {record.args!r}"
        self.records.append(text)
        self.seen += 1

    def save(self, error: BaseException | None = None) -> str | None:
        """Write the log (and `error`'s traceback) now; again later to the same file, with what came since.
        Returns the file's path, or None when neither place could take it."""
        lines = list(self.records)
        if self.seen > len(lines):
            lines.insert(0, f"(the first {self.seen - len(lines)} log records of this run are not kept)")
        if error is not None:
            lines += ["", "cptflow run failed:", "".join(traceback.format_exception(error)).rstrip()]
        text = "\n".join(lines) + "\n"
        for path in [self.saved] if self.saved else [self.path, self.fallback]:
            try:
                atomic_write_text(path, text)
            except OSError:
                continue
            self.saved = path
            return str(path)
        return str(self.saved) if self.saved and self.saved.exists() else None


_ACTIVE_LOG: RunLog | None = None


@contextlib.contextmanager
def run_log(work_path: Path, debug: bool = False):
    """During `cptflow run`: a RunLog on the root logger and, unless `debug`, a quiet Prefect console (in
    this process and in process-pool workers started meanwhile). Yields the RunLog."""
    global _ACTIVE_LOG
    log = RunLog(work_path)
    root = logging.getLogger()
    quiet = log.quiet = QuietConsole()
    handlers = [] if debug else _console_handlers()
    previous_env = os.environ.get(QUIET_CONSOLE_ENV)
    root.addHandler(log)
    for handler in handlers:
        handler.addFilter(quiet)
    if not debug:
        os.environ[QUIET_CONSOLE_ENV] = "1"
    _ACTIVE_LOG = log
    try:
        yield log
    finally:
        _ACTIVE_LOG = None
        root.removeHandler(log)
        for handler in handlers:
            handler.removeFilter(quiet)
        if previous_env is None:
            os.environ.pop(QUIET_CONSOLE_ENV, None)
        else:
            os.environ[QUIET_CONSOLE_ENV] = previous_env


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
