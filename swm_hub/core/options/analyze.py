"""What ``analyze`` measures: the similarity metric, how many tokens the matrix samples, and the text."""

from __future__ import annotations

from dataclasses import dataclass, field

from swm_hub.core.errors import InvalidOptionError
from swm_hub.core.options.common import CalibrationOptions

METRICS: tuple[str, ...] = ("linear_cka", "rbf_cka", "cosine", "angular")
"""The similarity metrics by name (``core.similarity.PAIRWISE_METRICS`` computes them)."""


def check_metric(metric: str) -> None:
    """Name the valid metrics, since the name usually comes from a command-line option."""
    if metric not in METRICS:
        raise InvalidOptionError(f"unknown similarity metric {metric!r}; valid metrics: {', '.join(METRICS)}")


def check_analysis(metric: str, max_tokens: int) -> None:
    """Fail before any forward pass, since both values usually come from command-line options."""
    check_metric(metric)
    if max_tokens < 1:
        raise InvalidOptionError(f"max_tokens must be at least 1, got {max_tokens}")


@dataclass(frozen=True)
class AnalyzeOptions:
    """The similarity matrix's metric and token sample, and the calibration text it is measured on."""

    metric: str = "linear_cka"
    max_tokens: int = 1024
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)

    def __post_init__(self) -> None:
        check_analysis(self.metric, self.max_tokens)
