"""The evaluation report: held-out perplexity per model and per kind of text, and ``eval.json``.

The eval stage builds it, ``compress --eval`` saves it into the model folder, and the model card loads it
back to compose its perplexity section; the comparison both of them show (the merged model against the
best drop baseline, kind by kind) is ``ratios_to_best_drop``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from swm_hub.core.atomic import write_text_atomically
from swm_hub.core.errors import ResultFileError
from swm_hub.core.files import EVAL_FILE
from swm_hub.results.schema import SCHEMA_KEY, read_result, result_path

SCHEMA_VERSION: int = 1
"""1: the fields of ``EvalReport``; the release before wrote the same fields without a version."""

MERGED_PREFIX = "merged: "
"""How the eval stage names the merged model's row, so the verdict can find it."""


@dataclass(frozen=True)
class PerplexityRow:
    """One line of an evaluation table: perplexity over every held-out token, and over each kind's alone."""

    name: str
    layers: int
    perplexity: float
    dropped: tuple[int, ...] = ()
    by_kind: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalReport:
    """Held-out perplexity of a merged model beside its base model and the same-count drop baselines."""

    text: str
    blocks: int
    seq_len: int
    rows: list[PerplexityRow]

    def to_json(self) -> str:
        return json.dumps({SCHEMA_KEY: SCHEMA_VERSION, **asdict(self)}, indent=2) + "\n"

    def save(self, folder: Path) -> Path:
        """Write ``eval.json`` into a model folder through a temporary file, so a reader never sees half."""
        return write_text_atomically(folder / EVAL_FILE, self.to_json())

    @classmethod
    def load(cls, folder_or_path: Path | str) -> EvalReport:
        """Read ``eval.json`` (this release's or the previous one's) from a model folder or the file itself.

        Raises:
            ResultFileError: the file cannot be read, is not an evaluation report, or holds no rows.
            ResultFileVersionError: a newer swm-hub wrote it.
        """
        path = result_path(folder_or_path, EVAL_FILE)
        data = read_result(path, SCHEMA_VERSION)
        try:
            report = cls(
                text=str(data["text"]),
                blocks=int(data["blocks"]),
                seq_len=int(data["seq_len"]),
                rows=[_row(raw) for raw in data["rows"]],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ResultFileError(path, f"not an evaluation report ({type(exc).__name__}: {exc})") from exc
        if not report.rows:
            raise ResultFileError(path, "it holds no perplexity rows")
        return report

    @property
    def kinds(self) -> list[str]:
        return list(self.rows[0].by_kind) if self.rows and len(self.rows[0].by_kind) > 1 else []

    def table_lines(self) -> list[str]:
        """A plain table, one row per model: perplexity over all held-out tokens, then per kind of text."""
        kinds = self.kinds
        width = max(len("model"), *(len(row.name) for row in self.rows))
        header = f"{'model':<{width}} {'layers':>6} {'all':>9}" + "".join(f" {k[:10]:>10}" for k in kinds)
        lines = [f"held-out perplexity on {self.text} ({self.blocks} blocks x {self.seq_len} tokens)", header]
        for row in self.rows:
            dropped = ",".join(map(str, row.dropped)) or "-"
            per_kind = "".join(f" {row.by_kind[k]:>10.2f}" for k in kinds)
            lines.append(
                f"{row.name:<{width}} {row.layers:>6} {row.perplexity:>9.2f}{per_kind}  dropped {dropped}"
            )
        return lines + self.verdict_lines()

    def verdict_lines(self) -> list[str]:
        """Whether the merged model beats the best drop baseline on every kind: what users judge first."""
        merged = next((row for row in self.rows if row.name.startswith(MERGED_PREFIX)), None)
        drops = [row for row in self.rows if row.dropped]
        if merged is None or not drops:
            return []
        ratios = ratios_to_best_drop(merged.by_kind, [drop.by_kind for drop in drops])
        worst = max(ratios, key=ratios.__getitem__)
        lost = [kind for kind, ratio in ratios.items() if ratio > 1.0]
        verdict = (
            f"worse than dropping on {', '.join(lost)}" if lost else "better than dropping on every kind"
        )
        return [f"merged / best drop baseline: worst {ratios[worst]:.3f} ({worst}); {verdict}"]


def _row(raw: Any) -> PerplexityRow:
    """A row as ``to_json`` writes it; files older than the per-kind evaluation have no ``by_kind``."""
    return PerplexityRow(
        name=str(raw["name"]),
        layers=int(raw["layers"]),
        perplexity=float(raw["perplexity"]),
        dropped=tuple(int(layer) for layer in raw.get("dropped", ())),
        by_kind={str(kind): float(value) for kind, value in raw.get("by_kind", {}).items()},
    )


def ratios_to_best_drop(
    merged: Mapping[str, float], drops: Sequence[Mapping[str, float]]
) -> dict[str, float]:
    """Per kind, the merged model's perplexity over the best drop baseline's on that kind (below 1: a win)."""
    return {kind: value / min(drop[kind] for drop in drops) for kind, value in merged.items()}
