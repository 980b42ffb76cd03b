"""Calibration traces of a loaded model: the token blocks, and what enters every decoder layer on them.

Analysis, merging, evaluation's drop baselines and healing all run the model over the same calibration
blocks; this module is below those stages so that they share one definition of the blocks and of tracing
without importing one another (``execution`` traces a model whole or layer-wise as it was pulled).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from swm_hub.core.calibration import blocks_by_kind
from swm_hub.core.options import CalibrationOptions, check_analysis
from swm_hub.core.similarity import (
    angular_distance,
    io_redundancy,
    sample_rows,
    similarity_matrix,
)
from swm_hub.core.texts import TextSource
from swm_hub.results.similarity import SimilarityReport
from swm_hub.runtime.layer_trace import BatchTrace, flat_hidden, trace_batch


def calibration_batches(
    tokenizer: Any, options: CalibrationOptions, source: TextSource | None = None
) -> list[torch.Tensor]:
    """Token blocks of the calibration text, cut into the batches one forward pass takes.

    Every stage that calibrates calls this, so that analysis and merging see exactly the same tokens.

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


def calibration_record(source: TextSource, options: CalibrationOptions) -> dict[str, Any]:
    """What the report says about its data, so a figure can be reproduced and compared."""
    return {
        "text": source.label,
        "samples": options.samples,
        "seq_len": options.seq_len,
        "tokens": options.samples * options.seq_len,
    }


# --- the similarity report of traces --------------------------------------------------------------------------------


def _layer_pairs(traces: Sequence[BatchTrace]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of each layer in turn, flattening each position once and holding two at a time."""
    positions = (flat_hidden(traces, k) for k in range(len(traces[0].hidden)))
    return pairwise(positions)


def analyze_traces(
    traces: Sequence[BatchTrace], metric: str, max_tokens: int, model_name: str, calibration: dict[str, Any]
) -> SimilarityReport:
    """The report for recorded traces; pure, so the analyze and merge stages and tests share it without a model.

    The per-layer scores use every token; the matrix uses at most ``max_tokens`` of them, the same rows for
    every layer, because CKA needs paired rows and each layer's kernel costs ``max_tokens^2`` floats (the
    matrix holds a bounded number of them at once, see ``similarity_matrix``).

    Raises:
        InvalidOptionError: an unknown metric, or ``max_tokens`` below 1.
        ValueError: no traces, or too few tokens for the metric (CKA needs four).
    """
    check_analysis(metric, max_tokens)
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
