"""Tests for the mix stage: schedules, the error-feedback stream builder, held-out eval sets, epochs,
budgets, accounting, token counts, and byte-identical outputs (against an in-memory reference of the
single-process mix, under the threads runner, and after a kill while the stream shards are written)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
import types
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from cptflow import fast_bpe
from cptflow.tasks import mix
from cptflow.tasks.mix import (
    MixConfig,
    MixEpochsError,
    MixEpochsWarning,
    PoolDocument,
    ScheduleConfig,
    build_stream,
    choose_held_out,
    document_tokens,
    epochs_by_role,
    schedule_table,
    target_share,
)

SCHEDULES = {
    "linear": ScheduleConfig(),
    "constant": ScheduleConfig(kind="constant", start=0.3),
    "cosine": ScheduleConfig(kind="cosine", start=0.2, end=0.95),
    "step": ScheduleConfig(kind="step", start=0.5, steps=[(0.3, 0.8), (0.7, 0.2)]),
}


def synthetic_pool(domain: int = 2000, general: int = 3000, seed: int = 1) -> list[PoolDocument]:
    rng = random.Random(seed)
    docs = [PoolDocument(f"d{i}", "domain", rng.randint(5, 800)) for i in range(domain)]
    docs += [PoolDocument(f"g{i}", "general", rng.randint(5, 800)) for i in range(general)]
    rng.shuffle(docs)
    return docs


def largest_window_error(stream, schedule: ScheduleConfig, budget: int, window: int) -> float:
    """|realised - target| domain share over every run of `window` consecutive documents, with the
    target recomputed here from each document's start position in the budget."""
    tokens = np.array([e.tokens for e in stream], dtype=np.float64)
    starts = np.concatenate([[0.0], np.cumsum(tokens)[:-1]])
    targets = np.array([target_share(s / budget, schedule) for s in starts])
    domain = np.array([e.tokens if e.role == "domain" else 0 for e in stream], dtype=np.float64)
    cum = lambda a: np.concatenate([[0.0], np.cumsum(a)])  # noqa: E731
    t, d, g = cum(tokens), cum(domain), cum(targets * tokens)
    window_tokens = t[window:] - t[:-window]
    return float(np.max(np.abs((d[window:] - d[:-window]) - (g[window:] - g[:-window])) / window_tokens))


# ---------------------------------------------------------------------------------------------
# Schedule and stream builder (no tokenizer)
# ---------------------------------------------------------------------------------------------


def test_target_share_follows_each_schedule_kind():
    linear = ScheduleConfig()
    assert target_share(0, linear) == 0.5 and target_share(1, linear) == pytest.approx(0.9)
    assert target_share(0.5, linear) == pytest.approx(0.7)
    cosine = ScheduleConfig(kind="cosine", start=0.2, end=0.8)
    assert target_share(0.5, cosine) == pytest.approx(0.5) and target_share(1, cosine) == pytest.approx(0.8)
    assert target_share(0.1, cosine) < 0.2 + 0.6 * 0.1  # a half cosine starts flatter than a line
    assert target_share(0.7, ScheduleConfig(kind="constant", start=0.3)) == 0.3
    step = SCHEDULES["step"]
    assert [target_share(p, step) for p in (0, 0.29, 0.3, 0.69, 0.7, 1)] == [0.5, 0.5, 0.8, 0.8, 0.2, 0.2]
    assert target_share(1.5, linear) == pytest.approx(0.9)  # positions past the budget clamp


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_realised_domain_share_within_two_points_in_every_200_document_window(kind):
    schedule = SCHEDULES[kind]
    budget = 1_500_000
    stream = build_stream(synthetic_pool(), schedule, budget, seed=0)
    assert len(stream) > 3000
    for window in (200, 500):
        assert largest_window_error(stream, schedule, budget, window) <= 0.02
    rows = schedule_table(stream, 200)
    assert all(abs(r["target"] - r["realised"]) <= 0.02 for r in rows if r["documents"] == 200)
    assert sum(r["documents"] for r in rows) == len(stream) and sum(r["tokens"] for r in rows) == sum(
        e.tokens for e in stream
    )


def test_stream_meets_budget_and_new_epochs_reshuffle():
    pool = synthetic_pool(domain=300, general=300)
    budget = 3 * sum(d.tokens for d in pool)
    stream = build_stream(pool, ScheduleConfig(kind="constant", start=0.5), budget, seed=0)
    total = sum(e.tokens for e in stream)
    assert budget <= total < budget + max(d.tokens for d in pool)
    for role in ("domain", "general"):
        by_epoch = {}
        for e in stream:
            if e.role == role:
                by_epoch.setdefault(e.epoch, []).append(e.document)
        # every complete epoch uses each document once, and the order changes from epoch to epoch
        assert sorted(by_epoch[0]) == sorted(by_epoch[1]) == sorted(i for i, d in enumerate(pool) if d.role == role)
        assert by_epoch[0] != by_epoch[1]
    epochs = epochs_by_role(stream, pool)
    for role in ("domain", "general"):
        role_tokens = sum(d.tokens for d in pool if d.role == role)
        assert epochs[role] == pytest.approx(budget / 2 / role_tokens, abs=0.02)


def test_stream_is_deterministic_and_independent_of_pool_order():
    pool = synthetic_pool(domain=500, general=500)
    schedule = ScheduleConfig()
    ids = lambda stream, docs: [docs[e.document].id for e in stream]  # noqa: E731
    first = ids(build_stream(pool, schedule, 200_000, seed=0), pool)
    assert first == ids(build_stream(pool, schedule, 200_000, seed=0), pool)
    reordered = list(reversed(pool))
    assert first == ids(build_stream(reordered, schedule, 200_000, seed=0), reordered)
    assert first != ids(build_stream(pool, schedule, 200_000, seed=1), pool)


def test_missing_role_for_the_schedule_is_an_error():
    domain_only = [d for d in synthetic_pool(domain=50, general=0)]
    with pytest.raises(ValueError, match="no general training documents"):
        build_stream(domain_only, ScheduleConfig(), 10_000, seed=0)
    stream = build_stream(domain_only, ScheduleConfig(kind="constant", start=1.0), 10_000, seed=0)
    assert {e.role for e in stream} == {"domain"}


def test_held_out_choice_depends_on_ids_not_order():
    ids = [f"doc-{i}" for i in range(500)]
    chosen = {ids[i] for i in choose_held_out(ids, 20, seed=0)}
    shuffled = list(ids)
    random.Random(3).shuffle(shuffled)
    assert {shuffled[i] for i in choose_held_out(shuffled, 20, seed=0)} == chosen
    assert {ids[i] for i in choose_held_out(ids, 20, seed=1)} != chosen
    assert len(choose_held_out(ids[:5], 20, seed=0)) == 5


def test_excess_epochs_warns_or_errors_naming_role_and_remedy():
    cfg = MixConfig(budget_tokens=1000, max_epochs=2)
    with pytest.warns(MixEpochsWarning, match=r"general training data .* repeated 3\.50 epochs.*max_epochs=2"):
        messages = mix.check_epochs(
            {"domain": 1.0, "general": 3.5}, cfg, {"domain": 10, "general": 10}, {"domain": 100, "general": 100}
        )
    assert len(messages) == 1 and "raise mix.max_epochs" in messages[0]
    strict = MixConfig(budget_tokens=1000, max_epochs=2, on_excess_epochs="error")
    with pytest.raises(MixEpochsError, match=r"domain training data .* 5\.00 epochs.*Add domain data"):
        mix.check_epochs(
            {"domain": 5.0, "general": 1.0}, strict, {"domain": 10, "general": 10}, {"domain": 100, "general": 100}
        )


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_defaults_and_budget_choice():
    cfg = MixConfig()
    assert cfg.budget_epochs == 1.0 and cfg.budget_tokens is None and cfg.schedule.kind == "linear"
    by_tokens = MixConfig.model_validate({"budget_tokens": 5000})
    assert by_tokens.budget_tokens == 5000 and by_tokens.budget_epochs is None
    with pytest.raises(ValidationError, match="exactly one of budget_tokens"):
        MixConfig.model_validate({"budget_tokens": 5000, "budget_epochs": 2})
    with pytest.raises(ValidationError, match="exactly one of budget_tokens"):
        MixConfig.model_validate({"budget_epochs": None})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"budget_token": 10}, "Extra inputs"),
        ({"schedule": {"kind": "linear", "slope": 1}}, "Extra inputs"),
        ({"schedule": {"start": 1.2}}, "less than or equal to 1"),
        ({"schedule": {"end": -0.1}}, "greater than or equal to 0"),
        ({"schedule": {"kind": "step", "steps": [[0.5, 1.5]]}}, "share must be in"),
        ({"schedule": {"kind": "step", "steps": [[1.5, 0.5]]}}, "fraction of the budget must be in"),
        ({"schedule": {"kind": "step", "steps": [[0.6, 0.5], [0.2, 0.9]]}}, "strictly increasing"),
        ({"schedule": {"kind": "step"}}, "needs 'steps'"),
        ({"schedule": {"kind": "linear", "steps": [[0.5, 0.5]]}}, "only used by schedule kind 'step'"),
        ({"on_excess_epochs": "ignore"}, "warn"),
        ({"window_documents": 0}, "greater than or equal to 1"),
    ],
)
def test_invalid_config_is_rejected(data, message):
    with pytest.raises(ValidationError, match=message):
        MixConfig.model_validate(data)


# ---------------------------------------------------------------------------------------------
# The stage, end to end on a tiny tokenizer
# ---------------------------------------------------------------------------------------------

_DOMAIN_WORDS = "enzyme protein kinase receptor binding assay ligand pathway membrane cell signal".split()
_GENERAL_WORDS = "garden bread weather river window kitchen bicycle dinner school morning".split()


def synthetic_documents(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for source, words, n in (("papers", _DOMAIN_WORDS, 260), ("web", _GENERAL_WORDS, 340)):
        for i in range(n):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 120))) + f" ({source} {i})."
            docs.append({"id": f"{source}-{i}", "source": source, "text": text, "meta": {}, "perplexity": 10.0})
    return docs


def write_upstream(directory: Path, docs: list[dict], shards_per_source: int = 2) -> Path:
    """A committed stand-in for the perplexity stage: manifest.json plus shards/*.jsonl."""
    entries = []
    for source in sorted({d["source"] for d in docs}):
        mine = [d for d in docs if d["source"] == source]
        for k in range(shards_per_source):
            name = f"{source}-{k:05d}"
            path = directory / "shards" / f"{name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(d) + "\n" for d in mine[k::shards_per_source]), encoding="utf-8")
            entries.append({"shard": name, "source": source})
    (directory / "manifest.json").write_text(json.dumps({"shards": entries}), encoding="utf-8")
    return directory


def stage_config(tokenizer_dir: Path, seed: int = 0, **mix_fields):
    from cptflow.tasks.clean import SourceConfig

    sources = [
        SourceConfig(name="papers", role="domain", paths=["x"]),
        SourceConfig(name="web", role="general", paths=["y"]),
    ]
    mix_cfg = MixConfig.model_validate({"domain_eval_documents": 20, "general_eval_documents": 25, **mix_fields})
    return types.SimpleNamespace(
        mix=mix_cfg, sources=sources, seed=seed, base_model=str(tokenizer_dir), trust_remote_code=False
    )


def stage_run(directory: Path, upstream: Path, fingerprint: str = "f"):
    from cptflow.plan import StageRun

    return StageRun(
        stage="mix", fingerprint=fingerprint, directory=str(directory), upstream_directory=str(upstream), payload={}
    )


def run_stage(directory: Path, upstream: Path, cfg) -> dict:
    """The stage as plan.run_data_stage_plain runs it: every shard, every reduce round, the commit."""
    run = stage_run(directory, upstream)
    counts = [mix.process(run, cfg, item) for item in mix.plan(run, cfg)]
    for plan_round in mix.REDUCE_ROUNDS:
        for item in plan_round(run, cfg, counts):
            mix.reduce(run, cfg, item)
    return mix.commit(run, cfg, counts, started=0.0)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def stream_documents(directory: Path) -> list[dict]:
    return [doc for path in mix.stream_shard_paths(directory) for doc in read_jsonl(path)]


def output_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*.jsonl"))}


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return synthetic_documents()


@pytest.fixture(scope="module")
def upstream(docs, tmp_path_factory) -> Path:
    return write_upstream(tmp_path_factory.mktemp("up"), docs)


@pytest.fixture(scope="module")
def committed(upstream, tiny_llama_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("mix") / "mix"
    cfg = stage_config(tiny_llama_dir, documents_per_shard=300)
    return directory, run_stage(directory, upstream, cfg), cfg


def test_held_out_documents_never_reach_training(committed, docs):
    directory, manifest, _ = committed
    domain_eval = read_jsonl(directory / "eval" / "domain_eval.jsonl")
    general_eval = read_jsonl(directory / "eval" / "general_eval.jsonl")
    assert len(domain_eval) == 20 and len(general_eval) == 25
    assert {d["source"] for d in domain_eval} == {"papers"} and {d["source"] for d in general_eval} == {"web"}
    stream = stream_documents(directory)
    held_ids = {d["id"] for d in domain_eval + general_eval}
    held_texts = {d["text"] for d in domain_eval + general_eval}
    assert not held_ids & {d["id"] for d in stream}
    assert not held_texts & {d["text"] for d in stream}
    assert manifest["eval"]["domain_eval"]["documents"] == 20 and manifest["eval"]["general_eval"]["documents"] == 25


def test_accounting_balances_and_kept_counts_distinct_stream_documents(committed, docs):
    directory, manifest, _ = committed
    counts = manifest["counts"]
    stream = stream_documents(directory)
    excluded_file = read_jsonl(directory / "excluded" / "mix.jsonl")
    assert counts["in"] == len(docs)
    assert counts["kept"] == len({d["id"] for d in stream})
    assert counts["excluded"]["held_out_domain_eval"] == 20 and counts["excluded"]["held_out_general_eval"] == 25
    assert counts["excluded"].get("unused_within_budget", 0) == len(excluded_file)
    assert counts["in"] == counts["kept"] + sum(counts["excluded"].values()) + sum(counts["rejected"].values())
    assert {d["reason"] for d in excluded_file} <= {"unused_within_budget"}
    assert not {d["id"] for d in excluded_file} & {d["id"] for d in stream}
    by_source = manifest["counts_by_source"]
    assert by_source["papers"]["in"] == 260 and by_source["web"]["in"] == 340
    assert by_source["papers"]["excluded"]["held_out_domain_eval"] == 20
    assert sum(c["kept"] for c in by_source.values()) == counts["kept"]
    # The manifest's shards are the stream shards, in order: what upstream_shards() gives tokenize.
    assert [s["shard"] for s in manifest["shards"]] == [s["shard"] for s in manifest["stream_shards"]]
    assert [s["shard"] for s in manifest["shards"]] == [f"stream-{k:05d}" for k in range(len(manifest["shards"]))]
    assert all(s["in"] == s["kept"] + sum(s["excluded"].values()) for s in manifest["shards"])
    assert manifest["stats"]["stream_documents"] == len(stream) == manifest["stream_documents"]
    assert manifest["stats"]["domain_tokens"] == sum(d["tokens"] for d in stream if d["role"] == "domain")


def test_stream_documents_carry_role_epoch_and_tokens_counted_like_tokenize(committed, tiny_llama_dir):
    from cptflow.models import load_tokenizer

    directory, manifest, _ = committed
    stream = stream_documents(directory)
    assert {d["role"] for d in stream} == {"domain", "general"}
    assert all(d["role"] == ("domain" if d["source"] == "papers" else "general") for d in stream)
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    sample = stream[:50]
    assert [d["tokens"] for d in sample] == document_tokens([d["text"] for d in sample], tokenizer)
    assert [d["tokens"] for d in sample] == [len(tokenizer(d["text"])["input_ids"]) + 1 for d in sample]
    total = sum(d["tokens"] for d in stream)
    assert manifest["stream_tokens"] == total == sum(manifest["tokens_by_source"].values())
    assert sum(s["documents"] for s in manifest["stream_shards"]) == len(stream)
    assert all(s["documents"] <= 300 for s in manifest["stream_shards"])
    rows = manifest["schedule"]
    assert rows[0] == {"window": 0, **{k: rows[0][k] for k in ("target", "realised", "documents", "tokens")}}
    assert sum(r["documents"] for r in rows) == len(stream) and sum(r["tokens"] for r in rows) == total


def test_budget_epochs_sets_domain_epochs(committed):
    _, manifest, cfg = committed
    assert cfg.mix.budget_epochs == 1.0
    assert manifest["epochs_by_role"]["domain"] == pytest.approx(1.0, abs=0.05)


def test_budget_tokens_bounds_the_stream(upstream, tiny_llama_dir, tmp_path):
    manifest = run_stage(tmp_path / "mix", upstream, stage_config(tiny_llama_dir, budget_tokens=5000))
    assert manifest["budget_tokens"] == 5000
    longest = max(d["tokens"] for d in stream_documents(tmp_path / "mix"))
    assert 5000 <= manifest["stream_tokens"] < 5000 + longest
    assert manifest["counts"]["excluded"]["unused_within_budget"] > 0


def test_same_inputs_give_identical_bytes_and_other_seed_another_order(
    upstream, docs, committed, tiny_llama_dir, tmp_path
):
    directory, _, cfg = committed
    again = run_stage(tmp_path / "again", upstream, cfg)
    assert again["counts"] == committed[1]["counts"]
    assert output_bytes(tmp_path / "again") == output_bytes(directory)
    # Resharded and reordered input: same held-out sets and the same stream.
    shuffled = list(docs)
    random.Random(7).shuffle(shuffled)
    resharded = write_upstream(tmp_path / "up-resharded", shuffled, shards_per_source=3)
    run_stage(tmp_path / "resharded", resharded, cfg)
    for name in ("eval/domain_eval.jsonl", "eval/general_eval.jsonl"):
        assert (tmp_path / "resharded" / name).read_bytes() == (directory / name).read_bytes()
    assert [d["id"] for d in stream_documents(tmp_path / "resharded")] == [d["id"] for d in stream_documents(directory)]
    other = run_stage(tmp_path / "seed1", upstream, stage_config(tiny_llama_dir, seed=1, documents_per_shard=300))
    assert other["counts"]["in"] == len(docs)
    assert [d["id"] for d in stream_documents(tmp_path / "seed1")] != [d["id"] for d in stream_documents(directory)]


def test_rerun_of_finished_work_items_is_a_no_op(upstream, tiny_llama_dir, tmp_path):
    cfg = stage_config(tiny_llama_dir, budget_tokens=3000)
    run = stage_run(tmp_path / "mix", upstream)
    items = mix.plan(run, cfg)
    assert [item["shard"] for item in items] == ["papers-00000", "papers-00001", "web-00000", "web-00001"]
    first = [mix.process(run, cfg, item) for item in items]
    assert all(c.balanced() for c in first) and sum(c.documents_in for c in first) == 600
    assert [mix.process(run, cfg, item).as_dict() for item in items] == [c.as_dict() for c in first]
    published = mix.plan_publish(run, cfg, first)
    records = [mix.reduce(run, cfg, item) for item in published]
    assert [mix.reduce(run, cfg, item) for item in published] == records  # not written again
    assert {item["name"] for item in published} >= {"domain_eval", "general_eval", "excluded", "stream-00000"}


def test_excess_epochs_in_the_stage(upstream, tiny_llama_dir, tmp_path):
    strict = stage_config(tiny_llama_dir, budget_epochs=6.0, on_excess_epochs="error")
    with pytest.raises(MixEpochsError, match="domain training data .* epochs, more than mix.max_epochs=4"):
        run_stage(tmp_path / "strict", upstream, strict)
    lenient = stage_config(tiny_llama_dir, budget_epochs=6.0)
    with pytest.warns(MixEpochsWarning, match="domain"):
        manifest = run_stage(tmp_path / "lenient", upstream, lenient)
    assert manifest["epochs_by_role"]["domain"] > 4 and manifest["warnings"]
    assert max(d["epoch"] for d in stream_documents(tmp_path / "lenient")) >= 5


# ---------------------------------------------------------------------------------------------
# Per-shard summaries, the decision and the writers against the single-process mix (STAGE_VERSION 2)
# ---------------------------------------------------------------------------------------------


def reference_stream(pool: list[int], role: list[str], tokens: list[int], schedule, budget: int, seed: int) -> list:
    """build_stream as STAGE_VERSION 2 had it (lists, one peek per role per step), on catalogue indices."""
    order = {r: [i for i in pool if role[i] == r] for r in ("domain", "general")}
    epoch, queue, cursor = {"domain": -1, "general": -1}, {"domain": [], "general": []}, {"domain": 0, "general": 0}

    def peek(r):
        if not order[r]:
            return None
        if cursor[r] == len(queue[r]):
            epoch[r] += 1
            queue[r] = list(order[r])
            random.Random(f"{seed}:{r}:{epoch[r]}").shuffle(queue[r])
            cursor[r] = 0
        return queue[r][cursor[r]]

    stream, total, deficit = [], 0, 0.0
    while total < budget:
        target = target_share(total / budget, schedule)
        domain, general = peek("domain"), peek("general")
        if general is None:
            r = "domain"
        elif domain is None:
            r = "general"
        else:
            after_domain = deficit - (1 - target) * tokens[domain]
            after_general = deficit + target * tokens[general]
            r = "domain" if abs(after_domain) <= abs(after_general) else "general"
        i = domain if r == "domain" else general
        deficit += target * tokens[i] - (tokens[i] if r == "domain" else 0)
        stream.append((i, r, epoch[r], tokens[i], target))
        cursor[r] += 1
        total += tokens[i]
    return stream


def reference_mix(upstream: Path, cfg) -> tuple[dict[str, bytes], dict]:
    """The single-process mix in memory, one Python object per document, tokens counted by the tokenizer
    itself: the bytes of every output file and the manifest fields the stage writes."""
    from cptflow.docshards import dumps_document
    from cptflow.models import load_tokenizer

    section = cfg.mix
    tokenizer = load_tokenizer(cfg.base_model)
    roles = {s.name: s.role for s in cfg.sources}
    entries = json.loads((upstream / "manifest.json").read_text(encoding="utf-8"))["shards"]
    docs, shard_of = [], []
    for k, entry in enumerate(entries):
        mine = read_jsonl(upstream / "shards" / f"{entry['shard']}.jsonl")
        docs += mine
        shard_of += [k] * len(mine)
    encoded = tokenizer([d["text"] for d in docs], add_special_tokens=True, split_special_tokens=True)["input_ids"]
    tokens = [len(ids) + 1 for ids in encoded]
    role = [roles[d["source"]] for d in docs]
    rank = lambda i: (hashlib.sha256(f"{cfg.seed}:{docs[i]['id']}".encode()).hexdigest(), docs[i]["id"])  # noqa: E731
    wanted = {"domain": section.domain_eval_documents, "general": section.general_eval_documents}
    held = {r: sorted((i for i in range(len(docs)) if role[i] == r), key=rank)[: wanted[r]] for r in wanted}
    held_set = set(held["domain"]) | set(held["general"])
    pool = sorted((i for i in range(len(docs)) if i not in held_set), key=lambda i: docs[i]["id"])
    pool_tokens, pool_documents = Counter(), Counter()
    for i in pool:
        pool_tokens[role[i]] += tokens[i]
        pool_documents[role[i]] += 1
    budget = mix.resolve_budget_tokens(section, pool_tokens["domain"])
    stream = reference_stream(pool, role, tokens, section.schedule, budget, cfg.seed)
    drawn = Counter()
    for _, r, _, n, _ in stream:
        drawn[r] += n
    epochs = {r: round(drawn[r] / pool_tokens[r], 4) if pool_tokens[r] else 0.0 for r in ("domain", "general")}
    used = {i for i, *_ in stream}
    line = lambda i, **extra: dumps_document(dict(docs[i], **extra)) + "\n"  # noqa: E731
    files = {
        f"eval/{name}.jsonl": "".join(line(i, role=r, tokens=tokens[i]) for i in held[r])
        for r, name in (("domain", "domain_eval"), ("general", "general_eval"))
    }
    unused = [i for i in range(len(docs)) if i not in held_set and i not in used]
    files["excluded/mix.jsonl"] = "".join(
        line(i, role=role[i], tokens=tokens[i], reason="unused_within_budget") for i in unused
    )
    shards, seen, size = [], set(), section.documents_per_shard
    for number, begin in enumerate(range(0, len(stream), size)):
        rows = stream[begin : begin + size]
        name = f"stream-{number:05d}"
        files[f"shards/{name}.jsonl"] = "".join(line(i, role=r, epoch=e, tokens=n) for i, r, e, n, _ in rows)
        new = {i for i, *_ in rows} - seen
        seen |= new
        stats = {
            "domain_tokens": sum(n for _, r, _, n, _ in rows if r == "domain"),
            "stream_documents": len(rows),
            "stream_tokens": sum(n for *_, n, _ in rows),
        }
        shards.append(
            {"shard": name, "source": "mix", "in": len(new), "kept": len(new), "excluded": {}, "stats": stats}
        )
    excluded = Counter()
    by_source: dict[str, Counter] = {}
    for i in range(len(docs)):
        reason = (
            ("held_out_domain_eval" if role[i] == "domain" else "held_out_general_eval")
            if i in held_set
            else (None if i in used else "unused_within_budget")
        )
        counts = by_source.setdefault(entries[shard_of[i]]["source"], Counter())
        counts["in"] += 1
        counts["kept"] += reason is None
        if reason:
            excluded[reason] += 1
            counts[reason] += 1
    shards[-1]["excluded"] = dict(sorted(excluded.items()))
    shards[-1]["in"] += sum(excluded.values())
    tokens_by_source, stream_documents = Counter(), Counter()
    for i, _, _, n, _ in stream:
        tokens_by_source[docs[i]["source"]] += n
        stream_documents[docs[i]["source"]] += 1
    windows = []
    for window, begin in enumerate(range(0, len(stream), section.window_documents)):
        rows = stream[begin : begin + section.window_documents]
        total = sum(n for *_, n, _ in rows)
        windows.append(
            {
                "window": window,
                "target": round(sum(t * n for *_, n, t in rows) / total, 4),
                "realised": round(sum(n for _, r, _, n, _ in rows if r == "domain") / total, 4),
                "documents": len(rows),
                "tokens": total,
            }
        )
    manifest = {
        "budget_tokens": budget,
        "stream_documents": len(stream),
        "stream_tokens": sum(n for *_, n, _ in stream),
        "counts": {"in": len(docs), "kept": len(used), "excluded": dict(sorted(excluded.items())), "rejected": {}},
        "counts_by_source": {
            source: {
                "in": c["in"],
                "kept": c["kept"],
                "excluded": {k: v for k, v in sorted(c.items()) if k not in ("in", "kept")},
                "rejected": {},
            }
            for source, c in sorted(by_source.items())
        },
        "shards": shards,
        "schedule": windows,
        "tokens_by_source": dict(sorted(tokens_by_source.items())),
        "sources": {
            name: {
                "role": roles[name],
                "stream_documents": stream_documents[name],
                "stream_tokens": tokens_by_source[name],
                "training_tokens": sum(tokens[i] for i in pool if docs[i]["source"] == name),
            }
            for name in sorted({d["source"] for d in docs})
        },
        "epochs_by_role": epochs,
        "eval": {
            name: {"documents": len(held[r]), "tokens": sum(tokens[i] for i in held[r]), "path": f"eval/{name}.jsonl"}
            for r, name in (("domain", "domain_eval"), ("general", "general_eval"))
        },
        "warnings": [
            mix.excess_epochs_message(r, epochs[r], section, pool_documents[r], pool_tokens[r])
            for r in ("domain", "general")
            if epochs[r] > section.max_epochs
        ],
    }
    return {path: text.encode("utf-8") for path, text in files.items()}, manifest


def manifest_fields(manifest: dict) -> dict:
    """What reference_mix knows of a manifest (no timings)."""
    picked = {key: manifest[key] for key in reference_fields()}
    picked["shards"] = [{k: v for k, v in s.items() if k not in ("seconds", "rejected")} for s in manifest["shards"]]
    return picked


def reference_fields() -> list[str]:
    return [
        "budget_tokens",
        "stream_documents",
        "stream_tokens",
        "counts",
        "counts_by_source",
        "shards",
        "schedule",
        "tokens_by_source",
        "sources",
        "epochs_by_role",
        "eval",
        "warnings",
    ]


def all_output_bytes(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and "_work" not in p.relative_to(directory).parts and p.name != "manifest.json"
    }


def without_timings(manifest: dict) -> dict:
    stripped = {k: v for k, v in manifest.items() if k not in ("timings", "fingerprint")}
    stripped["shards"] = [{k: v for k, v in s.items() if k != "seconds"} for s in manifest["shards"]]
    return stripped


@pytest.mark.parametrize(
    "fields",
    [
        {"documents_per_shard": 300},
        {"budget_tokens": 5000, "documents_per_shard": 4},
        {"budget_epochs": 6.0, "schedule": {"kind": "step", "start": 0.5, "steps": [[0.3, 0.8], [0.7, 0.2]]}},
        {"schedule": {"kind": "constant", "start": 1.0}, "window_documents": 37},
    ],
    ids=["default", "small-budget", "many-epochs-step", "domain-only"],
)
def test_per_shard_stage_matches_the_in_memory_reference(upstream, tiny_llama_dir, tmp_path, fields):
    cfg = stage_config(tiny_llama_dir, **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixEpochsWarning)  # compared below, as the manifest's `warnings`
        manifest = run_stage(tmp_path / "mix", upstream, cfg)
    files, expected = reference_mix(upstream, cfg)
    assert all_output_bytes(tmp_path / "mix") == files
    assert manifest_fields(manifest) == expected
    assert bool(manifest["warnings"]) == ("budget_epochs" in fields)


ODD_TEXTS = [
    "a literal </s> and <s> in web text",
    "Caf\u00e9 na\u00efve Cafe\u0301 \u65e5\u672c\u8a9e \U0001f600\U0001f44d\U0001f3fd",
    "  runs of   spaces\n\n\ttabs\r\nwindows  ",
    "",
    " ",
    "1234567890 3.14159 x**2 {'a': [1, 2]}",
]


def test_token_counts_are_the_tokenizers_with_and_without_the_fast_encoder(tiny_llama_dir, tmp_path, monkeypatch):
    from cptflow.models import load_tokenizer

    docs = synthetic_documents(seed=4)
    for k, text in enumerate(ODD_TEXTS * 30):
        docs.append({"id": f"odd-{k}", "source": "web", "text": f"{text} {k}", "meta": {}, "perplexity": 1.0})
    upstream = write_upstream(tmp_path / "up", docs, shards_per_source=3)
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    cfg = stage_config(tiny_llama_dir)
    assert mix.token_counter(cfg)[1] is not None  # the test tokenizer is byte-level BPE: the fast encoder counts

    def summarised(directory: Path, cfg) -> tuple[list[int], list[dict]]:
        run = stage_run(directory, upstream)
        counts = [mix.process(run, cfg, item) for item in mix.plan(run, cfg)]
        rows = [np.load(mix.summary_path(run.path, c.shard)) for c in counts]
        return [int(t) for part in rows for t in part["tokens"]], [c.as_dict() for c in counts]

    texts = [
        d["text"]
        for item in mix.upstream_shards(stage_run(tmp_path, upstream))
        for d in read_jsonl(upstream / "shards" / f"{item['shard']}.jsonl")
    ]
    expected = [len(tokenizer(t, add_special_tokens=True, split_special_tokens=True)["input_ids"]) + 1 for t in texts]
    fast, counts = summarised(tmp_path / "fast", cfg)
    assert fast == expected and not any(c["stats"].get("encoder_fallbacks") for c in counts)
    summary = np.load(mix.summary_path(tmp_path / "fast", counts[0]["shard"]))
    assert summary.dtype.itemsize == 43 and len(summary) == counts[0]["in"]  # 43 bytes per document
    assert (tmp_path / "fast" / "_work" / f"{counts[0]['shard']}.summary.npy").stat().st_size < 43 * len(summary) + 512

    # tokenize.encoder: huggingface, and a fast encoder that disagrees (each shard counted again): same counts.
    hf_cfg = types.SimpleNamespace(**vars(cfg), tokenize=types.SimpleNamespace(encoder="huggingface"))
    assert mix.token_counter(hf_cfg)[1] is None
    assert summarised(tmp_path / "hf", hf_cfg)[0] == expected
    monkeypatch.setattr(fast_bpe, "differing_documents", lambda tokens, lengths, expected, indices: [indices[0]])
    disagreeing, counts = summarised(tmp_path / "fallback", cfg)
    assert disagreeing == expected and all(c["stats"]["encoder_fallbacks"] == 1 for c in counts)


def test_rank_prefix_ties_are_ordered_by_the_full_rank():
    ids = [f"doc-{i % 40}" if i % 7 == 0 else f"doc-{i}" for i in range(300)]  # duplicate ids too
    full = [(mix.held_out_rank(doc_id, 3), doc_id) for doc_id in ids]
    coarse = np.asarray([int(rank[:1], 16) for rank, _ in full], dtype=np.uint64)  # 16 values: ties everywhere
    asked = []

    def full_keys(positions):
        asked.extend(positions)
        return [full[p] for p in positions]

    for count in (0, 1, 5, 19, 20, 299, 300, 400):
        assert mix.smallest_ranks(coarse, count, full_keys).tolist() == choose_held_out(ids, count, seed=3)
    assert asked  # ties were resolved by the full keys
    exact = np.asarray([int(rank[:16], 16) for rank, _ in full], dtype=np.uint64)
    assert mix.smallest_ranks(exact, 25, full_keys).tolist() == choose_held_out(ids, 25, seed=3)


def test_array_stream_builder_is_the_list_builder():
    pool = synthetic_pool(domain=700, general=900, seed=5)
    for kind, schedule in SCHEDULES.items():
        budget = 2 * sum(d.tokens for d in pool)
        role = [d.role for d in pool]
        tokens = [d.tokens for d in pool]
        by_id = sorted(range(len(pool)), key=lambda i: pool[i].id)
        expected = reference_stream(by_id, role, tokens, schedule, budget, seed=2)
        got = build_stream(pool, schedule, budget, seed=2)
        assert [tuple(e) for e in got] == expected, kind


@pytest.fixture(scope="module")
def upstream6(docs, tmp_path_factory) -> Path:
    return write_upstream(tmp_path_factory.mktemp("up6"), docs, shards_per_source=3)


def test_threads_runner_and_plain_give_the_same_bytes(prefect_harness, upstream6, upstream, tiny_llama_dir, tmp_path):
    from prefect.task_runners import ThreadPoolTaskRunner

    from cptflow.config import PipelineConfig
    from cptflow.flows.pipeline import data_stage
    from cptflow.plan import run_data_stage_plain
    from cptflow.tasks.clean import SourceConfig

    cfg = PipelineConfig(
        name="mix-threads",
        base_model=str(tiny_llama_dir),
        sources=[
            SourceConfig(name="papers", role="domain", paths=["x"]),
            SourceConfig(name="web", role="general", paths=["y"]),
        ],
        mix=MixConfig(domain_eval_documents=20, general_eval_documents=25, documents_per_shard=90, budget_epochs=1.5),
    )
    plain = stage_run(tmp_path / "plain", upstream6, "mix-plain")
    assert run_data_stage_plain(plain, cfg) == "ran"
    threads = stage_run(tmp_path / "threads", upstream6, "mix-threads")
    data_stage.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))("mix", threads, cfg)
    assert all_output_bytes(threads.path) == all_output_bytes(plain.path)
    plain_manifest = json.loads((plain.path / "manifest.json").read_text())
    threads_manifest = json.loads((threads.path / "manifest.json").read_text())
    assert without_timings(threads_manifest) == without_timings(plain_manifest)
    assert len(plain_manifest["shards"]) >= 4
    files, expected = reference_mix(upstream6, cfg)
    assert all_output_bytes(plain.path) == files and manifest_fields(plain_manifest) == expected
    # Two shards per source instead of three: the same eval sets and the same stream, byte for byte.
    two = run_stage(tmp_path / "two", upstream, cfg)
    assert [s["shard"] for s in two["shards"]] == [s["shard"] for s in plain_manifest["shards"]]
    for name, data in all_output_bytes(tmp_path / "two").items():
        if name != "excluded/mix.jsonl":  # the unused documents, in upstream order
            assert data == files[name], name


KILL_WHILE_WRITING = textwrap.dedent(
    """
    import json, os, signal, sys, types
    from cptflow.plan import StageRun, run_data_stage_plain
    from cptflow.tasks import mix
    from cptflow.tasks.clean import SourceConfig

    args = json.loads(sys.argv[1])
    cfg = types.SimpleNamespace(
        mix=mix.MixConfig.model_validate(args["mix"]),
        sources=[SourceConfig(**source) for source in args["sources"]],
        seed=0, base_model=args["base_model"], trust_remote_code=False,
    )
    run = StageRun(stage="mix", fingerprint="f", directory=args["directory"], upstream_directory=args["upstream"],
                   payload={})

    # SIGKILL halfway through the second stream shard, its file half written.
    class DyingWriter(mix.JsonlWriter):
        def write(self, record):
            if self.path.name == "stream-00001.jsonl" and self.count == 40:
                self.handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            super().write(record)
    mix.JsonlWriter = DyingWriter
    run_data_stage_plain(run, cfg)
    """
)


def test_killed_while_writing_the_stream_resumes_and_ends_byte_identical(upstream, tiny_llama_dir, tmp_path):
    from cptflow.plan import run_data_stage_plain

    fields = {"domain_eval_documents": 20, "general_eval_documents": 25, "documents_per_shard": 100}
    cfg = stage_config(tiny_llama_dir, documents_per_shard=100)
    reference = run_stage(tmp_path / "reference", upstream, cfg)
    killed = tmp_path / "killed"
    args = {
        "mix": fields,
        "sources": [{"name": s.name, "role": s.role, "paths": s.paths} for s in cfg.sources],
        "base_model": str(tiny_llama_dir),
        "directory": str(killed),
        "upstream": str(upstream),
    }
    result = subprocess.run(
        [sys.executable, "-P", "-c", KILL_WHILE_WRITING, json.dumps(args)],
        cwd=Path(__file__).resolve().parents[1],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -9, result.stderr[-2000:]
    assert not (killed / "manifest.json").exists()
    assert len(list((killed / "_work").glob("*.done.json"))) == 4  # every upstream shard summarised
    assert (killed / "_work" / "decision" / "decision.json").is_file()
    published = sorted(p.stem for p in (killed / "_work" / "published").glob("*.json"))
    assert published == ["domain_eval", "excluded", "general_eval", "stream-00000"]
    assert list((killed / "shards").glob(".stream-00001.jsonl.tmp-*"))  # the half-written file
    first_shard = (killed / "shards" / "stream-00000.jsonl").stat()

    assert run_data_stage_plain(stage_run(killed, upstream), cfg) == "ran"
    assert (killed / "shards" / "stream-00000.jsonl").stat().st_mtime_ns == first_shard.st_mtime_ns  # not redone
    assert all_output_bytes(killed) == all_output_bytes(tmp_path / "reference")
    resumed = json.loads((killed / "manifest.json").read_text())
    assert without_timings(resumed) == without_timings(
        json.loads((tmp_path / "reference" / "manifest.json").read_text())
    )
    assert without_timings(resumed)["counts"] == reference["counts"]


def test_a_decision_cut_short_is_made_again(upstream, tiny_llama_dir, tmp_path, monkeypatch):
    cfg = stage_config(tiny_llama_dir, budget_tokens=8000, documents_per_shard=50)
    reference = run_stage(tmp_path / "reference", upstream, cfg)
    original = mix.atomic_write_json

    def dying(path, value):
        if path.name == "decision.json":
            raise KeyboardInterrupt("killed before the decision file")
        original(path, value)

    monkeypatch.setattr(mix, "atomic_write_json", dying)
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path / "mix", upstream, cfg)
    assert (tmp_path / "mix" / "_work" / "decision" / "stream.npy").is_file()
    monkeypatch.setattr(mix, "atomic_write_json", original)
    again = run_stage(tmp_path / "mix", upstream, cfg)
    assert all_output_bytes(tmp_path / "mix") == all_output_bytes(tmp_path / "reference")
    assert without_timings(again) == without_timings(reference)


def test_tokenize_packs_exactly_the_tokens_mix_counted(committed, tiny_llama_dir, tmp_path):
    from cptflow.tasks import tokenize
    from cptflow.tasks.tokenize import TokenizeConfig

    directory, manifest, _ = committed
    cfg = types.SimpleNamespace(
        base_model=str(tiny_llama_dir), trust_remote_code=False, seed=0, tokenize=TokenizeConfig(seq_len=64)
    )
    run = stage_run(tmp_path / "tokenize", directory)
    counts = [tokenize.process(run, cfg, item) for item in tokenize.plan(run, cfg)]
    packed = tokenize.commit(run, cfg, counts, started=0.0)
    assert packed["packing"]["tokens"] == manifest["stream_tokens"]
    assert [c.stats["tokens"] for c in counts] == [s["tokens"] for s in manifest["stream_shards"]]
    assert packed["stats"]["domain_tokens"] == manifest["stats"]["domain_tokens"]
