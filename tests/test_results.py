"""Each result type owns its file: save and load agree, the previous release's files still load (bench.json
in each of its shapes), and a file of a newer schema is refused with the advice to upgrade."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from swm_hub.core.errors import ResultFileError, ResultFileVersionError
from swm_hub.core.files import BENCH_FILE, EVAL_FILE, SIMILARITY_JSON, ZEROSHOT_FILE
from swm_hub.results.bench import BenchFile, BenchReport, MeasuredModel, ModelBench, Stat
from swm_hub.results.evaluation import EvalReport, PerplexityRow
from swm_hub.results.heal import HEAL_FILE, HealComparison, HealComparisonRow
from swm_hub.results.similarity import SimilarityReport
from swm_hub.results.zeroshot import TaskScore, ZeroShotReport

NEWER = 99


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def model_bench(name: str, layers: int, prefill: float) -> ModelBench:
    stat = Stat(median=prefill, min=prefill - 1.0, max=prefill + 2.0)
    return ModelBench(
        name=name,
        layers=layers,
        weights_mb=3.0,
        per_token_weights_mb=None,
        prefill_ms=stat,
        decode_ms_per_token=stat,
        end_to_end_ms=stat,
        tokens_per_s=stat,
        peak_memory_mb=stat,
        end_to_end_cpu_ms=stat,
        runs_end_to_end_ms=(prefill, prefill + 1.0),
    )


def bench_report() -> BenchReport:
    return BenchReport(
        backend="torch",
        device="cpu",
        dtype="float32",
        compiled=False,
        prompt_tokens=12,
        new_tokens=4,
        runs=2,
        warmup=1,
        memory_method="linux_vmhwm",
        model=model_bench("merged", 4, 8.0),
        baseline=model_bench("base", 6, 12.0),
    )


def eval_report() -> EvalReport:
    return EvalReport(
        text="swm_hub:corpus/heldout",
        blocks=8,
        seq_len=32,
        rows=[
            PerplexityRow("base: tiny", 6, 20.0, (), {"prose": 18.0, "code": 22.0}),
            PerplexityRow("drop-bi", 4, 40.0, (2, 3), {"prose": 35.0, "code": 45.0}),
        ],
    )


def similarity_report() -> SimilarityReport:
    return SimilarityReport(
        model="tiny",
        metric="linear_cka",
        num_layers=2,
        matrix=[[1.0, 0.5], [0.5, 1.0]],
        io_redundancy=[0.1, 0.2],
        angular_to_next=[0.3, 0.4],
        calibration={"text": "swm_hub:corpus/calibration", "samples": 2, "seq_len": 8, "tokens": 16},
    )


def zeroshot_report() -> ZeroShotReport:
    return ZeroShotReport(
        model="tiny",
        tasks=("piqa",),
        limit=3,
        scores=[TaskScore("piqa", 0.5, 0.1, 0.6, 0.1, 3)],
        harness_version="0.4",
    )


# --- each type: save, then load from the folder or the file -------------------------------------------------


def heal_comparison() -> HealComparison:
    rows = [
        HealComparisonRow("base: tiny", 6, 10.0, None, before_by_kind={"code": 9.0}),
        HealComparisonRow("merged: swm-fit, fit rule", 4, 14.0, 11.0),
        HealComparisonRow("drop-bi", 4, 16.0, 12.5, dropped=(2, 3)),
    ]
    return HealComparison(text="swm_hub:corpus/heldout", blocks=8, seq_len=64, tokens=4096, rows=rows)


def test_heal_comparison_round_trip_says_its_schema(tmp_path: Path) -> None:
    comparison = heal_comparison()
    path = comparison.save(tmp_path)
    assert json.loads(path.read_text(encoding="utf-8"))["schema_version"] == 1
    assert HealComparison.load(tmp_path) == comparison == HealComparison.load(path)
    assert comparison.gap_closed() == pytest.approx(0.75)


def test_eval_report_round_trip(tmp_path: Path) -> None:
    path = eval_report().save(tmp_path)
    assert json.loads(path.read_text(encoding="utf-8"))["schema_version"] == 1
    assert EvalReport.load(tmp_path) == EvalReport.load(path) == eval_report()


def test_similarity_report_round_trip(tmp_path: Path) -> None:
    json_path, _ = similarity_report().save(tmp_path)
    assert json.loads(json_path.read_text(encoding="utf-8"))["schema_version"] == 1
    assert SimilarityReport.load(tmp_path) == SimilarityReport.load(json_path) == similarity_report()


def test_zeroshot_report_round_trip(tmp_path: Path) -> None:
    path = zeroshot_report().save(tmp_path)
    assert path == tmp_path / ZEROSHOT_FILE
    assert ZeroShotReport.load(tmp_path) == ZeroShotReport.load(path) == zeroshot_report()


def test_bench_report_saved_reads_back_with_its_measures(tmp_path: Path) -> None:
    path = bench_report().save(tmp_path)
    assert path == tmp_path / BENCH_FILE
    [saved] = BenchFile.load(tmp_path).reports
    assert (saved.backend, saved.device, saved.dtype, saved.compiled) == ("torch", "cpu", "float32", False)
    assert (saved.prompt_tokens, saved.new_tokens, saved.runs) == (12, 4, 2)
    assert (saved.measured_speedup, saved.ideal_speedup) == (1.5, 1.5)
    assert [(model.name, model.layers) for model in saved.models] == [("base", 6), ("merged", 4)]
    merged = saved.models[1]
    assert merged.measures["prefill_ms"] == Stat(8.0, 7.0, 10.0)
    assert merged.measures["weights_mb"] == 3.0
    assert "per_token_weights_mb" not in merged.measures  # None: not measured by that backend
    assert "runs_end_to_end_ms" not in merged.measures


# --- the previous release's files -------------------------------------------------------------------------


def test_previous_eval_json_without_version_or_per_kind_rows_loads(tmp_path: Path) -> None:
    old = {
        "text": "swm_hub:corpus/heldout",
        "blocks": 8,
        "seq_len": 32,
        "rows": [{"name": "base", "layers": 6, "perplexity": 20.0}],
    }
    report = EvalReport.load(write_json(tmp_path / EVAL_FILE, old))
    assert report.rows == [PerplexityRow("base", 6, 20.0, (), {})]


def test_previous_similarity_and_zeroshot_files_without_version_load(tmp_path: Path) -> None:
    old_similarity = similarity_report().to_dict()
    assert (
        SimilarityReport.load(write_json(tmp_path / SIMILARITY_JSON, old_similarity)) == similarity_report()
    )
    old_zeroshot = json.loads(zeroshot_report().to_json())
    del old_zeroshot["schema_version"]
    assert ZeroShotReport.load(write_json(tmp_path / ZEROSHOT_FILE, old_zeroshot)) == zeroshot_report()


def previous_bench() -> dict[str, Any]:
    """One report as the previous release's ``swm-hub bench --json`` wrote it: no schema_version."""
    data = bench_report().to_dict()
    del data["schema_version"]
    return data


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(previous_bench(), id="one report"),
        pytest.param([previous_bench(), previous_bench()], id="a list of reports"),
        pytest.param({"reports": [{"title": "torch CPU", **previous_bench()}]}, id="latency.py's printout"),
    ],
)
def test_previous_bench_shapes_load(tmp_path: Path, shape: Any) -> None:
    reports = BenchFile.load(write_json(tmp_path / BENCH_FILE, shape)).reports
    assert len(reports) == (2 if isinstance(shape, list) else 1)
    for saved in reports:
        assert [model.name for model in saved.models] == ["base", "merged"]
        assert saved.models[0].measures["prefill_ms"] == Stat(12.0, 11.0, 14.0)


def test_bench_rows_with_metrics_and_plain_numbers_load(tmp_path: Path) -> None:
    rows = {
        "rows": [
            {"name": "a", "layers": 6, "metrics": {"prefill_ms": 12.5, "tokens_per_s": {"median": 40}}},
            {"name": "b", "metrics": {"prefill_ms": 9.25, "flag": True, "note": "text"}},
        ]
    }
    [saved] = BenchFile.load(write_json(tmp_path / BENCH_FILE, [rows])).reports
    assert saved.models == [
        MeasuredModel("a", 6, {"prefill_ms": 12.5, "tokens_per_s": 40.0}),
        MeasuredModel("b", None, {"prefill_ms": 9.25}),
    ]
    assert saved.backend is None and saved.runs is None and saved.measured_speedup is None


def test_bench_file_without_measures_is_a_result_file_error(tmp_path: Path) -> None:
    with pytest.raises(ResultFileError, match="no latency measures"):
        BenchFile.load(write_json(tmp_path / BENCH_FILE, {"something": "else"}))


# --- files of a newer release, and broken ones ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "load", "data"),
    [
        (EVAL_FILE, EvalReport.load, json.loads(eval_report().to_json())),
        (SIMILARITY_JSON, SimilarityReport.load, similarity_report().to_dict()),
        (ZEROSHOT_FILE, ZeroShotReport.load, json.loads(zeroshot_report().to_json())),
        (BENCH_FILE, BenchFile.load, bench_report().to_dict()),
        (HEAL_FILE, HealComparison.load, json.loads(heal_comparison().to_json())),
    ],
)
def test_a_newer_schema_is_refused_with_the_advice_to_upgrade(
    tmp_path: Path, name: str, load: Any, data: dict[str, Any]
) -> None:
    path = write_json(tmp_path / name, {**data, "schema_version": NEWER})
    with pytest.raises(ResultFileVersionError, match="upgrade swm-hub") as caught:
        load(tmp_path)
    assert (caught.value.found, caught.value.newest) == (NEWER, 1)
    assert str(path) in str(caught.value)


def test_a_newer_report_inside_a_bench_list_is_refused(tmp_path: Path) -> None:
    newer = {**bench_report().to_dict(), "schema_version": NEWER}
    write_json(tmp_path / BENCH_FILE, {"reports": [previous_bench(), newer]})
    with pytest.raises(ResultFileVersionError):
        BenchFile.load(tmp_path)


@pytest.mark.parametrize("version", ["1", 0, 1.5, True])
def test_a_schema_version_that_is_no_whole_number_is_refused(tmp_path: Path, version: Any) -> None:
    write_json(tmp_path / EVAL_FILE, {**json.loads(eval_report().to_json()), "schema_version": version})
    with pytest.raises(ResultFileError, match="schema_version") as caught:
        EvalReport.load(tmp_path)
    assert not isinstance(caught.value, ResultFileVersionError)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not readable JSON"),
        ('{"text": "t", "blocks": 1, "seq_len": 2, "rows": []}', "no perplexity rows"),
        ('{"rows": [{"name": "x"}]}', "not an evaluation report"),
    ],
)
def test_broken_eval_files_are_result_file_errors(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / EVAL_FILE).write_text(content, encoding="utf-8")
    with pytest.raises(ResultFileError, match=match):
        EvalReport.load(tmp_path)


def test_a_missing_file_is_a_result_file_error(tmp_path: Path) -> None:
    with pytest.raises(ResultFileError, match="not readable"):
        ZeroShotReport.load(tmp_path)
