"""Hostile-input drill: a seeded fuzz corpus through clean -> quality -> perplexity -> mix -> tokenize.

Issue 7 (reliability drills). The data stages run plain (no Prefect) in a child process whose peak
RSS is measured; the drill checks that every stage balances (in = kept + excluded + rejected), that
every reject and exclusion has a reason, and that each hostile case ends the way it should.

    python drills/run.py hostile_input --size full --out work/drills/hostile-input.json   # 50 MB doc, 10 MB line
    python drills/run.py hostile_input --size quick                                        # scaled down (tests)
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import resource
import shutil
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from drills import drill_command

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DOMAIN = REPO / "data" / "raw" / "domain" / "abstracts.jsonl"
SAMPLE_GENERAL = REPO / "data" / "raw" / "general" / "web-000.jsonl.gz"
DATA_STAGES = ("clean", "quality", "perplexity", "mix", "tokenize")

# full: the sizes the issue names. quick: the same cases scaled down so the drill fits in `make test`.
SIZES = {
    "full": {
        "huge_document_bytes": 50_000_000,
        "long_line_bytes": 10_000_000,
        "long_word_chars": 500_000,
        "nesting": 80_000,
        "flood": 100_000,
        "pattern_repeats": 200_000,
        "normal_documents": 200,
    },
    "quick": {
        "huge_document_bytes": 1_500_000,
        "long_line_bytes": 1_200_000,
        "long_word_chars": 20_000,
        "nesting": 5_000,
        "flood": 5_000,
        "pattern_repeats": 2_000,
        "normal_documents": 30,
    },
}
# Peak RSS the child may reach (MiB). Importing torch and transformers alone is about 450 MiB.
RSS_LIMIT_MIB = {"full": 1536, "quick": 1024}


@dataclass
class Case:
    """One kind of hostile input: the files it is written to, and what must happen to it.

    `expect` lists outcomes that must occur among the case's records, as prefixes of
    'rejected:<reason>', 'excluded:<stage>:<reason>', 'kept' (reached the tokenized stream or an eval
    set) or 'passed_clean' (read and cleaned; later stages may still drop it on its merits).
    """

    name: str
    description: str
    expect: tuple[str, ...]
    files: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# The fuzz corpus (deterministic for a seed)
# ----------------------------------------------------------------------------------------------------
WORDS = (
    "the of and to in is that for with as on was by it be are from this which or an at were have has not "
    "patients dose study clinical results trial treatment effect analysis data model group years after "
    "between during within these those their other some more most each both level rate time risk"
).split()


def prose(rng: random.Random, sentences: int) -> str:
    """Plausible English-looking sentences (enough stop words for Gopher) from a fixed vocabulary."""
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 16))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def jsonl(records: list) -> bytes:
    """Each item is a dict (dumped as JSON) or raw bytes written as the line itself."""
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    return b"\n".join(lines) + b"\n"


def good_record(rng: random.Random, case: str, i: int) -> dict:
    return {"id": f"{case}#good{i}", "text": prose(rng, 8)}


def _write(directory: Path, name: str, data: bytes) -> str:
    path = directory / name
    path.write_bytes(data)
    return name


def _write_parquet(directory: Path, name: str, columns: dict) -> str:
    pq.write_table(pa.table(columns), directory / name)
    return name


def _repeat_to(chunk: str, size: int) -> str:
    return (chunk * (size // len(chunk) + 1))[:size]


def generate_corpus(directory: Path, size: str = "quick", seed: int = 0) -> list[Case]:
    """Write the hostile files into `directory` (one or more files per case) and return the cases."""
    s = SIZES[size]
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def case(name: str, description: str, expect: tuple[str, ...], *files: str) -> None:
        cases.append(Case(name, description, expect, list(files)))

    # Arrow does not validate strings when it reads Parquet: a string column can hold any bytes.
    not_utf8 = pa.array([prose(rng, 8).encode(), b"caf\xff latte"], type=pa.binary()).view(pa.string())
    case(
        "invalid_utf8",
        "bytes that are not UTF-8 (0xff, overlong, cut multibyte, lone continuation), in JSONL, .txt "
        "and a Parquet string column",
        ("rejected:invalid_utf8", "passed_clean"),
        _write(
            directory,
            "invalid_utf8.jsonl",
            jsonl(
                [
                    good_record(rng, "invalid_utf8", 0),
                    b'{"id": "invalid_utf8#1", "text": "caf\xff latte"}',
                    b'{"id": "invalid_utf8#2", "text": "over\xc0\xaflong"}',
                    b'{"id": "invalid_utf8#3", "text": "cut \xe2\x82"}',
                    b'\x80\x80\x80{"id": "invalid_utf8#4"}',
                ]
            ),
        ),
        _write(directory, "invalid_utf8.txt", prose(rng, 10).encode() + b"\xfe\xff\xc3\x28" + prose(rng, 5).encode()),
        _write_parquet(
            directory, "invalid_utf8.parquet", {"id": ["invalid_utf8#p0", "invalid_utf8#p1"], "text": not_utf8}
        ),
    )

    nul_text = prose(rng, 10)
    case(
        "nul_bytes",
        "NUL as \\u0000 escapes (valid JSON), raw NUL bytes inside a JSON string, NULs in a text file",
        ("rejected:malformed_json", "passed_clean"),
        _write(
            directory,
            "nul_bytes.jsonl",
            jsonl(
                [
                    {"id": "nul_bytes#0", "text": nul_text.replace(" ", " \u0000", 20)},
                    b'{"id": "nul_bytes#1", "text": "raw \x00 nul"}',
                    b"\x00" * 64,
                ]
            ),
        ),
        _write(directory, "nul_bytes.txt", prose(rng, 10).replace(" ", "\x00 ", 30).encode()),
    )

    chunk = prose(rng, 2000) + "\n\n"
    case(
        "huge_document",
        f"one document of {s['huge_document_bytes'] / 1e6:g} MB",
        ("excluded:clean:document_too_long",),
        _write(
            directory,
            "huge_document.jsonl",
            jsonl([{"id": "huge_document#0", "text": _repeat_to(chunk, s["huge_document_bytes"])}]),
        ),
    )

    letters = "".join(rng.choices(string.ascii_letters + string.digits, k=65_536))
    case(
        "long_line",
        f"a line of {s['long_line_bytes'] / 1e6:g} MB without spaces (text file), and a "
        f"{s['long_word_chars']:,}-character word inside prose (JSONL, below the length cap)",
        ("excluded:clean:document_too_long", "excluded:quality:"),
        _write(directory, "long_line.txt", _repeat_to(letters, s["long_line_bytes"]).encode()),
        _write(
            directory,
            "long_line.jsonl",
            jsonl(
                [
                    {
                        "id": "long_line#0",
                        "text": prose(rng, 10) + " " + _repeat_to(letters, s["long_word_chars"]) + " " + prose(rng, 10),
                    },
                ]
            ),
        ),
    )

    n = s["nesting"]
    body = prose(rng, 12)
    case(
        "html_nesting",
        f"HTML nested {n:,} deep (closed and unclosed), {n:,} '<div ' never closed by '>', "
        "an unclosed comment and script, a '<' flood, and one normal page",
        ("excluded:clean:html_too_deep", "passed_clean"),
        _write(
            directory,
            "html_nesting.jsonl",
            jsonl(
                [
                    {
                        "id": "html_nesting#0",
                        "text": "<html><body>" + "<div>" * n + body + "</div>" * n + "</body></html>",
                    },
                    {"id": "html_nesting#1", "text": "<html><body>" + "<div><p><span>" * (n // 3) + body},
                    {"id": "html_nesting#2", "text": "<div " * n + body},
                    {"id": "html_nesting#3", "text": "<html><body><p>" + body + "</p><!-- " + "x " * n},
                    {"id": "html_nesting#4", "text": "<p>" + body + "</p><script>" + "var a = 1; " * n},
                    {"id": "html_nesting#5", "text": "<" * n + ">" * n + body},
                    {
                        "id": "html_nesting#6",
                        "text": "<html><head><title>T</title></head><body><nav>menu</nav>"
                        + "".join(f"<p>{prose(rng, 3)}</p>" for _ in range(8))
                        + "</body></html>",
                    },
                ]
            ),
        ),
    )

    f = s["flood"]
    emoji = "".join(
        rng.choice(
            [
                "\U0001f600",
                "\U0001f468\u200d\U0001f469\u200d\U0001f467",
                "\U0001f3f3\ufe0f\u200d\U0001f308",
                "\u2764\ufe0f",
            ]
        )
        for _ in range(f // 4)
    )
    zalgo = "".join(
        ch + "".join(rng.choice("\u0300\u0301\u0302\u0303\u0308\u030a\u0327\u0336") for _ in range(50))
        for ch in _repeat_to("zalgo", f // 50)
    )
    case(
        "unicode_floods",
        "emoji and ZWJ-sequence floods, letters under 50 combining marks each, a combining "
        "flood inside prose, mojibake",
        ("excluded:",),
        _write(
            directory,
            "unicode_floods.jsonl",
            jsonl(
                [
                    {"id": "unicode_floods#0", "text": emoji},
                    {"id": "unicode_floods#1", "text": zalgo},
                    {"id": "unicode_floods#2", "text": prose(rng, 6) + " " + "\u0301" * f + " " + prose(rng, 6)},
                    {"id": "unicode_floods#3", "text": prose(rng, 6).replace("e", "Ã©") + " " + emoji[:400]},
                ]
            ),
        ),
    )

    arabic = "هذا نص تجريبي باللغة العربية يتحدث عن الدراسة السريرية ونتائج العلاج لدى المرضى. "
    hebrew = "זהו טקסט לדוגמה בעברית על מחקר קליני ותוצאות הטיפול בחולים. "
    case(
        "right_to_left",
        "Arabic and Hebrew prose, English wrapped in bidi overrides (U+202E, U+2066-2069)",
        ("excluded:quality:",),
        _write(
            directory,
            "right_to_left.jsonl",
            jsonl(
                [
                    {"id": "right_to_left#0", "text": arabic * 20},
                    {"id": "right_to_left#1", "text": hebrew * 20},
                    {
                        "id": "right_to_left#2",
                        "text": "\u202e" + prose(rng, 8) + "\u202c \u2067" + arabic * 3 + "\u2069 " + prose(rng, 4),
                    },
                ]
            ),
        ),
    )

    deep = "[" * 100_000 + "]" * 100_000
    case(
        "malformed_json",
        "truncated objects, trailing commas, single quotes, non-object lines, JSON nested "
        "100,000 deep, a 5,000-digit integer, lone UTF-16 surrogates, BOM and CRLF",
        ("rejected:malformed_json", "rejected:not_an_object", "rejected:invalid_unicode", "passed_clean"),
        _write(
            directory,
            "malformed_json.jsonl",
            jsonl(
                [
                    good_record(rng, "malformed_json", 0),
                    b'{"id": "malformed_json#1", "text": "cut off',
                    b'{"id": "malformed_json#2", "text": "trailing",}',
                    b"{'id': 'malformed_json#3', 'text': 'single quotes'}",
                    b'["malformed_json#4", "an array"]',
                    b"42",
                    b'"just a string"',
                    b"null",
                    deep.encode(),
                    b'{"id": "malformed_json#9", "text": "x", "n": ' + b"9" * 5000 + b"}",
                    b'{"id": "malformed_json#10", "text": "lone \\ud800 surrogate ' + prose(rng, 8).encode() + b'"}',
                    b'{"id": "malformed_json#11", "text": "' + prose(rng, 8).encode() + b'", "meta": {"k": "\\udfff"}}',
                    b"\xef\xbb\xbf" + json.dumps(good_record(rng, "malformed_json", 12)).encode(),
                    json.dumps(good_record(rng, "malformed_json", 13)).encode() + b"\r",
                    b"",
                    b"   ",
                ]
            ),
        ),
    )

    case(
        "wrong_types",
        "text as number, list, object, null, boolean, empty or missing; ids as objects, lists, "
        "floats; the same in Parquet (text column of integers, nulls)",
        ("rejected:wrong_type_text_field", "rejected:missing_text_field", "rejected:empty_text", "passed_clean"),
        _write(
            directory,
            "wrong_types.jsonl",
            jsonl(
                [
                    good_record(rng, "wrong_types", 0),
                    {"id": "wrong_types#1", "text": 12345},
                    {"id": "wrong_types#2", "text": 1.5e308},
                    {"id": "wrong_types#3", "text": ["a", "list"]},
                    {"id": "wrong_types#4", "text": {"nested": "object"}},
                    {"id": "wrong_types#5", "text": None},
                    {"id": "wrong_types#6", "text": True},
                    {"id": "wrong_types#7", "text": "   \n\t "},
                    {"id": "wrong_types#8", "body": "no text field"},
                    {"id": {"an": "object"}, "text": prose(rng, 8)},
                    {"id": ["a", "list"], "text": prose(rng, 8)},
                    {"id": 3.25, "text": prose(rng, 8)},
                    {"id": None, "text": prose(rng, 8), "extra": [1, {"deep": None}]},
                ]
            ),
        ),
        _write_parquet(
            directory, "wrong_types_int_text.parquet", {"id": ["wrong_types#p0", "wrong_types#p1"], "text": [1, 2]}
        ),
        _write_parquet(
            directory,
            "wrong_types_null_text.parquet",
            {"id": ["wrong_types#p2", "wrong_types#p3"], "text": [prose(rng, 8), None]},
        ),
    )

    random_bytes = bytes(rng.getrandbits(8) for _ in range(8192))
    good_gz = jsonl([good_record(rng, "truncated", i) for i in range(40)])
    compressed = gzip.compress(good_gz, mtime=0)
    buffer = io.BytesIO()
    pq.write_table(
        pa.table({"id": [f"truncated#parquet{i}" for i in range(50)], "text": [prose(rng, 6) for _ in range(50)]}),
        buffer,
    )
    case(
        "empty_and_binary",
        "empty .jsonl/.txt/.jsonl.gz/.parquet files, a gzip of nothing, random bytes named "
        ".jsonl, .txt, .jsonl.gz and .parquet",
        ("rejected:invalid_utf8", "rejected:unreadable_file", "rejected:empty_text"),
        _write(directory, "empty.jsonl", b""),
        _write(directory, "empty.txt", b""),
        _write(directory, "empty.jsonl.gz", b""),
        _write(directory, "empty_gzip.jsonl.gz", gzip.compress(b"", mtime=0)),
        _write(directory, "empty.parquet", b""),
        _write(directory, "binary.jsonl", random_bytes),
        _write(directory, "binary.txt", random_bytes),
        _write(directory, "binary.jsonl.gz", random_bytes),
        _write(directory, "binary.parquet", random_bytes),
    )

    corrupt = bytearray(compressed)
    corrupt[10:12] = b"\xff\xff"  # a valid gzip header, then an invalid deflate block (zlib.error)
    case(
        "truncated",
        "a .jsonl.gz cut at 60% of its bytes, one with a corrupt deflate block and a Parquet file cut "
        "in half: the records before the cut are kept, the rest is one reject naming the file",
        ("rejected:unreadable_file", "passed_clean"),
        _write(directory, "corrupt_deflate.jsonl.gz", bytes(corrupt)),
        _write(directory, "truncated_gzip.jsonl.gz", compressed[: int(len(compressed) * 0.6)]),
        _write(directory, "truncated_parquet.parquet", buffer.getvalue()[: len(buffer.getvalue()) // 2]),
    )

    # Inputs that make backtracking regexes or parsers quadratic: each pattern repeated, below the length cap.
    r = s["pattern_repeats"]
    patterns = [
        "a@",
        "a@b.",
        "1 ",
        "1-",
        "+1 ",
        "1.1.1.",
        "a.",
        "<a ",
        "<p>",
        "&amp;",
        "\r",
        " \n",
        "https://x.y/",
        "... ",
        "# ",
        "- x\n",
        "{",
        "\u200d",
        "a\u0301",
        "Ã©",
        "中文",
        "ภาษาไทย",
        "a \u00a0\u2003b\u3000",
        "(555) ",
        "4111 ",
        "<!--",
        '<div class="',
        "<>",
        "home | menu | search | ",
    ]
    case(
        "pathological_patterns",
        f"{len(patterns)} short patterns each repeated up to {r:,} times (under the length cap): "
        "e-mail, phone, card and IP look-alikes, tag and comment openers, entities, URLs, line breaks, CJK, Thai",
        ("excluded:",),
        _write(
            directory,
            "pathological_patterns.jsonl",
            jsonl(
                [
                    {"id": f"pathological_patterns#{i}", "text": _repeat_to(pattern, min(r * len(pattern), 900_000))}
                    for i, pattern in enumerate(patterns)
                ]
            ),
        ),
    )

    case(
        "invisible_only",
        "documents of whitespace, zero-width and control characters only",
        ("excluded:clean:empty_after_clean",),
        _write(
            directory,
            "invisible_only.jsonl",
            jsonl(
                [
                    {"id": "invisible_only#0", "text": "\u200b\u2060\ufeff" * 100},
                    {"id": "invisible_only#1", "text": "\x01\x02\x03\x1b[31m\x7f" * 50},
                ]
            ),
        ),
    )
    return cases


def write_normal_corpus(directory: Path, documents: int) -> dict[str, Path]:
    """Heads of the committed sample corpora: the ordinary documents the hostile ones are mixed into."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(SAMPLE_DOMAIN, "rb") as handle:
        domain = [line for _, line in zip(range(documents), handle)]
    with gzip.open(SAMPLE_GENERAL, "rb") as handle:
        general = [line for _, line in zip(range(documents), handle)]
    paths = {"domain": directory / "domain.jsonl", "general": directory / "general.jsonl.gz"}
    paths["domain"].write_bytes(b"".join(domain))
    paths["general"].write_bytes(gzip.compress(b"".join(general), mtime=0))
    return paths


def write_drill_config(root: Path, model_dir: Path, normal: dict[str, Path], hostile_dir: Path | None) -> Path:
    """The drill's pipeline; without `hostile_dir`, the same pipeline on the normal documents alone."""
    config = {
        "name": "hostile-input-drill",
        "work_dir": "work",
        "base_model": str(model_dir),
        "sources": [
            {"name": "domain", "role": "domain", "paths": [str(normal["domain"])], "documents_per_shard": 100},
            {
                "name": "general",
                "role": "general",
                "paths": [str(normal["general"])],
                "text_field": "content",
                "id_field": "doc_id",
                "documents_per_shard": 100,
            },
            *(
                [{"name": "hostile", "role": "domain", "paths": [str(hostile_dir)], "documents_per_shard": 50}]
                if hostile_dir
                else []
            ),
        ],
        "perplexity": {"keep_band": [0, 95], "batch_tokens": 4096},
        "mix": {"domain_eval_documents": 10, "general_eval_documents": 10, "window_documents": 50},
        "tokenize": {"seq_len": 64, "blocks_per_shard": 64},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ----------------------------------------------------------------------------------------------------
# The child: the data stages, plain, as `cptflow run --only` would run them without Prefect
# ----------------------------------------------------------------------------------------------------
def run_data_stages(config_path: str) -> dict:
    from cptflow.config import load_config
    from cptflow.plan import plan_pipeline, run_data_stage_plain

    cfg = load_config(config_path)
    runs = plan_pipeline(cfg)
    seconds = {}
    for stage in DATA_STAGES:
        started = time.perf_counter()
        run_data_stage_plain(runs[stage], cfg)
        seconds[stage] = round(time.perf_counter() - started, 2)
    return {
        "seconds": seconds,
        "directories": {stage: runs[stage].directory for stage in DATA_STAGES},
        "peak_rss_kib": own_peak_rss_kib(),
    }


def own_peak_rss_kib() -> int:
    """This process's peak RSS since exec (VmHWM). Not ru_maxrss: Linux carries the parent's RSS at fork
    into a child's ru_maxrss across exec, so a child of a 1.8 GB pytest would report 1.8 GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: the best there is


def run_child(config: Path, log: Path) -> tuple[int, dict | None, int, float]:
    """(exit status, the child's report, peak RSS in KiB, seconds) of the data stages in a child process."""
    started = time.perf_counter()
    report = config.parent / "child-report.json"
    with open(log, "wb") as out:
        child = subprocess.Popen(
            drill_command("hostile_input", "--child", str(config), "--out", str(report)),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1"),
        )
        # wait4: this child's own rusage, not the maximum over every child pytest ever had.
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    data = json.loads(report.read_text()) if report.is_file() and child.returncode == 0 else None
    peak_kib = data["peak_rss_kib"] if data else usage.ru_maxrss  # the child's VmHWM when it could report it
    return child.returncode, data, peak_kib, time.perf_counter() - started


# ----------------------------------------------------------------------------------------------------
# Checks on the outputs
# ----------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path):
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


def check_accounting(directories: dict[str, str]) -> list[str]:
    """Problems with the manifests: totals or shards that do not balance, reasons that are empty."""
    problems = []
    for stage in DATA_STAGES:
        manifest = json.loads((Path(directories[stage]) / "manifest.json").read_text())
        for label, counts in [("total", manifest["counts"])] + [(s["shard"], s) for s in manifest["shards"]]:
            out = counts["kept"] + sum(counts["excluded"].values()) + sum(counts["rejected"].values())
            if counts["in"] != out:
                problems.append(f"{stage} {label}: in {counts['in']} != kept + excluded + rejected {out}")
            if any(not reason for reason in (*counts["excluded"], *counts["rejected"])):
                problems.append(f"{stage} {label}: a count without a reason")
        for kind in ("excluded", "rejected"):
            for path in sorted((Path(directories[stage]) / kind).glob("*.jsonl")):
                for record in _read_jsonl(path):
                    if not record.get("reason"):
                        problems.append(f"{stage} {path.name}: a {kind} record without a reason")
                    if kind == "rejected" and not (record.get("file") and record.get("line")):
                        problems.append(f"{stage} {path.name}: a reject without file and line")
    return problems


def _case_of(text: str, cases: list[Case]) -> str | None:
    for case in cases:
        # A file appears as a path (rejects: "dir/name") or, in ids made from file and line, as "source:name:line".
        if f"{case.name}#" in text or any(
            f"/{name}" in text or f":{name}:" in text or text.endswith(name) for name in case.files
        ):
            return case.name
    return None


def case_outcomes(directories: dict[str, str], cases: list[Case]) -> tuple[dict[str, Counter], Counter]:
    """For each case, how its records ended (rejected in clean, excluded by a stage, or kept), and how
    many of its records clean passed on."""
    outcomes: dict[str, Counter] = {case.name: Counter() for case in cases}
    passed: Counter = Counter()
    clean = Path(directories["clean"])
    for path in sorted((clean / "rejected").glob("*.jsonl")):
        for record in _read_jsonl(path):
            name = _case_of(record["file"], cases)
            if name:
                outcomes[name][f"rejected:{record['reason']}"] += 1
    for stage in ("clean", "quality", "perplexity", "mix"):
        for path in sorted((Path(directories[stage]) / "excluded").glob("*.jsonl")):
            for record in _read_jsonl(path):
                name = _case_of(record["id"], cases) if record.get("source") == "hostile" else None
                if name:
                    outcomes[name][f"excluded:{stage}:{record['reason']}"] += 1
    for path in sorted((clean / "shards").glob("*.jsonl")):
        for record in _read_jsonl(path):
            name = _case_of(record["id"], cases) if record.get("source") == "hostile" else None
            if name:
                passed[name] += 1
    mix = Path(directories["mix"])
    reached = set()
    for path in [*sorted((mix / "shards").glob("*.jsonl")), *sorted((mix / "eval").glob("*.jsonl"))]:
        for record in _read_jsonl(path):
            if record.get("source") == "hostile" and record["id"] not in reached:
                reached.add(record["id"])
                name = _case_of(record["id"], cases)
                if name:
                    outcomes[name]["kept"] += 1
    return outcomes, passed


def missing_expectations(case: Case, outcome: Counter, passed_clean: int) -> list[str]:
    seen = [*outcome, *(["passed_clean"] if passed_clean else [])]
    return [want for want in case.expect if not any(key.startswith(want) for key in seen)]


# ----------------------------------------------------------------------------------------------------
# The drill
# ----------------------------------------------------------------------------------------------------
def build_model(corpus: Path, cache_dir: Path) -> Path:
    """The 2-layer test Llama (safetensors, ~300-token BPE), trained on the general sample slice."""
    from cptflow.tiny_model import TINY_TEST_SPEC, build_tiny_llama

    return build_tiny_llama([corpus], cache_dir, spec=TINY_TEST_SPEC)


def run_drill(
    size: str = "quick",
    seed: int = 0,
    root: Path | None = None,
    keep: bool = False,
    baseline: bool = False,
    model_dir: Path | None = None,
) -> dict:
    """Generate the corpus, run the data stages on it in a child, check everything; return the report.

    `baseline`: also run the normal documents alone, for the peak RSS the hostile files add.
    `model_dir`: a tiny model already built (the tests' fixture); default: build one from the samples.
    """
    root = Path(root or tempfile.mkdtemp(prefix="cptflow-hostile-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cases = generate_corpus(root / "hostile", size, seed)
    normal = write_normal_corpus(root / "normal", SIZES[size]["normal_documents"])
    corpus_bytes = sum(p.stat().st_size for p in (root / "hostile").iterdir())
    model = model_dir or build_model(normal["general"], root / "model-cache")
    config = write_drill_config(root, model, normal, root / "hostile")
    generated = time.perf_counter() - started

    code, child, peak_kib, seconds = run_child(config, root / "child.log")
    log_tail = (root / "child.log").read_text(errors="replace")[-3000:]
    report = {
        "size": size,
        "seed": seed,
        "root": str(root),
        "corpus_bytes": corpus_bytes,
        "generate_seconds": round(generated, 1),
        "child_exit": code,
        "child_seconds": round(seconds, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "rss_limit_mib": RSS_LIMIT_MIB[size],
        "traceback_in_log": "Traceback" in (root / "child.log").read_text(errors="replace"),
        "problems": [],
        "cases": [],
    }
    if code != 0 or child is None:
        report["problems"].append(f"the data stages failed (exit {code}):\n{log_tail}")
    else:
        report["stage_seconds"] = child["seconds"]
        report["counts"] = {
            stage: json.loads((Path(d) / "manifest.json").read_text())["counts"]
            for stage, d in child["directories"].items()
        }
        report["problems"] += check_accounting(child["directories"])
        outcomes, passed = case_outcomes(child["directories"], cases)
        for case in cases:
            missing = missing_expectations(case, outcomes[case.name], passed[case.name])
            report["cases"].append(
                {
                    "case": case.name,
                    "description": case.description,
                    "files": case.files,
                    "records": sum(outcomes[case.name].values()),
                    "outcomes": dict(sorted(outcomes[case.name].items())),
                    "passed_clean": passed[case.name],
                    "survived": not missing,
                    "missing": missing,
                }
            )
            if missing:
                report["problems"].append(f"case {case.name}: expected outcomes {missing} did not occur")
    if baseline:
        (root / "baseline").mkdir(exist_ok=True)
        plain = write_drill_config(root / "baseline", model, normal, None)
        code, _, kib, seconds = run_child(plain, root / "baseline" / "child.log")
        report["baseline"] = {"exit": code, "peak_rss_mib": round(kib / 1024, 1), "seconds": round(seconds, 1)}
    if report["peak_rss_mib"] > RSS_LIMIT_MIB[size]:
        report["problems"].append(f"peak RSS {report['peak_rss_mib']} MiB above the limit {RSS_LIMIT_MIB[size]} MiB")
    if report["traceback_in_log"]:
        report["problems"].append("a traceback in the data stages' output")
    report["survived"] = sum(c["survived"] for c in report["cases"])
    report["total"] = len(cases)
    report["ok"] = not report["problems"]
    if not keep and report["ok"]:
        shutil.rmtree(root, ignore_errors=True)
    return report


def format_report(report: dict) -> str:
    lines = [
        f"hostile-input drill ({report['size']}, seed {report['seed']}): "
        f"{report['survived']}/{report['total']} cases survived, "
        f"corpus {report['corpus_bytes'] / 1e6:.1f} MB, data stages {report['child_seconds']} s, "
        f"peak RSS {report['peak_rss_mib']} MiB (limit {report['rss_limit_mib']})"
        + (
            f"; normal documents alone: peak RSS {report['baseline']['peak_rss_mib']} MiB, "
            f"{report['baseline']['seconds']} s"
            if report.get("baseline")
            else ""
        ),
        "",
        "| case | records | outcome | ok |",
        "|---|---|---|---|",
    ]
    for case in report["cases"]:
        outcome = ", ".join(f"{k} {v}" for k, v in case["outcomes"].items())
        lines.append(f"| {case['case']} | {case['records']} | {outcome} | {'yes' if case['survived'] else 'NO'} |")
    if report.get("counts"):
        lines += ["", "| stage | in | kept | excluded | rejected | seconds |", "|---|---|---|---|---|---|"]
        for stage, counts in report["counts"].items():
            lines.append(
                f"| {stage} | {counts['in']} | {counts['kept']} | {sum(counts['excluded'].values())} | "
                f"{sum(counts['rejected'].values())} | {report['stage_seconds'][stage]} |"
            )
    lines += [""] + [f"PROBLEM: {p}" for p in report["problems"]] if report["problems"] else ["", "no problems"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--root", type=Path, help="work in this directory (kept); default: a temporary one")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: run the stages on this config
    args = parser.parse_args(argv)
    if args.child:
        result = run_data_stages(str(args.child))
        args.out.write_text(json.dumps(result))
        return 0
    report = run_drill(args.size, args.seed, args.root, keep=args.root is not None, baseline=args.size == "full")
    print(format_report(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
