"""cpt -> sft -> evaluate (with export) on a tiny stand-in of every model family (tests/families.py).

Per family: LoRA on every linear layer of every block (fused projections and Conv1D included), the
embeddings (or the one tied matrix) at the embedding LR, tied stays tied through the export, the merged
export gives the adapted model's logits, evaluate measures what each stage measured, the tokenize
manifest names its encoder, and sft trains on the answers only.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
from families import FAMILIES, build_family
from test_flow import REPO, corpus, write_config  # noqa: F401  (the flow tests' corpus fixture and config)

from cptflow.config import load_config
from cptflow.plan import DATA_STAGES, plan_pipeline, run_data_stage_plain
from cptflow.store import read_manifest

SHARED_STAGES = ("clean", "quality", "perplexity")  # independent of the base model (perplexity scores with tiny-llama)
# What each family's template renders right after an answer: the trained span is the answer and this.
ANSWER_END = {
    "llama3": "<|eot_id|>",
    "smollm2": "<|im_end|>",
    "qwen2.5": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "mistral": "</s>",
    "gemma2": "<end_of_turn>",
    "gemma3": "<end_of_turn>",
    "phi3": "<|end|>",
    "gpt2": "<|endoftext|>",  # no template of its own: sft's default ends an answer with EOS
}
CONVERSATION = [
    {"role": "user", "content": "What is the half-life of drug A?"},
    {"role": "assistant", "content": "About six hours."},
    {"role": "user", "content": "And of drug B?"},
    {"role": "assistant", "content": "Twelve hours in adults."},
]


QUICK = "llama3"  # the one row `make test` runs: the matrix takes 60-90 s on 2 busy cores


def family_params():
    for name in FAMILIES:
        slow = [] if name == QUICK else [pytest.mark.slow]
        yield pytest.param(name, marks=slow, id=name)


@pytest.fixture(scope="session")
def family_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def shared_data(corpus, tiny_llama_dir, tmp_path_factory) -> Path:  # noqa: F811
    """clean, quality and perplexity, once: with a fixed scoring model they are the same for every family."""
    root = tmp_path_factory.mktemp("families-shared")
    cfg = load_config(family_config(root, corpus, tiny_llama_dir, tiny_llama_dir))
    runs = plan_pipeline(cfg)
    for stage in SHARED_STAGES:
        run_data_stage_plain(runs[stage], cfg)
    return cfg.work_path


def family_config(directory: Path, corpus: Path, model: Path, scorer: Path) -> Path:  # noqa: F811
    return write_config(
        directory,
        corpus,
        model,
        perplexity={"keep_band": [0, 95], "batch_tokens": 4096, "model": str(scorer)},
        cpt={
            "lora": {"r": 4, "alpha": 8},
            "load_in_4bit": False,  # the merged export must reproduce the trained model's logits exactly
            "compute_dtype": "float32",
            "gradient_checkpointing": False,
            "learning_rate": 1e-3,
            "embedding_learning_rate": 2.5e-4,
            "micro_batch_size": 4,
            "max_steps": 2,
            "eval_steps": 2,
            "save_steps": 2,
        },
        sft={
            "data": [{"path": str(REPO / "data" / "instructions" / "alpaca.jsonl")}],
            "load_in_4bit": False,
            "compute_dtype": "float32",
            "gradient_checkpointing": False,
            "max_length": 256,
            "micro_batch_size": 4,
            "max_steps": 2,
            "eval_steps": 2,
            "save_steps": 2,
        },
        evaluate={"prompts": ["What is a half-life?"], "max_new_tokens": 4, "export": {"merged_dtype": "float32"}},
    )


def block_linear_layers(model) -> list[str]:
    """Every nn.Linear / Conv1D of every decoder block, by its full name: what LoRA must wrap."""
    from transformers.pytorch_utils import Conv1D

    blocks = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == 2]
    assert len(blocks) == 1, blocks
    return [
        name
        for name, module in model.named_modules()
        if name.startswith(blocks[0] + ".") and isinstance(module, (torch.nn.Linear, Conv1D))
    ]


def kinds_per_block(layers: list[str]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for name in layers:
        kinds[name.rsplit(".", 1)[-1]] = kinds.get(name.rsplit(".", 1)[-1], 0) + 1
    return dict(sorted((kind, count // 2) for kind, count in kinds.items()))  # 2 blocks


def lora_wrapped_layers(adapter_dir: Path) -> set[str]:
    """The layers an adapter holds LoRA weights for (base-model names, as in the base checkpoint)."""
    from safetensors.torch import load_file

    keys = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {k.removeprefix("base_model.model.").split(".lora_A")[0] for k in keys if ".lora_A" in k}


def trained_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    spans: list[list[int]] = []
    for position, label in enumerate(labels):
        if label == -100:
            continue
        if spans and spans[-1][-1] == position - 1:
            spans[-1].append(position)
        else:
            spans.append([position])
    return [[ids[i] for i in span] for span in spans]


@pytest.mark.parametrize("name", list(family_params()))
def test_family_trains_evaluates_and_exports(name, shared_data, corpus, tiny_llama_dir, family_cache, tmp_path, caplog):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cptflow.tasks.cpt as cpt
    import cptflow.tasks.evaluate as evaluate
    import cptflow.tasks.sft as sft
    from cptflow.tasks.evaluate import load_adapted

    family = FAMILIES[name]
    model_dir = build_family(name, family_cache)
    cfg = load_config(family_config(tmp_path, corpus, model_dir, tiny_llama_dir))
    for stage in SHARED_STAGES:
        shutil.copytree(shared_data / stage, cfg.work_path / stage)
    runs = plan_pipeline(cfg)
    timings = {}
    with caplog.at_level(logging.INFO):
        for stage in DATA_STAGES:
            started = time.perf_counter()
            run_data_stage_plain(runs[stage], cfg)
            timings[stage] = round(time.perf_counter() - started, 1)

    # The tokenize manifest and the run log say which encoder made the ids, and why not the fast one.
    encoder = read_manifest(runs["tokenize"].path)["encoder"]
    if family.fast_path:
        assert encoder == {"name": "tiktoken", "reason": ""}, encoder
        assert "tokenize: the tiktoken encoder encodes" in caplog.text
    else:
        assert encoder["name"] == "huggingface" and encoder["reason"], encoder
        assert (
            f"tokenize: the Hugging Face tokenizer encodes (no tiktoken equivalent: {encoder['reason']})" in caplog.text
        )

    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    layers = block_linear_layers(base)
    kinds = kinds_per_block(layers)
    tied = base.get_output_embeddings().weight is base.get_input_embeddings().weight
    assert tied is family.tied

    started = time.perf_counter()
    cpt_manifest = cpt.run(runs["cpt"], cfg)
    timings["cpt"] = round(time.perf_counter() - started, 1)
    assert cpt_manifest["lora_targets"] == {"blocks": 2, "per_block": kinds, "not_wrapped": []}
    assert lora_wrapped_layers(runs["cpt"].path / cpt_manifest["adapter"]) >= set(layers)  # every block's
    assert cpt_manifest["tied_embeddings"] is family.tied
    # The family's kernels are applied, or the manifest says why not (GPT-2: no RMSNorm, no gated MLP).
    patched = cpt_manifest["kernels"]["patched"]
    if name == "gpt2":
        assert patched["rms_norm"]["patched"] == 0 and "not supported" in patched["rms_norm"]["reason"], patched
    else:
        norms = sum(1 for m in base.modules() if type(m).__name__.endswith("RMSNorm"))
        assert patched["rms_norm"]["patched"] == norms and patched["swiglu"]["patched"] == 2, patched
    groups = {g["group"]: g for g in cpt_manifest["param_groups"]}
    assert groups["embeddings"]["lr"] == cfg.cpt.embedding_learning_rate
    assert groups["embeddings"]["tensors"] == (1 if family.tied else 2)  # the tied matrix once
    vocab, hidden = base.get_input_embeddings().weight.shape
    assert groups["embeddings"]["parameters"] == vocab * hidden * (1 if family.tied else 2)

    # sft: labels on the answers only, whatever the family's template
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    template, _ = sft.chat_template_for(tokenizer, cfg.sft)
    example = sft.tokenize_conversation(CONVERSATION, tokenizer, template, max_length=512)
    answers = [tokenizer.decode(span) for span in trained_spans(example["input_ids"], example["labels"])]
    assert [answer.strip() for answer in answers] == [m["content"] + ANSWER_END[name] for m in CONVERSATION[1::2]]

    started = time.perf_counter()
    sft_manifest = sft.run(runs["sft"], cfg)
    timings["sft"] = round(time.perf_counter() - started, 1)
    assert sft_manifest["lora_targets"] == {"blocks": 2, "per_block": kinds, "not_wrapped": []}
    assert lora_wrapped_layers(runs["sft"].path / sft_manifest["adapter"]) >= set(layers)
    assert sft_manifest["data"]["train"] > 0

    started = time.perf_counter()
    eval_manifest = evaluate.run(runs["evaluate"], cfg)
    timings["evaluate"] = round(time.perf_counter() - started, 1)
    for stage, manifest in (("cpt", cpt_manifest), ("sft", sft_manifest)):
        for short, eval_set in evaluate.EVAL_SET_NAMES.items():
            measured = eval_manifest["perplexity"][stage][short]
            assert measured == pytest.approx(manifest["eval"][eval_set]["perplexity"], rel=1e-5), (stage, short)

    merged_dir = runs["evaluate"].path / eval_manifest["export"]["merged"]["path"]
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) is family.tied
    adapted = load_adapted(str(model_dir), cfg.sft, runs["sft"].path / sft_manifest["adapter"])
    ids = torch.tensor([tokenizer("The half-life of a drug is the time it takes.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    print(f"{name}: seconds per stage {timings}")
