"""Runs killed without a word (SIGKILL, OOM, a lost machine): marked Crashed by the server's automation,
reported on their run page, their GPU slot back; a waiting stage names the slot's holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from test_flow import corpus, write_config  # noqa: F401  (corpus is a fixture)
from test_ops import api, real_prefect_server, stop_process_group

from cptflow.config import load_config
from cptflow.plan import plan_pipeline
from cptflow.store import read_manifest


def test_the_crash_automation_is_prefects_zombie_pattern_for_cptflow_runs(prefect_harness, monkeypatch):
    from prefect.client.orchestration import get_client

    from cptflow.flows.crashes import AUTOMATION_NAME, ensure_crash_automation

    monkeypatch.setenv("CPTFLOW_CRASH_AFTER_SECONDS", "120")
    first = ensure_crash_automation()
    assert first in ("created", "updated")  # another test of this session may have created it
    assert ensure_crash_automation() == "present"
    with get_client(sync_client=True) as client:
        (automation,) = client.read_automations_by_name(AUTOMATION_NAME)
    trigger = automation.trigger
    assert trigger.posture == "Proactive" and trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Crashed"} <= trigger.expect
    assert trigger.within.total_seconds() == 120 and trigger.for_each == {"prefect.resource.id"}
    assert trigger.match_related.model_dump() == {"prefect.resource.id": "prefect.tag.cptflow"}  # only our runs
    assert automation.actions[0].state == "CRASHED"
    monkeypatch.setenv("CPTFLOW_CRASH_AFTER_SECONDS", "90")
    assert ensure_crash_automation() == "updated"  # a changed bound reaches the server


def test_every_flow_run_sends_heartbeats():
    """Set before Prefect reads its settings, in the CLI's process and so in every run `serve` starts."""
    code = (
        "import cptflow.flows.pipeline; from prefect.settings import get_current_settings; "
        "print(get_current_settings().flows.heartbeat_frequency)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"}
    out = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "30"


def test_a_crashed_run_gets_its_failure_report_once(prefect_harness, corpus, tiny_llama_dir, tmp_path):  # noqa: F811
    """A run marked Crashed (as the automation does) gets the `pipeline-failure` artifact it could not
    write: the stage it died in, the command that resumes it, no *Retry* (it has no deployment)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
    from prefect.states import Crashed, Running

    from cptflow.flows.crashes import report_crashed_runs
    from cptflow.flows.pipeline import cptflow_pipeline
    from cptflow.plan import run_data_stage_plain

    config = write_config(tmp_path, corpus, tiny_llama_dir)
    cfg = load_config(config)
    runs = plan_pipeline(cfg)
    run_data_stage_plain(runs["clean"], cfg)  # it died in quality
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(cptflow_pipeline)
        flow_run = client.create_flow_run(
            cptflow_pipeline, parameters={"config_path": str(config)}, tags=["cptflow", cfg.name], state=Running()
        )
        assert flow_id == flow_run.flow_id
        client.set_flow_run_state(flow_run.id, Crashed(message="cptflow: no heartbeat for 90 s (killed)"), force=True)
        logged = []
        assert flow_run.id in report_crashed_runs(logged.append)
        assert report_crashed_runs() == []  # reported once
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pipeline-failure"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
        )
    text = artifact.data
    assert "Crashed in stage **quality**" in text and "no heartbeat for 90 s" in text
    assert f"cptflow run {config}" in text and "Retry" not in text
    assert logged and "crashed" in logged[0]


def test_a_waiting_stage_names_the_run_holding_the_slot(prefect_harness, caplog):
    """A second holder waits and says which run holds the slot and since when (from the server's
    concurrency events), then gets it when the first lets go."""
    import threading

    from prefect import flow
    from prefect.logging import get_run_logger

    from cptflow.flows.pipeline import ensure_concurrency_limit, server_slot

    ensure_concurrency_limit("gpu-holder-test", 1)
    holding, release, waited = threading.Event(), threading.Event(), []

    @flow(name="slot-holder", flow_run_name="holder-run")
    def holder():
        with server_slot("gpu-holder-test", "cpt", get_run_logger()):
            holding.set()
            release.wait(120)

    @flow(name="slot-waiter", flow_run_name="waiter-run")
    def waiter():
        with server_slot("gpu-holder-test", "sft", get_run_logger()):
            waited.append(time.monotonic())

    first = threading.Thread(target=holder)
    first.start()
    assert holding.wait(60)
    caplog.set_level("INFO")
    second = threading.Thread(target=waiter)
    second.start()
    time.sleep(8)
    assert not waited
    release.set()
    first.join(60)
    second.join(120)
    assert waited
    lines = [r.getMessage() for r in caplog.records if "waiting for a slot" in r.getMessage()]
    assert lines and "held by run holder-run (Running) since 20" in lines[0], lines


# ----------------------------------------------------------------------------------------------------
# The whole story on a real server
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow  # minutes: a real `prefect server start`, a kill, the crash window
def test_a_run_killed_mid_cpt_is_crashed_and_the_next_run_trains(corpus, tiny_llama_dir, tmp_path):  # noqa: F811
    """`cptflow run` against `prefect server start`, SIGKILLed (with its torchrun tree) while cpt trains:
    the server marks it Crashed within the bound and frees its `gpu` slot; the next run says who holds
    the slot while it waits, trains cpt from the killed run's checkpoint, and writes the dead run's
    failure report."""
    first = None
    with real_prefect_server(
        tmp_path, CPTFLOW_CRASH_AFTER_SECONDS="45", PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS="5"
    ) as (base, env):
        try:
            config = write_config(tmp_path, corpus, tiny_llama_dir, launch={"launcher": "torchrun"})
            data = yaml.safe_load(config.read_text())
            data["cpt"].update(max_steps=200, save_steps=4, eval_steps=200, retries=0)
            config.write_text(yaml.safe_dump(data))
            runs = plan_pipeline(load_config(config))
            checkpoints = runs["cpt"].path / "checkpoints"
            first = subprocess.Popen(
                [sys.executable, "-m", "cptflow.cli", "run", str(config)],
                env=env,
                cwd=tmp_path,
                stdout=open(tmp_path / "first.log", "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            deadline = time.monotonic() + 600
            while not any(checkpoints.glob("step-*")):
                assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[
                    -3000:
                ]
                time.sleep(0.5)
            os.killpg(first.pid, signal.SIGKILL)  # the run, its torchrun tree, its heartbeats: all at once
            killed_at = time.monotonic()
            first.wait()

            (killed,) = api(base, "/flow_runs/filter", {"flows": {"name": {"any_": ["cptflow-pipeline"]}}})
            assert killed["state_type"] == "RUNNING"  # nobody told the server
            second = subprocess.run(
                [sys.executable, "-m", "cptflow.cli", "run", str(config), "--only", "cpt"],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=900,
            )
            log = second.stdout + second.stderr
            assert second.returncode == 0, log[-4000:]
            state = api(base, f"/flow_runs/{killed['id']}")
            assert state["state_type"] == "CRASHED", state
            assert "no heartbeat for 45 s" in state["state"]["message"]
            crashed_after = time.monotonic() - killed_at  # an upper bound: the second run ended after it was marked
            assert "waiting for a slot of concurrency limit 'gpu'" in log, log[-4000:]
            assert f"held by run {killed['name']} (stage cpt" in " ".join(log.split()), log[-4000:]
            cpt = read_manifest(runs["cpt"].path)
            assert cpt["train"]["resumed_from"].startswith("step-")  # the killed run's checkpoint, not from scratch
            artifacts = api(
                base,
                "/artifacts/filter",
                {"artifacts": {"key": {"any_": ["pipeline-failure"]}}, "flow_runs": {"id": {"any_": [killed["id"]]}}},
            )
            assert artifacts and "Crashed in stage **cpt**" in artifacts[0]["data"], artifacts
            print(f"killed run marked Crashed and the next run done {crashed_after:.0f} s after the kill")
        finally:
            stop_process_group(first, signal.SIGKILL)
            print((tmp_path / "server.log").read_text()[-3000:])
