"""Calibration and evaluation text turned into fixed-length token blocks that start as the model reads a text.

A merge fitted on one kind of text learns that kind rather than the layers' function, so the default
calibration samples every kind of the shipped corpus (``core.texts``) evenly.
"""

from __future__ import annotations

from typing import Any

import torch

from swm_hub.core.errors import CalibrationDataError
from swm_hub.core.texts import TextSource, even_counts, read_texts


def leading_special_tokens(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer puts before a text's own tokens: a BOS for Llama or Gemma, none for GPT-2.

    A block that does not start as the model was trained to read a text is read as the middle of one;
    Gemma 3 270M's perplexity is 566 without its BOS and 119 with it on the same predicted tokens. The
    prefix is found by tokenizing a probe with and without special tokens, which follows each tokenizer's
    own setting (``add_bos_token``) rather than guessing from its vocabulary.
    """
    probe = "The calibration text begins here."
    plain: list[int] = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full: list[int] = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def token_blocks(tokenizer: Any, text: str, count: int, length: int, what: str = "the text") -> torch.Tensor:
    """``count`` blocks of ``length`` tokens spread evenly over the text, as a [count, length] tensor.

    Each block is the tokenizer's leading special tokens followed by a consecutive, non-overlapping slice of
    the tokenized text, so every other token is real text and no padding or attention mask is needed.
    Statistics leave out position 0 of every block (see ``layer_trace.flat_hidden``).
    """
    if count < 1 or length < 8:
        raise CalibrationDataError(f"need at least 1 block of at least 8 tokens, got {count} x {length}")
    prefix = leading_special_tokens(tokenizer)
    body = length - len(prefix)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    available = len(ids) // body
    if available < count:
        raise CalibrationDataError(
            f"{what} has {len(ids)} tokens, enough for {available} blocks of {length}; "
            f"{count} were asked for: give a longer text or fewer/shorter samples"
        )
    starts = torch.linspace(0, available - 1, count).round().long().tolist()
    return torch.tensor([prefix + ids[s * body : (s + 1) * body] for s in starts], dtype=torch.long)


def blocks_by_kind(tokenizer: Any, source: TextSource, count: int, length: int) -> dict[str, torch.Tensor]:
    """``count`` blocks of ``length`` tokens in all, drawn evenly from every kind of ``source``.

    Raises:
        CalibrationDataError: a text cannot be read or is too short for its share of the blocks.
    """
    texts = read_texts(source)
    return {
        kind: token_blocks(tokenizer, texts[kind], share, length, _described(source, kind))
        for kind, share in even_counts(count, tuple(texts)).items()
    }


def _described(source: TextSource, kind: str) -> str:
    return str(source.path) if source.path is not None else f"the shipped {kind} {source.split} text"
