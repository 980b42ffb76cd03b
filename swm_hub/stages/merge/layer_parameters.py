"""Naming and replacing the parameters of one decoder layer, for the rules that rewrite a layer's weights.

Both the closed-form refit (``consolidate``) and the gradient refit (``gradient_fit``) give a consolidated
layer new tensors without writing in place (its parameters may be the original model's own), and both leave
or train the norm weights by type rather than by name.
"""

from __future__ import annotations

import torch
from torch import nn


def norm_parameter_names(layer: nn.Module) -> frozenset[str]:
    """Parameters of the normalisation modules of a layer, found by module type rather than by name."""
    names: set[str] = set()
    for module_name, module in layer.named_modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            prefix = f"{module_name}." if module_name else ""
            names.update(f"{prefix}{p}" for p, _ in module.named_parameters(recurse=False))
    return frozenset(names)


def set_parameter(module: nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    """Replace the parameter at ``dotted`` by a new frozen one holding ``tensor`` (the old one is untouched)."""
    owner_path, _, leaf = dotted.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    setattr(owner, leaf, nn.Parameter(tensor, requires_grad=False))
