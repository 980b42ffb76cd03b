"""What a heal is reported as: the comparison file ``heal.json`` and the card's view of a healed model.

``heal.json`` holds held-out perplexity before and after healing for the merged model and for the
layer-dropping baseline healed the same way with the same budget, beside the base model, so that what
healing bought is compared on fair terms. The heal itself is recorded in the plan (``MergePlan.heal``);
``heal_info`` reads both for the model card. Plain data and file reading only: this module imports no
training code, so the card can use it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from swm_hub.core.atomic import write_text_atomically
from swm_hub.core.errors import ResultFileError
from swm_hub.results.plan import PLAN_FILE, MergePlan
from swm_hub.results.schema import SCHEMA_KEY, read_result, result_path

HEAL_FILE: str = "heal.json"
SCHEMA_VERSION: int = 1


@dataclass(frozen=True)
class HealComparisonRow:
    """One model's held-out perplexity before healing and after (None for the base model, never healed)."""

    name: str
    layers: int
    before: float
    after: float | None
    dropped: tuple[int, ...] = ()
    before_by_kind: dict[str, float] = field(default_factory=dict)
    after_by_kind: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class HealComparison:
    """Held-out perplexity before and after healing: the base, the merged model and a drop baseline, same budget."""

    text: str
    blocks: int
    seq_len: int
    tokens: int
    rows: list[HealComparisonRow]

    def to_json(self) -> str:
        return json.dumps({SCHEMA_KEY: SCHEMA_VERSION, **asdict(self)}, indent=2) + "\n"

    def save(self, folder: Path) -> Path:
        return write_text_atomically(Path(folder) / HEAL_FILE, self.to_json())

    @classmethod
    def load(cls, folder_or_path: Path | str) -> HealComparison:
        """Read ``heal.json``, from its folder or file; one that is not a comparison is an error naming it.

        Raises:
            ResultFileError: the file cannot be read or is not a heal comparison.
            ResultFileVersionError: a newer swm-hub wrote it.
        """
        path = result_path(folder_or_path, HEAL_FILE)
        data = read_result(path, SCHEMA_VERSION)
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ResultFileError(path, f"not a heal comparison ({type(error).__name__}: {error})") from error

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> HealComparison:
        """The comparison from its JSON object (``to_json``'s)."""
        rows = [
            HealComparisonRow(
                name=str(row["name"]),
                layers=int(row["layers"]),
                before=float(row["before"]),
                after=None if row.get("after") is None else float(row["after"]),
                dropped=tuple(int(layer) for layer in row.get("dropped", ())),
                before_by_kind={str(k): float(v) for k, v in row.get("before_by_kind", {}).items()},
                after_by_kind={str(k): float(v) for k, v in row.get("after_by_kind", {}).items()},
            )
            for row in raw["rows"]
        ]
        return cls(str(raw["text"]), int(raw["blocks"]), int(raw["seq_len"]), int(raw["tokens"]), rows)

    @property
    def base(self) -> HealComparisonRow | None:
        return next((row for row in self.rows if row.after is None), None)

    @property
    def merged(self) -> HealComparisonRow | None:
        return next((row for row in self.rows if row.after is not None and not row.dropped), None)

    def gap_closed(self) -> float | None:
        """The share of the merged model's perplexity gap to the base model that healing closed."""
        base, merged = self.base, self.merged
        if base is None or merged is None or merged.after is None or merged.before <= base.before:
            return None
        return (merged.before - merged.after) / (merged.before - base.before)

    def table_lines(self) -> list[str]:
        lines = [
            f"held-out perplexity on {self.text} ({self.blocks} blocks x {self.seq_len} tokens), "
            f"healed with {self.tokens:,} tokens each",
            f"{'model':<34} {'layers':>6} {'before':>10} {'after':>10}",
        ]
        for row in self.rows:
            after = f"{row.after:>10.2f}" if row.after is not None else f"{'-':>10}"
            lines.append(f"{row.name:<34} {row.layers:>6} {row.before:>10.2f} {after}")
        gap = self.gap_closed()
        if gap is not None:
            lines.append(f"healing closed {100 * gap:.1f}% of the merged model's gap to the base model")
        return lines


@dataclass(frozen=True)
class HealInfo:
    """The card's heal section: what the plan's heal record says, and heal.json when it is there."""

    steps: int
    tokens_seen: int
    rank: int
    alpha: int
    lr: float
    modules: str
    seed: int
    hidden_weight: float
    text: str
    teacher_cache: str
    loss_first: float
    loss_last: float
    loss_min: float
    seconds: float
    tokens_per_s: float
    comparison: HealComparison | None
    gap_closed: float | None


def heal_info(folder: Path, plan: MergePlan) -> HealInfo | None:
    """The heal section of a folder's card, or None when its model was not healed."""
    record = plan.heal
    if record is None:
        return None
    path = Path(folder) / HEAL_FILE
    comparison = HealComparison.load(path) if path.is_file() else None
    try:
        return _info(record, comparison)
    except (KeyError, TypeError, ValueError) as error:
        raise ResultFileError(Path(folder) / PLAN_FILE, f"its heal record is incomplete ({error})") from error


def _info(record: dict[str, Any], comparison: HealComparison | None) -> HealInfo:
    options, loss = record["options"], record["loss"]
    return HealInfo(
        steps=int(record["steps"]),
        tokens_seen=int(record["tokens_seen"]),
        rank=int(options["rank"]),
        alpha=int(options["alpha"]),
        lr=float(options["lr"]),
        modules=str(options["modules"]),
        seed=int(record["seed"]),
        hidden_weight=float(options["hidden_weight"]),
        text=_text_name(str(record["text"])),
        teacher_cache=str(record["teacher_cache"]),
        loss_first=float(loss["first"]),
        loss_last=float(loss["last"]),
        loss_min=float(loss["min"]),
        seconds=float(record["seconds"]),
        tokens_per_s=float(record["tokens_per_s"]),
        # a user's held-out file by its name: the card may be pushed, and its path is theirs
        comparison=replace(comparison, text=_text_name(comparison.text)) if comparison is not None else None,
        gap_closed=comparison.gap_closed() if comparison is not None else None,
    )


def _text_name(label: str) -> str:
    """A public name for the training text: the shipped corpus by its label, a user's file by its name only."""
    return label if label.startswith("swm_hub:") else Path(label).name
