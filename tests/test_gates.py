"""Forgetting gates: limits on held-out perplexity, judged on the numbers a stage measured."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from test_flow import corpus  # noqa: F401  (the flow tests' sample corpus, which prepared needs)
from test_training import prepared  # noqa: F401  (the training tests' prepared data stages)

from cptflow.gates import (
    EvaluateGates,
    GateBreach,
    TrainingGates,
    enforce,
    judge_evaluate,
    judge_training,
    verdict_line,
)

# The demo's forgetting table (issue 15): sft raised domain perplexity 52% above what cpt reached.
DEMO = {
    "base": {"domain": 2265.85, "general": 16.81},
    "cpt": {"domain": 30.73, "general": 12.67},
    "sft": {"domain": 46.60, "general": 15.46},
}


def test_evaluate_gates_judge_the_forgetting_table():
    gates = EvaluateGates(
        on_breach="fail",
        limits=[
            {"eval_set": "general", "model": "sft", "baseline": "base", "max_increase_pct": 10},
            {"eval_set": "domain", "model": "sft", "baseline": "cpt", "max_increase_pct": 25},
        ],
    )
    summary = judge_evaluate(DEMO, gates)
    general, domain = summary["results"]
    assert general["passed"] and general["change_pct"] == pytest.approx(-8.031, abs=1e-3)
    assert not domain["passed"] and domain["change_pct"] == pytest.approx(51.644, abs=1e-3)
    assert summary["verdict"] == "breach"
    assert domain["message"] == "domain perplexity of sft vs cpt 46.60 is +51.6% over 30.73 (limit +25.0%)"

    with pytest.raises(GateBreach) as caught:
        enforce("evaluate", summary, "/work/evaluate/abc")
    error = caught.value
    assert isinstance(error, ValueError)  # deterministic: never retried
    assert error.stage == "evaluate" and [b["gate"] for b in error.breaches] == ["domain perplexity of sft vs cpt"]
    assert "+51.6% over 30.73 (limit +25.0%)" in str(error) and "outputs kept in /work/evaluate/abc" in str(error)
    assert verdict_line(summary).startswith("FAILED: domain perplexity of sft vs cpt")


def test_report_only_gates_warn_and_let_the_run_go_on(caplog):
    gates = EvaluateGates(limits=[{"eval_set": "domain", "baseline": "cpt", "max_increase_pct": 25}])
    assert gates.on_breach == "report"  # the default: existing configs keep passing
    summary = judge_evaluate(DEMO, gates)
    with caplog.at_level("WARNING", logger="cptflow.gates"):
        enforce("evaluate", summary)
    assert "gate breached (report)" in caplog.text and "+51.6%" in caplog.text
    assert verdict_line(summary).startswith("breach (report-only): ")
    passing = judge_evaluate(DEMO, EvaluateGates(limits=[{"eval_set": "general", "max_increase_pct": 0}]))
    assert passing["verdict"] == "pass" and verdict_line(passing) == "pass (1 gates)"
    assert verdict_line(judge_evaluate(DEMO, EvaluateGates())) == ""  # no limits: nothing to show


def test_gate_configs_are_checked():
    with pytest.raises(ValidationError, match="baseline 'cpt' goes with model 'sft'"):
        EvaluateGates(limits=[{"eval_set": "domain", "model": "cpt", "baseline": "cpt", "max_increase_pct": 1}])
    with pytest.raises(ValidationError, match="Extra inputs"):
        EvaluateGates(limits=[{"eval_set": "domain", "max_increase": 1}])
    with pytest.raises(ValidationError):
        TrainingGates(on_breach="stop")
    with pytest.raises(ValidationError, match="Extra inputs"):  # a training gate compares with its own start
        TrainingGates(limits=[{"eval_set": "general", "baseline": "base", "max_increase_pct": 1}])


def test_training_gates_compare_an_eval_with_the_start_of_the_stage():
    start = {"step": 0, "domain_eval": {"perplexity": 30.0}, "general_eval": {"perplexity": 12.0}}
    later = {"step": 4, "domain_eval": {"perplexity": 36.0}, "general_eval": {"perplexity": 12.5}}
    gates = TrainingGates(
        on_breach="fail",
        limits=[{"eval_set": "domain", "max_increase_pct": 10}, {"eval_set": "general", "max_increase_pct": 10}],
    )
    summary = judge_training("sft", later, start, gates)
    domain, general = summary["results"]
    assert not domain["passed"] and domain["change_pct"] == 20.0 and domain["step"] == 4
    assert general["passed"]
    assert (
        domain["message"] == "domain perplexity at step 4 vs the start of sft 36.00 is +20.0% over 30.00 (limit +10.0%)"
    )
    with pytest.raises(ValueError, match="no general_eval set"):
        judge_training("sft", {"step": 1, "domain_eval": {"perplexity": 1.0}}, start, gates)


def test_the_forgetting_card_reads_eval_set_first_and_shows_the_gates():
    from cptflow.tasks.evaluate import forgetting_markdown, format_forgetting_table

    gates = EvaluateGates(limits=[{"eval_set": "domain", "baseline": "cpt", "max_increase_pct": 25}])
    manifest = {"forgetting_table": format_forgetting_table(DEMO), "gates": judge_evaluate(DEMO, gates)}
    card = forgetting_markdown(manifest)
    header = next(line for line in card.splitlines() if line.startswith("| eval set"))
    assert header == "| eval set | base | cpt | sft | cpt vs base | sft vs base |"
    assert "| domain | 2265.85 | 30.73 | 46.60 | -98.6% | -97.9% |" in card
    assert "| domain perplexity of sft vs cpt | +51.6% | +25.0% | **breach** |" in card
    assert "Gates" not in forgetting_markdown({"forgetting_table": manifest["forgetting_table"]})


@pytest.mark.slow  # three short cpt runs (a minute or two on 2 cores): `make test-slow`
def test_a_cpt_gate_stops_training_after_its_checkpoint_and_a_rerun_judges_again(prepared, tmp_path):  # noqa: F811
    """on_breach: fail at an eval step raises GateBreach after that step's checkpoint; the rerun resumes
    there and breaches again without training on; report-only records every breach and finishes."""
    from test_training import work_copy, write_variant

    import cptflow.tasks.cpt as cpt
    from cptflow.config import load_config
    from cptflow.plan import plan_pipeline

    impossible = {"limits": [{"eval_set": "general", "max_increase_pct": -99}]}
    work = work_copy(prepared, tmp_path / "work")
    cfg = load_config(write_variant(prepared, tmp_path / "fail", gates={"on_breach": "fail", **impossible}), work)
    run = plan_pipeline(cfg)["cpt"]
    with pytest.raises(GateBreach, match=r"cpt: gate breached: general perplexity at step 2 vs the start of cpt"):
        cpt.run(run, cfg)
    assert not run.is_done()
    checkpoints = sorted(p.name for p in (run.path / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-00000002"]  # the breaching step's checkpoint stays on disk
    with pytest.raises(GateBreach, match="at step 2"):
        cpt.run(run, cfg)
    assert sorted(p.name for p in (run.path / "checkpoints").glob("step-*")) == checkpoints

    # Gates are not in the fingerprint: report-only continues the same stage from its checkpoint.
    report = load_config(write_variant(prepared, tmp_path / "report", gates=impossible), work)
    assert plan_pipeline(report)["cpt"].fingerprint == run.fingerprint
    manifest = cpt.run(plan_pipeline(report)["cpt"], report)
    gates = manifest["gates"]
    assert manifest["train"]["resumed_from"] == "step-00000002"
    assert gates["verdict"] == "breach" and gates["on_breach"] == "report"
    assert [r["step"] for r in gates["results"]] == [e["step"] for e in manifest["evals"]]
    assert gates["start"]["general_eval"]["perplexity"] > 0
