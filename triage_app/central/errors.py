"""The refusals only the central server makes, each with the stable ``code`` of the protocol.

They extend :class:`~triage_app.errors.EnvelopeError` like the opening errors, so the API maps
every refusal to its HTTP status in one table (``app.STATUS_BY_CODE``). They live here rather than
in ``triage_app.errors`` because the device never raises them; it only reads their codes.
"""

from __future__ import annotations

from triage_app.errors import ConfigError, EnvelopeError, TriageError


class UnknownDeviceError(EnvelopeError):
    """The sender is not in the device registry."""

    code = "unknown_device"


class DeviceRevokedError(EnvelopeError):
    """The sender was registered but an admin revoked it."""

    code = "device_revoked"


class CaseIdMismatchError(EnvelopeError):
    """The case id in the URL is not the one the signed header names."""

    code = "case_id_mismatch"


class StaleEnvelopeError(EnvelopeError):
    """``created_at`` is older than the maximum queue age, or too far in the future."""

    code = "stale_envelope"


class ReplayedEnvelopeError(EnvelopeError):
    """An ``envelope_id`` already seen for another case: a replay or a splice."""

    code = "replayed_envelope"


class CaseConflictError(EnvelopeError):
    """The case is stored already, from another device or with another payload."""

    code = "case_conflict"


class BodyTooLargeError(EnvelopeError):
    """The request body is larger than the server accepts."""

    code = "too_large"


class BodyTimeoutError(EnvelopeError):
    """The request body stopped arriving (nothing for the idle timeout): 408, the device retries."""

    code = "body_timeout"


class DeviceRegistryError(TriageError):
    """An admin's device registry change that cannot be made (bad key, id taken, unknown id)."""

    code = "device_registry"


class CertificateExistsError(ConfigError):
    """``make-cert`` would replace the TLS key and certificate whose fingerprint devices pin."""

    code = "certificate_exists"


class PortInUseError(TriageError):
    """``central serve`` cannot listen: another process holds its port.

    Temporary, as the DICOM receiver's taken port (``receiver_error``). Not the instance before:
    the socket is bound with ``SO_REUSEADDR`` and systemd waits for it to exit; another program
    or a server started by hand. systemd tries again, so the server comes up once the port is
    free, instead of staying down until someone restarts it.
    """

    code = "port_in_use"
    temporary = True
