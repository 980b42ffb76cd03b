"""The heal stage's training loop: distillation of the original model into the compressed one, with LoRA.

One loop for one process or many: it is written against ``accelerate.Accelerator``, so ``accelerate launch``
runs it data-parallel on several GPUs, and a plain call runs the same code in one process on the CPU or a
GPU. Everything that decides the result is a function of the options and the step number: the batch of a
step comes from a seeded permutation per epoch, the learning rate from the step's place in the schedule,
and LoRA has no dropout. So a run resumed from a checkpoint (adapter weights, optimizer state, step, RNG
state, losses so far) ends with the weights an uninterrupted run ends with.

A step is the unit of interruption: Ctrl-C during training only asks the loop to stop, it finishes the
step, writes a checkpoint and raises ``HealInterrupted``, which says how far it got and where the
checkpoint is. A second Ctrl-C interrupts at once; a checkpoint is then written only if the optimizer was
not in the middle of changing the weights.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from swm_hub.core.atomic import is_marked, mark, write_text_atomically
from swm_hub.core.errors import HealInterrupted, InvalidOptionError

LATEST_FILE = "latest.json"
IDENTITY_FILE = "identity.json"
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
LOG_FILE = "log.json"
WARMUP_SHARE = 20
"""The learning rate warms up linearly over the first 1/20 of the steps (at least one), then decays as a cosine."""
MAX_GRAD_NORM = 1.0
CURVE_POINTS = 20
"""The loss curve in the plan is summarised as averages over about this many equal runs of steps."""


# --- the loss ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherTargets:
    """What the student is trained to match on one batch.

    Either the teacher's full logits (the teacher in memory) or its top-k log-probabilities and their token
    ids (the disk cache); ``hidden`` holds the teacher's hidden state at each merged window's boundary when
    the hidden-state term is on, else it is empty.
    """

    logits: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    top_indices: torch.Tensor | None = None
    hidden: tuple[torch.Tensor, ...] = ()


class Teacher(Protocol):
    """The original model, in memory or as a cache of its outputs: targets for the rows of a batch."""

    def targets(self, rows: Sequence[int], ids: torch.Tensor) -> TeacherTargets: ...


def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at temperature 1, mean over positions."""
    student = torch.log_softmax(student_logits.float(), dim=-1)
    teacher = torch.log_softmax(teacher_logits.to(student.device).float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def kl_top_k(
    student_logits: torch.Tensor, top_logprobs: torch.Tensor, top_indices: torch.Tensor
) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k tokens plus one bucket for all other tokens.

    The bucket holds the mass the teacher puts outside its top k, and the student's mass on those same
    tokens; this is the exact KL of the two distributions coarsened to k + 1 outcomes. Unlike renormalising
    the top k, it still penalises a student that moves mass into the tail, and it equals the full KL once
    the top k hold all of the teacher's mass.
    """
    student = torch.log_softmax(student_logits.float(), dim=-1)
    indices = top_indices.to(student.device).long()
    teacher_top = top_logprobs.to(student.device).float()
    student_top = student.gather(-1, indices)
    top_term = (teacher_top.exp() * (teacher_top - student_top)).sum(-1)
    if indices.shape[-1] >= student.shape[-1]:  # no bucket: whatever rounding leaves outside is not mass
        return top_term.mean()
    inside = torch.zeros_like(student, dtype=torch.bool).scatter_(-1, indices, True)
    student_rest = student.masked_fill(inside, float("-inf")).logsumexp(-1)
    teacher_rest_mass = (1.0 - teacher_top.exp().sum(-1)).clamp_min(0.0)
    rest_term = torch.where(
        teacher_rest_mass > 0,
        teacher_rest_mass * (torch.log(teacher_rest_mass.clamp_min(1e-30)) - student_rest),
        torch.zeros_like(teacher_rest_mass),
    )
    return (top_term + rest_term).mean()


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between hidden states divided by the teacher's mean square, so its weight does not depend on scale."""
    teacher = teacher.to(student.device).float()
    return ((student.float() - teacher) ** 2).mean() / (teacher**2).mean().clamp_min(1e-12)


def distillation_loss(
    student_logits: torch.Tensor,
    student_hidden: Sequence[torch.Tensor],
    targets: TeacherTargets,
    hidden_weight: float,
) -> torch.Tensor:
    """The KL term (full or top-k, as the targets are) plus ``hidden_weight`` x the mean boundary MSE."""
    if targets.logits is not None:
        loss = kl_full(student_logits, targets.logits)
    elif targets.top_logprobs is not None and targets.top_indices is not None:
        loss = kl_top_k(student_logits, targets.top_logprobs, targets.top_indices)
    else:
        raise ValueError("teacher targets hold neither logits nor top-k log-probabilities")
    if hidden_weight > 0 and targets.hidden:
        pairs = zip(student_hidden, targets.hidden, strict=True)
        loss = loss + hidden_weight * torch.stack([relative_mse(s, t) for s, t in pairs]).mean()
    return loss


# --- what each step trains on -----------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _epoch_order(count: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(count, generator=generator).tolist())


def step_rows(step: int, batch_size: int, count: int, seed: int) -> list[int]:
    """The blocks of one global step: consecutive places in a fresh seeded permutation of the blocks per epoch.

    A function of the step alone, so a resumed run draws exactly the batches the interrupted one would have.
    """
    rows = []
    for place in range(step * batch_size, (step + 1) * batch_size):
        epoch, position = divmod(place, count)
        rows.append(_epoch_order(count, seed, epoch)[position])
    return rows


def learning_rate_factor(step: int, steps: int) -> float:
    """Linear warm-up, then a cosine decay that stays above zero on the last step."""
    warmup = max(1, steps // WARMUP_SHARE)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# --- the log of a run -------------------------------------------------------------------------------------


@dataclass
class TrainingLog:
    """Per-step losses and the time spent so far; saved with each checkpoint so a resumed run adds to it."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    resumed_at: int | None = None

    @property
    def step(self) -> int:
        return len(self.losses)

    def to_json(self) -> str:
        record = {"losses": self.losses, "seconds": self.seconds, "tokens": self.tokens}
        return json.dumps(record) + "\n"

    @classmethod
    def from_json(cls, text: str, resumed_at: int) -> TrainingLog:
        raw = json.loads(text)
        return cls([float(v) for v in raw["losses"]], float(raw["seconds"]), int(raw["tokens"]), resumed_at)

    def summary(self) -> dict[str, Any]:
        """First, last and lowest loss, and averages over runs of ``every`` steps: the curve's shape, small."""
        every = max(1, math.ceil(len(self.losses) / CURVE_POINTS))
        runs = [self.losses[i : i + every] for i in range(0, len(self.losses), every)]
        return {
            "first": self.losses[0],
            "last": self.losses[-1],
            "min": min(self.losses),
            "every": every,
            "averages": [sum(run) / len(run) for run in runs],
        }


# --- checkpoints ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointStore:
    """A folder of heal checkpoints: the newest complete step, named by ``latest.json``, and what run it is.

    ``identity`` records everything the result depends on (options, plan, training text); a resume with any
    of it changed would silently mix two runs, so it is refused instead.
    """

    folder: Path
    identity: dict[str, Any]

    def exists(self) -> bool:
        return (self.folder / LATEST_FILE).is_file()

    def saved_step(self) -> int:
        return int(json.loads((self.folder / LATEST_FILE).read_text(encoding="utf-8"))["step"])

    def check_identity(self) -> None:
        """Refuse to resume a run made with other options, another plan or another text."""
        saved = json.loads((self.folder / IDENTITY_FILE).read_text(encoding="utf-8"))
        changed = sorted(key for key in {*saved, *self.identity} if saved.get(key) != self.identity.get(key))
        if changed:
            detail = ", ".join(
                f"{key} {saved.get(key)!r} -> {self.identity.get(key)!r}" for key in changed[:4]
            )
            raise InvalidOptionError(
                f"the heal checkpoint in {self.folder} was made by a different run ({detail}): resume with the "
                "same options, or delete the checkpoint folder to start again"
            )

    def create(self) -> None:
        """Create the folder, marked as swm-hub's: only such a folder is ever deleted."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not is_marked(self.folder):
            mark(self.folder)

    def prepare(self) -> None:
        """Create the folder and record which run its checkpoints belong to."""
        self.create()
        write_text_atomically(self.folder / IDENTITY_FILE, json.dumps(self.identity, indent=2) + "\n")

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, log: TrainingLog, main: bool) -> None:
        """Write step ``log.step`` into a folder of its own, then point ``latest.json`` at it, then prune.

        Each process writes its RNG state; the main process writes the rest. The pointer moves only once
        the step's folder is complete, so a kill while saving leaves the previous checkpoint in force.
        """
        step_dir = self.folder / f"step-{log.step:08d}"
        if main:
            shutil.rmtree(step_dir, ignore_errors=True)
            step_dir.mkdir(parents=True)
            save_file(_adapter_state(model), str(step_dir / ADAPTER_FILE))
            torch.save(optimizer.state_dict(), step_dir / OPTIMIZER_FILE)
            (step_dir / LOG_FILE).write_text(log.to_json(), encoding="utf-8")
        _barrier()
        torch.save(_rng_state(), step_dir / f"rng-{_rank()}.pt")
        _barrier()
        if main:
            pointer = {"step": log.step, "folder": step_dir.name}
            write_text_atomically(self.folder / LATEST_FILE, json.dumps(pointer) + "\n")
            for old in self.folder.glob("step-*"):
                if old != step_dir:
                    shutil.rmtree(old, ignore_errors=True)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainingLog:
        """Restore adapter weights, optimizer state and RNG state of the newest checkpoint; return its log."""
        self.check_identity()
        pointer = json.loads((self.folder / LATEST_FILE).read_text(encoding="utf-8"))
        step_dir = self.folder / str(pointer["folder"])
        _load_adapter_state(model, load_file(str(step_dir / ADAPTER_FILE)))
        optimizer.load_state_dict(torch.load(step_dir / OPTIMIZER_FILE, weights_only=True))
        rng_file = step_dir / f"rng-{_rank()}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        step = int(pointer["step"])
        return TrainingLog.from_json((step_dir / LOG_FILE).read_text(encoding="utf-8"), resumed_at=step)

    def remove(self) -> None:
        if is_marked(self.folder):
            shutil.rmtree(self.folder, ignore_errors=True)


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    state: dict[str, torch.Tensor] = get_peft_model_state_dict(model)
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}


def _load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise InvalidOptionError(
            f"the heal checkpoint's adapter does not fit this model (unexpected {unexpected[:3]}): delete the "
            "checkpoint folder to start again"
        )


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- Ctrl-C -----------------------------------------------------------------------------------------------


@dataclass
class StopRequest:
    """Set by the first Ctrl-C (or a step callback raising KeyboardInterrupt); read at each step boundary."""

    requested: bool = False


@contextmanager
def stop_on_first_sigint() -> Iterator[StopRequest]:
    """Turn the first SIGINT into a request to stop after the current step; a second one interrupts at once."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def ask_to_stop(signum: int, frame: FrameType | None) -> None:
        request.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, ask_to_stop)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)


# --- the loop ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepReport:
    """What a step callback sees after each completed step."""

    step: int
    steps: int
    loss: float
    tokens_per_s: float


@dataclass(frozen=True)
class TrainingPlan:
    """The numbers of a run: how many global steps, of how many blocks, at which learning rate and seed."""

    steps: int
    batch_size: int
    lr: float
    seed: int
    hidden_weight: float
    checkpoint_every: int
    boundaries: tuple[tuple[int, int], ...]
    """(student layer, teacher layer) whose outputs the hidden-state term compares, one per merged window."""
    autocast: torch.dtype | None = None
    """The dtype the forward passes autocast to (None: they run in the weights' dtype)."""


def forward_precision(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """The forward passes' arithmetic: autocast to ``dtype``; the loss is computed outside it, in float32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@dataclass
class _Step:
    """Where a step is, so an interruption knows whether the weights are those of the last boundary."""

    changing_weights: bool = False


def train(
    student: nn.Module,
    teacher: Teacher,
    blocks: torch.Tensor,
    plan: TrainingPlan,
    accelerator: Any,
    store: CheckpointStore | None,
    resume: bool,
    progress: bool,
    on_step: Callable[[StepReport], None] | None = None,
) -> TrainingLog:
    """Train the student's LoRA parameters on ``plan.steps`` global batches of ``blocks``; return the log.

    Args:
        student: the PEFT model (only the adapters require gradients).
        teacher: the targets for each batch.
        blocks: ``[count, seq_len]`` token ids; each step takes ``plan.batch_size`` of them, split over the
            processes.
        plan: the steps, batch, learning rate, seed and loss weights.
        accelerator: the ``accelerate.Accelerator`` of the run.
        store: where checkpoints go (None: no checkpoints; Ctrl-C then raises KeyboardInterrupt).
        resume: continue from the newest checkpoint in ``store``.
        progress: show a bar with the loss and tokens/s.
        on_step: called after every step; a KeyboardInterrupt it raises stops the run like Ctrl-C.

    Raises:
        HealInterrupted: Ctrl-C (or ``on_step``) stopped the run; a checkpoint was written.
    """
    world = accelerator.num_processes
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0)
    log = store.load(student, optimizer) if store is not None and resume else TrainingLog()
    if store is not None:
        store.prepare()
    model, optimizer = accelerator.prepare(student, optimizer)
    model.train()
    local = plan.batch_size // world
    rank = accelerator.process_index
    where = _Step()
    bar = tqdm(
        total=plan.steps,
        initial=log.step,
        desc="heal",
        unit="step",
        disable=not (progress and accelerator.is_main_process),
        leave=False,
    )

    def checkpoint() -> None:
        if store is not None:
            store.save(accelerator.unwrap_model(model), optimizer, log, accelerator.is_main_process)

    def interrupted() -> HealInterrupted:
        checkpoint()
        return HealInterrupted(log.step, plan.steps, store.folder if store is not None else None)

    with stop_on_first_sigint() as stop, bar:
        for step in range(log.step, plan.steps):
            rows = step_rows(step, plan.batch_size, blocks.shape[0], plan.seed)[
                rank * local : (rank + 1) * local
            ]
            started = time.perf_counter()
            try:
                loss = _one_step(model, teacher, blocks, rows, plan, step, optimizer, accelerator, where)
            except KeyboardInterrupt:
                if store is None:
                    raise
                if where.changing_weights:  # the weights are half-updated: keep the last saved checkpoint
                    raise HealInterrupted(_saved_step(store), plan.steps, store.folder) from None
                raise interrupted() from None
            log.seconds += time.perf_counter() - started
            log.tokens += plan.batch_size * blocks.shape[1]
            log.losses.append(loss)
            speed = log.tokens / max(log.seconds, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{speed:.0f}")
            if plan.checkpoint_every and log.step % plan.checkpoint_every == 0 and log.step < plan.steps:
                checkpoint()
            try:
                if on_step is not None:
                    on_step(StepReport(log.step, plan.steps, loss, speed))
            except KeyboardInterrupt:
                stop.requested = True
            if _any_process(stop.requested, accelerator) and log.step < plan.steps:
                if store is None:
                    raise KeyboardInterrupt
                raise interrupted()
    checkpoint()  # the finished run too: a failure while writing the output then resumes at the end
    model.eval()
    return log


def _saved_step(store: CheckpointStore) -> int:
    return store.saved_step() if store.exists() else 0


def _one_step(
    model: nn.Module,
    teacher: Teacher,
    blocks: torch.Tensor,
    rows: Sequence[int],
    plan: TrainingPlan,
    step: int,
    optimizer: Any,
    accelerator: Any,
    where: _Step,
) -> float:
    """One global step: targets, student forward, loss, backward, clipped update; the loss averaged over processes."""
    for group in optimizer.param_groups:
        group["lr"] = plan.lr * learning_rate_factor(step, plan.steps)
    ids = blocks[list(rows)]
    want_hidden = plan.hidden_weight > 0 and bool(plan.boundaries)
    with forward_precision(accelerator.device, plan.autocast):
        targets = teacher.targets(rows, ids)
        output = model(
            input_ids=ids.to(_input_device(model)), use_cache=False, output_hidden_states=want_hidden
        )
    student_hidden = [output.hidden_states[layer + 1] for layer, _ in plan.boundaries] if want_hidden else []
    loss = distillation_loss(output.logits, student_hidden, targets, plan.hidden_weight)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
    where.changing_weights = True
    optimizer.step()
    where.changing_weights = False
    optimizer.zero_grad(set_to_none=True)
    value = loss.detach()
    if accelerator.num_processes > 1:
        value = accelerator.reduce(value, reduction="mean")
    return float(value)


def _input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the embedding's device (the first GPU of a model spread over several)."""
    inner: Any = getattr(model, "module", model)
    return torch.device(inner.get_input_embeddings().weight.device)


def _any_process(flag: bool, accelerator: Any) -> bool:
    """A stop asked in one process stops all of them at the same step, or the others would wait forever."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)
