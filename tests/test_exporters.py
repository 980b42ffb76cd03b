"""ONNX export with KV cache, validated against torch, on tiny random models (CPU)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from swm_hub.architectures import ARCHITECTURES
from swm_hub.errors import (
    DeviceUnavailableError,
    ExportMismatchError,
    ExportUnsupportedError,
    InvalidOptionError,
    OutputExistsError,
    SwmHubError,
)
from swm_hub.exporters import EXPORT_FORMATS, ExportResult, export, onnx
from swm_hub.exporters.onnx import check_onnx_support, export_onnx, onnx_exportable_model_types
from swm_hub.exporters.validate import load_ort_model, validate_export

pytest.importorskip("optimum.onnxruntime")


@pytest.fixture(scope="module")
def llama_export(
    tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> ExportResult:
    return export_onnx(tiny_model_dir("llama"), tmp_path_factory.mktemp("export") / "onnx")


def test_export_writes_a_kv_cache_model_that_matches_torch(llama_export: ExportResult) -> None:
    result = llama_export
    assert result.path.name == "onnx"
    assert {"model.onnx", "config.json", "tokenizer.json"} <= set(result.files)
    assert not result.external_data
    assert (result.model_type, result.layers, result.dtype, result.device) == ("llama", 6, "fp32", "cpu")
    names = [check.name for check in result.checks]
    assert names[0] == "logits" and names[-1] == "logits.decode"
    assert {f"present.{i}.{kind}" for i in range(6) for kind in ("key", "value")} <= set(names)
    assert all(check.passed for check in result.checks)
    assert result.max_abs_diff < 1e-4
    assert not list(result.path.parent.glob(".onnx.tmp-*"))
    session_inputs = [node.name for node in load_ort_model(result.path, "cpu").session.get_inputs()]
    assert "past_key_values.0.key" in session_inputs
    assert result.to_dict()["checks"][0]["passed"] is True


def test_sliding_window_model_exports_with_external_data(
    tiny_model_dir: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # optimum writes one model.onnx_data file for models over 2 GB; this variable forces that path here.
    monkeypatch.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")
    with caplog.at_level(logging.INFO, logger="swm_hub.exporters.validate"):
        result = export_onnx(tiny_model_dir("qwen2"), tmp_path / "out")
    assert result.external_data
    assert "model.onnx_data" in result.files
    assert all(check.passed for check in result.checks)
    lines = [record.getMessage() for record in caplog.records]
    assert len([line for line in lines if line.startswith("✓ ")]) == len(result.checks)
    assert any(line.startswith("✓ logits.decode") and "max abs diff" in line for line in lines)


def test_export_of_gpt2_matches_torch(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    result = export_onnx(tiny_model_dir("gpt2"), tmp_path / "onnx")
    assert result.max_abs_diff < 1e-4
    assert len(result.checks) == 2 + 2 * 6


def test_validation_failure_is_typed_and_carries_every_diff(
    llama_export: ExportResult, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ExportMismatchError) as caught:
        validate_export(llama_export.model_dir, llama_export.path, atol=1e-12)
    error = caught.value
    assert isinstance(error, ValueError)
    assert set(error.diffs) == {check.name for check in llama_export.checks}
    assert "logits" in error.failed
    assert "does not match the torch model" in str(error)
    assert any(record.getMessage().startswith("✗ logits") for record in caplog.records)


def test_every_registry_type_is_exportable_with_this_optimum() -> None:
    assert set(onnx_exportable_model_types()) == set(ARCHITECTURES)


def test_unsupported_by_optimum_is_refused_before_any_work(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx, "_optimum_model_types", lambda: {"gpt2", "qwen2"})
    with pytest.raises(ExportUnsupportedError) as caught:
        export_onnx(tiny_model_dir("llama"), tmp_path / "onnx")
    message = str(caught.value)
    assert "'llama'" in message and "optimum" in message
    assert "exportable model types: gpt2, qwen2" in message
    assert caught.value.supported == ("gpt2", "qwen2")
    assert not (tmp_path / "onnx").exists()


def test_types_outside_the_registry_or_marked_off_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ExportUnsupportedError, match="no registry entry"):
        check_onnx_support("bert")
    monkeypatch.setitem(ARCHITECTURES, "mamba", ARCHITECTURES["llama"])  # in the registry, not in optimum
    with pytest.raises(
        ExportUnsupportedError, match="optimum's ONNX exporter has no text-generation-with-past"
    ):
        check_onnx_support("mamba")
    monkeypatch.setitem(
        ARCHITECTURES, "llama", dataclasses.replace(ARCHITECTURES["llama"], onnx_supported=False)
    )
    with pytest.raises(ExportUnsupportedError, match="known not to match"):
        check_onnx_support("llama")


def test_fp16_needs_cuda(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="--dtype fp16 needs --device cuda"):
        export_onnx(tiny_model_dir("llama"), tmp_path / "onnx", dtype="fp16")
    with pytest.raises(InvalidOptionError, match="unknown dtype"):
        export_onnx(tiny_model_dir("llama"), tmp_path / "onnx", dtype="int8")


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


def test_export_dispatch_names_its_formats(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    assert EXPORT_FORMATS == ("onnx",)
    with pytest.raises(InvalidOptionError, match="unknown export format 'tflite'"):
        export(tiny_model_dir("llama"), formats=("tflite",), out=tmp_path / "x")
