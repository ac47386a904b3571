"""Domain exceptions of the trainer; they subclass AdapterError so one handler covers the CLI."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet_adapters.errors import AdapterError

if TYPE_CHECKING:
    from lorafleet_training.pii import PiiReport

MAX_LISTED_ISSUES = 50


class TrainingError(AdapterError):
    """Base class of every error raised by the trainer (bad config, bad data, PII, failed publish)."""


@dataclass(frozen=True)
class DataIssue:
    """One problem in a training file; ``line`` is 1-based (0: the file as a whole)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


class TrainingDataError(TrainingError):
    """The training data is unusable; ``issues`` lists every bad line, found before any training."""

    def __init__(self, source: str, issues: Sequence[DataIssue]) -> None:
        self.source = source
        self.issues = tuple(issues)
        shown = [str(issue) for issue in self.issues[:MAX_LISTED_ISSUES]]
        more = len(self.issues) - len(shown)
        lines = [f"{source}: {len(self.issues)} problem(s) in the training data:", *(f"  {s}" for s in shown)]
        if more > 0:
            lines.append(f"  ... and {more} more")
        super().__init__("\n".join(lines))


class PiiFound(TrainingError):
    """The data holds personal data and the PII mode is 'refuse'; ``report`` says what was found where."""

    def __init__(self, report: PiiReport) -> None:
        self.report = report
        super().__init__(report.describe())


class OutputNotPlaced(TrainingError):
    """Training finished but its output could not be moved into ``--out``; the complete, verified output
    is kept at ``staged`` (it was deleted with the error)."""

    def __init__(self, out_dir: Path, staged: Path, cause: BaseException) -> None:
        self.out_dir = out_dir
        self.staged = staged
        super().__init__(
            f"the trained output could not be moved into {out_dir}: {cause}; it is kept, complete and verified, at "
            f"{staged}: move it where you want it (mv {staged} <dir>) or publish it from there "
            f"(`lorafleet publish {staged}`)"
        )
