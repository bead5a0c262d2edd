"""Settings: declaration table, validation, precedence, saving, admin password and changes."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
import tomlkit

from tests.helpers import CliRun, run_cli
from tests.test_secrets import (
    ROOT,
    SERVICE_USER,
    as_service_user,
    give_to_service_user,
    reachable_folder,
    service_user_env,
)
from triage_app import config
from triage_app.admin import save_changes_audited
from triage_app.config import (
    SETTINGS,
    SPECS,
    Bool,
    Change,
    Float,
    FsPath,
    Int,
    Optional,
    Settings,
    Str,
    apply_change,
    describe,
    load_settings,
    save_settings,
    set_admin_password,
    verify_admin_password,
)
from triage_app.dicom.deidentify import DEFAULT_SAFE_PRIVATE, ProfileOption, SafePrivateTag
from triage_app.dicom.deidentify.configure import deid_config
from triage_app.errors import AdminAuthError, ConfigError
from triage_app.paths import ensure_private_dir, lock_folder
from triage_app.store import CaseStore

PASSWORD = "correct horse battery"


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def admin_settings() -> Settings:
    return set_admin_password(Settings(), PASSWORD)


# --- Declarations and defaults ----------------------------------------------------------------


def test_defaults_are_valid_and_typed() -> None:
    settings = Settings()
    assert settings.workers == 2
    assert settings.ort_threads_per_worker == 1
    assert settings.model_name == "chest-dx-demo"
    assert settings.theme == "dark"
    assert settings.model_dir is None
    assert settings.normal_below is None
    assert settings.abnormal_at_or_above is None
    assert settings.thresholds_model is None
    assert settings.central_url is None
    assert not settings.has_admin_password
    assert settings.data_dir.is_absolute()
    assert settings.data_dir.name == "triage-app"
    assert settings.case_store_path == settings.data_dir / "cases.sqlite3"


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(tmp_path / "absent.toml", env={}) == Settings()


def test_every_setting_is_described_once() -> None:
    rows = describe()
    assert [row.key for row in rows] == [spec.key for spec in SETTINGS]
    assert len(SPECS) == len(SETTINGS)
    for row in rows:
        assert row.description.endswith(".")
        assert row.type
    by_key = {row.key: row for row in rows}
    assert by_key["processing.workers"].default == "2"
    assert by_key["processing.workers"].type == "whole number 1..64"
    assert by_key["escalation.normal_below"].default == "none"
    assert by_key["escalation.normal_below"].admin
    assert not by_key["display.theme"].admin


def test_admin_fields_follow_the_design() -> None:
    admin = {spec.key for spec in SETTINGS if spec.admin}
    assert {
        "escalation.thresholds_model",
        "escalation.normal_below",
        "escalation.abnormal_at_or_above",
        "escalation.central_url",
        "admin.password_hash",
    } <= admin
    assert "display.theme" not in admin
    assert "processing.workers" not in admin


def test_filed_images_are_kept_for_ever_unless_an_admin_sets_a_retention_period(
    tmp_path: Path,
) -> None:
    spec = SPECS["intake.done_retention_days"]
    assert Settings().done_retention_days == 0
    assert spec.admin  # deleting images is the admin's decision
    assert describe()[SETTINGS.index(spec)].type == "whole number 0..3650"
    file = write_toml(tmp_path / "s.toml", "[intake]\ndone_retention_days = 90\n")
    assert load_settings(file, env={}).done_retention_days == 90
    env = {"TRIAGE_APP_INTAKE__DONE_RETENTION_DAYS": "30"}
    assert load_settings(file, env=env).done_retention_days == 30
    with pytest.raises(ConfigError, match=r"^intake\.done_retention_days: must be between"):
        load_settings(
            write_toml(tmp_path / "bad.toml", "[intake]\ndone_retention_days = -7\n"), env={}
        )


def test_env_var_names() -> None:
    assert SPECS["processing.workers"].env_var == "TRIAGE_APP_PROCESSING__WORKERS"
    assert (
        SPECS["escalation.abnormal_at_or_above"].env_var
        == "TRIAGE_APP_ESCALATION__ABNORMAL_AT_OR_ABOVE"
    )


def test_a_bad_declaration_fails_at_definition() -> None:
    with pytest.raises(ConfigError, match=r"^x\.y: must be between 1 and 2"):
        config.SettingSpec("x.y", Int(1, 2), 5, "Broken.")
    with pytest.raises(ValueError, match="default to None"):
        config.SettingSpec("x.y", Optional(Int(1, 2)), 1, "Broken.")
    with pytest.raises(ValueError, match=r"section\.name"):
        config.SettingSpec("nodots", Int(1, 2), 1, "Broken.")


# --- Types and their bounds -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("processing.workers", 0, "must be between 1 and 64 (got 0)"),
        ("processing.workers", 65, "must be between 1 and 64 (got 65)"),
        ("processing.workers", 2.5, "must be a whole number (got 2.5)"),
        ("processing.workers", True, "must be a whole number (got True)"),
        ("processing.workers", "2", "must be a whole number (got '2')"),
        ("processing.ort_threads_per_worker", 17, "must be between 1 and 16 (got 17)"),
        ("escalation.normal_below", 1.5, "must be between 0 and 1 (got 1.5)"),
        ("escalation.normal_below", -0.1, "must be between 0 and 1 (got -0.1)"),
        ("escalation.normal_below", float("nan"), "must be between 0 and 1 (got nan)"),
        ("escalation.normal_below", "0.3", "must be a number (got '0.3')"),
        ("display.theme", "blue", "must be one of dark, light (got 'blue')"),
        ("display.theme", 1, "must be text (got 1)"),
        ("model.name", "../evil", "must look like a name of letters"),
        ("escalation.thresholds_model", "chest-dx-demo", "must look like name@version"),
        ("escalation.central_url", "ftp://central", "must look like an http:// or https://"),
        ("paths.data_dir", "relative/dir", "must be an absolute path (got 'relative/dir')"),
        ("paths.case_store", 3, "must be a path (got 3)"),
        ("admin.password_hash", "hunter2", "must look like scrypt$n$r$p$salt$hash"),
        ("intake.done_retention_days", -1, "must be between 0 and 3650 (got -1)"),
        ("intake.done_retention_days", 3651, "must be between 0 and 3650 (got 3651)"),
        ("intake.done_retention_days", 1.5, "must be a whole number (got 1.5)"),
    ],
)
def test_out_of_bounds_values_are_refused_naming_field_and_reason(
    key: str, value: object, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings({key: value})
    assert str(info.value).startswith(f"{key}: {reason}")
    assert info.value.code == "config_invalid"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("processing.workers", 1),
        ("processing.workers", 64),
        ("processing.ort_threads_per_worker", 16),
        ("escalation.normal_below", 0.0),
        ("escalation.abnormal_at_or_above", 1.0),
        ("display.theme", "light"),
        ("escalation.thresholds_model", "chest-dx-demo@1.2.0"),
        ("escalation.central_url", "http://127.0.0.1:8443/api"),
        ("model.name", "my_model.v2"),
        ("intake.done_retention_days", 0),
        ("intake.done_retention_days", 3650),
    ],
)
def test_values_at_the_bounds_are_accepted(key: str, value: object) -> None:
    assert Settings({key: value}).get(key) == value


def test_float_accepts_a_toml_integer_as_float() -> None:
    value = Settings({"escalation.abnormal_at_or_above": 1}).abnormal_at_or_above
    assert value == 1.0
    assert isinstance(value, float)


def test_paths_expand_the_home_folder() -> None:
    settings = Settings({"paths.model_dir": "~/models/x"})
    assert settings.model_dir == Path.home() / "models" / "x"


def test_case_store_can_be_set_explicitly(tmp_path: Path) -> None:
    settings = Settings({"paths.case_store": tmp_path / "db.sqlite3"})
    assert settings.case_store_path == tmp_path / "db.sqlite3"


def test_case_store_follows_the_data_dir(tmp_path: Path) -> None:
    settings = Settings({"paths.data_dir": tmp_path})
    assert settings.case_store_path == tmp_path / "cases.sqlite3"


@pytest.mark.parametrize(
    ("kind", "raw", "expected"),
    [
        (Bool(), "true", True),
        (Bool(), "Yes", True),
        (Bool(), "0", False),
        (Bool(), "off", False),
        (Int(1, 10), "7", 7),
        (Float(0, 1), "0.25", 0.25),
        (Optional(Int(1, 10)), "", None),
        (Optional(Float(0, 1)), "None", None),
        (Optional(Float(0, 1)), "0.5", 0.5),
        (Str(choices=("a", "b")), "b", "b"),
    ],
)
def test_types_parse_text(kind: config.SettingType, raw: str, expected: object) -> None:
    assert kind.parse(raw) == expected
    assert kind.parse(kind.format(expected)) == expected


@pytest.mark.parametrize(
    ("kind", "default", "raw", "reason"),
    [
        (Bool(), False, "maybe", "must be true or false (got 'maybe')"),
        (Int(1, 10), 1, "seven", "must be a whole number (got 'seven')"),
        (Int(1, 10), 1, "11", "must be between 1 and 10 (got 11)"),
        (Float(0, 1), 0.0, "half", "must be a number (got 'half')"),
        (Optional(Int(1, 10)), None, "0", "must be between 1 and 10 (got 0)"),
        (FsPath(), Path("/"), " ", "must be a path"),
    ],
)
def test_types_refuse_bad_text(
    kind: config.SettingType, default: object, raw: str, reason: str
) -> None:
    spec = config.SettingSpec("x.y", kind, default, "Test.")
    with pytest.raises(ConfigError) as info:
        spec.parse(raw)
    assert str(info.value).startswith(f"x.y: {reason}")


def test_relative_path_from_text_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert FsPath().parse("models/x") == tmp_path / "models" / "x"


def test_bool_refuses_an_integer() -> None:
    spec = config.SettingSpec("x.flag", Bool(), False, "Test flag.")
    with pytest.raises(ConfigError, match=r"^x\.flag: must be true or false \(got 1\)"):
        spec.check(1)


def test_thresholds_must_be_ordered() -> None:
    ok = Settings({"escalation.normal_below": 0.2, "escalation.abnormal_at_or_above": 0.8})
    assert (ok.normal_below, ok.abnormal_at_or_above) == (0.2, 0.8)
    with pytest.raises(ConfigError, match=r"^escalation\.normal_below: must be below"):
        Settings({"escalation.normal_below": 0.8, "escalation.abnormal_at_or_above": 0.8})
    with pytest.raises(ConfigError, match=r"got 0\.9 >= 0\.5"):
        ok.with_values(escalation__normal_below=0.9, escalation__abnormal_at_or_above=0.5)


def test_one_threshold_alone_is_allowed() -> None:
    assert Settings({"escalation.normal_below": 0.99}).normal_below == 0.99


# --- Settings object --------------------------------------------------------------------------


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError, match="frozen"):
        settings.workers = 4  # type: ignore[misc]
    with pytest.raises(AttributeError, match="frozen"):
        settings._values = {}


def test_with_values_returns_a_new_validated_object() -> None:
    base = Settings()
    changed = base.with_values(**{"processing.workers": 4})
    assert changed.workers == 4
    assert base.workers == 2
    assert base.with_values(processing__workers=4) == changed
    assert hash(base.with_values(processing__workers=4)) == hash(changed)
    with pytest.raises(ConfigError, match=r"^processing\.workers: must be between"):
        base.with_values(processing__workers=0)


def test_get_refuses_unknown_keys_with_a_suggestion() -> None:
    with pytest.raises(
        ConfigError,
        match=r"processing\.worker: unknown setting \(did you mean processing\.workers\?\)",
    ):
        Settings().get("processing.worker")


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("escalation.central_url", "http://localhost/", "http://localhost/"),
        ("escalation.central_url", None, "none"),
        ("processing.workers", 3, "3"),
        ("paths.model_dir", Path("/opt/m"), "/opt/m"),
    ],
)
def test_get_text_is_what_config_set_reads_back(key: str, value: object, text: str) -> None:
    assert Settings({key: value}).get_text(key) == text
    assert SPECS[key].parse(text) == value


def test_repr_hides_the_password_hash(admin_settings: Settings) -> None:
    shown = repr(admin_settings.with_values(processing__workers=3))
    assert "processing.workers=3" in shown
    assert "<hidden>" in shown
    assert "scrypt$" not in shown


# --- Loading: file, environment, overrides ----------------------------------------------------


def test_file_values_are_loaded(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path / "settings.toml",
        '[processing]\nworkers = 3\n[display]\ntheme = "light"\n'
        '[escalation]\nnormal_below = 0.1\n[paths]\nmodel_dir = "/opt/models/x"\n',
    )
    settings = load_settings(path, env={})
    assert settings.workers == 3
    assert settings.theme == "light"
    assert settings.normal_below == 0.1
    assert settings.model_dir == Path("/opt/models/x")


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "settings.toml", "[processing]\nworkres = 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    message = str(info.value)
    assert message.startswith("processing.workres: unknown setting")
    assert "did you mean processing.workers?" in message
    assert str(path) in message


def test_unknown_section_and_top_level_key_are_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "a.toml", "[procesing]\nworkers = 3\n")
    with pytest.raises(ConfigError, match=r"^procesing\.workers: unknown setting"):
        load_settings(path, env={})
    path = write_toml(tmp_path / "b.toml", "workers = 3\n")
    with pytest.raises(ConfigError, match=r"^workers: unknown setting \(did you mean processing"):
        load_settings(path, env={})


def test_wrong_type_in_file_names_field_reason_and_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "settings.toml", '[processing]\nworkers = "many"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert str(info.value) == f"processing.workers: must be a whole number (got 'many') [{path}]"


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "settings.toml", "[processing\nworkers = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path, env={})


def test_unreadable_settings_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the settings file"):
        load_settings(tmp_path, env={})  # a folder, not a file


def test_precedence_override_env_file_default(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path / "settings.toml",
        '[processing]\nworkers = 3\nort_threads_per_worker = 3\n[display]\ntheme = "light"\n',
    )
    env = {
        "TRIAGE_APP_PROCESSING__WORKERS": "4",
        "TRIAGE_APP_PROCESSING__ORT_THREADS_PER_WORKER": "4",
    }
    settings = load_settings(path, env=env, overrides={"processing.workers": 5})
    assert settings.workers == 5  # override > env > file
    assert settings.ort_threads_per_worker == 4  # env > file
    assert settings.theme == "light"  # file > default
    assert settings.model_name == "chest-dx-demo"  # default


def test_overrides_accept_text(tmp_path: Path) -> None:
    settings = load_settings(
        tmp_path / "none.toml",
        env={},
        overrides={"processing.workers": "7", "escalation.central_url": "none"},
    )
    assert settings.workers == 7
    assert settings.central_url is None


def test_bad_override_names_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[command line\]$"):
        load_settings(tmp_path / "none.toml", env={}, overrides={"processing.workers": 0})
    with pytest.raises(ConfigError, match=r"^nope\.nope: unknown setting"):
        load_settings(tmp_path / "none.toml", env={}, overrides={"nope.nope": 1})


@pytest.mark.parametrize(
    ("variable", "raw", "key", "expected"),
    [
        ("TRIAGE_APP_PROCESSING__WORKERS", "1", "processing.workers", 1),
        ("TRIAGE_APP_ESCALATION__NORMAL_BELOW", "0.15", "escalation.normal_below", 0.15),
        ("TRIAGE_APP_ESCALATION__NORMAL_BELOW", "none", "escalation.normal_below", None),
        ("TRIAGE_APP_ESCALATION__CENTRAL_URL", "", "escalation.central_url", None),
        ("TRIAGE_APP_DISPLAY__THEME", "light", "display.theme", "light"),
    ],
)
def test_environment_is_parsed_by_type(
    tmp_path: Path, variable: str, raw: str, key: str, expected: object
) -> None:
    path = write_toml(
        tmp_path / "settings.toml",
        '[escalation]\nnormal_below = 0.05\ncentral_url = "http://127.0.0.1:1"\n',
    )
    assert load_settings(path, env={variable: raw}).get(key) == expected


def test_environment_bool_parsing() -> None:
    # No Bool setting is declared yet: check the type the environment layer uses.
    spec = config.SettingSpec("x.flag", Bool(), False, "Test flag.")
    assert spec.parse("TRUE", spec.env_var) is True
    with pytest.raises(
        ConfigError, match=r"x\.flag: must be true or false .*\[TRIAGE_APP_X__FLAG\]"
    ):
        spec.parse("sure", spec.env_var)


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "none.toml", env={"TRIAGE_APP_PROCESSING__WORKERS": "two"})
    assert str(info.value) == (
        "processing.workers: must be a whole number (got 'two') [TRIAGE_APP_PROCESSING__WORKERS]"
    )


def test_unknown_settings_variable_is_refused_other_variables_ignored(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "none.toml", env={"TRIAGE_APP_PROCESSING__WORKERZ": "1"})
    assert str(info.value) == (
        "processing.workerz: unknown setting (did you mean processing.workers?) "
        "[TRIAGE_APP_PROCESSING__WORKERZ]"
    )
    env = {"TRIAGE_APP_DEBUG": "1", "PROCESSING__WORKERS": "9", "HOME": "/x"}
    assert load_settings(tmp_path / "none.toml", env=env) == Settings()


def test_default_environment_is_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIAGE_APP_PROCESSING__WORKERS", "9")
    assert load_settings(tmp_path / "none.toml").workers == 9


def test_default_path_is_the_platform_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "settings.toml"
    write_toml(target, "[processing]\nworkers = 6\n")
    monkeypatch.setattr(config, "default_config_path", lambda: target)
    assert load_settings(env={}).workers == 6


# --- Saving -----------------------------------------------------------------------------------


def test_save_writes_only_non_defaults_privately_and_round_trips(tmp_path: Path) -> None:
    settings = Settings(
        {
            "processing.workers": 4,
            "escalation.normal_below": 0.1,
            "paths.model_dir": tmp_path / "model",
        }
    )
    path = save_settings(settings, tmp_path / "conf" / "settings.toml")
    assert path == tmp_path / "conf" / "settings.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with path.open("rb") as fh:
        written = tomllib.load(fh)
    assert written == {
        "paths": {"model_dir": str(tmp_path / "model")},
        "escalation": {"normal_below": 0.1},
        "processing": {"workers": 4},
    }
    assert load_settings(path, env={}) == settings
    assert list(tmp_path.joinpath("conf").iterdir()) == [path]  # no temp files left behind


def test_saving_defaults_writes_an_empty_file(tmp_path: Path) -> None:
    path = save_settings(Settings(), tmp_path / "settings.toml")
    assert path.read_text(encoding="utf-8").strip() == ""


def test_save_replaces_a_looser_existing_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "settings.toml", "[display]\ntheme = 'light'\n")
    path.chmod(0o644)
    save_settings(Settings({"processing.workers": 3}), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_settings(path, env={}) == Settings({"processing.workers": 3})


def test_save_to_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "cfg" / "settings.toml"
    monkeypatch.setattr(config, "default_config_path", lambda: target)
    assert save_settings(Settings({"display.theme": "light"})) == target
    assert load_settings(env={}).theme == "light"


# --- Editing the admin's file: only what changed ----------------------------------------------

# A site admin's file: a heading, blank lines, comments saying why, an inline comment, a default
# written out on purpose, a non-canonical float and tables in an order of their own.
HAND_EDITED = """\
# Ward 3 reading-room device. Edited by hand; `triage-app config set` for the rest.

[display]
theme = "light"  # the reading room is bright

[processing]
# Two cores on this box: the default, written out so nobody "tunes" it.
workers = 2
file_timeout_s = 120  # the NAS is slow at night


# thresholds approved by Dr X on 2026-10-01 after the local audit
[escalation]
thresholds_model = "chest-dx-demo@1.1.0"
normal_below = 0.10
abnormal_at_or_above = 0.90

[paths]
data_dir = '{data}'
"""


def hand_edited(tmp_path: Path) -> tuple[Path, str]:
    """The admin's file, 0600 as installed, with the text it holds."""
    text = HAND_EDITED.format(data=tmp_path / "data")
    path = write_toml(tmp_path / "settings.toml", text)
    path.chmod(0o600)
    return path, text


def config_set(path: Path, key: str, value: str) -> CliRun:
    return run_cli("config", "set", key, value, "--config", path, data_dir=path.parent / "flag")


def test_config_set_changes_only_its_value_in_a_hand_edited_file(tmp_path: Path) -> None:
    path, text = hand_edited(tmp_path)

    run = config_set(path, "processing.file_timeout_s", "90")

    assert run.returncode == 0, run.stderr
    assert path.read_text(encoding="utf-8") == text.replace(
        "file_timeout_s = 120  # the NAS", "file_timeout_s = 90  # the NAS"
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_settings(path, env={})
    assert (loaded.file_timeout_s, loaded.workers, loaded.normal_below) == (90, 2, 0.1)
    with CaseStore.open(tmp_path / "data" / "cases.sqlite3") as store:
        (entry,) = store.audit_log()
    assert (entry.action, entry.detail) == (
        "config.set",
        {"key": "processing.file_timeout_s", "old": 120, "new": 90, "admin": False},
    )


def test_config_set_adds_a_key_under_its_table_or_a_new_table_at_the_end(tmp_path: Path) -> None:
    path, text = hand_edited(tmp_path)

    new_table = config_set(path, "watch.settle_s", "3.5")
    # Under the last key of [processing], above the comments that head the next table.
    in_table = config_set(path, "processing.ort_threads_per_worker", "2")

    assert new_table.returncode == 0, new_table.stderr
    assert in_table.returncode == 0, in_table.stderr
    expected = text.replace(
        "the NAS is slow at night\n", "the NAS is slow at night\nort_threads_per_worker = 2\n"
    )
    assert path.read_text(encoding="utf-8") == expected + "\n[watch]\nsettle_s = 3.5\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_settings(path, env={})
    assert (loaded.watch_settle_s, loaded.ort_threads_per_worker) == (3.5, 2)


def test_an_invalid_value_leaves_the_file_byte_identical(tmp_path: Path) -> None:
    path, text = hand_edited(tmp_path)
    before = path.read_bytes()

    refused = config_set(path, "processing.workers", "500")

    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "triage-app: error: config_invalid: processing.workers: must be between 1 and 64 (got 500)"
    ]
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.toml"]  # no temp file
    # The same key, valid this time: the one value changes, its explaining comment stays.
    accepted = config_set(path, "processing.workers", "4")
    assert accepted.returncode == 0, accepted.stderr
    assert path.read_text(encoding="utf-8") == text.replace("workers = 2\n", "workers = 4\n")


def test_setting_the_same_key_twice_does_not_duplicate_it(tmp_path: Path) -> None:
    path, text = hand_edited(tmp_path)

    for value in ("3", "4"):
        assert config_set(path, "watch.settle_s", value).returncode == 0
    for value in ("dark", "light", "dark"):  # dark is the default: still written, in place
        assert config_set(path, "display.theme", value).returncode == 0

    written = path.read_text(encoding="utf-8")
    assert written == (
        text.replace('theme = "light"', 'theme = "dark"') + "\n[watch]\nsettle_s = 4.0\n"
    )
    assert written.count("theme =") == written.count("settle_s =") == 1


def test_saving_keeps_what_did_not_change_as_written(tmp_path: Path) -> None:
    """The settings form saves whole Settings: only the values that differ are touched."""
    path, text = hand_edited(tmp_path)
    loaded = load_settings(path, env={})

    save_settings(loaded, path)  # nothing changed: 0.10 stays 0.10, workers = 2 stays
    assert path.read_text(encoding="utf-8") == text
    changed = loaded.with_values(**{"display.font_scale": 1.5, "processing.workers": 3})
    save_settings(changed, path, base=loaded)
    assert path.read_text(encoding="utf-8") == text.replace(
        "bright\n", "bright\nfont_scale = 1.5\n"
    ).replace("workers = 2\n", "workers = 3\n")


def test_a_value_unset_to_none_is_removed_and_the_comments_stay(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path / "settings.toml",
        "[paths]\n# the validated bundle\nmodel_dir = '/opt/models/chest'  # v1.1\n\n"
        "# the site's folder\ndata_dir = '/srv/triage'\n",
    )
    save_settings(load_settings(path, env={}).with_values(**{"paths.model_dir": None}), path)
    assert path.read_text(encoding="utf-8") == (
        "[paths]\n# the validated bundle\n\n# the site's folder\ndata_dir = '/srv/triage'\n"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # dotted keys stay dotted, a new one joins them
            'processing.workers = 3\ndisplay.theme = "light"\n',
            'processing.workers = 4\nprocessing.file_timeout_s = 90\ndisplay.theme = "light"\n',
        ),
        (  # an inline table stays inline
            "processing = { workers = 3 }\n",
            "processing = { workers = 4, file_timeout_s = 90}\n",
        ),
        (  # indented keys and Windows line ends, as some editors write them
            "[processing]\r\n  workers = 3\r\n",
            "[processing]\r\n  workers = 4\r\n  file_timeout_s = 90\r\n",
        ),
    ],
)
def test_saving_edits_each_way_of_writing_a_table_in_its_own_style(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "settings.toml"
    path.write_bytes(text.encode())
    changed = {"processing.workers": 4, "processing.file_timeout_s": 90}
    wanted = load_settings(path, env={}).with_values(**changed)
    save_settings(wanted, path)
    assert path.read_bytes().decode() == expected
    assert load_settings(path, env={}) == wanted


def test_a_file_that_would_no_longer_load_is_not_written(tmp_path: Path) -> None:
    """Edited meanwhile with a typo (the settings form was open): refused, nothing written."""
    path = write_toml(tmp_path / "settings.toml", "# why\n[display]\nthemes = 'light'\n")
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=r"^display\.themes: unknown setting") as refused:
        save_settings(Settings({"processing.workers": 3}), path)
    assert refused.value.code == "config_invalid"
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.toml"]


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        (  # a new table, after a file written on Windows
            '[display]\r\ntheme = "light"\r\n',
            "watch.settle_s",
            '[display]\r\ntheme = "light"\r\n\r\n[watch]\r\nsettle_s = 3.0\r\n',
        ),
        (  # a new key after a last line that has no line end
            '[display]\r\ntheme = "light"',
            "display.font_scale",
            '[display]\r\ntheme = "light"\r\nfont_scale = 3.0\r\n',
        ),
    ],
)
def test_what_is_added_to_a_crlf_file_ends_its_lines_with_crlf_too(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    path = tmp_path / "settings.toml"
    path.write_bytes(text.encode())
    loaded = load_settings(path, env={})
    save_settings(loaded.with_values(**{key: 3.0}), path, base=loaded)
    assert path.read_bytes().decode() == expected


def test_a_key_for_a_table_without_keys_goes_right_under_its_header(tmp_path: Path) -> None:
    """Not below the comment that heads the next table, which tomlkit appends after."""
    text = (
        "[display] # UI\n# font: the ward has old monitors\n\n"
        "# --- receiver below ---\n[receiver]\n"
    )
    path = write_toml(tmp_path / "settings.toml", text)
    loaded = load_settings(path, env={})
    save_settings(loaded.with_values(**{"display.font_scale": 1.5}), path, base=loaded)
    assert path.read_text(encoding="utf-8") == text.replace(
        "[display] # UI\n", "[display] # UI\nfont_scale = 1.5\n"
    )
    assert load_settings(path, env={}).font_scale == 1.5


# --- Saving while someone else saves: nobody's change is undone -------------------------------


def test_a_value_saved_meanwhile_under_another_key_stays(tmp_path: Path) -> None:
    """The settings form was open while ``config set`` saved: the form's save keeps that."""
    path, text = hand_edited(tmp_path)
    form = load_settings(path, env={})
    meanwhile = load_settings(path, env={})
    save_settings(meanwhile.with_values(**{"processing.workers": 3}), path, base=meanwhile)

    save_settings(form.with_values(**{"processing.file_timeout_s": 90}), path, base=form)

    assert path.read_text(encoding="utf-8") == text.replace(
        "workers = 2\n", "workers = 3\n"
    ).replace("file_timeout_s = 120", "file_timeout_s = 90")
    loaded = load_settings(path, env={})
    assert (loaded.workers, loaded.file_timeout_s) == (3, 90)


def test_a_key_changed_meanwhile_is_refused_and_the_file_is_left_alone(tmp_path: Path) -> None:
    path, _text = hand_edited(tmp_path)
    form = load_settings(path, env={})
    assert config_set(path, "processing.workers", "3").returncode == 0
    before = path.read_bytes()

    with pytest.raises(ConfigError) as refused:
        save_settings(form.with_values(**{"processing.workers": 4}), path, base=form)

    assert refused.value.code == "config_invalid"
    assert str(refused.value) == (
        f"{path}: processing.workers was changed meanwhile (now 3); "
        "nothing was saved: reload and try again"
    )
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "settings.toml"]


def test_a_change_that_only_the_value_saved_meanwhile_makes_invalid_is_refused(
    tmp_path: Path,
) -> None:
    """Checked against the stale settings it was fine; with the file as it is now it is not."""
    path, _text = hand_edited(tmp_path)
    form = load_settings(path, env={})
    meanwhile = load_settings(path, env={})
    lower = meanwhile.with_values(**{"escalation.abnormal_at_or_above": 0.3})
    save_settings(lower, path, base=meanwhile)
    before = path.read_bytes()

    with pytest.raises(ConfigError, match=r"must be below escalation\.abnormal_at_or_above") as no:
        save_settings(form.with_values(**{"escalation.normal_below": 0.5}), path, base=form)

    assert str(no.value).startswith(f"{path}: with the file as it is now, escalation.normal_below")
    assert str(no.value).endswith("; nothing was saved: reload and try again")
    assert path.read_bytes() == before


def test_the_admin_password_and_a_threshold_set_meanwhile_stay(tmp_path: Path) -> None:
    """The review's case: the settings form open while an admin, at a shell, changes the admin
    password and a threshold; a clinician then changes only the theme in the form."""
    path, _text = hand_edited(tmp_path)
    save_settings(set_admin_password(load_settings(path, env={}), "old password"), path)
    form = load_settings(path, env={})
    data = tmp_path / "flag"
    new_password = run_cli(
        "config", "set-admin-password", "--stdin", "--config", path,
        data_dir=data, stdin="old password\nnew password\n",
    )  # fmt: skip
    threshold = run_cli(
        "config", "set", "escalation.normal_below", "0.05", "--admin-password-stdin",
        "--config", path, data_dir=data, stdin="new password\n",
    )  # fmt: skip
    assert new_password.returncode == 0, new_password.stderr
    assert threshold.returncode == 0, threshold.stderr

    updated, change = apply_change(form, "display.theme", "dark", admin_password=None)
    save_changes_audited(
        updated, path, form.case_store_path, base=form, actor="clinician", changes=[change]
    )

    after = load_settings(path, env={})
    assert (after.normal_below, after.theme) == (0.05, "dark")
    assert verify_admin_password(after, "new password")
    assert not verify_admin_password(after, "old password")
    with CaseStore.open(tmp_path / "data" / "cases.sqlite3") as store:
        entries = [(entry.action, entry.detail) for entry in store.audit_log()]
    assert entries == [
        ("config.admin_password_set", {}),
        (
            "config.set",
            {"key": "escalation.normal_below", "old": 0.1, "new": 0.05, "admin": True},
        ),
        ("config.set", {"key": "display.theme", "old": "light", "new": "dark", "admin": False}),
    ]


def test_an_admin_change_after_the_admin_password_changed_meanwhile_is_refused(
    tmp_path: Path, admin_settings: Settings
) -> None:
    """It was allowed by the old password, which the new one was set to revoke."""
    path = save_settings(admin_settings, tmp_path / "settings.toml")
    form = load_settings(path, env={})
    meanwhile = load_settings(path, env={})
    save_settings(set_admin_password(meanwhile, "another password"), path, base=meanwhile)
    before = path.read_bytes()
    updated, _change = apply_change(
        form, "escalation.queue_quota_mb", "4096", admin_password=PASSWORD
    )

    with pytest.raises(ConfigError) as refused:
        save_settings(updated, path, base=form)

    assert str(refused.value) == (
        f"{path}: admin.password_hash was changed meanwhile (now another admin password); "
        "nothing was saved: reload and try again"
    )
    assert path.read_bytes() == before
    # A clinician field needs no password, so the new one does not stand in its way.
    theme, _change = apply_change(form, "display.theme", "light", admin_password=None)
    save_settings(theme, path, base=form)
    assert verify_admin_password(load_settings(path, env={}), "another password")


def test_a_save_waits_for_the_one_in_progress(tmp_path: Path) -> None:
    """Read, edit and replace happen under the folder's lock, so two saves never interleave."""
    path, _text = hand_edited(tmp_path)
    loaded = load_settings(path, env={})
    held = lock_folder(tmp_path)
    assert held is not None
    saving = threading.Thread(
        target=save_settings,
        args=(loaded.with_values(**{"processing.workers": 3}), path),
        kwargs={"base": loaded},
    )
    try:
        saving.start()
        saving.join(timeout=0.5)
        assert saving.is_alive(), "saved while another save held the lock"
        assert load_settings(path, env={}).workers == 2
    finally:
        os.close(held)
    saving.join(timeout=30)
    assert not saving.is_alive()
    assert load_settings(path, env={}).workers == 3


def _holding(process: subprocess.Popen[str], target: Path) -> bool:
    """Whether ``process`` has ``target`` open (Linux: its descriptors under /proc)."""
    fds = Path(f"/proc/{process.pid}/fd")
    try:
        return any(fd.readlink() == target.resolve() for fd in fds.iterdir())
    except OSError:  # gone, or a descriptor closed while listed
        return False


def _config_set_started(path: Path, key: str, value: str, data_dir: Path) -> subprocess.Popen[str]:
    """The real ``triage-app config set KEY VALUE`` in a new process, not waited for."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_APP_")}
    command = [sys.executable, "-m", "triage_app", "config", "set", key, value]
    return subprocess.Popen(
        [*command, "--config", str(path), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_two_config_set_commands_started_at_once_both_land(tmp_path: Path) -> None:
    """Each round starts two real ``config set`` on different keys and lets them go on together
    only once both have read the settings (they wait on the case store the test holds, where
    their audit entries go before the save): the second save must not undo the first."""
    deadline = time.monotonic() + 120
    for round_ in range(3):
        folder = tmp_path / f"round{round_}"
        path, _text = hand_edited(ensure_private_dir(folder))
        store_path = folder / "data" / "cases.sqlite3"
        CaseStore.open(store_path).close()  # created and migrated: opening it writes nothing
        wanted = {"processing.workers": str(3 + round_), "watch.settle_s": f"{4 + round_}.5"}
        holder = sqlite3.connect(store_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the audit entries wait (store busy timeout 10 s)
        processes: list[subprocess.Popen[str]] = []
        try:
            for key, value in wanted.items():
                processes.append(_config_set_started(path, key, value, folder / "flag"))
            while not all(_holding(p, store_path) for p in processes):
                assert time.monotonic() < deadline, "the commands never opened the case store"
                assert all(p.poll() is None for p in processes), "a command ended early"
                time.sleep(0.01)
            holder.execute("ROLLBACK")
            for process in processes:
                _out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
                assert process.returncode == 0, err
        finally:
            holder.close()
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
        loaded = load_settings(path, env={})
        assert (loaded.workers, loaded.watch_settle_s) == (3 + round_, 4.5 + round_)
        with CaseStore.open(store_path) as store:
            assert sorted(entry.detail["key"] for entry in store.audit_log()) == sorted(wanted)


# --- Admin password and changes ---------------------------------------------------------------


def test_admin_password_is_stored_as_scrypt_hash(admin_settings: Settings) -> None:
    stored = admin_settings.get("admin.password_hash")
    assert isinstance(stored, str)
    assert PASSWORD not in stored
    scheme, n, r, p, salt, digest = stored.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(2**14), "8", "1")
    assert salt and digest
    assert admin_settings.has_admin_password


def test_admin_password_hash_is_salted() -> None:
    first = set_admin_password(Settings(), PASSWORD).get("admin.password_hash")
    second = set_admin_password(Settings(), PASSWORD).get("admin.password_hash")
    assert first != second


def test_verify_admin_password(admin_settings: Settings) -> None:
    assert verify_admin_password(admin_settings, PASSWORD)
    assert not verify_admin_password(admin_settings, PASSWORD + "x")
    assert not verify_admin_password(admin_settings, "")
    assert not verify_admin_password(Settings(), PASSWORD)


def test_admin_password_survives_save_and_load(admin_settings: Settings, tmp_path: Path) -> None:
    path = save_settings(admin_settings, tmp_path / "settings.toml")
    assert PASSWORD not in path.read_text(encoding="utf-8")
    assert verify_admin_password(load_settings(path, env={}), PASSWORD)


def test_short_admin_password_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 8 characters"):
        set_admin_password(Settings(), "short")


def test_malformed_hash_parameters_are_a_config_error() -> None:
    settings = Settings({"admin.password_hash": "scrypt$3$8$1$c2FsdA==$aGFzaA=="})  # n not 2**k
    with pytest.raises(ConfigError, match=r"^admin\.password_hash: unusable hash"):
        verify_admin_password(settings, PASSWORD)


def test_admin_field_needs_the_right_password(admin_settings: Settings) -> None:
    key = "escalation.normal_below"
    with pytest.raises(AdminAuthError, match=rf"^{key}: admin field; wrong admin password"):
        apply_change(admin_settings, key, "0.1", admin_password="wrong password")
    with pytest.raises(AdminAuthError, match=rf"^{key}: admin field; the admin password is req"):
        apply_change(admin_settings, key, "0.1", admin_password=None)
    updated, change = apply_change(admin_settings, key, "0.1", admin_password=PASSWORD)
    assert updated.normal_below == 0.1
    assert change == Change(key=key, old=None, new=0.1, admin=True)


def test_admin_field_refused_until_a_password_is_set() -> None:
    with pytest.raises(AdminAuthError, match="no admin password is set"):
        apply_change(Settings(), "escalation.central_url", "https://c", admin_password="anything")


def test_clinician_field_needs_no_password() -> None:
    settings = Settings()
    updated, change = apply_change(settings, "display.theme", "light", admin_password=None)
    assert updated.theme == "light"
    assert settings.theme == "dark"
    assert change == Change(key="display.theme", old="dark", new="light", admin=False)


def test_change_records_old_and_new(admin_settings: Settings) -> None:
    first, _ = apply_change(admin_settings, "processing.workers", "3", admin_password=None)
    second, change = apply_change(first, "processing.workers", "5", admin_password=None)
    assert (change.old, change.new, change.admin) == (3, 5, False)
    assert second.workers == 5
    with pytest.raises(AttributeError):
        change.new = 6  # type: ignore[misc]


def test_apply_change_validates_the_value(admin_settings: Settings) -> None:
    with pytest.raises(ConfigError, match=r"^processing\.workers: must be between 1 and 64"):
        apply_change(admin_settings, "processing.workers", "100", admin_password=None)
    with pytest.raises(ConfigError, match=r"^display\.themes: unknown setting"):
        apply_change(admin_settings, "display.themes", "dark", admin_password=None)
    below, _ = apply_change(
        admin_settings, "escalation.abnormal_at_or_above", "0.5", admin_password=PASSWORD
    )
    with pytest.raises(ConfigError, match=r"must be below escalation\.abnormal_at_or_above"):
        apply_change(below, "escalation.normal_below", "0.6", admin_password=PASSWORD)


def test_password_hash_cannot_be_set_through_apply_change(admin_settings: Settings) -> None:
    with pytest.raises(ConfigError, match="cannot be set directly"):
        apply_change(
            admin_settings,
            "admin.password_hash",
            "scrypt$16384$8$1$AAAA$AAAA",
            admin_password=PASSWORD,
        )


# --- De-identification settings ---------------------------------------------------------------

DEID_KEYS = ("deidentify.options", "deidentify.safe_private_tags", "deidentify.pixel_clean_rules")
DATE_OPTIONS = ("retain-longitudinal-full-dates", "retain-longitudinal-modified-dates")


def test_deidentify_defaults_are_the_most_protective_and_admin_only() -> None:
    settings = Settings()
    assert settings.deid_options == frozenset()  # the Basic Profile alone
    assert settings.safe_private_tags == DEFAULT_SAFE_PRIVATE
    assert settings.pixel_clean_rules is None
    assert all(SPECS[key].admin for key in DEID_KEYS)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("deidentify.options", ("retain-everything",), "must be one of retain-uids, "),
        ("deidentify.options", "retain-uids", "must be a list (got 'retain-uids')"),
        ("deidentify.options", (3,), "must be text (got 3)"),
        ("deidentify.safe_private_tags", ("0018,SIEMENS,0A",), "must look like GGGG,CREATOR,EE"),
        ("deidentify.safe_private_tags", ("0019,,0A",), "must look like GGGG,CREATOR,EE"),
        ("deidentify.safe_private_tags", ("0019, ,0A",), "must look like GGGG,CREATOR,EE"),
        ("deidentify.safe_private_tags", ("0019,ACME,0A1",), "must look like GGGG,CREATOR,EE"),
        ("deidentify.safe_private_tags", ("19,ACME,0A",), "must look like GGGG,CREATOR,EE"),
        ("deidentify.safe_private_tags", ("0019,A,B,0A",), "must look like GGGG,CREATOR,EE"),
        ("deidentify.pixel_clean_rules", "rules.toml", "must be an absolute path"),
    ],
)
def test_bad_deidentify_values_are_refused_naming_the_field(
    key: str, value: object, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings({key: value})
    assert str(info.value).startswith(f"{key}: {reason}")


def test_the_two_date_options_exclude_each_other_wherever_they_come_from(tmp_path: Path) -> None:
    pattern = r"^deidentify\.options: .*full-dates and .*modified-dates exclude each other"
    with pytest.raises(ConfigError, match=pattern):
        Settings({"deidentify.options": DATE_OPTIONS})
    path = write_toml(
        tmp_path / "settings.toml", f"[deidentify]\noptions = {json.dumps(list(DATE_OPTIONS))}\n"
    )
    with pytest.raises(ConfigError, match=pattern):
        load_settings(path, env={})
    with pytest.raises(ConfigError, match=pattern):
        load_settings(
            tmp_path / "none.toml", env={}, overrides={"deidentify.options": list(DATE_OPTIONS)}
        )
    alone = Settings({"deidentify.options": DATE_OPTIONS[:1]})
    assert alone.deid_options == {ProfileOption.RETAIN_LONGITUDINAL_FULL_DATES}


def test_deidentify_values_from_text_and_environment(tmp_path: Path) -> None:
    env = {
        "TRIAGE_APP_DEIDENTIFY__OPTIONS": "clean-descriptors, retain-uids,clean-descriptors",
        "TRIAGE_APP_DEIDENTIFY__SAFE_PRIVATE_TAGS": "0019,SIEMENS MR HEADER,0A; 0029 , ACME , ff",
    }
    settings = load_settings(tmp_path / "none.toml", env=env)
    assert settings.get("deidentify.options") == ("clean-descriptors", "retain-uids")
    assert settings.deid_options == {ProfileOption.CLEAN_DESCRIPTORS, ProfileOption.RETAIN_UIDS}
    assert settings.safe_private_tags == ("0019,SIEMENS MR HEADER,0A", "0029 , ACME , ff")
    for key in DEID_KEYS[:2]:
        assert SPECS[key].parse(settings.get_text(key)) == settings.get(key)
    with pytest.raises(ConfigError, match=r"deidentify\.options: .*\[TRIAGE_APP_DEIDENTIFY__OPT"):
        load_settings(tmp_path / "none.toml", env={"TRIAGE_APP_DEIDENTIFY__OPTIONS": "bogus"})


def test_deidentify_settings_save_and_load_back(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    settings = Settings(
        {
            "deidentify.options": ("retain-uids", "retain-safe-private"),
            "deidentify.safe_private_tags": ("0029,ACME,10",),
            "deidentify.pixel_clean_rules": rules,
        }
    )
    path = save_settings(settings, tmp_path / "settings.toml")
    with path.open("rb") as fh:
        assert tomllib.load(fh)["deidentify"] == {
            "options": ["retain-uids", "retain-safe-private"],
            "safe_private_tags": ["0029,ACME,10"],
            "pixel_clean_rules": str(rules),
        }
    assert load_settings(path, env={}) == settings


def test_every_accepted_safe_private_tag_is_one_the_engine_reads() -> None:
    settings = Settings(
        {
            "deidentify.options": ("retain-safe-private",),
            "deidentify.safe_private_tags": (
                "0029 , acme imaging , 1a",
                "0019,SIEMENS MR HEADER,0A",
            ),
        }
    )
    assert deid_config(settings).safe_private == (
        SafePrivateTag(0x0019, "SIEMENS MR HEADER", 0x0A),
        SafePrivateTag(0x0029, "acme imaging", 0x1A),
    )


def test_the_pixel_clean_rules_file_is_read_where_the_settings_are_used(tmp_path: Path) -> None:
    rules = write_toml(
        tmp_path / "rules.toml",
        '[[rule]]\nname = "banner"\nmodality = "US"\nrectangles = [[0, 0, 10, 10]]\n',
    )
    loaded = deid_config(Settings({"deidentify.pixel_clean_rules": rules})).pixel_rules
    assert [rule.name for rule in loaded] == ["banner"]
    missing = Settings({"deidentify.pixel_clean_rules": tmp_path / "missing.toml"})
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read the pixel-clean rules"):
        deid_config(missing)


def test_deidentify_options_change_only_with_the_admin_password(admin_settings: Settings) -> None:
    key, raw = "deidentify.options", "clean-descriptors,retain-uids"
    with pytest.raises(AdminAuthError, match="no admin password is set"):
        apply_change(Settings(), key, raw, admin_password=None)
    with pytest.raises(AdminAuthError, match=rf"^{key}: admin field; wrong admin password"):
        apply_change(admin_settings, key, raw, admin_password="wrong password")
    with pytest.raises(AdminAuthError, match=rf"^{key}: admin field; the admin password is req"):
        apply_change(admin_settings, key, raw, admin_password=None)
    updated, change = apply_change(admin_settings, key, raw, admin_password=PASSWORD)
    assert updated.deid_options == {ProfileOption.CLEAN_DESCRIPTORS, ProfileOption.RETAIN_UIDS}
    assert change == Change(key=key, old=(), new=("clean-descriptors", "retain-uids"), admin=True)
    with pytest.raises(ConfigError, match=r"^deidentify\.options: .*exclude each other"):
        apply_change(admin_settings, key, ",".join(DATE_OPTIONS), admin_password=PASSWORD)


PIN = "ab" * 32


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"escalation.central_url": "https://c.example/"}, "set escalation.tls_pin or"),
        ({"escalation.central_url": "http://c.example/"}, "plain http is allowed only to"),
        (
            {
                "escalation.central_url": "https://c.example/",
                "escalation.tls_pin": PIN,
                "escalation.client_cert": Path("/etc/c.pem"),
            },
            "set together with escalation.client_key",
        ),
    ],
)
def test_a_central_server_whose_certificate_cannot_be_verified_is_refused(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings(values)


@pytest.mark.parametrize(
    "values",
    [
        {"escalation.central_url": "https://c.example/", "escalation.tls_pin": PIN},
        {
            "escalation.central_url": "https://c.example/",
            "escalation.tls_pin": ":".join(["AB"] * 32),
        },
        {"escalation.central_url": "https://c.example/", "escalation.ca_file": Path("/etc/ca.pem")},
        {"escalation.central_url": "http://[::1]:8443/"},
    ],
)
def test_a_verifiable_central_server_is_accepted(values: dict[str, object]) -> None:
    assert Settings(values).central_url == values["escalation.central_url"]


@pytest.mark.parametrize(
    ("key", "bad"),
    [("escalation.tls_pin", "ab" * 31), ("escalation.server_public_key", "not-base64")],
)
def test_keys_and_pins_are_checked_for_shape(key: str, bad: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        SPECS[key].parse(bad)


# --- The service folders ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("folders", "named"),
    [
        ({"watch.done_dir": "scans/done"}, "watch.done_dir"),
        ({"watch.quarantine_dir": "scans/quarantine"}, "watch.quarantine_dir"),
        ({"watch.done_dir": "scans", "watch.inbox_dir": "scans/in"}, "watch.done_dir"),
        ({"watch.quarantine_dir": "scans", "watch.inbox_dir": "scans"}, "watch.quarantine_dir"),
        ({"receiver.storage_dir": "scans/receiver"}, "receiver.storage_dir"),
        ({"watch.inbox_dir": "data/receiver/incoming"}, "receiver.storage_dir"),
        ({"watch.inbox_dir": "data/receiver"}, "receiver.storage_dir"),
        (
            {
                "paths.data_dir": "scans/data",
                "watch.done_dir": "out/done",
                "watch.quarantine_dir": "out/quarantine",
                "receiver.storage_dir": "out/receiver",
            },
            "paths.data_dir",
        ),
        ({"paths.case_store": "scans/cases.sqlite3"}, "paths.case_store"),
    ],
)
def test_an_inbox_that_overlaps_a_folder_the_service_writes_is_refused_naming_both(
    tmp_path: Path, folders: dict[str, str], named: str
) -> None:
    """The watch service would triage its own output (or the case store) over and over."""
    values: dict[str, object] = {
        "paths.data_dir": tmp_path / "data",
        "watch.inbox_dir": tmp_path / "scans",
        **{key: (tmp_path / rel).resolve() for key, rel in folders.items()},
    }
    with pytest.raises(ConfigError) as refused:
        Settings(values)
    message = str(refused.value)
    assert message.startswith("watch.inbox_dir: ") and named in message
    assert "\n" not in message

    # The same from a settings file, and from the command line's inbox (watch DIR) over a
    # settings file that is fine without it.
    def toml(keys: dict[str, object]) -> str:
        tables: dict[str, dict[str, str]] = {}
        for key, value in keys.items():
            section, name = key.split(".")
            tables.setdefault(section, {})[name] = str(value)
        return tomlkit.dumps(tables)

    without_inbox = {key: value for key, value in values.items() if key != "watch.inbox_dir"}
    fine = load_settings(write_toml(tmp_path / "fine.toml", toml(without_inbox)), env={})
    with pytest.raises(ConfigError, match=re.escape(named)):
        fine.with_values(**{"watch.inbox_dir": values["watch.inbox_dir"]})
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_settings(write_toml(tmp_path / "bad.toml", toml(values)), env={})


def test_an_inbox_that_is_the_done_folder_under_another_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / "done").mkdir()
    (tmp_path / "inbox").symlink_to(tmp_path / "done")
    with pytest.raises(ConfigError, match=r"watch\.inbox_dir: .*watch\.done_dir"):
        Settings(
            {
                "paths.data_dir": tmp_path / "data",
                "watch.inbox_dir": tmp_path / "inbox",
                "watch.done_dir": tmp_path / "done",
            }
        )


def test_separate_service_folders_are_accepted(tmp_path: Path) -> None:
    settings = Settings(
        {
            "paths.data_dir": tmp_path / "data",
            "watch.inbox_dir": tmp_path / "share" / "inbox",
            "watch.done_dir": tmp_path / "share" / "done",
            "watch.quarantine_dir": tmp_path / "share" / "quarantine",
            "receiver.storage_dir": tmp_path / "receiver",
        }
    )
    assert settings.watch_inbox == tmp_path / "share" / "inbox"
    # The data folder (and with it the default watch folders) inside the receiver's storage,
    # beside the folders the receiver uses, overlaps none of them.
    beside = Settings(
        {"paths.data_dir": tmp_path / "out" / "data", "receiver.storage_dir": tmp_path / "out"}
    )
    assert beside.watch_inbox == tmp_path / "out" / "data" / "watch" / "inbox"


# --- What the site admin found (review round 1) ---------------------------------------------


@pytest.mark.parametrize("key", ["paths.data_dir", "paths.case_store"])
def test_the_data_folder_and_the_case_store_are_admin_fields(
    key: str, admin_settings: Settings, tmp_path: Path
) -> None:
    """They move the device key and the audit log (DESIGN 4.5: the device key location)."""
    assert SPECS[key].admin
    with pytest.raises(AdminAuthError, match=rf"^{key}: admin field"):
        apply_change(admin_settings, key, str(tmp_path / "x"), admin_password=None)
    updated, change = apply_change(
        admin_settings, key, str(tmp_path / "x"), admin_password=PASSWORD
    )
    assert updated.get(key) == tmp_path / "x" and change.admin


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://[::1", "Invalid IPv6 URL"),
        ("https://127.0.0.1:99999", "Port out of range"),
        ("https://127.0.0.1:abc", "Port could not be cast"),
        ("https://127.0.0.1:0", "port must be between 1 and 65535"),
        ("https://:8443/v1", "must name a host"),
        ("https://central example", "must look like an http:// or https://"),
    ],
)
def test_a_central_url_that_does_not_parse_whole_is_refused_on_load(
    url: str, reason: str, tmp_path: Path
) -> None:
    """``config validate`` refuses it, rather than the first delivery days later (or exit 70)."""
    path = write_toml(
        tmp_path / "settings.toml",
        f'[escalation]\ncentral_url = "{url}"\ntls_pin = "{"ab" * 32}"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert str(info.value).startswith("escalation.central_url: ")
    assert reason in str(info.value) and info.value.code == "config_invalid"
    with pytest.raises(ConfigError, match=r"^escalation\.central_url: "):
        load_settings(tmp_path / "none.toml", env={}, overrides={"escalation.central_url": url})


def test_a_settings_file_that_is_not_utf8_is_refused_as_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "settings.toml"
    path.write_bytes('[display]\ntheme = "dark"\n# caf\xe9\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert str(info.value) == f"{path}: not valid TOML (not UTF-8)"
    assert info.value.code == "config_invalid"


def test_the_admin_password_hash_never_comes_from_the_environment_or_the_command_line(
    admin_settings: Settings, tmp_path: Path
) -> None:
    """Else whoever sets a service's environment chooses the password ``queue retry`` takes."""
    path = save_settings(admin_settings, tmp_path / "settings.toml")
    other = set_admin_password(Settings(), "another password").get("admin.password_hash")
    variable = "TRIAGE_APP_ADMIN__PASSWORD_HASH"
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={variable: str(other)})
    assert str(info.value) == (
        "admin.password_hash: comes from the settings file only; set it with triage-app config "
        f"set-admin-password [{variable}]"
    )
    with pytest.raises(ConfigError, match=r"^admin\.password_hash: comes from the settings file"):
        load_settings(path, env={}, overrides={"admin.password_hash": other})
    assert verify_admin_password(load_settings(path, env={}), PASSWORD)


def test_thresholds_without_the_model_they_were_approved_for_are_reported_unused() -> None:
    assert config.unused_thresholds(Settings()) is None
    alone = Settings({"escalation.abnormal_at_or_above": 0.9})
    assert "escalation.thresholds_model is not set" in str(config.unused_thresholds(alone))
    bound = alone.with_values(**{"escalation.thresholds_model": "chest-dx-demo@1.0.0"})
    assert config.unused_thresholds(bound) is None


def test_an_admin_field_without_a_password_says_how_to_set_one() -> None:
    with pytest.raises(AdminAuthError, match="set one with triage-app config set-admin-password"):
        apply_change(Settings(), "escalation.normal_below", "0.1", admin_password="anything")


# --- What the site admin found (review round 2) ---------------------------------------------

# Root reads and writes any file whatever its mode, and these tests run as root: the command
# runs as ``nobody`` (helpers: tests/test_secrets.py) on settings root left behind.
BY_ROOT = f"owned by {ROOT}, not by nobody, the user this runs as"


def run_cli_as_service_user(*args: str | Path, home: Path, stdin: str = "") -> CliRun:
    """The real command as the service user, with ``home`` (its own) as its home folder."""
    result = subprocess.run(
        as_service_user("-m", "triage_app", *args, "--data-dir", home / "data"),
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
        env=service_user_env(home),
        check=False,
    )
    return CliRun(result.returncode, result.stdout, result.stderr)


def error_line(run: CliRun) -> str:
    assert "Traceback" not in run.stderr
    (line,) = run.stderr.splitlines()
    return line


def home_of_service_user(base: Path) -> Path:
    home = base / "home"
    home.mkdir()
    give_to_service_user(home)
    return home


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "command",
    [("show",), ("validate",), ("get", "display.theme"), ("set", "display.theme", "dark")],
    ids=lambda command: command[0],
)
def test_a_settings_file_in_a_folder_the_user_may_not_enter_is_refused_with_2_and_the_fix(
    command: tuple[str, ...],
) -> None:
    """It was ``internal_error`` (70): an unexpected PermissionError checking that it exists."""
    with reachable_folder() as base:
        home = home_of_service_user(base)
        closed = base / "closed"
        closed.mkdir(mode=0o700)  # root's, as `sudo mkdir` leaves it
        path = write_toml(closed / "settings.toml", '[display]\ntheme = "light"\n')

        run = run_cli_as_service_user("config", *command, "--config", path, home=home)

    assert run.returncode == 2, run.stderr
    assert error_line(run) == (
        f"triage-app: error: config_invalid: {path}: cannot read the settings file: {closed} is "
        f"{BY_ROOT} (mode 0700): choose another folder"
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("command", "stdin"),
    [(("validate",), ""), (("set-admin-password", "--stdin"), f"{PASSWORD}\n")],
    ids=["validate", "set-admin-password"],
)
def test_a_settings_file_the_user_may_not_read_says_whose_it_is_and_the_chown(
    command: tuple[str, ...], stdin: str
) -> None:
    with reachable_folder() as base:
        home = home_of_service_user(base)
        path = write_toml(base / "settings.toml", '[display]\ntheme = "light"\n')
        path.chmod(0o600)  # root's, as an install as root leaves it

        run = run_cli_as_service_user("config", *command, "--config", path, home=home, stdin=stdin)

    assert run.returncode == 2, run.stderr
    assert error_line(run) == (
        f"triage-app: error: config_invalid: {path}: cannot read the settings file: {BY_ROOT} "
        f"(mode 0600): chown nobody: {path}"
    )


@pytest.mark.timeout(120)
def test_the_default_settings_folder_left_by_root_is_given_back_with_one_chown() -> None:
    """A first run as root with the service user's home: its settings folder is the app's own,
    so one ``chown -R`` fixes it and whatever else that run left in it."""
    with reachable_folder() as base:
        home = home_of_service_user(base)
        (home / ".config").mkdir()
        give_to_service_user(home / ".config")
        folder = home / ".config" / "triage-app"
        folder.mkdir(mode=0o700)  # root's
        write_toml(folder / "settings.toml", '[display]\ntheme = "light"\n')

        run = run_cli_as_service_user("config", "show", home=home)

    assert run.returncode == 2, run.stderr
    assert error_line(run) == (
        f"triage-app: error: config_invalid: {folder / 'settings.toml'}: cannot read the settings "
        f"file: {folder} is {BY_ROOT} (mode 0700): chown -R nobody: {folder}"
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("command", "stdin"),
    [(("set", "display.theme", "dark"), ""), (("set-admin-password", "--stdin"), f"{PASSWORD}\n")],
    ids=["set", "set-admin-password"],
)
def test_saving_in_a_settings_folder_the_user_may_not_write_is_refused_with_2_and_the_fix(
    command: tuple[str, ...], stdin: str
) -> None:
    """It was ``internal_error`` (70): an unexpected PermissionError writing the new file."""
    with reachable_folder() as base:
        home = home_of_service_user(base)
        folder = base / "etc"
        folder.mkdir(mode=0o755)  # root's: nobody may read the file, not replace it
        path = write_toml(folder / "settings.toml", '[display]\ntheme = "light"\n')
        path.chmod(0o644)

        run = run_cli_as_service_user("config", *command, "--config", path, home=home, stdin=stdin)
        text = path.read_text(encoding="utf-8")

    assert run.returncode == 2, run.stderr
    assert error_line(run) == (
        f"triage-app: error: config_invalid: {folder}: cannot save the settings file "
        f"settings.toml here: {BY_ROOT} (mode 0755): choose another folder"
    )
    assert text == '[display]\ntheme = "light"\n'


@pytest.mark.timeout(120)
def test_a_settings_folder_the_user_may_not_create_says_how_to_create_it() -> None:
    with reachable_folder() as base:
        home = home_of_service_user(base)
        folder = base / "triage-app"  # base is root's 0755: nobody cannot make it there
        path = folder / "settings.toml"

        run = run_cli_as_service_user(
            "config", "set", "display.theme", "light", "--config", path, home=home
        )  # not the default: a set to the default changes nothing, and may save nothing
        made = folder.exists()

    assert run.returncode == 2, run.stderr
    assert error_line(run) == (
        f"triage-app: error: config_invalid: {folder}: cannot save the settings file "
        f"settings.toml here: {base} is {BY_ROOT} (mode 0755): create it for nobody first "
        f"(install -d -o nobody -m 700 {folder})"
    )
    assert not made


def test_a_file_where_the_settings_folder_should_be_is_a_config_error(tmp_path: Path) -> None:
    """It was ``internal_error`` (70): an unexpected FileExistsError making the folder."""
    afile = tmp_path / "afile"
    afile.write_bytes(b"not a folder")
    with pytest.raises(ConfigError) as info:
        save_settings(Settings(), afile / "settings.toml")
    assert str(info.value) == (
        f"{afile}: cannot save the settings file settings.toml here (File exists)"
    )
    assert afile.read_bytes() == b"not a folder"


@pytest.mark.parametrize(
    "spec",
    [spec for spec in SETTINGS if spec.key != "admin.password_hash"],
    ids=lambda spec: spec.key,
)
def test_a_setting_variable_with_one_underscore_after_the_section_is_refused(
    spec: config.SettingSpec, tmp_path: Path
) -> None:
    """``TRIAGE_APP_ESCALATION_QUEUE_QUOTA_MB=500`` in a systemd drop-in changed nothing."""
    section, name = spec.key.split(".")
    variable = f"TRIAGE_APP_{section.upper()}_{name.upper()}"
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "none.toml", env={variable: "1"})
    assert str(info.value) == (
        f"{spec.key}: misspelt variable: the setting's is {spec.env_var}, with two underscores "
        f"between section and name [{variable}]"
    )


def test_the_admin_password_hash_is_refused_however_its_variable_is_spelt(tmp_path: Path) -> None:
    variable = "TRIAGE_APP_ADMIN_PASSWORD_HASH"
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "none.toml", env={variable: "scrypt$1$1$1$AA==$AA=="})
    assert str(info.value) == (
        "admin.password_hash: comes from the settings file only; set it with triage-app config "
        f"set-admin-password [{variable}]"
    )


def test_other_variables_with_the_prefix_are_not_taken_for_settings(tmp_path: Path) -> None:
    env = {
        "TRIAGE_APP_DEBUG": "1",
        "TRIAGE_APP_": "1",
        "TRIAGE_APP_SOME_TOOL": "1",
        "TRIAGE_APP_PROCESSING": "1",
        "TRIAGE_APP_PROCESSINGWORKERS": "1",
    }
    assert load_settings(tmp_path / "none.toml", env=env) == Settings()


@pytest.mark.parametrize(
    ("variable", "reason"),
    [
        (
            "TRIAGE_APP_ESCALATION_QUEUE_QUOTA_MB",
            "escalation.queue_quota_mb: misspelt variable: the setting's is "
            "TRIAGE_APP_ESCALATION__QUEUE_QUOTA_MB, with two underscores between section and name",
        ),
        (
            "TRIAGE_APP_ESCALATION__QUEUE_QUOTA",
            "escalation.queue_quota: unknown setting (did you mean escalation.queue_quota_mb?)",
        ),
        (  # one underscore and a name mistyped too: refused as the double-underscore one is
            "TRIAGE_APP_ESCALATION_QUEUE_QUOTA",
            "escalation.queue_quota: unknown setting (did you mean escalation.queue_quota_mb?)",
        ),
        (  # the section left out: the service watched the default inbox, silently
            "TRIAGE_APP_INBOX_DIR",
            "watch.inbox_dir: misspelt variable: the setting's is TRIAGE_APP_WATCH__INBOX_DIR, "
            "with its section",
        ),
    ],
    ids=["one underscore", "unknown name", "both", "no section"],
)
def test_a_mistyped_settings_variable_stops_a_command_with_2_naming_it(
    variable: str, reason: str, tmp_path: Path
) -> None:
    run = run_cli("config", "validate", data_dir=tmp_path, env={variable: "500"})
    assert run.returncode == 2, run.stderr
    assert error_line(run) == f"triage-app: error: config_invalid: {reason} [{variable}]"
    assert "valid" not in run.stdout


# --- What the site admin found (review round 3): `config set` as root --------------------------

# The services run as the service user and read the settings at their start: a `config set`
# run as root that left the file root's 0600 stopped them at their next restart.
SERVICE_OWNED = (SERVICE_USER.pw_uid, SERVICE_USER.pw_gid)


def owner_and_mode(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


def service_users_settings(base: Path, text: str, mode: int = 0o600) -> Path:
    """The packaged layout: the settings folder and file are the service user's."""
    folder = base / "etc"
    folder.mkdir()
    give_to_service_user(folder)
    path = write_toml(folder / "settings.toml", f'[paths]\ndata_dir = "{base / "data"}"\n{text}')
    give_to_service_user(path, mode=mode)
    return path


def as_stored(path: Path) -> tuple[bytes, int, int, int, int]:
    info = path.stat()
    return path.read_bytes(), info.st_ino, info.st_mtime_ns, info.st_uid, info.st_mode


@pytest.mark.timeout(120)
def test_config_set_as_root_leaves_the_settings_file_the_service_users() -> None:
    with reachable_folder() as base:
        home = home_of_service_user(base)
        path = service_users_settings(base, "[processing]\nworkers = 2\n", mode=0o640)

        run = run_cli("config", "set", "processing.workers", "1", "--config", path, data_dir=base)
        kept = owner_and_mode(path)
        text = path.read_text(encoding="utf-8")
        read = run_cli_as_service_user(
            "config", "get", "processing.workers", "--config", path, home=home
        )

    assert run.returncode == 0, run.stderr
    assert "workers = 1\n" in text
    assert kept == (*SERVICE_OWNED, 0o640)
    assert (read.returncode, read.stdout) == (0, "1\n"), read.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "text", ["[processing]\nworkers = 2\n", "# workers: the default\n"], ids=["written", "default"]
)
def test_config_set_of_the_value_the_file_already_means_leaves_the_file_alone(text: str) -> None:
    """``processing.workers: 2 -> 2 (saved …)`` rewrote the file (as root: root's 0600)."""
    with reachable_folder() as base:
        path = service_users_settings(base, text)
        before = as_stored(path)

        run = run_cli("config", "set", "processing.workers", "2", "--config", path, data_dir=base)

        assert run.returncode == 0, run.stderr
        assert as_stored(path) == before


def test_config_set_that_changes_nothing_says_unchanged_and_audits_nothing(
    tmp_path: Path,
) -> None:
    path = write_toml(
        tmp_path / "settings.toml",
        f'[paths]\ndata_dir = "{tmp_path / "data"}"\n[processing]\nworkers = 2\n',
    )

    run = run_cli("config", "set", "processing.workers", "2", "--config", path, data_dir=tmp_path)

    assert run.returncode == 0, run.stderr
    assert "unchanged" in run.stdout and "saved" not in run.stdout
    with CaseStore.open(tmp_path / "data" / "cases.sqlite3") as store:
        assert [entry.action for entry in store.audit_log()] == []


def test_a_save_that_changes_nothing_does_not_rewrite_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "settings.toml", "[processing]\nworkers = 2  # two cores\n")
    loaded = load_settings(path, env={})
    before = as_stored(path)

    assert save_settings(loaded.with_values(**{"processing.workers": 2}), path, base=loaded) == path
    assert save_settings(loaded, path) == path  # the file already holds these settings

    assert as_stored(path) == before
