"""Consolidate a window of consecutive decoder layers into one layer (the rules the merge stage applies).

A rule combines the parameters of the window's layers into the parameters of its lowest layer, which takes
the window's place. Normalisation weights always stay those of the lowest layer (the layer's input still
comes from below it); attention and MLP weights are combined by the rule.

The ``fit`` rule adds a correction that the parameter-space rules lack: after combining, it refits the
layer so that it reproduces, on calibration data, the hidden state that the whole window produced. Where
the MLP's output projection is added to the residual stream as is, that is a linear least-squares problem,
solved in closed form for the projection (ridge regression). Where a norm follows the MLP (Gemma 2/3) there
is no such fold point, and the MLP's projections and the norm weights are fitted by gradient steps instead
(``gradient_fit``): on Gemma 3 270M that turned dropping's held-out perplexity of 80.1 at 3 of 18 layers
removed into 44.5 (benchmarks/gemma_fit.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from swm_hub.core.architectures import ArchitectureSpec
from swm_hub.core.merge_rules import MergeRule
from swm_hub.runtime.layer_trace import BatchTrace, hidden_of
from swm_hub.stages.merge.gradient_fit import gradient_refit
from swm_hub.stages.merge.layer_parameters import norm_parameter_names, set_parameter

ParamDict = dict[str, torch.Tensor]
Combine = Callable[[ParamDict, Iterator[ParamDict], frozenset[str]], ParamDict]
"""(lowest layer's parameters, the other layers' in order, mergeable names) -> mergeable tensors.

The other layers come as an iterator and are folded in one at a time, so that a window streamed from disk
holds the lowest layer, the running combination and one more layer, whatever its length; a rule that needs
only the lowest layer never consumes the iterator, and the other layers are then never loaded.
"""


def _keep_lowest(lowest: ParamDict, others: Iterator[ParamDict], mergeable: frozenset[str]) -> ParamDict:
    return dict(lowest)


def _laco_sum(lowest: ParamDict, others: Iterator[ParamDict], mergeable: frozenset[str]) -> ParamDict:
    merged = {n: lowest[n].clone() for n in mergeable}
    for layer in others:
        for n in mergeable:
            merged[n] += layer[n] - lowest[n]
    return merged


def _mean(lowest: ParamDict, others: Iterator[ParamDict], mergeable: frozenset[str]) -> ParamDict:
    total = {n: lowest[n].clone() for n in mergeable}
    count = 1
    for layer in others:
        count += 1
        for n in mergeable:
            total[n] += layer[n]
    return {n: tensor / count for n, tensor in total.items()}


def _running_difference(
    lowest: ParamDict, others: Iterator[ParamDict], mergeable: frozenset[str]
) -> ParamDict:
    """The public SWM code's loop: add (theta_k - current) with weight 1, so the top layer's value wins."""
    merged = {n: lowest[n].clone() for n in mergeable}
    for layer in others:
        for n in mergeable:
            merged[n] += layer[n] - merged[n]
    return merged


_COMBINES: Mapping[str, Combine] = {
    "fit": _keep_lowest,
    "laco": _laco_sum,
    "swm-code": _running_difference,
    "mean": _mean,
    "drop": _keep_lowest,
}
"""The parameter-space combination of each rule in ``MERGE_RULES``, by name."""


def refit_kind(spec: ArchitectureSpec) -> str:
    """How the fit rule refits this architecture's layers: in closed form, or by gradient steps.

    Methods record their measured quality by this kind (``options.MethodPreset.measured``): the two fits
    behave differently, so a measurement of one says nothing about the other.
    """
    return "least-squares" if spec.mlp_out_path is not None else "gradient"


def _parameters_of(layer: nn.Module) -> ParamDict:
    return {n: p.detach() for n, p in layer.named_parameters()}


def combine_window(layers: Iterable[nn.Module], rule: MergeRule) -> nn.Module:
    """A new layer module holding the rule's combination of ``layers`` (lowest first); inputs stay unchanged.

    Norm weights are never combined: the lowest layer's stay, since its input still comes from below.
    The new module shares the parameters it keeps with the lowest layer (nothing here or in the refit
    writes a parameter in place), so keeping the lowest layer, ``fit``'s start, costs no copy of it.
    """
    remaining = iter(layers)
    lowest_layer = next(remaining)
    lowest = _parameters_of(lowest_layer)
    mergeable = frozenset(lowest) - norm_parameter_names(lowest_layer)
    merged = _COMBINES[rule.name](lowest, (_parameters_of(layer) for layer in remaining), mergeable)
    new_layer = copy.deepcopy(lowest_layer, memo={id(p): p for p in lowest_layer.parameters()})
    for name, tensor in merged.items():
        if tensor is not lowest[name]:
            set_parameter(new_layer, name, tensor)
    return new_layer


def _parameter(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _projection_matrix(module: nn.Module) -> torch.Tensor:
    """The projection's weight and bias as one [in (+1), out] matrix, for Linear and GPT-2's Conv1D alike."""
    if not isinstance(module, nn.Linear | Conv1D):
        raise TypeError(f"cannot refit a {type(module).__name__}")
    weight = module.weight.detach() if isinstance(module, Conv1D) else module.weight.detach().T
    bias = _parameter(module, "bias")
    return weight if bias is None else torch.cat([weight, bias.detach()[None, :]], dim=0)


def _store_projection_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Give the projection new parameters (never written in place: they may be shared with the original)."""
    bias = _parameter(module, "bias")
    weight = matrix if bias is None else matrix[:-1]
    if bias is not None:
        set_parameter(module, "bias", matrix[-1].to(bias.dtype))
    old = module.weight
    assert isinstance(old, torch.Tensor)
    oriented = weight if isinstance(module, Conv1D) else weight.T
    set_parameter(module, "weight", oriented.to(old.dtype).contiguous())


@torch.no_grad()
def refit_output_projection(
    layer: nn.Module,
    spec: ArchitectureSpec,
    traces: Sequence[BatchTrace],
    low: int,
    high: int,
    ridge: float,
) -> None:
    """Refit ``layer``'s MLP output projection so that it maps the window's input to the window's output.

    For each calibration batch the layer runs on what entered layer ``low``; a hook captures the
    projection's input ``m`` and output ``o``. What the rest of the layer adds is ``y - o``, so the projection
    should produce ``target - (y - o)``, where ``target`` is what left layer ``high`` in the original model.
    Normal equations are accumulated in float64; the ridge term pulls towards the current weights, scaled by
    the mean feature energy so that ``ridge`` is unit-free.
    """
    assert spec.mlp_out_path is not None, "a norm follows this architecture's MLP: use gradient_refit"
    projection = layer.get_submodule(spec.mlp_out_path)
    has_bias = _parameter(projection, "bias") is not None
    captured: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured["m"], captured["o"] = args[0], output

    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    handle = projection.register_forward_hook(hook)
    try:
        for trace in traces:
            args, kwargs = trace.calls[low]
            y = hidden_of(layer(trace.hidden[low], *args, **kwargs))
            features = captured["m"].reshape(-1, captured["m"].shape[-1]).double()
            if has_bias:
                features = torch.cat([features, torch.ones_like(features[:, :1])], dim=1)
            target = trace.hidden[high + 1].to(y.device)
            wanted = (target - (y - captured["o"])).reshape(-1, y.shape[-1]).double()
            if gram is None or cross is None:
                gram = features.new_zeros(features.shape[1], features.shape[1])
                cross = features.new_zeros(wanted.shape[1], features.shape[1]).mT  # column-major, see below
            gram.addmm_(features.T, features)  # in place: the [features, features] float64 matrix is the
            cross.addmm_(features.T, wanted)  # largest buffer of a merge, so no second copy of it is made
    finally:
        handle.remove()
    assert gram is not None and cross is not None
    strength = float(ridge * gram.diagonal().mean())
    gram.diagonal().add_(strength)
    cross.add_(_projection_matrix(projection).double().to(cross.device), alpha=strength)
    solution = _solve_in_place(gram, cross)
    _store_projection_matrix(projection, solution)


def _solve_in_place(gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """``gram^-1 @ cross`` for a symmetric positive definite ``gram``, in the storage of both.

    ``gram`` is the largest buffer of a merge ([MLP width]^2 float64: 1 GB for a 7B model), and LAPACK copies
    a row-major input into column-major order. Its transpose is the same matrix in column-major order, so
    the Cholesky factor is computed in place; with ``cross`` column-major too, the two triangular solves
    write their result into it, and the whole solve allocates nothing.
    """
    factor = gram.mT
    torch.linalg.cholesky(factor, out=factor)
    torch.linalg.solve_triangular(factor, cross, upper=False, out=cross)
    solution: torch.Tensor = torch.linalg.solve_triangular(factor.mT, cross, upper=True, out=cross)
    return solution


def consolidate(
    layers: Sequence[nn.Module],
    spec: ArchitectureSpec,
    traces: Sequence[BatchTrace],
    low: int,
    high: int,
    rule: MergeRule,
    ridge: float,
    progress: bool = False,
) -> nn.Module:
    """One layer standing for the original layers ``low..high`` (inclusive), by ``rule``.

    The window's layers are indexed one by one, so streamed layers are loaded only as the rule reads them.
    ``progress`` shows a bar for the gradient refit, the one that takes minutes.
    """
    layer = combine_window((layers[index] for index in range(low, high + 1)), rule)
    if rule.refit and refit_kind(spec) == "gradient":
        gradient_refit(layer, traces, low, high, progress=progress)
    elif rule.refit:
        refit_output_projection(layer, spec, traces, low, high, ridge)
    return layer
