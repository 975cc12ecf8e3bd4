"""Tests for cptflow/export.py: merged checkpoints reproduce the adapted model, tied embeddings stay
tied, the output directory is atomic, and the model card is right and leaks no secrets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXTS = [
    "My neighbour fixed the kitchen window before the rain started.",
    "The old baker planted tomatoes and beans",
    "Every gardener visited the park near the river on a quiet Sunday.",
]


def _load_fp32(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)


def _train_adapter(base_dir: Path, adapter_dir: Path, *, ensure_weight_tying: bool, seed: int) -> dict:
    """Build the training stages' PEFT model, perturb it like training would, save it with the
    tokenizer; return the trained modules_to_save weights by module name."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import ModulesToSaveWrapper
    from transformers import AutoTokenizer

    config = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES,
        modules_to_save=["embed_tokens", "lm_head"],
        ensure_weight_tying=ensure_weight_tying,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(_load_fp32(base_dir), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # zero at init: make the LoRA delta real
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(adapter_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(adapter_dir)
    return {
        name: module.modules_to_save["default"].weight.detach().clone()
        for name, module in model.get_base_model().named_modules()
        if isinstance(module, ModulesToSaveWrapper)
    }


def _logits(model, tokenizer) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt")).logits.float()[0] for text in TEXTS]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def untied_adapter(tiny_llama_dir, tmp_path_factory):
    adapter_dir = tmp_path_factory.mktemp("untied") / "adapter"
    trained = _train_adapter(tiny_llama_dir, adapter_dir, ensure_weight_tying=False, seed=1)
    return adapter_dir, trained


@pytest.fixture(scope="module")
def tied_base_dir(tiny_llama_dir, tokenizer, tmp_path_factory) -> Path:
    """A random 2-layer Llama whose lm_head is its embedding matrix (tie_word_embeddings=True)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=86,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    out = tmp_path_factory.mktemp("tied-base") / "base"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def untied_merge(tiny_llama_dir, untied_adapter, tmp_path_factory):
    from cptflow.export import merge_adapter

    out_dir = tmp_path_factory.mktemp("merged-untied") / "merged"
    return merge_adapter(str(tiny_llama_dir), untied_adapter[0], out_dir, dtype="float32")


def test_merged_checkpoint_reproduces_adapted_model_logits(tiny_llama_dir, untied_adapter, untied_merge, tokenizer):
    from transformers import AutoModelForCausalLM

    from cptflow.export import load_adapted_model

    adapted = _logits(load_adapted_model(str(tiny_llama_dir), untied_adapter[0]), tokenizer)
    merged_model = AutoModelForCausalLM.from_pretrained(untied_merge["path"])
    merged = _logits(merged_model, tokenizer)
    base = _logits(_load_fp32(tiny_llama_dir).eval(), tokenizer)

    assert _max_diff(merged, adapted) < 1e-4
    assert _max_diff(merged, base) > 1e-2  # the adapter really changes the model
    assert untied_merge["tied_embeddings"] is False
    assert untied_merge["dtype"] == "float32"
    assert untied_merge["parameters"] == sum(p.numel() for p in merged_model.parameters())
    assert untied_merge["bytes"] > untied_merge["parameters"] * 4


def test_merged_checkpoint_holds_trained_embeddings_and_head(untied_adapter, untied_merge):
    from safetensors.torch import load_file

    _, trained = untied_adapter
    weights = load_file(Path(untied_merge["path"]) / "model.safetensors")
    assert set(trained) == {"model.embed_tokens", "lm_head"}
    for name, weight in trained.items():
        assert torch.equal(weights[f"{name}.weight"], weight), name
    assert not any("lora" in key or "modules_to_save" in key for key in weights)
    out = Path(untied_merge["path"])
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()


def test_tied_base_stays_tied_after_merge(tied_base_dir, tokenizer, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from cptflow.export import load_adapted_model, merge_adapter

    adapter_dir = tmp_path / "adapter"
    trained = _train_adapter(tied_base_dir, adapter_dir, ensure_weight_tying=True, seed=2)
    result = merge_adapter(str(tied_base_dir), adapter_dir, tmp_path / "merged", dtype="float32")

    merged = AutoModelForCausalLM.from_pretrained(result["path"])
    assert result["tied_embeddings"] is True
    assert merged.config.tie_word_embeddings is True
    assert merged.get_input_embeddings().weight is merged.get_output_embeddings().weight
    assert torch.equal(merged.get_input_embeddings().weight, trained["model.embed_tokens"])
    assert "lm_head.weight" not in load_file(Path(result["path"]) / "model.safetensors")
    adapted = _logits(load_adapted_model(str(tied_base_dir), adapter_dir), tokenizer)
    assert _max_diff(_logits(merged, tokenizer), adapted) < 1e-4


def test_tied_base_trained_apart_is_untied_and_keeps_trained_head(tied_base_dir, tokenizer, tmp_path):
    """Without ensure_weight_tying the embedding and head copies diverge; re-tying them on reload
    would throw the trained head away (peft PR#2972, LlamaFactory#6446)."""
    from transformers import AutoModelForCausalLM

    from cptflow.export import load_adapted_model, merge_adapter

    adapter_dir = tmp_path / "adapter"
    with pytest.warns(UserWarning):  # peft warns about the tied layer without ensure_weight_tying
        trained = _train_adapter(tied_base_dir, adapter_dir, ensure_weight_tying=False, seed=3)
    result = merge_adapter(str(tied_base_dir), adapter_dir, tmp_path / "merged", dtype="float32")

    merged = AutoModelForCausalLM.from_pretrained(result["path"])
    assert result["tied_embeddings"] is False
    assert merged.config.tie_word_embeddings is False
    assert torch.equal(merged.get_output_embeddings().weight, trained["lm_head"])
    assert torch.equal(merged.get_input_embeddings().weight, trained["model.embed_tokens"])
    adapted = _logits(load_adapted_model(str(tied_base_dir), adapter_dir), tokenizer)
    assert _max_diff(_logits(merged, tokenizer), adapted) < 1e-4


def test_bfloat16_merge_loads_as_bf16_with_close_logits(tiny_llama_dir, untied_adapter, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from cptflow.export import load_adapted_model, merge_adapter

    result = merge_adapter(str(tiny_llama_dir), untied_adapter[0], tmp_path / "bf16", dtype="bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(result["path"])
    assert result["dtype"] == "bfloat16"
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert json.loads((Path(result["path"]) / "config.json").read_text())["dtype"] == "bfloat16"

    adapted = _logits(load_adapted_model(str(tiny_llama_dir), untied_adapter[0]), tokenizer)
    base = _logits(_load_fp32(tiny_llama_dir).eval(), tokenizer)
    rounding_error = _max_diff(_logits(merged, tokenizer), adapted)
    adapter_effect = _max_diff(base, adapted)
    assert rounding_error < 0.1 * adapter_effect


def test_merge_cleans_stale_temp_dir_and_replaces_previous_output(tiny_llama_dir, untied_adapter, tmp_path):
    from cptflow.export import merge_adapter

    out_dir = tmp_path / "out"
    stale = tmp_path / ".out.tmp-123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    out_dir.mkdir()
    (out_dir / "from-an-older-merge.txt").write_text("old")

    merge_adapter(str(tiny_llama_dir), untied_adapter[0], out_dir, dtype="float32")

    assert not stale.exists()
    assert not (out_dir / "from-an-older-merge.txt").exists()
    assert (out_dir / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_merge_leaves_no_output_and_no_temp_dir(tiny_llama_dir, untied_adapter, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    from cptflow.export import merge_adapter

    original_save = PreTrainedModel.save_pretrained

    def save_then_crash(self, save_directory, *args, **kwargs):
        original_save(self, save_directory, *args, **kwargs)  # weights on disk, tokenizer not yet
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(str(tiny_llama_dir), untied_adapter[0], tmp_path / "out", dtype="float32")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("peft_bug", ["drops_trained_embedding", "keeps_tie_flag_after_untying"])
def test_merge_refuses_to_save_what_older_peft_got_wrong(peft_bug, tied_base_dir, tmp_path, monkeypatch):
    """peft 0.21 merges modules_to_save and tying right; earlier versions did not (unsloth#3444,
    peft PR#2972). Re-create those bugs: the merge must raise instead of saving a wrong model."""
    import warnings

    from peft.tuners.tuners_utils import BaseTuner

    from cptflow.export import merge_adapter

    adapter_dir = tmp_path / "adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about a tied layer trained apart
        _train_adapter(
            tied_base_dir,
            adapter_dir,
            ensure_weight_tying=peft_bug == "drops_trained_embedding",
            seed=4,
        )
    original_merge = BaseTuner.merge_and_unload
    base_embedding = _load_fp32(tied_base_dir).get_input_embeddings().weight

    def buggy_merge(self, *args, **kwargs):
        merged = original_merge(self, *args, **kwargs)
        if peft_bug == "drops_trained_embedding":
            merged.get_input_embeddings().weight = base_embedding
        else:  # head and embedding differ, but a reload would tie them again
            merged.config.tie_word_embeddings = True
        return merged

    monkeypatch.setattr(BaseTuner, "merge_and_unload", buggy_merge)
    with pytest.raises(RuntimeError, match="embed_tokens|tie_word_embeddings"):
        merge_adapter(str(tied_base_dir), adapter_dir, tmp_path / "merged", dtype="float32")
    assert not (tmp_path / "merged").exists()


def test_merge_rejects_unknown_dtype(tiny_llama_dir, untied_adapter, tmp_path):
    from cptflow.export import merge_adapter

    with pytest.raises(ValueError, match="dtype"):
        merge_adapter(str(tiny_llama_dir), untied_adapter[0], tmp_path / "out", dtype="int8")


# --- model card ------------------------------------------------------------------------------

PERPLEXITY = {
    "base": {"domain": 100.0, "general": 20.0},
    "cpt": {"domain": 75.0, "general": 21.0},
    "sft": {"domain": 80.0, "general": 22.5},
}
HYPERPARAMETERS = {
    "base_model": "builtin:tiny-llama",
    "hub_token": "hf_PLANTEDSECRETabc123",
    "cpt": {"lora_r": 128, "learning_rate": 5e-05, "max_tokens": 100, "api_key": "sk-PLANTED2"},
    "sft": {"epochs": 2, "wandb_secret": "PLANTED3", "password": "PLANTED4"},
}
DATA = {"domain_tokens": 1_234_567, "general_tokens": 400_000, "documents": 5_321}


def _card(tmp_path: Path, **overrides) -> str:
    from cptflow.export import write_model_card

    kwargs = dict(
        model_name="tiny-llama-cpt",
        base_model="builtin:tiny-llama",
        data=DATA,
        hyperparameters=HYPERPARAMETERS,
        perplexity=PERPLEXITY,
        generations=[{"prompt": "The old baker", "base": "the the the", "cpt": "baked | bread\non Sunday"}],
    )
    kwargs.update(overrides)
    path = tmp_path / "README.md"
    write_model_card(path, **kwargs)
    return path.read_text(encoding="utf-8")


def test_model_card_has_front_matter_and_sections(tmp_path):
    card = _card(tmp_path)
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert card.startswith("---\n")
    assert "library_name: peft" in front
    assert 'base_model: "builtin:tiny-llama"' in front
    assert "- cptflow" in front and "- continued-pretraining" in front
    for heading in (
        "# tiny-llama-cpt",
        "## Data",
        "## Hyperparameters",
        "### cpt",
        "### sft",
        "## Evaluation",
        "## Sample generations",
        "## How to load",
    ):
        assert f"\n{heading}\n" in body, heading
    assert "| domain_tokens | 1,234,567 |" in body
    assert "| learning_rate | 5e-05 |" in body
    assert "PeftModel.from_pretrained" in body
    assert "baked \\| bread<br>on Sunday" in body  # a completion cannot break the table


def test_model_card_perplexity_table_shows_change_vs_base(tmp_path):
    card = _card(tmp_path)
    assert "| model | domain perplexity | vs base | general perplexity | vs base |" in card
    assert "| base | 100.00 |  | 20.00 |  |" in card
    assert "| cpt | 75.00 | -25.0% | 21.00 | +5.0% |" in card
    assert "| sft | 80.00 | -20.0% | 22.50 | +12.5% |" in card


def test_model_card_never_contains_secrets(tmp_path):
    card = _card(tmp_path)
    assert "PLANTED" not in card
    assert "| hub_token | <redacted> |" in card
    assert "| max_tokens | 100 |" in card  # a number under a 'token' name is not a credential


def test_model_card_without_sft_or_generations(tmp_path):
    perplexity = {"base": PERPLEXITY["base"], "cpt": PERPLEXITY["cpt"]}
    card = _card(tmp_path, perplexity=perplexity, generations=None)
    assert "## Sample generations" not in card
    assert "| sft |" not in card and "supervised fine-tuning" not in card
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_model_card_next_to_merged_checkpoint_says_transformers(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert "library_name: transformers" in _card(tmp_path)


def test_generations_render_as_one_escaped_table_row_per_prompt():
    """Model output is text: a newline stays inside its cell, a pipe or HTML renders as itself."""
    from cptflow.tasks.evaluate import generations_markdown

    markdown = generations_markdown(
        [
            {
                "prompt": "What is a half-life?",
                "base": "the the",
                "cpt": "Half of it\n| decays",
                "sft": "<script>x</script>",
            },
            {"prompt": "Second", "base": "", "cpt": "**bold** _x_", "sft": "ok"},
        ]
    )
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 3  # the header and one row per prompt
    assert "Half of it<br>\\| decays" in rows[1] and "&lt;script&gt;" in rows[1] and "<script>" not in markdown
    assert "(empty)" in rows[2] and "\\*\\*bold\\*\\*" in rows[2]
