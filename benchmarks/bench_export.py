"""Benchmark the streaming merge (`cptflow.export.merge_adapter`) against the in-memory merge it replaced
(the base loaded in float32 through PEFT, `merge_and_unload`, cast, `save_pretrained`): peak RSS and time.

Random Llamas of real shapes (TinyLlama 1.1B at 2 / 4 / 8 / 22 layers, Llama 3.2 3B cut to a few layers),
saved in bf16 as safetensors shards under a temporary directory, with a rank-128 rsLoRA adapter on every
linear layer of the blocks and trained fp32 copies of embed_tokens / lm_head, as the cpt stage makes.
Every step (build, adapter, each merge, the comparison) runs in its own process, one at a time; peak
memory is the child's own ru_maxrss. The two merged checkpoints are compared tensor by tensor.
Prints a table, then as the last line one JSON object:
  python benchmarks/bench_export.py [--cases 1.1b-2l,1.1b-4l,1.1b-8l,1.1b,3b-4l] [--rank 128]
      [--max-shard-size 1GB] [--dtype bfloat16] [--work /tmp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MiB = 2**20
GiB = 2**30
# Target from issue 15: the streaming merge's peak at most this fraction of the in-memory merge's, at 1.1B.
MEMORY_TARGET = 0.25
TARGET_CASE = "1.1b"

TINYLLAMA = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    tie_word_embeddings=False,
)
LLAMA_3B = dict(
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=True,
)
CASES = {
    "1.1b-2l": dict(TINYLLAMA, num_hidden_layers=2),
    "1.1b-4l": dict(TINYLLAMA, num_hidden_layers=4),
    "1.1b-8l": dict(TINYLLAMA, num_hidden_layers=8),
    "1.1b": TINYLLAMA,
    "3b-2l": dict(LLAMA_3B, num_hidden_layers=2),
    "3b-4l": dict(LLAMA_3B, num_hidden_layers=4),
}
DEFAULT_CASES = "1.1b-2l,1.1b-4l,1.1b-8l,1.1b,3b-4l"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def parameter_count(shape: dict) -> int:
    h, i, n, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * block + v * h * (1 if shape["tie_word_embeddings"] else 2) + h


# --- the children ------------------------------------------------------------------------------


def child_build(base_dir: Path, shape: dict, max_shard_size: str) -> dict:
    """A randomly initialised Llama of `shape`, built and saved in bf16 (no float32 copy), with a small
    BPE tokenizer (the merge copies a tokenizer; its vocabulary does not matter here)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cptflow.tiny_model import TinyLlamaSpec, train_tokenizer

    config = LlamaConfig(max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **shape)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(base_dir, max_shard_size=max_shard_size)
    texts = ["the merged model keeps the trained embeddings and the adapter deltas"] * 50
    train_tokenizer(texts, TinyLlamaSpec(vocab_size=300)).save_pretrained(base_dir)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def child_adapter(base_dir: Path, adapter_dir: Path, rank: int, tied: bool) -> dict:
    """The cpt stage's adapter: rsLoRA r=`rank`, alpha 32 on every linear layer of the blocks, fp32 trained
    copies of embed_tokens / lm_head (one tensor for a tied base); B and the copies perturbed, as after
    training, so every delta and copy is real."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16, use_safetensors=True)
    config = LoraConfig(
        r=rank,
        lora_alpha=32,
        use_rslora=True,
        lora_dropout=0.0,
        target_modules=TARGETS,
        modules_to_save=["embed_tokens", "lm_head"],
        ensure_weight_tying=tied,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(1)
    seen = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
            elif "modules_to_save" in name:  # the cpt stage trains these copies in float32
                param.data = param.data.float() + torch.randn(param.shape, generator=generator) * 0.01
    model.save_pretrained(adapter_dir)
    return {"adapter_bytes": (adapter_dir / "adapter_model.safetensors").stat().st_size}


def merge_in_memory(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str) -> dict:
    """The baseline: cptflow's merge before issue 15, as it was (base in float32 through PEFT,
    merge_and_unload, cast, save_pretrained)."""
    import torch
    from peft import PeftModel
    from peft.utils import ModulesToSaveWrapper
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    adapter_name = model.active_adapter
    trained_copies = {
        name: module.modules_to_save[adapter_name].weight
        for name, module in model.get_base_model().named_modules()
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save
    }
    merged = model.merge_and_unload()
    for name, weight in trained_copies.items():
        if not torch.equal(merged.get_submodule(name).weight, weight):
            raise RuntimeError(f"merge_and_unload dropped the trained {name}")
    merged = merged.to(getattr(torch, dtype)).eval()
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return {"tied_embeddings": bool(merged.config.tie_word_embeddings)}


def child_merge(side: str, base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str) -> dict:
    import torch  # noqa: F401  (imports first: their memory is reported apart)
    import transformers  # noqa: F401

    from cptflow.export import merge_adapter

    imported = rss_mib()
    started = time.perf_counter()
    if side == "streaming":
        result = merge_adapter(str(base_dir), adapter_dir, out_dir, dtype=dtype)
        tied = result["tied_embeddings"]
    else:
        import peft  # noqa: F401

        imported = rss_mib()
        tied = merge_in_memory(base_dir, adapter_dir, out_dir, dtype)["tied_embeddings"]
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "rss_after_imports_mib": round(imported, 1),
        "tied_embeddings": tied,
    }


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    files = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            files.update({key: path for key in handle.keys()})
    return files


def child_compare(streaming_dir: Path, in_memory_dir: Path) -> dict:
    """Both checkpoints tensor by tensor (one tensor of each in memory at a time)."""
    import torch
    from safetensors import safe_open

    ours, theirs = _tensor_files(streaming_dir), _tensor_files(in_memory_dir)
    identical, max_abs_diff, different = 0, 0.0, []
    for name, path in sorted(ours.items()):
        if name not in theirs:
            different.append(name)
            continue
        with safe_open(str(path), framework="pt") as a, safe_open(str(theirs[name]), framework="pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
            if x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y):
                identical += 1
            else:
                different.append(name)
                if x.shape == y.shape:
                    max_abs_diff = max(max_abs_diff, (x.float() - y.float()).abs().max().item())
    return {
        "tensors": len(ours),
        "identical": identical,
        "different": different[:10],
        "max_abs_diff": max_abs_diff,
        "only_in_memory_merge": sorted(set(theirs) - set(ours)),
        "shards": [len({p.name for p in ours.values()}), len({p.name for p in theirs.values()})],
    }


def run_child(role: str, **kwargs) -> dict:
    """Run one step in a fresh process; its JSON result, with its own peak RSS."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", role, json.dumps(kwargs, default=str)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{role} failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main_child(role: str, kwargs: dict) -> None:
    paths = {k: Path(v) for k, v in kwargs.items() if k.endswith("_dir")}
    other = {k: v for k, v in kwargs.items() if not k.endswith("_dir")}
    result = {
        "build": child_build,
        "adapter": child_adapter,
        "merge": child_merge,
        "compare": child_compare,
    }[role](**paths, **other)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    print(json.dumps(result))


# --- the parent --------------------------------------------------------------------------------


def run_case(name: str, shape: dict, args, work: Path) -> dict:
    case_dir = work / name
    base_dir, adapter_dir = case_dir / "base", case_dir / "adapter"
    streaming_dir, in_memory_dir = case_dir / "merged-streaming", case_dir / "merged-in-memory"
    params = parameter_count(shape)
    print(f"[{name}] {params / 1e9:.2f}B parameters: building base and adapter", file=sys.stderr, flush=True)
    try:
        run_child("build", base_dir=base_dir, shape=shape, max_shard_size=args.max_shard_size)
        adapter = run_child(
            "adapter", base_dir=base_dir, adapter_dir=adapter_dir, rank=args.rank, tied=shape["tie_word_embeddings"]
        )
        row = {
            "case": name,
            "parameters": params,
            "layers": shape["num_hidden_layers"],
            "base_shards": len(list(base_dir.glob("*.safetensors"))),
            "base_bytes": sum(p.stat().st_size for p in base_dir.glob("*.safetensors")),
            "adapter_bytes": adapter["adapter_bytes"],
        }
        print(f"[{name}] streaming merge", file=sys.stderr, flush=True)
        row["streaming"] = run_child(
            "merge",
            side="streaming",
            base_dir=base_dir,
            adapter_dir=adapter_dir,
            out_dir=streaming_dir,
            dtype=args.dtype,
        )
        # The in-memory merge holds the float32 model, PEFT's copies and the cast copy at once.
        needed = params * (4 + 2) + 2 * adapter["adapter_bytes"] + 2 * GiB
        if available_bytes() < needed:
            row["in_memory"] = None
            row["note"] = f"in-memory merge skipped: needs ~{needed / GiB:.1f} GiB, {available_bytes() / GiB:.1f} free"
            return row
        print(f"[{name}] in-memory merge (baseline)", file=sys.stderr, flush=True)
        row["in_memory"] = run_child(
            "merge",
            side="in_memory",
            base_dir=base_dir,
            adapter_dir=adapter_dir,
            out_dir=in_memory_dir,
            dtype=args.dtype,
        )
        row["compare"] = run_child("compare", streaming_dir=streaming_dir, in_memory_dir=in_memory_dir)
        row["memory_ratio"] = round(row["streaming"]["peak_rss_mib"] / row["in_memory"]["peak_rss_mib"], 3)
        return row
    finally:
        shutil.rmtree(case_dir, ignore_errors=True)


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'case':<8} {'params':>7} {'layers':>6} {'shards':>6} {'in-memory peak':>15} {'streaming peak':>15} "
        f"{'ratio':>6} {'in-mem s':>8} {'stream s':>8}  tensors identical"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        stream, old = row["streaming"], row.get("in_memory")
        old_peak = f"{old['peak_rss_mib']:,.0f} MiB" if old else "skipped"
        ratio = f"{row['memory_ratio']:.3f}" if old else "-"
        compare = row.get("compare")
        same = f"{compare['identical']}/{compare['tensors']}" if compare else "-"
        if compare and compare["different"]:
            same += f" (max abs diff {compare['max_abs_diff']:.3g})"
        print(
            f"{row['case']:<8} {row['parameters'] / 1e9:>6.2f}B {row['layers']:>6} {row['base_shards']:>6} "
            f"{old_peak:>15} {stream['peak_rss_mib']:>11,.0f} MiB {ratio:>6} "
            f"{(old['seconds'] if old else float('nan')):>8.1f} {stream['seconds']:>8.1f}  {same}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank (the cpt default)")
    parser.add_argument("--max-shard-size", default="1GB", help="shard size of the saved base")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--work", default=tempfile.gettempdir(), help="where the random models are written")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        main_child(args.child[0], json.loads(args.child[1]))
        return

    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    work = Path(tempfile.mkdtemp(prefix="cptflow-bench-export-", dir=args.work))
    try:
        rows = [run_case(name, CASES[name], args, work) for name in names]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    target = next((r for r in rows if r["case"] == TARGET_CASE and r.get("in_memory")), None)
    summary = {
        "benchmark": "export_streaming_merge_vs_in_memory",
        "rank": args.rank,
        "dtype": args.dtype,
        "max_shard_size": args.max_shard_size,
        "rows": rows,
        "target_case": TARGET_CASE,
        "memory_ratio": target["memory_ratio"] if target else None,
        "target": MEMORY_TARGET,
        "meets_target": bool(target and target["memory_ratio"] <= MEMORY_TARGET),
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
