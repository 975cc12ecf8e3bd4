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
import re
import time
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cptflow.docshards import (
    JsonlWriter,
    ShardCounts,
    finalize_shard,
    load_finished_shard,
    mark_shard_finished,
    shard_work_file,
)
from cptflow.stage import Artifact, commit_data_stage, counts_artifact
from cptflow.store import file_fingerprint

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
    """A Hugging Face dataset, loaded with `datasets.load_dataset` only when a config names one."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="Hub id or local dataset script/directory")
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
    id_field: str | None = Field("id", description="None: ids are made from file and line")
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


@dataclass(frozen=True)
class InputShard:
    """A slice of one source that a worker reads on its own (small and picklable)."""

    name: str
    source: str
    kind: Literal["jsonl", "parquet", "text", "hf"]
    files: tuple[str, ...]
    start: int = 0  # jsonl: byte offset; parquet: first row group; hf: first row
    stop: int | None = None  # exclusive
    first_line: int = 1  # jsonl: line number at `start`


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


def list_input_files(source: SourceConfig, base_dir: Path) -> list[Path]:
    """Expand a source's paths (files, directories, globs) into a sorted list of files; missing → error."""
    files: list[Path] = []
    for entry in source.paths:
        pattern = entry if Path(entry).is_absolute() else str(base_dir / entry)
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        if not matches:
            raise InputError(f"source '{source.name}': input path '{entry}' does not exist (looked for {pattern})")
        for match in matches:
            if match.is_dir():
                files.extend(sorted(p for p in match.rglob("*") if p.is_file() and not p.name.startswith(".")))
            else:
                files.append(match)
    return files


def input_file_fingerprints(source: SourceConfig, base_dir: Path, mode: Literal["mtime", "content"]) -> list[dict]:
    return [file_fingerprint(path, mode) for path in (list_input_files(source, base_dir) if source.paths else [])]


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


def plan_input_shards(source: SourceConfig, base_dir: Path) -> list[InputShard]:
    """Split a source into shards of about `documents_per_shard` documents, in a fixed order."""
    size = source.documents_per_shard
    specs: list[tuple[str, tuple[str, ...], int, int | None, int]] = []
    if source.hf:
        rows = len(_load_hf_dataset(source.hf))
        specs = [("hf", (), start, min(start + size, rows), 1) for start in range(0, rows, size)]
    else:
        text_files: list[str] = []
        for path in list_input_files(source, base_dir):
            kind = _format_of(path, source.format)
            if kind == "text":
                text_files.append(str(path))
            elif kind == "jsonl" and not path.name.endswith(".gz"):
                offsets = _jsonl_line_offsets(path, size)
                for i, (start, line) in enumerate(offsets):
                    stop = offsets[i + 1][0] if i + 1 < len(offsets) else None
                    specs.append(("jsonl", (str(path),), start, stop, line))
            elif kind == "jsonl":
                specs.append(("jsonl", (str(path),), 0, None, 1))
            else:
                # An unreadable file still gets one shard: its reader rejects it with a reason.
                group_rows = _parquet_row_groups(path) or []
                groups = len(group_rows)
                start = 0
                while start < max(groups, 1):
                    stop, rows = start, 0
                    while stop < groups and (rows == 0 or rows < size):
                        rows += group_rows[stop]
                        stop += 1
                    specs.append(("parquet", (str(path),), start, max(stop, start + 1), 1))
                    start = max(stop, start + 1)
        for i in range(0, len(text_files), size):
            specs.append(("text", tuple(text_files[i : i + size]), 0, None, 1))
    return [
        InputShard(f"{source.name}-{i:05d}", source.name, kind, files, start, stop, line)
        for i, (kind, files, start, stop, line) in enumerate(specs)
    ]


@dataclass
class RawRecord:
    """A record as read, or the reason it could not be read (`reject`)."""

    file: str
    line: int
    record: dict | None = None
    reject: str | None = None
    detail: str = ""
    raw: str = ""


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
    path = Path(shard.files[0])
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
                    yield RawRecord(str(path), line, reject="record_too_large", detail=detail)
                else:
                    yield _parse_json_line(str(path), line, raw)
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
            yield RawRecord(str(path), line, reject="unreadable_file", detail=detail)


def _parse_json_line(file: str, line: int, raw: bytes) -> RawRecord:
    preview = raw[:200].decode("utf-8", "replace")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return RawRecord(file, line, reject="invalid_utf8", detail=str(err), raw=preview)
    if not text.strip():
        return RawRecord(file, line, reject="blank_line")
    try:
        record = json.loads(text)
    except RecursionError:
        return RawRecord(file, line, reject="malformed_json", detail="nested too deeply to parse", raw=preview)
    except ValueError as err:  # JSONDecodeError, and integers longer than Python's 4300-digit limit
        return RawRecord(file, line, reject="malformed_json", detail=str(err), raw=preview)
    if not isinstance(record, dict):
        return RawRecord(file, line, reject="not_an_object", detail=type(record).__name__, raw=preview)
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
            )
    return RawRecord(file, line, record=record)


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
    for file in shard.files:
        try:
            size = Path(file).stat().st_size
            if size > max_record_bytes:
                detail = f"file of {size:,} bytes, above clean.max_record_bytes ({max_record_bytes:,})"
                yield RawRecord(file, 1, reject="record_too_large", detail=detail)
                continue
            data = Path(file).read_bytes()
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            yield RawRecord(file, 1, reject="invalid_utf8", detail=str(err), raw=data[:200].decode("utf-8", "replace"))
            continue
        except OSError as err:
            yield RawRecord(file, 1, reject="unreadable_file", detail=str(err))
            continue
        yield RawRecord(file, 1, record={text_field: text, "path": file})


def _parquet_row_groups(path: Path) -> list[int] | None:
    """Rows per row group, or None when the file is not readable Parquet (empty, cut short, not Parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError):
        return None
    return [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]


def _iter_parquet(shard: InputShard) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = shard.files[0]
    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as err:
        detail = f"{Path(file).name}: not readable Parquet ({type(err).__name__}: {err})"
        yield RawRecord(file, 1, reject="unreadable_file", detail=detail)
        return
    row = 1 + sum(parquet.metadata.row_group(g).num_rows for g in range(shard.start))
    for group in range(shard.start, min(shard.stop or parquet.num_row_groups, parquet.num_row_groups)):
        try:
            table = parquet.read_row_group(group)
        except (pa.ArrowException, OSError) as err:  # a corrupt page: this group's rows are one reject
            rows = parquet.metadata.row_group(group).num_rows
            detail = f"{Path(file).name}: row group {group} ({rows} rows) not readable ({type(err).__name__}: {err})"
            yield RawRecord(file, row, reject="unreadable_file", detail=detail)
            row += rows
            continue
        for record, bad_column in _parquet_rows(table):
            if bad_column is None:
                yield RawRecord(file, row, record=record)
            else:
                yield RawRecord(
                    file, row, reject="invalid_utf8", detail=f"column '{bad_column}' holds bytes that are not UTF-8"
                )
            row += 1


def _parquet_rows(table) -> Iterator[tuple[dict | None, str | None]]:
    """(record, None) per row, or (None, column) for a row whose string column is not UTF-8: Arrow does not
    validate strings on read, and one bad value would make the whole group's to_pylist() raise."""
    try:
        yield from ((record, None) for record in table.to_pylist())
        return
    except UnicodeDecodeError:
        pass
    for index in range(table.num_rows):
        record: dict = {}
        for name in table.column_names:
            try:
                record[name] = table.column(name)[index].as_py()
            except UnicodeDecodeError:
                yield None, name
                break
        else:
            yield record, None


def _load_hf_dataset(hf: HFDatasetSource):
    import datasets

    options = {"data_files": hf.data_files} if hf.data_files else {}
    if hf.trust_remote_code:  # off unless the config asks for it
        options["trust_remote_code"] = True
    return datasets.load_dataset(hf.path, hf.name, split=hf.split, revision=hf.revision, **options)


def _iter_hf(shard: InputShard, source: SourceConfig) -> Iterator[RawRecord]:
    dataset = _load_hf_dataset(source.hf).select(range(shard.start, shard.stop))
    label = f"hf:{source.hf.path}/{source.hf.name or ''}:{source.hf.split}"
    for offset, record in enumerate(dataset):
        yield RawRecord(label, shard.start + offset + 1, record=dict(record))


def read_raw_records(
    shard: InputShard, source: SourceConfig, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> Iterator[RawRecord]:
    if shard.kind == "jsonl":
        return _iter_jsonl(shard, max_record_bytes)
    if shard.kind == "text":
        return _iter_text_files(shard, source.text_field, max_record_bytes)
    if shard.kind == "parquet":
        return _iter_parquet(shard)
    return _iter_hf(shard, source)


def check_text_field(source: SourceConfig, base_dir: Path, sample: int = 200) -> None:
    """Fail before any work if a JSONL/Parquet file has no record with the configured text field."""
    if source.hf or source.format == "text":
        return
    for shard in plan_input_shards(source.model_copy(update={"documents_per_shard": sample}), base_dir):
        if shard.kind == "text" or shard.start != 0:
            continue
        seen: Counter = Counter()
        found = parsed = 0
        # Field names are all this needs: records above 1 MiB are skipped, not parsed (a 50 MB line would be).
        for raw in read_raw_records(shard, source, max_record_bytes=2**20):
            if raw.record is not None:
                parsed += 1
                seen.update(raw.record.keys())
                found += source.text_field in raw.record
            if parsed >= sample or found:
                break
        if parsed and not found:
            fields = ", ".join(name for name, _ in seen.most_common(8))
            raise InputError(
                f"source '{source.name}': no record in {shard.files[0]} has the text field "
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


@functools.lru_cache(maxsize=4096)
def _relative(file: str, base_dir: Path) -> str:
    try:
        return str(Path(file).resolve().relative_to(base_dir.resolve()))
    except ValueError:
        return file


def _to_document(raw: RawRecord, source: SourceConfig, base_dir: Path) -> tuple[dict | None, str | None, str]:
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
        doc_id = f"{source.name}:{_relative(raw.file, base_dir)}:{raw.line}"
    meta = {k: v for k, v in record.items() if k not in (source.text_field, source.id_field)}
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
        JsonlWriter(work("keys.jsonl")) as keys,
    ):
        for raw in read_raw_records(shard, source, cfg.max_record_bytes):
            counts.documents_in += 1
            doc, reason, detail = (None, raw.reject, raw.detail) if raw.reject else _to_document(raw, source, base_dir)
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
            keys.write({"id": doc["id"], "key": dedup_key(doc["text"])})
    counts.seconds = time.perf_counter() - started
    mark_shard_finished(stage_directory, counts)
    return counts


def duplicate_decisions(stage_directory: Path, shard_names: list[str], dedup: bool) -> dict[str, dict[int, str]]:
    """For each shard, the kept-line numbers to drop: exact duplicates and re-used ids (first one wins)."""
    seen_keys: set[str] = set()
    seen_ids: set[str] = set()
    drops: dict[str, dict[int, str]] = {}
    for shard in shard_names:
        drops[shard] = {}
        with open(shard_work_file(stage_directory, shard, "keys.jsonl"), encoding="utf-8") as handle:
            for index, line in enumerate(handle):
                entry = json.loads(line)
                if dedup and entry["key"] in seen_keys:
                    drops[shard][index] = "exact_duplicate"
                elif entry["id"] in seen_ids:
                    drops[shard][index] = "duplicate_id"
                else:
                    seen_keys.add(entry["key"])
                    seen_ids.add(entry["id"])
    return drops


# ---------------------------------------------------------------------------------------------
# The stage, as the pipeline sees it (cptflow/plan.py lists the stage modules in DAG order)
# ---------------------------------------------------------------------------------------------
STAGE_VERSION = 1
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


def commit(run, cfg, shard_counts: list[ShardCounts], started: float) -> dict:
    drops = duplicate_decisions(run.path, [c.shard for c in shard_counts], cfg.clean.dedup)
    final = [finalize_shard(run.path, counts, drops[counts.shard]) for counts in shard_counts]
    return commit_data_stage(run, final, started)
