"""Whole-model and layer-wise execution behind one interface: what a stage asks of a pulled model.

A stage asks for calibration traces, held-out losses (optionally with layers skipped), the modules
accelerate offloaded, or the model itself in memory; ``execution_of`` is the one place that looks at how
the model was pulled. Layer-wise, the decoder layers are built from the shards one at a time and the
model itself is a skeleton, so asking for it in memory is refused with the caller's advice.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from swm_hub.core.architectures import spec_for_config
from swm_hub.core.devices import offloaded_modules
from swm_hub.core.errors import InvalidOptionError
from swm_hub.core.model import LoadedModel, decoder_layers
from swm_hub.runtime.layer_trace import BatchTrace, LogitHead, passing_through
from swm_hub.runtime.layerwise import (
    StreamedLayers,
    activation_cache,
    final_hidden_layerwise,
    trace_layerwise,
)
from swm_hub.runtime.tracing import trace_calibration

Loss = tuple[float, int]
"""A batch's summed next-token negative log-likelihood and the number of tokens it predicted."""


@dataclass(frozen=True)
class WholeExecution:
    """A model in memory (on one device, or spread over GPUs by accelerate)."""

    loaded: LoadedModel

    @contextmanager
    def traces(self, batches: Sequence[torch.Tensor], progress: bool) -> Iterator[list[BatchTrace]]:
        """What enters every decoder layer on ``batches``; no batches means no traces."""
        yield trace_calibration(self.loaded.model, batches, progress) if batches else []

    def losses(
        self, batches: Sequence[torch.Tensor], progress: bool, label: str, skip: Collection[int] = ()
    ) -> list[Loss]:
        """``batch_losses`` with the layers ``skip`` passing their input on (no weights are copied)."""
        layers = decoder_layers(self.loaded.model, spec_for_config(self.loaded.model.config))
        with passing_through([layers[i] for i in skip]):
            return batch_losses(self.loaded.model, batches, progress, label)

    def offloaded_modules(self) -> list[str]:
        return offloaded_modules(self.loaded.model)

    def in_memory(self, advice: str) -> PreTrainedModel:
        """The model itself, for work that needs every weight at once (healing's teacher)."""
        return self.loaded.model


@dataclass(frozen=True)
class LayerwiseExecution:
    """A skeleton model whose decoder layers are built from the safetensors shards when indexed."""

    loaded: LoadedModel
    layers: StreamedLayers

    @contextmanager
    def traces(self, batches: Sequence[torch.Tensor], progress: bool) -> Iterator[list[BatchTrace]]:
        """The traces read their hidden states from a disk cache that lives as long as the block."""
        if not batches:
            yield []
            return
        with activation_cache(self.layers.device) as cache:
            yield trace_layerwise(self.loaded.model, self.layers, batches, cache, progress)

    def losses(
        self, batches: Sequence[torch.Tensor], progress: bool, label: str, skip: Collection[int] = ()
    ) -> list[Loss]:
        """The kept layers run one at a time over every batch; a skipped layer is never loaded."""
        keep = [index for index in range(len(self.layers)) if index not in skip]
        return streamed_losses(self.loaded.model, self.layers, batches, keep, progress, label)

    def offloaded_modules(self) -> list[str]:
        return []  # every layer is read from the shards on demand: nothing is out of reach

    def in_memory(self, advice: str) -> PreTrainedModel:
        raise InvalidOptionError(advice)


Execution = WholeExecution | LayerwiseExecution


def execution_of(loaded: LoadedModel) -> Execution:
    """How ``loaded`` runs, as it was pulled (``--execution``)."""
    if isinstance(loaded.streamed, StreamedLayers):
        return LayerwiseExecution(loaded, loaded.streamed)
    return WholeExecution(loaded)


@torch.no_grad()
def batch_losses(
    model: nn.Module, batches: Sequence[torch.Tensor], progress: bool = False, label: str = ""
) -> list[Loss]:
    """The next-token loss of every batch, kept apart so that blocks of different kinds can be told apart."""
    device = next(model.parameters()).device
    losses = []
    for batch in tqdm(batches, desc=f"perplexity {label}".strip(), disable=not progress, leave=False):
        ids = batch.to(device)
        losses.append(_summed_loss(model(input_ids=ids, use_cache=False).logits, ids))
    return losses


@torch.no_grad()
def streamed_losses(
    model: PreTrainedModel,
    layers: StreamedLayers,
    batches: Sequence[torch.Tensor],
    keep: Sequence[int] | None = None,
    progress: bool = False,
    label: str = "",
) -> list[Loss]:
    """``batch_losses`` of a layer-wise model, optionally with only the layers ``keep`` (all by default).

    The layers run one at a time over every batch; the final norm and head then turn each batch's last
    hidden state into logits.
    """
    kept = range(len(layers)) if keep is None else keep
    desc = f"perplexity {label} (layer-wise)".replace("  ", " ")
    finals = final_hidden_layerwise(model, layers, batches, kept, progress, desc)
    head = LogitHead(model)
    return [
        _summed_loss(head(hidden), ids.to(hidden.device)) for hidden, ids in zip(finals, batches, strict=True)
    ]


def _summed_loss(logits: torch.Tensor, ids: torch.Tensor) -> Loss:
    """The summed next-token loss of a batch and the number of tokens it predicted."""
    shifted = logits[:, :-1].float()
    targets = ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    return float(nll), targets.numel()
