"""`make ui-check`: the pipeline's artifacts as a person sees them in the Prefect UI.

Starts a Prefect server (`cptflow ui` on a free port, a throw-away database), runs the demo pipeline
against it in a fresh work directory, then opens the flow run's page in headless Chromium (Playwright
driving the system's browser, e.g. Debian's `chromium`), checks that `pipeline-summary` and
`evaluate-forgetting` are listed and render (a heading, a table), that the run graph is the chain
clean → quality → … → evaluate (each stage's only parent is the stage before it), that the run page
lists every data stage's counts table, that a run SIGKILLed before it shows Crashed with its
`pipeline-failure` report (the server's crash automation, flows/crashes.py), and saves screenshots
of the run graph (work/ui-check/ui-check-graph.png), the run's Artifacts tab (ui-check.png) and the
rendered summary (ui-check-summary.png), full page, under the ignored work/ (docs/ keeps a curated copy:
`--screenshot docs/ui-check.png` writes there).

    python scripts/ui_check.py [--config configs/demo.yaml] [--screenshot work/ui-check/ui-check.png]
                               [--api-url http://127.0.0.1:4200/api]   # use a running server instead

Subprocesses run with `python -P`: the checkout root on sys.path would let its kernels/ shadow Hugging Face's.

Not part of `make test`: it needs a browser and runs the whole demo (about 8 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from cptflow.plan import PIPELINE_STAGES

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {
    # artifact key: (the element its rendering must have, the text that element must show)
    "pipeline-summary": ("h1", "cptflow run:"),
    "evaluate-forgetting": ("table", "base"),  # markdown: the table in reading order (eval set, base, ...)
}
# Listed on the pipeline run's Artifacts tab too (not only on each stage's subflow).
COUNTS = [f"{stage}-counts" for stage in ("clean", "quality", "perplexity", "mix", "tokenize")]
CRASH_AFTER_SECONDS = "45"  # the crash automation's window for this check (the default is 90 s)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_browser(given: str | None) -> str | None:
    """A Chromium on PATH: Playwright's own download needs a CDN this check must not depend on."""
    if given:
        return given
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def wait_healthy(api_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"ui-check: no healthy Prefect server at {api_url} after {timeout:.0f} s")


def latest_pipeline_run(api_url: str) -> dict:
    body = {"flows": {"name": {"any_": ["cptflow-pipeline"]}}, "sort": "START_TIME_DESC", "limit": 1}
    runs = httpx.post(f"{api_url}/flow_runs/filter", json=body, timeout=30).raise_for_status().json()
    if not runs:
        raise SystemExit("ui-check: the server has no cptflow-pipeline flow run")
    return runs[0]


def run_artifacts(api_url: str, flow_run_id: str) -> dict[str, dict]:
    body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
    found = httpx.post(f"{api_url}/artifacts/filter", json=body, timeout=30).raise_for_status().json()
    return {a["key"]: a for a in found if a.get("key")}


STAGES = PIPELINE_STAGES


def graph_problems(api_url: str, flow_run_id: str) -> list[str]:
    """The run graph the UI draws (/flow_runs/{id}/graph-v2) must be the chain of stages."""
    graph = httpx.get(f"{api_url}/flow_runs/{flow_run_id}/graph-v2", timeout=30).json()
    nodes = {node_id: node for node_id, node in graph["nodes"]}
    by_stage = {node["label"].split(" / ")[-1]: node_id for node_id, node in nodes.items()}
    missing = [stage for stage in STAGES if stage not in by_stage]
    if missing:
        return [f"run graph: no node for {', '.join(missing)}"]
    problems = []
    for previous, stage in zip((None, *STAGES), STAGES):
        parents = {edge["id"] for edge in nodes[by_stage[stage]]["parents"]}
        expected = {by_stage[previous]} if previous else set()
        if parents != expected:
            labels = sorted(nodes[p]["label"] for p in parents if p in nodes)
            problems.append(f"run graph: {stage} has parents {labels}, expected {previous or 'none'}")
    return problems


def load_lazy_sections(page, rounds: int = 12) -> None:
    """Scroll down the page in steps, waiting at each, so sections that load on sight are loaded."""
    for _ in range(rounds):
        page.mouse.wheel(0, 3000)
        page.wait_for_timeout(700)


def check_in_browser(
    ui_url: str,
    flow_run_id: str,
    artifacts: dict[str, dict],
    browser: str,
    screenshot: Path,
    crashed_run_id: str | None = None,
) -> list[str]:
    """Problems seen in the UI; an empty list means every expected artifact is listed and renders."""
    from playwright.sync_api import sync_playwright

    problems = []
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=browser, headless=True, args=["--no-sandbox"])
        page = chromium.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{ui_url}/runs/flow-run/{flow_run_id}", wait_until="networkidle")
        page.wait_for_timeout(3_000)  # the graph canvas draws after the data arrives
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot.with_name(f"{screenshot.stem}-graph{screenshot.suffix}")), full_page=True)
        page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
        load_lazy_sections(page)  # the task runs' artifacts load as they scroll into view
        for key in [*EXPECTED, *COUNTS]:
            try:
                page.get_by_text(key, exact=True).first.wait_for(timeout=30_000)
            except Exception:
                problems.append(f"flow run page: artifact '{key}' not listed")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        # The UI scrolls inside its own container, so full_page alone stops at the viewport: a tall one.
        page.set_viewport_size({"width": 1400, "height": 4200})
        page.wait_for_timeout(1_000)
        page.screenshot(path=str(screenshot), full_page=True)
        page.set_viewport_size({"width": 1400, "height": 1000})
        for key, (rendered, text) in EXPECTED.items():
            if key not in artifacts:
                continue
            page.goto(f"{ui_url}/artifacts/artifact/{artifacts[key]['id']}", wait_until="networkidle")
            try:
                page.locator(rendered).filter(has_text=text).first.wait_for(timeout=30_000)
            except Exception:
                problems.append(f"artifact '{key}': no <{rendered}> showing '{text}'")
            if key == "pipeline-summary":
                page.screenshot(
                    path=str(screenshot.with_name(f"{screenshot.stem}-summary{screenshot.suffix}")), full_page=True
                )
        if crashed_run_id:
            page.goto(f"{ui_url}/runs/flow-run/{crashed_run_id}", wait_until="networkidle")
            try:
                page.get_by_text("Crashed", exact=True).first.wait_for(timeout=30_000)
            except Exception:
                problems.append("killed run's page: no 'Crashed' state shown")
            page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
            try:
                page.get_by_text("pipeline-failure", exact=True).first.wait_for(timeout=30_000)
            except Exception:
                problems.append("killed run's page: no 'pipeline-failure' artifact listed")
            page.screenshot(
                path=str(screenshot.with_name(f"{screenshot.stem}-crashed{screenshot.suffix}")), full_page=True
            )
        chromium.close()
    return problems


def start_and_kill_a_run(config: str, work_dir: str, env: dict, api_url: str) -> str:
    """A pipeline run SIGKILLed (with its whole process group) once its first stage works: nothing tells
    the server, so only its missing heartbeats can mark it Crashed. Returns its flow run id."""
    killed = subprocess.Popen(
        [sys.executable, "-P", "-m", "cptflow.cli", "run", config, "--work-dir", work_dir],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while True:
        runs = httpx.post(
            f"{api_url}/flow_runs/filter",
            # the clean stage's subflow (its flow takes the stage's name, its run too), working
            json={"flow_runs": {"name": {"any_": ["clean"]}, "state": {"type": {"any_": ["RUNNING"]}}}},
            timeout=30,
        ).json()
        if runs:
            break
        if killed.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("ui-check: the run to kill never reached its first stage")
        time.sleep(1)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    return latest_pipeline_run(api_url)["id"]


def crash_problems(api_url: str, flow_run_id: str) -> list[str]:
    run = httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=30).json()
    problems = [] if run["state_type"] == "CRASHED" else [f"killed run: state {run['state_type']}, not CRASHED"]
    if "pipeline-failure" not in run_artifacts(api_url, flow_run_id):
        problems.append("killed run: no pipeline-failure artifact")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--work-dir", help="default: a fresh temporary directory, so that every stage runs")
    parser.add_argument("--api-url", help="a running Prefect server's API; default: start one")
    parser.add_argument("--browser", help="Chromium executable; default: the first of %s on PATH" % ", ".join(BROWSERS))
    parser.add_argument("--screenshot", default=str(REPO / "work" / "ui-check" / "ui-check.png"))
    parser.add_argument(
        "--no-run", action="store_true", help="with --api-url: check the latest pipeline run already there"
    )
    args = parser.parse_args()

    browser = find_browser(args.browser)
    if browser is None:
        print("ui-check: no Chromium found (apt-get install chromium, or --browser PATH)", file=sys.stderr)
        return 2
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("ui-check: pip install 'cptflow[ui-check]'", file=sys.stderr)
        return 2

    server, scratch = None, Path(tempfile.mkdtemp(prefix="cptflow-ui-check-"))
    api_url = args.api_url
    try:
        if api_url is None:
            port = free_port()
            api_url = f"http://127.0.0.1:{port}/api"
            env = dict(os.environ, PREFECT_HOME=str(scratch / "prefect-home"))
            server = subprocess.Popen(
                [sys.executable, "-P", "-m", "cptflow.cli", "ui", "--port", str(port)],
                env=env,
                stdout=open(scratch / "server.log", "w"),
                stderr=subprocess.STDOUT,
            )
        wait_healthy(api_url, timeout=180)
        print(f"ui-check: Prefect server at {api_url}")

        crashed_run_id = None
        if not args.no_run:
            work_dir = args.work_dir or str(scratch / "work")
            env = dict(os.environ, PREFECT_API_URL=api_url, CPTFLOW_CRASH_AFTER_SECONDS=CRASH_AFTER_SECONDS)
            crashed_run_id = start_and_kill_a_run(args.config, work_dir, env, api_url)
            print(f"ui-check: killed run {crashed_run_id}; the full run follows (it resumes the killed one's work)")
            started = time.monotonic()
            subprocess.run(
                [sys.executable, "-P", "-m", "cptflow.cli", "run", args.config, "--work-dir", work_dir],
                env=env,
                check=True,
            )
            print(f"ui-check: pipeline ran in {time.monotonic() - started:.0f} s")

        flow_run = latest_pipeline_run(api_url)
        artifacts = run_artifacts(api_url, flow_run["id"])
        problems = [f"API: flow run has no artifact '{key}'" for key in EXPECTED if key not in artifacts]
        problems += [f"API: flow run has no artifact '{key}'" for key in COUNTS if key not in artifacts]
        problems += graph_problems(api_url, flow_run["id"])
        if crashed_run_id:
            problems += crash_problems(api_url, crashed_run_id)
        ui_url = api_url.removesuffix("/api")
        problems += check_in_browser(
            ui_url, flow_run["id"], artifacts, browser, Path(args.screenshot), crashed_run_id=crashed_run_id
        )
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(scratch, ignore_errors=True)

    for problem in problems:
        print(f"ui-check: FAIL {problem}", file=sys.stderr)
    if not problems:
        print(
            f"ui-check: ok: {', '.join(EXPECTED)} render and every data stage's counts are listed on the flow "
            f"run page; the killed run shows Crashed with its failure report; screenshot {args.screenshot}"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
