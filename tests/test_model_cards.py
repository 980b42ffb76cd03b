"""The model card: rendered only from the result files of a folder, with Hub-valid metadata.

A fixed set of files (plan, similarity report, evaluation, benchmark, weights' headers, a base model with
its own card) is written into tmp_path, and the card must show exactly their numbers; sections whose
results are absent must be absent too, and a value the template needs but lacks must fail the rendering.
"""

from __future__ import annotations

import importlib.machinery
import json
import logging
import sys
import types
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import jinja2
import pytest
import torch
from conftest import TINY_TEXT
from hub_server import HUB_RELATIONS, metadata_errors
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from swm_hub.core import packaged_models
from swm_hub.core.errors import ResultFileError, ResultFileVersionError, UnknownModelError
from swm_hub.core.files import BENCH_FILE, EVAL_FILE, SIMILARITY_JSON, SIMILARITY_PNG
from swm_hub.core.options import CalibrationOptions, MergeOptions
from swm_hub.results.evaluation import EvalReport, PerplexityRow
from swm_hub.results.plan import PLAN_FILE, MergePlan, default_repo_name
from swm_hub.results.similarity import SimilarityReport
from swm_hub.runtime.loading import pull
from swm_hub.stages.card import (
    BASE_MODEL_RELATION,
    CARD_FILE,
    build_context,
    card_metadata,
    render_card,
    render_context,
    render_template,
    write_card,
)
from swm_hub.stages.merge import merge

LAYERS = 6
WINDOWS = [(1, 2), (3, 4)]  # 6 -> 4 layers
HIDDEN = 4
VOCAB = 10
TRIALS: list[dict[str, Any]] = [
    {"low": 3, "high": 4, "similarity": 0.991, "relative": 0.991, "passed": True},
    {"low": 2, "high": 4, "similarity": 0.801, "relative": 0.801, "passed": False},
    {"low": 1, "high": 2, "similarity": 0.9705, "relative": 0.9705, "passed": True},
    {"low": 0, "high": 2, "similarity": 0.5, "relative": 0.5, "passed": False},
]


def make_plan(model: str, base_model: str | None = None, **changes: Any) -> MergePlan:
    plan = MergePlan(
        model=model,
        base_model=base_model,
        revision=None,
        model_type="llama",
        num_layers=LAYERS,
        windows=list(WINDOWS),
        method="swm-fit",
        score="angular",
        criterion="absolute",
        merge="fit",
        ridge=0.3,
        threshold=0.9512,
        target={"threshold": None, "target_layers": 4, "ratio": None},
        calibration={"text": "swm_hub:corpus/calibration", "samples": 32, "seq_len": 128, "tokens": 4096},
        trials=TRIALS,
    )
    return replace(plan, **changes)


def write_weights(folder: Path, layers: int) -> None:
    """A safetensors file shaped like a checkpoint: embeddings (40 parameters) and 16 per decoder layer."""
    tensors = {"model.embed_tokens.weight": torch.zeros(VOCAB, HIDDEN)}
    for index in range(layers):
        tensors[f"model.layers.{index}.mlp.weight"] = torch.zeros(HIDDEN, HIDDEN)
    save_file(tensors, str(folder / "model.safetensors"))


def write_base_model(folder: Path, license_id: str) -> Path:
    folder.mkdir(parents=True)
    (folder / CARD_FILE).write_text(f"---\nlicense: {license_id}\n---\n\n# A base model\n", encoding="utf-8")
    return folder


def eval_report() -> EvalReport:
    return EvalReport(
        text="swm_hub:corpus/heldout[narrative,code]",
        blocks=48,
        seq_len=256,
        rows=[
            PerplexityRow("base: base-model", LAYERS, 21.5, (), {"narrative": 25.0, "code": 18.0}),
            PerplexityRow("swm-fit (this model)", 4, 30.25, (), {"narrative": 33.0, "code": 27.0}),
            PerplexityRow("drop-bi", 4, 55.0, (2, 4), {"narrative": 60.0, "code": 25.0}),
        ],
    )


def stat(median: float) -> dict[str, float]:
    return {"median": median, "min": median - 0.5, "max": median + 1.0}


def bench_report() -> dict[str, Any]:
    """bench.json as an earlier ``BenchReport.to_dict`` wrote it (a fixed copy: the card reads files, not classes)."""

    def bench(name: str, layers: int, prefill: float, rate: float) -> dict[str, Any]:
        return {
            "name": name,
            "layers": layers,
            "weights_mb": 1.5,
            "prefill_ms": stat(prefill),
            "decode_ms_per_token": stat(2.0),
            "end_to_end_ms": stat(260.0),
            "tokens_per_s": stat(rate),
            "peak_memory_mb": stat(100.0),
            "runs_end_to_end_ms": [250.0, 260.0, 270.0],
        }

    return {
        "backend": "torch",
        "device": "cpu",
        "dtype": "fp32",
        "compiled": False,
        "prompt_tokens": 12,
        "new_tokens": 128,
        "runs": 3,
        "warmup": 1,
        "memory_method": "linux_vmhwm",
        "model": bench("/somewhere/private/tiny-swm", 4, 8.0, 49.0),
        "baseline": bench("/somewhere/private/base-model", 6, 12.0, 36.0),
        "speedup": {"prefill_ms": 1.5},
        "measured_speedup": 1.0,
        "ideal_speedup": 1.5,
        "environment": {"python": "3.11"},
    }


@pytest.fixture
def result_folder(tmp_path: Path) -> Path:
    """Every result file a compress run with --eval, --bench and analysis leaves, with fixed numbers."""
    base = write_base_model(tmp_path / "models" / "base-model", "mit")
    folder = tmp_path / "base-model-swm-4L"
    folder.mkdir()
    (folder / PLAN_FILE).write_text(make_plan(str(base)).to_json(), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    write_weights(folder, 4)
    similarity = SimilarityReport(
        model="base-model",
        metric="linear_cka",
        num_layers=LAYERS,
        matrix=[[1.0] * LAYERS for _ in range(LAYERS)],
        io_redundancy=[0.1] * LAYERS,
        angular_to_next=[0.2] * LAYERS,
        calibration={"text": "swm_hub:corpus/calibration", "samples": 32, "seq_len": 128, "tokens": 4096},
    )
    # The previous release's similarity.json and bench.json (no schema_version); eval.json of this one.
    (folder / SIMILARITY_JSON).write_text(json.dumps(similarity.to_dict()), encoding="utf-8")
    (folder / SIMILARITY_PNG).write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "eval.json").write_text(eval_report().to_json(), encoding="utf-8")
    (folder / "bench.json").write_text(json.dumps(bench_report()), encoding="utf-8")
    return folder


def section(card: str, title: str) -> str:
    """The text of one ``## title`` section."""
    start = card.index(f"\n## {title}\n")
    end = card.find("\n## ", start + 1)
    return card[start : end if end != -1 else len(card)]


# --- the full card -----------------------------------------------------------------------------------------


def test_card_shows_the_numbers_of_the_files(result_folder: Path, tmp_path: Path) -> None:
    card = render_card(result_folder)

    assert "# base-model-swm-4L" in card
    assert "**6 to 4 layers** (2 removed)" in card
    assert "**136 → 104** (23.5% fewer)" in card  # 40 + 6 x 16 before, 40 + 4 x 16 after

    method = section(card, "Method")
    assert "`swm-fit`" in method and "`fit`" in method
    assert "keep 4 layers" in method and "accepted at or above 0.9512" in method
    assert "32 blocks of 128 tokens, 4,096 tokens" in method
    assert "https://arxiv.org/abs/2502.19159" in method

    windows = section(card, "Merged windows")
    assert "| 1–2 | 2 | 1 | 0.970500 |" in windows
    assert "| 3–4 | 2 | 2 | 0.991000 |" in windows
    assert "0.801" not in windows  # a failed trial is not the window's score

    similarity = section(card, "Layer similarity")
    assert f"![Similarity between the outputs of the original model's layers]({SIMILARITY_PNG})" in similarity
    assert "`linear_cka`" in similarity

    perplexity = section(card, "Perplexity")
    assert (
        "on the held-out split of swm-hub's shipped corpus (narrative, code, sampled evenly), "
        "48 blocks of 256 tokens" in perplexity
    )
    assert "| model | layers | perplexity | narrative | code | vs base | dropped layers |" in perplexity
    assert "| base: base-model | 6 | 21.50 | 25.00 | 18.00 | – | – |" in perplexity
    assert "| swm-fit (this model) | 4 | 30.25 | 33.00 | 27.00 | +40.7% | – |" in perplexity
    assert "| drop-bi | 4 | 55.00 | 60.00 | 25.00 | +155.8% | 2, 4 |" in perplexity
    assert "worst on code, 1.080 times its perplexity (so on that kind, dropping" in perplexity
    assert "plain dropping by `drop-bi`: 30.25 vs 55.00" in perplexity

    latency = section(card, "Latency")
    assert "torch on cpu, fp32, 12-token prompt, 128 new tokens, median [min–max] of 3 runs" in latency
    assert "| measure | base-model (6 layers) | tiny-swm (4 layers) |" in latency
    assert "| prefill (ms) | 12.0 [11.5–13.0] | 8.00 [7.50–9.00] |" in latency
    assert "| tokens/s | 36.0 [35.5–37.0] | 49.0 [48.5–50.0] |" in latency
    assert "ideal (layers before / after) 1.50x" in latency

    usage = section(card, "How to use")
    assert 'model_id = "base-model-swm-4L"' in usage
    assert "AutoModelForCausalLM.from_pretrained(model_id)" in usage
    assert "holds no ONNX export" in usage and "swm-hub export" in usage

    reproduce = section(card, "Reproduce")
    assert (
        "swm-hub compress base-model --target-layers 4 --method swm-fit --samples 32 --seq-len 128 "
        "--out base-model-swm-4L"
    ) in reproduce
    assert "swm-hub compress base-model --plan swm_plan.json --out base-model-swm-4L" in reproduce

    licence = section(card, "Licence")
    assert "`mit`: inherited from the base model `base-model`, as stated in its model card" in licence
    assert "archivePrefix = {arXiv}" in section(card, "Citation")
    assert str(tmp_path) not in card and "/somewhere/private" not in card  # local paths stay local


def test_metadata_is_valid_for_the_hub(result_folder: Path) -> None:
    card = render_card(result_folder)
    data = ModelCard(card).data
    assert data.license == "mit"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert {"swm", "pruned", "sliding-window-merging", "llama"} <= set(data.tags)
    assert data.base_model is None  # a local base has no Hub id to cite
    assert list(metadata_errors(card)) == []


def test_hub_base_model_is_cited_with_a_relation_the_hub_accepts(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    plan = make_plan("HuggingFaceTB/SmolLM2-135M-Instruct@v1", "HuggingFaceTB/SmolLM2-135M-Instruct")
    (folder / PLAN_FILE).write_text(replace(plan, revision="v1").to_json(), encoding="utf-8")

    card = render_card(folder, repo_id="me/SmolLM2-135M-Instruct-swm-4L")

    data = ModelCard(card).data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.base_model_relation == BASE_MODEL_RELATION
    assert BASE_MODEL_RELATION in HUB_RELATIONS
    assert list(metadata_errors(card)) == []
    assert "# SmolLM2-135M-Instruct-swm-4L" in card
    assert (
        "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)"
        in card
    )
    assert "(revision `v1`)" in card
    assert 'model_id = "me/SmolLM2-135M-Instruct-swm-4L"' in card
    assert "swm-hub compress HuggingFaceTB/SmolLM2-135M-Instruct@v1 --target-layers 4" in card
    assert "--revision" not in card  # the revision is in the name already


# --- absent results are absent -----------------------------------------------------------------------------


def test_no_eval_no_perplexity_and_no_invented_numbers(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / PLAN_FILE).write_text(make_plan("some-org/some-model", "some-org/some-model").to_json())

    card = render_card(folder)

    for title in ("Perplexity", "Latency", "Layer similarity"):
        assert f"## {title}" not in card
    assert "Perplexity was not measured" in card
    assert "Parameters:" not in card  # no weights in the folder, so no counts
    assert "perplexity |" not in card and "vs base" not in card
    context = build_context(folder)
    assert context.perplexity is None and context.latency is None and context.heatmap is None
    assert context.params is None and context.onnx_folder is None


def test_unknown_licence_is_other_and_the_card_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / PLAN_FILE).write_text(make_plan("some-org/some-model", "some-org/some-model").to_json())

    card = render_card(folder)

    assert ModelCard(card).data.license == "other"
    assert "licence could not be read" in section(card, "Licence")


def test_licence_is_read_from_a_gguf_base(tmp_path: Path) -> None:
    base = tmp_path / "base.gguf"
    writer = gguf.GGUFWriter(str(base), "llama")
    writer.add_license("apache-2.0")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / PLAN_FILE).write_text(make_plan(str(base)).to_json())

    card = render_card(folder)

    assert ModelCard(card).data.license == "apache-2.0"
    assert "as stated in the metadata of its GGUF file" in card
    assert default_repo_name(MergePlan.from_file(folder / PLAN_FILE)) == "base-swm-4L"


def _write_gguf(path: Path, license_id: str) -> None:
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_license(license_id)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("assembled", [True, False])
def test_gemma3_demo_licence_is_read_from_its_assembled_file_and_nothing_is_assembled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, assembled: bool
) -> None:
    def assemble(path: Path) -> Path:
        raise AssertionError("the card must not assemble the model")

    package = types.ModuleType("swm_hub_tests_fake_gemma3_card")
    package.__spec__ = importlib.machinery.ModuleSpec(package.__name__, None, is_package=True)
    package.__spec__.submodule_search_locations = [str(tmp_path)]
    package.MODEL_NAME, package.EXPECTED_SHA256, package.assemble = "g.gguf", "cd" * 32, assemble  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, package.__name__, package)
    monkeypatch.setattr(packaged_models, "GEMMA3_PACKAGE", package.__name__)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if assembled:
        file = packaged_models.gemma3_cache_file(package)
        file.parent.mkdir(parents=True)
        _write_gguf(file, "gemma")
    folder = tmp_path / "out"
    folder.mkdir()
    plan = make_plan(packaged_models.GEMMA3_NAME, packaged_models.GEMMA3_REPO_ID)
    (folder / PLAN_FILE).write_text(plan.to_json())

    card = render_card(folder)

    assert ModelCard(card).data.license == ("gemma" if assembled else "other")
    assert ("as stated in the metadata of its GGUF file" in card) == assembled


def test_onnx_folder_gives_the_onnx_runtime_snippet(result_folder: Path) -> None:
    (result_folder / "onnx").mkdir()
    (result_folder / "onnx" / "model.onnx").write_bytes(b"onnx")

    card = render_card(result_folder, repo_id="me/tiny")

    assert 'model = OrtCausalLM.load(folder / "onnx")' in card
    assert 'snapshot_download("me/tiny")' in card
    assert "onnx" in ModelCard(card).data.tags


# --- failures ----------------------------------------------------------------------------------------------


def test_a_missing_value_fails_the_rendering(result_folder: Path) -> None:
    context = build_context(result_folder)
    values = {name: getattr(context, name) for name in context.__dataclass_fields__}
    values["metadata"] = card_metadata(context).to_yaml()
    assert render_template(values) == render_context(context)

    del values["windows"]
    with pytest.raises(jinja2.UndefinedError, match="windows"):
        render_template(values)


def test_a_context_object_lacking_a_field_fails_the_rendering(result_folder: Path) -> None:
    context = build_context(result_folder)

    class MethodWithoutScore:
        name, summary, merge, merge_summary, merge_reference = "swm-fit", None, "fit", None, None
        threshold, target = 0.9, "keep 4 layers"

    values = {name: getattr(context, name) for name in context.__dataclass_fields__}
    values["metadata"] = card_metadata(context).to_yaml()
    values["method"] = MethodWithoutScore()
    with pytest.raises(jinja2.UndefinedError, match="score"):
        render_template(values)


def test_a_folder_without_a_plan_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match=PLAN_FILE):
        render_card(tmp_path)


def test_an_unreadable_eval_report_is_an_error(result_folder: Path) -> None:
    (result_folder / "eval.json").write_text('{"rows": [{"name": "x"}]}', encoding="utf-8")
    with pytest.raises(ResultFileError, match=r"eval\.json"):
        render_card(result_folder)


def test_a_bench_file_of_another_shape_is_left_out(
    result_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (result_folder / "bench.json").write_text('{"something": "else"}', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="swm_hub"):
        card = render_card(result_folder)
    assert "## Latency" not in card
    assert "bench.json" in caplog.text


def test_bench_rows_with_metrics_are_read(result_folder: Path) -> None:
    rows = {
        "rows": [
            {"name": "onnxruntime base", "layers": 6, "metrics": {"prefill_ms": 12.5, "tokens_per_s": 40}},
            {"name": "onnxruntime merged", "layers": 4, "metrics": {"prefill_ms": 9.25}},
        ]
    }
    (result_folder / "bench.json").write_text(json.dumps([rows]), encoding="utf-8")
    latency = section(render_card(result_folder), "Latency")
    assert "| prefill (ms) | 12.5 | 9.25 |" in latency
    assert "| tokens/s | 40.0 | – |" in latency


def test_bench_reports_of_the_latency_benchmark_are_read(result_folder: Path) -> None:
    single = section(render_card(result_folder), "Latency")
    printout = {"reports": [{"title": "SmolLM2-135M, torch CPU", **bench_report()}]}
    (result_folder / BENCH_FILE).write_text(json.dumps(printout), encoding="utf-8")
    assert section(render_card(result_folder), "Latency") == single


def test_files_with_and_without_a_schema_version_give_the_same_card(result_folder: Path) -> None:
    card = render_card(result_folder)
    for name in (SIMILARITY_JSON, EVAL_FILE, BENCH_FILE):
        path = result_folder / name
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.pop("schema_version", None) is None:
            data["schema_version"] = 1
        path.write_text(json.dumps(data), encoding="utf-8")
    assert render_card(result_folder) == card


@pytest.mark.parametrize("name", [SIMILARITY_JSON, EVAL_FILE, BENCH_FILE])
def test_a_result_file_of_a_newer_release_fails_the_card(result_folder: Path, name: str) -> None:
    path = result_folder / name
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), "schema_version": 99}))
    with pytest.raises(ResultFileVersionError, match="upgrade swm-hub"):
        render_card(result_folder)


def test_an_unreadable_similarity_report_is_an_error(result_folder: Path) -> None:
    (result_folder / SIMILARITY_JSON).write_text('{"metric": "linear_cka"}', encoding="utf-8")
    with pytest.raises(ResultFileError, match=r"similarity\.json"):
        render_card(result_folder)


# --- writing -----------------------------------------------------------------------------------------------


def test_write_card_replaces_the_file_atomically(result_folder: Path) -> None:
    (result_folder / CARD_FILE).write_text("old card", encoding="utf-8")
    before = sorted(path.name for path in result_folder.iterdir())

    path = write_card(result_folder, repo_id="me/tiny")

    assert path == result_folder / CARD_FILE
    assert path.read_text(encoding="utf-8") == render_card(result_folder, repo_id="me/tiny")
    assert sorted(p.name for p in result_folder.iterdir()) == before  # no temporary file left


@pytest.mark.parametrize(
    ("model", "base_model", "expected"),
    [
        ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct-swm-4L"),
        ("/data/models/My Model (v2)", None, "My-Model-v2-swm-4L"),
        ("org/name@main", "org/name", "name-swm-4L"),
        ("/data/tiny.Q4_1.gguf", None, "tiny.Q4_1-swm-4L"),
    ],
)
def test_default_repo_name(model: str, base_model: str | None, expected: str) -> None:
    assert default_repo_name(make_plan(model, base_model)) == expected


# --- a real compress output --------------------------------------------------------------------------------


def test_card_of_a_real_merge(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text(TINY_TEXT * 20, encoding="utf-8")
    options = MergeOptions(
        target_layers=4, calibration=CalibrationOptions(text=calib, samples=4, seq_len=16, batch_size=2)
    )
    result = merge(pull(str(tiny_model_dir("llama"))), tmp_path / "out", options)

    context = build_context(result.output_dir)
    card = render_context(context)

    assert context.params is not None
    assert (context.params.before, context.params.after) == (result.params_before, result.params_after)
    assert all(window.similarity is not None for window in context.windows)
    assert context.heatmap is not None and context.heatmap.metric is not None
    assert "## Layer similarity" in card and "not recorded" not in card
    assert list(metadata_errors(card)) == []
    assert f"--calib {calib.name}" in context.reproduce
