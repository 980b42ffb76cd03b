"""``compress``: pull, merge, then heal, evaluate, export, write the card and push, as asked; the full recipe."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from swm_hub.core.atomic import check_free_space
from swm_hub.core.model import LoadedModel
from swm_hub.core.options import EvalOptions, ExecutionOptions, ExportOptions, MergeOptions, PushOptions
from swm_hub.pipeline.push import check_push, push_folder
from swm_hub.results.evaluation import EvalReport
from swm_hub.results.plan import MergePlan
from swm_hub.results.push import PushResult
from swm_hub.runtime.checkpoint import output_folder
from swm_hub.runtime.layer_trace import BatchTrace
from swm_hub.runtime.loading import pull_for, pull_written
from swm_hub.stages.card import write_card
from swm_hub.stages.evaluate import drop_choices, evaluate
from swm_hub.stages.export import export
from swm_hub.stages.heal import HealRequest
from swm_hub.stages.merge import MergeResult, merge_into


@dataclass(frozen=True)
class CompressResult(MergeResult):
    """What ``compress`` did: the merge stage's result, and the evaluation and the push when they were asked for."""

    evaluation: EvalReport | None = None
    pushed: PushResult | None = None


DEFAULT_MERGE = MergeOptions()
DEFAULT_EXECUTION = ExecutionOptions()


def compress(
    model: str,
    out: Path,
    options: MergeOptions = DEFAULT_MERGE,
    plan_file: Path | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    run_eval: bool = False,
    export_to: ExportOptions | None = None,
    push_to: PushOptions | None = None,
    execution: ExecutionOptions = DEFAULT_EXECUTION,
    heal: HealRequest | None = None,
) -> CompressResult:
    """Pull, merge, then (as asked) heal, evaluate, export, write the model card, and push.

    What can fail without the model (the output folder, its free space, the push's token and permission)
    is checked before the model is loaded. Everything the run writes (the model, ``eval.json``, ``onnx/``,
    the card) goes into one temporary folder that is moved into place once, at the end, so ``out`` never
    holds a half-finished result; the push then uploads the finished folder in one commit.
    The evaluation runs in the execution mode of the merge: layer-wise, it streams the base model, the
    merged model and the baselines one layer at a time too. The written model is pulled once for the
    evaluation and an ONNX export (see ``runs_written_model``), not by each stage again.
    """
    plan = MergePlan.from_file(plan_file) if plan_file is not None else None
    # The plan is already in memory, so --out may replace the folder it came from; the model and the
    # calibration text are read later.
    inputs = [path for path in (Path(model).expanduser(), options.calibration.text) if path]
    if push_to is not None:
        check_push(push_to)
    if heal is not None:
        heal.check(Path(out), execution)
    with output_folder(out, overwrite, protected=[path for path in inputs if path.exists()]) as temp:
        exports = len(set(export_to.formats)) if export_to is not None else 0
        check_output_space(temp, Path(model).expanduser(), exports)
        loaded = pull_for(model, revision, execution)
        drops: dict[str, list[int]] = {}  # the drop baselines' layers, chosen on the merge's own traces

        def choose_drops(traces: Sequence[BatchTrace], chosen: MergePlan) -> None:
            drops.update(drop_choices(traces, chosen.removed))

        pulled = runs_written_model(run_eval, export_to, loaded)
        merged = merge_into(
            loaded,
            temp,
            options,
            plan,
            progress,
            with_traces=choose_drops if run_eval else None,
            reload=not pulled and heal is None,  # a pull of the folder comes next and checks it
        )
        result = CompressResult(merged.output_dir, merged.plan, merged.params_before, merged.params_after)
        if heal is not None:  # the base model is the teacher; the checkpoints go beside out
            result = replace(result, plan=heal.run(temp, loaded, Path(out), progress).plan)
        written = pull_written(temp, result.plan.layers_after, execution) if pulled else None
        if run_eval:
            report = evaluate(
                temp, EvalOptions(execution=execution), progress, loaded, drops or None, written, result.plan
            )
            report.save(temp)
            result = replace(result, evaluation=report)
        del loaded  # the export needs no base model: its memory goes to the export's own work
        gc.collect()
        if export_to is not None:
            export(temp, export_to, model=written.model if written is not None else None)
        del written  # not held through the push
        write_card(temp, name=Path(out).name)
    result = replace(result, output_dir=Path(out))
    if heal is not None:
        heal.finish(Path(out))
    if push_to is not None:
        result = replace(result, pushed=push_folder(Path(out), push_to))
    return result


def runs_written_model(run_eval: bool, export_to: ExportOptions | None, loaded: LoadedModel) -> bool:
    """Whether the stages after the merge share one pull of the written model (see ``pull_written``).

    The evaluation runs it as the base model ran; an ONNX export traces it whole, so it takes that pull
    only when the model runs whole, and loads the folder itself otherwise. That pull stands for the merge's
    own reload check.
    """
    onnx = export_to is not None and "onnx" in export_to.formats
    return run_eval or (onnx and loaded.streamed is None)


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
