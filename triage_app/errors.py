"""One exception tree for the whole application.

Every error carries a stable machine-readable ``code`` (used in result records, quarantine folder
names and exit paths) and a one-line human message. Codes never change once released; add new
ones instead.

Each class also says whether it is ``temporary``: a condition that passes by itself (a lock
another process holds, a port not yet freed, a server down), for which ``triage-app`` exits 75
(``EX_TEMPFAIL``) and systemd restarts a service, rather than 2, a mistake restarting cannot fix.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import ClassVar


class TriageError(Exception):
    """Base class: ``code`` is stable, ``str(err)`` is one clear line."""

    code: ClassVar[str] = "error"
    #: The condition may pass by itself: trying again later (a service restart) can succeed.
    #: False by default, so that a new kind of error is a mistake to fix (exit 2) unless its
    #: class says otherwise; a subclass of a temporary class that is a refusal says False again.
    #: ``tests/test_cli.py`` pins the value of every class, so none inherits one unreviewed.
    temporary: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        # Keep the message to one line: it goes to stderr, JSON records and the GUI.
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self)


# --- Per-input errors: the file is refused (and later quarantined); the batch goes on. ---------


class InputError(TriageError):
    """An input file that cannot be triaged. Never fatal for a batch."""

    code = "input_error"


class UnreadableFileError(InputError):
    code = "unreadable"


class EmptyFileError(InputError):
    code = "empty_file"


class NotDicomError(InputError):
    code = "not_dicom"


class TruncatedError(InputError):
    code = "truncated"


class InvalidDicomError(InputError):
    """Parses as DICOM but a required attribute is missing or has an impossible value."""

    code = "invalid_dicom"


class NoPixelDataError(InputError):
    code = "no_pixel_data"


class UnsupportedTransferSyntaxError(InputError):
    code = "unsupported_transfer_syntax"


class CorruptPixelDataError(InputError):
    code = "corrupt_pixel_data"


class UnsupportedPhotometricError(InputError):
    code = "unsupported_photometric"


class ProcessingFailedError(InputError):
    """Triage failed on this file in a way no check foresaw (a bug, or a file unlike any
    anticipated): it is set aside like any refused input, and the batch goes on."""

    code = "processing_failed"


class UnprocessableImageError(InputError):
    """Decoded, but the pixels cannot be prepared for the model (e.g. a degenerate shape)."""

    code = "unprocessable_image"


# --- Model bundle errors: fatal at start-up, the app refuses to classify. ----------------------


class ModelError(TriageError):
    code = "model_invalid"


class ModelNotFoundError(ModelError):
    code = "model_not_found"


class ModelIntegrityError(ModelError):
    """The ONNX file's hash does not match the manifest: it was altered or swapped."""

    code = "model_hash_mismatch"


class ManifestError(ModelError):
    code = "manifest_invalid"


# --- Settings, storage and state ---------------------------------------------------------------


class ConfigError(TriageError):
    """An invalid setting; the message names the field and the reason."""

    code = "config_invalid"


class AdminAuthError(ConfigError):
    code = "admin_auth_failed"


class StoreError(TriageError):
    """The case store cannot be read or written: locked by another process, disk full, ..."""

    code = "store_error"
    # Mostly a lock or a full disk that passes; the lasting causes we can tell are
    # StoreIncompatibleError. An unforeseen lasting one is then restarted in vain, its line in
    # the journal each time: better than a passing one leaving a service down for good.
    temporary = True


class StoreIncompatibleError(StoreError):
    """A case store this app cannot use as it is: its schema is newer than the app (written by
    a newer version), or its file system cannot do WAL mode. A restart changes neither: the
    admin must update the app or move the data folder. (The outbox's own:
    :class:`OutboxIncompatibleError`.)"""

    code = "store_incompatible"
    temporary = False


class IllegalTransitionError(StoreError):
    """A case event that is not allowed in the case's current state."""

    code = "illegal_transition"
    temporary = False  # a refusal of the action: the same action is refused again


class AlreadyQueuedError(IllegalTransitionError):
    """A held case cannot be closed on the device: its envelope is in the outbox already."""

    code = "already_queued"


# --- Escalation: envelopes, the outbox, the transfer and the central server ---------------------


class EscalationError(TriageError):
    code = "escalation_error"


class KeyFileError(ConfigError):
    """A device or server key file is missing, damaged or readable by others."""

    code = "key_invalid"


class EnvelopeError(EscalationError):
    """An envelope that cannot be trusted or opened; the server answers with ``code``."""

    code = "envelope_invalid"


class MalformedEnvelopeError(EnvelopeError):
    code = "envelope_malformed"


class EnvelopeSignatureError(EnvelopeError):
    code = "bad_signature"


class UnknownServerKeyError(EnvelopeError):
    code = "unknown_server_key"


class EnvelopeTamperedError(EnvelopeError):
    """A chunk or the sealed key fails authentication: altered, reordered or spliced bytes."""

    code = "envelope_tampered"


class EnvelopeTruncatedError(EnvelopeError):
    code = "envelope_truncated"


class OutboxError(EscalationError):
    """The outbox cannot store or read a case: its database busy or its disk failing."""

    code = "outbox_error"
    temporary = True  # as StoreError: the outbox shares the case store's SQLite file


class OutboxIncompatibleError(OutboxError):
    """An outbox this app cannot use as it is, for :class:`StoreIncompatibleError`'s reasons:
    its schema is newer than the app, or its file system cannot do WAL mode. With the
    temporary ``outbox_error`` a service was restarted on it every few seconds for ever."""

    code = "outbox_incompatible"
    temporary = False


class QueueFullError(OutboxError):
    """The outbox byte quota is reached: the new case is refused, nothing queued is dropped."""

    code = "queue_full"
    temporary = False  # a refusal of one case, which is held; not a failure of a command


class CaseExceedsQuotaError(QueueFullError):
    """The case is larger than the whole outbox quota: no delivery can ever make room for it,
    so it must not wait with the cases that wait for room (only a larger quota helps)."""


class UnknownQueuedCaseError(OutboxError):
    code = "unknown_case"
    temporary = False  # a case id the outbox does not have: a typo stays a typo


class ResealError(OutboxError):
    """A quarantined case cannot be sealed anew: its source image is gone or replaced, or
    triaged again it is no longer an escalation of the same case."""

    code = "reseal_failed"
    temporary = False  # the source image is gone or re-triage no longer escalates: for good


class TransportError(EscalationError):
    """The central server could not be reached or answered badly; the case stays queued."""

    code = "transport_error"
    temporary = True  # the network or the server comes back


class CertificatePinError(TransportError):
    """The server's certificate is not the pinned one: fail closed, never send."""

    code = "certificate_pin_mismatch"
    temporary = False  # the pinned certificate is not the server's: a setting to fix


class PermanentRejectionError(TransportError):
    """The server refused the case for good (a 4xx other than 408/429): quarantine it."""

    code = "rejected"
    temporary = False  # refused for good, by definition


class ReceiptError(EscalationError):
    """A delivery receipt that does not verify: the local copy is kept and sent again."""

    code = "receipt_invalid"


# --- The DICOM receiver -------------------------------------------------------------------------


class ReceiverError(TriageError):
    """The DICOM receiver cannot start: its address is taken or its storage folder unusable."""

    code = "receiver_error"
    # Mostly the port still held by the instance before (closing) or another program; a
    # storage folder on a mount not there yet comes back too.
    temporary = True


class InboxInUseError(TriageError):
    """Another service (or a ``watch --once``) already takes files from the same inbox: two
    would triage every file twice and race to move it. Refused at start-up."""

    code = "inbox_in_use"
    temporary = True  # free again once the other service or the `watch --once` is done


# --- Unexpected errors ---------------------------------------------------------------------------

_PACKAGE = Path(__file__).resolve().parent


def describe_unexpected(err: BaseException) -> str:
    """An unexpected exception's type and where this package's code met it, e.g.
    ``unexpected KeyError in triage_app/pipeline.py:212 (_run)``.

    Not its message, nor a traceback: they quote file names and values (``FileNotFoundError:
    ... '/inbox/DOE^JANE/chest.dcm'``), and logs and stderr must carry no PHI. The type and the
    line are PHI-free and tell a maintainer where to look.
    """
    where = where_raised(err)
    what = f"unexpected {type(err).__name__}"
    return what if where is None else f"{what} in {where}"


def where_raised(err: BaseException) -> str | None:
    """The last line of this package's code the exception passed through, e.g.
    ``triage_app/pipeline.py:212 (_run)``; None if it passed through none."""
    frames = [(Path(f.filename).resolve(), f) for f in traceback.extract_tb(err.__traceback__)]
    ours = [(path, frame) for path, frame in frames if path.is_relative_to(_PACKAGE)]
    if not ours:
        return None
    path, frame = ours[-1]
    return f"{path.relative_to(_PACKAGE.parent).as_posix()}:{frame.lineno} ({frame.name})"
