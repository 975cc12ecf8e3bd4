"""The `cptflow` command: run the pipeline, validate a config, show the state of each stage.

Errors a user can fix (config, inputs, stage selection) are printed as one clear message, not a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

import cptflow  # noqa: F401  (Prefect defaults before prefect is imported)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Continued pretraining pipeline as a Prefect DAG.")
console = Console()
err_console = Console(stderr=True)

CONFIG_ARG = typer.Argument(..., exists=False, help="Pipeline YAML, e.g. configs/demo.yaml")
WORK_DIR_OPT = typer.Option(None, "--work-dir", help="Override the config's work_dir")


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
    from tasks.clean import InputError, check_text_field

    try:
        for source in cfg.sources:
            check_text_field(source, Path(cfg.base_dir))
        plan_pipeline(cfg)
    except (InputError, ValueError) as err:
        _fail(str(err))
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
) -> None:
    """Run the pipeline; finished stages whose inputs and config are unchanged are cached."""
    cfg = _load(config, work_dir)
    from cptflow.plan import plan_pipeline
    from flows.pipeline import StageSelectionError, check_upstreams_available, cptflow_pipeline, select_stages

    try:
        selected, _ = select_stages(only, from_stage, force)
        _preflight(cfg, selected)
        check_upstreams_available(plan_pipeline(cfg), selected)  # before a Prefect server is started
        reports = cptflow_pipeline(
            config_path=str(config), only=only, from_stage=from_stage, force=force, work_dir=str(work_dir) if work_dir else None
        )
    except StageSelectionError as err:
        _fail(str(err))
    _print_reports(reports)


def _print_reports(reports: list[dict]) -> None:
    table = Table(title="cptflow: stage summary")
    for column in ("stage", "state", "in", "kept", "excluded", "rejected", "seconds", "fingerprint"):
        table.add_column(column, justify="right" if column in ("in", "kept", "excluded", "rejected", "seconds") else "left")
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
        from cptflow.store import read_manifest

        manifest = read_manifest(Path(evaluate["directory"]))
        if manifest:
            console.print("\nForgetting: perplexity on held-out text (lower is better)\n" + manifest["forgetting_table"], highlight=False)
            console.print(f"Exported model: {Path(evaluate['directory']) / 'export'}", highlight=False)


@app.command()
def status(config: Path = CONFIG_ARG, work_dir: Optional[Path] = WORK_DIR_OPT, as_json: bool = typer.Option(False, "--json")) -> None:
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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
