"""Training plumbing shared by the `cpt` and `sft` stages: QLoRA set-up, parameter groups with their own
embedding learning rate, 8-bit AdamW, the cosine schedule, token-normalised loss, evaluation, checkpoints.

Plain functions, read in the order a stage calls them: load_base_model -> add_adapters ->
build_optimizer -> build_scheduler -> fit (train_step, evaluate_perplexity, save/load_checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cptflow import distributed
from cptflow.gates import TrainingGates, enforce, judge_training
from cptflow.kernels import fused_linear_cross_entropy
from cptflow.kernels.patch import apply_kernels
from cptflow.models import pick_device, pick_dtype, resolve_model_path
from cptflow.stage import Artifact
from cptflow.store import atomic_write_json, atomic_write_text, read_json, read_manifest
from cptflow.tokenization import document_token_ids

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ALL_LINEAR = "all-linear"
EMBEDDING_MODULES = ("embed_tokens", "lm_head")  # Llama's names: the fallback when the model names none
CHECKPOINT_PREFIX = "step-"


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(128, gt=0, description="LoRA rank (Unsloth's CPT recipe: 128)")
    alpha: float = Field(32, gt=0, description="LoRA alpha; with rslora the scale is alpha / sqrt(r)")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="LoRA dropout (0 keeps resumes bit-exact and is the CPT default)"
    )
    rslora: bool = Field(True, description="Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)")
    target_modules: Literal["all-linear"] | list[str] = Field(
        ALL_LINEAR,
        min_length=1,
        description="'all-linear': every linear layer of the decoder blocks, found in the loaded model (fused "
        "projections such as Phi-3's qkv_proj and GPT-2's Conv1D included); or the module names to wrap",
    )


class KernelSettings(BaseModel):
    """Fused kernels for the training hot path (kernels/): `auto` = on where they apply."""

    model_config = ConfigDict(extra="forbid")
    fused_linear_cross_entropy: Literal["auto", "on", "off"] = "auto"
    rms_norm: Literal["auto", "on", "off"] = "auto"
    swiglu: Literal["auto", "on", "off"] = "auto"


class TrainingConfig(BaseModel):
    """What cpt and sft share. Units: learning rates per optimizer step, batch sizes in sequences."""

    model_config = ConfigDict(extra="forbid")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="4-bit compute dtype; auto = bf16 on GPUs that support it, fp16 on older ones, fp32 on CPU"
    )
    load_in_4bit: bool = Field(True, description="QLoRA: NF4 base with double quantisation (bitsandbytes)")
    gradient_checkpointing: bool = True
    lora: LoraSettings = LoraSettings()
    train_embeddings: bool = Field(True, description="Train embed_tokens and lm_head in full (fp32 copies)")
    learning_rate: float = Field(5e-5, gt=0, description="LR of the LoRA weights")
    embedding_learning_rate: float = Field(
        5e-6, gt=0, description="LR of embed_tokens / lm_head; 2-10x below learning_rate"
    )
    weight_decay: float = Field(0.01, ge=0, description="On LoRA matrices only; embeddings, norms and biases get 0")
    optimizer: Literal["adamw_8bit", "adamw"] = Field(
        "adamw_8bit", description="adamw_8bit: bitsandbytes, 32-bit state for embeddings"
    )
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps with linear warm-up")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Floor of the decay, as a fraction of each group's LR")
    micro_batch_size: int = Field(8, gt=0, description="Sequences per forward/backward")
    gradient_accumulation_steps: int = Field(1, gt=0)
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs")
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_steps: int = Field(50, gt=0, description="Evaluate every this many optimizer steps (and at the end)")
    eval_batch_size: int = Field(8, gt=0)
    save_steps: int = Field(50, gt=0, description="Checkpoint every this many optimizer steps")
    keep_best: int = Field(2, ge=0, description="Checkpoints kept by best eval metric, besides the latest")
    log_steps: int = Field(5, gt=0)
    kl_weight: float = Field(0.0, ge=0, description="KL(base || adapted) per token, computed with adapters disabled")
    gates: TrainingGates = Field(
        TrainingGates(), description="Limits on held-out perplexity at each eval vs the start of the stage"
    )
    ewc_weight: float = Field(
        0.0,
        ge=0,
        description="EWC (Kirkpatrick et al. 2017): adds ewc_weight * sum_i F_i (theta_i - theta*_i)^2 to each step's "
        "loss, F the diagonal Fisher of the trainable weights on general (replay) blocks, theta* the weights the "
        "stage starts from; 0 = off. F is a mean of squared token-mean-loss gradients, so useful weights are large",
    )
    ewc_fisher_batches: int = Field(
        16, gt=0, description="Micro-batches (of micro_batch_size general training blocks) the Fisher is estimated on"
    )
    init_adapter: str | None = Field(None, description="Start from this LoRA adapter directory instead of a fresh one")
    kernels: KernelSettings = KernelSettings()
    torch_threads: int | None = Field(None, gt=0, description="CPU threads for torch; default: torch's")
    retries: int = Field(1, ge=0, description="Prefect retries of the stage; each resumes from the latest checkpoint")

    @model_validator(mode="after")
    def _embedding_lr_below_lr(self):
        if self.train_embeddings and self.embedding_learning_rate > self.learning_rate:
            raise ValueError(
                f"embedding_learning_rate ({self.embedding_learning_rate}) must not exceed learning_rate "
                f"({self.learning_rate}): embeddings take a 2-10x smaller LR (Unsloth's CPT recipe)"
            )
        return self

    def warnings(self) -> list[str]:
        """Legal but unusual settings, said once at set-up (and by `cptflow validate`)."""
        out = []
        if self.train_embeddings:
            ratio = self.learning_rate / self.embedding_learning_rate
            if not 2 <= ratio <= 10:
                out.append(f"embedding_learning_rate is {ratio:.3g}x below learning_rate; the CPT recipes use 2-10x")
        return out


# ---------------------------------------------------------------------------------------------
# Model set-up
# ---------------------------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_base_model(name: str, tcfg: TrainingConfig, *, trust_remote_code: bool = False):
    """The base causal LM, NF4-quantised (QLoRA) or in the compute dtype, prepared for k-bit training."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = pick_device(tcfg.device)
    if device == "cuda" and distributed.initialized():  # one GPU per process: the launcher's LOCAL_RANK
        device = f"cuda:{torch.cuda.current_device()}"
    compute_dtype = pick_dtype(tcfg.compute_dtype, device)
    kwargs = {}
    if tcfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name),
        dtype=compute_dtype,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    if not tcfg.load_in_4bit:
        model.to(device)
    model.config.use_cache = False
    if tcfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        one_cpu_4bit_layout(model)
        # Upcasts the non-quantised weights (embeddings, norms) to fp32: trained embeddings are never fp16.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=tcfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def one_cpu_4bit_layout(model) -> None:
    """Keep bitsandbytes' 4-bit layers in one layout on every CPU.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight for its CPU inference kernel
    the first time the layer runs in eval mode without grad: absmax is cast to bf16, so evaluation
    numbers would differ from training's and from other hosts', and a layer narrower than the
    quantisation block (64) fails to repack at all. Evaluation runs on the training layout instead.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def embeddings_tied(model) -> bool:
    """True when lm_head and embed_tokens are one tensor (config.tie_word_embeddings honoured)."""
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def decoder_blocks(model) -> list:
    """The repeated decoder blocks: the ModuleList with one entry per hidden layer (else the longest)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    matching = [m for m in lists if len(m) == layers] or lists
    if not matching:
        raise ValueError(f"{type(model).__name__}: no decoder blocks (nn.ModuleList) found to put LoRA on")
    return list(max(matching, key=len))


def block_linear_kinds(model) -> dict[str, int]:
    """The linear layers of one decoder block by their own name (q_proj, qkv_proj, c_attn, ...) → how
    many of that name a block holds: nn.Linear (bitsandbytes' 4-bit layers subclass it) and GPT-2's
    Conv1D, found by inspecting the model rather than assumed from a family's names."""
    from transformers.pytorch_utils import Conv1D  # transformers is loaded with the model already

    counts: dict[str, int] = {}
    for name, module in decoder_blocks(model)[0].named_modules():
        parts = name.split(".")
        if "base_layer" in parts or any(part.startswith("lora_") for part in parts):
            continue  # inside a LoRA wrapper: the wrapper stands for the layer it wraps
        if isinstance(getattr(module, "base_layer", module), (torch.nn.Linear, Conv1D)):
            counts[parts[-1]] = counts.get(parts[-1], 0) + 1
    return dict(sorted(counts.items()))


def lora_targets(model, tcfg: TrainingConfig) -> tuple[list[str], list[str]]:
    """(module names PEFT wraps, warnings). 'all-linear': every kind `block_linear_kinds` finds. An explicit
    list must name linear layers the model has (lm_head too, outside the blocks); one that leaves some of
    the blocks' layers out is legal, and said."""
    from transformers.pytorch_utils import Conv1D

    kinds = block_linear_kinds(model)
    if tcfg.lora.target_modules == ALL_LINEAR:
        return list(kinds), []
    wanted = list(tcfg.lora.target_modules)
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    unknown = [name for name in wanted if name not in linear]
    if unknown:
        raise ValueError(
            f"lora.target_modules names {unknown}, which {type(model).__name__} has no linear layer called; "
            f"its decoder blocks have {list(kinds)} (or use 'all-linear')"
        )
    missing = [kind for kind in kinds if kind not in wanted]
    notes = [f"lora.target_modules leaves out {missing} of the block's linear layers {list(kinds)}"] if missing else []
    return wanted, notes


def describe_lora_targets(model) -> dict:
    """What the manifest records about LoRA: how many layers of each wrapped kind a block holds, and the
    linear kinds left without LoRA (none with 'all-linear')."""
    blocks = decoder_blocks(model)
    wrapped: dict[str, int] = {}
    for name, module in blocks[0].named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            kind = name.rsplit(".", 1)[-1]
            wrapped[kind] = wrapped.get(kind, 0) + 1
    kinds = block_linear_kinds(model)
    return {
        "blocks": len(blocks),
        "per_block": dict(sorted(wrapped.items())),
        "not_wrapped": [k for k in kinds if k not in wrapped],
    }


def add_adapters(model, tcfg: TrainingConfig, *, adapter_dir: str | Path | None = None, seed: int = 0):
    """Wrap `model` with LoRA on all linear layers and full fp32 copies of embed_tokens/lm_head.

    `adapter_dir`: continue from a saved adapter (its LoRA and embedding weights, trainable again).
    Tied embeddings stay tied: PEFT's ensure_weight_tying makes lm_head's trainable copy the
    embedding's (peft PR#2972; a head trained apart from its tied embedding is lost on merge).
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    tied = embeddings_tied(model)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    else:
        torch.manual_seed(seed)  # LoRA A init
        config = LoraConfig(
            r=tcfg.lora.r,
            lora_alpha=tcfg.lora.alpha,
            lora_dropout=tcfg.lora.dropout,
            use_rslora=tcfg.lora.rslora,
            target_modules=lora_targets(model, tcfg)[0],
            modules_to_save=list(embedding_modules(model)) if tcfg.train_embeddings else None,
            ensure_weight_tying=tied and tcfg.train_embeddings,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    embeddings = embedding_modules(model)
    for name, parameter in model.named_parameters():
        if is_embedding_parameter(name, embeddings):
            # Frozen when the stage asks for it (sft may keep cpt's embeddings as they are).
            parameter.requires_grad_(tcfg.train_embeddings and "modules_to_save" in name)
            if parameter.requires_grad and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
    return model


def embedding_modules(model) -> tuple[str, ...]:
    """The names of the model's input embedding and output head, from the model itself
    (get_input_embeddings / get_output_embeddings): `embed_tokens`, `lm_head` for Llama and most
    families, `wte`, `lm_head` for GPT-2. Llama's names where the model does not say."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    wanted = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(base, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None:
            wanted.append(module)
    names = [name.rsplit(".", 1)[-1] for name, module in base.named_modules() if any(module is w for w in wanted)]
    return tuple(dict.fromkeys(names)) or EMBEDDING_MODULES


def is_embedding_parameter(name: str, modules: tuple[str, ...] = EMBEDDING_MODULES) -> bool:
    return any(module in name.split(".") for module in modules)


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------


class EmptyEmbeddingGroupError(ValueError):
    """An embedding learning rate was configured but no embed_tokens / lm_head parameter trains."""


def build_param_groups(model, tcfg: TrainingConfig) -> list[dict]:
    """Groups by parameter name: LoRA weights (decayed), embeddings at their own LR, norms/biases.

    Fails when embeddings should train but none does: an embedding LR that silently applies to
    nothing is the most reported CPT bug (unsloth#9326, unsloth-zoo PR#932).
    """
    groups = {
        "lora": {
            "name": "lora",
            "params": [],
            "param_names": [],
            "lr": tcfg.learning_rate,
            "weight_decay": tcfg.weight_decay,
        },
        "embeddings": {
            "name": "embeddings",
            "params": [],
            "param_names": [],
            "lr": tcfg.embedding_learning_rate,
            "weight_decay": 0.0,
        },
        "no_decay": {
            "name": "no_decay",
            "params": [],
            "param_names": [],
            "lr": tcfg.learning_rate,
            "weight_decay": 0.0,
        },
    }
    embeddings = embedding_modules(model)
    for name, parameter in model.named_parameters():  # tied parameters are listed once
        if not parameter.requires_grad:
            continue
        if is_embedding_parameter(name, embeddings):
            key = "embeddings"
        elif parameter.ndim < 2 or "norm" in name or name.endswith(".bias"):
            key = "no_decay"
        else:
            key = "lora"
        groups[key]["params"].append(parameter)
        groups[key]["param_names"].append(name)
    if tcfg.train_embeddings and not groups["embeddings"]["params"]:
        raise EmptyEmbeddingGroupError(
            "train_embeddings is on with embedding_learning_rate="
            f"{tcfg.embedding_learning_rate}, but no embed_tokens/lm_head parameter is trainable "
            "(the model names them differently, or the adapter froze them); set train_embeddings: false "
            "or make them trainable"
        )
    result = [g for g in groups.values() if g["params"]]
    for group in result:
        count = sum(p.numel() for p in group["params"])
        logger.info(
            "param group %-10s %3d tensors %12d params lr %.3g wd %g",
            group["name"],
            len(group["params"]),
            count,
            group["lr"],
            group["weight_decay"],
        )
    return result


def describe_param_groups(optimizer) -> list[dict]:
    return [
        {
            "group": g["name"],
            "tensors": len(g["params"]),
            "parameters": sum(p.numel() for p in g["params"]),
            "lr": g["initial_lr"] if "initial_lr" in g else g["lr"],
            "weight_decay": g["weight_decay"],
        }
        for g in optimizer.param_groups
    ]


def build_optimizer(model, tcfg: TrainingConfig):
    """AdamW over the named groups; 8-bit (bitsandbytes) with 32-bit state forced for embeddings.

    8-bit state for embeddings is unstable (Dettmers, transformers#14819), and HF's "adamw_8bit"
    never applies the override. We set it on a private options manager, not bitsandbytes' global
    one, whose `id(param)` keys would leak into later optimizers.
    """
    groups = build_param_groups(model, tcfg)
    if tcfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tcfg.learning_rate, betas=tcfg.adam_betas)
    import bitsandbytes as bnb
    from bitsandbytes.optim import GlobalOptimManager

    optimizer = bnb.optim.AdamW8bit(groups, lr=tcfg.learning_rate, betas=tcfg.adam_betas)
    options = GlobalOptimManager.__new__(GlobalOptimManager)
    options.initialize()
    for group in groups:
        if group["name"] == "embeddings":
            options.override_config(group["params"], "optim_bits", 32)
    optimizer.mng = options
    return optimizer


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, kind: str, min_lr_ratio: float) -> float:
    """Multiplier of every group's LR at `step`: linear warm-up, then cosine/linear decay to the floor."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * decay


def build_scheduler(optimizer, tcfg: TrainingConfig, total_steps: int):
    """LambdaLR: one multiplier for all groups, so the embedding LR keeps its ratio to the LoRA LR."""
    warmup = math.ceil(tcfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        return lr_factor(
            step, total_steps=total_steps, warmup_steps=warmup, kind=tcfg.lr_scheduler, min_lr_ratio=tcfg.min_lr_ratio
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position i predicts token i+1: labels moved left, the last position ignored."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def _causal_lm(model):
    """The transformers *ForCausalLM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _head_weight(head) -> torch.Tensor | None:
    """The weight of a plain or modules_to_save head (what the fused loss needs); None for a LoRA head."""
    if hasattr(head, "modules_to_save"):  # peft ModulesToSaveWrapper
        if head.disable_adapters or not head.active_adapters:
            return head.original_module.weight
        return head.modules_to_save[head.active_adapters[0]].weight
    if type(head) is torch.nn.Linear and head.bias is None:
        return head.weight
    return None


def logit_softcap(causal_lm) -> float | None:
    """`final_logit_softcapping` of the model's config (Gemma 2/3), else None."""
    config = causal_lm.config.get_text_config() if hasattr(causal_lm.config, "get_text_config") else causal_lm.config
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


@dataclass
class LossParts:
    loss_sum: torch.Tensor  # summed token cross-entropy (+ kl_weight * summed KL), to be normalised by the caller
    ce_sum: float
    kl_sum: float
    tokens: int


def token_loss_sum(model, batch: dict, *, kl_weight: float = 0.0, fused_loss: Callable | None = None) -> LossParts:
    """Summed next-token loss over the non-ignored labels of `batch` (not yet normalised).

    The head runs here, not inside the model: with `fused_loss` the [tokens, vocab] logits are never
    built. KL towards the base runs the same batch with the adapters disabled (no second model).
    """
    causal_lm = _causal_lm(model)
    # base_model: the decoder under its family's name (Llama's `model`, GPT-2's `transformer`).
    hidden = causal_lm.base_model(**_model_inputs(batch)).last_hidden_state
    labels = shift_labels(batch["labels"])
    tokens = int((labels != IGNORE_INDEX).sum())
    cap = logit_softcap(causal_lm)
    fused = fused_loss is not None and kl_weight == 0 and cap is None
    head_weight = _head_weight(causal_lm.lm_head) if fused else None
    if head_weight is not None:
        ce = fused_loss(hidden, head_weight, labels, reduction="sum")
        return LossParts(ce, float(ce.detach()), 0.0, tokens)
    logits = causal_lm.lm_head(hidden).float()
    if cap is not None:  # Gemma 2/3: the model's own logits are cap * tanh(logits / cap); train on those
        logits = cap * torch.tanh(logits / cap)
    ce = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    if kl_weight == 0:
        return LossParts(ce, float(ce.detach()), 0.0, tokens)
    with torch.no_grad(), model.disable_adapter():
        base_logits = _causal_lm(model)(**_model_inputs(batch)).logits.float()
    mask = (labels != IGNORE_INDEX).unsqueeze(-1)
    base_logprobs = F.log_softmax(base_logits, dim=-1)
    # KL(base || adapted) per position, summed over kept positions.
    kl = (base_logprobs.exp() * (base_logprobs - F.log_softmax(logits, dim=-1)) * mask).sum()
    return LossParts(ce + kl_weight * kl, float(ce.detach()), float(kl.detach()), tokens)


def train_step(
    model,
    optimizer,
    scheduler,
    micro_batches: Sequence[dict],
    tcfg: TrainingConfig,
    *,
    fused_loss=None,
    ewc: EwcPenalty | None = None,
) -> dict:
    """One optimizer step over `micro_batches` (the gradient-accumulation window).

    Every micro-batch's summed loss is divided by the non-ignored tokens of the whole window, so the
    step equals one big batch whatever the padding per micro-batch (axolotl#1100, transformers PR#35438).
    With data-parallel processes the window spans all ranks: each divides by the global token count and
    the gradients are summed across ranks, which is the one-process gradient of all their micro-batches.
    The EWC penalty is a function of the weights alone, which every rank holds alike: its gradient is
    added once per step, after that sum (added before it, it would count world_size times).
    """
    local_tokens = sum(int((shift_labels(b["labels"]) != IGNORE_INDEX).sum()) for b in micro_batches)
    window_tokens = int(distributed.sum_across_ranks([local_tokens])[0])
    ce_total = kl_total = 0.0
    denominator = max(window_tokens, 1)
    for batch in micro_batches:
        parts = token_loss_sum(model, batch, kl_weight=tcfg.kl_weight, fused_loss=fused_loss)
        (parts.loss_sum / denominator).backward()
        ce_total += parts.ce_sum
        kl_total += parts.kl_sum
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    distributed.sum_gradients(trainable)
    ce_total, kl_total = distributed.sum_across_ranks([ce_total, kl_total])
    ewc_value = ewc.add_gradient() if ewc is not None else 0.0
    grad_norm = None
    if tcfg.max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, tcfg.max_grad_norm))
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": ce_total / denominator,
        "kl": kl_total / denominator,
        "ewc": ewc_value,
        "tokens": window_tokens,
        "grad_norm": grad_norm,
        "lr": lrs,
    }


# ---------------------------------------------------------------------------------------------
# Evaluation: perplexity on held-out text
# ---------------------------------------------------------------------------------------------


def read_texts(path: Path, field: str = "text") -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                texts.append(json.loads(line)[field])
    return texts


def pack_eval_blocks(texts: Sequence[str], tokenizer, seq_len: int) -> list[dict]:
    """Held-out documents tokenized as for training (BOS, text, EOS) and packed into seq_len blocks.

    The same blocks go through every model compared (base, cpt, sft), so their perplexities are on
    exactly the same tokens. The last block is padded; padding is ignored.
    """
    stream = [token for ids in document_token_ids(list(texts), tokenizer) for token in ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    blocks = []
    for start in range(0, len(stream), seq_len):
        ids = stream[start : start + seq_len]
        valid = len(ids)
        ids = ids + [pad] * (seq_len - valid)
        labels = ids[:valid] + [IGNORE_INDEX] * (seq_len - valid)
        mask = [1] * valid + [0] * (seq_len - valid)
        blocks.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return blocks


PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0}  # input_ids padding is masked, so 0 will do


# mix's held-out sets: the same tokens for cpt, sft and evaluate (so their perplexities compare).
EVAL_SETS = ("domain_eval", "general_eval")


def eval_blocks(stage_directories: dict, tokenizer, seq_len: int) -> dict[str, list[dict]]:
    """mix's held-out sets, tokenized and packed as for training."""
    mix_dir = Path(stage_directories["mix"])
    return {
        name: pack_eval_blocks(read_texts(mix_dir / "eval" / f"{name}.jsonl"), tokenizer, seq_len) for name in EVAL_SETS
    }


def collate(samples: Sequence[dict], device: str | torch.device = "cpu") -> dict:
    """Stack samples into a batch, right-padding rows of different lengths (labels -100, mask 0)."""
    length = max(len(s["input_ids"]) for s in samples)
    batch = {}
    for key in samples[0]:
        rows = torch.full((len(samples), length), PAD_VALUES.get(key, 0), dtype=torch.long)
        for i, sample in enumerate(samples):
            values = torch.as_tensor(np.asarray(sample[key]), dtype=torch.long)
            rows[i, : len(values)] = values
        batch[key] = rows
    if (
        "attention_mask" not in batch
        and "position_ids" not in batch
        and any(len(s["input_ids"]) < length for s in samples)
    ):
        batch["attention_mask"] = torch.tensor(
            [[1] * len(s["input_ids"]) + [0] * (length - len(s["input_ids"])) for s in samples]
        )
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate_perplexity(model, blocks: Sequence[dict], *, batch_size: int = 8, device=None) -> dict:
    """exp(mean token loss) over the non-ignored tokens of `blocks` (split across data-parallel ranks)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    mine = blocks[distributed.rank() :: distributed.world_size()]
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(mine), batch_size):
        batch = collate(mine[start : start + batch_size], device)
        parts = token_loss_sum(model, batch)
        loss_sum += parts.ce_sum
        tokens += parts.tokens
    loss_sum, tokens = distributed.sum_across_ranks([loss_sum, tokens])
    tokens = int(tokens)
    model.train(was_training)
    mean = loss_sum / max(tokens, 1)
    return {"loss": round(mean, 6), "perplexity": round(math.exp(mean), 4), "tokens": tokens}


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def memory_snapshot(device: str) -> dict:
    """Peak since the last snapshot on GPU (max_memory_reserved); on CPU the process RSS now and its peak."""
    if str(device).startswith("cuda"):
        peak = torch.cuda.max_memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        return {"kind": "cuda_max_memory_reserved", "peak_mib": round(peak / 2**20, 1)}
    import psutil

    rss = psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"kind": "process_rss", "rss_mib": round(rss / 2**20, 1), "peak_rss_mib": round(peak / 2**20, 1)}


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def rng_state() -> dict:
    """The generators training draws from (dropout, LoRA init). Python's global `random` is left out:
    Prefect draws from it too (run names), so it would differ run to run without affecting training."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def saved_copy_modules(weights_path: Path) -> list[str]:
    """The modules an adapter file holds full trained copies of (modules_to_save: embeddings, head), by
    the base model's names: every tensor that is not a LoRA weight, PEFT's prefix and `.weight` taken off."""
    from safetensors import safe_open

    with safe_open(str(weights_path), framework="pt") as handle:
        names = [key.removeprefix("base_model.model.") for key in handle.keys()]
    modules = [name.rpartition(".")[0] for name in names if not any(p.startswith("lora_") for p in name.split("."))]
    return list(dict.fromkeys(modules))


def save_adapter_files(model, directory: Path) -> None:
    """`save_pretrained` (safetensors), with adapter_config.json made byte-stable (PEFT keeps
    target_modules in a set, whose order changes with the interpreter's hash seed) and naming every
    module whose trained copy the file holds in modules_to_save.

    The second is for tied embeddings: ensure_weight_tying takes the tied head out of modules_to_save
    (it is tied to the embedding's copy instead) but saves its copy, and on reload PEFT re-ties the
    head only when modules_to_save has an entry called `embed_tokens` or `lm_head`. GPT-2's
    ['wte', 'transformer.wte'] has neither, so its head came back as the base's plain Linear: sft,
    continuing from cpt's adapter, saved no head, and evaluate's sft model ran with the base head
    (and the cpt adapter's head weight, loaded into that plain Linear, overwrote the tied base
    embedding under it). With the head named, every reload wraps and re-ties it."""
    model.save_pretrained(str(directory), safe_serialization=True)
    config_path = Path(directory) / "adapter_config.json"
    config = read_json(config_path)
    if config.get("modules_to_save"):
        named = config["modules_to_save"]
        for module in saved_copy_modules(Path(directory) / "adapter_model.safetensors"):
            if not any(module == entry or module.endswith("." + entry) for entry in named):
                named.append(module)
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    atomic_write_json(config_path, config)


def save_checkpoint(directory: Path, model, optimizer, scheduler, trainer_state: dict) -> Path:
    """Adapter (safetensors, with the trained embeddings), optimizer, scheduler, RNG and data position,
    written into a temporary directory that is renamed into place: a kill never leaves half a checkpoint."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter_files(model, tmp)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
        tmp / "training_state.pt",
    )
    atomic_write_json(tmp / "trainer_state.json", trainer_state)
    for path in tmp.iterdir():  # durable before the rename makes it visible
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary directories are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "trainer_state.json").is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(directory: Path, model, optimizer, scheduler) -> dict:
    """Restore what save_checkpoint wrote; returns its trainer_state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    weights = load_file(str(directory / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "unexpected_keys", [])]
    if missing:
        raise RuntimeError(f"checkpoint {directory}: keys that fit no parameter: {missing[:5]}")
    state = torch.load(directory / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return read_json(directory / "trainer_state.json")


def prune_checkpoints(root: Path, keep_best: int, metric_key: str) -> list[Path]:
    """Keep the latest checkpoint and the `keep_best` with the lowest `metric_key`; delete the rest."""
    checkpoints = list_checkpoints(root)
    if not checkpoints:
        return []
    keep = {checkpoints[-1]}
    scored = []
    for path in checkpoints:
        metric = read_json(path / "trainer_state.json").get("metric", {}).get(metric_key)
        if metric is not None:
            scored.append((metric, path.name, path))
    keep |= {path for _, _, path in sorted(scored)[:keep_best]}
    for path in checkpoints:
        if path not in keep:
            # Renamed out of sight first: a kill halfway through the delete must not leave a
            # half-deleted checkpoint that still looks complete (the kill drill found one committed).
            doomed = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            os.replace(path, doomed)
            shutil.rmtree(doomed)
    for stale in Path(root).glob(f".{CHECKPOINT_PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return sorted(keep, key=lambda p: p.name)


def best_checkpoint(root: Path, metric_key: str) -> Path | None:
    scored = []
    for path in list_checkpoints(root):
        metric = read_json(path / "trainer_state.json").get("metric", {}).get(metric_key)
        if metric is not None:
            scored.append((metric, path.name, path))
    return min(scored)[2] if scored else None


# ---------------------------------------------------------------------------------------------
# Forgetting: the tokenize stage's general / domain blocks, and EWC estimated on the general ones
# ---------------------------------------------------------------------------------------------

BLOCK_SOURCES = ("general", "domain", "both")
EWC_FILE = "ewc.safetensors"  # beside the checkpoints: estimated once per stage, loaded on resume
EWC_FORMAT = "cptflow-ewc-1"


def token_shard_paths(tokenize_dir: Path) -> list[Path]:
    """The tokenize stage's `tokens-*.arrow`, in curriculum order (cpt trains on them; sft replays them)."""
    manifest = read_manifest(tokenize_dir)
    if manifest is None:
        raise RuntimeError(f"the tokenize output {tokenize_dir} is not committed (run the tokenize stage first)")
    return [Path(tokenize_dir) / shard["path"] for shard in manifest["token_shards"]]


def blocks_of_source(dataset, source: str) -> np.ndarray:
    """Global sample indices of a TokenShardDataset's blocks from `source`, by the shards' domain_tokens:
    general = no token of a domain document (the replay data), domain = only domain tokens, both = every
    block (cpt's whole stream, the blocks where a domain and a general document meet included)."""
    if source not in BLOCK_SOURCES:
        raise ValueError(f"block source {source!r}: one of {BLOCK_SOURCES}")
    valid, domain = dataset.block_tokens()
    keep = {"general": domain == 0, "domain": domain == valid, "both": np.ones(len(valid), bool)}[source]
    return np.flatnonzero(keep & (valid > 1))  # a block needs two tokens to have a next-token label


def fisher_batches(dataset, micro_batch_size: int, batches: int) -> list[dict]:
    """The micro-batches EWC's Fisher is estimated on: general (replay) *training* blocks, evenly spaced
    along the stream (the curriculum changes the mix as it goes). Not mix's held-out general_eval: that
    set measures forgetting, and a penalty fitted on it would flatter the measurement."""
    general = blocks_of_source(dataset, "general")
    if not len(general):
        raise ValueError(
            "ewc_weight > 0 needs general (replay) blocks in the tokenize shards to estimate the Fisher on, and "
            "every block holds domain tokens (add a `role: general` source, or set ewc_weight: 0)"
        )
    wanted = min(len(general), batches * micro_batch_size)
    picked = general[(np.arange(wanted) * len(general)) // wanted]
    samples = [dataset.sample(int(index)) for index in picked]
    return [
        {key: torch.stack([s[key] for s in samples[i : i + micro_batch_size]]) for key in samples[0]}
        for i in range(0, wanted, micro_batch_size)
    ]


@dataclass
class EwcPenalty:
    """Elastic weight consolidation (Kirkpatrick et al. 2017, PNAS 114:3521) on the trainable weights:
    `weight * sum_i F_i (theta_i - theta*_i)^2`, F the diagonal empirical Fisher, theta* the weights the
    stage started from. Held as fp32 tensors beside the parameters (2 x 4 bytes per trainable weight).
    A fresh LoRA (cpt) has B = 0, so A has no gradient there and F_A = 0: EWC then holds B, hence B A."""

    weight: float
    names: list[str]
    parameters: list[torch.nn.Parameter]
    fisher: list[torch.Tensor]
    anchor: list[torch.Tensor]
    info: dict = field(default_factory=dict)

    def add_gradient(self) -> float:
        """Adds the penalty's gradient 2 * weight * F * (theta - theta*) to each parameter's .grad, and
        returns the penalty (computed directly: it needs no graph)."""
        total = None
        with torch.no_grad():
            for parameter, fisher, anchor in zip(self.parameters, self.fisher, self.anchor):
                delta = parameter.detach().float() - anchor
                weighted = fisher * delta
                term = (weighted * delta).sum()
                total = term if total is None else total + term
                grad = (2 * self.weight * weighted).to(parameter.dtype)
                if parameter.grad is None:
                    parameter.grad = grad
                else:
                    parameter.grad.add_(grad)
        return self.weight * float(total) if total is not None else 0.0


def _trainable_named(optimizer) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for g in optimizer.param_groups for n, p in zip(g["param_names"], g["params"])]


def estimate_ewc(model, optimizer, batches: Sequence[dict], weight: float, *, fused_loss=None) -> EwcPenalty:
    """F_i = mean over `batches` of (d token-mean LM loss / d theta_i)^2, at the weights as they are now
    (which become theta*). With data-parallel ranks each takes every world_size-th batch and the sums are
    added across ranks, so every rank holds the same F. Draws nothing from the training RNG."""
    started = time.time()
    named = _trainable_named(optimizer)
    parameters = [p for _, p in named]
    device = parameters[0].device
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in parameters]
    tokens = 0
    was_training = model.training
    model.train()  # as in training: gradient checkpointing and the same kernels
    optimizer.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for batch in batches[distributed.rank() :: distributed.world_size()]:
            parts = token_loss_sum(model, {k: v.to(device) for k, v in batch.items()}, fused_loss=fused_loss)
            (parts.loss_sum / max(parts.tokens, 1)).backward()
            for total, parameter in zip(fisher, parameters):
                if parameter.grad is not None:
                    total.add_(parameter.grad.float().square())
            optimizer.zero_grad(set_to_none=True)
            tokens += parts.tokens
    model.train(was_training)
    if distributed.initialized():  # sum_gradients all-reduces .grad: lend it the sums
        for parameter, total in zip(parameters, fisher):
            parameter.grad = total
        distributed.sum_gradients(parameters)
        fisher = [p.grad for p in parameters]
        optimizer.zero_grad(set_to_none=True)
    fisher = [total / max(len(batches), 1) for total in fisher]
    anchor = [p.detach().float().clone() for p in parameters]
    info = {
        "batches": len(batches),
        "blocks": sum(len(b["input_ids"]) for b in batches),
        "tokens": int(distributed.sum_across_ranks([tokens])[0]),
        "parameters": sum(p.numel() for p in parameters),
    }
    ewc = EwcPenalty(weight, [n for n, _ in named], parameters, fisher, anchor, info)
    ewc.info.update(_ewc_figures(ewc), seconds=round(time.time() - started, 3), estimated_this_run=True)
    return ewc


def _ewc_figures(ewc: EwcPenalty) -> dict:
    values = torch.cat([f.reshape(-1) for f in ewc.fisher])
    return {
        "weight": ewc.weight,
        "bytes": sum(t.numel() * t.element_size() for t in ewc.fisher + ewc.anchor),
        "fisher_mean": float(values.mean()),
        "fisher_max": float(values.max()),
    }


def save_ewc(path: Path, ewc: EwcPenalty) -> None:
    """F and theta* as safetensors, renamed into place. One metadata entry (a sorted JSON string):
    safetensors writes its metadata map in hash order, which would make the bytes differ run to run."""
    from safetensors.torch import save_file

    tensors = {}
    for name, fisher, anchor in zip(ewc.names, ewc.fisher, ewc.anchor):
        tensors[f"fisher.{name}"] = fisher.detach().cpu().contiguous()
        tensors[f"anchor.{name}"] = anchor.detach().cpu().contiguous()
    described = {k: ewc.info[k] for k in ("batches", "blocks", "tokens", "parameters")}
    metadata = {EWC_FORMAT: json.dumps(described, sort_keys=True)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_ewc(path: Path, optimizer, weight: float) -> EwcPenalty:
    """What save_ewc wrote, checked against the trainable parameters (names and shapes)."""
    from safetensors import safe_open

    started = time.time()
    named = _trainable_named(optimizer)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        keys = set(handle.keys())
        expected = {f"{kind}.{name}" for name, _ in named for kind in ("fisher", "anchor")}
        if EWC_FORMAT not in metadata or keys != expected:
            raise RuntimeError(
                f"{path}: not the EWC estimate of these trainable parameters "
                f"({len(keys)} tensors, expected {len(expected)}); delete the stage directory to start over"
            )
        fisher = [handle.get_tensor(f"fisher.{n}").to(p.device) for n, p in named]
        anchor = [handle.get_tensor(f"anchor.{n}").to(p.device) for n, p in named]
    for (name, parameter), values in zip(named, fisher):
        if values.shape != parameter.shape:
            raise RuntimeError(f"{path}: {name} is {tuple(values.shape)}, the parameter {tuple(parameter.shape)}")
    info = json.loads(metadata[EWC_FORMAT])
    ewc = EwcPenalty(weight, [n for n, _ in named], [p for _, p in named], fisher, anchor, info)
    ewc.info.update(_ewc_figures(ewc), seconds=round(time.time() - started, 3), estimated_this_run=False)
    return ewc


def setup_ewc(
    checkpoint_root: Path, model, optimizer, tcfg: TrainingConfig, data: Callable[[], Sequence[dict]] | None, **kw
) -> EwcPenalty | None:
    """EWC for fit(): loaded from `checkpoint_root/ewc.safetensors` when an earlier run of this stage
    wrote it (a resume keeps its theta* and F), else estimated now, before the first step, and saved."""
    if tcfg.ewc_weight == 0:
        return None
    path = Path(checkpoint_root) / EWC_FILE
    if path.is_file():
        ewc = load_ewc(path, optimizer, tcfg.ewc_weight)
        logger.info("EWC: Fisher and theta* loaded from %s (not re-estimated)", path)
        return ewc
    if list_checkpoints(checkpoint_root):
        raise RuntimeError(f"{checkpoint_root} has checkpoints but no {EWC_FILE}: theta* is lost; rerun the stage anew")
    if data is None:
        raise ValueError("ewc_weight > 0, but the stage passed no data to estimate the Fisher on")
    ewc = estimate_ewc(model, optimizer, data(), tcfg.ewc_weight, **kw)
    logger.info("EWC: Fisher estimated on %(batches)d batches, %(tokens)d tokens in %(seconds).1f s", ewc.info)
    if distributed.is_main():
        save_ewc(path, ewc)
    distributed.barrier()
    return ewc


class LmBlockStream:
    """Chosen blocks of the token shards (`indices`, e.g. from blocks_of_source) in a seeded order per
    epoch, as plain LM samples (labels on every valid token); sft mixes them in as replay. state_dict()
    is the exact position plus what has been used. Rank r takes positions r, r + world_size, ...

    Samples carry input_ids and labels only, like sft's examples: a padded final block has its padding
    at the end, behind causal attention and labelled -100, so no attention mask is needed.
    """

    STREAM = 1  # mixed into the seed: an order of its own, not the sft examples' order

    def __init__(self, dataset, indices: np.ndarray, seed: int, *, rank: int = 0, world_size: int = 1):
        if len(indices) < world_size:
            raise ValueError(f"{len(indices)} token blocks to replay, fewer than the {world_size} processes")
        self.dataset, self.indices, self.seed = dataset, np.asarray(indices, dtype=np.int64), seed
        self.rank, self.world_size = rank, world_size
        self.valid, self.domain = (values[self.indices] for values in dataset.block_tokens())
        self.epoch, self.next_index = 0, 0
        self.used = {"examples": 0, "tokens": 0, "domain_tokens": 0}  # this rank's, valid tokens of the blocks

    def __len__(self) -> int:
        return len(self.indices) // self.world_size

    def _order(self) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.STREAM, self.epoch]).permutation(len(self.indices))
        return order[self.rank : len(self) * self.world_size : self.world_size]

    def __iter__(self):
        if self.next_index >= len(self):
            self.epoch, self.next_index = self.epoch + 1, 0
        order = self._order()
        while self.next_index < len(order):
            position = int(order[self.next_index])
            self.next_index += 1
            self.used["examples"] += 1
            self.used["tokens"] += int(self.valid[position])
            self.used["domain_tokens"] += int(self.domain[position])
            sample = self.dataset.sample(int(self.indices[position]))
            yield {"input_ids": sample["input_ids"], "labels": sample["labels"]}
        self.epoch, self.next_index = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "next_index": self.next_index,
            "blocks": len(self.indices),
            "seed": self.seed,
            "world_size": self.world_size,
            "used": dict(self.used),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = (state["blocks"], state["seed"], state["world_size"])
        if saved != (len(self.indices), self.seed, self.world_size):
            raise ValueError(
                f"replay position was saved for {saved[0]} blocks / seed {saved[1]} / {saved[2]} processes; now "
                f"{len(self.indices)} / {self.seed} / {self.world_size}: the token shards or the launch changed"
            )
        self.epoch, self.next_index, self.used = state["epoch"], state["next_index"], dict(state["used"])


# ---------------------------------------------------------------------------------------------
# Stage set-up and outputs (cpt and sft)
# ---------------------------------------------------------------------------------------------


@dataclass
class PreparedModel:
    """The adapted model a training stage trains, and what its manifest records about the set-up."""

    model: object
    device: torch.device
    tied_embeddings: bool
    kernels: dict
    fused_loss: Callable | None
    memory: dict
    lora_targets: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def prepare_model(
    base_model: str, tcfg: TrainingConfig, *, adapter_dir=None, seed: int = 0, trust_remote_code: bool = False
) -> PreparedModel:
    """Base (4-bit) -> adapters (fresh, or continued from `adapter_dir`) -> kernels, with memory per phase."""
    if tcfg.torch_threads:
        torch.set_num_threads(tcfg.torch_threads)
    model = load_base_model(base_model, tcfg, trust_remote_code=trust_remote_code)
    device = next(model.parameters()).device
    memory = {"load": memory_snapshot(str(device))}
    tied = embeddings_tied(model)
    notes = lora_targets(model, tcfg)[1] if adapter_dir is None else []  # a continued adapter keeps its own
    for note in notes:
        logger.warning(note)
    model = add_adapters(model, tcfg, adapter_dir=adapter_dir, seed=seed)
    targets = describe_lora_targets(model)
    logger.info("LoRA on %s per block x %d blocks", targets["per_block"], targets["blocks"])
    kernels = apply_kernel_patches(model, tcfg)
    fused_loss = fused_loss_for(model, tcfg)
    memory["lora_added"] = memory_snapshot(str(device))
    return PreparedModel(model, device, tied, kernels, fused_loss, memory, targets, notes)


def fused_loss_for(model, tcfg: TrainingConfig):
    """The fused linear + cross-entropy loss when configured and applicable, else None (eager head).

    It needs the head's full weight: a LoRA-wrapped lm_head, or a KL term (which needs the logits),
    falls back to the eager head with a log line.
    """
    mode = tcfg.kernels.fused_linear_cross_entropy
    if mode == "off":
        return None
    capped = logit_softcap(_causal_lm(model)) is not None
    if tcfg.kl_weight > 0 or capped or _head_weight(_causal_lm(model).lm_head) is None:
        reason = (
            "kl_weight > 0 needs the logits"
            if tcfg.kl_weight > 0
            else "the model soft-caps its logits (final_logit_softcapping), which the fused loss does not"
            if capped
            else "lm_head is LoRA-wrapped or has a bias"
        )
        if mode == "on":
            raise ValueError(f"kernels.fused_linear_cross_entropy: on, but it cannot apply here ({reason})")
        logger.info("fused linear cross-entropy not used: %s; the eager head runs", reason)
        return None
    return fused_linear_cross_entropy


def apply_kernel_patches(model, tcfg: TrainingConfig) -> dict:
    """RMSNorm and SwiGLU kernels on the model's modules (kernels/patch.py)."""
    return apply_kernels(model, rms_norm=tcfg.kernels.rms_norm, swiglu=tcfg.kernels.swiglu)


def save_adapter(model, tokenizer, directory: Path) -> None:
    """PEFT adapter + tokenizer, renamed into place when complete."""
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter_files(model, tmp)
    tokenizer.save_pretrained(str(tmp))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def trainable_parameters(model) -> dict:
    seen, trainable, total = set(), 0, 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return {"trainable": trainable, "total": total}


def write_history(path: Path, history: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in history))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class TrainingReporter:
    """Receives progress from fit(); the Prefect flow passes one that writes artifacts. Default: logs."""

    def on_start(self, info: dict) -> None:
        logger.info("training: %s", info)

    def on_log(self, record: dict) -> None:
        logger.info(
            "step %d/%d loss %.4f lr %s tokens/s %.0f",
            record["step"],
            record["total_steps"],
            record["loss"],
            record["lr"],
            record["tokens_per_s"],
        )

    def on_eval(self, step: int, results: dict) -> None:
        logger.info("eval at step %d: %s", step, results)

    def on_checkpoint(self, path: Path, best: Path | None) -> None:
        logger.info("checkpoint %s (best so far: %s)", path, best)


def training_artifacts(manifest: dict, directory: Path) -> list[Artifact]:
    """What cpt and sft show once committed: held-out perplexity per eval, peak memory per phase and a
    link to the best checkpoint (published once per stage, not at every eval)."""
    stage = manifest["stage"]
    rows = [
        {"step": e["step"], **{f"{n} ppl": v["perplexity"] for n, v in e.items() if isinstance(v, dict)}}
        for e in manifest["evals"]
    ]
    found = [
        Artifact(key=f"{stage}-eval", description=f"{stage}: held-out perplexity per step", table=rows),
        Artifact(
            key=f"{stage}-memory",
            description=f"{stage}: peak memory per phase",
            table=[{"phase": phase, **values} for phase, values in manifest["memory"].items()],
        ),
    ]
    if manifest.get("best_checkpoint"):
        best = Path(directory) / manifest["best_checkpoint"]
        found.append(
            Artifact(
                key=f"{stage}-best-checkpoint",
                description=f"{stage}: the checkpoint with the best held-out perplexity",
                link=best.resolve().as_uri(),
                link_text=str(best),
            )
        )
    return found


@dataclass
class FitResult:
    step: int
    tokens: int
    resumed_from: str | None
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    tokens_this_run: int = 0  # since this process started or resumed, for the tokens/s figure
    ewc: dict | None = None  # what the EWC estimate cost (or that it was loaded), when ewc_weight > 0


def training_gates(stage: str, tcfg: TrainingConfig, evaluate: Callable[[], dict], directory: Path):
    """(fit's after_eval, a function giving the manifest's `gates`) for a stage's gates; (None, None) without
    limits. The model the stage starts from is evaluated once here: the baseline every eval is judged against."""
    if not tcfg.gates.limits:
        return None, None
    start = {"step": 0, **evaluate()}

    def after_eval(evaluation: dict) -> None:
        enforce(stage, judge_training(stage, evaluation, start, tcfg.gates), str(directory))

    def summary(evals: list[dict]) -> dict:
        judged = [judge_training(stage, evaluation, start, tcfg.gates) for evaluation in evals]
        breaches = [r for verdict in judged for r in verdict["results"] if not r["passed"]]
        final = judged[-1] if judged else {"results": []}
        return {
            "on_breach": tcfg.gates.on_breach,
            "verdict": "breach" if breaches else "pass",
            "start": {k: v for k, v in start.items() if k != "step"},
            "results": breaches or final["results"],  # every breach along the way, else the last eval's verdicts
        }

    return after_eval, summary


def fit(
    model,
    optimizer,
    scheduler,
    data,
    tcfg: TrainingConfig,
    *,
    total_steps: int,
    checkpoint_root: Path,
    evaluate: Callable[[], dict],
    metric_key: str,
    reporter: TrainingReporter | None = None,
    fused_loss=None,
    stop_after_steps: int | None = None,
    ewc_data: Callable[[], Sequence[dict]] | None = None,
    after_eval: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train to `total_steps`, resuming from the latest checkpoint under `checkpoint_root` if any.

    `data` yields micro-batches (dicts of tensors on the model's device) and has state_dict() /
    load_state_dict() giving its exact position. `evaluate()` returns {eval_set: {"perplexity": ...}};
    `metric_key` ("domain_eval") picks the checkpoints kept as best. `after_eval(evaluation)` runs after
    each eval (and its checkpoint, if the step saves one): the forgetting gates, which may raise to stop
    the stage. `stop_after_steps` ends the loop
    early without finishing (tests use it to simulate a kill between checkpoints). `ewc_data()` gives
    the micro-batches EWC's Fisher is estimated on (with ewc_weight > 0; called only when no earlier run
    of the stage saved the estimate).
    """
    from tqdm.auto import tqdm

    reporter = reporter or TrainingReporter()
    result = FitResult(step=0, tokens=0, resumed_from=None)
    # Before any checkpoint is loaded: on a fresh start theta* is the weights the stage starts from.
    ewc = setup_ewc(checkpoint_root, model, optimizer, tcfg, ewc_data, fused_loss=fused_loss)
    result.ewc = ewc.info if ewc is not None else None
    latest = list_checkpoints(checkpoint_root)
    if latest:
        state = load_checkpoint(latest[-1], model, optimizer, scheduler)
        data.load_state_dict(state["data"])
        result.step, result.tokens = state["step"], state["tokens"]
        result.history, result.evals = state["history"], state["evals"]
        result.resumed_from = latest[-1].name
        logger.info("resuming from %s (step %d of %d)", latest[-1], result.step, total_steps)
        if distributed.is_main():  # finish a prune the kill interrupted (there may be no step left to do it)
            prune_checkpoints(checkpoint_root, tcfg.keep_best, metric_key)
        if after_eval is not None and result.evals:  # the gates judge the eval a stopped run ended at, again
            after_eval(result.evals[-1])
    distributed.broadcast_parameters(p for g in optimizer.param_groups for p in g["params"])
    model.train()
    started = time.time()
    window_started, window_tokens = time.time(), 0
    quiet = {} if distributed.is_main() else {"disable": True}  # rank 0's bar only (TQDM_DISABLE=1 still applies)
    bar = tqdm(total=total_steps, initial=result.step, desc="train", unit="step", mininterval=2.0, **quiet)
    try:
        while result.step < total_steps:
            if stop_after_steps is not None and result.step >= stop_after_steps:
                break
            micro_batches = [next(data) for _ in range(tcfg.gradient_accumulation_steps)]
            record = train_step(model, optimizer, scheduler, micro_batches, tcfg, fused_loss=fused_loss, ewc=ewc)
            result.step += 1
            result.tokens += record["tokens"]
            result.tokens_this_run += record["tokens"]
            window_tokens += record["tokens"]
            bar.update(1)
            if result.step % tcfg.log_steps == 0 or result.step == total_steps:
                elapsed = max(time.time() - window_started, 1e-9)
                entry = {
                    "step": result.step,
                    "total_steps": total_steps,
                    "loss": round(record["loss"], 6),
                    "kl": round(record["kl"], 6),
                    "grad_norm": None if record["grad_norm"] is None else round(record["grad_norm"], 4),
                    "lr": {k: float(f"{v:.6g}") for k, v in record["lr"].items()},
                    "tokens": result.tokens,
                    "tokens_per_s": round(window_tokens / elapsed, 1),
                }
                if ewc is not None:  # absent when off: the history of a run without EWC keeps its bytes
                    entry["ewc"] = round(record["ewc"], 6)
                reporter.on_log(entry)
                # Persisted without the wall-clock rate: same config and data, same bytes.
                result.history.append({k: v for k, v in entry.items() if k != "tokens_per_s"})
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                window_started, window_tokens = time.time(), 0
            at_end = result.step == total_steps
            if result.step % tcfg.eval_steps == 0 or result.step % tcfg.save_steps == 0 or at_end:
                # Evaluated at every checkpoint too: the best-N retention needs a metric for each.
                evaluation = {"step": result.step, **evaluate()}
                result.evals.append(evaluation)
                reporter.on_eval(result.step, evaluation)
            if result.step % tcfg.save_steps == 0 or at_end:
                metric = {
                    name: values["perplexity"] for name, values in result.evals[-1].items() if isinstance(values, dict)
                }
                trainer_state = {
                    "step": result.step,
                    "total_steps": total_steps,
                    "tokens": result.tokens,
                    "data": data.state_dict(),
                    "metric": metric,
                    "history": result.history,
                    "evals": result.evals,
                }
                # Ranks hold the same weights and optimizer state, and move through the data in step
                # (every rank may load rank 0's data position): rank 0 writes for all.
                if distributed.is_main():
                    path = save_checkpoint(
                        Path(checkpoint_root) / checkpoint_name(result.step), model, optimizer, scheduler, trainer_state
                    )
                    prune_checkpoints(checkpoint_root, tcfg.keep_best, metric_key)
                    reporter.on_checkpoint(path, best_checkpoint(checkpoint_root, metric_key))
                distributed.barrier()
            if after_eval is not None and result.evals and result.evals[-1]["step"] == result.step:  # after saving
                after_eval(result.evals[-1])
    finally:
        bar.close()
    result.seconds = round(time.time() - started, 3)
    return result


# ---------------------------------------------------------------------------------------------
# Data: token blocks as an endless stream of micro-batches with a resumable position
# ---------------------------------------------------------------------------------------------


class MicroBatches:
    """Wraps a dataset with `__iter__`, state_dict() and load_state_dict() (TokenShardDataset, SftDataset)
    into endless micro-batches on `device`; epochs follow one another."""

    def __init__(self, dataset, micro_batch_size: int, device, collate: Callable | None = None):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.device = device
        self.collate = collate or (lambda samples: {k: torch.stack([s[k] for s in samples]) for k in samples[0]})
        self._iterator: Iterator | None = None

    def _samples(self) -> Iterator[dict]:
        while True:
            yielded = False
            for sample in self.dataset:
                yielded = True
                yield sample
            if not yielded:
                raise ValueError("the training dataset is empty")

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._samples()
        samples = [next(self._iterator) for _ in range(self.micro_batch_size)]
        return {k: v.to(self.device) for k, v in self.collate(samples).items()}

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self._iterator = None
