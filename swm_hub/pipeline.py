"""The stages in the order a user runs them; each function reads as the recipe it is."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from swm_hub.analyze import SimilarityReport, analyze_model
from swm_hub.calibration import TextSource
from swm_hub.evaluate import evaluate
from swm_hub.exporters import export
from swm_hub.merge import MergeResult, merge
from swm_hub.model_cards import write_card
from swm_hub.options import CalibrationOptions, ExecutionOptions, MergeOptions
from swm_hub.plan import MergePlan
from swm_hub.pull import pull_for
from swm_hub.push import PushResult, push

DEFAULT_MERGE = MergeOptions()
DEFAULT_CALIBRATION = CalibrationOptions()
DEFAULT_EXECUTION = ExecutionOptions()


def analyze(
    model: str,
    out_dir: Path | None = None,
    metric: str = "linear_cka",
    calibration: CalibrationOptions = DEFAULT_CALIBRATION,
    max_tokens: int = 1024,
    revision: str | None = None,
    progress: bool = False,
    execution: ExecutionOptions = DEFAULT_EXECUTION,
) -> SimilarityReport:
    """Pull ``model`` and measure how alike its layers are; with ``out_dir``, save JSON and heatmap there."""
    loaded = pull_for(model, revision, execution)
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
    export_formats: Sequence[str] = (),
    push_to: PushRequest | None = None,
    execution: ExecutionOptions = DEFAULT_EXECUTION,
) -> MergeResult:
    """Pull, merge, then (as asked) evaluate, export, write the model card, and push.

    With ``run_eval``, the held-out perplexity of the result, the base model and the drop baselines is
    measured and saved as ``eval.json`` beside the model. Each format in ``export_formats`` goes to a
    subfolder (``onnx/``). The card (``README.md``) is written last from whatever was measured, so it
    describes exactly what the folder holds, and ``push_to`` uploads the folder in one commit.
    The evaluation runs in the execution mode of the merge: layer-wise, it streams the base model, the
    merged model and the baselines one layer at a time too.
    """
    plan = MergePlan.from_file(plan_file) if plan_file is not None else None
    loaded = pull_for(model, revision, execution)
    result = merge(loaded, out, options, plan=plan, overwrite=overwrite, progress=progress)
    if run_eval:
        report = evaluate(
            out, TextSource(packaged="heldout"), progress=progress, base=loaded, execution=execution
        )
        report.save(out)
        result = replace(result, evaluation=report)
    if export_formats:
        export(out, export_formats)
    write_card(out)
    if push_to is not None:
        result = replace(result, pushed=push_to.run(out))
    return result


@dataclass(frozen=True)
class PushRequest:
    """Where and how ``compress --push`` uploads; the defaults are those of ``swm-hub push``."""

    repo_id: str | None = None
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    dry_run: bool = False

    def run(self, folder: Path) -> PushResult:
        return push(
            folder,
            repo_id=self.repo_id,
            private=self.private,
            revision=self.revision,
            create_pr=self.create_pr,
            commit_message=self.commit_message,
            dry_run=self.dry_run,
        )
