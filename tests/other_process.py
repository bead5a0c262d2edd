"""What other processes do to the shared SQLite file meanwhile, for race tests: hold its write
lock, acknowledge a case. Real processes, since the races are between processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from triage_app.escalation.keys import DeviceIdentity, ServerPublicKey
from triage_app.escalation.outbox import Outbox
from triage_app.escalation.queueing import EscalationQueue

_HOLD = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(120)
"""


@contextmanager
def hold_write_lock(db_path: Path) -> Iterator[None]:
    """A child process holds ``BEGIN IMMEDIATE`` on ``db_path`` until the block ends."""
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(db_path)], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "locked\n", "the lock holder did not start"
            yield
        finally:
            holder.kill()


_ACKNOWLEDGE = """
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from triage_app.escalation.keys import DeviceIdentity, ServerPublicKey
from triage_app.escalation.outbox import Outbox
from triage_app.escalation.queueing import EscalationQueue
from triage_app.errors import TriageError
from triage_app.states import Feedback
from triage_app.store import CaseStore
with CaseStore.open(Path(sys.argv[1])) as store:
    try:
        store.record_feedback(sys.argv[2], "dr.grey", Feedback.ACCEPT, "reviewed here, do not send")
    except TriageError as err:
        print(err.code)
    else:
        print("acknowledged")
"""


def acknowledge_in_another_process(db_path: Path, case_id: str) -> str:
    """A clinician's "record feedback, do not send" from another process (the desktop app):
    ``acknowledged``, or the stable code of the error that refused it."""
    run = subprocess.run(
        [sys.executable, "-c", _ACKNOWLEDGE, str(db_path), case_id],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return run.stdout.strip()


@contextmanager
def light_queue(db_path: Path) -> Iterator[EscalationQueue]:
    """An escalation queue on ``db_path`` with keys made up for the test (no central server):
    enough to seal and queue envelopes, not to deliver them."""
    device = DeviceIdentity.from_signing_key(Ed25519PrivateKey.generate())
    server_key = ServerPublicKey.from_public_key(X25519PrivateKey.generate().public_key())
    with Outbox.open(db_path, db_path.parent / "outbox", quota_bytes=10_000_000) as outbox:
        yield EscalationQueue(outbox, device, server_key)
