"""Turn a model name (`builtin:tiny-llama`, a local directory or a hub id) into a loaded model.

The one place perplexity, cpt, sft and evaluate load models and tokenizers, pick device and dtype,
and get a stable model fingerprint for their caches.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
from pathlib import Path

from cptflow.tiny_model import TinyLlamaSpec, build_fingerprint, build_tiny_llama

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny-llama",)
# The spec and seed `builtin:tiny-llama` is built with; see TinyLlamaSpec for the defaults.
TINY_LLAMA_SPEC = TinyLlamaSpec()
TINY_LLAMA_SEED = 0

# The sample corpora (data/ in the repository) install as package data: found in a wheel install too.
SAMPLE_DATA_DIR = Path(str(importlib.resources.files("cptflow.sample_data")))
# Weight files whose names and sizes identify a local checkpoint (contents would cost a full read).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def default_cache_dir() -> Path:
    """`$CPTFLOW_CACHE_DIR`, else `~/.cache/cptflow`."""
    return Path(os.environ.get("CPTFLOW_CACHE_DIR") or Path.home() / ".cache" / "cptflow")


def default_corpus_files() -> list[Path]:
    """The sample general-English shards the builtin model is trained on, in name order."""
    return sorted((SAMPLE_DATA_DIR / "raw" / "general").glob("web-*.jsonl.gz"))


def _builtin_name(name: str) -> str:
    builtin = name[len(BUILTIN_PREFIX) :]
    if builtin not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + b for b in BUILTIN_MODELS)
        raise ValueError(f"unknown builtin model {name!r}; known builtin models: {known}")
    return builtin


def _builtin_corpus() -> list[Path]:
    files = default_corpus_files()
    if not files:
        raise FileNotFoundError(
            f"builtin:tiny-llama is trained on {SAMPLE_DATA_DIR / 'raw' / 'general'}/web-*.jsonl.gz, "
            "which does not exist; generate the sample data first"
        )
    return files


def resolve_model_path(name: str, *, cache_dir: Path | None = None) -> str:
    """Path or hub id that `from_pretrained` accepts; builds `builtin:` models on first use."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    _builtin_name(name)  # only tiny-llama so far
    cache_dir = Path(cache_dir or default_cache_dir())
    return str(build_tiny_llama(_builtin_corpus(), cache_dir, seed=TINY_LLAMA_SEED, spec=TINY_LLAMA_SPEC))


def model_fingerprint(name: str, *, revision: str | None = None) -> str:
    """Stable id of the weights `name` refers to, for keying downstream caches.

    builtin: the build fingerprint (computed without building). Local directory: sha256 of
    config.json plus the names and sizes of weight files. Hub id: the id, `@revision` if given.
    """
    if name.startswith(BUILTIN_PREFIX):
        _builtin_name(name)
        return build_fingerprint(_builtin_corpus(), TINY_LLAMA_SPEC, TINY_LLAMA_SEED)
    path = Path(name).expanduser()
    if path.is_dir():
        digest = hashlib.sha256()
        config = path / "config.json"
        digest.update(config.read_bytes() if config.is_file() else b"")
        for weight in sorted(path.iterdir()):
            if weight.is_file() and weight.name.endswith(_WEIGHT_SUFFIXES):
                digest.update(f"\0{weight.name}\0{weight.stat().st_size}".encode())
        return digest.hexdigest()
    return f"{name}@{revision}" if revision else name


def pick_device(device: str = "auto") -> str:
    """`auto` -> `cuda` when available, else `cpu`; asking for `cuda` without one is an error."""
    import torch

    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"device must be one of {DEVICES} (or cuda:N), got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return device


def pick_dtype(dtype: str = "auto", device: str = "cpu"):
    """`auto` -> bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(
    name: str,
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
    cache_dir: Path | None = None,
):
    """AutoTokenizer for `name` (builtin names are built/cached first). Not modified: the caller
    decides about a missing pad token."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        resolve_model_path(name, cache_dir=cache_dir),
        trust_remote_code=trust_remote_code,
        revision=revision,
    )


def load_causal_lm(
    name: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    cache_dir: Path | None = None,
):
    """AutoModelForCausalLM from safetensors only, on `device` in `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name, cache_dir=cache_dir),
        dtype=pick_dtype(dtype, device),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        revision=revision,
    )
    return model.to(device).eval()
