"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, on the tasks the SWM paper reports.

The harness is an optional dependency (``pip install 'swm-hub[eval]'``). Evaluation runs offline: a task's
data must already be on this machine, either in the ``datasets`` cache (downloaded beforehand on a connected
machine) or as local files named by a task YAML in ``task_dir``. A task whose data is missing is reported
before any model is loaded, with the ways to provide it; nothing is downloaded and no score is invented.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from swm_hub.core.errors import InvalidOptionError, MissingDependencyError
from swm_hub.core.options import PAPER_TASKS
from swm_hub.results.zeroshot import TaskScore, ZeroShotReport

EVAL_EXTRA = "pip install 'swm-hub[eval]'"
_METRICS = ("acc", "acc_norm")


class TaskDataUnavailableError(MissingDependencyError):
    """Tasks whose data is not on this machine, with the ways to provide it (evaluation runs offline).

    A :class:`~swm_hub.core.errors.MissingDependencyError`, so callers and the CLI handle it the same way; only
    the message differs, since what is missing is data, not a package.

    Attributes:
        tasks: the task names whose data could not be loaded, in the order asked.
        reasons: the loader's one-line reason per task.
    """

    def __init__(self, reasons: Mapping[str, str]) -> None:
        self.tasks = tuple(reasons)
        self.reasons = dict(reasons)
        self.package = f"the data of {', '.join(self.tasks)}"
        self.install = (
            'on a machine with internet, run `python -c "import lm_eval.tasks as t; '
            f't.TaskManager().load({list(self.tasks)!r})"` with HF_DATASETS_CACHE set to a folder, copy that '
            "folder here and set HF_DATASETS_CACHE to it; or pass task_dir with a task YAML whose "
            "dataset_path is json/csv/parquet and whose dataset_kwargs.data_files names local files"
        )
        detail = "; ".join(f"{name}: {reason}" for name, reason in self.reasons.items())
        Exception.__init__(
            self,
            f"zero-shot evaluation runs offline and the data of {len(self.tasks)} task(s) is not available "
            f"locally ({detail}); to provide it, {self.install}",
        )


def zero_shot(
    model_dir: Path | str,
    tasks: Sequence[str] = PAPER_TASKS,
    task_dir: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> ZeroShotReport:
    """Zero-shot accuracy of the model in ``model_dir`` on ``tasks``, on the CPU in float32, offline.

    Args:
        model_dir: a local folder holding a causal LM and its tokenizer (``save_pretrained`` layout).
        tasks: lm-evaluation-harness task names; the default is the seven the paper reports.
        task_dir: a folder of extra task YAMLs (lm-evaluation-harness format), e.g. tasks on local files.
        limit: at most this many examples per task (for quick checks; the paper uses every example).
        batch_size: examples per forward pass.

    Raises:
        MissingDependencyError: lm-evaluation-harness is not installed.
        InvalidOptionError: no task, an unknown task name, a bad limit or batch size, or a missing folder.
        TaskDataUnavailableError: the data of some tasks is not available on this machine.
    """
    names = _check_options(model_dir, tasks, task_dir, limit, batch_size)
    harness = _import_harness()
    with _offline_datasets():
        manager = harness.tasks.TaskManager(include_path=str(task_dir) if task_dir is not None else None)
        unknown = [name for name in names if name not in manager.all_tasks]
        if unknown:
            raise InvalidOptionError(
                f"unknown zero-shot task(s): {', '.join(unknown)}; the paper's tasks are "
                f"{', '.join(PAPER_TASKS)}, and task_dir can add tasks from local YAML files"
            )
        loaded = _load_tasks(manager, names)
        results = harness.evaluator.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": "float32"},
            tasks=loaded,
            num_fewshot=0,
            batch_size=batch_size,
            device="cpu",
            limit=limit,
            task_manager=manager,
            log_samples=False,
        )
    if not results or "results" not in results:
        raise RuntimeError("lm-evaluation-harness returned no results")
    return ZeroShotReport(
        model=str(model_dir),
        tasks=tuple(names),
        limit=limit,
        scores=[_score(name, results) for name in names],
        harness_version=str(getattr(harness, "__version__", "")),
    )


def _check_options(
    model_dir: Path | str, tasks: Sequence[str], task_dir: Path | None, limit: int | None, batch_size: int
) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    names = list(dict.fromkeys(tasks))
    if not names:
        raise InvalidOptionError("no zero-shot task given")
    if limit is not None and limit < 1:
        raise InvalidOptionError(f"limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise InvalidOptionError(f"batch size must be at least 1, got {batch_size}")
    if not Path(model_dir).is_dir():
        raise InvalidOptionError(f"model folder {model_dir} does not exist (zero-shot needs a local folder)")
    if task_dir is not None and not Path(task_dir).is_dir():
        raise InvalidOptionError(f"task folder {task_dir} does not exist")
    return names


def _import_harness() -> Any:
    """The ``lm_eval`` package with its ``tasks`` and ``evaluator`` modules, or a clear error."""
    try:
        harness = importlib.import_module("lm_eval")
        importlib.import_module("lm_eval.tasks")
        importlib.import_module("lm_eval.evaluator")
    except ImportError as error:
        raise MissingDependencyError("lm-eval (lm-evaluation-harness)", EVAL_EXTRA) from error
    return harness


@contextmanager
def _offline_datasets() -> Iterator[None]:
    """Keep ``datasets`` off the network while the harness loads task data; restore the settings after."""
    saved = os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    config: Any = None
    saved_flags: dict[str, Any] = {}
    try:
        config = importlib.import_module("datasets.config")
    except ImportError:
        pass
    else:
        for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(config, flag):
                saved_flags[flag] = getattr(config, flag)
                setattr(config, flag, True)
    try:
        yield
    finally:
        for flag, value in saved_flags.items():
            setattr(config, flag, value)
        if saved is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = saved


def _load_tasks(manager: Any, names: Sequence[str]) -> list[Any]:
    """Build every task (which loads its data), collecting the ones whose data is not on this machine."""
    loaded: list[Any] = []
    missing: dict[str, str] = {}
    for name in names:
        try:
            built = manager.load([name])
        except (ConnectionError, FileNotFoundError) as error:
            missing[name] = _one_line(error)
            continue
        except Exception as error:
            if _looks_offline(error):
                missing[name] = _one_line(error)
                continue
            raise
        loaded.extend(built["groups"].values() or built["tasks"].values())
    if missing:
        raise TaskDataUnavailableError(missing)
    return loaded


def _looks_offline(error: BaseException) -> bool:
    """Errors that ``datasets``/``huggingface_hub`` raise for data that would need the network."""
    chain: BaseException | None = error
    while chain is not None:
        kind = type(chain).__name__
        if kind in {"OfflineModeIsEnabled", "DatasetNotFoundError", "LocalEntryNotFoundError"}:
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _score(name: str, results: Mapping[str, Any]) -> TaskScore:
    metrics: Mapping[str, Any] = results["results"].get(name, {})
    values: dict[str, float | None] = {}
    for metric in _METRICS:
        values[metric] = _number(metrics.get(f"{metric},none"))
        values[f"{metric}_stderr"] = _number(metrics.get(f"{metric}_stderr,none"))
    counts = results.get("n-samples", {}).get(name, {})
    samples = counts.get("effective") if isinstance(counts, Mapping) else None
    return TaskScore(
        task=name,
        acc=values["acc"],
        acc_stderr=values["acc_stderr"],
        acc_norm=values["acc_norm"],
        acc_norm_stderr=values["acc_norm_stderr"],
        samples=int(samples) if isinstance(samples, int) else None,
    )


def _number(value: Any) -> float | None:
    """A metric as a float; ``None`` for absent or non-numeric values (the harness writes "N/A")."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
