"""Where ``push`` uploads a compressed folder, and how: the repository, its branch, and commit or PR."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PushOptions:
    """The upload's target; every field left unset takes the Hub's default (see ``stages.push.push``)."""

    repo_id: str | None = None
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    dry_run: bool = False
