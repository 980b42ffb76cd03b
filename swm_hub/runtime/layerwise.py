"""Layer-wise execution: a model whose decoder layers stay on disk until the moment they run.

A 7B model in float16 takes 13.5 GB, more than many machines can spare, yet every stage of swm-hub touches
one decoder layer at a time: calibration runs the layers in order, the window search and the refit read the
cached inputs of one or two layer positions, and the output is written layer after layer. So in this mode the
model is a skeleton whose embeddings, final norm and head are loaded and whose decoder layers sit on the meta
device; a layer is built from its tensors in the safetensors shards when it is needed and dropped after. The
hidden states every layer position receives are cached on disk, one file per position, and read back one
batch at a time. Peak memory is then about one layer, the embeddings, and the activations of one position.
"""

from __future__ import annotations

import copy
import fcntl
import logging
import os
import shutil
import tempfile
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar, overload

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

from swm_hub.core.architectures import ArchitectureSpec, spec_for_config
from swm_hub.core.atomic import check_free_space, pause_point
from swm_hub.core.errors import CorruptWeightsError
from swm_hub.core.files import GENERATION_CONFIG_FILE
from swm_hub.core.model import decoder_layers
from swm_hub.core.shards import CheckpointReader
from swm_hub.runtime.checkpoint import build_skeleton, refuse_non_finite, stored_tensor_names
from swm_hub.runtime.layer_trace import BatchTrace, LayerCall, apply_layer, record_calls

logger = logging.getLogger(__name__)


Item = TypeVar("Item")


class LoadedOnAccess(Sequence[Item]):
    """A read-only sequence whose items are loaded from disk each time they are indexed, never kept.

    Subclasses say how many items there are and how to load one; indexing (negative indices and slices
    included) behaves as on a list.
    """

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> Item: ...

    @overload
    def __getitem__(self, index: int) -> Item: ...

    @overload
    def __getitem__(self, index: slice) -> list[Item]: ...

    def __getitem__(self, index: int | slice) -> Item | list[Item]:
        if isinstance(index, slice):
            return [self.load(i) for i in range(len(self))[index]]
        return self.load(range(len(self))[index])


class StreamedLayers(LoadedOnAccess[nn.Module]):
    """The decoder layers of a skeleton model, each built from the checkpoint on access and owned by the caller.

    Nothing is cached: a layer lives exactly as long as the caller keeps it, which is what bounds memory.
    """

    def __init__(
        self,
        templates: nn.ModuleList,
        reader: CheckpointReader,
        layers_path: str,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.templates = templates
        self.reader = reader
        self.layers_path = layers_path
        self.dtype = dtype
        self.device = device

    def __len__(self) -> int:
        return len(self.templates)

    def tensor_names(self, index: int) -> list[str]:
        """The state-dict keys of layer ``index`` inside the model, as the checkpoint stores them."""
        return [f"{self.layers_path}.{index}.{name}" for name in self.templates[index].state_dict()]

    def load(self, index: int) -> nn.Module:
        """Layer ``index`` with its weights read from the shards, on the execution device, frozen."""
        layer = copy.deepcopy(self.templates[index])
        prefix = f"{self.layers_path}.{index}."
        tensors = self.reader.read(self.tensor_names(index), dtype=self.dtype, device=self.device)
        refuse_non_finite(tensors.items(), self.reader.folder)
        layer.load_state_dict({name[len(prefix) :]: t for name, t in tensors.items()}, assign=True)
        layer.to(self.device)
        layer.requires_grad_(False)
        layer.train(False)
        return layer


def load_skeleton(
    folder: Path, config: PretrainedConfig, dtype: torch.dtype, device: torch.device
) -> tuple[PreTrainedModel, StreamedLayers]:
    """The model with everything but its decoder layers loaded, and the layers as a ``StreamedLayers``.

    Buffers are built for real (rotary frequencies, causal masks are in no checkpoint); parameters start on
    the meta device and those outside the layers are replaced by the checkpoint's tensors.

    Raises:
        CorruptWeightsError: the shards lack a tensor the model needs outside its layers.
    """
    spec = spec_for_config(config)
    model = build_skeleton(config.to_dict(), dtype)
    names = stored_tensor_names(model)
    reader = CheckpointReader(folder, strip_prefix=model.base_model_prefix, model_name=names.model_name)
    outer = [name for name in model.state_dict() if not _in_layers(name, spec)]
    present = [name for name in outer if reader.has(name)]
    tensors = reader.read(present, dtype=dtype, device=device)
    refuse_non_finite(tensors.items(), folder)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    _check_outer_loaded(model, spec, folder)
    for name, _buffer in list(model.named_buffers()):
        if not _in_layers(name, spec):
            set_module_tensor_to_device(model, name, device)
    model.generation_config = _generation_config(folder, config)
    model.requires_grad_(False)
    model.train(False)
    templates = decoder_layers(model, spec)
    return model, StreamedLayers(templates, reader, spec.layers_path, dtype, device)


def _in_layers(name: str, spec: ArchitectureSpec) -> bool:
    return name.startswith(f"{spec.layers_path}.")


def _check_outer_loaded(model: PreTrainedModel, spec: ArchitectureSpec, folder: Path) -> None:
    """Name the tensors outside the layers that neither the shards nor weight tying provided."""
    missing = sorted(
        name
        for name, tensor in model.named_parameters(remove_duplicate=False)
        if tensor.is_meta and not _in_layers(name, spec)
    )
    if missing:
        raise CorruptWeightsError(folder, f"the safetensors shards lack {', '.join(missing)}")


def _generation_config(folder: Path, config: PretrainedConfig) -> GenerationConfig:
    """The folder's own generation settings (what ``from_pretrained`` would read), else the config's."""
    if (folder / GENERATION_CONFIG_FILE).is_file():
        return GenerationConfig.from_pretrained(folder)
    return GenerationConfig.from_model_config(config)


# --- activations on disk ---------------------------------------------------------------------------------


class ActivationCache:
    """The hidden state entering every layer position, one safetensors file per position, keyed by batch."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        self.folder = folder
        self.device = device

    def _file(self, position: int) -> Path:
        return self.folder / f"position-{position:04d}.safetensors"

    def save(self, position: int, batches: Sequence[torch.Tensor]) -> None:
        tensors = {f"batch_{b}": hidden.detach().contiguous().cpu() for b, hidden in enumerate(batches)}
        save_file(tensors, str(self._file(position)))

    def load(self, position: int, batch: int) -> torch.Tensor:
        with safe_open(str(self._file(position)), framework="pt", device=str(self.device)) as file:
            tensor: torch.Tensor = file.get_tensor(f"batch_{batch}")
        return tensor


CACHE_PREFIX = "swm-hub-activations-"
CACHE_LOCK = ".lock"


@contextmanager
def activation_cache(device: torch.device) -> Iterator[ActivationCache]:
    """A cache in a temporary folder (under ``TMPDIR``) that is deleted when the block ends.

    The folder holds a lock for as long as its run lives, so that the caches of killed runs (SIGKILL, a
    power cut) can be told apart from those of live ones and are deleted by the next run.
    """
    remove_stale_caches(Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=CACHE_PREFIX) as folder, _held(Path(folder) / CACHE_LOCK):
        yield ActivationCache(Path(folder), device)


@contextmanager
def _held(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_stale_caches(folder: Path) -> list[Path]:
    """Delete the activation caches in ``folder`` whose run is gone: nobody holds their lock any more."""
    removed = []
    for cache in sorted(folder.glob(f"{CACHE_PREFIX}*")):
        lock = cache / CACHE_LOCK
        if cache.is_symlink() or not lock.is_file():
            continue
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        finally:
            os.close(fd)
        shutil.rmtree(cache, ignore_errors=True)
        logger.warning("removed %s, the activation cache of an interrupted run", cache)
        removed.append(cache)
    return removed


class CachedHidden(LoadedOnAccess[torch.Tensor]):
    """``BatchTrace.hidden`` of one batch, read from the cache position by position when indexed."""

    def __init__(self, cache: ActivationCache, batch: int, positions: int) -> None:
        self.cache = cache
        self.batch = batch
        self.positions = positions

    def __len__(self) -> int:
        return self.positions

    def load(self, index: int) -> torch.Tensor:
        return self.cache.load(index, self.batch)


def trace_layerwise(
    model: PreTrainedModel,
    layers: StreamedLayers,
    batches: Sequence[torch.Tensor],
    cache: ActivationCache,
    progress: bool,
) -> list[BatchTrace]:
    """What enters every decoder layer, computed one layer at a time over all batches and cached on disk.

    Then each layer in turn is loaded, applied to every batch, and dropped.
    """
    current, calls = _layer_inputs(model, layers, batches)
    positions = len(layers) + 1
    per_position = sum(hidden.numel() * hidden.element_size() for hidden in current)
    check_free_space(cache.folder, positions * per_position, "the layer-wise activation cache (TMPDIR)")
    cache.save(0, current)
    pause_point("calibrating")
    for index in tqdm(range(len(layers)), desc="calibration (layer-wise)", disable=not progress, leave=False):
        current = apply_layer(layers[index], index, current, calls)
        cache.save(index + 1, current)
    return [
        BatchTrace(hidden=CachedHidden(cache, batch, positions), calls=batch_calls)
        for batch, batch_calls in enumerate(calls)
    ]


def final_hidden_layerwise(
    model: PreTrainedModel,
    layers: StreamedLayers,
    batches: Sequence[torch.Tensor],
    keep: Sequence[int],
    progress: bool,
    label: str,
) -> list[torch.Tensor]:
    """What leaves the last of the ``keep`` layers for every batch, one layer in memory at a time.

    Leaving layers out of ``keep`` evaluates the model with those layers dropped, without building it:
    every kept layer still receives the call arguments of its own position (its attention type's mask).
    Nothing is cached on disk; only the current hidden states of all batches are held.
    """
    current, calls = _layer_inputs(model, layers, batches)
    for index in tqdm(keep, desc=label, disable=not progress, leave=False):
        current = apply_layer(layers[index], index, current, calls)
    return current


def _layer_inputs(
    model: PreTrainedModel, layers: StreamedLayers, batches: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[list[LayerCall]]]:
    """What enters the first layer, and every layer's call arguments, for each batch.

    They come from one forward pass per batch in which the layers only pass their input on; the call
    arguments (rotary embeddings, masks) do not depend on the hidden state, so they are exact.
    """
    spec = spec_for_config(model.config)
    first = [record_calls(model, spec, batch.to(layers.device)) for batch in batches]
    return [trace.hidden[0] for trace in first], [trace.calls for trace in first]
