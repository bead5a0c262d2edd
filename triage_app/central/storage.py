"""Received cases, stored exactly once: files in a cases folder, facts in the central database.

Why this order: the de-identified DICOM, the result JSON and the envelope's signed header are
written (temporary files, fsync, rename, folder fsync) *before* the row commits, and the server
answers 201 only after the commit. So a receipt always means the files are on disk, and a crash in
between leaves files without a row, which the server removes when it starts next
(:meth:`CentralStore.remove_crash_leftovers`, with any temporary files a crash left). The
temporary files can be written before the checks are done (:meth:`CentralStore.stage`: the
server writes and fsyncs a 20 MB image while the payload hash is being checked); they take their
place only with the row, and are removed otherwise.

Exactly-once is by ``case_id`` (DESIGN 4.2: a re-sent image is the same case): a repeat from the
same device with the same ``payload_sha256`` only counts another delivery and keeps the first
``received_at``; the same case from another device or with another payload is a conflict; an
``envelope_id`` already used for another case is a replay. The checks and the writes run inside
one ``BEGIN IMMEDIATE`` transaction, so two deliveries of one case cannot both be "first".

Privacy: the payload is de-identified on the device, but this module still logs case ids,
device ids and counts only.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

from triage_app.central.config import CentralConfig
from triage_app.central.db import CentralDB
from triage_app.central.errors import CaseConflictError, ReplayedEnvelopeError
from triage_app.central.registry import DeviceRegistry
from triage_app.errors import StoreError
from triage_app.escalation.envelope import (
    BytesLike,
    OpenedEnvelope,
    format_timestamp,
    is_case_id,
)
from triage_app.paths import fsync_dir
from triage_app.results import ModelRef

log = logging.getLogger(__name__)

DICOM_FILE = "image.dcm"
RESULT_FILE = "result.json"
SIGNED_HEADER_FILE = "signed_header.bin"  # the envelope's signed part: proof of the sender
_CASE_FILES = (DICOM_FILE, RESULT_FILE, SIGNED_HEADER_FILE)
#: The temporary names :meth:`StagedFiles.begin` gives (``.<name>.<16 hex>.tmp``).
_TEMP_NAME = re.compile(
    r"\.(?:" + "|".join(re.escape(name) for name in _CASE_FILES) + r")\.[0-9a-f]{16}\.tmp"
)


def utc_now_text() -> str:
    """UTC to the second, as the protocol writes times (``YYYY-MM-DDTHH:MM:SSZ``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Delivery:
    """What a receipt states about a stored case (all but the server's id and signature)."""

    case_id: str
    device_id: str
    envelope_id: str  # of the first delivery: a repeat gets the same receipt
    payload_sha256: str
    received_at: str  # the first arrival
    deliveries: int


@dataclass(frozen=True)
class Verdict:
    """The central model's answer for one case."""

    case_id: str
    verdict: str  # a label of the model, "normal" or "abnormal" for the chest models
    score: float  # calibrated probability of the model's positive label
    probabilities: dict[str, float]
    model: ModelRef
    decided_at: str

    def to_json(self) -> dict[str, Any]:
        """The body of ``GET /v1/cases/{case_id}/verdict`` (protocol, "Central API")."""
        return {
            "case_id": self.case_id,
            "verdict": self.verdict,
            "score": round(self.score, 6),
            "model": self.model.to_json(),
            "decided_at": self.decided_at,
        }


@dataclass(frozen=True)
class VerdictFailure:
    """Why the central model could not decide a case (an input error code and its message)."""

    case_id: str
    code: str
    message: str
    at: str


@dataclass(frozen=True)
class CentralCase:
    """A received case as ``central cases --json`` lists it."""

    case_id: str
    device_id: str
    payload_sha256: str
    payload_bytes: int
    received_at: str
    last_received_at: str
    deliveries: int
    verdict: Verdict | None

    def to_json(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "device_id": self.device_id,
            "payload_sha256": self.payload_sha256,
            "payload_bytes": self.payload_bytes,
            "received_at": self.received_at,
            "last_received_at": self.last_received_at,
            "deliveries": self.deliveries,
            "verdict": None if self.verdict is None else self.verdict.verdict,
            "score": None if self.verdict is None else round(self.verdict.score, 6),
            "model": None if self.verdict is None else self.verdict.model.to_json(),
            "decided_at": None if self.verdict is None else self.verdict.decided_at,
        }


class CentralStore:
    """The central database (cases, envelopes, verdicts, devices) and the cases folder.

    Thread-safe: the API's request threads and the verdict worker share one instance.
    """

    def __init__(self, db: CentralDB, cases_dir: Path) -> None:
        """Use :meth:`open` instead."""
        self._db = db
        self.cases_dir = cases_dir
        self.registry = DeviceRegistry(db)

    @classmethod
    def open(cls, db_path: Path, cases_dir: Path) -> CentralStore:
        """Open (or create) the database and the cases folder (0700)."""
        try:
            cases_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"central store: could not create {cases_dir}: {exc}") from exc
        return cls(CentralDB.open(db_path), cases_dir)

    @classmethod
    def for_config(cls, config: CentralConfig) -> CentralStore:
        """The store in the server's data folder."""
        return cls.open(config.db_path, config.cases_dir)

    def close(self) -> None:
        self._db.close()

    def remove_crash_leftovers(self) -> None:
        """Remove what deliveries cut off by a crash left: staged temporary files (up to a whole
        image each) and case folders without a row (files published, row never committed).

        Only for a server that is starting: a delivery in progress has such files too. Each
        folder's row is looked up in a write transaction, and :meth:`accept` renames files and
        commits the row in one, so a folder is never taken between the two (by another process
        either). Only entries of the store's own naming go, symlinks are never followed, and a
        folder holding anything else is left in place.
        """
        temp_files = folders = 0
        try:
            with os.scandir(self.cases_dir) as entries:
                case_folders = [
                    Path(e.path)
                    for e in entries
                    if is_case_id(e.name) and e.is_dir(follow_symlinks=False)
                ]
            for folder in case_folders:
                temp_files += _remove_files(folder, _TEMP_NAME.fullmatch)
                with self._db.write(f"look up case {folder.name}") as conn:
                    row = conn.execute(
                        "SELECT 1 FROM cases WHERE case_id = ?", (folder.name,)
                    ).fetchone()
                    if row is None:
                        _remove_files(folder, lambda name: name in _CASE_FILES)
                        folders += _remove_empty_folder(folder)
        except OSError as exc:
            raise StoreError(
                f"central store: could not remove crash leftovers in {self.cases_dir}: "
                f"{exc.strerror}"
            ) from exc
        log.info(
            "central store: removed %d staged temporary files and %d case folders without a row",
            temp_files,
            folders,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- receiving ---------------------------------------------------------------------------

    @contextmanager
    def stage(
        self, case_id: str, signed_header: bytes, payload: tuple[bytes, memoryview] | None
    ) -> Iterator[StagedFiles | None]:
        """Write a new case's files (``payload`` is its result JSON and image) durably under
        temporary names, for :meth:`accept` to put in place with the row; whatever is not put
        in place is removed on leaving. Nothing is written for a case stored already (a repeat
        delivery) or without a payload. Raises a retryable :class:`StoreError`.
        """
        case_id = _checked_case_id(case_id)
        with self._db.read(f"read case {case_id}") as conn:
            stored = conn.execute("SELECT 1 FROM cases WHERE case_id = ?", (case_id,)).fetchone()
        if stored is not None or payload is None:
            yield None
            return
        with self._staged(case_id, signed_header, *payload) as staged:
            yield staged

    @contextmanager
    def _staged(
        self, case_id: str, signed_header: bytes, result_json: bytes, dicom: memoryview
    ) -> Iterator[StagedFiles]:
        staged = StagedFiles(self.cases_dir, case_id)
        try:
            staged.write(
                {DICOM_FILE: dicom, RESULT_FILE: result_json, SIGNED_HEADER_FILE: signed_header}
            )
            yield staged
        finally:
            staged.discard()

    @contextmanager
    def stage_stream(self, case_id: str) -> Iterator[StagedFiles | None]:
        """As :meth:`stage`, for a payload that is still arriving: the caller writes the files
        (:meth:`StagedFiles.begin`, :meth:`StagedFiles.append`, :meth:`StagedFiles.write`)
        before :meth:`accept`; None for a case stored already (nothing to write)."""
        case_id = _checked_case_id(case_id)
        with self._db.read(f"read case {case_id}") as conn:
            stored = conn.execute("SELECT 1 FROM cases WHERE case_id = ?", (case_id,)).fetchone()
        if stored is not None:
            yield None
            return
        staged = StagedFiles(self.cases_dir, case_id)
        try:
            yield staged
        finally:
            staged.discard()

    def check_new_envelope(self, case_id: str, device_id: str, envelope_id: str) -> None:
        """The refusals :meth:`accept` would give that the signed header alone decides: a
        replayed ``envelope_id``, or the case stored from another device. For refusing before
        the body is read; :meth:`accept` checks again in its transaction."""
        case_id = _checked_case_id(case_id)
        with self._db.read(f"read case {case_id}") as conn:
            seen = conn.execute(
                "SELECT case_id FROM envelopes WHERE envelope_id = ?", (envelope_id,)
            ).fetchone()
            row = conn.execute(
                "SELECT device_id FROM cases WHERE case_id = ?", (case_id,)
            ).fetchone()
        if seen is not None and seen["case_id"] != case_id:
            raise ReplayedEnvelopeError(
                f"envelope {envelope_id} was already delivered for another case"
            )
        if row is not None and row["device_id"] != device_id:
            raise CaseConflictError(f"case {case_id} was received from another device")

    def accept(
        self, opened: OpenedEnvelope, staged: StagedFiles | None = None
    ) -> tuple[Delivery, bool]:
        """Store an opened, verified envelope once; return its delivery facts and whether it
        is the first delivery of this case.

        ``staged`` holds the case's files from :meth:`stage`; without them, a new case's files
        are written here.

        Raises
        ------
        ReplayedEnvelopeError
            ``header.envelope_id`` was accepted before for another case.
        CaseConflictError
            The case is stored from another device or with another payload.
        StoreError
            A file or the database could not be written: nothing was committed, retry later.
        """
        header = opened.header
        case_id = _checked_case_id(header.case_id)
        with self._db.write(f"store case {case_id}") as conn:
            seen = conn.execute(
                "SELECT case_id FROM envelopes WHERE envelope_id = ?", (header.envelope_id,)
            ).fetchone()
            if seen is not None and seen["case_id"] != case_id:
                raise ReplayedEnvelopeError(
                    f"envelope {header.envelope_id} was already delivered for another case"
                )
            row = conn.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
            now = utc_now_text()
            if row is not None:
                if row["device_id"] != header.device_id:
                    raise CaseConflictError(f"case {case_id} was received from another device")
                if row["payload_sha256"] != header.payload_sha256:
                    raise CaseConflictError(f"case {case_id} was received with another payload")
                conn.execute(
                    "UPDATE cases SET deliveries = deliveries + 1, last_received_at = ? "
                    "WHERE case_id = ?",
                    (now, case_id),
                )
                self._note_envelope(conn, header.envelope_id, case_id, now, seen is None)
                delivery = _delivery(
                    conn.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
                )
                first = False
            else:
                if staged is None:
                    with self._staged(
                        case_id, opened.signed_header, opened.result_json, opened.dicom
                    ) as written:
                        written.publish()
                else:
                    staged.publish()
                conn.execute(
                    """
                    INSERT INTO cases (case_id, device_id, envelope_id, payload_sha256,
                                       payload_bytes, server_key_id, created_at, received_at,
                                       last_received_at, deliveries)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1)
                    """,
                    (
                        case_id,
                        header.device_id,
                        header.envelope_id,
                        header.payload_sha256,
                        header.payload_bytes,
                        header.server_key_id,
                        format_timestamp(header.created_at),
                        now,
                        now,
                    ),
                )
                self._note_envelope(conn, header.envelope_id, case_id, now, True)
                delivery = Delivery(
                    case_id,
                    header.device_id,
                    header.envelope_id,
                    header.payload_sha256,
                    now,
                    1,
                )
                first = True
        if first:
            log.info("case %s stored (device %s)", case_id, header.device_id)
        else:
            log.info(
                "case %s delivered again (device %s, delivery %d)",
                case_id,
                header.device_id,
                delivery.deliveries,
            )
        return delivery, first

    @staticmethod
    def _note_envelope(
        conn: sqlite3.Connection, envelope_id: str, case_id: str, at: str, new: bool
    ) -> None:
        if new:
            conn.execute(
                "INSERT INTO envelopes (envelope_id, case_id, received_at) VALUES (?, ?, ?)",
                (envelope_id, case_id, at),
            )

    # --- verdicts ----------------------------------------------------------------------------

    def set_verdict(self, verdict: Verdict) -> None:
        """Keep the model's verdict for a stored case (the latest one wins)."""
        with self._db.write(f"store the verdict of case {verdict.case_id}") as conn:
            conn.execute(
                """
                INSERT OR REPLACE INTO verdicts (case_id, verdict, score, probabilities_json,
                                                 model_name, model_version, model_sha256,
                                                 decided_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                """,
                (
                    verdict.case_id,
                    verdict.verdict,
                    verdict.score,
                    json.dumps(verdict.probabilities, sort_keys=True),
                    verdict.model.name,
                    verdict.model.version,
                    verdict.model.sha256,
                    verdict.decided_at,
                ),
            )
        log.info("case %s: verdict %s", verdict.case_id, verdict.verdict)

    def set_verdict_failure(self, failure: VerdictFailure) -> None:
        """Keep why a case cannot be decided, so that it is answered rather than left pending."""
        with self._db.write(f"store the verdict failure of case {failure.case_id}") as conn:
            conn.execute(
                "INSERT OR REPLACE INTO verdict_failures (case_id, code, message, at) "
                "VALUES (?, ?, ?, ?)",
                (failure.case_id, failure.code, failure.message, failure.at),
            )

    def get_verdict_failure(self, case_id: str) -> VerdictFailure | None:
        with self._db.read(f"read the verdict failure of case {case_id}") as conn:
            row = conn.execute(
                "SELECT * FROM verdict_failures WHERE case_id = ?", (case_id,)
            ).fetchone()
        return None if row is None else VerdictFailure(**dict(row))

    def get_verdict(self, case_id: str) -> Verdict | None:
        with self._db.read(f"read the verdict of case {case_id}") as conn:
            row = conn.execute("SELECT * FROM verdicts WHERE case_id = ?", (case_id,)).fetchone()
        return None if row is None else _verdict(row)

    def without_verdict(self) -> list[str]:
        """Case ids still waiting for the model, oldest first (to resume after a restart)."""
        with self._db.read("list cases without a verdict") as conn:
            rows = conn.execute(
                "SELECT c.case_id FROM cases c"
                " LEFT JOIN verdicts v USING (case_id)"
                " LEFT JOIN verdict_failures f USING (case_id)"
                " WHERE v.case_id IS NULL AND f.case_id IS NULL"
                " ORDER BY c.received_at, c.rowid"
            ).fetchall()
        return [r["case_id"] for r in rows]

    # --- reads -------------------------------------------------------------------------------

    def case_dir(self, case_id: str) -> Path:
        return self.cases_dir / _checked_case_id(case_id)

    def read_dicom(self, case_id: str) -> bytes:
        """The stored de-identified DICOM of a case (for the central model)."""
        try:
            return (self.case_dir(case_id) / DICOM_FILE).read_bytes()
        except OSError as exc:
            raise StoreError(f"central store: could not read the image of case {case_id}") from exc

    def get_case(self, case_id: str) -> CentralCase | None:
        with self._db.read(f"read case {case_id}") as conn:
            row = conn.execute(f"{_CASES_SELECT} WHERE c.case_id = ?", (case_id,)).fetchone()
        return None if row is None else _central_case(row)

    def cases(self) -> list[CentralCase]:
        """Every received case, oldest first."""
        with self._db.read("list cases") as conn:
            rows = conn.execute(f"{_CASES_SELECT} ORDER BY c.received_at, c.rowid").fetchall()
        return [_central_case(r) for r in rows]

    def ping(self) -> None:
        """Read one row: a store that cannot be read now raises ``StoreError``."""
        with self._db.read("check the store") as conn:
            conn.execute("SELECT 1 FROM cases LIMIT 1").fetchall()

    def count(self) -> int:
        with self._db.read("count cases") as conn:
            n: int = conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
        return n


_CASES_SELECT = (
    "SELECT c.*, v.verdict, v.score, v.probabilities_json, v.model_name, v.model_version, "
    "v.model_sha256, v.decided_at FROM cases c LEFT JOIN verdicts v USING (case_id)"
)


class StagedFiles:
    """A case's files written and fsynced under temporary names in its folder, until
    :meth:`publish` renames them into place (and syncs the folder) or :meth:`discard` removes
    them. Any failure to write is a retryable :class:`StoreError`.
    """

    def __init__(self, cases_dir: Path, case_id: str) -> None:
        self.case_id = case_id
        self._cases_dir = cases_dir
        self._folder = cases_dir / case_id
        self._created = False
        self._pending: dict[Path, Path] = {}  # temporary name -> final name
        self._open: list[int] = []  # descriptors of files being written
        self._folder_checked = False

    def write(self, files: dict[str, BytesLike]) -> None:
        """Write every file, then fsync them all at once, with any file :meth:`begin` opened
        (see :func:`_fsync_together`), and close them."""
        try:
            for name, data in files.items():
                fd = self.begin(name)
                self.append(fd, data)
            _fsync_together(self._open)
        except OSError as exc:
            self._failed(exc)
        finally:
            self._close()

    def begin(self, name: str) -> int:
        """Create the temporary file for ``name``: its descriptor, for :meth:`append` as the
        bytes arrive; :meth:`write` syncs and closes it (:meth:`discard` if it never runs)."""
        try:
            if not self._folder_checked:
                self._created = not self._folder.exists()
                self._folder.mkdir(mode=0o700, exist_ok=True)
                self._folder_checked = True
            tmp = self._folder / f".{name}.{secrets.token_hex(8)}.tmp"  # see _TEMP_NAME
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o600)
        except OSError as exc:
            self._failed(exc)
        self._open.append(fd)
        self._pending[tmp] = self._folder / name
        return fd

    def append(self, fd: int, data: BytesLike, *, start_writeback: bool = False) -> None:
        """Write all of ``data`` to a file :meth:`begin` opened.

        ``start_writeback`` asks the kernel to start writing these bytes to disk now
        (``POSIX_FADV_DONTNEED`` starts writeback of dirty pages without waiting for it, and
        drops only pages that are clean), so that the final fsync of a file that arrived over
        the network finds little left to write. Only a hint: durability is still the fsync's.
        """
        try:
            with memoryview(data) as view:
                while view:
                    view = view[os.write(fd, view) :]
        except OSError as exc:
            self._failed(exc)
        if start_writeback and _FADVISE is not None:
            with suppress(OSError):
                end = os.lseek(fd, 0, os.SEEK_CUR)
                _FADVISE(fd, end - len(data), len(data), os.POSIX_FADV_DONTNEED)

    def _close(self) -> None:
        for fd in self._open:
            with suppress(OSError):
                os.close(fd)
        self._open.clear()

    def publish(self) -> None:
        """Rename every file into place and make the names durable (and the folder's own)."""
        try:
            for tmp, final in list(self._pending.items()):
                tmp.replace(final)
                del self._pending[tmp]
            fsync_dir(self._folder)
            # Whoever made the folder (another delivery of the case may have), its name too.
            fsync_dir(self._cases_dir)
            self._created = False  # the folder is the case's now
        except OSError as exc:
            self._failed(exc)

    def discard(self) -> None:
        """Remove what was not put in place, and the folder if this made it and it is empty."""
        self._close()
        for tmp in self._pending:
            with suppress(OSError):
                tmp.unlink()
        self._pending.clear()
        if self._created:
            with suppress(OSError):  # not empty: another delivery of the case uses it
                self._folder.rmdir()

    def _failed(self, exc: OSError) -> NoReturn:
        log.error("case %s: could not write its files: %s", self.case_id, exc.strerror)
        raise StoreError(
            f"central store: could not write the files of case {self.case_id}"
        ) from exc


_FADVISE = getattr(os, "posix_fadvise", None)


def _fsync_together(descriptors: list[int]) -> None:
    """fsync the files at once, the first here and the others in helper threads.

    Why: one after the other, each fsync waits for a journal commit of its own; issued together,
    the filesystem makes them durable in one (ext4: a 20 MB image and two small files take about
    the time of the image's alone). Durability is the same: each call returns once its file is.
    """
    errors: list[OSError] = []

    def sync(fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as exc:
            errors.append(exc)

    helpers = [threading.Thread(target=sync, args=(fd,), daemon=True) for fd in descriptors[1:]]
    for helper in helpers:
        helper.start()
    try:
        if descriptors:
            os.fsync(descriptors[0])
    finally:
        for helper in helpers:
            helper.join()
    if errors:
        raise errors[0]


def _remove_files(folder: Path, wanted: Callable[[str], object]) -> int:
    """Remove the regular files in ``folder`` whose name is ``wanted``; return how many."""
    removed = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if wanted(entry.name) and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink()
                removed += 1
    return removed


def _remove_empty_folder(folder: Path) -> int:
    """Remove a case folder without a row once its files are gone: 1, or 0 if it holds more."""
    try:
        folder.rmdir()
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        log.warning(
            "case folder %s has no row but holds files the store did not write; left in place",
            folder.name,
        )
        return 0
    return 1


def _checked_case_id(case_id: str) -> str:
    """Refuse anything but 64 lower-case hex: the id becomes a folder name."""
    if not is_case_id(case_id):
        raise StoreError("central store: a case id must be 64 lower-case hex characters")
    return case_id


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        case_id=row["case_id"],
        device_id=row["device_id"],
        envelope_id=row["envelope_id"],
        payload_sha256=row["payload_sha256"],
        received_at=row["received_at"],
        deliveries=row["deliveries"],
    )


def _verdict(row: sqlite3.Row) -> Verdict:
    return Verdict(
        case_id=row["case_id"],
        verdict=row["verdict"],
        score=row["score"],
        probabilities=json.loads(row["probabilities_json"]),
        model=ModelRef(row["model_name"], row["model_version"], row["model_sha256"]),
        decided_at=row["decided_at"],
    )


def _central_case(row: sqlite3.Row) -> CentralCase:
    return CentralCase(
        case_id=row["case_id"],
        device_id=row["device_id"],
        payload_sha256=row["payload_sha256"],
        payload_bytes=row["payload_bytes"],
        received_at=row["received_at"],
        last_received_at=row["last_received_at"],
        deliveries=row["deliveries"],
        verdict=None if row["verdict"] is None else _verdict(row),
    )
