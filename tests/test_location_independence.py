"""The same config and data in two directories give the same bytes (issue 14): ids, file names in
rejects and meta, input fingerprints, and so every data stage's shards, manifests and eval split."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import yaml

from cptflow.config import load_config
from cptflow.plan import DATA_STAGES, plan_pipeline, run_data_stage_plain
from cptflow.store import read_manifest

REPO = Path(__file__).resolve().parents[1]
RAW = REPO / "data" / "raw"


def head(path: Path, n: int) -> bytes:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        return b"".join(line for _, line in zip(range(n), handle))


@pytest.fixture(scope="module")
def checkout(tiny_llama_dir, tmp_path_factory) -> Path:
    """A checkout-shaped tree: configs/pipeline.yaml naming ../data/... as the demo config does."""
    root = tmp_path_factory.mktemp("template")
    raw = root / "data" / "raw"
    shutil.copytree(RAW / "domain" / "guidelines", raw / "domain" / "guidelines")  # text files: path ids
    (raw / "domain" / "abstracts.jsonl").write_bytes(head(RAW / "domain" / "abstracts.jsonl", 40))
    (raw / "general").mkdir(parents=True)
    (raw / "general" / "web-000.jsonl.gz").write_bytes(
        gzip.compress(head(RAW / "general" / "web-000.jsonl.gz", 60), mtime=0)
    )
    shutil.copy2(RAW / "general" / "web-002-dirty.jsonl", raw / "general" / "web-002-dirty.jsonl")  # rejects
    config = {
        "name": "moved",
        "work_dir": "../work",
        "base_model": str(tiny_llama_dir),  # outside both copies: the same for both
        "sources": [
            {
                "name": "domain",
                "role": "domain",
                "paths": ["../data/raw/domain/abstracts.jsonl", "../data/raw/domain/guidelines"],
                "documents_per_shard": 30,
            },
            {
                "name": "general",
                "role": "general",
                "paths": ["../data/raw/general/web-*.jsonl*"],
                "text_field": "content",
                "id_field": None,  # every general id made from file and line too
                "documents_per_shard": 60,
            },
        ],
        "perplexity": {"keep_band": [0, 95], "batch_tokens": 4096, "max_length": 32},
        "mix": {"domain_eval_documents": 8, "general_eval_documents": 8, "window_documents": 50},
        "tokenize": {"seq_len": 64, "blocks_per_shard": 64},
    }
    (root / "configs").mkdir()
    (root / "configs" / "pipeline.yaml").write_text(yaml.safe_dump(config))
    return root


def run_data_stages(checkout: Path, destination: Path) -> dict[str, Path]:
    """Copy the checkout (mtimes kept, as `mv`, `cp -a` or `rsync -a` do) and run clean .. tokenize there."""
    shutil.copytree(checkout, destination)
    cfg = load_config(destination / "configs" / "pipeline.yaml")
    runs = plan_pipeline(cfg)
    for stage in DATA_STAGES:
        assert run_data_stage_plain(runs[stage], cfg) == "ran"
    return {stage: runs[stage].path for stage in DATA_STAGES}


def without_timings(manifest: dict) -> dict:
    """A manifest less what legitimately differs between two runs: wall-clock times."""
    manifest = dict(manifest)
    manifest.pop("timings")
    manifest["shards"] = [{k: v for k, v in shard.items() if k != "seconds"} for shard in manifest["shards"]]
    return manifest


def test_the_same_config_and_data_in_two_directories_give_byte_identical_outputs(checkout, tmp_path):
    first = run_data_stages(checkout, tmp_path / "a" / "checkout")
    second = run_data_stages(checkout, tmp_path / "elsewhere" / "much" / "deeper" / "cptflow-2")
    for stage in DATA_STAGES:
        assert first[stage].name == second[stage].name, f"{stage}: the fingerprint depends on the directory"
        one, two = read_manifest(first[stage]), read_manifest(second[stage])
        assert without_timings(one) == without_timings(two), stage
        assert one["outputs"] == two["outputs"], stage  # every output file, by sha256
        for entry in one["outputs"]:
            data = (first[stage] / entry["path"]).read_bytes()
            assert data == (second[stage] / entry["path"]).read_bytes()
            assert str(tmp_path).encode() not in data, f"{stage}/{entry['path']} holds an absolute path"
        assert str(tmp_path) not in json.dumps(one), f"{stage}: the manifest holds an absolute path"

    clean = first["clean"]
    ids = [json.loads(line)["id"] for p in sorted((clean / "shards").glob("*.jsonl")) for line in p.open()]
    assert "domain:guideline-01-sirolimus.txt:1" in ids  # relative to the configured directory
    assert "general:web-000.jsonl.gz:1" in ids
    rejected = [json.loads(line) for p in sorted((clean / "rejected").glob("*.jsonl")) for line in p.open()]
    assert rejected and {r["file"] for r in rejected} <= {"../data/raw/general/web-002-dirty.jsonl"}
    for name in ("domain_eval", "general_eval"):  # the held-out split: a hash of the ids
        held_out = [json.loads(line)["id"] for line in (first["mix"] / "eval" / f"{name}.jsonl").open()]
        assert held_out and held_out == [
            json.loads(line)["id"] for line in (second["mix"] / "eval" / f"{name}.jsonl").open()
        ]
