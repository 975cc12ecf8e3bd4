"""clean: readers, cleaning steps, rejects with file and line, duplicate removal, accounting."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cptflow.docshards import finalize_shard, read_documents
from cptflow.tasks.clean import (
    CleanConfig,
    CleanSteps,
    InputError,
    InputShard,
    PIIConfig,
    SourceConfig,
    check_text_field,
    clean_shard,
    duplicate_decisions,
    html_to_text,
    luhn_valid,
    normalise_whitespace,
    plan_input_shards,
    read_raw_records,
    scrub_pii,
)

GOOD = "The river rose after three days of rain, and the town prepared sandbags along the bank."


def source(tmp_path: Path, **fields) -> SourceConfig:
    return SourceConfig(**{"name": "web", "role": "general", "paths": ["in"], **fields})


def write_lines(path: Path, lines: list[bytes | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    return path


def run_clean(tmp_path: Path, src: SourceConfig, cfg: CleanConfig = CleanConfig()) -> tuple[list, Path]:
    stage = tmp_path / "stage"
    counts = [clean_shard(shard, src, cfg, stage, tmp_path) for shard in plan_input_shards(src, tmp_path)]
    drops = duplicate_decisions(stage, [c.shard for c in counts], cfg.dedup)
    final = [finalize_shard(stage, c, drops[c.shard]) for c in counts]
    return final, stage


# --- readers -------------------------------------------------------------------------------------
def test_jsonl_reader_rejects_each_malformed_line_with_file_line_and_reason(tmp_path):
    write_lines(
        tmp_path / "in" / "a.jsonl",
        [
            json.dumps({"id": "1", "text": GOOD}),
            "{not json",
            b'{"id": "3", "text": "caf\xe9"}',  # latin-1 byte: invalid UTF-8
            json.dumps({"id": "4", "body": GOOD}),
            json.dumps({"id": "5", "text": 42}),
            json.dumps({"id": "6", "text": "   "}),
            "",
            json.dumps(["a", "list"]),
            json.dumps({"id": "9", "text": GOOD + " Again."}),
        ],
    )
    final, stage = run_clean(tmp_path, source(tmp_path))
    counts = final[0]
    assert counts.documents_in == 9 and counts.kept == 2
    assert dict(counts.rejected) == {
        "malformed_json": 1,
        "invalid_utf8": 1,
        "missing_text_field": 1,
        "wrong_type_text_field": 1,
        "empty_text": 1,
        "blank_line": 1,
        "not_an_object": 1,
    }
    rejects = list(read_documents(stage / "rejected" / "web-00000.jsonl"))
    assert [(Path(r["file"]).name, r["line"], r["reason"]) for r in rejects][:3] == [
        ("a.jsonl", 2, "malformed_json"),
        ("a.jsonl", 3, "invalid_utf8"),
        ("a.jsonl", 4, "missing_text_field"),
    ]
    assert "field 'text' is int" in rejects[3]["detail"]


def test_gzip_jsonl_and_truncated_gzip_is_a_counted_reject(tmp_path):
    path = write_lines(
        tmp_path / "in" / "a.jsonl.gz", [json.dumps({"id": str(i), "text": f"{GOOD} {i}"}) for i in range(50)]
    )
    records = list(read_raw_records(plan_input_shards(source(tmp_path), tmp_path)[0], source(tmp_path)))
    assert len(records) == 50 and all(r.record for r in records)
    path.write_bytes(path.read_bytes()[:-20])  # truncated download
    records = list(read_raw_records(plan_input_shards(source(tmp_path), tmp_path)[0], source(tmp_path)))
    assert records[-1].reject == "unreadable_file" and records[-1].file.endswith("a.jsonl.gz")


def test_plain_jsonl_is_split_into_shards_that_together_read_every_line_once(tmp_path):
    lines = [json.dumps({"id": str(i), "text": f"{GOOD} number {i}"}) for i in range(23)]
    write_lines(tmp_path / "in" / "a.jsonl", lines)
    src = source(tmp_path, documents_per_shard=5)
    shards = plan_input_shards(src, tmp_path)
    assert [s.name for s in shards] == [f"web-{i:05d}" for i in range(5)]
    read = [r for s in shards for r in read_raw_records(s, src)]
    assert [r.line for r in read] == list(range(1, 24))
    assert [r.record["id"] for r in read] == [str(i) for i in range(23)]


def test_parquet_reader_reads_row_groups(tmp_path):
    table = pa.table(
        {"id": [f"p{i}" for i in range(30)], "text": [f"{GOOD} {i}" for i in range(30)], "score": list(range(30))}
    )
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "a.parquet", row_group_size=10)
    src = source(tmp_path, documents_per_shard=20)
    shards = plan_input_shards(src, tmp_path)
    assert len(shards) == 2
    records = [r for s in shards for r in read_raw_records(s, src)]
    assert [r.record["id"] for r in records] == [f"p{i}" for i in range(30)]
    assert records[-1].line == 30


def test_text_directory_one_document_per_file_with_path_ids(tmp_path):
    for i in range(3):
        (tmp_path / "in" / "sub").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "sub" / f"d{i}.txt").write_text(f"{GOOD} file {i}")
    (tmp_path / "in" / "bad.txt").write_bytes(b"\xff\xfe broken")
    final, stage = run_clean(tmp_path, source(tmp_path, id_field=None))
    assert final[0].documents_in == 4 and final[0].kept == 3 and final[0].rejected == Counter(invalid_utf8=1)
    ids = [d["id"] for d in read_documents(stage / "shards" / "web-00000.jsonl")]
    assert ids == ["web:in/sub/d0.txt:1", "web:in/sub/d1.txt:1", "web:in/sub/d2.txt:1"]


def test_hugging_face_dataset_source_from_a_local_json_file(tmp_path):
    write_lines(tmp_path / "local.jsonl", [json.dumps({"id": str(i), "text": f"{GOOD} {i}"}) for i in range(12)])
    src = SourceConfig(
        name="hub",
        role="general",
        hf={"path": "json", "data_files": str(tmp_path / "local.jsonl")},
        documents_per_shard=5,
    )
    final, stage = run_clean(tmp_path, src)
    assert [c.kept for c in final] == [5, 5, 2]
    assert [d["id"] for d in read_documents(stage / "shards" / "hub-00002.jsonl")] == ["10", "11"]


def test_missing_input_path_and_absent_text_field_fail_before_work(tmp_path):
    with pytest.raises(InputError, match="input path 'nowhere.jsonl' does not exist"):
        plan_input_shards(source(tmp_path, paths=["nowhere.jsonl"]), tmp_path)
    write_lines(tmp_path / "in" / "a.jsonl", [json.dumps({"id": "1", "body": GOOD})] * 3)
    with pytest.raises(InputError, match="no record in .*a.jsonl has the text field 'text' .*fields seen: id, body"):
        check_text_field(source(tmp_path), tmp_path)


# --- cleaning steps ---------------------------------------------------------------------------------
def test_html_page_becomes_visible_text_with_paragraphs_and_entities():
    html = (
        "<!DOCTYPE html><html><head><title>x</title><style>p {color: red}</style>"
        "<script>if (a < b) { track(); }</script></head><body><nav>Home | News | About</nav>"
        "<h1>Dosing &amp; safety</h1><p>Give 5&nbsp;mg when 3 &lt; 4 and <b>never</b> more.</p>"
        "<ul><li>first</li><li>second</li></ul><footer>footer text</footer></body></html>"
    )
    text = normalise_whitespace(html_to_text(html, CleanConfig().html_drop_tags))
    assert text == "Dosing & safety\n\nGive 5 mg when 3 < 4 and never more.\n\nfirst\nsecond"


def test_prose_with_less_than_sign_is_not_parsed_as_html():
    steps = CleanSteps(CleanConfig(), code=False)
    text, reason = steps("Treatment was better (p < 0.05), since a < b and c > d.", Counter())
    assert reason is None and text == "Treatment was better (p < 0.05), since a < b and c > d."


def test_unicode_repair_whitespace_and_boilerplate_lines():
    steps = CleanSteps(CleanConfig(), code=False)
    tally: Counter = Counter()
    raw = (
        "We ate at the cafÃ© and it was fine.\r\n\r\n\r\n\tSecond   paragraph\u00a0here.  \n"
        "We use cookies to improve your experience. Accept all cookies"
    )
    text, reason = steps(raw, tally)
    assert text == "We ate at the café and it was fine.\n\nSecond paragraph here."
    assert tally["boilerplate_lines_removed"] == 1 and tally["unicode_changed"] == 1
    long_prose = "Our privacy policy matters " + "because data should be protected and explained clearly. " * 5
    assert steps(long_prose, Counter())[0] == long_prose.strip()  # long prose lines are not boilerplate


def test_pii_is_replaced_and_cards_need_a_valid_luhn_checksum():
    tally: Counter = Counter()
    text = scrub_pii(
        "Write to jane.roe@example.org, call (555) 123-4567 or +44 20 7946 0958, SSN 123-45-6789, "
        "host 10.0.0.12, card 4111 1111 1111 1111, not a card 4111 1111 1111 1112, 95% CI 1.2-3.4, 40 mg, 2019-2020.",
        PIIConfig(),
        tally,
    )
    assert text == (
        "Write to <EMAIL>, call <PHONE> or <PHONE>, SSN <SSN>, host <IPV4>, card <CREDIT_CARD>, "
        "not a card 4111 1111 1111 1112, 95% CI 1.2-3.4, 40 mg, 2019-2020."
    )
    assert tally == Counter(pii_email=1, pii_phone=2, pii_ssn=1, pii_ipv4=1, pii_credit_card=1)
    assert luhn_valid("79927398713") and not luhn_valid("79927398714")
    only_email = scrub_pii("a@b.co 123-45-6789", PIIConfig(kinds=["email"], placeholder="[{kind}]"), Counter())
    assert only_email == "[EMAIL] 123-45-6789"


def test_code_mode_keeps_indentation_and_requires_python_to_parse():
    steps = CleanSteps(CleanConfig(), code=True)
    good = "def f(x):\n    if x < 2:\n        return 1\n    return x  \n"
    assert steps(good, Counter()) == ("def f(x):\n    if x < 2:\n        return 1\n    return x", None)
    assert steps("def f(:\n  pass", Counter())[1] == "python_syntax_error"


# --- the shard stage: duplicates, metadata filters, accounting ----------------------------------------
def test_exact_duplicates_across_shards_keep_the_first_and_counts_balance(tmp_path):
    docs = [
        {"id": "a", "text": GOOD, "int_score": 3},
        {"id": "b", "text": "  " + GOOD.upper() + "  ", "int_score": 3},  # same text after normalisation
        {"id": "c", "text": "Completely different text about gardening in spring.", "int_score": 1},
        {"id": "d", "text": "Another document, a third one, about trains.", "int_score": 4},
        {"id": "a", "text": "Same id as the first document but other text.", "int_score": 4},
        {"id": "f", "text": "<html><body><script>x()</script></body></html>", "int_score": 5},
        {"id": "g", "text": GOOD, "int_score": 5},
    ]
    write_lines(tmp_path / "in" / "a.jsonl", [json.dumps(d) for d in docs])
    src = source(tmp_path, documents_per_shard=3, metadata_filters=[{"field": "int_score", "op": ">=", "value": 2}])
    final, stage = run_clean(tmp_path, src)
    assert [c.shard for c in final] == ["web-00000", "web-00001", "web-00002"]
    assert all(c.balanced() for c in final)
    kept = [d["id"] for c in final for d in read_documents(stage / "shards" / f"{c.shard}.jsonl")]
    assert kept == ["a", "d"]
    excluded = {d["id"]: d["reason"] for c in final for d in read_documents(stage / "excluded" / f"{c.shard}.jsonl")}
    assert excluded == {
        "b": "exact_duplicate",
        "c": "metadata_int_score",
        "a": "duplicate_id",
        "f": "empty_after_clean",
        "g": "exact_duplicate",
    }
    assert sum(c.documents_in for c in final) == 7


def test_a_finished_shard_is_not_redone_and_rerun_output_is_identical(tmp_path):
    write_lines(tmp_path / "in" / "a.jsonl", [json.dumps({"id": str(i), "text": f"{GOOD} {i}"}) for i in range(10)])
    src = source(tmp_path, documents_per_shard=4)
    stage = tmp_path / "stage"
    shards = plan_input_shards(src, tmp_path)
    first = clean_shard(shards[0], src, CleanConfig(), stage, tmp_path)
    marker_time = (stage / "_work" / "web-00000.done.json").stat().st_mtime_ns
    again = clean_shard(shards[0], src, CleanConfig(), stage, tmp_path)
    assert again.as_dict() == first.as_dict()
    assert (stage / "_work" / "web-00000.done.json").stat().st_mtime_ns == marker_time
    assert isinstance(shards[0], InputShard)
