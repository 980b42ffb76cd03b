"""``export --format genai`` and ``bench --backend genai`` on tiny models with head size 16.

conftest's tiny models have head size 8, which onnxruntime's attention kernel refuses, so the models that
the builder can build get their own tiny configs here (hidden 64, 4 heads). Exports are built once per
module; the refusals are checked on configs and through the CLI without running the builder.
"""

from __future__ import annotations

import importlib
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import COMMON, TINY_CONFIGS, build_tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from swm_hub import cli
from swm_hub.core import errors
from swm_hub.core.architectures import ARCHITECTURES
from swm_hub.core.options import BenchOptions, ExportOptions
from swm_hub.runtime.genai import GenaiModel
from swm_hub.stages.bench import bench
from swm_hub.stages.export import export
from swm_hub.stages.export import genai as genai_module
from swm_hub.stages.export.genai import (
    check_genai_support,
    export_genai,
    genai_exportable_model_types,
    validate_genai,
)

HEAD16 = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "vocab_size": 300,
    "tie_word_embeddings": False,
}
# The types the builder builds; sliding windows shorter than the validation prompt (113 tokens).
BUILDABLE: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 16},
    "phi3": {
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "original_max_position_embeddings": 256,
    },
}
GENAI_TYPES = ("gemma2", "llama", "mistral", "phi3", "qwen2", "qwen3")


def save_head16_model(folder: Path, model_type: str, seed: int = 0, **overrides: Any) -> Path:
    config = AutoConfig.for_model(model_type, **{**HEAD16, **BUILDABLE.get(model_type, {}), **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def head16_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """model_type -> a saved tiny model with head size 16 (built once per module)."""
    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            cache[model_type] = save_head16_model(tmp_path_factory.mktemp(f"h16-{model_type}"), model_type)
        return cache[model_type]

    return get


@pytest.fixture(scope="module")
def llama_fp32(head16_dir: Callable[[str], Path]) -> genai_module.GenaiExportResult:
    """The tiny Llama exported in fp32 into its default folder, MODEL_DIR/genai."""
    return export_genai(head16_dir("llama"), precision="fp32")


@pytest.fixture(scope="module")
def llama_int4(
    head16_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> genai_module.GenaiExportResult:
    """The tiny Llama exported in int4 with every socket connection refused: the builder must not download."""
    out = tmp_path_factory.mktemp("int4") / "llama-genai-int4"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _no_network)
        patch.setattr(socket.socket, "connect_ex", _no_network)
        return export_genai(head16_dir("llama"), out=out, precision="int4")


def _no_network(*args: object) -> None:
    raise AssertionError(f"the genai export tried to open a connection: {args[1:]}")


def _builder_must_not_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model builder ran although the model was refused up front")


# --- export and validation ---------------------------------------------------------------------------------


def test_fp32_export_generates_like_torch(llama_fp32: genai_module.GenaiExportResult) -> None:
    check = llama_fp32.check
    assert llama_fp32.path == (llama_fp32.model_dir / "genai").absolute()
    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= set(llama_fp32.files)
    assert (llama_fp32.precision, llama_fp32.layers, llama_fp32.model_type) == ("float32", 4, "llama")
    assert check.passed and check.atol == 1e-3
    assert len(check.genai_tokens) == len(check.step_diffs) == 8
    assert check.max_abs_diff < 1e-4
    assert check.genai_tokens == check.torch_tokens
    assert not [p.name for p in llama_fp32.model_dir.iterdir() if p.name.startswith(".")]


def test_int4_export_generates_every_token_offline(llama_int4: genai_module.GenaiExportResult) -> None:
    check = llama_int4.check
    assert llama_int4.precision == "int4"
    assert check.atol is None and check.passed
    assert len(check.genai_tokens) == 8
    assert 0 <= check.agreement <= 8
    assert "torch agrees on" in check.line() and "reported, not checked" in check.line()
    assert GenaiModel(llama_int4.path).precision == "int4"
    assert not [p.name for p in llama_int4.path.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3", "gemma2", "phi3"])
def test_other_buildable_types_match_torch_in_fp32(
    head16_dir: Callable[[str], Path], tmp_path: Path, model_type: str
) -> None:
    """Sliding-window layers (qwen2, gemma2), soft-capping (gemma2), q/k norms (qwen3), phi3's fused MLP."""
    result = export_genai(head16_dir(model_type), out=tmp_path / "genai", precision="fp32")
    assert result.check.passed
    assert result.check.max_abs_diff < 1e-4
    assert result.check.prompt_tokens > 16  # longer than the sliding windows


def test_fp32_mismatch_is_a_typed_error(llama_fp32: genai_module.GenaiExportResult, tmp_path: Path) -> None:
    """Another model's weights behind the same export: every step is far off and the check says so."""
    other = save_head16_model(tmp_path / "other", "llama", seed=1)
    with pytest.raises(errors.ExportMismatchError) as raised:
        validate_genai(other, llama_fp32.path, "fp32", atol=1e-3)
    assert raised.value.failed and raised.value.atol == 1e-3
    assert set(raised.value.diffs) == {f"logits.step{i}" for i in range(8)}


def test_failed_validation_leaves_no_folder(
    head16_dir: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def mismatch(*args: object, **kwargs: object) -> None:
        raise errors.ExportMismatchError(tmp_path, {"logits.step0": 1.0}, 1e-3)

    monkeypatch.setattr(genai_module, "validate_genai", mismatch)
    with pytest.raises(errors.ExportMismatchError):
        export_genai(head16_dir("llama"), out=tmp_path / "genai", precision="fp32")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_before_building(
    llama_fp32: genai_module.GenaiExportResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(genai_module, "_build", _builder_must_not_run)
    with pytest.raises(errors.OutputExistsError):
        export_genai(llama_fp32.model_dir, precision="fp32")


def test_builder_output_stays_out_of_the_terminal(
    head16_dir: Callable[[str], Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    export_genai(head16_dir("llama"), out=tmp_path / "genai", precision="int4")
    captured = capfd.readouterr()
    assert "Reading layer" not in captured.out + captured.err
    assert "quantize" not in captured.out + captured.err


def test_builder_import_keeps_the_root_logging_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime's quantizer runs ``logging.basicConfig(level=INFO)`` on import; it must not stick."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)

    def import_with_side_effect(name: str) -> object:
        logging.basicConfig(level=logging.INFO)
        return object()

    monkeypatch.setattr(importlib, "import_module", import_with_side_effect)
    genai_module._builder_module()
    assert root.handlers == [] and root.level == logging.WARNING


# --- refusals ----------------------------------------------------------------------------------------------


def test_exportable_types_are_the_registry_minus_what_the_builder_lacks() -> None:
    assert genai_exportable_model_types() == GENAI_TYPES


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_conftest_tiny_model_is_refused_up_front(model_type: str) -> None:
    """Head size 8 everywhere; GPT-2, GPT-NeoX and Gemma 3 are refused by type whatever their shape."""
    config = AutoConfig.for_model(model_type, **{**COMMON, **TINY_CONFIGS[model_type]})
    with pytest.raises(errors.GenaiExportUnsupportedError) as raised:
        check_genai_support(config)
    message = str(raised.value)
    assert message.startswith(f"cannot export model type {model_type!r} with onnxruntime-genai: ")
    assert message.endswith("model types it exports: " + ", ".join(GENAI_TYPES))
    assert "\n" not in message
    assert isinstance(raised.value, errors.ExportUnsupportedError)


@pytest.mark.parametrize(
    ("model_type", "overrides", "reason"),
    [
        ("gpt2", {"n_embd": 64, "n_head": 4}, "no GPT-2"),
        ("gpt_neox", {}, "no GPT-NeoX"),
        ("gemma3_text", {"head_dim": 16}, "one dict per layer type"),
        ("llama", {"head_dim": 8}, "head size is 8"),
        ("mistral", {"sliding_window": 16}, "sliding_window=16 but no layer_types"),
        ("phi3", {"original_max_position_embeddings": 4096}, "reads as LongRoPE"),
    ],
)
def test_head16_refusals_name_the_reason(model_type: str, overrides: dict[str, Any], reason: str) -> None:
    config = AutoConfig.for_model(model_type, **{**HEAD16, **BUILDABLE.get(model_type, {}), **overrides})
    with pytest.raises(errors.GenaiExportUnsupportedError, match=reason):
        check_genai_support(config)


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("mistral", {"sliding_window": 4096}),  # no longer than the context: never slides
        ("qwen2", {"use_sliding_window": False, "sliding_window": 16}),  # transformers clears it
        (
            "phi3",
            {
                "max_position_embeddings": 512,
                "original_max_position_embeddings": 256,
                "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
            },
        ),
    ],
)
def test_shapes_the_builder_handles_are_accepted(model_type: str, overrides: dict[str, Any]) -> None:
    config = AutoConfig.for_model(model_type, **{**HEAD16, **BUILDABLE[model_type], **overrides})
    assert check_genai_support(config) is not None


def test_refusals_are_real(
    head16_dir: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the up-front check, the builder refuses GPT-2 and head size 8 fails in genai: one line each."""
    monkeypatch.setattr(genai_module, "check_genai_support", lambda config: ARCHITECTURES["llama"])
    gpt2 = save_head16_model(tmp_path / "gpt2", "gpt2", n_embd=64, n_head=4, n_layer=2)
    with pytest.raises(
        errors.GenaiExportUnsupportedError, match="model builder stopped: NotImplementedError"
    ):
        export_genai(gpt2, precision="fp32")
    narrow = save_head16_model(tmp_path / "narrow", "llama", head_dim=8, num_hidden_layers=2)
    with pytest.raises(
        errors.GenaiExportUnsupportedError, match="head_size shall be a multiple of 16"
    ) as raised:
        export_genai(narrow, precision="fp32")
    assert "\n" not in str(raised.value)
    assert not (gpt2 / "genai").exists() and not (narrow / "genai").exists()


def test_cli_refusal_is_one_line_without_building(
    tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(genai_module, "_build", _builder_must_not_run)
    folder = tiny_model_dir("gpt2")
    monkeypatch.setattr(sys, "argv", ["swm-hub", "export", str(folder), "--format", "genai"])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    err = capsys.readouterr().err
    assert stopped.value.code == 1
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        "error: cannot export model type 'gpt2' with onnxruntime-genai: the model builder has no GPT-2 "
        "architecture; model types it exports: " + ", ".join(GENAI_TYPES)
    ]
    assert "Traceback" not in err
    assert not (folder / "genai").exists()


def test_missing_package_names_the_extra(
    tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    with pytest.raises(errors.MissingDependencyError, match=r"pip install 'swm-hub\[genai\]'"):
        export_genai(tiny_model_dir("llama"))
    monkeypatch.setattr(sys, "argv", ["swm-hub", "bench", "somewhere", "--backend", "genai"])
    with pytest.raises(SystemExit):
        cli.main()
    assert "pip install 'swm-hub[genai]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--format", "genai", "--precision", "int8"],
            "--precision must be one of int4, float32, got 'int8'",
        ),
        (["--format", "genai", "--device", "cuda"], "use --device cpu"),
        (["--format", "genai", "--dtype", "fp16"], "--format genai takes --precision int4 or float32"),
        (["--precision", "fp32"], "--precision applies to --format genai"),
    ],
)
def test_cli_option_combinations_are_refused(
    tiny_model_dir: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    monkeypatch.setattr(genai_module, "_build", _builder_must_not_run)
    monkeypatch.setattr(sys, "argv", ["swm-hub", "export", str(tiny_model_dir("llama")), *args])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 1
    assert message in capsys.readouterr().err


def test_export_dispatch_and_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(errors.UnknownModelError, match="local model folder"):
        export(tmp_path / "missing", ExportOptions(formats=("genai",)))


def test_cli_export_prints_the_check(head16_dir: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "cli-genai"
    result = CliRunner().invoke(
        cli.app,
        ["export", str(head16_dir("llama")), "--format", "genai", "--precision", "fp32", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[-2].startswith("✓ logits over 8 greedy steps: max abs diff ")
    assert lines[-1].startswith(f"wrote {out.absolute()} (onnxruntime-genai, float32, ")


def test_export_help_lists_the_new_options() -> None:
    result = CliRunner().invoke(cli.app, ["export", "--help"])
    assert "--format" in result.output and "--precision" in result.output
    assert "genai: int4 (default, 4-bit weights) or float32 (fp32 also accepted)" in " ".join(
        result.output.split()
    )


# --- bench ---------------------------------------------------------------------------------------------------


def test_genai_model_generates_exactly_the_tokens_asked(llama_int4: genai_module.GenaiExportResult) -> None:
    model = GenaiModel(llama_int4.path, threads=1)
    prompt = torch.tensor([[5, 17, 42, 7]])
    assert model(prompt).logits.shape == (1, 1, 300)
    config = type("Config", (), {"max_new_tokens": 6, "min_new_tokens": 6})()
    generated = model.generate(prompt, generation_config=config)
    assert generated.shape == (1, 10) and generated[0, :4].tolist() == [5, 17, 42, 7]
    assert (model.layers, str(model.dtype)) == (4, "torch.int4")


def test_bench_genai_int4_against_fp32(
    llama_fp32: genai_module.GenaiExportResult, llama_int4: genai_module.GenaiExportResult
) -> None:
    """The baseline is a model folder with a genai/ subfolder; the model is the export folder itself."""
    report = bench(
        llama_int4.path,
        llama_fp32.model_dir,
        BenchOptions(backend="genai", prompt_tokens=6, new_tokens=4, runs=2),
    )
    assert (report.backend, report.dtype, report.device) == ("genai", "int4", "cpu")
    assert report.baseline is not None and report.baseline.layers == report.model.layers == 4
    for measured in (report.model, report.baseline):
        # On a model this small the timings are noise: only their presence is checked.
        assert measured.prefill_ms.median > 0 and measured.end_to_end_ms.median > 0
        assert len(measured.runs_end_to_end_ms) == 2
        assert measured.weights_mb > 0
    assert report.model.weights_mb < report.baseline.weights_mb  # 4-bit weights
    assert report.environment["onnxruntime_genai"]
    assert report.table_lines()[0].startswith("genai on cpu (int4, eager)")


def test_cli_bench_genai(llama_int4: genai_module.GenaiExportResult) -> None:
    result = CliRunner().invoke(
        cli.app,
        [
            "bench",
            str(llama_int4.path),
            "--backend",
            "genai",
            "--runs",
            "1",
            "--new-tokens",
            "3",
            "--prompt-tokens",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "genai on cpu (int4, eager): 5-token prompt, 3 new tokens" in result.output


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"device": "cuda"}, errors.InvalidOptionError, "use --device cpu"),
        ({"dtype": "fp16"}, errors.InvalidOptionError, "--dtype applies to the torch backend"),
    ],
)
def test_bench_genai_refusals(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        bench(tmp_path, options=BenchOptions(backend="genai", **kwargs))


def test_bench_genai_needs_an_export(tiny_model_dir: Callable[[str], Path]) -> None:
    folder = tiny_model_dir("llama")
    with pytest.raises(errors.UnknownModelError, match="--format genai"):
        bench(folder, options=BenchOptions(backend="genai"))
