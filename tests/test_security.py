"""Security (issue 7): safe loading everywhere (checked on the sources' AST), loopback by default, paths
in configs that cannot leave the work directory, and planted secrets that never reach an output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cptflow.config import ConfigError, load_config
from drills.security import check_source, quick_secret_scan, runtime_findings, static_findings, ui_argv

REPO = Path(__file__).resolve().parents[1]


# --- static checks --------------------------------------------------------------------------------------
def test_repository_sources_load_safely():
    findings = static_findings(REPO)
    assert findings == [], "\n".join(map(str, findings))


def test_the_static_checker_finds_each_unsafe_pattern():
    unsafe = """
import torch, yaml
from transformers import AutoModelForCausalLM, LlamaForCausalLM, AutoTokenizer
state = torch.load(path)
state = torch.load(path, weights_only=False)
ok = torch.load(path, map_location="cpu", weights_only=True)
data = yaml.load(text)
data = yaml.load(text, Loader=yaml.FullLoader)
ok = yaml.load(text, Loader=yaml.SafeLoader)
ok = yaml.safe_load(text)
model = AutoModelForCausalLM.from_pretrained(
    path, trust_remote_code=True)
model = LlamaForCausalLM.from_pretrained(path, use_safetensors=True)
ok = AutoTokenizer.from_pretrained(path)
def load(name, trust_remote_code=True): ...
class Cfg:
    trust_remote_code: bool = Field(True)
"""
    found = [(f.line, f.rule) for f in check_source(unsafe, "unsafe.py")]
    assert sorted(found) == [
        (4, "torch-load"),
        (5, "torch-load"),
        (7, "yaml-load"),
        (8, "yaml-load"),
        (11, "safetensors"),
        (11, "trust-remote-code"),
        (15, "trust-remote-code"),
        (17, "trust-remote-code"),
    ]


def test_a_loader_built_on_safeloader_is_safe_and_one_on_loader_is_not():
    source = """
import yaml
class UniqueKeys(yaml.SafeLoader): ...
class Anything(yaml.Loader): ...
ok = yaml.load(text, Loader=UniqueKeys)
bad = yaml.load(text, Loader=Anything)
"""
    assert [(f.line, f.rule) for f in check_source(source, "loaders.py")] == [(6, "yaml-load")]


def test_defaults_are_safe_and_the_ui_binds_loopback_unless_told_otherwise():
    assert runtime_findings() == []
    argv = ui_argv(env_host="0.0.0.0")  # an exported server host does not expose the UI
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    argv = ui_argv(host="0.0.0.0")
    assert argv[argv.index("--host") + 1] == "0.0.0.0"


# --- paths in configs -------------------------------------------------------------------------------------
def _config(tmp_path: Path, source_name: str, name: str = "t") -> Path:
    (tmp_path / "docs.jsonl").write_text(json.dumps({"id": "1", "text": "hello"}) + "\n")
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "base_model": "builtin:tiny-llama",
                "sources": [{"name": source_name, "role": "general", "paths": ["docs.jsonl"]}],
            }
        )
    )
    return path


@pytest.mark.parametrize("bad", ["../../x", "a/b", "..", "/etc", "x\\y", "web\x00", ".hidden", "~root", "Web"])
def test_a_source_name_that_could_leave_the_work_dir_is_refused_naming_the_key(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"sources\.0\.name: String should match pattern"):
        load_config(_config(tmp_path, bad))


@pytest.mark.parametrize("bad", ["../x", "a/b", ".."])
def test_a_pipeline_name_with_a_path_in_it_is_refused_naming_the_key(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"  - name: String should match pattern"):
        load_config(_config(tmp_path, "web", name=bad))


# --- planted secrets -----------------------------------------------------------------------------------------
def test_planted_secrets_reach_no_output_log_card_artifact_or_webhook_body(tiny_llama_dir, tmp_path):
    scan = quick_secret_scan(tmp_path, tiny_llama_dir, documents=30)
    assert scan["hits"] == []
    assert scan["files_scanned"] > 20  # manifests, shards, excluded/rejected, the model card
    assert scan["outside_work_dir"] == []  # no stage wrote beside its work dir
    card = (Path(scan["work_dir"]) / "export" / "README.md").read_text()
    assert card.count("<redacted>") == 4  # the SecretStr, the raw webhook URL, the token, the URL with a password
    [delivery] = scan["webhook"]  # the failure path ran and notified
    assert delivery["path"].endswith(scan["secrets"]["WEBHOOK_SECRET"])  # the URL is used, not written
    assert json.loads(delivery["body"])["stage"] == "perplexity"
    [artifact] = scan["artifacts"]
    assert "cptflow run failed: security-drill" in artifact and "--from perplexity" in artifact
