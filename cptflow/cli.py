"""The `cptflow` command: run the pipeline, validate a config, show the state of each stage.

Errors a user can fix (config, inputs, stage selection) are printed as one clear message, not a traceback.

The commands import the pipeline (torch, transformers and prefect: seconds) when they run, not when
this module is imported, so `cptflow --help`, `cptflow demo` and `cptflow ui` answer at once: the
function-local imports below are deferred on purpose.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import cptflow.flows  # noqa: F401  (its __init__ sets Prefect defaults before prefect is imported)
from cptflow.store import read_manifest

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Continued pretraining pipeline as a Prefect DAG.")
console = Console()
err_console = Console(stderr=True)

CONFIG_ARG = typer.Argument(..., exists=False, help="Pipeline YAML, e.g. configs/demo.yaml")
WORK_DIR_OPT = typer.Option(None, "--work-dir", help="Override the config's work_dir")


def _warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _load(config: Path, work_dir: Optional[Path]):
    from cptflow.config import ConfigError, load_config

    try:
        return load_config(config, work_dir)
    except ConfigError as err:
        _fail(str(err))


def _preflight(cfg, stages: list[str] | None = None) -> None:
    """Inputs exist and have their text field, before a Prefect server is started or any work is done."""
    from cptflow.plan import plan_pipeline
    from cptflow.tasks.clean import InputError, check_text_field

    try:
        for source in cfg.sources:
            check_text_field(source, Path(cfg.base_dir))
        plan_pipeline(cfg)
    except (InputError, ValueError) as err:
        _fail(str(err))
    # tokenize checks this too, but only after clean, quality, perplexity and mix have run for minutes.
    context = None
    if cfg.base_model.startswith("builtin:"):
        from cptflow.models import TINY_LLAMA_SPEC

        context = TINY_LLAMA_SPEC.max_position_embeddings  # read without building the model
    else:
        from transformers import AutoConfig

        try:  # a local directory or a hub model already in the cache; never a download here
            model_config = AutoConfig.from_pretrained(
                cfg.base_model, local_files_only=True, trust_remote_code=cfg.trust_remote_code
            )
        except Exception:  # not available locally: the tokenize stage checks it once the model is there
            model_config = None
        for name in (
            "max_position_embeddings",
            "n_positions",
            "max_sequence_length",
        ):  # as tokenize.model_context_length
            if context is None and isinstance(getattr(model_config, name, None), int):
                context = getattr(model_config, name)
    if context is not None and cfg.tokenize.seq_len > context:
        _fail(
            f"tokenize.seq_len = {cfg.tokenize.seq_len} tokens exceeds "
            f"the context of the base model {cfg.base_model!r} "
            f"(max_position_embeddings = {context}); set tokenize.seq_len <= {context}"
        )
    if stages is not None and "sft" not in stages:
        return
    if not cfg.sft.data:
        _fail("sft.data names no instruction file; the sft stage needs one (JSONL, Alpaca or chat form)")
    for item in cfg.sft.data:
        if not cfg.resolve(item.path).is_file():
            _fail(f"sft.data: {cfg.resolve(item.path)} does not exist")
    for stage in ("cpt", "sft"):
        for warning in getattr(cfg, stage).warnings() if stages is None or stage in stages else []:
            err_console.print(f"[yellow]warning:[/] {stage}: {warning}", highlight=False)


@app.command()
def validate(config: Path = CONFIG_ARG) -> None:
    """Check a config (unknown keys, types, values) and its inputs, without running anything."""
    cfg = _load(config, None)
    _preflight(cfg)
    console.print(f"[green]ok[/]: {config} ({len(cfg.sources)} sources, work_dir {cfg.work_path})")


@app.command()
def run(
    config: Path = CONFIG_ARG,
    only: Optional[list[str]] = typer.Option(None, "--only", help="Run only this stage (repeatable)"),
    from_stage: Optional[str] = typer.Option(None, "--from", help="Recompute this stage and every stage after it"),
    force: Optional[list[str]] = typer.Option(None, "--force", help="Recompute this stage even if done (repeatable)"),
    work_dir: Optional[Path] = WORK_DIR_OPT,
    debug: bool = typer.Option(
        False, "--debug", help="On a failure, print the full tracebacks here too (they always go to the log file)"
    ),
) -> None:
    """Run the pipeline; finished stages whose inputs and config are unchanged are cached.

    A failed run prints what failed, where, and how to resume; its full log is written to WORK_DIR/logs/.
    """
    cfg = _load(config, work_dir)
    from cptflow.flows.failure import failure_lines, failure_report, run_log
    from cptflow.flows.pipeline import (
        StageSelectionError,
        check_upstreams_available,
        cptflow_pipeline,
        result_storage,
        run_tags,
        select_stages,
    )
    from cptflow.plan import plan_pipeline

    try:
        selected, _ = select_stages(only, from_stage, force)
        _preflight(cfg, selected)
        check_upstreams_available(plan_pipeline(cfg), selected)  # before a Prefect server is started
    except StageSelectionError as err:
        _fail(str(err))
    with run_log(cfg.work_path, debug=debug) as log:
        try:
            with result_storage(cfg), run_tags(cfg, selected):
                reports = cptflow_pipeline(
                    config_path=str(config),
                    only=only,
                    from_stage=from_stage,
                    force=force,
                    work_dir=str(work_dir) if work_dir else None,
                )
        except StageSelectionError as err:
            _fail(str(err))
        except Exception as error:  # a stage failed: one short block here, the tracebacks in the log file
            report = log.report or failure_report(  # the flow's own report, or one for a failure outside it
                cfg,
                None,
                error,
                config_path=str(config),
                work_dir=str(work_dir) if work_dir else None,
                only=only,
                from_stage=from_stage,
                force=force,
            )
            report["log"] = log.save(error)
            if debug:
                traceback.print_exception(error)
            _print_failure(failure_lines(report))
            raise typer.Exit(1) from None
        if log.quiet and log.quiet.hidden:  # e.g. a training stage that failed once, then passed on its retry
            _warn(f"{log.quiet.hidden} error lines of this run were kept off the terminal: {log.save()}")
    _print_reports(reports)


def _print_failure(lines: list[str]) -> None:
    err_console.print(f"[bold red]error:[/] {escape(lines[0])}", highlight=False, soft_wrap=True)
    for line in lines[1:]:
        err_console.print(line, highlight=False, soft_wrap=True, markup=False)


def _print_reports(reports: list[dict]) -> None:
    table = Table(title="cptflow: stage summary")
    for column in ("stage", "state", "in", "kept", "excluded", "rejected", "seconds", "fingerprint"):
        table.add_column(
            column, justify="right" if column in ("in", "kept", "excluded", "rejected", "seconds") else "left"
        )
    for report in reports:
        counts = report.get("counts") or {}
        table.add_row(
            report["stage"],
            report["state"],
            str(counts.get("in", "")),
            str(counts.get("kept", "")),
            str(sum(counts.get("excluded", {}).values())) if counts else "",
            str(sum(counts.get("rejected", {}).values())) if counts else "",
            f"{report['seconds']:.1f}" if report.get("seconds") is not None else "",
            report["fingerprint"],
        )
    console.print(table)
    for report in reports:
        counts = report.get("counts") or {}
        reasons = {**counts.get("excluded", {}), **{f"rejected:{k}": v for k, v in counts.get("rejected", {}).items()}}
        if reasons:
            top = ", ".join(f"{k}={v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
            console.print(f"  {report['stage']}: {top}", highlight=False)
    for report in reports:
        if report.get("result"):
            console.print(f"  {report['stage']}: {report['result']}", highlight=False)
    evaluate = next((r for r in reports if r["stage"] == "evaluate" and r["state"] != "not run"), None)
    if evaluate:
        manifest = read_manifest(Path(evaluate["directory"]))
        if manifest:
            console.print(
                "\nForgetting: perplexity on held-out text (lower is better)\n" + manifest["forgetting_table"],
                highlight=False,
            )
            console.print(f"Exported model: {Path(evaluate['directory']) / 'export'}", highlight=False)


@app.command()
def status(
    config: Path = CONFIG_ARG, work_dir: Optional[Path] = WORK_DIR_OPT, as_json: bool = typer.Option(False, "--json")
) -> None:
    """Per stage: fingerprint, done/stale/missing, counts and duration."""
    from cptflow.plan import stage_status

    cfg = _load(config, work_dir)
    try:
        rows = stage_status(cfg)
    except ValueError as err:
        _fail(str(err))
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title=f"cptflow status: {cfg.name} ({cfg.work_path})")
    for column in ("stage", "fingerprint", "state", "in", "kept", "dropped", "seconds"):
        table.add_column(column)
    colours = {"done": "green", "stale": "yellow", "missing": "red"}
    for row in rows:
        counts = row["counts"] or {}
        dropped = sum(counts.get("excluded", {}).values()) + sum(counts.get("rejected", {}).values()) if counts else ""
        table.add_row(
            row["stage"],
            row["fingerprint"],
            f"[{colours[row['state']]}]{row['state']}[/]",
            str(counts.get("in", "")),
            str(counts.get("kept", "")),
            str(dropped),
            str(row["seconds"] or ""),
        )
    console.print(table)
    for row in rows:  # a verdict is a sentence: under the table, not in a column
        if row.get("gates"):
            colour = "green" if row["gates"].startswith("pass") else "red"
            console.print(f"  {row['stage']} gates: [{colour}]{row['gates']}[/]", highlight=False)


@app.command()
def serve(
    config: Path = CONFIG_ARG,
    cron: Optional[str] = typer.Option(
        None, "--cron", help="Run the whole pipeline on this cron schedule, e.g. '0 2 * * *' (02:00 daily)"
    ),
    interval: Optional[float] = typer.Option(None, "--interval", help="...or every this many seconds"),
    work_dir: Optional[Path] = WORK_DIR_OPT,
) -> None:
    """Serve the pipeline as Prefect deployments; their runs execute here until Ctrl-C.

    Registers with the Prefect server in PREFECT_API_URL (start one with `cptflow ui`):

    \b
    cptflow-pipeline/NAME        the whole pipeline, on --cron/--interval
    cptflow-pipeline/NAME-STAGE  one stage (only=[STAGE]); its upstream must be done

    NAME is the config's `name`. Run one from the UI (a form for only, from_stage, force, work_dir) or with \
`prefect deployment run 'cptflow-pipeline/NAME-2-quality'`. Two runs of one deployment never overlap: a run due \
while the previous one still works waits for it.
    """
    from cptflow.config import ConfigError
    from cptflow.flows.deployments import build_deployments, prefect_api_url, serve_deployments

    if cron and interval:
        _fail("give --cron or --interval, not both")
    if not prefect_api_url():
        _fail(
            "PREFECT_API_URL is not set: a schedule needs a Prefect server that outlives this command. "
            "Start one with `cptflow ui`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
        )
    try:
        deployments = build_deployments(config, cron=cron, interval=interval, work_dir=work_dir)
    except ConfigError as err:
        _fail(str(err))
    except ValueError as err:  # an invalid cron expression or interval
        from pydantic import ValidationError

        _fail(f"--cron: {err.errors()[0]['msg']}" if isinstance(err, ValidationError) else str(err))
    serve_deployments(deployments, _load(config, work_dir), warn=_warn)


def write_demo(directory: Path, force: bool = False) -> Path:
    """Copy the demo config and the sample data (package data: present in a wheel install too) into
    `directory` as configs/demo.yaml and data/, the layout of the repository. Returns the config path."""
    directory = Path(directory)
    config = directory / "configs" / "demo.yaml"
    data = directory / "data"
    if not force and (config.exists() or data.exists()):
        raise FileExistsError(f"{directory} already holds configs/demo.yaml or data/ (pass --force to overwrite them)")
    sample_data = Path(str(importlib.resources.files("cptflow.sample_data")))
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(sample_data, data, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    config.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(str(importlib.resources.files("cptflow.sample_configs"))) / "demo.yaml", config)
    return config


@app.command()
def demo(
    directory: Path = typer.Argument(..., help="Where to write configs/demo.yaml and data/ (created if missing)"),
    force: bool = typer.Option(False, "--force", help="Overwrite a demo written there before"),
) -> None:
    """Write the embedded demo (config and sample corpora) into DIRECTORY, to run from anywhere cptflow
    is installed: `cptflow run DIRECTORY/configs/demo.yaml`."""
    try:
        config = write_demo(directory, force=force)
    except FileExistsError as err:
        _fail(str(err))
    console.print(f"Wrote {config} and {directory / 'data'}", highlight=False, soft_wrap=True)
    console.print(f"Run it: cptflow run {config}", highlight=False, soft_wrap=True)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _browser_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def ui_command(host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """argv and environment of `prefect server start` for `cptflow ui`: SQLite in ./.prefect unless
    PREFECT_HOME is set, no analytics, bound to `host` whatever PREFECT_SERVER_API_HOST says."""
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # Concurrency-slot leases on disk, so a restarted server still expires the leases of dead runs.
    env.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect.server.concurrency.lease_storage.filesystem")
    env["PREFECT_SERVER_API_HOST"], env["PREFECT_SERVER_API_PORT"] = host, str(port)
    # The UI's own API address: prefect 3.8 derives it from PREFECT_API_URL or the settings, not from
    # --port, so without this a UI on another port (or with PREFECT_API_URL exported) calls :4200.
    env.setdefault("PREFECT_UI_API_URL", f"http://{_browser_host(host)}:{port}/api")
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    return argv, env


@app.command()
def ui(
    host: Optional[str] = typer.Option(
        None,
        "--host",
        show_default="127.0.0.1",
        help="Interface to listen on; 0.0.0.0 exposes the server to the network",
    ),
    port: int = typer.Option(4200, "--port", help="Port of the UI and the API"),
) -> None:
    """Start a local Prefect server and its UI; Ctrl-C stops it.

    Its database is SQLite in ./.prefect unless PREFECT_HOME is set. The server has no login, so it listens on \
127.0.0.1 unless --host says otherwise. It prints the `export PREFECT_API_URL=...` line that sends `cptflow run` \
and `cptflow serve` to it.
    """
    if host is None:
        configured = os.environ.get("PREFECT_SERVER_API_HOST")
        if configured and configured not in LOOPBACK_HOSTS:
            err_console.print(
                f"[yellow]note:[/] ignoring PREFECT_SERVER_API_HOST={configured}; listening on 127.0.0.1 "
                f"(pass --host {configured} to expose the server)",
                highlight=False,
            )
        host = "127.0.0.1"
    elif host not in LOOPBACK_HOSTS:
        err_console.print(
            f"[yellow]warning:[/] listening on {host}: anyone who can reach this port can run and delete flows "
            "(the Prefect server has no login; set PREFECT_SERVER_API_AUTH_STRING or put it behind a proxy)",
            highlight=False,
        )
    argv, env = ui_command(host, port)
    local = _browser_host(host)
    if local != host:
        err_console.print(
            f"[yellow]note:[/] browsers on other machines need PREFECT_UI_API_URL=http://<this machine>:{port}/api",
            highlight=False,
        )
    console.print(
        f"Prefect UI: http://{local}:{port}  (ready in 15-30 s; Ctrl-C stops it)", highlight=False, soft_wrap=True
    )
    console.print(f"Database: {env['PREFECT_HOME']}", highlight=False, soft_wrap=True)
    console.print("Point cptflow at it, in another shell:", highlight=False)
    console.print(f"  export PREFECT_API_URL=http://{local}:{port}/api", highlight=False, soft_wrap=True)

    def stop(signum, frame):  # `docker stop`, a terminal closed: take the server down with us
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started with SIGINT ignored (`cmd &` in a script)
    # Own session: the server gets exactly one, orderly stop signal from us, not the terminal's as well.
    server = subprocess.Popen(argv, env=env, start_new_session=True)
    try:
        code = server.wait()
    except KeyboardInterrupt:
        server.send_signal(signal.SIGINT)
        try:
            code = server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
        console.print("Prefect server stopped.")
        code = 0 if code in (0, -signal.SIGINT, 130) else code
    raise typer.Exit(code)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
