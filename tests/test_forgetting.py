"""Guards against forgetting on a tiny real Llama: EWC (the penalty added once per optimizer step, the
Fisher estimated once on general training blocks and loaded on resume, weights held near theta*) and
sft's replay of cpt's training stream (mixed per micro-batch, plain LM labels, resumable, accounted)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_flow import corpus  # noqa: F401  (the flow tests' corpus fixture)
from test_training import CPT_SETTINGS, prepared, random_batch, tiny_config, weights_of, work_copy  # noqa: F401

from cptflow.config import load_config
from cptflow.plan import plan_pipeline
from cptflow.training import (
    EWC_FILE,
    IGNORE_INDEX,
    EwcPenalty,
    LmBlockStream,
    MicroBatches,
    add_adapters,
    blocks_of_source,
    build_param_groups,
    collate,
    load_base_model,
    token_shard_paths,
    train_step,
)

EWC = {"ewc_weight": 1.0e6, "ewc_fisher_batches": 4}
# Long enough for the drift to show: Adam moves every weight about one LR per step, so near theta* it
# oscillates within a step or two of it while unheld weights walk on; a constant LR keeps walking.
CPT = {"max_steps": 16, "eval_steps": 8, "save_steps": 8, "lr_scheduler": "constant", "warmup_ratio": 0.0}
SFT = {"max_steps": 4, "eval_steps": 2, "save_steps": 2, "log_steps": 1, "micro_batch_size": 4, "max_length": 96}
REPLAY = {"replay": {"share": 0.5, "source": "general"}}


def variant(config: Path, directory: Path, *, cpt: dict | None = None, sft: dict | None = None) -> Path:
    """The prepared pipeline's config with cpt / sft settings changed, its work_dir kept."""
    data = yaml.safe_load(config.read_text())
    data["cpt"] = {**data["cpt"], **(cpt or {})}
    data["sft"] = {**data["sft"], **(sft or {})}
    data["work_dir"] = str(load_config(config).work_path)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_stage(stage: str, config: Path, work: Path, **kwargs):
    import cptflow.tasks.cpt as cpt
    import cptflow.tasks.sft as sft

    cfg = load_config(config, work)
    run = plan_pipeline(cfg)[stage]
    return {"cpt": cpt, "sft": sft}[stage].run(run, cfg, **kwargs), run


def resumed_after_stop(stage: str, config: Path, work: Path, stop_after: int) -> tuple[dict, Path, int]:
    """Stops `stage` after `stop_after` steps (the checkpoint before is kept, the steps after it lost, as a
    kill would leave them), reruns it, and returns (manifest, run path, ewc file mtime before the rerun)."""
    stopped, run = run_stage(stage, config, work, stop_after_steps=stop_after)
    assert stopped is None and not (run.path / "manifest.json").exists()
    mtime = (run.path / "checkpoints" / EWC_FILE).stat().st_mtime_ns
    manifest, _ = run_stage(stage, config, work)
    return manifest, run.path, mtime


def assert_same_run(resumed: dict, resumed_dir: Path, reference: dict, reference_dir: Path) -> None:
    ref, res = weights_of(reference_dir / "adapter"), weights_of(resumed_dir / "adapter")
    assert ref.keys() == res.keys()
    for key in ref:
        assert torch.equal(ref[key], res[key]), key
    assert resumed["evals"] == reference["evals"]
    # every output file the same bytes: the adapter, the history (ewc term included) and ewc.safetensors
    outputs = lambda m: {e["path"]: e["sha256"] for e in m["outputs"]}  # noqa: E731
    assert outputs(resumed) == outputs(reference)


def ewc_tensors(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "checkpoints" / EWC_FILE))
    fisher = {k.removeprefix("fisher."): v for k, v in saved.items() if k.startswith("fisher.")}
    anchor = {k.removeprefix("anchor."): v for k, v in saved.items() if k.startswith("anchor.")}
    return fisher, anchor


def adapter_key(parameter_name: str) -> str:
    """A trainable parameter's name as PEFT's adapter file spells it."""
    return parameter_name.replace(".modules_to_save.default", "").replace(".default", "")


# ---------------------------------------------------------------------------------------------
# The penalty inside one optimizer step
# ---------------------------------------------------------------------------------------------


def test_the_ewc_penalty_is_added_once_per_step_whatever_the_accumulation(tiny_llama_dir):
    """Two micro-batches step like one batch with EWC on, and the penalty's part of the step is exactly
    -lr * 2 * weight * F * (theta - theta*): counted once, not once per micro-batch."""
    weight, fisher_value, offset = 0.5, 2.0, 0.01
    tcfg = tiny_config(
        load_in_4bit=False, optimizer="adamw", max_grad_norm=None, learning_rate=1.0, embedding_learning_rate=1.0
    )
    batch = random_batch(300, rows=4, length=24, valid=[24, 20, 6, 3])
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]

    def one_step(micro_batches, with_ewc: bool):
        torch.manual_seed(0)
        model = add_adapters(load_base_model(str(tiny_llama_dir), tcfg), tcfg)
        optimizer = torch.optim.SGD(build_param_groups(model, tcfg), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        named = [(n, p) for g in optimizer.param_groups for n, p in zip(g["param_names"], g["params"])]
        ewc = EwcPenalty(
            weight,
            [n for n, _ in named],
            [p for _, p in named],
            [torch.full_like(p, fisher_value) for _, p in named],
            [p.detach().clone() - offset for _, p in named],  # theta - theta* = offset everywhere
        )
        before = {n: p.detach().clone() for n, p in named}
        record = train_step(model, optimizer, scheduler, micro_batches, tcfg, ewc=ewc if with_ewc else None)
        return {n: p.detach() - before[n] for n, p in named}, record

    whole, record = one_step([batch], True)
    accumulated, _ = one_step(halves, True)
    plain, plain_record = one_step([batch], False)
    numel = sum(d.numel() for d in whole.values())
    assert record["ewc"] == pytest.approx(weight * fisher_value * offset**2 * numel, rel=1e-4)
    assert plain_record["ewc"] == 0.0 and record["loss"] == pytest.approx(plain_record["loss"])
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-6)
        expected = torch.full_like(whole[name], -2 * weight * fisher_value * offset)
        torch.testing.assert_close(whole[name] - plain[name], expected, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# cpt: the Fisher, the weights held near theta*, resume
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpt_runs(prepared, tmp_path_factory):  # noqa: F811
    """cpt without EWC, with EWC, and with EWC stopped after step 11 then resumed (its step-8 checkpoint kept)."""
    root = tmp_path_factory.mktemp("forgetting-cpt")
    without_ewc = variant(prepared, root / "plain-config", cpt=CPT)
    with_ewc = variant(prepared, root / "ewc-config", cpt={**CPT, **EWC})
    plain, plain_run = run_stage("cpt", without_ewc, work_copy(prepared, root / "plain"))
    reference, reference_run = run_stage("cpt", with_ewc, work_copy(prepared, root / "ewc"))
    resumed, resumed_dir, mtime = resumed_after_stop("cpt", with_ewc, work_copy(prepared, root / "resumed"), 11)
    return {
        "plain": (plain, plain_run.path),
        "plain_work": (without_ewc, root / "plain"),
        "ewc": (reference, reference_run.path),
        "resumed": (resumed, resumed_dir, mtime),
    }


def test_the_fisher_is_estimated_on_general_training_blocks_nonnegative_and_nonzero(cpt_runs, tiny_llama_dir):
    manifest, run_dir = cpt_runs["ewc"]
    fisher, anchor = ewc_tensors(run_dir)
    assert fisher.keys() == anchor.keys() and fisher
    assert all((f >= 0).all() for f in fisher.values())
    assert all(f.abs().sum() > 0 for k, f in fisher.items() if "lora_B" in k or "modules_to_save" in k)
    # theta* is where cpt started: LoRA B at zero, the embedding copies equal to the base model's
    from safetensors.torch import load_file

    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    assert all(not a.any() for k, a in anchor.items() if "lora_B" in k)
    embed = [k for k in anchor if "embed_tokens.modules_to_save" in k]
    assert embed and torch.equal(anchor[embed[0]], base["model.embed_tokens.weight"].float())
    info = manifest["ewc"]
    assert info["estimated_this_run"] and info["batches"] == 4 and info["blocks"] == 16 and info["tokens"] > 0
    assert info["bytes"] == 2 * 4 * info["parameters"] and info["parameters"] == manifest["parameters"]["trainable"]
    assert info["seconds"] >= 0 and info["fisher_max"] > 0
    history = (run_dir / "train_log.jsonl").read_text()
    assert '"ewc": ' in history and '"ewc": ' not in (cpt_runs["plain"][1] / "train_log.jsonl").read_text()
    assert "ewc" not in cpt_runs["plain"][0]  # off: nothing in the manifest, no file
    assert not (cpt_runs["plain"][1] / "checkpoints" / EWC_FILE).exists()


def test_ewc_holds_embeddings_and_lora_deltas_near_where_cpt_started(cpt_runs, tiny_llama_dir):
    from safetensors.torch import load_file

    base = load_file(str(tiny_llama_dir / "model.safetensors"))

    def drifts(run_dir: Path) -> dict[str, float]:
        weights = weights_of(run_dir / "adapter")
        embedding = sum(
            float((weights[key].float() - base[key.removeprefix("base_model.model.")].float()).norm())
            for key in weights
            if "lora_" not in key
        )
        lora = 0.0
        for key in weights:
            if "lora_A" in key:
                b = weights[key.replace("lora_A", "lora_B")]
                lora += float((b.float() @ weights[key].float()).norm())  # the delta B A added to the weight
        return {"embeddings": embedding, "lora": lora}

    plain, held = drifts(cpt_runs["plain"][1]), drifts(cpt_runs["ewc"][1])
    assert plain["embeddings"] > 0 and plain["lora"] > 0
    # Measured: about 0.2 (embeddings) and 0.35 (LoRA). Not lower: where F is 0 (the embedding rows of
    # tokens the general blocks lack, LoRA A while B is still 0) nothing holds the weights, by design.
    assert held["embeddings"] < 0.5 * plain["embeddings"], (held, plain)
    assert held["lora"] < 0.5 * plain["lora"], (held, plain)

    # What EWC minimises, sum F (theta - theta*)^2, falls by orders of magnitude (measured: ~1e-3 x).
    fisher, anchor = ewc_tensors(cpt_runs["ewc"][1])

    def penalty(run_dir: Path) -> float:
        weights = weights_of(run_dir / "adapter")
        return sum(float((fisher[n] * (weights[adapter_key(n)].float() - anchor[n]).square()).sum()) for n in fisher)

    assert penalty(cpt_runs["ewc"][1]) < 0.05 * penalty(cpt_runs["plain"][1])


def test_killed_cpt_with_ewc_resumes_identically_and_loads_the_saved_estimate(cpt_runs):
    reference, reference_dir = cpt_runs["ewc"]
    resumed, resumed_dir, mtime_before = cpt_runs["resumed"]
    assert resumed["train"]["resumed_from"] == "step-00000008"
    assert not resumed["ewc"]["estimated_this_run"]  # loaded, not estimated again
    assert (resumed_dir / "checkpoints" / EWC_FILE).stat().st_mtime_ns == mtime_before
    assert {k: v for k, v in resumed["ewc"].items() if k not in ("seconds", "estimated_this_run")} == {
        k: v for k, v in reference["ewc"].items() if k not in ("seconds", "estimated_this_run")
    }
    assert_same_run(resumed, resumed_dir, reference, reference_dir)


# ---------------------------------------------------------------------------------------------
# sft: replay of cpt's stream, EWC towards the cpt adapter
# ---------------------------------------------------------------------------------------------


def test_replay_fills_each_micro_batch_with_lm_blocks_and_resumes_at_the_same_block(prepared):  # noqa: F811
    from cptflow.tasks.sft import ReplayMix, SftDataset
    from cptflow.token_reader import TokenShardDataset

    runs = plan_pipeline(load_config(prepared))
    stream = TokenShardDataset(token_shard_paths(runs["tokenize"].path))
    valid, domain = stream.block_tokens()
    general = blocks_of_source(stream, "general")
    assert len(general) and (domain[general] == 0).all()
    assert (domain[blocks_of_source(stream, "domain")] == valid[blocks_of_source(stream, "domain")]).all()
    assert len(blocks_of_source(stream, "both")) == len(valid)
    examples = [{"input_ids": [1, 5 + i, 6, 7, 2], "labels": [IGNORE_INDEX, IGNORE_INDEX, 6, 7, 2]} for i in range(10)]

    def batches(state=None):
        mix = ReplayMix(SftDataset(examples, seed=3), LmBlockStream(stream, general, seed=3), 4, 1)
        data = MicroBatches(mix, 4, "cpu", collate=collate)
        if state is not None:
            data.load_state_dict(state)
        return data, mix

    data, mix = batches()
    first = [next(data) for _ in range(3)]  # 9 of the 10 examples; the next 3 batches cross into epoch 2
    for batch in first:
        sft_rows, replay_row = batch["labels"][:3], batch["labels"][3]
        assert (sft_rows[:, :2] == IGNORE_INDEX).all()  # the prompt is masked in instruction examples
        kept = replay_row != IGNORE_INDEX
        assert kept.sum() > 1 and torch.equal(replay_row[kept], batch["input_ids"][3][kept])  # LM on every token
    state = data.state_dict()
    assert state["replay"]["used"]["examples"] == 3 and state["replay"]["used"]["domain_tokens"] == 0
    later = [next(data) for _ in range(3)]
    resumed, _ = batches(state)
    for expected in later:
        got = next(resumed)
        assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.fixture(scope="module")
def sft_runs(cpt_runs, prepared, tmp_path_factory):  # noqa: F811
    """sft with replay + EWC on cpt_runs' plain cpt, and the same stopped after step 3 then resumed."""
    root = tmp_path_factory.mktemp("forgetting-sft")
    cpt_config, done = cpt_runs["plain_work"]

    def work(name: str) -> Path:
        shutil.copytree(done, root / name)
        return root / name

    config = variant(prepared, root / "guarded-config", cpt=CPT, sft={**SFT, **REPLAY, **EWC})
    guarded, guarded_run = run_stage("sft", config, work("guarded"))
    resumed, resumed_dir, mtime = resumed_after_stop("sft", config, work("resumed"), 3)
    return {
        "config": config,
        "cpt": cpt_runs["plain"][1],
        "guarded": (guarded, guarded_run.path),
        "resumed": (resumed, resumed_dir, mtime),
    }


def test_sft_replay_is_accounted_apart_from_the_instruction_examples(sft_runs):
    from cptflow.models import load_tokenizer
    from cptflow.tasks.sft import chat_template_for, load_examples

    guarded, _ = sft_runs["guarded"]
    replay = guarded["replay"]
    assert replay["rows_per_micro_batch"] == 2 and replay["source"] == "general"
    assert replay["examples"] == guarded["train"]["steps"] * 2  # 2 of the 4 rows of every micro-batch
    assert replay["tokens"] > 0 and replay["domain_tokens"] == 0 and replay["general_tokens"] == replay["tokens"]
    # the instruction data is counted as without replay: every line, and the examples are the same
    cfg = load_config(sft_runs["config"])
    tokenizer = load_tokenizer(str(sft_runs["cpt"] / "adapter"))
    _, _, counts = load_examples(cfg, tokenizer, chat_template_for(tokenizer, cfg.sft)[0])
    assert guarded["data"] == counts and guarded["train"]["examples"] == counts["train"]
    # the replayed blocks are trained on too: every token but each block's last has a next-token label
    assert guarded["train"]["tokens"] > replay["tokens"] - replay["examples"]


def test_sft_ewc_anchors_at_the_cpt_adapter_and_resumes_identically_with_replay(sft_runs):
    guarded, guarded_dir = sft_runs["guarded"]
    resumed, resumed_dir, mtime_before = sft_runs["resumed"]
    fisher, anchor = ewc_tensors(guarded_dir)
    cpt_weights = weights_of(sft_runs["cpt"] / "adapter")
    assert anchor and all(torch.equal(anchor[name], cpt_weights[adapter_key(name)].float()) for name in anchor)
    assert all("lora_" in name for name in anchor)  # sft trains LoRA only: embeddings are frozen, no penalty
    assert all(f.abs().sum() > 0 for f in fisher.values())  # cpt's B is nonzero, so A has gradient too
    assert resumed["train"]["resumed_from"] == "step-00000002" and not resumed["ewc"]["estimated_this_run"]
    assert (resumed_dir / "checkpoints" / EWC_FILE).stat().st_mtime_ns == mtime_before
    assert resumed["replay"] == guarded["replay"]  # the replay position and its counts survived the stop
    assert_same_run(resumed, resumed_dir, guarded, guarded_dir)


def test_replay_that_rounds_to_no_row_or_every_row_is_refused():
    from pydantic import ValidationError

    from cptflow.tasks.sft import SftConfig

    assert SftConfig(micro_batch_size=8, replay={"share": 0.25}).replay_rows() == 2
    for share in (0.05, 0.97):
        with pytest.raises(ValidationError, match="replayed rows; it must be 1 to 7"):
            SftConfig(micro_batch_size=8, replay={"share": share})
