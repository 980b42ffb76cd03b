"""Greedy generation from an ONNX export with ONNX Runtime: our own loop, used by validation and by bench.

The export (``swm_hub.stages.export.onnx``) takes ``input_ids``, ``attention_mask``, ``position_ids`` and one
``past_key_values.{i}.key/value`` per layer, and returns ``logits`` and ``present.{i}.key/value`` (the past
and the new positions, concatenated inside the graph). A step here binds the previous step's presents, as
the OrtValues ONNX Runtime returned, to the next step's past inputs (IO binding), so the cache never leaves
ONNX Runtime and is never copied into numpy or torch; outputs are allocated by ONNX Runtime on the session's
device, because their length grows by one every step. The greedy choice reads only the last position of the
logits: on CPU through a numpy view of ONNX Runtime's buffer, without a copy.

Measured before this loop was written (SmolLM2-135M shape, ONNX Runtime CPU, one thread, 64 new tokens):
a decode step takes 8.3 ms with 1 layer, 17.7 ms with 10, 27.5 ms with 21 and 37.5 ms with 30, so its time
is linear in the layers with an intercept of about the LM head's share of the weights; the Python around
a step (binding 60 cache tensors, the argmax) is under 1 ms of it, and binding, ``run_with_ort_values`` and
plain ``run`` with numpy feeds measured alike on CPU. What is left outside the graph is therefore small,
and a 30 to 21 layer cut shows its per-token weight ratio. On CUDA, binding is what keeps the cache on the
GPU between steps (numpy feeds would copy it to the host and back every step).

``check_device`` is here too: whether a device can run, and for ONNX Runtime whether its build has that
device's execution provider, is what the export's validation and the benchmark both ask before running.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from swm_hub.core.devices import resolve_device
from swm_hub.core.errors import (
    CorruptWeightsError,
    DeviceUnavailableError,
    InvalidOptionError,
    MissingDependencyError,
    UnknownModelError,
)

__all__ = [
    "DEVICES",
    "MODEL_FILE_NAMES",
    "DecodeState",
    "OrtCausalLM",
    "check_device",
    "find_model_file",
    "ort_provider",
    "per_token_weight_bytes",
    "position_ids",
    "require_onnx_runtime",
]

DEVICES: tuple[str, ...] = ("cpu", "cuda")
"""The devices an export is validated and benchmarked on."""

# The graph's file name per dtype: transformers.js's (its ``dtype: "fp32"`` reads onnx/model.onnx, ``"fp16"``
# model_fp16.onnx).
MODEL_FILE_NAMES: dict[str, str] = {"float32": "model.onnx", "float16": "model_fp16.onnx"}
INPUT_NAMES: tuple[str, str, str] = ("input_ids", "attention_mask", "position_ids")
LOGITS: str = "logits"
_PAST_PREFIX = "past_key_values."
_PRESENT_PREFIX = "present."
_PROVIDERS: dict[str, str] = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_NUMPY_DTYPES: dict[str, Any] = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_ONNX_EXTRA = "pip install 'swm-hub[onnx]' (onnx, onnxscript and onnxruntime)"


def ort_provider(device: str) -> str:
    """The ONNX Runtime execution provider for a device name."""
    return _PROVIDERS[device]


def check_device(device: str, onnx: bool = False) -> None:
    """Refuse an unknown device, and ``cuda`` where torch (or ONNX Runtime, with ``onnx``) has no GPU."""
    if device not in DEVICES:
        raise InvalidOptionError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    resolve_device(device)
    if onnx and device == "cuda":
        require_onnx_runtime()
        import onnxruntime

        if ort_provider("cuda") not in onnxruntime.get_available_providers():
            raise DeviceUnavailableError(
                "cuda",
                "this onnxruntime build has no CUDAExecutionProvider: install onnxruntime-gpu instead of "
                "onnxruntime, or use --device cpu",
            )


def require_onnx_runtime() -> None:
    """Fail with an install hint when the optional ONNX packages are missing."""
    for module in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(module, _ONNX_EXTRA)


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Position ids of left-padded rows, as transformers' ``generate`` makes them (padding gets 1, masked out)."""
    positions = np.cumsum(attention_mask, axis=1) - 1
    positions[attention_mask == 0] = 1
    return positions


def find_model_file(folder: Path) -> Path:
    """The export's graph in ``folder``: ``model.onnx``, else ``model_fp16.onnx``."""
    for name in MODEL_FILE_NAMES.values():
        if (folder / name).is_file():
            return folder / name
    raise UnknownModelError(
        str(folder), f"it holds none of {', '.join(MODEL_FILE_NAMES.values())}: run `swm-hub export`"
    )


@dataclass
class DecodeState:
    """Where a batch of sequences stands after a step: its mask, its next positions, and ONNX Runtime's outputs.

    Attributes:
        attention_mask: ``[batch, length]``, 0 on left padding; the next step appends a column of ones.
        next_positions: ``[batch, 1]``, the position id of each row's next token (its count of real tokens).
        logits: the step's ``logits`` output, ``[batch, new positions, vocab]``, where ONNX Runtime put it.
        presents: the step's ``present.{i}.key/value`` outputs in input order, fed to the next step as is.
    """

    attention_mask: np.ndarray
    next_positions: np.ndarray
    logits: Any
    presents: list[Any]

    def last_logits(self) -> np.ndarray:
        """``[batch, vocab]`` logits of the last position (a view on CPU, a copy from a GPU)."""
        logits: np.ndarray = self.logits.numpy()
        return logits[:, -1, :]

    def greedy_tokens(self) -> np.ndarray:
        """``[batch, 1]`` argmax of the last position's logits."""
        tokens: np.ndarray = self.last_logits().argmax(axis=-1)[:, None].astype(np.int64)
        return tokens


class OrtCausalLM:
    """An exported decoder in an ONNX Runtime session, stepped with IO binding."""

    def __init__(self, session: Any, device: str, path: Path) -> None:
        self.session = session
        self.device = device
        self.path = path
        inputs = {node.name: node for node in session.get_inputs()}
        self.past_names = tuple(name for name in inputs if name.startswith(_PAST_PREFIX))
        self.present_names = tuple(
            _PRESENT_PREFIX + name.removeprefix(_PAST_PREFIX) for name in self.past_names
        )
        outputs = {node.name for node in session.get_outputs()}
        missing = [name for name in (*INPUT_NAMES, *self.past_names) if name not in inputs]
        missing += [name for name in (LOGITS, *self.present_names) if name not in outputs]
        if not self.past_names or missing:
            raise CorruptWeightsError(
                path,
                "not an ONNX decoder with KV cache (inputs input_ids, attention_mask, position_ids, "
                f"past_key_values.*; outputs logits, present.*); missing: {', '.join(missing) or 'the cache'}",
            )
        self._cache_shapes = [_heads_and_dim(path, inputs[name].shape) for name in self.past_names]
        self.cache_dtype = _NUMPY_DTYPES.get(inputs[self.past_names[0]].type, np.float32)
        self._binding = session.io_binding()

    @classmethod
    def load(cls, folder: Path, device: str = "cpu", threads: int | None = None) -> OrtCausalLM:
        """The export in ``folder`` on the provider of ``device``.

        ``threads`` sets ONNX Runtime's intra-op thread count (default: one per physical core).
        """
        import onnxruntime

        path = find_model_file(Path(folder))
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = [ort_provider(device)] + ([ort_provider("cpu")] if device != "cpu" else [])
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types, none of them exported
            raise CorruptWeightsError(path, f"ONNX Runtime cannot load the export ({exc})") from exc
        return cls(session, device, path)

    @property
    def layers(self) -> int:
        """Decoder layers: one key and one value input each."""
        return len(self.past_names) // 2

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> DecodeState:
        """Run the prompt (left-padded where ``attention_mask`` is 0) through the graph with an empty cache."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        positions = position_ids(attention_mask)
        batch = input_ids.shape[0]
        past = [self._empty_cache(batch, heads, dim) for heads, dim in self._cache_shapes]
        logits, presents = self._run(input_ids, attention_mask, positions, past)
        next_positions = attention_mask.sum(axis=1, keepdims=True)
        return DecodeState(attention_mask, next_positions, logits, presents)

    def step(self, state: DecodeState, tokens: np.ndarray) -> DecodeState:
        """One new token per row (``[batch, 1]``), reading the cache ``state`` holds."""
        batch = state.attention_mask.shape[0]
        attention_mask = np.concatenate([state.attention_mask, np.ones((batch, 1), np.int64)], axis=1)
        positions = state.next_positions
        logits, presents = self._run(
            np.ascontiguousarray(tokens, dtype=np.int64), attention_mask, positions, state.presents
        )
        return DecodeState(attention_mask, positions + 1, logits, presents)

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
        """Exactly ``new_tokens`` greedy tokens per row, ``[batch, new_tokens]`` (no stop at EOS)."""
        state = self.prefill(input_ids, attention_mask)
        chosen = [state.greedy_tokens()]
        for _ in range(new_tokens - 1):
            state = self.step(state, chosen[-1])
            chosen.append(state.greedy_tokens())
        return np.concatenate(chosen, axis=1)

    def _empty_cache(self, batch: int, heads: int, dim: int) -> Any:
        from onnxruntime import OrtValue

        empty = np.zeros((batch, heads, 0, dim), dtype=self.cache_dtype)
        return OrtValue.ortvalue_from_numpy(empty, self.device, 0)

    def _run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray, past: Sequence[Any]
    ) -> tuple[Any, list[Any]]:
        """Bind inputs, let ONNX Runtime allocate the outputs on the device, run, and hand back the OrtValues."""
        binding = self._binding
        binding.bind_cpu_input(INPUT_NAMES[0], input_ids)
        binding.bind_cpu_input(INPUT_NAMES[1], attention_mask)
        binding.bind_cpu_input(INPUT_NAMES[2], positions)
        for name, value in zip(self.past_names, past, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.clear_binding_outputs()
        binding.bind_output(LOGITS, self.device)
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0], list(outputs[1:])


def per_token_weight_bytes(model_file: Path) -> int:
    """Bytes of the weights one decoding step reads: every initializer except tables that are only gathered.

    An embedding table is read one row per token, so it counts only where something else reads it whole,
    as a tied LM head does. The graph's structure is read without its external data.
    """
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(model_file), load_external_data=False)
    read_whole: set[str] = set()
    for node in model.graph.node:
        read = node.input[1:] if node.op_type == "Gather" else node.input
        read_whole.update(read)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.name in read_whole:
            itemsize = int(tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
            total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def _heads_and_dim(path: Path, shape: Sequence[Any]) -> tuple[int, int]:
    """The fixed (heads, head size) of a ``[batch, heads, past, head_dim]`` cache input."""
    heads, dim = shape[1], shape[3]
    if not isinstance(heads, int) or not isinstance(dim, int):
        raise CorruptWeightsError(
            path, f"a cache input of shape {list(shape)} has no fixed heads and head size"
        )
    return heads, dim
