"""The DICOM C-STORE receiver: a scanner pushes images, the receiver spools them for triage.

Why it is built this way:

* **Ack only what is durable, and ack fast.** A scanner deletes or forgets an image once it has
  a success status, so each instance is written as received (no decode, no re-encode) to a
  temp file, fsync-ed, renamed into place and its folder fsync-ed before ``0x0000`` goes back.
  Triage runs later, elsewhere: the answer never waits for the model.
* **Idempotent spool names.** ``incoming/<study-key>/<sop-key>.dcm``, the keys being a hash of
  the UIDs (names on disk should not carry identifiers). A re-sent instance replaces itself, so
  a re-sent study never doubles the spool, and the case store is idempotent on ``case_id``
  further down, so it never doubles a case either.
* **Studies, not single images.** Instances are grouped per study until no new one has arrived
  for ``receiver.study_quiet_s`` (:class:`StudyGrouper`); files left in the spool by a crash are
  handed over again at start-up. A study that never goes quiet (a long acquisition, a scanner
  re-sending in a loop) is handed over anyway once its oldest waiting instance is
  ``receiver.study_max_wait_s`` old, so the radiographer is never left waiting for ever.
* **A disk reserve.** Below ``receiver.min_free_mb`` the receiver refuses with Out of Resources
  (0xA700), which scanners retry later, and logs one ``ALARM`` per low-disk episode, instead of
  filling the disk that the case store and the outbox also need. Filed images leave ``done/``
  only after ``intake.done_retention_days`` (:mod:`triage_app.retention`; 0 keeps them).

Logs name counts, statuses, AE titles and peer addresses, never UIDs or header values.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import shutil
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Self, cast

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.events import Event
from pynetdicom.transport import AssociationServer

from triage_app.config import Settings
from triage_app.dicom.reader import quiet_pydicom, read_dataset
from triage_app.errors import ConfigError, InputError, ReceiverError
from triage_app.escalation.queueing import EscalationQueue
from triage_app.intake import FiledOutcome, Intake, IntakeLayout, Unfiled
from triage_app.paths import (
    FOLDER_ACCESS,
    denied_because,
    ensure_private_dir,
    fsync_dir,
    write_private_file,
)
from triage_app.retention import DoneRetention, ResealCases
from triage_app.secrets import load_or_create_site_secret

# pynetdicom's state for "awaiting transport connection close" (PS3.8 Sta13).
_AWAITING_CLOSE = "Sta13"
# How long a stopping receiver lets open associations end by themselves before aborting them.
_CLOSE_GRACE_S = 1.0
# Ports below this one need CAP_NET_BIND_SERVICE (Linux's net.ipv4.ip_unprivileged_port_start).
_PRIVILEGED_PORTS_BELOW = 1024
# The registered DICOM port (IANA "dicom-iscl") for those that cannot use 104.
_UNPRIVILEGED_DICOM_PORT = 11112
_DENIED = frozenset({errno.EACCES, errno.EPERM})

__all__ = [
    "TRANSFER_SYNTAXES",
    "DicomReceiver",
    "StudyGrouper",
    "free_disk_bytes",
    "run_receiver",
    "spool_key",
]

log = logging.getLogger(__name__)

# C-STORE response statuses (PS3.4 B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210

VERIFICATION = "1.2.840.10008.1.1"  # the SOP class of C-ECHO

# Refusal reasons, as counted in ``instances_refused``.
LOW_DISK = "low_disk"
WRITE_FAILED = "write_failed"
INVALID_DATASET = "invalid_dataset"

#: What the receiver accepts for every storage SOP class: uncompressed, deflated and the common
#: compressed syntaxes (the pipeline decodes all of them).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

SPOOL_SUFFIX = ".dcm"


def spool_key(uid: str) -> str:
    """The on-disk name for a UID: the first 32 hex digits of its SHA-256, never the UID."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:32]


def free_disk_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the file system holding ``path``."""
    return shutil.disk_usage(path).free


@dataclass
class _Group:
    """A study's instances not handed over yet: when the first and the last arrived."""

    first: float
    last: float
    paths: dict[Path, None]  # arrival order, no duplicates


class StudyGrouper:
    """Stored files per study until the study is quiet for ``quiet_s`` seconds, or its oldest
    file has waited ``max_wait_s`` seconds while more keep coming.

    A hand-over takes the study's group out whole, under the lock: an instance stored during
    or after it starts the study's next group, so each file is in exactly one hand-over
    (unless it is itself stored again). Thread-safe: association threads add, the service loop
    pops. Times are passed in (any monotonic clock), so tests drive it without sleeping.
    """

    def __init__(
        self, quiet_s: float, max_wait_s: float, *, label: Callable[[str], str] = str
    ) -> None:
        self._quiet_s = quiet_s
        self._max_wait_s = max_wait_s
        self._label = label  # how a study is named in the log (see DicomReceiver)
        self._lock = threading.Lock()
        self._studies: dict[str, _Group] = {}
        self._hand_overs: Counter[str] = Counter()

    def add(self, study_key: str, path: Path, at: float) -> None:
        """Record ``path`` as part of ``study_key``, arrived at time ``at``."""
        with self._lock:
            group = self._studies.setdefault(study_key, _Group(at, at, {}))
            group.paths[path] = None
            group.first = min(group.first, at)
            group.last = max(group.last, at)

    def pop_ready(self, now: float) -> list[list[Path]]:
        """Remove and return every study quiet for ``quiet_s``, or waiting for ``max_wait_s``,
        at ``now``; the files of each in arrival order."""
        ready: dict[str, list[Path]] = {}
        overdue: list[str] = []
        with self._lock:
            for key, group in list(self._studies.items()):
                if now - group.last < self._quiet_s:
                    if now - group.first < self._max_wait_s:
                        continue
                    overdue.append(key)
                ready[key] = list(self._studies.pop(key).paths)
            self._hand_overs["max_wait"] += len(overdue)
            self._hand_overs["quiet"] += len(ready) - len(overdue)
        for key in overdue:
            log.info(
                "study %s is still receiving after %g s (receiver.study_max_wait_s): "
                "handing over the %d instance(s) received so far",
                self._label(key),
                self._max_wait_s,
                len(ready[key]),
            )
        return list(ready.values())

    def is_pending(self, study_key: str) -> bool:
        with self._lock:
            return study_key in self._studies

    @property
    def hand_overs(self) -> dict[str, int]:
        """Hand-overs so far by why: ``quiet``, or ``max_wait`` while the study kept receiving."""
        with self._lock:
            return {"quiet": self._hand_overs["quiet"], "max_wait": self._hand_overs["max_wait"]}


class DicomReceiver:
    """The storage SCP: accepts associations, spools instances durably, groups them by study.

    Usable on its own (``start``/``stop`` or ``with``); :func:`run_receiver` joins it to the
    triage intake. Counters (``instances_stored``, ``instances_refused``,
    ``associations_rejected``, ``low_disk``) are for metrics and health.
    """

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._incoming = settings.receiver_storage / "incoming"
        self._clock = clock  # monotonic seconds; a test's own clock drives the study timers
        # The spool's study key is a plain hash of the Study Instance UID: anyone holding the
        # UID (a PACS, a RIS) could find the study in a log shipped off the device. The log
        # names it by a digest keyed with the site secret instead.
        secret = load_or_create_site_secret(settings.data_dir)
        self._grouper = StudyGrouper(
            settings.receiver_study_quiet_s,
            settings.receiver_study_max_wait_s,
            label=lambda key: hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:16],
        )
        self._lock = threading.Lock()
        # The reader switches pydicom's process-wide validation and warning filters while it
        # parses: one association thread at a time (a header takes well under a millisecond).
        self._parse_lock = threading.Lock()
        self._stored = 0
        self._refused: Counter[str] = Counter()
        self._rejected = 0
        self._low_disk = False
        self._arrived: dict[Path, float] = {}  # spool file → clock() when last stored
        self._ae: AE | None = None
        self._server: AssociationServer | None = None

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Hand over what a previous run left in the spool, then listen for associations."""
        address = self.address
        try:
            ensure_private_dir(self._incoming)
            leftovers = self._recover_spool()
        except OSError as exc:
            if exc.errno in _DENIED:
                # A folder this user may not use stays so: a restart cannot help (exit 2).
                raise self._storage_denied(exc) from None
            raise ReceiverError(
                f"cannot use the receiver's storage folder {self._incoming} ({exc.strerror})"
            ) from exc
        if leftovers:
            log.info("found %d spooled instance(s) from a previous run", leftovers)
        # pynetdicom's standard handlers log every DIMSE message, UIDs included at debug level,
        # and cost time per message: this process logs its own, PHI-free lines instead.
        _config.LOG_HANDLER_LEVEL = "none"
        ae = self._make_ae()
        try:
            self._server = ae.start_server(
                address,
                block=False,
                evt_handlers=[
                    (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_REJECTED, self._on_rejected),
                ],
            )
        except OSError as exc:
            raise _listen_error(exc, *address) from None
        self._ae = ae
        log.info("DICOM receiver %r listening on %s:%d", self._settings.receiver_ae_title, *address)

    def stop(self) -> None:
        """Stop listening and abort open associations (their unacknowledged images are re-sent)."""
        if self._ae is not None:
            # As ``AE.shutdown``, but associations about to end by themselves (one just
            # rejected or released) get a moment to: aborting one that reaches "awaiting
            # close" (Sta13) first makes pynetdicom raise InvalidEventError in its thread.
            if self._server is not None:
                self._server.shutdown()  # no new associations
            deadline = time.monotonic() + _CLOSE_GRACE_S
            while self._ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.02)
            for assoc in self._ae.active_associations:
                if assoc.dul.state_machine.current_state != _AWAITING_CLOSE:
                    assoc.abort()
            self._ae = None
            self._server = None
            log.info("DICOM receiver stopped")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """Where the receiver listens: (bind address, TCP port)."""
        return self._settings.receiver_bind_address, self._settings.receiver_port

    @property
    def ae(self) -> AE | None:
        """The listening pynetdicom AE (None when stopped): its timeouts and limits as applied."""
        return self._ae

    @property
    def incoming(self) -> Path:
        """The spool folder: one sub-folder per study."""
        return self._incoming

    # --- counters -------------------------------------------------------------------------------

    @property
    def instances_stored(self) -> int:
        with self._lock:
            return self._stored

    @property
    def instances_refused(self) -> dict[str, int]:
        """Refused C-STOREs by reason: ``low_disk``, ``write_failed``, ``invalid_dataset``."""
        with self._lock:
            return dict(self._refused)

    @property
    def study_hand_overs(self) -> dict[str, int]:
        """Studies (or, at the max wait, parts of them) handed over to triage, by why."""
        return self._grouper.hand_overs

    @property
    def associations_rejected(self) -> int:
        with self._lock:
            return self._rejected

    @property
    def low_disk(self) -> bool:
        """True while free disk space is below the reserve (stores are refused)."""
        with self._lock:
            return self._low_disk

    # --- storing --------------------------------------------------------------------------------

    def store(self, part10: bytes) -> int:
        """Spool one received instance (Part 10 bytes) durably; returns the C-STORE status."""
        if not self._has_room(len(part10)):
            return self._refuse(LOW_DISK, OUT_OF_RESOURCES)
        try:
            with self._parse_lock:
                header = read_dataset(part10, header_only=True)
                # Reading a UID validates it, and pydicom's warning would quote an invalid one.
                with quiet_pydicom():
                    sop_uid = str(header.file_meta.get("MediaStorageSOPInstanceUID", ""))
                    study_uid = str(header.get("StudyInstanceUID", ""))
        except InputError as exc:
            log.warning("refused a received instance that cannot be read (%s)", exc.code)
            return self._refuse(INVALID_DATASET, CANNOT_UNDERSTAND)
        if not sop_uid or not study_uid:
            log.warning("refused a received instance without a SOP Instance or Study UID")
            return self._refuse(INVALID_DATASET, DATASET_DOES_NOT_MATCH_SOP_CLASS)
        study_key = spool_key(study_uid)
        path = self._incoming / study_key / (spool_key(sop_uid) + SPOOL_SUFFIX)
        try:
            self._write(path, part10)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self._enter_low_disk(free_disk_bytes(self._incoming))
                return self._refuse(LOW_DISK, OUT_OF_RESOURCES)
            log.error("could not spool a received instance: %s", exc.strerror or type(exc).__name__)
            return self._refuse(WRITE_FAILED, OUT_OF_RESOURCES)
        now = self._clock()
        self._grouper.add(study_key, path, now)
        with self._lock:
            self._stored += 1
            self._arrived[path] = now
        return SUCCESS

    def arrived(self, path: Path) -> float | None:
        """When the spooled instance at ``path`` was stored (a ``clock()`` time; None for one
        a previous run left), forgotten from now on: call it when it is filed or gone."""
        with self._lock:
            return self._arrived.pop(path, None)

    def ready_studies(self) -> list[list[Path]]:
        """Studies to hand over now (quiet, waiting too long, or spool leftovers), each a list
        of files; a study's later instances come in a later list."""
        return self._grouper.pop_ready(self._clock())

    def prune_empty_studies(self) -> None:
        """Remove spool folders of studies that are fully handed over and processed."""
        for folder in self._incoming.iterdir():
            if folder.is_dir() and not self._grouper.is_pending(folder.name):
                try:
                    folder.rmdir()
                except OSError:
                    continue  # not empty: still being processed, or a new instance arrived

    # --- internals ------------------------------------------------------------------------------

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self._settings.receiver_ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self._settings.receiver_allowed_calling_aes)
        ae.maximum_associations = self._settings.receiver_max_associations
        # A peer that stalls is dropped instead of holding an association slot for ever.
        ae.acse_timeout = self._settings.receiver_acse_timeout_s
        ae.dimse_timeout = self._settings.receiver_dimse_timeout_s
        ae.network_timeout = self._settings.receiver_network_timeout_s
        # As an acceptor pynetdicom has no 128-context limit: offer every storage SOP class.
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(cast(str, context.abstract_syntax), list(TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION)
        return ae

    def _on_store(self, event: Event) -> int:
        return self.store(event.encoded_dataset())

    def _on_rejected(self, event: Event) -> None:
        requestor = event.assoc.requestor
        calling = requestor.ae_title
        called = requestor.primitive.called_ae_title if requestor.primitive else ""
        allowed = self._settings.receiver_allowed_calling_aes
        if called != self._settings.receiver_ae_title:
            reason = "called AE title is not ours"
        elif allowed and calling not in allowed:
            reason = "calling AE title is not in receiver.allowed_calling_aes"
        else:
            reason = "too many associations"
        with self._lock:
            self._rejected += 1
        log.warning(
            "rejected an association from %s (calling AE %r, called AE %r): %s",
            requestor.address,
            calling,
            called,
            reason,
        )

    def _write(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` durably; a new study folder is made durable first."""
        folder = path.parent
        for attempt in (1, 2):
            try:
                folder.mkdir(mode=0o700)
            except FileExistsError:
                pass
            else:
                fsync_dir(self._incoming)
            try:
                write_private_file(path, data)
                return
            except FileNotFoundError:
                # prune_empty_studies removed the folder between mkdir and write: make it again.
                if attempt == 2:
                    raise

    def _has_room(self, size: int) -> bool:
        """Check the disk reserve; logs the alarm when an episode starts and when it ends."""
        free = free_disk_bytes(self._incoming)
        if free - size < self._settings.receiver_min_free_bytes:
            self._enter_low_disk(free)
            return False
        with self._lock:
            was_low, self._low_disk = self._low_disk, False
        if was_low:
            log.info("free disk space is above the receiver's reserve again: accepting images")
        return True

    def _enter_low_disk(self, free: int) -> None:
        with self._lock:
            was_low, self._low_disk = self._low_disk, True
        if not was_low:
            log.error(
                "ALARM: free disk space for received images is below the reserve "
                "(%d MB free, %d MB kept free): refusing images with Out of Resources (0xA700)",
                free // (1024 * 1024),
                self._settings.receiver_min_free_bytes // (1024 * 1024),
            )

    def _refuse(self, reason: str, status: int) -> int:
        with self._lock:
            self._refused[reason] += 1
        return status

    def _storage_denied(self, exc: OSError) -> ConfigError:
        """The spool folder, or a study folder in it (a first run as root left it root's),
        that this user may not use, named (spool names are hashes) with the fix."""
        folder = self._incoming
        if isinstance(exc.filename, str):
            failed = Path(exc.filename)
            if failed.is_relative_to(folder):
                folder = failed if failed.is_dir() else failed.parent
        storage, data_dir = self._settings.receiver_storage, self._settings.data_dir
        tree = data_dir if storage.is_relative_to(data_dir) else storage  # as the CLI's checks
        why = denied_because(exc, folder, FOLDER_ACCESS, tree=tree)
        return ConfigError(f"receiver.storage_dir: cannot use {folder}{why}")

    def _recover_spool(self) -> int:
        """Queue what a previous run stored but did not hand over; drop half-written temp files."""
        count = 0
        for folder in sorted(p for p in self._incoming.iterdir() if p.is_dir()):
            for path in sorted(folder.iterdir()):
                if path.name.startswith(".") and path.name.endswith(".tmp"):
                    path.unlink(missing_ok=True)
                elif path.suffix == SPOOL_SUFFIX:
                    # -inf: already quiet, handed over on the first poll.
                    self._grouper.add(folder.name, path, float("-inf"))
                    count += 1
        return count


def _listen_error(exc: OSError, host: str, port: int) -> ReceiverError | ConfigError:
    """Why the receiver cannot listen: only a port another process holds passes by itself
    (temporary, exit 75: the instance before still closing it); anything else is a setting to
    fix (exit 2), named with the fix, as ``central serve`` does (``bind_socket``)."""
    # The errno's own text; a name lookup's failure has a negative code and a text of its own.
    reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror
    where = f"cannot listen for DICOM on {host}:{port} ({reason})"
    if exc.errno == errno.EADDRINUSE:
        return ReceiverError(where)
    if exc.errno in _DENIED and port < _PRIVILEGED_PORTS_BELOW:
        return ConfigError(
            f"receiver.port: {where}: a port below {_PRIVILEGED_PORTS_BELOW} needs the "
            "CAP_NET_BIND_SERVICE capability (systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE "
            "and CapabilityBoundingSet=CAP_NET_BIND_SERVICE in a drop-in, systemctl edit "
            f"triage-receive), or use port {_UNPRIVILEGED_DICOM_PORT}"
        )
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return ConfigError(
            f"receiver.bind_address: {where}: it must be an address of this machine "
            "(ip -brief address lists them), or 0.0.0.0 for all of them"
        )
    return ConfigError(f"receiver.bind_address, receiver.port: {where}")


def run_receiver(
    settings: Settings,
    stop: threading.Event,
    *,
    queue: Callable[[], EscalationQueue | None] | None = None,
    on_filed: Callable[[FiledOutcome], None] | None = None,
    on_tick: Callable[[DicomReceiver], None] | None = None,
) -> None:
    """``triage-app receive``: receive, group and triage until ``stop`` is set.

    Ready studies go to the :class:`~triage_app.intake.Intake` a few files at a time (two per
    worker in flight), so a stop waits for a handful of files, not a whole study: the rest stay
    in the spool and are handed over on the next start. ``on_filed`` sees every filed file,
    its ``submitted_at`` being when the instance was stored (so metrics time arrival to result,
    study waits included), and every file whose outcome could not be recorded or filed (left in
    the spool for a retry, see :class:`~triage_app.intake.Unfiled`); ``on_tick`` the receiver
    once per loop (metrics, health).
    """
    tick_s = min(0.25, max(0.02, settings.receiver_study_quiet_s / 4))
    backlog: deque[Path] = deque()
    receiver = DicomReceiver(settings)
    intake = Intake(settings, IntakeLayout.for_receiver(settings), queue=queue)
    reseal = ResealCases(settings)
    retention = DoneRetention(
        intake.layout, settings.done_retention_days, intake.held_case_ids, reseal_cases=reseal
    )

    def account(outcome: FiledOutcome) -> None:
        """Tell ``on_filed`` about a filed file, timed from its arrival, or one whose outcome
        could not be recorded (health watches those); a changed one is offered again."""
        if outcome.unfiled is Unfiled.RETRY:
            if on_filed is not None:
                on_filed(outcome)
            return
        if outcome.unfiled is Unfiled.CHANGED:
            return
        arrived = receiver.arrived(outcome.source)  # filed, or gone: forgotten either way
        if outcome.filed_as is None or on_filed is None:
            return
        on_filed(outcome if arrived is None else replace(outcome, submitted_at=arrived))

    try:
        with receiver:
            while not stop.is_set():
                retention.tick()  # a batch at start, then hourly (intake.done_retention_days)
                for study in receiver.ready_studies():
                    backlog.extend(study)
                batch: list[Path] = []
                not_yet: list[Path] = []  # stuck in the spool, waiting out their own time
                while backlog and len(batch) < intake.room:
                    path = backlog.popleft()
                    # Re-sent while its first copy was in flight: that copy may be filed already.
                    if not path.exists():
                        receiver.arrived(path)
                    elif intake.is_waiting(path):
                        not_yet.append(path)
                    else:
                        batch.append(path)
                backlog.extend(not_yet)
                intake.submit(batch)
                filed = intake.collect(timeout_s=tick_s)
                for outcome in filed:
                    account(outcome)
                    if outcome.filed_as is None and outcome.unfiled in (
                        Unfiled.CHANGED,
                        Unfiled.RETRY,
                        Unfiled.STUCK,
                    ):
                        # Re-sent while in flight (its new copy was skipped as in flight), its
                        # filing failed, or it could not leave the spool: offered again (after
                        # the intake's back-off, or the file's own wait).
                        backlog.append(outcome.source)
                if filed:
                    receiver.prune_empty_studies()
                if on_tick is not None:
                    on_tick(receiver)
    finally:
        log.info("stopping: finishing %d file(s) in flight", intake.in_flight)
        try:
            for outcome in intake.close():
                account(outcome)
        finally:
            reseal.close()
