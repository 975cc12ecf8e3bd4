"""Near-duplicates band by band (cptflow/near_dedup.py) against a simple in-memory reference."""

from __future__ import annotations

import random

import numpy as np
import pytest

from cptflow.near_dedup import (
    band_candidate_pairs,
    duplicates_to_drop,
    estimated_jaccard,
    sorted_band_keys,
    split_positions,
)
from cptflow.tasks.quality import MinHashConfig, find_near_duplicates, minhash_signature

CFG = MinHashConfig()
VOCABULARY = [f"w{i}" for i in range(5000)]


def edited(words: list[str], rng: random.Random, share: float) -> list[str]:
    """A near copy: `share` of the words replaced by random ones."""
    out = list(words)
    for i in rng.sample(range(len(out)), int(share * len(out))):
        out[i] = rng.choice(VOCABULARY)
    return out


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """~2,400 documents: originals, near copies placed later, and chains A -> A' -> A'' (each a few % off
    the one before, so the chain's end may share no band with its start), shuffled deterministically."""
    rng = random.Random(7)
    docs = []
    for _ in range(1500):
        docs.append([rng.choice(VOCABULARY) for _ in range(rng.randint(60, 160))])
    for i in range(300):  # near copies of originals
        docs.append(edited(docs[i], rng, 0.03))
    for i in range(300, 500):  # chains of three steps
        previous = docs[i]
        for _ in range(3):
            previous = edited(previous, rng, 0.06)
            docs.append(previous)
    order = list(range(len(docs)))
    rng.shuffle(order)
    return [" ".join(docs[i]) for i in order]


@pytest.fixture(scope="module")
def signatures(corpus) -> np.ndarray:
    return np.asarray([minhash_signature(text, CFG) for text in corpus], dtype=np.uint32)


def reference_duplicates(signatures: np.ndarray, bands: int, rows: int) -> set[int]:
    """Every pair compared band by band on the signature values themselves; connected components; all
    but the smallest index of each dropped."""
    n = len(signatures)
    banded = signatures.reshape(n, bands, rows)
    parent = list(range(n))

    def root(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for i in range(n):
        same_band = (banded[i + 1 :] == banded[i]).all(axis=2).any(axis=1)
        for j in np.nonzero(same_band)[0] + i + 1:
            ri, rj = root(i), root(int(j))
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    return {i for i in range(n) if root(i) != i}


def shard_tables(signatures: np.ndarray, sizes: list[int]) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    tables, parts, offsets, start = [], [], [], 0
    for size in sizes:
        part = signatures[start : start + size]
        tables.append(sorted_band_keys(part, CFG.num_buckets, CFG.rows_per_bucket))
        parts.append(part)
        offsets.append(start)
        start += size
    return tables, parts, offsets


def dropped_in_document_order(signatures, sizes, **options) -> set[int]:
    tables, parts, offsets = shard_tables(signatures, sizes)
    pairs = [band_candidate_pairs(tables, band, signatures=parts, **options) for band in range(CFG.num_buckets)]
    members, _ = duplicates_to_drop(pairs)
    return {offsets[shard] + line for shard, line in split_positions(members)}


def test_band_merge_finds_the_clusters_the_reference_finds_including_chains(signatures):
    expected = reference_duplicates(signatures, CFG.num_buckets, CFG.rows_per_bucket)
    assert 350 < len(expected) < 900  # planted: 300 near copies (3% edited), 600 chain links (6% each)
    # Chains are exercised: some dropped document shares no band with its cluster's first document.
    first_of = dict(
        zip(
            *(
                x.tolist()
                for x in duplicates_to_drop(
                    [band_candidate_pairs([sorted_band_keys(signatures, 14, 8)], b) for b in range(14)]
                )
            )
        )
    )
    banded = signatures.reshape(len(signatures), 14, 8)
    transitive = [m for m, f in first_of.items() if not (banded[m] == banded[f]).all(axis=1).any()]
    assert len(transitive) >= 5

    one_shard = dropped_in_document_order(signatures, [len(signatures)])
    assert one_shard == expected
    # Any sharding, and a merge that holds only a few keys at a time, give the same answer.
    assert dropped_in_document_order(signatures, [700, 1, 0, 900, len(signatures) - 1601]) == expected
    assert dropped_in_document_order(signatures, [len(signatures)], partition_keys=64) == expected


def test_the_first_of_a_cluster_is_kept_whatever_the_order():
    texts = [" ".join(f"w{i}" for i in range(100))] * 3
    texts.insert(1, " ".join(f"x{i}" for i in range(100)))
    sigs = [minhash_signature(t, CFG) for t in texts]
    assert find_near_duplicates(sigs, CFG) == [None, None, 0, 0]
    assert find_near_duplicates(sigs[::-1], CFG) == [None, 0, None, 0]


def test_jaccard_verification_drops_only_pairs_above_the_threshold(signatures):
    plain = dropped_in_document_order(signatures, [len(signatures)])
    assert dropped_in_document_order(signatures, [len(signatures)], jaccard_threshold=0.0) == plain
    strict = dropped_in_document_order(signatures, [len(signatures)], jaccard_threshold=0.9)
    assert strict < plain
    tables, parts, _ = shard_tables(signatures, [len(signatures)])
    for band in range(3):
        pairs = band_candidate_pairs(tables, band, signatures=parts, jaccard_threshold=0.9)
        assert (estimated_jaccard(pairs, parts) >= 0.9).all()
