"""Export a model folder to ONNX with its KV cache, and prove the export right before it lands.

``torch.onnx.export`` traces a small wrapper around the ``*ForCausalLM`` model: it takes ``input_ids``,
``attention_mask``, ``position_ids`` and ``past_key_values.{i}.key/value``, builds a transformers
``DynamicCache`` from the past, and returns ``logits`` and ``present.{i}.key/value``: the names optimum and
transformers.js use, so their loaders read the graph as they read the Hub's ONNX repos. The cache is a
plain ``DynamicCache`` on every layer, so a sliding-window layer's present keeps every position; its mask,
computed inside the graph, hides the ones outside the window.

The exporter is the TorchScript one (``dynamo=False``): on SmolLM2-135M it took 20 s against 129 s for
``dynamo=True`` on a 2-core CPU (a tiny six-layer llama: 3.9 s against 42 s), and ONNX Runtime decoded
with both graphs at the same speed (27.3 to 28.4 against 28.0 to 28.7 ms per token, 21 layers, one thread).
The model loads with its default attention: eager for Gemma 2, which refuses sdpa under transformers 5.

The layout is that of the Hub's ONNX repos: ``onnx/model.onnx`` (``model_fp16.onnx`` for float16, the
name transformers.js reads for ``dtype: "fp16"``), beside the model's own config and tokenizer at the root;
the folder also gets copies of ``config.json``, ``generation_config.json`` and the tokenizer, so that it
loads on its own (``swm-hub bench``, a loader pointed at the ``onnx/`` folder). A graph over 2 GB cannot be one
protobuf: its weights go to a single ``model.onnx_data`` beside it (``FORCE_ONNX_EXTERNAL_DATA=1`` forces
that for any size, as in optimum). A tied LM head is stored once: the tracer writes it a second time,
transposed, which it reads back from the embedding instead.

The export goes into a temporary folder beside the target, is validated against torch there
(``validate.validate_export``), and only then moves into place, so a failed or mismatching export never
replaces a good one.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, DynamicCache

from swm_hub.core.architectures import ARCHITECTURES, ArchitectureSpec, supported_model_types
from swm_hub.core.errors import ExportUnsupportedError, InvalidOptionError
from swm_hub.core.files import CONFIG_FILE, GENERATION_CONFIG_FILE, ONNX_FOLDER
from swm_hub.core.options import ONNX_DTYPES, dtype_name
from swm_hub.runtime.checkpoint import output_folder
from swm_hub.runtime.loading import read_config_json, resolve_source
from swm_hub.runtime.ort import (
    INPUT_NAMES,
    LOGITS,
    MODEL_FILE_NAMES,
    check_device,
    ort_provider,
    require_onnx_runtime,
)
from swm_hub.stages.export.validate import (
    OutputCheck,
    TorchReference,
    json_record,
    torch_model,
    torch_reference,
    validate_export,
)

__all__ = [
    "EXTERNAL_DATA_SUFFIX",
    "FORCE_EXTERNAL_DATA_ENV",
    "OPSET",
    "ExportResult",
    "check_onnx_support",
    "export_onnx",
    "onnx_exportable_model_types",
]

logger = logging.getLogger(__name__)

OPSET: int = 17
# All external tensors of ``model.onnx`` go into this one file beside it (``model.onnx_data``).
EXTERNAL_DATA_SUFFIX: str = "_data"
FORCE_EXTERNAL_DATA_ENV: str = "FORCE_ONNX_EXTERNAL_DATA"
# Tensors under this size stay inside the graph when the weights go to external data.
_EXTERNAL_MIN_BYTES = 1024
# A protobuf cannot exceed 2 GiB; weights over this leave room for the graph's own structure.
_SINGLE_FILE_WEIGHT_LIMIT = 2**31 - 2**27
# Shapes the trace runs on: a batch of 2, 3 new positions after 4 cached ones (none of them 1, so that
# no dimension is taken for a constant).
_TRACE_BATCH, _TRACE_NEW, _TRACE_PAST = 2, 3, 4
_BATCH, _SEQUENCE, _PAST, _TOTAL = (
    "batch_size",
    "sequence_length",
    "past_sequence_length",
    "total_sequence_length",
)


@dataclass(frozen=True)
class ExportResult:
    """What ``export_onnx`` wrote and how well it matched torch.

    Attributes:
        model_dir: the exported model folder.
        path: the folder holding ``model.onnx`` (``model_fp16.onnx``), ``model.onnx_data`` when the weights
            live outside it, the config and the tokenizer: what ``bench`` reads.
        model_type: the config's ``model_type``.
        layers: the number of decoder layers.
        dtype: ``float32`` or ``float16``.
        device: the device the export was traced and validated on.
        files: file names in ``path``, sorted (not the hidden marker of a folder swm-hub wrote).
        external_data: whether the weights are stored outside the graph file (models over 2 GB).
        size_mb: the folder's total size in MB.
        checks: one validation check per output (logits, each present key/value, the decoding steps).
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
        """A JSON-ready record (paths as strings), with the largest difference."""
        return json_record(self, max_abs_diff=self.max_abs_diff)


def export_onnx(
    model_dir: Path,
    out: Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    overwrite: bool = False,
    atol: float | None = None,
    model: Any = None,
) -> ExportResult:
    """Export the model folder ``model_dir`` to ONNX with KV cache, validated against torch.

    ``out`` defaults to ``model_dir/onnx``. ``float16`` needs ``device="cuda"``: the export is traced and
    validated on the GPU, since CPU kernels for float16 are missing or slow in both torch and ONNX Runtime.

    Args:
        model_dir: a model folder (config.json, safetensors, tokenizer), or a Hub id (then ``out`` is needed).
        out: the folder to create; refused when it holds files, unless ``overwrite``.
        dtype: ``float32`` or ``float16`` (``fp32``/``fp16`` also accepted).
        device: ``cpu`` or ``cuda``.
        overwrite: replace a non-empty ``out`` (only once the new export has passed validation).
        atol: tolerance of the validation; default: the registry's ``onnx_atol`` (or ``onnx_atol_fp16``).
        model: the folder's model, when the caller holds it already; traced and validated against if it is
            in ``dtype`` on ``device`` (see ``validate.torch_model``), else the folder is loaded once for both.

    Raises:
        ExportUnsupportedError: the registry has no entry for this model type.
        ExportMismatchError: the export's outputs differ from torch by more than ``atol``.
        InvalidOptionError: an unknown dtype or device, fp16 on cpu, or a GGUF source.
        DeviceUnavailableError: ``cuda`` without a GPU (or fp16 without ONNX Runtime's CUDA provider).
        OutputExistsError: ``out`` holds files and ``overwrite`` is False.
    """
    started = time.perf_counter()
    dtype = _check_options(dtype, device)
    folder = _model_folder(model_dir, out)
    target = Path(out) if out is not None else folder / ONNX_FOLDER
    config = read_config_json(folder / CONFIG_FILE)
    model_type = str(config.get("model_type"))
    spec = check_onnx_support(model_type)
    if atol is None:
        atol = spec.onnx_atol_fp16 if dtype == "float16" else spec.onnx_atol
    layers = int(config.get(spec.count_key, 0))

    checked_on = _validation_device(dtype, device)
    with output_folder(target, overwrite, protected=(folder,)) as temp:
        external, reference = _write_graph(
            folder, temp / MODEL_FILE_NAMES[dtype], dtype, device, checked_on, model
        )
        _copy_loader_files(folder, temp)
        checks = validate_export(folder, temp, atol=atol, dtype=dtype, device=checked_on, reference=reference)
    result = ExportResult(
        model_dir=folder,
        path=target.absolute(),
        model_type=model_type,
        layers=layers,
        dtype=dtype,
        device=device,
        files=tuple(sorted(file.name for file in target.iterdir() if not file.name.startswith("."))),
        external_data=external,
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
    """The model types ``export_onnx`` takes: every registry type (each one is exported in the tests)."""
    return supported_model_types()


def check_onnx_support(model_type: str | None) -> ArchitectureSpec:
    """The registry entry of an exportable ``model_type``, or an error that names what can be exported."""
    name = str(model_type)
    spec = ARCHITECTURES.get(name)
    if spec is None:
        raise ExportUnsupportedError(
            name, "swm-hub has no registry entry for it", onnx_exportable_model_types()
        )
    return spec


# --- checks before any work ----------------------------------------------------------------------------------


def _check_options(dtype: str, device: str) -> str:
    """The dtype's canonical name; bad combinations are refused before any work.

    Those are float16 on cpu, cuda without a GPU, and missing packages.
    """
    dtype = dtype_name(dtype, allowed=ONNX_DTYPES)
    require_onnx_runtime()
    check_device(device, onnx=dtype == "float16")
    if dtype == "float16" and device != "cuda":
        raise InvalidOptionError(
            "--dtype float16 needs --device cuda: a float16 export is traced and validated on the GPU; "
            "on cpu use --dtype float32"
        )
    return dtype


def _validation_device(dtype: str, device: str) -> str:
    """Validate where the export was made; a float32 CUDA export falls back to CPU without ORT's CUDA provider."""
    if device == "cuda" and dtype == "float32":
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


# --- the graph -----------------------------------------------------------------------------------------------


class _DecoderWithCache(torch.nn.Module):
    """The forward of an ONNX decoder with KV cache: flat past tensors in, logits and flat presents out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        # torch.onnx.export restores the wrapper's mode after tracing, and with it the model's: an eval-mode
        # wrapper leaves the model in eval mode for the validation and for a caller that still holds it.
        self.train(False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """Key and value of layer i are ``past[2 * i]`` and ``past[2 * i + 1]``; presents come back alike."""
        cache = DynamicCache(list(zip(past[0::2], past[1::2], strict=True)))
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        presents = [tensor for layer in outputs.cache.layers for tensor in (layer.keys, layer.values)]
        return (outputs.logits, *presents)


def _write_graph(
    folder: Path, path: Path, dtype: str, device: str, checked_on: str, given: Any
) -> tuple[bool, TorchReference | None]:
    """Trace the model into ``path``: whether its weights went to external data, and the validation's torch side.

    That side is computed while the traced model is in memory (when the validation runs on the device of
    the trace), so one load serves both, and the model is freed before the graph is rewritten.
    """
    model = torch_model(folder, dtype, device, given)
    tied = _tied_head(model)
    example = _example_inputs(model, device)
    layers = (len(example) - len(INPUT_NAMES)) // 2
    past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present_names = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    axes: dict[str, dict[int, str]] = {
        INPUT_NAMES[0]: {0: _BATCH, 1: _SEQUENCE},
        INPUT_NAMES[1]: {0: _BATCH, 1: _TOTAL},  # its own axis: torch refuses past + sequence
        INPUT_NAMES[2]: {0: _BATCH, 1: _SEQUENCE},
        LOGITS: {0: _BATCH, 1: _SEQUENCE},
        **{name: {0: _BATCH, 2: _PAST} for name in past_names},
        **{name: {0: _BATCH, 2: _TOTAL} for name in present_names},
    }
    traced = path.parent / "_trace"  # the tracer writes one file per tensor for a graph over 2 GB
    traced.mkdir()
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(
            _DecoderWithCache(model),
            example,
            str(traced / path.name),
            input_names=[*INPUT_NAMES, *past_names],
            output_names=[LOGITS, *present_names],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    reference = torch_reference(folder, dtype, device, model) if checked_on == device else None
    del model, example
    gc.collect()
    external = _finish_graph(traced / path.name, path, tied)
    shutil.rmtree(traced)
    return external, reference


def _example_inputs(model: Any, device: str) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with; the cache's heads and head size per layer are asked of the model itself."""
    with torch.no_grad():
        probe = model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=True).cache
    dtype = next(model.parameters()).dtype
    total = _TRACE_PAST + _TRACE_NEW
    input_ids = torch.ones((_TRACE_BATCH, _TRACE_NEW), dtype=torch.long, device=device)
    attention_mask = torch.ones((_TRACE_BATCH, total), dtype=torch.long, device=device)
    attention_mask[1, 0] = 0  # a padded row, so that no all-ones shortcut of the mask code is traced
    positions = torch.arange(_TRACE_PAST, total, device=device).expand(_TRACE_BATCH, -1)
    past = []
    for layer in probe.layers:
        for tensor in (layer.keys, layer.values):
            shape = (_TRACE_BATCH, tensor.shape[1], _TRACE_PAST, tensor.shape[3])
            past.append(torch.randn(shape, dtype=dtype, device=device))
    return (input_ids, attention_mask, positions, *past)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence what the tracer says about code it was expected to meet; the validation checks the result.

    It warns at every Python branch on a tensor and every ``torch.tensor`` in transformers' cache and mask
    code, that the TorchScript exporter and its own helpers are deprecated, and that advanced indexing
    needs several ops.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]
        for deprecated in (".*TorchScript-based ONNX export", "The feature will be removed"):
            warnings.filterwarnings("ignore", message=deprecated, category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        yield


def _tied_head(model: Any) -> bool:
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is embeddings.weight


def _finish_graph(traced: Path, path: Path, tied: bool) -> bool:
    """Store a tied head once, and write the graph with all its weights in it or in one external file."""
    import onnx

    model = onnx.load(str(traced))
    if tied:
        _share_tied_head(model.graph)
    external = (
        bool(os.environ.get(FORCE_EXTERNAL_DATA_ENV))
        or _weight_bytes(model.graph) > _SINGLE_FILE_WEIGHT_LIMIT
    )
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + EXTERNAL_DATA_SUFFIX,
            size_threshold=_EXTERNAL_MIN_BYTES,
        )
    else:
        onnx.save_model(model, str(path))
    return external


def _weight_bytes(graph: Any) -> int:
    return sum(len(tensor.raw_data) for tensor in graph.initializer)


def _share_tied_head(graph: Any) -> None:
    """Point the LM head's MatMul at a transpose of the embedding table it equals, and drop its own copy."""
    from onnx import helper, numpy_helper

    gathered = {node.input[0] for node in graph.node if node.op_type == "Gather"}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    tables = [initializers[name] for name in gathered if name in initializers]
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        weight = initializers[node.input[1]]
        table = next((t for t in tables if list(t.dims) == list(weight.dims)[::-1]), None)
        if table is None or not np.array_equal(numpy_helper.to_array(table).T, numpy_helper.to_array(weight)):
            continue
        transposed = f"{table.name}.transposed"
        graph.node.insert(0, helper.make_node("Transpose", [table.name], [transposed], perm=[1, 0]))
        copy = node.input[1]
        node.input[1] = transposed
        if not any(copy in other.input for other in graph.node):
            graph.initializer.remove(weight)
        return


# --- the files beside the graph ------------------------------------------------------------------------------


def _copy_loader_files(folder: Path, temp: Path) -> None:
    """config.json, generation_config.json and the tokenizer, where loaders of the ONNX folder look."""
    shutil.copy2(folder / CONFIG_FILE, temp / CONFIG_FILE)
    if (folder / GENERATION_CONFIG_FILE).is_file():
        shutil.copy2(folder / GENERATION_CONFIG_FILE, temp / GENERATION_CONFIG_FILE)
    tokenizer: Any = AutoTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(temp)
