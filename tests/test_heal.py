"""The heal stage on tiny models: the loss falls, the output is a plain model, resume and Ctrl-C, the disk cache."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from swm_hub import cli
from swm_hub.core.errors import InvalidOptionError, UnknownModelError
from swm_hub.core.options import CalibrationOptions, ExecutionOptions, HealOptions, MergeOptions
from swm_hub.core.texts import TextSource
from swm_hub.pipeline.compress import compress
from swm_hub.pipeline.heal import heal
from swm_hub.pipeline.heal_comparison import HealComparer
from swm_hub.results.heal import HealComparison, HealComparisonRow
from swm_hub.results.plan import PLAN_FILE, MergePlan
from swm_hub.runtime.loading import pull
from swm_hub.stages import heal as heal_module
from swm_hub.stages.card import render_card
from swm_hub.stages.evaluate import heldout_batches, perplexity
from swm_hub.stages.heal import (
    ADAPTER_FOLDER,
    HealInterrupted,
    HealRequest,
    StepReport,
    adapted_module_names,
    checkpoint_folder,
    consolidated_positions,
    heal_model,
)
from swm_hub.stages.heal import training as heal_train
from swm_hub.stages.heal.teacher import MemoryEstimate, choose_teacher_cache
from swm_hub.stages.heal.training import kl_full, kl_top_k

CPU = ExecutionOptions(device="cpu")
# 8 steps of 4 blocks of 16 tokens; a high rate so that a few steps move a tiny random model visibly. Adapters
# on the consolidated layers only, so that what healing changed can be told from what it left alone.
SMALL = HealOptions(
    tokens=8 * 4 * 16, seq_len=16, batch_size=4, lr=1e-2, modules="merged", checkpoint_every=0, execution=CPU
)


@pytest.fixture(scope="module")
def compressed(
    tiny_llama_dir: Path, calibration: CalibrationOptions, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny llama (6 layers) merged to 4; its plan names the test's calibration file as its text."""
    out = tmp_path_factory.mktemp("compressed") / "tiny-4L"
    compress(str(tiny_llama_dir), out, MergeOptions(target_layers=4, calibration=calibration))
    return out


@pytest.fixture(scope="module")
def healed(compressed: Path, tmp_path_factory: pytest.TempPathFactory) -> heal_module.HealResult:
    return heal(compressed, tmp_path_factory.mktemp("healed") / "out", SMALL)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for file in sorted(folder.glob("*.safetensors")) for k, v in load_file(file).items()}


def plan_of(folder: Path) -> MergePlan:
    return MergePlan.from_file(folder / PLAN_FILE)


def healed_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def quarter_means(losses: list[float]) -> tuple[float, float]:
    quarter = max(1, len(losses) // 4)
    return sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter


def stop_at(step: int) -> Callable[[StepReport], None]:
    """A step callback that presses Ctrl-C (raises KeyboardInterrupt) once ``step`` steps are done."""

    def callback(report: StepReport) -> None:
        if report.step == step:
            raise KeyboardInterrupt

    return callback


# --- options -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokens": 10}, "less than one step"),
        ({"rank": 0}, "--rank must be at least 1"),
        ({"lr": 0.0}, "--lr must be a finite number above 0"),
        ({"lr": float("nan")}, "--lr must be a finite number above 0"),
        ({"modules": "some"}, "--modules must be one of merged, all"),
        ({"teacher_cache": "gpu"}, "--teacher-cache must be one of auto, memory, disk"),
        ({"hidden_weight": -1.0}, "--hidden-weight must be a finite number of at least 0"),
        ({"seq_len": 4}, "--seq-len must be at least 8"),
        ({"checkpoint_every": -1}, "--checkpoint-every must be at least 0"),
        ({"top_k": 0}, "--top-k must be at least 1"),
        ({"execution": ExecutionOptions(mode="layerwise")}, "--execution layerwise does not apply"),
        ({"autocast": "fp16"}, "--autocast must be one of auto, bf16, off"),
        (
            {"autocast": "bf16", "execution": ExecutionOptions(device="cpu", dtype="float16")},
            "--dtype float16 already computes in float16",
        ),
    ],
)
def test_options_are_validated(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        replace(SMALL, **change)


@pytest.mark.parametrize(
    ("autocast", "dtype", "native", "expected"),
    [
        ("auto", "float32", True, torch.bfloat16),
        ("auto", "float32", False, None),
        ("bf16", "float32", False, torch.bfloat16),
        ("off", "float32", True, None),
        ("auto", "bfloat16", True, None),  # the weights already compute in bfloat16
    ],
)
def test_autocast_follows_the_option_the_weights_and_the_device(
    autocast: str, dtype: str, native: bool, expected: torch.dtype | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(heal_module, "has_bf16_arithmetic", lambda device: native)
    options = replace(SMALL, autocast=autocast, execution=ExecutionOptions(device="cpu", dtype=dtype))
    assert heal_module.autocast_dtype(options, torch.device("cpu")) == expected


def test_steps_never_exceed_the_budget() -> None:
    assert replace(SMALL, tokens=4 * 16 * 3 + 63).steps == 3


# --- the result ----------------------------------------------------------------------------------------------


def test_heal_lowers_the_loss_and_records_it(healed: heal_module.HealResult) -> None:
    assert healed.output_dir is not None
    record = plan_of(healed.output_dir).heal
    assert record is not None
    assert record == healed.record
    assert record["steps"] == SMALL.steps and record["tokens_seen"] == SMALL.steps * 4 * 16
    assert record["teacher_cache"] == "memory" and record["seed"] == 0
    assert record["options"]["rank"] == SMALL.rank and record["loss"]["every"] >= 1
    first, last = quarter_means(record["loss"]["averages"])
    assert last < first, record["loss"]
    assert record["loss"]["min"] <= record["loss"]["last"] and record["tokens_per_s"] > 0
    assert not checkpoint_folder(healed.output_dir).exists()


def test_healed_folder_loads_and_changes_only_adapted_layers(
    compressed: Path, healed: heal_module.HealResult
) -> None:
    assert healed.output_dir is not None
    model = AutoModelForCausalLM.from_pretrained(healed.output_dir)
    assert model.config.num_hidden_layers == 4
    before, after = weights(compressed), weights(healed.output_dir)
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    positions = consolidated_positions(plan_of(compressed).windows)
    adapted = {f"{name}.weight" for name in adapted_module_names(model, plan_of(compressed), "merged")}
    assert changed and changed <= adapted
    assert {int(name.split(".")[2]) for name in changed} == set(positions)


def test_card_shows_the_heal(healed: heal_module.HealResult) -> None:
    assert healed.output_dir is not None
    card = (healed.output_dir / "README.md").read_text(encoding="utf-8")
    assert "## Healing" in card and f"{SMALL.steps} steps" in card
    assert not (healed.output_dir / "eval.json").exists(), "the healed folder is a new model, not a copy"


def test_card_shows_heal_comparison(healed: heal_module.HealResult, tmp_path: Path) -> None:
    assert healed.output_dir is not None
    folder = tmp_path / "with-comparison"
    folder.mkdir()
    for file in ("swm_plan.json", "config.json", "model.safetensors"):
        (folder / file).write_bytes((healed.output_dir / file).read_bytes())
    HealComparison(
        text="swm_hub:corpus/heldout",
        blocks=4,
        seq_len=16,
        tokens=512,
        rows=[
            HealComparisonRow("base: tiny", 6, 10.0, None),
            HealComparisonRow("merged: swm-fit, fit rule", 4, 14.0, 11.0),
            HealComparisonRow("drop-bi", 4, 16.0, 13.0, (2, 3)),
        ],
    ).save(folder)
    card = render_card(folder)
    assert "| drop-bi | 4 | 16.00 | 13.00 | 2, 3 |" in card
    assert "Healing closed 75.0% of this model's perplexity gap" in card


def test_card_names_a_users_heldout_file_by_its_name_only(
    healed: heal_module.HealResult, tmp_path: Path
) -> None:
    assert healed.output_dir is not None
    folder = tmp_path / "with-comparison"
    folder.mkdir()
    for file in ("swm_plan.json", "config.json", "model.safetensors"):
        (folder / file).write_bytes((healed.output_dir / file).read_bytes())
    private = tmp_path / "private" / "my-heldout.txt"
    rows = [
        HealComparisonRow("base: tiny", 6, 10.0, None),
        HealComparisonRow("drop-bi", 4, 16.0, 13.0, (2, 3)),
    ]
    HealComparison(text=str(private), blocks=4, seq_len=16, tokens=512, rows=rows).save(folder)
    card = render_card(folder)
    assert "my-heldout.txt" in card and str(private.parent) not in card


def test_all_modules_adapts_every_layer(compressed: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(compressed)
    merged = adapted_module_names(model, plan_of(compressed), "merged")
    every = adapted_module_names(model, plan_of(compressed), "all")
    assert len(every) == 4 * 7 and set(merged) < set(every)


def test_keep_adapter_saves_what_peft_loads_back(compressed: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    out = tmp_path / "out"
    heal(compressed, out, replace(SMALL, tokens=2 * 4 * 16), keep_adapter=True)
    config = json.loads((out / ADAPTER_FOLDER / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["base_model_name_or_path"] == compressed.name  # the folder's name, never the user's path
    base = AutoModelForCausalLM.from_pretrained(compressed)
    merged = PeftModel.from_pretrained(base, out / ADAPTER_FOLDER).merge_and_unload()
    healed = weights(out)
    for name, tensor in merged.state_dict().items():
        if name in healed:
            torch.testing.assert_close(tensor, healed[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("autocast", "computed"), [("bf16", torch.bfloat16), ("off", torch.float32)])
def test_autocast_runs_both_forward_passes_in_bfloat16_and_keeps_the_weights_float32(
    compressed: Path, autocast: str, computed: torch.dtype
) -> None:
    student, teacher = pull(str(compressed)), pull(str(plan_of(compressed).model))
    seen: dict[str, set[torch.dtype]] = {"student": set(), "teacher": set()}
    for role, model in (("student", student.model), ("teacher", teacher.model)):
        head = model.get_output_embeddings()
        head.register_forward_hook(lambda module, args, out, role=role: seen[role].add(out.dtype))
    options = replace(SMALL, tokens=2 * 4 * 16, autocast=autocast)
    healed, result = heal_model(student.model, teacher.model, plan_of(compressed), student.tokenizer, options)
    assert seen == {"student": {computed}, "teacher": {computed}}
    assert (
        result.record["autocast"] == autocast and torch.isfinite(torch.tensor(result.loss["averages"])).all()
    )
    assert {tensor.dtype for tensor in healed.state_dict().values()} == {torch.float32}


def test_a_resume_under_another_autocast_is_refused(compressed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(HealInterrupted):
        heal(compressed, out, replace(SMALL, autocast="bf16"), on_step=stop_at(1))
    with pytest.raises(InvalidOptionError, match="made by a different run .*autocast 'bf16' -> 'off'"):
        heal(compressed, out, replace(SMALL, autocast="off"), resume=True)


def test_hidden_state_term_adds_to_the_loss(compressed: Path, tmp_path: Path) -> None:
    plain = heal(compressed, tmp_path / "kl", replace(SMALL, tokens=4 * 16))
    both = heal(compressed, tmp_path / "kl-mse", replace(SMALL, tokens=4 * 16, hidden_weight=1.0))
    assert both.loss["first"] > plain.loss["first"]


def test_trains_on_the_calibration_text_never_the_heldout(
    compressed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[CalibrationOptions] = []
    original = heal_module.calibration_batches

    def recording(tokenizer: Any, options: CalibrationOptions, source: Any = None) -> Any:
        assert source is None
        seen.append(options)
        return original(tokenizer, options, source)

    monkeypatch.setattr(heal_module, "calibration_batches", recording)
    calib = tmp_path / "mine.txt"
    calib.write_text("Some other words to train on. " * 400, encoding="utf-8")
    heal(compressed, tmp_path / "default", replace(SMALL, tokens=4 * 16))
    heal(compressed, tmp_path / "mine", replace(SMALL, tokens=4 * 16, calib=calib))
    plan_text = Path(str(plan_of(compressed).calibration["text"]))
    assert {options.text for options in seen} == {plan_text, calib}
    assert plan_of(tmp_path / "mine").heal["text"] == str(calib.resolve())  # type: ignore[index]


def test_compare_heals_the_drop_baseline_alike_and_the_card_shows_it(
    compressed: Path, tmp_path: Path
) -> None:
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(
        "A different story about a cat who sat in the sun all day long. " * 200, encoding="utf-8"
    )
    out = tmp_path / "out"
    heal(compressed, out, SMALL, compare=True, heldout=heldout)
    comparison = HealComparison.load(out / "heal.json")
    base, merged, drop = comparison.rows
    assert base.name.startswith("base") and base.after is None and base.layers == 6
    assert merged.after is not None and drop.name == "drop-bi" and drop.after is not None
    assert len(drop.dropped) == 2 and comparison.tokens == SMALL.tokens
    healed = AutoModelForCausalLM.from_pretrained(out)
    batches = heldout_batches(
        healed_tokenizer(out), TextSource(path=heldout), comparison.blocks, comparison.seq_len
    )
    assert perplexity(healed, batches.batches) == pytest.approx(merged.after, rel=1e-4)
    assert "before healing | after healing" in (out / "README.md").read_text(encoding="utf-8")


def test_healing_a_model_built_in_memory_leaves_the_teacher_alone(compressed: Path) -> None:
    base = pull(str(plan_of(compressed).model))
    before = {name: tensor.clone() for name, tensor in base.model.state_dict().items()}
    dropped, drop_plan = HealComparer(base).drop_baseline(plan_of(compressed))
    healed, _ = heal_model(dropped, base.model, drop_plan, base.tokenizer, replace(SMALL, tokens=2 * 4 * 16))
    assert any(
        not torch.equal(before[name], tensor)
        for name, tensor in healed.state_dict().items()
        if name in before
    )
    for name, tensor in base.model.state_dict().items():
        assert torch.equal(before[name], tensor), name


# --- interruptions -------------------------------------------------------------------------------------------


def test_interrupt_then_resume_equals_an_uninterrupted_run(
    compressed: Path, healed: heal_module.HealResult, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(HealInterrupted) as stopped:
        heal(compressed, out, SMALL, on_step=stop_at(SMALL.steps // 2))
    assert stopped.value.step == SMALL.steps // 2 and stopped.value.checkpoint == checkpoint_folder(out)
    assert not out.exists() and checkpoint_folder(out).is_dir()
    resumed = heal(compressed, out, SMALL, resume=True)
    assert healed.output_dir is not None
    uninterrupted, continued = weights(healed.output_dir), weights(out)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(continued[name], tensor, rtol=0, atol=1e-6)
    assert resumed.record["resumed_at"] == SMALL.steps // 2
    assert resumed.loss["averages"] == healed.loss["averages"]
    assert not checkpoint_folder(out).exists()


def test_first_sigint_stops_at_the_step_boundary(compressed: Path, tmp_path: Path) -> None:
    def press_ctrl_c(report: StepReport) -> None:
        if report.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag: the step completes

    with pytest.raises(HealInterrupted) as stopped:
        heal(compressed, tmp_path / "out", SMALL, on_step=press_ctrl_c)
    assert stopped.value.step == 2
    saved = json.loads((checkpoint_folder(tmp_path / "out") / "latest.json").read_text(encoding="utf-8"))
    assert saved["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_checkpoints_are_never_mixed_or_overwritten(compressed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(InvalidOptionError, match="there is no heal checkpoint"):
        heal(compressed, out, SMALL, resume=True)
    with pytest.raises(HealInterrupted):
        heal(compressed, out, SMALL, on_step=stop_at(1))
    with pytest.raises(InvalidOptionError, match=r"left a checkpoint .* \(step 1\): pass --resume"):
        heal(compressed, out, SMALL)
    with pytest.raises(InvalidOptionError, match="made by a different run .*rank 8 -> 4"):
        heal(compressed, out, replace(SMALL, rank=4), resume=True)


def test_ctrl_c_mid_step_on_the_command_line_says_how_to_resume(
    compressed: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    calls = {"count": 0}
    original = heal_train._one_step

    def interrupted_third_step(*args: Any) -> float:
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt  # inside a step, before the weights change
        return original(*args)

    monkeypatch.setattr(heal_train, "_one_step", interrupted_third_step)
    args = ["swm-hub", "heal", str(compressed), "--out", str(out), "--tokens", "512", "--seq-len", "16"]
    args += ["--lr", "0.01", "--checkpoint-every", "0", "--device", "cpu", "--quiet"]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "interrupted after step 2 of 8" in lines[0] and lines[0].endswith("--quiet --resume")
    monkeypatch.setattr(sys, "argv", [*args, "--resume"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    assert plan_of(out).heal["resumed_at"] == 2  # type: ignore[index]


# --- the teacher on disk --------------------------------------------------------------------------------------


def test_disk_cache_heals_too(compressed: Path, tmp_path: Path) -> None:
    result = heal(compressed, tmp_path / "out", replace(SMALL, teacher_cache="disk", hidden_weight=0.5))
    assert result.record["teacher_cache"] == "disk"
    first, last = quarter_means(result.record["loss"]["averages"])
    assert last < first
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 4


def test_disk_cache_is_reused_on_resume(
    compressed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, options = tmp_path / "out", replace(SMALL, teacher_cache="disk")
    with pytest.raises(HealInterrupted):
        heal(compressed, out, options, on_step=stop_at(2))
    assert (checkpoint_folder(out) / "teacher-cache" / "cache.json").is_file()

    def no_teacher(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the teacher was loaded again")

    monkeypatch.setattr(heal_module, "build_cache", no_teacher)
    heal(compressed, out, options, resume=True)


def test_top_k_kl_is_the_full_kl_when_k_covers_the_vocabulary() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 40), torch.randn(2, 5, 40) * 3
    values, indices = torch.log_softmax(teacher, -1).topk(40, dim=-1)
    torch.testing.assert_close(kl_top_k(student, values, indices), kl_full(student, teacher))
    values, indices = torch.log_softmax(teacher, -1).topk(8, dim=-1)
    coarse = kl_top_k(student, values, indices)
    assert 0 < float(coarse) < float(kl_full(student, teacher))  # coarsening never adds divergence


@pytest.mark.parametrize("k", [3, 10])
def test_top_k_kl_has_finite_gradients(k: int) -> None:
    student = torch.randn(1, 3, 10, requires_grad=True)
    values, indices = torch.log_softmax(torch.randn(1, 3, 10) * 5, -1).topk(k, dim=-1)
    kl_top_k(student, values.half(), indices.int()).backward()
    assert student.grad is not None and bool(torch.isfinite(student.grad).all())


def test_auto_keeps_the_teacher_in_memory_only_when_both_fit() -> None:
    device = torch.device("cpu")
    assert choose_teacher_cache("auto", MemoryEstimate(10, 10, 10), device) == "memory"
    assert choose_teacher_cache("auto", MemoryEstimate(2**60, 2**60, 0), device) == "disk"
    assert choose_teacher_cache("memory", MemoryEstimate(2**60, 2**60, 0), device) == "memory"


# --- the command line and compress --heal ---------------------------------------------------------------------


def test_heal_command_prints_the_summary(compressed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["heal", str(compressed), "--out", str(out), "--tokens", "128", "--seq-len", "16"]
    result = CliRunner().invoke(cli.app, [*args, "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    adapted = 7 * plan_of(compressed).layers_after  # q, k, v, o, gate, up, down of every layer by default
    assert f"healed {adapted} modules" in result.stdout and f"wrote {out}" in result.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--modules", "some"], "error: --modules must be one of merged, all"),
        (["--tokens", "8"], "error: --tokens 8 is less than one step"),
    ],
)
def test_heal_command_errors_are_one_line(
    compressed: Path,
    tmp_path: Path,
    extra: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(
        sys, "argv", ["swm-hub", "heal", str(compressed), "--out", str(tmp_path / "o"), *extra]
    )
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err


def test_a_folder_without_a_plan_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="it has no swm_plan.json"):
        heal(tiny_llama_dir, tmp_path / "out", SMALL)


def test_compress_heal_writes_a_healed_model(
    tiny_llama_dir: Path, calibration: CalibrationOptions, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["compress", str(tiny_llama_dir), "--target-layers", "4", "--out", str(out), "--quiet"]
    args += ["--calib", str(calibration.text), "--samples", "4", "--seq-len", "16", "--batch-size", "2"]
    args += ["--heal", "--heal-tokens", "128", "--heal-seq-len", "16", "--device", "cpu"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    plan = plan_of(out)
    assert f"healed {7 * plan.layers_after} modules" in result.stdout
    assert plan.heal is not None and plan.heal["steps"] == 2
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    assert "## Healing" in (out / "README.md").read_text(encoding="utf-8")
    assert not checkpoint_folder(out).exists()


def test_compress_heal_loads_the_merged_folder_once_before_healing(
    tiny_llama_dir: Path, calibration: CalibrationOptions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heal pulls what the merge wrote, which checks it as the merge's own reload would have."""
    loads: list[Path] = []
    real_load = AutoModelForCausalLM.from_pretrained

    def counted_load(cls: type, path: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append(Path(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counted_load))
    out = tmp_path / "out"
    args = ["compress", str(tiny_llama_dir), "--target-layers", "4", "--out", str(out), "--quiet"]
    args += ["--calib", str(calibration.text), "--samples", "4", "--seq-len", "16", "--batch-size", "2"]
    args += ["--heal", "--heal-tokens", "128", "--heal-seq-len", "16", "--device", "cpu"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    written = [path for path in loads if path != tiny_llama_dir]
    assert len(written) == 2, written  # the heal's student, and the healed folder's reload check


def test_compress_heal_refuses_layerwise_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="drop --execution layerwise"):
        HealRequest(SMALL).check(tmp_path / "out", ExecutionOptions(mode="layerwise"))


def test_compress_heal_under_accelerate_launch_says_to_heal_apart_in_one_line(
    tiny_llama_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """accelerate launch runs compress in every process, which would merge and write the folder twice."""
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")  # what accelerate launch sets in each of 2 processes
    args = ["compress", str(tiny_llama_dir), "--target-layers", "4", "--out", str(out), "--heal"]
    monkeypatch.setattr(sys, "argv", ["swm-hub", *args, "--device", "cpu", "--quiet"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert [line for line in err.splitlines() if line.startswith("error:")] == [first]
    assert first.startswith("error: compress --heal runs in one process") and "Traceback" not in err
    assert f"then heal its output with `accelerate launch -m swm_hub heal {out}`" in first
    assert not out.exists() and not checkpoint_folder(out).exists()


@pytest.mark.parametrize("engine", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_a_sharded_launch_is_refused_in_one_line_before_any_model_loads(
    compressed: Path,
    tmp_path: Path,
    engine: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """heal is data-parallel only: under FSDP or DeepSpeed it would hold both models whole on every GPU."""
    monkeypatch.setenv(engine, "true")  # what accelerate launch --use_fsdp / --use_deepspeed sets
    monkeypatch.setattr(heal_module, "pull", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["swm-hub", "heal", str(compressed), "--out", str(out), "--quiet"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: heal trains data-parallel") and "Traceback" not in err
    assert not out.exists() and not checkpoint_folder(out).exists()


def test_an_error_under_accelerate_launch_is_said_by_the_main_process_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(sys, "argv", ["swm-hub", "heal", str(tmp_path / "missing"), "--quiet"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    assert capsys.readouterr().err == ""


def test_plans_without_a_heal_record_still_load(compressed: Path, tmp_path: Path) -> None:
    raw = json.loads((compressed / PLAN_FILE).read_text(encoding="utf-8"))
    raw.pop("heal", None)
    path = tmp_path / PLAN_FILE
    path.write_text(json.dumps(raw), encoding="utf-8")
    assert MergePlan.from_file(path).heal is None
