"""scripts/gpu_check.sh: its dry run on this CPU (every step, tiny sizes), the caps, and the GPU plan's wiring.

The GPU run itself needs a GPU machine (docs/benchmarks.md, "GPU check"); here the same script runs each step on
the CPU, and the orchestration (caps, a failing step, the install of cptflow) is checked with small commands.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"

# scripts/ is no package: the script by its path (registered first: its dataclass looks its module up).
_spec = importlib.util.spec_from_file_location("cptflow_gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = sys.modules["cptflow_gpu_check"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


@pytest.mark.slow
def test_dry_run_runs_every_step_ok_and_writes_their_figures(tmp_path):
    outdir = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([str(SCRIPT), "--dry-run", str(outdir)], env=env, capture_output=True, text=True, timeout=900)
    summary = json.loads((outdir / "summary.json").read_text())
    steps = summary["steps"]
    failed = {name: step.get("log_tail") for name, step in steps.items() if step["status"] != "ok"}
    assert proc.returncode == 0 and not failed, (proc.stdout[-3000:], proc.stderr[-3000:], failed)
    assert summary["mode"] == "dry-run" and summary["complete"] and summary["all_ok"]
    assert list(steps) == list(gpu_check.STEPS)
    # What comes back from a device machine's $OUT: at most 8 files.
    assert sorted(p.name for p in outdir.iterdir()) == sorted(["summary.json", *(f"{s}.log" for s in steps)])

    environment = steps["environment"]["figures"]
    assert environment["versions"]["torch"] and environment["cuda_available"] is False
    assert environment["bnb_nf4_relative_error"] < 0.2  # NF4 of Gaussian weights: about 0.09
    kernels = steps["kernel_tests"]["figures"]
    assert kernels["failed"] == kernels["errors"] == 0 and kernels["triton_passed"] == kernels["tests"] >= 3
    bench_kernels = steps["bench_kernels"]["figures"]
    assert bench_kernels["benchmark"] == "kernels_cpu"
    assert bench_kernels["loss_abs_diff"] <= 1e-4 * abs(bench_kernels["eager_loss"])
    training = steps["bench_training"]["figures"]
    assert training["speedup"] > 0 and training["ours_peak_mib"] > 0 and training["hf_peak_mib"] > 0
    assert training["ours_first_step_loss"] == pytest.approx(training["hf_first_step_loss"], rel=1e-4)
    assert set(training["sides"]) == {"cptflow", "hf"}
    perplexity = steps["perplexity"]["figures"]
    assert perplexity["docs"] == 12 and perplexity["batched_tokens_per_s"] > 0
    assert perplexity["token_counts_equal"] and perplexity["max_rel_diff_vs_naive"] < 1e-3  # float32 on CPU
    headline = summary["headline"]
    assert {"training_speedup", "training_memory_ratio", "perplexity_batched_tokens_per_s"} <= set(headline)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state == "Z"  # killed, not yet reaped by init


def test_a_timed_out_or_failing_step_does_not_stop_the_others(tmp_path, monkeypatch):
    pid_file = tmp_path / "grandchild.pid"
    # A step whose child leaves a grandchild (as bench_training's sides): the cap ends both.
    hang = ["bash", "-c", f"sleep 120 & echo $! > {pid_file}; wait"]
    fail = [sys.executable, "-c", "raise SystemExit(3)"]
    report = [sys.executable, "-c", 'print(\'noise\'); print(\'{"benchmark": "x", "figure": 2}\')']
    steps = [
        gpu_check.Step("hang", 2, [hang], lambda log: {}),
        gpu_check.Step("fail", 30, [fail, report], lambda log: {}),
        gpu_check.Step("report", 30, [report], lambda log: gpu_check.last_json_line(log, "benchmark")),
        gpu_check.Step("silent", 30, [fail[:2] + ["pass"]], lambda log: gpu_check.last_json_line(log, "benchmark")),
    ]
    monkeypatch.setattr(gpu_check, "plan", lambda *args: steps)
    monkeypatch.setattr(gpu_check, "STEPS", tuple(s.name for s in steps))
    monkeypatch.setitem(gpu_check.CAPS, "dry-run", {s.name: s.cap_s for s in steps})
    outdir = tmp_path / "out"
    args = argparse.Namespace(outdir=outdir, dry_run=True, wheels=tmp_path)
    assert gpu_check.cmd_run(args) == 1

    summary = json.loads((outdir / "summary.json").read_text())
    result = summary["steps"]
    assert {name: step["status"] for name, step in result.items()} == {
        "hang": "timeout",
        "fail": "failed",
        "report": "ok",
        "silent": "failed",  # exit 0 but no figures
    }
    assert result["fail"]["exit_code"] == 3 and "raise SystemExit(3)" in result["fail"]["error"]
    assert "noise" not in (outdir / "fail.log").read_text()  # the failing command ended its step
    assert result["report"]["figures"] == {"benchmark": "x", "figure": 2}
    assert result["silent"]["error"].startswith("no figures")
    assert summary["complete"] and not summary["all_ok"]
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(grandchild)


def test_a_failing_kernel_test_fails_the_step_and_keeps_the_counts(tmp_path):
    (tmp_path / "test_k.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('device', ['torch', 'triton'])\n"
        "def test_a(device): pass\n"
        "def test_b(): pytest.skip('no')\n"
        "@pytest.mark.parametrize('device', ['triton'])\n"
        "def test_c(device): assert device == 'torch'\n"
    )
    xml = tmp_path / "kernel_tests.xml"
    command = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", "test_k.py"]
    assert subprocess.run(command, cwd=tmp_path, capture_output=True).returncode == 1
    counts = gpu_check.kernel_test_figures(tmp_path, dry_run=False)(tmp_path / "unused.log")
    assert {k: counts[k] for k in ("tests", "passed", "failed", "errors", "skipped", "triton_passed")} == {
        "tests": 4,
        "passed": 2,
        "failed": 1,
        "errors": 0,
        "skipped": 1,
        "triton_passed": 1,
    }
    assert "test_c[triton]" in gpu_check.kernel_test_check(counts)
    assert gpu_check.kernel_test_check({**counts, "failed": 0, "failed_tests": []}) is None


def test_gpu_plan_compiles_the_kernels_on_cuda_within_the_cap(tmp_path):
    wheels = tmp_path / "gpu_wheels"
    wheels.mkdir()
    for name in ("bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", "pydantic-2.14.4-py3-none-any.whl"):
        (wheels / name).touch()
    steps = {s.name: s for s in gpu_check.plan(False, tmp_path / "work", wheels, tmp_path / "site")}
    assert tuple(steps) == gpu_check.STEPS
    assert sum(s.cap_s for s in steps.values()) + gpu_check.KILL_GRACE_S * len(steps) <= gpu_check.CAP_LIMIT_S

    install, *_ = steps["environment"].commands
    assert install[-2:] == [str(p) for p in sorted(wheels.glob("*.whl"))]
    assert {"--no-index", "--no-deps", "--target"} <= set(install)
    assert steps["environment"].commands[-1][-1] == "--require-cuda"
    kernel_tests = steps["kernel_tests"]
    assert kernel_tests.env == {"TRITON_INTERPRET": None} and "-k" not in kernel_tests.commands[0]
    for name in ("bench_kernels", "bench_training", "perplexity"):
        (command,) = steps[name].commands
        assert command[command.index("--device") + 1] == "cuda", name
    assert "1b" in steps["bench_training"].commands[0] and "1b" in steps["perplexity"].commands[0]
    # The list `make gpu-wheels` downloads: one pin per package, bitsandbytes and pydantic among them.
    pins = dict(line.split("==") for line in gpu_check.pinned_wheels())
    assert {"bitsandbytes", "pydantic", "pydantic-core"} <= set(pins)


@pytest.mark.parametrize("method", ["pip", "links"])
def test_install_cptflow_gives_the_package_dir_mapping(tmp_path, method):
    site = tmp_path / "site"
    script = REPO / "scripts" / "gpu_check.py"
    command = [sys.executable, str(script), "install-cptflow", str(site), "--json-out", str(tmp_path / "i.json")]
    subprocess.run([*command, "--method", method], check=True, capture_output=True, timeout=300)
    assert json.loads((tmp_path / "i.json").read_text())["cptflow"].startswith("pip" if method == "pip" else "symbolic")
    probe = (
        "import json, sys, cptflow.tasks, cptflow.kernels.swiglu, cptflow.models as m;"
        "s = sys.modules['cptflow.kernels.swiglu'];"
        "print(json.dumps([cptflow.tasks.__file__, s.__file__, str(m.SAMPLE_DATA_DIR), len(m.default_corpus_files())]))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    tasks_file, kernel_file, sample_data, corpus_files = json.loads(out.stdout)
    # Imported from the site (PYTHONPATH comes before the editable install), with tasks/ as cptflow.tasks.
    assert tasks_file == str(site / "cptflow" / "tasks" / "__init__.py")
    assert kernel_file == str(site / "cptflow" / "kernels" / "swiglu.py")
    assert sample_data == str(site / "cptflow" / "sample_data") and corpus_files >= 1
