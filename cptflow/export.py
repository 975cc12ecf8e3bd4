"""Export a trained adapter: load it on its base, merge it into one checkpoint, write the model card.

Part of the `evaluate` stage (the last in the DAG); `tasks/evaluate.py` calls these after scoring.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import torch

from cptflow.models import load_causal_lm, load_tokenizer
from cptflow.store import atomic_write_text

logger = logging.getLogger(__name__)

MERGE_DTYPES = ("bfloat16", "float16", "float32")
REDACTED = "<redacted>"
# Hyperparameter names that may hold a credential (hub_token, api_key, wandb_secret, password, webhook_url).
SECRET_NAME_PARTS = ("token", "password", "secret", "key", "webhook", "credential")
# Values that are credentials whatever their key: Hugging Face / OpenAI / GitHub / Slack / AWS tokens, URLs
# with a password in them (https://user:pass@host), and webhook URLs (Slack, Discord, Teams: the path is the key).
SECRET_VALUE = re.compile(
    r"\bhf_[A-Za-z0-9]{20,}|\bsk-[A-Za-z0-9_-]{20,}|\bgh[pousr]_[A-Za-z0-9]{20,}|\bxox[abposr]-[A-Za-z0-9-]{10,}|"
    r"\bAKIA[0-9A-Z]{16}\b|://[^/\s:@]+:[^/\s@]+@|://(?:hooks\.|[^/\s]*webhook)|://[^\s]*/(?:hooks?|webhooks?)/",
    re.IGNORECASE,
)
# Environment variables whose values must never be written, wherever they turn up in a value.
SECRET_ENV_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY|WEBHOOK|CREDENTIAL", re.IGNORECASE)
MODEL_CARD_TAGS = ("cptflow", "continued-pretraining")


def load_adapted_model(
    base_model_path: str,
    adapter_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
):
    """The base model (safetensors, CPU, `dtype`) with the PEFT adapter in `adapter_dir` on top, eval mode.

    The adapter was trained on a 4-bit NF4 base; here it sits on the unquantized weights, which is
    what `merge_adapter` bakes in, so this is the model a merged checkpoint must reproduce.
    """
    from peft import PeftModel

    base = load_causal_lm(
        base_model_path,
        device="cpu",
        dtype=str(dtype).removeprefix("torch."),
        trust_remote_code=trust_remote_code,
    )
    return PeftModel.from_pretrained(base, Path(adapter_dir)).eval()


def merge_adapter(
    base_model_path: str,
    adapter_dir: Path,
    out_dir: Path,
    *,
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
    trust_remote_code: bool = False,
) -> dict:
    """Merge the adapter into its base; save the standalone checkpoint and tokenizer at `out_dir`.

    LoRA deltas are merged in float32, then the model is cast to `dtype` (so the CPU needs the base's
    float32 size in memory). The trained `modules_to_save` copies (embed_tokens, lm_head) replace the
    base weights; a base with tied embeddings stays tied when its copies are one tensor
    (`ensure_weight_tying`), and is untied (`tie_word_embeddings=False`) when they were trained
    apart, so reloading never swaps the trained head for the embedding. Both are checked, not
    assumed: earlier peft versions got them wrong (peft PR#2972, unsloth#3444).

    `out_dir` appears whole or not at all: everything is written into the sibling
    `.<name>.tmp-<pid>` and renamed into place; an existing `out_dir` is replaced only on success.
    """
    from peft.utils import ModulesToSaveWrapper

    if dtype not in MERGE_DTYPES:
        raise ValueError(f"dtype must be one of {MERGE_DTYPES}, got {dtype!r}")
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)

    model = load_adapted_model(base_model_path, adapter_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    adapter_name = model.active_adapter
    trained_copies = {
        name: module.modules_to_save[adapter_name].weight
        for name, module in model.get_base_model().named_modules()
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save
    }
    merged = model.merge_and_unload()
    for name, weight in trained_copies.items():
        if not torch.equal(merged.get_submodule(name).weight, weight):
            raise RuntimeError(f"merge_and_unload dropped the trained {name}: the base weight is left")
    merged = merged.to(getattr(torch, dtype)).eval()

    embedding, head = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    tied = bool(getattr(merged.config, "tie_word_embeddings", False))
    if tied and embedding is not head and not torch.equal(embedding, head):
        # Reloading would re-tie lm_head to embed_tokens and lose the trained head (peft PR#2972).
        raise RuntimeError("config says tie_word_embeddings but the merged embedding and head differ")

    adapter_has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(
        str(adapter_dir) if adapter_has_tokenizer else base_model_path,
        trust_remote_code=trust_remote_code,
    )

    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A leftover from a killed merge (the stage holds out_dir, so no other writer is alive).
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        merged.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        _fsync_files(tmp_dir)
        _replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    result = {
        "path": str(out_dir),
        "dtype": dtype,
        "tied_embeddings": tied,
        "parameters": sum(p.numel() for p in merged.parameters()),
        "bytes": sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()),
    }
    logger.info("merged %s onto %s -> %s", adapter_dir, base_model_path, result)
    return result


def _fsync_files(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` onto `dst`; an existing `dst` is moved aside first (rename cannot replace a full dir)."""
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


# --- model card ------------------------------------------------------------------------------


def write_model_card(
    path: Path,
    *,
    model_name: str,
    base_model: str,
    data: dict,
    hyperparameters: dict,
    perplexity: dict,
    generations: list[dict] | None = None,
) -> None:
    """Write a Hugging Face style README.md (YAML front matter + markdown) atomically.

    `perplexity` is `{"base": {"domain": float, "general": float}, "cpt": {...}, "sft": {...}}`;
    `generations` is a list of `{"prompt": str, "<model>": completion, ...}` shown side by side.
    Values of keys that look like credentials (see `redact`) never reach the file.
    """
    path = Path(path)
    next_to_merged = (path.parent / "config.json").is_file() and not (path.parent / "adapter_config.json").is_file()
    sections = [
        _front_matter(library_name="transformers" if next_to_merged else "peft", base_model=base_model),
        f"# {model_name}\n\n{_summary(base_model, perplexity)}",
        "## Data\n\n" + _key_value_table(redact(data), "statistic"),
        "## Hyperparameters\n\n" + _hyperparameter_tables(redact(hyperparameters)),
        "## Evaluation\n\n" + _perplexity_section(perplexity),
    ]
    if generations:
        sections.append("## Sample generations\n\n" + _generations_table(generations))
    sections.append(_how_to_load(base_model))
    atomic_write_text(path, "\n\n".join(s.rstrip("\n") for s in sections) + "\n")


def redact(values: dict) -> dict:
    """Copy of `values` (nested dicts too) where a key naming a credential keeps only a number value, and
    a value that is (or holds) a credential is replaced whatever its key: a pydantic SecretStr, a known
    token format, a URL with a password, or the value of a secret environment variable (HF_TOKEN, ...)."""
    env_secrets = [v for k, v in os.environ.items() if SECRET_ENV_NAME.search(k) and len(v) >= 8]
    return _redact(values, env_secrets)


def _redact(values: dict, env_secrets: list[str]) -> dict:
    clean = {}
    for key, value in values.items():
        if isinstance(value, dict):
            clean[key] = _redact(value, env_secrets)
        elif _is_secret_name(str(key)) and not isinstance(value, (int, float)):
            clean[key] = REDACTED
        elif _is_secret_value(value, env_secrets):
            clean[key] = REDACTED
        elif isinstance(value, (list, tuple)):
            clean[key] = [REDACTED if _is_secret_value(v, env_secrets) else v for v in value]
        else:
            clean[key] = value
    return clean


def _is_secret_name(name: str) -> bool:
    return any(part in name.lower() for part in SECRET_NAME_PARTS)


def _is_secret_value(value: Any, env_secrets: list[str]) -> bool:
    from pydantic import SecretBytes, SecretStr

    if isinstance(value, (SecretStr, SecretBytes)):
        return True
    if not isinstance(value, str):
        return False
    return SECRET_VALUE.search(value) is not None or any(secret in value for secret in env_secrets)


def _front_matter(*, library_name: str, base_model: str) -> str:
    tags = "\n".join(f"- {tag}" for tag in MODEL_CARD_TAGS)
    return f"---\nlibrary_name: {library_name}\nbase_model: {_yaml_str(base_model)}\ntags:\n{tags}\n---"


def _yaml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _summary(base_model: str, perplexity: dict) -> str:
    steps = "continued pretraining on domain text"
    if perplexity.get("sft"):
        steps += ", then supervised fine-tuning"
    return f"`{base_model}` after {steps}, trained as a LoRA adapter with cptflow."


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        text = str(value)
    elif isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", "<br>")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _key_value_table(values: dict, key_title: str) -> str:
    if not values:
        return "_none recorded_\n"
    return _table([key_title, "value"], [[_cell(k), _cell(v)] for k, v in values.items()])


def _hyperparameter_tables(hyperparameters: dict) -> str:
    """Scalars in one table, each sub-dict (e.g. `cpt`, `sft`) in its own."""
    flat = {k: v for k, v in hyperparameters.items() if not isinstance(v, dict)}
    parts = [_key_value_table(flat, "hyperparameter")] if flat else []
    for name, sub in hyperparameters.items():
        if isinstance(sub, dict):
            parts.append(f"### {name}\n\n" + _key_value_table(sub, "hyperparameter"))
    return "\n".join(parts) if parts else "_none recorded_\n"


def percent_change(value: float, base: float) -> str:
    """`-25.0%` for 75 against 100; empty when either side is missing or the base is 0."""
    if value is None or base is None or base == 0 or not math.isfinite(base):
        return ""
    return f"{(value - base) / base * 100:+.1f}%"


def _perplexity_section(perplexity: dict) -> str:
    stages = [s for s in perplexity if perplexity[s]]
    eval_sets: list[str] = []
    for stage in stages:
        eval_sets += [name for name in perplexity[stage] if name not in eval_sets]
    base = perplexity.get("base") or {}
    header = ["model"]
    for name in eval_sets:
        header += [f"{name} perplexity", "vs base"]
    rows = []
    for stage in stages:
        row = [stage]
        for name in eval_sets:
            value = perplexity[stage].get(name)
            row.append("" if value is None else f"{value:.2f}")
            row.append("" if stage == "base" else percent_change(value, base.get(name)))
        rows.append(row)
    note = (
        "Held-out perplexity, lower is better. A drop on `domain` is what continued pretraining is "
        "for; a rise on `general` is forgetting.\n\n"
    )
    return note + _table(header, rows)


def _generations_table(generations: list[dict]) -> str:
    columns: list[str] = []
    for record in generations:
        columns += [k for k in record if k not in columns]
    return _table(
        [_cell(c) for c in columns],
        [[_cell(record.get(c, "")) for c in columns] for record in generations],
    )


def _how_to_load(base_model: str) -> str:
    return f"""## How to load

The LoRA adapter on its base model:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained({base_model!r}, dtype="auto")
model = PeftModel.from_pretrained(base, "path/to/adapter")
tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")
```

The merged checkpoint (adapter, embeddings and head baked in; no peft needed):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/merged", dtype="auto")
tokenizer = AutoTokenizer.from_pretrained("path/to/merged")
```
"""
