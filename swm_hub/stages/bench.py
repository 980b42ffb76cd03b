"""Latency of a model at batch 1, and of a compressed model beside its original, in the way a user feels it.

Every run reads the same natural-language prompt, cut or extended to exactly ``prompt_tokens`` tokens, and
generates exactly ``new_tokens`` tokens greedily (``min_new_tokens = max_new_tokens``, so an early EOS cannot
shorten a run). A run times two things, each between device synchronisations on CUDA:

- prefill: one forward pass over the prompt up to the first token's logits (time to first token);
- end to end: ``generate`` from the prompt to the last token.

Decode per token is ``(end_to_end - prefill) / (new_tokens - 1)``, and tokens/s is ``new_tokens`` over the
end-to-end time. The process's CPU time over the end-to-end run is recorded too: on a CPU that other work
shares, it leaves out the time the run waited for a core. Warm-up runs come first and are discarded; the
report gives median, min and max over the timed runs. With a baseline, both models stay loaded and their
runs alternate (ABBA order), so a change in machine load touches both alike; the measured speedup (baseline
median over model median) is printed next to the ideal one, layers before over layers after.

Eager ``generate`` at batch 1 on a GPU is bound by Python and kernel launches, which hides most of what
removing layers buys; on CUDA the default is therefore the overhead-free path: a static KV cache with the
decoding step compiled by ``torch.compile`` (transformers' ``CompileConfig``, mode ``reduce-overhead``).

Peak memory is the model's weights plus the peak working memory of a run (KV cache, activations, runtime
workspaces) above what was resident just before it: on CUDA from ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``; on CPU from the process's peak resident set (``VmHWM``), reset before each run
by writing 5 to ``/proc/self/clear_refs`` (Linux). Where that reset is impossible, ``resource.getrusage``'s
``ru_maxrss`` is used; it never decreases within a process, so a run that stays under an earlier peak shows
no working memory (``memory_method`` in the report says which was used).
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, CompileConfig, GenerationConfig

from swm_hub.core.architectures import spec_for_config
from swm_hub.core.devices import DTYPES
from swm_hub.core.errors import InvalidOptionError, UnknownModelError
from swm_hub.core.files import ONNX_FOLDER
from swm_hub.core.model import LoadedModel
from swm_hub.core.options import BenchOptions
from swm_hub.results.bench import BenchReport, ModelBench, Stat
from swm_hub.runtime.genai import GenaiModel, genai_folder, require_genai
from swm_hub.runtime.loading import pull
from swm_hub.runtime.ort import (
    MODEL_FILE_NAMES,
    OrtCausalLM,
    check_device,
    find_model_file,
    per_token_weight_bytes,
)

__all__ = [
    "BENCH_PROMPT",
    "bench",
    "bench_loaded",
    "prompt_ids",
]

logger = logging.getLogger(__name__)

DEFAULT_BENCH = BenchOptions()
BENCH_PROMPT: str = (
    "The library stood at the end of a quiet street, its windows glowing warmly against the winter dusk. "
    "Inside, an old librarian was sorting letters that had arrived from every corner of the country, each one "
    "asking for a book that had long been out of print."
)
_MB = 2**20
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def bench(
    model: str | Path, baseline: str | Path | None = None, options: BenchOptions = DEFAULT_BENCH
) -> BenchReport:
    """Measure the latency of ``model`` and, with ``baseline``, of the original beside it.

    Args:
        model: for ``torch``, anything ``pull`` takes (folder, Hub id, .gguf file, ``smollm2``); for
            ``onnxruntime``, the folder of an ONNX export, or a model folder with an ``onnx/`` subfolder;
            for ``genai``, the folder of a genai export, or a model folder with a ``genai/`` subfolder.
        baseline: the same kind of name for the original model; the speedups are baseline over model.
        options: the backend, device, precision, lengths and runs (see ``BenchOptions``).

    Raises:
        DeviceUnavailableError: ``cuda`` without a GPU (or without ONNX Runtime's CUDA provider).
        MissingDependencyError: ``genai`` without onnxruntime-genai.
        UnknownModelError: a model that cannot be found, or a folder without an ONNX export.
    """
    if options.backend == "genai":
        require_genai()
    check_device(options.device, onnx=options.backend == "onnxruntime")
    names = ([baseline] if baseline is not None else []) + [model]
    with _torch_threads(options.threads):
        runners = [_load(str(name), options) for name in names]
        return _run(runners, baseline is not None, options)


def bench_loaded(
    model: LoadedModel, baseline: LoadedModel | None = None, options: BenchOptions = DEFAULT_BENCH
) -> BenchReport:
    """``bench`` for torch models already in memory and on ``options.device``.

    For example random weights of a published shape, built on the GPU without writing them to disk; the
    names in the report come from the models' sources.
    """
    if options.backend != "torch":
        raise InvalidOptionError(f"models in memory run on the torch backend, not {options.backend}")
    check_device(options.device)
    loaded = ([baseline] if baseline is not None else []) + [model]
    runners = [_torch_runner(item, item.source.display_name, options) for item in loaded]
    return _run(runners, baseline is not None, options)


def _run(runners: list[_Runner], has_baseline: bool, options: BenchOptions) -> BenchReport:
    """Warm up, then alternate the timed runs of the loaded models (ABBA), and summarize each."""
    backend, device, compiled = options.backend, options.device, options.uses_compile
    warmup = max(options.warmup, 1) if compiled else options.warmup
    probe = _memory_probe(backend, device)
    load_before = _loadavg()
    prompt = prompt_ids(runners[-1].tokenizer, options.prompt_tokens)
    samples: list[list[_Sample]] = [[] for _ in runners]
    for run in range(warmup + options.runs):
        order = list(range(len(runners)))
        for index in order if run % 2 == 0 else order[::-1]:
            sample = _measure(runners[index], prompt, options.new_tokens, probe)
            if run >= warmup:
                samples[index].append(sample)
        logger.info(
            "run %d of %d done (%s)", run + 1, warmup + options.runs, "warm-up" if run < warmup else "timed"
        )
    results = [
        _summarize(runner, taken, options.new_tokens) for runner, taken in zip(runners, samples, strict=True)
    ]
    dtype_name = _dtype_name(runners[-1].dtype)
    for runner in runners:
        runner.close()
    return BenchReport(
        backend=backend,
        device=device,
        dtype=dtype_name,
        compiled=compiled,
        prompt_tokens=options.prompt_tokens,
        new_tokens=options.new_tokens,
        runs=options.runs,
        warmup=warmup,
        memory_method=probe.method,
        model=results[-1],
        baseline=results[0] if has_baseline else None,
        environment=_environment(backend, device, load_before, options.threads),
    )


def prompt_ids(tokenizer: Any, length: int) -> torch.Tensor:
    """Exactly ``length`` tokens of natural English: the prompt, repeated as needed, then cut."""
    ids: list[int] = list(tokenizer(BENCH_PROMPT)["input_ids"])
    more: list[int] = list(tokenizer(" " + BENCH_PROMPT, add_special_tokens=False)["input_ids"])
    while len(ids) < length:
        ids += more
    return torch.tensor([ids[:length]], dtype=torch.long)


# --- options -----------------------------------------------------------------------------------------------


# --- models ------------------------------------------------------------------------------------------------


@dataclass
class _Runner:
    """A loaded model behind the one interface both backends share (``__call__`` and ``generate``)."""

    name: str
    model: Any
    tokenizer: Any
    layers: int
    weights_mb: float
    dtype: torch.dtype
    device: torch.device
    synchronize: Callable[[], None]
    generate_kwargs: dict[str, Any]
    per_token_weights_mb: float | None = None

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch CPU threads, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _load(name: str, options: BenchOptions) -> _Runner:
    logger.info("loading %s for %s on %s", name, options.backend, options.device)
    if options.backend == "onnxruntime":
        return _load_ort(name, options.device, options.threads)
    if options.backend == "genai":
        return _load_genai(name, options.threads)
    loaded = pull(name, dtype=DTYPES[options.torch_dtype_name], device=options.device)
    return _torch_runner(loaded, name, options)


def _torch_runner(loaded: LoadedModel, name: str, options: BenchOptions) -> _Runner:
    model, device = loaded.model, options.device
    spec = spec_for_config(model.config)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    kwargs: dict[str, Any] = {}
    if options.uses_compile:
        # One CompileConfig per model: transformers recompiles when it gets a config that is not this one.
        kwargs = {"cache_implementation": "static", "compile_config": CompileConfig(mode="reduce-overhead")}
    return _Runner(
        name=name,
        model=model,
        tokenizer=loaded.tokenizer,
        layers=int(getattr(model.config, spec.count_key)),
        weights_mb=weights / _MB,
        dtype=model.dtype,
        device=torch.device(device),
        synchronize=torch.cuda.synchronize if device == "cuda" else _no_op,
        generate_kwargs=kwargs,
        per_token_weights_mb=_per_token_weight_bytes(model) / _MB,
    )


def _per_token_weight_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes a decoding step reads: all but embedding tables that are only gathered (not a tied head)."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    head_weight = getattr(head, "weight", None)
    gathered = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, torch.nn.Embedding) and module.weight is not head_weight
    }
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in gathered)


def _load_ort(name: str, device: str, threads: int | None) -> _Runner:
    """Our ONNX Runtime loop (``ort_generate``) over the export: ``_measure`` times it on its own path."""
    folder = _onnx_folder(name)
    config = AutoConfig.from_pretrained(folder)
    spec = spec_for_config(config)
    tokenizer_folder = folder if (folder / "tokenizer_config.json").is_file() else folder.parent
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    model = OrtCausalLM.load(folder, device, threads)
    graph = find_model_file(folder)
    onnx_files = [graph, *folder.glob(graph.name + "_data")]
    return _Runner(
        name=name,
        model=model,
        tokenizer=tokenizer,
        layers=int(getattr(config, spec.count_key)),
        weights_mb=sum(file.stat().st_size for file in onnx_files) / _MB,
        dtype=torch.float16 if model.cache_dtype == np.float16 else torch.float32,
        device=torch.device(device),
        synchronize=_no_op,  # ONNX Runtime's run() returns when its outputs are ready
        generate_kwargs={},
        per_token_weights_mb=per_token_weight_bytes(graph) / _MB,
    )


def _onnx_folder(name: str) -> Path:
    """The export folder: ``name`` itself when it holds ``*.onnx``, else its ``onnx/`` subfolder."""
    path = Path(name).expanduser()
    if not path.is_dir():
        raise UnknownModelError(
            name, "the onnxruntime backend needs a local folder holding an ONNX export (`swm-hub export DIR`)"
        )
    for folder in (path, path / ONNX_FOLDER):
        if any((folder / file).is_file() for file in MODEL_FILE_NAMES.values()):
            return folder.absolute()
    raise UnknownModelError(
        name,
        f"{path} holds no {' or '.join(MODEL_FILE_NAMES.values())} and no {ONNX_FOLDER}/ subfolder with one: "
        f"run `swm-hub export {path}`",
    )


def _load_genai(name: str, threads: int | None) -> _Runner:
    """onnxruntime-genai's generator behind the runner interface: its model answers ``__call__``/``generate``."""
    folder = genai_folder(name)
    model = GenaiModel(folder, threads)
    tokenizer_folder = folder if (folder / "tokenizer_config.json").is_file() else folder.parent
    return _Runner(
        name=name,
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(tokenizer_folder),
        layers=model.layers,
        weights_mb=model.weights_mb,
        dtype=model.dtype,
        device=torch.device("cpu"),
        synchronize=_no_op,  # the generator's calls return when their outputs are ready
        generate_kwargs={},
    )


def _no_op() -> None:
    return None


# --- one run -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sample:
    prefill_s: float
    end_to_end_s: float
    end_to_end_cpu_s: float
    working_mb: float


def _measure(runner: _Runner, prompt: torch.Tensor, new_tokens: int, probe: _MemoryProbe) -> _Sample:
    """One prefill, then one full generation, both timed; memory is watched over both."""
    probe.start()
    timed = _time_ort if isinstance(runner.model, OrtCausalLM) else _time_generate
    prefill, end_to_end, cpu, produced = timed(runner, prompt, new_tokens)
    working = probe.stop()
    if produced != new_tokens:
        raise RuntimeError(f"{runner.name} generated {produced} tokens instead of {new_tokens}")
    return _Sample(prefill_s=prefill, end_to_end_s=end_to_end, end_to_end_cpu_s=cpu, working_mb=working)


def _time_ort(runner: _Runner, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, float, int]:
    """Prefill (to the first token) and a greedy generation with our loop: seconds, CPU seconds, tokens."""
    model: OrtCausalLM = runner.model
    input_ids = prompt.numpy()
    attention_mask = np.ones_like(input_ids)
    started = time.perf_counter()
    model.prefill(input_ids, attention_mask).greedy_tokens()
    prefill = time.perf_counter() - started

    cpu_started = time.process_time()
    started = time.perf_counter()
    generated = model.generate(input_ids, attention_mask, new_tokens)
    end_to_end = time.perf_counter() - started
    return prefill, end_to_end, time.process_time() - cpu_started, int(generated.shape[-1])


@torch.no_grad()
def _time_generate(runner: _Runner, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, float, int]:
    """Prefill and ``generate`` of a model with the transformers interface: seconds, CPU seconds, tokens."""
    input_ids = prompt.to(runner.device)
    attention_mask = torch.ones_like(input_ids)
    config = _generation_config(runner, new_tokens)

    runner.synchronize()
    started = time.perf_counter()
    outputs = runner.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    outputs.logits[:, -1].argmax(dim=-1)
    runner.synchronize()
    prefill = time.perf_counter() - started
    del outputs

    runner.synchronize()
    cpu_started = time.process_time()
    started = time.perf_counter()
    generated = runner.model.generate(
        input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **runner.generate_kwargs
    )
    runner.synchronize()
    end_to_end = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    return prefill, end_to_end, cpu, int(generated.shape[-1]) - int(input_ids.shape[-1])


def _generation_config(runner: _Runner, new_tokens: int) -> GenerationConfig:
    """Greedy, exactly ``new_tokens`` new tokens, and none of the model's own sampling or penalty defaults.

    Only the special token ids come from the model's generation config (or its tokenizer), so that both
    models of a comparison do the same work per step.
    """
    defaults = getattr(runner.model, "generation_config", None)
    tokenizer = runner.tokenizer
    special = {
        name: getattr(defaults, name, None)
        if getattr(defaults, name, None) is not None
        else getattr(tokenizer, name)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    if special["pad_token_id"] is None:
        eos = special["eos_token_id"]
        special["pad_token_id"] = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    config: GenerationConfig = GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **special
    )
    return config


def _summarize(runner: _Runner, samples: Sequence[_Sample], new_tokens: int) -> ModelBench:
    prefill = [sample.prefill_s * 1e3 for sample in samples]
    end_to_end = [sample.end_to_end_s * 1e3 for sample in samples]
    decode = [(total - first) / (new_tokens - 1) for total, first in zip(end_to_end, prefill, strict=True)]
    return ModelBench(
        name=runner.name,
        layers=runner.layers,
        weights_mb=runner.weights_mb,
        per_token_weights_mb=runner.per_token_weights_mb,
        prefill_ms=Stat.of(prefill),
        decode_ms_per_token=Stat.of(decode),
        end_to_end_ms=Stat.of(end_to_end),
        tokens_per_s=Stat.of([new_tokens / (total / 1e3) for total in end_to_end]),
        peak_memory_mb=Stat.of([runner.weights_mb + sample.working_mb for sample in samples]),
        end_to_end_cpu_ms=Stat.of([sample.end_to_end_cpu_s * 1e3 for sample in samples]),
        runs_end_to_end_ms=tuple(end_to_end),
    )


# --- memory ------------------------------------------------------------------------------------------------


class _MemoryProbe:
    """Working memory of one run, in MB, above what was in use when it started."""

    method: str = "none"

    def start(self) -> None:
        return None

    def stop(self) -> float:
        return 0.0


class _CudaProbe(_MemoryProbe):
    """torch's CUDA allocator: exact for tensors, blind to other libraries' allocations."""

    method = "cuda_max_memory_allocated"

    def __init__(self) -> None:
        self._before = 0

    def start(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._before = torch.cuda.memory_allocated()

    def stop(self) -> float:
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - self._before) / _MB


class _CudaDeviceProbe(_MemoryProbe):
    """Device-wide memory in use (ONNX Runtime's CUDA arena is invisible to torch's allocator).

    ONNX Runtime's arena keeps what it grew to, so the growth after a run approximates the run's peak; it
    also counts any other process on the GPU.
    """

    method = "cuda_mem_get_info"

    def __init__(self) -> None:
        self._before = 0

    def start(self) -> None:
        free, total = torch.cuda.mem_get_info()
        self._before = total - free

    def stop(self) -> float:
        free, total = torch.cuda.mem_get_info()
        return max(0, total - free - self._before) / _MB


class _RssProbe(_MemoryProbe):
    """The process's peak resident set (Linux ``VmHWM``), reset before each run through ``clear_refs``."""

    method = "linux_vmhwm"

    def __init__(self) -> None:
        self._before = 0.0

    def start(self) -> None:
        gc.collect()
        _CLEAR_REFS.write_text("5")
        self._before = _status_mb("VmRSS")

    def stop(self) -> float:
        return max(0.0, _status_mb("VmHWM") - self._before)


class _MaxRssProbe(_MemoryProbe):
    """``ru_maxrss``: a peak over the whole process life, so a run below an earlier peak shows zero."""

    method = "ru_maxrss"

    def __init__(self) -> None:
        self._before = 0.0

    def start(self) -> None:
        self._before = _maxrss_mb()

    def stop(self) -> float:
        return max(0.0, _maxrss_mb() - self._before)


def _memory_probe(backend: str, device: str) -> _MemoryProbe:
    if device == "cuda":
        return _CudaProbe() if backend == "torch" else _CudaDeviceProbe()
    try:
        _CLEAR_REFS.write_text("5")
        _status_mb("VmHWM")
    except (OSError, KeyError):
        return _MaxRssProbe()
    return _RssProbe()


def _status_mb(key: str) -> float:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(key)


def _maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB on Linux


# --- settings and environment ----------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    names = {value: key for key, value in DTYPES.items()}
    return names.get(dtype, str(dtype).removeprefix("torch."))


def _loadavg() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def _environment(
    backend: str, device: str, load_before: list[float] | None, threads: int | None
) -> dict[str, Any]:
    """Versions and machine facts that decide whether two reports can be compared."""
    environment: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "threads_requested": threads,
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
    }
    if backend == "onnxruntime":
        import onnxruntime

        environment["onnxruntime"] = onnxruntime.__version__
    if backend == "genai":
        environment["onnxruntime_genai"] = require_genai().__version__
    if device == "cuda":
        environment["gpu"] = torch.cuda.get_device_name()
        environment["cuda"] = torch.version.cuda
    return environment
