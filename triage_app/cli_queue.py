"""``triage-app queue list|status|retry|drain|release``: the outbox of escalated cases (DESIGN 4.1).

The escalation modules (requests, cryptography, SQLite outbox) are imported by the handlers,
not here: every ``triage-app`` command builds this parser, and ``deidentify`` or ``config``
should not pay for them at start-up.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

from triage_app.admin import current_user, require_admin, retry_refused_cases
from triage_app.cli_common import EXIT_OK, EXIT_SOME_FAILED, read_secret, settings_from_args
from triage_app.config import Settings
from triage_app.errors import ConfigError

if TYPE_CHECKING:
    from triage_app.escalation.outbox import OutboxItem
    from triage_app.escalation.uploader import Attempt, Uploader
    from triage_app.store import StoredCase


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``queue`` command and its actions to the top-level subparsers."""
    queue = sub.add_parser("queue", help="the outbox of escalated cases")
    actions = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")

    listing = actions.add_parser(
        "list", parents=[common], help="every case ever queued, in queue order, with its verdict"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per case")
    listing.set_defaults(handler=_list)

    status = actions.add_parser("status", parents=[common], help="counts, bytes, oldest age")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_status)

    retry = actions.add_parser(
        "retry",
        parents=[common],
        help="put quarantined cases back in the queue (admin)",
        description="Quarantined cases (refused by the central server) go back to pending. "
        "A case refused for how its envelope was sealed (too old, sealed to a server key the "
        "server no longer has, signed with a device key it no longer accepts, damaged on disk) "
        "is first sealed anew from its source image; one whose image is gone, or that triaged "
        "again is no longer escalated, stays quarantined (exit 1). Needs the admin password; "
        "every retry is written to the audit log.",
    )
    retry.add_argument("case_ids", nargs="*", metavar="CASE_ID")
    retry.add_argument("--all", action="store_true", help="every quarantined case")
    retry.add_argument(
        "--admin-password-stdin", action="store_true", help="read the admin password from stdin"
    )
    retry.set_defaults(handler=_retry)

    drain = actions.add_parser(
        "drain",
        parents=[common],
        help="deliver queued cases to the central server",
        description="Sends every case that is due now, once, prints one JSON object per "
        "attempt and what this run did (sent now, still waiting, quarantined now), and exits: "
        "0 when every case due was sent (none left waiting, none quarantined); 75 when cases "
        "are left waiting because the central server cannot be reached (the reason on one "
        "line; try again later); 2 when its certificate is not the one escalation.tls_pin "
        "names; 1 when this run quarantined a case, or cases are left waiting for another "
        "reason (the server answered with an error, or their next attempt is not due yet). "
        "With --follow it keeps running, sending as cases arrive and retries come due and "
        "fetching the central verdicts, until interrupted (SIGINT or SIGTERM).",
    )
    drain.add_argument("--follow", action="store_true", help="keep running")
    drain.set_defaults(handler=_drain)

    release = actions.add_parser(
        "release",
        parents=[common],
        help="queue the escalated cases held on this device",
        description="Cases held because the central server's keys were not known yet, or the "
        "outbox was full, are triaged again from their files and queued, oldest first. A case "
        "whose file is gone, or that re-triage no longer escalates, stays held with the reason "
        "in its history. Exit 1 while any case stays held. The watch and receive services do "
        "this by themselves.",
    )
    release.add_argument("--json", action="store_true", help="the report as one JSON object")
    release.set_defaults(handler=_release)


def _list(args: argparse.Namespace) -> int:
    from triage_app.escalation.service import open_outbox_to_read
    from triage_app.store import CaseStore

    settings = settings_from_args(args)
    outbox = open_outbox_to_read(settings)
    items: list[OutboxItem] = []
    cases: dict[str, StoredCase | None] = {}
    if outbox is not None:
        with outbox:
            items = outbox.items()
        # The central verdicts are kept with the cases, not in the outbox (Uploader.poll_verdicts).
        with CaseStore.open(settings.case_store_path) as store:
            cases = {item.case_id: store.get(item.case_id) for item in items}
    if args.json:
        for item in items:
            case = cases[item.case_id]
            print(json.dumps({**item.to_json(), "verdict": None if case is None else case.verdict}))
        return EXIT_OK
    print(
        f"{'case_id':<16} {'state':<12} {'reason':<13} {'tries':>5} {'bytes':>10}  "
        f"{'since':<29}  verdict"
    )
    for item in items:
        line = (
            f"{item.case_id[:16]:<16} {item.state.value:<12} {item.reason:<13} "
            f"{item.attempts:>5} {item.size_bytes:>10}  {item.enqueued_at:<29}  "
            f"{_verdict_text(item, cases[item.case_id]):<20}  {_note(item)}"
        )
        print(line.rstrip())
    return EXIT_OK


def _verdict_text(item: OutboxItem, case: StoredCase | None) -> str:
    """The central verdict in a few words (as the demo table and the worklist write it)."""
    from triage_app.escalation.outbox import OutboxState
    from triage_app.states import CaseState

    verdict = case.verdict if case is not None else None
    if verdict is None:
        # Only a delivered case the store has as delivered is asked for its verdict.
        waiting = (
            item.state is OutboxState.DELIVERED
            and case is not None
            and case.state is CaseState.DELIVERED
        )
        return "pending" if waiting else "-"
    error = verdict.get("error")
    if isinstance(error, dict):
        return f"no verdict: {error.get('code')}"
    label, score = verdict.get("verdict"), verdict.get("score")
    return f"{label} ({score:.3f})" if isinstance(score, int | float) else str(label)


def _note(item: OutboxItem) -> str:
    from triage_app.escalation.outbox import OutboxState

    if item.state is OutboxState.QUARANTINED:
        return f"refused: {item.quarantine_reason}"
    return f"last error: {item.last_error}" if item.last_error else ""


def _status(args: argparse.Namespace) -> int:
    from triage_app.escalation.outbox import OutboxStatus
    from triage_app.escalation.service import open_outbox_to_read
    from triage_app.states import CaseState
    from triage_app.store import CaseStore

    settings = settings_from_args(args)
    outbox = open_outbox_to_read(settings)
    if outbox is None:  # nothing was ever queued here
        status = OutboxStatus(0, 0, 0, 0, 0, settings.queue_quota_bytes, None, full=False)
    else:
        with outbox:
            status = outbox.status()
    # Held cases are not in the outbox (no central server, its keys never came, or the outbox
    # was full): counted here so that `queue status` is where an admin sees every waiting case.
    held = 0
    if settings.case_store_path.is_file():
        with CaseStore.open(settings.case_store_path) as store:
            held = len(store.case_ids(CaseState.ESCALATION_HELD))
    if args.json:
        print(json.dumps({**status.to_json(), "held": held}))
        return EXIT_OK
    used = 100 * status.queued_bytes / status.quota_bytes if status.quota_bytes else 0.0
    oldest = status.oldest_pending_age_s
    print(
        f"pending {status.pending}, in flight {status.in_flight}, delivered {status.delivered}, "
        f"quarantined {status.quarantined}, held on the device {held} (`queue release`); "
        f"{status.queued_bytes} bytes queued ({used:.1f}% of "
        f"the quota){'; FULL: new escalations are refused' if status.full else ''}"
        + (f"; oldest waiting {oldest:.0f} s" if oldest is not None else "")
    )
    return EXIT_OK


def _retry(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    _require_admin(settings, args.admin_password_stdin)
    outcomes = retry_refused_cases(settings, args.case_ids, current_user(), every_refused=args.all)
    if not outcomes:
        print("no quarantined cases: nothing to retry")
    for outcome in outcomes:
        print(outcome.line(), file=sys.stderr if outcome.error is not None else sys.stdout)
    return EXIT_SOME_FAILED if any(o.error is not None for o in outcomes) else EXIT_OK


def _require_admin(settings: Settings, from_stdin: bool) -> None:
    require_admin(
        settings, read_secret("admin password: ", from_stdin, flag="--admin-password-stdin")
    )


def _print_attempt(attempt: Attempt) -> None:
    print(
        json.dumps(
            {
                "case_id": attempt.case_id,
                "outcome": attempt.outcome,
                "code": attempt.code,
                "detail": attempt.detail,
                "deliveries": attempt.deliveries,
            }
        ),
        flush=True,
    )


def _drain(args: argparse.Namespace) -> int:
    from triage_app.escalation.service import open_escalation

    settings = settings_from_args(args)
    # The keys are fetched here rather than by open_escalation, which would hold cases
    # without them: this command stops instead, saying why (link.require_keys).
    link = open_escalation(settings, fetch_keys=False)
    if link is None:
        raise ConfigError("queue drain: no central server is configured (escalation.central_url)")
    with link:
        link.require_keys()
        with link.uploader() as uploader:
            if not args.follow:
                return _drain_once(uploader)
            stop = threading.Event()

            def on_signal(signum: int, frame: FrameType | None) -> None:
                stop.set()

            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            uploader.run(stop, on_attempt=_print_attempt)
    return EXIT_OK


def _drain_once(uploader: Uploader) -> int:
    """One pass over the queue; the exit status says what is left and why (see --help)."""
    from triage_app.errors import CertificatePinError, TransportError
    from triage_app.escalation.service import UNREACHABLE_FIX

    uploader.follow_key_rotation()  # a device that only drains now and then
    report = uploader.drain_once()
    for attempt in report.attempts:
        _print_attempt(attempt)
    uploader.poll_verdicts()
    waiting = report.waiting
    print(
        f"{report.sent} sent now, {waiting} still waiting, {report.quarantined} quarantined now",
        file=sys.stderr,
    )
    if not waiting:
        return EXIT_SOME_FAILED if report.quarantined else EXIT_OK
    left = f"{waiting} case{'s' if waiting > 1 else ''} left waiting: "
    if report.link_error is not None:
        code, message = report.link_error
        if code == CertificatePinError.code:
            raise CertificatePinError(left + message)
        down = TransportError(f"{left}{message}; {UNREACHABLE_FIX}")
        if not report.quarantined:
            raise down  # exit 75: nothing else went wrong, running again later can succeed
        print(f"triage-app: error: {down.code}: {down}", file=sys.stderr)
        return EXIT_SOME_FAILED
    failed = report.last_failure
    if failed is not None:
        why = f"the last failure: {failed.detail}"
    elif report.next_attempt_at is not None:
        why = f"the next attempt is due at {report.next_attempt_at.isoformat()}"
    else:
        why = "in flight with another sender"
    print(f"triage-app: queue drain: {left}{why}", file=sys.stderr)
    return EXIT_SOME_FAILED


def _release(args: argparse.Namespace) -> int:
    from triage_app.escalation.service import open_escalation
    from triage_app.held_release import release_all_held

    settings = settings_from_args(args)
    link = open_escalation(settings)
    if link is None:
        raise ConfigError("queue release: no central server is configured (escalation.central_url)")
    with link:
        # Without the server's keys (open_escalation has said why) nothing can be sealed yet.
        report = release_all_held(settings, link.queue, keys_error=link.keys_error)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        for case in report.cases:
            print(f"{case.case_id}: {case.outcome.value}: {case.detail}")
        print(report.headline())
    return EXIT_SOME_FAILED if report.still_held else EXIT_OK
