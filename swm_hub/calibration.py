"""Calibration and evaluation text, turned into fixed-length token blocks.

The package ships two public-domain English texts (see ``data/SOURCES.md``): one for calibration and a
different work held out for perplexity, so that an evaluation never sees the text the merge was fitted on.
Users can bring their own plain-text or JSONL file; nothing is ever downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from swm_hub.errors import CalibrationDataError

PACKAGED_TEXTS = {"calibration": "calibration.txt", "heldout": "heldout.txt"}


@dataclass(frozen=True)
class TextSource:
    """Where a text comes from: a user's file, or one of the packaged texts by name."""

    path: Path | None = None
    packaged: str = "calibration"

    @property
    def label(self) -> str:
        """How cards and plans name the text: an absolute path, so a saved plan can be applied from anywhere."""
        return str(self.path.resolve()) if self.path else f"swm_hub:{PACKAGED_TEXTS[self.packaged]}"


def packaged_text(name: str) -> str:
    """One of the texts shipped in ``swm_hub/data``."""
    return resources.files("swm_hub").joinpath("data", PACKAGED_TEXTS[name]).read_text(encoding="utf-8")


def _jsonl_texts(path: Path, content: str) -> str:
    """The ``text`` field of each JSON line; other lines are an error, so a wrong file is noticed."""
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as err:
            raise CalibrationDataError(f"{path}:{number} is not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationDataError(f'{path}:{number} has no "text" string field')
        texts.append(record["text"])
    return "\n\n".join(texts)


def read_text(source: TextSource) -> str:
    """The whole text of ``source``; ``.jsonl`` files contribute their ``text`` fields."""
    if source.path is None:
        return packaged_text(source.packaged)
    try:
        content = source.path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CalibrationDataError(f"cannot read text file {source.path}: {err}") from err
    return _jsonl_texts(source.path, content) if source.path.suffix == ".jsonl" else content


def token_blocks(tokenizer: Any, text: str, count: int, length: int) -> torch.Tensor:
    """``count`` blocks of ``length`` tokens spread evenly over the text, as a [count, length] tensor.

    Blocks are consecutive, non-overlapping slices of the tokenized text, so every token is real prose
    and no padding or attention mask is needed.
    """
    if count < 1 or length < 8:
        raise CalibrationDataError(f"need at least 1 block of at least 8 tokens, got {count} x {length}")
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    available = len(ids) // length
    if available < count:
        raise CalibrationDataError(
            f"the text has {len(ids)} tokens, enough for {available} blocks of {length}; "
            f"{count} were asked for: give a longer text or fewer/shorter samples"
        )
    starts = torch.linspace(0, available - 1, count).round().long().tolist()
    return torch.tensor([ids[s * length : (s + 1) * length] for s in starts], dtype=torch.long)
