"""Export a model folder with onnxruntime-genai's model builder, and prove the export by generating with it.

onnxruntime-genai is what LLMs are deployed with on CPUs: its model builder writes one ``model.onnx`` (fused
attention and rotary embedding, and with int4 4-bit ``MatMulNBits`` weights) plus the ``genai_config.json``
its generator reads. The builder runs in this process on the local model folder, with a cache folder of its
own beside the target, so it reads nothing but that folder and never reaches the Hub. Before it runs, the
model is checked against what the builder (onnxruntime-genai 0.18, under transformers 5) is known to refuse
or to build wrongly, so that such a model costs one line instead of a traceback or a quietly wrong export.

The export is validated by greedy generation in onnxruntime-genai itself: a fixed prompt, a few new tokens,
and the logits of every step compared with torch's on the same tokens (torch reads the prompt plus the tokens
onnxruntime-genai chose, so every step is compared on the same prefix). fp32 must match within the
registry's tolerance; int4 weights move the logits by design, so an int4 export must produce every token,
and how often torch would have chosen the same token is reported, not enforced. The export goes through
``checkpoint.output_folder``: it only replaces the target once it has passed. Running the export
(``GenaiModel``) is ``swm_hub.runtime.genai``'s, shared with the benchmark; this module only builds it.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import logging
import math
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from swm_hub.core.architectures import ARCHITECTURES, ArchitectureSpec
from swm_hub.core.errors import (
    CorruptWeightsError,
    ExportMismatchError,
    GenaiExportUnsupportedError,
    UnknownModelError,
)
from swm_hub.core.files import CONFIG_FILE
from swm_hub.core.options import DEFAULT_PRECISION, GENAI_PRECISIONS, dtype_name
from swm_hub.core.options.export import GENAI_DEVICE, check_genai_options
from swm_hub.runtime.checkpoint import output_folder
from swm_hub.runtime.genai import GENAI_SUBFOLDER, GenaiModel, require_genai
from swm_hub.runtime.loading import pull, resolve_source
from swm_hub.stages.export.validate import VALIDATION_PROMPT, json_record

__all__ = [
    "GenaiExportResult",
    "GenerationCheck",
    "check_genai_support",
    "export_genai",
    "genai_exportable_model_types",
    "validate_genai",
]

logger = logging.getLogger(__name__)

# The model builder's own names for the precisions.
_BUILDER_PRECISIONS: Mapping[str, str] = {"int4": "int4", "float32": "fp32"}
VALIDATION_NEW_TOKENS: int = 8
# The input is a local folder: no token lookup, so nothing the builder does can authenticate to the Hub.
_BUILDER_OPTIONS: tuple[str, ...] = ("hf_token=false",)
_BUILDER_MODULE: str = "onnxruntime_genai.models.builder"
# onnxruntime's quantizer logs one INFO line per node; it is imported by the builder.
_NOISY_LOGGER: str = "onnxruntime.quantization"
# onnxruntime's GroupQueryAttention kernel, which every builder graph uses on CPU.
_HEAD_SIZE_MULTIPLE: int = 16

_BUILDER_REFUSES: Mapping[str, str] = {
    "gpt2": "the model builder has no GPT-2 architecture",
    "gpt_neox": "the model builder has no GPT-NeoX architecture",
    "gemma3_text": (
        "the model builder reads rope_parameters as one dict, and transformers 5 writes Gemma 3's as one "
        "dict per layer type"
    ),
}
"""Registry types the builder cannot build, with the reason (checked on tiny models, onnxruntime-genai 0.18)."""

_LONG_CONTEXT_MEANS_LONGROPE: frozenset[str] = frozenset({"phi3"})
"""Types whose builder class takes the LongRoPE path whenever the context is longer than the original one."""


@dataclass(frozen=True)
class GenerationCheck:
    """Greedy generation in onnxruntime-genai beside torch, on the same prompt and the same tokens.

    Attributes:
        precision: ``int4`` or ``float32``.
        prompt_tokens: the prompt's length in tokens.
        genai_tokens: the tokens onnxruntime-genai generated greedily, in order.
        torch_tokens: torch's greedy choice at each step, given the tokens onnxruntime-genai chose before it.
        step_diffs: the largest absolute logit difference at each step (``inf`` for another vocabulary size,
            ``nan`` when either side holds NaN).
        atol: the tolerance the differences were held to; None for int4, where they are only reported.
    """

    precision: str
    prompt_tokens: int
    genai_tokens: tuple[int, ...]
    torch_tokens: tuple[int, ...]
    step_diffs: tuple[float, ...]
    atol: float | None

    @property
    def max_abs_diff(self) -> float:
        """The largest logit difference over all steps (NaN wins, so that it cannot hide)."""
        if any(math.isnan(diff) for diff in self.step_diffs):
            return math.nan
        return max(self.step_diffs, default=0.0)

    @property
    def agreement(self) -> int:
        """At how many steps torch would have chosen the token onnxruntime-genai chose."""
        return sum(ours == theirs for ours, theirs in zip(self.genai_tokens, self.torch_tokens, strict=True))

    @property
    def passed(self) -> bool:
        """Within ``atol`` at every step (fp32); every token generated (int4)."""
        if self.atol is None:
            return len(self.genai_tokens) == len(self.torch_tokens)
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.atol

    def line(self) -> str:
        """A ``✓``/``✗`` line for logs and the CLI."""
        steps = len(self.genai_tokens)
        agree = f"torch agrees on {self.agreement}/{steps} tokens"
        if self.atol is None:
            return (
                f"✓ generated {steps} tokens after a {self.prompt_tokens}-token prompt; {agree}; "
                f"max logit diff {self.max_abs_diff:.2e} (4-bit weights: reported, not checked)"
            )
        mark, relation = ("✓", "<=") if self.passed else ("✗", ">")
        return (
            f"{mark} logits over {steps} greedy steps: max abs diff {self.max_abs_diff:.2e} {relation} "
            f"atol {self.atol:.0e}; {agree}"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record."""
        return json_record(self, max_abs_diff=self.max_abs_diff, agreement=self.agreement, passed=self.passed)


@dataclass(frozen=True)
class GenaiExportResult:
    """What ``export_genai`` wrote and how its generation compared with torch.

    Attributes:
        model_dir: the model folder that was exported.
        path: the export folder (``model.onnx``, its weights, ``genai_config.json``, the tokenizer files):
            what ``onnxruntime_genai.Model`` and ``swm-hub bench --backend genai`` read.
        model_type: the config's ``model_type``.
        layers: the number of decoder layers.
        precision: ``int4`` or ``float32``.
        files: file names in ``path``, sorted.
        size_mb: the folder's total size in MB.
        check: the validation by generation.
        seconds: wall time of build plus validation.
    """

    model_dir: Path
    path: Path
    model_type: str
    layers: int
    precision: str
    files: tuple[str, ...]
    size_mb: float
    check: GenerationCheck
    seconds: float

    def lines(self) -> list[str]:
        """The check, then where the export went."""
        return [
            self.check.line(),
            f"wrote {self.path} (onnxruntime-genai, {self.precision}, {self.size_mb:.1f} MB, "
            f"{self.seconds:.1f} s)",
        ]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (paths as strings)."""
        return json_record(self)


def export_genai(
    model_dir: Path | str,
    out: Path | None = None,
    precision: str = DEFAULT_PRECISION,
    device: str = "cpu",
    overwrite: bool = False,
    atol: float | None = None,
    new_tokens: int = VALIDATION_NEW_TOKENS,
) -> GenaiExportResult:
    """Build the local model folder ``model_dir`` for onnxruntime-genai, validated by generating with it.

    Args:
        model_dir: a local model folder (config.json, safetensors, tokenizer).
        out: the folder to create (default ``model_dir/genai``); refused when it holds files, unless
            ``overwrite``.
        precision: ``int4`` (4-bit weights, what is deployed on CPUs) or ``float32`` (``fp32`` also accepted).
        device: ``cpu``, the only target built here.
        overwrite: replace a non-empty ``out`` (only once the new export has passed validation).
        atol: fp32 tolerance on the logits; default: the registry's ``onnx_atol``.
        new_tokens: tokens generated by the validation.

    Raises:
        GenaiExportUnsupportedError: a model type or shape the builder cannot build (checked before it
            runs), a refusal by the builder itself, or an export onnxruntime-genai cannot run.
        ExportMismatchError: fp32 logits further from torch's than ``atol``.
        MissingDependencyError: onnxruntime-genai is not installed.
        InvalidOptionError: an unknown precision, or a device other than cpu.
        UnknownModelError: ``model_dir`` is not a local model folder.
        OutputExistsError: ``out`` holds files and ``overwrite`` is False.
    """
    started = time.perf_counter()
    precision = check_genai_options(precision, device)
    require_genai()
    folder = _model_folder(model_dir)
    config = _load_config(folder)
    spec = check_genai_support(config)
    target = Path(out) if out is not None else folder / GENAI_SUBFOLDER
    with output_folder(target, overwrite) as temp:
        _build(folder, temp, precision, config.model_type)
        check = validate_genai(folder, temp, precision, spec.onnx_atol if atol is None else atol, new_tokens)
    result = GenaiExportResult(
        model_dir=folder,
        path=target.absolute(),
        model_type=config.model_type,
        layers=int(getattr(config, spec.count_key)),
        precision=precision,
        files=tuple(sorted(file.name for file in target.iterdir())),
        size_mb=sum(file.stat().st_size for file in target.rglob("*") if file.is_file()) / 2**20,
        check=check,
        seconds=time.perf_counter() - started,
    )
    logger.info("exported %s to %s (%s, %.1f MB)", folder.name, result.path, precision, result.size_mb)
    return result


def genai_exportable_model_types() -> tuple[str, ...]:
    """The registry's model types the builder can build (shapes permitting), sorted."""
    return tuple(sorted(name for name in ARCHITECTURES if name not in _BUILDER_REFUSES))


def check_genai_support(config: PretrainedConfig) -> ArchitectureSpec:
    """The registry entry of a model the builder can build, or one error that says why not.

    ``config`` is read the way the builder reads it (``AutoConfig``), so that defaults transformers fills in
    (``layer_types``, a ``sliding_window`` cleared by ``use_sliding_window=False``) count as they will there.
    """
    model_type = str(getattr(config, "model_type", None))
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        reason: str | None = "swm-hub has no registry entry for it"
    else:
        reason = _BUILDER_REFUSES.get(model_type) or _shape_problem(config)
    if spec is None or reason is not None:
        raise GenaiExportUnsupportedError(model_type, str(reason), genai_exportable_model_types())
    return spec


# --- what the builder cannot do ----------------------------------------------------------------------------


def _shape_problem(config: PretrainedConfig) -> str | None:
    """The first reason a supported type's shape cannot be built correctly, if any."""
    problems = (_head_size_problem(config), _sliding_window_problem(config), _long_context_problem(config))
    return next((problem for problem in problems if problem is not None), None)


def _head_size_problem(config: PretrainedConfig) -> str | None:
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_size % _HEAD_SIZE_MULTIPLE == 0:
        return None
    return (
        f"its attention head size is {head_size}, and onnxruntime's GroupQueryAttention kernel needs a "
        f"multiple of {_HEAD_SIZE_MULTIPLE}"
    )


def _sliding_window_problem(config: PretrainedConfig) -> str | None:
    """A sliding window the builder would drop: without ``layer_types`` it gives every layer full attention."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "layer_types", None) is not None:
        return None
    if window >= getattr(config, "max_position_embeddings", math.inf):
        return None
    return (
        f"its config has sliding_window={window} but no layer_types, so the builder gives every layer full "
        f"attention, which differs from torch past {window} tokens (a config with sliding_window null builds)"
    )


def _long_context_problem(config: PretrainedConfig) -> str | None:
    """A context longer than the original one without the LongRoPE factors the builder then reads."""
    if config.model_type not in _LONG_CONTEXT_MEANS_LONGROPE:
        return None
    context = getattr(config, "max_position_embeddings", None)
    original = getattr(config, "original_max_position_embeddings", None)
    rope = getattr(config, "rope_parameters", None) or {}
    if original is None or context == original or rope.get("rope_type") == "longrope":
        return None
    return (
        f"max_position_embeddings {context} differs from original_max_position_embeddings {original}, "
        f"which the builder reads as LongRoPE, but its rope_type is {rope.get('rope_type')!r} (make the two "
        "equal, or give longrope factors)"
    )


# --- building ----------------------------------------------------------------------------------------------


def _model_folder(model_dir: Path | str) -> Path:
    """A checked local model folder; anything else would make the builder look on the Hub."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise UnknownModelError(
            str(model_dir),
            "the genai export reads a local model folder (config.json, safetensors, tokenizer): pull or "
            "compress the model into one first",
        )
    return resolve_source(str(path)).path


def _load_config(folder: Path) -> PretrainedConfig:
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptWeightsError(folder / CONFIG_FILE, f"transformers rejects it ({exc})") from exc
    return config


def _build(folder: Path, output: Path, precision: str, model_type: str) -> None:
    """Run the model builder into ``output``; whatever it raises is its refusal of this model."""
    builder = _builder_module()
    with tempfile.TemporaryDirectory(
        prefix=f".{output.name}.cache-", dir=output.parent, ignore_cleanup_errors=True
    ) as cache:
        arguments = (
            None,
            str(folder),
            str(output),
            _BUILDER_PRECISIONS[precision],
            GENAI_DEVICE,
            cache,
        )
        with _builder_output_to_debug_log():
            try:
                options = builder.parse_extra_options(*arguments, list(_BUILDER_OPTIONS))
                builder.create_model(*arguments, **options)
            except Exception as exc:  # its refusals are NotImplementedError, ValueError, KeyError, ...
                raise GenaiExportUnsupportedError(
                    model_type,
                    f"the model builder stopped: {_first_line(exc)}",
                    genai_exportable_model_types(),
                ) from exc


def _builder_module() -> Any:
    """The builder, imported without the root logging setup that onnxruntime's quantizer does on import."""
    require_genai()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return importlib.import_module(_BUILDER_MODULE)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@contextlib.contextmanager
def _builder_output_to_debug_log() -> Iterator[None]:
    """Keep the builder's prints, progress bars and per-node INFO logs out of the user's terminal."""
    noisy = logging.getLogger(_NOISY_LOGGER)
    previous = noisy.level
    noisy.setLevel(logging.WARNING)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield
    finally:
        noisy.setLevel(previous)
        logger.debug("model builder output:\n%s", captured.getvalue())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# --- validation --------------------------------------------------------------------------------------------


def validate_genai(
    model_dir: Path,
    genai_dir: Path,
    precision: str,
    atol: float | None = None,
    new_tokens: int = VALIDATION_NEW_TOKENS,
    prompt: str = VALIDATION_PROMPT,
) -> GenerationCheck:
    """Generate greedily with the export in ``genai_dir`` and compare every step with torch.

    ``atol`` applies to fp32 only (default: the registry's ``onnx_atol``); int4 is held to producing all
    ``new_tokens`` tokens.

    Raises:
        ExportMismatchError: fp32 logits further from torch's than ``atol`` at some step.
        GenaiExportUnsupportedError: onnxruntime-genai cannot run the export, or stops short.
    """
    precision = dtype_name(precision, flag="--precision", allowed=GENAI_PRECISIONS)
    tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [int(token) for token in tokenizer(prompt)["input_ids"]]
    model_type = str(_load_config(Path(model_dir)).model_type)
    # One model in memory at a time: genai's is gone when _generate returns.
    tokens, genai_logits, eos = _generate(genai_dir, prompt_ids, new_tokens, model_type)
    loaded = pull(str(model_dir))
    reference = _torch_step_logits(loaded.model, prompt_ids, tokens)
    del loaded
    gc.collect()
    check = GenerationCheck(
        precision=precision,
        prompt_tokens=len(prompt_ids),
        genai_tokens=tuple(tokens),
        torch_tokens=_greedy_choices(reference, eos),
        step_diffs=tuple(
            _step_diff(expected, actual) for expected, actual in zip(reference, genai_logits, strict=True)
        ),
        atol=None if precision == "int4" else (atol if atol is not None else _registry_atol(model_dir)),
    )
    (logger.info if check.passed else logger.error)("%s", check.line())
    if not check.passed:
        diffs = {f"logits.step{index}": diff for index, diff in enumerate(check.step_diffs)}
        raise ExportMismatchError(genai_dir, diffs, float(check.atol or 0.0))
    return check


def _generate(
    genai_dir: Path, prompt: list[int], new_tokens: int, model_type: str
) -> tuple[list[int], list[np.ndarray], tuple[int, ...]]:
    """onnxruntime-genai's greedy tokens, their step logits, and its end-of-sequence ids."""
    try:
        model = GenaiModel(genai_dir)
        tokens, logits = model.greedy(prompt, new_tokens, keep_logits=True)
    except (RuntimeError, CorruptWeightsError) as exc:
        raise GenaiExportUnsupportedError(
            model_type,
            f"onnxruntime-genai cannot run the export: {_first_line(exc)}",
            genai_exportable_model_types(),
        ) from exc
    if len(tokens) != new_tokens:
        raise GenaiExportUnsupportedError(
            model_type,
            f"onnxruntime-genai generated {len(tokens)} of {new_tokens} tokens",
            genai_exportable_model_types(),
        )
    return tokens, logits, model.eos_token_ids


@torch.no_grad()
def _torch_step_logits(model: Any, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Torch's logits at each generation step, in one forward over the prompt and the chosen tokens."""
    ids = torch.tensor([prompt + tokens[:-1]], dtype=torch.long)
    logits: torch.Tensor = model(input_ids=ids).logits[0, len(prompt) - 1 :].float()
    return logits


def _greedy_choices(logits: torch.Tensor, suppressed: Sequence[int]) -> tuple[int, ...]:
    """Torch's argmax at each step, without the end-of-sequence ids genai suppressed while choosing."""
    allowed = logits.clone()
    allowed[:, list(suppressed)] = -math.inf
    return tuple(int(token) for token in allowed.argmax(dim=-1).tolist())


def _step_diff(expected: torch.Tensor, actual: np.ndarray) -> float:
    if tuple(expected.shape) != actual.shape:
        return math.inf
    diff = (expected - torch.from_numpy(actual).float()).abs()
    if bool(torch.isnan(diff).any()):
        return math.nan
    return float(diff.max()) if diff.numel() else 0.0


def _registry_atol(model_dir: Path) -> float:
    return check_genai_support(_load_config(Path(model_dir))).onnx_atol
