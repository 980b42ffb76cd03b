"""``analyze``: pull a model and measure how alike its layers are."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from swm_hub.core.atomic import write_errors_reported
from swm_hub.core.options import AnalyzeOptions, ExecutionOptions, check_block_length
from swm_hub.results.similarity import SimilarityReport
from swm_hub.runtime.loading import pull_for
from swm_hub.stages.analyze import analyze_model

DEFAULT_ANALYZE = AnalyzeOptions()
DEFAULT_EXECUTION = ExecutionOptions()


def analyze(
    model: str,
    out_dir: Path | None = None,
    options: AnalyzeOptions = DEFAULT_ANALYZE,
    revision: str | None = None,
    progress: bool = False,
    execution: ExecutionOptions = DEFAULT_EXECUTION,
) -> SimilarityReport:
    """Pull ``model`` and measure how alike its layers are; with ``out_dir``, save JSON and heatmap there."""
    loaded = pull_for(model, revision, execution)
    check_block_length(loaded.config, options.calibration.seq_len)
    with write_errors_reported(out_dir) if out_dir is not None else nullcontext():
        return analyze_model(
            loaded, options.metric, options.calibration, options.max_tokens, out_dir, progress
        )
