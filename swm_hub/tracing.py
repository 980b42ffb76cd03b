"""Calibration traces of a loaded model: the token blocks, and what enters every decoder layer on them.

Analysis, merging, evaluation's drop baselines and healing all run the model over the same calibration
blocks; this module is below those stages so that they share one definition of the blocks and of tracing,
whole-model or layer-wise as the model was loaded, without importing one another.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from swm_hub.calibration import TextSource, blocks_by_kind
from swm_hub.layer_trace import BatchTrace, trace_batch
from swm_hub.layerwise import activation_cache, trace_layerwise
from swm_hub.options import CalibrationOptions

if TYPE_CHECKING:
    from swm_hub.pull import LoadedModel


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
