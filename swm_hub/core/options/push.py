"""Where ``push`` uploads a compressed folder, and how: the repository, its branch, and commit or PR."""

from __future__ import annotations

from dataclasses import dataclass

PUSH_HELP: dict[str, str] = {
    "repo_id": "default: <user>/<base-name>-swm-<N>L",
    "private": "create the repo private",
    "revision": "branch to push to",
    "create_pr": "open a pull request instead of committing",
    "commit_message": "commit title",
    "dry_run": "list what would be uploaded, upload nothing",
}


@dataclass(frozen=True)
class PushOptions:
    """The upload's target; every field left unset takes the Hub's default (see ``stages.push.push``)."""

    repo_id: str | None = None
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    dry_run: bool = False
