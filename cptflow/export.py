"""Export a trained adapter: merge it into its base, shard by shard, as one checkpoint; write the model card.

Part of the `evaluate` stage (the last in the DAG); `tasks/evaluate.py` calls these after scoring.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from cptflow.models import load_causal_lm, load_tokenizer
from cptflow.store import atomic_write_text, read_json

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

# The merge holds at most this many bytes of a tensor that is only copied or cast (an embedding matrix is
# read a block of rows at a time); a LoRA-merged weight is held whole, in float32, with its delta.
CHUNK_BYTES = 64 * 2**20
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT saves every adapter tensor under the wrapped model's name (PeftModel.base_model.model).
ADAPTER_PREFIX = "base_model.model."
# adapter_config.json options under which a module computes more than W x + s B A x: such an adapter cannot
# be merged as W + s B A, so it is refused instead of exported wrong.
UNSUPPORTED_LORA_OPTIONS = (
    "use_dora",
    "lora_bias",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "alora_invocation_tokens",
    "arrow_config",
    "use_bdlora",
    "use_qalora",
    "velora_config",
    "kasa_config",
    "monteclora_config",
)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


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


# --- streaming merge --------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraDelta:
    """One LoRA pair of the adapter file: the module's weight gains `scaling * B @ A` (transposed for
    GPT-2's Conv1D, which stores its weight as [in, out])."""

    a_key: str
    b_key: str
    scaling: float
    transposed: bool


@dataclass(frozen=True)
class MergedTensor:
    """One tensor of the merged checkpoint: its name there, and where its values come from (a tensor of a
    base shard or of the adapter file, plus a LoRA delta of the adapter file)."""

    name: str
    path: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    delta: LoraDelta | None = None
    delta_path: Path | None = None

    def output_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if self.dtype.is_floating_point or self.delta is not None else self.dtype

    def numel(self) -> int:
        return math.prod(self.shape)


def merge_adapter(
    base_model_path: str,
    adapter_dir: Path,
    out_dir: Path,
    *,
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
    trust_remote_code: bool = False,
) -> dict:
    """Merge the LoRA adapter into its base; save the standalone checkpoint and tokenizer at `out_dir`.

    Streams: each safetensors shard of the base is rewritten with the same name, layout and tensor
    names, one tensor at a time; a LoRA target gets `W + scaling * B @ A` in float32 (PEFT's scaling:
    alpha / sqrt(r) with rsLoRA, alpha / r otherwise), then every floating tensor is cast to `dtype`. So
    memory is one layer's weight and delta in float32, whatever the model's size, where loading the base
    through PEFT needed the whole model in float32 (28 GB for 7B parameters).

    The trained `modules_to_save` copies (embed_tokens, lm_head) replace the base weights. A base with
    tied embeddings stays tied (one tensor written, as transformers writes tied models) when its
    embedding and head come out equal, and is untied (`tie_word_embeddings=False`, the head written
    under its own name) when they were trained apart, so reloading never swaps the trained head for the
    embedding (peft PR#2972, unsloth#3444). Every module the adapter names must be in the base, and an
    adapter that is not plain LoRA (DoRA, other PEFT types) is refused: both raise before anything is
    written.

    `out_dir` appears whole or not at all: everything is written into the sibling
    `.<name>.tmp-<pid>` and renamed into place; an existing `out_dir` is replaced only on success.
    """
    from transformers import AutoConfig

    if dtype not in MERGE_DTYPES:
        raise ValueError(f"dtype must be one of {MERGE_DTYPES}, got {dtype!r}")
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    target_dtype = getattr(torch, dtype)

    base_dir = _checkpoint_dir(base_model_path, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=trust_remote_code)
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else type(quantization)
        raise ValueError(
            f"{base_model_path} is a quantized checkpoint ({method}): merge the adapter into the unquantized "
            "base it was trained on"
        )
    structure = _meta_model(config, trust_remote_code=trust_remote_code)
    shards, has_index = _base_shards(base_dir)
    shards, base_tied, tied = _merge_plan(shards, structure, adapter_dir)

    adapter_has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(
        str(adapter_dir) if adapter_has_tokenizer else base_model_path,
        trust_remote_code=trust_remote_code,
    )
    config.dtype = target_dtype
    config.architectures = [type(structure).__name__]  # as save_pretrained writes it
    if base_tied and not tied:
        config.tie_word_embeddings = False

    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A leftover from a killed merge (the stage holds out_dir, so no other writer is alive).
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp_dir.mkdir()
        for filename, tensors in shards.items():
            write_safetensors(tmp_dir / filename, tensors, target_dtype)
            logger.info("merged %s: %d tensors", filename, len(tensors))
        written = [t for tensors in shards.values() for t in tensors]
        if has_index:
            _write_index(tmp_dir / INDEX_FILE, shards, target_dtype)
        config.save_pretrained(str(tmp_dir))
        for name in ("generation_config.json", *_custom_code_files(base_dir, config)):
            if (base_dir / name).is_file():
                shutil.copyfile(base_dir / name, tmp_dir / name)
        tokenizer.save_pretrained(str(tmp_dir))
        _fsync_files(tmp_dir)
        _replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    result = {
        "path": str(out_dir),
        "dtype": dtype,
        "tied_embeddings": tied,
        "parameters": sum(t.numel() for t in written),
        "bytes": sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()),
    }
    logger.info("merged %s onto %s -> %s", adapter_dir, base_model_path, result)
    return result


def _checkpoint_dir(name: str, *, trust_remote_code: bool) -> Path:
    """The local directory of the base's files: `name` itself, or its snapshot in the Hugging Face cache
    (downloaded there by the stages before, unless offline)."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", *(["*.py"] if trust_remote_code else [])]
    return Path(snapshot_download(name, allow_patterns=patterns))


def _meta_model(config, *, trust_remote_code: bool):
    """The base's module tree on the meta device (no memory): module types (Linear or Conv1D), the
    embedding and head, and whether they are tied, as `from_pretrained` would build them."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _custom_code_files(base_dir: Path, config) -> list[str]:
    """A trust_remote_code base's modeling files, which the merged checkpoint needs as the base does."""
    return sorted(p.name for p in base_dir.glob("*.py")) if getattr(config, "auto_map", None) else []


def _base_shards(base_dir: Path) -> tuple[dict[str, list[MergedTensor]], bool]:
    """Each safetensors file of the base → its tensors (name, shape, dtype; nothing read), in the
    index's order; and whether the base has an index (several shards)."""
    from safetensors import safe_open

    index_path = base_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path)["weight_map"]
    elif (base_dir / SINGLE_FILE).is_file():
        weight_map = None
    else:
        raise FileNotFoundError(
            f"{base_dir} has no {SINGLE_FILE} or {INDEX_FILE}: only safetensors checkpoints are merged"
        )
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
    shards = {}
    for filename in files:
        path = base_dir / filename
        with safe_open(str(path), framework="pt") as handle:
            names = [k for k in handle.keys() if weight_map is None or weight_map.get(k) == filename]
            shards[filename] = [_tensor_info(handle, path, name) for name in names]
    if weight_map:
        found = {t.name for tensors in shards.values() for t in tensors}
        missing = sorted(set(weight_map) - found)
        if missing:
            raise ValueError(f"{index_path} lists tensors its shards do not hold: {missing[:5]}")
    return shards, weight_map is not None


def _tensor_info(handle, path: Path, key: str, name: str | None = None) -> MergedTensor:
    view = handle.get_slice(key)
    code = view.get_dtype()
    if code not in SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {key} has dtype {code}, which the merge does not read")
    return MergedTensor(name or key, path, key, tuple(view.get_shape()), SAFETENSORS_DTYPES[code])


def _adapter_config(adapter_dir: Path) -> dict:
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter: no adapter_config.json")
    config = read_json(config_path)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{adapter_dir} is a {peft_type} adapter; merge_adapter merges LoRA adapters only")
    options = [name for name in UNSUPPORTED_LORA_OPTIONS if config.get(name)]
    if config.get("bias", "none") != "none":
        options.append(f"bias={config['bias']!r}")
    if options:
        raise ValueError(
            f"{adapter_dir}: LoRA with {', '.join(options)} is not merged as W + scaling * B @ A; "
            "merge_adapter supports plain LoRA (and rsLoRA) adapters only"
        )
    return config


def _lora_scaling(config: dict, module: str) -> tuple[int, float]:
    """(rank, scaling) of one module as PEFT sets them (peft/tuners/lora/model.py, _create_and_replace):
    rank_pattern / alpha_pattern first, then alpha / sqrt(r) with rsLoRA, alpha / r otherwise."""
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return rank, alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern that matches the module's name from a dot to its end.
    (Re-stated, not imported: importing peft loads bitsandbytes, seconds and hundreds of MB.)"""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _adapter_tensors(adapter_dir: Path) -> tuple[Path, dict[str, dict[str, MergedTensor]], dict[str, MergedTensor]]:
    """(the adapter file, module → {"lora_A", "lora_B"} tensors, parameter → trained copy), by the
    model's names (PEFT's `base_model.model.` prefix taken off). Anything else in the file is an error."""
    from safetensors import safe_open

    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no {ADAPTER_WEIGHTS} (pickled adapters are not read)")
    loras: dict[str, dict[str, MergedTensor]] = {}
    copies: dict[str, MergedTensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            if not key.startswith(ADAPTER_PREFIX):
                raise ValueError(f"{path}: tensor {key} is not under PEFT's {ADAPTER_PREFIX!r}")
            name = key.removeprefix(ADAPTER_PREFIX)
            parts = name.split(".")
            if len(parts) >= 3 and parts[-2] in ("lora_A", "lora_B") and parts[-1] == "weight":
                loras.setdefault(".".join(parts[:-2]), {})[parts[-2]] = _tensor_info(handle, path, key, name)
            elif any(part.startswith("lora_") for part in parts):
                raise ValueError(
                    f"{path}: {key} is not a lora_A / lora_B weight (LoRA on embeddings, DoRA or another "
                    "variant); merge_adapter supports plain LoRA on Linear and Conv1D layers only"
                )
            else:  # a modules_to_save copy, saved without its `modules_to_save.<adapter>` part
                copies[name] = _tensor_info(handle, path, key, name)
    for module, pair in loras.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{path}: {module} has {sorted(pair)} but not both lora_A and lora_B")
    return path, loras, copies


def _checkpoint_name(parameter: str, names: dict[str, Any]) -> str | None:
    """The base checkpoint's name for a model parameter: the same, or the one that differs only by a
    leading prefix (checkpoints saved from the bare model lack `model.` / `transformer.`; some add one)."""
    if parameter in names:
        return parameter
    found = [n for n in names if n.endswith("." + parameter) or parameter.endswith("." + n)]
    return found[0] if len(found) == 1 else None


def _merge_plan(
    shards: dict[str, list[MergedTensor]], structure, adapter_dir: Path
) -> tuple[dict[str, list[MergedTensor]], bool, bool]:
    """What each output shard holds and where every tensor comes from; whether the base's embeddings are
    tied, and whether they stay tied. Checks everything (every adapted module found, shapes agree)
    before a byte is written."""
    from transformers.pytorch_utils import Conv1D

    config = _adapter_config(adapter_dir)
    adapter_path, loras, copies = _adapter_tensors(adapter_dir)
    located = {t.name: (filename, i) for filename, tensors in shards.items() for i, t in enumerate(tensors)}
    plan = {filename: list(tensors) for filename, tensors in shards.items()}
    modules = dict(structure.named_modules())
    parameters = dict(structure.named_parameters(remove_duplicate=False))
    embedding, head = structure.get_input_embeddings(), structure.get_output_embeddings()
    embedding_name = next(f"{n}.weight" for n, m in modules.items() if m is embedding)
    head_name = next((f"{n}.weight" for n, m in modules.items() if m is head), None)
    base_tied = head is not None and head.weight is embedding.weight
    # A tied base's checkpoint usually has no head tensor: its head is the embedding matrix.
    embedding_key = _checkpoint_name(embedding_name, located)
    if embedding_key is None:
        raise ValueError(f"the base checkpoint has no {embedding_name}")
    head_key = _checkpoint_name(head_name, located) if head_name else None
    head_source = None
    if base_tied and head_key is None:
        filename, i = located[embedding_key]
        head_source = replace(plan[filename][i], name=head_name)

    def assign(parameter: str, update) -> None:
        nonlocal head_source
        key = _checkpoint_name(parameter, located)
        if parameter == head_name and head_source is not None:
            head_source = update(head_source)
        elif key is not None:
            filename, i = located[key]
            plan[filename][i] = update(plan[filename][i])
        else:
            raise ValueError(f"the adapter in {adapter_dir} has {parameter}, which the base checkpoint does not")

    for parameter, copy in sorted(copies.items()):
        if parameter not in parameters:
            raise ValueError(
                f"the adapter in {adapter_dir} trained a copy of {parameter}, which the base "
                f"({type(structure).__name__}) has no parameter called"
            )
        if copy.shape != tuple(parameters[parameter].shape):
            raise ValueError(
                f"{adapter_path}: {parameter} is {list(copy.shape)} but the base's is "
                f"{list(parameters[parameter].shape)}"
            )
        assign(parameter, lambda base, copy=copy: replace(copy, name=base.name))

    for module_name, pair in sorted(loras.items()):
        module = modules.get(module_name)
        if module is None:
            raise ValueError(
                f"the adapter in {adapter_dir} targets {module_name}, which the base "
                f"({type(structure).__name__}) has no module called"
            )
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            raise ValueError(
                f"the adapter puts LoRA on {module_name}, a {type(module).__name__}: merge_adapter merges "
                "LoRA on Linear and Conv1D layers only"
            )
        rank, scaling = _lora_scaling(config, module_name)
        a, b = pair["lora_A"], pair["lora_B"]
        transposed = isinstance(module, Conv1D)  # weight stored [in, out]: PEFT's fan_in_fan_out
        expected = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"{adapter_path}: {module_name} has rank {a.shape[0]}, its config says {rank}")
        delta = LoraDelta(a.key, b.key, scaling, transposed)

        def add_delta(base: MergedTensor, module_name=module_name, expected=expected, delta=delta) -> MergedTensor:
            if base.shape != expected:
                raise ValueError(
                    f"{module_name}: the base weight is {list(base.shape)}, the LoRA delta {list(expected)}"
                )
            if base.delta is not None or base.path == adapter_path:
                raise ValueError(f"{module_name} has both a LoRA pair and a trained copy in the adapter")
            return replace(base, delta=delta, delta_path=adapter_path)

        assign(f"{module_name}.weight", add_delta)

    tied = False
    if base_tied:
        filename, i = located[embedding_key]
        embedding_out = plan[filename][i]
        head_out = head_source if head_source is not None else plan[located[head_key][0]][located[head_key][1]]
        tied = _same_values(embedding_out, head_out)
        if not tied and head_source is not None:
            # Trained apart: the head is written beside the embedding, under the model's own name.
            plan[filename].append(head_out)
    return plan, base_tied, tied


def _same_values(a: MergedTensor, b: MergedTensor) -> bool:
    """Whether two planned tensors hold the same values (compared a block of rows at a time)."""
    if a.delta is not None or b.delta is not None:
        return a.delta == b.delta and (a.path, a.key) == (b.path, b.key)
    if (a.path, a.key) == (b.path, b.key):
        return True
    if a.shape != b.shape:
        return False
    itemsize = max(a.dtype.itemsize, b.dtype.itemsize)  # the same rows in each block of both
    pairs = zip(_blocks(a, itemsize), _blocks(b, itemsize))
    return all(torch.equal(x.to(torch.float32), y.to(torch.float32)) for x, y in pairs)


def _blocks(tensor: MergedTensor, itemsize: int | None = None) -> Iterator[torch.Tensor]:
    """A stored tensor, whole or in blocks of rows of at most CHUNK_BYTES. The file is opened per block:
    safetensors memory-maps it, and the pages read stay resident while a handle is open."""
    from safetensors import safe_open

    row_bytes = math.prod(tensor.shape[1:]) * (itemsize or tensor.dtype.itemsize)
    if len(tensor.shape) < 2 or tensor.shape[0] * row_bytes <= CHUNK_BYTES:
        with safe_open(str(tensor.path), framework="pt") as handle:
            yield handle.get_tensor(tensor.key)
        return
    rows = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, tensor.shape[0], rows):
        with safe_open(str(tensor.path), framework="pt") as handle:
            yield handle.get_slice(tensor.key)[start : start + rows]


def _merged_weight(tensor: MergedTensor) -> torch.Tensor:
    """`W + (B @ A) * scaling` in float32, as PEFT's merge computes it (same operations, same order: the
    same bits), transposed for Conv1D."""
    from safetensors import safe_open

    delta = tensor.delta
    with safe_open(str(tensor.delta_path), framework="pt") as handle:
        lora_a = handle.get_tensor(delta.a_key).to(torch.float32)
        lora_b = handle.get_tensor(delta.b_key).to(torch.float32)
    merged = lora_b @ lora_a
    if delta.transposed:
        merged = merged.T
    merged.mul_(delta.scaling)
    with safe_open(str(tensor.path), framework="pt") as handle:
        merged.add_(handle.get_tensor(tensor.key))  # W + d == d + W bit for bit; no float32 copy of W
    return merged


def write_safetensors(path: Path, tensors: list[MergedTensor], dtype: torch.dtype) -> None:
    """Write one safetensors file, tensor by tensor (block by block), casting floating tensors to `dtype`.

    The header is known before any value is read (names, shapes, output dtypes), so no more than one
    tensor (or block of rows) is ever in memory. Same layout as `safetensors.torch.save_file`: tensors
    ordered by element size (largest first, so every one is aligned), then name; the header padded with
    spaces to 8 bytes. (save_file also orders dtypes of one size; a merged shard has one floating dtype.)
    """
    order = sorted(tensors, key=lambda t: (-t.output_dtype(dtype).itemsize, t.name))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in order:
        size = tensor.numel() * tensor.output_dtype(dtype).itemsize
        header[tensor.name] = {
            "dtype": SAFETENSORS_CODES[tensor.output_dtype(dtype)],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for tensor in order:
            blocks = [_merged_weight(tensor)] if tensor.delta is not None else _blocks(tensor)
            size = 0
            for block in blocks:
                data = block.to(tensor.output_dtype(dtype)).contiguous().reshape(-1).view(torch.uint8).numpy()
                handle.write(data)
                size += data.nbytes
            start, end = header[tensor.name]["data_offsets"]
            if size != end - start:
                raise RuntimeError(f"{path}: wrote {size} bytes for {tensor.name}, expected {end - start}")


def _write_index(path: Path, shards: dict[str, list[MergedTensor]], dtype: torch.dtype) -> None:
    tensors = [(filename, t) for filename, ts in shards.items() for t in ts]
    index = {
        "metadata": {
            "total_parameters": sum(t.numel() for _, t in tensors),
            "total_size": sum(t.numel() * t.output_dtype(dtype).itemsize for _, t in tensors),
        },
        "weight_map": {t.name: filename for filename, t in sorted(tensors, key=lambda item: item[1].name)},
    }
    path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


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
