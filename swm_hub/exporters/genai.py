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
``checkpoint.output_folder``: it only replaces the target once it has passed.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
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

from swm_hub.architectures import ARCHITECTURES, ArchitectureSpec
from swm_hub.checkpoint import output_folder
from swm_hub.devices import dtype_name
from swm_hub.errors import (
    CorruptWeightsError,
    ExportMismatchError,
    GenaiExportUnsupportedError,
    InvalidOptionError,
    MissingDependencyError,
    UnknownModelError,
)
from swm_hub.exporters.validate import VALIDATION_PROMPT, json_record
from swm_hub.files import CONFIG_FILE
from swm_hub.pull import pull, resolve_source

__all__ = [
    "DEFAULT_PRECISION",
    "GENAI_CONFIG_FILE",
    "GENAI_PRECISIONS",
    "GENAI_SUBFOLDER",
    "GenaiExportResult",
    "GenaiModel",
    "GenaiOutput",
    "GenerationCheck",
    "check_genai_options",
    "check_genai_support",
    "export_genai",
    "genai_exportable_model_types",
    "genai_folder",
    "require_genai",
    "validate_genai",
]

logger = logging.getLogger(__name__)

GENAI_PRECISIONS: tuple[str, ...] = ("int4", "float32")
# The model builder's own names for them.
_BUILDER_PRECISIONS: Mapping[str, str] = {"int4": "int4", "float32": "fp32"}
DEFAULT_PRECISION: str = "int4"
GENAI_SUBFOLDER: str = "genai"
GENAI_CONFIG_FILE: str = "genai_config.json"
VALIDATION_NEW_TOKENS: int = 8
_EXECUTION_PROVIDER: str = "cpu"
# The input is a local folder: no token lookup, so nothing the builder does can authenticate to the Hub.
_BUILDER_OPTIONS: tuple[str, ...] = ("hf_token=false",)
_BUILDER_MODULE: str = "onnxruntime_genai.models.builder"
# onnxruntime's quantizer logs one INFO line per node; it is imported by the builder.
_NOISY_LOGGER: str = "onnxruntime.quantization"
_INSTALL: str = "pip install 'swm-hub[genai]'"
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

_PRECISION_DTYPES: Mapping[str, torch.dtype] = {
    "int4": torch.int4,  # type: ignore[attr-defined]  # in torch since 2.5, not in its stubs
    "int8": torch.int8,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_ONNX_FLOAT_NAMES: Mapping[int, str] = {1: "float32", 10: "float16", 16: "bfloat16"}


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


def check_genai_options(precision: str, device: str) -> str:
    """The precision's canonical name (``fp32`` is ``float32``); what the genai export cannot do is refused.

    Called before any work, so that a wrong precision or device costs nothing.
    """
    precision = dtype_name(precision, flag="--precision", allowed=GENAI_PRECISIONS)
    if device != _EXECUTION_PROVIDER:
        raise InvalidOptionError(
            f"the genai export is built for onnxruntime-genai's CPU provider, not {device!r}: use --device cpu"
        )
    return precision


def require_genai() -> Any:
    """The ``onnxruntime_genai`` module, or an error with the command that installs it."""
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime-genai", _INSTALL) from exc
    return onnxruntime_genai


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


def genai_folder(name: str | Path) -> Path:
    """The export folder: ``name`` itself when it holds ``genai_config.json``, else its ``genai/`` subfolder."""
    path = Path(name).expanduser()
    for folder in (path, path / GENAI_SUBFOLDER):
        if (folder / GENAI_CONFIG_FILE).is_file():
            return folder.absolute()
    raise UnknownModelError(
        str(name),
        f"{path} holds no {GENAI_CONFIG_FILE} and no {GENAI_SUBFOLDER}/ subfolder with one: run "
        f"`swm-hub export {path} --format genai`",
    )


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
            _EXECUTION_PROVIDER,
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


# --- running -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenaiOutput:
    """The prefill's result in the shape a transformers model returns: ``logits`` of ``[1, 1, vocab]``."""

    logits: torch.Tensor


class GenaiModel:
    """An onnxruntime-genai export, loaded, with its own greedy generation loop.

    Besides ``greedy`` it answers the two calls the benchmark makes of a transformers model (``__call__``
    for the prefill, ``generate`` for a whole generation), so that both are timed the same way. Batch 1,
    no padding: the attention mask is all ones and genai builds its own.
    """

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        genai = require_genai()
        self.folder = Path(folder)
        self.config = _read_genai_config(self.folder)
        try:
            settings = genai.Config(str(self.folder))
            if threads is not None:
                options = {"session_options": {"intra_op_num_threads": threads}}
                settings.overlay(json.dumps({"model": {"decoder": options}}))
            self._model = genai.Model(settings)
        except RuntimeError as exc:
            raise CorruptWeightsError(
                self.folder, f"onnxruntime-genai cannot load the export ({exc})"
            ) from exc
        self._genai = genai

    @property
    def layers(self) -> int:
        """Decoder layers, as the export's config declares them."""
        return int(self.config["model"]["decoder"]["num_hidden_layers"])

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids genai stops at (the config's and the tokenizer's end of sequence)."""
        eos = self.config["model"].get("eos_token_id", ())
        return tuple(int(token) for token in (eos if isinstance(eos, list) else [eos]))

    @property
    def weights_mb(self) -> float:
        """Size of the ONNX graph and its external weights on disk."""
        return sum(file.stat().st_size for file in self.folder.glob("*.onnx*") if file.is_file()) / 2**20

    @property
    def precision(self) -> str:
        """``int4``/``int8`` when the graph holds ``MatMulNBits`` weights, else its logits' float type."""
        import onnx

        graph = onnx.load(
            str(self.folder / self.config["model"]["decoder"]["filename"]), load_external_data=False
        )
        for node in graph.graph.node:
            if node.op_type == "MatMulNBits":
                bits = next(attribute.i for attribute in node.attribute if attribute.name == "bits")
                return f"int{bits}"
        logits = next(output for output in graph.graph.output if output.name == "logits")
        return _ONNX_FLOAT_NAMES.get(logits.type.tensor_type.elem_type, "unknown")

    @property
    def dtype(self) -> torch.dtype:
        """``precision`` as a torch dtype, for reports that name dtypes."""
        return _PRECISION_DTYPES.get(self.precision, torch.float32)

    def greedy(
        self,
        prompt: Sequence[int],
        new_tokens: int,
        min_new_tokens: int | None = None,
        keep_logits: bool = False,
    ) -> tuple[list[int], list[np.ndarray]]:
        """Generate greedily after ``prompt``: the new tokens, and with ``keep_logits`` each step's logits.

        End of sequence is suppressed until ``min_new_tokens`` (default ``new_tokens``) are out, as
        transformers' ``min_new_tokens`` does. The logits of a step are those the step chose its token from.
        """
        generator = self._generator(
            len(prompt), new_tokens, new_tokens if min_new_tokens is None else min_new_tokens
        )
        generator.append_tokens(list(prompt))
        tokens: list[int] = []
        logits: list[np.ndarray] = []
        while len(tokens) < new_tokens and not generator.is_done():
            if keep_logits:
                logits.append(np.array(generator.get_logits())[0, -1])
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens, logits

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, use_cache: bool = True
    ) -> GenaiOutput:
        """The prefill: the prompt in, the logits of its last position out."""
        generator = self._generator(int(input_ids.shape[-1]), 1, 0)
        generator.append_tokens(_one_sequence(input_ids))
        return GenaiOutput(logits=torch.from_numpy(np.array(generator.get_logits())))

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: Any = None,
    ) -> torch.Tensor:
        """Greedy generation of ``generation_config.max_new_tokens``: the prompt and the new tokens, ``[1, n]``."""
        new_tokens = int(generation_config.max_new_tokens)
        minimum = getattr(generation_config, "min_new_tokens", None)
        prompt = _one_sequence(input_ids)
        tokens, _ = self.greedy(prompt, new_tokens, minimum)
        return torch.tensor([prompt + tokens], dtype=torch.long)

    def _generator(self, prompt_tokens: int, new_tokens: int, min_new_tokens: int) -> Any:
        params = self._genai.GeneratorParams(self._model)
        params.set_search_options(
            do_sample=False,
            max_length=prompt_tokens + new_tokens,
            min_length=prompt_tokens + min_new_tokens,
        )
        return self._genai.Generator(self._model, params)


def _one_sequence(input_ids: torch.Tensor) -> list[int]:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"GenaiModel runs batch 1; got input_ids of shape {list(input_ids.shape)}")
    return [int(token) for token in input_ids[0].tolist()]


def _read_genai_config(folder: Path) -> dict[str, Any]:
    file = folder / GENAI_CONFIG_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        data["model"]["decoder"]["num_hidden_layers"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptWeightsError(file, f"not a readable onnxruntime-genai config ({exc!r})") from exc
    config: dict[str, Any] = data
    return config


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
