"""Perplexity against transformers' own loss, and the drop baselines on hand-made traces."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_LAYERS, build_tiny_model

from swm_hub.core.errors import InvalidOptionError, UnknownModelError
from swm_hub.core.options import DROP_BASELINES, PAPER_TASKS, EvalOptions, ExecutionOptions
from swm_hub.results.evaluation import EvalReport, PerplexityRow
from swm_hub.results.plan import MergePlan
from swm_hub.runtime.execution import execution_of
from swm_hub.runtime.layer_trace import BatchTrace
from swm_hub.runtime.loading import pull
from swm_hub.stages.evaluate import (
    DROP_RULES,
    drop_by_angular_distance,
    drop_by_block_influence,
    evaluate,
    perplexity,
    windows_for_dropped,
)
from swm_hub.stages.merge import build_merged_model

WIDTH = 8


def losses_perplexity(losses: list[tuple[float, int]]) -> float:
    """Perplexity over every predicted token of the batches whose summed losses these are."""
    return math.exp(sum(loss for loss, _ in losses) / sum(count for _, count in losses))


def rotation_trace(steps: list[float], tokens: int = 12, batch: int = 2, seed: int = 0) -> BatchTrace:
    """A trace whose layer ``i`` turns every token by the angle ``steps[i]`` in that token's own plane.

    Each token lives in a random plane spanned by orthonormal ``u`` and ``v``: the state entering layer ``i``
    is ``cos(a_i) u + sin(a_i) v`` with ``a_i = sum(steps[:i])``, so cos(input, output) of layer ``i`` is
    exactly ``cos(steps[i])``, and of a block from ``s`` to ``s + n``, ``cos(sum(steps[s:s + n]))``.
    """
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(batch, tokens, WIDTH, 2, generator=generator)).Q
    u, v = basis[..., 0], basis[..., 1]
    angles = [sum(steps[:i]) for i in range(len(steps) + 1)]
    hidden = []
    for angle in angles:
        hidden.append(3.0 * (math.cos(angle) * u + math.sin(angle) * v))
    return BatchTrace(hidden=hidden, calls=[((), {})] * len(steps))


# --- perplexity ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_perplexity_is_exp_of_the_models_own_loss(model_type: str) -> None:
    model = build_tiny_model(model_type)
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 300, (2, 16), generator=generator) for _ in range(3)]
    with torch.no_grad():
        losses = [float(model(input_ids=b, labels=b).loss) for b in batches]
    # Equal-sized batches: the mean of per-batch mean losses is the mean over all tokens.
    expected = math.exp(sum(losses) / len(losses))
    assert perplexity(model, batches) == pytest.approx(expected, rel=1e-4)
    assert perplexity(model, batches[:1]) == pytest.approx(math.exp(losses[0]), rel=1e-4)
    assert perplexity(model, batches) > 1.0


def test_perplexity_weights_batches_by_their_tokens() -> None:
    model = build_tiny_model("llama")
    generator = torch.Generator().manual_seed(4)
    big, small = (
        torch.randint(0, 300, (3, 16), generator=generator),
        torch.randint(0, 300, (1, 16), generator=generator),
    )
    with torch.no_grad():
        whole = float(model(input_ids=torch.cat([big, small]), labels=torch.cat([big, small])).loss)
    assert perplexity(model, [big, small]) == pytest.approx(math.exp(whole), rel=1e-4)


# --- drop baselines ------------------------------------------------------------------------------------------


def test_block_influence_drops_the_inner_layers_that_turn_least() -> None:
    # Layers 0 and 7 turn nothing, but the first and the last layer are never dropped.
    steps = [0.0, 0.6, 0.1, 0.5, 0.2, 0.7, 0.15, 0.0]
    traces = [rotation_trace(steps, seed=0), rotation_trace(steps, seed=1)]
    assert drop_by_block_influence(traces, 1) == [2]
    assert drop_by_block_influence(traces, 3) == [2, 4, 6]
    assert drop_by_block_influence(traces, 4) == [2, 3, 4, 6]


def test_angular_distance_drops_the_closest_inner_block() -> None:
    # Blocks touching layer 0 (0.0 + 0.05) or the last layer (0.02 + 0.0) turn less, but are not allowed.
    steps = [0.0, 0.05, 0.4, 0.3, 0.06, 0.05, 0.5, 0.02, 0.0]
    traces = [rotation_trace(steps, seed=2)]
    assert drop_by_angular_distance(traces, 2) == [4, 5]
    assert drop_by_angular_distance(traces, 1) == [7]
    assert drop_by_angular_distance(traces, 3) == [3, 4, 5]


def test_drop_rules_are_registered() -> None:
    assert dict(DROP_RULES) == {"drop-bi": drop_by_block_influence, "drop-angular": drop_by_angular_distance}
    assert tuple(DROP_RULES) == DROP_BASELINES  # the names the options accept are the rules the stage has


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"baselines": ("drop-random",)}, "unknown baseline drop-random; choose from drop-bi, drop-angular"),
        ({"blocks": 0}, "--blocks >= 1"),
        ({"limit": 0}, "--limit must be at least 1"),
        (
            {"zero_shot": ("piqa",), "execution": ExecutionOptions(mode="layerwise")},
            "--zero-shot runs the whole model",
        ),
    ],
)
def test_eval_options_refuse_what_cannot_run(options: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        EvalOptions(**options)


def test_eval_options_read_the_command_line_spellings() -> None:
    assert EvalOptions.baselines_given(None) == DROP_BASELINES
    assert EvalOptions.baselines_given(["none"]) == ()
    assert EvalOptions.tasks_given("paper") == PAPER_TASKS
    assert EvalOptions.tasks_given("piqa,boolq,") == ("piqa", "boolq")


# --- windows ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dropped", "windows"),
    [
        ([3, 4, 7], [(2, 4), (6, 7)]),
        ([7, 3, 4], [(2, 4), (6, 7)]),
        ([5], [(4, 5)]),
        ([1, 3, 5], [(0, 1), (2, 3), (4, 5)]),
        ([2, 3, 4, 5], [(1, 5)]),
        ([], []),
    ],
)
def test_windows_for_dropped(dropped: list[int], windows: list[tuple[int, int]]) -> None:
    assert windows_for_dropped(dropped) == windows


# --- skipping layers equals removing them ------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "qwen2", "gpt2"])
def test_skipping_layers_equals_the_model_saved_without_them(
    model_type: str, tiny_model_dir: Callable[[str], Path]
) -> None:
    """Gemma 2 alternates attention types by position; the skipped model must keep each kept layer's own."""
    loaded = pull(str(tiny_model_dir(model_type)))
    dropped = [2, 4]
    plan = MergePlan(
        model="tiny",
        base_model=None,
        revision=None,
        model_type=model_type,
        num_layers=TINY_LAYERS,
        windows=windows_for_dropped(dropped),
        method="drop-bi",
        score="cosine",
        criterion="absolute",
        merge="drop",
        ridge=0.3,
        threshold=None,
        target={},
        calibration={},
    )
    generator = torch.Generator().manual_seed(6)
    batches = [torch.randint(0, 300, (2, 16), generator=generator) for _ in range(2)]
    removed = perplexity(build_merged_model(loaded, plan, []), batches)
    skipped = losses_perplexity(execution_of(loaded).losses(batches, progress=False, label="", skip=dropped))
    assert skipped == pytest.approx(removed, rel=1e-6)
    whole = losses_perplexity(execution_of(loaded).losses(batches, progress=False, label=""))
    assert skipped != pytest.approx(whole, rel=1e-4)
    layers = loaded.model.base_model.get_submodule("layers" if model_type != "gpt2" else "h")
    assert not any("forward" in vars(layer) for layer in layers)  # the skip is undone


def test_the_eval_table_stays_aligned_with_a_long_model_name() -> None:
    kinds = {"narrative": 30.0, "code": 10.0}
    report = EvalReport(
        text="swm_hub:corpus/heldout",
        blocks=4,
        seq_len=16,
        rows=[
            PerplexityRow("base: SmolLM2-135M-Instruct.Q4_1.gguf with a long name", 30, 24.0, (), kinds),
            PerplexityRow("merged: swm-fit, fit rule", 24, 40.0, (), {"narrative": 60.0, "code": 19.0}),
            PerplexityRow("drop-bi", 24, 58.0, (13, 14), {"narrative": 76.0, "code": 28.0}),
        ],
    )
    header, *rows = report.table_lines()[1:4]
    column = header.index("layers")
    assert all(row[column : column + 6].strip().isdigit() for row in rows)
    assert (
        report.table_lines()[-1]
        == "merged / best drop baseline: worst 0.789 (narrative); better than dropping on every kind"
    )


def test_eval_of_a_folder_without_a_plan_says_to_give_a_compressed_folder(tmp_path: Path) -> None:
    """Not a --plan problem (eval has no --plan): the folder is not one compress wrote."""
    with pytest.raises(UnknownModelError, match="it has no swm_plan.json: give a folder written by"):
        evaluate(tmp_path)
