"""evaluate stage: perplexity of the base, cpt and sft models on the same held-out tokens (forgetting),
generations side by side, and the export (PEFT adapter, merged 16-bit model, model card).

The last stage of the DAG (... -> cpt -> sft -> **evaluate**).
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from cptflow.export import merge_adapter, write_model_card
from cptflow.gates import EvaluateGates, judge_evaluate
from cptflow.models import load_tokenizer, resolve_model_path
from cptflow.stage import Artifact
from cptflow.store import atomic_write_json, commit_manifest, now_iso, read_manifest
from cptflow.training import eval_blocks, evaluate_perplexity, load_base_model, memory_snapshot, set_seed

logger = logging.getLogger(__name__)

MODELS = ("base", "cpt", "sft")
EVAL_SET_NAMES = {"domain": "domain_eval", "general": "general_eval"}


class ExportSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merged: bool = Field(True, description="Also write the sft adapter merged into the base weights")
    merged_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(8, gt=0, description="Blocks per forward pass")
    prompts: list[str] = Field(
        default_factory=list, description="Rendered with the chat template; answered greedily by each model"
    )
    max_new_tokens: int = Field(48, gt=0, le=1024, description="Generation length bound, in tokens")
    export: ExportSettings = ExportSettings()
    gates: EvaluateGates = Field(
        EvaluateGates(), description="Limits on the forgetting table; report-only unless on_breach: fail"
    )


def forgetting_rows(perplexity: dict) -> list[dict]:
    """One row per eval set: perplexity of each model and the % change from base."""
    rows = []
    for short in EVAL_SET_NAMES:
        base = perplexity["base"][short]
        row = {"eval_set": short, **{model: round(perplexity[model][short], 3) for model in MODELS}}
        for model in ("cpt", "sft"):
            row[f"{model}_change_pct"] = round(100 * (perplexity[model][short] - base) / base, 2)
        rows.append(row)
    return rows


def format_forgetting_table(perplexity: dict) -> str:
    lines = ["| eval set | base | cpt | sft | cpt vs base | sft vs base |", "|---|---:|---:|---:|---:|---:|"]
    for row in forgetting_rows(perplexity):
        lines.append(
            f"| {row['eval_set']} | {row['base']:.2f} | {row['cpt']:.2f} | {row['sft']:.2f} | "
            f"{row['cpt_change_pct']:+.1f}% | {row['sft_change_pct']:+.1f}% |"
        )
    return "\n".join(lines)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers, one prompt at a time (no padding side effects), decoded without special tokens."""
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            ids = tokenizer(prompt)["input_ids"]
        input_ids = torch.tensor([ids], device=device)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        outputs.append(tokenizer.decode(generated[0, len(ids) :], skip_special_tokens=True).strip())
    return outputs


def _model_perplexities(model, blocks: dict, batch_size: int) -> dict:
    return {
        short: evaluate_perplexity(model, blocks[name], batch_size=batch_size)["perplexity"]
        for short, name in EVAL_SET_NAMES.items()
    }


def data_statistics(stage_directories: dict, sft_manifest: dict) -> dict:
    tokenize = read_manifest(Path(stage_directories["tokenize"])) or {}
    mix = read_manifest(Path(stage_directories["mix"])) or {}
    packing = tokenize.get("packing", {})
    return {
        "cpt_tokens": packing.get("tokens"),
        "cpt_domain_tokens": packing.get("domain_tokens"),
        "cpt_domain_share": packing.get("domain_share"),
        "cpt_blocks": packing.get("blocks"),
        "seq_len": packing.get("seq_len"),
        "domain_eval_tokens": (mix.get("eval", {}).get("domain_eval") or {}).get("tokens"),
        "general_eval_tokens": (mix.get("eval", {}).get("general_eval") or {}).get("tokens"),
        "sft_examples": sft_manifest.get("data", {}).get("train"),
        "sft_held_out": sft_manifest.get("data", {}).get("held_out"),
    }


# ---------------------------------------------------------------------------------------------
# The stage, as the pipeline sees it (cptflow/plan.py lists the stage modules in DAG order)
# ---------------------------------------------------------------------------------------------
STAGE_VERSION = 1
NAME = "evaluate"
UPSTREAM = "sft"
Config = EvaluateConfig


def fingerprint_inputs(cfg) -> dict:
    # Gates judge what was measured and change nothing measured: a new limit re-judges, never recomputes.
    return {
        "config": cfg.evaluate.model_dump(mode="json", exclude={"gates"}),
        "seed": cfg.seed,
        "version": STAGE_VERSION,
    }


def gate_verdict(manifest: dict, cfg) -> dict:
    """The gates of the config as it is now, judged on a committed manifest's perplexities (the manifest's
    own `gates` holds the verdict of the limits it was computed under)."""
    return judge_evaluate(manifest["perplexity"], cfg.evaluate.gates)


def markdown_cell(text: str) -> str:
    """Model output as one table cell that renders as the text it is: no HTML, no markup, no new row."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for char in "\\`*_[]|#":
        escaped = escaped.replace(char, "\\" + char)
    return escaped.replace("\r\n", "\n").replace("\n", "<br>") or "(empty)"


def generations_markdown(generations: list[dict]) -> str:
    """The greedy answers as a table, one row per prompt: base, cpt and sft side by side."""
    lines = ["# Generations (greedy)", "", "| prompt | base | cpt | sft |", "|---|---|---|---|"]
    for item in generations:
        lines.append("| " + " | ".join(markdown_cell(item[k] or "") for k in ("prompt", *MODELS)) + " |")
    return "\n".join(lines)


def forgetting_markdown(manifest: dict) -> str:
    """The forgetting table in reading order (eval set, base, cpt, sft, the changes), then the gates."""
    lines = ["## Held-out perplexity (lower is better)", "", manifest["forgetting_table"]]
    results = (manifest.get("gates") or {}).get("results") or []
    if results:
        lines += ["", f"## Gates (on breach: {manifest['gates']['on_breach']})", ""]
        lines += ["| gate | value | limit | verdict |", "|---|---:|---:|---|"]
        for r in results:
            verdict = "pass" if r["passed"] else "**breach**"
            lines.append(f"| {r['gate']} | {r['change_pct']:+.1f}% | {r['limit_pct']:+.1f}% | {verdict} |")
    return "\n".join(lines)


def artifacts(manifest: dict, directory: Path) -> list[Artifact]:
    """The forgetting table, the generations side by side and a link to the export."""
    found = [
        Artifact(
            key="evaluate-forgetting",
            description="perplexity of base, cpt and sft on the same held-out tokens; % change vs base",
            # Markdown, not a table artifact: the UI sorts a table's columns by name (eval_set fourth).
            markdown=forgetting_markdown(manifest),
        )
    ]
    generations = json.loads((directory / manifest["generations"]).read_text(encoding="utf-8"))
    if generations:
        found.append(
            Artifact(
                key="evaluate-generations",
                description="base, cpt and sft answers side by side",
                markdown=generations_markdown(generations),
            )
        )
    merged = (manifest["export"] or {}).get("merged")
    target = directory / (merged["path"] if merged else manifest["export"]["adapter"])
    found.append(
        Artifact(
            key="evaluate-export",
            description="exported model with its model card",
            link=target.resolve().as_uri(),
            link_text=str(target),
        )
    )
    return found


def load_adapted(base_model: str, tcfg, adapter_dir: Path, *, trust_remote_code: bool = False):
    """The training base (4-bit NF4 when the stage used QLoRA) with one stage's adapter, eval mode.

    Each adapter goes on a freshly loaded base as its only adapter. Loading sft's next to cpt's
    (`load_adapter`) loses a tied model's head: PEFT finds no tied modules the second time, so the
    sft model ran with a trained embedding and the base's head, and every tied family (Qwen2.5,
    Gemma, SmolLM2, Llama 3.2 1B) got a wrong sft perplexity.
    """
    from peft import PeftModel  # peft imports torch and transformers: loaded when a stage trains

    base = load_base_model(base_model, tcfg, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def free_model_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(run, cfg, reporter=None) -> dict:
    existing = read_manifest(run.path)
    if existing is not None:
        return existing
    section: EvaluateConfig = cfg.evaluate
    started = time.time()
    set_seed(cfg.seed)
    dirs = run.stage_directories
    manifests = {stage: read_manifest(Path(dirs[stage])) for stage in ("cpt", "sft")}
    for stage, manifest in manifests.items():
        if manifest is None:
            raise RuntimeError(f"evaluate: the {stage} output {dirs[stage]} is not committed (run {stage} first)")
    adapters = {stage: Path(dirs[stage]) / manifests[stage]["adapter"] for stage in ("cpt", "sft")}
    tokenizer = load_tokenizer(str(adapters["sft"]))
    blocks = eval_blocks(dirs, tokenizer, cfg.tokenize.seq_len)

    # All three on the base the adapters were trained on (4-bit NF4 when cpt used QLoRA): the same
    # frozen weights, so differences come from the adapters alone. The base is measured through the
    # cpt model with its adapter disabled; sft gets a base of its own (see load_adapted).
    perplexity, generations = {}, {}

    def measure(name: str, model) -> None:
        perplexity[name] = _model_perplexities(model, blocks, section.batch_size)
        generations[name] = generate(model, tokenizer, section.prompts, section.max_new_tokens)
        logger.info("evaluate %s: %s", name, perplexity[name])

    trust = cfg.trust_remote_code
    model = load_adapted(cfg.base_model, cfg.cpt, adapters["cpt"], trust_remote_code=trust)
    device = str(next(model.parameters()).device)
    with model.disable_adapter():
        measure("base", model)
    measure("cpt", model)
    del model
    free_model_memory()  # one base in memory at a time
    model = load_adapted(cfg.base_model, cfg.cpt, adapters["sft"], trust_remote_code=trust)
    measure("sft", model)
    memory = {"eval": memory_snapshot(device)}
    del model
    free_model_memory()

    table = format_forgetting_table(perplexity)
    side_by_side = [{"prompt": p, **{m: generations[m][i] for m in MODELS}} for i, p in enumerate(section.prompts)]
    atomic_write_json(run.path / "generations.json", side_by_side)

    # Export: the sft adapter (with cpt's embeddings inside), the merged model, and their model card.
    export_dir = run.path / "export"
    adapter_out = export_dir / "adapter"
    if adapter_out.exists():
        shutil.rmtree(adapter_out)
    shutil.copytree(adapters["sft"], adapter_out)
    merged = None
    if section.export.merged:
        merged = merge_adapter(
            resolve_model_path(cfg.base_model),
            adapters["sft"],
            export_dir / "merged",
            dtype=section.export.merged_dtype,
            trust_remote_code=cfg.trust_remote_code,
        )
        merged["path"] = str(Path(merged["path"]).relative_to(run.path))
    hyperparameters = {
        "cpt": cfg.cpt.model_dump(mode="json", exclude={"kernels", "retries", "device", "torch_threads"}),
        "sft": cfg.sft.model_dump(
            mode="json", exclude={"kernels", "retries", "device", "torch_threads", "data", "chat_template"}
        ),
    }
    data = data_statistics(dirs, manifests["sft"])
    card = dict(
        model_name=cfg.name,
        base_model=cfg.base_model,
        data=data,
        hyperparameters=hyperparameters,
        perplexity=perplexity,
        generations=side_by_side,
    )
    write_model_card(adapter_out / "README.md", **card)
    if merged:
        write_model_card(run.path / merged["path"] / "README.md", **card)
    memory["export"] = memory_snapshot(device)

    manifest = {
        "stage": "evaluate",
        "fingerprint": run.fingerprint,
        "payload": run.payload,
        "perplexity": perplexity,
        "forgetting": forgetting_rows(perplexity),
        "forgetting_table": table,
        "gates": judge_evaluate(perplexity, section.gates),
        "generations": "generations.json",
        "export": {"adapter": "export/adapter", "merged": merged},
        "data": data,
        "memory": memory,
        "timings": {"finished": now_iso(), "seconds": round(time.time() - started, 3)},
    }
    logger.info("forgetting (held-out perplexity):\n%s", table)
    return commit_manifest(run.path, manifest)
