"""Tests for the perplexity stage's scoring core: batched vs one-at-a-time scores, keep rules, config."""

from __future__ import annotations

import json
import math
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import everyday_english_docs  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from test_flow import corpus  # noqa: E402,F401  (the flow tests' sample corpus fixture)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from cptflow.tasks.perplexity import (  # noqa: E402
    REASON_ABOVE_BAND,
    REASON_ABOVE_MAX,
    REASON_BELOW_BAND,
    REASON_UNSCORABLE,
    PerplexityConfig,
    band_thresholds,
    keep_reason,
    score_texts,
    score_texts_naive,
)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A ~300-token byte-level BPE that prepends BOS and appends nothing, like builtin:tiny-llama."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(everyday_english_docs(200), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _tiny_llama(vocab_size: int, seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def random_llama(bpe_tokenizer):
    return _tiny_llama(len(bpe_tokenizer))


@pytest.fixture(scope="module")
def fitted_llama(bpe_tokenizer):
    """The tiny Llama after ~60 Adam steps on everyday-English docs: enough to prefer real word order."""
    model = _tiny_llama(len(bpe_tokenizer), seed=1)
    ids = bpe_tokenizer(everyday_english_docs(64, seed=3), truncation=True, max_length=64)["input_ids"]
    batch = torch.tensor([row for row in ids if len(row) == 64])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(60):
        rows = batch[(step * 8) % len(batch) :][:8]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _mixed_length_texts() -> list[str]:
    docs = everyday_english_docs(12, seed=7)
    return [
        docs[0],
        "",  # BOS only: one token, unscorable
        docs[1] * 6,  # far beyond max_length: truncated
        "Hi",
        docs[2][:40],
        " ".join(docs[3:9]),  # beyond max_length too
        docs[9],
        "The",
    ]


def _assert_scores_close(batched, naive, rel=1e-4):
    assert len(batched) == len(naive)
    for got, want in zip(batched, naive):
        assert got.tokens == want.tokens
        if math.isnan(want.perplexity):
            assert math.isnan(got.perplexity)
        else:
            assert got.perplexity == pytest.approx(want.perplexity, rel=rel)


def test_batched_scores_match_one_document_at_a_time(random_llama, bpe_tokenizer):
    texts = _mixed_length_texts()
    batched = score_texts(texts, random_llama, bpe_tokenizer, max_length=96, batch_tokens=256)
    naive = score_texts_naive(texts, random_llama, bpe_tokenizer, max_length=96)
    _assert_scores_close(batched, naive)
    lengths = [s.tokens for s in batched]
    assert lengths[2] == 95 and lengths[5] == 95  # truncated to max_length, minus the first token
    assert lengths[1] == 0 and math.isnan(batched[1].perplexity)
    assert keep_reason(batched[1].perplexity, None, None, PerplexityConfig(max_perplexity=1e9)) == (REASON_UNSCORABLE)


def test_input_order_is_preserved_whatever_the_batching(random_llama, bpe_tokenizer):
    texts = _mixed_length_texts()
    reference = score_texts(texts, random_llama, bpe_tokenizer, max_length=96, batch_tokens=4096)
    rng = random.Random(0)
    permutation = list(range(len(texts)))
    rng.shuffle(permutation)
    shuffled = score_texts(
        [texts[i] for i in permutation], random_llama, bpe_tokenizer, max_length=96, batch_tokens=300
    )
    _assert_scores_close(shuffled, [reference[i] for i in permutation])


def test_budget_smaller_than_one_document_scores_it_alone(random_llama, bpe_tokenizer):
    texts = _mixed_length_texts()
    tiny_budget = score_texts(texts, random_llama, bpe_tokenizer, max_length=96, batch_tokens=8)
    naive = score_texts_naive(texts, random_llama, bpe_tokenizer, max_length=96)
    _assert_scores_close(tiny_budget, naive)


def test_empty_input_gives_empty_scores(random_llama, bpe_tokenizer):
    assert score_texts([], random_llama, bpe_tokenizer, max_length=32, batch_tokens=64) == []


def test_bfloat16_model_scores_close_to_float32(random_llama, bpe_tokenizer):
    texts = everyday_english_docs(6, seed=11)
    fp32 = score_texts(texts, random_llama, bpe_tokenizer, max_length=64, batch_tokens=256)
    bf16_model = _tiny_llama(len(bpe_tokenizer)).to(torch.bfloat16)
    bf16 = score_texts(texts, bf16_model, bpe_tokenizer, max_length=64, batch_tokens=256)
    for low, high in zip(bf16, fp32):
        assert low.perplexity == pytest.approx(high.perplexity, rel=0.05)


def test_fitted_model_finds_real_text_less_perplexing_than_shuffled_words(fitted_llama, bpe_tokenizer):
    real = everyday_english_docs(16, seed=99)
    rng = random.Random(5)
    shuffled = []
    for text in real:
        words = text.split()
        rng.shuffle(words)
        shuffled.append(" ".join(words))
    scores = score_texts(real + shuffled, fitted_llama, bpe_tokenizer, max_length=128, batch_tokens=2048)
    real_ppl = [s.perplexity for s in scores[:16]]
    shuffled_ppl = [s.perplexity for s in scores[16:]]
    assert all(r < s for r, s in zip(real_ppl, shuffled_ppl))  # each text beats its own shuffle
    assert sum(real_ppl) / 16 < 0.5 * sum(shuffled_ppl) / 16


def test_scoring_through_cptflow_models_loaders(tiny_llama_dir):
    """The real builtin layout (saved model + BOS-adding tokenizer) scores identically both ways."""
    cptflow_models = pytest.importorskip("cptflow.models")
    model = cptflow_models.load_causal_lm(str(tiny_llama_dir), device="cpu", dtype="float32")
    tokenizer = cptflow_models.load_tokenizer(str(tiny_llama_dir))
    texts = _mixed_length_texts()
    _assert_scores_close(
        score_texts(texts, model, tokenizer, max_length=64, batch_tokens=256),
        score_texts_naive(texts, model, tokenizer, max_length=64),
    )


# --- keep rules -------------------------------------------------------------------------------

PERPLEXITIES = [float(p) for p in range(1, 101)]  # 1..100: percentile p is 1 + 0.99 p


def test_no_rule_keeps_everything_even_unscorable():
    cfg = PerplexityConfig()
    assert band_thresholds(PERPLEXITIES, cfg) == (None, None)
    assert keep_reason(1e6, None, None, cfg) is None
    assert keep_reason(math.nan, None, None, cfg) is None


def test_max_perplexity_drops_above_and_keeps_the_limit_itself():
    cfg = PerplexityConfig(max_perplexity=50.0)
    assert keep_reason(50.0, None, None, cfg) is None
    assert keep_reason(50.01, None, None, cfg) == REASON_ABOVE_MAX
    assert keep_reason(math.nan, None, None, cfg) == REASON_UNSCORABLE


def test_band_0_90_drops_only_the_most_perplexing_tenth():
    cfg = PerplexityConfig(keep_band=(0, 90))
    low, high = band_thresholds(PERPLEXITIES, cfg)
    assert low is None and high == pytest.approx(90.1)
    reasons = [keep_reason(p, low, high, cfg) for p in PERPLEXITIES]
    assert reasons.count(None) == 90
    assert set(reasons[90:]) == {REASON_ABOVE_BAND}


def test_band_10_100_drops_only_the_least_perplexing_tenth():
    cfg = PerplexityConfig(keep_band=(10, 100))
    low, high = band_thresholds(PERPLEXITIES, cfg)
    assert low == pytest.approx(10.9) and high is None
    reasons = [keep_reason(p, low, high, cfg) for p in PERPLEXITIES]
    assert reasons.count(None) == 90
    assert set(reasons[:10]) == {REASON_BELOW_BAND}


def test_band_ignores_unscorable_documents_and_drops_them():
    cfg = PerplexityConfig(keep_band=(0, 90))
    with_nans = PERPLEXITIES + [math.nan] * 50
    assert band_thresholds(with_nans, cfg) == band_thresholds(PERPLEXITIES, cfg)
    low, high = band_thresholds(with_nans, cfg)
    assert keep_reason(math.nan, low, high, cfg) == REASON_UNSCORABLE
    assert band_thresholds([math.nan, math.nan], cfg) == (None, None)


def test_max_and_band_combine_and_the_absolute_limit_reports_first():
    cfg = PerplexityConfig(max_perplexity=80.0, keep_band=(20, 90))
    low, high = band_thresholds(PERPLEXITIES, cfg)
    assert keep_reason(95.0, low, high, cfg) == REASON_ABOVE_MAX
    assert keep_reason(85.0, low, high, cfg) == REASON_ABOVE_MAX
    assert keep_reason(5.0, low, high, cfg) == REASON_BELOW_BAND
    assert keep_reason(50.0, low, high, cfg) is None


def test_band_thresholds_are_deterministic_and_order_independent():
    cfg = PerplexityConfig(keep_band=(30, 60))
    shuffled = PERPLEXITIES[:]
    random.Random(1).shuffle(shuffled)
    assert band_thresholds(shuffled, cfg) == band_thresholds(PERPLEXITIES, cfg)


def test_apply_to_limits_which_sources_are_filtered():
    assert PerplexityConfig().applies_to("web")
    cfg = PerplexityConfig(apply_to=["web"])
    assert cfg.applies_to("web") and not cfg.applies_to("domain")


# --- config validation ----------------------------------------------------------------------


@pytest.mark.parametrize("band", [(-1, 50), (50, 50), (60, 40), (0, 101)])
def test_config_rejects_band_out_of_range(band):
    with pytest.raises(ValidationError, match="keep_band"):
        PerplexityConfig(keep_band=band)


@pytest.mark.parametrize("field", [{"max_length": 0}, {"batch_tokens": 0}, {"max_perplexity": -1.0}, {"device": "tpu"}])
def test_config_rejects_non_positive_sizes_and_unknown_choices(field):
    with pytest.raises(ValidationError):
        PerplexityConfig(**field)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValidationError, match="max_ppl"):
        PerplexityConfig.model_validate({"max_ppl": 100})


def test_config_defaults_work():
    cfg = PerplexityConfig()
    assert (cfg.max_length, cfg.batch_tokens, cfg.device, cfg.dtype) == (512, "auto", "auto", "auto")
    assert PerplexityConfig.model_validate({"keep_band": [0, 90]}).keep_band == (0.0, 90.0)


def test_the_unigram_scorer_counts_general_text_once_and_ranks_typical_vocabulary_first(
    corpus,  # noqa: F811
    tiny_llama_dir,
    tmp_path,
):
    """The cheap scorer on the flow tests' sample corpus: general documents score lower than a shuffle of
    rare tokens, every document gets a finite score, and the stage's outputs are the same on a rerun."""
    from test_flow import write_config

    from cptflow.config import load_config
    from cptflow.plan import plan_pipeline, run_data_stage_plain
    from cptflow.store import read_manifest
    from cptflow.tasks.perplexity import count_reference_tokens, unigram_scores

    settings = {"scorer": "unigram", "keep_band": [0, 90], "unigram_reference_documents": 50}
    cfg = load_config(write_config(tmp_path, corpus, tiny_llama_dir, perplexity=settings))
    runs = plan_pipeline(cfg)
    for stage in ("clean", "quality", "perplexity"):
        run_data_stage_plain(runs[stage], cfg)
    manifest = read_manifest(runs["perplexity"].path)
    assert manifest["counts"]["excluded"]["perplexity_above_band"] >= 1
    scores = [
        json.loads(line)["perplexity"]
        for path in sorted((runs["perplexity"].path / "shards").glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
    ]
    assert scores and all(s is not None and s > 1 for s in scores)

    count_reference_tokens(
        runs["perplexity"], cfg, [{"shard": s["shard"], "source": s["source"]} for s in manifest["shards"]]
    )  # noqa: E501
    typical, odd = unigram_scores(
        ["The city library reopened on Monday and the children were happy.", "zq xj vvq kkp zzxq jjq"],
        runs["perplexity"].path,
        cfg,
    )
    assert typical.perplexity < odd.perplexity

    again_cfg = load_config(write_config(tmp_path / "again", corpus, tiny_llama_dir, perplexity=settings))
    again = plan_pipeline(again_cfg)
    for stage in ("clean", "quality", "perplexity"):
        run_data_stage_plain(again[stage], again_cfg)
    outputs = lambda m: {e["path"]: e["sha256"] for e in m["outputs"]}  # noqa: E731
    assert outputs(read_manifest(again["perplexity"].path)) == outputs(manifest)
