"""Merged folders that reload with plain transformers, and output folders that never lose anything."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import COMMON, TINY_CONFIGS, TINY_LAYERS, TINY_TEXT
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from swm_hub.core import atomic
from swm_hub.core.architectures import spec_for, spec_for_config
from swm_hub.core.config_rewrite import rewrite_config
from swm_hub.core.errors import CorruptWeightsError, OutputExistsError, PlanMismatchError
from swm_hub.runtime.checkpoint import (
    build_model,
    output_folder,
    save_model_folder,
    state_dict_for,
    verify_folder_loads,
)

MODEL_TYPES = sorted(TINY_CONFIGS)
KEPT = [0, 1, 2, 5]  # window 2..4 merged into layer 2
PLAN = json.dumps({"windows": [[2, 4]], "kept": KEPT})


def load(folder: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def sample_ids(tokenizer: Any) -> torch.Tensor:
    ids: torch.Tensor = tokenizer(TINY_TEXT[:80], return_tensors="pt").input_ids
    return ids


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        result: torch.Tensor = model(ids).logits
    return result


def merged(original: Any, kept: list[int]) -> Any:
    """The merge stage's output, minus the merging: kept layers renumbered around a rewritten config."""
    spec = spec_for_config(original.config)
    state_dict = state_dict_for(kept, original.state_dict(), spec.layers_path)
    return build_model(rewrite_config(original.config.to_dict(), kept), state_dict)


def tiny_tied_model(model_type: str) -> Any:
    config = AutoConfig.for_model(
        model_type, **{**COMMON, **TINY_CONFIGS[model_type], "tie_word_embeddings": True}
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


# --- the whole write path, every architecture ---------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_merged_folder_reloads_and_generates(
    model_type: str, tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    source = tiny_model_dir(model_type)
    original = load(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    spec = spec_for(model_type)
    model = merged(original, KEPT)
    model.generation_config.max_new_tokens = 7
    target = tmp_path / "merged"

    with output_folder(target, overwrite=False) as temp:
        save_model_folder(model, tokenizer, temp, max_shard_size="100KB", extra_files={"swm_plan.json": PLAN})
        assert not target.exists()
    verify_folder_loads(target, len(KEPT))
    assert list(tmp_path.iterdir()) == [target]
    assert len(list(target.glob("model-*.safetensors"))) > 1
    assert (target / "swm_plan.json").read_text(encoding="utf-8") == PLAN

    reloaded = load(target)
    config = reloaded.config
    assert config.num_hidden_layers == getattr(config, spec.count_key) == len(KEPT)
    assert len(reloaded.get_submodule(spec.layers_path)) == len(KEPT)
    for field in spec.layer_indexed_fields:
        assert getattr(config, field) == [getattr(original.config, field)[index] for index in KEPT]
    for field in spec.cutoff_fields:
        assert getattr(config, field) == sum(index < getattr(original.config, field) for index in KEPT)
    assert reloaded.generation_config.max_new_tokens == 7

    assert_kept_weights(original.state_dict(), reloaded.state_dict(), spec.layers_path)
    ids = sample_ids(tokenizer)
    out = logits(reloaded, ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, logits(model, ids))
    generated = reloaded.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape == (1, ids.shape[1] + 3)
    assert AutoTokenizer.from_pretrained(target)(TINY_TEXT).input_ids == tokenizer(TINY_TEXT).input_ids


def assert_kept_weights(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], layers_path: str
) -> None:
    """Layer p of the merged model is original layer KEPT[p]; everything else is unchanged."""
    prefix = f"{layers_path}."
    expected = {key: tensor for key, tensor in before.items() if not key.startswith(prefix)}
    for position, index in enumerate(KEPT):
        for key, tensor in before.items():
            if key.startswith(f"{prefix}{index}."):
                expected[f"{prefix}{position}." + key[len(f"{prefix}{index}.") :]] = tensor
    assert set(after) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(after[key], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_keeping_every_layer_rebuilds_the_same_model(
    model_type: str, tiny_model_dir: Callable[[str], Path]
) -> None:
    """Buffers that no state dict holds (rotary inv_freq, GPT-2 masks, Gemma scales) are rebuilt, not left empty."""
    source = tiny_model_dir(model_type)
    original = load(source)
    rebuilt = merged(original, list(range(TINY_LAYERS)))
    assert not any(t.is_meta for t in [*rebuilt.parameters(), *rebuilt.buffers()])
    ids = sample_ids(AutoTokenizer.from_pretrained(source))
    torch.testing.assert_close(logits(rebuilt, ids), logits(original, ids), rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_tied_head_may_be_absent_and_stays_tied(model_type: str, tmp_path: Path) -> None:
    original = tiny_tied_model(model_type)
    state_dict = original.state_dict()
    for key in original._tied_weights_keys:
        del state_dict[key]
    rebuilt = build_model(original.config.to_dict(), state_dict)
    assert rebuilt.get_output_embeddings().weight is rebuilt.get_input_embeddings().weight
    ids = torch.arange(10).unsqueeze(0)
    torch.testing.assert_close(logits(rebuilt, ids), logits(original, ids), rtol=0, atol=0)
    save_model_folder(rebuilt, None, tmp_path)
    verify_folder_loads(tmp_path, TINY_LAYERS)


def test_missing_and_unexpected_tensors_are_named() -> None:
    original = tiny_tied_model("llama")
    original.config.tie_word_embeddings = False
    state_dict = dict(original.state_dict())
    del state_dict["model.layers.3.mlp.up_proj.weight"]
    state_dict["model.layers.3.mlp.extra.weight"] = torch.zeros(2)
    with pytest.raises(PlanMismatchError) as caught:
        build_model(original.config.to_dict(), state_dict)
    assert "model.layers.3.mlp.up_proj.weight" in str(caught.value)
    assert "model.layers.3.mlp.extra.weight" in str(caught.value)


def test_untied_head_must_be_present() -> None:
    original = tiny_tied_model("llama")
    config = {**original.config.to_dict(), "tie_word_embeddings": False}
    state_dict = {key: t.clone() for key, t in original.state_dict().items() if key != "lm_head.weight"}
    with pytest.raises(PlanMismatchError, match="lm_head.weight"):
        build_model(config, state_dict)


# --- state_dict_for -----------------------------------------------------------------------------------------


def toy_state_dict() -> dict[str, torch.Tensor]:
    state_dict = {"embed.weight": torch.zeros(1), "norm.weight": torch.zeros(1)}
    for index in range(TINY_LAYERS):
        state_dict[f"layers.{index}.attn.weight"] = torch.full((1,), float(index))
        state_dict[f"layers.{index}.mlp.0.bias"] = torch.full((1,), float(index))
    return state_dict


def test_state_dict_for_renumbers_kept_layers_without_copying() -> None:
    before = toy_state_dict()
    after = state_dict_for(KEPT, before, "layers")
    assert set(after) == {"embed.weight", "norm.weight"} | {
        f"layers.{p}.{rest}" for p in range(len(KEPT)) for rest in ("attn.weight", "mlp.0.bias")
    }
    assert after["layers.3.mlp.0.bias"] is before["layers.5.mlp.0.bias"]
    assert after["layers.2.attn.weight"] is before["layers.2.attn.weight"]
    assert after["embed.weight"] is before["embed.weight"]
    assert set(before) == set(toy_state_dict()), "the input must not change"


@pytest.mark.parametrize("kept", [[0, 2, 1, 5], [1, 2, 5], [0, 1, 2], [0, 1, 2, 5, 6]])
def test_state_dict_for_refuses_invalid_kept(kept: list[int]) -> None:
    with pytest.raises(PlanMismatchError):
        state_dict_for(kept, toy_state_dict(), "layers")


def test_state_dict_for_refuses_keys_without_a_layer_number() -> None:
    with pytest.raises(PlanMismatchError, match="layers.rotary"):
        state_dict_for(KEPT, {**toy_state_dict(), "layers.rotary.inv_freq": torch.zeros(1)}, "layers")
    with pytest.raises(PlanMismatchError):
        state_dict_for(KEPT, toy_state_dict(), "model.layers")


def test_state_dict_for_refuses_a_kept_layer_without_tensors() -> None:
    state_dict = {key: t for key, t in toy_state_dict().items() if not key.startswith("layers.2.")}
    with pytest.raises(PlanMismatchError, match=r"\[2\]"):
        state_dict_for(KEPT, state_dict, "layers")


# --- verify_folder_loads ------------------------------------------------------------------------------------


@pytest.fixture
def llama_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "copy"))


def test_verify_accepts_a_good_folder(llama_copy: Path) -> None:
    verify_folder_loads(llama_copy, TINY_LAYERS)


def test_verify_refuses_the_wrong_layer_count(llama_copy: Path) -> None:
    with pytest.raises(CorruptWeightsError, match="expected 4"):
        verify_folder_loads(llama_copy, 4)


def test_verify_refuses_a_missing_tensor(llama_copy: Path) -> None:
    weights = llama_copy / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CorruptWeightsError, match="model.layers.1.mlp.down_proj.weight"):
        verify_folder_loads(llama_copy, TINY_LAYERS)


def test_verify_refuses_truncated_weights(llama_copy: Path) -> None:
    weights = llama_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptWeightsError):
        verify_folder_loads(llama_copy, TINY_LAYERS)


def test_verify_refuses_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CorruptWeightsError):
        verify_folder_loads(tmp_path, TINY_LAYERS)


def test_extra_files_stay_inside_the_folder(tmp_path: Path) -> None:
    model = tiny_tied_model("llama")
    with pytest.raises(ValueError, match="plain file name"):
        save_model_folder(model, None, tmp_path / "out", extra_files={"../escape.json": "{}"})
    assert not (tmp_path / "escape.json").exists()
    save_model_folder(model, None, tmp_path / "out", extra_files={"raw.bin": b"\x00\x01"})
    assert (tmp_path / "out" / "raw.bin").read_bytes() == b"\x00\x01"


# --- output_folder ------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but swm-hub's marker, which records a pid (checked by its own tests)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != atomic.MARKER_FILE
    }


@pytest.fixture
def existing(tmp_path: Path) -> Path:
    """A previous output folder, with a sibling that must survive everything."""
    (tmp_path / "sibling.txt").write_text("keep me", encoding="utf-8")
    target = tmp_path / "out"
    (target / "sub").mkdir(parents=True)
    (target / "old.txt").write_text("old", encoding="utf-8")
    (target / "sub" / "deep.txt").write_text("deep", encoding="utf-8")
    atomic.mark(target)
    return target


def test_temp_folder_is_a_hidden_sibling(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with output_folder(target, overwrite=False) as temp:
        assert temp.parent == target.parent
        assert temp.name.startswith(".out.tmp-")
        assert temp.is_dir() and [p.name for p in temp.iterdir()] == [atomic.MARKER_FILE]
        (temp / "new.txt").write_text("new", encoding="utf-8")
    assert snapshot(target) == {"new.txt": b"new"}
    assert atomic.is_marked(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_parents_are_created(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out"
    with output_folder(target, overwrite=False) as temp:
        (temp / "new.txt").write_text("new", encoding="utf-8")
    assert snapshot(target) == {"new.txt": b"new"}


def test_an_empty_target_needs_no_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    with output_folder(target, overwrite=False) as temp:
        (temp / "new.txt").write_text("new", encoding="utf-8")
    assert snapshot(target) == {"new.txt": b"new"}


def test_non_empty_target_is_refused_before_any_work(existing: Path) -> None:
    before = snapshot(existing.parent)
    entered = False
    with pytest.raises(OutputExistsError) as caught, output_folder(existing, overwrite=False):
        entered = True
    assert not entered
    assert caught.value.path == existing
    assert snapshot(existing.parent) == before
    assert sorted(p.name for p in existing.parent.iterdir()) == ["out", "sibling.txt"]


def test_a_file_target_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("not a folder", encoding="utf-8")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError), output_folder(target, overwrite=overwrite):
            pass
    assert target.read_text(encoding="utf-8") == "not a folder"


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_exception_inside_leaves_no_trace(tmp_path: Path, overwrite: bool) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), output_folder(target, overwrite=overwrite) as temp:
        (temp / "partial.safetensors").write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_an_exception_inside_keeps_the_old_target(existing: Path) -> None:
    before = snapshot(existing.parent)
    with pytest.raises(KeyboardInterrupt), output_folder(existing, overwrite=True) as temp:
        (temp / "partial.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt
    assert snapshot(existing.parent) == before
    assert sorted(p.name for p in existing.parent.iterdir()) == ["out", "sibling.txt"]


def test_overwrite_replaces_the_contents(existing: Path) -> None:
    with output_folder(existing, overwrite=True) as temp:
        (temp / "new.txt").write_text("new", encoding="utf-8")
        assert (existing / "old.txt").exists(), "the old folder stays until the new one is complete"
    assert snapshot(existing) == {"new.txt": b"new"}
    assert sorted(p.name for p in existing.parent.iterdir()) == ["out", "sibling.txt"]


@pytest.mark.parametrize("exchange", ["atomic", "two renames"])
def test_a_failed_move_puts_the_old_target_back(
    existing: Path, monkeypatch: pytest.MonkeyPatch, exchange: str
) -> None:
    before = snapshot(existing.parent)
    real_replace = os.replace

    def failing_exchange(first: Path, second: Path) -> bool:
        raise OSError(28, "No space left on device", str(second))

    def failing_replace(src: Any, dst: Any) -> None:
        if ".tmp-" in Path(src).name:
            raise OSError("disk full")
        real_replace(src, dst)

    if exchange == "atomic":
        monkeypatch.setattr(atomic, "exchange", failing_exchange)
    else:
        monkeypatch.setattr(atomic, "exchange", lambda first, second: False)
        monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full|No space"), output_folder(existing, overwrite=True) as temp:
        (temp / "new.txt").write_text("new", encoding="utf-8")
    assert snapshot(existing.parent) == before
    assert sorted(p.name for p in existing.parent.iterdir()) == ["out", "sibling.txt"]


def test_files_appearing_meanwhile_are_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(OutputExistsError), output_folder(target, overwrite=False) as temp:
        (temp / "new.txt").write_text("new", encoding="utf-8")
        target.mkdir()
        (target / "theirs.txt").write_text("theirs", encoding="utf-8")
    assert snapshot(target) == {"theirs.txt": b"theirs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
