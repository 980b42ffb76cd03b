"""How ``heal`` trains: the budget, the adapters, the optimisation, and where the teacher's outputs come from."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from swm_hub.core.errors import InvalidOptionError
from swm_hub.core.options.common import ExecutionOptions

MODULE_CHOICES: tuple[str, ...] = ("merged", "all")
TEACHER_CACHE_MODES: tuple[str, ...] = ("auto", "memory", "disk")
AUTOCAST_MODES: tuple[str, ...] = ("auto", "bf16", "off")

HEAL_HELP: dict[str, str] = {
    "tokens": "training budget in tokens (steps = tokens // (batch size x sequence length))",
    "rank": "LoRA rank of each adapter",
    "alpha": "LoRA alpha (the adapter's output is scaled by alpha / rank)",
    "lr": "peak learning rate (AdamW; linear warm-up over the first 5% of the steps, then cosine decay)",
    "modules": "which layers get adapters: all (every decoder layer) or merged (the consolidated layer of each "
    "merged window)",
    "seq_len": "tokens per training block",
    "batch_size": "training blocks per optimizer step, over all processes together",
    "seed": "seed of the adapters' initialisation and of the order of the training blocks",
    "hidden_weight": "weight of the hidden-state MSE at each merged window's boundary, beside the KL (0: KL only)",
    "checkpoint_every": "write a checkpoint every this many steps (0: only when interrupted and at the end)",
    "teacher_cache": "where the original model's outputs come from: memory (the model beside the student), disk "
    "(its top-k log-probabilities computed once and stored in the checkpoint folder, then the model freed) or "
    "auto (memory when both models fit on the device)",
    "top_k": "with the disk cache: teacher probabilities kept per position (the rest of the mass is one bucket)",
    "autocast": "forward passes of the student and of a teacher in memory in bfloat16 under torch.autocast, while the "
    "weights, the adapters, the optimizer and the loss stay float32: bf16, off, or auto (bf16 when the weights are "
    "float32 and the device has bfloat16 arithmetic: a CPU with AMX or AVX512-BF16, or a GPU that supports it)",
    "device": "where the models train: cpu, cuda (one GPU per process: run several with accelerate launch) "
    "or auto (cuda when a GPU is visible)",
    "calib": "training text, a plain-text or JSONL file (a 'text' field per line); default: the plan's "
    "calibration text",
}


@dataclass(frozen=True)
class HealOptions:
    """How to heal: the budget, the adapters, the optimisation, and where the teacher's outputs come from."""

    tokens: int = 200_000
    rank: int = 8
    alpha: int = 16
    lr: float = 2e-4
    modules: str = "all"
    seq_len: int = 256
    batch_size: int = 4
    seed: int = 0
    hidden_weight: float = 0.0
    checkpoint_every: int = 50
    teacher_cache: str = "auto"
    top_k: int = 64
    autocast: str = "auto"
    calib: Path | None = None
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)

    def __post_init__(self) -> None:
        self._check_counts()
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidOptionError(f"--lr must be a finite number above 0, got {self.lr}")
        if not (math.isfinite(self.hidden_weight) and self.hidden_weight >= 0):
            raise InvalidOptionError(
                f"--hidden-weight must be a finite number of at least 0, got {self.hidden_weight}"
            )
        for flag, choice, allowed in (
            ("--modules", self.modules, MODULE_CHOICES),
            ("--teacher-cache", self.teacher_cache, TEACHER_CACHE_MODES),
            ("--autocast", self.autocast, AUTOCAST_MODES),
        ):
            if choice not in allowed:
                raise InvalidOptionError(f"{flag} must be one of {', '.join(allowed)}, got {choice!r}")
        if self.autocast == "bf16" and self.execution.dtype == "float16":
            raise InvalidOptionError(
                "--autocast bf16 runs float32 weights in bfloat16, and --dtype float16 already computes in "
                "float16: drop one of the two"
            )
        if self.execution.mode == "layerwise":
            raise InvalidOptionError(
                "heal trains the compressed model in memory, so --execution layerwise does not apply to it; "
                "on a model larger than the device, --teacher-cache disk keeps only the student there"
            )

    def _check_counts(self) -> None:
        for flag, value, least in (
            ("--tokens", self.tokens, 1),
            ("--rank", self.rank, 1),
            ("--alpha", self.alpha, 1),
            ("--seq-len", self.seq_len, 8),
            ("--batch-size", self.batch_size, 1),
            ("--seed", self.seed, 0),
            ("--checkpoint-every", self.checkpoint_every, 0),
            ("--top-k", self.top_k, 1),
        ):
            if value < least:
                raise InvalidOptionError(f"{flag} must be at least {least}, got {value}")
        step = self.batch_size * self.seq_len
        if self.tokens < step:
            raise InvalidOptionError(
                f"--tokens {self.tokens} is less than one step ({self.batch_size} blocks x {self.seq_len} "
                f"tokens = {step}): raise --tokens or lower --batch-size/--seq-len"
            )

    @property
    def steps(self) -> int:
        """Whole steps within the budget: the budget is a ceiling, never exceeded."""
        return self.tokens // (self.batch_size * self.seq_len)

    def record(self) -> dict[str, Any]:
        """The options as the plan records them (JSON values; the text and device are recorded apart)."""
        raw = asdict(self)
        raw.pop("execution")
        raw.pop("calib")
        return raw
