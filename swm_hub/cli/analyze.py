"""``swm-hub analyze``: how alike the decoder layers are."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from swm_hub.cli.common import (
    CalibKindsOpt,
    ModelArg,
    QuietOpt,
    RevisionOpt,
    calibration_options,
    echo,
    with_calibration,
    with_options,
)
from swm_hub.core.options import HELP, AnalyzeOptions, ExecutionOptions
from swm_hub.core.progress import configure, quiet_requested

EXAMPLES = """\b
Examples:
  swm-hub analyze smollm2
  swm-hub analyze Qwen/Qwen2.5-0.5B --metric rbf_cka --out qwen-analysis
  swm-hub analyze ./my-model --calib notes.txt --samples 16
"""


@with_calibration
@with_options("run_on", ExecutionOptions, HELP, names={"mode": "execution"})
@with_options("settings", AnalyzeOptions, HELP)
def analyze(
    model: ModelArg,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="folder for similarity.json and similarity.png")
    ] = None,
    calib_kinds: CalibKindsOpt = None,
    revision: RevisionOpt = None,
    quiet: QuietOpt = False,
    calibration: dict[str, Any] | None = None,
    run_on: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> None:
    """Measure how alike the decoder layers are: a similarity matrix, per-layer redundancy, and a heatmap.

    Writes similarity.json and similarity.png (default folder: <model name>-analysis) and prints where
    the redundant layers are.
    """
    progress = configure(quiet_requested(quiet))
    options = AnalyzeOptions(**(settings or {}), calibration=calibration_options(calib_kinds, calibration))
    execution = ExecutionOptions(**(run_on or {}))
    folder = out or Path(f"{Path(model.split('@')[0]).name.removesuffix('.gguf')}-analysis")
    from swm_hub.pipeline.analyze import analyze as run_analysis  # the stages load once the options are valid

    report = run_analysis(model, folder, options, revision, progress, execution)
    echo(report.summary_lines())
    echo(f"wrote {folder / 'similarity.json'} and {folder / 'similarity.png'}")
