"""How ``export`` writes a model: ONNX with KV cache, or onnxruntime-genai's model, and in which precision."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from swm_hub.core.errors import InvalidOptionError
from swm_hub.core.options.common import HELP, dtype_name

EXPORT_FORMATS: tuple[str, ...] = ("onnx", "genai")
ONNX_DTYPES: tuple[str, ...] = ("float32", "float16")
GENAI_PRECISIONS: tuple[str, ...] = ("int4", "float32")
DEFAULT_PRECISION: str = "int4"
GENAI_DEVICE: str = "cpu"
"""The genai export is built for onnxruntime-genai's CPU provider."""
EXPORT_HELP: dict[str, str] = {
    "dtype": "onnx: float32, or float16 (needs --device cuda); fp32, fp16 also accepted",
    "precision": "genai: int4 (default, 4-bit weights) or float32 (fp32 also accepted)",
    "device": "cpu or cuda",
    "overwrite": HELP["overwrite"],
}


def check_genai_options(precision: str, device: str) -> str:
    """The precision's canonical name (``fp32`` is ``float32``); what the genai export cannot do is refused.

    Called before any work, so that a wrong precision or device costs nothing.
    """
    precision = dtype_name(precision, flag="--precision", allowed=GENAI_PRECISIONS)
    if device != GENAI_DEVICE:
        raise InvalidOptionError(
            f"the genai export is built for onnxruntime-genai's CPU provider, not {device!r}: use --device cpu"
        )
    return precision


@dataclass(frozen=True)
class ExportOptions:
    """The formats to write and their settings; an option that the chosen format would ignore is an error.

    ``dtype`` is the ONNX export's (float32, or float16 on cuda); ``precision`` is the genai export's (int4,
    the default, or float32). Both take the short spellings (fp32, fp16), replaced here by the full names.
    """

    formats: tuple[str, ...] = ("onnx",)
    out: Path | None = None
    dtype: str = "float32"
    device: str = "cpu"
    overwrite: bool = False
    precision: str | None = None

    def __post_init__(self) -> None:
        unknown = [name for name in self.formats if name not in EXPORT_FORMATS]
        if unknown or not self.formats:
            raise InvalidOptionError(
                f"unknown export format {', '.join(map(repr, unknown)) or '(none)'}; "
                f"choose from {', '.join(EXPORT_FORMATS)}"
            )
        if self.out is not None and len(set(self.formats)) > 1:
            raise InvalidOptionError("--out names one folder, so it needs exactly one export format")
        object.__setattr__(self, "dtype", dtype_name(self.dtype, allowed=ONNX_DTYPES))
        if self.precision is not None:
            precision = dtype_name(self.precision, flag="--precision", allowed=GENAI_PRECISIONS)
            object.__setattr__(self, "precision", precision)
        self._check_genai_combination()

    def _check_genai_combination(self) -> None:
        if "genai" not in self.formats:
            if self.precision is not None:
                raise InvalidOptionError(
                    "--precision applies to --format genai; the ONNX export takes --dtype"
                )
            return
        if self.dtype != "float32":
            raise InvalidOptionError(
                f"--dtype {self.dtype} applies to --format onnx; --format genai takes --precision "
                f"{' or '.join(GENAI_PRECISIONS)}"
            )
        check_genai_options(self.genai_precision, self.device)

    @property
    def genai_precision(self) -> str:
        return self.precision or DEFAULT_PRECISION
