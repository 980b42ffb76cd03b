"""Run a decoder one layer at a time from cached inputs.

Window search scores many candidate models that differ only from some layer upwards. One forward pass of
the original model records what enters every decoder layer: the hidden state and the other call arguments
(rotary embeddings, the attention mask of that layer's attention type). A candidate is then scored by
running only the layers from its window upwards, starting from the cached hidden state, which is exact
because the layers below the window are untouched. Capturing the call arguments with hooks, instead of
rebuilding them, keeps this free of per-architecture code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from swm_hub.core.architectures import ArchitectureSpec, spec_for_config
from swm_hub.core.model import decoder_layers

LayerCall = tuple[tuple[Any, ...], dict[str, Any]]


def get_submodule(model: nn.Module, dotted: str) -> nn.Module:
    """The module at a dotted path of the registry (``model.norm``)."""
    return model.get_submodule(dotted)


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden state a decoder layer returned, checked: transformers 5 layers return the tensor alone."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"a decoder layer returned {type(output).__name__}, not a tensor")
    return output


@dataclass
class BatchTrace:
    """What entered each decoder layer for one batch of calibration tokens.

    Attributes:
        hidden: ``hidden[i]`` entered layer ``i``; ``hidden[L]`` left the last layer (before the final norm).
        calls: the other arguments of each layer's call (positional after the hidden state, and keywords).
    """

    hidden: Sequence[torch.Tensor]
    calls: list[LayerCall]


@contextmanager
def _recording_hooks(
    layers: nn.ModuleList, hidden_in: list[torch.Tensor], calls: list[LayerCall]
) -> Iterator[None]:
    """Record each layer's input and call arguments, and the last layer's output; always remove the hooks."""

    def before(index: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            rest_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            hidden_in[index] = hidden.detach()
            calls[index] = (tuple(args[1:]), rest_kwargs)

        return hook

    def after(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        hidden_in[len(layers)] = hidden_of(output).detach()

    handles: list[RemovableHandle] = [
        layer.register_forward_pre_hook(before(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    handles.append(layers[-1].register_forward_hook(after))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _recording(layers: nn.ModuleList) -> Iterator[BatchTrace]:
    """A trace that hooks on ``layers`` fill while the block runs."""
    empty: LayerCall = ((), {})
    hidden: list[torch.Tensor] = [torch.empty(0)] * (len(layers) + 1)
    calls: list[LayerCall] = [empty] * len(layers)
    with _recording_hooks(layers, hidden, calls):
        yield BatchTrace(hidden=hidden, calls=calls)


@torch.no_grad()
def trace_batch(model: nn.Module, input_ids: torch.Tensor) -> BatchTrace:
    """Run the whole model once on a batch and record what enters every layer."""
    spec = spec_for_config(model.config)
    layers = decoder_layers(model, spec)
    with _recording(layers) as trace:
        model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    return trace


@contextmanager
def passing_through(layers: Iterable[nn.Module]) -> Iterator[None]:
    """Make ``layers`` hand their input on unchanged (transformers 5 layers return the hidden state alone).

    Running a model with some layers passing through equals running it with those layers removed, since
    every other layer still gets the call arguments of its own position. A forward already set on the
    instance (accelerate's device hooks put theirs there) is put back afterwards.
    """

    def forward(*args: Any, **kwargs: Any) -> Any:
        return args[0] if args else kwargs["hidden_states"]

    chosen = list(layers)
    own = [layer.__dict__.get("forward") for layer in chosen]
    for layer in chosen:
        layer.forward = forward  # an instance attribute shadows the class's forward; hooks still run
    try:
        yield
    finally:
        for layer, previous in zip(chosen, own, strict=True):
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous


@torch.no_grad()
def record_calls(model: nn.Module, spec: ArchitectureSpec, input_ids: torch.Tensor) -> BatchTrace:
    """The embeddings and every layer's call arguments for a batch, without running any decoder layer.

    Only ``hidden[0]`` (what enters the first layer) is meaningful in the result: the layers pass their
    input on. The base model is called rather than the LM, so no logits are computed for nothing.
    """
    layers = decoder_layers(model, spec)
    base = model.base_model
    assert isinstance(base, nn.Module)
    with passing_through(layers), _recording(layers) as trace:
        base(input_ids=input_ids, use_cache=False)
    return trace


@torch.no_grad()
def run_layers(layers: Sequence[nn.Module], hidden: torch.Tensor, calls: Sequence[LayerCall]) -> torch.Tensor:
    """Apply ``layers`` in order, each with the call arguments recorded for the position it stands in."""
    for layer, (args, kwargs) in zip(layers, calls, strict=True):
        hidden = hidden_of(layer(hidden, *args, **kwargs))
    return hidden


def apply_layer(
    layer: nn.Module, position: int, hidden: Sequence[torch.Tensor], calls: Sequence[Sequence[LayerCall]]
) -> list[torch.Tensor]:
    """Run one layer over every batch, with each batch's call arguments of ``position``.

    Layer by layer over all batches rather than batch by batch through all layers, so that a layer loaded
    from disk is loaded once.
    """
    return [
        run_layers([layer], h, [batch_calls[position]]) for h, batch_calls in zip(hidden, calls, strict=True)
    ]


class LogitHead:
    """Turns a last-layer hidden state into logits, as the model's own forward does after its layers."""

    def __init__(self, model: nn.Module) -> None:
        spec = spec_for_config(model.config)
        self.norm = get_submodule(model, spec.final_norm_path)
        output_embeddings = model.get_output_embeddings()  # type: ignore[operator]
        if not isinstance(output_embeddings, nn.Module):
            raise TypeError("the model has no output embeddings")
        self.lm_head = output_embeddings
        cap = getattr(model.config, spec.logit_softcap_key, None) if spec.logit_softcap_key else None
        self.softcap: float | None = float(cap) if cap else None

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.lm_head(self.norm(hidden))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def flat_hidden(traces: Sequence[BatchTrace], index: int) -> torch.Tensor:
    """What entered layer ``index`` (``L``: what left the last layer) over all batches, as [tokens, hidden].

    Position 0 of every block is left out: the first token acts as an attention sink whose activations grow
    hundreds of times larger than the others' in the upper layers, so it would dominate any similarity
    (on SmolLM2 it alone made linear CKA read above 0.98 between layers 11 and 28; without it, 0.48).
    Rows come batch after batch in the same order for every index, so row r is the same token throughout.
    The rows are gathered on the device of the first batch's embeddings, so that two positions computed on
    different GPUs (a model spread by a device map) can be compared.
    """
    device = traces[0].hidden[0].device
    parts = [t.hidden[index] for t in traces]
    return torch.cat([part[:, 1:].reshape(-1, part.shape[-1]).to(device) for part in parts])
