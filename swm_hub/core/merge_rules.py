"""The merge rules by name: what each does and where it comes from.

The names and descriptions live in the core because options, the plan and the model card check and show
them; how each rule combines weights belongs to the merge stage (``stages/merge/rules.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

PAPER_URL = "https://arxiv.org/abs/2502.19159"
LACO_URL = "https://arxiv.org/abs/2402.11187"
SHORTGPT_URL = "https://arxiv.org/abs/2403.03853"


@dataclass(frozen=True)
class MergeRule:
    """How a window's parameters become one layer's.

    Attributes:
        name: the rule's name, as ``--merge`` takes it.
        refit: whether the MLP output projection is then refitted on calibration data.
        summary: one line for help texts and model cards.
        reference: where the rule comes from.
    """

    name: str
    refit: bool
    summary: str
    reference: str


MERGE_RULES: Mapping[str, MergeRule] = {
    "fit": MergeRule(
        "fit",
        refit=True,
        summary="lowest layer's weights refitted to reproduce the window's output on calibration data: the MLP "
        "output projection by ridge regression, or, where a norm follows the MLP, the MLP and norm weights by "
        "gradient steps",
        reference=PAPER_URL,
    ),
    "laco": MergeRule(
        "laco",
        refit=False,
        summary="lowest layer plus the sum of each layer's difference from it (the paper's consolidation, LaCo style)",
        reference=LACO_URL,
    ),
    "swm-code": MergeRule(
        "swm-code",
        refit=False,
        summary="the public SWM code's running-difference loop (the top layer's attention and MLP weights)",
        reference=PAPER_URL,
    ),
    "mean": MergeRule("mean", refit=False, summary="average of the window's weights", reference=PAPER_URL),
    "drop": MergeRule(
        "drop",
        refit=False,
        summary="lowest layer as it is; the rest of the window is dropped",
        reference=SHORTGPT_URL,
    ),
}
