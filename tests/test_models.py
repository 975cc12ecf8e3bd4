"""Tests for `builtin:tiny-llama` (cptflow.tiny_model) and the model-loading helpers (cptflow.models)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from cptflow import models, tiny_model
from cptflow.models import (
    load_causal_lm,
    load_tokenizer,
    model_fingerprint,
    pick_device,
    pick_dtype,
    resolve_model_path,
)
from cptflow.tiny_model import TINY_TEST_SPEC, build_fingerprint, build_tiny_llama

# Everyday blog-style English in the register of the sample corpus (which is template-generated, so
# fluent text far from its topics scores poorly too: compare like with like).
GENERAL_TEXT = (
    "A Simple Guide to Growing Tomatoes on a Balcony\n\nThe first time I tried growing tomatoes, I "
    "had no idea what I was doing. A lot of people ask me whether it is worth the effort, and my "
    "answer is always the same: start small and be patient. I water the pots early in the morning, "
    "and I keep a small notebook of what works and what doesn't. Don't be afraid to experiment with "
    "the potting mix; that is how you find out what works for you."
)
DOMAIN_TEXT = (
    "Pharmacokinetic parameters of intravenous vancomycin were estimated by nonlinear mixed-effects "
    "modelling in 112 critically ill patients receiving continuous renal replacement therapy. "
    "Clearance correlated with effluent flow rate (CL = 1.8 L/h; CV 34%) and the volume of "
    "distribution with body weight. Trough concentrations above 15 mg/L were associated with "
    "nephrotoxicity (OR 2.4, 95% CI 1.3-4.6), supporting AUC-guided therapeutic drug monitoring."
)


def perplexity(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


# --- builder -----------------------------------------------------------------------------------


def test_same_inputs_build_identical_weights_and_tokenizer(tiny_corpus_files, tmp_path):
    first = build_tiny_llama(tiny_corpus_files, tmp_path / "a", spec=TINY_TEST_SPEC)
    second = build_tiny_llama(tiny_corpus_files, tmp_path / "b", spec=TINY_TEST_SPEC)
    assert first.name == second.name
    weights_a = load_file(first / "model.safetensors")
    weights_b = load_file(second / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()


def test_build_does_not_change_callers_rng_or_determinism_flag(tiny_corpus_files, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_llama(tiny_corpus_files, tmp_path, spec=TINY_TEST_SPEC)
    assert torch.equal(torch.rand(3), expected)
    assert not torch.are_deterministic_algorithms_enabled()


def test_different_seed_gives_different_build(tiny_corpus_files):
    assert build_fingerprint(tiny_corpus_files, TINY_TEST_SPEC, 0) != build_fingerprint(
        tiny_corpus_files, TINY_TEST_SPEC, 1
    )


def test_second_call_returns_cached_path_without_rebuilding(tiny_corpus_files, tiny_llama_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny_model, "_build_into", fail)
    assert build_tiny_llama(tiny_corpus_files, tiny_llama_dir.parent, spec=TINY_TEST_SPEC) == (tiny_llama_dir)


def test_cache_dir_holds_only_the_finished_build(tiny_llama_dir):
    leftovers = [p.name for p in tiny_llama_dir.parent.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []
    fingerprint = build_fingerprint([Path(p) for p in _corpus_of(tiny_llama_dir)], TINY_TEST_SPEC, 0)
    assert tiny_llama_dir.name == f"tiny-llama-{fingerprint[:16]}"


def _corpus_of(build_dir: Path) -> list[str]:
    import json

    return json.loads((build_dir / "build_info.json").read_text())["corpus_files"]


def test_failed_build_leaves_no_output_dir(tiny_corpus_files, tmp_path, monkeypatch):
    def explode(out_dir, *args):
        (out_dir / "partial").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny_model, "_build_into", explode)
    with pytest.raises(RuntimeError, match="boom"):
        build_tiny_llama(tiny_corpus_files, tmp_path, spec=TINY_TEST_SPEC)
    assert [p for p in tmp_path.iterdir() if not p.name.startswith(".lock-")] == []


def test_html_and_broken_records_are_skipped(tiny_corpus_files):
    texts = list(tiny_model.iter_corpus_texts(tiny_corpus_files))
    assert len(texts) == 200
    assert not any(t.lstrip().startswith("<") for t in texts)


def test_built_dir_loads_with_auto_classes_as_untied_gqa_llama(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert isinstance(model, LlamaForCausalLM)
    config = model.config
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert config.vocab_size == len(tokenizer)
    assert tokenizer.model_max_length == config.max_position_embeddings


def test_tokenizer_prepends_bos_and_never_appends_eos(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tokenizer("The baker opened the window.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.bos_token_id not in tokenizer("hi", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The baker opened the window."


def test_special_token_ids_are_set_and_distinct(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert None not in ids and len(set(ids)) == 3
    assert tokenizer.unk_token == "<unk>"
    config = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == tuple(ids)


def test_chat_template_closes_assistant_turns_with_eos(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == "<s><|user|>\nHi?\n<|assistant|>\nHello.</s>\n"
    encoded = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assistant_ids = [i for i, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert tokenizer.decode(assistant_ids) == "Hello.</s>"
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")


def test_weights_saved_as_safetensors_only(tiny_llama_dir):
    names = {p.name for p in tiny_llama_dir.iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]


# --- models.py ---------------------------------------------------------------------------------


def test_unknown_builtin_name_lists_known_models():
    with pytest.raises(ValueError, match="builtin:tiny-llama"):
        resolve_model_path("builtin:giant-llama")
    with pytest.raises(ValueError, match="builtin:tiny-llama"):
        model_fingerprint("builtin:giant-llama")


def test_non_builtin_names_pass_through_unchanged(tmp_path):
    assert resolve_model_path("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_builtin_resolves_to_a_build_from_the_repo_corpus(monkeypatch, tiny_corpus_files, tmp_path):
    monkeypatch.setattr(models, "default_corpus_files", lambda: list(tiny_corpus_files))
    monkeypatch.setattr(models, "TINY_LLAMA_SPEC", TINY_TEST_SPEC)
    path = Path(resolve_model_path("builtin:tiny-llama", cache_dir=tmp_path))
    assert path.parent == tmp_path
    assert path.name == f"tiny-llama-{model_fingerprint('builtin:tiny-llama')[:16]}"


def test_builtin_without_corpus_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "default_corpus_files", lambda: [])
    with pytest.raises(FileNotFoundError, match="web-"):
        resolve_model_path("builtin:tiny-llama", cache_dir=tmp_path)


def test_local_fingerprint_follows_config_and_weight_files(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    first = model_fingerprint(str(tmp_path))
    assert model_fingerprint(str(tmp_path)) == first
    (tmp_path / "notes.txt").write_text("not a weight file")
    assert model_fingerprint(str(tmp_path)) == first
    (tmp_path / "model.safetensors").write_bytes(b"12345")
    assert model_fingerprint(str(tmp_path)) != first
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    (tmp_path / "config.json").write_text('{"hidden_size": 16}')
    assert model_fingerprint(str(tmp_path)) != first


def test_hub_fingerprint_is_id_and_revision():
    assert model_fingerprint("org/model") == "org/model"
    assert model_fingerprint("org/model", revision="abc123") == "org/model@abc123"


def test_device_and_dtype_choice_on_cpu():
    assert pick_device("cpu") == "cpu"
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError):
        pick_dtype("int3", "cpu")
    with pytest.raises(ValueError):
        pick_device("tpu")
    if not torch.cuda.is_available():
        assert pick_device("auto") == "cpu"
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda")


def test_load_causal_lm_gives_eval_model_on_device_in_dtype(tiny_llama_dir):
    model = load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="bfloat16")
    assert not model.training
    assert model.dtype == torch.bfloat16
    assert model.device.type == "cpu"
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    assert tokenizer.pad_token_id is not None


# --- the real default build ----------------------------------------------------------------------


def test_default_build_is_cached_and_finds_general_text_easier_than_domain_text(
    builtin_tiny_llama_dir,
):
    started = time.perf_counter()
    cache_dir = builtin_tiny_llama_dir.parent
    assert resolve_model_path("builtin:tiny-llama", cache_dir=cache_dir) == str(builtin_tiny_llama_dir)
    assert time.perf_counter() - started < 5
    model = load_causal_lm("builtin:tiny-llama", device="cpu", cache_dir=cache_dir)
    tokenizer = load_tokenizer("builtin:tiny-llama", cache_dir=cache_dir)
    general = perplexity(model, tokenizer, GENERAL_TEXT)
    domain = perplexity(model, tokenizer, DOMAIN_TEXT)
    print(f"tiny-llama perplexity: general {general:.1f}, domain {domain:.1f}")
    assert general * 1.5 < domain
