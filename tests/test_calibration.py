"""Token blocks that start as the tokenizer starts a text, drawn evenly from the kinds of the shipped corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from swm_hub.core.calibration import blocks_by_kind, leading_special_tokens, token_blocks
from swm_hub.core.errors import CalibrationDataError, InvalidOptionError
from swm_hub.core.options import CalibrationOptions
from swm_hub.core.texts import KINDS, TextSource, even_counts, shipped_text
from swm_hub.runtime.tracing import calibration_batches

TEXT = " ".join(f"word{i % 97} and more text number {i}." for i in range(400))


def tokenizer_with_bos() -> PreTrainedTokenizerFast:
    """The tiny tokenizer made to put a BOS before every text, as Llama's and Gemma's tokenizers do."""
    tokenizer = build_tiny_tokenizer()
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    return tokenizer


def test_the_leading_tokens_are_what_the_tokenizer_itself_adds() -> None:
    with_bos = tokenizer_with_bos()
    assert leading_special_tokens(with_bos) == [with_bos.bos_token_id]
    assert leading_special_tokens(build_tiny_tokenizer()) == []


def test_every_block_starts_with_the_bos_and_then_continues_the_text() -> None:
    tokenizer = tokenizer_with_bos()
    blocks = token_blocks(tokenizer, TEXT, count=5, length=32)
    assert blocks.shape == (5, 32)
    assert bool((blocks[:, 0] == tokenizer.bos_token_id).all())
    stream = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert blocks[0, 1:].tolist() == stream[:31], "the first block is the BOS and the text's first 31 tokens"


def test_without_a_bos_the_blocks_are_plain_slices_of_the_text() -> None:
    tokenizer = build_tiny_tokenizer()
    blocks = token_blocks(tokenizer, TEXT, count=3, length=16)
    stream = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert blocks[0].tolist() == stream[:16]


def test_a_text_too_short_for_the_blocks_says_which_text_and_what_to_do() -> None:
    with pytest.raises(CalibrationDataError, match="notes.txt has .* tokens.*give a longer text"):
        token_blocks(build_tiny_tokenizer(), "too short", count=4, length=64, what="notes.txt")


def test_blocks_are_shared_evenly_and_the_first_kinds_take_the_remainder() -> None:
    assert even_counts(32, KINDS) == {"narrative": 7, "speeches": 7, "technical": 6, "code": 6, "dialogue": 6}
    assert even_counts(3, KINDS) == {"narrative": 1, "speeches": 1, "technical": 1}
    assert sum(even_counts(48, KINDS).values()) == 48


@pytest.mark.parametrize("split", ["calibration", "heldout"])
def test_every_kind_of_the_shipped_corpus_gives_its_share_of_blocks(split: str) -> None:
    tokenizer = build_tiny_tokenizer()
    blocks = blocks_by_kind(tokenizer, TextSource(split=split), count=10, length=64)
    assert list(blocks) == list(KINDS)
    for kind, ids in blocks.items():
        assert ids.shape == (2, 64)
        first = tokenizer(shipped_text(kind, split), add_special_tokens=False)["input_ids"][:64]
        assert ids[0].tolist() == first, f"the {kind} blocks come from the {kind} {split} text"


def test_the_default_calibration_draws_from_every_kind() -> None:
    tokenizer = build_tiny_tokenizer()
    rows = torch.cat(calibration_batches(tokenizer, CalibrationOptions(samples=10, seq_len=32)))
    only_narrative = CalibrationOptions(samples=10, seq_len=32, kinds=("narrative",))
    narrative = torch.cat(calibration_batches(tokenizer, only_narrative))
    assert rows.shape == narrative.shape == (10, 32)
    assert not torch.equal(rows, narrative)


def test_a_users_file_is_one_kind_named_after_the_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text(TEXT, encoding="utf-8")
    blocks = blocks_by_kind(build_tiny_tokenizer(), TextSource(path=text), count=3, length=16)
    assert list(blocks) == ["notes.txt"]


@pytest.mark.parametrize(
    "source",
    [
        TextSource(),
        TextSource(split="heldout"),
        TextSource(kinds=("code", "dialogue")),
        TextSource(split="heldout", kinds=("narrative",)),
    ],
)
def test_a_label_names_its_source_again(source: TextSource) -> None:
    assert TextSource.from_label(source.label) == source


def test_a_file_label_is_an_absolute_path(tmp_path: Path) -> None:
    source = TextSource(path=tmp_path / "a.txt")
    assert TextSource.from_label(source.label) == TextSource(path=(tmp_path / "a.txt").resolve())


def test_plans_of_the_one_novel_corpus_calibrate_on_that_novel_again() -> None:
    assert TextSource.from_label("swm_hub:calibration.txt") == TextSource(kinds=("narrative",))
    assert TextSource.from_label("swm_hub:heldout.txt") == TextSource(split="heldout", kinds=("narrative",))


def test_unknown_kinds_are_refused_with_the_known_ones() -> None:
    with pytest.raises(CalibrationDataError, match="narrative"):
        TextSource(kinds=("poetry",))
    with pytest.raises(InvalidOptionError, match="--calib-kinds takes kinds"):
        CalibrationOptions(kinds=("poetry",))
    with pytest.raises(InvalidOptionError, match="cannot apply to --calib"):
        CalibrationOptions(text=Path("a.txt"), kinds=("code",))


def test_a_recorded_calibration_is_run_again_as_recorded() -> None:
    options = CalibrationOptions(samples=12, seq_len=64, kinds=("technical", "code"))
    record = {"text": options.source.label, "samples": 12, "seq_len": 64, "tokens": 768}
    assert CalibrationOptions.recorded(record, batch_size=options.batch_size) == options
