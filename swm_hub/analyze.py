"""The analyze stage: how alike the decoder layers of a model are, as numbers and as a heatmap.

Sliding-Window Merging rests on the observation that consecutive layers often compute nearly the same
function, which shows as bright blocks along the diagonal of a layer-by-layer similarity matrix. This stage
measures that matrix on calibration text, together with two per-layer scores the pruning literature ranks
layers by (ShortGPT's input/output redundancy and PruneMe's angular distance), so a user can see where the
redundancy is before anything is merged. The report (``results.similarity``) is plain data: it is saved as JSON
beside the PNG and read back by later stages and by the model card.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from swm_hub.errors import InvalidOptionError
from swm_hub.layer_trace import BatchTrace, flat_hidden
from swm_hub.options import CalibrationOptions
from swm_hub.pull import LoadedModel
from swm_hub.results.similarity import SimilarityReport
from swm_hub.similarity import (
    PAIRWISE_METRICS,
    angular_distance,
    io_redundancy,
    sample_rows,
    similarity_matrix,
)
from swm_hub.tracing import calibration_batches, calibration_record, traced_calibration

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION: CalibrationOptions = CalibrationOptions()
"""The calibration ``analyze`` uses when given none; a module constant because defaults are evaluated once."""


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
