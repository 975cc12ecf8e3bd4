"""sft stage: instruction tuning that continues from the cpt adapter and its trained embeddings.

Sits after `cpt` (... -> cpt -> **sft** -> evaluate). Reads Alpaca (instruction / input / output) or chat
(messages) JSONL, renders it with the tokenizer's chat template, and trains on answer tokens only. Against
forgetting, it can mix blocks of cpt's training stream (the tokenize stage's shards) into every micro-batch
(`replay`) and hold the weights near cpt's with EWC (`ewc_weight`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cptflow import distributed
from cptflow.models import load_tokenizer
from cptflow.stage import Artifact
from cptflow.store import (
    atomic_write_json,
    atomic_write_text,
    commit_manifest,
    file_fingerprint,
    now_iso,
    read_manifest,
)
from cptflow.token_reader import TokenShardDataset
from cptflow.token_shards import tokenizer_fingerprint
from cptflow.training import (
    IGNORE_INDEX,
    LmBlockStream,
    MicroBatches,
    TrainingConfig,
    TrainingReporter,
    best_checkpoint,
    blocks_of_source,
    build_optimizer,
    build_scheduler,
    collate,
    describe_param_groups,
    eval_blocks,
    evaluate_perplexity,
    fisher_batches,
    fit,
    memory_snapshot,
    prepare_model,
    save_adapter,
    set_seed,
    token_shard_paths,
    trainable_parameters,
    training_artifacts,
    training_gates,
    write_history,
)

logger = logging.getLogger(__name__)

METRIC = "sft_eval"  # best checkpoints: lowest perplexity of held-out answers
ROLES = ("system", "user", "assistant")

# Used when the tokenizer has no chat template and the config names none: role-tagged turns, EOS after
# each answer, {% generation %} marks the answers.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n\\n' }}"
    "{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)


class SftDataFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="JSONL file, relative to the config file")
    format: Literal["auto", "alpaca", "chat"] = Field(
        "auto", description="auto: `messages` -> chat, `instruction` -> alpaca"
    )


class SftReplay(BaseModel):
    """A share of each micro-batch taken from cpt's training stream (plain LM loss on every token), so
    instruction tuning keeps seeing the text cpt adapted to."""

    model_config = ConfigDict(extra="forbid")
    share: float = Field(
        0.0, ge=0, lt=1, description="Fraction of each micro-batch's rows that are replayed blocks, rounded to "
        "whole rows (0 = off); the rest are instruction examples, and the epochs count those",
    )  # fmt: skip
    source: Literal["general", "domain", "both"] = Field(
        "general", description="Blocks of general (replay) documents only, of domain documents only, or both: "
        "cpt's whole stream, blocks where the two meet included",
    )  # fmt: skip


class SftConfig(TrainingConfig):
    """Instruction tuning on top of the cpt adapter. Its own learning rates; embeddings frozen by default."""

    data: list[SftDataFile] = Field(default_factory=list, description="Instruction files (required to run sft)")
    max_length: int = Field(512, gt=8, description="Tokens per example; longer examples are truncated (counted)")
    chat_template: str | None = Field(None, description="Jinja chat template used when the tokenizer has none")
    system_message: Literal["merge", "drop", "error"] = Field(
        "merge", description="For a chat template without a system role (it raises, or leaves the system text out): "
        "merge folds the system text into the first user turn, drop leaves it out, error stops at the first such line",
    )  # fmt: skip
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Examples held out (by a hash of their content) for sft_eval"
    )
    learning_rate: float = 1e-4
    embedding_learning_rate: float = 1e-5
    train_embeddings: bool = Field(
        False, description="Keep cpt's embeddings frozen (default) or train them at embedding_learning_rate"
    )
    epochs: float = 2.0
    micro_batch_size: int = 8
    eval_steps: int = 20
    save_steps: int = 20
    replay: SftReplay = SftReplay()

    @model_validator(mode="after")
    def _replay_leaves_room_for_examples(self):
        rows = self.replay_rows()
        if self.replay.share > 0 and not 1 <= rows < self.micro_batch_size:
            raise ValueError(
                f"replay.share {self.replay.share} of micro_batch_size {self.micro_batch_size} rounds to {rows} "
                f"replayed rows; it must be 1 to {self.micro_batch_size - 1}"
            )
        return self

    def replay_rows(self) -> int:
        """Replayed blocks per micro-batch (the share, rounded half up to whole rows)."""
        return math.floor(self.replay.share * self.micro_batch_size + 0.5)


class SftDataError(ValueError):
    """An instruction file that cannot be read at all (missing, or no usable example)."""


class ConversationRejected(SftDataError):
    """One conversation the chat template cannot render, or whose answers are not in its rendering."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class SystemRoleUnsupported(SftDataError):
    """A system message, a template without a system role, and `system_message: error`."""


def sft_data_fingerprints(cfg) -> list[dict]:
    """Path, size and mtime (or sha256) of each instruction file, for the sft fingerprint."""
    out = []
    for item in cfg.sft.data:
        path = cfg.resolve(item.path)
        entry = (
            file_fingerprint(path, cfg.input_fingerprint) if path.is_file() else {"path": str(path), "missing": True}
        )
        out.append({**entry, "format": item.format})
    return out


# ---------------------------------------------------------------------------------------------
# Records -> chat messages -> token ids with answer-only labels
# ---------------------------------------------------------------------------------------------


def to_messages(record, fmt: str) -> tuple[list[dict] | None, str | None]:
    """(messages, None) or (None, reason) for one JSON record."""
    if not isinstance(record, dict):
        return None, "not_an_object"
    if fmt == "auto":
        fmt = "chat" if "messages" in record else "alpaca" if "instruction" in record else ""
        if not fmt:
            return None, "missing_field:messages_or_instruction"
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                return None, f"missing_field:{key}"
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            return None, "wrong_type:input"
        if not record["output"].strip():
            return None, "empty_answer"
        prompt = record["instruction"].strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"].strip()}]
        if isinstance(record.get("system"), str) and record["system"].strip():
            messages.insert(0, {"role": "system", "content": record["system"].strip()})
        return messages, None
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, "missing_field:messages"
    for message in messages:
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            return None, "bad_message"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return None, "no_assistant_turn"
    return messages, None


def _render(tokenizer, messages: list[dict], template: str | None, *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _without_system(messages: list[dict], mode: str) -> list[dict]:
    """merge: the system texts go in front of the first user turn ("system\n\nuser"); drop: they go."""
    rest = [m for m in messages if m["role"] != "system"]
    if mode == "drop":
        return rest
    system = "\n\n".join(m["content"].strip() for m in messages if m["role"] == "system" and m["content"].strip())
    if not system:
        return rest
    for index, message in enumerate(rest):
        if message["role"] == "user":
            merged = f"{system}\n\n{message['content']}" if message["content"].strip() else system
            return rest[:index] + [{**message, "content": merged}] + rest[index + 1 :]
    return [{"role": "user", "content": system}] + rest


def render_conversation(
    messages: list[dict], tokenizer, template: str | None, system_message: str = "merge"
) -> tuple[str, list[dict], str | None]:
    """(rendered text, the messages rendered, "merged" / "dropped" / None), rendered once.

    A template without a system role either raises on a system message (Gemma 2) or leaves its text out
    (Mistral v0.3 unless the user turn is last); then the system text is merged into the first user turn
    or dropped, as `system_message` says, or SystemRoleUnsupported is raised.
    """
    from jinja2 import TemplateError

    try:
        text, error = _render(tokenizer, messages, template, add_generation_prompt=False), None
    except TemplateError as err:
        text, error = None, err
    systems = [m["content"].strip() for m in messages if m["role"] == "system"]
    if not systems:
        if error is not None:
            raise ConversationRejected("template_error", str(error))
        return text, messages, None
    if error is None and all(s in text for s in systems):
        return text, messages, None
    mode = "drop" if system_message == "error" else system_message
    fallback = _without_system(messages, mode)
    try:
        text = _render(tokenizer, fallback, template, add_generation_prompt=False)
    except TemplateError as err:  # not (only) the system message: the template refuses the conversation
        raise ConversationRejected("template_error", str(error or err)) from err
    if system_message == "error":
        how = f"raises {error}" if error is not None else "leaves the system text out"
        raise SystemRoleUnsupported(
            f"the chat template has no system role (it {how}); set sft.system_message to merge or drop"
        )
    return text, fallback, "merged" if mode == "merge" else "dropped"


def _special_tokens(tokenizer) -> set[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {t.content for t in added.values() if getattr(t, "special", False)} | set(tokenizer.all_special_tokens)


def end_tokens(tokenizer, template: str | None) -> list[str]:
    """Special tokens that can close an answer: EOS and the tokenizer's other special tokens, less BOS / UNK
    and those the generation prompt opens a turn with (`<|im_start|>`, `<|start_header_id|>`, ...), longest
    first so `<|end_of_text|>` is not read as `<|end|>`."""
    opening = set()
    probe = [{"role": "user", "content": "x"}]
    try:
        plain = _render(tokenizer, probe, template, add_generation_prompt=False)
        prompt = _render(tokenizer, probe, template, add_generation_prompt=True)
        common = 0
        while common < min(len(plain), len(prompt)) and plain[common] == prompt[common]:
            common += 1
        opening = {t for t in _special_tokens(tokenizer) if t in prompt[common:]}
    except Exception:  # noqa: BLE001 - a template that cannot render the probe just has no known opening tokens
        pass
    candidates = _special_tokens(tokenizer) - opening - {tokenizer.bos_token, tokenizer.unk_token, None}
    if tokenizer.eos_token:
        candidates.add(tokenizer.eos_token)
    return sorted((t for t in candidates if t), key=len, reverse=True)


def _find_answer(text: str, content: str, cursor: int) -> tuple[int, int] | None:
    """(start, end) of one assistant content in the rendered text at or after `cursor`. A template may trim
    it, or split `<think>reasoning</think>answer` and keep only the answer (Qwen3, earlier turns) or
    re-render the reasoning (Qwen3, the last turn): then the span runs from that `<think>` to the answer."""
    body = content.strip()
    position = text.find(body, cursor)
    if position >= 0:
        return position, position + len(body)
    if "</think>" not in body:
        return None
    answer = body.split("</think>")[-1].strip()
    position = text.find(answer, cursor) if answer else -1
    if position < 0:
        return None
    start = position
    reasoning = body.split("</think>")[0].split("<think>")[-1].strip()
    found = text.rfind(reasoning, cursor, position) if reasoning else -1
    if found >= 0:
        opening = text.rfind("<think>", cursor, found)
        start = opening if opening >= 0 else found
    return start, position + len(answer)


def _content_spans(text: str, messages: list[dict]) -> list[tuple[int, int]]:
    """Each non-empty assistant content, found in order: the search for an answer starts after the user turn
    before it, so an answer quoted in a question is not taken for the answer. System messages are skipped
    (templates move them: Mistral into the last user turn, Gemma 3 into the first)."""
    spans, cursor = [], 0
    for message in messages:
        body = message["content"].strip()
        if message["role"] == "system" or not body:
            continue
        if message["role"] == "user":
            position = text.find(body, cursor)
            if position >= 0:
                cursor = position + len(body)
            continue
        span = _find_answer(text, message["content"], cursor)
        if span is None:
            raise ConversationRejected(
                "answer_not_in_rendering", f"the chat template's rendering does not contain the answer {body[:60]!r}"
            )
        spans.append(span)
        cursor = span[1]
    return spans


def _generation_spans(messages: list[dict], tokenizer, template: str, text: str) -> list[tuple[int, int]] | None:
    """Character spans of the template's {% generation %} blocks (its own assistant mask), or None."""
    out = tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        tokenizer_kwargs={"return_offsets_mapping": True},
    )
    offsets, mask = out["offset_mapping"], out["assistant_masks"]
    if len(offsets) != len(mask) or not any(mask):
        return None
    spans: list[tuple[int, int]] = []
    for index, ((start, end), masked) in enumerate(zip(offsets, mask)):
        if not masked:
            continue
        if index and mask[index - 1] and spans:  # the block goes on: one span per run of masked tokens
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return spans


def tokenize_conversation(
    messages: list[dict],
    tokenizer,
    template: str | None,
    max_length: int,
    system_message: str = "merge",
    terminators: list[str] | None = None,
) -> dict:
    """input_ids with labels on the assistant answers, each with exactly one end token, and -100 elsewhere.

    The conversation is rendered once. Answers are located by the template's own assistant mask when it has
    {% generation %} blocks, else by finding each assistant content in order in the rendering (templates
    that drop earlier reasoning, add BOS or wrap turns in [INST] included; no template is assumed to render
    a prefix of a conversation as a prefix of its rendering). An answer is trained with the template's own
    terminator right after it (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`, `<|end|>`); only when the
    template puts none there does it get EOS, once. Matching is on text, then token offsets, because BPE
    merges across a turn boundary make token-level prefixes unreliable; a token that straddles the start of
    an answer (" About" after "[/INST]") is trained. `terminators`: end_tokens(tokenizer, template), which
    a caller tokenizing many conversations computes once. Returns {"input_ids", "labels", "truncated", "system"}.
    """
    text, rendered, system = render_conversation(messages, tokenizer, template, system_message)
    source = template if template is not None else tokenizer.chat_template
    spans = None
    if source and GENERATION_BLOCK.search(source):
        spans = _generation_spans(rendered, tokenizer, source, text)
    if spans is None:
        spans = _content_spans(text, rendered)
    if terminators is None:
        terminators = end_tokens(tokenizer, template)
    eos = tokenizer.eos_token
    trained, shift = [], 0
    for start, end in spans:
        start, end = start + shift, end + shift
        closing = text[start:end].rstrip()
        if any(closing.endswith(t) for t in terminators):  # a generation block that holds its terminator
            trained.append((start, start + len(closing)))
            continue
        gap = len(text[end:]) - len(text[end:].lstrip())
        follower = next((t for t in terminators if text.startswith(t, end + gap)), None)
        if follower is not None:
            trained.append((start, end + gap + len(follower)))
        else:  # the template ends answers with no end token: EOS, once, so the model learns to stop
            text = text[:end] + eos + text[end:]
            shift += len(eos)
            trained.append((start, end + len(eos)))
    # The template renders BOS itself (as apply_chat_template(tokenize=True) assumes).
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for position, (start, end) in enumerate(encoded["offset_mapping"]):
        if end > start and any(start < e and end > s for s, e in trained):
            labels[position] = input_ids[position]
    truncated = len(input_ids) > max_length
    return {
        "input_ids": input_ids[:max_length],
        "labels": labels[:max_length],
        "truncated": truncated,
        "system": system,
    }


def held_out(messages: list[dict], fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{json.dumps(messages, sort_keys=True)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


REJECTS_LOGGED = 5  # rejected lines named one by one in the log; the rest are counted, all are in the file
REJECTS_FILE = "rejects.jsonl"


class Rejections:
    """Rejected lines of the instruction files: the first REJECTS_LOGGED in the log with file:line, every
    one in `rejects.jsonl` beside the manifest, and a count per reason (a bad file gives one summary, not a
    line per record)."""

    def __init__(self):
        self.by_reason: Counter = Counter()
        self.records: list[dict] = []

    def add(self, path: Path, line_number: int, reason: str, detail: str | None = None) -> None:
        self.by_reason[reason] += 1
        self.records.append({"file": path.name, "line": line_number, "reason": reason, "detail": detail})
        if len(self.records) <= REJECTS_LOGGED and distributed.is_main():
            logger.warning("%s:%d: rejected (%s)", path.name, line_number, detail or reason)

    def first(self) -> str:
        return ", ".join(f"{r['file']}:{r['line']} ({r['reason']})" for r in self.records[:REJECTS_LOGGED])

    def summary(self) -> str | None:
        if not self.records:
            return None
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.by_reason.items()))
        more = len(self.records) - REJECTS_LOGGED
        named = f"; {more} more not logged" if more > 0 else ""
        return f"sft: {len(self.records)} lines rejected ({reasons}){named}; every one is in {REJECTS_FILE}"


def write_rejects(directory: Path, records: list[dict]) -> None:
    atomic_write_text(directory / REJECTS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def load_examples(
    cfg, tokenizer, template: str | None, rejects: list[dict] | None = None
) -> tuple[list[dict], list[dict], dict]:
    """(train examples, eval examples, counts). Every line is counted: kept, held out, or rejected with a
    reason; each rejected line ({file, line, reason, detail}) is appended to `rejects` if given."""
    section: SftConfig = cfg.sft
    if not section.data:
        raise SftDataError("sft.data names no instruction file; add one (JSONL, Alpaca or chat form)")
    train, held, system_counts = [], [], Counter()
    rejections = Rejections()
    terminators = end_tokens(tokenizer, template)  # once, not per conversation (it renders a probe twice)
    per_file = {}
    for item in section.data:
        path = cfg.resolve(item.path)
        if not path.is_file():
            raise SftDataError(f"sft.data: {path} does not exist")
        counts = Counter()
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                counts["in"] += 1
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    rejections.add(path, line_number, "invalid_json", f"invalid_json: {err.msg}")
                    counts["rejected:invalid_json"] += 1
                    continue
                messages, reason = to_messages(record, item.format)
                if messages is None:
                    rejections.add(path, line_number, reason)
                    counts[f"rejected:{reason}"] += 1
                    continue
                try:
                    example = tokenize_conversation(
                        messages, tokenizer, template, section.max_length, section.system_message, terminators
                    )
                except SystemRoleUnsupported as err:
                    raise SftDataError(f"{path}:{line_number}: {err}") from err
                except ConversationRejected as err:
                    rejections.add(path, line_number, err.reason, str(err))
                    counts[f"rejected:{err.reason}"] += 1
                    continue
                system = example.pop("system")  # "merged" / "dropped" when the template has no system role
                if system:
                    system_counts[system] += 1
                    counts[f"system_{system}"] += 1
                if not any(label != IGNORE_INDEX for label in example["labels"]):
                    rejections.add(path, line_number, "answer_truncated_away")
                    counts["rejected:answer_truncated_away"] += 1
                    continue
                counts["truncated"] += example["truncated"]
                example["source"] = f"{path.name}:{line_number}"
                if held_out(messages, section.eval_fraction, cfg.seed):
                    held.append(example)
                    counts["held_out"] += 1
                else:
                    train.append(example)
                    counts["train"] += 1
        per_file[str(path)] = dict(sorted(counts.items()))
    rejected = rejections.by_reason
    if rejects is not None:
        rejects.extend(rejections.records)
    if rejections.records and distributed.is_main():
        logger.warning("%s", rejections.summary())
    if not train:
        raise SftDataError(
            f"sft: no usable training example in {[d.path for d in section.data]} (rejected: {dict(rejected)}; "
            f"first: {rejections.first()})"
        )
    counts = {
        "in": sum(c["in"] for c in per_file.values()),
        "train": len(train),
        "held_out": len(held),
        "rejected": dict(sorted(rejected.items())),
        "truncated": sum(c.get("truncated", 0) for c in per_file.values()),
        # Conversations whose system message the chat template has no role for (sft.system_message).
        "system_message": {"mode": section.system_message, **{k: system_counts[k] for k in ("merged", "dropped")}},
        "by_file": per_file,
    }
    assert counts["in"] == counts["train"] + counts["held_out"] + sum(rejected.values())
    return train, held, counts


class SftDataset:
    """Examples in a seeded order per epoch; state_dict() is the exact position (epoch, next index).

    With data-parallel ranks, rank r takes positions r, r + world_size, ... of each epoch's order (the
    last `len % world_size` are dropped so ranks stay in step), like the token reader.
    """

    def __init__(self, examples: list[dict], seed: int, *, rank: int = 0, world_size: int = 1):
        self.examples = examples
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.next_index = 0  # position in this rank's share of the current epoch

    def __len__(self) -> int:
        return len(self.examples) // self.world_size

    def _order(self) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
        return order[self.rank : len(self) * self.world_size : self.world_size]

    def __iter__(self):
        if self.next_index >= len(self):
            self.epoch, self.next_index = self.epoch + 1, 0
        order = self._order()
        while self.next_index < len(order):
            example = self.examples[order[self.next_index]]
            self.next_index += 1
            yield {"input_ids": torch.tensor(example["input_ids"]), "labels": torch.tensor(example["labels"])}
        self.epoch, self.next_index = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "next_index": self.next_index,
            "examples": len(self.examples),
            "seed": self.seed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = (state["examples"], state["seed"], state.get("world_size", 1))
        if saved != (len(self.examples), self.seed, self.world_size):
            raise ValueError(
                f"sft data position was saved for {saved[0]} examples / seed {saved[1]} / {saved[2]} processes; "
                f"now {len(self.examples)} / {self.seed} / {self.world_size}: the data or the launch changed"
            )
        self.epoch, self.next_index = state["epoch"], state["next_index"]


class ReplayMix:
    """Each micro-batch: `micro_batch_size - replay_rows` instruction examples, then `replay_rows` blocks of
    cpt's training stream. state_dict() holds both positions, so a resume continues both exactly."""

    def __init__(self, examples: SftDataset, replay: LmBlockStream, micro_batch_size: int, replay_rows: int):
        self.examples, self.replay = examples, replay
        self.pattern = ["examples"] * (micro_batch_size - replay_rows) + ["replay"] * replay_rows

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        streams = {"examples": iter(self.examples), "replay": iter(self.replay)}
        while True:  # endless: each stream starts its next epoch when it runs out
            for name in self.pattern:
                sample = next(streams[name], None)
                if sample is None:
                    streams[name] = iter(getattr(self, name))
                    sample = next(streams[name])
                yield sample

    def state_dict(self) -> dict:
        return {"examples": self.examples.state_dict(), "replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.examples.load_state_dict(state["examples"])
        self.replay.load_state_dict(state["replay"])


def cpt_stream(run, section: SftConfig, tokenizer) -> TokenShardDataset | None:
    """cpt's training stream (the tokenize stage's shards, read in place) when replay or EWC needs it."""
    if section.replay.share == 0 and section.ewc_weight == 0:
        return None
    return TokenShardDataset(
        token_shard_paths(Path(run.stage_directories["tokenize"])),
        expected={"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)},
    )


def replay_stream(stream: TokenShardDataset, section: SftConfig, seed: int) -> LmBlockStream:
    """The blocks replay draws from (`replay.source`), in an order of their own per epoch, split across ranks."""
    blocks = blocks_of_source(stream, section.replay.source)
    return LmBlockStream(stream, blocks, seed, rank=distributed.rank(), world_size=distributed.world_size())


def replay_accounting(replay: LmBlockStream, section: SftConfig) -> dict:
    """What replay used, over all ranks; tokens are the blocks' valid tokens, as the tokenize stage counts them."""
    examples, tokens, domain = (
        int(v) for v in distributed.sum_across_ranks([replay.used[k] for k in ("examples", "tokens", "domain_tokens")])
    )
    return {
        "share": section.replay.share,
        "source": section.replay.source,
        "rows_per_micro_batch": section.replay_rows(),
        "blocks_available": len(replay.indices),
        "examples": examples,
        "tokens": tokens,
        "domain_tokens": domain,
        "general_tokens": tokens - domain,
    }


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def chat_template_for(tokenizer, section: SftConfig) -> tuple[str, str]:
    """(template, where it came from): the config's, else the tokenizer's, else the built-in default."""
    if section.chat_template:
        return section.chat_template, "config"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template, "tokenizer"
    return DEFAULT_CHAT_TEMPLATE, "cptflow default"


# ---------------------------------------------------------------------------------------------
# The stage, as the pipeline sees it (cptflow/plan.py lists the stage modules in DAG order)
# ---------------------------------------------------------------------------------------------
STAGE_VERSION = 2  # 2: answers located per chat template, one end token each (issue 16)
NAME = "sft"
UPSTREAM = "cpt"
Config = SftConfig


def fingerprint_inputs(cfg) -> dict:
    return {
        # Gates judge evals and change no weight: a new limit re-judges, it does not retrain.
        "config": cfg.sft.model_dump(mode="json", exclude={"retries", "gates"}),
        "data": sft_data_fingerprints(cfg),
        "processes": cfg.launch.num_processes,
        "seed": cfg.seed,
        "version": STAGE_VERSION,
    }


def artifacts(manifest: dict, directory: Path) -> list[Artifact]:
    return training_artifacts(manifest, directory)


def run(run, cfg, reporter: TrainingReporter | None = None, *, stop_after_steps: int | None = None) -> dict | None:
    existing = read_manifest(run.path)
    if existing is not None:
        return existing
    section: SftConfig = cfg.sft
    started = time.time()
    for warning in section.warnings():
        logger.warning("sft: %s", warning)
    set_seed(cfg.seed)
    cpt_dir = Path(run.upstream_directory)
    cpt_manifest = read_manifest(cpt_dir)
    if cpt_manifest is None:
        raise RuntimeError(f"sft: the cpt output {cpt_dir} is not committed (run the cpt stage first)")
    adapter_dir = cpt_dir / cpt_manifest["adapter"]

    tokenizer = load_tokenizer(str(adapter_dir))
    template, template_source = chat_template_for(tokenizer, section)
    rejects: list[dict] = []  # rank 0 writes them to rejects.jsonl, beside the manifest
    try:
        train_examples, eval_examples, counts = load_examples(cfg, tokenizer, template, rejects)
    except SftDataError as err:
        if not rejects:
            raise
        if distributed.is_main():
            run.path.mkdir(parents=True, exist_ok=True)
            write_rejects(run.path, rejects)
        raise SftDataError(f"{err}; every rejected line is in {run.path / REJECTS_FILE}") from None
    if template_source != "tokenizer":
        tokenizer.chat_template = template  # saved with the adapter, so generation renders prompts the same way

    # The cpt adapter's LoRA and embeddings continue; LoRA shape comes from it, not from sft.lora.
    prepared = prepare_model(
        cfg.base_model, section, adapter_dir=adapter_dir, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code
    )
    model, device, memory, fused_loss = prepared.model, prepared.device, prepared.memory, prepared.fused_loss

    dataset = SftDataset(train_examples, cfg.seed, rank=distributed.rank(), world_size=distributed.world_size())
    stream = cpt_stream(run, section, tokenizer)  # None unless replay or EWC is on
    replay = replay_stream(stream, section, cfg.seed) if section.replay.share > 0 else None
    mixed = ReplayMix(dataset, replay, section.micro_batch_size, section.replay_rows()) if replay else dataset
    data = MicroBatches(mixed, section.micro_batch_size, device, collate=collate)
    samples_per_step = (section.micro_batch_size - section.replay_rows()) * section.gradient_accumulation_steps
    total_steps = section.max_steps or max(1, math.ceil(section.epochs * len(dataset) / samples_per_step))
    optimizer = build_optimizer(model, section)
    scheduler = build_scheduler(optimizer, section, total_steps)
    blocks = eval_blocks(run.stage_directories, tokenizer, cfg.tokenize.seq_len)
    sft_eval = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in eval_examples]

    def evaluate() -> dict:
        results = {
            name: evaluate_perplexity(model, sets, batch_size=section.eval_batch_size) for name, sets in blocks.items()
        }
        if sft_eval:
            results[METRIC] = evaluate_perplexity(model, sft_eval, batch_size=section.eval_batch_size)
        return results

    reporter = reporter or TrainingReporter()
    reporter.on_start(
        {
            "stage": "sft",
            "total_steps": total_steps,
            "examples": counts,
            "param_groups": describe_param_groups(optimizer),
            "lora_targets": prepared.lora_targets,
        }
    )
    checkpoints = run.path / "checkpoints"
    after_eval, gate_summary = training_gates("sft", section, evaluate, run.path)
    result = fit(
        model,
        optimizer,
        scheduler,
        data,
        section,
        total_steps=total_steps,
        checkpoint_root=checkpoints,
        evaluate=evaluate,
        after_eval=after_eval,
        metric_key=METRIC if sft_eval else "domain_eval",
        reporter=reporter,
        fused_loss=fused_loss,
        stop_after_steps=stop_after_steps,
        ewc_data=lambda: fisher_batches(stream, section.micro_batch_size, section.ewc_fisher_batches),
    )
    if result.step < total_steps:
        return None
    memory["training"] = memory_snapshot(str(device))
    replayed = replay_accounting(replay, section) if replay else None  # every rank takes part in the sum
    if not distributed.is_main():  # rank 0 writes the stage's outputs; the others are done
        distributed.barrier()
        return read_manifest(run.path)

    save_adapter(model, tokenizer, run.path / "adapter")
    write_history(run.path / "train_log.jsonl", result.history)
    write_rejects(run.path, rejects)
    atomic_write_json(run.path / "data_counts.json", counts)
    best = best_checkpoint(checkpoints, METRIC if sft_eval else "domain_eval")
    manifest = {
        "stage": "sft",
        "fingerprint": run.fingerprint,
        "payload": run.payload,
        "adapter": "adapter",
        "continued_from": str(adapter_dir),
        "chat_template": template_source,
        "best_checkpoint": str(best.relative_to(run.path)) if best else None,
        "tied_embeddings": prepared.tied_embeddings,
        "data": counts,
        "parameters": trainable_parameters(model),
        "param_groups": describe_param_groups(optimizer),
        "lora_targets": prepared.lora_targets,
        "kernels": {"patched": prepared.kernels, "fused_linear_cross_entropy": fused_loss is not None},
        "train": {
            "steps": result.step,
            "tokens": result.tokens,
            "examples": len(dataset),
            "seconds_this_run": result.seconds,
            "tokens_per_s_this_run": round(result.tokens_this_run / result.seconds, 1) if result.seconds else None,
            "resumed_from": result.resumed_from,
            "final_loss": result.history[-1]["loss"] if result.history else None,
        },
        "eval": {k: v for k, v in result.evals[-1].items() if k != "step"},
        "evals": result.evals,
        "gates": gate_summary(result.evals) if gate_summary else None,
        "memory": memory,
        "warnings": section.warnings() + prepared.warnings,
        "processes": distributed.world_size(),
        "timings": {"finished": now_iso(), "seconds": round(time.time() - started, 3)},
    }
    if replayed:  # replayed blocks are not instruction examples: `data` and train.examples count those only
        manifest["replay"] = replayed
    if result.ewc:
        manifest["ewc"] = result.ewc
    manifest = commit_manifest(run.path, manifest)
    distributed.barrier()
    return manifest
