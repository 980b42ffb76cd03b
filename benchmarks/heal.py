"""What healing buys on SmolLM2-135M: held-out perplexity before and after, merged against dropped, and speed.

For each removal count in ``--counts`` (SmolLM2-135M has 30 decoder layers):

- ``swm-fit``: ``plan_merge`` with ``target_layers = 30 - count`` and ``build_merged_model``, on the
  ``CalibrationOptions()`` trace (the shipped calibration corpus, every kind);
- ``drop-bi``: ShortGPT's block influence dropping of as many layers, from the same trace;
- each healed with ``swm_hub.stages.heal.heal_model`` and the same options and budget (``--tokens``,
  default 24,576: 48 steps of 4 x 128): LoRA on every decoder layer (``--modules all``, the default; with
  ``merged``, on the consolidated layers, and for the drop baseline on the layer kept below each dropped
  run), KL to the dense model on the calibration text, at a learning rate (3e-3) raised for budgets this
  small, with the forward passes in bfloat16 where the CPU has bfloat16 arithmetic (``--autocast auto``, the
  default: 1.5x the tokens/s of float32 on this project's machine, the same healed perplexity).

Held-out perplexity (``HealComparer``: the shipped held-out split, every kind, in ``--eval-blocks`` blocks
of ``--eval-len`` tokens) is measured for the dense model once and for both models before and after
healing. "gap closed" is the share of the merged model's perplexity gap to the dense model that healing
closed. Then the training throughput of our loop is put next to a plain PEFT + transformers loop (a
hand-written loop: teacher forward, student forward, KL, backward, AdamW step) on the swm-fit model of the
first count, with the same batch, adapters and ``--speed-steps`` steps; the two alternate
``--speed-rounds`` times on fresh copies and the best of each is kept (``--only-throughput`` runs just this).

Run it from the repository root (about 10 minutes on a 2-core CPU; set OMP_NUM_THREADS=1 when the machine
is shared)::

    python benchmarks/heal.py             # counts 9 and 12
    python benchmarks/heal.py --quick     # count 9 only, a few steps: a 1-2 minute smoke run
    python benchmarks/heal.py --outside ~/texts   # also perplexity on each *.txt there, before and after

It prints a table for people first, then one JSON line with every figure, last, for scripts.

Measured (``OMP_NUM_THREADS=1 python benchmarks/heal.py``, 534 s on this 2-core CPU with one thread; AMX, so
``--autocast auto`` ran bfloat16; swm-fit windows by per-layer block influence), held-out perplexity
before -> after healing, dense 26.05:

- 9 removed: swm-fit 78.86 -> 51.63, drop-bi 100.00 -> 53.89: merged wins healed overall and on four of
  five kinds (narrative loses: 91.88 against 88.87), and closes 51.6% of its gap to the dense model;
- 12 removed: swm-fit 117.60 -> 67.29, drop-bi 187.94 -> 73.49: merged wins healed on every kind (55.0%
  closed);
- throughput: ours 233 tokens/s, the plain PEFT loop under the same autocast 238 (0.98x; the runs were
  233/219 against 223/238: within the noise).

README, heal, has the settings tried and the float32 comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel

from swm_hub.core.model import LoadedModel
from swm_hub.core.options import CalibrationOptions, ExecutionOptions, HealOptions, MergeOptions
from swm_hub.core.texts import TextSource
from swm_hub.pipeline.heal_comparison import HealComparer
from swm_hub.results.heal import HealComparison
from swm_hub.results.plan import MergePlan
from swm_hub.runtime.layer_trace import BatchTrace
from swm_hub.runtime.loading import pull
from swm_hub.stages.heal import HealResult, adapted_module_names, autocast_dtype, heal_model, training_blocks
from swm_hub.stages.heal.training import forward_precision
from swm_hub.stages.merge import build_merged_model, plan_merge

MODEL = "smollm2"
LAYERS = 30
STARTED = time.perf_counter()


@dataclass(frozen=True)
class Settings:
    counts: tuple[int, ...]
    tokens: int
    seq_len: int
    batch_size: int
    lr: float
    modules: str
    autocast: str
    eval_blocks: int
    eval_len: int
    threads: int
    speed_steps: int
    speed_rounds: int
    only_throughput: bool = False
    outside: str | None = None


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="count 9, two short steps, few held-out blocks")
    parser.add_argument("--counts", type=int, nargs="+", default=[9, 12], help="layers removed")
    parser.add_argument("--tokens", type=int, default=48 * 4 * 128, help="heal budget per model")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training block")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--modules", default=HealOptions.modules, help="all or merged (see heal --help)")
    parser.add_argument(
        "--autocast", default=HealOptions.autocast, help="auto, bf16 or off (see heal --help)"
    )
    parser.add_argument("--eval-blocks", type=int, default=10, help="held-out blocks (shared by the kinds)")
    parser.add_argument("--eval-len", type=int, default=256, help="tokens per held-out block")
    parser.add_argument("--speed-steps", type=int, default=3, help="steps of each timed training loop")
    parser.add_argument("--speed-rounds", type=int, default=2, help="alternations of the two timed loops")
    parser.add_argument("--only-throughput", action="store_true", help="skip the perplexity comparison")
    parser.add_argument("--outside", type=Path, help="a folder of *.txt files to measure the models on too")
    args = parser.parse_args(argv)
    if args.outside is not None and not sorted(args.outside.glob("*.txt")):
        parser.error(f"--outside {args.outside}: no *.txt file there")
    threads = int(os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads())))
    if args.quick:
        return Settings((9,), 2 * 4 * 64, 64, 4, args.lr, args.modules, args.autocast, 5, 64, threads, 2, 1)
    return Settings(
        tuple(args.counts),
        args.tokens,
        args.seq_len,
        args.batch_size,
        args.lr,
        args.modules,
        args.autocast,
        args.eval_blocks,
        args.eval_len,
        threads,
        args.speed_steps,
        args.speed_rounds,
        args.only_throughput,
        str(args.outside) if args.outside else None,
    )


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", flush=True)


def plain_peft_tokens_per_s(
    base: LoadedModel, plan: MergePlan, student: PreTrainedModel, options: HealOptions
) -> float:
    """A minimal PEFT + transformers distillation loop on the same model, batch and steps; its tokens/s."""
    names = adapted_module_names(student, plan, options.modules)
    config = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=0.0,
        target_modules=names,
        task_type="CAUSAL_LM",
    )
    model: Any = get_peft_model(student, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr)
    blocks, _ = training_blocks(base.tokenizer, plan, options)
    autocast = autocast_dtype(options, torch.device("cpu"))
    model.train()
    started = time.perf_counter()
    for step in range(options.steps):
        ids = blocks[step * options.batch_size : (step + 1) * options.batch_size]
        with torch.no_grad(), forward_precision(torch.device("cpu"), autocast):
            teacher = base.model(input_ids=ids, use_cache=False).logits
        with forward_precision(torch.device("cpu"), autocast):
            student_logits = model(input_ids=ids, use_cache=False).logits
        loss = F.kl_div(
            F.log_softmax(student_logits.float(), -1).flatten(0, 1),
            F.log_softmax(teacher.float(), -1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return options.steps * options.batch_size * options.seq_len / (time.perf_counter() - started)


def run(settings: Settings) -> dict[str, Any]:
    torch.set_num_threads(settings.threads)
    base = pull(MODEL)
    log(f"loaded {MODEL}")
    comparer = HealComparer(base, blocks=settings.eval_blocks, seq_len=settings.eval_len)
    calibration = CalibrationOptions()
    traces = comparer.traces(calibration)
    if not settings.only_throughput:
        log(f"dense held-out perplexity {comparer.base_row.perplexity:.2f}")
    options = HealOptions(
        tokens=settings.tokens,
        seq_len=settings.seq_len,
        batch_size=settings.batch_size,
        lr=settings.lr,
        modules=settings.modules,
        autocast=settings.autocast,
        checkpoint_every=0,
        execution=ExecutionOptions(device="cpu"),
    )

    outside = outside_comparers(base, Path(settings.outside), settings) if settings.outside else {}
    measured: dict[str, dict[str, float]] = {}  # "swm-fit before" -> outside text -> perplexity

    def heal_alike(model: PreTrainedModel, plan: MergePlan) -> tuple[PreTrainedModel, HealResult]:
        label = "drop-bi" if plan.merge == "drop" else "swm-fit"
        measured[f"{label} before"] = perplexities(outside, model, plan.layers_after)
        healed, result = heal_model(model, base.model, plan, base.tokenizer, options)
        measured[f"{label} after"] = perplexities(outside, healed, plan.layers_after)
        return healed, result

    counts: dict[str, Any] = {}
    plans = {
        removed: plan_merge(
            base, traces, MergeOptions(target_layers=LAYERS - removed, calibration=calibration), False
        )
        for removed in settings.counts
    }
    for removed, plan in plans.items() if not settings.only_throughput else ():
        student = build_merged_model(base, plan, traces)
        _, result, comparison = comparer.compare(plan, student, options.tokens, heal_alike, heal_alike)
        log(f"{removed} removed: windows {plan.windows}, healed in {result.record['seconds']:.0f} s")
        counts[str(removed)] = {
            "windows": plan.windows,
            "comparison": asdict(comparison),
            "heal": result.record,
            "outside": {"dense": {name: c.base_row.perplexity for name, c in outside.items()}, **measured},
        }
    speed = throughput(base, plans[settings.counts[0]], traces, options, settings)
    log("training loops timed")
    return {
        "settings": asdict(settings),
        "counts": counts,
        "throughput": speed,
        "seconds": time.perf_counter() - STARTED,
    }


def outside_comparers(base: LoadedModel, folder: Path, settings: Settings) -> dict[str, HealComparer]:
    """One held-out measure per ``*.txt`` of ``folder``: texts from outside the repository, never trained on."""
    return {
        path.stem: HealComparer(base, TextSource(path=path), settings.eval_blocks, settings.eval_len)
        for path in sorted(folder.glob("*.txt"))
    }


def perplexities(comparers: dict[str, HealComparer], model: PreTrainedModel, layers: int) -> dict[str, float]:
    return {name: comparer.measure(model, name, layers).perplexity for name, comparer in comparers.items()}


def throughput(
    base: LoadedModel, plan: MergePlan, traces: list[BatchTrace], options: HealOptions, settings: Settings
) -> dict[str, Any]:
    """Tokens/s of our loop and of the plain loop, alternating on fresh copies of the same model, best of each.

    Both time their training steps only (not building the model or adding the adapters), on the same
    blocks, batch and adapters; alternating spreads the load of a shared machine over both.
    """
    timed = replace(options, tokens=settings.speed_steps * options.batch_size * options.seq_len)
    ours, plain = [], []
    for _ in range(settings.speed_rounds):
        plain.append(plain_peft_tokens_per_s(base, plan, build_merged_model(base, plan, traces), timed))
        _, result = heal_model(
            build_merged_model(base, plan, traces), base.model, plan, base.tokenizer, timed
        )
        ours.append(result.tokens_per_s)
    return {
        "ours": max(ours),
        "plain_peft": max(plain),
        "ours_runs": ours,
        "plain_runs": plain,
        "steps": timed.steps,
    }


def table_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for removed, figures in report["counts"].items():
        comparison = HealComparison.from_dict(figures["comparison"])
        lines += [f"--- {removed} of {LAYERS} layers removed ---", *comparison.table_lines()]
        base, merged, dropped = comparison.rows
        for kind in merged.before_by_kind:
            lines.append(
                f"  {kind:<10} dense {base.before_by_kind[kind]:8.2f}  swm-fit {merged.before_by_kind[kind]:8.2f}"
                f" -> {merged.after_by_kind[kind]:8.2f}  drop-bi {dropped.before_by_kind[kind]:8.2f}"
                f" -> {dropped.after_by_kind[kind]:8.2f}"
            )
        assert merged.after is not None and dropped.after is not None
        verdict = "beats" if merged.after < dropped.after else "does NOT beat"
        lines.append(f"healed swm-fit {merged.after:.2f} {verdict} healed drop-bi {dropped.after:.2f}")
        outside = figures["outside"]
        for name, dense in outside["dense"].items():
            lines.append(
                f"  outside {name:<12} dense {dense:8.2f}  swm-fit {outside['swm-fit before'][name]:8.2f} -> "
                f"{outside['swm-fit after'][name]:8.2f}  drop-bi {outside['drop-bi before'][name]:8.2f} -> "
                f"{outside['drop-bi after'][name]:8.2f}"
            )
    speed = report["throughput"]
    lines.append(
        f"training throughput (best of {len(speed['ours_runs'])} alternating runs of {speed['steps']} steps): ours "
        f"{speed['ours']:.0f} tokens/s, plain PEFT loop {speed['plain_peft']:.0f} tokens/s "
        f"({speed['ours'] / speed['plain_peft']:.2f}x)"
    )
    lines.append(f"total {report['seconds']:.0f} s with {report['settings']['threads']} thread(s)")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    report = run(parse_args(argv))
    for line in table_lines(report):
        print(line)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
