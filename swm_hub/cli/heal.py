"""``swm-hub heal``: LoRA adapters trained to match the original model, merged into the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from swm_hub.cli.common import DtypeOpt, FolderArg, OverwriteOpt, QuietOpt, echo, with_options
from swm_hub.core.options import HEAL_HELP, ExecutionOptions, HealOptions
from swm_hub.core.progress import configure, quiet_requested
from swm_hub.results.heal import HEAL_FILE, HealComparison

EXAMPLES = """\b
Examples:
  swm-hub heal smollm2-swm-24L
  swm-hub heal smollm2-swm-24L --tokens 500000 --rank 16 --out smollm2-swm-24L-healed
  swm-hub heal smollm2-swm-24L --modules merged --hidden-weight 0.1 --keep-adapter
  swm-hub heal smollm2-swm-24L --calib my-domain.jsonl --lr 1e-3 --seed 1
  swm-hub heal smollm2-swm-24L --resume
  swm-hub heal smollm2-swm-24L --compare
  swm-hub heal ./llama-13b-swm --device cuda --dtype bfloat16 --teacher-cache disk
  swm-hub compress smollm2 --target-layers 21 --out smollm2-swm-21L --heal --heal-tokens 100000

On several GPUs, the same command through accelerate (data-parallel; --batch-size is over all GPUs):
  accelerate launch -m swm_hub heal ./llama-13b-swm --device cuda --dtype bfloat16 --batch-size 16
"""


@with_options("settings", HealOptions, HEAL_HELP)
def heal(
    model_dir: FolderArg,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="folder for the healed model (default: MODEL_DIR-healed)", show_default=False
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue an interrupted heal from its checkpoint")
    ] = False,
    keep_adapter: Annotated[
        bool,
        typer.Option("--keep-adapter", help="also save the LoRA adapter in PEFT's format under OUT/adapter"),
    ] = False,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="also heal the block-influence drop baseline the same way and save held-out perplexity before "
            "and after healing as OUT/heal.json (the card shows it)",
        ),
    ] = False,
    heldout: Annotated[
        Path | None,
        typer.Option(
            "--heldout",
            help="held-out text for --compare (default: the shipped held-out split)",
            show_default=False,
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help=HEAL_HELP["device"])] = ExecutionOptions.device,
    dtype: DtypeOpt = ExecutionOptions.dtype,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    settings: dict[str, Any] | None = None,
) -> None:
    """Recover what merging lost: LoRA adapters trained to match the original model, then merged into the weights.

    The student is the compressed model in MODEL_DIR, the teacher the base model its swm_plan.json names.
    The loss is the KL divergence between their next-token distributions on the plan's calibration text
    (or --calib; never the held-out text), plus --hidden-weight x the hidden-state MSE at each merged
    window's boundary. The healed model is a plain model folder (it loads with AutoModelForCausalLM and
    exports as before); its swm_plan.json records the heal. Ctrl-C stops at the end of a step and writes a
    checkpoint beside the output: --resume continues from it with the same result.
    """
    progress = configure(quiet_requested(quiet))
    execution = ExecutionOptions(device=device, dtype=dtype, mode="whole")
    options = HealOptions(**(settings or {}), execution=execution)
    from swm_hub.pipeline.heal import heal as run_heal  # the stages load once the options are valid

    result = run_heal(
        model_dir, out, options, overwrite, resume, keep_adapter, progress, compare=compare, heldout=heldout
    )
    if result.output_dir is None:  # another process of `accelerate launch` wrote the folder and reports
        return
    echo(result.lines())
    comparison = result.output_dir / HEAL_FILE
    if comparison.is_file():
        echo(HealComparison.load(comparison).table_lines())
    echo(f"wrote {result.output_dir}")
