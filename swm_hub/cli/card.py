"""``swm-hub card``: the model card, from what the folder holds."""

from __future__ import annotations

from typing import Annotated

import typer

from swm_hub.cli.common import FolderArg, echo

EXAMPLES = """\b
Examples:
  swm-hub card smollm2-swm-24L
  swm-hub card smollm2-swm-24L --repo-id me/smollm2-swm-24L
"""


def card(
    model_dir: FolderArg,
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="the Hub repo the card will live in", show_default=False)
    ] = None,
) -> None:
    """Write the model card (README.md) from what the folder holds: plan, similarity, eval.json, bench.json.

    Only measured results appear; a section whose file is missing is left out, never filled in.
    """
    from swm_hub.stages.card import write_card

    echo(f"wrote {write_card(model_dir, repo_id)}")
