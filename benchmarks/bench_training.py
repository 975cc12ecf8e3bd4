"""Benchmark the cpt training step against a plain Hugging Face Trainer + PEFT QLoRA step: tokens/s and peak memory.

Same model, same seeded token batch, each side in a fresh process.
Prints a table, then as the last line one JSON object:
  python benchmarks/bench_training.py [--model auto|tiny|1b] [--vocab 32000] [--batch 8] [--seq-len 256]
      [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

# Targets from the kernels issue: ours / HF.
SPEED_TARGET = 1.5  # tokens/s at least this many times HF's
MEMORY_TARGET = 0.6  # peak memory at most this fraction of HF's
MiB = 2**20
SIDES = {"cptflow": "cptflow cpt step", "hf": "HF Trainer + PEFT QLoRA"}

# TinyLlama-1.1B's shape (hidden 2048, 22 layers, GQA 32/4 heads, SwiGLU 5632), randomly initialised:
# speed and memory do not depend on the weights, and nothing is downloaded.
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


# --- memory ------------------------------------------------------------------------------------


def rss_mib() -> float:
    """Resident set size now (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- the model and the batch --------------------------------------------------------------------


def build_random_llama(directory: Path, vocab: int, layers: int | None, dtype: torch.dtype) -> Path:
    """A randomly initialised Llama of TinyLlama-1.1B's shape, saved as safetensors (no tokenizer:
    the benchmark feeds token ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(LLAMA_1B, num_hidden_layers=layers or LLAMA_1B["num_hidden_layers"])
    config = LlamaConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, **shape)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialised in the compute dtype: no fp32 copy of 1B params
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def token_batch(vocab: int, batch: int, seq_len: int, seed: int, device: str) -> dict:
    """Seeded random token ids; labels = input_ids (both sides shift by one inside)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    return {"input_ids": ids.to(device), "labels": ids.clone().to(device)}


def training_config(args):
    """cpt's defaults (NF4, rsLoRA r=128 on all 7 linear, fp32 embed/head copies, 8-bit AdamW with
    32-bit embedding state, gradient checkpointing, kernels auto); only batch and steps are ours."""
    from cptflow.training import TrainingConfig

    return TrainingConfig(device=args.device, micro_batch_size=args.batch, max_steps=args.warmup + args.steps)


def import_everything() -> None:
    """Both children import the same libraries before the model exists, so their pre-model RSS matches."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers
    from transformers import Trainer, TrainingArguments  # noqa: F401

    import cptflow.kernels  # noqa: F401
    import cptflow.tasks.cpt  # noqa: F401
    from cptflow import training  # noqa: F401

    transformers.logging.set_verbosity_error()


# --- the two sides, each run in its own process --------------------------------------------------


def run_cptflow(args, model_path: str) -> dict:
    """Exactly the cpt stage's calls: load_base_model -> add_adapters -> kernels -> optimizer -> train_step."""
    from cptflow.training import (
        add_adapters,
        apply_kernel_patches,
        build_optimizer,
        build_scheduler,
        fused_loss_for,
        load_base_model,
        set_seed,
        train_step,
    )

    tcfg = training_config(args)
    total = args.warmup + args.steps
    set_seed(args.seed)
    model = load_base_model(model_path, tcfg)
    model = add_adapters(model, tcfg, seed=args.seed)
    kernel_report = apply_kernel_patches(model, tcfg)
    fused_loss = fused_loss_for(model, tcfg)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, total)
    model.train()
    batch = token_batch(model.config.vocab_size, args.batch, args.seq_len, args.seed, args.device)
    model_ready_rss = rss_mib()

    seconds, cpu_seconds, losses = [], [], []
    for _ in range(total):
        sync(args.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        record = train_step(model, optimizer, scheduler, [batch], tcfg, fused_loss=fused_loss)
        sync(args.device)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
        losses.append(record["loss"])
    return {
        "step_seconds": seconds,
        "step_cpu_seconds": cpu_seconds,
        "losses": losses,
        "model_ready_rss_mib": model_ready_rss,
        "kernels": kernel_report,
        "fused_linear_cross_entropy": fused_loss is not None,
        "optimizer": "bnb AdamW8bit, 32-bit state for embed_tokens/lm_head",
    }


def run_hf(args, model_path: str) -> dict:
    """The usual QLoRA recipe: BitsAndBytesConfig -> prepare_model_for_kbit_training -> LoraConfig
    (same r/alpha/rsLoRA/targets, embed_tokens and lm_head in modules_to_save) -> Trainer."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

    from cptflow.models import pick_dtype
    from cptflow.training import lora_targets

    tcfg = training_config(args)
    total = args.warmup + args.steps
    compute_dtype = pick_dtype(tcfg.compute_dtype, args.device)
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=compute_dtype,
        use_safetensors=True,
        device_map={"": args.device},
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        ),
    )
    model.config.use_cache = False
    # Non-reentrant checkpointing on both sides, so the comparison is not about the checkpointing mode.
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    torch.manual_seed(args.seed)  # the same LoRA A init as add_adapters
    model = get_peft_model(
        model,
        LoraConfig(
            r=tcfg.lora.r,
            lora_alpha=tcfg.lora.alpha,
            lora_dropout=tcfg.lora.dropout,
            use_rslora=tcfg.lora.rslora,
            target_modules=lora_targets(model, tcfg)[0],  # the same layers as ours
            modules_to_save=["embed_tokens", "lm_head"],
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    batch = token_batch(model.config.vocab_size, args.batch, args.seq_len, args.seed, "cpu")
    # One epoch = one step over the same rows as ours (the sampler only reorders them).
    rows = [{"input_ids": batch["input_ids"][i], "labels": batch["labels"][i]} for i in range(args.batch)]

    class StepTimer(TrainerCallback):
        """Times forward + backward + clip + optimizer + scheduler, as ours; data loading falls outside."""

        def __init__(self):
            self.seconds, self.cpu_seconds = [], []

        def on_step_begin(self, *_, **__):
            sync(args.device)
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            sync(args.device)
            self.seconds.append(time.perf_counter() - self.started)
            self.cpu_seconds.append(time.process_time() - self.cpu_started)

    class LossRecordingTrainer(Trainer):
        """Trainer, keeping each micro-step's loss (Trainer only reports it averaged at logging steps)."""

        step_losses: list = []

        def training_step(self, *a, **kw):
            loss = super().training_step(*a, **kw)
            self.step_losses.append(loss)
            return loss

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="bench-training-hf-") as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=args.batch,
            max_steps=total,
            learning_rate=tcfg.learning_rate,
            weight_decay=tcfg.weight_decay,
            lr_scheduler_type="cosine",
            warmup_steps=tcfg.warmup_ratio,  # a float below 1 is a ratio of max_steps
            max_grad_norm=tcfg.max_grad_norm,
            optim=args.hf_optim,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            bf16=compute_dtype == torch.bfloat16,
            fp16=compute_dtype == torch.float16,
            use_cpu=args.device == "cpu",
            report_to=[],
            save_strategy="no",
            eval_strategy="no",
            logging_steps=10**6,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=True,
            seed=args.seed,
        )
        trainer = LossRecordingTrainer(model=model, args=training_args, train_dataset=rows, callbacks=[timer])
        model_ready_rss = rss_mib()
        trainer.train()
    return {
        "step_seconds": timer.seconds,
        "step_cpu_seconds": timer.cpu_seconds,
        "losses": [float(loss) for loss in trainer.step_losses],
        "model_ready_rss_mib": model_ready_rss,
        "optimizer": args.hf_optim,
    }


def child(args) -> None:
    torch.set_num_threads(args.threads)
    import_everything()
    gc.collect()
    pre_model_rss = rss_mib()
    result = (run_cptflow if args.child == "cptflow" else run_hf)(args, args.model_path)
    seconds = result["step_seconds"][args.warmup :]
    tokens = args.batch * args.seq_len * len(seconds)
    if args.device.startswith("cuda"):
        memory = {
            "memory_kind": "torch.cuda.max_memory_reserved",
            "peak_mib": torch.cuda.max_memory_reserved() / MiB,
            "peak_allocated_mib": torch.cuda.max_memory_allocated() / MiB,
            "peak_over_pre_model_mib": torch.cuda.max_memory_reserved() / MiB,
        }
    else:
        peak = peak_rss_mib()
        memory = {
            "memory_kind": "process peak RSS (getrusage ru_maxrss)",
            "peak_mib": peak,
            "pre_model_rss_mib": pre_model_rss,
            "peak_over_pre_model_mib": peak - pre_model_rss,
        }
    print(
        json.dumps(
            {
                "side": args.child,
                "tokens_per_s": tokens / sum(seconds),
                # Process CPU time: what a busy shared machine inflates least (with --threads 1 it is the work done).
                "tokens_per_cpu_s": tokens / sum(result["step_cpu_seconds"][args.warmup :]),
                "measured_steps": len(seconds),
                "first_step_loss": result["losses"][0],
                **memory,
                **{k: v for k, v in result.items() if k != "losses"},
                "losses": result["losses"],
            }
        )
    )


# --- parent: build the model, run both sides, print the table ------------------------------------


def run_side(side: str, args, model_path: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--model-path",
        model_path,
        "--device",
        args.device,
        "--batch",
        str(args.batch),
        "--seq-len",
        str(args.seq_len),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--hf-optim",
        args.hf_optim,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"{side} child failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    return result


def verdict(ratio: float, target: float, at_least: bool) -> str:
    met = ratio >= target if at_least else ratio <= target
    return f"{'>=' if at_least else '<='} {target}: {'met' if met else 'NOT met'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument(
        "--model",
        default="auto",
        choices=("auto", "tiny", "1b"),
        help="tiny = builtin:tiny-llama; 1b = random TinyLlama-1.1B-shaped Llama (auto: tiny on CPU, 1b on CUDA)",
    )
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary of the 1b model (128256: Llama-3's)")
    parser.add_argument("--layers", type=int, default=None, help="override the 1b model's 22 layers (smoke runs)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default CPU 256, CUDA 2048)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured steps first (default CPU 2, CUDA 3)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved runs per side, the fastest counts (default CPU 2, CUDA 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all cores)")
    parser.add_argument(
        "--hf-optim",
        default="adamw_bnb_8bit",
        help="the baseline's TrainingArguments.optim; paged_adamw_8bit keeps its state in CUDA "
        "managed memory, which max_memory_reserved does not count",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--child", choices=tuple(SIDES), help=argparse.SUPPRESS)
    parser.add_argument(
        "--model-path", help="a from_pretrained directory to benchmark instead of --model (fed token ids: no tokenizer)"
    )
    args = parser.parse_args()

    from cptflow.models import pick_device, pick_dtype

    args.device = pick_device(args.device)
    cuda = args.device.startswith("cuda")
    args.threads = args.threads or os.cpu_count() or 1
    args.batch = args.batch or 8
    args.seq_len = args.seq_len or (2048 if cuda else 256)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 2)
    args.repeats = args.repeats or (1 if cuda else 2)
    if args.child:
        child(args)
        return
    model = args.model if args.model != "auto" else ("1b" if cuda else "tiny")

    with tempfile.TemporaryDirectory(prefix="bench-training-model-") as tmp:
        if args.model_path:  # scripts/gpu_check.py's dry run: a tiny random Llama of its own
            model_path = model_label = args.model_path
        elif model == "tiny":
            from cptflow.models import resolve_model_path

            model_path = resolve_model_path("builtin:tiny-llama")
            model_label = "builtin:tiny-llama"
        else:
            build_start = time.perf_counter()
            model_path = str(build_random_llama(Path(tmp), args.vocab, args.layers, pick_dtype("auto", args.device)))
            layers = args.layers or LLAMA_1B["num_hidden_layers"]
            model_label = f"random Llama h2048 x {layers} layers, vocab {args.vocab}"
            print(f"built {model_label} in {time.perf_counter() - build_start:.0f} s", file=sys.stderr)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path)
        # Interleaved repeats, the fastest run of each side counts: other jobs on a shared machine only
        # ever slow a run down (bench_tokenize does the same).
        runs = {side: [] for side in SIDES}
        for _ in range(args.repeats):
            for side in SIDES:
                runs[side].append(run_side(side, args, model_path))
        results = {side: max(found, key=lambda r: r["tokens_per_s"]) for side, found in runs.items()}
        for side, found in runs.items():
            results[side]["tokens_per_s_all_repeats"] = [round(r["tokens_per_s"], 1) for r in found]

    ours, hf = results["cptflow"], results["hf"]
    speed_ratio = ours["tokens_per_s"] / hf["tokens_per_s"]
    peak_ratio = ours["peak_mib"] / hf["peak_mib"]
    extra_ratio = ours["peak_over_pre_model_mib"] / hf["peak_over_pre_model_mib"]
    cpu_time_ratio = ours["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"]
    loss_diff = abs(ours["first_step_loss"] - hf["first_step_loss"])
    device_label = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} torch threads"
    memory_label = "max_memory_reserved MiB" if cuda else "peak RSS MiB"

    print(
        f"{model_label} (hidden {config.hidden_size}, {config.num_hidden_layers} layers, vocab {config.vocab_size}), "
        f"{device_label}; batch {args.batch} x seq_len {args.seq_len}, "
        f"{args.steps} steps measured after {args.warmup}, "
        f"fastest of {args.repeats} interleaved runs per side"
    )
    print(
        f"ours: {json.dumps(ours['kernels'])}, fused linear+CE: {ours['fused_linear_cross_entropy']}; "
        f"HF optim: {args.hf_optim}. Each side in a fresh process."
    )
    if not cuda:
        print(
            "memory: process peak RSS (ru_maxrss) and its rise over the RSS once all libraries are imported "
            f"(before the model; {ours['pre_model_rss_mib']:.0f} / {hf['pre_model_rss_mib']:.0f} MiB)"
        )
    over_label = "above pre-model MiB"
    print(f"{'side':<26}{'tokens/s':>10}{memory_label:>26}{over_label:>22}{'first-step loss':>18}")
    for side, r in results.items():
        print(
            f"{SIDES[side]:<26}{r['tokens_per_s']:>10.0f}{r['peak_mib']:>26.0f}"
            f"{r['peak_over_pre_model_mib']:>22.0f}{r['first_step_loss']:>18.6f}"
        )
    print(f"{'ratio ours/HF':<26}{speed_ratio:>9.2f}x{peak_ratio:>25.2f}x{extra_ratio:>21.2f}x{loss_diff:>18.2e}")
    print(
        f"tokens/s {speed_ratio:.2f}x ({verdict(speed_ratio, SPEED_TARGET, True)}); "
        f"peak memory {peak_ratio:.2f}x ({verdict(peak_ratio, MEMORY_TARGET, False)}), "
        f"above pre-model {extra_ratio:.2f}x ({verdict(extra_ratio, MEMORY_TARGET, False)}); "
        f"first-step loss |difference| {loss_diff:.2e}"
    )
    for side, r in results.items():
        print(
            f"{SIDES[side]}: tokens/s of each run {r['tokens_per_s_all_repeats']}, "
            f"median step {statistics.median(r['step_seconds'][args.warmup :]):.3f} s, "
            f"tokens per CPU-second {r['tokens_per_cpu_s']:.0f}"
        )
    print(f"tokens per CPU-second ours/HF {cpu_time_ratio:.2f}x")
    if loss_diff > 1e-3 * abs(hf["first_step_loss"]):
        print("WARNING: the two sides' first-step losses disagree", file=sys.stderr)

    summary = {
        "benchmark": "training_step",
        "device": device_label,
        "model": model_label,
        "vocab": config.vocab_size,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "ours_tokens_per_s": round(ours["tokens_per_s"], 1),
        "hf_tokens_per_s": round(hf["tokens_per_s"], 1),
        "speedup": round(speed_ratio, 3),
        "speedup_cpu_time": round(cpu_time_ratio, 3),
        "ours_peak_mib": round(ours["peak_mib"], 1),
        "hf_peak_mib": round(hf["peak_mib"], 1),
        "memory_ratio": round(peak_ratio, 3),
        "ours_peak_over_pre_model_mib": round(ours["peak_over_pre_model_mib"], 1),
        "hf_peak_over_pre_model_mib": round(hf["peak_over_pre_model_mib"], 1),
        "memory_ratio_over_pre_model": round(extra_ratio, 3),
        "ours_first_step_loss": ours["first_step_loss"],
        "hf_first_step_loss": hf["first_step_loss"],
        "speed_target_met": speed_ratio >= SPEED_TARGET,
        "memory_target_met": peak_ratio <= MEMORY_TARGET,
    }
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "sides": results}, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
