"""A separate process for the outbox tests: enqueue cases and die abruptly, or claim cases.

Run by ``test_outbox.py`` as ``python outbox_crash_child.py MODE ...``. A crash here is a real
``SIGKILL`` (no ``finally``, no atexit, no SQLite rollback), either at an injected point of one
enqueue or a random delay after
one enqueue began. The tests import :func:`case_id_for` and :func:`envelope_for` to
know what the child enqueued.

Modes:

* ``enqueue DB SPOOL COUNT [--kill-case I (--kill-at POINT | --kill-after-s S)]``
* ``claim DB SPOOL OWNER GO_FILE``: say ``ready-OWNER`` beside ``GO_FILE``, wait for
  ``GO_FILE``, claim until the queue is empty, print the claimed case ids as one JSON list.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from triage_app.escalation import outbox as outbox_module
from triage_app.escalation.outbox import Outbox

QUOTA = 1 << 30
POINTS = ("after_temp_write", "after_rename", "at_commit", "after_commit")
REASONS = ("uncertain", "out_of_scope")


def case_id_for(index: int) -> str:
    return hashlib.sha256(f"crash-case-{index}".encode()).hexdigest()[:32]


def envelope_for(index: int) -> bytes:
    """Distinct bytes per case, of varied sizes, so a torn or swapped file shows."""
    rng = random.Random(index)
    return b"TRGENV\x00\x01" + rng.randbytes(1000 + (index * 7919) % 60_000)


def reason_for(index: int) -> str:
    return REASONS[index % 2]


def enqueue_case(outbox: Outbox, index: int) -> None:
    data = envelope_for(index)
    outbox.enqueue(
        case_id_for(index),
        data,
        reason=reason_for(index),
        payload_sha256=hashlib.sha256(data).hexdigest(),
    )


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def inject(outbox: Outbox, point: str, armed: Callable[[], bool]) -> None:
    """Make the process kill itself at ``point`` of the enqueue during which ``armed()``."""
    publish = outbox_module._publish

    def publish_then_maybe_die(tmp: Path, final: Path) -> None:
        if armed() and point == "after_temp_write":
            die()
        publish(tmp, final)
        if armed() and point == "after_rename":
            die()

    outbox_module._publish = publish_then_maybe_die

    def trace(statement: str) -> None:
        if armed() and point == "at_commit" and statement.strip().upper() == "COMMIT":
            die()

    conn: sqlite3.Connection = outbox._conn
    conn.set_trace_callback(trace)


def run_enqueue(args: argparse.Namespace) -> None:
    with Outbox.open(args.db, args.spool, quota_bytes=QUOTA) as outbox:
        current = [-1]
        if args.kill_at:
            inject(outbox, args.kill_at, lambda: current[0] == args.kill_case)
        for index in range(args.count):
            current[0] = index
            if args.kill_after_s is not None and index == args.kill_case:
                threading.Timer(args.kill_after_s, die).start()
            enqueue_case(outbox, index)
            if args.kill_at == "after_commit" and index == args.kill_case:
                die()
    print("done")


def run_claim(args: argparse.Namespace) -> None:
    claimed: list[str] = []
    with Outbox.open(args.db, args.spool, quota_bytes=QUOTA) as outbox:
        args.go.with_name(f"ready-{args.owner}").touch()
        while not args.go.exists():
            time.sleep(0.002)
        while (item := outbox.claim_next(args.owner, lease_s=600)) is not None:
            claimed.append(item.case_id)
            # A sender works between claims; without it SQLite's busy handler (not fair) lets
            # one process take every case while the others sleep.
            time.sleep(0.001)
    print(json.dumps(claimed))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    enqueue = sub.add_parser("enqueue")
    enqueue.add_argument("db", type=Path)
    enqueue.add_argument("spool", type=Path)
    enqueue.add_argument("count", type=int)
    enqueue.add_argument("--kill-at", choices=POINTS)
    enqueue.add_argument("--kill-case", type=int, default=0)
    enqueue.add_argument("--kill-after-s", type=float)
    claim = sub.add_parser("claim")
    claim.add_argument("db", type=Path)
    claim.add_argument("spool", type=Path)
    claim.add_argument("owner")
    claim.add_argument("go", type=Path)
    args = parser.parse_args(argv)
    if args.mode == "enqueue":
        run_enqueue(args)
    else:
        run_claim(args)


if __name__ == "__main__":
    main(sys.argv[1:])
