"""sft's answer masks under the chat templates the model families publish (issue 16): each answer is trained
with exactly one end token, the template's own, and nothing of the prompt; templates without a system role
merge, drop or refuse the system message as `sft.system_message` says, and every input line is counted."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from chat_templates_data import FAMILIES, build_tokenizer

from cptflow.tasks.sft import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    SftConfig,
    SftDataError,
    load_examples,
    tokenize_conversation,
)

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [
    {"role": "user", "content": "Half-life of drug A?"},
    {"role": "assistant", "content": "About six hours."},
    {"role": "user", "content": "And drug B?"},
    {"role": "assistant", "content": "Twelve hours."},
    {"role": "user", "content": "Which one is dosed twice a day?"},
    {"role": "assistant", "content": "Drug B, twice a day."},
]
ANSWERS = [m["content"] for m in TURNS if m["role"] == "assistant"]
PROMPT_TEXTS = [m["content"] for m in TURNS if m["role"] == "user"]


@pytest.fixture(scope="module")
def tokenizers():
    return {name: build_tokenizer(family) for name, family in FAMILIES.items()}


def trained_runs(example: dict) -> list[list[int]]:
    """The labelled token ids, one list per contiguous run (one run per answer)."""
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def prompt_text(tokenizer, example: dict) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX])


def assert_answers_end_once(tokenizer, example: dict, answers: list[str], terminator: str) -> None:
    end_id = tokenizer.convert_tokens_to_ids(terminator)
    runs = trained_runs(example)
    # A token that straddles the answer's start (SentencePiece "▁About" after "[/INST]") carries a space.
    assert [tokenizer.decode(run).lstrip(" ") for run in runs] == [a + terminator for a in answers]
    for run in runs:
        assert run[-1] == end_id and run.count(end_id) == 1
        others = {tokenizer.eos_token_id, *tokenizer.all_special_ids} - {end_id}
        assert not others & set(run)  # one end token: not the template's and EOS after it


@pytest.mark.parametrize("with_system", [True, False], ids=["system", "no-system"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_answer_is_trained_with_the_templates_own_end_token_once(tokenizers, name, with_system):
    family, tokenizer = FAMILIES[name], tokenizers[name]
    messages = [SYSTEM, *TURNS] if with_system else TURNS
    example = tokenize_conversation(messages, tokenizer, None, max_length=1024)
    assert not example["truncated"]
    assert_answers_end_once(tokenizer, example, ANSWERS, family.terminator)
    trained = tokenizer.decode([t for run in trained_runs(example) for t in run])
    prompt = prompt_text(tokenizer, example)
    for text in PROMPT_TEXTS + ([SYSTEM["content"]] if with_system else []):
        assert text in prompt and text not in trained
    # Templates without a system role get it folded into the first user turn (the default, merge).
    assert example["system"] == ("merged" if with_system and not family.system_role else None)
    if with_system and not family.system_role:
        assert "Be brief.\n\nHalf-life of drug A?" in prompt


def test_qwen3_trains_the_last_turns_reasoning_and_not_the_reasoning_it_drops(tokenizers):
    """Qwen3 renders <think> only after the last user turn (and an empty one when there is none); the
    reasoning of earlier turns is left out of the rendering, so it cannot be trained."""
    tokenizer = tokenizers["qwen3"]
    messages = [
        {"role": "user", "content": "Half-life of drug A?"},
        {"role": "assistant", "content": "<think>\nRecall the label.\n</think>\n\nAbout six hours."},
        {"role": "user", "content": "And drug B?"},
        {"role": "assistant", "content": "<think>\nTwice drug A's.\n</think>\n\nTwelve hours."},
    ]
    example = tokenize_conversation(messages, tokenizer, None, max_length=1024)
    runs = [tokenizer.decode(run) for run in trained_runs(example)]
    assert runs == ["About six hours.<|im_end|>", "<think>\nTwice drug A's.\n</think>\n\nTwelve hours.<|im_end|>"]
    assert "Recall the label." not in tokenizer.decode(example["input_ids"])
    # Without reasoning the last turn gets the template's empty <think> block: prompt, not answer.
    plain = tokenize_conversation(TURNS[:4], tokenizer, None, max_length=1024)
    assert "<think>\n\n</think>\n\n" in prompt_text(tokenizer, plain)
    assert_answers_end_once(tokenizer, plain, ANSWERS[:2], "<|im_end|>")


@pytest.mark.parametrize("name", ["smollm2", "mistral", "llama3"])
def test_an_answer_quoted_in_the_question_is_found_after_the_question(tokenizers, name):
    messages = [
        {"role": "user", "content": "Is it true that Twelve hours. is the half-life of drug B?"},
        {"role": "assistant", "content": "Twelve hours."},
    ]
    example = tokenize_conversation(messages, tokenizers[name], None, max_length=1024)
    assert_answers_end_once(tokenizers[name], example, ["Twelve hours."], FAMILIES[name].terminator)
    assert "Is it true that Twelve hours. is" in prompt_text(tokenizers[name], example)


def test_generation_blocks_are_the_mask_and_the_end_token_after_one_is_trained(tokenizers):
    """cptflow's default template marks `answer + EOS` with {% generation %}; a template whose block holds
    only the answer still gets the end token it renders right after it, and no second one."""
    tokenizer = tokenizers["llama3"]
    example = tokenize_conversation(TURNS, tokenizer, DEFAULT_CHAT_TEMPLATE, max_length=1024)
    assert_answers_end_once(tokenizer, example, ANSWERS, "<|end_of_text|>")
    answer_only = (
        "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
    )
    example = tokenize_conversation(TURNS, tokenizer, answer_only, max_length=1024)
    assert_answers_end_once(tokenizer, example, ANSWERS, "<|eot_id|>")


def test_a_template_that_ends_answers_with_no_end_token_gets_eos_once(tokenizers):
    tokenizer = tokenizers["qwen2.5"]
    plain = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    example = tokenize_conversation([SYSTEM, *TURNS], tokenizer, plain, max_length=1024)
    assert_answers_end_once(tokenizer, example, ANSWERS, "<|endoftext|>")


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def load(path: Path, tokenizer, mode: str):
    section = SftConfig(data=[{"path": str(path)}], eval_fraction=0.0, system_message=mode)
    return load_examples(SimpleNamespace(sft=section, resolve=Path, seed=0), tokenizer, None)


@pytest.fixture()
def mixed_file(tmp_path) -> Path:
    return write_lines(
        tmp_path / "chat.jsonl",
        [
            {"messages": [SYSTEM, *TURNS[:2]]},
            {"messages": TURNS[:4]},
            {"messages": [TURNS[0], TURNS[2], TURNS[1]]},  # two user turns in a row: Gemma refuses it
            "{not json",
            {"instruction": "Define clearance.", "output": "Plasma cleared per unit time.", "system": "Be brief."},
        ],
    )


@pytest.mark.parametrize("mode", ["merge", "drop"])
def test_gemma2_without_a_system_role_merges_or_drops_it_and_counts(tokenizers, mixed_file, mode):
    tokenizer = tokenizers["gemma2"]
    train, held, counts = load(mixed_file, tokenizer, mode)
    done = "merged" if mode == "merge" else "dropped"
    assert counts["system_message"] == {"mode": mode, "merged": 2 * (mode == "merge"), "dropped": 2 * (mode == "drop")}
    assert counts["in"] == 5 and counts["train"] == 3 and not held
    assert counts["rejected"] == {"invalid_json": 1, "template_error": 1}
    assert counts["by_file"][str(mixed_file)][f"system_{done}"] == 2
    first = prompt_text(tokenizer, train[0])
    assert ("Be brief.\n\nHalf-life of drug A?" in first) == (mode == "merge")
    assert ("Be brief." in first) == (mode == "merge")
    assert_answers_end_once(tokenizer, train[0], ["About six hours."], "<end_of_turn>")
    assert_answers_end_once(tokenizer, train[2], ["Plasma cleared per unit time."], "<end_of_turn>")


def test_system_message_error_names_the_file_and_line(tokenizers, tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [{"messages": TURNS[:2]}, {"messages": [SYSTEM, *TURNS[:2]]}])
    with pytest.raises(SftDataError, match=rf"{path}:2: the chat template has no system role"):
        load(path, tokenizers["gemma2"], "error")
    # Mistral v0.3 raises nothing: it leaves the system text out unless the last message is a user turn.
    with pytest.raises(SftDataError, match=rf"{path}:2: .*leaves the system text out"):
        load(path, tokenizers["mistral"], "error")


@pytest.mark.parametrize("name", ["llama3", "gemma3", "qwen3", "phi3"])
def test_templates_with_a_system_role_render_it_themselves(tokenizers, mixed_file, name):
    """Gemma 3 has no system turn but folds the system text into the first user turn itself: nothing to do."""
    train, _, counts = load(mixed_file, tokenizers[name], "error")
    assert counts["system_message"] == {"mode": "error", "merged": 0, "dropped": 0}
    assert counts["in"] == 5 == counts["train"] + sum(counts["rejected"].values())
    assert "Be brief." in prompt_text(tokenizers[name], train[0])
