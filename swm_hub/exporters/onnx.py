"""Export a model folder to ONNX with its KV cache, and prove the export right before it lands.

optimum's ``main_export`` does the export for the ``text-generation-with-past`` task: one ``model.onnx``
whose inputs carry ``past_key_values.{i}.key/value`` and whose outputs carry ``present.{i}.key/value``, plus
the config and tokenizer files ``ORTModelForCausalLM`` needs. What optimum can export is asked of optimum
itself (its ``TasksManager`` and the minimum transformers version of the type's ONNX config); what swm-hub
accepts is asked of the registry. The export goes into a temporary folder beside the target, is validated
against torch there (``validate.validate_export``), and only then moves into place, so a failed or
mismatching export never replaces a good one.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version

from swm_hub.architectures import ARCHITECTURES, ArchitectureSpec
from swm_hub.checkpoint import output_folder
from swm_hub.errors import (
    ExportUnsupportedError,
    InvalidOptionError,
    MissingDependencyError,
)
from swm_hub.exporters.validate import (
    OutputCheck,
    check_device,
    ort_provider,
    require_onnx_runtime,
    torch_dtype_for,
    validate_export,
)
from swm_hub.pull import CONFIG_FILE, read_config_json, resolve_source

__all__ = [
    "EXTERNAL_DATA_SUFFIX",
    "ONNX_DTYPES",
    "ONNX_TASK",
    "ExportResult",
    "check_onnx_support",
    "export_onnx",
    "onnx_exportable_model_types",
]

logger = logging.getLogger(__name__)

ONNX_TASK: str = "text-generation-with-past"
ONNX_DTYPES: tuple[str, ...] = ("fp32", "fp16")
DEFAULT_SUBFOLDER: str = "onnx"
# optimum gathers all external tensors of ``model.onnx`` into this one file beside it.
EXTERNAL_DATA_SUFFIX: str = ".onnx_data"
_OPTIMUM_EXPORTER: str = "onnx"
_LIBRARY: str = "transformers"


@dataclass(frozen=True)
class ExportResult:
    """What ``export_onnx`` wrote and how well it matched torch.

    Attributes:
        model_dir: the exported model folder.
        path: the folder holding ``model.onnx`` (and ``model.onnx_data`` when weights live outside it),
            the config and the tokenizer: what ``ORTModelForCausalLM.from_pretrained`` and ``bench`` read.
        model_type: the config's ``model_type``.
        layers: the number of decoder layers.
        dtype: ``fp32`` or ``fp16``.
        device: the device the export was traced and validated on.
        files: file names in ``path``, sorted.
        external_data: whether the weights are stored outside ``model.onnx`` (models over 2 GB).
        size_mb: the folder's total size in MB.
        checks: one validation check per output (logits, each present key/value, a decode step).
        seconds: wall time of export plus validation.
    """

    model_dir: Path
    path: Path
    model_type: str
    layers: int
    dtype: str
    device: str
    files: tuple[str, ...]
    external_data: bool
    size_mb: float
    checks: tuple[OutputCheck, ...]
    seconds: float

    @property
    def max_abs_diff(self) -> float:
        """The largest difference over all outputs."""
        return max((check.max_abs_diff for check in self.checks), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (paths as strings)."""
        return {
            "model_dir": str(self.model_dir),
            "path": str(self.path),
            "model_type": self.model_type,
            "layers": self.layers,
            "dtype": self.dtype,
            "device": self.device,
            "files": list(self.files),
            "external_data": self.external_data,
            "size_mb": self.size_mb,
            "max_abs_diff": self.max_abs_diff,
            "checks": [check.to_dict() for check in self.checks],
            "seconds": self.seconds,
        }


def export_onnx(
    model_dir: Path,
    out: Path | None = None,
    dtype: str = "fp32",
    device: str = "cpu",
    overwrite: bool = False,
    atol: float | None = None,
) -> ExportResult:
    """Export the model folder ``model_dir`` to ONNX with KV cache, validated against torch.

    ``out`` defaults to ``model_dir/onnx``. Models over 2 GB cannot live in one ONNX protobuf: the torch
    exporter then writes their weights as external data, and optimum gathers them into a single
    ``model.onnx_data`` file beside ``model.onnx`` (``convert.export_pytorch``; ``FORCE_ONNX_EXTERNAL_DATA=1``
    forces it for any size). ONNX Runtime finds that file by its relative name, so the folder must move as a
    whole. ``fp16`` needs ``device="cuda"``: the export is traced and validated on the GPU, since CPU kernels
    for float16 are missing or slow in both torch and ONNX Runtime (older optimum enforced the same rule;
    optimum-onnx 0.1.0 no longer checks it).

    Args:
        model_dir: a model folder (config.json, safetensors, tokenizer), or a Hub id (then ``out`` is needed).
        out: the folder to create; refused when it holds files, unless ``overwrite``.
        dtype: ``fp32`` or ``fp16``.
        device: ``cpu`` or ``cuda``.
        overwrite: replace a non-empty ``out`` (only once the new export has passed validation).
        atol: tolerance of the validation; default: the registry's ``onnx_atol`` (or ``onnx_atol_fp16``).

    Raises:
        ExportUnsupportedError: the registry or optimum cannot export this model type.
        ExportMismatchError: the export's outputs differ from torch by more than ``atol``.
        InvalidOptionError: an unknown dtype or device, fp16 on cpu, or a GGUF source.
        DeviceUnavailableError: ``cuda`` without a GPU (or fp16 without ONNX Runtime's CUDA provider).
        OutputExistsError: ``out`` holds files and ``overwrite`` is False.
    """
    started = time.perf_counter()
    _check_options(dtype, device)
    folder = _model_folder(model_dir, out)
    target = Path(out) if out is not None else folder / DEFAULT_SUBFOLDER
    config = read_config_json(folder / CONFIG_FILE)
    model_type = str(config.get("model_type"))
    spec = check_onnx_support(model_type)
    if atol is None:
        atol = spec.onnx_atol_fp16 if dtype == "fp16" else spec.onnx_atol
    layers = int(config.get(spec.count_key, 0))

    with output_folder(target, overwrite) as temp:
        _run_optimum(folder, temp, dtype, device)
        checks = validate_export(
            folder, temp, atol=atol, dtype=dtype, device=_validation_device(dtype, device)
        )
    result = ExportResult(
        model_dir=folder,
        path=target.absolute(),
        model_type=model_type,
        layers=layers,
        dtype=dtype,
        device=device,
        files=tuple(sorted(file.name for file in target.iterdir())),
        external_data=_uses_external_data(target),
        size_mb=sum(file.stat().st_size for file in target.rglob("*") if file.is_file()) / 2**20,
        checks=tuple(checks),
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "exported %s to %s (%.1f MB%s), max abs diff %.2e",
        folder.name,
        result.path,
        result.size_mb,
        ", external data" if result.external_data else "",
        result.max_abs_diff,
    )
    return result


def onnx_exportable_model_types() -> tuple[str, ...]:
    """The registry's model types that optimum can export for text generation with KV cache, sorted."""
    optimum_types = _optimum_model_types()
    return tuple(
        sorted(
            model_type
            for model_type, spec in ARCHITECTURES.items()
            if spec.onnx_supported and model_type in optimum_types
        )
    )


def check_onnx_support(model_type: str | None) -> ArchitectureSpec:
    """The registry entry of an exportable ``model_type``, or an error that names what can be exported."""
    name = str(model_type)
    spec = ARCHITECTURES.get(name)
    if spec is None:
        raise ExportUnsupportedError(
            name, "swm-hub has no registry entry for it", onnx_exportable_model_types()
        )
    if not spec.onnx_supported:
        raise ExportUnsupportedError(
            name, "its ONNX export is known not to match torch", onnx_exportable_model_types()
        )
    if name not in _optimum_model_types():
        raise ExportUnsupportedError(
            name, f"optimum's ONNX exporter has no {ONNX_TASK} config for it", onnx_exportable_model_types()
        )
    minimum = _optimum_min_transformers(name)
    if minimum is not None and Version(transformers.__version__) < minimum:
        raise ExportUnsupportedError(
            name,
            f"optimum exports it only with transformers >= {minimum} (installed: {transformers.__version__})",
            onnx_exportable_model_types(),
        )
    return spec


# --- steps -------------------------------------------------------------------------------------------------


def _check_options(dtype: str, device: str) -> None:
    """Refuse bad combinations before any work (fp16 on cpu, cuda without a GPU, missing packages)."""
    torch_dtype_for(dtype)
    require_onnx_runtime()
    check_device(device, onnx=dtype == "fp16")
    if dtype == "fp16" and device != "cuda":
        raise InvalidOptionError(
            "--dtype fp16 needs --device cuda: a float16 export is traced and validated on the GPU; "
            "on cpu use --dtype fp32"
        )


def _validation_device(dtype: str, device: str) -> str:
    """Validate where the export was made; a float32 CUDA export falls back to CPU without ORT's CUDA provider."""
    if device == "cuda" and dtype == "fp32":
        import onnxruntime

        if ort_provider("cuda") not in onnxruntime.get_available_providers():
            logger.warning("onnxruntime has no CUDAExecutionProvider: validating the float32 export on cpu")
            return "cpu"
    return device


def _model_folder(model_dir: Path | str, out: Path | None) -> Path:
    """The folder to export: a local model folder or a Hub snapshot; GGUF files must become folders first."""
    source = resolve_source(str(model_dir))
    if source.kind == "gguf":
        raise InvalidOptionError(
            f"{source.ref} is a GGUF file; ONNX export reads a model folder: save it as one first "
            "(for example with `swm-hub compress`, or save_pretrained)"
        )
    if source.kind == "hub" and out is None:
        raise InvalidOptionError(
            f"{source.ref} is a Hub model: give --out, since its folder is the read-only Hub cache"
        )
    return source.path


def _run_optimum(folder: Path, output: Path, dtype: str, device: str) -> None:
    """Optimum's export, without its own validation (ours follows, on a real prompt and a decode step)."""
    main_export = _optimum_main_export()
    with warnings.catch_warnings():
        # Tracing prints a TracerWarning for every Python branch on a tensor; they are expected here.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
        # Advanced indexing with negative indices would export wrongly; the validation would catch it.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        main_export(
            str(folder),
            output=output,
            task=ONNX_TASK,
            device=device,
            dtype=dtype,
            framework="pt",
            library_name=_LIBRARY,
            local_files_only=True,
            do_validation=False,
        )


def _uses_external_data(folder: Path) -> bool:
    """Whether any ONNX file in ``folder`` keeps tensors in external data files."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    for file in folder.glob("*.onnx"):
        model = onnx.load(str(file), load_external_data=False)
        if any(uses_external_data(tensor) for tensor in model.graph.initializer):
            return True
    return any(folder.glob(f"*{EXTERNAL_DATA_SUFFIX}"))


# --- what optimum knows ------------------------------------------------------------------------------------


def _optimum_main_export() -> Any:
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise MissingDependencyError("optimum-onnx", "pip install 'swm-hub[onnx]'") from exc
    return main_export


def _tasks_manager() -> Any:
    """Optimum's ``TasksManager``, with the ONNX configs registered (importing them is what registers them)."""
    try:
        import optimum.exporters.onnx.model_configs  # noqa: F401
        from optimum.exporters.tasks import TasksManager
    except ImportError as exc:
        raise MissingDependencyError("optimum-onnx", "pip install 'swm-hub[onnx]'") from exc
    return TasksManager


def _optimum_model_types() -> set[str]:
    manager = _tasks_manager()
    types = manager.get_supported_model_type_for_task(ONNX_TASK, exporter=_OPTIMUM_EXPORTER)
    return {str(name) for name in types}


def _optimum_min_transformers(model_type: str) -> Version | None:
    """The lowest transformers version optimum's ONNX config for ``model_type`` accepts, if it names one."""
    manager = _tasks_manager()
    constructor = manager.get_exporter_config_constructor(
        exporter=_OPTIMUM_EXPORTER, model_type=model_type, task=ONNX_TASK, library_name=_LIBRARY
    )
    config_class = getattr(constructor, "func", constructor)
    minimum = getattr(config_class, "MIN_TRANSFORMERS_VERSION", None)
    return Version(str(minimum)) if minimum is not None else None
