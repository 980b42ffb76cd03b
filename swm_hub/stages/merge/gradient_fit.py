"""Fit a consolidated layer to its window by gradient steps, where no linear refit exists.

The ridge refit of ``consolidate`` solves for the MLP's output projection in closed form, which needs that
projection's output to reach the residual stream as is. Gemma 2/3 put a norm after the MLP, so the output
is no longer linear in any one weight matrix; some tens of Adam steps on the layer's MLP projections and
norm weights fit it instead. The same fit applies to any layer (Llama-style ones too), which is what lets
it be compared with the ridge refit.

The objective is scale-invariant per token: the residual stream of these models holds tokens whose norm is
hundreds of times the others' (the attention sink at position 0, and massive activations), and a plain
squared error would spend the whole fit on them while the next layer's input norm discards their scale.
Position 0 of every block is left out altogether, as in every statistic of ``layer_trace.flat_hidden``.
The cosine distance is the default: on Gemma 3 270M with layers 14-16 of 18 removed (benchmarks/gemma_fit.py,
300 steps) it gave held-out perplexity 56-57 at learning rates 3e-4 to 3e-3, against 90-97 for the squared
error relative to the target's norm and 172 for dropping the layers. (The cosine distance is bounded, so no
token can dominate it; why the relative error fits so much worse was not investigated.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from swm_hub.runtime.layer_trace import BatchTrace, LayerCall, hidden_of
from swm_hub.stages.merge.layer_parameters import norm_parameter_names, set_parameter

Objective = Literal["relative-mse", "cosine"]
TokenLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_STEPS = 75
"""Adam steps per window: on Gemma 3 270M with the block-influence layers 8, 9 and 16 of 18 dropped (windows
7-9 and 15-16), 75 steps of 4 blocks gave held-out perplexity 45.6 against 44.5 for 300 (80.1 dropped), in a
quarter of the time (``benchmarks/gemma_fit.py --counts 3 --rules drop-bi --steps 75``)."""
DEFAULT_LR = 1e-3
MLP_MODULE = "mlp"


def _relative_squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||output - target||^2 / ||target||^2 per token: keeps the magnitude, weighs every token alike."""
    return (output - target).square().sum(-1) / target.square().sum(-1).clamp_min(1e-12)


def _cosine_distance(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cos(output, target) per token: the direction only, as ReplaceMe's cosine objective."""
    return 1 - torch.nn.functional.cosine_similarity(output, target, dim=-1)


TOKEN_LOSSES: Mapping[Objective, TokenLoss] = {
    "relative-mse": _relative_squared_error,
    "cosine": _cosine_distance,
}


@dataclass(frozen=True)
class GradientFitRecord:
    """What a gradient refit did, for logs and plans.

    Attributes:
        trained: the names of the parameters that were trained, sorted.
        steps: the number of Adam steps taken (one calibration batch each).
        loss_before: the mean per-token loss over every calibration token (position 0 left out) before.
        loss_after: the same after the last step.
    """

    trained: tuple[str, ...]
    steps: int
    loss_before: float
    loss_after: float


def default_trained(layer: nn.Module) -> frozenset[str]:
    """The MLP's parameters and every norm weight: the weights around the post-MLP norm, and the scales.

    Pass every parameter name as ``trained`` to fit the attention projections too; on Gemma 3 270M with
    layers 14-16 of 18 removed that gave held-out perplexity 50.8 against 57.1 for this set, in the same
    time (benchmarks/gemma_fit.py). Norm weights alone barely move the loss (172.4 against 172.1 dropped).
    """
    mlp = {f"{MLP_MODULE}.{name}" for name, _ in layer.get_submodule(MLP_MODULE).named_parameters()}
    return frozenset(mlp | norm_parameter_names(layer))


def gradient_refit(
    layer: nn.Module,
    traces: Sequence[BatchTrace],
    low: int,
    high: int,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    trained: Collection[str] | None = None,
    objective: Objective = "cosine",
    seed: int = 0,
    progress: bool = False,
) -> GradientFitRecord:
    """Train ``trained`` parameters of ``layer`` so that it maps what entered layer ``low`` to what left ``high``.

    ``layer`` is the consolidated layer (``consolidate.combine_window``), whose parameters may be the very
    tensors of the original model: the fit runs on a float32 working copy, and only at the end does
    ``layer`` receive new parameters for the trained names (frozen, in their old dtype and device); every
    other parameter of ``layer`` stays the object it was. Each step takes one calibration batch, in an
    order drawn from ``seed``, so the result is reproducible on one machine.

    Args:
        layer: the consolidated layer, standing at position ``low``.
        traces: calibration traces of the original model: ``hidden[low]`` and ``calls[low]`` go in,
            ``hidden[high + 1]`` is the target.
        low: the window's lowest layer.
        high: the window's highest layer (inclusive).
        steps: Adam steps.
        lr: Adam's learning rate.
        trained: parameter names of ``layer`` to train; ``default_trained(layer)`` when None.
        objective: the per-token loss, ``relative-mse`` or ``cosine`` (see ``TOKEN_LOSSES``).
        seed: seeds the order in which batches are visited.
        progress: show a bar over the steps (a window takes minutes on a CPU).

    Raises:
        KeyError: a name in ``trained`` is not a parameter of ``layer``.
    """
    names = sorted(default_trained(layer) if trained is None else trained)
    work = _float32_copy(layer)
    parameters = dict(work.named_parameters())
    chosen = [parameters[name] for name in names]
    for parameter in chosen:
        parameter.requires_grad_(True)
    token_loss = TOKEN_LOSSES[objective]
    loss_before = _mean_loss(work, traces, low, high, token_loss)
    optimizer = torch.optim.Adam(chosen, lr=lr)
    with torch.enable_grad():
        order = _batch_order(len(traces), steps, seed)
        bar = f"fitting layers {low}-{high}"
        for index in tqdm(order, desc=bar, unit="step", disable=not progress, leave=False):
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(_batch_loss(work, traces[index], low, high, token_loss).mean())
            optimizer.step()
    loss_after = _mean_loss(work, traces, low, high, token_loss)
    _install(layer, {name: parameters[name] for name in names})
    return GradientFitRecord(tuple(names), steps, loss_before, loss_after)


def _float32_copy(layer: nn.Module) -> nn.Module:
    """A copy of the layer that owns its parameters, in float32 (Adam on bfloat16 weights loses the steps)."""
    work = copy.deepcopy(layer).float()
    work.train(False)
    return work


def _batch_order(batches: int, steps: int, seed: int) -> list[int]:
    """``steps`` batch indices: whole passes over the batches, each in its own seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    passes = -(-steps // batches)
    order = [int(i) for _ in range(passes) for i in torch.randperm(batches, generator=generator)]
    return order[:steps]


def _batch_loss(
    work: nn.Module, trace: BatchTrace, low: int, high: int, token_loss: TokenLoss
) -> torch.Tensor:
    """The per-token loss of one batch, every block's position 0 left out."""
    device = next(work.parameters()).device
    args, kwargs = _float32_call(trace.calls[low], device)
    hidden = trace.hidden[low].to(device, torch.float32)
    output = hidden_of(work(hidden, *args, **kwargs))
    target = trace.hidden[high + 1].to(device, torch.float32)
    return token_loss(output[:, 1:], target[:, 1:]).reshape(-1)


@torch.no_grad()
def _mean_loss(
    work: nn.Module, traces: Sequence[BatchTrace], low: int, high: int, token_loss: TokenLoss
) -> float:
    losses = torch.cat([_batch_loss(work, trace, low, high, token_loss) for trace in traces])
    return float(losses.mean())


def _float32_call(call: LayerCall, device: torch.device) -> LayerCall:
    """The recorded call arguments with floating tensors (rotary tables, additive masks) in float32."""
    args, kwargs = call
    return tuple(_to_float32(a, device) for a in args), {k: _to_float32(v, device) for k, v in kwargs.items()}


def _to_float32(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, torch.float32) if value.is_floating_point() else value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to_float32(v, device) for v in value)
    return value


def _install(layer: nn.Module, fitted: Mapping[str, torch.Tensor]) -> None:
    """Give ``layer`` new frozen parameters for the fitted names, in the dtype and device each had."""
    old = dict(layer.named_parameters())
    for name, tensor in fitted.items():
        set_parameter(layer, name, tensor.detach().to(old[name].device, old[name].dtype))
