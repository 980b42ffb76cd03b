"""The registry checked against transformers itself, so a new per-layer field fails here, not in a user's load."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import COMMON, TINY_CONFIGS, TINY_LAYERS
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from swm_hub.core.architectures import ARCHITECTURES, spec_for, spec_for_config, supported_model_types
from swm_hub.core.errors import UnsupportedArchitectureError

MODEL_TYPES = sorted(TINY_CONFIGS)


def tiny_config(model_type: str) -> PretrainedConfig:
    return AutoConfig.for_model(model_type, **{**COMMON, **TINY_CONFIGS[model_type]})


@pytest.fixture(scope="module")
def meta_models() -> dict[str, Any]:
    """Every tiny model built once on the meta device: structure only, no weights allocated."""
    with torch.device("meta"):
        return {mt: AutoModelForCausalLM.from_config(tiny_config(mt)) for mt in MODEL_TYPES}


def test_tiny_configs_and_registry_cover_the_same_architectures() -> None:
    assert set(TINY_CONFIGS) == set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_layers_path_is_a_module_list_of_decoder_layers(model_type: str, meta_models: dict[str, Any]) -> None:
    model = meta_models[model_type]
    layers = model.get_submodule(spec_for(model_type).layers_path)
    assert isinstance(layers, torch.nn.ModuleList)
    assert len(layers) == TINY_LAYERS
    assert {type(layer).__name__ for layer in layers} <= set(model._no_split_modules)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_final_norm_path_resolves(model_type: str, meta_models: dict[str, Any]) -> None:
    norm = meta_models[model_type].get_submodule(spec_for(model_type).final_norm_path)
    assert "norm" in type(norm).__name__.lower()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_layer_tensor_sits_under_its_layer_prefix(model_type: str, meta_models: dict[str, Any]) -> None:
    spec = spec_for(model_type)
    model = meta_models[model_type]
    keys = list(model.state_dict())
    for index, layer in enumerate(model.get_submodule(spec.layers_path)):
        expected = {f"{spec.layers_path}.{index}.{name}" for name in layer.state_dict()}
        prefixed = {key for key in keys if key.startswith(f"{spec.layers_path}.{index}.")}
        assert expected == prefixed
        assert expected
    outside = [key for key in keys if not key.startswith(f"{spec.layers_path}.")]
    assert outside, "embeddings and head live outside the layers"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_count_key_holds_the_layer_count(model_type: str) -> None:
    config = tiny_config(model_type)
    spec = spec_for(model_type)
    assert config.to_dict()[spec.count_key] == TINY_LAYERS
    assert config.num_hidden_layers == TINY_LAYERS


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_per_layer_list_is_declared(model_type: str) -> None:
    config = tiny_config(model_type)
    attributes = {**config.to_dict(), **vars(config)}
    per_layer = {
        name
        for name, value in attributes.items()
        if isinstance(value, (list, tuple)) and len(value) == TINY_LAYERS
    }
    assert per_layer <= set(spec_for(model_type).layer_indexed_fields)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_declared_fields_exist_in_the_config_class(model_type: str) -> None:
    spec = spec_for(model_type)
    config = tiny_config(model_type)
    declared = (*spec.layer_indexed_fields, *spec.cutoff_fields)
    for field in declared:
        assert hasattr(config, field), field
    for field in spec.layer_indexed_fields:
        assert len(getattr(config, field)) == TINY_LAYERS
    if spec.logit_softcap_key is not None:
        assert hasattr(config, spec.logit_softcap_key)


@pytest.mark.parametrize("model_type", ["bert", "not-a-model", None])
def test_unknown_architectures_are_refused_with_the_supported_list(model_type: str | None) -> None:
    with pytest.raises(UnsupportedArchitectureError) as caught:
        spec_for(model_type)
    assert caught.value.supported == supported_model_types()
    for supported in ARCHITECTURES:
        assert supported in str(caught.value)


def test_spec_for_config_reads_model_type() -> None:
    assert spec_for_config(tiny_config("gpt2")) is ARCHITECTURES["gpt2"]
    with pytest.raises(UnsupportedArchitectureError):
        spec_for_config(object())
