"""The similarity report of the analyze stage: its dataclass, ``similarity.json`` and the heatmap beside it.

The report is plain data, so later stages and the model card read it back with ``SimilarityReport.load``
instead of parsing the file themselves; its readable summary (the layers that look removable, the bright
blocks along the heatmap's diagonal) lives here too, since it needs nothing but the numbers.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from swm_hub.core.errors import ResultFileError
from swm_hub.core.files import SIMILARITY_JSON, SIMILARITY_PNG
from swm_hub.results.schema import SCHEMA_KEY, read_result, result_path

logger = logging.getLogger(__name__)

SCHEMA_VERSION: int = 1
"""1: the fields of ``SimilarityReport``; the release before wrote the same fields without a version."""

JSON_DECIMALS: int = 6
"""CKA of real models differs from 1 in the fourth decimal, so six keep the signal and drop float noise."""

BLOCK_PERCENTILE: float = 0.75
"""Adjacent pairs above this quantile of all adjacent similarities count as "bright" on the heatmap."""

REDUNDANCY_LABEL: str = "1 - cos(in, out)"


@dataclass
class SimilarityReport:
    """Layer-by-layer similarity of one model on calibration text; layers are numbered from 0.

    Attributes:
        model: the model's display name.
        metric: the key of ``PAIRWISE_METRICS`` used for ``matrix``; higher means more similar.
        num_layers: the number of decoder layers ``L``.
        matrix: ``[L, L]`` similarity between the outputs of layers ``i`` and ``j`` over the same tokens.
        io_redundancy: per layer, ``1 - mean cos(input, output)``; lower means it changes its input less.
        angular_to_next: per layer ``l``, the mean angle (over pi) between the inputs of layers ``l`` and
            ``l + 1`` (for the last layer: its output), i.e. how far layer ``l`` turns the residual stream.
        calibration: the text label, samples, seq_len and total tokens the scores were measured on.
    """

    model: str
    metric: str
    num_layers: int
    matrix: list[list[float]]
    io_redundancy: list[float]
    angular_to_next: list[float]
    calibration: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON-ready values, at full precision."""
        return asdict(self)

    def save(self, folder: Path) -> tuple[Path, Path]:
        """Write ``similarity.json`` and ``similarity.png`` into ``folder``, creating it if missing.

        Returns:
            The JSON path and the PNG path.
        """
        # Imported here: matplotlib and torch draw the heatmap; reading a report (the card, push) needs neither.
        import torch

        from swm_hub.results.heatmap import save_heatmap

        folder.mkdir(parents=True, exist_ok=True)
        json_path = folder / SIMILARITY_JSON
        content = {SCHEMA_KEY: SCHEMA_VERSION, **_rounded(self.to_dict())}
        json_path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        png_path = save_heatmap(
            torch.tensor(self.matrix, dtype=torch.float64),
            folder / SIMILARITY_PNG,
            title=f"{self.model}: {self.metric} between layer outputs",
            labels=[str(i) for i in range(self.num_layers)],
            per_layer=self.io_redundancy,
            per_layer_label=REDUNDANCY_LABEL,
        )
        logger.debug("wrote %s and %s", json_path, png_path)
        return json_path, png_path

    @classmethod
    def load(cls, folder_or_path: Path | str) -> SimilarityReport:
        """Read the report that ``save`` wrote (this release's or the previous one's), from its folder or file.

        Raises:
            ResultFileError: the file cannot be read, is not JSON, or is not a similarity report.
            ResultFileVersionError: a newer swm-hub wrote it.
        """
        path = result_path(folder_or_path, SIMILARITY_JSON)
        data = read_result(path, SCHEMA_VERSION)
        names = [item.name for item in fields(cls)]
        if not (isinstance(data, dict) and set(names) <= data.keys() and _typed(data)):
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ResultFileError(
                path, f"not a similarity report: expected fields {sorted(names)}, got {found}"
            )
        return cls(**{name: data[name] for name in names})

    def adjacent_similarity(self) -> list[float]:
        """``matrix[l][l + 1]`` for each layer but the last: how alike each layer's output is to the next."""
        return [self.matrix[i][i + 1] for i in range(self.num_layers - 1)]

    def blocks(self) -> list[tuple[int, int]]:
        """Maximal runs of consecutive layers whose adjacent similarities all exceed the 75th percentile.

        These are the bright squares along the heatmap's diagonal, and the natural merge windows. A run
        ``(first, last)`` includes both ends, so it always spans at least two layers.
        """
        adjacent = self.adjacent_similarity()
        if not adjacent:
            return []
        cut = _percentile(adjacent, BLOCK_PERCENTILE)
        return _runs_above(adjacent, cut)

    def summary_lines(self, top: int = 5) -> list[str]:
        """A few lines a person can read without the heatmap: which layers look removable, and why."""
        lines = [
            f"{self.model}: {self.num_layers} layers (numbered from 0), metric {self.metric}, "
            f"{self.calibration.get('tokens', '?')} calibration tokens from {self.calibration.get('text', '?')}",
            self._redundancy_line(top),
        ]
        if self.num_layers > 1:
            lines.append(self._adjacent_line(top))
            lines.append(self._blocks_line())
        return lines

    def _redundancy_line(self, top: int) -> str:
        """The layers ShortGPT would drop first."""
        order = sorted(range(self.num_layers), key=lambda i: self.io_redundancy[i])[:top]
        listed = ", ".join(f"layer {i} ({self.io_redundancy[i]:.6f})" for i in order)
        return f"most redundant layers, by {REDUNDANCY_LABEL} (lower = changes its input less): {listed}"

    def _adjacent_line(self, top: int) -> str:
        """The neighbours whose outputs the matrix scores as most alike."""
        adjacent = self.adjacent_similarity()
        order = sorted(range(len(adjacent)), key=lambda i: adjacent[i], reverse=True)[:top]
        listed = ", ".join(f"{i}-{i + 1} ({adjacent[i]:.6f})" for i in order)
        return (
            f"most similar adjacent layers, by {self.metric} of their outputs (higher = more alike): {listed}"
        )

    def _blocks_line(self) -> str:
        """The diagonal blocks, with the cut that defines them so the numbers can be checked."""
        cut = _percentile(self.adjacent_similarity(), BLOCK_PERCENTILE)
        found = self.blocks()
        listed = ", ".join(f"layers {a}-{b}" for a, b in found) if found else "none"
        return (
            f"blocks of alike layers (runs where every adjacent {self.metric} exceeds {cut:.6f}, "
            f"the 75th percentile of adjacent pairs): {listed}"
        )


def _typed(data: dict[str, Any]) -> bool:
    """Whether the fields that name what was measured (the card shows them) have their types."""
    return isinstance(data["metric"], str) and isinstance(data["calibration"], dict)


def _rounded(value: Any) -> Any:
    """Round every float in nested lists and dicts, so the JSON stays readable and diffable."""
    if isinstance(value, float):
        return round(value, JSON_DECIMALS)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile, as numpy and torch define it."""
    return float(np.quantile(np.asarray(values, dtype=np.float64), q))


def _runs_above(adjacent: Sequence[float], cut: float) -> list[tuple[int, int]]:
    """Layer ranges ``(first, last)`` covered by consecutive adjacent pairs strictly above ``cut``."""
    runs: list[tuple[int, int]] = []
    start: int | None = None
    for pair, value in enumerate([*adjacent, -math.inf]):
        if value > cut and start is None:
            start = pair
        elif value <= cut and start is not None:
            runs.append((start, pair))
            start = None
    return runs
