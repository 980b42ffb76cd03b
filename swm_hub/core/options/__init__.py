"""Each command's settings as a frozen dataclass, validated once, with the help text beside the fields.

The CLI builds these from its options and the Python API takes them as they are, so both check the same
things in the same place, before any model is loaded, and a saved plan can record them field by field.
Nothing here loads torch: ``--help`` and ``push`` start without it.
"""

from swm_hub.core.options.analyze import METRICS, AnalyzeOptions, check_analysis, check_metric
from swm_hub.core.options.bench import BACKENDS, BENCH_HELP, Backend, BenchOptions
from swm_hub.core.options.common import (
    DEVICES,
    DTYPE_ALIASES,
    DTYPE_NAMES,
    EXECUTION_MODES,
    HELP,
    CalibrationOptions,
    ExecutionOptions,
    check_block_length,
    dtype_name,
)
from swm_hub.core.options.evaluate import DROP_BASELINES, EVAL_HELP, PAPER_TASKS, EvalOptions
from swm_hub.core.options.export import (
    DEFAULT_PRECISION,
    EXPORT_FORMATS,
    EXPORT_HELP,
    GENAI_PRECISIONS,
    ONNX_DTYPES,
    ExportOptions,
)
from swm_hub.core.options.heal import (
    AUTOCAST_MODES,
    HEAL_HELP,
    MODULE_CHOICES,
    TEACHER_CACHE_MODES,
    HealOptions,
)
from swm_hub.core.options.merge import METHODS, MeasuredCuts, MergeOptions, MethodPreset
from swm_hub.core.options.push import PUSH_HELP, PushOptions

__all__ = [
    "AUTOCAST_MODES",
    "BACKENDS",
    "BENCH_HELP",
    "DEFAULT_PRECISION",
    "DEVICES",
    "DROP_BASELINES",
    "DTYPE_ALIASES",
    "DTYPE_NAMES",
    "EVAL_HELP",
    "EXECUTION_MODES",
    "EXPORT_FORMATS",
    "EXPORT_HELP",
    "GENAI_PRECISIONS",
    "HEAL_HELP",
    "HELP",
    "METHODS",
    "MODULE_CHOICES",
    "METRICS",
    "ONNX_DTYPES",
    "PAPER_TASKS",
    "PUSH_HELP",
    "TEACHER_CACHE_MODES",
    "AnalyzeOptions",
    "Backend",
    "BenchOptions",
    "CalibrationOptions",
    "EvalOptions",
    "ExecutionOptions",
    "ExportOptions",
    "HealOptions",
    "MeasuredCuts",
    "MergeOptions",
    "MethodPreset",
    "PushOptions",
    "check_analysis",
    "check_block_length",
    "check_metric",
    "dtype_name",
]
