"""The settings form without Qt: which settings it shows, and applying what the admin typed.

The form is generated from :data:`triage_app.config.SETTINGS`, read when the dialog opens, so a
new declaration appears in it without widget code. Every change goes through
:func:`~triage_app.config.apply_change` (type, bounds, admin password, cross-field rules) and is
saved with one audit entry per field by :func:`~triage_app.admin.save_changes_audited`, as
``config set`` does, in one write for all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from triage_app import config
from triage_app.admin import save_changes_audited
from triage_app.config import Change, Settings, SettingSpec, apply_change
from triage_app.errors import ConfigError
from triage_app.threshold_preview import PreviewFigures

__all__ = [
    "RESTART_KEYS",
    "AppliedChanges",
    "apply_form",
    "describe_figures",
    "form_specs",
    "save_changes",
]

log = logging.getLogger(__name__)

#: Settings the running app cannot take over: the worklist, the history, the status monitor
#: and the uploader each opened the case store (in the data folder) when the window opened,
#: so switching it under some of them would split the app across two stores. Saved, they
#: apply at the next start.
RESTART_KEYS = frozenset({"paths.data_dir", "paths.case_store"})


def form_specs() -> list[SettingSpec]:
    """Every declared setting but the password hash (it has its own command)."""
    return [spec for spec in config.SETTINGS if spec.key != config.ADMIN_PASSWORD_KEY]


@dataclass(frozen=True)
class AppliedChanges:
    """The form's changes applied to ``base``, the file's settings the form was filled from."""

    base: Settings
    settings: Settings
    changes: tuple[Change, ...]

    @property
    def live(self) -> tuple[Change, ...]:
        """The changes the running app takes over at once."""
        return tuple(c for c in self.changes if c.key not in RESTART_KEYS)

    @property
    def needing_restart(self) -> tuple[str, ...]:
        """The changed keys that apply only once the app is started again."""
        return tuple(c.key for c in self.changes if c.key in RESTART_KEYS)


def apply_form(
    settings: Settings, raw_by_key: Mapping[str, str], admin_password: str | None
) -> AppliedChanges:
    """Apply the changed fields one by one; the first refusal is raised with its field name.

    A change that only a later one makes consistent (raising ``normal_below`` above the old
    ``abnormal_at_or_above`` together with it) is tried again after the others.

    Raises
    ------
    ConfigError, AdminAuthError
        The message names the field; nothing is applied.
    """
    current = settings
    changes: list[Change] = []
    pending = list(raw_by_key.items())
    while pending:
        refused: list[tuple[str, str]] = []
        first_error: ConfigError | None = None
        for key, raw in pending:
            try:
                current, change = apply_change(current, key, raw, admin_password=admin_password)
            except ConfigError as err:
                refused.append((key, raw))
                first_error = first_error or err
            else:
                changes.append(change)
        if first_error is not None and len(refused) == len(pending):
            raise first_error
        pending = refused
    return AppliedChanges(base=settings, settings=current, changes=tuple(changes))


def save_changes(
    applied: AppliedChanges, config_path: Path | None, store_path: Path, actor: str
) -> Path | None:
    """Save the changed fields with one audit entry (old and new value) each.

    Only those fields are written: a value saved meanwhile by ``config set`` (or another
    window) stays, and one changed meanwhile in a field the form changes too is refused.
    Returns the file written, or None when nothing changed.
    """
    if not applied.changes:
        return None
    written = save_changes_audited(
        applied.settings,
        config_path,
        store_path,
        base=applied.base,
        actor=actor,
        changes=applied.changes,
    )
    log.info("settings saved from the desktop app: %d changes", len(applied.changes))
    return written


def describe_figures(result: PreviewFigures) -> tuple[str, str]:
    """The preview's two lines: share escalated, and errors among local decisions."""
    share = 100 * result.escalated_share
    escalated = f"Escalated: {share:.1f} % ({result.escalated:,} of {result.total:,})"
    rate = result.local_error_rate
    errors = (
        "Errors among local decisions: none decided locally"
        if rate is None
        else f"Errors among local decisions: {100 * rate:.2f} % "
        f"({result.local_errors:,} of {result.local:,})"
    )
    return escalated, errors
