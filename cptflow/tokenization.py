"""How a document becomes token ids, shared by tokenize (packing), mix (token counts), the fast encoder
and the training stages' held-out sets.
"""

from __future__ import annotations


def document_token_ids(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each document: the tokenizer's own special tokens (BOS for Llama-style
    tokenizers, none for a tokenizer without BOS), then EOS, so generation learns to stop.

    The mix stage counts a document's tokens the same way: len(tokenizer(text)["input_ids"]) + 1.
    One batched call: a fast tokenizer encodes the batch on all cores in Rust.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token; documents need one to be packed"
        )
    # verbose=False: documents longer than model_max_length are expected here (they get packed).
    # split_special_tokens: a literal "</s>" in web text is text, never an injected EOS.
    ids = tokenizer(
        list(texts), add_special_tokens=True, split_special_tokens=True, return_attention_mask=False, verbose=False
    )["input_ids"]
    for row in ids:
        row.append(eos)
    return ids
