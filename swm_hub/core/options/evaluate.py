"""What ``eval`` measures: the held-out text, how much of it, the drop baselines and the zero-shot tasks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from swm_hub.core.errors import InvalidOptionError
from swm_hub.core.options.common import ExecutionOptions
from swm_hub.core.texts import TextSource

DROP_BASELINES: tuple[str, ...] = ("drop-bi", "drop-angular")
"""Plain layer dropping at the merged model's count: ShortGPT's block influence and PruneMe's angular distance."""
PAPER_TASKS: tuple[str, ...] = (
    "boolq",
    "piqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)
"""The paper's seven zero-shot tasks, which ``--zero-shot paper`` stands for."""

EVAL_HELP: dict[str, str] = {
    "text": "held-out text (txt or jsonl); default: the shipped held-out text",
    "baselines": "drop-bi, drop-angular or none; repeatable (default: both drops)",
    "seq_len": "tokens per evaluation block",
    "blocks": "number of evaluation blocks",
    "zero_shot": "also run zero-shot tasks with lm-evaluation-harness (extra [eval]): 'paper' for the paper's "
    "seven (their data must be in the local datasets cache) or comma-separated task names",
    "task_dir": "a folder of extra lm-eval task YAMLs",
    "limit": "zero-shot: at most this many examples per task",
}


@dataclass(frozen=True)
class EvalOptions:
    """Held-out perplexity settings, and optionally the zero-shot tasks to run after it."""

    text: Path | None = None
    seq_len: int = 256
    blocks: int = 48
    baselines: tuple[str, ...] = DROP_BASELINES
    zero_shot: tuple[str, ...] = ()
    task_dir: Path | None = None
    limit: int | None = None
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.baselines) - set(DROP_BASELINES))
        if unknown:
            raise InvalidOptionError(
                f"unknown baseline {', '.join(unknown)}; choose from {', '.join(DROP_BASELINES)} or none"
            )
        if self.seq_len < 8 or self.blocks < 1:
            raise InvalidOptionError(
                f"eval needs --seq-len >= 8 and --blocks >= 1 (got {self.seq_len}, {self.blocks})"
            )
        if self.limit is not None and self.limit < 1:
            raise InvalidOptionError(f"--limit must be at least 1, got {self.limit}")
        if self.zero_shot and self.execution.mode == "layerwise":
            raise InvalidOptionError(
                "--zero-shot runs the whole model through lm-evaluation-harness, which --execution layerwise "
                "is meant to avoid: run the zero-shot tasks separately with --execution whole"
            )

    @property
    def source(self) -> TextSource:
        return TextSource(path=self.text, split="heldout")

    @staticmethod
    def baselines_given(given: list[str] | None) -> tuple[str, ...]:
        """The CLI's repeatable ``--baseline``: both drops when absent, none for ``none``."""
        return tuple(name for name in (given or DROP_BASELINES) if name != "none")

    @staticmethod
    def tasks_given(given: str | None) -> tuple[str, ...]:
        """The CLI's ``--zero-shot``: ``paper`` for the paper's seven, else comma-separated task names."""
        if given is None:
            return ()
        return PAPER_TASKS if given == "paper" else tuple(task for task in given.split(",") if task)
