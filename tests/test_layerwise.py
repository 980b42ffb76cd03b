"""Layer-wise execution must give what whole-model execution gives, while holding few layers at a time."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIGS, TINY_LAYERS, build_tiny_model, build_tiny_tokenizer
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from swm_hub.core import devices
from swm_hub.core.devices import choose_execution, resolve_device
from swm_hub.core.errors import CorruptWeightsError, DeviceUnavailableError, InvalidOptionError
from swm_hub.core.model import LoadedModel
from swm_hub.core.options import CalibrationOptions, EvalOptions, ExecutionOptions, MergeOptions
from swm_hub.runtime import layerwise
from swm_hub.runtime.execution import batch_losses, streamed_losses
from swm_hub.runtime.layerwise import activation_cache, trace_layerwise
from swm_hub.runtime.loading import pull
from swm_hub.runtime.tracing import calibration_batches, trace_calibration
from swm_hub.stages.analyze import analyze_model
from swm_hub.stages.evaluate import DROP_RULES, evaluate
from swm_hub.stages.merge import merge

TARGET = 3
LAYERWISE = ExecutionOptions(mode="layerwise")


@pytest.fixture(scope="module")
def streamed(tiny_model_dir: Callable[[str], Path]) -> Callable[[str], LoadedModel]:
    cache: dict[str, LoadedModel] = {}

    def get(model_type: str) -> LoadedModel:
        if model_type not in cache:
            cache[model_type] = pull(str(tiny_model_dir(model_type)), execution="layerwise")
        return cache[model_type]

    return get


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_layerwise_pull_loads_no_decoder_layer(streamed: Callable[[str], LoadedModel]) -> None:
    loaded = streamed("llama")
    assert loaded.streamed is not None
    layer_params = list(loaded.streamed.templates.parameters())
    assert layer_params and all(p.is_meta for p in layer_params)
    outer = [p for n, p in loaded.model.named_parameters() if not n.startswith("model.layers.")]
    assert outer and not any(p.is_meta for p in outer)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_layerwise_traces_equal_whole_model_traces(
    model_type: str,
    streamed: Callable[[str], LoadedModel],
    tiny_model_dir: Callable[[str], Path],
    calibration: CalibrationOptions,
) -> None:
    whole = pull(str(tiny_model_dir(model_type)))
    batches = calibration_batches(whole.tokenizer, calibration)
    expected = trace_calibration(whole.model, batches, progress=False)
    loaded = streamed(model_type)
    assert loaded.streamed is not None
    with activation_cache(loaded.streamed.device) as cache:
        traces = trace_layerwise(loaded.model, loaded.streamed, batches, cache, progress=False)
        assert len(traces) == len(expected)
        for got, want in zip(traces, expected, strict=True):
            assert len(got.hidden) == TINY_LAYERS + 1
            for position in range(TINY_LAYERS + 1):
                torch.testing.assert_close(got.hidden[position], want.hidden[position], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("model_type", "merge_rule"),
    [("llama", "fit"), ("qwen2", "fit"), ("gpt2", "fit"), ("gemma2", "laco"), ("gpt_neox", "mean")],
)
def test_layerwise_merge_writes_what_whole_merge_writes(
    model_type: str,
    merge_rule: str,
    streamed: Callable[[str], LoadedModel],
    tiny_model_dir: Callable[[str], Path],
    calibration: CalibrationOptions,
    tmp_path: Path,
) -> None:
    options = MergeOptions(target_layers=TARGET, merge=merge_rule, calibration=calibration)
    whole = merge(pull(str(tiny_model_dir(model_type))), tmp_path / "whole", options)
    layer_wise = merge(streamed(model_type), tmp_path / "layerwise", options)
    assert layer_wise.plan.windows == whole.plan.windows
    assert layer_wise.params_after == whole.params_after
    expected, got = folder_tensors(tmp_path / "whole"), folder_tensors(tmp_path / "layerwise")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "layerwise")
    assert (
        model.config.get_text_config().num_hidden_layers == TARGET
        or getattr(model.config, "n_layer", 0) == TARGET
    )


def test_layerwise_merge_with_the_paper_method_matches(
    streamed: Callable[[str], LoadedModel],
    tiny_model_dir: Callable[[str], Path],
    calibration: CalibrationOptions,
    tmp_path: Path,
) -> None:
    """The model-in-the-loop score runs layers above each candidate: from the shards, one by one."""
    options = MergeOptions(target_layers=TARGET, method="swm-paper", calibration=calibration)
    whole = merge(pull(str(tiny_model_dir("llama"))), tmp_path / "whole", options)
    layer_wise = merge(streamed("llama"), tmp_path / "layerwise", options)
    assert layer_wise.plan.windows == whole.plan.windows
    for got, want in zip(layer_wise.plan.trials, whole.plan.trials, strict=True):
        assert got["similarity"] == pytest.approx(want["similarity"], abs=1e-5)


def test_layerwise_analysis_matches_whole(
    streamed: Callable[[str], LoadedModel],
    tiny_model_dir: Callable[[str], Path],
    calibration: CalibrationOptions,
) -> None:
    whole = analyze_model(pull(str(tiny_model_dir("qwen3"))), calibration=calibration, max_tokens=48)
    layer_wise = analyze_model(streamed("qwen3"), calibration=calibration, max_tokens=48)
    torch.testing.assert_close(torch.tensor(layer_wise.matrix), torch.tensor(whole.matrix), atol=1e-5, rtol=0)
    assert layer_wise.io_redundancy == pytest.approx(whole.io_redundancy, abs=1e-5)


@pytest.fixture
def live_layers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Record, at every layer load, how many loaded layers are still alive (the most ever held at once)."""
    alive: weakref.WeakSet[nn.Module] = weakref.WeakSet()
    counts: list[int] = []
    original = layerwise.StreamedLayers.load

    def counting_load(self: layerwise.StreamedLayers, index: int) -> nn.Module:
        layer = original(self, index)
        alive.add(layer)
        counts.append(len(alive))
        return layer

    monkeypatch.setattr(layerwise.StreamedLayers, "load", counting_load)
    yield counts


@pytest.mark.parametrize(("merge_rule", "most"), [("fit", 2), ("laco", 3)])
def test_layerwise_merge_holds_at_most_a_few_layers(
    merge_rule: str,
    most: int,
    live_layers: list[int],
    tiny_model_dir: Callable[[str], Path],
    calibration: CalibrationOptions,
    tmp_path: Path,
) -> None:
    """The point of the mode: a 6-layer model merged to 3 never has its layers in memory together.

    ``fit`` needs the window's lowest layer only; a parameter-space rule folds the window in, holding the
    lowest layer, the layer folded last and the one being loaded.
    """
    loaded = pull(str(tiny_model_dir("llama")), execution="layerwise")
    merge(
        loaded,
        tmp_path / "out",
        MergeOptions(target_layers=TARGET, merge=merge_rule, calibration=calibration),
    )
    assert len(live_layers) >= TINY_LAYERS
    assert max(live_layers) <= most


def test_layerwise_needs_safetensors(tmp_path: Path) -> None:
    folder = tmp_path / "bin-model"
    model = build_tiny_model("llama")
    model.config.save_pretrained(folder)
    # transformers 5 writes safetensors whatever it is asked, so the legacy .bin is written by hand.
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    build_tiny_tokenizer().save_pretrained(folder)
    with pytest.raises(InvalidOptionError, match="safetensors"):
        pull(str(folder), execution="layerwise")
    assert pull(str(folder), execution="auto").streamed is None


def test_layerwise_names_a_missing_tensor(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    folder = tmp_path / "no-norm"
    source = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(source)
    state = {k: v for k, v in model.state_dict().items() if k != "model.norm.weight"}
    model.save_pretrained(folder, state_dict=state)
    build_tiny_tokenizer().save_pretrained(folder)
    with pytest.raises(CorruptWeightsError, match=r"model\.norm\.weight"):
        pull(str(folder), execution="layerwise")


def test_auto_streams_only_when_the_weights_crowd_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: 1000)
    assert choose_execution("auto", lambda: 400, "cpu") == "whole"
    assert choose_execution("auto", lambda: 600, "cpu") == "layerwise"
    assert choose_execution("auto", lambda: None, "cpu") == "whole"
    assert choose_execution("whole", lambda: 10**12, "cpu") == "whole"
    assert choose_execution("layerwise", lambda: 1, "cpu") == "layerwise"


def test_an_explicit_mode_reads_no_weight_sizes() -> None:
    def refuse() -> int:
        raise AssertionError("the weight size was computed for an explicit mode")

    assert choose_execution("whole", refuse, "cpu") == "whole"
    assert choose_execution("layerwise", refuse, "cpu") == "layerwise"


def test_auto_pull_streams_a_model_larger_than_its_share(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Callable[[str], Path]
) -> None:
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: 1000)
    assert pull(str(tiny_model_dir("llama")), execution="auto").streamed is not None


def test_cuda_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="--device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"


def test_whole_model_on_cuda_goes_through_accelerates_device_map() -> None:
    assert devices.whole_model_device_map("cuda") == "auto"
    assert devices.whole_model_device_map("cpu") == "cpu"


@pytest.mark.parametrize(("field", "value"), [("device", "tpu"), ("dtype", "float8"), ("mode", "streaming")])
def test_execution_options_are_checked(field: str, value: str) -> None:
    with pytest.raises(InvalidOptionError, match=value):
        ExecutionOptions(**{field: value})


@pytest.mark.parametrize("execution", ["whole", "layerwise"])
def test_bfloat16_merge_saves_bfloat16(
    execution: str, tiny_model_dir: Callable[[str], Path], calibration: CalibrationOptions, tmp_path: Path
) -> None:
    loaded = pull(str(tiny_model_dir("llama")), dtype=torch.bfloat16, execution=execution)
    merge(loaded, tmp_path / "out", MergeOptions(target_layers=TARGET, calibration=calibration))
    tensors = folder_tensors(tmp_path / "out")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert model.dtype == torch.bfloat16


# --- evaluation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2"])
def test_layerwise_perplexity_equals_whole(
    model_type: str, streamed: Callable[[str], LoadedModel], tiny_model_dir: Callable[[str], Path]
) -> None:
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 300, (2, 16), generator=generator) for _ in range(3)]
    whole = pull(str(tiny_model_dir(model_type)))
    layer_wise = streamed(model_type)
    assert layer_wise.streamed is not None
    streamed_loss = streamed_losses(layer_wise.model, layer_wise.streamed, batches)
    whole_loss = batch_losses(whole.model, batches)
    assert [count for _, count in streamed_loss] == [count for _, count in whole_loss]
    assert [loss for loss, _ in streamed_loss] == pytest.approx([loss for loss, _ in whole_loss], rel=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_layerwise_evaluation_reports_what_whole_evaluation_reports(
    model_type: str,
    tiny_model_dir: Callable[[str], Path],
    calibration: CalibrationOptions,
    tmp_path: Path,
) -> None:
    """Merged, base and both drop baselines; gemma2 alternates attention types, so a dropped layer shifts them."""
    options = MergeOptions(target_layers=TARGET, calibration=calibration)
    merge(pull(str(tiny_model_dir(model_type))), tmp_path / "out", options)
    heldout = EvalOptions(text=calibration.text, seq_len=16, blocks=4)
    whole = evaluate(tmp_path / "out", dataclasses.replace(heldout, execution=ExecutionOptions(mode="whole")))
    layer_wise = evaluate(tmp_path / "out", dataclasses.replace(heldout, execution=LAYERWISE))
    assert [row.name for row in layer_wise.rows] == [row.name for row in whole.rows]
    assert [row.name for row in whole.rows][2:] == list(DROP_RULES)
    for got, want in zip(layer_wise.rows, whole.rows, strict=True):
        assert got.dropped == want.dropped and got.layers == want.layers
        assert got.perplexity == pytest.approx(want.perplexity, rel=1e-5), got.name
    # The base differs from every shallower model, so equal reports are not equal by accident (the drop
    # rules may pick the same layers, and gemma2 merges without the fit: its merge equals a drop).
    base = whole.rows[0].perplexity
    assert all(row.perplexity != pytest.approx(base, rel=1e-4) for row in whole.rows[1:])


def test_layerwise_evaluation_holds_at_most_one_layer(
    live_layers: list[int],
    tiny_model_dir: Callable[[str], Path],
    calibration: CalibrationOptions,
    tmp_path: Path,
) -> None:
    options = MergeOptions(target_layers=TARGET, calibration=calibration)
    merge(pull(str(tiny_model_dir("llama"))), tmp_path / "out", options)
    live_layers.clear()
    evaluate(tmp_path / "out", EvalOptions(text=calibration.text, seq_len=16, blocks=4, execution=LAYERWISE))
    assert live_layers and max(live_layers) <= 1


@pytest.mark.parametrize("execution", ["whole", "layerwise"])
def test_a_float16_checkpoint_run_in_float32_stays_float16(
    execution: str, calibration: CalibrationOptions, tmp_path: Path
) -> None:
    """Running in float32 must not double the checkpoint's size on disk, nor change the model it ran."""
    build_tiny_model("llama").half().save_pretrained(tmp_path / "fp16")
    build_tiny_tokenizer().save_pretrained(tmp_path / "fp16")
    loaded = pull(str(tmp_path / "fp16"), execution=execution)
    assert loaded.checkpoint_dtype == torch.float16
    merge(loaded, tmp_path / "out", MergeOptions(target_layers=TARGET, calibration=calibration))
    assert {t.dtype for t in folder_tensors(tmp_path / "out").values()} == {torch.float16}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert model.dtype == torch.float16
    assert {p.dtype for p in loaded.model.parameters() if not p.is_meta} == {torch.float32}


@pytest.mark.parametrize(
    ("run", "stored", "saved"),
    [
        (torch.float32, torch.float16, torch.float16),
        (torch.float32, torch.bfloat16, torch.bfloat16),
        (torch.float32, None, torch.float32),
        (torch.bfloat16, torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16, torch.float16),
        (torch.float32, torch.float32, torch.float32),
    ],
)
def test_save_dtype_is_the_narrower_of_run_and_checkpoint(
    run: torch.dtype, stored: torch.dtype | None, saved: torch.dtype, tiny_model_dir: Callable[[str], Path]
) -> None:
    loaded = pull(str(tiny_model_dir("llama")), dtype=run)
    assert dataclasses.replace(loaded, checkpoint_dtype=stored).save_dtype == saved


def test_a_merge_of_a_model_offloaded_by_accelerate_is_refused_up_front(
    tiny_model_dir: Callable[[str], Path], calibration: CalibrationOptions, tmp_path: Path
) -> None:
    """On GPUs too small for the model, accelerate parks modules on the CPU as meta parameters: no merge can save them."""
    loaded = pull(str(tiny_model_dir("llama")))
    assert devices.offloaded_modules(loaded.model) == []
    loaded.model.hf_device_map = {
        "model.embed_tokens": 0,
        **{f"model.layers.{i}": 0 if i < 2 else "cpu" for i in range(TINY_LAYERS)},
        "lm_head": "disk",
    }
    with pytest.raises(
        InvalidOptionError,
        match=r"offloaded 5 module\(s\) \(lm_head, model.layers.2, model.layers.3, \.\.\.\).*--execution layerwise",
    ):
        merge(loaded, tmp_path / "out", MergeOptions(target_layers=TARGET, calibration=calibration))
    assert not (tmp_path / "out").exists()
