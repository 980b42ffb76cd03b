"""Check an ONNX export against the torch model it came from, output by output.

The torch model and ``ORTModelForCausalLM`` (the class a user loads the export with) read the same fixed
English prompt, encoded by the model's own tokenizer. Both then take one decoding step from their own KV
cache with the same next token, so the path a generation spends most of its time in is checked too. Each
output (prefill logits, every layer's present key and value, decode-step logits) gets its largest absolute
difference, one ✓/✗ log line, and a typed failure when any is over the tolerance.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from swm_hub.architectures import spec_for_config
from swm_hub.errors import (
    CorruptWeightsError,
    DeviceUnavailableError,
    ExportMismatchError,
    InvalidOptionError,
    MissingDependencyError,
)

__all__ = [
    "DEVICES",
    "VALIDATION_PROMPT",
    "OutputCheck",
    "check_device",
    "load_ort_model",
    "ort_provider",
    "require_onnx_runtime",
    "torch_dtype_for",
    "validate_export",
]

logger = logging.getLogger(__name__)

DEVICES: tuple[str, ...] = ("cpu", "cuda")
VALIDATION_PROMPT: str = (
    "The old lighthouse keeper climbed the narrow stairs every evening, lit the great lamp, and watched the "
    "ships pass safely through the dark water below."
)
_TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}
_PROVIDERS: dict[str, str] = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_ONNX_EXTRA = "pip install 'swm-hub[onnx]' (optimum-onnx, onnx and onnxruntime)"


@dataclass(frozen=True)
class OutputCheck:
    """One output compared between torch and ONNX Runtime.

    Attributes:
        name: the output's name: ``logits``, ``present.{i}.key``, ``present.{i}.value`` or
            ``logits.decode`` (the logits of one decoding step that reads the KV cache).
        max_abs_diff: the largest absolute difference over all elements (``inf`` for a shape mismatch,
            ``nan`` when either side holds NaN).
        atol: the tolerance it was held to.
        shape: the torch output's shape.
    """

    name: str
    max_abs_diff: float
    atol: float
    shape: tuple[int, ...]

    @property
    def passed(self) -> bool:
        """True when the difference is finite and within ``atol``."""
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.atol

    def line(self) -> str:
        """A ``✓``/``✗`` line for logs and the CLI."""
        mark = "✓" if self.passed else "✗"
        relation = "<=" if self.passed else ">"
        return (
            f"{mark} {self.name:<20} max abs diff {self.max_abs_diff:.2e} {relation} atol {self.atol:.0e}"
            f"  shape {list(self.shape)}"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record."""
        return {
            "name": self.name,
            "max_abs_diff": self.max_abs_diff,
            "atol": self.atol,
            "shape": list(self.shape),
            "passed": self.passed,
        }


def validate_export(
    model_dir: Path,
    onnx_dir: Path,
    atol: float | None = None,
    dtype: str = "fp32",
    device: str = "cpu",
    prompt: str = VALIDATION_PROMPT,
) -> list[OutputCheck]:
    """Compare the ONNX export in ``onnx_dir`` with the torch model in ``model_dir`` on one prompt.

    ``atol`` defaults to the registry's ``onnx_atol`` (``onnx_atol_fp16`` for float16). On ``cuda`` both
    run on the GPU; ONNX Runtime then needs its CUDA execution provider (``onnxruntime-gpu``).

    Returns:
        One check per output, in output order; all of them passed.

    Raises:
        ExportMismatchError: an output differs by more than ``atol`` (or has another shape, or NaN); it
            carries every output's difference.
        DeviceUnavailableError: ``cuda`` without a GPU, or without ONNX Runtime's CUDA provider.
        CorruptWeightsError: the export cannot be loaded by ONNX Runtime.
    """
    check_device(device, onnx=True)
    torch_dtype = torch_dtype_for(dtype)
    model_dir, onnx_dir = Path(model_dir), Path(onnx_dir)
    if atol is None:
        spec = spec_for_config(AutoConfig.from_pretrained(model_dir))
        atol = spec.onnx_atol_fp16 if dtype == "fp16" else spec.onnx_atol
    tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)  # type: ignore[no-untyped-call]
    encoded = tokenizer(prompt, return_tensors="pt")
    input_ids = encoded["input_ids"].to(device)
    attention_mask = torch.ones_like(input_ids)

    reference, next_token = _torch_outputs(model_dir, input_ids, attention_mask, torch_dtype, device)
    ort_model = load_ort_model(onnx_dir, device)
    candidate, _ = _outputs(ort_model, input_ids, attention_mask, next_token)
    del ort_model
    gc.collect()

    checks = [_compare(name, reference[name], candidate.get(name), atol) for name in reference]
    for check in checks:
        (logger.info if check.passed else logger.error)("%s", check.line())
    if not all(check.passed for check in checks):
        raise ExportMismatchError(onnx_dir, {check.name: check.max_abs_diff for check in checks}, atol)
    return checks


# --- devices and runtimes (shared with the benchmark) ------------------------------------------------------


def check_device(device: str, onnx: bool = False) -> None:
    """Refuse an unknown device, and ``cuda`` where torch (or ONNX Runtime, with ``onnx``) has no GPU."""
    if device not in DEVICES:
        raise InvalidOptionError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            "cuda",
            "torch sees no CUDA GPU on this machine (torch.cuda.is_available() is False); use --device cpu",
        )
    if onnx and device == "cuda":
        require_onnx_runtime()
        import onnxruntime

        if _PROVIDERS["cuda"] not in onnxruntime.get_available_providers():
            raise DeviceUnavailableError(
                "cuda",
                "this onnxruntime build has no CUDAExecutionProvider: install onnxruntime-gpu instead of "
                "onnxruntime, or use --device cpu",
            )


def ort_provider(device: str) -> str:
    """The ONNX Runtime execution provider for a device name."""
    return _PROVIDERS[device]


def torch_dtype_for(dtype: str) -> torch.dtype:
    """``fp32``/``fp16`` as a torch dtype, or an error naming the choices."""
    if dtype not in _TORCH_DTYPES:
        raise InvalidOptionError(f"unknown dtype {dtype!r}; choose one of {', '.join(_TORCH_DTYPES)}")
    return _TORCH_DTYPES[dtype]


def require_onnx_runtime() -> None:
    """Fail with an install hint when the optional ONNX packages are missing."""
    for module, package in (("onnxruntime", "onnxruntime"), ("optimum.onnxruntime", "optimum-onnx")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise MissingDependencyError(package, _ONNX_EXTRA)


def load_ort_model(onnx_dir: Path, device: str, threads: int | None = None) -> Any:
    """An ``ORTModelForCausalLM`` with its KV cache, on the provider of ``device``.

    ``threads`` sets ONNX Runtime's intra-op thread count (default: one per physical core).
    """
    require_onnx_runtime()
    import onnxruntime
    from optimum.onnxruntime import ORTModelForCausalLM

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        model = ORTModelForCausalLM.from_pretrained(
            onnx_dir,
            provider=ort_provider(device),
            session_options=options,
            use_cache=True,
            local_files_only=True,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CorruptWeightsError(onnx_dir, f"ONNX Runtime cannot load the export ({exc})") from exc
    _match_cache_shape(model)
    return model


def _match_cache_shape(model: Any) -> None:
    """Size the empty first-step KV cache from the ONNX graph itself rather than from the config.

    ``ORTModelForCausalLM`` (optimum-onnx 0.1.0) derives the cache's heads and head size from config fields
    that it reads per model type; for types outside its lists (gemma2, phi3) it assumes as many KV heads as
    attention heads and ``hidden_size / heads`` per head, which is wrong with grouped-query attention or an
    explicit ``head_dim``, and the first forward then fails. The graph's input declares both sizes.
    """
    names = getattr(model, "key_value_input_names", ())
    if not names or not hasattr(model, "num_key_value_heads"):
        return
    declared = {node.name: node.shape for node in model.session.get_inputs()}
    shape = declared.get(names[0])
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        return
    if (model.num_key_value_heads, getattr(model, "embed_size_per_head", None)) != (shape[1], shape[3]):
        logger.debug("KV cache of %s: %d heads of %d (config gave other sizes)", names[0], shape[1], shape[3])
        model.num_key_value_heads = shape[1]
        model.embed_size_per_head = shape[3]


# --- the two sides -----------------------------------------------------------------------------------------


@torch.no_grad()
def _torch_outputs(
    model_dir: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype, device: str
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The reference outputs, and the greedy next token that both decode steps read."""
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device)
    model.train(False)
    outputs, next_token = _outputs(model, input_ids, attention_mask, None)
    del model
    gc.collect()
    return outputs, next_token


@torch.no_grad()
def _outputs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, next_token: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Prefill logits and presents, then the logits of one decode step that reads the model's own KV cache.

    Works for a torch ``*ForCausalLM`` and for ``ORTModelForCausalLM`` alike (same call signature); without
    ``next_token`` the step reads the greedy choice of the prefill.
    """
    first = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    outputs = {"logits": first.logits.float().cpu()}
    for index, (key, value) in enumerate(_kv_pairs(first.past_key_values)):
        outputs[f"present.{index}.key"] = key.float().cpu()
        outputs[f"present.{index}.value"] = value.float().cpu()
    if next_token is None:
        next_token = first.logits[:, -1:].argmax(dim=-1)
    second = model(
        input_ids=next_token,
        attention_mask=torch.cat([attention_mask, torch.ones_like(next_token)], dim=1),
        past_key_values=first.past_key_values,
        use_cache=True,
    )
    outputs["logits.decode"] = second.logits.float().cpu()
    return outputs, next_token


def _kv_pairs(cache: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer from a transformers ``Cache`` or the legacy tuple of tuples ORT returns."""
    if cache is None:
        return
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            yield layer.keys, layer.values
        return
    for pair in cache:
        yield _pair(pair)


def _pair(pair: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    key, value = pair[0], pair[1]
    return key, value


def _trailing_window(expected: torch.Tensor, actual: torch.Tensor | None) -> torch.Tensor | None:
    """Align a sliding-window layer's cache: torch keeps only the last positions, the export keeps them all.

    A present of shape ``[batch, heads, positions, head_dim]`` that is shorter in torch but equal otherwise
    is compared on the export's last positions, which are the ones the window keeps.
    """
    if actual is None or expected.dim() != 4 or actual.dim() != 4:
        return actual
    kept = expected.shape[-2]
    same_elsewhere = expected.shape[:-2] == actual.shape[:-2] and expected.shape[-1] == actual.shape[-1]
    if same_elsewhere and 0 < kept < actual.shape[-2]:
        return actual[..., -kept:, :]
    return actual


def _compare(name: str, expected: torch.Tensor, actual: torch.Tensor | None, atol: float) -> OutputCheck:
    """The max absolute difference of one output; a missing output or another shape counts as ``inf``."""
    shape = tuple(expected.shape)
    actual = _trailing_window(expected, actual)
    if actual is None or tuple(actual.shape) != shape:
        got = "missing" if actual is None else str(list(actual.shape))
        logger.error("%s: torch shape %s, ONNX Runtime %s", name, list(shape), got)
        return OutputCheck(name=name, max_abs_diff=math.inf, atol=atol, shape=shape)
    diff = (expected - actual).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if bool(torch.isnan(diff).any()):
        worst = math.nan
    return OutputCheck(name=name, max_abs_diff=worst, atol=atol, shape=shape)
