"""Each stage's settings as a frozen dataclass, validated once, with the help text next to each field.

The CLI builds these from its options and the Python API takes them as they are, so both check the same
things in the same place and a saved plan can record them field by field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from swm_hub.core.calibration import KINDS, TextSource
from swm_hub.core.devices import DTYPES, dtype_name
from swm_hub.core.errors import InvalidOptionError
from swm_hub.core.merge_rules import MERGE_RULES

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
    "execution": "whole (the model in memory), layerwise (one decoder layer at a time from the safetensors "
    "shards; for models larger than memory) or auto (layerwise when the weights would take more than half "
    "of the free memory)",
}

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
EXECUTION_MODES: tuple[str, ...] = ("auto", "whole", "layerwise")


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
class MeasuredCuts:
    """Where a method was measured against plain layer dropping, with the default calibration, on one model.

    Attributes:
        model: the model measured (``benchmarks/quality.py --model``), named in the warnings.
        deepest_win: the largest fraction of the layers removed at which the method measured better than the
            best same-count drop baseline on every held-out kind, left-out kinds included (README
            "Quality"); past it ``compress`` warns.
        losses: ranges (low, high) of removed fractions, exclusive, around a measured count that lost to
            dropping on some kind, with what was measured; ``compress`` warns inside them.
    """

    model: str
    deepest_win: float
    losses: tuple[tuple[float, float, str], ...] = ()


@dataclass(frozen=True)
class MethodPreset:
    """A named choice of how windows are scored and consolidated."""

    score: str
    criterion: str
    merge: str
    default_threshold: float
    summary: str
    measured: Mapping[str, MeasuredCuts] = field(default_factory=dict)
    """What was measured, by the kind of refit the architecture gets (``consolidate.refit_kind``): one
    model stands for the architectures fitted the same way. Where the kind is missing, nothing is claimed."""


METHODS: dict[str, MethodPreset] = {
    "swm-fit": MethodPreset(
        score="influence",
        criterion="absolute",
        merge="fit",
        default_threshold=0.97,
        measured={
            "least-squares": MeasuredCuts(
                model="SmolLM2-135M",
                deepest_win=0.3,
                losses=(
                    (
                        0.1,
                        0.3,
                        "measured worse than angular-distance dropping at 6 of 30 layers on narrative text "
                        "(1.14x its perplexity), and on speeches when they were left out of the calibration",
                    ),
                ),
            ),
            "gradient": MeasuredCuts(model="Gemma 3 270M", deepest_win=5 / 18),
        },
        summary="windows of consecutive layers that each barely change their input (the cosine between what "
        "enters and what leaves every removed layer stays above the threshold; for a layer count, the layers "
        "that change it least, as ShortGPT's block influence ranks them); each window consolidated into the "
        "layer below it with a least-squares refit of the MLP output projection (where a norm follows the MLP, "
        "as in Gemma 2/3: gradient steps on the MLP and norm weights), so the one layer reproduces the "
        "window's output on calibration text",
    ),
    "swm-angular": MethodPreset(
        score="angular",
        criterion="absolute",
        merge="fit",
        default_threshold=0.95,
        summary="windows grown while the cosine between what enters and what leaves the whole window stays "
        "above the threshold, consolidated like swm-fit (the previous default: better on the calibration's "
        "own kinds of text, worse on others)",
    ),
    "swm-paper": MethodPreset(
        score="cosine",
        criterion="absolute",
        merge="laco",
        default_threshold=0.72,
        summary="the paper's rule: windows grown while the cosine between the final hidden states of the "
        "merged and the original model stays above the threshold; LaCo-style parameter consolidation",
    ),
}


@dataclass(frozen=True)
class MergeOptions:
    """How much to remove and how: exactly one of threshold, target_layers and ratio."""

    threshold: float | None = None
    target_layers: int | None = None
    ratio: float | None = None
    method: str = "swm-fit"
    merge: str | None = None
    ridge: float = 0.3
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)

    def __post_init__(self) -> None:
        given = [name for name in ("threshold", "target_layers", "ratio") if getattr(self, name) is not None]
        if len(given) > 1:
            raise InvalidOptionError(
                f"give only one of --threshold, --target-layers, --ratio (got {', '.join(given)})"
            )
        if self.method not in METHODS:
            raise InvalidOptionError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise InvalidOptionError(f"--threshold must be between 0 and 1 (exclusive), got {self.threshold}")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise InvalidOptionError(f"--ratio must be between 0 and 1 (exclusive), got {self.ratio}")
        if self.merge is not None and self.merge not in MERGE_RULES:
            raise InvalidOptionError(
                f"unknown merge rule {self.merge!r}; choose one of {', '.join(MERGE_RULES)}"
            )
        if not math.isfinite(self.ridge) or self.ridge <= 0:
            raise InvalidOptionError(f"--ridge must be a finite number above 0, got {self.ridge}")

    @property
    def preset(self) -> MethodPreset:
        return METHODS[self.method]

    @property
    def merge_rule(self) -> str:
        return self.merge or self.preset.merge


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

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


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
