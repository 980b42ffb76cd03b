"""Merge rules on hand-made layers, norm detection, and the least-squares refit on traced tiny models."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from conftest import TINY_LAYERS, build_tiny_model
from torch import nn

from swm_hub.core.architectures import ArchitectureSpec, spec_for, spec_for_config
from swm_hub.core.merge_rules import MERGE_RULES
from swm_hub.core.model import LoadedModel, decoder_layers
from swm_hub.core.options import CalibrationOptions
from swm_hub.runtime.layer_trace import BatchTrace, hidden_of, run_layers
from swm_hub.runtime.loading import pull
from swm_hub.runtime.tracing import calibration_batches, trace_calibration
from swm_hub.stages.merge.gradient_fit import default_trained
from swm_hub.stages.merge.layer_parameters import norm_parameter_names
from swm_hub.stages.merge.rules import combine_window, consolidate

LOW, HIGH = 1, 3
"""The window the tests consolidate: three inner layers of a six-layer model."""


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_layers() -> list[nn.Module]:
    """A tiny llama's layers, each norm given its own values (fresh RMSNorms are all ones, so alike)."""
    model = build_tiny_model("llama")
    layers = list(decoder_layers(model, spec_for("llama")))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for index, layer in enumerate(layers):
            for name in norm_parameter_names(layer):
                tensor = layer.get_parameter(name)
                tensor.copy_(1.0 + 0.1 * index + 0.01 * torch.randn(tensor.shape, generator=generator))
    return layers


Traced = tuple[LoadedModel, ArchitectureSpec, list[nn.Module], list[BatchTrace]]


@pytest.fixture(scope="module")
def traced(tiny_model_dir: Callable[[str], Path], calibration: CalibrationOptions) -> Callable[[str], Traced]:
    """A factory: model_type -> the loaded tiny model, its spec, its layers and its calibration traces."""
    cache: dict[str, Traced] = {}

    def get(model_type: str) -> Traced:
        if model_type not in cache:
            loaded = pull(str(tiny_model_dir(model_type)))
            spec = spec_for_config(loaded.model.config)
            traces = trace_calibration(
                loaded.model, calibration_batches(loaded.tokenizer, calibration), progress=False
            )
            cache[model_type] = (loaded, spec, list(decoder_layers(loaded.model, spec)), traces)
        return cache[model_type]

    return get


def params(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in layer.named_parameters()}


def window_mse(layer: nn.Module, traces: Sequence[BatchTrace], low: int, high: int) -> float:
    """How far ``layer``, run on what entered ``low``, lands from what left ``high`` in the original."""
    errors = [
        torch.mean((run_layers([layer], t.hidden[low], [t.calls[low]]) - t.hidden[high + 1]) ** 2)
        for t in traces
    ]
    return float(torch.stack(errors).mean())


# --- parameter-space rules -------------------------------------------------------------------------------


def test_norm_parameter_names_of_llama_are_its_rmsnorms(llama_layers: list[nn.Module]) -> None:
    assert norm_parameter_names(llama_layers[0]) == {
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    }


def test_norm_parameter_names_of_gpt2_are_its_layernorm_weights_and_biases() -> None:
    layer = decoder_layers(build_tiny_model("gpt2"), spec_for("gpt2"))[0]
    assert norm_parameter_names(layer) == {"ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"}


def test_norm_parameter_names_go_by_module_type_not_by_name() -> None:
    class CustomRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

    block = nn.ModuleDict(
        {
            "mixer": nn.Linear(4, 4),
            "first": nn.LayerNorm(4),
            "second": CustomRMSNorm(),
            "norm_like": nn.Linear(4, 4),
        }
    )
    assert norm_parameter_names(block) == {"first.weight", "first.bias", "second.scale"}
    assert norm_parameter_names(nn.LayerNorm(4)) == {"weight", "bias"}


def _mergeable(layer: nn.Module) -> list[str]:
    names = [name for name, _ in layer.named_parameters() if name not in norm_parameter_names(layer)]
    assert "self_attn.q_proj.weight" in names and "mlp.down_proj.weight" in names
    return names


def test_laco_adds_each_layers_difference_to_the_lowest(llama_layers: list[nn.Module]) -> None:
    window = [params(layer) for layer in llama_layers[LOW : HIGH + 1]]
    merged = params(combine_window(llama_layers[LOW : HIGH + 1], MERGE_RULES["laco"]))
    base = window[0]
    for name in _mergeable(llama_layers[LOW]):
        expected = base[name] + (window[1][name] - base[name]) + (window[2][name] - base[name])
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
        assert not torch.allclose(merged[name], base[name])


def test_mean_averages_the_window(llama_layers: list[nn.Module]) -> None:
    window = [params(layer) for layer in llama_layers[LOW : HIGH + 1]]
    merged = params(combine_window(llama_layers[LOW : HIGH + 1], MERGE_RULES["mean"]))
    for name in _mergeable(llama_layers[LOW]):
        expected = (window[0][name] + window[1][name] + window[2][name]) / 3
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)


def test_swm_code_gives_the_top_layers_attention_and_mlp(llama_layers: list[nn.Module]) -> None:
    top = params(llama_layers[HIGH])
    merged = params(combine_window(llama_layers[LOW : HIGH + 1], MERGE_RULES["swm-code"]))
    for name in _mergeable(llama_layers[LOW]):
        torch.testing.assert_close(merged[name], top[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("rule", ["drop", "fit"])
def test_drop_and_fit_start_from_the_lowest_layer(llama_layers: list[nn.Module], rule: str) -> None:
    lowest = params(llama_layers[LOW])
    merged = params(combine_window(llama_layers[LOW : HIGH + 1], MERGE_RULES[rule]))
    assert merged.keys() == lowest.keys()
    for name, tensor in lowest.items():
        assert torch.equal(merged[name], tensor), name


@pytest.mark.parametrize("rule", sorted(MERGE_RULES))
def test_norms_stay_the_lowest_layers_and_inputs_are_untouched(
    llama_layers: list[nn.Module], rule: str
) -> None:
    before = [params(layer) for layer in llama_layers]
    merged_layer = combine_window(llama_layers[LOW : HIGH + 1], MERGE_RULES[rule])
    merged = params(merged_layer)
    norms = norm_parameter_names(llama_layers[LOW])
    for name in norms:
        assert torch.equal(merged[name], before[LOW][name]), name
        assert not torch.equal(merged[name], before[HIGH][name]), "the fixture must make norms differ"
    assert all(merged_layer is not layer for layer in llama_layers)
    for layer, snapshot in zip(llama_layers, before, strict=True):
        for name, tensor in layer.named_parameters():
            assert torch.equal(tensor, snapshot[name]), f"{rule} changed an input layer's {name}"


# --- the least-squares refit ----------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_fit_reproduces_the_window_output_better_than_drop(
    traced: Callable[[str], Traced], model_type: str
) -> None:
    _loaded, spec, layers, traces = traced(model_type)
    assert spec.mlp_out_path is not None
    fitted = consolidate(layers, spec, traces, LOW, HIGH, MERGE_RULES["fit"], ridge=0.3)
    dropped = consolidate(layers, spec, traces, LOW, HIGH, MERGE_RULES["drop"], ridge=0.3)

    fit_error = window_mse(fitted, traces, LOW, HIGH)
    drop_error = window_mse(dropped, traces, LOW, HIGH)
    assert fit_error < 0.8 * drop_error, (fit_error, drop_error)

    # Only the MLP output projection moved (weight and, for GPT-2's Conv1D and NeoX, bias).
    lowest, refit = params(layers[LOW]), params(fitted)
    changed = {name for name in lowest if not torch.equal(lowest[name], refit[name])}
    projection = {
        f"{spec.mlp_out_path}.{p}" for p, _ in fitted.get_submodule(spec.mlp_out_path).named_parameters()
    }
    assert changed == projection
    if model_type in ("gpt2", "gpt_neox"):
        assert f"{spec.mlp_out_path}.bias" in changed


def test_fit_error_grows_with_the_ridge(traced: Callable[[str], Traced]) -> None:
    _loaded, spec, layers, traces = traced("llama")
    errors = [
        window_mse(consolidate(layers, spec, traces, LOW, HIGH, MERGE_RULES["fit"], ridge), traces, LOW, HIGH)
        for ridge in (1e-4, 0.3, 100.0)
    ]
    drop_error = window_mse(layers[LOW], traces, LOW, HIGH)
    assert errors[0] <= errors[1] * (1 + 1e-4) and errors[1] <= errors[2] * (1 + 1e-4), errors
    assert errors[2] <= drop_error * (1 + 1e-4)
    # A huge ridge keeps the current weights: the layer stays the lowest one.
    held = consolidate(layers, spec, traces, LOW, HIGH, MERGE_RULES["fit"], ridge=1e9)
    torch.testing.assert_close(
        held.get_submodule("mlp.down_proj").weight,
        layers[LOW].get_submodule("mlp.down_proj").weight,
        rtol=0,
        atol=1e-6,
    )


def test_fit_leaves_the_original_layers_untouched(traced: Callable[[str], Traced]) -> None:
    """The consolidated layer shares the parameters it keeps with the lowest layer; the refit must not write them."""
    _loaded, spec, layers, traces = traced("llama")
    before = [params(layer) for layer in layers]
    merged = consolidate(layers, spec, traces, LOW, HIGH, MERGE_RULES["fit"], ridge=0.3)
    refitted = merged.get_submodule("mlp.down_proj").weight
    assert not torch.equal(refitted, before[LOW]["mlp.down_proj.weight"])
    for layer, snapshot in zip(layers, before, strict=True):
        for name, tensor in layer.named_parameters():
            assert torch.equal(tensor, snapshot[name]), name


def test_fit_solves_the_documented_ridge_problem(traced: Callable[[str], Traced]) -> None:
    """Weights = argmin |M W - (target - rest)|^2 + s |W - W0|^2 with s = ridge * mean diag(M^T M)."""
    _loaded, spec, layers, traces = traced("llama")
    ridge = 0.3
    original = layers[LOW]
    projection = original.get_submodule("mlp.down_proj")
    captured: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured["m"], captured["o"] = args[0], output

    features, wanted = [], []
    handle = projection.register_forward_hook(hook)
    try:
        for trace in traces:
            args, kwargs = trace.calls[LOW]
            with torch.no_grad():
                y = hidden_of(original(trace.hidden[LOW], *args, **kwargs))
            features.append(captured["m"].reshape(-1, captured["m"].shape[-1]).double())
            wanted.append((trace.hidden[HIGH + 1] - (y - captured["o"])).reshape(-1, y.shape[-1]).double())
    finally:
        handle.remove()
    m, t = torch.cat(features), torch.cat(wanted)
    gram = m.T @ m
    strength = ridge * gram.diagonal().mean()
    current = projection.weight.detach().double().T
    expected = torch.linalg.solve(
        gram + strength * torch.eye(gram.shape[0], dtype=gram.dtype), m.T @ t + strength * current
    )

    fitted = consolidate(layers, spec, traces, LOW, HIGH, MERGE_RULES["fit"], ridge)
    got = fitted.get_submodule("mlp.down_proj").weight.detach().double().T
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_fit_with_a_norm_after_the_mlp_trains_the_mlp_and_norms_by_gradient(
    traced: Callable[[str], Traced], model_type: str
) -> None:
    """No linear fold point there: the fit trains the MLP and norm weights, and beats keeping the layer."""
    _loaded, spec, layers, traces = traced(model_type)
    assert spec.mlp_out_path is None
    fitted = consolidate(layers, spec, traces, LOW, HIGH, MERGE_RULES["fit"], ridge=0.3)
    lowest, refit = params(layers[LOW]), params(fitted)
    changed = {name for name in lowest if not torch.equal(lowest[name], refit[name])}
    assert changed == set(default_trained(layers[LOW]))
    fit_error = window_mse(fitted, traces, LOW, HIGH)
    assert fit_error < 0.8 * window_mse(layers[LOW], traces, LOW, HIGH)


def test_consolidate_of_the_last_inner_window(traced: Callable[[str], Traced]) -> None:
    """The highest window the search may pick (ending at L - 2) refits towards the last layer's input."""
    _loaded, spec, layers, traces = traced("llama")
    low, high = TINY_LAYERS - 3, TINY_LAYERS - 2
    fitted = consolidate(layers, spec, traces, low, high, MERGE_RULES["fit"], ridge=0.3)
    assert window_mse(fitted, traces, low, high) < window_mse(layers[low], traces, low, high)
