"""The parameter counts of a compressed folder, read from its safetensors headers alone.

The weights are their own record: counting from the headers needs no torch and no weight read, so the
model card of a folder being pushed states the counts of exactly the files that go up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from math import prod
from pathlib import Path

from swm_hub.core.architectures import spec_for
from swm_hub.core.errors import CorruptWeightsError, SwmHubError
from swm_hub.core.headers import read_entries
from swm_hub.results.plan import MergePlan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParamCounts:
    """Parameters in the saved weights, and before merging when every decoder layer has the same size."""

    before: int | None
    after: int

    @property
    def reduction(self) -> float | None:
        """Percent of the parameters removed."""
        return None if self.before is None else 100.0 * (self.before - self.after) / self.before

    @classmethod
    def in_folder(cls, folder: Path, plan: MergePlan) -> ParamCounts | None:
        """The counts of the folder's weights; None when it has no readable safetensors headers.

        The count before merging is the parameters outside the decoder layers plus ``num_layers`` times one
        layer; it is given only when every kept layer has the same number of parameters.
        """
        shapes = _tensor_shapes(folder)
        if not shapes:
            return None
        after = sum(prod(shape) for shape in shapes.values())
        try:
            spec = spec_for(plan.model_type)
        except SwmHubError:
            return cls(before=None, after=after)
        per_layer = [
            sum(
                prod(shape)
                for name, shape in shapes.items()
                if name.startswith(f"{spec.layers_path}.{index}.")
            )
            for index in range(plan.layers_after)
        ]
        if not per_layer or len(set(per_layer)) != 1 or per_layer[0] == 0:
            return cls(before=None, after=after)
        return cls(before=after + plan.removed * per_layer[0], after=after)


def _tensor_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name to shape, from the JSON header of each ``*.safetensors`` file (no weights are read)."""
    shapes: dict[str, list[int]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            shapes.update({entry.name: list(entry.shape) for entry in read_entries(file)})
        except CorruptWeightsError as exc:
            logger.warning("cannot read the header of %s (%s): no parameter counts in the card", file, exc)
            return {}
    return shapes
