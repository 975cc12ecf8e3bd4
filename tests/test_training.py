"""Training core and the cpt / sft stages on a tiny real Llama: parameter groups, 8-bit state, tied
embeddings, loss normalisation, kill-and-resume, KL to the base, kernels on vs off, sft masking."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from test_flow import corpus, write_config  # noqa: F401  (the flow tests' corpus fixture and config)

from cptflow.config import load_config
from cptflow.plan import DATA_STAGES, plan_pipeline, run_data_stage_plain
from cptflow.store import read_manifest
from cptflow.training import (
    IGNORE_INDEX,
    EmptyEmbeddingGroupError,
    LoraSettings,
    TrainingConfig,
    add_adapters,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    embeddings_tied,
    load_base_model,
    lr_factor,
    token_loss_sum,
    train_step,
)

REPO = Path(__file__).resolve().parents[1]
SMALL_LORA = LoraSettings(r=4, alpha=8)


def tiny_config(**overrides) -> TrainingConfig:
    values = dict(lora=SMALL_LORA, learning_rate=1e-3, embedding_learning_rate=2e-4, gradient_checkpointing=False)
    values.update(overrides)
    return TrainingConfig(**values)


def random_batch(vocab: int, rows: int = 4, length: int = 24, seed: int = 0, valid: list[int] | None = None) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (rows, length), generator=generator)
    labels = input_ids.clone()
    mask = torch.ones_like(input_ids)
    for row, n in enumerate(valid or [length] * rows):
        labels[row, n:] = IGNORE_INDEX
        mask[row, n:] = 0
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------
# Parameter groups, learning rates, optimizer state
# ---------------------------------------------------------------------------------------------


def test_param_groups_by_name_and_both_lrs_follow_the_schedule(tiny_llama_dir):
    tcfg = tiny_config(warmup_ratio=0.2, min_lr_ratio=0.1)
    model = add_adapters(load_base_model(str(tiny_llama_dir), tcfg), tcfg)
    optimizer = build_optimizer(model, tcfg)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"lora", "embeddings"}
    assert all("lora_" in n for n in groups["lora"]["param_names"])
    assert sorted(n.split(".modules_to_save")[0].rsplit(".", 1)[-1] for n in groups["embeddings"]["param_names"]) == [
        "embed_tokens",
        "lm_head",
    ]
    assert groups["embeddings"]["weight_decay"] == 0.0 and groups["lora"]["weight_decay"] == tcfg.weight_decay
    # every trainable parameter is in exactly one group
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)

    total = 10
    scheduler = build_scheduler(optimizer, tcfg, total)
    seen = []
    for step in range(total):
        factor = lr_factor(step, total_steps=total, warmup_steps=2, kind="cosine", min_lr_ratio=0.1)
        assert groups["lora"]["lr"] == pytest.approx(1e-3 * factor)
        assert groups["embeddings"]["lr"] == pytest.approx(2e-4 * factor)  # the 5x ratio holds at every step
        seen.append(groups["lora"]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] < seen[1] == pytest.approx(1e-3)  # warm-up, then the peak
    assert seen[-1] < seen[2] and groups["lora"]["lr"] == pytest.approx(1e-4)  # cosine down to the floor


def test_embedding_lr_that_would_apply_to_nothing_is_an_error(tiny_llama_dir):
    tcfg = tiny_config()
    model = add_adapters(load_base_model(str(tiny_llama_dir), tcfg), tcfg)
    for name, parameter in model.named_parameters():
        if "modules_to_save" in name:
            parameter.requires_grad_(False)
    with pytest.raises(EmptyEmbeddingGroupError, match="no embed_tokens/lm_head parameter is trainable"):
        build_param_groups(model, tcfg)
    # with embeddings off on purpose there is no embedding group and no error
    frozen = tiny_config(train_embeddings=False)
    model = add_adapters(load_base_model(str(tiny_llama_dir), frozen), frozen)
    assert [g["name"] for g in build_param_groups(model, frozen)] == ["lora"]


def test_embedding_lr_above_lr_is_rejected_and_an_odd_ratio_warned():
    with pytest.raises(ValidationError, match="must not exceed learning_rate"):
        TrainingConfig(learning_rate=1e-5, embedding_learning_rate=1e-4)
    assert TrainingConfig(learning_rate=5e-5, embedding_learning_rate=5e-6).warnings() == []
    assert "2-10x" in TrainingConfig(learning_rate=5e-5, embedding_learning_rate=4e-5).warnings()[0]


def test_embeddings_keep_32bit_adam_state_while_lora_is_8bit(tiny_llama_dir):
    tcfg = tiny_config(lora=LoraSettings(r=128, alpha=32))  # lora_A 128x32 = 4096 values: big enough for 8-bit state
    model = add_adapters(load_base_model(str(tiny_llama_dir), tcfg), tcfg)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, 4)
    train_step(model, optimizer, scheduler, [random_batch(300)], tcfg)
    groups = {g["name"]: g for g in optimizer.param_groups}
    for parameter in groups["embeddings"]["params"]:
        assert parameter.dtype == torch.float32
        assert optimizer.state[parameter]["state1"].dtype == torch.float32
    lora_a = [p for n, p in zip(groups["lora"]["param_names"], groups["lora"]["params"]) if "lora_A" in n]
    assert all(optimizer.state[p]["state1"].dtype == torch.uint8 for p in lora_a)
    # the override is private to this optimizer: a fresh one without embeddings keeps 8-bit everywhere
    from bitsandbytes.optim import GlobalOptimManager

    assert not GlobalOptimManager.get_instance().pid2config


def test_base_is_nf4_quantised_and_lora_targets_every_linear_layer(tiny_llama_dir):
    import bitsandbytes as bnb

    tcfg = tiny_config()
    model = add_adapters(load_base_model(str(tiny_llama_dir), tcfg), tcfg)
    layer = model.get_base_model().model.layers[0]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        module = getattr(layer.self_attn, name)
        assert isinstance(module.base_layer, bnb.nn.Linear4bit) and module.base_layer.weight.quant_type == "nf4"
        assert module.scaling["default"] == pytest.approx(8 / 4**0.5)  # rsLoRA: alpha / sqrt(r)
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert hasattr(getattr(layer.mlp, name), "lora_A")
    # Eval keeps the training layout on every CPU (bitsandbytes would repack for AVX512-BF16 hosts).
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9, 2]]))
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False)


def tiny_family_model(family: str, vocab: int, directory: Path) -> Path:
    """A random 2-block model of another family, saved as safetensors (no tokenizer needed here)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM

    if family == "phi3":  # fused qkv_proj and gate_up_proj
        config = Phi3Config(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        model = Phi3ForCausalLM(config)
    else:  # GPT-2: Conv1D c_attn / c_proj / c_fc
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


@pytest.mark.parametrize(
    ("family", "kinds"),
    [
        ("phi3", {"qkv_proj": 1, "o_proj": 1, "gate_up_proj": 1, "down_proj": 1}),
        ("gpt2", {"c_attn": 1, "c_proj": 2, "c_fc": 1}),
    ],
)
def test_all_linear_wraps_every_linear_layer_the_model_has(family, kinds, tmp_path):
    """LoRA targets come from the model: Phi-3's fused projections and GPT-2's Conv1D layers included,
    4-bit and full precision alike; the manifest's description counts them per block."""
    from cptflow.training import block_linear_kinds, describe_lora_targets

    directory = tiny_family_model(family, 300, tmp_path / family)
    for quantize in (True, False):
        tcfg = tiny_config(load_in_4bit=quantize)
        base = load_base_model(str(directory), tcfg)
        assert block_linear_kinds(base) == dict(sorted(kinds.items()))
        model = add_adapters(base, tcfg)
        described = describe_lora_targets(model)
        assert described == {"blocks": 2, "per_block": dict(sorted(kinds.items())), "not_wrapped": []}
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 5, 9, 2]]))


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_the_training_loss_is_the_models_own_loss(family, tmp_path, caplog):
    """Our loss (the head run outside the model) equals transformers' own `labels=` loss: Gemma 2's
    soft-capped logits included (the fused loss steps aside there), GPT-2's decoder under its own name."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from cptflow.training import fused_loss_for, token_loss_sum

    if family == "gemma2":
        config = Gemma2Config(
            vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0, attn_logit_softcapping=None,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        torch.manual_seed(0)
        Gemma2ForCausalLM(config).save_pretrained(str(tmp_path / family), safe_serialization=True)
        directory = tmp_path / family
    else:
        directory = tiny_family_model(family, 300, tmp_path / family)
    tcfg = tiny_config(load_in_4bit=False)
    model = load_base_model(str(directory), tcfg).eval()
    batch = random_batch(300, valid=[24, 20, 24, 12])
    with torch.no_grad():
        if family == "gemma2":  # logits far beyond the cap, so that capping decides the loss (uncapped: ~63)
            model.lm_head.weight.mul_(100)
        ours = token_loss_sum(model, batch)
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert ours.ce_sum / ours.tokens == pytest.approx(float(theirs.loss), rel=1e-5)
    assert family != "gemma2" or float(theirs.loss) < 10  # the cap is in play
    if family == "gemma2":
        with caplog.at_level("INFO"):
            assert fused_loss_for(model, tcfg) is None
        assert "final_logit_softcapping" in caplog.text


def test_an_explicit_target_list_is_checked_against_the_model(tiny_llama_dir, caplog):
    """A list naming layers the blocks lack is an error that lists theirs; one leaving some out is a warning."""
    from cptflow.training import lora_targets, prepare_model

    base = load_base_model(str(tiny_llama_dir), tiny_config())
    with pytest.raises(ValueError, match=r"\['qkv_proj'\].*q_proj"):
        lora_targets(base, tiny_config(lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "qkv_proj"])))
    partial = tiny_config(lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with caplog.at_level("WARNING"):
        prepared = prepare_model(str(tiny_llama_dir), partial)
    assert prepared.lora_targets["per_block"] == {"q_proj": 1, "v_proj": 1}
    missing = ["down_proj", "gate_proj", "k_proj", "o_proj", "up_proj"]
    assert prepared.lora_targets["not_wrapped"] == missing
    assert prepared.warnings and all(kind in prepared.warnings[0] for kind in missing)
    assert "leaves out" in caplog.text


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def parameter_deltas_after_one_step(model_dir: Path, micro_batches: list[dict], tcfg: TrainingConfig) -> dict:
    torch.manual_seed(0)
    model = add_adapters(load_base_model(str(model_dir), tcfg), tcfg)
    # lora_B starts at zero, which leaves lora_A without gradient: give B values so every weight learns
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(build_param_groups(model, tcfg), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_step(model, optimizer, scheduler, micro_batches, tcfg)
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}


def test_loss_is_normalised_by_tokens_across_the_accumulation_window(tiny_llama_dir):
    """Two micro-batches with different padding step exactly like one batch of all four rows."""
    tcfg = tiny_config(
        load_in_4bit=False, optimizer="adamw", max_grad_norm=None, learning_rate=1.0, embedding_learning_rate=1.0
    )
    batch = random_batch(300, rows=4, length=24, valid=[24, 20, 6, 3])
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    whole = parameter_deltas_after_one_step(tiny_llama_dir, [batch], tcfg)
    accumulated = parameter_deltas_after_one_step(tiny_llama_dir, halves, tcfg)
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-7)

    # the reference: transformers' own token-mean loss on the whole batch gives the same gradient
    torch.manual_seed(0)
    model = add_adapters(load_base_model(str(tiny_llama_dir), tcfg), tcfg)
    parts = token_loss_sum(model, batch)
    hf_loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert parts.loss_sum.item() / parts.tokens == pytest.approx(hf_loss.item(), rel=1e-5)

    # averaging per-micro-batch means (the classic bug) would give a different step
    per_micro_mean = [token_loss_sum(model, h) for h in halves]
    naive = sum(p.loss_sum.item() / p.tokens for p in per_micro_mean) / 2
    assert naive != pytest.approx(hf_loss.item(), rel=1e-3)


def test_kl_term_compares_with_the_base_through_disabled_adapters(tiny_llama_dir):
    tcfg = tiny_config(kl_weight=1.0, load_in_4bit=False, optimizer="adamw")
    model = add_adapters(load_base_model(str(tiny_llama_dir), tcfg), tcfg)
    batch = random_batch(300)
    assert token_loss_sum(model, batch, kl_weight=1.0).kl_sum == pytest.approx(0.0, abs=1e-5)  # fresh adapter == base
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, 3)
    for _ in range(3):
        record = train_step(model, optimizer, scheduler, [batch], tcfg)
    assert record["kl"] > 0
    # with adapters disabled the model is the base model, untouched by training
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    with torch.no_grad(), model.disable_adapter():
        disabled = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(disabled, base(input_ids=batch["input_ids"]).logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Tied embeddings
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    directory = tmp_path_factory.mktemp("tied-llama")
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def test_tied_embeddings_stay_tied_through_training_saving_and_merging(tied_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from cptflow.export import merge_adapter
    from cptflow.training import save_adapter

    tcfg = tiny_config()
    base = load_base_model(str(tied_llama_dir), tcfg)
    assert embeddings_tied(base)
    original = base.get_input_embeddings().weight.detach().clone()
    model = add_adapters(base, tcfg)
    optimizer = build_optimizer(model, tcfg)
    embedding_params = {g["name"]: g for g in optimizer.param_groups}["embeddings"]["params"]
    assert len(embedding_params) == 1  # one shared tensor, not two copies drifting apart
    scheduler = build_scheduler(optimizer, tcfg, 3)
    for _ in range(3):
        train_step(model, optimizer, scheduler, [random_batch(original.shape[0])], tcfg)
    causal_lm = model.get_base_model()
    embed = causal_lm.model.embed_tokens.modules_to_save["default"].weight
    head = causal_lm.lm_head.modules_to_save["default"].weight
    assert embed is head and not torch.equal(embed.detach(), original)

    from transformers import AutoTokenizer

    save_adapter(model, AutoTokenizer.from_pretrained(str(tied_llama_dir)), tmp_path / "adapter")
    merge_adapter(str(tied_llama_dir), tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    torch.testing.assert_close(merged.get_input_embeddings().weight, embed.detach().float())


def test_evaluate_loads_the_sft_model_of_a_tied_base_as_sft_trained_it(tied_llama_dir, tmp_path):
    """cpt trains, sft continues from its adapter; evaluate's sft model gives the logits of the model
    sft had in memory (a second adapter loaded next to cpt's lost the tied head: issue 16)."""
    from transformers import AutoTokenizer

    from cptflow.tasks.evaluate import load_adapted
    from cptflow.training import save_adapter

    tcfg = tiny_config()
    tokenizer = AutoTokenizer.from_pretrained(str(tied_llama_dir))
    vocab = len(tokenizer)

    def train(model, steps: int, seed: int):
        optimizer = build_optimizer(model, tcfg)
        scheduler = build_scheduler(optimizer, tcfg, steps)
        for step in range(steps):
            train_step(model, optimizer, scheduler, [random_batch(vocab, seed=seed + step)], tcfg)
        return model

    cpt = train(add_adapters(load_base_model(str(tied_llama_dir), tcfg), tcfg), 3, seed=0)
    save_adapter(cpt, tokenizer, tmp_path / "cpt")
    sft_tcfg = tiny_config(train_embeddings=True)
    sft = add_adapters(load_base_model(str(tied_llama_dir), sft_tcfg), sft_tcfg, adapter_dir=tmp_path / "cpt")
    sft = train(sft, 2, seed=10)
    save_adapter(sft, tokenizer, tmp_path / "sft")

    batch = random_batch(vocab, seed=99)
    with torch.no_grad():
        trained = sft.eval()(input_ids=batch["input_ids"]).logits
        loaded = load_adapted(str(tied_llama_dir), tcfg, tmp_path / "sft")(input_ids=batch["input_ids"]).logits
        base = load_base_model(str(tied_llama_dir), tcfg).eval()(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(trained, base)  # sft changed the model, so the comparison means something
    torch.testing.assert_close(loaded, trained)
    causal_lm = load_adapted(str(tied_llama_dir), tcfg, tmp_path / "sft").get_base_model()
    head, embed = causal_lm.lm_head, causal_lm.model.embed_tokens
    assert head.modules_to_save["default"].weight is embed.modules_to_save["default"].weight


# ---------------------------------------------------------------------------------------------
# The cpt stage: resume, kernels, continued adapter
# ---------------------------------------------------------------------------------------------

CPT_SETTINGS = {
    "lora": {"r": 4, "alpha": 8},
    "learning_rate": 1e-3,
    "embedding_learning_rate": 2.5e-4,
    "micro_batch_size": 4,
    "max_steps": 6,
    "eval_steps": 2,
    "save_steps": 2,
    "log_steps": 1,
}


@pytest.fixture(scope="module")
def prepared(corpus, tiny_llama_dir, tmp_path_factory) -> Path:  # noqa: F811
    """The data stages of the flow tests' pipeline, done once; training tests copy them."""
    root = tmp_path_factory.mktemp("training-pipeline")
    config = write_config(root, corpus, tiny_llama_dir, cpt=CPT_SETTINGS, launch={"launcher": "inline"})
    cfg = load_config(config)
    runs = plan_pipeline(cfg)
    for stage in DATA_STAGES:
        run_data_stage_plain(runs[stage], cfg)
    return config


def work_copy(config: Path, destination: Path) -> Path:
    """A work directory holding the prepared data stages (training runs there from scratch)."""
    source = load_config(config).work_path
    for stage in DATA_STAGES:
        shutil.copytree(source / stage, destination / stage)
    return destination


def write_variant(config: Path, directory: Path, launch: dict | None = None, **cpt) -> Path:
    import yaml

    data = yaml.safe_load(config.read_text())
    data["cpt"] = {**data["cpt"], **cpt}
    if launch is not None:
        data["launch"] = launch
    data["work_dir"] = str(load_config(config).work_path)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def weights_of(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


KILL_AT_STEP = textwrap.dedent(
    """
    import os, signal, sys
    from cptflow.config import load_config
    from cptflow.plan import plan_pipeline
    from cptflow.training import TrainingReporter
    import cptflow.tasks.cpt as cpt

    class DieAtStep(TrainingReporter):
        def on_log(self, record):
            if record["step"] == int(sys.argv[3]):  # after the step-2 checkpoint, before the next one
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = load_config(sys.argv[1], sys.argv[2])
    cpt.run(plan_pipeline(cfg)["cpt"], cfg, reporter=DieAtStep())
    """
)


def test_killed_cpt_resumes_from_its_checkpoint_and_ends_with_identical_weights(prepared, tmp_path):
    import cptflow.tasks.cpt as cpt

    reference_dir = work_copy(prepared, tmp_path / "reference")
    cfg = load_config(prepared, reference_dir)
    reference = cpt.run(plan_pipeline(cfg)["cpt"], cfg)
    assert reference["train"]["steps"] == 6 and reference["train"]["resumed_from"] is None

    killed_dir = work_copy(prepared, tmp_path / "killed")
    result = subprocess.run(
        [sys.executable, "-P", "-c", KILL_AT_STEP, str(prepared), str(killed_dir), "3"],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    run = plan_pipeline(load_config(prepared, killed_dir))["cpt"]
    assert not (run.path / "manifest.json").exists()
    assert [p.name for p in (run.path / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000002"]

    cfg = load_config(prepared, killed_dir)
    resumed = cpt.run(plan_pipeline(cfg)["cpt"], cfg)
    assert resumed["train"]["resumed_from"] == "step-00000002"
    reference_weights = weights_of(Path(reference_dir / "cpt" / reference["fingerprint"] / "adapter"))
    resumed_weights = weights_of(run.path / "adapter")
    assert reference_weights.keys() == resumed_weights.keys()
    for key in reference_weights:
        assert torch.equal(reference_weights[key], resumed_weights[key]), key
    assert resumed["evals"] == reference["evals"]
    # the output files are the same bytes (timings live in the manifest only)
    outputs = lambda m: {e["path"]: e["sha256"] for e in m["outputs"]}  # noqa: E731
    assert outputs(resumed) == outputs(reference)
    # latest + best 2 by domain perplexity are kept
    assert len(list((run.path / "checkpoints").glob("step-*"))) <= 3


def test_cpt_learns_and_records_groups_memory_and_best_checkpoint(prepared, tmp_path):
    import cptflow.tasks.cpt as cpt

    work = work_copy(prepared, tmp_path / "work")
    cfg = load_config(
        write_variant(prepared, tmp_path / "variant", max_steps=8, kernels={"fused_linear_cross_entropy": "off"}), work
    )
    manifest = cpt.run(plan_pipeline(cfg)["cpt"], cfg)
    evals = manifest["evals"]
    assert evals[-1]["domain_eval"]["perplexity"] < evals[0]["domain_eval"]["perplexity"]
    groups = {g["group"]: g for g in manifest["param_groups"]}
    assert groups["embeddings"]["lr"] == 2.5e-4 and groups["lora"]["lr"] == 1e-3
    assert set(manifest["memory"]) == {"load", "lora_added", "training", "eval"}
    assert all(phase["rss_mib"] > 0 for phase in manifest["memory"].values())
    assert manifest["best_checkpoint"].startswith("checkpoints/step-")
    history = [
        json.loads(line)
        for line in (Path(cfg.work_path) / "cpt" / manifest["fingerprint"] / "train_log.jsonl").read_text().splitlines()
    ]
    assert [h["step"] for h in history] == list(range(1, 9)) and set(history[0]["lr"]) == {"lora", "embeddings"}


def test_kernels_on_and_off_give_the_same_loss_curve(prepared, tmp_path):
    import cptflow.tasks.cpt as cpt

    curves = {}
    for mode in ("on", "off"):
        kernels = {"fused_linear_cross_entropy": mode, "rms_norm": mode, "swiglu": mode}
        cfg = load_config(
            write_variant(prepared, tmp_path / mode, max_steps=4, kernels=kernels),
            work_copy(prepared, tmp_path / f"work-{mode}"),
        )
        manifest = cpt.run(plan_pipeline(cfg)["cpt"], cfg)
        assert manifest["kernels"]["fused_linear_cross_entropy"] is (mode == "on")
        history = (cfg.work_path / "cpt" / manifest["fingerprint"] / "train_log.jsonl").read_text().splitlines()
        curves[mode] = [json.loads(line)["loss"] for line in history]
    assert curves["on"] == pytest.approx(curves["off"], rel=1e-4)


def test_a_failing_training_process_leads_with_the_stages_own_error(prepared, tmp_path):
    """Bad sft data, through torchrun: the error names the stage and its own exception first (not
    torchrun's ChildFailedError), and says a retry would not help."""
    import yaml

    import cptflow.tasks.cpt as cpt
    from cptflow.training import TrainingReporter
    from cptflow.training_process import TrainingStageError, launch_stage

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no instruction field"}\n' * 5)
    data = yaml.safe_load(prepared.read_text())
    data["sft"] = {**data["sft"], "data": [{"path": str(bad)}]}
    data["launch"] = {"launcher": "torchrun"}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = load_config(config, work_copy(prepared, tmp_path / "work"))
    runs = plan_pipeline(cfg)
    cpt.run(runs["cpt"], cfg)
    lines = []
    with pytest.raises(TrainingStageError) as caught:
        launch_stage("sft", runs["sft"], cfg, TrainingReporter(), log=lambda level, line: lines.append((level, line)))
    message = str(caught.value)
    assert message.startswith("sft: SftDataError: no usable training example"), message
    assert "ChildFailedError" not in message and caught.value.deterministic
    assert any(level >= logging.ERROR for level, _ in lines)  # the traceback is in the log, at ERROR


def test_two_gloo_processes_match_one_process_with_doubled_accumulation(prepared, tmp_path):
    """torchrun, 2 CPU processes (gloo), micro-batch 2 each == 1 process, micro-batch 2, accumulation 2."""
    import cptflow.tasks.cpt as cpt
    from cptflow.training import TrainingReporter
    from cptflow.training_process import launch_stage

    settings = dict(micro_batch_size=2, max_steps=6, eval_steps=3, save_steps=3, log_steps=1)
    one = load_config(
        write_variant(
            prepared, tmp_path / "one", launch={"launcher": "inline"}, gradient_accumulation_steps=2, **settings
        ),
        work_copy(prepared, tmp_path / "work-one"),
    )
    reference = cpt.run(plan_pipeline(one)["cpt"], one)

    two = load_config(
        write_variant(
            prepared,
            tmp_path / "two",
            launch={"launcher": "torchrun", "num_processes": 2},
            gradient_accumulation_steps=1,
            **settings,
        ),
        work_copy(prepared, tmp_path / "work-two"),
    )
    lines: list[str] = []
    events = []

    class Recorder(TrainingReporter):
        def on_log(self, record):
            events.append(record["step"])

    manifest = launch_stage(
        "cpt", plan_pipeline(two)["cpt"], two, Recorder(), log=lambda level, line: lines.append(line)
    )
    assert manifest["processes"] == 2 and reference["processes"] == 1, "\n".join(lines[-30:])
    assert events == list(range(1, 7))  # rank 0's progress reached the parent's reporter
    assert any("[rank 1]" in line for line in lines)  # both ranks' output streamed into the log

    def curve(cfg, m):
        log = cfg.work_path / "cpt" / m["fingerprint"] / "train_log.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()]

    ref_curve, ddp_curve = curve(one, reference), curve(two, manifest)
    assert [r["tokens"] for r in ddp_curve] == [r["tokens"] for r in ref_curve]  # the same samples, step by step
    assert [r["loss"] for r in ddp_curve] == pytest.approx([r["loss"] for r in ref_curve], rel=1e-4)
    for name in ("domain_eval", "general_eval"):
        assert manifest["eval"][name]["perplexity"] == pytest.approx(reference["eval"][name]["perplexity"], rel=1e-4)
    ref_weights = weights_of(one.work_path / "cpt" / reference["fingerprint"] / "adapter")
    ddp_weights = weights_of(two.work_path / "cpt" / manifest["fingerprint"] / "adapter")
    for key in ref_weights:
        torch.testing.assert_close(ddp_weights[key], ref_weights[key], rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# sft
# ---------------------------------------------------------------------------------------------


def test_sft_labels_only_the_answers_each_ending_in_eos(tiny_llama_dir):
    from transformers import AutoTokenizer

    from cptflow.tasks.sft import DEFAULT_CHAT_TEMPLATE, tokenize_conversation

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Half-life of drug A?"},
        {"role": "assistant", "content": "About six hours."},
        {"role": "user", "content": "And drug B?"},
        {"role": "assistant", "content": "Twelve hours."},
    ]
    no_eos_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    for template in (None, DEFAULT_CHAT_TEMPLATE, no_eos_template):  # the tokenizer's own, ours, one without EOS
        example = tokenize_conversation(messages, tokenizer, template, max_length=512)
        ids, labels = example["input_ids"], example["labels"]
        assert len(ids) == len(labels)
        trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        assert all(labels[i] == ids[i] for i in trained)
        spans, current = [], [trained[0]]
        for i in trained[1:]:
            if i == current[-1] + 1:
                current.append(i)
            else:
                spans.append(current)
                current = [i]
        spans.append(current)
        answers = [tokenizer.decode([ids[i] for i in span]) for span in spans]
        assert [a.strip() for a in answers] == ["About six hours.</s>", "Twelve hours.</s>"], template
        prompt_text = tokenizer.decode([ids[i] for i in range(len(ids)) if labels[i] == IGNORE_INDEX])
        assert "Half-life of drug A?" in prompt_text and "Be brief." in prompt_text


def test_sft_accounts_for_every_line(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    from cptflow.tasks.sft import load_examples

    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps(
            {"instruction": "Define clearance.", "input": "", "output": "Volume of plasma cleared per unit time."}
        ),
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}),
        "{not json",
        json.dumps({"instruction": "No answer here."}),
        json.dumps({"messages": [{"role": "user", "content": "Only a question"}]}),
        json.dumps({"instruction": "Empty", "output": "   "}),
        json.dumps(["a list"]),
    ]
    path.write_text("\n".join(lines) + "\n")
    config_path = tmp_path / "c.yaml"
    config_path.write_text(
        f"name: t\nbase_model: {tiny_llama_dir}\nsources: [{{name: d, role: domain, paths: [{path}]}}]\n"
        f"sft: {{data: [{{path: {path}}}], eval_fraction: 0.0}}\n"
    )
    cfg = load_config(config_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    train, held, counts = load_examples(cfg, tokenizer, None)
    assert counts["in"] == 7 and counts["train"] == 2 and counts["held_out"] == 0
    assert counts["rejected"] == {
        "invalid_json": 1,
        "missing_field:output": 1,
        "no_assistant_turn": 1,
        "empty_answer": 1,
        "not_an_object": 1,
    }


def test_sft_rejections_are_summarised_in_the_log_and_listed_in_full(tiny_llama_dir, tmp_path, caplog):
    """A file of bad lines gives the first few by file:line and one summary per reason in the log, not a
    line per record; every rejected line is in the list the stage writes to rejects.jsonl."""
    from transformers import AutoTokenizer

    from cptflow.tasks.sft import REJECTS_LOGGED, SftDataError, load_examples, write_rejects

    path = tmp_path / "chat.jsonl"
    good = json.dumps({"instruction": "Define clearance.", "output": "Plasma volume cleared per unit time."})
    path.write_text("\n".join([good, *[json.dumps({"prompt": f"q{i}"}) for i in range(40)], "{bad"]) + "\n")
    config_path = tmp_path / "c.yaml"
    config_path.write_text(
        f"name: t\nbase_model: {tiny_llama_dir}\nsources: [{{name: d, role: domain, paths: [{path}]}}]\n"
        f"sft: {{data: [{{path: {path}}}], eval_fraction: 0.0}}\n"
    )
    cfg = load_config(config_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    rejects: list[dict] = []
    caplog.set_level("WARNING", logger="cptflow.tasks.sft")
    _, _, counts = load_examples(cfg, tokenizer, None, rejects)
    assert counts["rejected"] == {"missing_field:messages_or_instruction": 40, "invalid_json": 1}
    named = [r.getMessage() for r in caplog.records if ": rejected (" in r.getMessage()]
    assert len(named) == REJECTS_LOGGED and named[0].startswith("chat.jsonl:2: rejected (missing_field")
    (summary,) = [r.getMessage() for r in caplog.records if "lines rejected" in r.getMessage()]
    assert "41 lines rejected (invalid_json: 1, missing_field:messages_or_instruction: 40)" in summary
    assert "36 more not logged" in summary and "rejects.jsonl" in summary
    assert len(rejects) == 41 and rejects[-1] == {
        "file": "chat.jsonl",
        "line": 42,
        "reason": "invalid_json",
        "detail": rejects[-1]["detail"],
    }
    write_rejects(tmp_path, rejects)
    assert len((tmp_path / "rejects.jsonl").read_text().splitlines()) == 41

    path.write_text("\n".join(json.dumps({"prompt": f"q{i}"}) for i in range(3)) + "\n")  # nothing usable
    with pytest.raises(SftDataError, match=r"first: chat.jsonl:1 \(missing_field"):
        load_examples(cfg, tokenizer, None)


def test_sft_continues_from_the_cpt_adapter_with_embeddings_frozen(prepared, tmp_path):
    import cptflow.tasks.cpt as cpt
    import cptflow.tasks.sft as sft

    cfg = load_config(prepared, work_copy(prepared, tmp_path / "work"))
    cfg.sft.max_steps, cfg.sft.max_length, cfg.sft.micro_batch_size, cfg.sft.save_steps = 3, 96, 4, 3
    runs = plan_pipeline(cfg)
    cpt.run(runs["cpt"], cfg)
    manifest = sft.run(runs["sft"], cfg)
    assert manifest["continued_from"] == str(runs["cpt"].path / "adapter")
    # The test tokenizer is tiny: long answers do not fit max_length 96 and are rejected, counted.
    data = manifest["data"]
    assert data["in"] == 200 == data["train"] + data["held_out"] + sum(data["rejected"].values()) and data["train"] > 20
    assert "sft_eval" in manifest["eval"]
    before, after = weights_of(runs["cpt"].path / "adapter"), weights_of(runs["sft"].path / "adapter")
    assert before.keys() == after.keys()
    embeddings = [k for k in before if "lora_" not in k]  # the trained embed_tokens / lm_head copies
    assert embeddings and all(torch.equal(before[k], after[k]) for k in embeddings)  # frozen by default
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)  # LoRA went on learning
    assert {g["group"] for g in manifest["param_groups"]} == {"lora"}


def test_training_can_start_from_an_existing_adapter(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    from cptflow.training import save_adapter

    tcfg = tiny_config()
    first = add_adapters(load_base_model(str(tiny_llama_dir), tcfg), tcfg)
    optimizer = build_optimizer(first, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, 2)
    for _ in range(2):
        train_step(first, optimizer, scheduler, [random_batch(300)], tcfg)
    save_adapter(first, AutoTokenizer.from_pretrained(str(tiny_llama_dir)), tmp_path / "adapter")

    continued = add_adapters(load_base_model(str(tiny_llama_dir), tcfg), tcfg, adapter_dir=tmp_path / "adapter")
    trained = {n: p for n, p in first.named_parameters() if p.requires_grad}
    loaded = {n: p for n, p in continued.named_parameters() if p.requires_grad}
    assert trained.keys() == loaded.keys()  # LoRA and embeddings trainable again
    for name in trained:
        assert torch.equal(trained[name].detach(), loaded[name].detach()), name


def test_a_prefect_retry_of_a_failed_cpt_resumes_from_its_checkpoint(prefect_harness, prepared, tmp_path, monkeypatch):
    import cptflow.flows.pipeline as pipeline

    failures = []
    original = pipeline.PrefectTrainingReporter.on_log

    def fail_once_at_step_3(self, record):
        original(self, record)
        if record["step"] == 3 and not failures:
            failures.append(record["step"])
            raise RuntimeError("simulated crash after the step-2 checkpoint")

    monkeypatch.setattr(pipeline.PrefectTrainingReporter, "on_log", fail_once_at_step_3)
    work = work_copy(prepared, tmp_path / "work")
    reports = pipeline.run_pipeline(prepared, work_dir=str(work), only=["cpt"])
    cpt_report = reports[5]
    assert failures == [3] and cpt_report["state"] == "ran"
    manifest = read_manifest(Path(cpt_report["directory"]))
    assert manifest["train"]["resumed_from"] == "step-00000002" and manifest["train"]["steps"] == 6
    # a second run finds it done: cached, no training
    assert pipeline.run_pipeline(prepared, work_dir=str(work), only=["cpt"])[5]["state"] == "cached"


def test_training_waits_for_a_slot_of_the_gpu_concurrency_limit(prefect_harness, prepared, tmp_path):
    import threading
    import time

    from prefect.concurrency.sync import concurrency

    import cptflow.flows.pipeline as pipeline

    pipeline.ensure_concurrency_limit("gpu", 1)
    work = work_copy(prepared, tmp_path / "work")
    cpt_dir = plan_pipeline(load_config(prepared, work))["cpt"].path
    result = {}
    other = threading.Thread(
        target=lambda: result.update(reports=pipeline.run_pipeline(prepared, work_dir=str(work), only=["cpt"]))
    )
    with concurrency("gpu", occupy=1, strict=True):  # another run is training on the GPU
        other.start()
        time.sleep(10)
        assert other.is_alive() and not (cpt_dir / "checkpoints").exists()  # queued, not training
    other.join(timeout=300)
    assert result["reports"][5]["state"] == "ran" and read_manifest(cpt_dir)["train"]["steps"] == 6


def test_fused_loss_falls_back_to_the_eager_head_where_it_cannot_apply(tiny_llama_dir, caplog):
    from cptflow.kernels import fused_linear_cross_entropy
    from cptflow.training import fused_loss_for

    tcfg = tiny_config()
    model = add_adapters(load_base_model(str(tiny_llama_dir), tcfg), tcfg)
    assert fused_loss_for(model, tcfg) is fused_linear_cross_entropy  # auto: a full trainable head
    with_kl = tiny_config(kl_weight=0.1)
    with caplog.at_level("INFO", logger="cptflow.training"):
        assert fused_loss_for(model, with_kl) is None
    assert "kl_weight > 0 needs the logits" in caplog.text
    with pytest.raises(ValueError, match="cannot apply"):
        fused_loss_for(model, tiny_config(kl_weight=0.1, kernels={"fused_linear_cross_entropy": "on"}))
    # a LoRA-wrapped head has no single weight to fuse with
    lora_head = tiny_config(
        train_embeddings=False, lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "lm_head"])
    )
    model = add_adapters(load_base_model(str(tiny_llama_dir), lora_head), lora_head)
    assert fused_loss_for(model, lora_head) is None
