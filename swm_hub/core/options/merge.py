"""What ``compress`` removes and how: the methods, what was measured of each, and the merge options."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from swm_hub.core.errors import InvalidOptionError
from swm_hub.core.merge_rules import MERGE_RULES
from swm_hub.core.options.common import CalibrationOptions


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
