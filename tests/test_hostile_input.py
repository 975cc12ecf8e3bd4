"""Hostile input and malformed configs (issue 7): bad bytes, records and pages are counted rejects or
exclusions with a reason, never a traceback; a bad config fails before any work, naming the key."""

from __future__ import annotations

import gzip
import json
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from cptflow.cli import app
from cptflow.docshards import finalize_shard, read_documents
from cptflow.tasks.clean import (
    CleanConfig,
    CleanSteps,
    SourceConfig,
    check_text_field,
    clean_shard,
    duplicate_decisions,
    html_nesting_depth,
    looks_like_html,
    plan_input_shards,
)

REPO = Path(__file__).resolve().parents[1]

GOOD = "The river rose after three days of rain, and the town prepared sandbags along the bank."
runner = CliRunner()


def run_clean(tmp_path: Path, cfg: CleanConfig = CleanConfig(), **fields) -> tuple[list, Path]:
    src = SourceConfig(**{"name": "web", "role": "general", "paths": ["in"], **fields})
    check_text_field(src, tmp_path)
    stage = tmp_path / "stage"
    counts = [clean_shard(shard, src, cfg, stage, tmp_path) for shard in plan_input_shards(src, tmp_path)]
    drops = duplicate_decisions(stage, [c.shard for c in counts], cfg.dedup)
    return [finalize_shard(stage, c, drops[c.shard]) for c in counts], stage


def rejects(stage: Path) -> list[dict]:
    return [r for path in sorted((stage / "rejected").glob("*.jsonl")) for r in read_documents(path)]


def total(final: list, field: str) -> Counter:
    return sum((getattr(c, field) for c in final), Counter())


# --- records the JSON parser or the writers choke on ----------------------------------------------
def test_deep_nesting_huge_integers_and_lone_surrogates_are_rejects_naming_the_field(tmp_path):
    (tmp_path / "in").mkdir()
    lines = [
        json.dumps({"id": "ok", "text": GOOD}).encode(),
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError inside json.loads
        b'{"id": "big", "text": "x", "n": ' + b"9" * 5000 + b"}",  # ValueError: over 4300 digits
        b'{"id": "s1", "text": "lone \\ud800 surrogate"}',  # a str no UTF-8 writer accepts
        b'{"id": "s2", "text": "fine", "meta": {"k": ["\\udfff"]}}',
        b'{"id": "pair", "text": "an emoji \\ud83d\\ude00 is a valid pair, ' + GOOD.encode() + b'"}',
    ]
    (tmp_path / "in" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    final, stage = run_clean(tmp_path)
    assert final[0].documents_in == 6 and final[0].kept == 2 and final[0].balanced()
    found = [(r["line"], r["reason"], r["detail"]) for r in rejects(stage)]
    assert [(line, reason) for line, reason, _ in found] == [
        (2, "malformed_json"),
        (3, "malformed_json"),
        (4, "invalid_unicode"),
        (5, "invalid_unicode"),
    ]
    assert "nested too deeply" in found[0][2] and "4300" in found[1][2]
    assert found[2][2] == "field 'text' holds a lone UTF-16 surrogate"
    assert found[3][2] == "field 'meta.k[0]' holds a lone UTF-16 surrogate"


def test_an_oversized_line_or_text_file_is_rejected_unread_and_the_next_line_still_counts(tmp_path):
    (tmp_path / "in").mkdir()
    lines = [
        json.dumps({"id": "1", "text": GOOD}),
        json.dumps({"id": "2", "text": "x" * 5000}),
        json.dumps({"id": "3", "text": GOOD + " 3"}),
    ]
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "in" / "big.txt").write_text("y" * 5000)
    final, stage = run_clean(tmp_path, CleanConfig(max_record_bytes=1000))
    assert total(final, "rejected") == Counter(record_too_large=2)
    assert sum(c.kept for c in final) == 2 and all(c.balanced() for c in final)
    details = {Path(r["file"]).name: (r["line"], r["detail"]) for r in rejects(stage)}
    assert details["a.jsonl"] == (2, f"line of {len(lines[1]) + 1:,} bytes, above clean.max_record_bytes (1,000)")
    assert details["big.txt"][1] == "file of 5,000 bytes, above clean.max_record_bytes (1,000)"


def test_a_document_above_max_document_chars_is_excluded_before_cleaning(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(
        json.dumps({"id": "long", "text": GOOD * 50}) + "\n" + json.dumps({"id": "short", "text": GOOD}) + "\n"
    )
    final, stage = run_clean(tmp_path, CleanConfig(max_document_chars=1000))
    excluded = list(read_documents(stage / "excluded" / "web-00000.jsonl"))
    assert [(d["id"], d["reason"]) for d in excluded] == [("long", "document_too_long")]
    assert excluded[0]["text"] == GOOD * 50  # excluded, not lost: the full text is kept
    assert final[0].kept == 1


# --- compressed, columnar, empty and binary files ---------------------------------------------------
def test_truncated_gzip_keeps_the_records_before_the_cut_and_rejects_the_rest_naming_the_file(tmp_path):
    (tmp_path / "in").mkdir()
    data = "".join(json.dumps({"id": str(i), "text": f"{GOOD} Number {i}."}) + "\n" for i in range(200)).encode()
    compressed = gzip.compress(data, mtime=0)
    (tmp_path / "in" / "cut.jsonl.gz").write_bytes(compressed[: len(compressed) // 2])
    final, stage = run_clean(tmp_path)
    kept = [d["id"] for d in read_documents(stage / "shards" / "web-00000.jsonl")]
    assert 20 < len(kept) < 200 and kept == [str(i) for i in range(len(kept))]
    [reject] = rejects(stage)
    assert reject["reason"] == "unreadable_file" and reject["line"] == len(kept) + 1
    assert reject["detail"].startswith(f"cut.jsonl.gz: unreadable after line {len(kept)} (EOFError")
    assert final[0].documents_in == len(kept) + 1 and final[0].balanced()


def test_corrupt_empty_and_binary_files_are_counted_rejects_not_a_crash(tmp_path):
    (tmp_path / "in").mkdir()
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": ["a", "b"], "text": [GOOD, GOOD + " b"]}), buffer)
    whole = buffer.getvalue().to_pybytes()
    (tmp_path / "in" / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "in" / "empty.parquet").write_bytes(b"")
    (tmp_path / "in" / "noise.jsonl.gz").write_bytes(bytes(range(256)) * 4)  # not gzip at all
    deflate = bytearray(gzip.compress(b'{"id": "z", "text": "zz"}\n' * 50, mtime=0))
    deflate[10:12] = b"\xff\xff"  # a valid gzip header, then an invalid deflate block: zlib.error, not an OSError
    (tmp_path / "in" / "bad_deflate.jsonl.gz").write_bytes(bytes(deflate))
    (tmp_path / "in" / "empty.jsonl").write_bytes(b"")
    (tmp_path / "in" / "empty.txt").write_bytes(b"")
    (tmp_path / "in" / "ints.parquet").write_bytes(b"")
    pq.write_table(pa.table({"id": ["i1", "i2"], "text": [1, 2]}), tmp_path / "in" / "ints.parquet")
    pq.write_table(pa.table({"id": ["g1"], "text": [GOOD]}), tmp_path / "in" / "good.parquet")
    # Arrow does not validate strings on read: one bad value made the whole row group's to_pylist() raise.
    not_utf8 = pa.array([(GOOD + " Unique.").encode(), b"caf\xff"], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": ["u1", "u2"], "text": not_utf8}), tmp_path / "in" / "not_utf8.parquet")
    final, stage = run_clean(tmp_path)
    assert total(final, "rejected") == Counter(unreadable_file=4, wrong_type_text_field=2, empty_text=1, invalid_utf8=1)
    assert sum(c.kept for c in final) == 2 and all(c.balanced() for c in final)
    [bad] = [r for r in rejects(stage) if r["reason"] == "invalid_utf8"]
    assert (Path(bad["file"]).name, bad["line"], bad["detail"]) == (
        "not_utf8.parquet",
        2,
        "column 'text' holds bytes that are not UTF-8",
    )
    by_file = {Path(r["file"]).name: r["detail"] for r in rejects(stage) if r["reason"] == "unreadable_file"}
    assert by_file["cut.parquet"].startswith("cut.parquet: not readable Parquet (ArrowInvalid")
    assert by_file["empty.parquet"].startswith("empty.parquet: not readable Parquet")
    assert by_file["noise.jsonl.gz"].startswith("noise.jsonl.gz: unreadable after line 0 (BadGzipFile")
    assert by_file["bad_deflate.jsonl.gz"].startswith("bad_deflate.jsonl.gz: unreadable after line 0 (error: Error -3")


# --- HTML that would take the parser or a regex minutes ---------------------------------------------
def test_deeply_nested_html_is_excluded_without_parsing_and_shallow_pages_still_parse():
    steps = CleanSteps(CleanConfig(), code=False)
    deep = "<html><body>" + "<div>" * 50_000 + GOOD + "</div>" * 50_000 + "</body></html>"
    started = time.perf_counter()
    assert steps(deep, Counter())[1] == "html_too_deep"
    assert time.perf_counter() - started < 2  # lexbor needs ~10 s for this page
    assert html_nesting_depth("<div><div></div><section><div>x</div></section></div>") == 3
    # Unclosed <p>/<li> close their predecessor: a long list is shallow, and is parsed.
    page = "<html><body><ul>" + "<li>item" * 2000 + "</ul><p>" + GOOD + "</body></html>"
    text, reason = steps(page, Counter())
    assert reason is None and text.endswith(GOOD)


def test_html_hint_is_linear_on_tags_never_closed_by_a_bracket():
    started = time.perf_counter()
    assert looks_like_html("<div " * 100_000 + GOOD) is False
    assert time.perf_counter() - started < 1  # `[^>]*` made this a 10-minute scan


# --- the drill, quick ----------------------------------------------------------------------------------
def test_quick_hostile_input_drill_finishes_balanced_with_every_case_accounted_for(tiny_llama_dir, tmp_path):
    from drills.hostile_input import RSS_LIMIT_MIB, format_report, run_drill

    report = run_drill("quick", root=tmp_path / "drill", keep=True, model_dir=tiny_llama_dir)
    assert report["ok"], format_report(report)
    assert report["survived"] == report["total"] == 13
    assert report["child_exit"] == 0 and not report["traceback_in_log"]
    assert 0 < report["peak_rss_mib"] < RSS_LIMIT_MIB["quick"]
    clean = report["counts"]["clean"]
    assert clean["in"] == clean["kept"] + sum(clean["excluded"].values()) + sum(clean["rejected"].values())
    assert {"invalid_utf8", "malformed_json", "unreadable_file", "invalid_unicode"} <= set(clean["rejected"])
    assert {"document_too_long", "html_too_deep"} <= set(clean["excluded"])


# --- malformed configs: fail in validate/run before any work, naming the key --------------------------
def write_config(tmp_path: Path, **overrides) -> Path:
    (tmp_path / "docs.jsonl").write_text(json.dumps({"id": "1", "text": GOOD}) + "\n")
    config = {
        "name": "t",
        "work_dir": "work",
        "base_model": "builtin:tiny-llama",
        "sources": [{"name": "web", "role": "general", "paths": ["docs.jsonl"]}],
        "sft": {"data": [{"path": "docs.jsonl"}]},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            config.setdefault(section, {})[field] = value
        else:
            config[section] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


BAD_CONFIGS = {
    "unknown top-level key": ({"learning_rate": 1e-4}, "unknown key 'learning_rate' (allowed here: name, work_dir"),
    "unknown nested key": ({"cpt__lora": {"rank": 8}}, "unknown key 'cpt.lora.rank' (allowed here: r, alpha"),
    "wrong type": ({"tokenize__seq_len": "long"}, "tokenize.seq_len: Input should be a valid integer"),
    "embedding LR above LR": (
        {"cpt__learning_rate": 1e-5, "cpt__embedding_learning_rate": 1e-4},
        "cpt: Value error, embedding_learning_rate (0.0001) must not exceed learning_rate (1e-05)",
    ),
    "seq_len above the context": ({"tokenize__seq_len": 4096}, "tokenize.seq_len = 4096 tokens exceeds the context"),
    "inverted keep_band": (
        {"perplexity__keep_band": [90, 10]},
        "perplexity.keep_band: Value error, keep_band must satisfy",
    ),
    "negative keep_band": ({"perplexity__keep_band": [-5, 50]}, "perplexity.keep_band: Value error"),
    "share above 1": ({"mix__schedule": {"start": 1.5}}, "mix.schedule.start: Input should be less than or equal to 1"),
    "negative max_document_chars": (
        {"clean__max_document_chars": -1},
        "clean.max_document_chars: Input should be greater than 0",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_malformed_config_fails_validate_and_run_before_any_work_naming_the_key(case, tmp_path):
    overrides, message = BAD_CONFIGS[case]
    config = write_config(tmp_path, **overrides)
    for command in (["validate", str(config)], ["run", str(config)]):
        result = runner.invoke(app, command)
        output = " ".join(result.output.split())  # rich wraps long lines
        assert result.exit_code == 2, output
        assert message in output and "Traceback" not in output
    assert not (tmp_path / "work").exists()


def test_a_config_that_is_not_a_mapping_or_empty_is_refused(tmp_path):
    for text in ("", "- just\n- a list\n", "name: [unclosed\n"):
        path = tmp_path / "pipeline.yaml"
        path.write_text(text)
        result = runner.invoke(app, ["validate", str(path)])
        assert result.exit_code == 2 and "pipeline.yaml" in result.output and "Traceback" not in result.output


def test_seq_len_above_a_local_models_context_fails_validate_naming_the_key(tiny_llama_dir, tmp_path):
    config = write_config(tmp_path, base_model=str(tiny_llama_dir), tokenize={"seq_len": 512})
    result = runner.invoke(app, ["validate", str(config)])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "tokenize.seq_len = 512 tokens exceeds the context" in output
    assert "(max_position_embeddings = 256)" in output
    config = write_config(tmp_path, base_model=str(tiny_llama_dir), tokenize={"seq_len": 256})
    assert runner.invoke(app, ["validate", str(config)]).exit_code == 0
