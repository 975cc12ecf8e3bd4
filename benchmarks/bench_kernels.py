"""Benchmark kernels/ against eager PyTorch: memory and time, ours vs eager side by side, with ratios.

CUDA present: every kernel, bf16, hidden 4096. Otherwise the chunked fused loss's CPU memory. One JSON line last:
  python benchmarks/bench_kernels.py [--device auto|cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cptflow.kernels import fused_linear_cross_entropy, rms_norm, rms_norm_reference, swiglu  # noqa: E402

# Targets from the kernels issue: ours / eager for memory, eager / ours for speed.
FUSED_MEMORY_TARGET = 0.3
FUSED_TIME_TARGET = 1.0
RMS_NORM_SPEEDUP_TARGET = 3.0
SWIGLU_SPEEDUP_TARGET = 1.5
MiB = 2**20


def eager_loss(hidden, weight, labels):
    """What a Hugging Face causal LM does: full logits, upcast to fp32, cross-entropy."""
    return F.cross_entropy(F.linear(hidden, weight).float(), labels)


def fused_loss(hidden, weight, labels):
    return fused_linear_cross_entropy(hidden, weight, labels)


def fused_loss_weight_dtype_accumulation(hidden, weight, labels):
    return fused_linear_cross_entropy(hidden, weight, labels, accumulate_fp32=False)


LOSSES = {"eager": eager_loss, "fused": fused_loss}
# bf16 weights only: the gradient summed over chunks in bf16 inside the GEMM instead of in fp32.
CUDA_LOSSES = {**LOSSES, "fused_bf16_acc": fused_loss_weight_dtype_accumulation}


def loss_inputs(tokens, hidden, vocab, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
    # In place: a temporary [vocab, hidden] copy would raise the CPU baseline's peak RSS.
    w = torch.randn(vocab, hidden, generator=gen).div_(hidden**0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[::10] = -100  # padding / document-boundary tokens, as in packed CPT batches
    return x, w, labels.to(device)


# --- CPU: one fresh process per variant, peak RSS ------------------------------------------------


def rss_mib() -> float:
    """Resident set size now (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_child(args) -> None:
    """Inputs, then one forward+backward: prints how far the peak RSS rose above the inputs' RSS."""
    torch.set_num_threads(args.threads)
    x, w, labels = loss_inputs(args.tokens, args.hidden, args.vocab, torch.float32, "cpu")
    setup_rss = rss_mib()
    start = time.perf_counter()
    loss = LOSSES[args.child](x, w, labels)
    loss.backward()
    first_s = time.perf_counter() - start
    peak = peak_rss_mib()
    repeat_s = []
    for _ in range(args.repeats):
        x.grad = w.grad = None
        start = time.perf_counter()
        LOSSES[args.child](x, w, labels).backward()
        repeat_s.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "variant": args.child,
                "loss": loss.item(),
                "setup_rss_mib": setup_rss,
                # ru_maxrss also covers start-up: measured from the RSS now, a start-up peak can only make
                # `extra` larger (conservative), never hide what the loss allocated.
                "extra_peak_mib": peak - setup_rss,
                "seconds": statistics.median(repeat_s) if repeat_s else first_s,
                "first_seconds": first_s,
            }
        )
    )


def run_cpu(args) -> dict:
    results = {}
    for variant in ("eager", "fused"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            variant,
            "--tokens",
            str(args.tokens),
            "--hidden",
            str(args.hidden),
            "--vocab",
            str(args.vocab),
            "--threads",
            str(args.threads),
            "--repeats",
            str(args.repeats),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    eager, fused = results["eager"], results["fused"]
    memory_ratio = fused["extra_peak_mib"] / eager["extra_peak_mib"]
    time_ratio = fused["seconds"] / eager["seconds"]
    loss_diff = abs(fused["loss"] - eager["loss"])
    full_logits_mib = args.tokens * args.vocab * 4 / MiB

    print(
        f"fused linear+cross-entropy, CPU fp32: {args.tokens} tokens x hidden {args.hidden} x vocab "
        f"{args.vocab} (full logits would be {full_logits_mib:.0f} MiB), torch threads {args.threads}"
    )
    print(
        "memory: each variant in a fresh process; peak RSS (getrusage ru_maxrss) during one forward+backward "
        "minus the RSS once inputs exist (both include the weight gradient)"
    )
    print(f"{'variant':<8}{'extra peak MiB':>16}{'seconds':>10}{'loss':>22}")
    for label, r in (("eager", eager), ("fused", fused)):
        print(f"{label:<8}{r['extra_peak_mib']:>16.0f}{r['seconds']:>10.2f}{r['loss']:>22.10f}")
    print(
        f"memory ratio fused/eager {memory_ratio:.3f} (target <= {FUSED_MEMORY_TARGET}), "
        f"time ratio {time_ratio:.2f}, loss |difference| {loss_diff:.2e}"
    )
    if memory_ratio > FUSED_MEMORY_TARGET or loss_diff > 1e-4 * abs(eager["loss"]):
        print("WARNING: fused loss misses its memory target or disagrees with eager", file=sys.stderr)
    return {
        "benchmark": "kernels_cpu",
        "tokens": args.tokens,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "eager_extra_peak_mib": round(eager["extra_peak_mib"], 1),
        "fused_extra_peak_mib": round(fused["extra_peak_mib"], 1),
        "memory_ratio": round(memory_ratio, 4),
        "eager_s": round(eager["seconds"], 3),
        "fused_s": round(fused["seconds"], 3),
        "time_ratio": round(time_ratio, 3),
        "eager_loss": eager["loss"],
        "fused_loss": fused["loss"],
        "loss_abs_diff": loss_diff,
    }


# --- CUDA: events for time, max_memory_allocated for memory -------------------------------------


def cuda_measure(step, reset, warmup: int, repeats: int) -> tuple[float, float]:
    """(median ms, peak MiB allocated above what existed before) of step() = forward + backward."""
    for _ in range(warmup):
        reset()
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        reset()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / MiB
    reset()
    return statistics.median(times), peak


def run_cuda(args) -> dict:
    dtype, hidden = torch.bfloat16, 4096
    vocabs = [32000] if args.quick else [32000, 128256]
    token_counts = [8192] if args.quick else [8192, 16384]
    rows, records = [], []

    def record(kernel, shape, ours, eager, target, kind, parity):
        (ours_ms, ours_mib), (eager_ms, eager_mib) = ours, eager
        speedup, memory_ratio = eager_ms / ours_ms, ours_mib / eager_mib
        if kind == "memory":  # fused loss: memory <= target at time <= FUSED_TIME_TARGET x eager
            ok = memory_ratio <= target and ours_ms / eager_ms <= FUSED_TIME_TARGET
            target_text = f"mem<={target} time<={FUSED_TIME_TARGET}"
        else:
            ok = speedup >= target
            target_text = f"speedup>={target}"
        rows.append(
            (
                kernel,
                shape,
                ours_ms,
                eager_ms,
                speedup,
                ours_mib,
                eager_mib,
                memory_ratio,
                target_text,
                "yes" if ok else "NO",
                parity,
            )
        )
        records.append(
            {
                "kernel": kernel,
                "shape": shape,
                "ours_ms": round(ours_ms, 3),
                "eager_ms": round(eager_ms, 3),
                "speedup": round(speedup, 3),
                "ours_mib": round(ours_mib, 1),
                "eager_mib": round(eager_mib, 1),
                "memory_ratio": round(memory_ratio, 4),
                "ok": ok,
                "max_rel_diff": parity,
            }
        )

    for vocab in vocabs:
        for tokens in token_counts:
            x, w, labels = loss_inputs(tokens, hidden, vocab, dtype, "cuda")

            def reset():
                x.grad = w.grad = None

            measured, losses = {}, {}
            for name, fn in CUDA_LOSSES.items():
                measured[name] = cuda_measure(
                    lambda fn=fn: fn(x, w, labels).backward(), reset, args.warmup, args.repeats
                )
                with torch.no_grad():
                    losses[name] = fn(x, w, labels).item()
            for name, label in (("fused", "fused CE, fp32 dW acc"), ("fused_bf16_acc", "fused CE, bf16 dW acc")):
                parity = abs(losses[name] - losses["eager"]) / abs(losses["eager"])
                record(
                    label,
                    f"{tokens}x{hidden}->{vocab}",
                    measured[name],
                    measured["eager"],
                    FUSED_MEMORY_TARGET,
                    "memory",
                    parity,
                )
            x = w = labels = None  # free the inputs before the next size (the closures above hold cells, not values)
            torch.cuda.empty_cache()

    elementwise = [
        (
            "rms_norm",
            hidden,
            lambda a, b: rms_norm(a, b),
            lambda a, b: rms_norm_reference(a, b),
            RMS_NORM_SPEEDUP_TARGET,
        ),
        # Llama-3-8B's MLP width for hidden 4096.
        ("swiglu", 14336, swiglu, lambda a, b: F.silu(a) * b, SWIGLU_SPEEDUP_TARGET),
    ]
    for kernel, width, ours_fn, eager_fn, target in elementwise:
        for tokens in token_counts:
            gen = torch.Generator(device="cuda").manual_seed(0)
            a = torch.randn(tokens, width, device="cuda", dtype=dtype, generator=gen).requires_grad_()
            if kernel == "rms_norm":
                b = (1 + 0.1 * torch.randn(width, device="cuda", generator=gen)).to(dtype).requires_grad_()
            else:
                b = torch.randn(tokens, width, device="cuda", dtype=dtype, generator=gen).requires_grad_()
            grad_out = torch.randn(tokens, width, device="cuda", dtype=dtype, generator=gen)

            def reset():
                a.grad = b.grad = None

            ours = cuda_measure(lambda: ours_fn(a, b).backward(grad_out), reset, args.warmup, args.repeats)
            eager = cuda_measure(lambda: eager_fn(a, b).backward(grad_out), reset, args.warmup, args.repeats)
            with torch.no_grad():
                reference = eager_fn(a, b).float()
                parity = ((ours_fn(a, b).float() - reference).norm() / reference.norm()).item()
            record(kernel, f"{tokens}x{width}", ours, eager, target, "speed", parity)

    print(
        f"{torch.cuda.get_device_name()}, bf16, forward+backward, median of {args.repeats} after "
        f"{args.warmup} warm-up; memory = max_memory_allocated above the inputs"
    )
    print(
        "eager: fused loss vs F.linear + .float() + F.cross_entropy (Hugging Face's loss path); "
        "rms_norm vs LlamaRMSNorm's ops; swiglu vs F.silu(gate) * up"
    )
    header = (
        f"{'kernel':<27}{'shape':>20}{'ours ms':>9}{'eager ms':>10}{'speedup':>9}{'ours MiB':>10}"
        f"{'eager MiB':>11}{'mem ratio':>10}  {'target':<24}{'ok':<4}{'rel diff':>9}"
    )
    print(header)
    for row in rows:
        print(
            f"{row[0]:<27}{row[1]:>20}{row[2]:>9.2f}{row[3]:>10.2f}{row[4]:>8.2f}x{row[5]:>10.0f}"
            f"{row[6]:>11.0f}{row[7]:>10.3f}  {row[8]:<24}{row[9]:<4}{row[10]:>9.1e}"
        )
    return {"benchmark": "kernels_cuda", "device": torch.cuda.get_device_name(), "results": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    parser.add_argument(
        "--quick", action="store_true", help="CPU: vocab 32000 and 1024 tokens; CUDA: vocab 32k and 8k tokens only"
    )
    parser.add_argument("--tokens", type=int, default=4096, help="CPU: tokens in the batch")
    parser.add_argument("--hidden", type=int, default=512, help="CPU: hidden size")
    parser.add_argument("--vocab", type=int, default=128256, help="CPU: vocabulary size (Llama-3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU: torch threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (CPU default 1, CUDA 10)")
    parser.add_argument("--warmup", type=int, default=3, help="CUDA: untimed runs first")
    parser.add_argument("--child", choices=sorted(LOSSES), help=argparse.SUPPRESS)  # CPU: one variant
    args = parser.parse_args()

    if args.child:
        cpu_child(args)
        return
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        args.repeats = 10 if args.repeats is None else args.repeats
        result = run_cuda(args)
    else:
        args.repeats = 1 if args.repeats is None else args.repeats
        if args.quick:
            args.vocab, args.tokens = 32000, 1024
        result = run_cpu(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
