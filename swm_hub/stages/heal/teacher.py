"""The teacher of the heal stage: the original model in memory, or its top-k next-token distributions on disk.

When the original model and the compressed one do not fit on the device together, the original runs once
over every training block first; its top-k log-probabilities (values as float16, token ids as int32) and,
for the hidden-state term, its hidden states at the merged windows' boundaries are written to memory-mapped
files, the original model is freed, and training reads the targets of each batch from those files. Each
process of a multi-GPU run fills its own rows of the shared files.

The cache stores log-probabilities (logits minus their log-sum-exp) rather than raw logits, so the top-k
KL needs nothing else per position; see ``training.kl_top_k`` for how the rest of the mass is counted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from swm_hub.core.architectures import spec_for_config
from swm_hub.core.atomic import write_text_atomically
from swm_hub.core.model import decoder_layers
from swm_hub.stages.heal.training import TeacherTargets

CACHE_FILE = "cache.json"
LOGPROBS_FILE = "top_logprobs.f16"
INDICES_FILE = "top_indices.i32"
FIT_SHARE = 0.9
"""Teacher, student and activations must fit in this share of the device's free memory to share it."""
LOGIT_COPIES = 6
"""Float32 copies of the logits a step holds at its peak: both models' logits, log-softmaxes, exp, gradient."""
HIDDEN_COPIES = 16
"""Float32 copies of a hidden state each student layer keeps for the backward pass (attention and MLP)."""


def block_fingerprint(blocks: torch.Tensor) -> str:
    """A digest of the training tokens: a cache or checkpoint made on other text must not be reused."""
    return hashlib.sha256(blocks.numpy().astype(np.int64).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class MemoryTeacher:
    """The original model in memory: full logits (and boundary hidden states) for every batch."""

    model: nn.Module
    hidden_layers: tuple[int, ...] = ()

    @torch.no_grad()
    def targets(self, rows: Sequence[int], ids: torch.Tensor) -> TeacherTargets:
        device = self.model.get_input_embeddings().weight.device  # type: ignore[operator]
        want = bool(self.hidden_layers)
        output = self.model(input_ids=ids.to(device), use_cache=False, output_hidden_states=want)
        hidden = tuple(output.hidden_states[layer + 1] for layer in self.hidden_layers) if want else ()
        return TeacherTargets(logits=output.logits, hidden=hidden)


@dataclass(frozen=True)
class CachedTeacher:
    """Targets read from the disk cache, by block number."""

    logprobs: np.memmap[Any, np.dtype[np.float16]]
    indices: np.memmap[Any, np.dtype[np.int32]]
    hidden: tuple[np.memmap[Any, np.dtype[np.float16]], ...]

    def targets(self, rows: Sequence[int], ids: torch.Tensor) -> TeacherTargets:
        picked = list(rows)
        return TeacherTargets(
            top_logprobs=torch.from_numpy(np.asarray(self.logprobs[picked])),
            top_indices=torch.from_numpy(np.asarray(self.indices[picked])),
            hidden=tuple(torch.from_numpy(np.asarray(array[picked])) for array in self.hidden),
        )


@dataclass(frozen=True)
class CacheLayout:
    """What a cache holds; a cache whose layout differs from the run's is rebuilt rather than trusted."""

    blocks: int
    seq_len: int
    top_k: int
    hidden_layers: tuple[int, ...]
    hidden_size: int
    fingerprint: str

    def record(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks,
            "seq_len": self.seq_len,
            "top_k": self.top_k,
            "hidden_layers": list(self.hidden_layers),
            "hidden_size": self.hidden_size,
            "fingerprint": self.fingerprint,
        }


def open_cache(folder: Path, layout: CacheLayout, mode: str = "r") -> CachedTeacher:
    shape = (layout.blocks, layout.seq_len, layout.top_k)
    hidden_shape = (layout.blocks, layout.seq_len, layout.hidden_size)
    return CachedTeacher(
        logprobs=np.memmap(folder / LOGPROBS_FILE, dtype=np.float16, mode=mode, shape=shape),  # type: ignore[call-overload]
        indices=np.memmap(folder / INDICES_FILE, dtype=np.int32, mode=mode, shape=shape),  # type: ignore[call-overload]
        hidden=tuple(
            np.memmap(folder / f"hidden-{layer}.f16", dtype=np.float16, mode=mode, shape=hidden_shape)  # type: ignore[call-overload]
            for layer in layout.hidden_layers
        ),
    )


def complete_cache(folder: Path, layout: CacheLayout) -> bool:
    """Whether ``folder`` holds a finished cache of exactly this layout (a resumed run reuses it)."""
    path = folder / CACHE_FILE
    if not path.is_file():
        return False
    saved = json.loads(path.read_text(encoding="utf-8"))
    return bool(saved.get("complete")) and saved.get("layout") == layout.record()


def build_cache(
    teacher: nn.Module,
    blocks: torch.Tensor,
    layout: CacheLayout,
    folder: Path,
    accelerator: Any,
    batch_size: int,
    progress: bool,
) -> CachedTeacher:
    """Run the teacher over every block once and store its targets; each process fills its share of the rows."""
    folder.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (folder / CACHE_FILE).unlink(missing_ok=True)
        open_cache(folder, layout, mode="w+")  # creates the files at their full size
    accelerator.wait_for_everyone()
    cache = open_cache(folder, layout, mode="r+")
    mine = list(range(accelerator.process_index, layout.blocks, accelerator.num_processes))
    chunks = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
    source = MemoryTeacher(teacher, layout.hidden_layers)
    for rows in tqdm(chunks, desc="teacher cache", unit="batch", disable=not progress, leave=False):
        targets = source.targets(rows, blocks[rows])
        assert targets.logits is not None
        values, indices = torch.log_softmax(targets.logits.float(), dim=-1).topk(layout.top_k, dim=-1)
        cache.logprobs[rows] = values.half().cpu().numpy()
        cache.indices[rows] = indices.int().cpu().numpy()
        for array, hidden in zip(cache.hidden, targets.hidden, strict=True):
            array[rows] = hidden.half().cpu().numpy()
    arrays: list[np.memmap[Any, Any]] = [cache.logprobs, cache.indices, *cache.hidden]
    for array in arrays:
        array.flush()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        record = {"complete": True, "layout": layout.record()}
        write_text_atomically(folder / CACHE_FILE, json.dumps(record, indent=2) + "\n")
    return open_cache(folder, layout)


# --- does the teacher fit beside the student? ---------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of the student's and the teacher's weights and of one step's activations, at the run's precision."""

    student: int
    teacher: int
    activations: int

    @property
    def together(self) -> int:
        return self.student + self.teacher + self.activations


def estimate_memory(
    student: nn.Module, teacher_layers: int, dtype: torch.dtype, batch: int, seq_len: int
) -> MemoryEstimate:
    """The bytes a run needs, estimated from the student alone (a skeleton on the meta device will do).

    The teacher has the student's layers, only more of them, and the same embeddings and head.
    """
    config: Any = getattr(student, "config")  # noqa: B009  (nn.Module does not declare it)
    layers = decoder_layers(student, spec_for_config(config))
    layer_params = sum(p.numel() for p in layers.parameters())
    total = sum(p.numel() for p in student.parameters())
    per_layer = layer_params / max(1, len(layers))
    teacher_params = total - layer_params + per_layer * teacher_layers
    hidden = int(config.get_text_config().hidden_size)
    vocab = int(config.get_text_config().vocab_size)
    tokens = batch * seq_len
    activations = tokens * 4 * (LOGIT_COPIES * vocab + HIDDEN_COPIES * hidden * len(layers))
    return MemoryEstimate(total * dtype.itemsize, int(teacher_params) * dtype.itemsize, activations)


def free_bytes(device: torch.device) -> int:
    """Free memory of the one device a process trains on: its GPU, or the machine's RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def choose_teacher_cache(requested: str, estimate: MemoryEstimate, device: torch.device) -> str:
    """``memory`` or ``disk``; ``auto`` keeps the teacher in memory only if both models and a step fit."""
    if requested != "auto":
        return requested
    return "memory" if estimate.together <= FIT_SHARE * free_bytes(device) else "disk"
