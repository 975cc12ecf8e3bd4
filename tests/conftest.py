"""Shared pytest fixtures: tiny real models and corpora that several stages' tests build on.

Imports of cptflow modules stay inside the fixtures so one stage's unfinished module cannot break
collection of another stage's tests.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# drills/ (beside the packages, not installed) as the package `drills`, by its path: the checkout root
# itself is not on sys.path, since its kernels/ folder would shadow Hugging Face's `kernels`.
_spec = importlib.util.spec_from_file_location("drills_runner", REPO / "drills" / "run.py")
_runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_runner)
_runner.register_drills_package()

# Before anything imports prefect: a private Prefect home (results, cache records) per test session,
# no hub downloads.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="cptflow-test-prefect-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Prefect binds its log handler to the sys.stderr of the moment it is first imported: import it
# now, not inside a test whose stderr (e.g. typer's CliRunner) is closed afterwards.
# isort: off
import cptflow.flows  # noqa: E402,F401  (its __init__ sets Prefect defaults: first)
from prefect import flow as _prefect_flow  # noqa: E402,F401  (prefect.main sets up logging)
# isort: on

_SUBJECTS = [
    "My neighbour",
    "The old baker",
    "Our teacher",
    "A friend of mine",
    "The city council",
    "My sister",
    "The local library",
    "The bus driver",
    "Every gardener",
    "The new cafe",
]
_VERBS = [
    "opened",
    "fixed",
    "painted",
    "cleaned",
    "visited",
    "recommended",
    "cooked",
    "planted",
    "repaired",
    "borrowed",
]
_OBJECTS = [
    "the kitchen window",
    "a small garden behind the house",
    "fresh bread on Saturday morning",
    "the park near the river",
    "a bicycle with a flat tyre",
    "the school playground",
    "a pot of vegetable soup",
    "the bookshelf in the hallway",
    "tomatoes and beans",
    "the front door",
]
_TAILS = [
    "before the rain started.",
    "and everyone was happy about it.",
    "after a long week at work.",
    "because the weather was nice.",
    "with a little help from the kids.",
    "on a quiet Sunday.",
    "while the dog slept in the sun.",
    "and it only took an hour.",
    "so we had tea together.",
    "just in time for dinner.",
]


def everyday_english_docs(n_docs: int, *, seed: int = 0) -> list[str]:
    """Deterministic, simple everyday-English documents (a few sentences each) for tiny builds."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
            for _ in range(rng.randint(3, 8))
        ]
        docs.append(" ".join(sentences))
    return docs


def write_web_shards(directory: Path, docs: list[str], *, n_shards: int = 2) -> list[Path]:
    """Write docs as `web-NNN.jsonl.gz` shards in the raw-general format (`doc_id`, `content`)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(n_shards):
        path = directory / f"web-{shard:03d}.jsonl.gz"
        lines = [
            json.dumps({"doc_id": f"{shard}-{i}", "content": text}) + "\n"
            for i, text in enumerate(docs[shard::n_shards])
        ]
        # mtime=0: byte-identical shards on every run, so fingerprints of builds on them are stable.
        path.write_bytes(gzip.compress("".join(lines).encode("utf-8"), mtime=0))
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def tiny_corpus_files(tmp_path_factory) -> list[Path]:
    """Two small raw-general shards (~200 docs) plus one HTML page and one broken line."""
    paths = write_web_shards(tmp_path_factory.mktemp("raw-general"), everyday_english_docs(200))
    with gzip.open(paths[0], "at", encoding="utf-8") as fh:
        fh.write(json.dumps({"doc_id": "html", "content": "<html><body>menu</body></html>"}) + "\n")
        fh.write("{not json\n")
    return paths


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_corpus_files, tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 Llama with a ~300-token BPE tokenizer, built in a few seconds.

    Same layout as `builtin:tiny-llama` (safetensors, BOS-adding tokenizer, chat template) but
    barely trained: use it for plumbing tests, not for perplexity comparisons.
    """
    from cptflow.tiny_model import TINY_TEST_SPEC, build_tiny_llama

    return build_tiny_llama(tiny_corpus_files, tmp_path_factory.mktemp("tiny-llama-cache"), spec=TINY_TEST_SPEC)


@pytest.fixture(scope="session")
def builtin_tiny_llama_dir(tmp_path_factory) -> Path:
    """The real default `builtin:tiny-llama` (about a minute to build on 2 CPU cores, once a session).

    Reuses `CPTFLOW_CACHE_DIR` when set so repeated local runs hit the cache. Skips when the
    sample corpus `data/raw/general/web-*.jsonl.gz` is missing.
    """
    from cptflow.models import default_corpus_files, resolve_model_path

    if not default_corpus_files():
        pytest.skip("sample corpus data/raw/general/web-*.jsonl.gz not generated")
    cache_dir = os.environ.get("CPTFLOW_CACHE_DIR") or tmp_path_factory.mktemp("cptflow-cache")
    return Path(resolve_model_path("builtin:tiny-llama", cache_dir=Path(cache_dir)))


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server for the whole session (it takes 15-30 s to start on 2 cores)."""
    from prefect.testing.utilities import prefect_test_harness

    import cptflow  # noqa: F401  (startup timeout and analytics defaults)

    with prefect_test_harness(server_startup_timeout=None):
        yield
