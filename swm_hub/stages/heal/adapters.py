"""Which layers of the compressed model get LoRA adapters, and the adapters themselves.

The consolidated layer of a merged window is its lowest layer, renumbered in the compressed model; the
hidden-state term compares its output with the output of the window's highest layer in the original.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from swm_hub.core.architectures import spec_for_config
from swm_hub.core.model import decoder_layers
from swm_hub.core.options import HealOptions
from swm_hub.results.plan import MergePlan


def consolidated_positions(windows: Sequence[tuple[int, int]]) -> list[int]:
    """The compressed model's layer number of each window's consolidated layer (its lowest layer)."""
    positions, removed = [], 0
    for low, high in windows:
        positions.append(low - removed)
        removed += high - low
    return positions


def window_boundaries(plan: MergePlan) -> tuple[tuple[int, int], ...]:
    """(student layer, teacher layer) pairs: each consolidated layer's output should be its window's output."""
    positions = consolidated_positions(plan.windows)
    return tuple((position, high) for position, (_, high) in zip(positions, plan.windows, strict=True))


def adapted_module_names(model: nn.Module, plan: MergePlan, modules: str) -> list[str]:
    """The linear layers that get adapters, by full module name (PEFT matches them exactly)."""
    spec = spec_for_config(model.config)
    layers = decoder_layers(model, spec)
    positions = consolidated_positions(plan.windows) if modules == "merged" else range(len(layers))
    return [
        f"{spec.layers_path}.{position}.{name}"
        for position in positions
        for name, module in layers[position].named_modules()
        if isinstance(module, nn.Linear | Conv1D)
    ]


def unshare_adapted(student: nn.Module, teacher: nn.Module, names: Sequence[str]) -> None:
    """Give adapted modules weights of their own where they share the teacher's tensors.

    A merged model built in memory shares every tensor it kept with the model it came from, and merging
    the adapters writes into the adapted weights: without copies, the teacher would change with it.
    """
    teacher_storage = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    for name in names:
        module = student.get_submodule(name)
        for attribute, parameter in list(module.named_parameters(recurse=False)):
            if parameter.untyped_storage().data_ptr() in teacher_storage:
                setattr(module, attribute, nn.Parameter(parameter.detach().clone(), requires_grad=False))


def add_adapters(model: nn.Module, names: Sequence[str], options: HealOptions) -> Any:
    """The model with LoRA adapters on ``names``, initialised from ``options.seed`` (no dropout: deterministic)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=0.0,
        target_modules=list(names),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(options.seed)
    return get_peft_model(model, config)


def save_adapter(peft_model: Any, folder: Path, base: str | None) -> None:
    """The adapter in PEFT's own format; it applies to the compressed model before healing."""
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = base
    peft_model.save_pretrained(folder, save_embedding_layers=False)  # no embedding is ever adapted
