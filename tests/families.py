"""Tiny random-weight stand-ins of the model families cptflow claims to train, built locally (no downloads).

Each family gets its own architecture class and config quirks (tied embeddings, Gemma 2's soft-capped
logits, Phi-3's fused qkv_proj / gate_up_proj, GPT-2's Conv1D), and a tokenizer trained with `tokenizers`
on the sample corpus in data/ with the family's layout: byte-level BPE with the family's split regex
(Llama 3, Qwen, GPT-2, SmolLM2) or SentencePiece-style BPE with byte fallback (Mistral, Gemma, Phi-3),
the family's special tokens and ids, whether it prepends BOS, and the chat template published in the
family's tokenizer_config.json. Weights are random (seeded): these models are for plumbing, not quality.

`build_family(name, cache_dir)` returns a `save_pretrained` directory (safetensors + tokenizer),
building it once per cache directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from chat_templates_data import FAMILIES as PUBLISHED

from cptflow.tiny_model import iter_corpus_texts

REPO = Path(__file__).resolve().parents[1]
CORPUS = sorted((REPO / "data" / "raw" / "general").glob("web-*.jsonl.gz"))
VOCAB_SIZE = 1200  # trained BPE pieces plus the family's tokens: ~1-2k

# Split patterns from the families' tokenizer.json (pre_tokenizer Split, behavior Isolated).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ---------------------------------------------------------------------------------------------
# Chat templates: the published ones, as tests/chat_templates_data.py holds them (with their sources)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The families
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    content: str
    special: bool = True
    rstrip: bool = False


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # transformers config class
    model_class: str
    tokenizer_kind: str  # "byte-level" (split regex or GPT-2 ByteLevel) or "sentencepiece" (byte fallback)
    leading: tuple[str, ...]  # tokens with the lowest ids, in id order (before the trained pieces)
    trailing: tuple[Token, ...]  # tokens appended after the trained pieces, in id order
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None = None
    adds_bos: bool = False  # the tokenizer prepends BOS to every text
    split_pattern: str | None = None  # None: GPT-2's ByteLevel regex (byte-level) / no split (sentencepiece)
    nfc: bool = False
    prepend_space: bool = True  # sentencepiece: Llama/Mistral prepend "▁" to a text, Gemma does not
    chat_template: str | None = None
    tied: bool = False
    config: dict = field(default_factory=dict)
    fast_path: bool = True  # cptflow.fast_bpe converts the tokenizer exactly

    @property
    def kind_is_sentencepiece(self) -> bool:
        return self.tokenizer_kind == "sentencepiece"


SENTENCEPIECE_BYTES = tuple(f"<0x{byte:02X}>" for byte in range(256))
QWEN_ADDED = (
    Token("<|endoftext|>"),
    Token("<|im_start|>"),
    Token("<|im_end|>"),
    Token("<|object_ref_start|>"),
    Token("<|object_ref_end|>"),
    Token("<|box_start|>"),
    Token("<|box_end|>"),
    Token("<|quad_start|>"),
    Token("<|quad_end|>"),
    Token("<|vision_start|>"),
    Token("<|vision_end|>"),
    Token("<|vision_pad|>"),
    Token("<|image_pad|>"),
    Token("<|video_pad|>"),
    # Not special: matched as whole tokens in any text, even with split_special_tokens.
    Token("<tool_call>", special=False),
    Token("</tool_call>", special=False),
    Token("<|fim_prefix|>", special=False),
    Token("<|fim_middle|>", special=False),
    Token("<|fim_suffix|>", special=False),
    Token("<|fim_pad|>", special=False),
    Token("<|repo_name|>", special=False),
    Token("<|file_sep|>", special=False),
)
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "llama3",
            "LlamaConfig",
            "LlamaForCausalLM",
            "byte-level",
            leading=(),
            trailing=tuple(
                Token(t)
                for t in (
                    "<|begin_of_text|>",
                    "<|end_of_text|>",
                    "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>",
                    "<|start_header_id|>",
                    "<|end_header_id|>",
                    "<|reserved_special_token_2|>",
                    "<|eot_id|>",
                )
            ),
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            pad=None,  # Llama 3 defines no pad token
            adds_bos=True,
            split_pattern=LLAMA3_PATTERN,
            chat_template=PUBLISHED["llama3"].template,
            config=dict(SMALL, rope_theta=500000.0),
        ),
        Family(
            "smollm2",
            "LlamaConfig",
            "LlamaForCausalLM",
            "byte-level",
            leading=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>"),
            trailing=(),
            bos="<|im_start|>",
            eos="<|im_end|>",
            pad="<|im_end|>",
            unk="<|endoftext|>",
            chat_template=PUBLISHED["smollm2"].template,
            tied=True,
            config=dict(SMALL, num_key_value_heads=4),
        ),
        Family(
            "qwen2.5",
            "Qwen2Config",
            "Qwen2ForCausalLM",
            "byte-level",
            leading=(),
            trailing=QWEN_ADDED,
            bos=None,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            split_pattern=QWEN2_PATTERN,
            nfc=True,
            chat_template=PUBLISHED["qwen2.5"].template,
            tied=True,
            config=dict(SMALL),
        ),
        Family(
            "qwen3",
            "Qwen3Config",
            "Qwen3ForCausalLM",
            "byte-level",
            leading=(),
            trailing=QWEN_ADDED + (Token("<think>", special=False), Token("</think>", special=False)),
            bos=None,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            split_pattern=QWEN2_PATTERN,
            nfc=True,
            chat_template=PUBLISHED["qwen3"].template,
            tied=True,
            config=dict(SMALL, head_dim=16),
        ),
        Family(
            "mistral",
            "MistralConfig",
            "MistralForCausalLM",
            "sentencepiece",
            leading=("<unk>", "<s>", "</s>", "[INST]", "[/INST]") + SENTENCEPIECE_BYTES,
            trailing=(),
            bos="<s>",
            eos="</s>",
            pad=None,
            unk="<unk>",
            adds_bos=True,
            chat_template=PUBLISHED["mistral"].template,
            config=dict(SMALL, sliding_window=4096),
            fast_path=False,
        ),
        Family(
            "gemma2",
            "Gemma2Config",
            "Gemma2ForCausalLM",
            "sentencepiece",
            leading=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")
            + SENTENCEPIECE_BYTES,
            trailing=(),
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            unk="<unk>",
            adds_bos=True,
            prepend_space=False,
            chat_template=PUBLISHED["gemma2"].template,
            tied=True,
            config=dict(
                SMALL, head_dim=8, final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=8
            ),
            fast_path=False,
        ),
        Family(
            "gemma3",
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            "sentencepiece",
            leading=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")
            + SENTENCEPIECE_BYTES,
            trailing=(),
            bos="<bos>",
            eos="<eos>",
            pad="<pad>",
            unk="<unk>",
            adds_bos=True,
            prepend_space=False,
            chat_template=PUBLISHED["gemma3"].template,
            tied=True,
            config=dict(SMALL, head_dim=8, query_pre_attn_scalar=8, sliding_window=16),
            fast_path=False,
        ),
        Family(
            "phi3",
            "Phi3Config",
            "Phi3ForCausalLM",
            "sentencepiece",
            leading=("<unk>", "<s>", "</s>") + SENTENCEPIECE_BYTES,
            # Phi-3's chat tokens strip the whitespace after them (rstrip in its tokenizer.json).
            trailing=(
                Token("<|endoftext|>"),
                Token("<|assistant|>", rstrip=True),
                Token("<|placeholder1|>", rstrip=True),
                Token("<|placeholder2|>", rstrip=True),
                Token("<|end|>", rstrip=True),
                Token("<|system|>", rstrip=True),
                Token("<|user|>", rstrip=True),
            ),
            bos="<s>",
            eos="<|endoftext|>",
            pad="<|endoftext|>",
            unk="<unk>",
            adds_bos=True,
            chat_template=PUBLISHED["phi3"].template,
            config=dict(
                SMALL, num_key_value_heads=4, original_max_position_embeddings=512, max_position_embeddings=512
            ),
            fast_path=False,
        ),
        Family(
            "gpt2",
            "GPT2Config",
            "GPT2LMHeadModel",
            "byte-level",
            leading=(),
            trailing=(Token("<|endoftext|>"),),
            bos="<|endoftext|>",  # defined, but GPT-2's tokenizer adds nothing to a text
            eos="<|endoftext|>",
            pad=None,
            unk="<|endoftext|>",
            tied=True,
            config=dict(n_embd=32, n_layer=2, n_head=4, n_positions=512),
        ),
    ]
}


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def corpus_texts() -> list[str]:
    return list(iter_corpus_texts(CORPUS))


def build_tokenizer(family: Family, texts: list[str]):
    """The family's tokenizer layout, trained on `texts`, wrapped for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family.kind_is_sentencepiece:
        core = Tokenizer(models.BPE(unk_token=family.unk, byte_fallback=True, fuse_unk=True))
        scheme = "first" if family.prepend_space else "never"
        core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=True)
        core.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if family.prepend_space else [])
        )
        alphabet = []
    else:
        core = Tokenizer(models.BPE())
        if family.split_pattern:
            core.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(family.split_pattern), behavior="isolated", invert=False),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        else:
            core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    if family.nfc:
        core.normalizer = normalizers.NFC()
    options = dict(limit_alphabet=200) if family.kind_is_sentencepiece else {}  # rare characters: byte fallback
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(family.leading),
        initial_alphabet=alphabet,
        show_progress=False,
        **options,
    )
    core.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if family.kind_is_sentencepiece:
        core = _byte_tokens_as_vocabulary(core)
    # Added in id order (add_tokens / add_special_tokens append): specials and plain tokens interleave.
    core = _add_in_order(core, family.trailing)
    if family.adds_bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A",
            pair=f"{family.bos} $A {family.bos}:1 $B:1",
            special_tokens=[(family.bos, core.token_to_id(family.bos))],
        )
    elif not family.kind_is_sentencepiece:
        core.post_processor = processors.ByteLevel(trim_offsets=False)
    extra = [t for t in family.leading if t not in (family.bos, family.eos, family.pad, family.unk)]
    extra = [t for t in extra if t not in SENTENCEPIECE_BYTES]
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token=family.unk,
        additional_special_tokens=extra + [t.content for t in family.trailing if t.special],
        model_max_length=512,
        chat_template=family.chat_template,
        clean_up_tokenization_spaces=False,
    )


def _byte_tokens_as_vocabulary(core):
    """SentencePiece keeps <0x00>..<0xFF> as ordinary vocabulary entries (byte fallback looks them up),
    not as added tokens: move them out of the added tokens."""
    from tokenizers import Tokenizer

    spec = json.loads(core.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in SENTENCEPIECE_BYTES]
    return Tokenizer.from_str(json.dumps(spec))


def _add_in_order(core, tokens: tuple[Token, ...]):
    """Append `tokens` with consecutive ids in the given order (specials and plain ones mixed, as Qwen has them)."""
    from tokenizers import AddedToken

    for token in tokens:
        if core.token_to_id(token.content) is not None:
            continue
        added = AddedToken(token.content, special=token.special, rstrip=token.rstrip, normalized=False)
        if token.special:
            core.add_special_tokens([added])
        else:
            core.add_tokens([added])
    return core


def build_model(family: Family, tokenizer, seed: int = 0):
    import torch
    import transformers

    config_class = getattr(transformers, family.config_class)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = config_class(vocab_size=len(tokenizer), tie_word_embeddings=family.tied, **ids, **family.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, family.model_class)(config)
    return model


def build_family(name: str, cache_dir: Path, *, seed: int = 0) -> Path:
    """The stand-in of family `name` under `cache_dir`, built on first use (a file lock keeps it once)."""
    family = FAMILIES[name]
    cache_dir = Path(cache_dir)
    out_dir = cache_dir / f"{name}-{seed}"
    if out_dir.is_dir():
        return out_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".lock-{name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out_dir.is_dir():
            return out_dir
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=cache_dir))
        try:
            tokenizer = build_tokenizer(family, corpus_texts())
            build_model(family, tokenizer, seed).save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir
