"""clean: read raw documents (JSONL, Parquet, text files, Hugging Face datasets) and make them usable text.

First stage of the DAG: unicode repair, HTML to text, whitespace, boilerplate lines, PII scrubbing,
exact-duplicate removal. Unreadable records are rejected with file, line and reason; nothing is lost.
"""

from __future__ import annotations

import ast
import functools
import glob
import gzip
import hashlib
import json
import os
import posixpath
import re
import time
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cptflow.docshards import (
    JsonlWriter,
    ShardCounts,
    load_finished_shard,
    mark_shard_finished,
    shard_work_file,
)
from cptflow.stage import Artifact, commit_finalized, counts_artifact, finalize_item, plan_finalize
from cptflow.store import atomic_path, file_fingerprint

DEFAULT_MAX_RECORD_BYTES = 64 * 2**20


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------
class MetadataFilter(BaseModel):
    """Keep a record only if `record[field] <op> value` (e.g. FineWeb-Edu `int_score >= 3`)."""

    model_config = ConfigDict(extra="forbid")
    field: str
    op: Literal["==", "!=", ">=", ">", "<=", "<", "in", "not_in"]
    value: Any


class HFDatasetSource(BaseModel):
    """A Hugging Face dataset, read without loading it whole: a `save_to_disk` directory memory-mapped,
    Parquet files by row groups, anything else with `streaming=True` (see `_plan_hf`)."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(
        description="Hub id, a packaged builder ('json', 'parquet', ... with data_files), a local dataset "
        "directory or a directory written by Dataset.save_to_disk (local paths relative to the config file)"
    )
    name: str | None = None
    split: str = "train"
    data_files: str | list[str] | None = Field(None, description="For builder datasets such as 'json' or 'parquet'")
    revision: str | None = Field(None, description="Pin a commit for reproducible runs")
    trust_remote_code: bool = False


class SourceConfig(BaseModel):
    """One input corpus. Every source goes through the same curation stages."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Used in shard names and counts")
    role: Literal["domain", "general"] = Field(description="domain data, or general 'replay' data")
    paths: list[str] = Field(
        default_factory=list, description="Files, directories or globs (relative to the config file)"
    )
    hf: HFDatasetSource | None = None
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    text_field: str = "text"
    id_field: str | None = Field(
        "id",
        description="None (or a record without one): ids are '<source>:<file>:<line>', the file named "
        "relative to its configured path (a glob's directory before the first wildcard, a file's directory, "
        "a directory itself), so ids do not depend on where the data lives",
    )
    meta_fields: list[str] | None = Field(
        None,
        description="Record fields kept in each document's meta; None: every field but the text and id. "
        "Parquet and Hugging Face sources then read only these columns (plus text, id and filter fields)",
    )
    metadata_filters: list[MetadataFilter] = Field(default_factory=list)
    code: bool = Field(False, description="Python source: keep indentation, require that it parses")
    documents_per_shard: int = Field(
        5000, gt=0, description="Input shard size (documents); .gz files are one shard each"
    )

    @model_validator(mode="after")
    def _one_kind_of_input(self) -> "SourceConfig":
        if bool(self.paths) == bool(self.hf):
            raise ValueError(f"source '{self.name}': give either 'paths' or 'hf', not both or neither")
        return self


class PIIConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    kinds: list[Literal["email", "phone", "ssn", "ipv4", "credit_card"]] = [
        "email",
        "phone",
        "ssn",
        "ipv4",
        "credit_card",
    ]
    placeholder: str = Field("<{kind}>", description="'{kind}' becomes EMAIL, PHONE, SSN, IPV4, CREDIT_CARD")


class BoilerplateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    max_line_chars: int = Field(200, description="Longer lines are prose even if they mention cookies")
    extra_patterns: list[str] = Field(
        default_factory=list, description="Regexes (case-insensitive) for more boilerplate lines"
    )


class CleanConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fix_unicode: bool = Field(True, description="ftfy mojibake repair, then NFC")
    html: Literal["auto", "always", "never"] = Field("auto", description="auto: parse documents that contain HTML tags")
    html_drop_tags: list[str] = [
        "script",
        "style",
        "noscript",
        "template",
        "svg",
        "iframe",
        "nav",
        "footer",
        "aside",
        "form",
        "head",
    ]
    max_html_depth: int = Field(
        512,
        gt=0,
        description="Pages with block elements nested deeper than this (count of open tags) are excluded "
        "as html_too_deep: parse time grows with depth x tags. 512 is Chromium's parser limit",
    )
    boilerplate: BoilerplateConfig = BoilerplateConfig()
    pii: PIIConfig = PIIConfig()
    dedup: bool = Field(True, description="Drop exact duplicates by normalised-text hash; first occurrence kept")
    # Bounds for hostile input (issue 7): a 50 MB document or a 10 MB line without spaces must not make
    # the stage's memory or time unbounded. Gopher drops documents above 100,000 words anyway.
    max_document_chars: int = Field(
        1_000_000, gt=0, description="Longer texts (characters, before cleaning) are excluded as document_too_long"
    )
    max_record_bytes: int = Field(
        DEFAULT_MAX_RECORD_BYTES,
        gt=0,
        description="A JSONL line or text file larger than this (bytes) is rejected as record_too_large, unread",
    )


# ----------------------------------------------------------------------------------------------------
# Input: files, shards and readers
# ----------------------------------------------------------------------------------------------------
class InputError(ValueError):
    """A problem with the inputs found before any work starts."""


# Parquet and Arrow are handed to Python this many rows at a time, and Parquet column chunks are read
# through a buffer of this many bytes instead of whole: a worker's memory is bounded by these, not by
# the size of a file or of its row groups (benchmarks/bench_clean_reader.py measures it).
ARROW_BATCH_ROWS = 1024
PARQUET_READ_BUFFER_BYTES = 1 << 20


@dataclass(frozen=True)
class InputFile:
    """One input file: where it is read, and the two location-free names outputs know it by."""

    path: str  # where it is read (absolute, or a URL such as hf://...)
    name: str  # relative to its source's root, '/'-separated: the file part of path-made document ids
    label: str  # as the config names it, normalised (root as written + name): rejects, meta, fingerprints


@dataclass(frozen=True)
class InputShard:
    """A slice of one source that a worker reads on its own (small and picklable)."""

    name: str
    source: str
    kind: Literal["jsonl", "parquet", "text", "hf_disk", "hf_stream"]
    files: tuple[str, ...]  # where to read: paths, URLs, or a save_to_disk directory
    start: int = 0  # jsonl: byte offset; parquet: first row group; hf_disk: first row; hf_stream: shard index
    stop: int | None = None  # exclusive; hf_stream: the number of stream shards
    first_line: int = 1  # jsonl: line number at `start`
    names: tuple[str, ...] = ()  # per file: InputFile.name (default: the file's name)
    labels: tuple[str, ...] = ()  # per file: InputFile.label (default: the path)

    def __post_init__(self) -> None:
        if not self.names:
            object.__setattr__(self, "names", tuple(Path(f).name for f in self.files))
        if not self.labels:
            object.__setattr__(self, "labels", tuple(self.files))


def _format_of(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "text"
    raise InputError(f"{path}: unknown input format (set 'format' on the source)")


def _configured_root(entry: str, match: Path) -> str:
    """The directory an entry's files are named relative to, as the config writes it: a glob's
    directory before its first wildcard, a file's directory, a directory itself ('' = the config's)."""
    if glob.has_magic(entry):
        literal: list[str] = []
        for part in entry.split("/"):
            if glob.has_magic(part):
                break
            literal.append(part)
        return "/".join(literal) if literal != [""] else "/"
    return entry if match.is_dir() else os.path.dirname(entry)


def _relative_name(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _as_configured(root: str, name: str) -> str:
    return posixpath.normpath(posixpath.join(root, name)) if root else name


def list_input_files(source: SourceConfig, base_dir: Path) -> list[InputFile]:
    """Expand a source's paths (files, directories, globs) into its files, in a fixed order; missing → error.

    A file's name (in document ids) is relative to the root of the entry that found it, so ids do not
    depend on where the data or the checkout lives. When two different files of one source would get
    the same name (two directories both holding part-0.jsonl), every name of the source is taken
    relative to the common directory of its roots instead.
    """
    found: list[tuple[str, str, Path]] = []  # (root as configured, root on disk, file)
    for entry in source.paths:
        pattern = entry if Path(entry).is_absolute() else str(base_dir / entry)
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        if not matches:
            raise InputError(f"source '{source.name}': input path '{entry}' does not exist (looked for {pattern})")
        for match in matches:
            root = _configured_root(entry, match)
            on_disk = root if os.path.isabs(root) else os.path.join(base_dir, root)
            if match.is_dir():
                files = sorted(p for p in match.rglob("*") if p.is_file() and not p.name.startswith("."))
            else:
                files = [match]
            found.extend((root, on_disk, file) for file in files)
    below_root = [_relative_name(str(file), on_disk) for _, on_disk, file in found]
    labels = [_as_configured(root, name) for (root, _, _), name in zip(found, below_root)]
    names = below_root
    if _names_collide(names, [file for _, _, file in found]):
        common = os.path.commonpath([os.path.abspath(on_disk) for _, on_disk, _ in found])
        names = [_relative_name(str(file), common) for _, _, file in found]
    return [InputFile(str(file), name, label) for (_, _, file), name, label in zip(found, names, labels)]


def _names_collide(names: list[str], files: list[Path]) -> bool:
    """True if one name stands for two different files (the same file listed twice is not a collision)."""
    first: dict[str, Path] = {}
    for name, file in zip(names, files):
        if name in first and os.path.realpath(first[name]) != os.path.realpath(file):
            return True
        first.setdefault(name, file)
    return False


def input_file_fingerprints(source: SourceConfig, base_dir: Path, mode: Literal["mtime", "content"]) -> list[dict]:
    """Each input file's size and mtime (or sha256), under its configured name: no absolute path, so
    the same config and data in another directory have the same fingerprint."""
    files = list_input_files(source, base_dir) if source.paths else _local_hf_files(source.hf, base_dir)
    return [dict(file_fingerprint(Path(file.path), mode), path=file.label) for file in files]


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _jsonl_line_offsets(path: Path, every: int) -> list[tuple[int, int]]:
    """(byte offset, line number) at the start of every `every`-th line of a plain JSONL file."""
    offsets = [(0, 1)]
    position, line = 0, 1
    with open(path, "rb") as handle:
        for _, size in _bounded_lines(handle, 2**20):  # sizes are exact; a long line is never held whole
            position += size
            line += 1
            if (line - 1) % every == 0:
                offsets.append((position, line))
    if offsets[-1][0] >= position and len(offsets) > 1:
        offsets.pop()
    return offsets


# (kind, files, names, labels, start, stop, first_line): one InputShard before it is numbered
_Spec = tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...], int, int | None, int]


def _parquet_specs(file: InputFile, size: int) -> list[_Spec]:
    """Shards of whole row groups, about `size` rows each (a row group is never split: decoding part of
    one means decoding it from its start). An unreadable file still gets one shard: its reader rejects it."""
    group_rows = _parquet_row_groups(file.path) or []
    specs: list[_Spec] = []
    groups, start = len(group_rows), 0
    while start < max(groups, 1):
        stop, rows = start, 0
        while stop < groups and (rows == 0 or rows < size):
            rows += group_rows[stop]
            stop += 1
        specs.append(("parquet", (file.path,), (file.name,), (file.label,), start, max(stop, start + 1), 1))
        start = max(stop, start + 1)
    return specs


def plan_input_shards(source: SourceConfig, base_dir: Path) -> list[InputShard]:
    """Split a source into shards of about `documents_per_shard` documents, in a fixed order."""
    size = source.documents_per_shard
    specs: list[_Spec] = []
    if source.hf:
        specs = _plan_hf(source, base_dir)
    else:
        text_files: list[InputFile] = []
        for file in list_input_files(source, base_dir):
            path = Path(file.path)
            kind = _format_of(path, source.format)
            one = ((file.path,), (file.name,), (file.label,))
            if kind == "text":
                text_files.append(file)
            elif kind == "jsonl" and not path.name.endswith(".gz"):
                offsets = _jsonl_line_offsets(path, size)
                for i, (start, line) in enumerate(offsets):
                    stop = offsets[i + 1][0] if i + 1 < len(offsets) else None
                    specs.append(("jsonl", *one, start, stop, line))
            elif kind == "jsonl":
                specs.append(("jsonl", *one, 0, None, 1))
            else:
                specs.extend(_parquet_specs(file, size))
        for i in range(0, len(text_files), size):
            group = text_files[i : i + size]
            paths, names, labels = (tuple(getattr(f, a) for f in group) for a in ("path", "name", "label"))
            specs.append(("text", paths, names, labels, 0, None, 1))
    return [
        InputShard(f"{source.name}-{i:05d}", source.name, kind, files, start, stop, line, names, labels)
        for i, (kind, files, names, labels, start, stop, line) in enumerate(specs)
    ]


@dataclass
class RawRecord:
    """A record as read, or the reason it could not be read (`reject`)."""

    file: str  # the file as the config names it (InputFile.label)
    line: int
    record: dict | None = None
    reject: str | None = None
    detail: str = ""
    raw: str = ""
    name: str = ""  # the file relative to its source root (InputFile.name), for ids made from file and line


def _bounded_lines(handle, limit: int) -> Iterator[tuple[bytes | None, int]]:
    """(line, bytes) of a binary file; a line longer than `limit` bytes is skipped in 1 MiB steps and
    comes back as (None, bytes), so one enormous line never sits in memory."""
    while raw := handle.readline(limit + 1):
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw, len(raw)
            continue
        skipped = len(raw)
        while (more := handle.readline(2**20)) and not more.endswith(b"\n"):
            skipped += len(more)
        yield None, skipped + len(more)


def _iter_jsonl(shard: InputShard, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[RawRecord]:
    path, name, label = Path(shard.files[0]), shard.names[0], shard.labels[0]
    with _open_binary(path) as handle:
        if shard.start:
            handle.seek(shard.start)
        position, line = shard.start, shard.first_line
        try:
            for raw, size in _bounded_lines(handle, max_record_bytes):
                if shard.stop is not None and position >= shard.stop:
                    break
                position += size
                if raw is None:
                    detail = f"line of {size:,} bytes, above clean.max_record_bytes ({max_record_bytes:,})"
                    yield RawRecord(label, line, reject="record_too_large", detail=detail, name=name)
                else:
                    yield _parse_json_line(label, line, raw, name)
                line += 1
        except (
            EOFError,
            OSError,
            zlib.error,
        ) as err:  # truncated or corrupt compressed file (BadGzipFile is an OSError)
            detail = (
                f"{path.name}: unreadable after line {line - 1} ({type(err).__name__}: {err}); "
                "the rest of the file is lost"
            )
            yield RawRecord(
                label, line, reject="unreadable_file", detail=_path_as_configured(detail, path, label), name=name
            )


def _path_as_configured(detail: str, path: Path | str, label: str) -> str:
    """An error message with the file's absolute path replaced by its configured name (rejects are outputs)."""
    return detail.replace(str(path), label)


def _parse_json_line(file: str, line: int, raw: bytes, name: str = "") -> RawRecord:
    preview = raw[:200].decode("utf-8", "replace")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return RawRecord(file, line, reject="invalid_utf8", detail=str(err), raw=preview, name=name)
    if not text.strip():
        return RawRecord(file, line, reject="blank_line", name=name)
    try:
        record = json.loads(text)
    except RecursionError:
        return RawRecord(
            file, line, reject="malformed_json", detail="nested too deeply to parse", raw=preview, name=name
        )
    except ValueError as err:  # JSONDecodeError, and integers longer than Python's 4300-digit limit
        return RawRecord(file, line, reject="malformed_json", detail=str(err), raw=preview, name=name)
    if not isinstance(record, dict):
        return RawRecord(file, line, reject="not_an_object", detail=type(record).__name__, raw=preview, name=name)
    # A "\ud800" escape decodes to a lone surrogate, which no UTF-8 writer accepts: reject it here, by field.
    if _SURROGATE_ESCAPE.search(raw):
        field_path = _unencodable_field(record)
        if field_path is not None:
            return RawRecord(
                file,
                line,
                reject="invalid_unicode",
                detail=f"field '{field_path}' holds a lone UTF-16 surrogate",
                raw=preview,
                name=name,
            )
    return RawRecord(file, line, record=record, name=name)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _unencodable_field(record: dict) -> str | None:
    """Dotted path of the first key or string value that is not valid Unicode (iterative: records can nest deeply)."""
    stack: list[tuple[str, Any]] = [("", record)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path or "(key)"
        elif isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                stack += [(child, item), (child, key)]
        elif isinstance(value, list):
            stack += [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    return None


def _iter_text_files(
    shard: InputShard, text_field: str, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> Iterator[RawRecord]:
    for file, name, label in zip(shard.files, shard.names, shard.labels):
        try:
            size = Path(file).stat().st_size
            if size > max_record_bytes:
                detail = f"file of {size:,} bytes, above clean.max_record_bytes ({max_record_bytes:,})"
                yield RawRecord(label, 1, reject="record_too_large", detail=detail, name=name)
                continue
            data = Path(file).read_bytes()
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            preview = data[:200].decode("utf-8", "replace")
            yield RawRecord(label, 1, reject="invalid_utf8", detail=str(err), raw=preview, name=name)
            continue
        except OSError as err:
            yield RawRecord(
                label, 1, reject="unreadable_file", detail=_path_as_configured(str(err), file, label), name=name
            )
            continue
        yield RawRecord(label, 1, record={text_field: text, "path": label}, name=name)


def _open_parquet(path: str):
    """A ParquetFile that streams column chunks through a bounded buffer; local paths or fsspec URLs."""
    import pyarrow.parquet as pq

    source = path
    if "://" in path:  # hf://datasets/..., s3://...: fsspec file objects with range requests
        import fsspec

        source = fsspec.open(path, "rb").open()
    return pq.ParquetFile(source, buffer_size=PARQUET_READ_BUFFER_BYTES, pre_buffer=False)


def _parquet_row_groups(path: str) -> list[int] | None:
    """Rows per row group, or None when the file is not readable Parquet (empty, cut short, not Parquet)."""
    import pyarrow as pa

    try:
        metadata = _open_parquet(path).metadata
    except (pa.ArrowException, OSError):
        return None
    return [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]


def _wanted_columns(names: list[str], source: SourceConfig) -> list[str] | None:
    """The columns a reader needs (in file order), or None for all: without `meta_fields` every field
    goes into the document's meta."""
    if source.meta_fields is None:
        return None
    wanted = {source.text_field, source.id_field, *source.meta_fields, *(f.field for f in source.metadata_filters)}
    return [name for name in names if name in wanted]


def _iter_parquet(shard: InputShard, source: SourceConfig) -> Iterator[RawRecord]:
    """Rows of the shard's row groups, ARROW_BATCH_ROWS at a time (line = row number in the file, from 1)."""
    import pyarrow as pa

    file, name, label = shard.files[0], shard.names[0], shard.labels[0]
    try:
        parquet = _open_parquet(file)
        metadata = parquet.metadata
    except (pa.ArrowException, OSError) as err:
        detail = _path_as_configured(
            f"{Path(file).name}: not readable Parquet ({type(err).__name__}: {err})", file, label
        )
        yield RawRecord(label, 1, reject="unreadable_file", detail=detail, name=name)
        return
    columns = _wanted_columns(parquet.schema_arrow.names, source)
    row = 1 + sum(metadata.row_group(g).num_rows for g in range(shard.start))
    for group in range(shard.start, min(shard.stop or metadata.num_row_groups, metadata.num_row_groups)):
        rows, done, error = metadata.row_group(group).num_rows, 0, None
        try:
            batches = parquet.iter_batches(
                batch_size=ARROW_BATCH_ROWS, row_groups=[group], columns=columns, use_threads=False
            )
            for batch in batches:
                for record, bad_column in _arrow_records(batch):
                    yield _arrow_record(label, row + done, record, bad_column, name)
                    done += 1
        except (pa.ArrowException, OSError) as err:  # a corrupt page: the group's remaining rows are one reject
            error = f"{type(err).__name__}: {err}"
        if done < rows:
            detail = (
                f"{Path(file).name}: row group {group}, rows {row + done}-{row + rows - 1} ({rows - done} rows) "
                f"not readable ({error or 'fewer rows than the footer says'})"
            )
            yield RawRecord(
                label, row + done, reject="unreadable_file", detail=_path_as_configured(detail, file, label), name=name
            )
        row += rows


def _arrow_record(label: str, line: int, record: dict | None, bad_column: str | None, name: str) -> RawRecord:
    if bad_column is None:
        return RawRecord(label, line, record=record, name=name)
    detail = f"column '{bad_column}' holds bytes that are not UTF-8"
    return RawRecord(label, line, reject="invalid_utf8", detail=detail, name=name)


def _arrow_records(table) -> Iterator[tuple[dict | None, str | None]]:
    """(record, None) per row of an Arrow batch or table, or (None, column) for a row whose string column
    is not UTF-8: Arrow does not validate strings on read, and one bad value makes to_pylist() raise."""
    try:
        records = table.to_pylist()
    except UnicodeDecodeError:
        records = None
    if records is not None:
        yield from ((record, None) for record in records)
        return
    names = table.column_names
    columns: dict[str, list] = {}
    bad_rows: dict[int, str] = {}  # row -> first column (in order) that does not decode
    for column_name in names:
        column = table.column(column_name)
        try:
            columns[column_name] = column.to_pylist()
            continue
        except UnicodeDecodeError:
            pass
        values = []
        for index in range(len(column)):  # only this batch's rows of this one column
            try:
                values.append(column[index].as_py())
            except UnicodeDecodeError:
                values.append(None)
                bad_rows.setdefault(index, column_name)
        columns[column_name] = values
    for index in range(table.num_rows):
        if index in bad_rows:
            yield None, bad_rows[index]
        else:
            yield {column_name: columns[column_name][index] for column_name in names}, None


# Hugging Face datasets, three ways, none of which loads a whole dataset per shard:
#   a directory written by `Dataset.save_to_disk` → load_from_disk (memory-mapped Arrow), shards of rows;
#   a dataset whose split is Parquet files (most of the Hub, a local folder of .parquet) → each file read
#     like a local Parquet file, by row groups (hf:// URLs read by range requests);
#   anything else (json, csv, ...) → `streaming=True`, one input shard per stream shard (data file).
def _local_hf_path(hf: HFDatasetSource, base_dir: Path) -> Path | None:
    """The dataset's local directory or file (relative to the config file), or None for a Hub id or builder."""
    candidate = Path(hf.path).expanduser()
    candidate = candidate if candidate.is_absolute() else base_dir / candidate
    return candidate if candidate.exists() else None


def _saved_to_disk(path: Path | None) -> bool:
    return path is not None and path.is_dir() and any((path / n).is_file() for n in ("state.json", "dataset_dict.json"))


def _resolved_data_files(hf: HFDatasetSource, base_dir: Path) -> str | list[str] | None:
    """data_files of a packaged builder ('json', 'parquet', ...) relative to the config file; a local
    dataset directory or a Hub dataset resolves its own data_files."""
    if hf.data_files is None or "/" in hf.path or _local_hf_path(hf, base_dir) is not None:
        return hf.data_files

    def resolve(entry: str) -> str:
        return entry if "://" in entry or Path(entry).is_absolute() else str(base_dir / entry)

    return resolve(hf.data_files) if isinstance(hf.data_files, str) else [resolve(e) for e in hf.data_files]


def _local_hf_files(hf: HFDatasetSource | None, base_dir: Path) -> list[InputFile]:
    """The local files behind a Hugging Face source (for its fingerprint); none for a Hub dataset."""
    if hf is None:
        return []
    local = _local_hf_path(hf, base_dir)
    if local is not None and local.is_dir():
        paths = [str(p) for p in sorted(local.rglob("*")) if p.is_file() and not p.name.startswith(".")]
        names = [_relative_name(p, str(local)) for p in paths]
    elif local is not None:
        paths, names = [str(local)], [local.name]
    else:  # a packaged builder's local data_files (globs allowed)
        data_files = _resolved_data_files(hf, base_dir)
        entries = [data_files] if isinstance(data_files, str) else list(data_files or [])
        paths = [
            p for e in entries if "://" not in e for p in sorted(glob.glob(e, recursive=True)) if Path(p).is_file()
        ]
        names = _common_relative_names(paths)
    return [InputFile(path, name, f"hf:{hf.path}:{name}") for path, name in zip(paths, names)]


def _common_relative_names(paths: list[str]) -> list[str]:
    """Each path (or URL) relative to the deepest directory all of them share: a lone file keeps its name."""
    parts = [p.split("/") for p in paths]
    if not parts:
        return []
    common = 0
    shortest = min(len(p) for p in parts) - 1  # the last part is a file name, never shared
    while common < shortest and all(p[common] == parts[0][common] for p in parts):
        common += 1
    return ["/".join(p[common:]) for p in parts]


def _load_hf_disk(path: str, split: str):
    import datasets

    dataset = datasets.load_from_disk(path)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise InputError(f"{path}: no split '{split}' (splits: {', '.join(dataset)})")
        dataset = dataset[split]
    return dataset


def _hf_builder(hf: HFDatasetSource, base_dir: Path):
    import datasets

    local = _local_hf_path(hf, base_dir)
    options: dict[str, Any] = {}
    data_files = _resolved_data_files(hf, base_dir)
    if data_files:
        options["data_files"] = data_files
    if hf.trust_remote_code:  # off unless the config asks for it
        options["trust_remote_code"] = True
    return datasets.load_dataset_builder(str(local) if local else hf.path, hf.name, revision=hf.revision, **options)


def _hf_split_files(builder, hf: HFDatasetSource) -> list[str] | None:
    data_files = builder.config.data_files
    if not data_files:
        return None
    if hf.split not in data_files:
        raise InputError(f"dataset '{hf.path}': no split '{hf.split}' (splits: {', '.join(data_files)})")
    return [str(f) for f in data_files[hf.split]]


def _plan_hf(source: SourceConfig, base_dir: Path) -> list[_Spec]:
    hf, size = source.hf, source.documents_per_shard
    local = _local_hf_path(hf, base_dir)
    if _saved_to_disk(local):
        rows = len(_load_hf_disk(str(local), hf.split))
        label = f"hf:{hf.path}:{hf.split}"
        return [
            ("hf_disk", (str(local),), (hf.split,), (label,), i, min(i + size, rows), 1) for i in range(0, rows, size)
        ]
    builder = _hf_builder(hf, base_dir)
    files = _hf_split_files(builder, hf)
    if builder.name == "parquet" and files:
        names = _common_relative_names(files)
        return [s for f, n in zip(files, names) for s in _parquet_specs(InputFile(f, n, f"hf:{hf.path}:{n}"), size)]
    shards = builder.as_streaming_dataset(split=hf.split).num_shards
    names = (
        _common_relative_names(files)
        if files and len(files) == shards
        else [f"{hf.split}-{i:05d}" for i in range(shards)]
    )
    return [("hf_stream", (hf.path,), (name,), (f"hf:{hf.path}:{name}",), i, shards, 1) for i, name in enumerate(names)]


def _iter_hf_disk(shard: InputShard, source: SourceConfig) -> Iterator[RawRecord]:
    """Rows [start, stop) of a save_to_disk dataset, as Arrow slices of the memory-mapped files."""
    dataset = _load_hf_disk(shard.files[0], source.hf.split)
    columns = _wanted_columns(dataset.column_names, source)
    if columns is not None:
        dataset = dataset.select_columns(columns)
    rows = dataset.with_format("arrow")
    for begin in range(shard.start, shard.stop, ARROW_BATCH_ROWS):
        table = rows[begin : min(begin + ARROW_BATCH_ROWS, shard.stop)]
        for offset, (record, bad_column) in enumerate(_arrow_records(table)):
            yield _arrow_record(shard.labels[0], begin + offset + 1, record, bad_column, shard.names[0])


def _iter_hf_stream(shard: InputShard, source: SourceConfig, base_dir: Path) -> Iterator[RawRecord]:
    """One stream shard (data file) of a streamed dataset; line = row in the shard, from 1."""
    import pyarrow as pa

    stream = _hf_builder(source.hf, base_dir).as_streaming_dataset(split=source.hf.split)
    known = stream.column_names
    columns = _wanted_columns(known, source) if known else None
    if columns is not None:
        stream = stream.select_columns(columns)
    label, name, line = shard.labels[0], shard.names[0], 1
    try:
        for record in stream.shard(num_shards=shard.stop, index=shard.start):
            yield RawRecord(label, line, record=dict(record), name=name)
            line += 1
    except (pa.ArrowException, OSError, ValueError) as err:  # a corrupt or cut-off data file
        detail = f"{name}: unreadable after row {line - 1} ({type(err).__name__}: {err}); the rest of the shard is lost"
        yield RawRecord(label, line, reject="unreadable_file", detail=detail, name=name)


def read_raw_records(
    shard: InputShard,
    source: SourceConfig,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    base_dir: Path = Path("."),
) -> Iterator[RawRecord]:
    """The records of one input shard, in order; `base_dir` (the config's directory) locates local HF datasets."""
    if shard.kind == "jsonl":
        return _iter_jsonl(shard, max_record_bytes)
    if shard.kind == "text":
        return _iter_text_files(shard, source.text_field, max_record_bytes)
    if shard.kind == "parquet":
        return _iter_parquet(shard, source)
    if shard.kind == "hf_disk":
        return _iter_hf_disk(shard, source)
    return _iter_hf_stream(shard, source, Path(base_dir))


def check_text_field(source: SourceConfig, base_dir: Path, sample: int = 200) -> None:
    """Fail before any work if a JSONL/Parquet file has no record with the configured text field.

    Reads at most `sample` records from the start of each file (not a plan of the source: that scans
    every JSONL file for its line offsets).
    """
    if source.hf or source.format == "text":
        return
    source = source.model_copy(update={"meta_fields": None})  # every column, for the message's "fields seen"
    for file in list_input_files(source, base_dir):
        kind = _format_of(Path(file.path), source.format)
        if kind == "text":
            continue
        stop = 1 if kind == "parquet" else None  # the first row group; a JSONL file is read lazily
        shard = InputShard(
            "check", source.name, kind, (file.path,), stop=stop, names=(file.name,), labels=(file.label,)
        )
        seen: Counter = Counter()
        found = parsed = 0
        # Field names are all this needs: records above 1 MiB are skipped, not parsed (a 50 MB line would be).
        for read, raw in enumerate(read_raw_records(shard, source, max_record_bytes=2**20), start=1):
            if raw.record is not None:
                parsed += 1
                seen.update(raw.record.keys())
                found += source.text_field in raw.record
            if read >= sample or found:
                break
        if parsed and not found:
            fields = ", ".join(name for name, _ in seen.most_common(8))
            raise InputError(
                f"source '{source.name}': no record in {file.label} has the text field "
                f"'{source.text_field}' (fields seen: {fields}); set 'text_field' on the source"
            )


# ----------------------------------------------------------------------------------------------------
# Cleaning steps: each is a plain function on text
# ----------------------------------------------------------------------------------------------------
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def fix_unicode(text: str) -> str:
    """Mojibake repair with ftfy where its badness heuristic fires, then NFC and no control characters.

    ASCII cannot hold mojibake, and `is_bad` costs a tenth of `fix_text`: most documents skip ftfy.
    """
    if not text.isascii():
        import ftfy
        from ftfy.badness import is_bad

        if is_bad(text):
            # Keep curly quotes and entities as written: entities are handled by the HTML step.
            text = ftfy.fix_text(
                text, ftfy.TextFixerConfig(uncurl_quotes=False, unescape_html=False, normalization="NFC")
            )
        text = unicodedata.normalize("NFC", text)
    return _CONTROL_CHARS.sub("", text)


# [^<>]*, not [^>]*: with the latter, a page of 100,000 "<div " never closed by ">" costs a scan to the
# end of the text per "<" (quadratic: minutes for 500 KB); the next "<" now ends every attempt.
_HTML_HINT = re.compile(
    r"<(?:!doctype|html|head|body|div|p|br|span|a|script|style|table|tr|td|li|ul|ol|h[1-6]|article|section|meta|link)\b[^<>]*>",
    re.IGNORECASE,
)
_BLOCK_TAGS = frozenset(
    "address article blockquote body dd div dl dt fieldset figcaption figure h1 h2 h3 h4 h5 h6 "
    "header hr li main ol p pre "
    "section table tbody thead tfoot tr td th ul title caption details summary".split()
)
_PARAGRAPH_TAGS = frozenset("p h1 h2 h3 h4 h5 h6 blockquote pre table ul ol article section title".split())


def looks_like_html(text: str) -> bool:
    return _HTML_HINT.search(text) is not None


# Block containers whose start tag makes an HTML5 parser walk its stack of open elements ("a p element in
# button scope"); p, li, dd, dt and headings close their predecessor, so they never nest deep.
_NESTING_TAG = re.compile(
    r"<(/?)(?:address|article|aside|blockquote|center|details|dialog|dir|div|dl|fieldset|figcaption|figure|footer|"
    r"header|hgroup|main|menu|nav|ol|section|summary|ul|form|table|pre|listing)\b",
    re.IGNORECASE,
)


def html_nesting_depth(html: str) -> int:
    """Deepest nesting of block containers, counted from the tags alone (linear, no parse).

    The parser's time grows with depth x tags: 100,000 nested <div> take two minutes in lexbor
    (measured: 10,000 0.4 s, 20,000 1.9 s, 40,000 5.8 s), so such pages are refused before parsing.
    """
    depth = deepest = 0
    for match in _NESTING_TAG.finditer(html):
        if match.group(1):
            depth = max(depth - 1, 0)
        else:
            depth += 1
            deepest = max(deepest, depth)
    return deepest


def html_to_text(html: str, drop_tags: list[str]) -> str:
    """Visible text of an HTML page (lexbor parser): entities decoded, blocks on their own lines."""
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(html)
    for tag in drop_tags:
        for node in tree.css(tag):
            node.decompose()
    root = tree.body or tree.root
    if root is None:
        return ""
    parts: list[str] = []
    pending_break = ""  # "\n" (line) or "\n\n" (paragraph), written before the next visible text

    def add_break(kind: str) -> None:
        nonlocal pending_break
        pending_break = max(pending_break, kind, key=len)

    stack = [(root, False)]  # explicit stack: deeply nested pages must not hit the recursion limit
    while stack:
        node, closing = stack.pop()
        tag = node.tag
        if closing:
            add_break("\n\n" if tag in _PARAGRAPH_TAGS else "\n")
        elif tag == "-text":
            text = node.text(deep=False)
            if text.strip():
                if pending_break and parts:
                    parts.append(pending_break)
                pending_break = ""
                parts.append(text)
            elif parts and not pending_break:
                parts.append(" ")
        elif tag == "br":
            add_break("\n")
        elif not tag.startswith(("_", "!", "-")):
            if tag in _BLOCK_TAGS:
                add_break("\n\n" if tag in _PARAGRAPH_TAGS else "\n")
                stack.append((node, True))
            stack.extend((child, False) for child in reversed(list(node.iter(include_text=True))))
    return "".join(parts)


_SPACES = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_INVISIBLE = re.compile(r"[\u200b\u2060\ufeff]")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalise_whitespace(text: str, code: bool = False) -> str:
    """One space between words, no trailing spaces, at most one blank line between paragraphs."""
    text = _INVISIBLE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if code:  # indentation is syntax
        lines = [line.rstrip() for line in text.split("\n")]
    else:
        lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")


BOILERPLATE_PATTERNS = [
    r"\b(we|this (web)?site) uses? cookies\b",
    r"\baccept (all )?cookies\b",
    r"\bcookie (policy|settings|preferences)\b",
    r"\b(enable|activate) javascript\b",
    r"\bjavascript is (disabled|required|not enabled)\b",
    r"\bprivacy policy\b",
    r"\bterms (of (use|service)|and conditions)\b",
    r"\ball rights reserved\b",
    r"\b(subscribe|sign up) (to|for) (our|the) newsletter\b",
    r"\bshare (this|on) (article|page|facebook|twitter)\b",
    r"\bskip to (main )?content\b",
    r"^\s*(home|menu|search|log ?in|sign ?(in|up))(\s*[|»>/·-]\s*\w+){2,}\s*$",
]


def boilerplate_matcher(cfg: BoilerplateConfig) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in BOILERPLATE_PATTERNS + cfg.extra_patterns), re.IGNORECASE)


def remove_boilerplate_lines(text: str, matcher: re.Pattern, max_line_chars: int) -> tuple[str, int]:
    kept, removed = [], 0
    for line in text.split("\n"):
        if len(line) <= max_line_chars and matcher.search(line):
            removed += 1
        else:
            kept.append(line)
    return (_BLANK_LINES.sub("\n\n", "\n".join(kept)).strip("\n"), removed) if removed else (text, 0)


# One alternation, one pass over the text. At a given position the first alternative wins, so card
# numbers come before phone numbers (a card contains phone-like digit runs).
_PII_PATTERNS = {
    "email": r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
    "credit_card": r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])",
    "ssn": r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])",
    "phone": r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w)"
    r"|(?<![\w+])\+\d{2,3}(?:[ .-]\d{1,4}){3,5}(?!\w)",
    "ipv4": r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])",
}


@functools.lru_cache(maxsize=8)
def _pii_regex(kinds: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(f"(?P<{kind}>{_PII_PATTERNS[kind]})" for kind in _PII_PATTERNS if kind in kinds))


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char)
        if i % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def scrub_pii(text: str, cfg: PIIConfig, tally: Counter) -> str:
    """Replace personal data with placeholders; card numbers only when the Luhn check passes."""

    def replace(match: re.Match) -> str:
        kind = match.lastgroup
        if kind == "credit_card":
            digits = re.sub(r"\D", "", match.group())
            if not (13 <= len(digits) <= 19 and luhn_valid(digits)):
                return match.group()
        tally[f"pii_{kind}"] += 1
        return cfg.placeholder.format(kind=kind.upper())

    return _pii_regex(tuple(cfg.kinds)).sub(replace, text)


def python_parses(text: str) -> bool:
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


_DEDUP_SPACES = re.compile(r"\s+")


def dedup_key(text: str) -> str:
    """Exact-duplicate key: case and whitespace differences do not make a document new."""
    return hashlib.blake2b(_DEDUP_SPACES.sub(" ", text).strip().lower().encode(), digest_size=16).hexdigest()


@dataclass
class CleanSteps:
    """The configured steps, compiled once per shard."""

    cfg: CleanConfig
    code: bool

    def __post_init__(self) -> None:
        self.boilerplate = boilerplate_matcher(self.cfg.boilerplate)

    def __call__(self, text: str, tally: Counter) -> tuple[str, str | None]:
        """Cleaned text, and a reason if the document is to be excluded."""
        if self.cfg.fix_unicode:
            fixed = fix_unicode(text)
            tally["unicode_changed"] += fixed != text
            text = fixed
        if not self.code and (self.cfg.html == "always" or (self.cfg.html == "auto" and looks_like_html(text))):
            if html_nesting_depth(text) > self.cfg.max_html_depth:
                return text, "html_too_deep"
            text = html_to_text(text, self.cfg.html_drop_tags)
            tally["html_documents"] += 1
        text = normalise_whitespace(text, code=self.code)
        if self.cfg.boilerplate.enabled and not self.code:
            text, removed = remove_boilerplate_lines(text, self.boilerplate, self.cfg.boilerplate.max_line_chars)
            tally["boilerplate_lines_removed"] += removed
        if self.cfg.pii.enabled:
            text = scrub_pii(text, self.cfg.pii, tally)
        if not text.strip():
            return text, "empty_after_clean"
        if self.code and not python_parses(text):
            return text, "python_syntax_error"
        return text, None


_OPS = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    "in": lambda a, b: a in b,
    "not_in": lambda a, b: a not in b,
}


def metadata_reason(record: dict, filters: list[MetadataFilter]) -> str | None:
    for rule in filters:
        value = record.get(rule.field)
        try:
            passed = value is not None and _OPS[rule.op](value, rule.value)
        except TypeError:
            passed = False
        if not passed:
            return f"metadata_{rule.field}"
    return None


def _to_document(raw: RawRecord, source: SourceConfig) -> tuple[dict | None, str | None, str]:
    """A document from a parsed record, or (None, reject reason, detail) naming the field."""
    record = raw.record
    text = record.get(source.text_field)
    if source.text_field not in record:
        return None, "missing_text_field", f"field '{source.text_field}' is missing"
    if not isinstance(text, str):
        return None, "wrong_type_text_field", f"field '{source.text_field}' is {type(text).__name__}, expected a string"
    if not text.strip():
        return None, "empty_text", f"field '{source.text_field}' is empty"
    doc_id = record.get(source.id_field) if source.id_field else None
    if isinstance(doc_id, (dict, list)) or doc_id is None or doc_id == "":
        doc_id = f"{source.name}:{raw.name}:{raw.line}"  # the file relative to its source root: no location
    named = record if source.meta_fields is None else {k: record[k] for k in source.meta_fields if k in record}
    meta = {k: v for k, v in named.items() if k not in (source.text_field, source.id_field)}
    return {"id": str(doc_id), "source": source.name, "text": text, "meta": meta}, None, ""


# ----------------------------------------------------------------------------------------------------
# The stage: map over input shards, then one commit that removes exact duplicates across all shards
# ----------------------------------------------------------------------------------------------------
def clean_shard(
    shard: InputShard, source: SourceConfig, cfg: CleanConfig, stage_directory: Path, base_dir: Path
) -> ShardCounts:
    """Clean one input shard into `_work/` (kept, excluded, rejected, dedup keys); idempotent after a kill."""
    finished = load_finished_shard(stage_directory, shard.name)
    if finished is not None:
        return finished
    started = time.perf_counter()
    counts = ShardCounts(shard=shard.name, source=shard.source)
    steps = CleanSteps(cfg, code=source.code)
    work = lambda suffix: shard_work_file(stage_directory, shard.name, suffix)  # noqa: E731
    with (
        JsonlWriter(work("kept.jsonl")) as kept,
        JsonlWriter(work("excluded.jsonl")) as excluded,
        JsonlWriter(work("rejected.jsonl")) as rejected,
    ):
        keys: list[bytes] = []  # per kept document: its dedup key and its id, 16 + 16 bytes
        for raw in read_raw_records(shard, source, cfg.max_record_bytes, base_dir):
            counts.documents_in += 1
            doc, reason, detail = (None, raw.reject, raw.detail) if raw.reject else _to_document(raw, source)
            if doc is None:
                counts.rejected[reason] += 1
                rejected.write(
                    {
                        "source": source.name,
                        "file": raw.file,
                        "line": raw.line,
                        "reason": reason,
                        "detail": detail,
                        "raw": raw.raw,
                    }
                )
                continue
            reason = metadata_reason(raw.record, source.metadata_filters)
            if reason is None and len(doc["text"]) > cfg.max_document_chars:
                reason = "document_too_long"  # before the cleaning steps, whose cost grows with length
            if reason is None:
                doc["text"], reason = steps(doc["text"], counts.stats)
            if reason:
                counts.excluded[reason] += 1
                excluded.write(dict(doc, reason=reason))
                continue
            counts.kept += 1
            kept.write(doc)
            keys.append(bytes.fromhex(dedup_key(doc["text"])) + id_digest(doc["id"]))
    with atomic_path(work("keys.npy")) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.frombuffer(b"".join(keys), dtype="<u8").reshape(len(keys), 4))
    counts.seconds = time.perf_counter() - started
    mark_shard_finished(stage_directory, counts)
    return counts


def id_digest(doc_id: str) -> bytes:
    return hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _repeated(columns: np.ndarray) -> np.ndarray:
    """For (n, 2) uint64 rows: which rows occur more than once (a sort, no hash set of every row)."""
    order = np.lexsort((columns[:, 1], columns[:, 0]))
    ordered = columns[order]
    same_as_next = (ordered[1:] == ordered[:-1]).all(axis=1)
    repeated = np.zeros(len(columns), dtype=bool)
    repeated[1:] |= same_as_next
    repeated[:-1] |= same_as_next
    mask = np.empty(len(columns), dtype=bool)
    mask[order] = repeated
    return mask


def duplicate_decisions(stage_directory: Path, shard_names: list[str], dedup: bool) -> dict[str, dict[int, str]]:
    """For each shard, the kept-line numbers to drop: exact duplicates and re-used ids (the first one kept
    wins: a document is dropped when its text or its id is that of an earlier document that was kept).

    Works from the shards' 32-byte summaries (dedup key and id digest per document): a sort finds the
    documents whose key or id occurs more than once, and only those go through the first-wins pass in
    document order (the others can neither drop nor be dropped)."""
    paths = [shard_work_file(stage_directory, shard, "keys.npy") for shard in shard_names]
    sizes = [np.load(path, mmap_mode="r").shape[0] for path in paths]
    involved = np.zeros(sum(sizes), dtype=bool)
    for first_column in (0, 2) if dedup else (2,):  # the text keys, then the ids
        columns = np.concatenate([np.load(path, mmap_mode="r")[:, first_column : first_column + 2] for path in paths])
        involved |= _repeated(columns)
        del columns
    drops: dict[str, dict[int, str]] = {shard: {} for shard in shard_names}
    seen_keys: set[tuple[int, int]] = set()
    seen_ids: set[tuple[int, int]] = set()
    offsets = np.cumsum([0, *sizes])
    for ordinal, (shard, path) in enumerate(zip(shard_names, paths)):
        lines = np.nonzero(involved[offsets[ordinal] : offsets[ordinal + 1]])[0]
        if not len(lines):
            continue
        rows = np.load(path, mmap_mode="r")[lines].tolist()
        for line, (key_hi, key_lo, id_hi, id_lo) in zip(lines.tolist(), rows):
            key, doc_id = (key_hi, key_lo), (id_hi, id_lo)
            if dedup and key in seen_keys:
                drops[shard][line] = "exact_duplicate"
            elif doc_id in seen_ids:
                drops[shard][line] = "duplicate_id"
            else:
                seen_keys.add(key)
                seen_ids.add(doc_id)
    return drops


# ---------------------------------------------------------------------------------------------
# The stage, as the pipeline sees it (cptflow/plan.py lists the stage modules in DAG order)
# ---------------------------------------------------------------------------------------------
STAGE_VERSION = 2  # 2: ids and file names relative to the source root (issue 14)
NAME = "clean"
UPSTREAM = None  # the first stage: reads the configured sources
Config = CleanConfig  # the `clean:` section of the pipeline YAML


def fingerprint_inputs(cfg) -> dict:
    """The config, the sources and each input file (size and mtime, or sha256: `input_fingerprint`)."""
    base = Path(cfg.base_dir)
    return {
        "config": cfg.clean.model_dump(mode="json"),
        "sources": [s.model_dump(mode="json") for s in cfg.sources],
        "inputs": {s.name: input_file_fingerprints(s, base, cfg.input_fingerprint) for s in cfg.sources},
        "version": STAGE_VERSION,
    }


def artifacts(manifest: dict, directory: Path) -> list[Artifact]:
    return [counts_artifact(manifest)]


def plan(run, cfg) -> list[dict]:
    """Input shards of every source, after checking that the inputs exist and have the text field."""
    base = Path(cfg.base_dir)
    shards = []
    for source in cfg.sources:
        check_text_field(source, base)
        shards.extend({"shard": s.name, "source": source.name, "input": s} for s in plan_input_shards(source, base))
    return shards


def process(run, cfg, item: dict) -> ShardCounts:
    source = next(s for s in cfg.sources if s.name == item["source"])
    return clean_shard(item["input"], source, cfg.clean, run.path, Path(cfg.base_dir))


def plan_publish(run, cfg, shard_counts: list[ShardCounts]) -> list[dict]:
    shards = [c.shard for c in shard_counts]
    return plan_finalize(run, shard_counts, lambda: (duplicate_decisions(run.path, shards, cfg.clean.dedup), {}))


REDUCE_ROUNDS = (plan_publish,)  # after the shards: publish each (one task each) without its duplicates


def reduce(run, cfg, item: dict) -> dict:
    return finalize_item(run, item)


def commit(run, cfg, shard_counts: list[ShardCounts], started: float) -> dict:
    plan_publish(run, cfg, shard_counts)
    return commit_finalized(run, shard_counts, started)
