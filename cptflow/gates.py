"""Forgetting gates: limits on held-out perplexity ("general at most +10% over base") and their verdicts.

cpt and sft check theirs at every eval step against the model the stage started from; evaluate checks
its forgetting table (base, cpt, sft). The default is report-only: a breach is recorded and shown, the
run goes on. With `on_breach: fail` a breach fails the stage; what was written stays on disk.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)

EvalSet = Literal["domain", "general"]
EVAL_BLOCKS = {"domain": "domain_eval", "general": "general_eval"}  # the eval sets' names in training results


class TrainingGateLimit(BaseModel):
    """Held-out perplexity of the model being trained, against the one the stage started from (for cpt the
    base, for sft the cpt model)."""

    model_config = ConfigDict(extra="forbid")
    eval_set: EvalSet
    max_increase_pct: float = Field(description="Largest allowed change in %, e.g. 10 (+10%); negative asks a drop")


class EvaluateGateLimit(BaseModel):
    """A cell of the forgetting table against another: `model`'s perplexity on `eval_set` over `baseline`'s."""

    model_config = ConfigDict(extra="forbid")
    eval_set: EvalSet
    model: Literal["cpt", "sft"] = "sft"
    baseline: Literal["base", "cpt"] = "base"
    max_increase_pct: float = Field(description="Largest allowed change in %, e.g. 10 (+10%); negative asks a drop")

    @model_validator(mode="after")
    def _baseline_before_model(self):
        if self.baseline == "cpt" and self.model == "cpt":
            raise ValueError("a gate compares two models: baseline 'cpt' goes with model 'sft'")
        return self


class TrainingGates(BaseModel):
    model_config = ConfigDict(extra="forbid")
    on_breach: Literal["report", "fail"] = Field("report", description="report: record and warn; fail: stop the stage")
    limits: list[TrainingGateLimit] = Field(default_factory=list)


class EvaluateGates(BaseModel):
    model_config = ConfigDict(extra="forbid")
    on_breach: Literal["report", "fail"] = Field("report", description="report: record and warn; fail: fail the run")
    limits: list[EvaluateGateLimit] = Field(default_factory=list)


class GateBreach(ValueError):
    """A limit was exceeded. A ValueError: the same weights breach it again, so it is never retried."""

    hint = (
        "Gates are not part of a stage's fingerprint: after changing a limit (or setting on_breach: report), "
        "the same command re-judges without recomputing what is done."
    )

    def __init__(self, stage: str, breaches: list[dict], directory: str | None = None):
        self.stage, self.breaches, self.directory = stage, breaches, directory
        where = f"; outputs kept in {directory}" if directory else ""
        super().__init__(f"{stage}: gate breached: " + "; ".join(b["message"] for b in breaches) + where)


def change_pct(value: float, baseline: float) -> float:
    return round(100.0 * (value - baseline) / baseline, 3)


def _verdict(name: str, value: float, baseline_value: float, limit_pct: float, **where) -> dict:
    change = change_pct(value, baseline_value)
    passed = change <= limit_pct
    message = f"{name} {value:.2f} is {change:+.1f}% over {baseline_value:.2f} (limit {limit_pct:+.1f}%)"
    return {
        "gate": name,
        **where,
        "value": round(value, 4),
        "baseline_value": round(baseline_value, 4),
        "change_pct": change,
        "limit_pct": limit_pct,
        "passed": passed,
        "message": message,
    }


def judge_evaluate(perplexity: dict, gates: EvaluateGates) -> dict:
    """Verdicts of evaluate's limits on {model: {eval_set: perplexity}}."""
    results = []
    for limit in gates.limits:
        name = f"{limit.eval_set} perplexity of {limit.model} vs {limit.baseline}"
        results.append(
            _verdict(
                name,
                perplexity[limit.model][limit.eval_set],
                perplexity[limit.baseline][limit.eval_set],
                limit.max_increase_pct,
                eval_set=limit.eval_set,
                model=limit.model,
                baseline=limit.baseline,
            )
        )
    return _summary(results, gates.on_breach)


def judge_training(stage: str, evaluation: dict, start: dict, gates: TrainingGates) -> dict:
    """Verdicts of a training stage's limits on one eval ({"domain_eval": {"perplexity": ...}, ...})
    against the eval of the model the stage started from."""
    results = []
    for limit in gates.limits:
        key = EVAL_BLOCKS[limit.eval_set]
        if key not in evaluation or key not in start:
            raise ValueError(f"{stage}: gate on {limit.eval_set} perplexity, but this stage has no {key} set")
        name = f"{limit.eval_set} perplexity at step {evaluation.get('step', '?')} vs the start of {stage}"
        results.append(
            _verdict(
                name,
                evaluation[key]["perplexity"],
                start[key]["perplexity"],
                limit.max_increase_pct,
                eval_set=limit.eval_set,
                step=evaluation.get("step"),
            )
        )
    return _summary(results, gates.on_breach)


def _summary(results: list[dict], on_breach: str) -> dict:
    breached = [r for r in results if not r["passed"]]
    return {
        "on_breach": on_breach,
        "verdict": "breach" if breached else "pass",
        "results": results,
    }


def enforce(stage: str, summary: dict, directory: str | None = None, *, warn=logger.warning) -> None:
    """Warn about each breach (through `warn`: the flow passes its run logger); raise GateBreach when the
    gates say fail."""
    breaches = [r for r in summary["results"] if not r["passed"]]
    for breach in breaches:
        warn("%s: gate breached (%s): %s", stage, summary["on_breach"], breach["message"])
    if breaches and summary["on_breach"] == "fail":
        raise GateBreach(stage, breaches, directory)


def verdict_line(summary: dict | None) -> str:
    """One line for `cptflow status`: pass, or the breaches."""
    if not summary or not summary["results"]:
        return ""
    breaches = [r for r in summary["results"] if not r["passed"]]
    if not breaches:
        return f"pass ({len(summary['results'])} gates)"
    prefix = "FAILED" if summary["on_breach"] == "fail" else "breach (report-only)"
    return prefix + ": " + "; ".join(b["message"] for b in breaches)
