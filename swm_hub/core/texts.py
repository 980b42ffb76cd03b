"""The text swm-hub reads: the shipped corpus of several kinds, or a user's plain-text or JSONL file.

The package ships a corpus of several kinds of English text (see ``data/SOURCES.md``), each split into a
calibration part and a held-out part taken from different documents, so that an evaluation never sees the
text a merge was fitted on. Users can bring their own file; nothing is ever downloaded. Naming and reading
a text needs no model, so the options and the command line use this module without loading torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from swm_hub.core.errors import CalibrationDataError

KINDS: tuple[str, ...] = ("narrative", "speeches", "technical", "code", "dialogue")
"""The kinds of the shipped corpus, in the order blocks are drawn (the first kinds get any extra block)."""
SPLITS: tuple[str, ...] = ("calibration", "heldout")
CORPUS_PREFIX = "swm_hub:corpus/"
LEGACY_LABELS = {"swm_hub:calibration.txt": "calibration", "swm_hub:heldout.txt": "heldout"}
"""Labels of the one-novel texts that swm-hub 0.x shipped: plans naming them get that novel's kind."""


@dataclass(frozen=True)
class TextSource:
    """Where a text comes from: a user's file, or one split of the shipped corpus (some or all kinds)."""

    path: Path | None = None
    split: str = "calibration"
    kinds: tuple[str, ...] = KINDS

    def __post_init__(self) -> None:
        unknown = [kind for kind in self.kinds if kind not in KINDS]
        if self.split not in SPLITS or unknown or not self.kinds:
            raise CalibrationDataError(
                f"the shipped corpus has the splits {', '.join(SPLITS)} and the kinds {', '.join(KINDS)}; "
                f"got split {self.split!r} and kinds {', '.join(self.kinds) or 'none'}"
            )

    @property
    def label(self) -> str:
        """How cards and plans name the text: an absolute path, so a saved plan can be applied from anywhere."""
        if self.path is not None:
            return str(self.path.resolve())
        chosen = "" if self.kinds == KINDS else f"[{','.join(self.kinds)}]"
        return f"{CORPUS_PREFIX}{self.split}{chosen}"

    @classmethod
    def from_label(cls, label: str) -> TextSource:
        """The source a plan's label names; anything not shipped is a file path."""
        if label in LEGACY_LABELS:
            return cls(split=LEGACY_LABELS[label], kinds=("narrative",))
        if not label.startswith(CORPUS_PREFIX):
            return cls(path=Path(label))
        split, _, chosen = label.removeprefix(CORPUS_PREFIX).partition("[")
        kinds = tuple(chosen.rstrip("]").split(",")) if chosen else KINDS
        return cls(split=split, kinds=kinds)


def shipped_text(kind: str, split: str) -> str:
    """One split of one kind of the shipped corpus."""
    corpus = resources.files("swm_hub").joinpath("data", "corpus", kind, f"{split}.txt")
    return corpus.read_text(encoding="utf-8")


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


def _file_text(path: Path) -> str:
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CalibrationDataError(f"cannot read text file {path}: {err}") from err
    return _jsonl_texts(path, content) if path.suffix == ".jsonl" else content


def read_texts(source: TextSource) -> dict[str, str]:
    """The text of each kind of ``source``; a user's file is one kind, named after the file.

    ``.jsonl`` files contribute their ``text`` fields.
    """
    if source.path is not None:
        return {source.path.name: _file_text(source.path)}
    return {kind: shipped_text(kind, source.split) for kind in source.kinds}


def even_counts(total: int, kinds: tuple[str, ...]) -> dict[str, int]:
    """``total`` blocks shared as evenly as the kinds allow, the first kinds taking any remainder."""
    share, extra = divmod(total, len(kinds))
    counts = {kind: share + (index < extra) for index, kind in enumerate(kinds)}
    return {kind: count for kind, count in counts.items() if count}
