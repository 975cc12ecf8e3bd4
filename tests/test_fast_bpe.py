"""The tiktoken fast path gives exactly the Hugging Face tokenizer's ids, or says why it cannot."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from cptflow import fast_bpe  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
# Llama 3's split pattern (tokenizer.json of meta-llama/Meta-Llama-3-8B).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def sample_texts() -> list[str]:
    """Every text of the sample corpora (dirty web pages, other languages, guidelines, instructions)."""
    texts: list[str] = []
    for path in sorted(DATA.rglob("*")):
        if path.suffix == ".txt":
            texts.append(path.read_text(encoding="utf-8"))
        elif path.name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        texts.append(line)  # the dirty shard's broken lines are text too
                        continue
                    texts.extend(v for v in (record.values() if isinstance(record, dict) else []) if isinstance(v, str))
    return texts + fast_bpe.PROBE_TEXTS


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return sample_texts()


def train(texts: list[str], pre_tokenizer, normalizer=None, vocab_size: int = 1500, shuffle_ids: bool = False):
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        core.normalizer = normalizer
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(
        texts[::3],
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    if shuffle_ids:  # ids no longer in merge order: the encoder must map ranks to ids
        spec = json.loads(core.to_str())
        vocab = spec["model"]["vocab"]
        pieces = sorted((p for p, i in vocab.items() if i >= len(SPECIALS)), key=vocab.get)
        ids = list(range(len(SPECIALS), len(SPECIALS) + len(pieces)))
        random.Random(0).shuffle(ids)
        vocab.update(zip(pieces, ids))
        core = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def test_gpt2_style_tokenizer_converts_and_agrees_on_every_sample_text(texts):
    tokenizer = train(texts, pre_tokenizers.ByteLevel(add_prefix_space=False))
    encoder, why = fast_bpe.convert(tokenizer)
    assert why == "" and encoder.rank_to_id is None and encoder.prefix == [1] and encoder.suffix == []
    assert fast_bpe.verify(encoder, tokenizer, texts) == ""


def test_llama3_style_split_nfc_and_shuffled_ids_agree(texts):
    tokenizer = train(
        texts,
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        normalizer=normalizers.NFC(),
        shuffle_ids=True,
    )
    encoder, why = fast_bpe.convert(tokenizer)
    assert why == "" and encoder.rank_to_id is not None and encoder.nfc
    decomposed = ["Cafe\u0301 re\u0301sume\u0301 \u0041\u030a"]  # NFC composes these before splitting
    assert fast_bpe.verify(encoder, tokenizer, texts + decomposed) == ""


def test_verify_catches_a_different_split_pattern(texts):
    tokenizer = train(texts, pre_tokenizers.ByteLevel(add_prefix_space=False))
    encoder, _ = fast_bpe.convert(tokenizer)
    import tiktoken

    ranks = encoder.encoding._mergeable_ranks
    encoder.encoding = tiktoken.Encoding("wrong", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={})
    assert "encodes differently" in fast_bpe.verify(encoder, tokenizer)


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda: Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")), "model type 'WordPiece'"),
        (
            lambda: _with(
                Tokenizer(models.BPE({"<unk>": 0, "a": 1}, [], unk_token="<unk>", byte_fallback=True)),
                pre_tokenizers.Metaspace(),
            ),
            "byte_fallback",
        ),
        (
            lambda: _with(
                Tokenizer(models.BPE({"<unk>": 0, "a": 1}, [], unk_token="<unk>")), pre_tokenizers.Metaspace()
            ),
            "pre-tokenizer 'Metaspace'",
        ),
        (
            lambda: _with(
                Tokenizer(models.BPE({"<unk>": 0, "a": 1}, [], unk_token="<unk>")),
                pre_tokenizers.ByteLevel(add_prefix_space=True),
            ),
            "add_prefix_space",
        ),
    ],
)
def test_tokenizers_without_an_exact_equivalent_are_refused_with_a_reason(build, reason):
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=build(), unk_token=None)
    encoder, why = fast_bpe.convert(tokenizer)
    assert encoder is None and reason in why


def test_non_special_added_tokens_are_refused(texts):
    tokenizer = train(texts[:200], pre_tokenizers.ByteLevel(add_prefix_space=False), vocab_size=400)
    tokenizer.add_tokens(["<tool_call>"])  # HF matches it even with split_special_tokens
    assert fast_bpe.convert(tokenizer) == (None, "non-special added tokens")


def _with(core: Tokenizer, pre_tokenizer) -> Tokenizer:
    core.pre_tokenizer = pre_tokenizer
    return core
