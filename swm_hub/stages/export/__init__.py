"""Exporters: turn a model folder into a deployable format, validated against the torch model.

``export`` dispatches on format names so that ``compress --export onnx`` and ``swm-hub export`` share one
entry point; each format lives in its own module: ``onnx`` (plain ONNX with KV cache) and ``genai``
(onnxruntime-genai's model builder, int4 or float32 on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from swm_hub.core.devices import dtype_name
from swm_hub.core.errors import InvalidOptionError
from swm_hub.stages.export.genai import (
    DEFAULT_PRECISION,
    GENAI_PRECISIONS,
    GenaiExportResult,
    check_genai_options,
    export_genai,
)
from swm_hub.stages.export.onnx import (
    ONNX_DTYPES,
    ExportResult,
    check_onnx_support,
    export_onnx,
    onnx_exportable_model_types,
)
from swm_hub.stages.export.validate import OutputCheck, validate_export

__all__ = [
    "EXPORT_FORMATS",
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

EXPORT_FORMATS: tuple[str, ...] = ("onnx", "genai")


def export(
    model_dir: Path,
    formats: Sequence[str] = ("onnx",),
    out: Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    overwrite: bool = False,
    precision: str | None = None,
) -> dict[str, ExportResult | GenaiExportResult]:
    """Export ``model_dir`` to each format; ``out`` (default ``model_dir/<format>``) needs a single format.

    ``dtype`` is the ONNX export's (float32, or float16 on cuda); ``precision`` is the genai export's (int4,
    the default, or float32). Each is refused with the other format, before any export runs; both take the
    short spellings (fp32, fp16) too.
    """
    unknown = [name for name in formats if name not in EXPORT_FORMATS]
    if unknown:
        raise InvalidOptionError(
            f"unknown export format {', '.join(map(repr, unknown))}; choose from {', '.join(EXPORT_FORMATS)}"
        )
    if out is not None and len(formats) > 1:
        raise InvalidOptionError("--out names one folder, so it needs exactly one export format")
    _check_genai_combination(formats, dtype, device, precision)
    results: dict[str, ExportResult | GenaiExportResult] = {}
    for name in dict.fromkeys(formats):
        if name == "genai":
            chosen = precision or DEFAULT_PRECISION
            results[name] = export_genai(
                model_dir, out=out, precision=chosen, device=device, overwrite=overwrite
            )
        else:
            results[name] = export_onnx(model_dir, out=out, dtype=dtype, device=device, overwrite=overwrite)
    return results


def _check_genai_combination(formats: Sequence[str], dtype: str, device: str, precision: str | None) -> None:
    """``--precision`` belongs to genai and ``--dtype`` to ONNX: an option the export would ignore is an error."""
    if "genai" not in formats:
        if precision is not None:
            raise InvalidOptionError("--precision applies to --format genai; the ONNX export takes --dtype")
        return
    if dtype_name(dtype, allowed=ONNX_DTYPES) != "float32":
        raise InvalidOptionError(
            f"--dtype {dtype} applies to --format onnx; --format genai takes --precision "
            f"{' or '.join(GENAI_PRECISIONS)}"
        )
    check_genai_options(precision or DEFAULT_PRECISION, device)
