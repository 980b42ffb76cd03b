"""Top-down window search on a traced tiny llama: window invariants, targets, thresholds and both scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_LAYERS

from swm_hub.core.config_rewrite import kept_layers, rewrite_config
from swm_hub.core.errors import ImpossibleTargetError, InvalidOptionError
from swm_hub.core.model import LoadedModel
from swm_hub.core.options import CalibrationOptions
from swm_hub.core.similarity import mean_cosine
from swm_hub.results.plan import MergePlan
from swm_hub.runtime.checkpoint import build_model
from swm_hub.runtime.layer_trace import BatchTrace, flat_hidden
from swm_hub.runtime.loading import pull
from swm_hub.runtime.tracing import calibration_batches, trace_calibration
from swm_hub.stages.merge import merged_state_dict, search_context
from swm_hub.stages.merge.windows import (
    SCORES,
    Above,
    SearchContext,
    SearchResult,
    WindowSearch,
    score_positions,
)

SCORE_NAMES = ["influence", "angular", "cosine"]
NOTHING = 0.999999
EVERYTHING = 1e-9
THRESHOLDS = [0.999, 0.99, 0.95, 0.9, 0.5]


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir: Path) -> LoadedModel:
    return pull(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def traces(loaded: LoadedModel, calibration: CalibrationOptions) -> list[BatchTrace]:
    return trace_calibration(loaded.model, calibration_batches(loaded.tokenizer, calibration), progress=False)


def make_context(
    loaded: LoadedModel, traces: list[BatchTrace], rule: str = "fit", ridge: float = 0.3
) -> SearchContext:
    return search_context(loaded, traces, rule, ridge)


@pytest.fixture(scope="module")
def context(loaded: LoadedModel, traces: list[BatchTrace]) -> SearchContext:
    return make_context(loaded, traces)


def assert_valid_windows(result: SearchResult, num_layers: int = TINY_LAYERS) -> None:
    windows = result.windows
    assert windows == sorted(windows)
    for low, high in windows:
        assert 1 <= low < high <= num_layers - 2, windows
    for (_, high), (next_low, _) in zip(windows, windows[1:], strict=False):
        assert next_low > high, f"overlapping windows {windows}"
    assert result.removed == sum(high - low for low, high in windows)


# --- window invariants -----------------------------------------------------------------------------------


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_sweeps_give_disjoint_sorted_inner_windows(context: SearchContext, score: str) -> None:
    search = WindowSearch(context, score, "absolute")
    removed = []
    for threshold in THRESHOLDS:
        result = search.sweep(threshold)
        assert_valid_windows(result)
        assert result.threshold == threshold
        removed.append(result.removed)
    assert len(set(removed)) >= 2, f"the thresholds must give different windows to test anything: {removed}"


@pytest.mark.parametrize("score", SCORE_NAMES)
@pytest.mark.parametrize("count", [1, 2, 3])
def test_for_target_removes_exactly_that_many(context: SearchContext, score: str, count: int) -> None:
    result = WindowSearch(context, score, "absolute").for_target(count)
    assert_valid_windows(result)
    assert result.removed == count


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_strict_threshold_merges_nothing_and_a_tiny_one_everything(
    context: SearchContext, score: str
) -> None:
    search = WindowSearch(context, score, "absolute")
    assert search.sweep(NOTHING).windows == []
    assert search.sweep(EVERYTHING).windows == [(1, TINY_LAYERS - 2)]


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_cap_stops_the_sweep(context: SearchContext, score: str) -> None:
    result = WindowSearch(context, score, "absolute").sweep(EVERYTHING, cap=2)
    assert_valid_windows(result)
    assert result.removed == 2


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_incremental_criterion_divides_by_the_baseline(context: SearchContext, score: str) -> None:
    result = WindowSearch(context, score, "incremental").sweep(0.9)
    assert_valid_windows(result)
    assert result.trials
    for trial in result.trials:
        assert trial["passed"] == (trial["relative"] >= 0.9)
    absolute = WindowSearch(context, score, "absolute").sweep(0.9)
    for trial in absolute.trials:
        assert trial["relative"] == trial["similarity"]
        assert trial["passed"] == (trial["similarity"] >= 0.9)


# --- errors ---------------------------------------------------------------------------------------------


def test_unknown_score_or_criterion_is_refused(context: SearchContext) -> None:
    with pytest.raises(InvalidOptionError, match="unknown score"):
        WindowSearch(context, "cka", "absolute")
    with pytest.raises(InvalidOptionError, match="unknown criterion"):
        WindowSearch(context, "angular", "relative")


@pytest.mark.parametrize("score", SCORE_NAMES)
@pytest.mark.parametrize("count", [0, TINY_LAYERS - 2, -1])
def test_impossible_targets_are_refused(context: SearchContext, score: str, count: int) -> None:
    with pytest.raises(ImpossibleTargetError):
        WindowSearch(context, score, "absolute").for_target(count)


# --- the scores -------------------------------------------------------------------------------------------


def test_angular_score_is_the_mean_cosine_of_window_input_and_output(
    context: SearchContext, traces: list[BatchTrace]
) -> None:
    search = WindowSearch(context, "angular", "absolute")
    trials = search.sweep(EVERYTHING).trials
    assert {(t["low"], t["high"]) for t in trials} == {
        (low, TINY_LAYERS - 2) for low in range(1, TINY_LAYERS - 2)
    }
    for trial in trials:
        x = flat_hidden(traces, int(trial["low"])).double()
        y = flat_hidden(traces, int(trial["high"]) + 1).double()
        assert x.shape[0] == sum(t.hidden[0].shape[0] * (t.hidden[0].shape[1] - 1) for t in traces)
        expected = ((x * y).sum(dim=1) / (x.norm(dim=1) * y.norm(dim=1))).mean()
        assert trial["similarity"] == pytest.approx(float(expected), abs=1e-5)


def test_influence_score_is_the_least_redundant_removed_layer(
    context: SearchContext, traces: list[BatchTrace]
) -> None:
    search = WindowSearch(context, "influence", "absolute")
    cosines = {i: mean_cosine(flat_hidden(traces, i), flat_hidden(traces, i + 1)) for i in range(TINY_LAYERS)}
    for trial in search.sweep(EVERYTHING).trials:
        removed = range(int(trial["low"]) + 1, int(trial["high"]) + 1)
        assert trial["similarity"] == pytest.approx(max(1e-6, min(cosines[i] for i in removed)), abs=1e-6)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_influence_for_a_count_removes_the_layers_block_influence_would_drop(
    context: SearchContext, traces: list[BatchTrace], count: int
) -> None:
    result = WindowSearch(context, "influence", "absolute").for_target(count)
    removed = sorted(layer for low, high in result.windows for layer in range(low + 1, high + 1))
    cosines = {
        i: mean_cosine(flat_hidden(traces, i), flat_hidden(traces, i + 1)) for i in range(2, TINY_LAYERS - 1)
    }
    assert removed == sorted(sorted(cosines, key=cosines.__getitem__, reverse=True)[:count])


def test_cosine_score_matches_the_actually_merged_model(
    loaded: LoadedModel, context: SearchContext, traces: list[BatchTrace], calibration: CalibrationOptions
) -> None:
    """The cached-input shortcut must equal running the merged model built the way ``merge`` writes it."""
    search = WindowSearch(context, "cosine", "absolute")
    first = search.sweep(EVERYTHING).trials[0]
    low, high = int(first["low"]), int(first["high"])
    assert (low, high) == (TINY_LAYERS - 3, TINY_LAYERS - 2)

    plan = MergePlan(
        model="tiny",
        base_model=None,
        revision=None,
        model_type="llama",
        num_layers=TINY_LAYERS,
        windows=[(low, high)],
        method="test",
        score="cosine",
        criterion="absolute",
        merge="fit",
        ridge=context.ridge,
        threshold=None,
        target={},
        calibration={},
    )
    spec = context.spec
    config = rewrite_config(loaded.model.config.to_dict(), kept_layers(TINY_LAYERS, plan.windows))
    merged = build_model(config, merged_state_dict(loaded, spec, plan, traces))
    positions = context.reference.positions
    original = loaded.model.get_submodule("model")
    cosines = []
    with torch.no_grad():
        scored = calibration_batches(loaded.tokenizer, calibration)[: len(context.reference.traces)]
        for batch in scored:
            ours = merged.get_submodule("model")(input_ids=batch, use_cache=False).last_hidden_state[
                :, positions
            ]
            theirs = original(input_ids=batch, use_cache=False).last_hidden_state[:, positions]
            cosines.append(torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).mean())
    expected = float(torch.stack(cosines).mean())
    assert first["similarity"] == pytest.approx(expected, abs=1e-5)
    assert expected < 0.9999, "the merge must change the output for this check to mean anything"


def test_cosine_sweeps_are_memoised(context: SearchContext) -> None:
    search = WindowSearch(context, "cosine", "absolute")
    scored: list[tuple[int, int]] = []
    score = search.score

    def counted(window_search: WindowSearch, low: int, high: int, above: Above) -> float:
        scored.append((low, high))
        return score(window_search, low, high, above)

    search.score = counted
    first = search.sweep(0.95)
    evaluations = len(scored)
    assert evaluations >= 2
    second = search.sweep(0.95)
    assert len(scored) == evaluations
    assert second.windows == first.windows
    assert second.trials == first.trials


def test_score_positions_skip_the_first_tokens() -> None:
    positions = score_positions(128, 32)
    assert positions.tolist() == sorted(set(positions.tolist()))
    assert int(positions[0]) == 128 // 16 and int(positions[-1]) == 127
    assert len(positions) == 32
    short = score_positions(16, 32)
    assert int(short[0]) >= 1 and int(short[-1]) == 15 and len(short) == 15


def test_every_score_is_registered() -> None:
    assert set(SCORES) == set(SCORE_NAMES)
