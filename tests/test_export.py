"""Tests for cptflow/export.py: merged checkpoints reproduce the adapted model (and equal PEFT's own merge bit
for bit), tied embeddings stay tied, sharded and bf16 bases keep their layout, unsupported adapters are
refused, the output directory is atomic, and the model card is right and leaks no secrets."""

from __future__ import annotations

import json
import shutil
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


def _train_adapter(
    base_dir: Path,
    adapter_dir: Path,
    *,
    ensure_weight_tying: bool,
    seed: int,
    target_modules: list[str] = TARGET_MODULES,
    modules_to_save: list[str] | None = None,
    use_rslora: bool = True,
    **lora_options,
) -> dict:
    """Build the training stages' PEFT model, perturb it like training would, save it with the
    tokenizer; return the trained modules_to_save weights by module name."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import ModulesToSaveWrapper
    from transformers import AutoTokenizer

    config = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=use_rslora,
        lora_dropout=0.0,
        target_modules=target_modules,
        modules_to_save=modules_to_save or ["embed_tokens", "lm_head"],
        ensure_weight_tying=ensure_weight_tying,
        task_type="CAUSAL_LM",
        **lora_options,
    )
    model = get_peft_model(_load_fp32(base_dir), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:  # B is zero at init: make the LoRA delta real
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


def _checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint, one file or several shards."""
    from safetensors.torch import load_file

    return {k: v for path in sorted(Path(model_dir).glob("*.safetensors")) for k, v in load_file(path).items()}


def _peft_merge(base_dir: Path, adapter_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The reference: PEFT's own merge_and_unload on the base loaded in float32, cast to `dtype`."""
    from cptflow.export import load_adapted_model

    merged = load_adapted_model(str(base_dir), adapter_dir).merge_and_unload().to(dtype)
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _assert_equals_peft_merge(merged_dir: Path, base_dir: Path, adapter_dir: Path, dtype: torch.dtype) -> None:
    ours, reference = _checkpoint(merged_dir), _peft_merge(base_dir, adapter_dir, dtype)
    assert set(ours) <= set(reference)
    # A tied model's state_dict also lists the head; the checkpoint holds the embedding only.
    assert set(reference) - set(ours) <= {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == dtype and torch.equal(tensor, reference[name]), name


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def untied_adapter(tiny_llama_dir, tmp_path_factory):
    adapter_dir = tmp_path_factory.mktemp("untied") / "adapter"
    trained = _train_adapter(tiny_llama_dir, adapter_dir, ensure_weight_tying=False, seed=1)
    return adapter_dir, trained


def _random_llama(tokenizer, directory: Path, *, tie: bool, **save_options) -> Path:
    """A random 2-layer Llama with the tiny tokenizer, saved (optionally in bf16, in shards)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=86,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    dtype = save_options.pop("dtype", torch.float32)
    model.to(dtype).save_pretrained(directory, **save_options)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tied_base_dir(tokenizer, tmp_path_factory) -> Path:
    """A random 2-layer Llama whose lm_head is its embedding matrix (tie_word_embeddings=True)."""
    return _random_llama(tokenizer, tmp_path_factory.mktemp("tied-base") / "base", tie=True)


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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_merged_tensors_equal_peft_merge_and_unload_bit_for_bit(
    dtype, tiny_llama_dir, untied_adapter, untied_merge, tmp_path
):
    """The streaming merge does PEFT's arithmetic (float32 W + (B @ A) * scaling, then the cast): the
    checkpoint equals PEFT's in-memory merge_and_unload tensor for tensor, byte for byte."""
    from cptflow.export import merge_adapter

    if dtype == "float32":
        merged_dir = Path(untied_merge["path"])
    else:
        merged_dir = Path(merge_adapter(str(tiny_llama_dir), untied_adapter[0], tmp_path / dtype, dtype=dtype)["path"])
    _assert_equals_peft_merge(merged_dir, tiny_llama_dir, untied_adapter[0], getattr(torch, dtype))


@pytest.mark.parametrize("use_rslora", [True, False])
def test_rank_and_alpha_patterns_scale_each_module_as_peft_does(use_rslora, tiny_llama_dir, tmp_path):
    """Per-module rank and alpha (rank_pattern / alpha_pattern), with and without rsLoRA: each module's
    scaling is PEFT's, so the checkpoint still equals PEFT's merge bit for bit."""
    from cptflow.export import merge_adapter

    adapter_dir = tmp_path / "adapter"
    _train_adapter(
        tiny_llama_dir,
        adapter_dir,
        ensure_weight_tying=False,
        seed=8,
        use_rslora=use_rslora,
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 4},
        alpha_pattern={"down_proj": 3, "v_proj": 64},
    )
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["use_rslora"] is use_rslora and config["rank_pattern"]
    result = merge_adapter(str(tiny_llama_dir), adapter_dir, tmp_path / "merged", dtype="float32")
    _assert_equals_peft_merge(Path(result["path"]), tiny_llama_dir, adapter_dir, torch.float32)


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
    assert (out / "generation_config.json").is_file()


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
    _assert_equals_peft_merge(Path(result["path"]), tied_base_dir, adapter_dir, torch.float32)


def test_tied_base_trained_apart_is_untied_and_keeps_trained_head(tied_base_dir, tokenizer, tmp_path):
    """Without ensure_weight_tying the embedding and head copies diverge; re-tying them on reload
    would throw the trained head away (peft PR#2972, LlamaFactory#6446)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from cptflow.export import load_adapted_model, merge_adapter

    adapter_dir = tmp_path / "adapter"
    with pytest.warns(UserWarning):  # peft warns about the tied layer without ensure_weight_tying
        trained = _train_adapter(tied_base_dir, adapter_dir, ensure_weight_tying=False, seed=3)
    result = merge_adapter(str(tied_base_dir), adapter_dir, tmp_path / "merged", dtype="float32")

    merged = AutoModelForCausalLM.from_pretrained(result["path"])
    assert result["tied_embeddings"] is False
    assert merged.config.tie_word_embeddings is False
    assert json.loads((Path(result["path"]) / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(merged.get_output_embeddings().weight, trained["lm_head"])
    assert torch.equal(merged.get_input_embeddings().weight, trained["model.embed_tokens"])
    assert torch.equal(load_file(Path(result["path"]) / "model.safetensors")["lm_head.weight"], trained["lm_head"])
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


@pytest.mark.parametrize("tie", [False, True])
def test_sharded_bf16_base_is_merged_into_the_same_shards(tie, tokenizer, tmp_path, monkeypatch):
    """A base saved in bfloat16 as 3+ shards: the merged checkpoint has the same shard files holding the
    same tensor names, an index whose total_size is the tensors' bytes, and PEFT's merge bit for bit;
    embeddings read in blocks of rows (a tiny CHUNK_BYTES) come out the same as read whole."""
    from transformers import AutoModelForCausalLM

    import cptflow.export
    from cptflow.export import load_adapted_model, merge_adapter

    base_dir = _random_llama(tokenizer, tmp_path / "base", tie=tie, dtype=torch.bfloat16, max_shard_size="20KB")
    base_index = json.loads((base_dir / "model.safetensors.index.json").read_text())
    assert len(set(base_index["weight_map"].values())) >= 3
    adapter_dir = tmp_path / "adapter"
    _train_adapter(base_dir, adapter_dir, ensure_weight_tying=tie, seed=5)
    monkeypatch.setattr(cptflow.export, "CHUNK_BYTES", 1024)  # the embedding: ~20 blocks of rows

    result = merge_adapter(str(base_dir), adapter_dir, tmp_path / "merged", dtype="bfloat16")

    out = Path(result["path"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert not (out / "model.safetensors").exists()
    weights = _checkpoint(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values())
    assert index["metadata"]["total_parameters"] == result["parameters"] == sum(t.numel() for t in weights.values())
    _assert_equals_peft_merge(out, base_dir, adapter_dir, torch.bfloat16)

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16 and result["tied_embeddings"] is tie
    assert (merged.get_input_embeddings().weight is merged.get_output_embeddings().weight) is tie
    adapted = _logits(load_adapted_model(str(base_dir), adapter_dir), tokenizer)
    base = _logits(_load_fp32(base_dir).eval(), tokenizer)
    assert _max_diff(_logits(merged, tokenizer), adapted) < 0.1 * _max_diff(base, adapted)


def test_gpt2_conv1d_weights_get_transposed_deltas(tokenizer, tmp_path):
    """GPT-2 stores its Conv1D weights as [in, out] (PEFT's fan_in_fan_out): each delta is transposed,
    square c_proj included, and the tied wte / lm_head stay one tensor."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from cptflow.export import load_adapted_model, merge_adapter

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapter_dir = tmp_path / "adapter"
    _train_adapter(
        tmp_path / "base",
        adapter_dir,
        ensure_weight_tying=True,
        seed=6,
        target_modules=["c_attn", "c_proj", "c_fc"],
        modules_to_save=["wte", "lm_head"],
        fan_in_fan_out=True,
    )
    result = merge_adapter(str(tmp_path / "base"), adapter_dir, tmp_path / "merged", dtype="float32")

    merged = AutoModelForCausalLM.from_pretrained(result["path"])
    assert result["tied_embeddings"] is True
    assert merged.get_input_embeddings().weight is merged.get_output_embeddings().weight
    adapted = _logits(load_adapted_model(str(tmp_path / "base"), adapter_dir), tokenizer)
    base = _logits(_load_fp32(tmp_path / "base").eval(), tokenizer)
    assert _max_diff(_logits(merged, tokenizer), adapted) < 1e-4
    assert _max_diff(base, adapted) > 1e-2
    _assert_equals_peft_merge(Path(result["path"]), tmp_path / "base", adapter_dir, torch.float32)


def test_adapter_module_missing_from_the_base_is_an_error_naming_it(tiny_llama_dir, untied_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    from cptflow.export import merge_adapter

    adapter_dir = tmp_path / "adapter"
    shutil.copytree(untied_adapter[0], adapter_dir)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    # As if trained on a deeper model: layer 7's down_proj, which the 2-layer base has not.
    renamed = {k.replace("layers.1.mlp.down_proj", "layers.7.mlp.down_proj"): v for k, v in weights.items()}
    save_file(renamed, adapter_dir / "adapter_model.safetensors", metadata={"format": "pt"})

    with pytest.raises(ValueError, match=r"model\.layers\.7\.mlp\.down_proj"):
        merge_adapter(str(tiny_llama_dir), adapter_dir, tmp_path / "merged", dtype="float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_adapter_that_is_not_plain_lora_is_refused(kind, tiny_llama_dir, tmp_path):
    """DoRA rescales each weight column after adding B @ A, and IA3 is another PEFT method: neither is
    W + scaling * B @ A, so the merge refuses them instead of writing a wrong model."""
    from peft import IA3Config, get_peft_model

    from cptflow.export import merge_adapter

    adapter_dir = tmp_path / "adapter"
    if kind == "dora":
        _train_adapter(tiny_llama_dir, adapter_dir, ensure_weight_tying=False, seed=7, use_dora=True)
    else:
        config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
        get_peft_model(_load_fp32(tiny_llama_dir), config).save_pretrained(adapter_dir)

    with pytest.raises(ValueError, match="use_dora" if kind == "dora" else "IA3 adapter; merge_adapter merges LoRA"):
        merge_adapter(str(tiny_llama_dir), adapter_dir, tmp_path / "merged", dtype="float32")
    assert not (tmp_path / "merged").exists()


def test_quantized_base_checkpoint_is_refused(tiny_llama_dir, untied_adapter, tmp_path):
    """Adding a delta to packed 4-bit (or FP8-with-scales) tensors would write garbage: the merge wants
    the unquantized base."""
    from cptflow.export import merge_adapter

    base_dir = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base_dir / "config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match="quantized checkpoint .bitsandbytes."):
        merge_adapter(str(base_dir), untied_adapter[0], tmp_path / "merged", dtype="float32")
    assert not (tmp_path / "merged").exists()


def test_streamed_shard_is_byte_identical_to_safetensors_save_file(tmp_path, monkeypatch):
    """The shard writer (header first, then tensor by tensor, block by block) writes the file that
    safetensors' own save_file writes for the same tensors after the cast."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import cptflow.export
    from cptflow.export import MergedTensor, write_safetensors

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(37, 5, generator=generator),
        "model.norm.weight": torch.randn(5, generator=generator).to(torch.bfloat16),
        "a.scalar": torch.tensor(3.5),
        "position_ids": torch.arange(7),
        "mask": torch.tensor([True, False, True]),
    }
    save_file(tensors, tmp_path / "source.safetensors", metadata={"format": "pt"})
    with safe_open(str(tmp_path / "source.safetensors"), framework="pt") as handle:
        planned = [
            MergedTensor(name, tmp_path / "source.safetensors", name, tuple(t.shape), handle.get_tensor(name).dtype)
            for name, t in tensors.items()
        ]
    monkeypatch.setattr(cptflow.export, "CHUNK_BYTES", 64)  # the embedding in blocks of 3 rows

    write_safetensors(tmp_path / "streamed.safetensors", planned, torch.float16)

    cast = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(cast, tmp_path / "expected.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "expected.safetensors").read_bytes()


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
    from transformers import PreTrainedTokenizerBase

    from cptflow.export import merge_adapter

    def crash_after_the_weights(self, save_directory, *args, **kwargs):
        assert (Path(save_directory) / "model.safetensors").is_file()  # weights on disk, tokenizer not yet
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", crash_after_the_weights)
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(str(tiny_llama_dir), untied_adapter[0], tmp_path / "out", dtype="float32")
    assert list(tmp_path.iterdir()) == []


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
