"""The merge plan: which windows were merged, how, and every score that decided it.

A plan is what ``swm_plan.json`` holds. It makes a compression reproducible and auditable, and lets
``compress --plan`` apply the same windows to the same model without searching again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from swm_hub.errors import PlanMismatchError
from swm_hub.version import __version__

PLAN_FILE = "swm_plan.json"


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
    swm_hub_version: str = __version__

    @property
    def removed(self) -> int:
        return sum(high - low for low, high in self.windows)

    @property
    def layers_after(self) -> int:
        return self.num_layers - self.removed

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> MergePlan:
        """Read a plan, reporting a malformed file as a plan problem rather than a traceback."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            raw["windows"] = [_window(window) for window in raw["windows"]]
            return cls(**raw)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise PlanMismatchError(f"cannot read merge plan {path}: {err}") from err

    def check_fits(self, model_type: str, num_layers: int) -> None:
        """Refuse to apply a plan made for a model of another shape."""
        if (model_type, num_layers) != (self.model_type, self.num_layers):
            raise PlanMismatchError(
                f"the plan was made for a {self.model_type} model with {self.num_layers} layers, "
                f"this is a {model_type} model with {num_layers} layers"
            )
