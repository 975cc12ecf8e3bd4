"""Benchmark the tokenize stage (tokenize + pack + write Arrow shards) against two baselines.

Ours runs as the stage does (tiktoken fast path where the tokenizer converts, `tokenize.encoder:
auto`). Same text, same process, same cores: (a) the fast tokenizer's batch encode alone, (b) the Hugging
Face `run_clm` recipe (Dataset.from_dict + map(tokenize) + group_texts + save_to_disk). Prints a
table, then as the last line one JSON object:
  python benchmarks/bench_tokenize.py [--mb 20] [--seq-len 512] [--repeats 2] [--model builtin:tiny-llama]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

REPO = Path(__file__).resolve().parents[1]

from cptflow.plan import StageRun  # noqa: E402
from cptflow.tasks import tokenize  # noqa: E402
from cptflow.tasks.tokenize import TokenizeConfig  # noqa: E402

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sample_sentences(raw: Path) -> tuple[list[str], list[str]]:
    """Sentences of the domain abstracts (`text`) and of the general web shards (`content`)."""
    domain = [json.loads(line)["text"] for line in open(raw / "domain" / "abstracts.jsonl", encoding="utf-8")]
    general = [
        json.loads(line)["content"]
        for name in ("web-000.jsonl.gz", "web-001.jsonl.gz")
        for line in gzip.open(raw / "general" / name, "rt", encoding="utf-8")
    ]
    split = lambda texts: [s for t in texts for s in SENTENCE_END.split(t) if s.strip()]  # noqa: E731
    return split(domain), split(general)


def build_corpus(megabytes: float, seed: int) -> list[dict]:
    """Documents of 3-40 sentences recombined with a seeded RNG until `megabytes` of UTF-8 text;
    40% domain, in a shuffled (curriculum-like) order."""
    rng = random.Random(seed)
    domain, general = sample_sentences(REPO / "data" / "raw")
    docs, size = [], 0
    while size < megabytes * 1e6:
        role = "domain" if rng.random() < 0.4 else "general"
        pool = domain if role == "domain" else general
        text = " ".join(rng.choice(pool) for _ in range(rng.randint(3, 40)))
        docs.append({"text": text, "id": f"bench-{len(docs)}", "source": role, "role": role, "epoch": 0})
        size += len(text.encode("utf-8"))
    return docs


def write_stream(directory: Path, docs: list[dict], shards: int) -> Path:
    (directory / "shards").mkdir(parents=True)
    per_shard = -(-len(docs) // shards)
    names = []
    for index in range(shards):
        name = f"stream-{index:05d}"
        names.append({"shard": name, "source": "all"})
        with open(directory / "shards" / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for doc in docs[index * per_shard : (index + 1) * per_shard]:
                handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
    (directory / "manifest.json").write_text(json.dumps({"shards": names}))
    return directory


def run_ours(upstream: Path, out: Path, cfg, workers: int) -> dict:
    """The stage as the flow runs it: shards in a thread pool, then one commit."""
    run = StageRun(
        stage="tokenize", fingerprint="bench", directory=str(out), upstream_directory=str(upstream), payload={}
    )
    items = tokenize.plan(run, cfg)  # loads the tokenizer (not timed: every method gets it loaded)
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        counts = list(pool.map(lambda item: tokenize.process(run, cfg, item), items))
    tokenized = time.perf_counter()
    manifest = tokenize.commit(run, cfg, counts, time.time())
    finished = time.perf_counter()
    return {
        "seconds": finished - started,
        "tokenize_seconds": tokenized - started,
        "pack_write_seconds": finished - tokenized,
        "tokens": manifest["packing"]["tokens"],
        "blocks": manifest["packing"]["blocks"],
        "shards": len(manifest["token_shards"]),
    }


def run_raw(texts: list[str], tokenizer, batch: int) -> dict:
    started = time.perf_counter()
    tokens = 0
    for first in range(0, len(texts), batch):
        tokens += sum(
            map(len, tokenizer(texts[first : first + batch], return_attention_mask=False, verbose=False)["input_ids"])
        )
    return {"seconds": time.perf_counter() - started, "tokens": tokens}


def run_backend(texts: list[str], tokenizer, batch: int) -> dict:
    backend = tokenizer.backend_tokenizer
    started = time.perf_counter()
    tokens = 0
    for first in range(0, len(texts), batch):
        tokens += sum(len(e.ids) for e in backend.encode_batch_fast(texts[first : first + batch]))
    return {"seconds": time.perf_counter() - started, "tokens": tokens}


def run_clm_recipe(texts: list[str], tokenizer, block_size: int, out: Path) -> dict:
    """transformers/examples/pytorch/language-modeling/run_clm.py, preprocessing part, defaults."""
    from datasets import Dataset

    started = time.perf_counter()
    raw = Dataset.from_dict({"text": texts})
    tokenized = raw.map(lambda examples: tokenizer(examples["text"]), batched=True, remove_columns=["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    grouped = tokenized.map(group_texts, batched=True)
    grouped.save_to_disk(str(out))
    seconds = time.perf_counter() - started
    tokens = sum(len(ids) for ids in tokenized["input_ids"])
    return {"seconds": seconds, "tokens": tokens, "blocks": len(grouped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="megabytes of text")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the fastest counts")
    parser.add_argument("--shards", type=int, default=4, help="stream shards from the mix stage")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads over stream shards")
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()
    from cptflow.models import load_tokenizer

    docs = build_corpus(args.mb, args.seed)
    texts = [d["text"] for d in docs]
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tokenizer = load_tokenizer(args.model)
    cfg = types.SimpleNamespace(
        base_model=args.model, trust_remote_code=False, seed=args.seed, tokenize=TokenizeConfig(seq_len=args.seq_len)
    )
    scratch = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        upstream = write_stream(scratch / "mix", docs, args.shards)
        results: dict[str, list[dict]] = {"ours": [], "raw": [], "backend": [], "run_clm": []}
        methods = {
            "ours": lambda repeat: run_ours(upstream, scratch / f"ours-{repeat}", cfg, args.workers),
            "raw": lambda repeat: run_raw(texts, tokenizer, cfg.tokenize.batch_documents),
            "backend": lambda repeat: run_backend(texts, tokenizer, cfg.tokenize.batch_documents),
            "run_clm": lambda repeat: run_clm_recipe(texts, tokenizer, args.seq_len, scratch / f"clm-{repeat}"),
        }
        for repeat in range(args.repeats):  # interleaved, so the tokenizer's word cache favours no one
            for name, method in methods.items():
                cpu_start = time.process_time()  # all threads of this process: robust to other load on the machine
                result = method(repeat)
                results[name].append(dict(result, cpu_seconds=time.process_time() - cpu_start))
            shutil.rmtree(scratch / f"ours-{repeat}")
            shutil.rmtree(scratch / f"clm-{repeat}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # Untimed: the fast encoder (if the stage used one) gives the tokenizer's own ids on every document.
    encoder = tokenize.stage_encoder(cfg)
    mismatched_documents = None
    if encoder is not None:
        from cptflow.fast_bpe import differing_documents

        fast, lengths = encoder.encode_documents(texts, tokenizer.eos_token_id)
        reference = tokenize.document_token_ids(texts, tokenizer)
        mismatched_documents = len(differing_documents(fast, lengths, reference, range(len(texts))))
    best = {name: min(runs, key=lambda r: r["seconds"]) for name, runs in results.items()}
    rate = {name: r["tokens"] / r["seconds"] for name, r in best.items()}
    cpu = {name: min(r["cpu_seconds"] for r in runs) for name, runs in results.items()}

    labels = {
        "ours": "cptflow tokenize+pack+write (read jsonl -> Arrow shards)",
        "raw": "(a) fast tokenizer batch encode alone: tokenizer(batch)",
        "backend": "(a') Rust backend encode_batch_fast alone",
        "run_clm": "(b) HF run_clm: from_dict+map+group_texts+save_to_disk",
    }
    print(
        f"{len(texts)} documents, {megabytes:.1f} MB, seq_len {args.seq_len}, {os.cpu_count()} cores, "
        f"model {args.model}, best of {args.repeats}"
    )
    print(f"{'method':<60} {'seconds':>8} {'Mtok/s':>8} {'MB/s':>7} {'cpu s':>7}")
    for name, r in best.items():
        print(
            f"{labels[name]:<60} {r['seconds']:>8.2f} {rate[name] / 1e6:>8.3f} "
            f"{megabytes / r['seconds']:>7.2f} {cpu[name]:>7.2f}"
        )
    ours = best["ours"]
    print(
        f"encoder: {'tiktoken' if encoder is not None else 'huggingface'}"
        + (f", documents whose ids differ from the tokenizer's: {mismatched_documents}" if encoder is not None else "")
    )
    print(
        f"ours: tokenize {ours['tokenize_seconds']:.2f} s, pack+write {ours['pack_write_seconds']:.2f} s, "
        f"{ours['blocks']} blocks in {ours['shards']} shards"
    )
    summary = {
        "documents": len(texts),
        "megabytes": round(megabytes, 2),
        "seq_len": args.seq_len,
        "cores": os.cpu_count(),
        "tokens_per_s": {name: round(value) for name, value in rate.items()},
        "seconds": {name: round(r["seconds"], 3) for name, r in best.items()},
        "cpu_seconds": {name: round(value, 3) for name, value in cpu.items()},
        "ours_pack_write_seconds": round(ours["pack_write_seconds"], 3),
        "encoder": "tiktoken" if encoder is not None else "huggingface",
        "documents_with_ids_differing_from_tokenizer": mismatched_documents,
        # tokens/s ratios; ours also counts one EOS per document that the baselines do not produce.
        "ratio_vs_raw_tokenizer": round(rate["ours"] / rate["raw"], 3),
        "ratio_vs_backend_encode": round(rate["ours"] / rate["backend"], 3),
        "ratio_vs_run_clm": round(rate["ours"] / rate["run_clm"], 3),
        # the same comparison in CPU seconds (tokens per CPU-second), less sensitive to a busy machine
        "cpu_ratio_vs_raw_tokenizer": round(
            cpu["raw"] / cpu["ours"] * best["ours"]["tokens"] / best["raw"]["tokens"], 3
        ),
        "cpu_ratio_vs_run_clm": round(
            cpu["run_clm"] / cpu["ours"] * best["ours"]["tokens"] / best["run_clm"]["tokens"], 3
        ),
        "targets": {"vs_raw_tokenizer": 0.8, "vs_run_clm": 2.0},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
