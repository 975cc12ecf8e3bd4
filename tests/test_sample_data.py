"""The committed sample corpora in data/ are exactly what data/generate.py writes, and have the promised shape."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
NOT_GENERATED = {"generate.py", "README.md", "__init__.py"}  # __init__.py: data/ installs as cptflow.sample_data


def _generated_files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name not in NOT_GENERATED and "__pycache__" not in p.parts
    )


def _digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        # Compare the payload: zlib builds (zlib vs zlib-ng) may compress the same bytes differently.
        data = gzip.decompress(data)
    return hashlib.sha256(data).hexdigest()


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample-data")
    subprocess.run([sys.executable, str(DATA / "generate.py"), "--out", str(out)], check=True, capture_output=True)
    return out


def test_generator_reproduces_the_committed_files(regenerated):
    assert _generated_files(regenerated) == _generated_files(DATA)
    for name in _generated_files(DATA):
        assert _digest(regenerated / name) == _digest(DATA / name), name


def test_gzip_headers_carry_no_timestamp_or_filename(regenerated):
    for path in sorted((regenerated / "raw/general").glob("*.gz")):
        header = path.read_bytes()[:10]
        assert header[3] & 0x08 == 0, "FNAME flag set"
        assert header[4:8] == b"\x00\x00\x00\x00", "mtime is not 0"


def test_domain_abstracts_have_ids_text_journal_year():
    records = _read_jsonl(DATA / "raw/domain/abstracts.jsonl")
    assert len(records) == 1000
    assert all(list(r) == ["id", "text", "journal", "year"] for r in records)
    assert len({r["id"] for r in records}) == 1000
    assert sum("95% CI" in r["text"] or "p < 0.05" in r["text"] for r in records) > 600


def test_general_shards_have_configurable_field_names_and_low_scores():
    records = _read_jsonl(DATA / "raw/general/web-000.jsonl.gz") + _read_jsonl(DATA / "raw/general/web-001.jsonl.gz")
    assert len(records) == 1800
    assert all(list(r) == ["doc_id", "content", "url", "int_score"] for r in records)
    assert all(0 <= r["int_score"] <= 5 and r["url"].startswith("https://") for r in records)
    assert sum(r["int_score"] <= 1 for r in records) == 180


def test_guidelines_and_instruction_sets_have_expected_counts():
    assert len(list((DATA / "raw/domain/guidelines").glob("*.txt"))) == 40
    alpaca = _read_jsonl(DATA / "instructions/alpaca.jsonl")
    assert len(alpaca) == 200 and all(list(r) == ["instruction", "input", "output"] for r in alpaca)
    chat = _read_jsonl(DATA / "instructions/chat.jsonl")
    assert len(chat) == 100
    assert all(m["role"] in ("system", "user", "assistant") for r in chat for m in r["messages"])


def test_dirty_file_has_each_malformed_line_where_the_readme_says():
    lines = (DATA / "raw/general/web-002-dirty.jsonl").read_bytes().split(b"\n")
    assert len(lines) == 23 and lines[-1]  # last line has no trailing newline

    def parsed(n: int):
        return json.loads(lines[n - 1].decode("utf-8"))

    for n in (2, 16, 21):
        with pytest.raises(json.JSONDecodeError):
            parsed(n)
    with pytest.raises(UnicodeDecodeError):
        lines[3].decode("utf-8")
    assert lines[11] == b""
    assert "content" not in parsed(5)
    assert parsed(7)["content"] == "" and parsed(8)["content"].strip() == ""
    assert parsed(10)["content"] == 42 and isinstance(parsed(11)["content"], list) and parsed(18)["content"] is None
    assert isinstance(parsed(14), list) and isinstance(parsed(20), str)
    valid = [
        n
        for n in (1, 3, 6, 9, 13, 15, 17, 19, 22, 23)
        if isinstance(parsed(n).get("content"), str) and parsed(n)["content"].strip()
    ]
    assert len(valid) == 10


def test_labels_cover_every_dirty_record():
    labels = _read_jsonl(DATA / "labels.jsonl")
    kinds = {}
    for label in labels:
        kinds[label["dirt"]] = kinds.get(label["dirt"], 0) + 1
    assert kinds["exact_duplicate"] == 50 + 90 + 1 and kinds["html"] == 40 + 80
    assert all("duplicate_of" in label for label in labels if label["dirt"].endswith("duplicate"))
