"""``heal``: the heal stage, handed the card writer and, with ``compare``, the healed drop baseline's comparison."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from swm_hub.core.model import LoadedModel
from swm_hub.core.options import HealOptions
from swm_hub.core.texts import TextSource
from swm_hub.pipeline.heal_comparison import HealComparer
from swm_hub.stages.card import write_card
from swm_hub.stages.heal import ComparerFactory, HealResult, StepReport
from swm_hub.stages.heal import heal as heal_stage


def heal(
    folder: Path,
    out: Path | None = None,
    options: HealOptions | None = None,
    overwrite: bool = False,
    resume: bool = False,
    keep_adapter: bool = False,
    progress: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
    compare: bool = False,
    heldout: Path | None = None,
) -> HealResult:
    """Heal ``folder`` into ``out`` (see ``stages.heal.heal``) and write the healed folder's card.

    With ``compare``, the block-influence drop baseline is healed the same way and held-out perplexity before
    and after healing (on ``heldout``, default the shipped held-out split, in blocks of the training length)
    is saved as ``heal.json``, which the card shows.
    """
    options = options or HealOptions()
    return heal_stage(
        folder,
        out,
        options,
        overwrite,
        resume,
        keep_adapter,
        progress,
        on_step,
        compare=_comparer(options, heldout, progress) if compare else None,
        card=_write_card,
    )


def _comparer(options: HealOptions, heldout: Path | None, progress: bool) -> ComparerFactory:
    text = TextSource(path=heldout, split="heldout")

    def make(base: LoadedModel) -> HealComparer:
        return HealComparer(base, text, seq_len=options.seq_len, progress=progress)

    return make


def _write_card(folder: Path, name: str) -> None:
    write_card(folder, name=name)
