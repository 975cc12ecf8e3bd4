"""Tests for the mix stage: schedules, the error-feedback stream builder, held-out eval sets, epochs,
budgets, accounting and byte-identical outputs."""

from __future__ import annotations

import json
import random
import types
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

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


def run_stage(directory: Path, upstream: Path, cfg) -> dict:
    from cptflow.plan import StageRun

    run = StageRun(stage="mix", fingerprint="f", directory=str(directory), upstream_directory=str(upstream), payload={})
    counts = [mix.process(run, cfg, item) for item in mix.plan(run, cfg)]
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


def test_rerun_of_finished_work_item_is_a_no_op(upstream, tiny_llama_dir, tmp_path):
    from cptflow.plan import StageRun

    cfg = stage_config(tiny_llama_dir, budget_tokens=3000)
    run = StageRun(
        stage="mix", fingerprint="f", directory=str(tmp_path / "mix"), upstream_directory=str(upstream), payload={}
    )
    first = mix.process(run, cfg, {"shard": "mix", "source": "all"})
    assert first.balanced() and first.documents_in == 600
    assert mix.process(run, cfg, {"shard": "mix", "source": "all"}).as_dict() == first.as_dict()


def test_excess_epochs_in_the_stage(upstream, tiny_llama_dir, tmp_path):
    strict = stage_config(tiny_llama_dir, budget_epochs=6.0, on_excess_epochs="error")
    with pytest.raises(MixEpochsError, match="domain training data .* epochs, more than mix.max_epochs=4"):
        run_stage(tmp_path / "strict", upstream, strict)
    lenient = stage_config(tiny_llama_dir, budget_epochs=6.0)
    with pytest.warns(MixEpochsWarning, match="domain"):
        manifest = run_stage(tmp_path / "lenient", upstream, lenient)
    assert manifest["epochs_by_role"]["domain"] > 4 and manifest["warnings"]
    assert max(d["epoch"] for d in stream_documents(tmp_path / "lenient")) >= 5
