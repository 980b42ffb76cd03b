"""The shipped calibration corpus: its layout, its sizes, its cleanliness, and its documentation."""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

import pytest

KINDS = ("narrative", "speeches", "technical", "code", "dialogue")
SPLITS = ("calibration", "heldout")
# Calibration needs room for many blocks; held-out needs at least 24 blocks of 256 tokens.
SIZE_RANGE = {"calibration": (120_000, 350_000), "heldout": (50_000, 150_000)}
SHARED_LINE_MIN = 60
DATA = Path(str(files("swm_hub") / "data"))
CORPUS = DATA / "corpus"
PAIRS = [(kind, split) for kind in KINDS for split in SPLITS]


@cache
def raw(kind: str, split: str) -> bytes:
    return (CORPUS / kind / f"{split}.txt").read_bytes()


def long_lines(kind: str, split: str) -> set[str]:
    return {line for line in raw(kind, split).decode().split("\n") if len(line) > SHARED_LINE_MIN}


def test_the_corpus_holds_exactly_both_splits_of_every_kind() -> None:
    found = {path.relative_to(CORPUS).as_posix() for path in CORPUS.rglob("*") if path.is_file()}
    assert found == {f"{kind}/{split}.txt" for kind, split in PAIRS}


@pytest.mark.parametrize(("kind", "split"), PAIRS)
def test_each_file_is_within_its_size_range(kind: str, split: str) -> None:
    low, high = SIZE_RANGE[split]
    assert low <= len(raw(kind, split)) <= high


@pytest.mark.parametrize(("kind", "split"), PAIRS)
def test_each_file_is_clean_utf8_text(kind: str, split: str) -> None:
    """Blank lines are the document separator, so their form is part of the format."""
    text = raw(kind, split).decode("utf-8")
    assert "\r" not in text
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert not text.startswith("\n")
    assert "\n\n\n" not in text
    trailing = [n for n, line in enumerate(text.split("\n"), 1) if line != line.rstrip()]
    assert trailing == []


@pytest.mark.parametrize("kind", KINDS)
def test_no_long_line_is_in_both_splits_of_a_kind(kind: str) -> None:
    """A shared line would mean a document leaked from calibration into the held-out split."""
    assert long_lines(kind, "calibration") & long_lines(kind, "heldout") == set()


def test_sources_document_every_file_and_point_to_the_licences() -> None:
    sources = (DATA / "SOURCES.md").read_text(encoding="utf-8")
    missing = [f"{kind}/{split}.txt" for kind, split in PAIRS if f"## {kind}/{split}.txt\n" not in sources]
    assert missing == []
    assert "LICENSES.md" in sources
    assert "PSF License Agreement" in (DATA / "LICENSES.md").read_text(encoding="utf-8")
