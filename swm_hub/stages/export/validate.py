"""Check an ONNX export against the torch model it came from, output by output, over a short generation.

Two cases run on both sides: the fixed English prompt alone (batch 1), and the same prompt beside its first
half left-padded to the same length (batch 2), which is how a batch reaches a model in ``generate``. Where
the model has a sliding window that fits ``MAX_VALIDATION_TOKENS``, the prompt is repeated to run past it,
so that the window's mask is exercised. Each case is a prefill followed by ``DECODE_STEPS`` decoding steps
that read the cache: transformers' own forward with its own cache on the torch side, our ONNX Runtime loop
(``ort_generate``) on the other, both fed the tokens torch chose, so that a near tie cannot send them apart.

Each output (the prefill logits, every layer's present key and value after the last step, and the decoding
steps' logits) gets its largest absolute difference over both cases and over the positions that hold real
tokens (what a padded position holds is never read), one ✓/✗ log line, and a typed failure when any is
over the tolerance.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from swm_hub.core.architectures import spec_for_config
from swm_hub.core.devices import DTYPES, execution_device
from swm_hub.core.errors import (
    ExportMismatchError,
)
from swm_hub.core.options import dtype_name
from swm_hub.runtime.ort import MODEL_FILE_NAMES, OrtCausalLM, check_device, position_ids

__all__ = [
    "DECODE_STEPS",
    "MAX_VALIDATION_TOKENS",
    "VALIDATION_PROMPT",
    "OutputCheck",
    "TorchReference",
    "json_record",
    "torch_model",
    "torch_reference",
    "validate_export",
]

logger = logging.getLogger(__name__)

VALIDATION_PROMPT: str = (
    "The old lighthouse keeper climbed the narrow stairs every evening, lit the great lamp, and watched the "
    "ships pass safely through the dark water below."
)
DECODE_STEPS: int = 2
# A sliding window up to this many tokens is run past; a longer one (Mistral's 4096) would make the check
# slow on a CPU and is left to the mask logic the shorter windows exercise.
MAX_VALIDATION_TOKENS: int = 1024
DECODE_LOGITS: str = "logits.decode"


@dataclass(frozen=True)
class OutputCheck:
    """One output compared between torch and ONNX Runtime.

    Attributes:
        name: the output's name: ``logits`` (prefill), ``present.{i}.key``, ``present.{i}.value`` (the
            cache after the last step), or ``logits.decode`` (the decoding steps' logits).
        max_abs_diff: the largest absolute difference over both cases and all real positions (``inf`` for
            a shape mismatch, ``nan`` when either side holds NaN).
        atol: the tolerance it was held to.
        shape: the torch output's shape in the batch-2 case.
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
        return json_record(self, passed=self.passed)


def json_record(result: Any, **computed: Any) -> dict[str, Any]:
    """A result dataclass as JSON-ready values, its ``computed`` properties after its fields.

    One conversion for every export result and check, so that a field added to one is recorded without a
    second list of keys: paths become strings, tuples lists, and nested results their own ``to_dict``.
    """
    record = {entry.name: _json_value(getattr(result, entry.name)) for entry in fields(result)}
    return {**record, **computed}


def _json_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_json_value(item) for item in value]
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else value


def validate_export(
    model_dir: Path,
    onnx_dir: Path,
    atol: float | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    prompt: str = VALIDATION_PROMPT,
    reference: TorchReference | None = None,
) -> list[OutputCheck]:
    """Compare the ONNX export in ``onnx_dir`` with the torch model in ``model_dir`` over a short generation.

    ``atol`` defaults to the registry's ``onnx_atol`` (``onnx_atol_fp16`` for float16). On ``cuda`` both
    run on the GPU; ONNX Runtime then needs its CUDA execution provider (``onnxruntime-gpu``).
    ``reference`` is the torch side, when the caller computed it with the model in memory (see
    ``torch_reference``); otherwise the model is loaded here for it.

    Returns:
        One check per output, in output order; all of them passed.

    Raises:
        ExportMismatchError: an output differs by more than ``atol`` (or has another shape, or NaN); it
            carries every output's difference.
        DeviceUnavailableError: ``cuda`` without a GPU, or without ONNX Runtime's CUDA provider.
        CorruptWeightsError: the export cannot be loaded by ONNX Runtime, or is no decoder with KV cache.
    """
    check_device(device, onnx=True)
    dtype = dtype_name(dtype, allowed=tuple(MODEL_FILE_NAMES))
    model_dir, onnx_dir = Path(model_dir), Path(onnx_dir)
    if atol is None:
        spec = spec_for_config(AutoConfig.from_pretrained(model_dir))
        atol = spec.onnx_atol_fp16 if dtype == "float16" else spec.onnx_atol
    reference = reference or torch_reference(model_dir, dtype, device, prompt=prompt)
    references = reference.traces
    ort_model = OrtCausalLM.load(onnx_dir, device)
    candidates = [
        _ort_trace(ort_model, case, trace.tokens)
        for case, trace in zip(reference.cases, references, strict=True)
    ]
    del ort_model
    gc.collect()

    checks = _compare(references, candidates, atol)
    for check in checks:
        (logger.info if check.passed else logger.error)("%s", check.line())
    if not all(check.passed for check in checks):
        raise ExportMismatchError(onnx_dir, {check.name: check.max_abs_diff for check in checks}, atol)
    return checks


def torch_model(model_dir: Path, dtype: str, device: str, given: Any = None) -> Any:
    """The folder's model at ``dtype`` on ``device``, in eval mode: ``given`` where it is placed so, else loaded.

    ``given`` is the folder's model a caller already holds (``compress`` pulled it for its evaluation);
    one on another device or in another precision is not moved, since the caller still uses it.
    """
    wanted = DTYPES[dtype]
    if given is not None and _placed(given, wanted, execution_device(device)):
        return given
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=wanted)
    model = model.to(device)
    model.train(False)
    return model


def _placed(model: Any, dtype: torch.dtype, device: torch.device) -> bool:
    return all(p.dtype == dtype and p.device == device for p in model.parameters()) and not model.training


@dataclass(frozen=True)
class TorchReference:
    """The torch side of a validation: the cases, and what transformers produced on each."""

    cases: list[_Case]
    traces: list[_Trace]


def torch_reference(
    model_dir: Path, dtype: str, device: str, model: Any = None, prompt: str = VALIDATION_PROMPT
) -> TorchReference:
    """Run the validation's cases through torch, with ``model`` (see ``torch_model``) or the folder's, loaded.

    An export computes this while it holds the model it traced, so that one load serves both, and frees the
    model before ONNX Runtime loads the graph.
    """
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
    cases = _cases(tokenizer, prompt, _sliding_window(config))
    model = torch_model(model_dir, dtype, device, model)
    traces = _torch_traces(model, cases, device)
    del model
    gc.collect()
    return TorchReference(cases, traces)


# --- the cases -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Case:
    """A batch of prompt token ids and its attention mask (0 on left padding)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


def _sliding_window(config: Any) -> int | None:
    window = getattr(config, "sliding_window", None)
    return int(window) if isinstance(window, int) and window > 0 else None


def _cases(tokenizer: Any, prompt: str, window: int | None) -> list[_Case]:
    """Batch 1 (the prompt, run past a short sliding window) and batch 2 (beside its left-padded half)."""
    ids: list[int] = list(tokenizer(prompt)["input_ids"])
    if window is not None and window < MAX_VALIDATION_TOKENS:
        more: list[int] = list(tokenizer(" " + prompt, add_special_tokens=False)["input_ids"])
        while len(ids) <= window + DECODE_STEPS:
            ids += more
    elif window is not None:
        logger.info("sliding window of %d tokens: longer than the validation prompt (%d)", window, len(ids))
    half = ids[: max(1, len(ids) // 2)]
    pad = _pad_token_id(tokenizer)
    padded = [pad] * (len(ids) - len(half)) + half
    return [
        _Case(np.array([ids], np.int64), np.ones((1, len(ids)), np.int64)),
        _Case(
            np.array([ids, padded], np.int64),
            np.array([[1] * len(ids), [0] * (len(ids) - len(half)) + [1] * len(half)], np.int64),
        ),
    ]


def _pad_token_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


# --- the two sides -------------------------------------------------------------------------------------------


@dataclass
class _Trace:
    """What one side produced for one case, as float32 numpy arrays on the host.

    Attributes:
        logits: the prefill's ``[batch, prompt, vocab]``.
        decode_logits: the decoding steps' ``[batch, steps, vocab]``.
        presents: each layer's key and value after the last step, in ``present.{i}.key/value`` order.
        attention_mask: the mask after the last step, ``[batch, prompt + steps]``.
        tokens: the greedy tokens each decoding step read, ``[batch, 1]`` each.
    """

    logits: np.ndarray
    decode_logits: np.ndarray
    presents: list[np.ndarray]
    attention_mask: np.ndarray
    tokens: list[np.ndarray] = field(default_factory=list)


@torch.no_grad()
def _torch_traces(model: Any, cases: list[_Case], device: str) -> list[_Trace]:
    """The reference: transformers' forward with its own cache, and the greedy tokens both sides read."""
    return [_torch_trace(model, case, device) for case in cases]


def _torch_trace(model: Any, case: _Case, device: str) -> _Trace:
    mask = case.attention_mask
    outputs = model(
        input_ids=torch.from_numpy(case.input_ids).to(device),
        attention_mask=torch.from_numpy(mask).to(device),
        position_ids=torch.from_numpy(position_ids(mask)).to(device),
        use_cache=True,
    )
    prefill = _host(outputs.logits)
    tokens, steps = [], []
    for _ in range(DECODE_STEPS):
        tokens.append(_host(outputs.logits[:, -1:]).argmax(axis=-1).astype(np.int64))
        mask = np.concatenate([mask, np.ones_like(tokens[-1])], axis=1)
        outputs = model(
            input_ids=torch.from_numpy(tokens[-1]).to(device),
            attention_mask=torch.from_numpy(mask).to(device),
            position_ids=torch.from_numpy(position_ids(mask)[:, -1:]).to(device),
            cache=outputs.cache,
            use_cache=True,
        )
        steps.append(_host(outputs.logits))
    presents = [_host(tensor) for tensor in _cache_tensors(outputs.cache)]
    return _Trace(prefill, np.concatenate(steps, axis=1), presents, mask, tokens)


def _ort_trace(model: OrtCausalLM, case: _Case, tokens: list[np.ndarray]) -> _Trace:
    state = model.prefill(case.input_ids, case.attention_mask)
    prefill = _ort_host(state.logits)
    steps = []
    for chosen in tokens:
        state = model.step(state, chosen)
        steps.append(_ort_host(state.logits))
    presents = [_ort_host(value) for value in state.presents]
    return _Trace(prefill, np.concatenate(steps, axis=1), presents, state.attention_mask)


def _cache_tensors(cache: Any) -> Iterator[torch.Tensor]:
    for layer in cache.layers:
        yield layer.keys
        yield layer.values


def _host(tensor: torch.Tensor) -> np.ndarray:
    array: np.ndarray = tensor.detach().float().cpu().numpy()
    return array


def _ort_host(value: Any) -> np.ndarray:
    array: np.ndarray = np.asarray(value.numpy(), dtype=np.float32)
    return array


# --- the comparison ------------------------------------------------------------------------------------------


def _compare(references: list[_Trace], candidates: list[_Trace], atol: float) -> list[OutputCheck]:
    """One check per output, each the worst over the cases."""
    layers = len(references[0].presents) // 2
    names = ["logits"] + [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    names.append(DECODE_LOGITS)
    checks = []
    for index, name in enumerate(names):
        diffs = [_case_diff(index, name, ref, got) for ref, got in zip(references, candidates, strict=True)]
        shape = tuple(_output(references[-1], index, name).shape)
        worst = math.nan if any(math.isnan(diff) for diff in diffs) else max(diffs)
        checks.append(OutputCheck(name=name, max_abs_diff=worst, atol=atol, shape=shape))
    return checks


def _output(trace: _Trace, index: int, name: str) -> np.ndarray:
    if name == "logits":
        return trace.logits
    if name == DECODE_LOGITS:
        return trace.decode_logits
    return trace.presents[index - 1]


def _case_diff(index: int, name: str, reference: _Trace, candidate: _Trace) -> float:
    """The max difference of one output in one case, over the positions that hold real tokens."""
    expected = _output(reference, index, name)
    actual = _output(candidate, index, name)
    if name == DECODE_LOGITS:
        real = np.ones(expected.shape[:2], dtype=bool)
    elif name == "logits":
        real = reference.attention_mask[:, : expected.shape[1]] == 1
    else:
        # A sliding-window layer's torch cache keeps only the last positions; the export keeps them all.
        kept = expected.shape[-2]
        actual = actual[..., -kept:, :] if 0 < kept < actual.shape[-2] else actual
        real = reference.attention_mask[:, -kept:] == 1
    if actual.shape != expected.shape:
        logger.error("%s: torch shape %s, ONNX Runtime %s", name, list(expected.shape), list(actual.shape))
        return math.inf
    diff = np.abs(expected - actual)
    if name.startswith("present."):
        diff = np.moveaxis(diff, 2, 1)  # [batch, positions, heads, head_dim], so the mask indexes positions
    selected = diff[real]
    if np.isnan(selected).any():
        return math.nan
    return float(selected.max()) if selected.size else 0.0
