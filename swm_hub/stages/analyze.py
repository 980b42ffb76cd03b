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
from pathlib import Path

from swm_hub.core.model import LoadedModel
from swm_hub.core.options import CalibrationOptions, check_analysis
from swm_hub.results.similarity import SimilarityReport
from swm_hub.runtime.execution import execution_of
from swm_hub.runtime.tracing import (
    analyze_traces,
    calibration_batches,
    calibration_record,
)

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION: CalibrationOptions = CalibrationOptions()
"""The calibration ``analyze`` uses when given none; a module constant because defaults are evaluated once."""


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
    check_analysis(metric, max_tokens)
    source = calibration.source
    batches = calibration_batches(loaded.tokenizer, calibration, source)
    name = loaded.source.display_name
    with execution_of(loaded).traces(batches, progress) as traces:
        report = analyze_traces(traces, metric, max_tokens, name, calibration_record(source, calibration))
    logger.info("analyzed %s: %d layers, %s", name, report.num_layers, metric)
    if out_dir is not None:
        report.save(out_dir)
    return report
