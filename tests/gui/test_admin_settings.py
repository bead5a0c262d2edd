"""The settings dialog: admin lock, audited saves, refusals naming the field, live preview."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtWidgets import QFileDialog
from pytestqt.qtbot import QtBot

from tests.helpers import write_phantoms
from triage_app import config
from triage_app.admin import current_user
from triage_app.config import (
    ADMIN_PASSWORD_KEY,
    Bool,
    Settings,
    SettingSpec,
    load_settings,
    save_settings,
    set_admin_password,
)
from triage_app.errors import StoreError
from triage_app.gui.qt_settings import QtSettingsDialog
from triage_app.gui.settings_model import describe_figures, form_specs
from triage_app.model.manifest import Thresholds, find_bundle, load_manifest
from triage_app.pipeline import PipelineConfig
from triage_app.policy import ESCALATE, decide
from triage_app.store import AuditEntry, CaseStore
from triage_app.threshold_preview import figures, score_folder

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def validation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("validation")
    truth = write_phantoms(folder, 31, 24)
    lines = (json.dumps({"file": name, "label": label}) for name, label in truth.items())
    (folder / "labels.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def admin_config(config_path: Path) -> Path:
    save_settings(set_admin_password(Settings(), PASSWORD), config_path)
    return config_path


@pytest.fixture
def dialog(
    qtbot: QtBot, settings: Settings, admin_config: Path, validation: Path
) -> Iterator[QtSettingsDialog]:
    shown = QtSettingsDialog(settings, admin_config, validation_folder=validation)
    qtbot.addWidget(shown)
    shown.show()
    yield shown
    shown.close()


def _unlock(qtbot: QtBot, dialog: QtSettingsDialog, password: str) -> bool:
    dialog.password.setText(password)
    with qtbot.waitSignal(dialog.unlocked) as blocker:
        dialog.unlock()
    return bool(blocker.args[0])


def _apply(qtbot: QtBot, dialog: QtSettingsDialog) -> None:
    before = dialog.message.text()
    dialog.apply()
    qtbot.waitUntil(lambda: dialog.message.text() not in (before, "Saving…"))


def _audit(settings: Settings) -> list[AuditEntry]:
    with CaseStore.open(settings.case_store_path) as store:
        return store.audit_log()


def test_every_setting_but_the_password_hash_has_an_editor(dialog: QtSettingsDialog) -> None:
    assert set(dialog.editors) == {s.key for s in config.SETTINGS} - {ADMIN_PASSWORD_KEY}
    for spec in form_specs():
        assert spec.parse(dialog.editors[spec.key].text()) == dialog.file_settings.get(spec.key)


@pytest.mark.expect_log_warnings
def test_a_wrong_password_is_refused_and_nothing_is_saved(
    qtbot: QtBot, dialog: QtSettingsDialog, settings: Settings, admin_config: Path
) -> None:
    quota = dialog.editors["escalation.queue_quota_mb"]
    assert dialog.editors["display.theme"].widget.isEnabled()  # a clinician field
    assert quota.widget.isReadOnly()  # type: ignore[attr-defined]
    assert not _unlock(qtbot, dialog, "not the password")
    assert "Wrong admin password" in dialog.message.text()
    assert quota.widget.isReadOnly()  # type: ignore[attr-defined]
    assert dialog.thresholds.low.isReadOnly()
    assert not dialog.is_admin

    before = admin_config.read_bytes()
    quota.set_text("4096")  # as if the read-only editor were bypassed
    _apply(qtbot, dialog)
    assert "escalation.queue_quota_mb" in dialog.message.text()
    assert "admin password is required" in dialog.message.text()
    assert admin_config.read_bytes() == before
    assert _audit(settings) == []


def test_with_the_password_a_change_is_saved_and_audited_with_old_and_new(
    qtbot: QtBot, dialog: QtSettingsDialog, settings: Settings, admin_config: Path
) -> None:
    saved: list[object] = []
    dialog.saved.connect(saved.append)
    assert _unlock(qtbot, dialog, PASSWORD)
    assert not dialog.editors["escalation.queue_quota_mb"].widget.isReadOnly()  # type: ignore[attr-defined]
    dialog.editors["escalation.queue_quota_mb"].set_text("4096")
    dialog.editors["display.theme"].set_text("light")
    _apply(qtbot, dialog)
    assert dialog.message.text().startswith("Saved 2 changes"), dialog.message.text()
    on_disk = load_settings(admin_config, env={})
    assert on_disk.get("escalation.queue_quota_mb") == 4096
    assert on_disk.theme == "light"
    entries = [(e.actor, e.action, e.detail) for e in _audit(settings)]
    assert entries == [
        (
            current_user(),
            "config.set",
            {"key": "escalation.queue_quota_mb", "old": 2048, "new": 4096, "admin": True},
        ),
        (
            current_user(),
            "config.set",
            {"key": "display.theme", "old": "dark", "new": "light", "admin": False},
        ),
    ]
    assert len(saved) == 1
    assert dialog.changed_fields() == {}


def test_the_form_saves_its_own_changes_only_and_keeps_what_was_saved_meanwhile(
    qtbot: QtBot, dialog: QtSettingsDialog, settings: Settings, admin_config: Path
) -> None:
    """The dialog stays open while an admin runs ``config set``: saving the form must not put
    back the values it was opened with; a field changed in both is refused, not overwritten."""
    meanwhile = load_settings(admin_config, env={})
    elsewhere = meanwhile.with_values(
        **{"escalation.queue_quota_mb": 4096, "display.font_scale": 1.5}
    )
    save_settings(elsewhere, admin_config, base=meanwhile)

    dialog.editors["display.theme"].set_text("light")
    _apply(qtbot, dialog)

    assert dialog.message.text().startswith("Saved 1 change"), dialog.message.text()
    on_disk = load_settings(admin_config, env={})
    assert on_disk == elsewhere.with_values(**{"display.theme": "light"})
    # After saving, the form shows the file as it is, other people's changes included.
    assert dialog.editors["display.font_scale"].text() == on_disk.get_text("display.font_scale")
    assert dialog.editors["escalation.queue_quota_mb"].text() == "4096"

    # Changed elsewhere again after the form's save: editing it now is refused.
    save_settings(on_disk.with_values(**{"display.font_scale": 1.75}), admin_config, base=on_disk)
    before = admin_config.read_bytes()
    dialog.editors["display.font_scale"].set_text("1.25")  # the form still shows 1.5
    _apply(qtbot, dialog)

    assert dialog.message.text() == (
        f"Not saved: {admin_config}: display.font_scale was changed meanwhile (now 1.75); "
        "nothing was saved: reload and try again"
    )
    assert admin_config.read_bytes() == before
    assert [(e.action, e.detail.get("key")) for e in _audit(settings)] == [
        ("config.set", "display.theme"),
        ("config.set", "display.font_scale"),
        ("config.save_failed", None),
    ]


@pytest.mark.parametrize(
    ("key", "text", "reason"),
    [
        ("escalation.central_url", "ftp://central", "must look like an http"),
        ("escalation.central_url", "https://central.example", "set escalation.tls_pin"),
        ("receiver.allowed_calling_aes", "SCANNER\\1", "must look like"),
    ],
)
def test_an_invalid_value_is_refused_with_the_field_name(
    qtbot: QtBot,
    dialog: QtSettingsDialog,
    settings: Settings,
    admin_config: Path,
    key: str,
    text: str,
    reason: str,
) -> None:
    assert _unlock(qtbot, dialog, PASSWORD)
    before = admin_config.read_bytes()
    dialog.editors[key].set_text(text)
    _apply(qtbot, dialog)
    assert dialog.message.text().startswith(f"Not saved: {key}: "), dialog.message.text()
    assert reason in dialog.message.text()
    assert admin_config.read_bytes() == before
    assert _audit(settings) == []


def test_a_new_declaration_appears_in_the_form_without_widget_code(
    qtbot: QtBot,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    admin_config: Path,
    validation: Path,
) -> None:
    extra = SettingSpec("display.show_tips", Bool(), False, "Show a tip when the app starts.")
    monkeypatch.setattr(config, "SETTINGS", (*config.SETTINGS, extra))
    monkeypatch.setattr(config, "SPECS", {**config.SPECS, extra.key: extra})
    shown = QtSettingsDialog(settings, admin_config, validation_folder=validation)
    qtbot.addWidget(shown)
    editor = shown.editors[extra.key]
    assert editor.widget.accessibleName() == extra.key
    editor.set_text("true")
    _apply(qtbot, shown)
    assert shown.message.text().startswith("Saved 1 change")
    assert load_settings(admin_config, env={}).get(extra.key) is True


def test_moving_a_threshold_shows_the_core_figures_and_saves_them_for_this_model(
    qtbot: QtBot, dialog: QtSettingsDialog, settings: Settings, admin_config: Path
) -> None:
    page = dialog.thresholds
    qtbot.waitUntil(lambda: page.scored_folder is not None, timeout=30_000)
    assert page.scored_folder is not None
    cases = page.scored_folder.cases
    assert len(cases) == 24
    assert page.plot.curve and page.plot.point is not None
    assert _unlock(qtbot, dialog, PASSWORD)

    for low, high in ((0.2, 0.9), (0.001, 0.999), (0.5, 0.5)):
        page.low.setValue(low)
        page.high.setValue(high)
        chosen = Thresholds(low, high)
        expected = page.figures
        assert expected is not None and expected.thresholds == chosen
        # The same figures, counted case by case with the policy itself:
        decisions = [decide(c.score, chosen, c.scope).decision for c in cases]
        local = [(d, c.label) for d, c in zip(decisions, cases, strict=True) if d != ESCALATE]
        assert expected.escalated == decisions.count(ESCALATE)
        assert expected.local == len(local)
        assert expected.local_errors == sum(1 for d, label in local if d != label)
        assert (page.escalated.text(), page.errors.text()) == describe_figures(expected)
        assert page.plot.point == (expected.coverage, expected.local_error_rate)

    # Dragging a slider moves the threshold (and the figures) too.
    page.sliders["Normal below"].setValue(1500)
    assert page.low.value() == 0.15
    assert page.figures is not None and page.figures.thresholds.normal_below == 0.15
    page.high.setValue(0.75)
    assert page.sliders["Abnormal at or above"].value() == 7500

    page.low.setValue(0.01)
    page.high.setValue(0.95)
    model_key = load_manifest(find_bundle(settings.model_name, settings.model_dir)).key
    assert dialog.changed_fields() == {
        "escalation.normal_below": "0.01",
        "escalation.abnormal_at_or_above": "0.95",
        "escalation.thresholds_model": model_key,
    }
    _apply(qtbot, dialog)
    on_disk = load_settings(admin_config, env={})
    assert (on_disk.normal_below, on_disk.abnormal_at_or_above) == (0.01, 0.95)
    assert on_disk.thresholds_model == model_key
    keys = [e.detail["key"] for e in _audit(settings)]
    assert sorted(keys) == sorted(dialog.changed_fields() or keys)


def test_thresholds_out_of_order_are_refused_naming_the_field(
    qtbot: QtBot, dialog: QtSettingsDialog, admin_config: Path
) -> None:
    assert _unlock(qtbot, dialog, PASSWORD)
    dialog.thresholds.low.setValue(0.9)
    dialog.thresholds.high.setValue(0.2)
    assert "must be below" in dialog.thresholds.escalated.text()
    before = admin_config.read_bytes()
    _apply(qtbot, dialog)
    assert "escalation.normal_below" in dialog.message.text()
    assert admin_config.read_bytes() == before


def test_the_admin_menu_opens_the_settings(qtbot: QtBot, window, config_path: Path) -> None:
    window.actions_by_command["admin_settings"].trigger()
    assert window.settings_dialog is not None and window.settings_dialog.isVisible()
    window.settings_dialog.editors["display.font_scale"].set_text("1.25")
    with qtbot.waitSignal(window.settings_saved):
        window.settings_dialog.apply()
    assert window.settings.font_scale == 1.25
    assert window.importer.settings.font_scale == 1.25
    assert load_settings(config_path, env={}).font_scale == 1.25


def test_an_admin_can_preview_on_a_folder_of_their_own(
    qtbot: QtBot,
    dialog: QtSettingsDialog,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    page = dialog.thresholds
    qtbot.waitUntil(lambda: page.scored_folder is not None, timeout=30_000)
    site = tmp_path / "site-validation"
    truth = write_phantoms(site, 77, 10)
    (site / "truth.json").write_text(json.dumps(truth), encoding="utf-8")
    monkeypatch.setattr(
        QFileDialog, "getExistingDirectory", staticmethod(lambda *a, **k: str(site))
    )

    with qtbot.waitSignal(page.scored, timeout=30_000):
        page.choose_folder.click()

    assert page.scored_folder is not None and page.scored_folder.folder == site
    assert "site-validation — 10 images" in page.source.text()
    expected = figures(
        score_folder(site, PipelineConfig.from_settings(settings)).cases,
        Thresholds(page.low.value(), page.high.value()),
    )
    assert page.figures == expected


@pytest.mark.expect_log_warnings  # the dialog logs the refused save
def test_a_change_whose_audit_entry_cannot_be_written_is_not_saved(
    qtbot: QtBot,
    dialog: QtSettingsDialog,
    admin_config: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As with a store locked by the watch service: "Not saved" must be true."""

    def refuse(store: CaseStore, actor: str, action: str, detail: object) -> None:
        raise StoreError("case store: could not write the audit log: database is locked")

    monkeypatch.setattr(CaseStore, "audit", refuse)
    before = admin_config.read_bytes()
    dialog.editors["display.theme"].set_text("light")
    _apply(qtbot, dialog)
    assert dialog.message.text().startswith("Not saved: case store:"), dialog.message.text()
    assert admin_config.read_bytes() == before
    assert dialog.changed_fields() == {"display.theme": "light"}


def test_a_new_case_store_applies_at_the_next_start_only(
    qtbot: QtBot, window, settings: Settings, admin_config: Path, tmp_path: Path
) -> None:
    """Switching it live moved the importer to the new store and left the worklist on the old.
    The store holds the audit log: moving it is an admin change."""
    config_path = admin_config
    window.show_settings()
    dialog = window.settings_dialog
    assert _unlock(qtbot, dialog, PASSWORD)
    elsewhere = tmp_path / "elsewhere" / "cases.sqlite3"
    dialog.editors["paths.case_store"].set_text(str(elsewhere))
    dialog.editors["display.font_scale"].set_text("1.25")
    with qtbot.waitSignal(window.settings_saved):
        dialog.apply()

    assert load_settings(config_path, env={}).case_store_path == elsewhere
    assert window.settings.case_store_path == settings.case_store_path
    assert window.importer.settings.case_store_path == settings.case_store_path
    assert window.settings.font_scale == 1.25  # other changes apply at once
    assert "Restart the app to apply paths.case_store" in dialog.message.text()
    assert window.status.currentMessage() == "Saved; restart the app to apply paths.case_store"
