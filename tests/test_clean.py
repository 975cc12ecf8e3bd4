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
from cptflow.tasks import clean
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


def test_parquet_with_several_row_groups_reads_like_read_table_with_ids_and_row_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(clean, "ARROW_BATCH_ROWS", 3)  # batches that do not line up with the row groups
    table = pa.table(
        {
            "text": [f"{GOOD} {i}" for i in range(25)],
            "score": [i if i % 4 else None for i in range(25)],
            "tags": [[f"t{i}", "x"] for i in range(25)],
            "where": [{"page": i, "lang": "en"} for i in range(25)],
        }
    )
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "a.parquet", row_group_size=7)  # groups of 7, 7, 7, 4 rows
    src = source(tmp_path, id_field=None, documents_per_shard=10)
    shards = plan_input_shards(src, tmp_path)
    assert [(s.start, s.stop) for s in shards] == [(0, 2), (2, 4)]
    records = [r for s in shards for r in read_raw_records(s, src)]
    assert [r.record for r in records] == pq.read_table(tmp_path / "in" / "a.parquet").to_pylist()
    assert [r.line for r in records] == list(range(1, 26))
    final, stage = run_clean(tmp_path, src)
    docs = [d for c in final for d in read_documents(stage / "shards" / f"{c.shard}.jsonl")]
    assert [d["id"] for d in docs] == [f"web:a.parquet:{row}" for row in range(1, 26)]
    assert docs[9]["meta"] == {"score": 9, "tags": ["t9", "x"], "where": {"page": 9, "lang": "en"}}


def test_meta_fields_limit_the_meta_and_the_parquet_columns_read(tmp_path):
    not_utf8 = pa.array([b"ok", b"caf\xff", b"ok"], type=pa.binary()).view(pa.string())
    table = pa.table(
        {"id": ["a", "b", "c"], "text": [f"{GOOD} {i}" for i in range(3)], "score": [1, 2, 3], "junk": not_utf8}
    )
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "a.parquet")
    final, stage = run_clean(tmp_path, source(tmp_path, meta_fields=["score"]))
    docs = list(read_documents(stage / "shards" / "web-00000.jsonl"))
    assert [(d["id"], d["meta"]) for d in docs] == [("a", {"score": 1}), ("b", {"score": 2}), ("c", {"score": 3})]
    # The column nobody asked for is never read, so its bad bytes reject nothing; read whole, they would.
    final, stage = run_clean(tmp_path / "all", source(tmp_path, paths=[str(tmp_path / "in")]))
    assert final[0].rejected == Counter(invalid_utf8=1) and final[0].kept == 2


def test_file_names_are_relative_to_the_configured_root_whatever_the_checkout(tmp_path):
    base = tmp_path / "checkout" / "configs"
    data = tmp_path / "checkout" / "data"
    write_lines(data / "one" / "a.jsonl", [json.dumps({"text": GOOD})])
    write_lines(data / "web" / "web-0.jsonl", [json.dumps({"text": GOOD + " 0"})])
    write_lines(data / "web" / "sub" / "web-1.jsonl", [json.dumps({"text": GOOD + " 1"})])
    (data / "dir" / "deep").mkdir(parents=True)
    (data / "dir" / "deep" / "x.txt").write_text(GOOD)
    base.mkdir()
    entries = ["../data/one/a.jsonl", "../data/web/**/web-*.jsonl", "../data/./dir", str(data / "one")]
    files = clean.list_input_files(source(tmp_path, paths=entries), base)
    assert [(f.name, f.label) for f in files] == [
        ("a.jsonl", "../data/one/a.jsonl"),  # a file: its name
        ("sub/web-1.jsonl", "../data/web/sub/web-1.jsonl"),  # a glob: below the directory before the wildcard
        ("web-0.jsonl", "../data/web/web-0.jsonl"),
        ("deep/x.txt", "../data/dir/deep/x.txt"),  # a directory: below it
        ("a.jsonl", str(data / "one" / "a.jsonl")),  # the same file again, by an absolute path
    ]
    assert all(Path(f.path).is_absolute() and Path(f.path).is_file() for f in files)
    fingerprints = clean.input_file_fingerprints(source(tmp_path, paths=entries[:3]), base, "mtime")
    assert [f["path"] for f in fingerprints] == [f.label for f in files[:4]]
    assert str(tmp_path) not in json.dumps(fingerprints)


def test_two_files_that_would_share_a_name_are_named_from_the_common_directory(tmp_path):
    write_lines(tmp_path / "data" / "2023" / "part-0.jsonl", [json.dumps({"text": GOOD})])
    write_lines(tmp_path / "data" / "2024" / "part-0.jsonl", [json.dumps({"text": GOOD + " again"})])
    src = source(tmp_path, paths=["data/2023", "data/2024"], id_field=None)
    assert [f.name for f in clean.list_input_files(src, tmp_path)] == ["2023/part-0.jsonl", "2024/part-0.jsonl"]
    final, stage = run_clean(tmp_path, src)
    ids = [d["id"] for c in final for d in read_documents(stage / "shards" / f"{c.shard}.jsonl")]
    assert ids == ["web:2023/part-0.jsonl:1", "web:2024/part-0.jsonl:1"]  # both kept: no duplicate_id


def test_text_directory_one_document_per_file_with_path_ids(tmp_path):
    for i in range(3):
        (tmp_path / "in" / "sub").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "sub" / f"d{i}.txt").write_text(f"{GOOD} file {i}")
    (tmp_path / "in" / "bad.txt").write_bytes(b"\xff\xfe broken")
    final, stage = run_clean(tmp_path, source(tmp_path, id_field=None))
    assert final[0].documents_in == 4 and final[0].kept == 3 and final[0].rejected == Counter(invalid_utf8=1)
    docs = list(read_documents(stage / "shards" / "web-00000.jsonl"))
    # Relative to the configured directory `in`, not to the config's or the machine's root.
    assert [d["id"] for d in docs] == ["web:sub/d0.txt:1", "web:sub/d1.txt:1", "web:sub/d2.txt:1"]
    assert [d["meta"]["path"] for d in docs] == ["in/sub/d0.txt", "in/sub/d1.txt", "in/sub/d2.txt"]
    (reject,) = read_documents(stage / "rejected" / "web-00000.jsonl")
    assert (reject["file"], reject["line"], reject["reason"]) == ("in/bad.txt", 1, "invalid_utf8")


def test_hugging_face_json_builder_is_streamed_one_shard_per_data_file(tmp_path):
    for name, rows in (("a.jsonl", range(7)), ("b.jsonl", range(7, 12))):
        write_lines(tmp_path / "hub" / name, [json.dumps({"id": str(i), "text": f"{GOOD} {i}"}) for i in rows])
    src = SourceConfig(
        name="hub",
        role="general",
        # Relative to the config's directory (here tmp_path), not to the working directory.
        hf={"path": "json", "data_files": ["hub/a.jsonl", "hub/b.jsonl"]},
        id_field=None,
        documents_per_shard=5,
    )
    shards = plan_input_shards(src, tmp_path)
    assert [(s.kind, s.start, s.stop, s.names) for s in shards] == [
        ("hf_stream", 0, 2, ("a.jsonl",)),
        ("hf_stream", 1, 2, ("b.jsonl",)),
    ]
    final, stage = run_clean(tmp_path, src)
    assert [c.kept for c in final] == [7, 5]
    docs = list(read_documents(stage / "shards" / "hub-00001.jsonl"))
    assert [d["id"] for d in docs] == [f"hub:b.jsonl:{line}" for line in range(1, 6)]
    assert [d["meta"]["id"] for d in docs] == [str(i) for i in range(7, 12)]
    fingerprints = clean.input_file_fingerprints(src, tmp_path, "content")  # a changed local file reruns clean
    assert [f["path"] for f in fingerprints] == ["hf:json:a.jsonl", "hf:json:b.jsonl"]


def test_hugging_face_save_to_disk_dataset_is_read_like_the_dataset_itself(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(clean, "ARROW_BATCH_ROWS", 4)  # several Arrow slices per input shard
    rows = {"text": [f"{GOOD} {i}" for i in range(23)], "score": list(range(23)), "tags": [[str(i)] for i in range(23)]}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict({"text": ["x"]})}
    ).save_to_disk(str(tmp_path / "saved"))
    src = SourceConfig(name="hub", role="general", hf={"path": "saved"}, id_field=None, documents_per_shard=10)
    shards = plan_input_shards(src, tmp_path)
    assert [(s.kind, s.start, s.stop) for s in shards] == [("hf_disk", 0, 10), ("hf_disk", 10, 20), ("hf_disk", 20, 23)]
    records = [r for s in shards for r in read_raw_records(s, src, base_dir=tmp_path)]
    reference = datasets.load_from_disk(str(tmp_path / "saved"))["train"].to_list()
    assert [r.record for r in records] == reference
    assert [r.line for r in records] == list(range(1, 24))
    final, stage = run_clean(tmp_path, src)
    docs = [d for c in final for d in read_documents(stage / "shards" / f"{c.shard}.jsonl")]
    assert [d["id"] for d in docs] == [f"hub:train:{i}" for i in range(1, 24)]
    assert docs[5]["meta"] == {"score": 5, "tags": ["5"]}
    fingerprints = clean.input_file_fingerprints(src, tmp_path, "content")  # the local files, no absolute path
    assert fingerprints and all(f["path"].startswith("hf:saved:") for f in fingerprints)


def test_hugging_face_parquet_dataset_directory_is_read_by_row_groups(tmp_path):
    import datasets

    (tmp_path / "pq" / "data").mkdir(parents=True)
    for k in range(2):
        table = pa.table({"id": [f"{k}-{i}" for i in range(9)], "text": [f"{GOOD} {k} {i}" for i in range(9)]})
        pq.write_table(table, tmp_path / "pq" / "data" / f"train-{k:05d}-of-00002.parquet", row_group_size=4)
    src = SourceConfig(name="hub", role="general", hf={"path": "pq"}, documents_per_shard=4)
    shards = plan_input_shards(src, tmp_path)
    assert [(s.kind, s.names[0], s.start, s.stop) for s in shards] == [
        ("parquet", name, group, group + 1)
        for name in ("train-00000-of-00002.parquet", "train-00001-of-00002.parquet")
        for group in range(3)
    ]
    records = [r for s in shards for r in read_raw_records(s, src, base_dir=tmp_path)]
    reference = datasets.load_dataset(str(tmp_path / "pq"), split="train").to_list()
    assert [r.record for r in records] == reference
    assert [r.line for r in records] == [*range(1, 10), *range(1, 10)]


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


def test_duplicate_decisions_from_summaries_match_the_first_wins_reference(tmp_path):
    """Exact duplicates and re-used ids from the shards' 32-byte summaries, against the plain sequential
    rule on the full keys (a document is dropped when its text or id is that of an earlier kept one)."""
    import random

    import numpy as np

    from cptflow.docshards import shard_work_file
    from cptflow.tasks.clean import dedup_key, duplicate_decisions, id_digest

    rng = random.Random(3)
    shards = {name: [] for name in ("a", "b", "c", "d")}
    for name, docs in shards.items():  # few texts and ids, so they collide with each other across shards
        for _ in range(rng.choice([0, 300, 700])):
            docs.append((f"text {rng.randrange(900)}", f"id-{rng.randrange(1100)}"))
    for name, docs in shards.items():
        rows = b"".join(bytes.fromhex(dedup_key(text)) + id_digest(doc_id) for text, doc_id in docs)
        path = shard_work_file(tmp_path, name, "keys.npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.frombuffer(rows, dtype="<u8").reshape(len(docs), 4))

    for dedup in (True, False):
        expected, seen_texts, seen_ids = {name: {} for name in shards}, set(), set()
        for name, docs in shards.items():
            for line, (text, doc_id) in enumerate(docs):
                if dedup and text in seen_texts:
                    expected[name][line] = "exact_duplicate"
                elif doc_id in seen_ids:
                    expected[name][line] = "duplicate_id"
                else:
                    seen_texts.add(text)
                    seen_ids.add(doc_id)
        assert duplicate_decisions(tmp_path, list(shards), dedup) == expected
        assert sum(len(d) for d in expected.values()) > 200
