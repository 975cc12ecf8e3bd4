"""Tokenize stage: packing in stream order with BOS/EOS and no token lost, Arrow shards, resume, checks."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import everyday_english_docs  # noqa: E402
from pydantic import ValidationError  # noqa: E402

import cptflow.tasks.tokenize as tokenize  # noqa: E402
from cptflow.plan import StageRun  # noqa: E402
from cptflow.store import sha256_file  # noqa: E402
from cptflow.tasks.tokenize import TokenizeConfig, document_token_ids  # noqa: E402
from cptflow.token_shards import (  # noqa: E402
    SCHEMA_VERSION,
    TokenShardError,
    check_shard,
    open_token_shard,
    read_shard_metadata,
)

N_STREAMS = 3


def stream_documents(seed: int = 0) -> list[list[dict]]:
    """Three stream shards of mixed-role documents: short ones, long ones (several blocks), one
    empty text, and a very short document last (so `drop` can remove a whole document)."""
    rng = random.Random(seed)
    texts = everyday_english_docs(150, seed=seed)
    texts[10] = " ".join(texts[10:20])  # longer than a block: its remainder carries over
    texts[40] = ""
    texts.append("Hi.")
    streams: list[list[dict]] = [[] for _ in range(N_STREAMS)]
    for index, text in enumerate(texts):
        shard = min(index * N_STREAMS // len(texts), N_STREAMS - 1)
        role = "domain" if rng.random() < 0.4 else "general"
        streams[shard].append({"text": text, "id": f"doc-{index}", "source": role, "role": role, "epoch": 0})
    return streams


def make_upstream(directory: Path, streams: list[list[dict]]) -> Path:
    (directory / "shards").mkdir(parents=True)
    names = []
    for index, docs in enumerate(streams):
        name = f"stream-{index:05d}"
        names.append({"shard": name, "source": "all"})
        with open(directory / "shards" / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for doc in docs:
                handle.write(json.dumps(doc) + "\n")
    (directory / "manifest.json").write_text(json.dumps({"shards": names}))
    return directory


def stage_config(model_dir: Path, **tokenize_options) -> types.SimpleNamespace:
    options = dict(seq_len=64, blocks_per_shard=8, rows_per_batch=3, batch_documents=16)
    options.update(tokenize_options)
    return types.SimpleNamespace(
        base_model=str(model_dir), trust_remote_code=False, seed=7, tokenize=TokenizeConfig(**options)
    )


def stage_run(directory: Path, upstream: Path) -> StageRun:
    return StageRun(
        stage="tokenize", fingerprint="f", directory=str(directory), upstream_directory=str(upstream), payload={}
    )


def run_stage(run: StageRun, cfg) -> dict:
    started = time.time()
    counts = [tokenize.process(run, cfg, item) for item in tokenize.plan(run, cfg)]
    return tokenize.commit(run, cfg, counts, started)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    return make_upstream(tmp_path_factory.mktemp("mix"), stream_documents())


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from cptflow.models import load_tokenizer

    return load_tokenizer(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def padded(tiny_llama_dir, upstream, tmp_path_factory):
    run = stage_run(tmp_path_factory.mktemp("tokenize") / "pad", upstream)
    return run, run_stage(run, stage_config(tiny_llama_dir))


def all_documents() -> list[dict]:
    return [doc for docs in stream_documents() for doc in docs]


def read_blocks(run: StageRun, manifest: dict) -> dict[str, np.ndarray | list]:
    """Every block of every shard, in order, read with plain pyarrow."""
    tables = [open_token_shard(run.path / entry["path"]).read_all() for entry in manifest["token_shards"]]
    table = pa.concat_tables(tables)
    seq_len = manifest["packing"]["seq_len"]
    return {
        "input_ids": table.column("input_ids").combine_chunks().values.to_numpy().reshape(-1, seq_len),
        "valid_tokens": table.column("valid_tokens").to_numpy(),
        "doc_starts": table.column("doc_starts").to_pylist(),
        "domain_tokens": table.column("domain_tokens").to_numpy(),
    }


def valid_stream(blocks: dict) -> np.ndarray:
    return np.concatenate([row[:valid] for row, valid in zip(blocks["input_ids"], blocks["valid_tokens"])])


def test_document_token_ids_counts_like_the_mix_stage(tokenizer):
    texts = ["The old baker opened the door.", "", "Tomatoes and beans."]
    ids = document_token_ids(texts, tokenizer)
    assert [len(row) for row in ids] == [len(tokenizer(t)["input_ids"]) + 1 for t in texts]
    assert all(row[-1] == tokenizer.eos_token_id for row in ids)
    assert all(row[0] == tokenizer.bos_token_id for row in ids)


def test_round_trip_reproduces_documents_with_eos_between_them(padded, tokenizer):
    run, manifest = padded
    tokens = valid_stream(read_blocks(run, manifest))
    eos = tokenizer.eos_token_id
    assert tokens[-1] == eos
    pieces = np.split(tokens, np.flatnonzero(tokens == eos)[:-1] + 1)
    docs = all_documents()
    assert len(pieces) == len(docs)
    for piece, doc in zip(pieces, docs):
        assert piece.tolist() == tokenizer(doc["text"])["input_ids"] + [eos]
    assert manifest["packing"]["tokens"] == len(tokens) == sum(e["tokens"] for e in manifest["token_shards"])


def test_blocks_are_full_except_a_padded_final_block(padded, tokenizer):
    run, manifest = padded
    blocks = read_blocks(run, manifest)
    seq_len, total = 64, manifest["packing"]["tokens"]
    assert total % seq_len, "fixture must leave a partial final block"
    assert (blocks["valid_tokens"][:-1] == seq_len).all()
    assert blocks["valid_tokens"][-1] == total % seq_len
    pad = blocks["input_ids"][-1][total % seq_len :]
    assert (pad == tokenizer.pad_token_id).all()
    assert manifest["packing"]["padded_tokens"] == manifest["stats"]["padded_tokens"] == seq_len - total % seq_len
    assert manifest["stats"]["blocks"] == len(blocks["valid_tokens"]) == -(-total // seq_len)
    # fixed-size record batches: 8 blocks per shard in batches of 3 rows
    reader = open_token_shard(run.path / manifest["token_shards"][0]["path"])
    assert [batch.num_rows for batch in reader] == [3, 3, 2]


def test_bos_is_never_overwritten_and_doc_starts_mark_every_document(padded, tokenizer):
    run, manifest = padded
    blocks = read_blocks(run, manifest)
    seq_len, bos = 64, tokenizer.bos_token_id
    starts = [b * seq_len + s for b, block_starts in enumerate(blocks["doc_starts"]) for s in block_starts]
    lengths = [len(tokenizer(doc["text"])["input_ids"]) + 1 for doc in all_documents()]
    assert starts == np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    tokens = valid_stream(blocks)
    assert (tokens[starts] == bos).all()
    assert int((tokens == bos).sum()) == len(lengths)  # one BOS per document, none lost to a block edge


def test_domain_tokens_count_the_tokens_of_domain_documents(padded, tokenizer):
    run, manifest = padded
    blocks = read_blocks(run, manifest)
    docs = all_documents()
    lengths = [len(tokenizer(doc["text"])["input_ids"]) + 1 for doc in docs]
    is_domain = np.repeat([doc["role"] == "domain" for doc in docs], lengths)
    padded_flags = np.zeros(len(blocks["valid_tokens"]) * 64, dtype=bool)
    padded_flags[: len(is_domain)] = is_domain
    assert blocks["domain_tokens"].tolist() == padded_flags.reshape(-1, 64).sum(axis=1).tolist()
    assert manifest["packing"]["domain_tokens"] == int(is_domain.sum())


def test_manifest_accounts_for_every_document_and_shard(padded):
    run, manifest = padded
    docs = all_documents()
    assert manifest["counts"] == {"in": len(docs), "kept": len(docs), "excluded": {}, "rejected": {}}
    assert [s["shard"] for s in manifest["shards"]] == [f"stream-{i:05d}" for i in range(N_STREAMS)]
    assert set(manifest["stats"]) >= {"tokens", "blocks", "padded_tokens", "dropped_tokens"}
    for entry in manifest["token_shards"]:
        path = run.path / entry["path"]
        assert sha256_file(path) == entry["sha256"]
        check_shard(path, {"rows": entry["rows"], "sha256": entry["sha256"], **manifest["token_metadata"]})
    assert not (run.path / "_work").exists()


def test_final_block_drop_removes_the_tail_and_counts_it(tiny_llama_dir, upstream, tokenizer, tmp_path):
    docs = all_documents()
    lengths = [len(tokenizer(doc["text"])["input_ids"]) + 1 for doc in docs]
    total = sum(lengths)
    # A block length whose dropped tail holds the whole last document ("Hi.") and part of another.
    seq_len = next(
        s
        for s in range(40, 200)
        if total % s > lengths[-1] + lengths[-2] // 2 and total % s < lengths[-1] + lengths[-2]
    )
    run = stage_run(tmp_path / "drop", upstream)
    manifest = run_stage(run, stage_config(tiny_llama_dir, seq_len=seq_len, final_block="drop"))
    blocks = read_blocks(run, manifest)
    assert (blocks["valid_tokens"] == seq_len).all()
    assert len(blocks["valid_tokens"]) == total // seq_len
    assert manifest["stats"]["dropped_tokens"] == manifest["packing"]["dropped_tokens"] == total % seq_len
    assert manifest["stats"]["padded_tokens"] == 0
    assert manifest["counts"]["excluded"] == {"final_block_dropped": 1}
    assert manifest["counts"]["kept"] == len(docs) - 1
    assert manifest["shards"][-1]["excluded"] == {"final_block_dropped": 1}
    tokens = valid_stream(blocks)
    expected = np.concatenate([tokenizer(doc["text"])["input_ids"] + [tokenizer.eos_token_id] for doc in docs])
    assert tokens.tolist() == expected[: total - total % seq_len].tolist()


def test_same_inputs_give_identical_shards(padded, tiny_llama_dir, upstream, tmp_path):
    run, manifest = padded
    again = run_stage(stage_run(tmp_path / "again", upstream), stage_config(tiny_llama_dir))
    assert again["token_shards"] == manifest["token_shards"]
    assert len(manifest["token_shards"]) > 2


def test_rerun_after_kill_produces_identical_shards(padded, tiny_llama_dir, upstream, tmp_path, monkeypatch):
    reference_run, reference = padded
    cfg = stage_config(tiny_llama_dir)
    run = stage_run(tmp_path / "killed", upstream)
    items = tokenize.plan(run, cfg)
    # Killed while tokenizing: shard 0 finished, shard 1 half written (a temp file, no marker).
    tokenize.process(run, cfg, items[0])
    work = run.path / "_work"
    (work / ".stream-00001.tokens.npy.tmp-999").write_bytes(b"partial")
    np.save(work / "stream-00001.tokens.npy", np.arange(5, dtype=np.uint32))

    # Killed while packing: after two output shards.
    real_write = tokenize.write_token_shard
    written: list[str] = []

    def dying_write(path, *args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(Path(path).name)
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(tokenize, "write_token_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_stage(run, cfg)
    assert written == ["tokens-00000.arrow", "tokens-00001.arrow"] and not run.is_done()
    (run.path / "shards" / "tokens-00000.arrow").unlink()
    (run.path / "shards" / ".tokens-00002.arrow.tmp-999").write_bytes(b"half a shard")

    def counting_write(path, *args, **kwargs):
        written.append(Path(path).name)
        return real_write(path, *args, **kwargs)

    written.clear()
    monkeypatch.setattr(tokenize, "write_token_shard", counting_write)
    manifest = run_stage(run, cfg)
    assert "tokens-00001.arrow" not in written  # already there with the recorded sha256
    assert "tokens-00000.arrow" in written and len(written) == len(reference["token_shards"]) - 1
    assert manifest["token_shards"] == reference["token_shards"]
    assert manifest["outputs"] == reference["outputs"]
    assert sorted(p.name for p in (run.path / "shards").iterdir()) == sorted(
        p.name for p in (reference_run.path / "shards").iterdir()
    )


def test_check_shard_refuses_wrong_tokenizer_wrong_seq_len_and_truncated_files(padded, tmp_path):
    run, manifest = padded
    entry = manifest["token_shards"][0]
    path = run.path / entry["path"]
    metadata = read_shard_metadata(path)
    assert metadata == dict(manifest["token_metadata"], schema_version=SCHEMA_VERSION)
    check_shard(path, metadata)

    with pytest.raises(TokenShardError, match=r"tokens-00000\.arrow: tokenizer_fingerprint is '.*', expected 'ffff"):
        check_shard(path, {"tokenizer_fingerprint": "ffffffffffffffff"})
    with pytest.raises(TokenShardError, match=r"tokens-00000\.arrow: seq_len is 64, expected 128"):
        check_shard(path, {"seq_len": 128})

    data = path.read_bytes()
    cut_at_end = tmp_path / "cut-end.arrow"
    cut_at_end.write_bytes(data[:-8])  # all record batches still readable: only the marker is gone
    with pytest.raises(TokenShardError, match=r"cut-end\.arrow: truncated"):
        check_shard(cut_at_end, {})
    cut_in_middle = tmp_path / "cut-middle.arrow"
    cut_in_middle.write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenShardError, match=r"cut-middle\.arrow: truncated"):
        check_shard(cut_in_middle, {})
    garbage = tmp_path / "garbage.arrow"
    garbage.write_bytes(b"not arrow at all" * 4)
    with pytest.raises(TokenShardError, match=r"garbage\.arrow: not a readable Arrow IPC stream"):
        check_shard(garbage, {})
    with pytest.raises(TokenShardError, match="rows"):
        check_shard(path, {"rows": entry["rows"] + 1})


def test_shards_read_with_plain_pyarrow_and_datasets(padded):
    from datasets import Dataset

    run, manifest = padded
    entry = manifest["token_shards"][0]
    path = run.path / entry["path"]
    table = open_token_shard(path).read_all()
    assert table.schema.field("input_ids").type == pa.list_(pa.uint32(), 64)
    assert table.schema.metadata[b"cptflow.seq_len"] == b"64"
    assert table.schema.metadata[b"cptflow.eos_id"] == b"2"
    dataset = Dataset.from_file(str(path))
    assert len(dataset) == entry["rows"]
    assert dataset[0]["input_ids"] == table.column("input_ids")[0].as_py()
    assert dataset[0]["doc_starts"] == table.column("doc_starts")[0].as_py()
    assert dataset.features["input_ids"].length == 64


def test_tokenizer_without_bos_gets_none(tiny_llama_dir, upstream, tmp_path):
    model_dir = tmp_path / "no-bos"
    shutil.copytree(tiny_llama_dir, model_dir)
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer_json["post_processor"] = None  # bos_token stays defined, but nothing prepends it
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    run = stage_run(tmp_path / "tok", upstream)
    manifest = run_stage(run, stage_config(model_dir))
    assert manifest["token_metadata"]["bos_id"] is None
    assert read_shard_metadata(run.path / manifest["token_shards"][0]["path"])["bos_id"] is None
    tokens = valid_stream(read_blocks(run, manifest))
    assert 1 not in tokens.tolist()
    assert int((tokens == 2).sum()) == len(all_documents())


def test_seq_len_above_the_model_context_is_a_clear_error(tiny_llama_dir, upstream, tmp_path):
    limit = json.loads((Path(tiny_llama_dir) / "config.json").read_text())["max_position_embeddings"]
    cfg = stage_config(tiny_llama_dir, seq_len=limit + 1)
    with pytest.raises(ValueError, match=rf"tokenize.seq_len = {limit + 1} .*max_position_embeddings = {limit}"):
        tokenize.plan(stage_run(tmp_path / "t", upstream), cfg)
    tokenize.plan(stage_run(tmp_path / "t", upstream), stage_config(tiny_llama_dir, seq_len=limit))


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError):
        TokenizeConfig(seq_length=512)
    with pytest.raises(ValidationError):
        TokenizeConfig(final_block="truncate")
    assert TokenizeConfig().model_dump() == {
        "seq_len": 512,
        "final_block": "pad",
        "rows_per_batch": 256,
        "blocks_per_shard": 2048,
        "batch_documents": 1000,
        "encoder": "auto",
    }
    with pytest.raises(ValidationError):
        TokenizeConfig(encoder="sentencepiece")


def test_literal_special_token_text_is_not_an_injected_eos(tiny_llama_dir):
    from cptflow.models import load_tokenizer
    from cptflow.tasks.mix import document_tokens
    from cptflow.tokenization import document_token_ids

    tokenizer = load_tokenizer(str(tiny_llama_dir))
    texts = ["the page said </s> and then <s> again", "plain"]
    ids = document_token_ids(texts, tokenizer)
    assert [row.count(tokenizer.eos_token_id) for row in ids] == [1, 1] and ids[0][-1] == tokenizer.eos_token_id
    assert document_tokens(texts, tokenizer) == [len(row) for row in ids]  # mix counts what tokenize packs


# ---------------------------------------------------------------------------------------------
# The tiktoken fast path (cptflow/fast_bpe.py): same shards, checked, and a fallback on mismatch
# ---------------------------------------------------------------------------------------------


def shard_bytes(run: StageRun, manifest: dict) -> list[bytes]:
    return [(run.path / entry["path"]).read_bytes() for entry in manifest["token_shards"]]


def test_fast_encoder_writes_the_same_shards_as_the_tokenizer(padded, tiny_llama_dir, upstream, tmp_path):
    run, manifest = padded  # encoder: auto
    assert manifest["stats"]["tiktoken_documents"] == len(all_documents())
    assert manifest["stats"]["encoder_checked_documents"] > 0
    slow_run = stage_run(tmp_path / "hf", upstream)
    slow = run_stage(slow_run, stage_config(tiny_llama_dir, encoder="huggingface"))
    assert "tiktoken_documents" not in slow["stats"]
    assert shard_bytes(slow_run, slow) == shard_bytes(run, manifest)


def test_fast_encoder_mismatch_reencodes_the_shard_with_the_tokenizer(
    padded, tiny_llama_dir, upstream, tmp_path, monkeypatch
):
    cfg = stage_config(tiny_llama_dir)
    encoder = tokenize.stage_encoder(cfg)
    assert encoder is not None
    real = type(encoder).encode_documents

    def off_by_one(self, texts, eos_id):  # a fast path that is wrong on the first document only
        tokens, lengths = real(self, texts, eos_id)
        tokens = tokens.copy()
        tokens[1] = (tokens[1] + 1) % 200
        return tokens, lengths

    monkeypatch.setattr(type(encoder), "encode_documents", off_by_one)
    run = stage_run(tmp_path / "mismatch", upstream)
    manifest = run_stage(run, cfg)
    assert manifest["stats"]["encoder_fallbacks"] == N_STREAMS
    assert "tiktoken_documents" not in manifest["stats"]
    assert shard_bytes(run, manifest) == shard_bytes(*padded)


def test_encoder_tiktoken_refuses_a_tokenizer_without_an_equivalent(tiny_llama_dir, upstream, tmp_path, monkeypatch):
    from cptflow import fast_bpe

    monkeypatch.setattr(fast_bpe, "convert", lambda tokenizer: (None, "pre-tokenizer 'Metaspace'"))
    tokenize._stage_encoder.cache_clear()
    try:
        with pytest.raises(ValueError, match="no exact tiktoken equivalent: pre-tokenizer 'Metaspace'"):
            tokenize.plan(stage_run(tmp_path / "t", upstream), stage_config(tiny_llama_dir, encoder="tiktoken"))
        # auto falls back to the tokenizer and says why
        assert tokenize.stage_encoder(stage_config(tiny_llama_dir)) is None
    finally:
        tokenize._stage_encoder.cache_clear()
