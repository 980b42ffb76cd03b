"""``swm-hub compress``: merge redundant layers and write the smaller model, then heal, eval, export, push."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from swm_hub.cli.common import (
    CalibKindsOpt,
    ModelArg,
    OverwriteOpt,
    QuietOpt,
    RevisionOpt,
    calibration_options,
    echo,
    with_calibration,
    with_options,
)
from swm_hub.core import errors
from swm_hub.core.options import (
    HEAL_HELP,
    HELP,
    ExecutionOptions,
    ExportOptions,
    HealOptions,
    MergeOptions,
    PushOptions,
)
from swm_hub.core.progress import configure, quiet_requested

HEAL_FLAGS = (
    "tokens",
    "rank",
    "lr",
    "modules",
    "seq_len",
    "batch_size",
    "seed",
    "hidden_weight",
    "teacher_cache",
    "autocast",
)
"""The heal options ``compress --heal`` offers as ``--heal-*``; the rest keep their defaults (``swm-hub heal`` has all)."""

EXAMPLES = """\b
Examples:
  swm-hub compress smollm2 --target-layers 24 --out smollm2-swm-24L
  swm-hub compress meta-llama/Llama-2-7b-hf --ratio 0.2 --out llama2-swm
  swm-hub compress ./my-model --threshold 0.95 --out my-model-swm
  swm-hub compress smollm2 --method swm-paper --ratio 0.2 --out smollm2-paper
  swm-hub compress smollm2 --target-layers 24 --merge laco --out smollm2-laco
  swm-hub compress smollm2 --plan smollm2-swm-24L/swm_plan.json --out again
  swm-hub compress ./llama-13b --ratio 0.25 --execution layerwise --dtype bfloat16 --out llama-13b-swm
  swm-hub compress smollm2 --target-layers 21 --out smollm2-swm-21L-healed --heal --heal-tokens 100000
"""


@with_options("heal_settings", HealOptions, HEAL_HELP, prefix="heal", only=HEAL_FLAGS)
@with_options("run_on", ExecutionOptions, HELP, names={"mode": "execution"})
@with_calibration
@with_options("target", MergeOptions, HELP)
def compress(
    model: ModelArg,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="folder for the compressed model", show_default=False)
    ],
    plan: Annotated[
        Path | None,
        typer.Option("--plan", help="apply a saved swm_plan.json instead of searching", show_default=False),
    ] = None,
    calib_kinds: CalibKindsOpt = None,
    revision: RevisionOpt = None,
    overwrite: OverwriteOpt = False,
    run_eval: Annotated[
        bool,
        typer.Option("--eval", help="also measure held-out perplexity vs the base model and drop baselines"),
    ] = False,
    export_format: Annotated[
        list[str] | None,
        typer.Option(
            "--export",
            help="also export: onnx (into OUT/onnx) or genai (int4, into OUT/genai)",
            show_default=False,
        ),
    ] = None,
    push_repo: Annotated[
        bool, typer.Option("--push", help="upload the result to the Hub (see 'swm-hub push --help')")
    ] = False,
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="with --push: the Hub repo", show_default=False)
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="with --push: create the repo private")] = False,
    heal_model: Annotated[
        bool, typer.Option("--heal", help="then heal the merged model (see 'swm-hub heal --help')")
    ] = False,
    heal_resume: Annotated[
        bool, typer.Option("--heal-resume", help="continue an interrupted --heal from its checkpoint")
    ] = False,
    quiet: QuietOpt = False,
    target: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    run_on: dict[str, Any] | None = None,
    heal_settings: dict[str, Any] | None = None,
) -> None:
    """Merge runs of redundant consecutive layers and write a smaller model that transformers loads as is.

    Say how much to remove with one of --target-layers, --ratio or --threshold (default: the method's
    threshold). The output folder holds safetensors (sharded above 2 GB), the rewritten config.json, the tokenizer,
    the generation config and swm_plan.json (the windows and every score that chose them).
    """
    target = target or {}
    if plan is not None:
        _refuse_with_plan(
            **{name: target.get(name) for name in ("threshold", "target_layers", "ratio", "merge")}
        )
    progress = configure(quiet_requested(quiet))
    options = MergeOptions(**target, calibration=calibration_options(calib_kinds, calibration))
    execution = ExecutionOptions(**(run_on or {}))
    heal_options = HealOptions(**(heal_settings or {}), execution=replace(execution, mode="whole"))
    export_to = ExportOptions(formats=tuple(export_format)) if export_format else None
    push_to = PushOptions(repo_id=repo_id, private=private) if push_repo else None
    from swm_hub.pipeline.compress import (
        compress as run_compress,  # the stages load once the options are valid
    )
    from swm_hub.stages.heal import HealRequest, HealResult

    result = run_compress(
        model,
        out,
        options,
        plan,
        revision,
        overwrite,
        progress,
        run_eval=run_eval,
        export_to=export_to,
        push_to=push_to,
        execution=execution,
        heal=HealRequest(heal_options, resume=heal_resume) if heal_model else None,
    )
    merged = result.plan
    echo(f"merged windows {merged.windows}: {merged.num_layers} -> {merged.layers_after} layers")
    echo(f"parameters: {result.params_before:,} -> {result.params_after:,}")
    if merged.heal is not None:
        echo(HealResult(None, merged, merged.heal).lines())
    if result.evaluation is not None:
        echo(result.evaluation.table_lines())
    if result.pushed is not None:
        echo(result.pushed.lines())
    echo(f"wrote {result.output_dir}")


def _refuse_with_plan(**given: float | str | None) -> None:
    """A saved plan fixes the windows and the merge rule, so a target or rule given beside it would be ignored."""
    clashing = [f"--{name.replace('_', '-')}" for name, value in given.items() if value is not None]
    if clashing:
        raise errors.InvalidOptionError(
            f"--plan fixes the windows and the merge rule; drop {', '.join(clashing)}, or drop --plan to search again"
        )
