"""The merge plan: which windows were merged, how, and every score that decided it.

A plan is what ``swm_plan.json`` holds. It makes a compression reproducible and auditable, and lets
``compress --plan`` apply the same windows to the same model without searching again.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from swm_hub.core.config_rewrite import kept_layers
from swm_hub.core.errors import PlanMismatchError, UnknownModelError
from swm_hub.core.merge_rules import MERGE_RULES
from swm_hub.core.program import program_name
from swm_hub.core.version import __version__
from swm_hub.results.schema import SCHEMA_KEY, check_schema

PLAN_FILE = "swm_plan.json"
SCHEMA_VERSION: int = 1
"""The plan's schema: 1 since the schema was versioned; a plan without the key is read as the same fields."""


def _window(value: Any) -> tuple[int, int]:
    """A window as written in a plan file: a pair of integer layer numbers, lowest first."""
    if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)):
        raise ValueError(f"a window must be a pair of layer numbers, got {value!r}")
    return value[0], value[1]


@dataclass(frozen=True)
class MergePlan:
    """Everything needed to apply, explain and reproduce a merge.

    Attributes:
        model: the model as the user named it; base_model: its Hub id when known.
        num_layers: layers of the original model; windows: merged windows, inclusive, lowest first.
        threshold: the similarity threshold the search used (found by bisection for a target).
        trials: every candidate window the search scored, with its similarity and verdict.
    """

    model: str
    base_model: str | None
    revision: str | None
    model_type: str
    num_layers: int
    windows: list[tuple[int, int]]
    method: str
    score: str
    criterion: str
    merge: str
    ridge: float
    threshold: float | None
    target: dict[str, float | int | None]
    calibration: dict[str, Any]
    trials: list[dict[str, Any]] = field(default_factory=list)
    heal: dict[str, Any] | None = None
    """What ``swm-hub heal`` did to the merged model (budget, options, loss curve summary); None if not healed."""
    swm_hub_version: str = __version__

    @property
    def removed(self) -> int:
        return sum(high - low for low, high in self.windows)

    @property
    def layers_after(self) -> int:
        return self.num_layers - self.removed

    def to_json(self) -> str:
        return json.dumps({SCHEMA_KEY: SCHEMA_VERSION, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def in_folder(cls, folder: Path | str, verb: str = "give") -> MergePlan:
        """The plan of a folder ``compress`` wrote; a folder without one is not ours, and the error says so.

        Raises:
            UnknownModelError: ``folder`` holds no plan; the message asks to ``verb`` a compressed folder.
            PlanMismatchError, ResultFileVersionError: as ``from_file``.
        """
        path = Path(folder) / PLAN_FILE
        if not path.is_file():
            raise UnknownModelError(
                str(folder), f"it has no {PLAN_FILE}: {verb} a folder written by `{program_name()} compress`"
            )
        return cls.from_file(path)

    @classmethod
    def from_file(cls, path: Path) -> MergePlan:
        """Read a plan, reporting a malformed file as a plan problem rather than a traceback.

        Raises:
            PlanMismatchError: the file cannot be read, or is not a plan that can be applied.
            ResultFileVersionError: a newer swm-hub wrote it, in a schema this release does not know.
        """
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise PlanMismatchError(f"cannot read merge plan {path}: {err}") from err
        check_schema(path, raw, SCHEMA_VERSION)
        try:
            raw.pop(SCHEMA_KEY, None)
            raw["windows"] = [_window(window) for window in raw["windows"]]
            plan = cls(**raw)
            plan.validate()
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise PlanMismatchError(f"cannot read merge plan {path}: {err}") from err
        return plan

    def validate(self) -> None:
        """Refuse a plan that could only be applied by guessing: every field a merge reads is checked here.

        A plan is a file a user can edit, so its values get the checks the options get on the command line.
        """
        if type(self.num_layers) is not int or self.num_layers < 3:
            raise ValueError(f"num_layers must be an integer of at least 3, got {self.num_layers!r}")
        if self.merge not in MERGE_RULES:
            raise ValueError(f"unknown merge rule {self.merge!r}; choose one of {', '.join(MERGE_RULES)}")
        if type(self.ridge) not in (int, float) or not math.isfinite(self.ridge) or self.ridge <= 0:
            raise ValueError(f"ridge must be a finite number above 0, got {self.ridge!r}")
        if not self.windows:
            raise ValueError("it has no windows, so applying it would only copy the model")
        for low, high in self.windows:
            if low < 1:
                raise ValueError(f"window {low}..{high} touches layer 0, which no merge window may include")
        try:
            kept_layers(self.num_layers, self.windows)
        except PlanMismatchError as err:
            raise ValueError(str(err)) from err

    def check_fits(self, model_type: str, num_layers: int) -> None:
        """Refuse to apply a plan made for a model of another shape."""
        if (model_type, num_layers) != (self.model_type, self.num_layers):
            raise PlanMismatchError(
                f"the plan was made for a {self.model_type} model with {self.num_layers} layers, "
                f"this is a {model_type} model with {num_layers} layers"
            )


_REPO_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def default_repo_name(plan: MergePlan) -> str:
    """``<base-name>-swm-<N>L``: the base model's last name component and the layers kept."""
    source = plan.base_model or plan.model
    name = source.split("@")[0].rstrip("/").split("/")[-1]
    name = name.removesuffix(".gguf").removesuffix(".GGUF")
    name = _REPO_NAME_BAD.sub("-", name).strip("-.") or "model"
    name = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", name))
    suffix = f"-swm-{plan.layers_after}L"
    return name[: 96 - len(suffix)].rstrip("-.") + suffix
