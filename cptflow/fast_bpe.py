"""A tiktoken encoder that gives the same ids as a Hugging Face byte-level BPE tokenizer.

The tokenize stage spends nearly all its time in the tokenizer. For byte-level BPE (the GPT-2,
Llama 3 and Qwen2 families) tiktoken runs the same algorithm: split with the same regex, map
bytes, merge the lowest-ranked pair first. It builds no `Encoding` objects (offsets, masks, word
alignments), and it is 2-3x faster than the HF fast tokenizer on the same cores.

Only tokenizer.json files whose every part has an exact tiktoken equivalent are converted;
`convert` returns the reason when one does not. Ids are then checked against the HF tokenizer
on a probe text (`verify`) and, by the tokenize stage, on a sample of every batch, so a
difference falls back to the HF tokenizer instead of changing the token stream.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from cptflow.tokenization import document_token_ids

# HF's ByteLevel pre-tokenizer with use_regex=True (the GPT-2 pattern, as tiktoken writes it).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# What `verify` encodes both ways: contractions, digit runs, whitespace runs and line ends,
# punctuation, accents (composed and decomposed), CJK, Thai, emoji, and special-token text.
PROBE_TEXTS = [
    "Hello world! It's 2026; we'll see: they've, I'm, you'd, she's -- fine.",
    "  leading spaces\n\n\ttabs and   runs of    spaces   \r\nwindows line\u00a0nbsp end  ",
    "1234567890 3.14159 1,000,000 0x1F 2026-12-01 12:30:45 +49 (0)30 1234",
    (
        "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 Cafe\u0301 \u00dcbergr\u00f6\u00dfe "
        "\u0141\u00f3d\u017a \u0391\u03b8\u03ae\u03bd\u03b1 \u041c\u043e\u0441\u043a\u0432\u0430"
    ),
    (
        "\u4eca\u65e5\u306f\u3044\u3044\u5929\u6c17\u3067\u3059\u3002\u6e05\u534e\u5927\u5b66 \ud55c\uad6d\uc5b4 "
        "\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 "
        "\u05e2\u05d1\u05e8\u05d9\u05ea"
    ),
    (
        "emoji \U0001f600\U0001f44d\U0001f3fd zwj \U0001f468\u200d\U0001f469\u200d\U0001f467 "
        "math \u2211\u221e\u2248 <s></s><pad><|endoftext|>"
    ),
    "def f(x):\n    return {'a': [1, 2], \"b\": x ** 2}  # comment\n\n\n",
    "",
    " ",
    "a",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to the printable characters byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


CHECK_EVERY = 100  # tokenize and mix compare the fast encoder's ids with the tokenizer's on every 100th document


class EncoderMismatch(RuntimeError):
    """The fast encoder and the tokenizer gave different ids for a document."""


@dataclass
class AddedTokenSplit:
    """HF's added-token extraction, for tokens matched as whole tokens before the model sees the text.

    As the Rust AddedVocabulary does it: leftmost-longest matches of the tokens with normalized=false on
    the raw text, then the normalizer on each remaining piece, then matches of the normalized=true
    tokens. Special tokens take part in matching but, as under split_special_tokens, stay text.
    """

    raw: re.Pattern | None
    normalized: re.Pattern | None
    ids: dict[str, int | None]  # content -> id; None for special tokens (text)
    nfc: bool

    @classmethod
    def build(cls, added: list[dict], nfc: bool) -> "AddedTokenSplit":
        def pattern(tokens: list[dict]) -> re.Pattern | None:
            contents = sorted({t["content"] for t in tokens}, key=lambda c: (-len(c), c))
            return re.compile("|".join(map(re.escape, contents))) if contents else None

        ids = {t["content"]: (None if t.get("special") else t["id"]) for t in added}
        return cls(
            pattern([t for t in added if not t.get("normalized")]),
            pattern([t for t in added if t.get("normalized")]),
            ids,
            nfc,
        )

    def _split(self, text: str, pattern: re.Pattern | None) -> list[str | int]:
        if pattern is None:
            return [text]
        parts: list[str | int] = []
        start = 0
        for match in pattern.finditer(text):
            token_id = self.ids[match.group()]
            if token_id is None:  # a special token: text, and no other token matches inside it
                continue
            parts += [text[start : match.start()], token_id]
            start = match.end()
        parts.append(text[start:])
        return parts

    def split(self, text: str) -> list[str | int]:
        """The text as pieces to encode (str, normalized) and added-token ids (int), in order."""
        parts: list[str | int] = []
        for part in self._split(text, self.raw):
            if isinstance(part, str):
                if self.nfc and not unicodedata.is_normalized("NFC", part):
                    part = unicodedata.normalize("NFC", part)
                parts += self._split(part, self.normalized)
            else:
                parts.append(part)
        return parts


@dataclass
class FastEncoder:
    """Documents -> the HF tokenizer's ids with its special tokens, plus EOS, as one flat array."""

    encoding: object  # tiktoken.Encoding over ranks
    rank_to_id: np.ndarray | None  # None when ranks are the HF ids
    prefix: list[int]  # what the tokenizer adds before a text (BOS for Llama-style tokenizers)
    suffix: list[int]  # what it adds after (usually nothing); EOS is appended after this
    nfc: bool  # the tokenizer's normalizer is NFC
    threads: int = min(8, os.cpu_count() or 1)
    added: AddedTokenSplit | None = field(default=None)  # set when non-special added tokens must be matched

    def _encode_ordinary(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids uint32, lengths int64) of plain texts (no added-token matching), ranks mapped to ids."""
        rows = self.encoding.encode_ordinary_batch(texts, num_threads=self.threads)
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        ids = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.uint32, count=int(lengths.sum()))
        if self.rank_to_id is not None:
            ids = self.rank_to_id[ids]
        return ids, lengths

    def _encode_with_added(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """As _encode_ordinary, the texts first split on the added tokens (whose ids go in between)."""
        parts_of = [self.added.split(text) for text in texts]
        pieces = [part for parts in parts_of for part in parts if isinstance(part, str)]
        ids, lengths = self._encode_ordinary(pieces)
        encoded = iter(np.split(ids, np.cumsum(lengths)[:-1]) if len(pieces) else [])
        bodies = [
            np.concatenate(
                [next(encoded) if isinstance(p, str) else np.asarray([p], dtype=np.uint32) for p in parts]
                or [np.zeros(0, np.uint32)]
            ).astype(np.uint32, copy=False)
            for parts in parts_of
        ]
        body_lengths = np.fromiter(map(len, bodies), dtype=np.int64, count=len(bodies))
        body = np.concatenate(bodies) if bodies else np.zeros(0, np.uint32)
        return body, body_lengths

    def encode_documents(self, texts: list[str], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens uint32, lengths int64): each document as prefix + text ids + suffix + EOS."""
        if self.added is not None:
            body, body_lengths = self._encode_with_added(texts)
        else:
            if self.nfc:
                texts = [t if unicodedata.is_normalized("NFC", t) else unicodedata.normalize("NFC", t) for t in texts]
            body, body_lengths = self._encode_ordinary(texts)
        head = np.asarray(self.prefix, dtype=np.uint32)
        tail = np.asarray([*self.suffix, eos_id], dtype=np.uint32)
        lengths = body_lengths + len(head) + len(tail)
        tokens = np.empty(int(lengths.sum()), dtype=np.uint32)
        # Position of every output token inside its document decides where it comes from.
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        position = np.arange(len(tokens), dtype=np.int64) - starts
        body_end = len(head) + np.repeat(body_lengths, lengths)
        in_head, in_tail = position < len(head), position >= body_end
        tokens[in_head] = head[position[in_head]]
        tokens[in_tail] = tail[(position - body_end)[in_tail]]
        tokens[~(in_head | in_tail)] = body
        return tokens, lengths


def convert(tokenizer, threads: int | None = None) -> tuple[FastEncoder | None, str]:
    """(encoder, "") when the tokenizer has an exact tiktoken equivalent, else (None, why not)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer"
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed"
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None, f"model type {model.get('type')!r} (only byte-level BPE converts)"
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return None, f"BPE {key} = {model.get(key)!r}"
    if model.get("byte_fallback"):
        return None, "byte_fallback BPE (SentencePiece style)"
    pattern, why = _split_pattern(spec.get("pre_tokenizer"))
    if pattern is None:
        return None, why
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        return None, f"normalizer {normalizer.get('type')!r}"
    added = spec.get("added_tokens") or []
    # With split_special_tokens special added tokens are plain text; other added tokens (Qwen's
    # <tool_call>, <|fim_prefix|>, ...) are still matched by HF before the model sees the text, and
    # are matched the same way here (AddedTokenSplit), unless a matching option has no equivalent.
    plain = [token for token in added if not token.get("special")]
    for token in plain:
        options = [key for key in ("single_word", "lstrip", "rstrip") if token.get(key)]
        if options:
            return None, f"non-special added token {token['content']!r} with {', '.join(options)}"

    char_of = bytes_to_unicode()
    byte_of = {char: byte for byte, char in char_of.items()}
    added_ids = {token["id"] for token in added}
    vocab = {piece: index for piece, index in model["vocab"].items() if index not in added_ids}
    try:
        as_bytes = {piece: bytes(byte_of[char] for char in piece) for piece in vocab}
    except KeyError:
        return None, "vocabulary is not written in byte-level characters"
    # Ranks: the 256 bytes first, then each merge in its priority order (tiktoken merges the
    # pair whose merged bytes have the lowest rank, HF the pair with the lowest merge index).
    ranks: dict[bytes, int] = {}
    rank_to_id: list[int] = []
    for byte in range(256):
        piece = char_of[byte]
        if piece not in vocab:
            return None, f"byte {byte} has no token"
        ranks[bytes([byte])] = len(rank_to_id)
        rank_to_id.append(vocab[piece])
    for merge in model.get("merges") or []:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = as_bytes.get(left + right)
        if merged is None or merged in ranks:
            return None, f"merge {left!r} + {right!r} makes no new vocabulary token"
        ranks[merged] = len(rank_to_id)
        rank_to_id.append(vocab[left + right])
    if len(ranks) != len(vocab):
        return None, f"{len(vocab) - len(ranks)} vocabulary tokens are made by no merge"

    mapping = np.asarray(rank_to_id, dtype=np.uint32)
    # When merge results have rising ids (as trainers assign them) the ids themselves are valid
    # ranks: tiktoken never compares the ranks of single bytes, only of merged pieces.
    ids_are_ranks = bool(np.all(np.diff(mapping[256:].astype(np.int64)) > 0))
    if ids_are_ranks:
        ranks = {piece: int(mapping[rank]) for piece, rank in ranks.items()}
    encoding = tiktoken.Encoding(
        name="cptflow-" + str(getattr(tokenizer, "name_or_path", "tokenizer")),
        pat_str=pattern,
        mergeable_ranks=ranks,
        special_tokens={},
    )
    prefix, suffix = _special_frame(tokenizer)
    if prefix is None:
        return None, "the tokenizer's special tokens are not a fixed prefix and suffix"
    encoder = FastEncoder(encoding, None if ids_are_ranks else mapping, prefix, suffix, normalizer is not None)
    if plain:
        encoder.added = AddedTokenSplit.build(added, nfc=normalizer is not None)
    if threads:
        encoder.threads = threads
    return encoder, ""


def _split_pattern(pre_tokenizer: dict | None) -> tuple[str | None, str]:
    """The regex tiktoken must split with, for the two byte-level layouts in use."""
    if pre_tokenizer is None:
        return None, "no pre-tokenizer"
    kind = pre_tokenizer.get("type")
    if kind == "ByteLevel":  # GPT-2 style
        if pre_tokenizer.get("add_prefix_space"):
            return None, "ByteLevel add_prefix_space"
        if not pre_tokenizer.get("use_regex", True):
            return None, "ByteLevel without a split regex"
        return GPT2_PATTERN, ""
    if kind == "Sequence":  # Llama 3 / Qwen2 style: Split(regex, Isolated) then ByteLevel(no regex)
        parts = pre_tokenizer.get("pretokenizers") or []
        if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel":
            split, byte_level = parts
            regex = (split.get("pattern") or {}).get("Regex")
            if (
                regex
                and split.get("behavior") == "Isolated"
                and not split.get("invert")
                and not byte_level.get("add_prefix_space")
                and not byte_level.get("use_regex", True)
            ):
                return regex, ""
        return None, "pre-tokenizer sequence other than Split(regex, Isolated) + ByteLevel"
    return None, f"pre-tokenizer {kind!r}"


def _special_frame(tokenizer) -> tuple[list[int] | None, list[int]]:
    """Ids the tokenizer adds around a text, found by encoding one text with and without them."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain) :]
    return None, []


def verify(encoder: FastEncoder, tokenizer, texts: list[str] | None = None) -> str:
    """ "" when the encoder and the tokenizer agree on every text (PROBE_TEXTS by default), else
    the first text where they differ."""
    texts = PROBE_TEXTS if texts is None else texts
    tokens, lengths = encoder.encode_documents(texts, tokenizer.eos_token_id)
    differing = differing_documents(tokens, lengths, document_token_ids(texts, tokenizer), range(len(texts)))
    if differing:
        return f"text {differing[0]} ({texts[differing[0]][:40]!r}) encodes differently"
    return ""


def differing_documents(tokens: np.ndarray, lengths: np.ndarray, expected: list[list[int]], indices) -> list[int]:
    """Of `indices`, the documents whose slice of the flat `tokens` differs from `expected` (one
    row of ids per index, in the same order)."""
    starts = np.cumsum(lengths) - lengths
    return [
        index
        for index, ids in zip(indices, expected)
        if tokens[starts[index] : starts[index] + lengths[index]].tolist() != ids
    ]


def choose_encoder(tokenizer, choice: str = "auto") -> tuple[FastEncoder | None, str]:
    """(encoder, "") when the tokenizer converts exactly and agrees on the probe texts, else (None, why):
    what tokenize and mix use, so both count and make the same ids. `choice` is `tokenize.encoder`."""
    if choice == "huggingface":
        return None, "tokenize.encoder = huggingface"
    if tokenizer.eos_token_id is None:
        return None, "the tokenizer has no EOS token"
    encoder, why = convert(tokenizer)
    if encoder is not None:
        why = verify(encoder, tokenizer)
    return (None, why) if why else (encoder, "")


def encode_checked(encoder: FastEncoder, texts: list[str], tokenizer) -> tuple[np.ndarray, np.ndarray, int]:
    """`encoder.encode_documents` with every CHECK_EVERY-th document also encoded by the tokenizer itself:
    (tokens, lengths, documents checked). A difference raises EncoderMismatch rather than change the ids."""
    tokens, lengths = encoder.encode_documents(texts, tokenizer.eos_token_id)
    sample = range(0, len(texts), CHECK_EVERY)
    if differing := differing_documents(
        tokens, lengths, document_token_ids([texts[i] for i in sample], tokenizer), sample
    ):
        index = differing[0]
        raise EncoderMismatch(
            f"fast encoder and tokenizer disagree on document {index} of the batch ({texts[index][:60]!r})"
        )
    return tokens, lengths, len(sample)
