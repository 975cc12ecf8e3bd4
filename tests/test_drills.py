"""Quick subsets of the reliability drills (drills/): SIGKILL and rerun a data and a training stage,
two processes running the same stages into one work directory, and the drills' own failure detection.

The full drills (`make drills`) run ≥ 20 kills per stage and the concurrent `cptflow run`s; these keep
the mechanism honest in `make test` (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from drills import drill_command
from drills.concurrency import plain_pair
from drills.kill import compare_with_reference, debris, stage_path, verify_committed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kill_drill(tmp_path_factory) -> tuple[Path, dict]:
    """`python drills/run.py kill --quick`: 2 seeded kills of quality and of cpt, each rerun and compared."""
    root = tmp_path_factory.mktemp("kill-drill")
    result = subprocess.run(
        drill_command("kill", "--quick", "--root", str(root), "--out", str(root / "report.json")),
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, json.loads((root / "report.json").read_text())


def test_killed_data_and_training_stages_rerun_to_the_reference_outputs(kill_drill):
    _, report = kill_drill
    stages = report["stages"]
    assert set(stages) == {"quality", "cpt"}
    for stage, result in stages.items():
        assert result["survived"] == result["total"] == 2, (stage, result["trials"])
        for trial in result["trials"]:
            assert (
                trial["after_kill"] in ("absent", "verified")
                and trial["rerun_returncode"] == 0
                and not trial["problems"]
            )
    # the kills land while the stages work, not after they are done
    assert sum(r["killed"] for r in stages.values()) >= 2


def test_the_drill_notices_a_changed_output_or_a_torn_commit(kill_drill, tmp_path):
    """The comparison can fail: one flipped byte in a committed shard is caught twice over."""
    root, _ = kill_drill
    config, reference = root / "pipeline.yaml", root / "reference"
    original = stage_path(config, reference, "quality")
    work = tmp_path / "work"
    copy = work / "quality" / original.name
    shutil.copytree(original, copy)
    assert compare_with_reference(original, reference, copy, work, "quality") == []
    assert verify_committed(copy) == "verified" and debris(copy) == []

    shard = next(p for p in sorted((copy / "shards").iterdir()) if p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert "does not match its sha256" in verify_committed(copy)
    (copy / "manifest.json").unlink()
    assert verify_committed(copy) == "absent"


def test_two_processes_running_the_same_data_stages_do_each_stage_once(kill_drill, tmp_path):
    root, _ = kill_drill
    config, reference = root / "pipeline.yaml", root / "reference"
    stages = ["clean", "quality"]
    result = plain_pair(config, reference, tmp_path / "shared", stages)
    assert result["succeeded"], result["errors"]
    assert result["ran"] == {"clean": 1, "quality": 1}  # the other process waited on the stage lock, then was cached
    assert result["store_problems"] == [] and result["differences"] == {}


def test_commit_clears_a_temporary_directory_left_by_a_killed_save(tmp_path):
    """Found by the crash-point drill: a kill inside save_adapter leaves `.adapter.tmp-<pid>/`; the
    commit used to unlink() it, fail with IsADirectoryError, and the stage could never commit again."""
    from cptflow.store import commit_manifest

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    stale = tmp_path / ".adapter.tmp-12345"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    (stale / ".adapter_config.json.tmp-12345").write_text("{")
    (tmp_path / ".train_log.jsonl.tmp-12345").write_text("half")

    manifest = commit_manifest(tmp_path, {"stage": "cpt"})
    assert [e["path"] for e in manifest["outputs"]] == ["adapter/adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "manifest.json"]
