"""The escalation parts built from the settings, for every shell the same way.

A shell (CLI, watch service, receiver, GUI) asks :func:`open_escalation` once: it gets the
outbox, this device's identity, the verified client for the central server and the server's
keys, or ``None`` when no central server is configured (escalated cases are then held on the
device). Keys not in the settings are fetched over the verified connection; when the server
cannot be reached and no keys are known yet, cases are held rather than sealed to nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from triage_app.config import Settings, is_loopback_host
from triage_app.errors import TransportError
from triage_app.escalation.keys import DeviceIdentity, load_or_create_device_identity
from triage_app.escalation.outbox import Outbox
from triage_app.escalation.queueing import EscalationQueue
from triage_app.escalation.server_keys import CentralKeys, fetch_central_keys, load_central_keys
from triage_app.escalation.transport import CentralClient, TransportConfig
from triage_app.escalation.uploader import Uploader, UploaderConfig

log = logging.getLogger(__name__)


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


@dataclass
class EscalationLink:
    """Everything needed to queue escalated cases and deliver them. Close it when done."""

    settings: Settings
    outbox: Outbox
    device: DeviceIdentity
    client: CentralClient
    keys: CentralKeys | None

    @property
    def queue(self) -> EscalationQueue | None:
        """None while the server's keys are unknown: cases are held, not sealed."""
        if self.keys is None:
            return None
        return EscalationQueue(self.outbox, self.device, self.keys.server_key)

    def uploader(self) -> Uploader:
        """A sender over this link (enter it with ``with`` to mirror states in the store)."""
        if self.keys is None:
            raise TransportError(
                "the central server's keys are not known yet: it has not been reachable"
            )
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
    if keys is None and fetch_keys:
        try:
            keys = fetch_central_keys(client, settings.data_dir)
        except TransportError as err:
            log.warning(
                "central server keys unknown and the server is unreachable (%s): escalated "
                "cases are held on this device",
                err.code,
            )
    return EscalationLink(settings, open_outbox(settings), device, client, keys)
