"""Writing a merged model folder without ever losing what was there before.

The merged model is never built by slicing a live ``nn.ModuleList`` (each layer would keep a stale
``layer_idx`` for its cache): the merged state dict is renamed to consecutive layer numbers, loaded into a
fresh model built from the rewritten config, written into a temporary folder beside the target, moved into
place with ``os.replace``, and reloaded from disk as a check.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import PrefixChange, WeightRenaming, apply_renamings

from swm_hub.core.architectures import spec_for_config
from swm_hub.core.atomic import (
    mark,
    output_lock,
    pause_point,
    recover_interrupted,
    refuse_existing_output,
    refuse_unsafe_target,
    swap_in,
    write_errors_reported,
)
from swm_hub.core.config_rewrite import check_kept
from swm_hub.core.errors import CorruptWeightsError, OutputExistsError, PlanMismatchError
from swm_hub.core.model import decoder_layers
from swm_hub.core.shards import CheckpointReader, StreamingShardWriter, TensorSpec

__all__ = [
    "build_model",
    "build_skeleton",
    "check_layer_count",
    "output_folder",
    "save_model_folder",
    "save_streamed_folder",
    "state_dict_for",
    "stored_tensor_names",
    "untied_state_keys",
    "verify_folder_headers",
    "verify_folder_loads",
]

_NO_EXTRA_FILES: Mapping[str, str | bytes] = MappingProxyType({})
MAX_SHARD_BYTES: int = 2 * 10**9
"""Shards of 2 GB, as ``save_pretrained``'s ``max_shard_size="2GB"`` makes them."""
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)


@contextmanager
def output_folder(target: Path, overwrite: bool, protected: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield an empty, marked temporary folder that becomes ``target`` only if the block finishes.

    Refusals happen before any work, so a user does not wait for a merge that cannot be saved: a target
    that is or holds one of the ``protected`` inputs (or the working directory), a target holding files
    without ``overwrite``, one that swm-hub did not write, or one another run has locked. The lock is held
    for the whole block; under it, what killed runs left is recovered first. The temporary folder sits
    beside the target so that the final move is a same-filesystem rename (one exchange for a non-empty
    target): the target is either the old folder or the complete new one, never a half-written mix.
    """
    target = Path(target).absolute()
    refuse_unsafe_target(target, protected)
    refuse_existing_output(target, overwrite)
    with write_errors_reported(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(target):
            recover_interrupted(target)
            refuse_existing_output(target, overwrite)
            temp = _make_sibling(target, "tmp")
            try:
                mark(temp)
                yield temp
                pause_point("before-move")
                _move_into_place(temp, target, overwrite)
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise


def _make_sibling(target: Path, role: str) -> Path:
    """Create a fresh hidden folder beside ``target``; ``mkdir`` (not ``mkdtemp``) so the umask applies."""
    while True:
        candidate = target.parent / f".{target.name}.{role}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate


def _move_into_place(temp: Path, target: Path, overwrite: bool) -> None:
    """Rename ``temp`` to ``target``, checking the target again since it may have changed meanwhile."""
    refuse_existing_output(target, overwrite)
    if target.is_dir() and any(target.iterdir()):
        swap_in(temp, target, target.parent / f".{target.name}.old-{secrets.token_hex(4)}")
    else:
        _replace_empty(temp, target)


def _replace_empty(temp: Path, target: Path) -> None:
    """Rename onto a missing or empty target; files that appeared meanwhile are refused, not replaced."""
    try:
        os.replace(temp, target)
    except OSError as error:
        if target.exists() and any(target.iterdir()):
            raise OutputExistsError(target) from error
        raise


def state_dict_for(
    kept: Sequence[int], state_dict: Mapping[str, torch.Tensor], layers_path: str
) -> dict[str, torch.Tensor]:
    """Renumber the kept layers' tensors to consecutive positions and drop the merged-away layers.

    Tensors outside the layers (embeddings, final norm, head) pass through untouched, and no tensor is
    copied: the result shares storage with the input.
    """
    prefix = f"{layers_path}."
    by_layer = _split_layer_keys(state_dict, prefix)
    if not by_layer:
        raise PlanMismatchError(f"the state dict holds no tensor under {prefix!r}")
    check_kept(kept, max(by_layer) + 1)
    missing = sorted(set(kept) - set(by_layer))
    if missing:
        raise PlanMismatchError(f"the state dict holds no tensor for kept layers {missing}")
    renamed = {key: tensor for key, tensor in state_dict.items() if not key.startswith(prefix)}
    for position, index in enumerate(kept):
        for rest in by_layer[index]:
            renamed[f"{prefix}{position}.{rest}"] = state_dict[f"{prefix}{index}.{rest}"]
    return renamed


def _split_layer_keys(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[int, list[str]]:
    """Map each layer number to the key suffixes found under it."""
    by_layer: dict[int, list[str]] = {}
    for key in state_dict:
        if not key.startswith(prefix):
            continue
        number, _, rest = key[len(prefix) :].partition(".")
        if not number.isdigit() or not rest:
            raise PlanMismatchError(f"state dict key {key!r} is under {prefix!r} but names no layer number")
        by_layer.setdefault(int(number), []).append(rest)
    return by_layer


def build_skeleton(config_dict: dict[str, Any], dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The ``*ForCausalLM`` of ``config_dict`` with its parameters on the meta device, tied as a load ties them.

    It costs no memory and names every tensor with its shape and dtype. Buffers are created for real,
    because the non-persistent ones (rotary ``inv_freq``, GPT-2's causal mask, Gemma's ``embed_scale``) are
    in no state dict and must be computed from the config.
    """
    config = AutoConfig.for_model(**config_dict)
    with init_empty_weights(include_buffers=False):
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    model.tie_weights()
    return model


@dataclass(frozen=True)
class StoredTensorNames:
    """How transformers 5 renames tensors between a checkpoint and the model, in both directions.

    ``from_pretrained`` renames some stored tensors on load (GPT-NeoX: ``embed_out.weight`` becomes
    ``lm_head.weight``) and ``save_pretrained`` renames them back. Layer-wise execution reads and writes the
    shards itself, so it applies the same renamings, taken from transformers, to stay interchangeable with
    a whole-model load and save.
    """

    loading: tuple[WeightRenaming, ...]
    saving: tuple[WeightRenaming, ...]

    def model_name(self, stored: str) -> str:
        """The state-dict key of a tensor stored as ``stored``."""
        return str(apply_renamings(stored, list(self.loading)))

    def stored_name(self, name: str) -> str:
        """The name ``save_pretrained`` stores the state-dict key ``name`` under."""
        return str(apply_renamings(name, list(self.saving)))


def stored_tensor_names(model: PreTrainedModel) -> StoredTensorNames:
    """The renamings of ``model``'s class; a checkpoint written before transformers 5 loads with them too."""
    loading = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    saving = [
        t.reverse_transform()
        for t in get_model_conversion_mapping(model, add_legacy=False)[::-1]
        if isinstance(t, WeightRenaming) and not isinstance(t, PrefixChange)
    ]
    return StoredTensorNames(tuple(loading), tuple(t for t in saving if isinstance(t, WeightRenaming)))


def build_model(config_dict: dict[str, Any], state_dict: Mapping[str, torch.Tensor]) -> PreTrainedModel:
    """Build the ``*ForCausalLM`` of ``config_dict`` around the given tensors, without allocating weights twice.

    The skeleton's parameters are replaced by the state dict's own tensors (``assign=True``).
    """
    model = build_skeleton(config_dict)
    result = model.load_state_dict(dict(state_dict), strict=False, assign=True)
    model.tie_weights()
    _check_loaded(model, result.unexpected_keys)
    model.train(False)
    return model


def _check_loaded(model: torch.nn.Module, unexpected_keys: Sequence[str]) -> None:
    """Refuse a model with tensors left on meta or tensors that fit nowhere.

    A key missing from the state dict is fine only when tying filled it (``lm_head`` sharing the
    embeddings); checking what is still on meta afterwards covers that without naming any architecture.
    """
    missing = sorted({name for name, tensor in _named_tensors(model) if tensor.is_meta})
    if missing or unexpected_keys:
        raise PlanMismatchError(
            f"the state dict does not fit the config: missing {missing}, unexpected {sorted(unexpected_keys)}"
        )


def _named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def save_model_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    folder: Path,
    max_shard_size: str = "2GB",
    extra_files: Mapping[str, str | bytes] = _NO_EXTRA_FILES,
) -> None:
    """Write everything a user needs to ``from_pretrained`` the model, plus swm-hub's own records.

    Meant for the temporary folder of ``output_folder``: it writes into ``folder`` without checking what is
    there. Extra files are plain names inside the folder so that a plan can never write elsewhere.
    """
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    _save_companions(folder, tokenizer, extra_files)


def save_streamed_folder(
    folder: Path,
    model: PreTrainedModel,
    specs: Sequence[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    tokenizer: PreTrainedTokenizerBase | None,
    extra_files: Mapping[str, str | bytes] = _NO_EXTRA_FILES,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """``save_model_folder`` for a model that is never whole in memory: tensors are written as they come.

    ``model`` supplies the config and generation config (a skeleton is enough: no weights are read from it);
    ``tensors`` must yield the names of ``specs`` in order, each tensor written to its shard at once.
    """
    folder = Path(folder)
    names = stored_tensor_names(model)
    stored = [TensorSpec(names.stored_name(spec.name), spec.shape, spec.dtype) for spec in specs]
    with StreamingShardWriter(folder, stored, max_shard_bytes) as writer:
        for name, tensor in tensors:
            writer.write(names.stored_name(name), tensor)
    model.config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    _save_companions(folder, tokenizer, extra_files)


def untied_state_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys without the second name of a tied tensor (``lm_head.weight`` sharing the embeddings).

    A checkpoint holds a tied tensor once and the loader ties it back, as ``save_pretrained`` does.
    """
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tied = every - {name for name, _ in model.named_parameters()}
    return [key for key in model.state_dict() if key not in tied]


def _save_companions(
    folder: Path, tokenizer: PreTrainedTokenizerBase | None, extra_files: Mapping[str, str | bytes]
) -> None:
    """The tokenizer and swm-hub's own records beside the weights."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for name, content in extra_files.items():
        _write_extra_file(folder, name, content)


def _write_extra_file(folder: Path, name: str, content: str | bytes) -> None:
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"extra file name {name!r} must be a plain file name inside the model folder")
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


def verify_folder_loads(folder: Path, expected_layers: int) -> None:
    """Reload the written folder the way a user would, so a broken save fails here rather than for them."""
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype="auto")
    except _LOAD_ERRORS as error:
        raise CorruptWeightsError(folder, f"it does not load: {error}") from error
    model, info = loaded
    problems = {kind: info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    _refuse_problems(folder, {kind: [str(key) for key in keys] for kind, keys in problems.items() if keys})
    check_layer_count(folder, model, expected_layers)


def verify_folder_headers(folder: Path, expected_layers: int) -> None:
    """Check a written folder without loading its weights: every tensor the config implies, of its shape.

    The layer-wise mode's check, since loading the whole model is what that mode avoids: the config is
    loaded and the model built on the meta device, and its tensor names and shapes are compared with the
    safetensors headers.
    """
    try:
        model = build_skeleton(AutoConfig.from_pretrained(folder).to_dict())
    except _LOAD_ERRORS as error:
        raise CorruptWeightsError(folder, f"its config does not load: {error}") from error
    _refuse_problems(folder, checkpoint_problems(CheckpointReader(folder), model))
    check_layer_count(folder, model, expected_layers)


def checkpoint_problems(reader: CheckpointReader, model: PreTrainedModel) -> dict[str, list[str]]:
    """The tensors the model needs that the shards lack, those it has no place for, and those of another shape.

    ``model`` may be a skeleton on the meta device: only names and shapes are compared, from the headers.
    Stored names are mapped as ``from_pretrained`` maps them (transformers' renamings, a missing
    ``base_model_prefix``), and the names the model class says to ignore on load are ignored here too.
    """
    state = model.state_dict()
    expected = {key: tuple(state[key].shape) for key in untied_state_keys(model)}
    names = stored_tensor_names(model)
    prefixed = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    found: dict[str, tuple[int, ...]] = {}
    for stored in reader.names:
        name = names.model_name(stored)
        if name not in expected and prefixed and f"{prefixed}{name}" in expected:
            name = f"{prefixed}{name}"
        found[name] = tuple(reader.spec(stored).shape)
    problems = {
        "missing": sorted(expected.keys() - found.keys()),
        "unexpected": sorted(found.keys() - expected.keys()),
        "mismatched": sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k]),
    }
    ignored = {
        "missing": getattr(model, "_keys_to_ignore_on_load_missing", None) or [],
        "unexpected": getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [],
        "mismatched": [],
    }
    return {
        kind: kept
        for kind, keys in problems.items()
        if (kept := [key for key in keys if not any(re.search(pattern, key) for pattern in ignored[kind])])
    }


def refuse_checkpoint_mismatch(folder: Path, reader: CheckpointReader, model: PreTrainedModel) -> None:
    """Refuse a checkpoint that does not fit its config, instead of loading random values for the gaps.

    ``from_pretrained`` initialises a missing tensor at random and drops an unexpected one, so a checkpoint
    missing a tensor, or a config whose layer count disagrees with it, would merge random layers.
    """
    problems = checkpoint_problems(reader, model)
    if not problems:
        return
    spec = spec_for_config(model.config)
    declared = getattr(model.config, spec.count_key)
    stored = _stored_layer_count(reader, model, spec.layers_path)
    if stored != declared:
        raise CorruptWeightsError(
            folder,
            f"config.json says {spec.count_key}={declared} but the checkpoint holds {stored} decoder layers: "
            "fix the config or download the model again",
        )
    raise CorruptWeightsError(
        folder, f"the checkpoint does not fit its config: {describe_problems(problems)}"
    )


def _stored_layer_count(reader: CheckpointReader, model: PreTrainedModel, layers_path: str) -> int:
    names = stored_tensor_names(model)
    numbers = set()
    for stored in reader.names:
        name = names.model_name(stored)
        for prefix in (f"{layers_path}.", f"{layers_path.partition('.')[2]}."):
            head, _, _ = name.removeprefix(prefix).partition(".")
            if name.startswith(prefix) and head.isdigit():
                numbers.add(int(head))
    return max(numbers) + 1 if numbers else 0


def describe_problems(problems: Mapping[str, Sequence[str]], shown: int = 3) -> str:
    """One line naming the first few tensors of each kind of problem, with a count of the rest."""
    parts = []
    for kind, keys in problems.items():
        more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
        parts.append(f"{kind} {', '.join(keys[:shown])}{more}")
    return "; ".join(parts)


def refuse_non_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: Path) -> None:
    """A NaN or infinity in an input weight poisons every score and merge after it: name the tensor now."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
            raise CorruptWeightsError(where, f"the tensor {name} holds NaN or infinite values")


def _refuse_problems(folder: Path, problems: Mapping[str, Sequence[str]]) -> None:
    if problems:
        raise CorruptWeightsError(folder, f"weights do not match the config: {describe_problems(problems)}")


def check_layer_count(folder: Path, model: PreTrainedModel, expected_layers: int) -> None:
    """Both the built layers and the config's count must be what the plan promised."""
    spec = spec_for_config(model.config)
    built = len(decoder_layers(model, spec))
    declared = getattr(model.config, spec.count_key)
    if built != expected_layers or declared != expected_layers:
        raise CorruptWeightsError(
            folder, f"it has {built} layers and its config says {declared}, expected {expected_layers}"
        )
