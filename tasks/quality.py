"""Quality filters: language id, Gopher quality and repetition rules, C4 rules, MinHash near-duplicates.

Second stage of the DAG (clean -> **quality** -> perplexity -> mix -> ...): every filter maps a document
to `(keep, reason)` and the caller counts the reasons (DataTrove style).
"""

from __future__ import annotations

import functools
import itertools
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from datasketch import MinHash
from langdetect import DetectorFactory
from langdetect.detector import Detector
from langdetect.detector_factory import PROFILES_DIRECTORY
from langdetect.lang_detect_exception import LangDetectException
from langdetect.utils.ngram import NGram
from pydantic import BaseModel, ConfigDict, Field

from cptflow.docshards import (
    JsonlWriter,
    ShardCounts,
    load_finished_shard,
    mark_shard_finished,
    read_documents,
    shard_work_file,
)
from cptflow.near_dedup import (
    band_candidate_pairs,
    duplicates_to_drop,
    load_shard_arrays,
    sorted_band_keys,
    split_positions,
    write_band_pairs,
    write_sorted_band_keys,
)
from cptflow.stage import (
    FINALIZE,
    Artifact,
    commit_finalized,
    counts_artifact,
    finalize_item,
    plan_finalize,
    upstream_shard_path,
    upstream_shards,
)
from cptflow.store import atomic_path

# Unseeded langdetect is random ("Hello world, ok" -> nl in 49/50 runs). Our own factory below also
# carries seed 0 as an instance attribute, so code elsewhere resetting the class attribute cannot
# make this module non-deterministic.
DetectorFactory.seed = 0

Filter = Callable[[dict], tuple[bool, str | None]]


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


class LanguageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    allowed: list[str] = Field(
        default=["en"], description="langdetect codes to keep (en, de, fr, zh-cn, ...); empty = any language"
    )
    min_probability: float = Field(
        default=0.65, ge=0.0, le=1.0, description="minimum probability (0-1) of the top language (DataTrove: 0.65)"
    )
    min_chars: int = Field(
        default=100,
        ge=0,
        description="texts shorter than this (characters, stripped) are not identified: too few n-grams to trust",
    )
    keep_short: bool = Field(
        default=False,
        description="keep texts shorter than min_chars (language 'unknown') instead of dropping them with "
        "too_short_for_language_id; off because such texts are useless for CPT and Gopher's 50-word minimum "
        "would drop them anyway (this way the manifest says why)",
    )
    sample_chars: int = Field(
        default=1200,
        ge=50,
        description="characters of the text that are scored: longer texts are sampled as evenly spaced windows "
        "(langdetect's cost grows with length; 1200 characters agree with the full text on >99% of documents)",
    )
    sample_windows: int = Field(default=3, ge=1, description="number of evenly spaced windows in the sample")
    backend: Literal["naive_bayes", "langdetect"] = Field(
        default="naive_bayes",
        description="naive_bayes: deterministic vectorised scorer over langdetect's own n-gram profiles (fast); "
        "langdetect: langdetect's seeded random-trial detector on the same sample (reference, slower)",
    )
    evidence_ngrams: int = Field(
        default=30,
        ge=1,
        description="naive_bayes only: the posterior is computed from the mean per-n-gram log-likelihood times "
        "this many n-grams, so language_score measures how decisive the text is, not how long it is "
        "(langdetect's trials likewise stop after a bounded number of n-grams). 30 makes as many mixed-language "
        "documents fall below 0.65 as langdetect does (45 vs 41 of 300 en+de/fr/es mixtures)",
    )


class GopherQualityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    min_words: int = Field(default=50, ge=0, description="minimum words (non-symbol words; CJK: characters)")
    max_words: int = Field(default=100_000, ge=1, description="maximum words")
    min_mean_word_length: float = Field(default=3.0, ge=0, description="minimum mean word length (characters)")
    max_mean_word_length: float = Field(default=10.0, ge=0, description="maximum mean word length (characters)")
    max_symbol_word_ratio: float = Field(
        default=0.1, ge=0, description="maximum '#' per word, and maximum ellipses ('...' or '…') per word"
    )
    max_bullet_lines_ratio: float = Field(
        default=0.9, ge=0, le=1, description="maximum fraction (0-1) of non-empty lines starting with a bullet"
    )
    max_ellipsis_lines_ratio: float = Field(
        default=0.3, ge=0, le=1, description="maximum fraction (0-1) of non-empty lines ending with an ellipsis"
    )
    min_alpha_words_ratio: float = Field(
        default=0.8, ge=0, le=1, description="minimum fraction (0-1) of words containing at least one letter"
    )
    min_stop_words: int = Field(
        default=2,
        ge=0,
        description="minimum stop-word occurrences; checked only for languages in stop_words (a document "
        "without a detected language is treated as English, as DataTrove does)",
    )
    stop_words: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "en": ["the", "be", "to", "of", "and", "that", "have", "with"],
            "de": ["der", "die", "das", "und", "zu", "von", "mit", "ist", "den", "nicht"],
            "fr": ["le", "la", "les", "de", "et", "à", "que", "est", "des", "un"],
            "es": ["el", "la", "de", "que", "y", "en", "los", "es", "del", "se"],
        },
        description="per-language stop words (lowercase) for the min_stop_words rule",
    )


class GopherRepetitionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_dup_line_fraction: float = Field(default=0.3, ge=0, description="duplicate lines / non-empty lines")
    max_dup_para_fraction: float = Field(default=0.3, ge=0, description="duplicate paragraphs / paragraphs")
    max_dup_line_chars: float = Field(default=0.2, ge=0, description="characters in duplicate lines / text length")
    max_dup_para_chars: float = Field(default=0.2, ge=0, description="characters in duplicate paragraphs / text length")
    top_ngrams: list[tuple[int, float]] = Field(
        default=[(2, 0.20), (3, 0.18), (4, 0.16)],
        description="(n, max fraction): word characters covered by the most frequent n-gram / word characters",
    )
    dup_ngrams: list[tuple[int, float]] = Field(
        default=[(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)],
        description="(n, max fraction): word characters covered by repeated n-gram occurrences / word characters",
    )


class C4Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    filter_lorem_ipsum: bool = Field(default=True, description="drop documents containing 'lorem ipsum'")
    filter_curly_bracket: bool = Field(
        default=True, description="drop documents containing '{' (turn off for code or LaTeX domains)"
    )
    min_sentences: int = Field(
        default=5, ge=0, description="minimum sentences (runs of . ! ? … 。 ！ ？ ending a sentence)"
    )
    max_word_length: int = Field(
        default=1000, ge=1, description="drop documents with a whitespace-separated word longer than this (chars)"
    )
    remove_lines: bool = Field(
        default=False,
        description="C4 line removal (no terminal punctuation, < min_words_per_line words, 'javascript', "
        "cookie/privacy policy); off by default because it destroys headings, tables and lists of domain text. "
        "When on, the filter rewrites doc['text'] of kept documents",
    )
    min_words_per_line: int = Field(default=3, ge=0, description="remove_lines only: minimum words per line")


class MinHashConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=True,
        description="near-duplicate removal across the corpus (applied by the stage, not by build_filters)",
    )
    ngram_words: int = Field(default=5, ge=1, description="words per shingle (CJK: characters)")
    num_buckets: int = Field(
        default=14,
        ge=1,
        description="LSH bands; with 8 rows a pair becomes a candidate with probability 1-(1-J^8)^14: "
        "0.50 at Jaccard 0.68, 0.92 at 0.8",
    )
    rows_per_bucket: int = Field(default=8, ge=1, description="hashes per band")
    seed: int = Field(default=1, description="seed of the MinHash permutations (fixed: signatures are comparable)")
    jaccard_threshold: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="confirm each candidate pair by the estimated Jaccard similarity of its signatures "
        "(fraction 0-1, NeMo Curator's false-positive check); unset: every pair sharing a band is a duplicate",
    )


class QualityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    language: LanguageConfig = LanguageConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    c4: C4Config = C4Config()
    minhash: MinHashConfig = MinHashConfig()
    non_space_script_fraction: float = Field(
        default=0.3,
        ge=0,
        le=1,
        description="fraction (0-1) of non-space characters in CJK/Thai/Lao/Khmer/Myanmar scripts above which a "
        "document is treated as unsegmented: each such character counts as a word, and word-length and "
        "stop-word rules are skipped",
    )


# ---------------------------------------------------------------------------------------------
# Words, lines, scripts
# ---------------------------------------------------------------------------------------------

# Scripts written without spaces between words (Hangul is spaced, so it is not here).
_NON_SPACE_CHARS = (
    "\u0e00-\u0eff"  # Thai, Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
    "\U00020000-\U0003134f"
)
_NON_SPACE_RE = re.compile(f"[{_NON_SPACE_CHARS}]")
_UNSEGMENTED_UNITS_RE = re.compile(f"[{_NON_SPACE_CHARS}]|[^\\s{_NON_SPACE_CHARS}]+")
_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~«»“”„‘’‚‹›…–—·¡¿、。，．！？：；（）「」『』【】《》"
_BULLETS = ("•", "-", "*", "●", "◦", "‣", "–", "·")
_PARAGRAPH_RE = re.compile(r"\n\s*\n")


def is_unsegmented(text: str, threshold: float) -> bool:
    """True when more than `threshold` of the non-space characters are CJK/Thai/... (no spaces between words)."""
    if text.isascii() or not _NON_SPACE_RE.search(text):
        return False
    non_space = len("".join(text.split()))
    return non_space > 0 and len(_NON_SPACE_RE.findall(text)) / non_space > threshold


def split_words(text: str, unsegmented: bool) -> list[str]:
    """Whitespace tokens; in unsegmented scripts every CJK/Thai/... character is a word of its own."""
    return _UNSEGMENTED_UNITS_RE.findall(text) if unsegmented else text.split()


def _non_empty_lines(text: str) -> list[str]:
    return [line for line in (raw.strip() for raw in text.split("\n")) if line]


# ---------------------------------------------------------------------------------------------
# Language identification
# ---------------------------------------------------------------------------------------------


def _gram_key(gram: str) -> int:
    # A 1-3 character n-gram as one exact integer: 21 bits per code point (all of Unicode).
    key = 0
    for ch in gram:
        key = (key << 21) | ord(ch)
    return key


class _LanguageModel:
    """langdetect's profiles as arrays, plus langdetect's text normalisation as lookup tables.

    Naive Bayes over the same n-grams langdetect extracts, with langdetect's smoothing
    (p + alpha / BASE_FREQ): langdetect's random trials estimate this posterior by sampling n-grams;
    summing the log-likelihoods of all n-grams gives the same winner deterministically, in numpy.
    """

    def __init__(self) -> None:
        factory = DetectorFactory()
        factory.load_profile(PROFILES_DIRECTORY)
        factory.set_seed(0)
        self.factory = factory
        self.langs = list(factory.langlist)
        grams = list(factory.word_lang_prob_map)
        keys = np.array([_gram_key(g) for g in grams], dtype=np.uint64)
        order = np.argsort(keys)
        self.keys = keys[order]
        probs = np.array([factory.word_lang_prob_map[g] for g in grams], dtype=np.float64)[order]
        self.loglik = np.log(probs + Detector.ALPHA_DEFAULT / Detector.BASE_FREQ)
        bmp = [chr(c) for c in range(0x10000)]
        self.normalized = np.array([ord(NGram.normalize(ch)) for ch in bmp], dtype=np.uint32)
        self.upper = np.array([ch.isupper() for ch in bmp], dtype=bool)

    def ngram_rows(self, text: str) -> np.ndarray:
        """Rows of `loglik` for the n-grams langdetect's Detector would extract from `text`."""
        text = Detector.URL_RE.sub(" ", text)
        text = Detector.MAIL_RE.sub(" ", text)
        text = NGram.normalize_vi(text)
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        # Detector.cleaning_text: mostly non-Latin text loses its Latin characters.
        latin = (cps >= ord("A")) & (cps <= ord("z"))
        non_latin = (cps >= 0x300) & ~((cps >= 0x1E00) & (cps <= 0x1EFF))
        if 2 * int(latin.sum()) < int(non_latin.sum()):
            cps = cps[~latin]
        bmp = cps < 0x10000
        clipped = np.minimum(cps, 0xFFFF)
        cps = np.where(bmp, self.normalized[clipped], cps)
        # NGram starts with a space and resets on every space: collapse runs of spaces.
        cps = np.concatenate([np.array([32], dtype=np.uint32), cps])
        space = cps == 32
        keep = np.ones(len(cps), dtype=bool)
        keep[1:] = ~(space[1:] & space[:-1])
        cps = cps[keep]
        upper = self.upper[np.minimum(cps, 0xFFFF)] & (cps < 0x10000)
        space = cps == 32
        # NGram.capitalword: no n-grams end at an upper-case letter that follows an upper-case letter.
        emit = np.zeros(len(cps), dtype=bool)
        emit[1:] = ~(upper[1:] & upper[:-1])
        c = cps.astype(np.uint64)
        idx = np.flatnonzero(emit)
        one = c[idx[~space[idx]]]
        two = (c[idx - 1] << np.uint64(21)) | c[idx]
        idx3 = idx[(idx >= 2)]
        idx3 = idx3[~space[idx3 - 1]]  # NGram resets after a space: no 3-gram has a space in the middle
        three = (c[idx3 - 2] << np.uint64(42)) | (c[idx3 - 1] << np.uint64(21)) | c[idx3]
        keys = np.concatenate([one, two, three])
        pos = np.searchsorted(self.keys, keys)
        pos[pos == len(self.keys)] = 0
        return pos[self.keys[pos] == keys]

    def naive_bayes(self, text: str, evidence_ngrams: int) -> tuple[str, float]:
        rows = self.ngram_rows(text)
        if len(rows) == 0:
            return "unknown", 0.0
        mean_loglik = self.loglik[rows].mean(axis=0)
        logits = mean_loglik * min(len(rows), evidence_ngrams)
        logits -= logits.max()
        post = np.exp(logits)
        post /= post.sum()
        best = int(post.argmax())
        return self.langs[best], float(post[best])

    def langdetect(self, text: str) -> tuple[str, float]:
        detector = self.factory.create()
        detector.append(text)
        try:
            probs = detector.get_probabilities()
        except LangDetectException:
            return "unknown", 0.0
        return (probs[0].lang, float(probs[0].prob)) if probs else ("unknown", 0.0)


@functools.cache
def _language_model() -> _LanguageModel:
    return _LanguageModel()  # ~1 s per process: profiles and normalisation tables


def sample_text(text: str, sample_chars: int, windows: int) -> str:
    """`windows` evenly spaced slices of the text, `sample_chars` in all, cut at spaces where possible."""
    if len(text) <= sample_chars:
        return text
    width = sample_chars // windows
    step = (len(text) - width) / max(windows - 1, 1)
    parts = []
    for k in range(windows):
        start = int(k * step)
        end = start + width
        if start > 0:
            space = text.find(" ", start, start + 30)
            start = space + 1 if space != -1 else start
        space = text.rfind(" ", end - 30, end)
        end = space if space > start else end
        parts.append(text[start:end])
    return " ".join(parts)


def identify_language(text: str, cfg: LanguageConfig) -> tuple[str, float]:
    """(language code, probability of that language) for a bounded sample of `text`; deterministic."""
    model = _language_model()
    sample = sample_text(text, cfg.sample_chars, cfg.sample_windows)
    if cfg.backend == "langdetect":
        return model.langdetect(sample)
    return model.naive_bayes(sample, cfg.evidence_ngrams)


def language_filter(doc: dict, cfg: LanguageConfig) -> tuple[bool, str | None]:
    """Record doc['language'] / doc['language_score'] and keep allowed languages identified confidently."""
    text = doc["text"]
    if len(text.strip()) < cfg.min_chars:
        doc["language"], doc["language_score"] = "unknown", 0.0
        return (True, None) if cfg.keep_short else (False, "too_short_for_language_id")
    language, score = identify_language(text, cfg)
    doc["language"], doc["language_score"] = language, score
    if score < cfg.min_probability:
        return False, "language_low_confidence"
    if cfg.allowed and language not in cfg.allowed:
        return False, "language_not_allowed"
    return True, None


# ---------------------------------------------------------------------------------------------
# Gopher quality (Rae et al. 2021, appendix A; DataTrove GopherQualityFilter)
# ---------------------------------------------------------------------------------------------

_LETTER_RE = re.compile(r"[^\W\d_]")


def gopher_quality_filter(doc: dict, cfg: GopherQualityConfig, non_space_fraction: float) -> tuple[bool, str | None]:
    """Gopher's document heuristics. Words are whitespace tokens with surrounding punctuation stripped
    (pure-punctuation tokens are not words); in unsegmented scripts each CJK/Thai character is a word."""
    text = doc["text"]
    unsegmented = is_unsegmented(text, non_space_fraction)
    tokens = split_words(text, unsegmented)
    words = [w for w in (t.strip(_PUNCTUATION) for t in tokens) if w]
    n_words = len(words)
    if n_words == 0 or n_words < cfg.min_words:
        return False, "gopher_short_document"
    if n_words > cfg.max_words:
        return False, "gopher_long_document"
    if not unsegmented:
        mean_length = sum(map(len, words)) / n_words
        if mean_length < cfg.min_mean_word_length or mean_length > cfg.max_mean_word_length:
            return False, "gopher_mean_word_length"
    ellipses = text.count("...") + text.count("…")
    if max(text.count("#"), ellipses) / n_words > cfg.max_symbol_word_ratio:
        return False, "gopher_symbol_ratio"
    lines = _non_empty_lines(text)
    if lines:
        bullets = sum(line.startswith(_BULLETS) for line in lines)
        if bullets / len(lines) > cfg.max_bullet_lines_ratio:
            return False, "gopher_bullet_lines"
        ellipsis_lines = sum(line.endswith(("...", "…")) for line in lines)
        if ellipsis_lines / len(lines) > cfg.max_ellipsis_lines_ratio:
            return False, "gopher_ellipsis_lines"
    alpha_words = sum(1 for t in tokens if t.isalpha() or _LETTER_RE.search(t))
    if alpha_words / len(tokens) < cfg.min_alpha_words_ratio:
        return False, "gopher_alpha_words"
    stop_words = cfg.stop_words.get(doc.get("language", "en"))
    if stop_words and not unsegmented and cfg.min_stop_words > 0:
        stop = set(stop_words)
        if sum(w.lower() in stop for w in words) < cfg.min_stop_words:
            return False, "gopher_stop_words"
    return True, None


# ---------------------------------------------------------------------------------------------
# Gopher repetition (Rae et al. 2021, table A1; DataTrove GopherRepetitionFilter)
# ---------------------------------------------------------------------------------------------


def _duplicates(elements: list[str]) -> tuple[int, int]:
    """(number of elements equal to an earlier element, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for element in elements:
        if element in seen:
            count += 1
            chars += len(element)
        else:
            seen.add(element)
    return count, chars


def iter_ngram_char_fractions(
    words: Sequence[str], top_ns: Sequence[int], dup_ns: Sequence[int]
) -> Iterator[tuple[str, int, float]]:
    """Fast path: yields ("top", n, fraction) and ("dup", n, fraction) by increasing n.

    Definitions (the reference `ngram_char_fractions_reference` follows them literally):
    - an n-gram occurrence at word position i is words[i:i+n]; its characters are the words' lengths
      (whitespace excluded); every fraction is over the characters of all words;
    - top n-gram: the n-gram with the most occurrences (ties: more characters, then earlier first
      occurrence); fraction = characters of the words covered by any of its occurrences (each word
      once). 0 if no n-gram occurs twice;
    - duplicate n-grams: fraction = characters of the words covered by an occurrence that repeats an
      earlier occurrence of the same n-gram (each word once; first occurrences cover nothing).

    Words are mapped to integer ids; the id of an n-gram is the compacted id of the pair
    (id of its (n-1)-gram prefix, id of its last word), so n-grams are compared exactly, with no hashing;
    coverage is a difference array over word positions.
    """
    n_words = len(words)
    wanted = set(top_ns) | set(dup_ns)
    if not wanted:
        return
    # dict.fromkeys keeps first-occurrence order at C speed; only the distinct words are looped over.
    vocab = dict.fromkeys(words, 0)
    for word_id, word in enumerate(vocab):
        vocab[word] = word_id
    word_ids = np.fromiter(map(vocab.__getitem__, words), dtype=np.int64, count=n_words)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=n_words)
    total = int(lengths.sum())
    prefix = np.zeros(n_words + 1, dtype=np.int64)
    np.cumsum(lengths, out=prefix[1:])

    def covered_fraction(starts: np.ndarray, n: int) -> float:
        if total == 0 or len(starts) == 0:
            return 0.0
        depth = np.cumsum(np.bincount(starts, minlength=n_words + 1) - np.bincount(starts + n, minlength=n_words + 1))[
            :n_words
        ]
        return float(lengths[depth > 0].sum()) / total

    gram_ids = word_ids
    repeats = True
    for n in range(1, max(wanted) + 1):
        positions = n_words - n + 1
        if positions <= 0 or not repeats:
            # No (n-1)-gram occurs twice, so no n-gram does: every later fraction is 0.
            if n in top_ns:
                yield "top", n, 0.0
            if n in dup_ns:
                yield "dup", n, 0.0
            continue
        pair = gram_ids[:positions] * len(vocab) + word_ids[n - 1 :] if n > 1 else word_ids
        # np.unique by hand (stable sort): first occurrence, counts and compact ids in one pass.
        order = np.argsort(pair, kind="stable")
        ordered = pair[order]
        group_start = np.empty(positions, dtype=bool)
        group_start[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=group_start[1:])
        gram_ids = np.empty(positions, dtype=np.int64)
        gram_ids[order] = np.cumsum(group_start) - 1
        repeat_positions = order[~group_start]  # stable sort: every element after a group's first repeats it
        repeats = len(repeat_positions) > 0
        if n in top_ns:
            if repeats:
                starts_of_groups = np.flatnonzero(group_start)
                counts = np.diff(starts_of_groups, append=positions)
                first = order[starts_of_groups]
                gram_chars = prefix[first + n] - prefix[first]
                best = np.lexsort((-first, gram_chars, counts))[-1]
                yield "top", n, covered_fraction(np.flatnonzero(gram_ids == best), n)
            else:
                yield "top", n, 0.0
        if n in dup_ns:
            yield "dup", n, covered_fraction(repeat_positions, n)


def ngram_char_fractions(words: Sequence[str], top_ns: Sequence[int], dup_ns: Sequence[int]) -> dict[str, float]:
    """{"top_2": f, ..., "dup_5": f, ...} from the fast path."""
    return {f"{kind}_{n}": frac for kind, n, frac in iter_ngram_char_fractions(words, top_ns, dup_ns)}


def ngram_char_fractions_reference(
    words: Sequence[str], top_ns: Sequence[int], dup_ns: Sequence[int]
) -> dict[str, float]:
    """Pure-Python reference of `iter_ngram_char_fractions` (same definitions, written literally)."""
    total = sum(len(w) for w in words)
    result = {}

    def fraction(covered: set[int]) -> float:
        return sum(len(words[i]) for i in covered) / total if total else 0.0

    for n in sorted(set(top_ns) | set(dup_ns)):
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        if n in top_ns:
            counts = Counter(grams)
            first_seen = {}
            for i, gram in enumerate(grams):
                first_seen.setdefault(gram, i)
            covered: set[int] = set()
            if counts and max(counts.values()) > 1:
                best = max(counts, key=lambda g: (counts[g], sum(map(len, g)), -first_seen[g]))
                for i, gram in enumerate(grams):
                    if gram == best:
                        covered.update(range(i, i + n))
            result[f"top_{n}"] = fraction(covered)
        if n in dup_ns:
            seen: set[tuple] = set()
            covered = set()
            for i, gram in enumerate(grams):
                if gram in seen:
                    covered.update(range(i, i + n))
                seen.add(gram)
            result[f"dup_{n}"] = fraction(covered)
    return result


def gopher_repetition_filter(
    doc: dict, cfg: GopherRepetitionConfig, non_space_fraction: float
) -> tuple[bool, str | None]:
    """Gopher's repetition rules. Lines and paragraphs as in DataTrove (duplicate characters over the text
    length); n-gram fractions over word characters as defined in `iter_ngram_char_fractions`."""
    text = doc["text"]
    if not text.strip():
        return True, None
    paragraphs = [p.strip() for p in _PARAGRAPH_RE.split(text.strip())]
    dup_paras, dup_para_chars = _duplicates(paragraphs)
    if dup_paras / len(paragraphs) > cfg.max_dup_para_fraction:
        return False, "gopher_dup_para_fraction"
    if dup_para_chars / len(text) > cfg.max_dup_para_chars:
        return False, "gopher_dup_para_chars"
    lines = _non_empty_lines(text)
    dup_lines, dup_line_chars = _duplicates(lines)
    if lines and dup_lines / len(lines) > cfg.max_dup_line_fraction:
        return False, "gopher_dup_line_fraction"
    if dup_line_chars / len(text) > cfg.max_dup_line_chars:
        return False, "gopher_dup_line_chars"
    words = split_words(text, is_unsegmented(text, non_space_fraction))
    top_limits, dup_limits = dict(cfg.top_ngrams), dict(cfg.dup_ngrams)
    for kind, n, frac in iter_ngram_char_fractions(words, list(top_limits), list(dup_limits)):
        if kind == "top" and frac > top_limits[n]:
            return False, f"gopher_top_{n}gram"
        if kind == "dup" and frac > dup_limits[n]:
            return False, f"gopher_dup_{n}gram"
    return True, None


# ---------------------------------------------------------------------------------------------
# C4 (Raffel et al. 2020; DataTrove C4QualityFilter)
# ---------------------------------------------------------------------------------------------

_SENTENCE_END_RE = re.compile(r"[.!?…]+[\"'”’»)\]]*(?=\s|$)|[。！？]+")
_TERMINAL_PUNCTUATION = (".", "?", "!", '"', "'", "。", "！", "？", "”", "’")
_POLICY_SUBSTRINGS = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)


def count_sentences(text: str, stop_at: int | None = None) -> int:
    """Sentence-ending punctuation runs (followed by whitespace or the end; CJK marks anywhere),
    counting no further than `stop_at`."""
    return sum(1 for _ in itertools.islice(_SENTENCE_END_RE.finditer(text), stop_at))


def _c4_kept_lines(text: str, cfg: C4Config, unsegmented: bool) -> str:
    kept = []
    for line in _non_empty_lines(text):
        if not line.endswith(_TERMINAL_PUNCTUATION) or line.endswith(("...", "…")):
            continue
        if not unsegmented and len(line.split()) < cfg.min_words_per_line:
            continue
        lower = line.lower()
        if "javascript" in lower or any(p in lower for p in _POLICY_SUBSTRINGS):
            continue
        kept.append(line)
    return "\n".join(kept)


def c4_filter(doc: dict, cfg: C4Config, non_space_fraction: float) -> tuple[bool, str | None]:
    """C4's document rules; with remove_lines, C4's line rules first (kept documents get the new text)."""
    text = doc["text"]
    unsegmented = is_unsegmented(text, non_space_fraction)
    if cfg.remove_lines:
        text = _c4_kept_lines(text, cfg, unsegmented)
    if cfg.filter_lorem_ipsum and "lorem ipsum" in text.lower():
        return False, "c4_lorem_ipsum"
    if cfg.filter_curly_bracket and "{" in text:
        return False, "c4_curly_bracket"
    if count_sentences(text, cfg.min_sentences) < cfg.min_sentences:
        return False, "c4_too_few_sentences"
    # Unsegmented scripts have no spaces, so a paragraph would be one "word".
    if not unsegmented and max(map(len, text.split()), default=0) > cfg.max_word_length:
        return False, "c4_long_word"
    if cfg.remove_lines:
        doc["text"] = text
    return True, None


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------


def build_filters(cfg: QualityConfig) -> list[Filter]:
    """Enabled per-document filters in order: language, Gopher quality, Gopher repetition, C4.

    Each is a picklable `functools.partial` (name: `f.func.__name__`). Language runs first because
    Gopher's stop-word rule reads doc['language']. MinHash needs the whole corpus: see
    `minhash_signature` / `find_near_duplicates`.
    """
    filters: list[Filter] = []
    if cfg.language.enabled:
        filters.append(functools.partial(language_filter, cfg=cfg.language))
    if cfg.gopher_quality.enabled:
        filters.append(
            functools.partial(
                gopher_quality_filter, cfg=cfg.gopher_quality, non_space_fraction=cfg.non_space_script_fraction
            )
        )
    if cfg.gopher_repetition.enabled:
        filters.append(
            functools.partial(
                gopher_repetition_filter,
                cfg=cfg.gopher_repetition,
                non_space_fraction=cfg.non_space_script_fraction,
            )
        )
    if cfg.c4.enabled:
        filters.append(functools.partial(c4_filter, cfg=cfg.c4, non_space_fraction=cfg.non_space_script_fraction))
    return filters


def filter_document(doc: dict, filters: Sequence[Filter]) -> tuple[bool, str | None]:
    """Runs filters in order; the first failing filter's reason, else (True, None)."""
    for keep_filter in filters:
        keep, reason = keep_filter(doc)
        if not keep:
            return False, reason
    return True, None


# ---------------------------------------------------------------------------------------------
# MinHash near-duplicates (DataTrove: word 5-grams, 14 buckets x 8 hashes)
# ---------------------------------------------------------------------------------------------

_NON_WORD_RE = re.compile(r"[^\w\s]+")
_MINHASH_SCHEME = "affine32"  # datasketch >= 2.0 default; fixed so signatures stay comparable across upgrades


def minhash_signature(text: str, cfg: MinHashConfig) -> np.ndarray:
    """MinHash (uint32, buckets x rows values) of the set of word n-grams of lower-cased text without
    punctuation; unsegmented scripts use characters as words. Same text -> same signature in any process."""
    normalized = _NON_WORD_RE.sub(" ", text.lower())
    words = split_words(normalized, is_unsegmented(normalized, 0.3))
    n = cfg.ngram_words
    if len(words) <= n:
        shingles = {" ".join(words).encode()}
    else:
        shingles = {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}
    minhash = MinHash(num_perm=cfg.num_buckets * cfg.rows_per_bucket, seed=cfg.seed, scheme=_MINHASH_SCHEME)
    minhash.update_batch(list(shingles))
    return minhash.hashvalues.copy()


def find_near_duplicates(signatures: Sequence[np.ndarray], cfg: MinHashConfig) -> list[int | None]:
    """In memory, for a few signatures: for each, the index of the first document of its near-duplicate
    cluster when that is another one, else None (the stage's rule, at any size: cptflow/near_dedup.py)."""
    if not len(signatures):
        return []
    matrix = np.asarray(signatures, dtype=np.uint32)
    tables = [sorted_band_keys(matrix, cfg.num_buckets, cfg.rows_per_bucket)]
    pairs = [
        band_candidate_pairs(tables, band, signatures=[matrix], jaccard_threshold=cfg.jaccard_threshold)
        for band in range(cfg.num_buckets)
    ]
    result: list[int | None] = [None] * len(matrix)
    for member, first in zip(*duplicates_to_drop(pairs)):
        result[int(member)] = int(first)
    return result


# ---------------------------------------------------------------------------------------------
# The stage: filter each shard (with its MinHash signatures and sorted band keys), merge each band
# over all shards into candidate pairs (one task per band), then a commit that clusters the pairs
# and drops every near-duplicate but the first of its cluster.
# ---------------------------------------------------------------------------------------------
STAGE_VERSION = 2  # 2: near-duplicates clustered (keep each cluster's first), band by band
NAME = "quality"
UPSTREAM = "clean"
Config = QualityConfig


def fingerprint_inputs(cfg) -> dict:
    return {"config": cfg.quality.model_dump(mode="json"), "version": STAGE_VERSION}


def artifacts(manifest: dict, directory: Path) -> list[Artifact]:
    return [counts_artifact(manifest)]


def plan(run, cfg) -> list[dict]:
    return upstream_shards(run)


def quality_shard(input_path: Path, shard: str, source: str, cfg: QualityConfig, stage_directory: Path) -> ShardCounts:
    """Filter one shard into `_work/` (kept, excluded, MinHash signatures); idempotent after a kill."""
    finished = load_finished_shard(stage_directory, shard)
    if finished is not None:
        return finished
    started = time.perf_counter()
    counts = ShardCounts(shard=shard, source=source)
    filters = build_filters(cfg)
    signatures: list[np.ndarray] = []
    with (
        JsonlWriter(shard_work_file(stage_directory, shard, "kept.jsonl")) as kept,
        JsonlWriter(shard_work_file(stage_directory, shard, "excluded.jsonl")) as excluded,
    ):
        for doc in read_documents(input_path):
            counts.documents_in += 1
            keep, reason = filter_document(doc, filters)
            if not keep:
                counts.excluded[reason] += 1
                excluded.write(dict(doc, reason=reason))
                continue
            counts.kept += 1
            kept.write(doc)
            if cfg.minhash.enabled:
                signatures.append(minhash_signature(doc["text"], cfg.minhash))
    if cfg.minhash.enabled:
        width = cfg.minhash.num_buckets * cfg.minhash.rows_per_bucket
        matrix = np.asarray(signatures, dtype=np.uint32).reshape(len(signatures), width)
        with atomic_path(shard_work_file(stage_directory, shard, "minhash.npy")) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, matrix)
        write_sorted_band_keys(
            matrix,
            cfg.minhash.num_buckets,
            cfg.minhash.rows_per_bucket,
            shard_work_file(stage_directory, shard, "bands.npy"),
        )
    counts.seconds = time.perf_counter() - started
    mark_shard_finished(stage_directory, counts)
    return counts


def process(run, cfg, item: dict) -> ShardCounts:
    input_path = upstream_shard_path(run, item["shard"])
    return quality_shard(input_path, item["shard"], item["source"], cfg.quality, run.path)


def plan_bands(run, cfg, shard_counts: list[ShardCounts]) -> list[dict]:
    """One item per LSH band: each merges that band's keys over every shard (mapped over the runner)."""
    if not cfg.quality.minhash.enabled:
        return []
    return [
        {"step": "band", "name": f"band-{band:02d}", "band": band} for band in range(cfg.quality.minhash.num_buckets)
    ]


def band_pairs_path(stage_directory: Path, band: int) -> Path:
    return Path(stage_directory) / "_work" / f"near-duplicates-band-{band:02d}.npy"


def merge_band(run, cfg, band: int) -> int:
    """Candidate pairs of one band over all shards, written to `_work/`; a band finished before a kill
    is not merged again. Returns the number of pairs."""
    path = band_pairs_path(run.path, band)
    if not path.is_file():
        shards = [s["shard"] for s in upstream_shards(run)]
        tables = load_shard_arrays([shard_work_file(run.path, shard, "bands.npy") for shard in shards])
        minhash = cfg.quality.minhash
        signatures = None
        if minhash.jaccard_threshold is not None:
            signatures = load_shard_arrays([shard_work_file(run.path, shard, "minhash.npy") for shard in shards])
        pairs = band_candidate_pairs(tables, band, signatures=signatures, jaccard_threshold=minhash.jaccard_threshold)
        write_band_pairs(path, pairs)
    return int(np.load(path, mmap_mode="r").shape[0])


def near_duplicate_decision(run, cfg, shard_counts: list[ShardCounts]) -> tuple[dict, dict]:
    """Cluster the bands' candidate pairs (a band the runner did not merge is merged here): the documents
    to drop, by shard, and the manifest's `near_duplicates` summary."""
    drops: dict[str, dict[int, str]] = {c.shard: {} for c in shard_counts}
    if not cfg.quality.minhash.enabled:
        return drops, {}
    pairs = [merge_band(run, cfg, item["band"]) for item in plan_bands(run, cfg, shard_counts)]
    members, _ = duplicates_to_drop([np.load(band_pairs_path(run.path, band)) for band in range(len(pairs))])
    shards = [c.shard for c in shard_counts]
    for ordinal, line in split_positions(members):
        drops[shards[ordinal]][line] = "near_duplicate"
    summary = {
        "rule": "clusters of documents sharing an LSH band; each keeps its first document in document order",
        "jaccard_threshold": cfg.quality.minhash.jaccard_threshold,
        "candidate_pairs_by_band": pairs,
        "dropped": len(members),
    }
    return drops, {"near_duplicates": summary}


def plan_publish(run, cfg, shard_counts: list[ShardCounts]) -> list[dict]:
    return plan_finalize(run, shard_counts, lambda: near_duplicate_decision(run, cfg, shard_counts))


# After the shards: merge the bands (one task each), then publish the shards (one task each).
REDUCE_ROUNDS = (plan_bands, plan_publish)


def reduce(run, cfg, item: dict) -> dict:
    if item["step"] == FINALIZE:
        return finalize_item(run, item)
    return {"band": item["band"], "pairs": merge_band(run, cfg, item["band"])}


def commit(run, cfg, shard_counts: list[ShardCounts], started: float) -> dict:
    plan_publish(run, cfg, shard_counts)
    return commit_finalized(run, shard_counts, started)
