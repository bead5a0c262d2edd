"""The escalation parts built from the settings, for every shell the same way.

A shell (CLI, watch service, receiver, GUI) asks :func:`open_escalation` once: it gets the
outbox, this device's identity, the verified client for the central server and the server's
keys, or ``None`` when no central server is configured (escalated cases are then held on the
device). Keys not in the settings are fetched over the verified connection; when the server
cannot be reached and no keys are known yet, cases are held rather than sealed to nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from triage_app.config import Settings, is_loopback_host
from triage_app.errors import (
    CertificatePinError,
    ConfigError,
    PermanentRejectionError,
    TransportError,
)
from triage_app.escalation.keys import DeviceIdentity, load_or_create_device_identity
from triage_app.escalation.outbox import Outbox
from triage_app.escalation.queueing import EscalationQueue
from triage_app.escalation.server_keys import CentralKeys, fetch_central_keys, load_central_keys
from triage_app.escalation.transport import (
    CentralClient,
    RetryableTransportError,
    TransportConfig,
    http_status_of,
)
from triage_app.escalation.uploader import Uploader, UploaderConfig
from triage_app.paths import access_problem

log = logging.getLogger(__name__)

#: The fix to name when the central server does not answer at all.
UNREACHABLE_FIX = "check that the central server runs and escalation.central_url (host and port)"


def transport_config(settings: Settings) -> TransportConfig | None:
    """The connection to the central server, or None when none is configured."""
    url = settings.central_url
    if url is None:
        return None
    return TransportConfig(
        base_url=url,
        pinned_sha256=settings.tls_pin_sha256,
        ca_file=settings.ca_file,
        client_cert=settings.client_cert,
        client_key=settings.client_key,
        connect_timeout_s=settings.connect_timeout_s,
        read_timeout_s=settings.read_timeout_s,
        allow_http_for_loopback=is_loopback_host(urlsplit(url).hostname or ""),
    )


def open_outbox(settings: Settings) -> Outbox:
    return Outbox.open(
        settings.case_store_path, settings.outbox_dir, quota_bytes=settings.queue_quota_bytes
    )


def open_outbox_to_read(settings: Settings) -> Outbox | None:
    """The outbox for a command that only looks at it, or None when nothing was ever queued.

    Why: :func:`open_outbox` creates what is missing, so ``queue list`` given a mistyped data
    folder would make an empty queue there and report zeros, and, run as root, leave root's
    folder behind for the service. A folder that does not exist is a setting to fix; one
    without an outbox yet creates nothing; one this user may not use is a setting to fix
    too (``ConfigError`` naming the owner and the fix), not a "try again later".
    """
    data_dir = settings.data_dir
    store = settings.case_store_path
    tree = data_dir if store.is_relative_to(data_dir) else store.parent
    folders = (
        ("paths.data_dir", data_dir, "--data-dir or paths.data_dir"),
        ("paths.case_store", store.parent, "paths.case_store"),
    )
    for key, folder, fix in folders:
        if not _present(key, folder, tree):
            raise ConfigError(
                f"{key}: the folder {folder} does not exist; check {fix} (nothing was created)"
            )
    if not (_present("paths.case_store", store, tree) and settings.outbox_dir.is_dir()):
        return None
    # SQLite writes its journals beside the store even to read it (WAL).
    for key, path, need in (
        ("paths.case_store", store, os.R_OK | os.W_OK),
        ("paths.case_store", store.parent, os.W_OK | os.X_OK),
        ("paths.data_dir", settings.outbox_dir, os.R_OK | os.W_OK | os.X_OK),
    ):
        problem = access_problem(path, need, tree=tree)
        if problem is not None:
            raise ConfigError(f"{key}: cannot use {path}: {problem}")
    return open_outbox(settings)


def _present(key: str, path: Path, tree: Path) -> bool:
    """Whether ``path`` exists; ``ConfigError`` with the fix when this user may not look."""
    try:
        return path.exists()
    except PermissionError:
        problem = access_problem(path, os.R_OK, tree=tree) or "permission denied"
        raise ConfigError(f"{key}: cannot use {path}: {problem}") from None


@dataclass
class EscalationLink:
    """Everything needed to queue escalated cases and deliver them. Close it when done."""

    settings: Settings
    outbox: Outbox
    device: DeviceIdentity
    client: CentralClient
    keys: CentralKeys | None
    #: Why the server's keys could not be fetched, when they are not known.
    keys_error: TransportError | None = None

    @property
    def queue(self) -> EscalationQueue | None:
        """None while the server's keys are unknown: cases are held, not sealed."""
        if self.keys is None:
            return None
        return EscalationQueue(self.outbox, self.device, self.keys.server_key)

    def uploader(self) -> Uploader:
        """A sender over this link (enter it with ``with`` to mirror states in the store)."""
        if self.keys is None:
            raise keys_unknown(self.keys_error)
        settings = self.settings
        pinned_keys = bool(settings.server_public_key and settings.receipt_public_key)
        return Uploader(
            outbox=self.outbox,
            client=self.client,
            device=self.device,
            keys=self.keys,
            store_path=settings.case_store_path,
            config=UploaderConfig(
                retry_cap_s=settings.retry_cap_s, verdict_poll_s=settings.verdict_poll_s
            ),
            refresh_keys=None if pinned_keys else self._refresh_keys,
        )

    def require_keys(self) -> CentralKeys:
        """The server's keys, fetched now when they are not known yet; raises what stands in
        the way (see :func:`keys_unknown`)."""
        if self.keys is None:
            try:
                self.keys = fetch_central_keys(self.client, self.settings.data_dir)
            except TransportError as err:
                self.keys_error = err
                raise keys_unknown(err) from None
            self.keys_error = None
        return self.keys

    def _refresh_keys(self) -> CentralKeys:
        """Fetch the server's keys again; later enqueues on this link use the new ones."""
        self.keys = fetch_central_keys(self.client, self.settings.data_dir)
        return self.keys

    def close(self) -> None:
        self.client.close()
        self.outbox.close()

    def __enter__(self) -> EscalationLink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def keys_unknown(err: TransportError | None) -> TransportError:
    """The error that stops a sender while the server's keys are not known, saying why: the
    fetch's own error, of its kind. A certificate that is not the pinned one, or a server that
    refused the fetch for good, is a setting to fix (exit 2); a server that did not answer is
    temporary (exit 75)."""
    prefix = "the central server's keys are not known yet: "
    if err is None:
        return TransportError(f"{prefix}they have not been fetched")
    if isinstance(err, CertificatePinError):
        return CertificatePinError(prefix + err.message)
    if isinstance(err, PermanentRejectionError):
        return PermanentRejectionError(f"{prefix}{err.message}; check escalation.central_url")
    if unreachable(err):
        return TransportError(f"{prefix}{err.message}; {UNREACHABLE_FIX}")
    return TransportError(prefix + err.message)


def unreachable(err: TransportError) -> bool:
    """The server did not answer at all (refused, reset, timed out, name not resolved)."""
    return isinstance(err, RetryableTransportError) and http_status_of(err) is None


def open_escalation(settings: Settings, *, fetch_keys: bool = True) -> EscalationLink | None:
    """The link to the configured central server, or None when there is none."""
    config = transport_config(settings)
    if config is None:
        return None
    device = load_or_create_device_identity(settings.data_dir)
    keys = load_central_keys(
        settings.data_dir,
        server_public_key=settings.server_public_key,
        receipt_public_key=settings.receipt_public_key,
    )
    client = CentralClient(config)
    keys_error: TransportError | None = None
    if keys is None and fetch_keys:
        try:
            keys = fetch_central_keys(client, settings.data_dir)
        except TransportError as err:
            keys_error = err
            log.warning(
                "central server keys unknown and %s (%s: %s): escalated cases are held on "
                "this device",
                "the server is unreachable" if unreachable(err) else "not fetched",
                err.code,
                err.message,
            )
    return EscalationLink(settings, open_outbox(settings), device, client, keys, keys_error)
