"""The stages in the order a user runs them; each function reads as the recipe it is."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from swm_hub.core.atomic import check_free_space, write_errors_reported
from swm_hub.core.calibration import TextSource
from swm_hub.core.options import CalibrationOptions, ExecutionOptions, MergeOptions, check_block_length
from swm_hub.results.plan import MergePlan
from swm_hub.results.push import PushResult
from swm_hub.results.similarity import SimilarityReport
from swm_hub.runtime.checkpoint import output_folder
from swm_hub.runtime.loading import pull_for
from swm_hub.stages.analyze import analyze_model
from swm_hub.stages.card import render_card, write_card
from swm_hub.stages.evaluate import evaluate
from swm_hub.stages.export import export
from swm_hub.stages.heal import HealRequest
from swm_hub.stages.merge import MergeResult, merge_into
from swm_hub.stages.push import push
from swm_hub.stages.push.checks import check_push_access

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
    check_block_length(loaded.config, calibration.seq_len)
    with write_errors_reported(out_dir) if out_dir is not None else nullcontext():
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
    heal: HealRequest | None = None,
) -> MergeResult:
    """Pull, merge, then (as asked) heal, evaluate, export, write the model card, and push.

    What can fail without the model (the output folder, its free space, the push's token and permission)
    is checked before the model is loaded. Everything the run writes (the model, ``eval.json``, ``onnx/``,
    the card) goes into one temporary folder that is moved into place once, at the end, so ``out`` never
    holds a half-finished result; the push then uploads the finished folder in one commit.
    The evaluation runs in the execution mode of the merge: layer-wise, it streams the base model, the
    merged model and the baselines one layer at a time too.
    """
    plan = MergePlan.from_file(plan_file) if plan_file is not None else None
    # The plan is already in memory, so --out may replace the folder it came from; the model and the
    # calibration text are read later.
    inputs = [path for path in (Path(model).expanduser(), options.calibration.text) if path]
    if push_to is not None:
        push_to.check()
    if heal is not None:
        heal.check(Path(out), execution)
    with output_folder(out, overwrite, protected=[path for path in inputs if path.exists()]) as temp:
        check_output_space(temp, Path(model).expanduser(), len(export_formats))
        loaded = pull_for(model, revision, execution)
        result = merge_into(loaded, temp, options, plan=plan, progress=progress)
        if heal is not None:  # the base model is the teacher; the checkpoints go beside out
            result = replace(result, plan=heal.run(temp, loaded, Path(out), progress).plan)
        if run_eval:
            report = evaluate(
                temp, TextSource(split="heldout"), progress=progress, base=loaded, execution=execution
            )
            report.save(temp)
            result = replace(result, evaluation=report)
        if export_formats:
            export(temp, export_formats)
        write_card(temp, name=Path(out).name)
    result = replace(result, output_dir=Path(out))
    if heal is not None:
        heal.finish(Path(out))
    if push_to is not None:
        result = replace(result, pushed=push_to.run(Path(out)))
    return result


def check_output_space(folder: Path, model: Path, exports: int) -> None:
    """Refuse a run whose output will not fit, where the input's size on disk tells (a local folder).

    The output has fewer layers than the input and is never stored wider than the checkpoint, so the
    input's weights bound the model; an export holds another copy of them.
    """
    if not model.is_dir():
        return
    weights = sum(path.stat().st_size for path in model.glob("*.safetensors"))
    weights += sum(path.stat().st_size for path in model.glob("*.bin"))
    check_free_space(folder, weights * (1 + exports), f"the compressed model ({model.name})")


@dataclass(frozen=True)
class PushRequest:
    """Where and how ``compress --push`` uploads; the defaults are those of ``swm-hub push``."""

    repo_id: str | None = None
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    dry_run: bool = False

    def check(self) -> None:
        """Refuse a push that cannot succeed (no token, no write access) before any work is done."""
        check_push_access(self.repo_id, dry_run=self.dry_run)

    def run(self, folder: Path) -> PushResult:
        return push(
            folder,
            repo_id=self.repo_id,
            private=self.private,
            revision=self.revision,
            create_pr=self.create_pr,
            commit_message=self.commit_message,
            dry_run=self.dry_run,
            card=render_card,
        )
