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
from cptflow.tokenization import document_token_ids  # noqa: E402

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


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory):
    """The Qwen2.5 stand-in of tests/families.py: NFC, Qwen's split regex, special and non-special added tokens."""
    from families import build_family
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(build_family("qwen2.5", tmp_path_factory.mktemp("families"))))


def added_token_texts(tokenizer, texts: list[str]) -> list[str]:
    """Sample texts with every added token (special or not) spliced in: inside words, adjacent to each
    other, at the ends, next to a combining accent (NFC runs on the pieces between tokens)."""
    tokens = [token.content for token in tokenizer.added_tokens_decoder.values()]
    rng = random.Random(0)
    spliced = []
    for index, text in enumerate(texts[:300]):
        cut = rng.randrange(len(text) + 1)
        a, b = rng.choice(tokens), rng.choice(tokens)
        spliced.append(text[:cut] + a + b + text[cut:] + (tokens[index % len(tokens)] if index % 2 else ""))
    spliced += [
        "<tool_call>",
        "<tool_call></tool_call><|im_start|><tool_call>",
        "e\u0301<tool_call>\u0301e",
        "<|fim_prefix|>def f():<|fim_suffix|>\n    return 1<|fim_middle|>",
        "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
        "<tool_call<tool_call>>",
    ]
    return spliced


def test_non_special_added_tokens_are_matched_as_hf_matches_them(qwen_like, texts):
    """Qwen's non-special added tokens (<tool_call>, <|fim_prefix|>, ...) are found in any text, even with
    split_special_tokens; its special ones stay text. The fast path splits on them as HF does."""
    assert any(not token.special for token in qwen_like.added_tokens_decoder.values())
    encoder, why = fast_bpe.convert(qwen_like)
    assert why == "" and encoder.added is not None
    assert fast_bpe.verify(encoder, qwen_like) == ""
    sample = texts + added_token_texts(qwen_like, texts)
    tokens, lengths = encoder.encode_documents(sample, qwen_like.eos_token_id)
    expected = document_token_ids(sample, qwen_like)
    assert fast_bpe.differing_documents(tokens, lengths, expected, range(len(sample))) == []
    tool_call = qwen_like.convert_tokens_to_ids("<tool_call>")
    assert int((tokens == tool_call).sum()) >= 8  # the added token's own id, not its pieces
    assert fast_bpe.choose_encoder(qwen_like)[1] == ""


@pytest.mark.parametrize("option", ["single_word", "lstrip", "rstrip"])
def test_added_tokens_with_matching_options_fall_back_with_the_reason(option, texts):
    from tokenizers import AddedToken

    tokenizer = train(texts[:200], pre_tokenizers.ByteLevel(add_prefix_space=False), vocab_size=400)
    tokenizer.add_tokens([AddedToken("<tool_call>", special=False, **{option: True})])
    assert fast_bpe.convert(tokenizer) == (None, f"non-special added token '<tool_call>' with {option}")
    assert fast_bpe.choose_encoder(tokenizer) == (None, f"non-special added token '<tool_call>' with {option}")


def test_normalized_added_tokens_are_matched_after_the_normalizer(texts):
    """transformers' add_tokens makes normalized tokens: matched on the NFC pieces, after the raw ones."""
    tokenizer = train(texts[:300], pre_tokenizers.ByteLevel(add_prefix_space=False), normalizers.NFC(), 500)
    tokenizer.add_tokens(["caf\u00e9", "<tool_call>"])
    encoder, why = fast_bpe.convert(tokenizer)
    assert why == ""
    sample = ["a cafe\u0301 and a caf\u00e9<tool_call>x", "<tool_call>cafe\u0301"] + texts[:100]
    tokens, lengths = encoder.encode_documents(sample, tokenizer.eos_token_id)
    expected = document_token_ids(sample, tokenizer)
    assert fast_bpe.differing_documents(tokens, lengths, expected, range(len(sample))) == []


def test_choose_encoder_says_why_not(texts):
    tokenizer = train(texts[:200], pre_tokenizers.ByteLevel(add_prefix_space=False), vocab_size=400)
    assert fast_bpe.choose_encoder(tokenizer, "huggingface") == (None, "tokenize.encoder = huggingface")
    encoder, why = fast_bpe.choose_encoder(tokenizer)
    assert why == "" and encoder is not None
    tokenizer.eos_token = None
    assert fast_bpe.choose_encoder(tokenizer) == (None, "the tokenizer has no EOS token")


def _with(core: Tokenizer, pre_tokenizer) -> Tokenizer:
    core.pre_tokenizer = pre_tokenizer
    return core
