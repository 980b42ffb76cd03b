"""``push``: upload a compressed folder, with the card stage rendering its model card for the target repo."""

from __future__ import annotations

from pathlib import Path

from swm_hub.core.options import PushOptions
from swm_hub.results.push import PushResult
from swm_hub.stages.card import render_card
from swm_hub.stages.push import push
from swm_hub.stages.push.checks import check_push_access


def check_push(options: PushOptions) -> None:
    """Refuse a push that cannot succeed (no token, no write access) before any work is done."""
    check_push_access(options.repo_id, dry_run=options.dry_run)


def push_folder(folder: Path, options: PushOptions) -> PushResult:
    """Upload ``folder`` in one commit, its card rendered for the repository it goes to."""
    return push(folder, options, card=render_card)
