"""The GPU figures in one call: kernel parity compiled for real, the kernel, 1.1B QLoRA training-step and
perplexity-scoring benchmarks, each under a time cap, into OUTDIR/summary.json plus one log per step.

Not part of the package (scripts/ is not installed, nothing imports it): `scripts/gpu_check.sh OUTDIR` on a bare
GPU machine, `scripts/gpu_check.sh --dry-run OUTDIR` on a CPU with tiny sizes (tests/test_gpu_check.py).
The orchestrator (`run`) uses the standard library only; each step is a child process with its own cap, so a
failing or timed-out step leaves the others running. The other subcommands are those steps' own pieces.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
WHEELS_DIR = REPO / "gpu_wheels"
# What the GPU image lacks (docs/benchmarks.md, "GPU check"); `make gpu-wheels` downloads exactly these.
WHEELS_LIST = REPO / "scripts" / "gpu_wheels.txt"
# One device command may run 10 minutes; the check stays within 9, its caps and their kill graces included.
CAP_LIMIT_S = 540
KILL_GRACE_S = 5  # SIGTERM to the step's process group, then SIGKILL this much later (timeout -k)
MiB = 2**20

# Seconds per step. GPU: sized from paper estimates for an H200 (the kernel tests compile ~30 Triton
# specialisations; the training bench builds and saves a 2.2 GB model, then loads and quantises it once per
# side); their sum plus one grace each stays under CAP_LIMIT_S. Dry run: generous, for 2 CPU cores shared with
# other jobs (a step takes 5-40 s on a quiet machine, several times that on a busy one).
CAPS = {
    "gpu": {"environment": 45, "kernel_tests": 120, "bench_kernels": 75, "bench_training": 215, "perplexity": 55},
    "dry-run": dict.fromkeys(("environment", "kernel_tests", "bench_kernels", "bench_training", "perplexity"), 300),
}
STEPS = tuple(CAPS["gpu"])
# Dry run: the Triton cases of two small kernel tests under Triton's interpreter (the full set takes 40 s here).
DRY_KERNEL_TESTS = "triton and (swiglu or frozen)"


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def load_benchmark(name: str):
    """A benchmarks/ script as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the orchestrator ------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    cap_s: int
    commands: list[list[str]]
    figures: Callable[[Path], dict]  # reads what the commands left (the step's log is the argument); raises if none
    env: dict[str, str | None] = field(default_factory=dict)  # over the check's environment; None unsets
    check: Callable[[dict], str | None] = lambda figures: None  # what is wrong with the figures, if anything


def run_command(argv: list[str], log, env: dict, deadline: float) -> tuple[int | None, bool]:
    """(exit code, timed out) of argv run in its own process group until the deadline, like `timeout -k`."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None, True
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=remaining), False
    except subprocess.TimeoutExpired:
        # The whole group: bench_training's per-side children go with their parent.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=KILL_GRACE_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(), True


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def run_step(step: Step, outdir: Path, base_env: dict) -> dict:
    env = dict(base_env)
    for key, value in step.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    log_path = outdir / f"{step.name}.log"
    started = time.monotonic()
    deadline = started + step.cap_s
    status, exit_code, error = "ok", 0, None
    with open(log_path, "w") as log:
        log.write(f"# step {step.name}, cap {step.cap_s} s, started {now_iso()}\n")
        for argv in step.commands:
            log.write(f"$ {shlex.join(argv)}\n")
            log.flush()
            exit_code, timed_out = run_command(argv, log, env, deadline)
            log.write(f"\n# exit code {exit_code}{' (timed out)' if timed_out else ''}\n")
            log.flush()
            if timed_out:
                status, error = "timeout", f"over its cap of {step.cap_s} s: {shlex.join(argv)}"
                break
            if exit_code != 0:
                status, error = "failed", f"exit code {exit_code}: {shlex.join(argv)}"
                break
    result = {
        "status": status,
        "seconds": round(time.monotonic() - started, 1),
        "cap_s": step.cap_s,
        "exit_code": exit_code,
        "log": log_path.name,
        "figures": {},
    }
    try:
        result["figures"] = step.figures(log_path)
    except Exception as exc:  # a step that ran but left nothing readable has failed, whatever its exit code
        if status == "ok":
            status, error = "failed", f"no figures: {type(exc).__name__}: {exc}"
    else:
        problem = step.check(result["figures"])
        if problem and status == "ok":
            status, error = "failed", problem
    result["status"] = status
    if error:
        result["error"] = error
        result["log_tail"] = tail(log_path)
    return result


def last_json_line(log_path: Path, key: str) -> dict:
    """The last line of a log that is a JSON object with `key` (the benchmarks print one last)."""
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and key in record:
                return record
    raise ValueError(f"no JSON line with {key!r} in {log_path.name}")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def junit_counts(path: Path) -> dict:
    """Counts of a pytest --junitxml report; `triton_passed`: the cases that ran the Triton path."""
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "triton_passed": 0}
    failed_names = []
    for case in cases:
        counts["tests"] += 1
        outcome = "passed"
        for child in case:
            if child.tag == "failure":
                outcome = "failed"
            elif child.tag == "error":
                outcome = "errors"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        counts[outcome] += 1
        name = case.get("name", "")
        if outcome == "passed" and "[triton" in name:
            counts["triton_passed"] += 1
        if outcome in ("failed", "errors"):
            failed_names.append(name)
    counts["failed_tests"] = failed_names
    return counts


def kernel_test_figures(work: Path, dry_run: bool) -> Callable[[Path], dict]:
    def figures(_log: Path) -> dict:
        counts = junit_counts(work / "kernel_tests.xml")
        counts["mode"] = "Triton interpreter (TRITON_INTERPRET=1)" if dry_run else "compiled for the GPU"
        return counts

    return figures


def kernel_test_check(counts: dict) -> str | None:
    if counts["failed"] or counts["errors"]:
        return f"{counts['failed']} failed, {counts['errors']} errors: {counts['failed_tests']}"
    if not counts["triton_passed"]:
        return "no Triton case ran"
    return None


def environment_figures(work: Path) -> Callable[[Path], dict]:
    def figures(_log: Path) -> dict:
        probe = read_json(work / "environment.json")
        install = work / "cptflow_install.json"
        probe["install"] = read_json(install) if install.exists() else {"cptflow": "the running environment's"}
        return probe

    return figures


def bench_training_figures(work: Path) -> Callable[[Path], dict]:
    def figures(_log: Path) -> dict:
        result = read_json(work / "bench_training.json")
        keep = ("peak_mib", "peak_allocated_mib", "tokens_per_s", "kernels", "fused_linear_cross_entropy", "optimizer")
        sides = {side: {k: r[k] for k in keep if k in r} for side, r in result["sides"].items()}
        return {**result["summary"], "sides": sides}

    return figures


def plan(dry_run: bool, work: Path, wheels_dir: Path, site: Path) -> list[Step]:
    py = sys.executable
    me = str(Path(__file__).resolve())
    caps = CAPS["dry-run" if dry_run else "gpu"]
    device = "cpu" if dry_run else "cuda"

    environment = []
    if not dry_run:
        wheels = sorted(str(p) for p in wheels_dir.glob("*.whl"))
        if wheels:
            pip = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
            environment.append([*pip, "--upgrade", "--target", str(site), *wheels])
        environment.append([py, me, "install-cptflow", str(site), "--json-out", str(work / "cptflow_install.json")])
    probe = [py, me, "probe", "--json-out", str(work / "environment.json"), "--wheels", str(wheels_dir)]
    environment.append(probe + ([] if dry_run else ["--require-cuda"]))

    # -P: the checkout root stays off sys.path (its kernels/ would shadow Hugging Face's `kernels`, which
    # transformers looks for); --noconftest: tests/conftest.py imports Prefect, which the GPU image lacks.
    pytest = [
        py,
        "-P",
        "-m",
        "pytest",
        "-q",
        "--noconftest",
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore::DeprecationWarning",
    ]
    pytest += [f"--junitxml={work / 'kernel_tests.xml'}", "tests/test_kernels.py"]
    if dry_run:
        pytest += ["-k", DRY_KERNEL_TESTS]

    bench_kernels = [py, "benchmarks/bench_kernels.py", "--device", device]
    if dry_run:
        bench_kernels += ["--tokens", "512", "--hidden", "64", "--vocab", "4096", "--threads", "1"]

    training = []
    bench_training = [
        py,
        "benchmarks/bench_training.py",
        "--device",
        device,
        "--json",
        str(work / "bench_training.json"),
    ]
    if dry_run:
        tiny = work / "tiny-llama"
        training.append([py, me, "tiny-llama", str(tiny)])
        bench_training += ["--model-path", str(tiny), "--batch", "2", "--seq-len", "64", "--threads", "1"]
        bench_training += ["--warmup", "1", "--steps", "2", "--repeats", "1"]
    else:
        # The 1.1B shape at vocab 32000, batch 8 x 2048 (the script's CUDA defaults), 2 + 6 steps to fit the cap.
        bench_training += ["--model", "1b", "--vocab", "32000", "--warmup", "2", "--steps", "6"]
    training.append(bench_training)

    perplexity = [py, me, "perplexity", "--device", device, "--json-out", str(work / "perplexity.json")]
    if dry_run:
        perplexity += ["--docs", "12", "--max-length", "128", "--model", "small", "--threads", "1"]
        perplexity += ["--corpus-texts", "300"]
    else:
        perplexity += ["--docs", "600", "--model", "1b"]  # about 200k tokens: the naive loop fits the cap

    kernel_env = {"TRITON_INTERPRET": "1"} if dry_run else {"TRITON_INTERPRET": None}
    return [
        Step("environment", caps["environment"], environment, environment_figures(work)),
        Step(
            "kernel_tests",
            caps["kernel_tests"],
            [pytest],
            kernel_test_figures(work, dry_run),
            kernel_env,
            kernel_test_check,
        ),
        Step("bench_kernels", caps["bench_kernels"], [bench_kernels], lambda log: last_json_line(log, "benchmark")),
        Step("bench_training", caps["bench_training"], training, bench_training_figures(work)),
        Step("perplexity", caps["perplexity"], [perplexity], lambda _log: read_json(work / "perplexity.json")),
    ]


def headline(steps: dict) -> dict:
    """The few figures the GPU issue asks for, from the steps that finished."""
    out = {}
    if steps.get("kernel_tests", {}).get("status") == "ok":
        figures = steps["kernel_tests"]["figures"]
        out["kernel_tests_passed"] = figures["passed"]
        out["kernel_tests_triton_passed"] = figures["triton_passed"]
    kernels = steps.get("bench_kernels", {})
    if kernels.get("status") == "ok":
        figures = kernels["figures"]
        if "results" in figures:  # CUDA: one record per kernel and shape
            for record in figures["results"]:
                key = record["kernel"].replace(" ", "_").replace(",", "")
                out[f"{key}_{record['shape']}"] = {
                    k: record[k] for k in ("speedup", "memory_ratio", "ours_mib", "eager_mib", "ok")
                }
        else:
            out["fused_ce_memory_ratio_cpu"] = figures.get("memory_ratio")
    training = steps.get("bench_training", {})
    if training.get("status") == "ok":
        figures = training["figures"]
        for key in ("speedup", "memory_ratio", "ours_peak_mib", "hf_peak_mib", "ours_tokens_per_s", "hf_tokens_per_s"):
            out[f"training_{key}"] = figures.get(key)
    perplexity = steps.get("perplexity", {})
    if perplexity.get("status") == "ok":
        figures = perplexity["figures"]
        for key in ("batched_tokens_per_s", "batched_docs_per_s", "speedup", "peak_allocated_mib"):
            out[f"perplexity_{key}"] = figures.get(key)
    return {key: value for key, value in out.items() if value is not None}


def git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None


def cmd_run(args) -> int:
    dry_run = args.dry_run
    mode = "dry-run" if dry_run else "gpu"
    caps_total = sum(CAPS[mode].values()) + KILL_GRACE_S * len(STEPS)
    if not dry_run and caps_total > CAP_LIMIT_S:
        raise SystemExit(f"the caps sum to {caps_total} s, over {CAP_LIMIT_S} s")
    outdir = args.outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cptflow-gpu-check-"))
    site = work / "site"
    env = dict(os.environ)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",  # logs in the order things happened, and whole when a step is killed
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "CPTFLOW_CACHE_DIR": str(work / "cache"),
            "TRITON_CACHE_DIR": str(work / "triton-cache"),  # compiled here and now, never an old cache
        }
    )
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU paths, also on a GPU machine
    else:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))

    summary = {
        "check": "gpu_check",
        "mode": mode,
        "complete": False,
        "started_at": now_iso(),
        "commit": git_commit(),
        "caps_total_s": caps_total,
        "cap_limit_s": CAP_LIMIT_S,
        "steps": {name: {"status": "pending", "cap_s": CAPS[mode][name]} for name in STEPS},
    }
    summary_path = outdir / "summary.json"
    atomic_write_json(summary_path, summary)  # a killed check still leaves what it finished
    started = time.monotonic()
    try:
        for step in plan(dry_run, work, args.wheels, site):
            print(f"gpu_check: {step.name} (cap {step.cap_s} s) ...", flush=True)
            result = run_step(step, outdir, env)
            summary["steps"][step.name] = result
            print(f"gpu_check: {step.name}: {result['status']} in {result['seconds']} s", flush=True)
            atomic_write_json(summary_path, summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary["complete"] = True
    summary["finished_at"] = now_iso()
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["all_ok"] = all(s["status"] == "ok" for s in summary["steps"].values())
    summary["headline"] = headline(summary["steps"])
    atomic_write_json(summary_path, summary)
    print(json.dumps({"all_ok": summary["all_ok"], "seconds": summary["seconds"], **summary["headline"]}))
    return 0 if summary["all_ok"] else 1


# --- the steps' own pieces (child processes) -------------------------------------------------------


def pip_install_cptflow(site: Path) -> bool:
    """pip from a clean copy of the checkout (offline, with the image's setuptools): the install users get."""
    src = Path(tempfile.mkdtemp(prefix="cptflow-src-"))
    try:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in ("cptflow", "tasks", "flows", "kernels", "data", "configs"):
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation"]
        proc = subprocess.run([*pip, "--no-compile", "--target", str(site), str(src)], capture_output=True, text=True)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
    return proc.returncode == 0


def link_cptflow(site: Path) -> None:
    """site/cptflow as symbolic links into the checkout, with pyproject's package-dir mapping (tasks/ as
    cptflow.tasks, data/ as cptflow.sample_data, ...): what plain PYTHONPATH=. cannot give."""
    package = site / "cptflow"
    if package.exists():
        shutil.rmtree(package)
    package.mkdir(parents=True)
    for entry in (REPO / "cptflow").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    mapping = {"tasks": "tasks", "flows": "flows", "kernels": "kernels", "sample_data": "data"}
    mapping["sample_configs"] = "configs"
    for name, folder in mapping.items():
        (package / name).symlink_to(REPO / folder)


def cmd_install_cptflow(args) -> int:
    """cptflow into SITE: pip, else (or with --method links) the tree of links."""
    if args.method == "pip" and pip_install_cptflow(args.site):
        how = "pip install --no-build-isolation (a copy of the checkout)"
    else:
        if args.method == "pip":
            print("pip could not build cptflow offline: linking the checkout instead", file=sys.stderr)
        link_cptflow(args.site)
        how = "symbolic links to the checkout" + (" (pip build failed)" if args.method == "pip" else "")
    record = {"cptflow": how, "site": str(args.site)}
    atomic_write_json(args.json_out, record)
    print(json.dumps(record))
    return 0


def pinned_wheels() -> list[str]:
    lines = WHEELS_LIST.read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def cmd_probe(args) -> int:
    """Versions, the device, and every import the later steps make; a 4-bit round trip through bitsandbytes."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    record: dict = {"python": sys.version.split()[0], "executable": sys.executable, "versions": {}}
    names = ["torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "pydantic", "pydantic-core"]
    names += ["pyarrow", "numpy", "safetensors", "tokenizers", "pytest", "setuptools"]
    for name in names:
        try:
            record["versions"][name] = version(name)
        except PackageNotFoundError:
            record["versions"][name] = None
    record["pinned_wheels"] = pinned_wheels()
    record["wheels_carried"] = sorted(p.name for p in args.wheels.glob("*.whl")) if args.wheels.is_dir() else []
    record["wheels_mib"] = round(sum(p.stat().st_size for p in args.wheels.glob("*.whl")) / MiB, 1)
    if args.require_cuda and not record["wheels_carried"]:
        print(
            f"no wheels in {args.wheels}: run `make gpu-wheels` where PyPI is reachable, carry gpu_wheels/",
            file=sys.stderr,
        )
    cuda = torch.cuda.is_available()
    record["cuda_available"] = cuda
    record["torch_cuda"] = torch.version.cuda
    if cuda:
        props = torch.cuda.get_device_properties(0)
        record["device"] = torch.cuda.get_device_name(0)
        record["device_memory_mib"] = round(props.total_memory / MiB)
        record["capability"] = f"{props.major}.{props.minor}"
        record["bf16_supported"] = torch.cuda.is_bf16_supported()

    import bitsandbytes.functional as bnbf
    import pydantic  # noqa: F401
    import transformers  # noqa: F401

    import cptflow
    import cptflow.kernels  # noqa: F401
    import cptflow.tasks.cpt  # noqa: F401
    import cptflow.tasks.perplexity  # noqa: F401
    import cptflow.training  # noqa: F401
    from cptflow.models import pick_device, pick_dtype

    record["cptflow_file"] = cptflow.__file__
    device = pick_device("auto")
    record["training_device"] = device
    record["compute_dtype"] = str(pick_dtype("auto", device)).removeprefix("torch.")
    weight = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    restored = bnbf.dequantize_4bit(packed, state)
    record["bnb_nf4_relative_error"] = round(((restored - weight).float().norm() / weight.float().norm()).item(), 4)
    atomic_write_json(args.json_out, record)
    print(json.dumps(record, indent=2))
    if args.require_cuda and not cuda:
        print("CUDA is not available: the GPU check needs a GPU (--dry-run runs on a CPU)", file=sys.stderr)
        return 1
    return 0


def cmd_tiny_llama(args) -> int:
    """A tiny random Llama (no tokenizer: the training bench feeds token ids), for the dry run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(args.directory), safe_serialization=True)
    return 0


def cmd_perplexity(args) -> int:
    """Perplexity-scoring throughput on the device: the stage's batched scorer against one document per forward."""
    import torch

    from cptflow.tasks.perplexity import PerplexityConfig, resolve_batch_tokens, score_texts, score_texts_naive

    if args.threads:
        torch.set_num_threads(args.threads)
    bench = load_benchmark("bench_perplexity")
    cuda = args.device == "cuda"
    # The tokenizer's BPE is trained on these texts (14 s for all 2811 sample texts on 2 busy cores).
    corpus = bench.read_raw_texts(REPO / "data" / "raw", limit=args.corpus_texts)
    if not corpus:
        corpus = bench.generated_texts(2000)
    # bench_perplexity's random model: a 4096-token BPE trained on the corpus, a random Llama h256 x 4.
    small_model, tokenizer, label = bench.load_model("random", corpus)
    if args.model == "1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        # TinyLlama-1.1B's shape (bench_training's), random weights, built on the device in bf16, as the
        # stage loads a scoring model there (dtype auto). Speed does not depend on the weights.
        shape = load_benchmark("bench_training").LLAMA_1B
        config = LlamaConfig(vocab_size=32000, bos_token_id=tokenizer.bos_token_id, eos_token_id=2, **shape)
        torch.manual_seed(0)
        dtype = torch.bfloat16 if cuda else torch.float32
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(args.device):
                model = LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(previous)
        label = "random Llama h2048 x 22 layers, vocab 32000"
        del small_model
    else:
        model = small_model.to(args.device)
    texts = bench.documents_of_realistic_length(corpus, tokenizer, args.docs, seed=0)
    lengths = [min(len(ids), args.max_length) for ids in tokenizer(texts)["input_ids"]]
    total_tokens = sum(lengths)
    auto_budget = resolve_batch_tokens(PerplexityConfig(), model)
    budgets = [auto_budget, 4 * auto_budget] if cuda else [auto_budget]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        return result, time.perf_counter() - start

    score_texts_naive(texts[:8], model, tokenizer, max_length=args.max_length)  # warm-up: allocator, kernels
    naive, naive_s = timed(lambda: score_texts_naive(texts, model, tokenizer, max_length=args.max_length))
    runs = []
    for budget in budgets:
        score_texts(texts[:16], model, tokenizer, max_length=args.max_length, batch_tokens=budget)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        batched, seconds = timed(
            lambda budget=budget: score_texts(texts, model, tokenizer, max_length=args.max_length, batch_tokens=budget)
        )
        rel = [abs(b.perplexity - n.perplexity) / n.perplexity for b, n in zip(batched, naive) if n.tokens]
        runs.append(
            {
                "batch_tokens": budget,
                "seconds": round(seconds, 3),
                "docs_per_s": round(len(texts) / seconds, 1),
                "tokens_per_s": round(total_tokens / seconds, 1),
                "max_rel_diff_vs_naive": max(rel, default=0.0),
                "token_counts_equal": all(b.tokens == n.tokens for b, n in zip(batched, naive)),
                **({"peak_allocated_mib": round(torch.cuda.max_memory_allocated() / MiB, 1)} if cuda else {}),
            }
        )
    auto = runs[0]
    record = {
        "benchmark": "perplexity_scoring_device",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model": label,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "docs": len(texts),
        "tokens": total_tokens,
        "max_length": args.max_length,
        "batch_tokens": auto["batch_tokens"],
        "batched_s": auto["seconds"],
        "batched_docs_per_s": auto["docs_per_s"],
        "batched_tokens_per_s": auto["tokens_per_s"],
        "naive_s": round(naive_s, 3),
        "naive_docs_per_s": round(len(texts) / naive_s, 1),
        "naive_tokens_per_s": round(total_tokens / naive_s, 1),
        "speedup": round(naive_s / auto["seconds"], 3),
        "max_rel_diff_vs_naive": auto["max_rel_diff_vs_naive"],
        "token_counts_equal": auto["token_counts_equal"],
        **({"peak_allocated_mib": auto["peak_allocated_mib"]} if cuda else {}),
        "batch_tokens_runs": runs,
    }
    atomic_write_json(args.json_out, record)
    print(json.dumps(record))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the whole check (scripts/gpu_check.sh)")
    run.add_argument("outdir", type=Path, help="summary.json and one log per step go here (7 files)")
    run.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no wheels installed")
    run.add_argument("--wheels", type=Path, default=WHEELS_DIR, help="wheels to install first (make gpu-wheels)")
    install = sub.add_parser("install-cptflow", help=argparse.SUPPRESS)
    install.add_argument("site", type=Path)
    install.add_argument("--json-out", type=Path, required=True)
    install.add_argument("--method", choices=("pip", "links"), default="pip", help="pip falls back to links")
    probe = sub.add_parser("probe", help=argparse.SUPPRESS)
    probe.add_argument("--json-out", type=Path, required=True)
    probe.add_argument("--wheels", type=Path, default=WHEELS_DIR)
    probe.add_argument("--require-cuda", action="store_true")
    tiny = sub.add_parser("tiny-llama", help=argparse.SUPPRESS)
    tiny.add_argument("directory", type=Path)
    perplexity = sub.add_parser("perplexity", help=argparse.SUPPRESS)
    perplexity.add_argument("--device", choices=("cpu", "cuda"), required=True)
    perplexity.add_argument("--docs", type=int, required=True)
    perplexity.add_argument("--model", choices=("small", "1b"), required=True)
    perplexity.add_argument("--max-length", type=int, default=512, help="the stage's default")
    perplexity.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    perplexity.add_argument("--corpus-texts", type=int, default=1000, help="sample texts read (data/raw)")
    perplexity.add_argument("--json-out", type=Path, required=True)
    args = parser.parse_args()
    handlers = {
        "run": cmd_run,
        "install-cptflow": cmd_install_cptflow,
        "probe": cmd_probe,
        "tiny-llama": cmd_tiny_llama,
        "perplexity": cmd_perplexity,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
