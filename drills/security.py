"""Security drill: static checks of the sources (by AST) and a planted-secret scan of pipeline runs.

Issue 7. Static: every torch.load passes weights_only=True, YAML is loaded safely, trust_remote_code is
never hard-coded on, model weights come from safetensors, the UI binds 127.0.0.1 unless told otherwise.
Planted secrets: HF_TOKEN, HUGGING_FACE_HUB_TOKEN, storage keys and a webhook URL are planted, the
pipeline runs (and fails once, on purpose), and every output, log and artifact is scanned for them.

    python drills/run.py security                 # static checks + the whole pipeline through Prefect, twice
    python drills/run.py security --quick         # static checks + the data stages and the model card writer
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import http.server
import inspect
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from drills import drill_command

REPO = Path(__file__).resolve().parents[1]
# Our code: what the pipeline, its scripts and benchmarks run. Tests load checkpoints they wrote themselves.
SOURCE_DIRS = ("cptflow", "flows", "tasks", "kernels", "scripts", "benchmarks", "drills")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
UNSAFE_YAML = {"load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all"}
SAFE_LOADERS = {"SafeLoader", "CSafeLoader"}
# Classes whose from_pretrained loads model weights (tokenizers and configs are JSON; PeftModel is below).
WEIGHT_CLASS = re.compile(r"^(AutoModel\w*|\w+For\w+|\w+PreTrainedModel)$")


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: [{self.rule}] {self.message}"


# ----------------------------------------------------------------------------------------------------
# Static checks (ast, not regexes: a call split over lines or a keyword in any order is still seen)
# ----------------------------------------------------------------------------------------------------
def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def check_source(text: str, file: str) -> list[Finding]:
    """Findings in one Python file."""
    findings = []
    tree = ast.parse(text, filename=file)
    # Loaders defined here on top of a safe one (e.g. config.py's duplicate-key check) are safe too.
    safe_loaders = set(SAFE_LOADERS) | {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any(_dotted(base).rsplit(".", 1)[-1] in SAFE_LOADERS for base in node.bases)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
                findings.append(
                    Finding(
                        file,
                        node.lineno,
                        "torch-load",
                        "torch.load without weights_only=True (unpickles arbitrary objects)",
                    )
                )
            if name.startswith("yaml.") and name.split(".", 1)[1] in UNSAFE_YAML:
                loader = _dotted(_keyword(node, "Loader") or ast.Constant(None)).rsplit(".", 1)[-1]
                if loader not in safe_loaders:
                    findings.append(
                        Finding(file, node.lineno, "yaml-load", f"{name} without SafeLoader; use yaml.safe_load")
                    )
            if _is_true(_keyword(node, "trust_remote_code")):
                findings.append(
                    Finding(
                        file,
                        node.lineno,
                        "trust-remote-code",
                        "trust_remote_code=True hard-coded; take it from the config",
                    )
                )
            parts = name.rsplit(".", 2)
            if len(parts) >= 2 and parts[-1] == "from_pretrained" and WEIGHT_CLASS.match(parts[-2]):
                if not _is_true(_keyword(node, "use_safetensors")):
                    findings.append(
                        Finding(
                            file,
                            node.lineno,
                            "safetensors",
                            f"{name} without use_safetensors=True (may unpickle a .bin)",
                        )
                    )
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults)) + list(
                zip(args.kwonlyargs, args.kw_defaults)
            )
            for arg, default in pairs:
                if arg.arg == "trust_remote_code" and _is_true(default):
                    findings.append(
                        Finding(file, node.lineno, "trust-remote-code", f"{node.name}(trust_remote_code=True) default")
                    )
        if isinstance(node, ast.AnnAssign) and _dotted(node.target) == "trust_remote_code" and node.value is not None:
            value = node.value.args[0] if isinstance(node.value, ast.Call) and node.value.args else node.value
            if _is_true(value):
                findings.append(
                    Finding(file, node.lineno, "trust-remote-code", "config field trust_remote_code defaults to True")
                )
    return findings


def python_files(root: Path) -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (root / d).rglob("*.py") if "__pycache__" not in p.parts)


def static_findings(root: Path = REPO) -> list[Finding]:
    findings = []
    for path in python_files(root):
        findings += check_source(path.read_text(encoding="utf-8"), str(path.relative_to(root)))
    return findings


# ----------------------------------------------------------------------------------------------------
# Runtime checks: defaults and the libraries we rely on
# ----------------------------------------------------------------------------------------------------
def ui_argv(env_host: str | None = None, host: str | None = None) -> list[str]:
    """The argv `cptflow ui` starts the Prefect server with (the server itself is not started)."""
    import signal
    import subprocess as subprocess_module

    from typer.testing import CliRunner

    from cptflow.cli import app

    started: list[list[str]] = []

    class FakeServer:
        def __init__(self, argv, **kwargs):
            started.append(list(argv))

        def wait(self, timeout=None):
            return 0

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # ui() installs its own
    real_popen, saved_env = subprocess_module.Popen, os.environ.get("PREFECT_SERVER_API_HOST")
    subprocess_module.Popen = FakeServer
    if env_host is not None:
        os.environ["PREFECT_SERVER_API_HOST"] = env_host
    try:
        CliRunner().invoke(app, ["ui", *(["--host", host] if host else [])])
    finally:
        subprocess_module.Popen = real_popen
        if env_host is not None:
            os.environ.pop("PREFECT_SERVER_API_HOST") if saved_env is None else os.environ.update(
                PREFECT_SERVER_API_HOST=saved_env
            )
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return started[0] if started else []


def _host_of(argv: list[str]) -> str | None:
    return argv[argv.index("--host") + 1] if "--host" in argv else None


def runtime_findings() -> list[Finding]:
    """Defaults that must hold when nothing is configured."""
    from peft.utils.save_and_load import torch_load

    from cptflow.config import PipelineConfig, load_config
    from cptflow.tasks.clean import HFDatasetSource

    findings = []
    for model, label in ((PipelineConfig, "PipelineConfig"), (HFDatasetSource, "HFDatasetSource")):
        if model.model_fields["trust_remote_code"].default is not False:
            findings.append(
                Finding(
                    "cptflow/config.py", 0, "trust-remote-code", f"{label}.trust_remote_code does not default to False"
                )
            )
    # Adapters load through peft: safetensors when the file is there, else torch.load via this wrapper.
    if inspect.signature(torch_load).parameters["weights_only"].default is not True:
        findings.append(Finding("peft", 0, "torch-load", "peft's torch_load does not default to weights_only=True"))
    host = _host_of(ui_argv(env_host="0.0.0.0"))
    if host != "127.0.0.1":
        findings.append(
            Finding(
                "cptflow/cli.py",
                0,
                "ui-bind",
                f"cptflow ui binds {host!r} by default (PREFECT_SERVER_API_HOST=0.0.0.0 set)",
            )
        )
    if _host_of(ui_argv(host="0.0.0.0")) != "0.0.0.0":
        findings.append(Finding("cptflow/cli.py", 0, "ui-bind", "cptflow ui --host 0.0.0.0 is not honoured"))
    from prefect.settings import PREFECT_RUNNER_SERVER_HOST

    if PREFECT_RUNNER_SERVER_HOST.value() not in LOOPBACK:  # `cptflow serve`: the runner's health server
        findings.append(
            Finding("prefect", 0, "serve-bind", f"the runner webserver binds {PREFECT_RUNNER_SERVER_HOST.value()}")
        )
    with tempfile.TemporaryDirectory() as tmp:
        evil = Path(tmp) / "evil.yaml"
        evil.write_text("name: !!python/object/apply:os.system ['echo unsafe']\n")
        try:
            load_config(evil)
            findings.append(Finding("cptflow/config.py", 0, "yaml-load", "a !!python/object tag was accepted"))
        except Exception:
            pass
    return findings


# ----------------------------------------------------------------------------------------------------
# Planted secrets
# ----------------------------------------------------------------------------------------------------
def planted_secrets(seed: int = 0) -> dict[str, str]:
    """Unique, recognisable values; keys are the environment variables they are planted in."""
    tag = f"{seed:04d}{os.getpid():07d}"
    return {
        "HF_TOKEN": f"hf_PLANTEDhftoken{tag}xxxxxxxxxxxxxxxx",
        "HUGGING_FACE_HUB_TOKEN": f"hf_PLANTEDhubtoken{tag}xxxxxxxxxxxxxx",
        "AWS_SECRET_ACCESS_KEY": f"PLANTEDawssecret{tag}",
        "WANDB_API_KEY": f"PLANTEDwandbkey{tag}",
        "WEBHOOK_SECRET": f"PLANTEDwebhook{tag}",  # only in the webhook URL of the config
    }


class WebhookReceiver:
    """A local HTTP endpoint that records what the failure notification POSTs to it."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append({"path": self.path, "body": body.decode("utf-8", "replace")})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):  # the request line holds the secret path: print nothing
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, secret: str) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/{secret}"

    def __enter__(self) -> "WebhookReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def scan_files(root: Path, needles: list[str]) -> list[str]:
    """'path: needle' for every file under `root` holding a needle (bytes, so binaries are scanned too)."""
    hits = []
    encoded = [(n, n.encode()) for n in needles]
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        hits += [f"{path}: {needle}" for needle, raw in encoded if raw in data]
    return hits


def scan_text(label: str, text: str, needles: list[str]) -> list[str]:
    return [f"{label}: {needle}" for needle in needles if needle in text]


def write_secret_config(directory: Path, model_dir: Path, webhook_url: str, sources: list[dict], **sections) -> Path:
    config = {
        "name": "security-drill",
        "work_dir": "work",
        "base_model": str(model_dir),
        "sources": sources,
        "notify": {"webhook_url": webhook_url},
        "perplexity": {"keep_band": [0, 95], "batch_tokens": 4096},
        "mix": {"domain_eval_documents": 5, "general_eval_documents": 5, "window_documents": 20},
        "tokenize": {"seq_len": 64, "blocks_per_shard": 64},
        **sections,
    }
    path = directory / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sample_sources(directory: Path, documents: int) -> list[dict]:
    """Heads of the committed sample corpora, as two sources."""
    from drills.hostile_input import write_normal_corpus

    paths = write_normal_corpus(directory, documents)
    return [
        {"name": "domain", "role": "domain", "paths": [str(paths["domain"])], "documents_per_shard": 20},
        {
            "name": "general",
            "role": "general",
            "paths": [str(paths["general"])],
            "text_field": "content",
            "id_field": "doc_id",
        },
    ]


@contextlib.contextmanager
def planted_environment(secrets: dict[str, str]):
    saved = {k: os.environ.get(k) for k in secrets}
    os.environ.update({k: v for k, v in secrets.items() if k != "WEBHOOK_SECRET"})
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.update({key: value})


def quick_secret_scan(root: Path, model_dir: Path, documents: int = 30) -> dict:
    """The data stages, a model card and the failure path, with planted secrets; every output scanned.

    In-process and without Prefect: the failure artifact is captured where flows/failure.py creates it.
    Returns {"hits": [...], "webhook": [...], "files": n, "outside_work_dir": [...]}.
    """
    import cptflow.flows.failure as failure
    from cptflow.config import load_config
    from cptflow.export import write_model_card
    from cptflow.plan import DATA_STAGES, plan_pipeline, run_data_stage_plain

    secrets = planted_secrets()
    needles = list(secrets.values())
    root.mkdir(parents=True, exist_ok=True)
    sources = sample_sources(root / "inputs", documents)
    before = {p for p in root.rglob("*")}
    log_stream = io.StringIO()
    handler = logging.StreamHandler(log_stream)
    handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    previous_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    artifacts: list[str] = []
    out, err = io.StringIO(), io.StringIO()
    try:
        with (
            WebhookReceiver() as hook,
            planted_environment(secrets),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            config = write_secret_config(root, model_dir, hook.url(secrets["WEBHOOK_SECRET"]), sources)
            cfg = load_config(config)
            runs = plan_pipeline(cfg)
            for stage in DATA_STAGES:
                run_data_stage_plain(runs[stage], cfg)
            logging.getLogger("cptflow.drill").info("config: %r", cfg)  # a repr of the config is safe to log
            card = {
                "cpt": cfg.cpt.model_dump(mode="json"),
                "notify": {"webhook_url": cfg.notify.webhook_url, "channel": cfg.notify.webhook_url.get_secret_value()},
                "hub": {
                    "hub_token": os.environ["HF_TOKEN"],
                    "mirror": f"https://drill:{os.environ['AWS_SECRET_ACCESS_KEY']}@storage.example",
                },
            }
            write_model_card(
                cfg.work_path / "export" / "README.md",
                model_name=cfg.name,
                base_model=cfg.base_model,
                data={"documents": 1},
                hyperparameters=card,
                perplexity={"base": {"domain": 10.0}},
            )
            real_artifact = failure.create_markdown_artifact
            failure.create_markdown_artifact = lambda **kwargs: artifacts.append(json.dumps(kwargs))
            try:  # the failure path, as the flow calls it when a stage raises
                payload = failure.publish_failure(
                    cfg, "perplexity", RuntimeError("scoring model not found"), config_path=str(config)
                )
            finally:
                failure.create_markdown_artifact = real_artifact
            delivered = list(hook.received)
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(previous_level)
    hits = scan_files(cfg.work_path, needles)
    hits += scan_text("stdout", out.getvalue(), needles) + scan_text("stderr", err.getvalue(), needles)
    hits += scan_text("logs", log_stream.getvalue(), needles)
    hits += scan_text("failure artifact", "\n".join(artifacts), needles)
    hits += scan_text("failure payload", json.dumps(payload), needles)
    hits += scan_text("webhook body", "\n".join(d["body"] for d in delivered), needles)
    created = {p for p in root.rglob("*")} - before
    outside = sorted(str(p) for p in created if p.is_file() and cfg.work_path not in p.parents and p != config)
    return {
        "hits": hits,
        "webhook": delivered,
        "artifacts": artifacts,
        "files_scanned": sum(1 for p in cfg.work_path.rglob("*") if p.is_file()),
        "outside_work_dir": outside,
        "secrets": secrets,
        "work_dir": str(cfg.work_path),
    }


# ----------------------------------------------------------------------------------------------------
# The full drill: the whole pipeline through Prefect (success, then a forced failure), in a child
# ----------------------------------------------------------------------------------------------------
def run_flow_child(config: Path, report: Path) -> None:
    """In the child: a temporary Prefect server, a full run, a failing run; artifacts and logs to `report`."""
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from cptflow.flows.pipeline import cptflow_pipeline

    outcome = {}
    with prefect_test_harness(server_startup_timeout=None):
        started = time.perf_counter()
        reports = cptflow_pipeline(config_path=str(config))
        outcome["full_run"] = {
            "stages": [(r["stage"], r["state"]) for r in reports],
            "seconds": round(time.perf_counter() - started, 1),
        }
        broken = config.with_name("broken.yaml")
        data = yaml.safe_load(config.read_text())
        data["perplexity"]["model"] = str(config.parent / "no-such-model")  # perplexity fails, after quality
        broken.write_text(yaml.safe_dump(data))
        try:
            cptflow_pipeline(config_path=str(broken))
            outcome["failed_run"] = "did not fail"
        except Exception as err:
            outcome["failed_run"] = f"{type(err).__name__}"
        with get_client(sync_client=True) as client:
            outcome["artifacts"] = [
                {
                    "key": a.key,
                    "type": a.type,
                    "data": a.data if isinstance(a.data, str) else json.dumps(a.data),
                    "description": a.description,
                }
                for a in client.read_artifacts()
            ]
            outcome["logs"] = [log.message for log in client.read_logs()]
            outcome["flow_run_parameters"] = [json.dumps(r.parameters) for r in client.read_flow_runs()]
    report.write_text(json.dumps(outcome))


def full_secret_scan(root: Path) -> dict:
    """All eight stages through Prefect with planted secrets, then a run that fails in perplexity."""
    from drills.hostile_input import build_model

    secrets = planted_secrets()
    needles = list(secrets.values())
    root.mkdir(parents=True, exist_ok=True)
    sources = sample_sources(root / "inputs", 200)
    model = build_model(root / "inputs" / "general.jsonl.gz", root / "model-cache")
    prefect_home = root / "prefect-home"
    with WebhookReceiver() as hook:
        training = {"lora": {"r": 4, "alpha": 8}, "micro_batch_size": 4, "eval_steps": 2, "save_steps": 2}
        config = write_secret_config(
            root,
            model,
            hook.url(secrets["WEBHOOK_SECRET"]),
            sources,
            cpt={**training, "learning_rate": 1e-3, "embedding_learning_rate": 2.5e-4, "max_steps": 4},
            sft={
                **training,
                "data": [{"path": str(REPO / "data" / "instructions" / "alpaca.jsonl")}],
                "max_length": 96,
                "max_steps": 3,
            },
            evaluate={"prompts": ["What is a half-life?"], "max_new_tokens": 8},
        )
        env = dict(
            os.environ,
            PREFECT_HOME=str(prefect_home),
            HF_HUB_OFFLINE="1",
            **{k: v for k, v in secrets.items() if k != "WEBHOOK_SECRET"},
        )
        started = time.perf_counter()
        with open(root / "child.log", "wb") as log:
            child = subprocess.run(
                drill_command("security", "--child", str(config), "--out", str(root / "child.json")),
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        seconds = time.perf_counter() - started
        delivered = list(hook.received)
    outcome = json.loads((root / "child.json").read_text()) if (root / "child.json").is_file() else {}
    work = root / "work"
    hits = scan_files(work, needles) + scan_files(prefect_home, needles) + scan_files(root / "child.log", needles)
    hits += scan_text("prefect artifacts", json.dumps(outcome.get("artifacts", [])), needles)
    hits += scan_text("prefect logs", "\n".join(outcome.get("logs", [])), needles)
    hits += scan_text("flow run parameters", "\n".join(outcome.get("flow_run_parameters", [])), needles)
    hits += scan_text("webhook body", "\n".join(d["body"] for d in delivered), needles)
    return {
        "child_exit": child.returncode,
        "seconds": round(seconds, 1),
        "full_run": outcome.get("full_run"),
        "failed_run": outcome.get("failed_run"),
        "failure_artifact": any(a["key"] == "pipeline-failure" for a in outcome.get("artifacts", [])),
        "artifacts": len(outcome.get("artifacts", [])),
        "logs": len(outcome.get("logs", [])),
        "webhook_deliveries": len(delivered),
        "files_scanned": sum(1 for base in (work, prefect_home) for p in base.rglob("*") if p.is_file()),
        "bytes_scanned": sum(p.stat().st_size for base in (work, prefect_home) for p in base.rglob("*") if p.is_file()),
        "hits": hits,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="data stages + model card + failure path, in-process")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--root", type=Path, help="work in this directory (kept); default: a temporary one")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_flow_child(args.child, args.out)
        return 0
    root = Path(args.root or tempfile.mkdtemp(prefix="cptflow-security-"))
    report: dict = {"static": [str(f) for f in static_findings()], "runtime": [str(f) for f in runtime_findings()]}
    report["files_checked"] = len(python_files(REPO))
    if args.quick:
        from drills.hostile_input import build_model, write_normal_corpus

        normal = write_normal_corpus(root / "model-corpus", 60)
        scan = quick_secret_scan(root / "scan", build_model(normal["general"], root / "model-cache"))
        report["scan"] = {k: v for k, v in scan.items() if k not in ("secrets", "artifacts")}
        problems = scan["hits"] + [f"written outside the work dir: {p}" for p in scan["outside_work_dir"]]
        if not scan["webhook"]:
            problems.append("the failure webhook was not called")
    else:
        scan = full_secret_scan(root)
        report["scan"] = scan
        problems = list(scan["hits"])
        if scan["child_exit"] != 0 or not scan["full_run"]:
            problems.append(f"the pipeline runs did not complete (exit {scan['child_exit']}; see {root / 'child.log'})")
        if (
            scan["failed_run"] in (None, "did not fail")
            or not scan["failure_artifact"]
            or not scan["webhook_deliveries"]
        ):
            problems.append("the forced failure did not produce a pipeline-failure artifact and a webhook call")
    problems = report["static"] + report["runtime"] + problems
    report["problems"] = problems
    report["ok"] = not problems
    print(
        f"security drill: {report['files_checked']} source files checked; static findings {len(report['static'])}, "
        f"runtime findings {len(report['runtime'])}"
    )
    print(json.dumps(report["scan"], indent=2, default=str)[:4000])
    print("\n".join(f"PROBLEM: {p}" for p in problems) if problems else "no problems")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if report["ok"] and args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
