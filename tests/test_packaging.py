"""The built wheel: one top-level name, no clash with Hugging Face's `kernels`, the demo runs outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# What bitsandbytes (on AVX-512 BF16 hosts) says when `from kernels import get_kernel` finds cptflow's
# kernels/ instead of Hugging Face's. Offline, the hub kernel itself cannot be fetched either, and
# bitsandbytes warns about that too (a download error): that one is the environment's, not a shadowing.
SHADOWED_KERNELS = "cannot import name 'get_kernel'"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of a copy of the tracked files (a build in the checkout would leave build/ behind)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run(
        [
            sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
            "-w", str(root), str(source),
        ],
        check=True, capture_output=True, cwd=root,
    )  # fmt: skip
    (built,) = root.glob("cptflow-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv outside the checkout with the wheel installed; its dependencies (HF's `kernels`
    included, from the dev extra) come from this environment's site-packages through a .pth file."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (Path(site) / "cptflow-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True, capture_output=True
    )
    return root


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")


@pytest.mark.slow
def test_wheel_installs_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (top_level,) = [n for n in archive.namelist() if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["cptflow"]
        names = archive.namelist()
    assert {n.split("/")[0] for n in names if not n.startswith("cptflow-")} == {"cptflow"}
    assert "cptflow/kernels/fused_linear_cross_entropy.py" in names
    assert "cptflow/tasks/clean.py" in names and "cptflow/flows/pipeline.py" in names
    assert "cptflow/sample_configs/demo.yaml" in names and "cptflow/sample_data/instructions/alpaca.jsonl" in names


@pytest.mark.slow
def test_hf_kernels_and_the_fused_loss_live_side_by_side(venv, tmp_path):
    """Hugging Face's `kernels` imports as itself; one cpt step with cptflow's fused loss trains."""
    script = """
import logging, sys
from kernels import get_kernel  # Hugging Face's kernel hub, not cptflow's kernels/
from cptflow.kernels import fused_linear_cross_entropy
import cptflow.kernels, cptflow.training as training
assert callable(fused_linear_cross_entropy) and callable(get_kernel)
assert cptflow.kernels.__file__.startswith(sys.prefix), cptflow.kernels.__file__
tcfg = training.TrainingConfig(device="cpu", micro_batch_size=2, max_steps=1, lora={"r": 4, "alpha": 8},
                               kernels={"fused_linear_cross_entropy": "on"})
prepared = training.prepare_model("builtin:tiny-llama", tcfg)
assert training.fused_loss_for(prepared.model, tcfg) is not None
print("FUSED-OK")
"""
    result = subprocess.run([str(venv / "bin" / "python"), "-c", script], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "FUSED-OK" in output, output[-3000:]
    assert SHADOWED_KERNELS not in output and "cptflow/kernels" not in output, output[-3000:]


@pytest.mark.slow
def test_demo_runs_from_the_wheel_outside_the_checkout(venv, tmp_path):
    """`cptflow demo DIR` then `cptflow run DIR/configs/demo.yaml` (training cut to a few steps)."""
    cptflow = str(venv / "bin" / "cptflow")
    subprocess.run([cptflow, "demo", str(tmp_path / "demo")], cwd=tmp_path, env=_env(), check=True, capture_output=True)
    config = tmp_path / "demo" / "configs" / "demo.yaml"
    settings = yaml.safe_load(config.read_text())
    settings["cpt"].update(max_steps=4, eval_steps=2, save_steps=2)
    settings["sft"].update(epochs=1, max_steps=2)
    settings["evaluate"]["prompts"] = settings["evaluate"]["prompts"][:1]
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    result = subprocess.run(
        [cptflow, "run", str(config)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=1200
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert SHADOWED_KERNELS not in output and "cptflow/kernels" not in output, output[-4000:]
    export = list((tmp_path / "demo" / "work" / "demo" / "evaluate").glob("*/export"))
    assert export and (export[0] / "adapter" / "README.md").is_file(), output[-2000:]  # the model card
    assert (export[0] / "merged" / "model.safetensors").is_file() and (export[0] / "merged" / "README.md").is_file()
