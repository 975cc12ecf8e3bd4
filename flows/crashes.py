"""Runs that die without a word (SIGKILL, the OOM killer, a lost machine): marked Crashed by the server,
reported like any failure, their GPU slot back within a bounded time.

Prefect's documented zombie-run pattern, owned by the server:
- every flow run emits a heartbeat event every HEARTBEAT_SECONDS (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, set
  in cptflow/flows/__init__.py before Prefect is imported);
- an automation (`ensure_crash_automation`, created by every run and by `cptflow serve`) marks a run of a
  cptflow pipeline Crashed when CRASH_AFTER_SECONDS pass after a heartbeat with neither a heartbeat nor a
  final state;
- the `gpu` slot is a lease of SLOT_LEASE_SECONDS that the holder renews while it lives; the server's
  repossessor frees an expired one, so a dead holder's slot comes back about a minute after its death.

The dead process cannot write its own `pipeline-failure` artifact, so whoever comes next does:
`report_crashed_runs` runs at the start and end of every pipeline run and every minute in `cptflow serve`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType

from cptflow.config import load_config
from cptflow.flows.failure import failed_stage, failure_markdown, failure_report, notify
from cptflow.plan import PIPELINE_STAGES, plan_pipeline, select_stages

PIPELINE_FLOW = "cptflow-pipeline"
AUTOMATION_NAME = "cptflow: crash runs whose heartbeat stopped"
CRASH_MESSAGE = "cptflow: no heartbeat for {seconds} s (the process was killed, ran out of memory or lost its machine)"
FAILURE_KEY = "pipeline-failure"


def heartbeat_seconds() -> int:
    """Prefect's own floor is 30 s (flow_engine.MINIMUM_HEARTBEAT_INTERVAL)."""
    return max(30, int(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")))


def crash_after_seconds() -> int:
    """Three missed heartbeats by default; CPTFLOW_CRASH_AFTER_SECONDS (more than one heartbeat)."""
    return max(heartbeat_seconds() + 5, int(os.environ.get("CPTFLOW_CRASH_AFTER_SECONDS", "90")))


def slot_lease_seconds() -> float:
    """The server's minimum lease (60 s): the longest a dead holder keeps its slot, plus one repossessor
    loop (15 s by default)."""
    return max(60.0, float(os.environ.get("CPTFLOW_SLOT_LEASE_SECONDS", "60")))


def crash_automation():
    from prefect.automations import Automation
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    seconds = crash_after_seconds()
    return Automation(
        name=AUTOMATION_NAME,
        description="Marks a cptflow run Crashed when its heartbeats stop (Prefect's zombie-run pattern).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            # Only cptflow's runs (they carry the tag): other flows on a shared server keep their own policy.
            match_related=ResourceSpecification({"prefect.resource.id": "prefect.tag.cptflow"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=CRASH_MESSAGE.format(seconds=seconds))],
    )


def ensure_crash_automation() -> str:
    """Create (or bring up to date) the automation on the server in use. Returns 'created', 'updated' or
    'present'."""
    from prefect.events.schemas.automations import AutomationCore

    wanted = crash_automation()
    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(AUTOMATION_NAME)
        if not found:
            client.create_automation(AutomationCore(**wanted.model_dump(exclude={"id"})))
            return "created"
        current = found[0]
        if current.trigger.within != wanted.trigger.within or not current.enabled:
            # Replaced, not updated: prefect 3.8's client sends a field its own server refuses on update.
            client.delete_automation(current.id)
            client.create_automation(AutomationCore(**wanted.model_dump(exclude={"id"})))
            return "updated"
        return "present"


# ----------------------------------------------------------------------------------------------------
# The failure artifact of a run that could not write its own
# ----------------------------------------------------------------------------------------------------
def crashed_runs_without_report(client, since_days: float = 7.0, limit: int = 50) -> list:
    """Recently started cptflow pipeline runs in state Crashed that carry no `pipeline-failure` artifact."""
    since = datetime.now(timezone.utc) - timedelta(days=since_days)
    crashed = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[PIPELINE_FLOW])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED])),
            start_time=FlowRunFilterStartTime(after_=since),
            tags=FlowRunFilterTags(all_=["cptflow"]),
        ),
        limit=limit,
    )
    if not crashed:
        return []
    reported = {
        artifact.flow_run_id
        for artifact in client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[FAILURE_KEY])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id for run in crashed])),
        )
    }
    return [run for run in crashed if run.id not in reported]


def stage_at_crash(flow_run_id: UUID) -> str | None:
    """The stage a crashed run was in when it died, from the server: its first stage (in DAG order) whose
    task run (training) or subflow (data) did not finish. The store cannot say: a later run may have
    finished that stage since."""
    from prefect.client.schemas.filters import FlowRunFilterParentFlowRunId, TaskRunFilter, TaskRunFilterFlowRunId

    final = {StateType.COMPLETED, StateType.CANCELLED}
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])), limit=200
        )
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])),
            limit=200,
        )
    unfinished = {run.name for run in [*tasks, *subflows] if run.state is None or run.state.type not in final}
    return next((stage for stage in PIPELINE_STAGES if stage in unfinished), None)


def crash_report(flow_run) -> tuple[str, str]:
    """(markdown, description) of a crashed pipeline run's report, from its parameters; the configured
    notification goes out too. The stage is the one the server saw unfinished (stage_at_crash), else the
    first selected stage the store does not have as done."""
    parameters = flow_run.parameters or {}
    cause = (flow_run.state.message if flow_run.state else None) or "the run crashed"
    try:
        cfg = load_config(parameters["config_path"], parameters.get("work_dir"))
        selected, _ = select_stages(parameters.get("only"), parameters.get("from_stage"), parameters.get("force"))
        runs = plan_pipeline(cfg)
    except Exception as error:  # the config moved or broke since: say what is known
        markdown = "\n".join(
            [
                f"# cptflow run crashed: {flow_run.name}",
                "",
                f"    cause:  {cause}",
                f"    (its config could not be read to name the stage: {type(error).__name__}: {error})",
            ]
        )
        return markdown, f"cptflow {flow_run.name}: crashed"
    stage = stage_at_crash(flow_run.id) or failed_stage(runs, selected)
    report = failure_report(
        cfg,
        stage,
        cause,
        runs=runs,
        config_path=parameters.get("config_path"),
        work_dir=parameters.get("work_dir"),
        only=parameters.get("only"),
        from_stage=parameters.get("from_stage"),
        force=parameters.get("force"),
    )
    report["kind"] = "crashed"
    markdown = failure_markdown(cfg.name, stage, report, retry=flow_run.deployment_id is not None, crashed=True)
    payload = {
        "pipeline": cfg.name,
        "stage": stage,
        "error": cause,
        "command": report["command"],
        "flow_run_id": str(flow_run.id),
    }
    notify(cfg, payload)
    return markdown, f"cptflow {cfg.name}: crashed in {stage}"


def report_crashed_runs(log: Callable[[str], None] | None = None) -> list[UUID]:
    """Write the `pipeline-failure` artifact of every recently crashed run that lacks one. Returns their ids."""
    done = []
    with get_client(sync_client=True) as client:
        for flow_run in crashed_runs_without_report(client):
            markdown, description = crash_report(flow_run)
            client.create_artifact(
                ArtifactCreate(
                    key=FAILURE_KEY, type="markdown", data=markdown, description=description, flow_run_id=flow_run.id
                )
            )
            done.append(flow_run.id)
            if log is not None:
                log(f"run {flow_run.name} crashed ({flow_run.state.message}); its failure report is on its run page")
    return done


def watch_crashes(every_seconds: float = 60.0, log: Callable[[str], None] | None = None) -> threading.Thread:
    """`cptflow serve`: report crashed runs as they are marked, while it serves."""

    def loop() -> None:
        while True:
            with contextlib.suppress(Exception):  # the server may be restarting: try again next time
                report_crashed_runs(log)
            threading.Event().wait(every_seconds)

    thread = threading.Thread(target=loop, name="cptflow-crash-reports", daemon=True)
    thread.start()
    return thread


# ----------------------------------------------------------------------------------------------------
# Who holds a slot
# ----------------------------------------------------------------------------------------------------
def slot_holders(limit_name: str, since_hours: float = 48.0) -> list[dict] | None:
    """The runs holding a slot of the global concurrency limit `limit_name`, from the server's
    `prefect.concurrency-limit.acquired` events not followed by a `released` one:
    [{run, flow_run_id, stage, since, state}], oldest first. None: the server's events do not say."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    since = datetime.now(timezone.utc) - timedelta(hours=since_hours)
    event_filter = EventFilter(
        event=EventNameFilter(name=["prefect.concurrency-limit.acquired", "prefect.concurrency-limit.released"]),
        resource=EventResourceFilter(labels={"prefect.resource.name": limit_name}),
        occurred=EventOccurredFilter(since=since),
    )
    with get_client(sync_client=True) as client:
        page = client.read_events(filter=event_filter, limit=50)  # the server's largest page
        events = list(page.events)
        for _ in range(3):  # the most recent 200 events: a holder acquired its slot among them
            if not page.next_page:
                break
            page = client.read_events_page(page.next_page)
            events += page.events
        released = {event.follows for event in events if event.event.endswith(".released")}
        holders = []
        for event in sorted(events, key=lambda e: e.occurred):
            if event.event.endswith(".released") or event.id in released:
                continue
            related = {resource.role: resource for resource in event.related}
            run = related.get("flow-run")
            task = related.get("task-run")
            holder = {
                "run": run.name if run else None,
                "flow_run_id": run.id.rsplit(".", 1)[-1] if run else None,
                "stage": task.name if task else None,
                "since": event.occurred,
                "state": None,
            }
            if holder["flow_run_id"]:
                with contextlib.suppress(Exception):
                    state = client.read_flow_run(UUID(holder["flow_run_id"])).state
                    holder["state"] = state.name if state else None
            holders.append(holder)
    return holders


def describe_holders(holders: list[dict] | None, lease_seconds: float) -> str:
    """'held by run demo-20261204-190312 (stage cpt, Running) since 19:03:12 UTC' and the like."""
    if holders is None:
        return "its holder is not known (the server keeps no concurrency events)"
    if not holders:
        return "no holder on record (a slot is being released)"
    parts = []
    for holder in holders:
        since = holder["since"].astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        what = ", ".join(filter(None, [f"stage {holder['stage']}" if holder["stage"] else None, holder["state"]]))
        line = f"run {holder['run'] or holder['flow_run_id'] or '?'}" + (f" ({what})" if what else "")
        line += f" since {since}"
        if holder["state"] and holder["state"] not in ("Running", "Pending"):
            line += (
                f"; it is {holder['state']}, so the server frees its slot when the lease ends (≤ {lease_seconds:.0f} s)"
            )
        parts.append(line)
    return "held by " + "; ".join(parts)
