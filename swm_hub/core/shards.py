"""Safetensors checkpoints read and written one tensor at a time.

A model larger than memory can still be merged if no step ever holds more than a layer of it: the reader
parses only headers up front and reads the tensors a caller names, and the writer lays out every shard's
header from the planned shapes first, so each tensor's bytes go to disk the moment it arrives and can be
dropped. The files are the ones ``save_pretrained`` writes (``model.safetensors``, or numbered shards plus
``model.safetensors.index.json``), so ``from_pretrained`` and ``safetensors.safe_open`` read them as usual.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch
from safetensors import safe_open

from swm_hub.core.errors import CorruptWeightsError
from swm_hub.core.headers import REDOWNLOAD, read_entries

__all__ = [
    "CODE_DTYPES",
    "DTYPE_CODES",
    "INDEX_FILE",
    "SINGLE_FILE",
    "CheckpointReader",
    "StreamingShardWriter",
    "TensorSpec",
    "cast_floating",
    "plan_shards",
    "read_header",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# The safetensors dtype codes (the spec's names) for every torch dtype a checkpoint may hold.
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
CODE_DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}

_HEADER_ALIGN = 8


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, shape and dtype: all a shard header needs, known before any data is read."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes on disk, which is what shard sizes and header offsets are counted in."""
        return math.prod(self.shape) * self.dtype.itemsize


# --------------------------------------------------------------------------------------------- reading


class CheckpointReader:
    """Named tensors of a model folder's safetensors files, read on demand."""

    def __init__(
        self, folder: Path, strip_prefix: str = "", model_name: Callable[[str], str] | None = None
    ) -> None:
        """Find the weight files and parse their headers; no tensor data is read here.

        Args:
            folder: a model folder holding ``model.safetensors`` or a sharded checkpoint with its index.
            strip_prefix: the model's ``base_model_prefix``; a state-dict key missing from the checkpoint is
                looked up again without it, because some Hub checkpoints (GPT-2) store the base model's keys.
            model_name: the name the model gives a stored tensor, where transformers renames it on load
                (GPT-NeoX stores ``embed_out.weight`` for the model's ``lm_head.weight``); a state-dict key
                missing from the checkpoint is looked up under its stored name.

        Raises:
            CorruptWeightsError: no safetensors weights, or an index or header that cannot be parsed.
        """
        self.folder = Path(folder)
        self.strip_prefix = strip_prefix
        self._locations: dict[str, tuple[Path, TensorSpec]] = {}
        self._files, weight_map = _find_weights(self.folder)
        for path in self._files:
            for spec in read_header(path):
                self._locations[spec.name] = (path, spec)
        if weight_map is not None:
            _check_index_matches(self.folder, weight_map, self._locations)
        renamed = {stored: model_name(stored) for stored in self._locations} if model_name else {}
        self._stored_as = {name: stored for stored, name in renamed.items() if name != stored}

    @property
    def files(self) -> list[Path]:
        """The safetensors files of the checkpoint, in shard order."""
        return list(self._files)

    @property
    def names(self) -> list[str]:
        """Every tensor name the checkpoint stores, as stored (without any ``strip_prefix`` lookup)."""
        return list(self._locations)

    def has(self, name: str) -> bool:
        """Whether the state-dict key ``name`` can be read (directly or without ``strip_prefix``)."""
        return self._resolve(name) is not None

    def spec(self, name: str) -> TensorSpec:
        """Shape and dtype of ``name`` from its header, under the name the caller asked for."""
        _, spec = self._locate(name)
        return TensorSpec(name, spec.shape, spec.dtype)

    def read(
        self,
        names: Iterable[str],
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Read the named tensors, keyed by the names asked for, opening each shard once.

        Args:
            names: the model's state-dict keys.
            dtype: if given, floating tensors are cast to it; integer and bool buffers keep their dtype.
            device: where the tensors are placed; safetensors reads them straight onto it.

        Raises:
            CorruptWeightsError: a name the checkpoint does not hold.
        """
        wanted = list(dict.fromkeys(names))
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name in wanted:
            path, spec = self._locate(name)
            by_file.setdefault(path, []).append((name, spec.name))
        out: dict[str, torch.Tensor] = {}
        target = str(torch.device(device))
        for path, pairs in by_file.items():
            with safe_open(str(path), framework="pt", device=target) as handle:
                for name, stored in pairs:
                    out[name] = cast_floating(handle.get_tensor(stored), dtype)
        return {name: out[name] for name in wanted}

    def _resolve(self, name: str) -> tuple[Path, TensorSpec] | None:
        """The file and stored spec for a state-dict key: as named, by its stored name, or without the prefix."""
        found = self._locations.get(self._stored_as.get(name, name))
        prefix = f"{self.strip_prefix}."
        if found is None and self.strip_prefix and name.startswith(prefix):
            found = self._locations.get(name[len(prefix) :])
        return found

    def _locate(self, name: str) -> tuple[Path, TensorSpec]:
        """Like ``_resolve``, but a missing tensor is an error: the weights do not fit the model."""
        found = self._resolve(name)
        if found is None:
            raise CorruptWeightsError(
                self.folder,
                f"the tensor {name!r} is not in the checkpoint; the weights do not match the config, "
                f"{REDOWNLOAD}",
            )
        return found


def _find_weights(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The files ``from_pretrained`` would load (``model.safetensors`` first, else the index's) and the index.

    transformers checks for the single file before the index, so a folder holding both loads the single file;
    reading the same files keeps us from merging weights other than the ones the model runs with.
    """
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single], None
    index = folder / INDEX_FILE
    if not index.is_file():
        raise CorruptWeightsError(
            folder,
            f"no {SINGLE_FILE} or {INDEX_FILE} found; {REDOWNLOAD}",
        )
    weight_map = _read_weight_map(index)
    files = [folder / name for name in sorted(set(weight_map.values()))]
    for path in files:
        if not path.is_file():
            raise CorruptWeightsError(path, f"this shard is listed in {INDEX_FILE} but missing; {REDOWNLOAD}")
    return files, weight_map


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map``, checked to be a mapping of names to file names."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptWeightsError(index, f"the index is not readable JSON ({exc}); {REDOWNLOAD}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in weight_map.items()
    ):
        raise CorruptWeightsError(index, f"the index has no valid 'weight_map'; {REDOWNLOAD}")
    return weight_map


def read_header(path: Path) -> list[TensorSpec]:
    """Every tensor's spec from one file's header (read by ``headers.read_entries``), in torch's dtypes.

    Raises:
        CorruptWeightsError: the file is not a readable safetensors file, or holds a dtype torch lacks.
    """
    return [_spec_from_header(path, entry.name, entry.code, entry.shape) for entry in read_entries(path)]


def _spec_from_header(path: Path, name: str, code: str, shape: Sequence[int]) -> TensorSpec:
    if code not in CODE_DTYPES:
        raise CorruptWeightsError(
            path, f"the tensor {name!r} has the dtype {code!r}, which torch cannot load"
        )
    return TensorSpec(name, tuple(shape), CODE_DTYPES[code])


def _check_index_matches(
    folder: Path, weight_map: dict[str, str], locations: dict[str, tuple[Path, TensorSpec]]
) -> None:
    """Refuse an index that promises a tensor its shard does not hold, as a half-copied download would."""
    for name, file_name in weight_map.items():
        found = locations.get(name)
        if found is None or found[0].name != file_name:
            raise CorruptWeightsError(
                folder / file_name,
                f"{INDEX_FILE} lists {name!r} in this shard but it is not there; {REDOWNLOAD}",
            )


def cast_floating(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` in ``dtype`` if it is floating (weights); integer and bool buffers keep their own dtype."""
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


# --------------------------------------------------------------------------------------------- writing


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors into shards of at most ``max_shard_bytes``, in order, as ``save_pretrained`` does.

    A tensor larger than the limit cannot be split, so it gets a shard of its own.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and size + spec.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


def _shard_names(count: int) -> list[str]:
    if count <= 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header_bytes(specs: Sequence[TensorSpec]) -> bytes:
    """The length prefix and JSON header of a shard, padded so the data starts 8-byte aligned."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_CODES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % _HEADER_ALIGN)
    return len(raw).to_bytes(8, "little") + raw


def _check_specs(specs: Sequence[TensorSpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"tensor {spec.name!r} is listed twice")
        if spec.dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {spec.name!r} has dtype {spec.dtype}, which safetensors cannot store")
        seen.add(spec.name)


class StreamingShardWriter:
    """Writes a checkpoint tensor by tensor, so memory holds one tensor at a time.

    Each shard's header is written first from the planned specs, then each tensor's bytes as it arrives. A
    context manager: leaving the block normally closes the writer; an exception only closes the open file.
    """

    def __init__(self, folder: Path, specs: Sequence[TensorSpec], max_shard_bytes: int = 2 * 10**9) -> None:
        """Plan the shards; files are created as their first tensor arrives.

        Raises:
            ValueError: a duplicate name or a dtype safetensors has no code for.
            FileExistsError: the folder already holds safetensors weights, which would be mixed with ours.
        """
        _check_specs(specs)
        self.folder = Path(folder)
        self._specs = list(specs)
        self._shards = plan_shards(self._specs, max_shard_bytes) or [[]]
        self._names = _shard_names(len(self._shards))
        self._ends = list(itertools.accumulate(len(shard) for shard in self._shards))
        self._refuse_existing()
        self._next = 0  # index into self._specs of the tensor expected next
        self._shard = -1  # index of the shard last opened
        self._handle: BinaryIO | None = None
        self._closed = False

    def _files(self) -> list[Path]:
        """The files this writer writes (all of them once closed)."""
        names = [*self._names, INDEX_FILE] if len(self._names) > 1 else self._names
        return [self.folder / name for name in names]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor's bytes to its shard.

        Raises:
            ValueError: the writer is closed or full, or the tensor is not the next planned one (name, shape
                or dtype differ).
        """
        self._check_next(name, tensor)
        handle = self._open_next_shard()
        # A uint8 view gives numpy (which has no bfloat16) the raw bytes, written without a copy.
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        handle.write(data.numpy().data)
        handle.flush()  # on disk now, not in a buffer, so an observer of the file sees each tensor land
        self._next += 1
        if self._next == self._ends[self._shard]:
            self._close_handle()

    def close(self) -> list[Path]:
        """Finish the checkpoint (the index, if sharded) and return its files.

        Raises:
            ValueError: some planned tensor was never written.
        """
        if self._closed:
            return self._files()
        if self._next < len(self._specs):
            left = len(self._specs) - self._next
            raise ValueError(
                f"the checkpoint is incomplete: {left} tensor(s) were not written, "
                f"starting with {self._specs[self._next].name!r}"
            )
        if not self._specs:
            self._open_next_shard()
        self._close_handle()
        if len(self._shards) > 1:
            self._write_index()
        self._closed = True
        return self._files()

    def __enter__(self) -> StreamingShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close on success; on an error only release the file, leaving the caller to discard the folder."""
        if exc_type is None:
            self.close()
        else:
            self._close_handle()

    def _check_next(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise ValueError(f"the writer is closed; cannot write {name!r}")
        if self._next >= len(self._specs):
            raise ValueError(f"all planned tensors were already written; {name!r} was not planned")
        spec = self._specs[self._next]
        if name != spec.name:
            raise ValueError(
                f"expected tensor {spec.name!r} next (tensors must come in plan order), got {name!r}"
            )
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"tensor {name!r}: expected shape {spec.shape}, got {tuple(tensor.shape)}")
        if tensor.dtype != spec.dtype:
            raise ValueError(f"tensor {name!r}: expected dtype {spec.dtype}, got {tensor.dtype}")

    def _open_next_shard(self) -> BinaryIO:
        """The open shard file; when none is open, the next shard is created and its header written."""
        if self._handle is not None:
            return self._handle
        self._shard += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        self._handle = (self.folder / self._names[self._shard]).open("wb")
        self._handle.write(_header_bytes(self._shards[self._shard]))
        return self._handle

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _write_index(self) -> None:
        weight_map = {
            spec.name: file_name
            for file_name, specs in zip(self._names, self._shards, strict=True)
            for spec in specs
        }
        index = {
            "metadata": {"total_size": sum(spec.nbytes for spec in self._specs)},
            "weight_map": weight_map,
        }
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def _refuse_existing(self) -> None:
        """Refuse a folder that already has weights: a stale ``model.safetensors`` would shadow new shards."""
        if not self.folder.is_dir():
            return
        stale = sorted(
            path.name
            for path in self.folder.iterdir()
            if path.name in (SINGLE_FILE, INDEX_FILE)
            or (path.name.startswith("model-") and path.name.endswith(".safetensors"))
        )
        if stale:
            raise FileExistsError(f"{self.folder} already holds safetensors weights ({', '.join(stale)})")
