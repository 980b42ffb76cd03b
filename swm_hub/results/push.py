"""What a push uploaded (or, for a dry run, would upload): the push stage's result, printed by the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_MB = 2**20


@dataclass(frozen=True)
class UploadFile:
    """One file of the commit: its path in the repository, its size, and its local source.

    ``source`` is None for a file rendered in memory (the model card).
    """

    path_in_repo: str
    size: int
    source: Path | None


@dataclass(frozen=True)
class PushResult:
    """What was (or, for a dry run, would be) uploaded, and where it went."""

    repo_id: str
    revision: str | None
    create_pr: bool
    dry_run: bool
    files: tuple[UploadFile, ...]
    repo_url: str | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    changed: bool = True

    @property
    def total_bytes(self) -> int:
        return sum(file.size for file in self.files)

    def lines(self) -> list[str]:
        """What the CLI prints: one line per file for a dry run, the commit and PR links after a push."""
        where = self.repo_id + (f" (revision {self.revision})" if self.revision else "")
        how = " as a pull request" if self.create_pr else ""
        size = size_text(self.total_bytes)
        if self.dry_run:
            lines = [f"dry run: would upload {len(self.files)} files ({size}) to {where}{how} in one commit:"]
            width = max((len(file.path_in_repo) for file in self.files), default=0)
            for file in self.files:
                generated = "  (model card, generated)" if file.source is None else ""
                lines.append(f"  {file.path_in_repo.ljust(width)}  {size_text(file.size):>10}{generated}")
            return lines
        if not self.changed:
            return [
                f"nothing to push: {where} already holds these {len(self.files)} files ({size}); "
                f"no commit{' or pull request' if self.create_pr else ''} was made"
            ]
        lines = [f"uploaded {len(self.files)} files ({size}) to {where}{how}"]
        if self.commit_url:
            lines.append(f"commit: {self.commit_url}")
        if self.pr_url:
            lines.append(f"pull request: {self.pr_url}")
        return lines


def size_text(size: int) -> str:
    """A file size the way the push lines print it: MB from a tenth of one, kB below."""
    return f"{size / _MB:.1f} MB" if size >= _MB / 10 else f"{size / 1024:.1f} kB"
