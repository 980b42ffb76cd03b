"""The gradient refit of a consolidated layer, on traced tiny random models of every architecture."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIGS
from torch import nn

from swm_hub.core.architectures import spec_for_config
from swm_hub.core.merge_rules import MERGE_RULES
from swm_hub.core.model import decoder_layers
from swm_hub.runtime.layer_trace import BatchTrace, run_layers, trace_batch
from swm_hub.runtime.loading import pull
from swm_hub.stages.merge.gradient_fit import GradientFitRecord, default_trained, gradient_refit
from swm_hub.stages.merge.layer_parameters import norm_parameter_names
from swm_hub.stages.merge.rules import combine_window

LOW, HIGH = 1, 3
"""The window: three inner layers of a six-layer model, kept by layer 1."""
STEPS, LR = 40, 1e-2
BATCHES, ROWS, LENGTH = 3, 2, 12

Traced = tuple[list[nn.Module], list[BatchTrace]]


@pytest.fixture(scope="module")
def traced(tiny_model_dir: Callable[[str], Path]) -> Callable[..., Traced]:
    """A factory: (model_type, dtype) -> the tiny model's layers and the traces of a few random batches."""
    cache: dict[tuple[str, torch.dtype], Traced] = {}

    def get(model_type: str, dtype: torch.dtype = torch.float32) -> Traced:
        key = (model_type, dtype)
        if key not in cache:
            loaded = pull(str(tiny_model_dir(model_type)), dtype=dtype)
            generator = torch.Generator().manual_seed(0)
            vocab = loaded.config.vocab_size
            traces = [
                trace_batch(loaded.model, torch.randint(vocab, (ROWS, LENGTH), generator=generator))
                for _ in range(BATCHES)
            ]
            cache[key] = (list(decoder_layers(loaded.model, spec_for_config(loaded.config))), traces)
        return cache[key]

    return get


def _consolidated(layers: list[nn.Module]) -> nn.Module:
    """The window's lowest layer as the ``drop``/``fit`` rules start from it: sharing all its parameters."""
    return combine_window(layers[LOW : HIGH + 1], MERGE_RULES["drop"])


def _fit(layer: nn.Module, traces: list[BatchTrace], **options: object) -> GradientFitRecord:
    return gradient_refit(layer, traces, LOW, HIGH, **{"steps": STEPS, "lr": LR, **options})  # type: ignore[arg-type]


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_the_fit_lowers_the_loss_on_every_architecture(
    traced: Callable[..., Traced], model_type: str
) -> None:
    layers, traces = traced(model_type)
    record = _fit(_consolidated(layers), traces)
    assert record.steps == STEPS
    assert record.loss_after < 0.8 * record.loss_before


@pytest.mark.parametrize("objective", ["relative-mse", "cosine"])
def test_loss_before_is_the_per_token_loss_without_position_0(
    traced: Callable[..., Traced], objective: str
) -> None:
    layers, traces = traced("gemma3_text")
    layer = _consolidated(layers)
    outputs = [run_layers([layer], t.hidden[LOW], [t.calls[LOW]])[:, 1:] for t in traces]
    targets = [t.hidden[HIGH + 1][:, 1:] for t in traces]
    output, target = torch.cat(outputs), torch.cat(targets)
    if objective == "cosine":
        expected = 1 - torch.nn.functional.cosine_similarity(output, target, dim=-1)
    else:
        expected = (output - target).square().sum(-1) / target.square().sum(-1)
    record = _fit(layer, traces, steps=1, objective=objective)
    assert record.loss_before == pytest.approx(float(expected.mean()), rel=1e-5)


def test_the_first_token_of_a_block_does_not_steer_the_fit(traced: Callable[..., Traced]) -> None:
    layers, traces = traced("llama")
    scrambled = [
        BatchTrace(
            hidden=[*t.hidden[: HIGH + 1], t.hidden[HIGH + 1].clone().index_fill_(1, torch.tensor([0]), 1e4)],
            calls=t.calls,
        )
        for t in traces
    ]
    plain, moved = _consolidated(layers), _consolidated(layers)
    _fit(plain, traces)
    _fit(moved, scrambled)
    for name, parameter in plain.named_parameters():
        assert torch.equal(parameter, moved.get_parameter(name)), name


def test_untrained_parameters_stay_shared_and_trained_ones_are_new(traced: Callable[..., Traced]) -> None:
    layers, traces = traced("gemma3_text")
    original = dict(layers[LOW].named_parameters())
    layer = _consolidated(layers)
    record = _fit(layer, traces)
    assert set(record.trained) == default_trained(layer)
    assert "mlp.down_proj.weight" in record.trained and "post_feedforward_layernorm.weight" in record.trained
    for name, parameter in layer.named_parameters():
        assert not parameter.requires_grad, name
        if name in record.trained:
            assert parameter is not original[name] and not torch.equal(parameter, original[name]), name
        else:
            assert parameter is original[name], name


def test_the_original_layers_are_unchanged(traced: Callable[..., Traced]) -> None:
    layers, traces = traced("llama")
    before = [{n: p.clone() for n, p in layer.named_parameters()} for layer in layers]
    _fit(_consolidated(layers), traces)
    for layer, saved in zip(layers, before, strict=True):
        for name, parameter in layer.named_parameters():
            assert torch.equal(parameter, saved[name]) and not parameter.requires_grad, name


def test_a_seed_reproduces_the_fit_and_another_seed_changes_it(traced: Callable[..., Traced]) -> None:
    layers, traces = traced("llama")
    first, second, other = (_consolidated(layers) for _ in range(3))
    _fit(first, traces, seed=5)
    _fit(second, traces, seed=5)
    _fit(other, traces, seed=6)
    weight = "mlp.down_proj.weight"
    assert torch.equal(first.get_parameter(weight), second.get_parameter(weight))
    assert not torch.equal(first.get_parameter(weight), other.get_parameter(weight))


def test_only_the_named_parameters_are_trained(traced: Callable[..., Traced]) -> None:
    layers, traces = traced("llama")
    original = dict(layers[LOW].named_parameters())
    layer = _consolidated(layers)
    record = _fit(layer, traces, trained=["mlp.down_proj.weight"])
    assert record.trained == ("mlp.down_proj.weight",)
    assert record.loss_after < record.loss_before
    changed = {n for n, p in layer.named_parameters() if p is not original[n]}
    assert changed == {"mlp.down_proj.weight"}


def test_an_unknown_parameter_name_is_refused(traced: Callable[..., Traced]) -> None:
    layers, traces = traced("llama")
    with pytest.raises(KeyError, match="mlp.no_such_proj.weight"):
        _fit(_consolidated(layers), traces, trained=["mlp.no_such_proj.weight"])


def test_the_fit_trains_even_when_called_without_gradients(traced: Callable[..., Traced]) -> None:
    layers, traces = traced("llama")
    with torch.no_grad():
        record = _fit(_consolidated(layers), traces)
    assert record.loss_after < 0.8 * record.loss_before


def test_a_bfloat16_layer_is_fitted_in_float32_and_keeps_its_dtype(traced: Callable[..., Traced]) -> None:
    layers, traces = traced("llama", torch.bfloat16)
    layer = _consolidated(layers)
    record = _fit(layer, traces)
    assert record.loss_after < 0.8 * record.loss_before
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}


def test_default_trained_is_the_mlp_and_the_norms(traced: Callable[..., Traced]) -> None:
    layer = traced("gemma3_text")[0][LOW]
    expected = {n for n, _ in layer.named_parameters() if n.startswith("mlp.")} | norm_parameter_names(layer)
    assert default_trained(layer) == expected
    assert not any(name.startswith("self_attn.") and "norm" not in name for name in expected)
