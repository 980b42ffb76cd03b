"""A pulled model as every layer sees it: where its files came from, and the model and tokenizer in memory.

These types sit in the core, below the runtime that builds them, because the stages, the pipeline and the
result of a run all hand them on; only ``runtime.loading`` makes them. How the decoder layers are streamed
in layer-wise execution is the runtime's business: here they are any sequence of modules, and the runtime
code that needs more of them (the shards they are read from) asks for its own type by ``isinstance``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from torch import nn

from swm_hub.core.architectures import ArchitectureSpec, spec_for_config

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

SourceKind = Literal["hub", "folder", "gguf"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are on disk, and where they came from (for messages and the model card).

    Attributes:
        kind: ``hub`` (downloaded snapshot), ``folder`` (a user's folder) or ``gguf`` (one GGUF file).
        ref: the name as the user typed it, normalized: ``org/name[@rev]``, an absolute path, or a demo name.
        repo_id: the Hub repository the weights come from, when known (also for a demo name, a quantized
            copy of a Hub model), else None.
        revision: the branch, tag or commit asked for; None means the default branch.
        path: the local folder holding the files (for ``hub``: the snapshot folder in the Hub cache).
        gguf_file: the file name inside ``path`` for the ``gguf`` kind, else None.
    """

    kind: SourceKind
    ref: str
    repo_id: str | None
    revision: str | None
    path: Path
    gguf_file: str | None

    @property
    def display_name(self) -> str:
        """A short name for messages and cards: a snapshot folder name (a commit hash) would mean nothing."""
        if self.kind == "hub" and self.repo_id is not None:
            return self.repo_id
        return self.gguf_file if self.gguf_file is not None else self.path.name

    @property
    def base_model(self) -> str | None:
        """The Hub id a model card may cite as ``base_model``; the Hub rejects ids that do not exist."""
        return self.repo_id


@dataclass
class LoadedModel:
    """A model in eval mode with frozen weights, its tokenizer, and where both came from.

    In layer-wise execution ``model`` is a skeleton whose decoder layers are on the meta device, and
    ``streamed`` builds each layer from the safetensors shards when it is indexed.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource
    streamed: Sequence[nn.Module] | None = None
    checkpoint_dtype: torch.dtype | None = None
    """The precision the weights are stored in (config.json's ``dtype``); None when unknown (GGUF)."""

    @property
    def save_dtype(self) -> torch.dtype:
        """The precision to save a compressed copy in: the run's, or the checkpoint's where that is narrower.

        Computing in float32 must not double the size of a float16 checkpoint on disk, and a run in
        bfloat16 has nothing more precise to save than bfloat16.
        """
        run = next(iter(self.model.parameters())).dtype
        stored = self.checkpoint_dtype
        if stored is None or not stored.is_floating_point or stored.itemsize >= run.itemsize:
            return run
        return stored

    @property
    def layers(self) -> Sequence[nn.Module]:
        """The decoder layers, in memory or streamed; stages index these rather than the model."""
        if self.streamed is not None:
            return self.streamed
        return list(decoder_layers(self.model, spec_for_config(self.model.config)))

    @property
    def config(self) -> PretrainedConfig:
        """The live config: stages read the layer count and per-layer fields from it."""
        config: PretrainedConfig = self.model.config
        return config


def decoder_layers(model: nn.Module, spec: ArchitectureSpec) -> nn.ModuleList:
    """The decoder ``ModuleList`` named by the registry."""
    layers = model.get_submodule(spec.layers_path)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{spec.layers_path} is a {type(layers).__name__}, not a ModuleList")
    return layers
