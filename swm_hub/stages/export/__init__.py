"""Exporters: turn a model folder into a deployable format, validated against the torch model.

``export`` dispatches on format names so that ``compress --export onnx`` and ``swm-hub export`` share one
entry point; each format lives in its own module: ``onnx`` (plain ONNX with KV cache) and ``genai``
(onnxruntime-genai's model builder, int4 or float32 on CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from swm_hub.core.options import ExportOptions
from swm_hub.stages.export.genai import GenaiExportResult, export_genai
from swm_hub.stages.export.onnx import (
    ExportResult,
    check_onnx_support,
    export_onnx,
    onnx_exportable_model_types,
)
from swm_hub.stages.export.validate import OutputCheck, validate_export

__all__ = [
    "ExportResult",
    "GenaiExportResult",
    "OutputCheck",
    "check_onnx_support",
    "export",
    "export_genai",
    "export_onnx",
    "onnx_exportable_model_types",
    "validate_export",
]

DEFAULT_EXPORT = ExportOptions()


def export(
    model_dir: Path, options: ExportOptions = DEFAULT_EXPORT, model: Any = None
) -> dict[str, ExportResult | GenaiExportResult]:
    """Export ``model_dir`` to each of the options' formats (``options.out``, default ``model_dir/<format>``).

    The options were checked when they were made (an option the chosen format would ignore is an error), so
    a wrong combination fails before any export runs. ``model`` is the folder's model when the caller holds
    it already: the ONNX export traces and validates against it where it fits (see ``export_onnx``).
    """
    results: dict[str, ExportResult | GenaiExportResult] = {}
    for name in dict.fromkeys(options.formats):
        if name == "genai":
            results[name] = export_genai(
                model_dir,
                out=options.out,
                precision=options.genai_precision,
                device=options.device,
                overwrite=options.overwrite,
            )
        else:
            results[name] = export_onnx(
                model_dir,
                out=options.out,
                dtype=options.dtype,
                device=options.device,
                overwrite=options.overwrite,
                model=model,
            )
    return results
