"""``swm-hub export``: ONNX with KV cache, or onnxruntime-genai's model, checked against torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from swm_hub.cli.common import QuietOpt, echo, with_options
from swm_hub.core.options import EXPORT_HELP, ExportOptions
from swm_hub.core.progress import configure, quiet_requested

EXAMPLES = """\b
Examples:
  swm-hub export smollm2-swm-24L
  swm-hub export smollm2-swm-24L --out smollm2-swm-24L-onnx --overwrite
  swm-hub export smollm2-swm-24L --format genai
  swm-hub export smollm2-swm-24L --format genai --precision float32 --out smollm2-swm-24L-genai-fp32
"""


@with_options("settings", ExportOptions, EXPORT_HELP)
def export(
    model_dir: Annotated[
        Path, typer.Argument(help="a model folder (e.g. written by swm-hub compress)", show_default=False)
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="output folder (default: MODEL_DIR/onnx or MODEL_DIR/genai)",
            show_default=False,
        ),
    ] = None,
    export_format: Annotated[
        str,
        typer.Option(
            "--format", help="onnx (ONNX with KV cache) or genai (onnxruntime-genai's model builder, CPU)"
        ),
    ] = "onnx",
    quiet: QuietOpt = False,
    settings: dict[str, Any] | None = None,
) -> None:
    """Export to ONNX with KV cache (torch.onnx.export; the names optimum and transformers.js read) and check it.

    Writes onnx/model.onnx (model_fp16.onnx for float16) with config and tokenizer beside it. The check runs
    a prefill and two decoding steps, batch 1 and a left-padded batch 2, through torch and ONNX Runtime
    and prints the largest absolute difference of every output; a difference above the architecture's
    tolerance is an error. Models over 2 GB get their weights in one model.onnx_data file.

    With --format genai, onnxruntime-genai's model builder writes the model for its generator (extra
    [genai]), and the check generates a few tokens greedily with it: float32 logits must match torch's
    within the tolerance; int4 must generate every token, and its agreement with torch is printed.
    """
    configure(quiet_requested(quiet))
    options = ExportOptions(formats=(export_format,), out=out, **(settings or {}))
    from swm_hub.stages import export as exporters  # the stage loads once the options are valid

    result = exporters.export(model_dir, options)[export_format]
    if isinstance(result, exporters.GenaiExportResult):
        echo(result.lines())
        return
    echo([check.line() for check in result.checks])
    echo(f"wrote {result.path} ({result.size_mb:.1f} MB, max abs diff {result.max_abs_diff:.2e})")
