"""Tests of the training stage's token shard reader (`cptflow.token_reader`): order, ranks, shuffle window,
exact resume, refusal of malformed shards, zero-copy, and a Hugging Face Trainer smoke run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

SEQ_LEN = 16
FINGERPRINT = "tok-abc123"


METADATA = {
    "tokenizer_fingerprint": FINGERPRINT,
    "vocab_size": 100,
    "eos_id": 2,
    "bos_id": 1,
    "pad_id": 3,
    "seq_len": SEQ_LEN,
    "seed": 0,
    "version": "0.1.0",
}


def write_shard(
    path: Path,
    rows: np.ndarray,
    *,
    valid=None,
    doc_starts=None,
    fingerprint=FINGERPRINT,
    rows_per_batch=4,
    file_format=False,
) -> Path:
    """A token shard written by the tokenize stage's writer; `file_format` rewrites it as an IPC file."""
    from cptflow.token_shards import write_token_shard

    n, seq_len = rows.shape
    write_token_shard(
        path,
        rows,
        np.full(n, seq_len) if valid is None else np.asarray(valid),
        [np.array([0])] * n if doc_starts is None else [np.array(s) for s in doc_starts],
        np.zeros(n),
        dict(METADATA, tokenizer_fingerprint=fingerprint, seq_len=seq_len),
        rows_per_batch=rows_per_batch,
    )
    if file_format:
        batches = list(pa.ipc.open_stream(path.read_bytes()))
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batches[0].schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
    return path


def numbered_rows(first: int, n: int, seq_len: int = SEQ_LEN) -> np.ndarray:
    """Row i holds first+i in every position, so a sample identifies itself by its first token."""
    return np.repeat(np.arange(first, first + n, dtype=np.uint32)[:, None], seq_len, axis=1)


@pytest.fixture
def shards(tmp_path) -> list[Path]:
    # 3 shards of 10, 7 and 13 samples: 30 in all, batches of 4 rows so blocks end mid-shard too.
    sizes, paths, first = [10, 7, 13], [], 0
    for number, size in enumerate(sizes):
        paths.append(write_shard(tmp_path / f"tokens-{number:05d}.arrow", numbered_rows(first, size)))
        first += size
    return paths


def ids_of(samples) -> list[int]:
    return [int(s["input_ids"][0]) for s in samples]


def test_samples_come_in_curriculum_order(shards):
    from cptflow.token_reader import TokenShardDataset

    ds = TokenShardDataset(shards)
    assert len(ds) == 30
    samples = list(ds)
    assert ids_of(samples) == list(range(30))
    sample = samples[0]
    assert set(sample) == {"input_ids", "labels", "attention_mask"}
    for key in sample:
        assert sample[key].dtype == torch.int64 and sample[key].shape == (SEQ_LEN,)
    assert torch.equal(sample["labels"], sample["input_ids"])  # not shifted: HF models shift


def test_file_format_shards_are_read_like_stream_shards(tmp_path):
    from cptflow.token_reader import TokenShardDataset

    path = write_shard(tmp_path / "tokens-00000.arrow", numbered_rows(0, 9), file_format=True)
    assert ids_of(TokenShardDataset([path])) == list(range(9))


def test_rank_split_is_disjoint_complete_and_equal_length(shards):
    from cptflow.token_reader import TokenShardDataset

    per_rank = [ids_of(TokenShardDataset(shards, rank=r, world_size=4)) for r in range(4)]
    assert [len(ids) for ids in per_rank] == [7, 7, 7, 7]  # 30 // 4; the last 2 positions are dropped
    assert per_rank[1][:3] == [1, 5, 9]
    union = sorted(i for ids in per_rank for i in ids)
    assert union == list(range(28))


def test_shuffle_window_keeps_samples_in_their_window_and_is_deterministic(shards):
    from cptflow.token_reader import TokenShardDataset

    order = ids_of(TokenShardDataset(shards, shuffle_window=8, seed=7))
    assert order != list(range(30))
    for start in range(0, 30, 8):
        assert sorted(order[start : start + 8]) == list(range(start, min(start + 8, 30)))
    assert order == ids_of(TokenShardDataset(shards, shuffle_window=8, seed=7))
    assert order != ids_of(TokenShardDataset(shards, shuffle_window=8, seed=8))

    ds = TokenShardDataset(shards, shuffle_window=8, seed=7)
    ds.set_epoch(1)
    other_epoch = ids_of(ds)
    assert other_epoch != order and sorted(other_epoch[:8]) == list(range(8))


@pytest.mark.parametrize("consumed", [0, 3, 9, 10, 17, 29])  # 9/10: a shard boundary, 17: the next one
@pytest.mark.parametrize("world_size,shuffle_window", [(1, 0), (1, 8), (2, 5)])
def test_resume_yields_exactly_the_remaining_samples(shards, consumed, world_size, shuffle_window):
    from cptflow.token_reader import TokenShardDataset

    def make():
        return TokenShardDataset(
            shards,
            rank=world_size - 1,
            world_size=world_size,
            shuffle_window=shuffle_window,
            seed=3,
            document_mask=True,
        )

    reference = make()
    uninterrupted = list(reference)
    next_epoch = list(reference)
    consumed = min(consumed, len(uninterrupted))
    first = make()
    iterator = iter(first)
    head = [next(iterator) for _ in range(consumed)]
    state = first.state_dict()
    assert state["next_index"] == consumed

    resumed = make()
    resumed.load_state_dict(state)
    tail = list(resumed)
    if consumed == len(uninterrupted):  # the epoch was read to its end: resuming starts the next one
        assert ids_of(head) == ids_of(uninterrupted) and ids_of(tail) == ids_of(next_epoch)
        return
    assert ids_of(head) + ids_of(tail) == ids_of(uninterrupted)
    for got, want in zip(head + tail, uninterrupted):
        for key in want:
            assert torch.equal(got[key], want[key])


def test_resume_through_a_dataloader_with_batches(shards):
    from torch.utils.data import DataLoader

    from cptflow.token_reader import TokenShardDataset

    uninterrupted = torch.cat([b["input_ids"][:, 0] for b in DataLoader(TokenShardDataset(shards), batch_size=4)])
    ds = TokenShardDataset(shards)
    loader = iter(DataLoader(ds, batch_size=4, num_workers=0))
    head = [next(loader)["input_ids"][:, 0] for _ in range(3)]  # 12 samples, crossing shard 0 -> 1
    state = ds.state_dict()
    assert state["next_index"] == 12

    resumed = TokenShardDataset(shards)
    resumed.load_state_dict(state)
    tail = [b["input_ids"][:, 0] for b in DataLoader(resumed, batch_size=4)]
    assert torch.equal(torch.cat(head + tail), uninterrupted)


def test_epochs_advance_after_a_full_pass_and_resume_state_is_checked(shards):
    from cptflow.token_reader import TokenShardDataset

    ds = TokenShardDataset(shards, shuffle_window=8, seed=1)
    first_pass = ids_of(ds)
    assert ds.state_dict()["epoch"] == 1 and ds.state_dict()["next_index"] == 0
    second_pass = ids_of(ds)
    assert sorted(second_pass) == sorted(first_pass) and second_pass != first_pass
    ds.set_epoch(2)  # the current epoch: keeps the position (the Trainer calls it after a resume)
    assert ds.state_dict()["next_index"] == 0

    with pytest.raises(ValueError, match="world_size"):
        TokenShardDataset(shards, world_size=2).load_state_dict(ds.state_dict())
    with pytest.raises(ValueError, match="shuffle_window"):
        TokenShardDataset(shards).load_state_dict(ds.state_dict())


def test_bulk_blocks_match_per_sample_order_and_share_the_position(shards):
    from cptflow.token_reader import TokenShardDataset

    for kwargs in ({}, {"shuffle_window": 8, "seed": 2}, {"rank": 1, "world_size": 3}):
        per_sample = ids_of(TokenShardDataset(shards, **kwargs))
        ds = TokenShardDataset(shards, **kwargs)
        blocks = ds.iter_blocks(6)
        first = next(blocks)
        assert first["input_ids"].dtype == np.uint32 and first["input_ids"].shape == (6, SEQ_LEN)
        assert ds.state_dict()["next_index"] == 6
        rest = list(blocks)
        bulk = [int(r) for b in [first, *rest] for r in b["input_ids"][:, 0]]
        assert bulk == per_sample


def test_padding_is_masked_in_labels_and_attention(tmp_path):
    from cptflow.token_reader import IGNORE_INDEX, TokenShardDataset

    rows = numbered_rows(10, 3)
    rows[2, 5:] = 3  # pad_id
    path = write_shard(tmp_path / "tokens-00000.arrow", rows, valid=[SEQ_LEN, SEQ_LEN, 5])
    last = list(TokenShardDataset([path]))[-1]
    assert last["labels"][:5].tolist() == [12] * 5
    assert (last["labels"][5:] == IGNORE_INDEX).all()
    assert last["attention_mask"].tolist() == [1] * 5 + [0] * (SEQ_LEN - 5)


def test_document_mask_restarts_positions_at_each_document(tmp_path):
    from cptflow.token_reader import TokenShardDataset

    path = write_shard(tmp_path / "tokens-00000.arrow", numbered_rows(0, 2), doc_starts=[[0, 6, 10], [4]])
    first, second = list(TokenShardDataset([path], document_mask=True))
    assert "attention_mask" not in first  # HF derives the packed (per-document) mask from position_ids
    assert first["position_ids"].tolist() == list(range(6)) + list(range(4)) + list(range(6))
    # The second block starts inside a document that began in the previous block.
    assert second["position_ids"].tolist() == list(range(4)) + list(range(12))


def test_wrong_tokenizer_fingerprint_is_refused(shards):
    from cptflow.token_reader import TokenShardDataset, TokenShardError

    with pytest.raises(TokenShardError, match=r"tokens-00000\.arrow.*tokenizer_fingerprint.*'other'"):
        TokenShardDataset(shards, expected={"tokenizer_fingerprint": "other"})
    TokenShardDataset(shards, expected={"tokenizer_fingerprint": FINGERPRINT, "seq_len": SEQ_LEN})


def test_shards_that_disagree_are_refused(shards, tmp_path):
    from cptflow.token_reader import TokenShardDataset, TokenShardError

    other_len = write_shard(tmp_path / "tokens-00009.arrow", numbered_rows(0, 3, 8))
    with pytest.raises(TokenShardError, match=r"tokens-00009\.arrow.*seq_len is 8 .*16"):
        TokenShardDataset([*shards, other_len])
    with pytest.raises(TokenShardError, match="seq_len"):
        TokenShardDataset(shards, expected={"seq_len": 32})
    other_tok = write_shard(tmp_path / "tokens-00010.arrow", numbered_rows(0, 3), fingerprint="zzz")
    with pytest.raises(TokenShardError, match=r"tokens-00010\.arrow.*tokenizer_fingerprint.*must agree"):
        TokenShardDataset([*shards, other_tok])


@pytest.mark.parametrize("file_format", [False, True])
@pytest.mark.parametrize("keep", ["all but 8 bytes", "half", "all but 100 bytes"])
def test_truncated_shard_is_refused(tmp_path, file_format, keep):
    from cptflow.token_reader import TokenShardDataset, TokenShardError

    path = write_shard(tmp_path / "tokens-00000.arrow", numbered_rows(0, 12), file_format=file_format)
    data = path.read_bytes()
    # "all but 8 bytes" of a stream drops just the end-of-stream marker: the cut falls on a batch
    # boundary, pyarrow reads the rest without complaint, so the reader must check the marker itself.
    size = {"all but 8 bytes": len(data) - 8, "half": len(data) // 2, "all but 100 bytes": len(data) - 100}[keep]
    path.write_bytes(data[:size])
    with pytest.raises(TokenShardError, match=r"tokens-00000\.arrow.*truncated"):
        TokenShardDataset([path])


def test_garbage_and_foreign_files_are_refused(tmp_path):
    from cptflow.token_reader import TokenShardDataset, TokenShardError

    garbage = tmp_path / "tokens-00000.arrow"
    garbage.write_bytes(b"this is not arrow at all" * 10)
    with pytest.raises(TokenShardError, match=r"tokens-00000\.arrow.*not an Arrow IPC"):
        TokenShardDataset([garbage])
    empty = tmp_path / "tokens-00001.arrow"
    empty.write_bytes(b"")
    with pytest.raises(TokenShardError, match=r"tokens-00001\.arrow.*too short"):
        TokenShardDataset([empty])
    foreign = tmp_path / "tokens-00002.arrow"  # valid Arrow, but not written by the tokenize stage
    with pa.OSFile(str(foreign), "wb") as sink, pa.ipc.new_stream(sink, pa.schema([("x", pa.int64())])) as w:
        w.write_batch(pa.record_batch([pa.array([1, 2])], names=["x"]))
    with pytest.raises(TokenShardError, match=r"tokens-00002\.arrow.*lacks cptflow\."):
        TokenShardDataset([foreign])
    with pytest.raises(TokenShardError, match="missing"):
        TokenShardDataset([tmp_path / "missing.arrow"])


def test_rows_are_zero_copy_views_of_the_memory_map(shards):
    from cptflow.token_reader import TokenShardDataset

    ds = TokenShardDataset(shards)
    mmap = ds._mmaps[1]
    mmap.seek(0)
    mapped = np.frombuffer(mmap.read_buffer(), dtype=np.uint8)  # read_buffer on a memory map: no copy
    view = ds.row(12)  # shard 1, row 2
    assert view[0] == 12 and view.base is not None
    assert np.shares_memory(view, mapped)
    block = next(ds.iter_blocks(4))["input_ids"]  # one whole record batch: a slice of the map
    mmap0 = ds._mmaps[0]
    mmap0.seek(0)
    assert np.shares_memory(block, np.frombuffer(mmap0.read_buffer(), dtype=np.uint8))


def test_dataloader_workers_are_refused_with_a_clear_error(shards):
    from torch.utils.data import DataLoader

    from cptflow.token_reader import TokenShardDataset

    with pytest.raises(RuntimeError, match="num_workers"):
        next(iter(DataLoader(TokenShardDataset(shards), batch_size=2, num_workers=1)))


def test_hf_trainer_trains_on_the_dataset(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from cptflow.token_reader import TokenShardDataset

    rng = np.random.default_rng(0)
    paths = [
        write_shard(tmp_path / f"tokens-{i:05d}.arrow", rng.integers(4, 100, (6, SEQ_LEN)), valid=[SEQ_LEN] * 5 + [9])
        for i in range(2)
    ]
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    for document_mask in (False, True):
        ds = TokenShardDataset(paths, document_mask=document_mask)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"out-{document_mask}"),
            max_steps=2,
            per_device_train_batch_size=4,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
        )
        result = Trainer(model=model, args=args, train_dataset=ds).train()
        assert result.global_step == 2 and np.isfinite(result.training_loss)
        assert ds.state_dict()["next_index"] >= 8  # the Trainer read at least 2 batches of 4


def test_pickling_reopens_the_maps_and_keeps_the_position(shards):
    import pickle

    from cptflow.token_reader import TokenShardDataset

    ds = TokenShardDataset(shards, shuffle_window=8, seed=4)
    iterator = iter(ds)
    head = [next(iterator) for _ in range(5)]
    payload = pickle.dumps(ds)
    assert len(payload) < 10_000  # paths and position, not the shards' tokens
    copy = pickle.loads(payload)
    assert ids_of(head) + ids_of(copy) == ids_of(TokenShardDataset(shards, shuffle_window=8, seed=4))


def test_unknown_expected_key_is_a_usage_error(shards):
    from cptflow.token_reader import TokenShardDataset

    with pytest.raises(ValueError, match="unknown metadata keys"):
        TokenShardDataset(shards, expected={"tokenizer": FINGERPRINT})
