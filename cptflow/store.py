"""Stage store: every stage writes into `<work_dir>/<stage>/<fingerprint>/` and commits with manifest.json.

The manifest is written last with an atomic rename, so a directory without one is never read as done.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Literal

MANIFEST = "manifest.json"
WORK = "_work"  # per-shard partial results and completion markers of an unfinished stage


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(payload: dict) -> str:
    """Short content address of a stage: sha256 of the canonical JSON payload."""
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_fingerprint(path: Path, mode: Literal["mtime", "content"]) -> dict:
    """How one input file enters a fingerprint: size and mtime, or size and sha256 of its bytes."""
    stat = path.stat()
    entry = {"path": str(path.resolve()), "bytes": stat.st_size}
    if mode == "content":
        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        entry["mtime_ns"] = stat.st_mtime_ns
    return entry


def stage_dir(work_dir: Path, stage: str, stage_fingerprint: str) -> Path:
    return Path(work_dir) / stage / stage_fingerprint


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # durable before it becomes visible
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST
    return read_json(path) if path.is_file() else None


def file_entry(path: Path, root: Path) -> dict:
    return {"path": str(Path(path).relative_to(root)), "bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def commit_manifest(directory: Path, manifest: dict, known_outputs: dict[str, dict] | None = None) -> dict:
    """Record every output file with its sha256, then write the manifest (the commit point).

    `known_outputs` ({relative path: file_entry}) are entries the workers that wrote the files made: their
    hash is not computed again here (a file whose size differs from its entry is hashed anew).
    """
    directory = Path(directory)
    known_outputs = known_outputs or {}
    # Left by a writer that was killed: files (atomic_path, JsonlWriter) and whole directories (an
    # adapter or checkpoint saved into `.<name>.tmp-<pid>/` before its rename). A directory has to go
    # with rmtree: unlink() raised IsADirectoryError and the stage could never commit again.
    for stale in sorted(directory.rglob(".*.tmp-*")):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        elif stale.exists() or stale.is_symlink():  # not already gone with a stale parent directory
            stale.unlink()
    outputs = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and WORK not in p.relative_to(directory).parts and p.name != MANIFEST
    )
    entries = []
    for path in outputs:
        known = known_outputs.get(str(path.relative_to(directory)))
        entries.append(known if known and known["bytes"] == path.stat().st_size else file_entry(path, directory))
    manifest = dict(manifest, outputs=entries)
    atomic_write_json(directory / MANIFEST, manifest)
    shutil.rmtree(directory / WORK, ignore_errors=True)
    return manifest


@contextlib.contextmanager
def stage_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on a stage directory while its work is done (blocks until free).

    Two runs of the same stage (two `cptflow run` of one config, two schedules) then do the work
    once: the second waits, finds the manifest and is cached. A flock dies with its process, so a
    killed run never leaves a stale lock. The lock file sits beside the directory, not in it, so
    --force can delete the directory while holding it.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def reset_stage_dir(directory: Path) -> None:
    """Forget a stage's result (for --force): the manifest goes first so a crash leaves it 'not done'."""
    directory = Path(directory)
    (directory / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)


def other_done_fingerprints(work_dir: Path, stage: str, current: str) -> list[str]:
    """Fingerprints of earlier finished runs of a stage (their presence makes the current one 'stale')."""
    root = Path(work_dir) / stage
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name != current and (p / MANIFEST).is_file())


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
