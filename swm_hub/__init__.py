"""swm-hub: make LLMs shallower by Sliding-Window Merging of redundant decoder layers.

The Python API mirrors the command line: ``analyze`` and ``compress`` take a model name (Hub id, folder,
.gguf file or ``smollm2``) and return result objects; the options are frozen dataclasses.
"""

from swm_hub.core.options import CalibrationOptions, ExecutionOptions, MergeOptions
from swm_hub.core.version import __version__
from swm_hub.pipeline import analyze, compress
from swm_hub.results.plan import MergePlan
from swm_hub.results.similarity import SimilarityReport
from swm_hub.stages.merge import MergeResult

__all__ = [
    "CalibrationOptions",
    "ExecutionOptions",
    "MergeOptions",
    "MergePlan",
    "MergeResult",
    "SimilarityReport",
    "__version__",
    "analyze",
    "compress",
]
