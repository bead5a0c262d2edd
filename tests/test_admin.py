"""Admin actions and their audit entries: both happen, or the audit log says what did not."""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import pytest

from tests.test_secrets import (
    ROOT,
    as_service_user,
    give_to_service_user,
    reachable_folder,
    service_user_env,
)
from triage_app.admin import current_user, require_admin, retry_queued_case, save_changes_audited
from triage_app.config import Change, Settings, apply_change, load_settings, save_settings
from triage_app.errors import AdminAuthError, ConfigError, OutboxError, StoreError
from triage_app.escalation.outbox import Outbox, OutboxItem
from triage_app.store import CaseStore


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings({"paths.data_dir": tmp_path / "data", "processing.workers": 1})


def _two_changes(settings: Settings) -> tuple[Settings, list[Change]]:
    updated, first = apply_change(settings, "processing.workers", "3", admin_password=None)
    updated, second = apply_change(updated, "display.theme", "light", admin_password=None)
    return updated, [first, second]


def _actions(settings: Settings) -> list[tuple[str, Mapping[str, object]]]:
    with CaseStore.open(settings.case_store_path) as store:
        return [(entry.action, entry.detail) for entry in store.audit_log()]


def _refuse_audit_call(monkeypatch: pytest.MonkeyPatch, number: int) -> None:
    """The ``number``-th audit entry fails as a locked or full store does."""
    calls = 0
    real = CaseStore.audit

    def audit(store: CaseStore, actor: str, action: str, detail: Mapping[str, object]) -> None:
        nonlocal calls
        calls += 1
        if calls == number:
            raise StoreError("case store: could not write the audit log: database is locked")
        real(store, actor, action, detail)

    monkeypatch.setattr(CaseStore, "audit", audit)


def _save_refused_by_audit_call(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch, number: int
) -> list[tuple[str, Mapping[str, object]]]:
    """Two changes saved while the ``number``-th audit entry is refused: the save fails and
    the settings file is as it was. Returns the audit log's entries."""
    config_path = tmp_path / "settings.toml"
    save_settings(settings, config_path)
    before = config_path.read_bytes()
    updated, changes = _two_changes(settings)
    _refuse_audit_call(monkeypatch, number)

    with pytest.raises(StoreError):
        save_changes_audited(
            updated,
            config_path,
            settings.case_store_path,
            base=settings,
            actor="admin",
            changes=changes,
        )

    assert config_path.read_bytes() == before
    return _actions(settings)


def test_settings_are_not_saved_when_their_audit_entry_cannot_be_written(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _save_refused_by_audit_call(tmp_path, settings, monkeypatch, 1) == []


def test_a_second_entry_refused_leaves_the_file_alone_and_answers_the_first(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = {"key": "processing.workers", "old": 1, "new": 3, "admin": False}
    assert _save_refused_by_audit_call(tmp_path, settings, monkeypatch, 2) == [
        ("config.set", first),
        ("config.save_failed", {"entries": [first], "error": "store_error"}),
    ]


def test_a_settings_file_that_cannot_be_written_is_answered_in_the_audit_log(
    tmp_path: Path, settings: Settings
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the settings folder should be", encoding="utf-8")
    updated, changes = _two_changes(settings)

    with pytest.raises(ConfigError, match="cannot save the settings file"):
        save_changes_audited(
            updated,
            blocker / "settings.toml",
            settings.case_store_path,
            base=settings,
            actor="admin",
            changes=changes,
        )

    actions = _actions(settings)
    assert [action for action, _detail in actions] == [
        "config.set",
        "config.set",
        "config.save_failed",
    ]
    assert actions[2][1]["error"] == "config_invalid"


def test_all_changes_are_saved_in_one_write_each_with_its_entry(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_path = save_settings(settings, tmp_path / "settings.toml")
    updated, changes = _two_changes(settings)
    writes: list[tuple[Path | None, Settings | None]] = []
    real_save = save_settings

    def save(saved: Settings, path: Path | None = None, *, base: Settings | None = None) -> Path:
        writes.append((path, base))
        return real_save(saved, path, base=base)

    monkeypatch.setattr("triage_app.admin.save_settings", save)
    written = save_changes_audited(
        updated,
        config_path,
        settings.case_store_path,
        base=settings,
        actor="admin",
        changes=changes,
    )

    assert written == config_path and writes == [(config_path, settings)]
    assert [detail["key"] for _action, detail in _actions(settings)] == [
        "processing.workers",
        "display.theme",
    ]


def test_a_save_refused_for_a_value_changed_meanwhile_is_answered_in_the_audit_log(
    tmp_path: Path, settings: Settings
) -> None:
    """The entries go first (module docstring); a save refused because someone else changed
    the same key since ``base`` was loaded is answered, and the file keeps their value."""
    config_path = save_settings(settings, tmp_path / "settings.toml")
    meanwhile = settings.with_values(**{"processing.workers": 5})
    save_settings(meanwhile, config_path, base=settings)
    updated, changes = _two_changes(settings)

    with pytest.raises(ConfigError, match=r"processing\.workers was changed meanwhile \(now 5\)"):
        save_changes_audited(
            updated,
            config_path,
            settings.case_store_path,
            base=settings,
            actor="admin",
            changes=changes,
        )

    assert load_settings(config_path, env={}) == meanwhile
    entries = [detail for _action, detail in _actions(settings)]
    assert [action for action, _detail in _actions(settings)] == [
        "config.set",
        "config.set",
        "config.save_failed",
    ]
    assert entries[2] == {"entries": entries[:2], "error": "config_invalid"}


class _Outbox:
    """An outbox that records whether it was asked to retry, and may refuse."""

    def __init__(self, error: Exception | None = None) -> None:
        self.retried: list[str] = []
        self._error = error

    def get(self, case_id: str) -> OutboxItem | None:
        return None

    def retry(self, case_id: str) -> OutboxItem:
        self.retried.append(case_id)
        if self._error is not None:
            raise self._error
        return cast(OutboxItem, None)


def test_a_queue_retry_is_not_done_when_its_audit_entry_cannot_be_written(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = _Outbox()
    _refuse_audit_call(monkeypatch, 1)
    with CaseStore.open(settings.case_store_path) as store, pytest.raises(StoreError):
        retry_queued_case(cast(Outbox, outbox), store, "case-1", "admin")
    assert outbox.retried == []
    assert _actions(settings) == []


def test_a_refused_queue_retry_is_answered_in_the_audit_log(settings: Settings) -> None:
    outbox = _Outbox(OutboxError("outbox: cannot retry case case-1: it is pending"))
    with CaseStore.open(settings.case_store_path) as store, pytest.raises(OutboxError):
        retry_queued_case(cast(Outbox, outbox), store, "case-1", "admin")
    assert outbox.retried == ["case-1"]
    assert _actions(settings) == [
        ("queue.retry", {"case_id": "case-1", "resealed": False}),
        (
            "queue.retry_failed",
            {"entries": [{"case_id": "case-1", "resealed": False}], "error": "outbox_error"},
        ),
    ]


def test_the_actor_is_the_effective_user_without_a_login_or_user_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A service, cron or container has no login terminal and often no $USER: the uid still
    names someone, and "unknown" in an audit log answers nothing."""

    def no_login() -> str:
        raise OSError("no controlling terminal")

    monkeypatch.setattr(os, "getlogin", no_login)
    monkeypatch.delenv("USER", raising=False)
    assert current_user() == pwd.getpwuid(os.geteuid()).pw_name


def test_without_an_admin_password_the_refusal_names_the_command_that_sets_one() -> None:
    with pytest.raises(AdminAuthError) as info:
        require_admin(Settings(), "anything")
    assert "triage-app config set-admin-password" in str(info.value)


# --- The audit store in a data folder the user may not write ------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("command", "stdin"),
    [(("set", "display.theme", "light"), ""), (("set-admin-password", "--stdin"), "a password\n")],
    ids=["set", "set-admin-password"],
)
def test_a_data_folder_the_user_may_not_write_refuses_a_save_with_2_and_the_fix(
    command: tuple[str, ...], stdin: str
) -> None:
    """The audit entry goes first, to the case store in the data folder; a data folder left
    to root made it ``store_error``, temporary (75): "try again" for what only an admin fixes.
    The command runs as ``nobody`` (root may write anywhere; helpers: tests/test_secrets.py)."""
    with reachable_folder() as base:
        data = base / "data"
        data.mkdir(mode=0o755)  # root's, as `sudo mkdir` or a first run as root leaves it
        path = base / "settings.toml"
        path.write_text(f'[paths]\ndata_dir = "{data}"\n', encoding="utf-8")
        give_to_service_user(base / "settings.toml", mode=0o600)
        before = path.read_bytes()

        run = subprocess.run(
            as_service_user("-m", "triage_app", "config", *command, "--config", path),
            capture_output=True,
            text=True,
            input=stdin,
            timeout=120,
            env=service_user_env(base),
            check=False,
        )

        after = path.read_bytes()
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        f"triage-app: error: config_invalid: paths.case_store: cannot use {data}: owned by "
        f"{ROOT}, not by nobody, the user this runs as (mode 0755): chown -R nobody: {data}"
    ]
    assert after == before
