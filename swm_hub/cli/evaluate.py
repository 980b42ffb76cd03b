"""``swm-hub eval``: held-out perplexity beside the base model and plain layer dropping, and zero-shot tasks."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from swm_hub.cli.common import (
    FolderArg,
    JsonOpt,
    QuietOpt,
    echo,
    with_options,
)
from swm_hub.core.options import EVAL_HELP, HELP, EvalOptions, ExecutionOptions
from swm_hub.core.progress import configure, quiet_requested

EXAMPLES = """\b
Examples:
  swm-hub eval smollm2-swm-24L
  swm-hub eval smollm2-swm-24L --baseline drop-bi --json eval.json
  swm-hub eval smollm2-swm-24L --text my-heldout.txt --seq-len 512 --blocks 32
  swm-hub eval smollm2-swm-24L --zero-shot paper
  swm-hub eval smollm2-swm-24L --zero-shot my_task --task-dir my-tasks --limit 100
  swm-hub eval llama-13b-swm --execution layerwise
"""


@with_options("run_on", ExecutionOptions, HELP, names={"mode": "execution"})
@with_options("settings", EvalOptions, EVAL_HELP, only=("text", "seq_len", "blocks", "task_dir", "limit"))
def evaluate(
    model_dir: FolderArg,
    baseline: Annotated[
        list[str] | None, typer.Option("--baseline", help=EVAL_HELP["baselines"], show_default=False)
    ] = None,
    json_file: JsonOpt = None,
    zero_shot_tasks: Annotated[
        str | None, typer.Option("--zero-shot", help=EVAL_HELP["zero_shot"], show_default=False)
    ] = None,
    quiet: QuietOpt = False,
    run_on: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> None:
    """Held-out perplexity of a compressed model, its base model, and plain layer dropping at the same count.

    The base model and the number of removed layers come from the folder's swm_plan.json; the drop baselines
    remove as many layers from the same base model by ShortGPT's Block Influence (drop-bi) or PruneMe's
    angular distance (drop-angular), so the table shows what merging bought. With --execution layerwise the
    perplexities are computed one decoder layer at a time, for models larger than memory.
    """
    progress = configure(quiet_requested(quiet))
    options = EvalOptions(
        **(settings or {}),
        baselines=EvalOptions.baselines_given(baseline),
        zero_shot=EvalOptions.tasks_given(zero_shot_tasks),
        execution=ExecutionOptions(**(run_on or {})),
    )
    from swm_hub.stages.evaluate import (
        evaluate as run_evaluation,  # the stage loads once the options are valid
    )
    from swm_hub.stages.evaluate.zeroshot import zero_shot

    report = run_evaluation(model_dir, options, progress=progress)
    echo(report.table_lines())
    if json_file is not None:
        json_file.write_text(report.to_json(), encoding="utf-8")
        echo(f"wrote {json_file}")
    if options.zero_shot:
        scores = zero_shot(model_dir, options.zero_shot, task_dir=options.task_dir, limit=options.limit)
        echo(scores.table_lines())
        echo(f"wrote {scores.save(model_dir)}")
