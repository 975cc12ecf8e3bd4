"""Benchmark perplexity scoring: length-bucketed batches (`score_texts`) vs one document per forward.

Same model, same threads, one process. Also measures the ceiling any float32 scorer can reach on
this machine: the model's matmul FLOPs over these documents at the machine's measured peak float32
matmul rate (a 2048 x 2048 product), with nothing else costing any time. Prints a table, then as the
last line one JSON object:
  python benchmarks/bench_perplexity.py [--docs 400] [--model builtin:tiny-llama] [--quick] [--bf16]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from cptflow.tasks.perplexity import score_texts, score_texts_naive  # noqa: E402

MIN_TOKENS, MAX_TOKENS = 50, 600


def read_raw_texts(raw_dir: Path, limit: int = 20000) -> list[str]:
    """`text` or `content` of every record in raw_dir/**/*.jsonl[.gz], in path order."""
    texts: list[str] = []
    paths = sorted(list(raw_dir.rglob("*.jsonl")) + list(raw_dir.rglob("*.jsonl.gz")))
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:  # dirty shards exist
            for line in fh:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                text = record.get("text") or record.get("content") if isinstance(record, dict) else None
                if isinstance(text, str) and text.strip():
                    texts.append(text)
                if len(texts) >= limit:
                    return texts
    return texts


def generated_texts(n: int, seed: int = 0) -> list[str]:
    """Fallback corpus: template sentences over a few hundred words (no data/raw present)."""
    rng = random.Random(seed)
    nouns = [
        f"{a}{b}"
        for a in ("gar", "kit", "riv", "bak", "lib", "sch", "par", "win")
        for b in ("den", "chen", "er", "ery", "rary", "ool", "k", "dow", "ton", "field")
    ]
    verbs = [
        "opened",
        "fixed",
        "painted",
        "cleaned",
        "visited",
        "cooked",
        "planted",
        "repaired",
        "borrowed",
        "measured",
        "reviewed",
        "described",
        "reported",
        "compared",
    ]
    adjectives = ["old", "new", "small", "quiet", "busy", "green", "bright", "narrow", "local", "early"]
    texts = []
    for _ in range(n):
        sentences = [
            f"The {rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(verbs)} the "
            f"{rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(['before', 'after', 'near', 'with'])} "
            f"{rng.randint(2, 90)} {rng.choice(nouns)}s."
            for _ in range(rng.randint(2, 12))
        ]
        texts.append(" ".join(sentences))
    return texts


def documents_of_realistic_length(corpus: list[str], tokenizer, n_docs: int, seed: int) -> list[str]:
    """n_docs texts of about U(50, 600) tokens each, cut from the concatenated corpus at word edges."""
    rng = random.Random(seed)
    words = " ".join(corpus).split()
    sample = " ".join(words[:5000])
    tokens_per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / max(1, len(sample.split()))
    docs = []
    for _ in range(n_docs):
        n_words = max(1, round(rng.randint(MIN_TOKENS, MAX_TOKENS) / tokens_per_word))
        start = rng.randrange(0, max(1, len(words) - n_words))
        window = words[start : start + n_words]
        while len(window) < n_words:  # corpus shorter than the document: wrap around
            window += words[: n_words - len(window)]
        docs.append(" ".join(window))
    return docs


def load_model(name: str | None, corpus: list[str]):
    """(model, tokenizer, label): the named model, else builtin:tiny-llama, else a random Llama."""
    try:
        from cptflow import models as cptflow_models
    except ImportError:
        cptflow_models = None
    if name is None and cptflow_models is not None and cptflow_models.default_corpus_files():
        name = "builtin:tiny-llama"
    if name is not None and name != "random":
        if cptflow_models is None:
            raise SystemExit("--model needs cptflow.models")
        model = cptflow_models.load_causal_lm(name, device="cpu", dtype="float32")
        return model, cptflow_models.load_tokenizer(name), name

    # No sample corpus to build the builtin model from: same shape, random weights. Speed does
    # not depend on the weights, only the perplexity values do.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=4096,
            special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=max(4096, len(tokenizer)),  # the builtin's vocabulary size: same lm_head cost
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer, "random-llama-h256-l4"


def peak_matmul_gflops(dtype=torch.float32, size: int = 2048, repeats: int = 10) -> float:
    """Sustained GFLOP/s of one large square matmul with the current torch threads."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def linear_flops(model, tokens: int) -> float:
    """Multiply-add FLOPs of every nn.Linear (lm_head included) over `tokens` positions."""
    weights = sum(
        module.in_features * module.out_features for module in model.modules() if isinstance(module, torch.nn.Linear)
    )
    return 2.0 * weights * tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=400, help="documents to score")
    parser.add_argument(
        "--model",
        default=None,
        help="model name or path; `random` = random Llama h256 x 4 layers "
        "(default builtin:tiny-llama when data/raw/general exists, else random)",
    )
    parser.add_argument("--quick", action="store_true", help="80 documents, for a smoke run")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per document")
    parser.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="token budget per batch (default: the stage's `auto`, 1024 on CPU)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all cores)")
    parser.add_argument("--raw-dir", type=Path, default=REPO / "data" / "raw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="also time the batched path with bfloat16 weights")
    args = parser.parse_args()
    n_docs = min(args.docs, 80) if args.quick else args.docs
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    corpus = read_raw_texts(args.raw_dir) if args.raw_dir.is_dir() else []
    corpus_label = str(args.raw_dir.relative_to(REPO) if args.raw_dir.is_relative_to(REPO) else args.raw_dir)
    if not corpus:
        corpus, corpus_label = generated_texts(2000, seed=args.seed), "generated"
    model, tokenizer, model_label = load_model(args.model, corpus)
    texts = documents_of_realistic_length(corpus, tokenizer, n_docs, args.seed)
    if args.batch_tokens is None:
        from cptflow.tasks.perplexity import PerplexityConfig, resolve_batch_tokens

        args.batch_tokens = resolve_batch_tokens(PerplexityConfig(), model)
    lengths = [min(len(ids), args.max_length) for ids in tokenizer(texts)["input_ids"]]

    # Warm-up (allocator, kernels) on a few documents, untimed.
    score_texts(texts[:8], model, tokenizer, max_length=args.max_length, batch_tokens=args.batch_tokens)
    score_texts_naive(texts[:8], model, tokenizer, max_length=args.max_length)

    start = time.perf_counter()
    batched = score_texts(texts, model, tokenizer, max_length=args.max_length, batch_tokens=args.batch_tokens)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    naive = score_texts_naive(texts, model, tokenizer, max_length=args.max_length)
    naive_s = time.perf_counter() - start

    bf16_s = bf16_rel_diff = None
    if args.bf16:
        model_bf16 = copy.deepcopy(model).to(torch.bfloat16)  # the float32 model stays as it was
        score_texts(texts[:8], model_bf16, tokenizer, max_length=args.max_length, batch_tokens=args.batch_tokens)
        start = time.perf_counter()
        bf16 = score_texts(texts, model_bf16, tokenizer, max_length=args.max_length, batch_tokens=args.batch_tokens)
        bf16_s = time.perf_counter() - start
        bf16_rel_diff = max(
            (abs(b.perplexity - n.perplexity) / n.perplexity for b, n in zip(bf16, naive) if n.tokens), default=0.0
        )
        del model_bf16

    # The float32 ceiling: only the matmuls, all at the machine's peak rate.
    peak = peak_matmul_gflops()
    matmul_floor_s = linear_flops(model, sum(lengths)) / (peak * 1e9)
    ceiling = naive_s / matmul_floor_s

    rel_diffs = [abs(b.perplexity - n.perplexity) / n.perplexity for b, n in zip(batched, naive) if n.tokens > 0]
    max_rel_diff = max(rel_diffs, default=0.0)
    same_tokens = all(b.tokens == n.tokens for b, n in zip(batched, naive))
    total_tokens = sum(lengths)
    n_params = sum(p.numel() for p in model.parameters())

    print(
        f"model {model_label} ({n_params / 1e6:.1f}M params, vocab {len(tokenizer)}), "
        f"corpus {corpus_label}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"{n_docs} docs, {total_tokens} tokens, length min/median/max "
        f"{min(lengths)}/{int(statistics.median(lengths))}/{max(lengths)}, "
        f"max_length {args.max_length}, batch_tokens {args.batch_tokens}"
    )
    print(f"{'method':<10}{'seconds':>10}{'docs/s':>10}{'tokens/s':>12}")
    rows = [("batched", batched_s), ("naive", naive_s)] + ([("bf16", bf16_s)] if bf16_s else [])
    for label, seconds in rows:
        print(f"{label:<10}{seconds:>10.2f}{n_docs / seconds:>10.1f}{total_tokens / seconds:>12.0f}")
    print(
        f"speedup {naive_s / batched_s:.2f}x, max relative difference {max_rel_diff:.2e}, "
        f"token counts equal: {same_tokens}"
    )
    print(
        f"float32 ceiling on this machine: matmuls alone take {matmul_floor_s:.2f} s at the measured peak "
        f"{peak:.0f} GFLOP/s, so no float32 scorer can beat the naive loop by more than {ceiling:.2f}x"
    )
    if bf16_s:
        print(
            f"bf16 weights, batched: {naive_s / bf16_s:.2f}x the float32 naive loop, "
            f"max relative difference {bf16_rel_diff:.1e}"
        )
    if not same_tokens or max_rel_diff > 1e-3:
        print("WARNING: batched and naive scores disagree", file=sys.stderr)
    print(
        json.dumps(
            {
                "benchmark": "perplexity_scoring",
                "docs": n_docs,
                "batched_docs_per_s": round(n_docs / batched_s, 2),
                "naive_docs_per_s": round(n_docs / naive_s, 2),
                "speedup": round(naive_s / batched_s, 3),
                "max_rel_diff": max_rel_diff,
                "model": model_label,
                "peak_fp32_matmul_gflops": round(peak, 1),
                "matmul_floor_s": round(matmul_floor_s, 3),
                "fp32_speedup_ceiling": round(ceiling, 2),
                **({"bf16_speedup": round(naive_s / bf16_s, 3), "bf16_max_rel_diff": bf16_rel_diff} if bf16_s else {}),
            }
        )
    )


if __name__ == "__main__":
    main()
