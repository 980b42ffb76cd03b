"""Config rewrites by kind: the rewritten dict must load in transformers and describe the kept layers."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from conftest import COMMON, TINY_CONFIGS, TINY_LAYERS
from transformers import AutoConfig

from swm_hub.core.architectures import ARCHITECTURES, ArchitectureSpec, spec_for
from swm_hub.core.config_rewrite import check_kept, kept_layers, rewrite_config
from swm_hub.core.errors import PlanMismatchError, UnsupportedArchitectureError

MODEL_TYPES = sorted(TINY_CONFIGS)
KEPT = [0, 1, 2, 5]  # window 2..4 merged into layer 2


def tiny_config_dict(model_type: str, **overrides: Any) -> dict[str, Any]:
    config = AutoConfig.for_model(model_type, **{**COMMON, **TINY_CONFIGS[model_type], **overrides})
    result: dict[str, Any] = config.to_dict()
    return result


# --- kept_layers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("windows", "expected"),
    [
        ([], [0, 1, 2, 3, 4, 5]),
        ([(2, 4)], [0, 1, 2, 5]),
        ([(0, 1)], [0, 2, 3, 4, 5]),
        ([(0, 4)], [0, 5]),
        ([(3, 4), (0, 2)], [0, 3, 5]),
        ([(1, 2), (3, 4)], [0, 1, 3, 5]),
    ],
)
def test_kept_layers_turns_windows_into_representatives(
    windows: list[tuple[int, int]], expected: list[int]
) -> None:
    assert kept_layers(TINY_LAYERS, windows) == expected


@pytest.mark.parametrize(
    "windows",
    [
        [(4, 5)],  # the last layer would merge into layer 4
        [(2, 2)],  # a window of one layer merges nothing
        [(3, 2)],
        [(-1, 1)],
        [(1, 7)],
        [(1, 3), (3, 4)],  # overlap at layer 3
        [(1, 4), (2, 3)],  # nested
    ],
)
def test_kept_layers_refuses_bad_windows(windows: list[tuple[int, int]]) -> None:
    with pytest.raises(PlanMismatchError):
        kept_layers(TINY_LAYERS, windows)


def test_kept_layers_refuses_an_empty_model() -> None:
    with pytest.raises(PlanMismatchError):
        kept_layers(0, [])


# --- kept validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kept",
    [[], [1, 2, 5], [0, 1, 2], [0, 2, 2, 5], [0, 3, 2, 5], [0, 1, 6], [0, 5, 6], [-1, 0, 5]],
)
def test_invalid_kept_is_refused(kept: list[int]) -> None:
    with pytest.raises(PlanMismatchError):
        check_kept(kept, TINY_LAYERS)
    with pytest.raises(PlanMismatchError):
        rewrite_config(tiny_config_dict("llama"), kept)


def test_a_config_without_its_count_key_is_refused() -> None:
    config = tiny_config_dict("gpt2")
    del config["n_layer"]
    with pytest.raises(PlanMismatchError, match="n_layer"):
        rewrite_config(config, KEPT)


def test_unknown_model_type_is_refused() -> None:
    with pytest.raises(UnsupportedArchitectureError):
        rewrite_config({"model_type": "bert", "num_hidden_layers": 6}, KEPT)


# --- every architecture ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_rewritten_config_loads_with_the_kept_layers(model_type: str) -> None:
    original = tiny_config_dict(model_type)
    before = copy.deepcopy(original)
    rewritten = rewrite_config(original, KEPT)
    assert original == before, "the input dict must not change"

    spec = spec_for(model_type)
    assert rewritten[spec.count_key] == len(KEPT)
    loaded = AutoConfig.for_model(**rewritten)
    assert loaded.num_hidden_layers == len(KEPT)
    for field in spec.layer_indexed_fields:
        assert getattr(loaded, field) == [original[field][index] for index in KEPT]
    untouched = set(original) - {spec.count_key, *spec.layer_indexed_fields, *spec.cutoff_fields}
    assert {key: rewritten[key] for key in untouched} == {key: original[key] for key in untouched}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_keeping_every_layer_changes_nothing_that_matters(model_type: str) -> None:
    """Only a cut-off beyond the last layer moves, to the layer count, which means the same thing."""
    original = tiny_config_dict(model_type)
    rewritten = rewrite_config(original, list(range(TINY_LAYERS)))
    cutoffs = spec_for(model_type).cutoff_fields
    assert {k: v for k, v in rewritten.items() if k not in cutoffs} == {
        k: v for k, v in original.items() if k not in cutoffs
    }
    for field in cutoffs:
        assert rewritten[field] == min(original[field], TINY_LAYERS)


# --- particular kinds --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kept", "cutoff"),
    [([0, 1, 2, 5], 3), ([0, 1, 4, 5], 2), ([0, 5], 1), ([0, 3, 4, 5], 1)],
)
def test_qwen2_max_window_layers_agrees_with_layer_types(kept: list[int], cutoff: int) -> None:
    """Qwen2 derives layer_types from the cut-off; the two rewrites must say the same thing."""
    rewritten = rewrite_config(tiny_config_dict("qwen2"), kept)
    assert rewritten["max_window_layers"] == cutoff
    expected = ["full_attention"] * cutoff + ["sliding_attention"] * (len(kept) - cutoff)
    assert rewritten["layer_types"] == expected
    implicit = {**rewritten, "layer_types": None}
    assert AutoConfig.for_model(**implicit).layer_types == expected


def test_qwen3_cutoff_beyond_the_last_layer_stays_beyond_it() -> None:
    rewritten = rewrite_config(tiny_config_dict("qwen3"), KEPT)
    assert rewritten["max_window_layers"] == len(KEPT)


def test_gemma3_pattern_only_config_gets_explicit_layer_types() -> None:
    """A config.json with only the pattern scalar would re-derive a wrong pattern for fewer layers."""
    original = tiny_config_dict("gemma3_text")
    full = original.pop("layer_types")
    assert full == ["sliding_attention", "sliding_attention", "full_attention"] * 2
    rewritten = rewrite_config(original, KEPT)
    expected = ["sliding_attention", "sliding_attention", "full_attention", "full_attention"]
    assert rewritten["layer_types"] == expected
    assert rewritten["sliding_window_pattern"] == original["sliding_window_pattern"]
    assert AutoConfig.for_model(**rewritten).layer_types == expected
    naive = {**original, "num_hidden_layers": len(KEPT)}
    assert AutoConfig.for_model(**naive).layer_types != expected


def test_gpt2_rewrites_both_count_names_when_both_are_present() -> None:
    original = tiny_config_dict("gpt2")
    assert "num_hidden_layers" not in original
    assert "num_hidden_layers" not in rewrite_config(original, KEPT)
    rewritten = rewrite_config({**original, "num_hidden_layers": TINY_LAYERS}, KEPT)
    assert rewritten["n_layer"] == rewritten["num_hidden_layers"] == len(KEPT)
    assert AutoConfig.for_model(**rewritten).n_layer == len(KEPT)


def test_per_layer_list_of_the_wrong_length_is_refused() -> None:
    config = tiny_config_dict("gemma2")
    config["layer_types"] = config["layer_types"][:-1]
    with pytest.raises(PlanMismatchError, match="layer_types"):
        rewrite_config(config, KEPT)


def test_cutoffs_of_a_new_registry_entry_follow_their_representatives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A registry entry alone must be enough for a new architecture's cut-off field."""
    spec = ArchitectureSpec(
        layers_path="model.layers", final_norm_path="model.norm", cutoff_fields=("first_dense",)
    )
    monkeypatch.setitem(ARCHITECTURES, "toy", spec)
    config = {"model_type": "toy", "num_hidden_layers": 6, "first_dense": 3}
    assert rewrite_config(config, KEPT) == {"model_type": "toy", "num_hidden_layers": 4, "first_dense": 3}
    assert rewrite_config({**config, "first_dense": None}, KEPT)["first_dense"] is None
