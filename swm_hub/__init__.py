"""swm-hub: make LLMs shallower by Sliding-Window Merging of redundant decoder layers.

The Python API mirrors the command line: ``analyze`` and ``compress`` take a model name (Hub id, folder,
.gguf file or ``smollm2``) and return result objects; each command's options are a frozen dataclass.

The names are imported on first use: importing any ``swm_hub`` module runs this file first, and a command
that needs no model (``push --dry-run``, ``card``) should not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from swm_hub.core.version import __version__

if TYPE_CHECKING:
    from swm_hub.core.options import (
        AnalyzeOptions,
        BenchOptions,
        CalibrationOptions,
        EvalOptions,
        ExecutionOptions,
        ExportOptions,
        HealOptions,
        MergeOptions,
        PushOptions,
    )
    from swm_hub.pipeline.analyze import analyze
    from swm_hub.pipeline.compress import CompressResult, compress
    from swm_hub.results.plan import MergePlan
    from swm_hub.results.similarity import SimilarityReport
    from swm_hub.stages.merge import MergeResult

_HOMES: dict[str, str] = {
    "AnalyzeOptions": "swm_hub.core.options",
    "BenchOptions": "swm_hub.core.options",
    "CalibrationOptions": "swm_hub.core.options",
    "CompressResult": "swm_hub.pipeline.compress",
    "EvalOptions": "swm_hub.core.options",
    "ExecutionOptions": "swm_hub.core.options",
    "ExportOptions": "swm_hub.core.options",
    "HealOptions": "swm_hub.core.options",
    "MergeOptions": "swm_hub.core.options",
    "PushOptions": "swm_hub.core.options",
    "MergePlan": "swm_hub.results.plan",
    "MergeResult": "swm_hub.stages.merge",
    "SimilarityReport": "swm_hub.results.similarity",
    "analyze": "swm_hub.pipeline.analyze",
    "compress": "swm_hub.pipeline.compress",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'swm_hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "AnalyzeOptions",
    "BenchOptions",
    "CalibrationOptions",
    "CompressResult",
    "EvalOptions",
    "ExecutionOptions",
    "ExportOptions",
    "HealOptions",
    "MergeOptions",
    "PushOptions",
    "MergePlan",
    "MergeResult",
    "SimilarityReport",
    "__version__",
    "analyze",
    "compress",
]
