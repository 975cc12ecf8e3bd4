"""cpt stage: QLoRA continued pretraining on the packed token shards, embeddings at their own learning rate.

Sits after `tokenize` (... -> tokenize -> **cpt** -> sft -> evaluate). Reads `tokens-*.arrow`, evaluates
perplexity on mix's held-out `domain_eval` / `general_eval`, checkpoints and resumes, and leaves the PEFT
adapter (with the trained embed_tokens / lm_head) in `adapter/`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from pydantic import Field

from cptflow.store import atomic_write_text, commit_manifest, now_iso, read_manifest
from cptflow.training import (
    MicroBatches,
    TrainingConfig,
    TrainingReporter,
    add_adapters,
    best_checkpoint,
    build_optimizer,
    build_scheduler,
    describe_param_groups,
    embeddings_tied,
    evaluate_perplexity,
    fit,
    load_base_model,
    memory_snapshot,
    pack_eval_blocks,
    read_texts,
    save_adapter_files,
    set_seed,
)

logger = logging.getLogger(__name__)

STAGE_VERSION = 1
METRIC = "domain_eval"  # checkpoints kept as "best" have the lowest domain perplexity
EVAL_SETS = ("domain_eval", "general_eval")


class CptConfig(TrainingConfig):
    """Continued pretraining. Defaults from Unsloth's CPT recipe: r=128, alpha=32, rsLoRA, LR 5e-5,
    embedding LR 5e-6, 8-bit AdamW, cosine."""

    shuffle_window: int = Field(0, ge=0, description="Shuffle blocks within windows of this many (0 keeps the curriculum order)")
    document_mask: bool = Field(False, description="Attention never crosses documents inside a packed block")


# ---------------------------------------------------------------------------------------------
# Set-up shared with sft and evaluate
# ---------------------------------------------------------------------------------------------


def eval_blocks(stage_directories: dict, tokenizer, seq_len: int) -> dict[str, list[dict]]:
    """mix's held-out sets, tokenized and packed as for training."""
    mix_dir = Path(stage_directories["mix"])
    return {name: pack_eval_blocks(read_texts(mix_dir / "eval" / f"{name}.jsonl"), tokenizer, seq_len) for name in EVAL_SETS}


def make_evaluator(model, blocks: dict[str, list[dict]], batch_size: int):
    def evaluate() -> dict:
        return {name: evaluate_perplexity(model, sets, batch_size=batch_size) for name, sets in blocks.items()}

    return evaluate


def fused_loss_for(model, tcfg: TrainingConfig):
    """The fused linear + cross-entropy loss when configured and applicable, else None (eager head).

    It needs the head's full weight: a LoRA-wrapped lm_head, or a KL term (which needs the logits),
    falls back to the eager head with a log line.
    """
    mode = tcfg.kernels.fused_linear_cross_entropy
    if mode == "off":
        return None
    try:
        from kernels import fused_linear_cross_entropy
    except ImportError:  # kernels/ not installed in this environment
        if mode == "on":
            raise
        return None
    from cptflow.training import _causal_lm, _head_weight

    if tcfg.kl_weight > 0 or _head_weight(_causal_lm(model).lm_head) is None:
        reason = "kl_weight > 0 needs the logits" if tcfg.kl_weight > 0 else "lm_head is LoRA-wrapped or has a bias"
        if mode == "on":
            raise ValueError(f"kernels.fused_linear_cross_entropy: on, but it cannot apply here ({reason})")
        logger.info("fused linear cross-entropy not used: %s; the eager head runs", reason)
        return None
    return fused_linear_cross_entropy


def apply_kernel_patches(model, tcfg: TrainingConfig) -> dict:
    """RMSNorm and SwiGLU kernels on the model's modules (kernels/patch.py); {} when kernels/ is absent."""
    try:
        from kernels.patch import apply_kernels
    except ImportError:
        if "on" in (tcfg.kernels.rms_norm, tcfg.kernels.swiglu):
            raise
        return {}
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
    import json

    atomic_write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in history))


def token_shard_paths(tokenize_dir: Path) -> list[Path]:
    manifest = read_manifest(tokenize_dir)
    if manifest is None:
        raise RuntimeError(f"cpt: the tokenize output {tokenize_dir} is not committed (run the tokenize stage first)")
    return [tokenize_dir / shard["path"] for shard in manifest["token_shards"]]


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def run(run, cfg, reporter: TrainingReporter | None = None, *, stop_after_steps: int | None = None) -> dict | None:
    """Train (or resume) and commit. Returns the manifest; None when stopped early by `stop_after_steps`."""
    from cptflow.models import load_tokenizer
    from cptflow.token_reader import TokenShardDataset
    from cptflow.token_shards import tokenizer_fingerprint

    existing = read_manifest(run.path)
    if existing is not None:
        return existing
    tcfg: CptConfig = cfg.cpt
    started = time.time()
    if tcfg.torch_threads:
        torch.set_num_threads(tcfg.torch_threads)
    for warning in tcfg.warnings():
        logger.warning("cpt: %s", warning)
    set_seed(cfg.seed)
    memory = {}

    tokenizer = load_tokenizer(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    model = load_base_model(cfg.base_model, tcfg, trust_remote_code=cfg.trust_remote_code)
    device = next(model.parameters()).device
    memory["load"] = memory_snapshot(str(device))
    tied = embeddings_tied(model)
    init_adapter = cfg.resolve(tcfg.init_adapter) if tcfg.init_adapter else None
    model = add_adapters(model, tcfg, adapter_dir=init_adapter, seed=cfg.seed)
    kernels = apply_kernel_patches(model, tcfg)
    fused_loss = fused_loss_for(model, tcfg)
    memory["lora_added"] = memory_snapshot(str(device))

    dataset = TokenShardDataset(
        token_shard_paths(Path(run.upstream_directory)),
        expected={"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)},
        shuffle_window=tcfg.shuffle_window,
        seed=cfg.seed,
        document_mask=tcfg.document_mask,
    )
    samples_per_step = tcfg.micro_batch_size * tcfg.gradient_accumulation_steps
    total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * len(dataset) / samples_per_step))
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, total_steps)
    blocks = eval_blocks(run.stage_directories, tokenizer, dataset.seq_len)
    evaluate = make_evaluator(model, blocks, tcfg.eval_batch_size)
    reporter = reporter or TrainingReporter()
    reporter.on_start(
        {"stage": "cpt", "total_steps": total_steps, "samples": len(dataset), "seq_len": dataset.seq_len, "param_groups": describe_param_groups(optimizer)}
    )

    checkpoints = run.path / "checkpoints"
    result = fit(
        model,
        optimizer,
        scheduler,
        MicroBatches(dataset, tcfg.micro_batch_size, device),
        tcfg,
        total_steps=total_steps,
        checkpoint_root=checkpoints,
        evaluate=evaluate,
        metric_key=METRIC,
        reporter=reporter,
        fused_loss=fused_loss,
        stop_after_steps=stop_after_steps,
    )
    if result.step < total_steps:
        return None
    memory["training"] = memory_snapshot(str(device))
    final_eval = result.evals[-1]
    memory["eval"] = memory_snapshot(str(device))

    save_adapter(model, tokenizer, run.path / "adapter")
    write_history(run.path / "train_log.jsonl", result.history)
    best = best_checkpoint(checkpoints, METRIC)
    manifest = {
        "stage": "cpt",
        "fingerprint": run.fingerprint,
        "payload": run.payload,
        "adapter": "adapter",
        "best_checkpoint": str(best.relative_to(run.path)) if best else None,
        "tied_embeddings": tied,
        "parameters": trainable_parameters(model),
        "param_groups": describe_param_groups(optimizer),
        "kernels": {"patched": kernels, "fused_linear_cross_entropy": fused_loss is not None},
        "train": {
            "steps": result.step,
            "tokens": result.tokens,
            "samples": len(dataset),
            "seq_len": dataset.seq_len,
            "seconds_this_run": result.seconds,
            "tokens_per_s_this_run": round(result.tokens_this_run / result.seconds, 1) if result.seconds else None,
            "resumed_from": result.resumed_from,
            "final_loss": result.history[-1]["loss"] if result.history else None,
        },
        "eval": {name: final_eval[name] for name in EVAL_SETS},
        "evals": result.evals,
        "memory": memory,
        "warnings": tcfg.warnings(),
        "timings": {"finished": now_iso(), "seconds": round(time.time() - started, 3)},
    }
    return commit_manifest(run.path, manifest)
