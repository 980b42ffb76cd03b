"""The latency benchmark on tiny models: every field of the report, both backends, and its refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import COMMON, build_tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from swm_hub.core.errors import DeviceUnavailableError, InvalidOptionError, SwmHubError, UnknownModelError
from swm_hub.core.options import BenchOptions
from swm_hub.results.bench import BenchReport
from swm_hub.stages.bench import bench as bench_stage
from swm_hub.stages.bench import prompt_ids


def bench(model: str, baseline: str | None = None, **options: Any) -> BenchReport:
    """The bench stage with its options given as keywords."""
    return bench_stage(model, baseline, BenchOptions(**options))


MODEL_FIELDS = {
    "name",
    "layers",
    "weights_mb",
    "per_token_weights_mb",
    "prefill_ms",
    "decode_ms_per_token",
    "end_to_end_ms",
    "tokens_per_s",
    "peak_memory_mb",
    "end_to_end_cpu_ms",
    "runs_end_to_end_ms",
}
STATS = {
    "prefill_ms",
    "decode_ms_per_token",
    "end_to_end_ms",
    "tokens_per_s",
    "peak_memory_mb",
    "end_to_end_cpu_ms",
}
REPORT_FIELDS = {
    "schema_version",
    "backend",
    "device",
    "dtype",
    "compiled",
    "prompt_tokens",
    "new_tokens",
    "runs",
    "warmup",
    "memory_method",
    "model",
    "baseline",
    "speedup",
    "measured_speedup",
    "ideal_speedup",
    "weight_ratio",
    "speedup_efficiency",
    "environment",
}


@pytest.fixture(scope="module")
def shallow_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A four-layer tiny llama standing in for a compressed six-layer one."""
    folder = tmp_path_factory.mktemp("tiny-llama-4")
    config = AutoConfig.for_model("llama", **{**COMMON, "num_hidden_layers": 4})
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shallow_llama_export(shallow_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder holding the four-layer llama's ONNX export in its onnx/ subfolder."""
    from swm_hub.stages.export import export_onnx

    folder = tmp_path_factory.mktemp("compressed")
    export_onnx(shallow_llama_dir, folder / "onnx")
    return folder


def _check_model_entry(entry: dict[str, object], layers: int, runs: int) -> None:
    assert set(entry) == MODEL_FIELDS
    assert entry["layers"] == layers
    for name in STATS:
        stat = entry[name]
        assert isinstance(stat, dict) and set(stat) == {"median", "min", "max"}
        assert stat["min"] <= stat["median"] <= stat["max"]
    assert isinstance(entry["runs_end_to_end_ms"], list) and len(entry["runs_end_to_end_ms"]) == runs
    assert entry["tokens_per_s"]["median"] > 0  # type: ignore[index]
    assert entry["peak_memory_mb"]["min"] >= entry["weights_mb"]  # type: ignore[index,operator]


def test_torch_bench_reports_every_field_with_speedups(
    tiny_model_dir: Callable[[str], Path], shallow_llama_dir: Path, tmp_path: Path
) -> None:
    report = bench(
        str(shallow_llama_dir),
        baseline=str(tiny_model_dir("llama")),
        runs=2,
        new_tokens=4,
        threads=1,
        dtype="fp32",  # the short spelling is an alias; the report records the canonical name
    )
    data = json.loads(report.to_json())
    assert set(data) == REPORT_FIELDS
    assert (data["backend"], data["device"], data["dtype"], data["compiled"]) == (
        "torch",
        "cpu",
        "float32",
        False,
    )
    assert (data["prompt_tokens"], data["new_tokens"], data["runs"], data["warmup"]) == (12, 4, 2, 1)
    _check_model_entry(data["model"], layers=4, runs=2)
    _check_model_entry(data["baseline"], layers=6, runs=2)
    assert data["ideal_speedup"] == pytest.approx(1.5)
    assert set(data["speedup"]) == STATS
    assert data["measured_speedup"] == data["speedup"]["end_to_end_ms"] > 0
    assert data["speedup_efficiency"] == pytest.approx(data["measured_speedup"] / 1.5)
    # per-token weights: the layers and the untied LM head, not the gathered input embedding
    per_layer = data["baseline"]["per_token_weights_mb"] - data["model"]["per_token_weights_mb"]
    head = COMMON["vocab_size"] * COMMON["hidden_size"] * 4 / 2**20
    assert data["model"]["per_token_weights_mb"] == pytest.approx(head + 2 * per_layer, rel=0.01)
    assert data["weight_ratio"] == pytest.approx(
        data["baseline"]["per_token_weights_mb"] / data["model"]["per_token_weights_mb"]
    )
    assert 1 < data["weight_ratio"] < 1.5
    assert {"torch", "transformers", "cpu_count", "loadavg_before"} <= set(data["environment"])

    lines = report.table_lines()
    assert "end-to-end 12/4 (ms)" in "\n".join(lines)
    assert lines[-1].startswith("ideal speedup 6/4 layers = 1.50x; measured end-to-end")
    out = tmp_path / "bench.json"
    report.save_json(out)
    assert json.loads(out.read_text()) == data


def test_single_model_has_no_speedup(tiny_model_dir: Callable[[str], Path]) -> None:
    report = bench(str(tiny_model_dir("gpt2")), runs=1, warmup=0, new_tokens=3, prompt_tokens=5, threads=1)
    data = report.to_dict()
    assert data["baseline"] is None and data["speedup"] is None and data["ideal_speedup"] is None
    assert report.summary() is None
    assert len(report.table_lines()) == 3 + len(STATS)  # title, header, rule, one line per measure


def test_onnxruntime_bench_on_tiny_exports(
    tiny_model_dir: Callable[[str], Path], shallow_llama_dir: Path, shallow_llama_export: Path, tmp_path: Path
) -> None:
    from swm_hub.stages.export import export_onnx

    original = export_onnx(tiny_model_dir("llama"), tmp_path / "original-onnx").path
    # A model folder with an onnx/ subfolder, and an export folder itself, are both accepted.
    report = bench(
        str(shallow_llama_export),
        baseline=str(original),
        backend="onnxruntime",
        runs=2,
        new_tokens=4,
        threads=1,
    )
    data = json.loads(report.to_json())
    assert set(data) == REPORT_FIELDS
    assert (data["backend"], data["dtype"], data["compiled"]) == ("onnxruntime", "float32", False)
    _check_model_entry(data["model"], layers=4, runs=2)
    _check_model_entry(data["baseline"], layers=6, runs=2)
    assert data["environment"]["onnxruntime"]
    assert data["ideal_speedup"] == 1.5 and data["measured_speedup"] > 0
    # the graph's per-token weights agree with torch's count of the same models
    torch_report = bench(
        str(shallow_llama_dir), baseline=str(tiny_model_dir("llama")), runs=1, warmup=0, new_tokens=2
    )
    assert data["weight_ratio"] == pytest.approx(torch_report.weight_ratio, rel=0.02)
    assert "per-token weights (layers + LM head) ratio" in report.table_lines()[-1]


def test_onnxruntime_bench_runs_our_loop_for_exactly_the_asked_tokens(
    shallow_llama_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from swm_hub.runtime.ort import OrtCausalLM

    steps: list[int] = []
    real_step = OrtCausalLM.step

    def counted(self: OrtCausalLM, state: object, tokens: object) -> object:
        steps.append(1)
        return real_step(self, state, tokens)  # type: ignore[arg-type]

    monkeypatch.setattr(OrtCausalLM, "step", counted)
    bench(
        str(shallow_llama_export / "onnx"), backend="onnxruntime", runs=1, warmup=0, new_tokens=5, threads=1
    )
    assert len(steps) == 4  # the generation's decode steps; the timed prefill has none


def test_onnxruntime_needs_an_export(tiny_model_dir: Callable[[str], Path]) -> None:
    with pytest.raises(UnknownModelError, match="swm-hub export"):
        bench(str(tiny_model_dir("llama")), backend="onnxruntime", runs=1)


def test_prompt_is_exactly_the_asked_length(tiny_model_dir: Callable[[str], Path]) -> None:
    tokenizer = build_tiny_tokenizer()
    for length in (1, 12, 300):
        assert prompt_ids(tokenizer, length).shape == (1, length)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_model_dir: Callable[[str], Path]) -> None:
    with pytest.raises(DeviceUnavailableError, match="torch sees no CUDA GPU") as caught:
        bench(str(tiny_model_dir("llama")), device="cuda", runs=1)
    assert isinstance(caught.value, SwmHubError)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "tensorrt"}, "unknown backend"),
        ({"new_tokens": 1}, "--new-tokens >= 2"),
        ({"runs": 0}, "--runs >= 1"),
        ({"compiled": True}, "compiled path"),
        ({"dtype": "int4"}, "--dtype must be one of float32, bfloat16, float16, got 'int4'"),
        ({"device": "tpu"}, "unknown device"),
        ({"threads": 0}, "--threads must be at least 1"),
    ],
)
def test_bad_options_are_refused(
    tiny_model_dir: Callable[[str], Path], kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        bench(str(tiny_model_dir("llama")), **kwargs)  # type: ignore[arg-type]
