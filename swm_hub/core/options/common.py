"""The settings several commands share: the calibration text, and where and in which precision a model runs.

The device, dtype and execution vocabulary is defined once here; every command takes the same names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swm_hub.core.errors import InvalidOptionError
from swm_hub.core.texts import KINDS, TextSource

if TYPE_CHECKING:
    from transformers import PretrainedConfig

HELP: dict[str, str] = {
    "calib": "calibration text: a plain-text or JSONL file (a 'text' field per line); default: the shipped corpus",
    "calib_kinds": "comma-separated kinds of the shipped corpus to calibrate on (default: all, "
    "sampled evenly): " + ", ".join(KINDS),
    "samples": "number of calibration blocks (shared evenly by the kinds of the shipped corpus)",
    "seq_len": "tokens per calibration block",
    "batch_size": "calibration blocks per forward pass",
    "metric": "similarity between layer outputs: linear_cka, rbf_cka, cosine or angular",
    "max_tokens": "tokens sampled for the similarity matrix (CKA cost grows with the square of this)",
    "threshold": "similarity a window must keep to be merged, in (0, 1); higher merges less",
    "target_layers": "number of layers the compressed model keeps",
    "ratio": "fraction of the layers to remove, in (0, 1)",
    "method": "window selection and consolidation: swm-fit (default, measured best on unseen kinds of text), "
    "swm-angular (whole-window angles) or swm-paper (the paper's rule)",
    "merge": "consolidation rule, overriding the method's: fit, laco, swm-code, mean or drop",
    "ridge": "regularisation of the fit rule's least-squares refit, relative to the feature energy",
    "device": "where the model runs: cpu, cuda (all visible GPUs through accelerate's device map) or auto "
    "(cuda when a GPU is visible)",
    "dtype": "precision the model is loaded and run in: float32, bfloat16 or float16 (fp32, bf16, fp16 also "
    "accepted); the output is saved in it, or in the checkpoint's own precision where that is narrower (a "
    "float16 model run in float32 stays float16)",
    "overwrite": "replace the output folder if it holds files",
    "execution": "whole (the model in memory), layerwise (one decoder layer at a time from the safetensors "
    "shards; for models larger than memory) or auto (layerwise when the weights would take more than half "
    "of the free memory)",
}

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
EXECUTION_MODES: tuple[str, ...] = ("auto", "whole", "layerwise")
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
"""The precisions every command takes, by torch's names, which are also what the results record."""
DTYPE_ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""The short spellings export and bench took before they shared this vocabulary; still accepted."""


def dtype_name(value: str, flag: str = "--dtype", allowed: Sequence[str] = DTYPE_NAMES) -> str:
    """The canonical name of a precision (an alias becomes its torch name), or an error naming the choices.

    Args:
        value: what the user gave.
        flag: the option to name in the error.
        allowed: the canonical names this command offers (a subset of ``DTYPE_NAMES``, plus e.g. ``int4``).
    """
    name = DTYPE_ALIASES.get(value, value)
    if name not in allowed:
        raise InvalidOptionError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    return name


@dataclass(frozen=True)
class CalibrationOptions:
    """Which text calibrates the model, and how much of it."""

    text: Path | None = None
    samples: int = 32
    seq_len: int = 128
    batch_size: int = 8
    kinds: tuple[str, ...] = KINDS

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 8 or self.batch_size < 1:
            raise InvalidOptionError(
                f"calibration needs samples >= 1, seq_len >= 8 and batch_size >= 1 "
                f"(got {self.samples}, {self.seq_len}, {self.batch_size})"
            )
        unknown = [kind for kind in self.kinds if kind not in KINDS]
        if unknown or not self.kinds:
            raise InvalidOptionError(
                f"--calib-kinds takes kinds of the shipped corpus ({', '.join(KINDS)}), "
                f"got {', '.join(self.kinds) or 'none'}"
            )
        if self.text is not None and self.kinds != KINDS:
            raise InvalidOptionError(
                "--calib-kinds chooses from the shipped corpus; it cannot apply to --calib"
            )

    @property
    def source(self) -> TextSource:
        return TextSource(path=self.text, kinds=self.kinds)

    @classmethod
    def recorded(cls, record: Mapping[str, Any], batch_size: int) -> CalibrationOptions:
        """The calibration a plan or report recorded (see ``analyze.calibration_record``), to run it again."""
        source = TextSource.from_label(str(record["text"]))
        return cls(
            text=source.path,
            samples=int(record["samples"]),
            seq_len=int(record["seq_len"]),
            batch_size=batch_size,
            kinds=source.kinds,
        )


@dataclass(frozen=True)
class ExecutionOptions:
    """Where and how the model runs: the device, the precision, and whole-model or layer-wise execution."""

    device: str = "auto"
    dtype: str = "float32"
    mode: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))  # frozen: the alias is replaced once, here
        for flag, value, allowed in (
            ("--device", self.device, DEVICES),
            ("--execution", self.mode, EXECUTION_MODES),
        ):
            if value not in allowed:
                raise InvalidOptionError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")


def check_block_length(config: PretrainedConfig, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse blocks longer than a model with learned positions has embeddings for (GPT-2's ``n_positions``).

    Such a model indexes its position table with every token's position, so a longer block fails deep in
    the forward pass with an index error; rotary models have no table and no such limit.
    """
    positions = getattr(config, "n_positions", None)
    if isinstance(positions, int) and seq_len > positions:
        raise InvalidOptionError(
            f"{flag} {seq_len} is longer than the {positions} positions this {config.model_type} model has "
            f"(n_positions): use {flag} {positions} or less"
        )
