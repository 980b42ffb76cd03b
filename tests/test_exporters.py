"""ONNX export with KV cache, validated against torch, and our ONNX Runtime loop, on tiny random models (CPU).

Every registry architecture is exported once per module (a few seconds each); the other tests reuse the
Llama export or build a small model of their own where they need another shape.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from conftest import COMMON, build_tiny_tokenizer
from onnx import numpy_helper
from transformers import AutoConfig, AutoModelForCausalLM

from swm_hub.core.architectures import ARCHITECTURES
from swm_hub.core.errors import (
    CorruptWeightsError,
    DeviceUnavailableError,
    ExportMismatchError,
    ExportUnsupportedError,
    InvalidOptionError,
    OutputExistsError,
    SwmHubError,
    UnknownModelError,
    UnsafeOutputError,
)
from swm_hub.core.options import EXPORT_FORMATS, ExportOptions
from swm_hub.runtime.ort import OrtCausalLM, find_model_file, per_token_weight_bytes
from swm_hub.stages.bench import _per_token_weight_bytes
from swm_hub.stages.export import ExportResult
from swm_hub.stages.export.onnx import (
    FORCE_EXTERNAL_DATA_ENV,
    check_onnx_support,
    export_onnx,
    onnx_exportable_model_types,
)
from swm_hub.stages.export.validate import DECODE_STEPS, validate_export

LOADER_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def exported(
    tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], ExportResult]:
    """model_type -> the export of conftest's tiny model of that type (made once per module)."""
    cache: dict[str, ExportResult] = {}

    def get(model_type: str) -> ExportResult:
        if model_type not in cache:
            out = tmp_path_factory.mktemp(f"export-{model_type}") / "onnx"
            cache[model_type] = export_onnx(tiny_model_dir(model_type), out)
        return cache[model_type]

    return get


def _copy_export(result: ExportResult, folder: Path) -> Path:
    shutil.copytree(result.path, folder)
    return folder


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_exports_and_matches_torch(
    exported: Callable[[str], ExportResult], model_type: str
) -> None:
    result = exported(model_type)
    assert (result.model_type, result.layers, result.dtype, result.device) == (
        model_type,
        6,
        "float32",
        "cpu",
    )
    names = [check.name for check in result.checks]
    presents = [f"present.{i}.{kind}" for i in range(6) for kind in ("key", "value")]
    assert names == ["logits", *presents, "logits.decode"]
    assert all(check.passed for check in result.checks)
    assert result.max_abs_diff < 1e-4
    # the decoding steps' logits of both cases: batch 2, DECODE_STEPS steps
    assert result.checks[-1].shape == (2, DECODE_STEPS, COMMON["vocab_size"])
    assert not result.external_data
    assert {"model.onnx", *LOADER_FILES} <= set(result.files)


def test_graph_has_the_names_and_axes_that_optimum_and_transformers_js_read(
    exported: Callable[[str], ExportResult], tiny_model_dir: Callable[[str], Path]
) -> None:
    result = exported("llama")
    assert result.path.name == "onnx"
    assert not list(result.path.parent.glob(".onnx.tmp-*"))
    graph = onnx.load(str(result.path / "model.onnx"), load_external_data=False).graph
    inputs = {
        node.name: [d.dim_param or d.dim_value for d in node.type.tensor_type.shape.dim]
        for node in graph.input
    }
    outputs = {
        node.name: [d.dim_param or d.dim_value for d in node.type.tensor_type.shape.dim]
        for node in graph.output
    }
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert inputs["past_key_values.5.value"] == ["batch_size", 2, "past_sequence_length", 8]
    assert outputs["logits"] == ["batch_size", "sequence_length", COMMON["vocab_size"]]
    assert outputs["present.0.key"] == ["batch_size", 2, "total_sequence_length", 8]
    assert len(inputs) == 3 + 12 and len(outputs) == 1 + 12
    source = tiny_model_dir("llama")
    assert json.loads((result.path / "config.json").read_text()) == json.loads(
        (source / "config.json").read_text()
    )
    assert result.to_dict()["checks"][0]["passed"] is True


def test_our_loop_generates_what_transformers_generates_with_left_padding(
    exported: Callable[[str], ExportResult], tiny_model_dir: Callable[[str], Path]
) -> None:
    model = OrtCausalLM.load(exported("llama").path)
    torch_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    prompt = np.array([[5, 17, 42, 99, 7, 250, 3]], np.int64)
    expected = torch_model.generate(
        torch.from_numpy(prompt), do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0
    )[:, prompt.shape[1] :].numpy()
    assert model.layers == 6
    np.testing.assert_array_equal(model.generate(prompt, np.ones_like(prompt), 6), expected)
    # the same prompt beside a longer one, left-padded: its tokens do not change
    longer = np.array([[11, 12, 13, *prompt[0]]], np.int64)
    batch = np.concatenate([longer, np.concatenate([[[0, 0, 0]], prompt], axis=1)])
    mask = np.ones_like(batch)
    mask[1, :3] = 0
    np.testing.assert_array_equal(model.generate(batch, mask, 6)[1:], expected)


def test_corrupted_weight_is_a_typed_mismatch_that_names_the_outputs_it_reaches(
    exported: Callable[[str], ExportResult], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    result = exported("llama")
    corrupted = _copy_export(result, tmp_path / "corrupted")
    model = onnx.load(str(corrupted / "model.onnx"))
    # layer 3's MLP output: it changes the logits and the caches of layers 4 and 5, not those of 0 to 3
    node = next(n for n in model.graph.node if "layers.3/mlp/down_proj" in n.name and n.op_type == "MatMul")
    weight = next(t for t in model.graph.initializer if t.name == node.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + 0.5, weight.name))
    onnx.save(model, str(corrupted / "model.onnx"))

    with (
        caplog.at_level(logging.INFO, logger="swm_hub.stages.export.validate"),
        pytest.raises(ExportMismatchError) as caught,
    ):
        validate_export(result.model_dir, corrupted)
    error = caught.value
    assert isinstance(error, ValueError)
    assert set(error.diffs) == {check.name for check in result.checks}
    assert {"logits", "logits.decode", "present.4.key", "present.5.value"} <= set(error.failed)
    assert not {f"present.{i}.{kind}" for i in range(4) for kind in ("key", "value")} & set(error.failed)
    assert "does not match the torch model" in str(error)
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("✗ logits ") for line in lines)
    assert any(line.startswith("✓ present.0.key") for line in lines)


def test_validation_runs_the_prompt_past_the_sliding_window(
    exported: Callable[[str], ExportResult], tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    # The same weights with a window longer than the prompt: only positions beyond 16 tokens differ.
    model_dir = tmp_path / "wide-window"
    shutil.copytree(tiny_model_dir("mistral"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["sliding_window"] = 4096
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportMismatchError) as caught:
        validate_export(model_dir, exported("mistral").path)
    assert "logits" in caught.value.failed


def test_tied_head_is_stored_once_and_per_token_weights_count_it(tmp_path: Path) -> None:
    config = AutoConfig.for_model("llama", **{**COMMON, "num_hidden_layers": 2, "tie_word_embeddings": True})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "tied")
    build_tiny_tokenizer().save_pretrained(tmp_path / "tied")

    result = export_onnx(tmp_path / "tied", tmp_path / "onnx")
    assert result.max_abs_diff < 1e-4
    graph = onnx.load(str(result.path / "model.onnx")).graph
    vocab, hidden = COMMON["vocab_size"], COMMON["hidden_size"]
    tables = [t.name for t in graph.initializer if sorted(t.dims) == sorted([vocab, hidden])]
    assert tables == ["model.model.embed_tokens.weight"]
    # the head is read every token, the embedding only gathered: counted once, as the head
    head_bytes = vocab * hidden * 4
    counted = per_token_weight_bytes(result.path / "model.onnx")
    assert counted == pytest.approx(_per_token_weight_bytes(model), rel=0.05)
    assert counted > head_bytes


def test_forced_external_data_is_one_file_beside_the_graph_and_the_export_is_quiet(
    tiny_model_dir: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(FORCE_EXTERNAL_DATA_ENV, "1")  # what a graph over 2 GB gets
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_onnx(tiny_model_dir("gpt_neox"), tmp_path / "out")
    assert result.external_data
    assert set(result.files) >= {"model.onnx", "model.onnx_data", *LOADER_FILES}
    assert (result.path / "model.onnx").stat().st_size < (result.path / "model.onnx_data").stat().st_size
    assert all(check.passed for check in result.checks)
    assert OrtCausalLM.load(result.path).layers == 6
    exporter_warnings = [
        w for w in caught if "onnx" in w.filename or issubclass(w.category, torch.jit.TracerWarning)
    ]  # type: ignore[attr-defined]
    assert not exporter_warnings, [str(w.message) for w in exporter_warnings]
    assert "Tracer" not in capfd.readouterr().err


def test_one_load_serves_the_trace_and_the_validation_and_a_held_model_serves_both(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller's model in the export's precision and on its device is traced, validated against and left in
    eval mode; one in another precision is left alone, and the folder is loaded once for both steps."""
    folder = tiny_model_dir("llama")
    held = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    held.train(False)
    loads: list[Path] = []
    real_load = AutoModelForCausalLM.from_pretrained

    def counted_load(cls: type, path: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append(Path(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counted_load))
    assert export_onnx(folder, tmp_path / "held", model=held).checks
    assert loads == []
    assert not held.training
    assert export_onnx(folder, tmp_path / "other", model=held.to(torch.float64)).checks
    assert loads == [folder]


def test_a_graph_without_kv_cache_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    tensor = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 1])
    out = helper.make_tensor_value_info("logits", TensorProto.INT64, [1, 1])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g", [tensor], [out])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    with pytest.raises(CorruptWeightsError, match="not an ONNX decoder with KV cache"):
        OrtCausalLM.load(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(CorruptWeightsError, match="ONNX Runtime cannot load"):
        OrtCausalLM.load(tmp_path)
    with pytest.raises(UnknownModelError, match="model.onnx, model_fp16.onnx"):
        find_model_file(tmp_path / "missing")


def test_every_registry_type_is_exportable() -> None:
    assert set(onnx_exportable_model_types()) == set(ARCHITECTURES)


def test_types_outside_the_registry_are_refused() -> None:
    with pytest.raises(ExportUnsupportedError, match="no registry entry") as caught:
        check_onnx_support("bert")
    assert caught.value.supported == tuple(sorted(ARCHITECTURES))


def test_fp16_needs_cuda(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    for dtype in ("float16", "fp16"):  # the short spelling is an alias
        with pytest.raises(InvalidOptionError, match="--dtype float16 needs --device cuda"):
            export_onnx(tiny_model_dir("llama"), tmp_path / "onnx", dtype=dtype)
    with pytest.raises(InvalidOptionError, match="--dtype must be one of float32, float16, got 'int8'"):
        export_onnx(tiny_model_dir("llama"), tmp_path / "onnx", dtype="int8")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    with pytest.raises(DeviceUnavailableError, match="torch sees no CUDA GPU") as caught:
        export_onnx(tiny_model_dir("llama"), tmp_path / "onnx", device="cuda")
    assert isinstance(caught.value, SwmHubError)
    assert not (tmp_path / "onnx").exists()


def test_non_empty_output_is_refused_unless_overwrite(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        export_onnx(tiny_model_dir("llama"), out)
    assert (out / "keep.txt").read_text() == "mine"


def test_the_model_folder_itself_is_never_the_output(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir("gpt2"), model_dir)
    with pytest.raises(UnsafeOutputError, match="it is the input"):
        export_onnx(model_dir, model_dir, overwrite=True)
    assert (model_dir / "model.safetensors").is_file()


def test_export_options_name_the_formats(tmp_path: Path) -> None:
    """An unknown format fails when the options are made, before any model is read."""
    assert "onnx" in EXPORT_FORMATS
    with pytest.raises(InvalidOptionError, match="unknown export format 'tflite'"):
        ExportOptions(formats=("tflite",), out=tmp_path / "x")


def test_validation_logs_one_line_per_output(
    exported: Callable[[str], ExportResult], caplog: pytest.LogCaptureFixture
) -> None:
    result = exported("qwen2")
    with caplog.at_level(logging.INFO, logger="swm_hub.stages.export.validate"):
        checks = validate_export(result.model_dir, result.path)
    lines = [record.getMessage() for record in caplog.records if record.getMessage()[:1] in "✓✗"]
    assert lines == [check.line() for check in checks]
    assert lines[-1].startswith("✓ logits.decode") and "max abs diff" in lines[-1]


def test_the_model_cards_onnx_snippet_runs_on_an_export(
    exported: Callable[[str], ExportResult],
    tiny_llama_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import huggingface_hub

    import swm_hub.stages.card

    template = Path(swm_hub.stages.card.__file__).with_name("model_card.md.j2").read_text(encoding="utf-8")
    block = template.split("{% if onnx_folder is not none %}", 1)[1].split("```python\n", 1)[1]
    snippet = (
        block.split("```", 1)[0].replace("{{ load_id }}", "me/tiny").replace("{{ onnx_folder }}", "onnx")
    )
    repo = tmp_path / "repo"
    shutil.copytree(tiny_llama_dir, repo)
    _copy_export(exported("llama"), repo / "onnx")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id: str(repo))

    exec(compile(snippet, "model_card.md.j2", "exec"), {})

    assert capsys.readouterr().out.strip()  # it decoded and printed the continuation
