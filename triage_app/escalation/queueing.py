"""Held escalations become sealed envelopes in the outbox.

The one place where a triaged case's plaintext payload is turned into ciphertext: the payload
(result JSON + de-identified DICOM, already through the PHI gate) is sealed to the central
server's key and signed by this device, and only the envelope is written to disk. The outbox
makes the write durable before its row commits, so once :meth:`EscalationQueue.enqueue`
returns, the case survives a crash, and a second call for the same case changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from triage_app.escalation.envelope import read_header, seal_bytes
from triage_app.escalation.keys import DeviceIdentity, ServerPublicKey
from triage_app.escalation.outbox import Outbox, OutboxItem, Precondition


@dataclass(frozen=True)
class EscalationQueue:
    """Seals payloads for one server key and queues them in one outbox."""

    outbox: Outbox
    device: DeviceIdentity
    server_key: ServerPublicKey

    def enqueue(
        self,
        case_id: str,
        payload: bytes,
        *,
        reason: str,
        precondition: Precondition | None = None,
    ) -> OutboxItem:
        """Queue ``payload`` for ``case_id`` (idempotent: a queued case is never sealed again).

        Raises ``QueueFullError`` when the outbox quota is reached, or what ``precondition``
        raises (see :meth:`Outbox.enqueue`); nothing changes then.
        """
        existing = self.outbox.get(case_id)
        if existing is not None:
            return existing
        envelope = seal_bytes(
            payload, case_id=case_id, device=self.device, server_key=self.server_key
        )
        payload_sha256 = read_header(envelope).payload_sha256  # hashed once, while sealing
        # If another process queued the case in between, the outbox keeps the first envelope.
        return self.outbox.enqueue(
            case_id,
            envelope,
            reason=reason,
            payload_sha256=payload_sha256,
            precondition=precondition,
        )

    def reseal(self, case_id: str, payload: bytes) -> OutboxItem:
        """Seal ``payload`` anew (current keys, current time) in place of a quarantined
        case's envelope: see :meth:`Outbox.reseal`."""
        envelope = seal_bytes(
            payload, case_id=case_id, device=self.device, server_key=self.server_key
        )
        payload_sha256 = read_header(envelope).payload_sha256
        return self.outbox.reseal(case_id, envelope, payload_sha256=payload_sha256)
