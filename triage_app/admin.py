"""Admin actions with their audit entries: the rules every shell (CLI, desktop app) follows.

``config`` validates and stays free of the store; this module pairs a saved change, or a
queue retry, with its audit-log entry, so no shell can do one without the other.
"""

from __future__ import annotations

import os
from pathlib import Path

from triage_app.config import Change, Settings, save_settings, verify_admin_password
from triage_app.errors import AdminAuthError
from triage_app.escalation.outbox import Outbox, OutboxItem
from triage_app.states import CaseEvent, CaseState
from triage_app.store import CaseStore


def current_user() -> str:
    """The login name recorded with admin actions and clinician feedback."""
    try:
        return os.getlogin()
    except OSError:
        return os.environ.get("USER", "unknown")


def require_admin(settings: Settings, password: str) -> None:
    """Raise ``AdminAuthError`` unless ``password`` is the admin password."""
    if not settings.has_admin_password:
        raise AdminAuthError("no admin password is set; set one with config set-admin-password")
    if not verify_admin_password(settings, password):
        raise AdminAuthError("the admin password is wrong")


def retry_queued_case(outbox: Outbox, store: CaseStore, case_id: str, actor: str) -> OutboxItem:
    """Put a refused (or waiting) case back in the queue, with its state change and audit."""
    item = outbox.retry(case_id)
    case = store.get(case_id)
    if case is not None and case.state is CaseState.QUARANTINED:
        store.apply(case_id, CaseEvent.ADMIN_RETRY, f"by {actor}")
    store.audit(actor, "queue.retry", {"case_id": case_id})
    return item


def save_audited(
    settings: Settings,
    config_path: Path | None,
    store_path: Path,
    *,
    actor: str,
    action: str,
    change: Change | None = None,
) -> Path:
    """Save ``settings`` to ``config_path`` and record ``action`` (with old and new values)."""
    written = save_settings(settings, config_path)
    detail: dict[str, object] = {}
    if change is not None:
        detail = {"key": change.key, "old": change.old, "new": change.new, "admin": change.admin}
    with CaseStore.open(store_path) as store:
        store.audit(actor=actor, action=action, detail=detail)
    return written
