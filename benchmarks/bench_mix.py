"""Benchmark the mix stage: documents per CPU-second, end to end (summaries, decision, stream shards, commit).

A corpus of documents recombined from the sample sentences (40% domain, 3-40 sentences each) is written
as a committed perplexity stand-in, then the stage runs as plan.run_data_stage_plain runs it (every
shard, every reduce round, the commit), in this process. `--module` times another copy of the stage
module (e.g. a copy of an earlier tasks/mix.py) on the same corpus. Prints one JSON line:
  python benchmarks/bench_mix.py [--docs 20000] [--shards 8] [--model builtin:tiny-llama] [--module PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

REPO = Path(__file__).resolve().parents[1]

from cptflow.plan import StageRun  # noqa: E402
from cptflow.tasks import mix  # noqa: E402
from cptflow.tasks.clean import SourceConfig  # noqa: E402

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sample_sentences(raw: Path) -> tuple[list[str], list[str]]:
    import gzip

    domain = [json.loads(line)["text"] for line in open(raw / "domain" / "abstracts.jsonl", encoding="utf-8")]
    general = [
        json.loads(line)["content"]
        for name in ("web-000.jsonl.gz", "web-001.jsonl.gz")
        for line in gzip.open(raw / "general" / name, "rt", encoding="utf-8")
    ]
    split = lambda texts: [s for t in texts for s in SENTENCE_END.split(t) if s.strip()]  # noqa: E731
    return split(domain), split(general)


def write_upstream(directory: Path, documents: int, shards: int, seed: int) -> int:
    """`documents` documents over `shards` shards per source (papers: domain, web: general); returns bytes."""
    rng = random.Random(seed)
    domain, general = sample_sentences(REPO / "data" / "raw")
    handles, entries, size = {}, [], 0
    (directory / "shards").mkdir(parents=True)
    for source in ("papers", "web"):
        for k in range(shards):
            name = f"{source}-{k:05d}"
            handles[name] = open(directory / "shards" / f"{name}.jsonl", "w", encoding="utf-8")
            entries.append({"shard": name, "source": source})
    for index in range(documents):
        source = "papers" if rng.random() < 0.4 else "web"
        pool = domain if source == "papers" else general
        text = " ".join(rng.choice(pool) for _ in range(rng.randint(3, 40)))
        doc = {"id": f"{source}/{index:08d}", "source": source, "text": text, "meta": {}, "perplexity": 10.0}
        line = json.dumps(doc, ensure_ascii=False) + "\n"
        handles[f"{source}-{index % shards:05d}"].write(line)
        size += len(line.encode("utf-8"))
    for handle in handles.values():
        handle.close()
    (directory / "manifest.json").write_text(json.dumps({"shards": entries}))
    return size


def load_module(path: str | None):
    if path is None:
        return mix
    spec = importlib.util.spec_from_file_location("bench_mix_module", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_stage(module, upstream: Path, out: Path, cfg) -> dict:
    run = StageRun(stage="mix", fingerprint="bench", directory=str(out), upstream_directory=str(upstream), payload={})
    items = module.plan(run, cfg)  # builds a builtin tokenizer once (not timed)
    module._tokenizer(cfg.base_model, False)  # loaded once per process in the stage too (not timed)
    wall, cpu = time.perf_counter(), time.process_time()
    counts = [module.process(run, cfg, item) for item in items]
    summaries = time.perf_counter() - wall
    for plan_round in getattr(module, "REDUCE_ROUNDS", ()):
        for item in plan_round(run, cfg, counts):
            module.reduce(run, cfg, item)
    manifest = module.commit(run, cfg, counts, time.time())
    return {
        "seconds": round(time.perf_counter() - wall, 3),
        "cpu_seconds": round(time.process_time() - cpu, 3),
        "shard_seconds": round(summaries, 3),
        "stream_documents": manifest["stream_documents"],
        # One digest over every output file's path and sha256: equal for two copies that write the same bytes.
        "outputs_sha256": hashlib.sha256(
            json.dumps(sorted((e["path"], e["sha256"]) for e in manifest["outputs"])).encode()
        ).hexdigest()[:16],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20000, help="documents in the corpus")
    parser.add_argument("--shards", type=int, default=8, help="upstream shards per source")
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--module", default=None, help="another copy of the stage module to time instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    module = load_module(args.module)
    sources = [
        SourceConfig(name="papers", role="domain", paths=["x"]),
        SourceConfig(name="web", role="general", paths=["y"]),
    ]
    cfg = types.SimpleNamespace(
        mix=module.MixConfig(), sources=sources, seed=args.seed, base_model=args.model, trust_remote_code=False
    )
    scratch = Path(tempfile.mkdtemp(prefix="bench-mix-"))
    try:
        size = write_upstream(scratch / "up", args.docs, args.shards, args.seed)
        result = run_stage(module, scratch / "up", scratch / "mix", cfg)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.update(
        documents=args.docs,
        megabytes=round(size / 1e6, 1),
        cores=os.cpu_count(),
        module=args.module or "cptflow.tasks.mix",
        docs_per_cpu_second=round(args.docs / result["cpu_seconds"], 1),
        docs_per_second=round(args.docs / result["seconds"], 1),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
