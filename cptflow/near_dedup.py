"""MinHash LSH near-duplicate removal that scales out, in DataTrove's four steps (used by `quality`).

1. per shard (on the runner, with the signatures): each band's bucket keys, written sorted;
2. per band (on the runner): a merge of that band's sorted keys over all shards, key range by key range
   (an external merge: one range of one band in memory), emitting candidate pairs;
3. once, from the pairs alone: union-find into clusters;
4. per shard: drop every member of a cluster but its first.

The rule: documents are near-duplicates when they share a band (optionally confirmed by the estimated
Jaccard similarity of their signatures); near-duplicates are clustered transitively (a chain C ~ B ~ A is
one cluster) and each cluster keeps its first document in document order (shard order, then line order).
The result depends on the documents alone, not on the number of workers or the order tasks finish in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cptflow.store import atomic_path

# A document's place in document order: shard ordinal in the high 32 bits, line in the shard in the low.
SHARD_SHIFT, LINE_MASK = np.uint64(32), np.uint64(0xFFFFFFFF)
PARTITION_KEYS = 1 << 21  # keys of one band held at once by the merge (~2M: 40 MB with their ids)

_MIX_1, _MIX_2, _MULTIPLIER = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x100000001B3)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX_1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX_2
    return x ^ (x >> np.uint64(31))


def band_keys(signatures: np.ndarray, num_bands: int, rows_per_band: int) -> np.ndarray:
    """(bands, documents) uint64: one key per band of each signature, equal when the band's rows are equal
    (a 64-bit hash of them: two different bands collide with probability ~2^-64)."""
    n = len(signatures)
    rows = np.asarray(signatures, dtype=np.uint64).reshape(n, num_bands, rows_per_band)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        key = np.zeros((n, num_bands), dtype=np.uint64)
        for r in range(rows_per_band):
            key = _splitmix(key * _MULTIPLIER + rows[:, :, r])
    return np.ascontiguousarray(key.T)


def _key_ranges(total: int, partition_keys: int) -> list[tuple[int, int]]:
    """Equal slices of the uint64 key space, enough that each holds about `partition_keys` keys (the keys
    are hashes: uniform), as [low, high) pairs of Python ints."""
    parts = max(1, -(-total // partition_keys))
    edges = [(i << 64) // parts for i in range(parts)] + [1 << 64]
    return list(zip(edges[:-1], edges[1:]))


def sorted_band_keys(signatures: np.ndarray, num_bands: int, rows_per_band: int) -> np.ndarray:
    """Step 1 for one shard: each band's keys sorted, with the line of each key (ties in line order), as
    one (2, bands, documents) uint64 array: row 0 the keys, row 1 the lines."""
    keys = band_keys(signatures, num_bands, rows_per_band)
    order = np.argsort(keys, axis=1, kind="stable")
    return np.stack([np.take_along_axis(keys, order, axis=1), order.astype(np.uint64)])


def write_sorted_band_keys(signatures: np.ndarray, num_bands: int, rows_per_band: int, keys_path: Path) -> None:
    with atomic_path(keys_path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, sorted_band_keys(signatures, num_bands, rows_per_band))


def load_shard_arrays(paths: list[Path]) -> list[np.ndarray]:
    """Shards' .npy files memory-mapped: the merge reads only the key ranges it works on."""
    return [np.load(path, mmap_mode="r") for path in paths]


def band_candidate_pairs(
    tables: list[np.ndarray],
    band: int,
    *,
    signatures: list[np.ndarray] | None = None,
    jaccard_threshold: float | None = None,
    partition_keys: int = PARTITION_KEYS,
) -> np.ndarray:
    """Step 2 for one band: (pairs, 2) uint64 document positions (first of the bucket, other member), sorted.

    `tables` are the shards' sorted band keys in shard order (memory-mapped: load_shard_arrays). They are
    read one key range at a time; within a range, documents with equal keys share a bucket, and each member
    is paired with the bucket's first document. With `jaccard_threshold`, a pair is kept only if the share
    of equal values of the two signatures (`signatures`: the shards' signature matrices) reaches it.
    """
    total = sum(table.shape[2] for table in tables)
    pairs = []
    for low, high in _key_ranges(total, partition_keys):
        keys, docs = [], []
        for ordinal, table in enumerate(tables):
            band_keys_sorted = table[0, band]
            start = np.searchsorted(band_keys_sorted, np.uint64(low), side="left")
            stop = len(band_keys_sorted) if high == 1 << 64 else np.searchsorted(band_keys_sorted, np.uint64(high))
            keys.append(np.asarray(band_keys_sorted[start:stop]))
            docs.append((np.uint64(ordinal) << SHARD_SHIFT) | np.asarray(table[1, band, start:stop]))
        keys, docs = np.concatenate(keys), np.concatenate(docs)
        if len(keys) < 2:
            continue
        order = np.lexsort((docs, keys))  # by key, then document order
        keys, docs = keys[order], docs[order]
        starts = np.concatenate([[True], keys[1:] != keys[:-1]])
        first_of_bucket = docs[np.maximum.accumulate(np.where(starts, np.arange(len(keys)), 0))]
        member = ~starts
        if member.any():
            pairs.append(np.stack([first_of_bucket[member], docs[member]], axis=1))
    found = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.uint64)
    if jaccard_threshold is not None and len(found):
        found = found[estimated_jaccard(found, signatures) >= jaccard_threshold]
    return found[np.lexsort((found[:, 1], found[:, 0]))] if len(found) else found


def estimated_jaccard(pairs: np.ndarray, signatures: list[np.ndarray]) -> np.ndarray:
    """The share of equal MinHash values of each pair's two signatures (the Jaccard estimate)."""

    def rows(positions: np.ndarray) -> np.ndarray:
        shards, lines = (
            (positions >> SHARD_SHIFT).astype(np.int64),
            (positions & np.uint64(0xFFFFFFFF)).astype(np.int64),
        )
        out = np.empty((len(positions), signatures[0].shape[1]), dtype=np.uint32)
        for ordinal in np.unique(shards):
            where = shards == ordinal
            out[where] = signatures[ordinal][lines[where]]
        return out

    return (rows(pairs[:, 0]) == rows(pairs[:, 1])).mean(axis=1)


def write_band_pairs(path: Path, pairs: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, pairs)


def duplicates_to_drop(pair_arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Step 3: union-find over all bands' pairs. (every document of a cluster but its first, sorted; the
    first document of each one's cluster). Memory grows with the documents that have a candidate, not
    with the corpus."""
    pairs = [p for p in pair_arrays if len(p)]
    if not pairs:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64)
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for a, b in np.unique(np.concatenate(pairs), axis=0).tolist():
        ra, rb = root(a), root(b)
        if ra != rb:  # the smaller position becomes the root: a cluster's root is its first document
            parent[max(ra, rb)] = min(ra, rb)
    members = sorted(x for x in parent if root(x) != x)
    return np.array(members, dtype=np.uint64), np.array([root(x) for x in members], dtype=np.uint64)


def split_positions(positions: np.ndarray) -> list[tuple[int, int]]:
    """(shard ordinal, line) of each document position."""
    return [(int(p >> SHARD_SHIFT), int(p & LINE_MASK)) for p in positions]
