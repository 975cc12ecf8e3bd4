"""cpt stage: QLoRA continued pretraining on the packed token shards, embeddings at their own learning rate.

Sits after `tokenize` (... -> tokenize -> **cpt** -> sft -> evaluate). Reads `tokens-*.arrow`, evaluates
perplexity on mix's held-out `domain_eval` / `general_eval`, checkpoints and resumes, and leaves the PEFT
adapter (with the trained embed_tokens / lm_head) in `adapter/`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from pydantic import Field

from cptflow import distributed
from cptflow.models import load_tokenizer, model_fingerprint
from cptflow.stage import Artifact
from cptflow.store import commit_manifest, now_iso, read_manifest
from cptflow.token_reader import TokenShardDataset
from cptflow.token_shards import tokenizer_fingerprint
from cptflow.training import (
    EVAL_SETS,
    MicroBatches,
    TrainingConfig,
    TrainingReporter,
    best_checkpoint,
    build_optimizer,
    build_scheduler,
    describe_param_groups,
    eval_blocks,
    evaluate_perplexity,
    fisher_batches,
    fit,
    memory_snapshot,
    prepare_model,
    save_adapter,
    set_seed,
    token_shard_paths,
    trainable_parameters,
    training_artifacts,
    training_gates,
    write_history,
)

logger = logging.getLogger(__name__)

METRIC = "domain_eval"  # checkpoints kept as "best" have the lowest domain perplexity


class CptConfig(TrainingConfig):
    """Continued pretraining. Defaults from Unsloth's CPT recipe: r=128, alpha=32, rsLoRA, LR 5e-5,
    embedding LR 5e-6, 8-bit AdamW, cosine."""

    shuffle_window: int = Field(
        0, ge=0, description="Shuffle blocks within windows of this many (0 keeps the curriculum order)"
    )
    document_mask: bool = Field(False, description="Attention never crosses documents inside a packed block")


# ---------------------------------------------------------------------------------------------
# Set-up shared with sft and evaluate
# ---------------------------------------------------------------------------------------------


def make_evaluator(model, blocks: dict[str, list[dict]], batch_size: int):
    def evaluate() -> dict:
        return {name: evaluate_perplexity(model, sets, batch_size=batch_size) for name, sets in blocks.items()}

    return evaluate


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
STAGE_VERSION = 1
NAME = "cpt"
UPSTREAM = "tokenize"
Config = CptConfig


def fingerprint_inputs(cfg) -> dict:
    """The weights depend on the base model, the seed and the number of processes (data order per rank
    and reduction order differ with it); `retries` only says how often Prefect tries."""
    init_adapter = model_fingerprint(str(cfg.resolve(cfg.cpt.init_adapter))) if cfg.cpt.init_adapter else None
    return {
        # Gates judge evals and change no weight: a new limit re-judges, it does not retrain.
        "config": cfg.cpt.model_dump(mode="json", exclude={"retries", "gates"}),
        "model": model_fingerprint(cfg.base_model),
        "init_adapter": init_adapter,
        "processes": cfg.launch.num_processes,
        "seed": cfg.seed,
        "version": STAGE_VERSION,
    }


def artifacts(manifest: dict, directory: Path) -> list[Artifact]:
    return training_artifacts(manifest, directory)


def run(run, cfg, reporter: TrainingReporter | None = None, *, stop_after_steps: int | None = None) -> dict | None:
    """Train (or resume) and commit. Returns the manifest; None when stopped early by `stop_after_steps`."""
    existing = read_manifest(run.path)
    if existing is not None:
        return existing
    tcfg: CptConfig = cfg.cpt
    started = time.time()
    for warning in tcfg.warnings():
        logger.warning("cpt: %s", warning)
    set_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.base_model, trust_remote_code=cfg.trust_remote_code)
    init_adapter = cfg.resolve(tcfg.init_adapter) if tcfg.init_adapter else None
    prepared = prepare_model(
        cfg.base_model, tcfg, adapter_dir=init_adapter, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code
    )
    model, device, memory, fused_loss = prepared.model, prepared.device, prepared.memory, prepared.fused_loss

    dataset = TokenShardDataset(
        token_shard_paths(Path(run.upstream_directory)),
        expected={"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)},
        shuffle_window=tcfg.shuffle_window,
        seed=cfg.seed,
        document_mask=tcfg.document_mask,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )
    samples_per_step = tcfg.micro_batch_size * tcfg.gradient_accumulation_steps
    total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * len(dataset) / samples_per_step))
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, total_steps)
    blocks = eval_blocks(run.stage_directories, tokenizer, dataset.seq_len)
    evaluate = make_evaluator(model, blocks, tcfg.eval_batch_size)
    reporter = reporter or TrainingReporter()
    reporter.on_start(
        {
            "stage": "cpt",
            "total_steps": total_steps,
            "samples": len(dataset),
            "seq_len": dataset.seq_len,
            "param_groups": describe_param_groups(optimizer),
            "lora_targets": prepared.lora_targets,
        }
    )

    checkpoints = run.path / "checkpoints"
    after_eval, gate_summary = training_gates("cpt", tcfg, evaluate, run.path)
    result = fit(
        model,
        optimizer,
        scheduler,
        MicroBatches(dataset, tcfg.micro_batch_size, device),
        tcfg,
        total_steps=total_steps,
        checkpoint_root=checkpoints,
        evaluate=evaluate,
        after_eval=after_eval,
        metric_key=METRIC,
        reporter=reporter,
        fused_loss=fused_loss,
        stop_after_steps=stop_after_steps,
        ewc_data=lambda: fisher_batches(dataset, tcfg.micro_batch_size, tcfg.ewc_fisher_batches),
    )
    if result.step < total_steps:
        return None
    memory["training"] = memory_snapshot(str(device))
    final_eval = result.evals[-1]
    memory["eval"] = memory_snapshot(str(device))
    if not distributed.is_main():  # rank 0 writes the stage's outputs; the others are done
        distributed.barrier()
        return read_manifest(run.path)

    save_adapter(model, tokenizer, run.path / "adapter")
    write_history(run.path / "train_log.jsonl", result.history)
    best = best_checkpoint(checkpoints, METRIC)
    manifest = {
        "stage": "cpt",
        "fingerprint": run.fingerprint,
        "payload": run.payload,
        "adapter": "adapter",
        "best_checkpoint": str(best.relative_to(run.path)) if best else None,
        "tied_embeddings": prepared.tied_embeddings,
        "parameters": trainable_parameters(model),
        "param_groups": describe_param_groups(optimizer),
        "lora_targets": prepared.lora_targets,
        "kernels": {"patched": prepared.kernels, "fused_linear_cross_entropy": fused_loss is not None},
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
        "gates": gate_summary(result.evals) if gate_summary else None,
        "memory": memory,
        "warnings": tcfg.warnings() + prepared.warnings,
        "processes": distributed.world_size(),
        "timings": {"finished": now_iso(), "seconds": round(time.time() - started, 3)},
    }
    if result.ewc:  # what the Fisher cost (seconds, bytes of F and theta*, batches and tokens)
        manifest["ewc"] = result.ewc
    manifest = commit_manifest(run.path, manifest)
    distributed.barrier()
    return manifest
