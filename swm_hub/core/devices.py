"""Which device the model runs on, and whether it runs whole or one layer at a time.

The choices are made once, from what the machine has, so that every stage sees the same answer and a
request the machine cannot serve fails before any weights are read.
"""

from __future__ import annotations

from collections.abc import Callable

import psutil
import torch

from swm_hub.core.errors import DeviceUnavailableError
from swm_hub.core.options.common import DTYPE_NAMES

AUTO_MEMORY_SHARE: float = 0.5
"""``--execution auto`` streams layers when the weights alone would take more than this share of free memory:
calibration activations, the merged copy of a layer and the refit's normal equations need room beside them."""


DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}
"""The torch dtype of each precision name the options take."""


def resolve_device(requested: str) -> str:
    """``cpu`` or ``cuda``; ``auto`` picks cuda when torch sees a GPU.

    Raises:
        DeviceUnavailableError: ``cuda`` was asked for and torch sees no GPU.
    """
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            "cuda", "torch sees no CUDA GPU (a CPU build of torch, or no visible device): use --device cpu"
        )
    return requested


def has_bf16_arithmetic(device: torch.device) -> bool:
    """Whether the device computes in bfloat16 itself, so autocasting to it is a speed-up, not an emulation.

    On this project's 2-core CPU (AMX) a heal step ran 1.5x faster under bfloat16 autocast with the same
    healed perplexity; CPUs without AVX512-BF16 or AMX, and GPUs before Ampere, have no such arithmetic.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)
    return False


OFFLOAD_TARGETS: tuple[str, ...] = ("cpu", "disk")
"""Where accelerate's device map puts modules that fit on no GPU; their weights then live outside the model."""


def whole_model_device_map(device: str) -> str:
    """The ``device_map`` a whole-model load gets.

    On CUDA, accelerate's ``auto`` spreads the layers over every visible GPU, and offloads to the CPU what
    fits on none, so a model larger than one GPU still loads; on the CPU everything stays in RAM.
    """
    return "auto" if device == "cuda" else device


def offloaded_modules(model: torch.nn.Module) -> list[str]:
    """The modules accelerate offloaded when it spread ``model`` over the GPUs (none on a CPU run).

    Their parameters sit on the meta device while their weights wait in accelerate's offload store: a
    forward pass works, but nothing can read or save those weights from the model.
    """
    device_map = getattr(model, "hf_device_map", None) or {}
    return sorted(name for name, where in device_map.items() if where in OFFLOAD_TARGETS)


def execution_device(device: str) -> torch.device:
    """The one device a layer-wise run places each layer and its activations on."""
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def free_memory_bytes(device: str) -> int:
    """Memory free for the model now: RAM on the CPU, the sum over visible GPUs on CUDA."""
    if device == "cuda":
        return sum(torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count()))
    return int(psutil.virtual_memory().available)


def choose_execution(mode: str, weight_bytes: Callable[[], int | None], device: str) -> str:
    """``whole`` or ``layerwise``; ``auto`` streams only when the weights would crowd the memory.

    Args:
        mode: ``auto``, ``whole`` or ``layerwise``.
        weight_bytes: gives the size of the weights at the run's precision, or None when they cannot be
            streamed (a GGUF file), in which case ``auto`` loads the model whole; called only for ``auto``,
            since it reads every safetensors header.
        device: ``cpu`` or ``cuda`` (already resolved).
    """
    if mode != "auto":
        return mode
    size = weight_bytes()
    if size is None:
        return "whole"
    return "layerwise" if size > AUTO_MEMORY_SHARE * free_memory_bytes(device) else "whole"
