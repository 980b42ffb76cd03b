"""The analyze stage: how alike the decoder layers of a model are, as numbers and as a heatmap.

Sliding-Window Merging rests on the observation that consecutive layers often compute nearly the same
function, which shows as bright blocks along the diagonal of a layer-by-layer similarity matrix. This stage
measures that matrix on calibration text, together with two per-layer scores the pruning literature ranks
layers by (ShortGPT's input/output redundancy and PruneMe's angular distance), so a user can see where the
redundancy is before anything is merged. The report is plain data: it is saved as JSON beside the PNG and
read back by later stages and by the model card.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from swm_hub.calibration import TextSource, blocks_by_kind
from swm_hub.errors import InvalidOptionError
from swm_hub.heatmap import save_heatmap
from swm_hub.layer_trace import BatchTrace, flat_hidden, trace_batch
from swm_hub.layerwise import activation_cache, trace_layerwise
from swm_hub.options import CalibrationOptions
from swm_hub.pull import LoadedModel
from swm_hub.similarity import (
    PAIRWISE_METRICS,
    angular_distance,
    io_redundancy,
    sample_rows,
    similarity_matrix,
)

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION: CalibrationOptions = CalibrationOptions()
"""The calibration ``analyze`` uses when given none; a module constant because defaults are evaluated once."""

JSON_NAME: str = "similarity.json"
PNG_NAME: str = "similarity.png"
JSON_DECIMALS: int = 6
"""CKA of real models differs from 1 in the fourth decimal, so six keep the signal and drop float noise."""

BLOCK_PERCENTILE: float = 0.75
"""Adjacent pairs above this quantile of all adjacent similarities count as "bright" on the heatmap."""

REDUNDANCY_LABEL: str = "1 - cos(in, out)"


# --- calibration -----------------------------------------------------------------------------------------


def calibration_batches(
    tokenizer: Any, options: CalibrationOptions, source: TextSource | None = None
) -> list[torch.Tensor]:
    """Token blocks of the calibration text, cut into the batches one forward pass takes.

    The merge stage calls this too, so that analysis and merging see exactly the same tokens.

    Args:
        tokenizer: the model's tokenizer.
        options: how many blocks of how many tokens, and of which text (by default every kind of the
            shipped corpus, evenly).
        source: a text to read instead of the one ``options`` names (e.g. the held-out text).

    Returns:
        ``[batch, seq_len]`` tensors of token ids, ``options.samples`` rows in all.

    Raises:
        CalibrationDataError: the text cannot be read or is too short for the blocks asked for.
    """
    text_source = source if source is not None else options.source
    blocks = torch.cat(
        list(blocks_by_kind(tokenizer, text_source, options.samples, options.seq_len).values())
    )
    size = options.batch_size
    return [blocks[start : start + size] for start in range(0, blocks.shape[0], size)]


def trace_calibration(model: nn.Module, batches: Sequence[torch.Tensor], progress: bool) -> list[BatchTrace]:
    """What enters every decoder layer, batch by batch; the bar matters for large models on a CPU."""
    return [
        trace_batch(model, batch)
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress, leave=False)
    ]


@contextmanager
def traced_calibration(
    loaded: LoadedModel, batches: Sequence[torch.Tensor], progress: bool
) -> Iterator[list[BatchTrace]]:
    """The traces of ``batches``, whole-model or layer-wise as the model was loaded.

    Layer-wise traces read their hidden states from a disk cache that lives as long as the block, so use
    them inside it. No batches means no traces, and no layer is loaded.
    """
    if not batches:
        yield []
    elif loaded.streamed is None:
        yield trace_calibration(loaded.model, batches, progress)
    else:
        with activation_cache(loaded.streamed.device) as cache:
            yield trace_layerwise(loaded.model, loaded.streamed, batches, cache, progress)


def calibration_record(source: TextSource, options: CalibrationOptions) -> dict[str, Any]:
    """What the report says about its data, so a figure can be reproduced and compared."""
    return {
        "text": source.label,
        "samples": options.samples,
        "seq_len": options.seq_len,
        "tokens": options.samples * options.seq_len,
    }


# --- the report ------------------------------------------------------------------------------------------


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
        folder.mkdir(parents=True, exist_ok=True)
        json_path = folder / JSON_NAME
        json_path.write_text(json.dumps(_rounded(self.to_dict()), indent=2) + "\n", encoding="utf-8")
        png_path = save_heatmap(
            torch.tensor(self.matrix, dtype=torch.float64),
            folder / PNG_NAME,
            title=f"{self.model}: {self.metric} between layer outputs",
            labels=[str(i) for i in range(self.num_layers)],
            per_layer=self.io_redundancy,
            per_layer_label=REDUNDANCY_LABEL,
        )
        logger.debug("wrote %s and %s", json_path, png_path)
        return json_path, png_path

    @classmethod
    def from_json(cls, path: Path) -> SimilarityReport:
        """Read a report that ``save`` wrote.

        Raises:
            ValueError: the file is not JSON or lacks fields (a ``json.JSONDecodeError`` is a ValueError).
            OSError: the file cannot be read.
        """
        data = json.loads(path.read_text(encoding="utf-8"))
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not names <= data.keys():
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"{path} is not a similarity report: expected fields {sorted(names)}, got {found}"
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
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


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


# --- computing the report --------------------------------------------------------------------------------


def _check_request(metric: str, max_tokens: int) -> None:
    """Fail before any forward pass, since both values usually come from command-line options."""
    if metric not in PAIRWISE_METRICS:
        raise InvalidOptionError(
            f"unknown similarity metric {metric!r}; valid metrics: {', '.join(PAIRWISE_METRICS)}"
        )
    if max_tokens < 1:
        raise InvalidOptionError(f"max_tokens must be at least 1, got {max_tokens}")


def _layer_pairs(traces: Sequence[BatchTrace]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of each layer in turn, flattening each position once and holding two at a time."""
    positions = (flat_hidden(traces, k) for k in range(len(traces[0].hidden)))
    return pairwise(positions)


def analyze_traces(
    traces: Sequence[BatchTrace], metric: str, max_tokens: int, model_name: str, calibration: dict[str, Any]
) -> SimilarityReport:
    """The report for recorded traces; pure, so tests and other stages can call it without a model.

    The per-layer scores use every token; the matrix uses at most ``max_tokens`` of them, the same rows for
    every layer, because CKA needs paired rows and each layer's kernel costs ``max_tokens^2`` floats (the
    matrix holds a bounded number of them at once, see ``similarity_matrix``).

    Raises:
        InvalidOptionError: an unknown metric, or ``max_tokens`` below 1.
        ValueError: no traces, or too few tokens for the metric (CKA needs four).
    """
    _check_request(metric, max_tokens)
    if not traces:
        raise ValueError("no calibration traces to analyze")
    outputs: list[torch.Tensor] = []
    redundancy: list[float] = []
    angular: list[float] = []
    for layer_in, layer_out in _layer_pairs(traces):
        redundancy.append(io_redundancy(layer_in, layer_out))
        angular.append(angular_distance(layer_in, layer_out))
        outputs.append(sample_rows(layer_out, max_tokens))
    matrix = similarity_matrix(outputs, metric)
    return SimilarityReport(
        model=model_name,
        metric=metric,
        num_layers=len(outputs),
        matrix=matrix.tolist(),
        io_redundancy=redundancy,
        angular_to_next=angular,
        calibration=dict(calibration),
    )


def analyze_model(
    loaded: LoadedModel,
    metric: str = "linear_cka",
    calibration: CalibrationOptions = DEFAULT_CALIBRATION,
    max_tokens: int = 1024,
    out_dir: Path | None = None,
    progress: bool = False,
) -> SimilarityReport:
    """The analyze stage: calibration batches, one traced forward pass each, then the report.

    Args:
        loaded: the model and tokenizer from the pull stage.
        metric: a key of ``PAIRWISE_METRICS`` for the matrix.
        calibration: which text and how many tokens of it.
        max_tokens: tokens sampled for the matrix (the per-layer scores use all of them).
        out_dir: if given, ``similarity.json`` and ``similarity.png`` are written there (created if
            missing; other files in it are left alone).
        progress: show a progress bar over the batches.

    Raises:
        InvalidOptionError: an unknown metric or ``max_tokens`` below 1, before the model runs.
        CalibrationDataError: the text cannot be read or is too short.
    """
    _check_request(metric, max_tokens)
    source = calibration.source
    batches = calibration_batches(loaded.tokenizer, calibration, source)
    name = loaded.source.display_name
    with traced_calibration(loaded, batches, progress) as traces:
        report = analyze_traces(traces, metric, max_tokens, name, calibration_record(source, calibration))
    logger.info("analyzed %s: %d layers, %s", name, report.num_layers, metric)
    if out_dir is not None:
        report.save(out_dir)
    return report
