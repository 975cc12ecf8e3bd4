"""The `cptflow` command: --help, validate, status --json, and clear errors before any work."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cptflow.cli import app
from cptflow.plan import PIPELINE_STAGES

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert all(command in result.output for command in ("run", "validate", "status"))


def test_validate_accepts_the_demo_config():
    result = runner.invoke(app, ["validate", DEMO])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


def test_validate_reports_a_missing_input_without_a_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "name: bad\nbase_model: builtin:tiny-llama\nsources:\n  - {name: web, role: general, paths: [missing.jsonl]}\n"
    )
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == 2
    assert "input path 'missing.jsonl' does not exist" in result.output and "Traceback" not in result.output


def test_status_json_on_an_empty_work_dir_lists_every_stage_missing(tmp_path):
    result = runner.invoke(app, ["status", DEMO, "--work-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["stage"] for r in rows] == list(PIPELINE_STAGES)
    assert all(r["state"] == "missing" and r["manifest"] is None and len(r["fingerprint"]) == 16 for r in rows)


def test_run_only_a_stage_whose_upstream_is_missing_fails_before_any_work(tmp_path):
    result = runner.invoke(app, ["run", DEMO, "--only", "perplexity", "--work-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "needs the output of 'quality'" in result.output
    assert list(tmp_path.iterdir()) == []


def test_run_rejects_an_unknown_stage(tmp_path):
    result = runner.invoke(app, ["run", DEMO, "--from", "train", "--work-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown stage 'train'" in result.output


def test_demo_writes_a_config_and_data_that_validate_anywhere(tmp_path):
    """`cptflow demo DIR` copies the packaged config and sample data; the copy validates on its own and
    plans the same stages; a second call refuses to overwrite unless --force."""
    target = tmp_path / "somewhere"
    result = runner.invoke(app, ["demo", str(target)])
    assert result.exit_code == 0, result.output
    config = target / "configs" / "demo.yaml"
    assert config.read_bytes() == (REPO / "configs" / "demo.yaml").read_bytes()
    shipped = sorted(p.relative_to(REPO / "data") for p in (REPO / "data" / "raw").rglob("*") if p.is_file())
    assert (
        shipped
        and sorted(p.relative_to(target / "data") for p in (target / "data" / "raw").rglob("*") if p.is_file())
        == shipped
    )
    assert (target / "data" / "instructions" / "alpaca.jsonl").is_file()
    assert not list((target / "data").rglob("*.py"))
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["demo", str(target)])
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, ["demo", str(target), "--force"]).exit_code == 0
