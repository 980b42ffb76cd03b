"""The stages in the order a user runs them; each function reads as the recipe it is."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from swm_hub.analyze import SimilarityReport, analyze_model
from swm_hub.calibration import TextSource
from swm_hub.evaluate import evaluate
from swm_hub.merge import MergeResult, merge
from swm_hub.options import CalibrationOptions, MergeOptions
from swm_hub.plan import MergePlan
from swm_hub.pull import pull

DEFAULT_MERGE = MergeOptions()
DEFAULT_CALIBRATION = CalibrationOptions()


def analyze(
    model: str,
    out_dir: Path | None = None,
    metric: str = "linear_cka",
    calibration: CalibrationOptions = DEFAULT_CALIBRATION,
    max_tokens: int = 1024,
    revision: str | None = None,
    progress: bool = False,
) -> SimilarityReport:
    """Pull ``model`` and measure how alike its layers are; with ``out_dir``, save JSON and heatmap there."""
    loaded = pull(model, revision=revision)
    return analyze_model(loaded, metric, calibration, max_tokens, out_dir, progress)


def compress(
    model: str,
    out: Path,
    options: MergeOptions = DEFAULT_MERGE,
    plan_file: Path | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    run_eval: bool = False,
) -> MergeResult:
    """Pull ``model``, merge its redundant windows (or those of a saved plan) and write the result to ``out``.

    With ``run_eval``, the held-out perplexity of the result, the base model and the drop baselines is
    measured and saved as ``eval.json`` beside the model, where the model card finds it.
    """
    plan = MergePlan.from_file(plan_file) if plan_file is not None else None
    loaded = pull(model, revision=revision)
    result = merge(loaded, out, options, plan=plan, overwrite=overwrite, progress=progress)
    if run_eval:
        report = evaluate(out, TextSource(packaged="heldout"), progress=progress, base=loaded)
        report.save(out)
        result = replace(result, evaluation=report)
    return result
