"""Admin settings: a form generated from the settings declarations, and a thresholds page.

One editor per setting type (checkbox, spin box, list, line edit), one tab per section, built
from :func:`~triage_app.gui.settings_model.form_specs` when the dialog opens: a new setting
needs no widget code. Everyone sees the values; admin fields stay read-only until the admin
password is verified. Apply runs every changed field through ``config.apply_change`` and saves
it with its audit entry; a refusal is shown with the message ``config`` gives, which names the
field. Password checks (scrypt) and saving run off the UI thread.

The thresholds page previews the model's behaviour on a labelled folder (the synthetic hold-out
unless told otherwise): share escalated, error rate among local decisions and the risk–coverage
curve, all computed by :mod:`triage_app.threshold_preview`.
"""

from __future__ import annotations

import logging
import threading
from functools import partial
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from triage_app.admin import current_user
from triage_app.config import (
    Bool,
    Float,
    Int,
    Settings,
    SettingSpec,
    Str,
    load_settings,
    verify_admin_password,
)
from triage_app.errors import ConfigError, ManifestError, ModelError, TriageError
from triage_app.gui.qt_risk_plot import QtRiskCoveragePlot
from triage_app.gui.qt_threading import run_detached, run_in_thread
from triage_app.gui.settings_model import (
    AppliedChanges,
    apply_form,
    describe_figures,
    form_specs,
    save_changes,
)
from triage_app.model.manifest import Thresholds, find_bundle, load_manifest
from triage_app.pipeline import PipelineConfig
from triage_app.policy import resolve_thresholds
from triage_app.threshold_preview import (
    PreviewFigures,
    ScoredFolder,
    ScoringCancelledError,
    ensure_holdout,
    figures,
    labels_of,
    risk_coverage,
    score_folder,
)

__all__ = ["FieldEditor", "QtSettingsDialog", "QtThresholdsPage", "make_editor"]

log = logging.getLogger(__name__)

THRESHOLD_KEYS = ("escalation.normal_below", "escalation.abnormal_at_or_above")
THRESHOLDS_MODEL_KEY = "escalation.thresholds_model"


# --- Generated editors ------------------------------------------------------------------------


class FieldEditor:
    """One setting's editor; its value is the text ``config`` parses (``config set`` syntax)."""

    def __init__(self, spec: SettingSpec, widget: QWidget) -> None:
        self.spec = spec
        self.widget = widget
        widget.setObjectName(f"setting_{spec.key}")
        widget.setAccessibleName(spec.key)
        widget.setAccessibleDescription(spec.description)
        widget.setToolTip(f"{spec.description}\n({spec.type.describe()})")

    def text(self) -> str:
        raise NotImplementedError

    def set_text(self, raw: str) -> None:
        raise NotImplementedError

    def set_editable(self, editable: bool) -> None:
        self.widget.setEnabled(editable)


class _LineEditor(FieldEditor):
    def __init__(self, spec: SettingSpec, parent: QWidget) -> None:
        self.edit = QLineEdit(parent)
        super().__init__(spec, self.edit)

    def text(self) -> str:
        return self.edit.text()

    def set_text(self, raw: str) -> None:
        self.edit.setText(raw)

    def set_editable(self, editable: bool) -> None:
        self.edit.setReadOnly(not editable)


class _CheckEditor(FieldEditor):
    def __init__(self, spec: SettingSpec, parent: QWidget) -> None:
        self.box = QCheckBox(parent)
        super().__init__(spec, self.box)

    def text(self) -> str:
        return "true" if self.box.isChecked() else "false"

    def set_text(self, raw: str) -> None:
        self.box.setChecked(raw == "true")


class _ChoiceEditor(FieldEditor):
    def __init__(self, spec: SettingSpec, choices: tuple[str, ...], parent: QWidget) -> None:
        self.combo = QComboBox(parent)
        self.combo.addItems(list(choices))
        super().__init__(spec, self.combo)

    def text(self) -> str:
        return self.combo.currentText()

    def set_text(self, raw: str) -> None:
        self.combo.setCurrentText(raw)


class _IntEditor(FieldEditor):
    def __init__(self, spec: SettingSpec, bounds: Int, parent: QWidget) -> None:
        self.spin = QSpinBox(parent)
        self.spin.setRange(bounds.min, bounds.max)
        super().__init__(spec, self.spin)

    def text(self) -> str:
        return str(self.spin.value())

    def set_text(self, raw: str) -> None:
        self.spin.setValue(int(raw))

    def set_editable(self, editable: bool) -> None:
        self.spin.setReadOnly(not editable)


class _FloatEditor(FieldEditor):
    def __init__(self, spec: SettingSpec, bounds: Float, parent: QWidget) -> None:
        self.spin = QDoubleSpinBox(parent)
        self.spin.setDecimals(3)
        self.spin.setRange(bounds.min, bounds.max)
        self.spin.setSingleStep(0.1 if bounds.max <= 10 else 1.0)
        super().__init__(spec, self.spin)

    def text(self) -> str:
        return f"{self.spin.value():g}"

    def set_text(self, raw: str) -> None:
        self.spin.setValue(float(raw))

    def set_editable(self, editable: bool) -> None:
        self.spin.setReadOnly(not editable)


def make_editor(spec: SettingSpec, parent: QWidget) -> FieldEditor:
    """The editor for ``spec``'s type; anything without a dedicated widget is typed as text."""
    kind = spec.type
    editor: FieldEditor
    if isinstance(kind, Bool):
        editor = _CheckEditor(spec, parent)
    elif isinstance(kind, Int):
        editor = _IntEditor(spec, kind, parent)
    elif isinstance(kind, Float):
        editor = _FloatEditor(spec, kind, parent)
    elif isinstance(kind, Str) and kind.choices is not None:
        editor = _ChoiceEditor(spec, kind.choices, parent)
    else:  # Str, FsPath, Optional, TextList: parsed by the type, as `config set` does
        editor = _LineEditor(spec, parent)
    return editor


# --- Thresholds page --------------------------------------------------------------------------


# Slider resolution: 1/10,000 (the spin boxes show 4 decimals).
_SLIDER_STEPS = 10_000


class QtThresholdsPage(QWidget):
    """Two thresholds for the current model, their preview figures and the risk–coverage plot."""

    thresholds_moved = Signal(float, float)  # by the user, not on load
    scored = Signal(object)  # ScoredFolder, once the validation folder is scored

    def __init__(
        self,
        settings: Settings,
        file_settings: Settings,
        validation_folder: Path | None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._settings = settings
        self._folder = validation_folder
        self.scored_folder: ScoredFolder | None = None
        self.figures: PreviewFigures | None = None
        self._scoring: threading.Event | None = None  # the running scoring's cancel

        self.sliders: dict[str, QSlider] = {}
        self.model_label = QLabel(self)
        self.model_label.setAccessibleName("Model the thresholds apply to")
        self.low = self._spin("Normal below")
        self.high = self._spin("Abnormal at or above")
        self.model_key = ""
        try:
            manifest = load_manifest(find_bundle(settings.model_name, settings.model_dir))
        except ModelError as err:
            self.model_label.setText(f"No model: {err.message}")
            self.setEnabled(False)
        else:
            self.model_key = manifest.key
            active = resolve_thresholds(
                manifest,
                file_settings.thresholds_model,
                file_settings.normal_below,
                file_settings.abnormal_at_or_above,
            )
            self.low.setValue(active.thresholds.normal_below)
            self.high.setValue(active.thresholds.abnormal_at_or_above)
            origin = "approved by an admin" if active.source == "settings" else "model defaults"
            self.model_label.setText(f"Model {manifest.key} · current thresholds: {origin}")
        self.low.valueChanged.connect(self._moved)
        self.high.valueChanged.connect(self._moved)

        self.source = QLabel("Validation set: not scored yet", self)
        self.source.setAccessibleName("Validation set")
        self.source.setWordWrap(True)
        self.source.setMinimumHeight(2 * self.source.fontMetrics().lineSpacing())
        self.escalated = QLabel("", self)
        self.escalated.setAccessibleName("Share escalated")
        self.errors = QLabel("", self)
        self.errors.setAccessibleName("Error rate among local decisions")
        self.plot = QtRiskCoveragePlot(self)
        self.choose_folder = QPushButton("Choose validation folder…", self)
        self.choose_folder.setAccessibleName("Choose a labelled validation folder")
        self.choose_folder.setToolTip(
            "DICOM files with labels.jsonl or truth.json (name → normal, abnormal or "
            "out_of_scope); the synthetic hold-out is used until one is chosen."
        )
        self.choose_folder.clicked.connect(self._choose_folder)

        spins = QFormLayout()
        spins.addRow("Normal below", self._with_slider(self.low))
        spins.addRow("Abnormal at or above", self._with_slider(self.high))
        layout = QVBoxLayout(self)
        layout.addWidget(self.model_label)
        layout.addLayout(spins)
        source_row = QHBoxLayout()
        source_row.addWidget(self.source, 1)
        source_row.addWidget(self.choose_folder)
        layout.addLayout(source_row)
        layout.addWidget(self.escalated)
        layout.addWidget(self.errors)
        layout.addWidget(self.plot, 1)

    def _spin(self, name: str) -> QDoubleSpinBox:
        spin = QDoubleSpinBox(self)
        spin.setDecimals(4)
        spin.setRange(0.0, 1.0)
        spin.setSingleStep(0.001)
        spin.setAccessibleName(name)
        spin.setKeyboardTracking(False)
        return spin

    def _with_slider(self, spin: QDoubleSpinBox) -> QHBoxLayout:
        """A slider to drag the threshold, kept in step with its spin box (the exact value)."""
        slider = QSlider(Qt.Orientation.Horizontal, self)
        slider.setRange(0, _SLIDER_STEPS)
        slider.setAccessibleName(f"{spin.accessibleName()} (slider)")
        slider.setValue(round(spin.value() * _SLIDER_STEPS))
        slider.valueChanged.connect(lambda step: spin.setValue(step / _SLIDER_STEPS))

        def follow(value: float) -> None:
            slider.blockSignals(True)
            slider.setValue(round(value * _SLIDER_STEPS))
            slider.blockSignals(False)

        spin.valueChanged.connect(follow)
        self.sliders[spin.accessibleName()] = slider
        row = QHBoxLayout()
        row.addWidget(slider, 3)
        row.addWidget(spin, 1)
        return row

    def thresholds(self) -> Thresholds | None:
        """The thresholds shown; None while they are out of order."""
        try:
            return Thresholds(self.low.value(), self.high.value())
        except ManifestError:
            return None

    def set_editable(self, editable: bool) -> None:
        self.low.setReadOnly(not editable)
        self.high.setReadOnly(not editable)
        for slider in self.sliders.values():
            slider.setEnabled(editable)

    def start_scoring(self) -> None:
        """Score the validation folder in a thread of its own (rendering the hold-out on first
        use); a scoring already under way is cancelled."""
        if not self.model_key:
            return
        self.stop_scoring()
        settings, folder = self._settings, self._folder
        self.source.setText(
            "Validation set: scoring…"
            if folder is not None
            else "Validation set: preparing the synthetic hold-out and scoring it…"
        )
        cancel = self._scoring = threading.Event()

        def work() -> ScoredFolder:
            target = (
                folder if folder is not None else ensure_holdout(settings.data_dir, cancel=cancel)
            )
            return score_folder(target, PipelineConfig.from_settings(settings), cancel=cancel)

        run_detached(
            work,
            partial(self._scored, cancel),
            partial(self._scoring_failed, cancel),
            owner=self,
            name="threshold-preview",
        )

    def stop_scoring(self) -> None:
        """Cancel the scoring under way, if any (it stops before its next image)."""
        if self._scoring is not None:
            self._scoring.set()
            self._scoring = None

    def use_folder(self, folder: Path) -> None:
        """Preview on ``folder`` (a site's own labelled images) instead of the hold-out."""
        self._folder = folder
        self.scored_folder = None
        self.start_scoring()

    def _choose_folder(self) -> None:
        chosen = QFileDialog.getExistingDirectory(self, "Labelled validation folder")
        if chosen:
            self.use_folder(Path(chosen))

    def _scored(self, cancel: threading.Event, result: ScoredFolder) -> None:
        if cancel.is_set():
            return  # a newer scoring was started, or the dialog closed
        self._scoring = None
        self.scored_folder = result
        counts = labels_of(result.cases)
        skipped = result.unlabelled + result.failed
        self.source.setText(
            f"Validation set: {result.folder.name} — {len(result.cases):,} images "
            f"({counts['normal']:,} normal, {counts['abnormal']:,} abnormal, "
            f"{counts['out_of_scope']:,} out of scope), scored by {result.model_key}"
            + (f"; {skipped:,} files left out" if skipped else "")
        )
        self.plot.set_curve(risk_coverage(result.cases))
        self._update_preview()
        self.scored.emit(result)

    def _scoring_failed(self, cancel: threading.Event, exc: BaseException) -> None:
        if cancel.is_set() or isinstance(exc, ScoringCancelledError):
            return
        self._scoring = None
        message = exc.message if isinstance(exc, TriageError) else type(exc).__name__
        log.error("threshold preview: the validation set could not be scored: %s", message)
        self.source.setText(f"Validation set could not be scored: {message}")

    def _moved(self, _value: float) -> None:
        self._update_preview()
        self.thresholds_moved.emit(self.low.value(), self.high.value())

    def _update_preview(self) -> None:
        thresholds = self.thresholds()
        if thresholds is None:
            self.figures = None
            self.escalated.setText("Normal below must be below abnormal at or above.")
            self.errors.setText("")
            return
        if self.scored_folder is None:
            return
        self.figures = figures(self.scored_folder.cases, thresholds)
        escalated, errors = describe_figures(self.figures)
        self.escalated.setText(escalated)
        self.errors.setText(errors)
        self.plot.set_point(self.figures.coverage, self.figures.local_error_rate)


# --- The dialog -------------------------------------------------------------------------------


class QtSettingsDialog(QDialog):
    """Settings for everyone to read and admins to change; see the module docstring.

    ``settings`` are the app's effective settings (model, data folder, audit store); the form
    shows and saves the settings file's own values, as ``config set`` does.
    """

    saved = Signal(object)  # AppliedChanges
    unlocked = Signal(bool)  # the admin password check's answer

    def __init__(
        self,
        settings: Settings,
        config_path: Path | None,
        parent: QWidget | None = None,
        *,
        validation_folder: Path | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self.setAccessibleName("Settings")
        self._settings = settings
        self._config_path = config_path
        self.file_settings = load_settings(config_path, env={})
        self._password: str | None = None
        self._busy = False

        self.lock_label = QLabel(self)
        self.lock_label.setAccessibleName("Admin lock")
        self.password = QLineEdit(self)
        self.password.setEchoMode(QLineEdit.EchoMode.Password)
        self.password.setPlaceholderText("Admin password")
        self.password.setAccessibleName("Admin password")
        self.password.returnPressed.connect(self.unlock)
        self.unlock_button = QPushButton("Unlock admin fields", self)
        self.unlock_button.clicked.connect(self.unlock)
        lock_bar = QHBoxLayout()
        lock_bar.addWidget(self.lock_label, 1)
        lock_bar.addWidget(self.password)
        lock_bar.addWidget(self.unlock_button)

        self.tabs = QTabWidget(self)
        self.thresholds = QtThresholdsPage(settings, self.file_settings, validation_folder, self)
        self.thresholds.thresholds_moved.connect(self._thresholds_moved)
        self.tabs.addTab(self.thresholds, "Thresholds")
        self.editors: dict[str, FieldEditor] = {}
        self._initial: dict[str, str] = {}
        self._build_sections()

        self.message = QLabel("", self)
        self.message.setObjectName("settings_message")
        self.message.setAccessibleName("Settings message")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.apply_button = QPushButton("Apply", self)
        self.apply_button.setDefault(False)
        self.apply_button.clicked.connect(self.apply)
        close = QPushButton("Close", self)
        close.clicked.connect(self.close)
        buttons = QHBoxLayout()
        buttons.addWidget(self.message, 1)
        buttons.addWidget(self.apply_button)
        buttons.addWidget(close)

        layout = QVBoxLayout(self)
        layout.addLayout(lock_bar)
        layout.addWidget(self.tabs, 1)
        layout.addLayout(buttons)
        self._set_admin(False)
        self.resize(860, 720)
        # A closed dialog must not go on scoring for nobody.
        self.finished.connect(self.thresholds.stop_scoring)
        self.thresholds.start_scoring()

    def _build_sections(self) -> None:
        pages: dict[str, tuple[QWidget, QFormLayout]] = {}
        for spec in form_specs():
            section = spec.key.split(".")[0]
            if section not in pages:
                page = QWidget()
                pages[section] = (page, QFormLayout(page))
                scroll = QScrollArea(self.tabs)
                scroll.setWidgetResizable(True)
                scroll.setWidget(page)
                self.tabs.addTab(scroll, section.capitalize())
            page_widget, form = pages[section]
            editor = make_editor(spec, page_widget)
            editor.set_text(self.file_settings.get_text(spec.key))
            self.editors[spec.key] = editor
            self._initial[spec.key] = editor.text()
            name = spec.key.split(".")[1].replace("_", " ")
            label = QLabel(("🔒 " if spec.admin else "") + name, page_widget)
            label.setToolTip(spec.key)
            label.setBuddy(editor.widget)
            note = QLabel(spec.description, page_widget)
            note.setWordWrap(True)
            note.setEnabled(False)  # drawn dimmed: help text, not a value
            column = QVBoxLayout()
            column.setSpacing(2)
            column.addWidget(editor.widget)
            column.addWidget(note)
            form.addRow(label, column)

    # --- admin lock ---------------------------------------------------------------------------

    @property
    def is_admin(self) -> bool:
        return self._password is not None

    def _set_admin(self, admin: bool) -> None:
        for editor in self.editors.values():
            editor.set_editable(admin or not editor.spec.admin)
        self.thresholds.set_editable(admin)
        self.password.setEnabled(not admin)
        self.unlock_button.setEnabled(not admin)
        self.lock_label.setText(
            "Admin fields unlocked."
            if admin
            else "🔒 Admin fields are read-only."
            if self.file_settings.has_admin_password
            else "🔒 Admin fields are read-only: no admin password is set "
            "(triage-app config set-admin-password)."
        )

    def unlock(self) -> None:
        """Check the typed password off the UI thread; admin fields open only if it matches."""
        if self._busy or self.is_admin:
            return
        if not self.file_settings.has_admin_password:
            self._say(
                "No admin password is set: set one with triage-app config set-admin-password."
            )
            return
        candidate = self.password.text()
        self._busy = True
        self._say("Checking the admin password…")
        run_in_thread(
            partial(verify_admin_password, self.file_settings, candidate),
            partial(self._checked, candidate),
            self._failed,
            owner=self,
        )

    def _checked(self, candidate: str, matches: bool) -> None:
        self._busy = False
        self.password.clear()
        if matches:
            self._password = candidate
            self._say("")
        else:
            log.warning("settings: wrong admin password entered")
            self._say("Wrong admin password: admin fields stay read-only.")
        self._set_admin(matches)
        self.unlocked.emit(matches)

    # --- apply --------------------------------------------------------------------------------

    def changed_fields(self) -> dict[str, str]:
        """Field → typed text, for every field that differs from the file."""
        return {
            key: editor.text()
            for key, editor in self.editors.items()
            if editor.text() != self._initial[key]
        }

    def apply(self) -> None:
        """Validate and save the changed fields with their audit entries, off the UI thread."""
        if self._busy:
            return
        changed = self.changed_fields()
        if not changed:
            self._say("Nothing to save.")
            return
        file_settings, password = self.file_settings, self._password
        config_path, store_path = self._config_path, self._settings.case_store_path
        user = current_user()

        def work() -> tuple[AppliedChanges, Settings]:
            applied = apply_form(file_settings, changed, password)
            save_changes(applied, config_path, store_path, user)
            # The file as saved: another window or `config set` may have changed other keys.
            return applied, load_settings(config_path, env={})

        self._busy = True
        self.apply_button.setEnabled(False)
        self._say("Saving…")
        run_in_thread(work, self._saved, self._failed, owner=self)

    def _saved(self, result: tuple[AppliedChanges, Settings]) -> None:
        applied, saved = result
        self._busy = False
        self.apply_button.setEnabled(True)
        self.file_settings = saved
        for key, editor in self.editors.items():
            editor.set_text(saved.get_text(key))
            self._initial[key] = editor.text()
        count = len(applied.changes)
        text = f"Saved {count} change{'s' if count != 1 else ''}; each is in the audit log."
        if applied.needing_restart:
            keys = ", ".join(applied.needing_restart)
            text += f" Restart the app to apply {keys}: until then it keeps using the old one."
        self._say(text)
        self.saved.emit(applied)

    def _failed(self, exc: BaseException) -> None:
        self._busy = False
        self.apply_button.setEnabled(True)
        if isinstance(exc, ConfigError):
            self._say(f"Not saved: {exc.message}")
            return
        message = exc.message if isinstance(exc, TriageError) else type(exc).__name__
        log.error("settings could not be saved: %s", message)
        self._say(f"Not saved: {message}")

    def _thresholds_moved(self, low: float, high: float) -> None:
        """The thresholds page edits the same fields the Escalation tab shows."""
        updates = {
            THRESHOLD_KEYS[0]: f"{round(low, 4):g}",
            THRESHOLD_KEYS[1]: f"{round(high, 4):g}",
            THRESHOLDS_MODEL_KEY: self.thresholds.model_key,
        }
        for key, text in updates.items():
            if key in self.editors:
                self.editors[key].set_text(text)

    def _say(self, text: str) -> None:
        self.message.setText(text)
