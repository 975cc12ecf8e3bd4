"""Config validation messages, fingerprints that follow config and inputs, the store's atomic commit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from cptflow.config import ConfigError, load_config
from cptflow.store import atomic_path, commit_manifest, fingerprint, read_manifest

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def minimal(tmp_path: Path) -> dict:
    (tmp_path / "docs.jsonl").write_text(json.dumps({"id": "1", "text": "hello world"}) + "\n")
    return {
        "name": "t",
        "base_model": "builtin:tiny-llama",
        "sources": [{"name": "web", "role": "general", "paths": ["docs.jsonl"]}],
    }


def test_demo_config_is_valid_and_paths_resolve_against_the_config_file():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.work_path == (REPO / "work" / "demo").resolve()
    assert [s.name for s in cfg.sources] == ["domain", "general"]


def test_unknown_key_error_names_the_file_the_key_and_what_is_allowed(tmp_path):
    data = minimal(tmp_path)
    data["clean"] = {"dedupe": True}
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, data))
    message = str(err.value)
    assert "pipeline.yaml" in message and "unknown key 'clean.dedupe'" in message
    assert "allowed here: " in message and "dedup" in message and "pii" in message


def test_unknown_key_inside_a_source_list_item(tmp_path):
    data = minimal(tmp_path)
    data["sources"][0]["txt_field"] = "body"
    with pytest.raises(ConfigError, match=r"unknown key 'sources.0.txt_field' \(allowed here: name, role, paths"):
        load_config(write_config(tmp_path, data))


def test_wrong_type_and_missing_key_are_named(tmp_path):
    data = minimal(tmp_path)
    data["sources"][0]["documents_per_shard"] = "many"
    del data["base_model"]
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, data))
    assert "sources.0.documents_per_shard" in str(err.value) and "'many'" in str(err.value)
    assert "missing required key 'base_model'" in str(err.value)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_fingerprint_is_canonical():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_changing_one_stage_config_changes_it_and_downstream_fingerprints_only(tmp_path):
    from cptflow.plan import plan_pipeline

    data = minimal(tmp_path)
    base = {s: r.fingerprint for s, r in plan_pipeline(load_config(write_config(tmp_path, data))).items()}
    data["quality"] = {"gopher_quality": {"min_words": 10}}
    changed = {s: r.fingerprint for s, r in plan_pipeline(load_config(write_config(tmp_path, data))).items()}
    assert changed["clean"] == base["clean"]
    assert changed["quality"] != base["quality"] and changed["perplexity"] != base["perplexity"]
    # new input data changes clean, and therefore everything after it
    os.utime(tmp_path / "docs.jsonl", ns=(1, 1))
    touched = {s: r.fingerprint for s, r in plan_pipeline(load_config(write_config(tmp_path, data))).items()}
    assert all(touched[s] != changed[s] for s in touched)


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_manifest_is_written_last_and_lists_outputs_with_sha256(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.jsonl").write_text("{}\n")
    (tmp_path / "_work").mkdir()
    (tmp_path / "_work" / "a.done.json").write_text("{}")
    assert read_manifest(tmp_path) is None
    manifest = commit_manifest(tmp_path, {"stage": "clean"})
    assert manifest["outputs"] == [
        {
            "path": "shards/a.jsonl",
            "bytes": 3,
            "sha256": "ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356",
        }
    ]
    assert read_manifest(tmp_path) == manifest and not (tmp_path / "_work").exists()


def test_a_key_given_twice_is_an_error_naming_it_and_its_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(
        "name: x\nbase_model: m\nsources: [{name: d, role: domain, paths: [in]}]\n"
        "cpt:\n  max_steps: 3\ncpt:\n  max_steps: 4\n"
    )
    with pytest.raises(ConfigError, match=r"key 'cpt' appears twice in one mapping \(first on line 4\)(.|\n)*line 6"):
        load_config(path)
