"""Saving settings changes with their audit entry: the rule every shell must follow.

``config`` validates and stays free of the store; this module pairs a saved change with its
audit-log entry, so the CLI today and the settings dialog later cannot save one without the other.
"""

from __future__ import annotations

from pathlib import Path

from triage_app.config import Change, Settings, save_settings
from triage_app.store import CaseStore


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
