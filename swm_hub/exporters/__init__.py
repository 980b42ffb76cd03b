"""Exporters: turn a model folder into a deployable format, validated against the torch model.

``export`` dispatches on format names so that ``compress --export onnx`` and ``swm-hub export`` share one
entry point; each format lives in its own module. Only ONNX exists today.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from swm_hub.errors import InvalidOptionError
from swm_hub.exporters.onnx import ExportResult, check_onnx_support, export_onnx, onnx_exportable_model_types
from swm_hub.exporters.validate import OutputCheck, validate_export

__all__ = [
    "EXPORT_FORMATS",
    "ExportResult",
    "OutputCheck",
    "check_onnx_support",
    "export",
    "export_onnx",
    "onnx_exportable_model_types",
    "validate_export",
]

EXPORT_FORMATS: tuple[str, ...] = ("onnx",)


def export(
    model_dir: Path,
    formats: Sequence[str] = ("onnx",),
    out: Path | None = None,
    dtype: str = "fp32",
    device: str = "cpu",
    overwrite: bool = False,
) -> dict[str, ExportResult]:
    """Export ``model_dir`` to each format; ``out`` (default ``model_dir/<format>``) needs a single format."""
    unknown = [name for name in formats if name not in EXPORT_FORMATS]
    if unknown:
        raise InvalidOptionError(
            f"unknown export format {', '.join(map(repr, unknown))}; choose from {', '.join(EXPORT_FORMATS)}"
        )
    if out is not None and len(formats) > 1:
        raise InvalidOptionError("--out names one folder, so it needs exactly one export format")
    return {
        name: export_onnx(model_dir, out=out, dtype=dtype, device=device, overwrite=overwrite)
        for name in dict.fromkeys(formats)
    }
