"""Operations: deployments and schedules, the local UI server, the Ray runner, failure reports, docker/."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from test_flow import corpus, outputs, write_config  # noqa: F401  (corpus is a fixture)

from cptflow.config import load_config
from cptflow.plan import DATA_STAGES, PIPELINE_STAGES, plan_pipeline, run_data_stage_plain
from cptflow.store import read_manifest

REPO = Path(__file__).resolve().parents[1]


def minimal_config(directory: Path, **overrides) -> Path:
    config = {
        "name": "ops",
        "base_model": "builtin:tiny-llama",
        "sources": [{"name": "d", "role": "domain", "paths": ["in"]}],
    }
    config.update(overrides)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------------------------------
# cptflow serve: deployments
# ----------------------------------------------------------------------------------------------------
def test_deployments_register_schedule_and_one_per_stage(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client

    from cptflow.flows.deployments import build_deployments

    config = minimal_config(tmp_path)
    work = tmp_path / "w"
    for deployment in build_deployments(config, cron="0 2 * * *", work_dir=work):
        deployment.apply()

    base = {"config_path": str(config.resolve()), "work_dir": str(work.resolve())}
    with get_client(sync_client=True) as client:
        whole = client.read_deployment_by_name("cptflow-pipeline/ops")
        assert [s.schedule.cron for s in whole.schedules] == ["0 2 * * *"]
        assert whole.parameters == base
        assert whole.entrypoint == "cptflow.flows.pipeline.cptflow_pipeline"
        assert whole.global_concurrency_limit.limit == 1
        assert set(whole.tags) == {"cptflow", "ops"}
        # typed parameters: the UI renders a form
        schema = whole.parameter_openapi_schema
        assert schema["required"] == ["config_path"]
        assert schema["properties"]["only"]["anyOf"][0] == {
            "items": {"enum": list(PIPELINE_STAGES), "type": "string"},  # the run form offers the stages
            "type": "array",
        }
        for position, stage in enumerate(PIPELINE_STAGES, start=1):
            one = client.read_deployment_by_name(f"cptflow-pipeline/ops-{position}-{stage}")
            assert one.parameters == {**base, "only": [stage]}
            assert one.schedules == [] and stage in one.tags
        # The UI lists deployments A-Z: that is pipeline order.
        names = [d.name for d in client.read_deployments() if d.name.startswith("ops")]
        assert sorted(names) == ["ops", *(f"ops-{i}-{stage}" for i, stage in enumerate(PIPELINE_STAGES, start=1))]

        # Serving again with another schedule replaces it.
        build_deployments(config, interval=3600, work_dir=work)[0].apply()
        whole = client.read_deployment_by_name("cptflow-pipeline/ops")
        assert [s.schedule.interval for s in whole.schedules] == [timedelta(hours=1)]


def test_deployments_refuse_cron_and_interval_together(tmp_path):
    from cptflow.flows.deployments import build_deployments

    with pytest.raises(ValueError, match="not both"):
        build_deployments(minimal_config(tmp_path), cron="0 2 * * *", interval=60)


def test_serve_without_a_server_says_how_to_start_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "cptflow.cli", "serve", str(minimal_config(tmp_path)), "--cron", "0 2 * * *"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "PREFECT_API_URL is not set" in result.stderr and "cptflow ui" in result.stderr


def stop_serving(server: subprocess.Popen) -> str:
    """Ctrl-C to a `cptflow serve` process group (SIGKILL if it hangs); returns its output."""
    os.killpg(server.pid, signal.SIGINT)
    try:
        return server.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        return server.communicate()[0]


@pytest.mark.slow  # 80 s: `make test-slow` (the served retry/cancel test there serves deployments too)
def test_served_stage_deployment_runs_the_stage(prefect_harness, corpus, tiny_llama_dir, tmp_path):  # noqa: F811
    """`cptflow serve` in a subprocess; a run of `<name>-clean` created through the API runs clean only."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    secret = "T0SECRET/served-hook"
    config = write_config(tmp_path, corpus, tiny_llama_dir, notify={"webhook_url": f"http://127.0.0.1:9/{secret}"})
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_RUNNER_POLL_FREQUENCY="2")
    server = subprocess.Popen(
        [sys.executable, "-m", "cptflow.cli", "serve", str(config), "--work-dir", str(tmp_path / "served")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    deployment = client.read_deployment_by_name("cptflow-pipeline/flow-test-1-clean")
                    break
                except Exception:
                    assert server.poll() is None and time.monotonic() < deadline, (
                        "serve did not register its deployments"
                    )
                    time.sleep(1)
            flow_run = client.create_flow_run_from_deployment(deployment.id)
            deadline = time.monotonic() + 300
            while not (state := client.read_flow_run(flow_run.id).state).is_final():
                assert server.poll() is None and time.monotonic() < deadline, f"stuck in {state.name}"
                time.sleep(2)
            assert state.is_completed(), state.message
            # The config travels to the stage subflow as a parameter; the UI shows it, never the webhook URL.
            subflows = [run for run in client.read_flow_runs() if run.parent_task_run_id and run.name == "clean"]
            shown = [json.dumps(run.parameters, default=str) for run in subflows]
            assert any('"webhook_url": "**********"' in params for params in shown) and not any(
                secret in params for params in shown
            )
    finally:
        log = stop_serving(server)
    runs = plan_pipeline(load_config(config, tmp_path / "served"))
    assert runs["clean"].is_done() and not runs["quality"].is_done(), log[-3000:]


# ----------------------------------------------------------------------------------------------------
# cptflow ui
# ----------------------------------------------------------------------------------------------------
def test_ui_command_binds_loopback_with_project_home_and_no_analytics(monkeypatch, tmp_path):
    from cptflow.cli import ui_command

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.delenv("PREFECT_UI_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")  # another server's: not the UI's
    argv, env = ui_command("127.0.0.1", 4300)
    assert argv == [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", "4300"]
    assert env["PREFECT_HOME"] == str(tmp_path / ".prefect")
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4300/api"  # the browser calls this server

    monkeypatch.setenv("PREFECT_HOME", "/srv/prefect")  # a home the user chose is kept
    assert ui_command("127.0.0.1", 4200)[1]["PREFECT_HOME"] == "/srv/prefect"


@pytest.mark.slow  # a real server's start-up: `make test-slow`
def test_ui_serves_health_on_loopback_and_stops_on_ctrl_c(tmp_path):
    """The real server: healthy on 127.0.0.1 although the environment asks for 0.0.0.0; SIGINT stops it."""
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_API_HOST="0.0.0.0")
    env.pop("PREFECT_API_URL", None)
    ui = subprocess.Popen(
        [sys.executable, "-m", "cptflow.cli", "ui", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, healthy = time.monotonic() + 60, False
        while not healthy and time.monotonic() < deadline and ui.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                    healthy = response.status == 200
            except OSError:
                time.sleep(1)
        if not healthy and ui.poll() is None:
            pytest.skip("the Prefect server took more than 60 s to become healthy on this machine")
        assert healthy, ui.communicate()[0][-3000:]
        if shutil.which("ss"):
            listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
            assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
    finally:
        ui.send_signal(signal.SIGINT)  # what Ctrl-C does to the foreground process
        log = ui.communicate(timeout=60)[0]
    assert ui.returncode == 0, log[-3000:]
    assert f"export PREFECT_API_URL=http://127.0.0.1:{port}/api" in log
    assert "ignoring PREFECT_SERVER_API_HOST=0.0.0.0" in log and "Prefect server stopped" in log
    with pytest.raises(OSError):  # the server went with it
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)


# ----------------------------------------------------------------------------------------------------
# Ray runner
# ----------------------------------------------------------------------------------------------------
def test_ray_runner_gives_the_same_bytes_as_threads(prefect_harness, corpus, tiny_llama_dir, tmp_path):  # noqa: F811
    pytest.importorskip("prefect_ray", reason="pip install 'cptflow[ray]'")
    from cptflow.flows.pipeline import run_pipeline

    threads = write_config(tmp_path / "threads", corpus, tiny_llama_dir)
    ray = write_config(tmp_path / "ray", corpus, tiny_llama_dir, runner={"kind": "ray", "max_workers": 2})
    by_threads = run_pipeline(threads, only=["clean", "quality"])
    by_ray = run_pipeline(ray, only=["clean", "quality"])
    for ref, res in zip(by_threads[:2], by_ray[:2]):
        assert res["state"] == "ran" and ref["fingerprint"] == res["fingerprint"]
        assert outputs(read_manifest(Path(res["directory"]))) == outputs(read_manifest(Path(ref["directory"])))


def test_ray_runner_without_prefect_ray_names_the_extra(monkeypatch):
    from cptflow.config import RunnerConfig
    from cptflow.flows.pipeline import make_task_runner

    monkeypatch.setitem(sys.modules, "prefect_ray", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'cptflow\[ray\]'"):
        make_task_runner(RunnerConfig(kind="ray"))


# ----------------------------------------------------------------------------------------------------
# Failure report and notification
# ----------------------------------------------------------------------------------------------------
class Webhook:
    """A local HTTP endpoint that records what is POSTed to it and answers `status`."""

    def __init__(self, status: int = 200):
        received, answer = self.received, self.status = [], status

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(
                    {"path": self.path, "json": json.loads(self.rfile.read(int(self.headers["Content-Length"])))}
                )
                self.send_response(answer)
                self.end_headers()

            def log_message(self, *args):  # the default prints the secret path to stderr
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.secret = "T0SECRET/B0HOOK/xoxb-do-not-log-me"
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/{self.secret}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def test_failure_artifact_names_stage_error_and_rerun_command(prefect_harness, webhook, tmp_path, caplog):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from cptflow.flows.failure import publish_failure

    @flow
    def failing_pipeline() -> dict:  # where the pipeline flow calls it: inside its run
        return publish_failure(
            cfg, "quality", RuntimeError("langdetect profile missing"), config_path="configs/my run.yaml"
        )

    caplog.set_level(logging.DEBUG)  # every logger at every level: httpx logs request URLs at INFO
    cfg = load_config(minimal_config(tmp_path, notify={"webhook_url": webhook.url}))
    payload = failing_pipeline()

    command = "cptflow run 'configs/my run.yaml' --from quality"
    assert payload["command"] == command and payload["flow_run_id"]
    assert [r["json"] for r in webhook.received] == [
        {
            "pipeline": "ops",
            "stage": "quality",
            "error": "RuntimeError: langdetect profile missing",
            "command": command,
            "flow_run_id": payload["flow_run_id"],
        }
    ]
    assert webhook.received[0]["path"].endswith(webhook.secret)  # the URL was really used...
    assert webhook.secret not in caplog.text  # ...and never logged
    assert webhook.secret not in repr(cfg) and webhook.secret not in json.dumps(cfg.model_dump(mode="json"))

    with get_client(sync_client=True) as client:
        artifact = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pipeline-failure"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )[0]
    assert "stage **quality**" in artifact.data and "RuntimeError: langdetect profile missing" in artifact.data
    assert command in artifact.data and webhook.secret not in artifact.data
    assert str(artifact.flow_run_id) == payload["flow_run_id"]
    assert "Retry" not in artifact.data  # `prefect flow-run retry` needs a deployment: this run has none


def test_failure_notification_problems_are_logged_without_the_url(prefect_harness, tmp_path, caplog):
    from cptflow.flows.failure import publish_failure

    caplog.set_level(logging.DEBUG)
    refusing = Webhook(status=500)
    try:
        cfg = load_config(minimal_config(tmp_path, notify={"webhook_url": refusing.url}))
        publish_failure(cfg, "cpt", ValueError("out of memory"))  # no raise
    finally:
        refusing.close()
    assert "failure webhook answered HTTP 500" in caplog.text
    cfg = load_config(
        minimal_config(tmp_path, notify={"webhook_url": f"http://127.0.0.1:{free_port()}/{refusing.secret}"})
    )
    publish_failure(cfg, "cpt", ValueError("out of memory"))
    assert "failure webhook not reached: ConnectError" in caplog.text
    assert refusing.secret not in caplog.text


def test_failure_notification_through_a_prefect_block(prefect_harness, webhook, tmp_path, caplog):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from cptflow.flows.failure import publish_failure

    caplog.set_level(logging.DEBUG)
    CustomWebhookNotificationBlock(name="ops", url=webhook.url, json_data={"text": "{{subject}}: {{body}}"}).save(
        "ops-alerts", overwrite=True
    )
    cfg = load_config(minimal_config(tmp_path, notify={"prefect_block": "custom-webhook/ops-alerts"}))
    publish_failure(cfg, "sft", RuntimeError("nan loss"), config_path="p.yaml")
    [received] = webhook.received
    assert (
        received["json"]["text"]
        == "cptflow ops failed in sft: RuntimeError: nan loss\n\nRerun: cptflow run p.yaml --from sft"
    )
    assert webhook.secret not in caplog.text


def test_failed_stage_is_the_first_selected_stage_not_done(corpus, tiny_llama_dir, tmp_path):  # noqa: F811
    from cptflow.flows.failure import failed_stage, rerun_command

    cfg = load_config(write_config(tmp_path, corpus, tiny_llama_dir))
    runs = plan_pipeline(cfg)
    assert failed_stage(runs, list(PIPELINE_STAGES)) == "clean"
    run_data_stage_plain(runs["clean"], cfg)
    assert failed_stage(runs, list(PIPELINE_STAGES)) == "quality"
    assert failed_stage(runs, ["clean"]) is None
    assert rerun_command("c.yaml", "quality", "/w") == "cptflow run c.yaml --from quality --work-dir /w"


def test_notify_section_rejects_unknown_keys(tmp_path):
    from cptflow.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'notify.slack'"):
        load_config(minimal_config(tmp_path, notify={"slack": "x"}))


# ----------------------------------------------------------------------------------------------------
# docker/
# ----------------------------------------------------------------------------------------------------
def test_compose_stack_has_healthchecks_gpu_and_a_loopback_only_ui():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "prefect-server", "worker"}
    assert services["postgres"]["image"] == "postgres:16"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])

    server = services["prefect-server"]
    assert server["image"] == "prefecthq/prefect:3.8.8-python3.11"
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "/api/health" in " ".join(server["healthcheck"]["test"])
    assert server["ports"] == ["127.0.0.1:4200:4200"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"

    worker = services["worker"]
    assert worker["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert worker["command"][:2] == ["cptflow", "serve"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    targets = {volume.split(":")[1] for volume in worker["volumes"]}
    assert {"/data/work", "/data/results", "/data/hf-cache"} <= targets
    for service in services.values():  # no port of the stack open beyond this machine
        assert all(str(port).startswith("127.0.0.1:") for port in service.get("ports", []))


def test_dockerfile_runs_as_non_root_and_fetches_nothing_by_add():
    lines = [line.strip() for line in (REPO / "docker" / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert instructions[0].startswith("FROM nvidia/cuda:") and "runtime" in instructions[0]
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert not [line for line in instructions if line.startswith("ADD ") and "://" in line]
    assert not [
        line for line in instructions if ("curl " in line or "wget " in line) and "| sh" in line.replace("|sh", "| sh")
    ]
    assert any(
        line.startswith("VOLUME ") and "/data/work" in line and "/data/hf-cache" in line for line in instructions
    )
    assert any('"cptflow' in line for line in instructions if line.startswith(("CMD", "ENTRYPOINT")))
    for path in ("cptflow", "flows", "tasks", "pyproject.toml"):  # the image builds from this checkout
        assert any(line.startswith(f"COPY {path}") for line in instructions), path


def test_result_storage_is_a_local_path_or_a_prefect_storage_block(prefect_harness, corpus, tiny_llama_dir, tmp_path):  # noqa: F811
    """The task results that make finished stages `Cached` go where the config says: a local directory, or
    a saved filesystem block (the same mechanism as s3-bucket/... for retries across containers)."""
    from prefect.filesystems import LocalFileSystem

    import cptflow.flows.pipeline as pipeline

    local = write_config(tmp_path / "local", corpus, tiny_llama_dir, results={"local_path": "prefect-results"})
    pipeline.run_pipeline(local, only=["clean"])
    assert [p.name for p in (tmp_path / "local" / "prefect-results").iterdir()]

    LocalFileSystem(basepath=str(tmp_path / "bucket")).save("cptflow-test-results", overwrite=True)
    block = write_config(
        tmp_path / "block", corpus, tiny_llama_dir, results={"block": "local-file-system/cptflow-test-results"}
    )
    pipeline.run_pipeline(block, only=["clean"])
    assert [p.name for p in (tmp_path / "bucket").iterdir()]
    with pytest.raises(ValueError, match="not both"):
        load_config(
            write_config(tmp_path / "both", corpus, tiny_llama_dir, results={"local_path": "x", "block": "s3-bucket/y"})
        )


# ----------------------------------------------------------------------------------------------------
# A served pipeline: retry after a crash, cancel during training
# ----------------------------------------------------------------------------------------------------
def training_processes(marker: str) -> dict[int, list[str]]:
    """pid -> command line of the launcher and workers of a training stage whose spec path contains `marker`."""
    import psutil

    found = {}
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if (
            "cptflow.launch" in cmdline
            and any(marker in arg for arg in cmdline)
            and process.info["status"] != psutil.STATUS_ZOMBIE
        ):
            found[process.info["pid"]] = cmdline
    return found


def wait_until(predicate, seconds: float, what: str, server: subprocess.Popen):
    deadline = time.monotonic() + seconds
    while not (value := predicate()):
        assert server.poll() is None, f"serve exited while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


@pytest.mark.slow  # minutes on 2 cores: `make test-slow` (CI runs it)
def test_retry_reruns_only_the_failed_stage_onward_and_cancel_kills_training(
    prefect_harness,
    corpus,  # noqa: F811  (the fixture imported from test_flow)
    tiny_llama_dir,
    tmp_path,
):
    """Served deployments, as in production. (1) cpt's worker dies (an OOM kill) after its first
    checkpoint and the run fails; `prefect flow-run retry` re-runs it: the data stages come back cached
    (untouched), cpt resumes from its checkpoint, sft and evaluate follow. (2) A run cancelled while cpt
    trains takes the whole torchrun tree down with it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelling

    # Its own name: deployments outlive `serve`, and the other served test registered `flow-test`'s.
    config = write_config(
        tmp_path,
        corpus,
        tiny_llama_dir,
        name="served-retry",
        gpu_concurrency={"name": "gpu-served-test"},
        launch={"launcher": "torchrun"},
    )
    data = yaml.safe_load(config.read_text())
    data["cpt"].update(max_steps=24, save_steps=4, eval_steps=4, retries=0)
    data["evaluate"]["export"] = {"merged": False}  # the merge is tested elsewhere
    config.write_text(yaml.safe_dump(data))
    work = tmp_path / "served"
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_RUNNER_POLL_FREQUENCY="2")
    server = subprocess.Popen(
        [sys.executable, "-m", "cptflow.cli", "serve", str(config), "--work-dir", str(work)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    runs = plan_pipeline(load_config(config, work))
    checkpoints = runs["cpt"].path / "checkpoints"
    try:
        with get_client(sync_client=True) as client:

            def deployment(name):
                try:
                    return client.read_deployment_by_name(f"cptflow-pipeline/{name}")
                except Exception:
                    return None

            def final_state(flow_run_id, seconds=420):
                return wait_until(
                    lambda: (s := client.read_flow_run(flow_run_id).state).is_final() and s,
                    seconds,
                    "the flow run to end",
                    server,
                )

            pipeline = wait_until(lambda: deployment("served-retry"), 120, "the deployments", server)
            flow_run = client.create_flow_run_from_deployment(pipeline.id)
            workers = wait_until(
                lambda: [
                    pid for pid, cmd in training_processes(str(work)).items() if "torch.distributed.run" not in cmd
                ],
                300,
                "cpt's worker",
                server,
            )
            deadline = time.monotonic() + 300
            while not any(checkpoints.glob("step-*")):  # polled tightly: the tiny model trains fast
                assert time.monotonic() < deadline, "no checkpoint from cpt"
                time.sleep(0.02)
            os.kill(workers[0], signal.SIGKILL)  # the OOM killer, a few steps before the end
            failed = final_state(flow_run.id)
            assert failed.is_failed(), failed.message
            (report,) = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pipeline-failure"])),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
            )
            assert "*Retry* on this flow run" in report.data  # a deployment's run: Retry works
            assert not runs["cpt"].is_done() and not training_processes(str(work))
            data_manifests = {stage: (runs[stage].path / "manifest.json").stat().st_mtime_ns for stage in DATA_STAGES}

            retry = subprocess.run(
                [str(Path(sys.executable).parent / "prefect"), "flow-run", "retry", str(flow_run.id)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert retry.returncode == 0, retry.stdout + retry.stderr
            retried = final_state(flow_run.id)
            assert retried.is_completed(), retried.message
            assert {
                stage: (runs[stage].path / "manifest.json").stat().st_mtime_ns for stage in DATA_STAGES
            } == data_manifests
            cpt = read_manifest(runs["cpt"].path)
            assert cpt["train"]["resumed_from"].startswith("step-") and cpt["train"]["steps"] == 24
            assert runs["sft"].is_done() and runs["evaluate"].is_done()
            summaries = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pipeline-summary"])),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
            )
            summary = summaries[0].data
            for stage in DATA_STAGES:
                assert f"| {stage} | cached |" in summary, summary
            for stage in ("cpt", "sft", "evaluate"):
                assert f"| {stage} | ran |" in summary, summary

            # (2) cancel while cpt trains: nothing of the training tree survives
            stage_deployment = deployment("served-retry-6-cpt")
            again = client.create_flow_run_from_deployment(
                stage_deployment.id, parameters={**stage_deployment.parameters, "force": ["cpt"]}
            )
            tree = wait_until(
                lambda: (
                    (found := training_processes(str(work)))
                    and any("torch.distributed.run" not in c for c in found.values())
                    and found
                ),
                300,
                "cpt's training processes",
                server,
            )
            for pid, cmd in tree.items():  # a worker hung in a collective ignores SIGTERM: SIGKILL must follow
                if "torch.distributed.run" not in cmd:
                    os.kill(pid, signal.SIGSTOP)
            client.set_flow_run_state(again.id, Cancelling())
            cancelled = final_state(again.id, 120)
            wait_until(lambda: not training_processes(str(work)), 60, "the training tree to die", server)
            assert cancelled.is_cancelled(), cancelled
            assert not any(psutil_alive(pid) for pid in tree)
    finally:
        log = stop_serving(server)
        print(log[-6000:])  # shown when the test fails


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_without_a_server_the_gpu_slot_is_a_lock_that_dies_with_its_holder(tmp_path):
    """`cptflow run` on its own starts a temporary server that forgets slot leases when it stops; a
    killed run must not hold the GPU slot for good, so there the slot is a lock file."""
    from cptflow.flows.pipeline import local_slot

    holder = textwrap.dedent(
        """
        import sys, time
        from cptflow.flows.pipeline import local_slot
        with local_slot("gpu", 1, lambda: None, directory=sys.argv[1]):
            print("holding", flush=True)
            time.sleep(600)
        """
    )
    other = subprocess.Popen(
        [sys.executable, "-P", "-c", holder, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert other.stdout.readline().strip() == "holding"
    waits, got = [], []

    def wait_for_slot():
        with local_slot("gpu", 1, lambda: waits.append(1), directory=tmp_path):
            got.append(1)

    waiter = threading.Thread(target=wait_for_slot)
    waiter.start()
    time.sleep(3)
    assert waits == [1] and got == []  # the other run trains: this one waits
    other.kill()  # killed while holding the slot
    other.wait()
    waiter.join(timeout=30)
    assert got == [1]  # the slot came back with its holder's death
    with local_slot("gpu", 2, lambda: None, directory=tmp_path), local_slot("gpu", 2, lambda: None, directory=tmp_path):
        pass  # a limit of 2: two holders at once


# ----------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------
def test_serve_says_so_when_the_server_schedules_nothing(prefect_harness, corpus, tiny_llama_dir, tmp_path):  # noqa: F811
    """The test harness's temporary server runs no scheduler service, like a server whose scheduler
    fails: `cptflow serve --interval` warns instead of waiting silently for runs that never come."""
    from prefect.settings import PREFECT_API_URL

    config = write_config(tmp_path, corpus, tiny_llama_dir)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), CPTFLOW_SCHEDULE_CHECK_SECONDS="5")
    server = subprocess.Popen(
        [sys.executable, "-m", "cptflow.cli", "serve", str(config), "--interval", "60"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = []
    reader = threading.Thread(target=lambda: output.extend(server.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while "has scheduled no run" not in "".join(output):
            assert server.poll() is None and time.monotonic() < deadline, "".join(output)[-3000:]
            time.sleep(1)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=30)
    text = " ".join("".join(output).split())  # rich wraps the line
    assert "cptflow-pipeline/flow-test" in text and "scheduler service is off or failing" in text


def api(base: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{base}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
        method="POST" if body is not None else "GET",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def stop_process_group(process: subprocess.Popen | None, sig: int = signal.SIGINT) -> None:
    """`sig` to the process group (Ctrl-C by default), then SIGKILL after 30 s."""
    if process is not None and process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def real_prefect_server(tmp_path: Path, **settings: str):
    """`prefect server start` (through `cptflow ui`) on a free port with its own PREFECT_HOME and these
    settings, with every service a production server runs: yields (API URL, the environment for commands
    that talk to it). Its log is tmp_path/server.log."""
    port = free_port()
    base = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=base, **settings)
    log = tmp_path / "server.log"
    ui = subprocess.Popen(
        [sys.executable, "-m", "cptflow.cli", "ui", "--port", str(port)],
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if api(base, "/health"):
                    break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(1)
        yield base, env
    finally:
        stop_process_group(ui)


@pytest.mark.slow
def test_a_schedule_fires_on_a_real_server_and_finds_every_stage_cached(corpus, tiny_llama_dir, tmp_path):  # noqa: F811
    """`prefect server start` (through `cptflow ui`) with its scheduler; the pipeline once, then `cptflow
    serve --interval`: the scheduler creates runs and one completes having recomputed nothing."""
    from test_flow import file_times

    served = None
    with real_prefect_server(
        tmp_path, PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5", PREFECT_RUNNER_POLL_FREQUENCY="2"
    ) as (base, env):
        try:
            config = write_config(tmp_path, corpus, tiny_llama_dir)
            work = tmp_path / "work"
            subprocess.run(
                [sys.executable, "-m", "cptflow.cli", "run", str(config)],
                env=env,
                check=True,
                timeout=900,
                cwd=tmp_path,
            )
            before = file_times(work)
            served = subprocess.Popen(
                [sys.executable, "-m", "cptflow.cli", "serve", str(config), "--interval", "15"],
                env=env,
                cwd=tmp_path,
                stdout=open(tmp_path / "serve.log", "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            deadline = time.monotonic() + 300
            while True:
                runs = api(base, "/flow_runs/filter", {"deployments": {"name": {"any_": ["flow-test"]}}})
                states = [run["state_type"] for run in runs]
                if "COMPLETED" in states:
                    break
                serve_log = (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, f"{states}\n{serve_log}"
                assert "FAILED" not in states and "CRASHED" not in states, serve_log
                time.sleep(2)
            assert any(run["auto_scheduled"] for run in runs)  # created by the server's scheduler, not by us
            assert file_times(work) == before  # every stage came back cached: nothing written
        finally:
            stop_process_group(served)
