"""Importing files a clinician opens: progress, cooperative cancel and a closing summary.

The desktop app (File → Open, drag and drop) needs more than ``batch.triage_and_record``: a
determinate count before the first result ("0 / 1,200"), one record per file as it lands in the
case store, a way to stop early, and a summary that says what was skipped and why. This module
adds exactly that around the same loop every other shell runs, and knows nothing of Qt, so a
GUI worker thread only forwards the records it yields.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from triage_app.batch import triage_and_record
from triage_app.config import Settings
from triage_app.escalation.service import open_escalation
from triage_app.inputs import expand_inputs
from triage_app.results import CaseResult, InputOutcome

__all__ = [
    "ImportProgress",
    "ImportRun",
    "ImportSummary",
    "SkippedInput",
    "describe_code",
]

log = logging.getLogger(__name__)

# Error codes as a clinician reads them; any other code is shown with its underscores as spaces.
_CODE_WORDS = {
    "not_dicom": "not DICOM",
    "empty_file": "empty file",
    "invalid_dicom": "invalid DICOM",
    "no_pixel_data": "no pixel data",
    "unsupported_transfer_syntax": "unsupported compression",
    "corrupt_pixel_data": "corrupt pixel data",
    "unsupported_photometric": "unsupported colour format",
    "unprocessable_image": "image cannot be analysed",
    "processing_failed": "could not be processed",
    "worker_crashed": "crashed the reader",
}


def describe_code(code: str) -> str:
    """The words for an error code, e.g. ``not_dicom`` → ``not DICOM``."""
    return _CODE_WORDS.get(code, code.replace("_", " "))


@dataclass(frozen=True)
class ImportProgress:
    """One step of an import: ``done`` of ``total`` files handled, the last one ``current``.

    The first record of a run has ``done == 0`` and no outcome: the total is known then.
    """

    done: int
    total: int
    current: Path | None
    outcome: InputOutcome | None


@dataclass(frozen=True)
class SkippedInput:
    path: str
    code: str
    message: str


@dataclass(frozen=True)
class ImportSummary:
    """What an import did: cases imported (by decision), files skipped (with codes), the rest."""

    total: int
    imported: int
    decisions: dict[str, int] = field(default_factory=dict)
    skipped: tuple[SkippedInput, ...] = ()
    cancelled: bool = False

    @property
    def not_processed(self) -> int:
        """Files never looked at because the import was cancelled."""
        return self.total - self.imported - len(self.skipped)

    def skipped_by_code(self) -> dict[str, int]:
        return dict(Counter(s.code for s in self.skipped).most_common())

    def headline(self) -> str:
        """One line, e.g. ``1,188 imported, 12 skipped: not DICOM``."""
        text = f"{self.imported:,} imported"
        if self.skipped:
            reasons = self.skipped_by_code()
            if len(reasons) == 1:
                text += f", {len(self.skipped):,} skipped: {describe_code(next(iter(reasons)))}"
            else:
                parts = ", ".join(f"{n:,} {describe_code(code)}" for code, n in reasons.items())
                text += f", {len(self.skipped):,} skipped ({parts})"
        if self.cancelled:
            text += f"; cancelled, {self.not_processed:,} not processed"
        return text

    def details(self) -> str:
        """One line per skipped file: its path, the reason and the reader's message."""
        return "\n".join(
            f"{s.path}: {describe_code(s.code)} ({s.code}): {s.message}" for s in self.skipped
        )


class ImportRun:
    """One import of files and folders; iterate it for progress, then read :attr:`summary`.

    ``cancel`` is checked after every file: once it is set, no further result is recorded and
    the worker processes are stopped. Escalated cases are queued for the central server when
    one is configured, exactly as ``triage-app classify`` does.
    """

    def __init__(
        self,
        paths: Iterable[str | os.PathLike[str]],
        settings: Settings,
        *,
        cancel: threading.Event | None = None,
        escalate: bool = True,
    ) -> None:
        self._paths = list(paths)
        self._settings = settings
        self.cancel = cancel or threading.Event()
        self._escalate = escalate
        self.summary: ImportSummary | None = None

    def __iter__(self) -> Iterator[ImportProgress]:
        files = expand_inputs(self._paths)
        total = len(files)
        yield ImportProgress(0, total, None, None)
        decisions: Counter[str] = Counter()
        skipped: list[SkippedInput] = []
        cancelled = self.cancel.is_set()
        link = open_escalation(self._settings) if self._escalate and not cancelled else None
        try:
            if not cancelled:
                queue = link.queue if link is not None else None
                # Closing the generator on cancel stops the workers.
                records = triage_and_record(files, self._settings, queue=queue)
                with closing(records) as outcomes:
                    for done, outcome in enumerate(outcomes, start=1):
                        if isinstance(outcome, CaseResult):
                            decisions[outcome.decision] += 1
                        else:
                            skipped.append(
                                SkippedInput(outcome.path, outcome.code, outcome.message)
                            )
                        yield ImportProgress(done, total, Path(outcome.path), outcome)
                        if self.cancel.is_set():
                            cancelled = done < total
                            break
        finally:
            if link is not None:
                link.close()
            self.summary = ImportSummary(
                total=total,
                imported=sum(decisions.values()),
                decisions=dict(decisions),
                skipped=tuple(skipped),
                cancelled=cancelled,
            )
        log.info("import finished: %s", self.summary.headline())
