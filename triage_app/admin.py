"""Admin actions with their audit entries: the rules every shell (CLI, desktop app) follows.

``config`` validates and stays free of the store; this module pairs a saved change, or a
queue retry, with its audit-log entry, so no shell can do one without the other.

The order is the same for both: the audit entry is written first, then the action. The case
store and the settings file (or the outbox) cannot share one transaction, so one of them must
go first, and only this order fails safe: an audit store that is locked or full refuses the
entry before anything has changed. If the action then fails, a second entry says so (the log
is append-only, so the first is answered rather than removed). The opposite order could leave
a change that the audit log never mentions, which an audited device must not allow.
"""

from __future__ import annotations

import logging
import os
import pwd
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from triage_app.config import Change, Settings, save_settings, verify_admin_password
from triage_app.errors import AdminAuthError, ConfigError, ResealError, TriageError
from triage_app.escalation.outbox import Outbox, OutboxItem, OutboxState
from triage_app.states import CaseEvent, CaseState
from triage_app.store import CaseStore

log = logging.getLogger(__name__)


def current_user() -> str:
    """The user name recorded with admin actions and clinician feedback.

    The effective user first: it is who acts (``sudo -u triage`` acts as ``triage``), and it is
    known without a login terminal or ``$USER`` (a service, cron, a container). A uid without
    a passwd entry is recorded as its number rather than as nobody.
    """
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return os.environ.get("USER") or f"uid {uid}"


def require_admin(settings: Settings, password: str) -> None:
    """Raise ``AdminAuthError`` unless ``password`` is the admin password."""
    if not settings.has_admin_password:
        raise AdminAuthError(
            "no admin password is set; set one with triage-app config set-admin-password"
        )
    if not verify_admin_password(settings, password):
        raise AdminAuthError("the admin password is wrong")


def retry_queued_case(
    outbox: Outbox,
    store: CaseStore,
    case_id: str,
    actor: str,
    *,
    reseal: Callable[[str], OutboxItem] | None = None,
) -> OutboxItem:
    """Put a refused case back in the queue, with its state change and audit.

    A case refused for how its envelope was sealed (``OutboxItem.needs_reseal``) goes back
    through ``reseal`` (a new envelope from its source) when the shell gives one; any other goes
    back as it is.
    """
    queued = outbox.get(case_id)
    resealing = reseal is not None and queued is not None and queued.needs_reseal
    detail: dict[str, object] = {"case_id": case_id, "resealed": resealing}
    with _audited_first(store, actor, [("queue.retry", detail)], "queue.retry_failed"):
        item = reseal(case_id) if reseal is not None and resealing else outbox.retry(case_id)
    case = store.get(case_id)
    if case is not None and case.state is CaseState.QUARANTINED:
        store.apply(case_id, CaseEvent.ADMIN_RETRY, f"by {actor}")
    return item


@dataclass(frozen=True)
class RetryOutcome:
    """What an admin retry did with one case: ``item`` as queued again, or the ``error`` that
    kept it quarantined."""

    case_id: str
    resealed: bool
    item: OutboxItem | None = None
    error: TriageError | None = None

    def line(self) -> str:
        if self.error is not None:
            return f"{self.case_id}: still quarantined: {self.error.code}: {self.error}"
        return f"{self.case_id}: {'sealed anew and ' if self.resealed else ''}back in the queue"


def retry_refused_cases(
    settings: Settings, case_ids: Sequence[str], actor: str, *, every_refused: bool = False
) -> list[RetryOutcome]:
    """``queue retry`` and the desktop app's retry: each case back in the queue, audited; a case
    refused for how it was sealed is sealed anew from its source image with the current keys
    and clock (see ``held_release.reseal_from_source``). A case that cannot be is reported and
    stays quarantined; the others go on. ``every_refused`` adds every quarantined case.
    """
    from triage_app.escalation.queueing import EscalationQueue
    from triage_app.escalation.service import open_escalation, open_outbox
    from triage_app.held_release import lazy_triage, reseal_from_source

    link = open_escalation(settings, fetch_keys=False)
    outcomes: list[RetryOutcome] = []
    with ExitStack() as stack:
        if link is not None:
            outbox = stack.enter_context(link).outbox
        else:
            outbox = stack.enter_context(open_outbox(settings))
        store = stack.enter_context(CaseStore.open(settings.case_store_path))
        wanted = list(case_ids)
        if every_refused:
            wanted += [i.case_id for i in outbox.items() if i.state is OutboxState.QUARANTINED]
        if not wanted and not every_refused:
            raise ConfigError("queue retry: name the case ids to retry, or give --all")
        reseal: Callable[[str], OutboxItem] | None = None
        if link is not None and link.keys is not None:
            queue = EscalationQueue(outbox, link.device, link.keys.server_key)
            triage = lazy_triage(settings)

            def reseal(case_id: str) -> OutboxItem:
                return reseal_from_source(store, queue, triage, case_id)

        for case_id in dict.fromkeys(wanted):
            before = outbox.get(case_id)
            resealed = reseal is not None and before is not None and before.needs_reseal
            try:
                item = retry_queued_case(outbox, store, case_id, actor, reseal=reseal)
            except ResealError as err:
                outcomes.append(RetryOutcome(case_id, resealed, error=err))
                continue
            outcomes.append(RetryOutcome(case_id, resealed, item=item))
    return outcomes


def save_audited(
    settings: Settings,
    config_path: Path | None,
    store_path: Path,
    *,
    base: Settings,
    actor: str,
    action: str,
    change: Change | None = None,
) -> Path:
    """Save what ``settings`` changes from ``base`` (the settings as loaded) to ``config_path``
    and record ``action`` (with old and new values).

    Only the changed values are written (see :func:`~triage_app.config.save_settings`): a
    change saved by someone else since ``base`` was loaded stays, and a save whose key they
    changed too is refused (and answered in the log), so an entry's old value is what the file
    held.
    """
    if settings == base:  # a change that is none: no entry, and the file is left alone
        return save_settings(settings, config_path, base=base)
    detail = {} if change is None else change_detail(change)
    with CaseStore.open(store_path) as store, _audited_first(store, actor, [(action, detail)]):
        return save_settings(settings, config_path, base=base)


def save_changes_audited(
    settings: Settings,
    config_path: Path | None,
    store_path: Path,
    *,
    base: Settings,
    actor: str,
    changes: Sequence[Change],
) -> Path:
    """Save what ``settings`` changes from ``base`` once, with one ``config.set`` entry per
    change (old and new values).

    The settings form applies several fields at a time: one file write for all of them means
    a failure leaves either every change or none, never the first few. As for
    :func:`save_audited`, only the changed values are written.
    """
    entries = [("config.set", change_detail(change)) for change in changes]
    with CaseStore.open(store_path) as store, _audited_first(store, actor, entries):
        return save_settings(settings, config_path, base=base)


def change_detail(change: Change) -> dict[str, object]:
    return {"key": change.key, "old": change.old, "new": change.new, "admin": change.admin}


@contextmanager
def _audited_first(
    store: CaseStore,
    actor: str,
    entries: Sequence[tuple[str, Mapping[str, object]]],
    failed_action: str = "config.save_failed",
) -> Iterator[None]:
    """Write ``entries`` to the audit log, then run the block; record it if the block fails.

    See the module docstring for why the entries come first. An entry that cannot be written
    stops everything (the ones before it are answered as failed too); a failed block is
    answered with ``failed_action`` and the error is raised again.
    """
    written: list[Mapping[str, object]] = []
    try:
        for action, detail in entries:
            store.audit(actor=actor, action=action, detail=detail)
            written.append(detail)
        yield
    except BaseException as exc:
        if written:
            _record_failure(store, actor, failed_action, written, exc)
        raise


def _record_failure(
    store: CaseStore,
    actor: str,
    action: str,
    details: Sequence[Mapping[str, object]],
    exc: BaseException,
) -> None:
    """Answer audit entries whose action did not happen; best effort, the error is raised."""
    error = exc.code if isinstance(exc, TriageError) else type(exc).__name__
    try:
        store.audit(actor=actor, action=action, detail={"entries": list(details), "error": error})
    except TriageError as err:
        log.error("audit: %s could not be recorded (%s)", action, err.code)
