"""``swm-hub heal``: LoRA adapters trained to match the original model, merged into the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from swm_hub.cli.common import DtypeOpt, FolderArg, OverwriteOpt, QuietOpt, echo
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


def heal(
    model_dir: FolderArg,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="folder for the healed model (default: MODEL_DIR-healed)", show_default=False
        ),
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", help=HEAL_HELP["tokens"])] = HealOptions.tokens,
    rank: Annotated[int, typer.Option("--rank", help=HEAL_HELP["rank"])] = HealOptions.rank,
    alpha: Annotated[int, typer.Option("--alpha", help=HEAL_HELP["alpha"])] = HealOptions.alpha,
    lr: Annotated[float, typer.Option("--lr", help=HEAL_HELP["lr"])] = HealOptions.lr,
    modules: Annotated[str, typer.Option("--modules", help=HEAL_HELP["modules"])] = HealOptions.modules,
    seq_len: Annotated[int, typer.Option("--seq-len", help=HEAL_HELP["seq_len"])] = HealOptions.seq_len,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help=HEAL_HELP["batch_size"])
    ] = HealOptions.batch_size,
    seed: Annotated[int, typer.Option("--seed", help=HEAL_HELP["seed"])] = HealOptions.seed,
    hidden_weight: Annotated[
        float, typer.Option("--hidden-weight", help=HEAL_HELP["hidden_weight"])
    ] = HealOptions.hidden_weight,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help=HEAL_HELP["checkpoint_every"])
    ] = HealOptions.checkpoint_every,
    teacher_cache: Annotated[
        str, typer.Option("--teacher-cache", help=HEAL_HELP["teacher_cache"])
    ] = HealOptions.teacher_cache,
    top_k: Annotated[int, typer.Option("--top-k", help=HEAL_HELP["top_k"])] = HealOptions.top_k,
    calib: Annotated[
        Path | None, typer.Option("--calib", help=HEAL_HELP["calib"], show_default=False)
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
    options = HealOptions(
        tokens=tokens,
        rank=rank,
        alpha=alpha,
        lr=lr,
        modules=modules,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        hidden_weight=hidden_weight,
        checkpoint_every=checkpoint_every,
        teacher_cache=teacher_cache,
        top_k=top_k,
        calib=calib,
        execution=ExecutionOptions(device=device, dtype=dtype, mode="whole"),
    )
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
