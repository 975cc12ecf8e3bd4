"""`builtin:tiny-llama`: a small Llama and byte-level BPE tokenizer built locally from the sample corpus.

Sits under every model-using stage (perplexity, cpt, sft, evaluate) via `cptflow.models`, so the
whole pipeline runs offline on a CPU with a base model whose perplexity means something.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Bump when the build procedure changes in a way that changes the produced files.
BUILDER_VERSION = "1"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# Order fixes the ids: <unk>=0, <s>=1, </s>=2, <pad>=3 (Llama's layout plus a real pad token).
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]

# Role-tagged turns; `</s>` closes each assistant turn so an SFT'd model learns to stop. The
# {% generation %} markers let `apply_chat_template(..., return_assistant_tokens_mask=True)` find the
# assistant tokens. The template renders BOS itself, so tokenize its output with
# add_special_tokens=False (apply_chat_template(tokenize=True) already does).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Everything that shapes the built model; all fields go into the cache fingerprint."""

    vocab_size: int = 4096
    """BPE vocabulary size in tokens, special tokens included."""
    tokenizer_min_frequency: int = 2
    """A merge must occur at least this many times in the corpus."""
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    """Fewer KV heads than query heads (GQA), so downstream code meets the real-model layout."""
    intermediate_size: int = 352
    """SwiGLU width, about 2.7x hidden_size as in Llama."""
    max_position_embeddings: int = 1024
    """Context length in tokens; also the tokenizer's model_max_length."""
    rope_theta: float = 10000.0
    block_size: int = 256
    """Training sequence length in tokens (documents packed, EOS between them)."""
    batch_size: int = 8
    """Blocks per optimizer step."""
    train_steps: int = 120
    learning_rate: float = 3e-3
    """Peak AdamW learning rate; high because the model is tiny."""
    min_learning_rate: float = 3e-4
    """Cosine schedule floor."""
    warmup_steps: int = 10
    weight_decay: float = 0.1
    """Applied to matrices only, not to norms."""
    grad_clip: float = 1.0
    val_blocks: int = 16
    """Held-out blocks (cut from the corpus end) whose loss is recorded in build_info.json."""
    torch_threads: int = 1
    """CPU threads while training. One: on a busy 2-core box two OpenMP threads thrash (measured
    0.7 s/step with 1 thread vs 3.7 s with 2), and a fixed count keeps the weights reproducible."""


# Seconds-long build for plumbing tests: same layout, barely trained.
TINY_TEST_SPEC = TinyLlamaSpec(
    vocab_size=300,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=86,
    max_position_embeddings=256,
    block_size=64,
    batch_size=4,
    train_steps=6,
    warmup_steps=2,
    val_blocks=2,
)


def iter_corpus_texts(corpus_files: Iterable[Path]) -> Iterator[str]:
    """Yield `content` of each JSON line; skip unparsable records, empty texts and HTML pages."""
    for path in corpus_files:
        path = Path(path)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                text = record.get("content") if isinstance(record, dict) else None
                if not isinstance(text, str) or not text.strip():
                    continue
                if text.lstrip().startswith("<"):
                    continue
                yield text


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_fingerprint(corpus_files: list[Path], spec: TinyLlamaSpec, seed: int) -> str:
    """sha256 over the builder version, every hyperparameter, the seed and the corpus contents."""
    payload = {
        "builder_version": BUILDER_VERSION,
        "spec": asdict(spec),
        "seed": seed,
        # Contents, in the given order (order feeds the data order), not names or mtimes.
        "corpus_sha256": [file_sha256(Path(p)) for p in corpus_files],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_tiny_llama(
    corpus_files: list[Path],
    cache_dir: Path,
    *,
    seed: int = 0,
    spec: TinyLlamaSpec | None = None,
) -> Path:
    """Return the directory of the tiny Llama built from `corpus_files`, building it if not cached.

    The directory is `cache_dir / tiny-llama-<fp[:16]>` and holds model and tokenizer in
    `save_pretrained` layout (safetensors) plus `build_info.json`. Safe to call from several
    processes at once: one builds, the others wait on a file lock and reuse the result.
    """
    spec = spec or TinyLlamaSpec()
    corpus_files = [Path(p) for p in corpus_files]
    if not corpus_files:
        raise ValueError("build_tiny_llama needs at least one corpus file")
    missing = [str(p) for p in corpus_files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"corpus files not found: {missing}")
    cache_dir = Path(cache_dir)
    fingerprint = build_fingerprint(corpus_files, spec, seed)
    out_dir = cache_dir / f"tiny-llama-{fingerprint[:16]}"
    if out_dir.is_dir():
        return out_dir

    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".lock-{fingerprint}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out_dir.is_dir():  # another process finished it while we waited
            return out_dir
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=cache_dir))
        try:
            _build_into(tmp_dir, corpus_files, spec, seed, fingerprint)
            os.replace(tmp_dir, out_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    return out_dir


def _build_into(out_dir: Path, corpus_files: list[Path], spec: TinyLlamaSpec, seed: int, fingerprint: str) -> None:
    import torch

    started = time.perf_counter()
    texts = list(iter_corpus_texts(corpus_files))
    if not texts:
        raise ValueError(f"no usable documents in {[str(p) for p in corpus_files]}")
    logger.info("tiny-llama %s: %d documents, training tokenizer", fingerprint[:16], len(texts))
    tokenizer = train_tokenizer(texts, spec)

    blocks = pack_blocks(tokenizer, texts, spec.block_size)
    n_val = min(spec.val_blocks, len(blocks) // 10)
    train_blocks, val_blocks = blocks[: len(blocks) - n_val], blocks[len(blocks) - n_val :]
    if len(train_blocks) == 0:
        raise ValueError(f"corpus too small for one {spec.block_size}-token block")

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(spec.torch_threads)
    try:
        # fork_rng: seeding must not leak into the caller's global RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _new_model(tokenizer, spec)
            val_loss = _pretrain(model, train_blocks, val_blocks, spec, seed)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    build_seconds = time.perf_counter() - started
    info = {
        "fingerprint": fingerprint,
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "spec": asdict(spec),
        "corpus_files": [str(p) for p in corpus_files],
        "documents": len(texts),
        "train_tokens": int(train_blocks.numel()),
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss) if val_loss is not None else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(build_seconds, 1),
    }
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info(
        "tiny-llama %s built in %.0fs (val ppl %s)",
        fingerprint[:16],
        build_seconds,
        f"{info['val_perplexity']:.1f}" if val_loss is not None else "n/a",
    )


def train_tokenizer(texts: list[str], spec: TinyLlamaSpec):
    """Byte-level BPE that prepends BOS (never appends EOS), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.tokenizer_min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = core.token_to_id(BOS)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=spec.max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
    )


def pack_blocks(tokenizer, texts: list[str], block_size: int):
    """Concatenate `<s> doc </s>` for every doc and cut into full blocks (the tail is dropped)."""
    import torch

    eos_id = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        stream.extend(ids)
        stream.append(eos_id)
    n_blocks = len(stream) // block_size
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def _new_model(tokenizer, spec: TinyLlamaSpec):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=torch.float32,
    )
    return LlamaForCausalLM(config)


def _pretrain(model, train_blocks, val_blocks, spec: TinyLlamaSpec, seed: int) -> float | None:
    """AdamW + linear warmup + cosine decay over `spec.train_steps`; returns held-out mean loss."""
    import torch
    from tqdm.auto import tqdm

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": spec.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=spec.learning_rate,
        betas=(0.9, 0.95),
    )
    floor = spec.min_learning_rate / spec.learning_rate

    def lr_factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, spec.train_steps - spec.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    bar = tqdm(range(spec.train_steps), desc="tiny-llama pretrain", unit="step", mininterval=5)
    for _ in bar:
        while len(order) < spec.batch_size:  # new epoch: fresh seeded permutation
            order = torch.cat([order, torch.randperm(len(train_blocks), generator=generator)])
        batch, order = train_blocks[order[: spec.batch_size]], order[spec.batch_size :]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    if len(val_blocks) == 0:
        return None
    with torch.no_grad():
        losses = [model(input_ids=b[None], labels=b[None]).loss.item() for b in val_blocks]
    return sum(losses) / len(losses)
