"""The Prefect flow on real sample data: run, rerun (all cached), change one stage, kill and resume."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cptflow.config import load_config
from cptflow.plan import DATA_STAGES, PIPELINE_STAGES, plan_pipeline, stage_status
from cptflow.store import read_manifest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "raw"


def head_lines(path: Path, n: int) -> list[bytes]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        return [line for _, line in zip(range(n), handle)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A slice of the committed sample corpora, dirt included (HTML, duplicates, PII, malformed lines)."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "domain").mkdir()
    (root / "general").mkdir()
    (root / "domain" / "abstracts.jsonl").write_bytes(b"".join(head_lines(DATA / "domain" / "abstracts.jsonl", 160)))
    with gzip.open(root / "general" / "web-000.jsonl.gz", "wb") as handle:
        handle.write(b"".join(head_lines(DATA / "general" / "web-000.jsonl.gz", 200)))
    (root / "general" / "web-002-dirty.jsonl").write_bytes((DATA / "general" / "web-002-dirty.jsonl").read_bytes())
    return root


def write_config(directory: Path, corpus: Path, model: Path, **overrides) -> Path:
    config = {
        "name": "flow-test",
        "work_dir": "work",
        "base_model": str(model),
        "sources": [
            {"name": "domain", "role": "domain", "paths": [str(corpus / "domain")], "documents_per_shard": 50},
            {
                "name": "general",
                "role": "general",
                "paths": [str(corpus / "general")],
                "text_field": "content",
                "id_field": "doc_id",
                "documents_per_shard": 60,
            },
        ],
        "perplexity": {"keep_band": [0, 95], "batch_tokens": 4096},
        "mix": {"domain_eval_documents": 10, "general_eval_documents": 10, "window_documents": 50},
        "tokenize": {"seq_len": 64, "blocks_per_shard": 64},
        # A few steps each: these tests are about orchestration, tests/test_training.py about learning.
        "cpt": {
            "lora": {"r": 4, "alpha": 8},
            "learning_rate": 1e-3,
            "embedding_learning_rate": 2.5e-4,
            "micro_batch_size": 4,
            "max_steps": 4,
            "eval_steps": 2,
            "save_steps": 2,
        },
        "sft": {
            "data": [{"path": str(REPO / "data" / "instructions" / "alpaca.jsonl")}],
            "max_length": 96,
            "micro_batch_size": 4,
            "max_steps": 3,
            "eval_steps": 3,
            "save_steps": 3,
        },
        "evaluate": {"prompts": ["What is a half-life?"], "max_new_tokens": 8},
        # In the flow's process: saves a torchrun start (~10 s) per training stage. The launcher path is
        # tested end to end by tests/test_ops.py (served retry and cancel) and tests/test_training.py (DDP).
        "launch": {"launcher": "inline"},
    }
    config.update(overrides)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def outputs(manifest: dict) -> dict[str, str]:
    return {entry["path"]: entry["sha256"] for entry in manifest["outputs"]}


def file_times(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def latest_pipeline_run():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        flow_filter = FlowFilter(name={"any_": ["cptflow-pipeline"]})
        (latest,) = client.read_flow_runs(flow_filter=flow_filter, sort=FlowRunSort.START_TIME_DESC, limit=1)
        return latest


def latest_pipeline_run_graph() -> dict:
    """The run graph of the latest cptflow-pipeline run, as the UI gets it (/flow_runs/{id}/graph-v2)."""
    from prefect.client.orchestration import get_client

    latest = latest_pipeline_run()
    with get_client(sync_client=True) as client:
        response = client._client.get(f"/flow_runs/{latest.id}/graph-v2")
        response.raise_for_status()
        return response.json()


def assert_graph_is_the_chain(graph: dict) -> None:
    """Eight stage nodes; each one's only parent is the stage before it, so the UI draws the DAG."""
    nodes = {node_id: node for node_id, node in graph["nodes"]}
    by_stage = {}
    for node_id, node in nodes.items():
        stage = node["label"].split(" / ")[-1]  # a subflow: "<flow> / <run name>"; a task: its run name
        if stage in PIPELINE_STAGES:
            by_stage[stage] = node_id
    assert list(by_stage) and set(by_stage) == set(PIPELINE_STAGES), [n["label"] for n in nodes.values()]
    for previous, stage in zip(PIPELINE_STAGES, PIPELINE_STAGES[1:]):
        parents = {edge["id"] for edge in nodes[by_stage[stage]]["parents"]}  # one edge per argument holding it
        assert parents == {by_stage[previous]}, (stage, [nodes[p]["label"] for p in parents if p in nodes])
    assert nodes[by_stage["clean"]]["parents"] == []
    # Artifacts are published once per stage (the progress bar updates in place): a few markers each,
    # not one per eval and checkpoint.
    for stage in ("cpt", "sft"):
        keys = sorted(a["key"] for a in nodes[by_stage[stage]]["artifacts"])
        assert keys == sorted(
            f"{stage}-{name}" for name in ("progress", "param-groups", "eval", "memory", "best-checkpoint")
        ), keys


def assert_run_page_cards(flow_run_id, stages) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    with get_client(sync_client=True) as client:
        keys = [a.key for a in client.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))]
    assert {f"{stage}-counts" for stage in stages} | {"mix-schedule", "pipeline-summary"} <= set(keys), keys
    assert len(keys) == len(set(keys)), sorted(keys)  # one card per kind


def test_run_rerun_change_and_force(prefect_harness, corpus, tiny_llama_dir, tmp_path):
    from cptflow.flows.pipeline import run_pipeline

    config = write_config(tmp_path, corpus, tiny_llama_dir)
    reports = run_pipeline(config)
    assert [(r["stage"], r["state"]) for r in reports] == [(s, "ran") for s in PIPELINE_STAGES]

    assert_graph_is_the_chain(latest_pipeline_run_graph())
    latest = latest_pipeline_run()
    assert_run_page_cards(
        latest.id, PIPELINE_STAGES[:5]
    )  # named and tagged for the runs list, not Prefect's random two words
    assert re.fullmatch(r"flow-test-\d{8}-\d{6}", latest.name), latest.name
    assert {"cptflow", "flow-test", *PIPELINE_STAGES} <= set(latest.tags)

    manifests = {r["stage"]: read_manifest(Path(r["directory"])) for r in reports}
    assert all(manifests[r["stage"]]["fingerprint"] == Path(r["directory"]).name for r in reports)
    for stage in DATA_STAGES:
        counts = manifests[stage]["counts"]
        assert counts["in"] == counts["kept"] + sum(counts["excluded"].values()) + sum(counts["rejected"].values()), (
            stage
        )
    # documents flow from one stage to the next, none lost on the way
    assert manifests["quality"]["counts"]["in"] == manifests["clean"]["counts"]["kept"]
    assert manifests["perplexity"]["counts"]["in"] == manifests["quality"]["counts"]["kept"]
    clean_counts = manifests["clean"]["counts"]
    assert clean_counts["rejected"]["malformed_json"] >= 1 and clean_counts["excluded"].get("exact_duplicate", 0) >= 1
    assert manifests["quality"]["counts"]["excluded"].get("language_not_allowed", 0) >= 1
    assert manifests["perplexity"]["counts"]["excluded"].get("perplexity_above_band", 0) >= 1
    assert manifests["mix"]["counts"]["in"] == manifests["perplexity"]["counts"]["kept"]
    assert manifests["tokenize"]["counts"]["in"] == manifests["mix"]["stats"]["stream_documents"]
    assert manifests["mix"]["counts"]["excluded"]["held_out_domain_eval"] == 10
    # training stages chain: sft continues from cpt's adapter, evaluate compares all three
    assert manifests["cpt"]["train"]["steps"] == 4 and manifests["sft"]["train"]["steps"] == 3
    assert manifests["sft"]["continued_from"] == str(Path(reports[5]["directory"]) / "adapter")
    assert set(manifests["evaluate"]["perplexity"]) == {"base", "cpt", "sft"}
    for stage in ("cpt", "sft"):  # evaluate measures the models each stage ended with, on the same tokens
        measured = manifests["evaluate"]["perplexity"][stage]
        own = manifests[stage]["eval"]
        assert (measured["domain"], measured["general"]) == (
            own["domain_eval"]["perplexity"],
            own["general_eval"]["perplexity"],
        ), stage
    assert (Path(reports[7]["directory"]) / "export" / "merged" / "model.safetensors").is_file()

    work = tmp_path / "work"
    before = file_times(work)
    rerun = run_pipeline(config)
    assert [r["state"] for r in rerun] == ["cached"] * len(PIPELINE_STAGES)
    assert file_times(work) == before  # no stage work: nothing written, nothing touched
    # The run page tells the story even when every stage is cached: each data stage's tables sit on the
    # pipeline run itself (not only on the stage's subflow), one card per kind.
    assert_run_page_cards(latest_pipeline_run().id, DATA_STAGES)

    status = {row["stage"]: row["state"] for row in stage_status(load_config(config))}
    assert status == {s: "done" for s in PIPELINE_STAGES}

    # Gates judge what evaluate measured: a breached limit fails the run without recomputing anything
    # (limits are not in the fingerprint), names the gate, the value and the limit, and status shows it.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter

    from cptflow.gates import GateBreach

    measured = manifests["evaluate"]["forgetting"][1]["sft_change_pct"]  # general, sft vs base
    evaluate_settings = {"prompts": ["What is a half-life?"], "max_new_tokens": 8}

    def gated(on_breach: str, limit: float) -> Path:
        limits = [{"eval_set": "general", "model": "sft", "baseline": "base", "max_increase_pct": limit}]
        return write_config(
            tmp_path / f"gated-{on_breach}",
            corpus,
            tiny_llama_dir,
            work_dir=str(work),
            evaluate={**evaluate_settings, "gates": {"on_breach": on_breach, "limits": limits}},
        )

    with pytest.raises(GateBreach, match=r"evaluate: gate breached: general perplexity of sft vs base .* \(limit"):
        run_pipeline(gated("fail", measured - 1))
    assert file_times(work) == before
    rows = {row["stage"]: row for row in stage_status(load_config(gated("fail", measured - 1)))}
    assert rows["evaluate"]["state"] == "done" and rows["evaluate"]["gates"].startswith("FAILED: general perplexity")
    from typer.testing import CliRunner

    from cptflow.cli import app

    shown = CliRunner().invoke(app, ["status", str(gated("fail", measured - 1))])
    assert shown.exit_code == 0 and "evaluate gates: FAILED: general perplexity of sft vs base" in shown.stdout
    with get_client(sync_client=True) as client:
        failure = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key={"any_": ["pipeline-failure"]})
        )
    card = failure[0].data
    assert "failed in stage 'evaluate'" in card and f"(limit {measured - 1:+.1f}%)" in card
    assert "re-judges without recomputing" in card and "after changing the limit" in card
    reported = run_pipeline(gated("report", measured - 1))  # report-only: a warning, and the run passes
    assert [r["state"] for r in reported] == ["cached"] * len(PIPELINE_STAGES)
    run_pipeline(gated("fail", measured + 1))  # within the limit
    assert file_times(work) == before

    # --from recomputes a stage and everything after it; a training stage retrains (same config: same weights).
    from_sft = run_pipeline(config, from_stage="sft")
    assert [r["state"] for r in from_sft] == ["done"] * 5 + ["done", "ran", "ran"]  # earlier ones not looked at
    assert outputs(read_manifest(Path(from_sft[6]["directory"]))) == outputs(manifests["sft"])

    # Changing quality's config re-runs quality and what follows; clean stays cached.
    changed = write_config(tmp_path, corpus, tiny_llama_dir, quality={"gopher_quality": {"min_words": 60}})
    assert {row["stage"]: row["state"] for row in stage_status(load_config(changed))} == {
        "clean": "done",
        **{stage: "stale" for stage in PIPELINE_STAGES[1:]},
    }
    after_change = run_pipeline(changed, only=list(DATA_STAGES))
    assert [r["state"] for r in after_change] == ["cached", "ran", "ran", "ran", "ran", "not run", "not run", "not run"]
    assert after_change[1]["fingerprint"] != reports[1]["fingerprint"]

    # --force recomputes a stage in place and produces the same bytes.
    forced = run_pipeline(changed, force=["clean"], only=list(DATA_STAGES))
    assert [r["state"] for r in forced] == ["ran", "cached", "cached", "cached", "cached"] + ["not run"] * 3
    assert outputs(read_manifest(Path(forced[0]["directory"]))) == outputs(manifests["clean"])

    with get_client(sync_client=True) as client:
        keys = {artifact.key for artifact in client.read_artifacts()}
    assert {f"{s}-counts" for s in DATA_STAGES} | {"pipeline-summary", "mix-schedule", "perplexity-thresholds"} <= keys
    assert {"cpt-progress", "cpt-eval", "cpt-param-groups", "cpt-best-checkpoint", "cpt-memory", "sft-eval"} <= keys
    assert {"evaluate-forgetting", "evaluate-generations", "evaluate-export"} <= keys


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from cptflow.config import load_config
    from cptflow.plan import plan_pipeline, run_data_stage_plain
    import cptflow.docshards as docshards
    import cptflow.tasks.quality as quality

    cfg = load_config(sys.argv[1], sys.argv[2])
    runs = plan_pipeline(cfg)
    run_data_stage_plain(runs["clean"], cfg)

    # SIGKILL in the middle of the quality stage's third shard, with its files half written.
    original = quality.read_documents
    shards_started = 0
    def dying_reader(path):
        global shards_started
        shards_started += 1
        for index, doc in enumerate(original(path)):
            if shards_started == 3 and index == 10:
                os.kill(os.getpid(), signal.SIGKILL)
            yield doc
    quality.read_documents = dying_reader
    run_data_stage_plain(runs["quality"], cfg)
    """
)


KILL_IN_BAND_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from cptflow.config import load_config
    from cptflow.plan import plan_pipeline, run_data_stage_plain
    import cptflow.tasks.quality as quality

    cfg = load_config(sys.argv[1], sys.argv[2])
    runs = plan_pipeline(cfg)
    run_data_stage_plain(runs["clean"], cfg)

    # SIGKILL while the quality stage merges its LSH bands: band 06's pairs half written.
    original = quality.write_band_pairs
    def dying_write(path, pairs):
        if path.name.endswith("band-06.npy"):
            (path.parent / f".{path.name}.tmp-{os.getpid()}").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        original(path, pairs)
    quality.write_band_pairs = dying_write
    run_data_stage_plain(runs["quality"], cfg)
    """
)


# Killed in a shard: `make test`; killed in an LSH band merge: `make test-slow`.
# Both slow (`make test-slow`): tests/test_drills.py's quick drill kills data and training stages in `make test`.
@pytest.mark.parametrize(
    "kill_in", [pytest.param("shard", marks=pytest.mark.slow), pytest.param("band", marks=pytest.mark.slow)]
)
def test_killed_stage_resumes_and_ends_byte_identical(prefect_harness, corpus, tiny_llama_dir, tmp_path, kill_in):
    from cptflow.flows.pipeline import run_pipeline

    config = write_config(tmp_path, corpus, tiny_llama_dir)
    reference = run_pipeline(config, work_dir=str(tmp_path / "reference"), only=list(DATA_STAGES))

    killed_dir = tmp_path / "killed"
    script = KILL_SCRIPT if kill_in == "shard" else KILL_IN_BAND_SCRIPT
    result = subprocess.run(
        [sys.executable, "-P", "-c", script, str(config), str(killed_dir)],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -9, result.stderr[-2000:]
    runs = plan_pipeline(load_config(config, killed_dir))
    quality_dir = runs["quality"].path
    assert not (quality_dir / "manifest.json").exists()
    finished = sorted(p.name for p in (quality_dir / "_work").glob("*.done.json"))
    bands = sorted(p.name for p in (quality_dir / "_work").glob("near-duplicates-band-*.npy"))
    if kill_in == "shard":
        assert len(finished) == 2 and not bands  # two shards survived the kill; the third was half written
    else:  # every shard finished; bands 00-05 merged, 06 half written
        assert len(finished) == len(read_manifest(runs["clean"].path)["shards"])
        assert bands == [f"near-duplicates-band-{band:02d}.npy" for band in range(6)]
    assert list((quality_dir / "_work").glob(".*.tmp-*"))

    resumed = run_pipeline(config, work_dir=str(killed_dir), only=list(DATA_STAGES))
    assert [r["state"] for r in resumed] == ["cached", "ran", "ran", "ran", "ran"] + ["not run"] * 3
    for ref, res in zip(reference[:5], resumed[:5]):
        assert outputs(read_manifest(Path(res["directory"]))) == outputs(read_manifest(Path(ref["directory"])))


@pytest.mark.slow  # minutes on 2 cores: `make test-slow` (CI runs it)
def test_dask_runner_gives_the_same_bytes_as_threads(prefect_harness, corpus, tiny_llama_dir, tmp_path, monkeypatch):
    import distributed

    from cptflow.flows.pipeline import run_pipeline

    started = []

    class CountedCluster(distributed.LocalCluster):
        def __init__(self, *args, **kwargs):
            started.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(distributed, "LocalCluster", CountedCluster)
    threads = write_config(tmp_path / "threads", corpus, tiny_llama_dir)
    dask = write_config(tmp_path / "dask", corpus, tiny_llama_dir, runner={"kind": "dask", "dask_workers": 2})
    by_threads = run_pipeline(threads, only=["clean", "quality"])
    by_dask = run_pipeline(dask, only=["clean", "quality"])
    assert len(started) == 1  # one local cluster served both stages: workers start once per run
    for ref, res in zip(by_threads[:2], by_dask[:2]):
        assert res["state"] == "ran" and ref["fingerprint"] == res["fingerprint"]
        assert outputs(read_manifest(Path(res["directory"]))) == outputs(read_manifest(Path(ref["directory"])))


def test_the_run_form_offers_the_stages_to_pick():
    """only / from_stage / force are enums of the stages, in DAG order, in the flow's parameter schema."""
    from cptflow.flows.pipeline import cptflow_pipeline

    schema = json.dumps(cptflow_pipeline.parameters.model_dump())
    assert schema.count(json.dumps(list(PIPELINE_STAGES))) >= 1
    properties = cptflow_pipeline.parameters.model_dump()["properties"]
    assert set(properties) >= {"only", "from_stage", "force"}


def test_training_progress_shows_the_loss_curve():
    from cptflow.flows.pipeline import SPARKS, sparkline

    falling = sparkline([5.0 - 0.01 * i for i in range(400)], width=40)
    assert len(falling) == 40 and falling[0] == SPARKS[-1] and falling[-1] == SPARKS[0]
    assert list(falling) == sorted(falling, reverse=True)
    assert sparkline([]) == "" and set(sparkline([2.0] * 10)) == {SPARKS[0]}
