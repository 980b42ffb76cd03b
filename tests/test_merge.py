"""The merge stage end to end on tiny models: loadable folders, plans, re-application, and every refusal."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_CONFIGS, TINY_LAYERS
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from swm_hub.core.architectures import spec_for
from swm_hub.core.atomic import is_marked, mark
from swm_hub.core.errors import (
    ForeignOutputError,
    ImpossibleTargetError,
    InvalidOptionError,
    OutputExistsError,
    PlanMismatchError,
)
from swm_hub.core.model import LoadedModel
from swm_hub.core.options import METHODS, CalibrationOptions, MeasuredCuts, MergeOptions
from swm_hub.results.plan import PLAN_FILE, MergePlan
from swm_hub.runtime.loading import pull
from swm_hub.stages import merge as merge_module
from swm_hub.stages.merge import MergeResult, layers_to_remove, merge

TARGET = 4


@pytest.fixture(scope="module")
def loaded_model(tiny_model_dir: Callable[[str], Path]) -> Callable[[str], LoadedModel]:
    cache: dict[str, LoadedModel] = {}

    def get(model_type: str) -> LoadedModel:
        if model_type not in cache:
            cache[model_type] = pull(str(tiny_model_dir(model_type)))
        return cache[model_type]

    return get


@pytest.fixture(scope="module")
def llama(loaded_model: Callable[[str], LoadedModel]) -> LoadedModel:
    return loaded_model("llama")


@pytest.fixture(scope="module")
def llama_merged(
    llama: LoadedModel, calibration: CalibrationOptions, tmp_path_factory: pytest.TempPathFactory
) -> MergeResult:
    out = tmp_path_factory.mktemp("llama-merged") / "out"
    return merge(llama, out, MergeOptions(target_layers=TARGET, calibration=calibration))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def forbid_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("calibration ran")

    monkeypatch.setattr(importlib.import_module("swm_hub.runtime.tracing"), "trace_calibration", refuse)
    monkeypatch.setattr(merge_module, "calibration_batches", refuse)


# --- every architecture --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_merge_writes_a_loadable_folder(
    model_type: str,
    loaded_model: Callable[[str], LoadedModel],
    calibration: CalibrationOptions,
    tmp_path: Path,
) -> None:
    loaded = loaded_model(model_type)
    out = tmp_path / "out"
    result = merge(loaded, out, MergeOptions(target_layers=TARGET, calibration=calibration))

    assert result.output_dir == out
    assert result.plan.layers_after == TARGET and result.plan.removed == TINY_LAYERS - TARGET
    assert result.params_after < result.params_before
    spec = spec_for(model_type)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.get_submodule(spec.layers_path)) == TARGET
    assert getattr(model.config, spec.count_key) == TARGET
    assert sum(p.numel() for p in model.parameters()) == result.params_after
    plan = MergePlan.from_file(out / PLAN_FILE)
    assert plan == result.plan
    assert plan.model_type == model_type and plan.num_layers == TINY_LAYERS
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert logits.shape == (1, 5, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temporary folders must not be left behind"


def test_swm_paper_method_at_its_default_threshold(
    llama: LoadedModel, calibration: CalibrationOptions, tmp_path: Path
) -> None:
    result = merge(llama, tmp_path / "out", MergeOptions(method="swm-paper", calibration=calibration))
    plan = MergePlan.from_file(tmp_path / "out" / PLAN_FILE)
    assert plan == result.plan
    assert (plan.method, plan.score, plan.merge) == ("swm-paper", "cosine", "laco")
    assert plan.threshold == METHODS["swm-paper"].default_threshold
    assert plan.target == {"threshold": None, "target_layers": None, "ratio": None}
    assert plan.removed >= 1
    for trial in plan.trials:
        assert trial["passed"] == (trial["similarity"] >= plan.threshold)


def test_layers_of_the_merged_model_follow_the_plan(llama: LoadedModel, llama_merged: MergeResult) -> None:
    """Layers outside every window are copied as they are, renumbered; everything outside the layers too."""
    merged = weights(llama_merged.output_dir)
    original = llama.model.state_dict()
    kept = [
        i for i in range(TINY_LAYERS) if not any(low < i <= high for low, high in llama_merged.plan.windows)
    ]
    lows = {low for low, _ in llama_merged.plan.windows}
    for position, index in enumerate(kept):
        prefix, source = f"model.layers.{position}.", f"model.layers.{index}."
        for key, tensor in original.items():
            if not key.startswith(source):
                continue
            name = key[len(source) :]
            if index in lows and name == "mlp.down_proj.weight":
                assert not torch.equal(merged[prefix + name], tensor), (
                    "the fit rule must refit the projection"
                )
            else:
                assert torch.equal(merged[prefix + name], tensor), prefix + name
    for key, tensor in original.items():
        if not key.startswith("model.layers."):
            assert torch.equal(merged[key], tensor), key


# --- plans -----------------------------------------------------------------------------------------------


def test_saved_plan_reproduces_the_weights_bit_for_bit(
    llama: LoadedModel, llama_merged: MergeResult, calibration: CalibrationOptions, tmp_path: Path
) -> None:
    plan = MergePlan.from_file(llama_merged.output_dir / PLAN_FILE)
    again = merge(llama, tmp_path / "again", MergeOptions(calibration=calibration), plan=plan)
    assert again.plan == plan
    first, second = weights(llama_merged.output_dir), weights(tmp_path / "again")
    assert first.keys() == second.keys()
    for key, tensor in first.items():
        assert torch.equal(tensor, second[key]), key


def test_plan_without_refit_needs_no_calibration(
    llama: LoadedModel, llama_merged: MergeResult, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    plan = dataclasses.replace(llama_merged.plan, merge="laco")
    forbid_calibration(monkeypatch)
    result = merge(llama, tmp_path / "out", MergeOptions(), plan=plan)
    assert MergePlan.from_file(tmp_path / "out" / PLAN_FILE).merge == "laco"
    assert result.plan.layers_after == TARGET


@pytest.mark.parametrize(
    "change", [{"num_layers": TINY_LAYERS + 2}, {"num_layers": TINY_LAYERS - 1}, {"model_type": "gpt2"}]
)
def test_plan_for_another_model_is_refused(
    llama: LoadedModel,
    llama_merged: MergeResult,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    change: dict[str, Any],
) -> None:
    plan = dataclasses.replace(llama_merged.plan, **change)
    forbid_calibration(monkeypatch)
    with pytest.raises(PlanMismatchError):
        merge(llama, tmp_path / "out", MergeOptions(), plan=plan)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("windows", [[(0, TINY_LAYERS - 1)], [(1, 3), (3, 4)], [(2, 2)]])
def test_plan_with_impossible_windows_is_refused(
    llama: LoadedModel,
    llama_merged: MergeResult,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    windows: list[tuple[int, int]],
) -> None:
    plan = dataclasses.replace(llama_merged.plan, windows=windows)
    forbid_calibration(monkeypatch)
    with pytest.raises(PlanMismatchError):
        merge(llama, tmp_path / "out", MergeOptions(), plan=plan)


# --- targets and options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (MergeOptions(target_layers=3), 3),
        (MergeOptions(target_layers=5), 1),
        (MergeOptions(ratio=0.5), 3),
        (MergeOptions(ratio=0.2), 1),
        (MergeOptions(threshold=0.9), None),
        (MergeOptions(), None),
    ],
)
def test_layers_to_remove(options: MergeOptions, expected: int | None) -> None:
    assert layers_to_remove(options, TINY_LAYERS) == expected


@pytest.mark.parametrize(
    "options",
    [
        MergeOptions(target_layers=TINY_LAYERS),
        MergeOptions(target_layers=TINY_LAYERS + 1),
        MergeOptions(target_layers=2),
        MergeOptions(target_layers=0),
        MergeOptions(ratio=0.05),
        MergeOptions(ratio=0.9),
    ],
)
def test_impossible_targets_are_refused(options: MergeOptions) -> None:
    with pytest.raises(ImpossibleTargetError) as caught:
        layers_to_remove(options, TINY_LAYERS)
    assert caught.value.available == TINY_LAYERS


@pytest.mark.parametrize(
    "fields",
    [
        {"threshold": 0.9, "target_layers": 4},
        {"target_layers": 4, "ratio": 0.3},
        {"threshold": 0.0},
        {"threshold": 1.0},
        {"threshold": 1.5},
        {"threshold": -0.2},
        {"ratio": 1.0},
        {"ratio": 0.0},
        {"method": "swm-magic"},
        {"ridge": 0.0},
    ],
)
def test_invalid_options_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidOptionError):
        MergeOptions(**fields)


def test_impossible_target_is_refused_before_calibration(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    forbid_calibration(monkeypatch)
    with pytest.raises(ImpossibleTargetError):
        merge(llama, tmp_path / "out", MergeOptions(target_layers=2))
    assert not (tmp_path / "out").exists()


def test_threshold_that_merges_nothing_is_an_impossible_target(
    llama: LoadedModel, calibration: CalibrationOptions, tmp_path: Path
) -> None:
    with pytest.raises(ImpossibleTargetError, match="nothing would be removed"):
        merge(llama, tmp_path / "out", MergeOptions(threshold=0.999999, calibration=calibration))
    assert list(tmp_path.iterdir()) == []


def test_unknown_merge_rule_is_refused(
    llama: LoadedModel, calibration: CalibrationOptions, tmp_path: Path
) -> None:
    with pytest.raises(InvalidOptionError, match="unknown merge rule"):
        merge(
            llama,
            tmp_path / "out",
            MergeOptions(target_layers=TARGET, merge="blend", calibration=calibration),
        )
    assert list(tmp_path.iterdir()) == []


def test_unknown_merge_rule_is_refused_before_calibration(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    forbid_calibration(monkeypatch)
    with pytest.raises(InvalidOptionError):
        merge(llama, tmp_path / "out", MergeOptions(target_layers=TARGET, merge="blend"))


# --- the output folder -----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_plan", [False, True])
def test_existing_output_is_refused_before_calibration(
    llama: LoadedModel,
    llama_merged: MergeResult,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    with_plan: bool,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "keep.txt"
    keep.write_text("precious", encoding="utf-8")
    forbid_calibration(monkeypatch)
    plan = llama_merged.plan if with_plan else None
    with pytest.raises(OutputExistsError):
        merge(llama, out, MergeOptions(target_layers=TARGET), plan=plan)
    assert keep.read_text(encoding="utf-8") == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_file_as_output_is_refused(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.write_text("not a folder", encoding="utf-8")
    forbid_calibration(monkeypatch)
    with pytest.raises(OutputExistsError):
        merge(llama, out, MergeOptions(target_layers=TARGET), overwrite=True)
    assert out.read_text(encoding="utf-8") == "not a folder"


def test_overwrite_replaces_the_folder(
    llama: LoadedModel, calibration: CalibrationOptions, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old", encoding="utf-8")
    mark(out)
    result = merge(llama, out, MergeOptions(target_layers=TARGET, calibration=calibration), overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").is_file() and (out / PLAN_FILE).is_file() and is_marked(out)
    assert MergePlan.from_file(out / PLAN_FILE) == result.plan
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "the old folder must not be left aside"


def test_overwrite_refuses_a_folder_swm_hub_did_not_write(
    llama: LoadedModel, calibration: CalibrationOptions, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ForeignOutputError, match="did not write"):
        merge(llama, out, MergeOptions(target_layers=TARGET, calibration=calibration), overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(("deepest", "warned"), [(0.2, True), (0.5, False), (None, False)])
def test_a_cut_past_the_deepest_measured_win_is_warned_about(
    llama: LoadedModel,
    calibration: CalibrationOptions,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    deepest: float | None,
    warned: bool,
) -> None:
    measured = {} if deepest is None else {"least-squares": MeasuredCuts("SmolLM2-135M", deepest)}
    monkeypatch.setitem(METHODS, "swm-fit", dataclasses.replace(METHODS["swm-fit"], measured=measured))
    options = MergeOptions(target_layers=TINY_LAYERS - 2, calibration=calibration)  # 2 of 6 removed: 33%
    with caplog.at_level("WARNING", logger="swm_hub.stages.merge"):
        merge(llama, tmp_path / "out", options)
    past = [r.getMessage() for r in caplog.records if "past the deepest cut" in r.getMessage()]
    assert bool(past) == warned
    if warned:
        assert "2 of 6 layers removed" in past[0] and "20% of the layers" in past[0] and "--eval" in past[0]
        assert "SmolLM2-135M" in past[0]


def test_a_cut_where_a_loss_was_measured_is_warned_about(
    llama: LoadedModel,
    calibration: CalibrationOptions,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    lost = ((0.3, 0.4, "lost on poetry"),)
    measured = {"least-squares": MeasuredCuts("SmolLM2-135M", 0.5, lost)}
    preset = dataclasses.replace(METHODS["swm-fit"], measured=measured)
    monkeypatch.setitem(METHODS, "swm-fit", preset)
    options = MergeOptions(target_layers=TINY_LAYERS - 2, calibration=calibration)  # 33%: inside the range
    with caplog.at_level("WARNING", logger="swm_hub.stages.merge"):
        merge(llama, tmp_path / "out", options)
    assert [r.getMessage() for r in caplog.records if "lost on poetry" in r.getMessage()]


@pytest.mark.parametrize(
    ("measured", "warning"), [(False, "was not measured"), (True, "past the deepest cut")]
)
def test_gemma_is_warned_about_by_what_its_gradient_refit_measured(
    tiny_model_dir: Callable[[str], Path],
    calibration: CalibrationOptions,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    measured: bool,
    warning: str,
) -> None:
    """Gemma gets the gradient refit: SmolLM2's least-squares measurements say nothing about it."""
    cuts = {"least-squares": MeasuredCuts("SmolLM2-135M", 0.9)}
    if measured:
        cuts["gradient"] = MeasuredCuts("Gemma 3 270M", 0.1)
    monkeypatch.setitem(METHODS, "swm-fit", dataclasses.replace(METHODS["swm-fit"], measured=cuts))
    gemma = pull(str(tiny_model_dir("gemma3_text")))
    with caplog.at_level("WARNING", logger="swm_hub.stages.merge"):
        merge(gemma, tmp_path / "out", MergeOptions(target_layers=TINY_LAYERS - 1, calibration=calibration))
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warning:")]
    assert len(messages) == 1 and warning in messages[0], messages
    assert ("Gemma 3 270M" in messages[0]) == measured and "SmolLM2" not in messages[0]
