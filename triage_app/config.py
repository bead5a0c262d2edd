"""Settings: every setting declared once, validated on load (DESIGN 4.5).

``SETTINGS`` is the one place a setting exists, as in qutebrowser's ``configdata.yml``: its type
and bounds, default, one sentence for the admin, and whether changing it needs the admin password.
Adding a setting is one entry there. Values come from four layers merged in one function,
``load_settings`` (MONAI Deploy style): command-line overrides > environment
(``TRIAGE_APP_<SECTION>__<NAME>``) > the TOML file > the default. Whatever the layer, an invalid
value is refused with one :class:`~triage_app.errors.ConfigError` line that names the field and
the reason, e.g. ``escalation.normal_below: must be between 0 and 1 (got 1.5)``.

This module never writes the audit log: :func:`apply_change` returns a :class:`Change` and the
caller records it, so the settings stay free of the store (and of argparse, Qt and web code).
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import time
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final, NamedTuple, NoReturn, cast
from urllib.parse import urlsplit

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import Item, Table

from triage_app.dicom.deidentify.engine import DEFAULT_SAFE_PRIVATE, SAFE_PRIVATE_PATTERN
from triage_app.dicom.deidentify.table import ProfileOption
from triage_app.errors import AdminAuthError, ConfigError
from triage_app.paths import (
    FOLDER_ACCESS,
    default_config_path,
    default_data_dir,
    denied_because,
    ensure_private_dir,
    lock_folder,
    write_private_file,
)

log = logging.getLogger(__name__)

ENV_PREFIX = "TRIAGE_APP_"
ADMIN_PASSWORD_KEY = "admin.password_hash"
MIN_ADMIN_PASSWORD_LENGTH = 8

_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1
_SCRYPT_SALT_BYTES = 16
_SCRYPT_HASH_BYTES = 32
# n=2**14, r=8 needs 16 MiB; OpenSSL's default cap (32 MiB) leaves no room for stronger params.
_SCRYPT_MAXMEM = 64 * 1024 * 1024
# A save holds the settings folder's lock for milliseconds; this long means something is stuck.
_LOCK_WAIT_S = 10.0
_LOCK_POLL_S = 0.02


# --- Types: small, each refuses a bad value with a reason an admin understands -----------------


class _InvalidValueError(Exception):
    """A type refused a value; the message is the reason only (the caller names the field)."""


class SettingType(ABC):
    """How one kind of value is checked, read from text, written to TOML and shown."""

    @abstractmethod
    def check(self, value: object) -> object:
        """Return ``value`` in canonical form (from TOML or Python) or raise the reason."""

    @abstractmethod
    def parse(self, raw: str) -> object:
        """Read a value given as text (environment, command line, ``config set``)."""

    @abstractmethod
    def describe(self) -> str:
        """The type and its bounds in a few words, for ``config show`` and docs."""

    def to_toml(self, value: object) -> object:
        """The value as TOML can hold it."""
        return value

    def format(self, value: object) -> str:
        """The value as text that :meth:`parse` reads back."""
        return str(value)


@dataclass(frozen=True)
class Bool(SettingType):
    _TRUE = frozenset({"true", "yes", "on", "1"})
    _FALSE = frozenset({"false", "no", "off", "0"})

    def check(self, value: object) -> object:
        if not isinstance(value, bool):
            raise _InvalidValueError(f"must be true or false (got {value!r})")
        return value

    def parse(self, raw: str) -> object:
        word = raw.strip().lower()
        if word in self._TRUE:
            return True
        if word in self._FALSE:
            return False
        raise _InvalidValueError(f"must be true or false (got {raw!r})")

    def describe(self) -> str:
        return "true/false"

    def format(self, value: object) -> str:
        return "true" if value else "false"


@dataclass(frozen=True)
class Int(SettingType):
    min: int
    max: int

    def check(self, value: object) -> object:
        # bool is an int subclass in Python; `workers = true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _InvalidValueError(f"must be a whole number (got {value!r})")
        if not self.min <= value <= self.max:
            raise _InvalidValueError(f"must be between {self.min} and {self.max} (got {value})")
        return value

    def parse(self, raw: str) -> object:
        try:
            value = int(raw)
        except ValueError:
            raise _InvalidValueError(f"must be a whole number (got {raw!r})") from None
        return self.check(value)

    def describe(self) -> str:
        return f"whole number {self.min}..{self.max}"


@dataclass(frozen=True)
class Float(SettingType):
    min: float
    max: float

    def check(self, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _InvalidValueError(f"must be a number (got {value!r})")
        if not self.min <= value <= self.max:  # also refuses nan
            raise _InvalidValueError(f"must be between {self.min:g} and {self.max:g} (got {value})")
        return float(value)

    def parse(self, raw: str) -> object:
        try:
            value = float(raw)
        except ValueError:
            raise _InvalidValueError(f"must be a number (got {raw!r})") from None
        return self.check(value)

    def describe(self) -> str:
        return f"number {self.min:g}..{self.max:g}"


@dataclass(frozen=True)
class Str(SettingType):
    """Text, optionally one of ``choices`` or matching ``pattern`` (described by ``hint``)."""

    pattern: str | None = None
    hint: str | None = None
    choices: tuple[str, ...] | None = None

    def check(self, value: object) -> object:
        if not isinstance(value, str):
            raise _InvalidValueError(f"must be text (got {value!r})")
        if self.choices is not None and value not in self.choices:
            raise _InvalidValueError(f"must be one of {', '.join(self.choices)} (got {value!r})")
        if self.pattern is not None and re.fullmatch(self.pattern, value) is None:
            raise _InvalidValueError(f"must look like {self.hint or self.pattern} (got {value!r})")
        return value

    def parse(self, raw: str) -> object:
        return self.check(raw)

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of: {', '.join(self.choices)}"
        return f"text ({self.hint})" if self.hint else "text"


@dataclass(frozen=True)
class FsPath(SettingType):
    """A filesystem path; absolute, so a service does not depend on its working folder."""

    def check(self, value: object) -> object:
        if not isinstance(value, str | Path):
            raise _InvalidValueError(f"must be a path (got {value!r})")
        path = Path(value).expanduser()
        if not path.is_absolute():
            raise _InvalidValueError(f"must be an absolute path (got {str(value)!r})")
        return path

    def parse(self, raw: str) -> object:
        # Typed on a shell, a relative path means "from here".
        if not raw.strip():
            raise _InvalidValueError("must be a path (got '')")
        return self.check(Path(raw).expanduser().absolute())

    def to_toml(self, value: object) -> object:
        return str(value)

    def describe(self) -> str:
        return "path"


@dataclass(frozen=True)
class HttpUrl(SettingType):
    """An ``http://`` or ``https://`` address with a host and, if any, a port that parses.

    Checked whole on load, so a bad address is refused by ``config validate`` rather than by the
    first delivery attempt, days later.
    """

    def check(self, value: object) -> object:
        if not isinstance(value, str):
            raise _InvalidValueError(f"must be text (got {value!r})")
        if not value.startswith(("http://", "https://")) or any(c.isspace() for c in value):
            raise _InvalidValueError(
                f"must look like an http:// or https:// address (got {value!r})"
            )
        try:
            parts = urlsplit(value)
            port = parts.port  # parsed lazily: ":abc" and ":99999" raise only here
        except ValueError as err:
            raise _InvalidValueError(f"not a valid address: {err} (got {value!r})") from None
        if not parts.hostname:
            raise _InvalidValueError(f"must name a host (got {value!r})")
        if port == 0:
            raise _InvalidValueError(f"port must be between 1 and 65535 (got {value!r})")
        return value

    def parse(self, raw: str) -> object:
        return self.check(raw)

    def describe(self) -> str:
        return "an http:// or https:// address"


@dataclass(frozen=True)
class Optional(SettingType):
    """``inner`` or None; as text, an empty string or ``none`` means None."""

    inner: SettingType

    def check(self, value: object) -> object:
        return None if value is None else self.inner.check(value)

    def parse(self, raw: str) -> object:
        return None if raw.strip().lower() in {"", "none"} else self.inner.parse(raw)

    def to_toml(self, value: object) -> object:
        return None if value is None else self.inner.to_toml(value)

    def format(self, value: object) -> str:
        return "none" if value is None else self.inner.format(value)

    def describe(self) -> str:
        return f"{self.inner.describe()}, or none"


@dataclass(frozen=True)
class TextList(SettingType):
    """A list of ``item`` values (a TOML array); as text, items joined by ``separator``."""

    item: Str
    separator: str = ","

    def check(self, value: object) -> object:
        if not isinstance(value, list | tuple):
            raise _InvalidValueError(f"must be a list (got {value!r})")
        checked: list[str] = []
        for entry in value:
            text = self.item.check(entry.strip() if isinstance(entry, str) else entry)
            if text not in checked:
                checked.append(cast(str, text))
        return tuple(checked)

    def parse(self, raw: str) -> object:
        return self.check([part for part in raw.split(self.separator) if part.strip()])

    def to_toml(self, value: object) -> object:
        return list(cast(tuple[str, ...], value))

    def format(self, value: object) -> str:
        return self.separator.join(cast(tuple[str, ...], value))

    def describe(self) -> str:
        return f"list of {self.item.describe()}, separated by '{self.separator}'"


# --- The declaration table --------------------------------------------------------------------


def _message(key: str, reason: str, source: str | None) -> str:
    return f"{key}: {reason}" + (f" [{source}]" if source else "")


@dataclass(frozen=True)
class SettingSpec:
    """One setting: dotted ``section.name`` key, type, default, admin sentence, admin-only flag."""

    key: str
    type: SettingType
    default: object
    description: str
    admin: bool = False

    def __post_init__(self) -> None:
        # Declaration mistakes fail at import, in development, not at a clinic.
        if re.fullmatch(r"[a-z]+\.[a-z_]+", self.key) is None:
            raise ValueError(f"setting key {self.key!r} must look like section.name")
        if isinstance(self.type, Optional) and self.default is not None:
            raise ValueError(f"{self.key}: optional settings default to None (TOML has no null)")
        self.check(self.default)

    @property
    def env_var(self) -> str:
        """The environment variable that overrides this setting."""
        return ENV_PREFIX + self.key.replace(".", "__").upper()

    def check(self, value: object, source: str | None = None) -> object:
        """Validate a typed value; ``source`` (file, variable) is named in the error."""
        try:
            return self.type.check(value)
        except _InvalidValueError as err:
            raise ConfigError(_message(self.key, str(err), source)) from None

    def parse(self, raw: str, source: str | None = None) -> object:
        """Validate a value given as text."""
        try:
            return self.type.parse(raw)
        except _InvalidValueError as err:
            raise ConfigError(_message(self.key, str(err), source)) from None


_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_SCRYPT_PATTERN = r"scrypt(\$\d+){3}\$[A-Za-z0-9+/]+=*\$[A-Za-z0-9+/]+=*"
_SHA256_PIN = r"[0-9A-Fa-f]{2}(:?[0-9A-Fa-f]{2}){31}"
_B64_KEY = r"[A-Za-z0-9+/]{43}="
# PS3.5 AE: default repertoire without backslash; no leading/trailing space (ours: simpler).
_AE_TITLE = r"[A-Za-z0-9_.-](?:[A-Za-z0-9 _.-]{0,14}[A-Za-z0-9_.-])?"

SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec(
        "paths.data_dir",
        FsPath(),
        default_data_dir(),
        "Folder where the app keeps its case database, outbox and keys.",
        admin=True,  # moves the device key and the audit log (DESIGN 4.5)
    ),
    SettingSpec(
        "paths.model_dir",
        Optional(FsPath()),
        None,
        "Folder of the model bundle to use; none means the model shipped with the app.",
        admin=True,
    ),
    SettingSpec(
        "paths.case_store",
        Optional(FsPath()),
        None,
        "The local case database file; none means cases.sqlite3 in the data folder.",
        admin=True,  # holds the audit log
    ),
    SettingSpec(
        "model.name",
        Str(_NAME, "a name of letters, digits, '.', '_' or '-'"),
        "chest-dx-demo",
        "Name of the model bundle that classifies images.",
        admin=True,
    ),
    SettingSpec(
        "escalation.thresholds_model",
        Optional(Str(f"{_NAME}@{_NAME}", "name@version")),
        None,
        "The model (name@version) the thresholds were approved for; other models use their "
        "own manifest defaults.",
        admin=True,
    ),
    SettingSpec(
        "escalation.normal_below",
        Optional(Float(0.0, 1.0)),
        None,
        "Scores below this are decided normal on the device; none means the model's default.",
        admin=True,
    ),
    SettingSpec(
        "escalation.abnormal_at_or_above",
        Optional(Float(0.0, 1.0)),
        None,
        "Scores at or above this are decided abnormal on the device; none means the model's "
        "default.",
        admin=True,
    ),
    SettingSpec(
        "escalation.central_url",
        Optional(HttpUrl()),
        None,
        "Address of the central diagnostic server; none means escalated cases are held on "
        "this device.",
        admin=True,
    ),
    SettingSpec(
        "escalation.tls_pin",
        Optional(Str(_SHA256_PIN, "64 hex digits (colons allowed)")),
        None,
        "SHA-256 of the central server's TLS certificate; when set, only that certificate is "
        "accepted, whatever the system's certificate authorities say.",
        admin=True,
    ),
    SettingSpec(
        "escalation.ca_file",
        Optional(FsPath()),
        None,
        "Certificate authority file that signs the central server's certificate (instead of, "
        "or together with, the certificate pin).",
        admin=True,
    ),
    SettingSpec(
        "escalation.client_cert",
        Optional(FsPath()),
        None,
        "Client certificate this device presents to the central server (mutual TLS), if the "
        "server asks for one.",
        admin=True,
    ),
    SettingSpec(
        "escalation.client_key",
        Optional(FsPath()),
        None,
        "Private key of the client certificate.",
        admin=True,
    ),
    SettingSpec(
        "escalation.server_public_key",
        Optional(Str(_B64_KEY, "a base64 32-byte key")),
        None,
        "The central server's X25519 encryption key; none means it is fetched once from the "
        "server over the verified connection and kept in the data folder.",
        admin=True,
    ),
    SettingSpec(
        "escalation.receipt_public_key",
        Optional(Str(_B64_KEY, "a base64 32-byte key")),
        None,
        "The central server's Ed25519 receipt key; none means it is fetched like the "
        "encryption key.",
        admin=True,
    ),
    SettingSpec(
        "escalation.queue_quota_mb",
        Int(1, 10_000_000),
        2048,
        "Disk space the outbox may use; when full, new escalations are refused loudly and "
        "nothing queued is ever dropped.",
        admin=True,
    ),
    SettingSpec(
        "escalation.connect_timeout_s",
        Float(0.1, 120.0),
        5.0,
        "Seconds to wait for a connection to the central server.",
        admin=True,
    ),
    SettingSpec(
        "escalation.read_timeout_s",
        Float(0.5, 600.0),
        60.0,
        "Seconds to wait for the central server's answer once connected.",
        admin=True,
    ),
    SettingSpec(
        "escalation.retry_cap_s",
        Float(1.0, 3600.0),
        60.0,
        "Longest wait between two delivery attempts (full-jitter exponential backoff).",
        admin=True,
    ),
    SettingSpec(
        "escalation.verdict_poll_s",
        Float(1.0, 3600.0),
        15.0,
        "How often the device asks the central server for verdicts it is waiting for.",
    ),
    SettingSpec(
        "deidentify.options",
        TextList(Str(choices=tuple(option.value for option in ProfileOption))),
        (),
        "PS3.15 Annex E profile options applied on top of the Basic Profile before anything "
        "leaves the device (none: the Basic Profile alone, the most protective).",
        admin=True,
    ),
    SettingSpec(
        "deidentify.safe_private_tags",
        TextList(Str(SAFE_PRIVATE_PATTERN, "GGGG,CREATOR,EE with an odd group"), ";"),
        DEFAULT_SAFE_PRIVATE,
        "Private attributes kept under the retain-safe-private option, as group, private "
        "creator and element byte; every other private attribute is removed.",
        admin=True,
    ),
    SettingSpec(
        "deidentify.pixel_clean_rules",
        Optional(FsPath()),
        None,
        "TOML file of rectangles to black out per device (burned-in text); images at risk of "
        "burned-in text that no rule covers are never escalated.",
        admin=True,
    ),
    SettingSpec(
        "processing.workers",
        Int(1, 64),
        2,
        "Number of worker processes that classify images in parallel.",
    ),
    SettingSpec(
        "processing.file_timeout_s",
        Int(1, 3600),
        300,
        "Seconds one file may take in a service's worker before the worker is stopped and the "
        "file tried again alone (a decoder stuck on a hostile file); a file that runs over it "
        "alone three times is quarantined as worker_crashed.",
    ),
    SettingSpec(
        "processing.ort_threads_per_worker",
        Int(1, 16),
        1,
        "Threads each worker gives the model; 1 is fastest when the workers fill the CPU cores.",
    ),
    SettingSpec(
        "watch.inbox_dir",
        Optional(FsPath()),
        None,
        "Folder the watch service takes images from; none means watch/inbox in the data folder.",
    ),
    SettingSpec(
        "watch.done_dir",
        Optional(FsPath()),
        None,
        "Where the watch service moves each processed image, next to its JSON result; none "
        "means watch/done in the data folder.",
    ),
    SettingSpec(
        "watch.quarantine_dir",
        Optional(FsPath()),
        None,
        "Where files that cannot be triaged go, in one folder per error code with a JSON "
        "reason file; none means watch/quarantine in the data folder.",
    ),
    SettingSpec(
        "watch.settle_s",
        Float(0.05, 3600.0),
        2.0,
        "A file is read only after its size and modification time have not changed for this "
        "many seconds (a scanner or share may still be writing it).",
    ),
    SettingSpec(
        "watch.incomplete_timeout_s",
        Float(1.0, 86400.0),
        300.0,
        "A settled file that is still cut short after this many seconds is quarantined as "
        "truncated instead of waited for.",
    ),
    SettingSpec(
        "watch.rescan_s",
        Float(0.5, 3600.0),
        30.0,
        "Seconds between full rescans of the inbox, which catch files whose events a network "
        "share dropped.",
    ),
    SettingSpec(
        "receiver.ae_title",
        Str(_AE_TITLE, "1-16 characters: letters, digits, space, '_', '-' or '.'"),
        "TRIAGE",
        "The DICOM AE title the receiver answers to (the called AE the scanner sends to).",
        admin=True,
    ),
    SettingSpec(
        "receiver.bind_address",
        Str(r"[0-9A-Za-z.:_-]+", "an IP address or host name"),
        "0.0.0.0",
        "Network address the DICOM receiver listens on (0.0.0.0: every interface).",
        admin=True,
    ),
    SettingSpec(
        "receiver.port",
        Int(1, 65535),
        11112,
        "TCP port of the DICOM receiver.",
        admin=True,
    ),
    SettingSpec(
        "receiver.allowed_calling_aes",
        TextList(Str(_AE_TITLE, "1-16 characters: letters, digits, space, '_', '-' or '.'")),
        (),
        "Calling AE titles (scanners) allowed to send; empty means any calling AE.",
        admin=True,
    ),
    SettingSpec(
        "receiver.storage_dir",
        Optional(FsPath()),
        None,
        "Where received images are kept (incoming, done, quarantine); none means receiver/ in "
        "the data folder.",
    ),
    SettingSpec(
        "receiver.study_quiet_s",
        Float(0.05, 3600.0),
        5.0,
        "A study is triaged once no instance of it has arrived for this many seconds.",
    ),
    SettingSpec(
        "receiver.study_max_wait_s",
        Float(1.0, 86400.0),
        300.0,
        "A study that keeps receiving is triaged anyway once its oldest untriaged instance has "
        "waited this many seconds; later instances follow in the next batch. At least "
        "receiver.study_quiet_s.",
    ),
    SettingSpec(
        "receiver.min_free_mb",
        Int(0, 10_000_000),
        1024,
        "Free disk space the receiver keeps in reserve; below it, stores are refused with Out "
        "of Resources (0xA700) and an alarm.",
        admin=True,
    ),
    SettingSpec(
        "receiver.max_associations",
        Int(1, 256),
        10,
        "Scanners that may send at the same time.",
        admin=True,
    ),
    SettingSpec(
        "receiver.acse_timeout_s",
        Float(1.0, 3600.0),
        30.0,
        "Seconds the receiver waits for association set-up and close-down messages (a "
        "connected scanner's association request, the disconnect after a release) before "
        "dropping the connection (DICOM ACSE timeout).",
        admin=True,
    ),
    SettingSpec(
        "receiver.dimse_timeout_s",
        Float(1.0, 3600.0),
        60.0,
        "Seconds the receiver waits for the reply to a DICOM request it sends itself before "
        "aborting the association (DIMSE timeout); as a storage receiver it only answers, so "
        "a stalled scanner is cut off by receiver.network_timeout_s.",
        admin=True,
    ),
    SettingSpec(
        "receiver.network_timeout_s",
        Float(1.0, 3600.0),
        60.0,
        "Seconds an open association may stay silent (no data from the scanner) before the "
        "receiver aborts it and frees its slot (network timeout).",
        admin=True,
    ),
    SettingSpec(
        "intake.done_retention_days",
        Int(0, 3650),
        0,
        "Days the watch service and the DICOM receiver keep each triaged image, with its JSON "
        "result, in their done folders; older ones are deleted (about once an hour), except "
        "those of cases still held for escalation. 0 keeps them for ever. The case store keeps "
        "every result either way.",
        admin=True,
    ),
    SettingSpec(
        "metrics.watch_port",
        Int(0, 65535),
        9464,
        "Port on 127.0.0.1 where the watch service serves /metrics and /health; 0 turns it off.",
    ),
    SettingSpec(
        "metrics.receive_port",
        Int(0, 65535),
        9465,
        "Port on 127.0.0.1 where the DICOM receiver serves /metrics and /health; 0 turns it off.",
    ),
    SettingSpec(
        "display.theme",
        Str(choices=("dark", "light")),
        "dark",
        "Colour theme of the desktop app.",
    ),
    SettingSpec(
        "display.font_scale",
        Float(0.75, 3.0),
        1.0,
        "Text size of the desktop app relative to the system's (1.5: half as large again), for "
        "large reading-room screens and low-vision readers.",
    ),
    SettingSpec(
        ADMIN_PASSWORD_KEY,
        Optional(Str(_SCRYPT_PATTERN, "scrypt$n$r$p$salt$hash")),
        None,
        "Salted scrypt hash of the admin password; set it with the admin password command, "
        "never by hand.",
        admin=True,
    ),
)

SPECS: Mapping[str, SettingSpec] = MappingProxyType({spec.key: spec for spec in SETTINGS})
if len(SPECS) != len(SETTINGS):
    raise ValueError("a setting is declared twice in SETTINGS")


def _unknown(key: str, source: str | None) -> ConfigError:
    """The error for a key no setting has (a typo must never be silently ignored)."""
    name = key.rpartition(".")[2]
    close = difflib.get_close_matches(key, SPECS, n=1) or [
        known for known in SPECS if known.endswith(f".{name}")
    ]
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(_message(key, f"unknown setting{hint}", source))


def _spec(key: str, source: str | None = None) -> SettingSpec:
    """The declaration of ``key``; an unknown key is a ``ConfigError``."""
    try:
        return SPECS[key]
    except KeyError:
        raise _unknown(key, source) from None


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address: the only place plain HTTP is allowed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _thresholds_ordered(values: Mapping[str, object]) -> str | None:
    low = values["escalation.normal_below"]
    high = values["escalation.abnormal_at_or_above"]
    if isinstance(low, float) and isinstance(high, float) and not low < high:
        return (
            "escalation.normal_below: must be below escalation.abnormal_at_or_above "
            f"(got {low} >= {high})"
        )
    return None


def _date_options_exclusive(values: Mapping[str, object]) -> str | None:
    try:
        ProfileOption.parse(cast(tuple[str, ...], values["deidentify.options"]))
    except ValueError as err:
        return f"deidentify.options: {err}"
    return None


def _central_connection_verified(values: Mapping[str, object]) -> str | None:
    url = values["escalation.central_url"]
    if not isinstance(url, str):
        return None
    host = urlsplit(url).hostname or ""
    if url.startswith("http://") and not is_loopback_host(host):
        return (
            "escalation.central_url: plain http is allowed only to this machine (loopback); "
            "use https"
        )
    if url.startswith("https://") and not (
        values["escalation.tls_pin"] or values["escalation.ca_file"]
    ):
        return (
            "escalation.central_url: set escalation.tls_pin or escalation.ca_file "
            "first, so the server's certificate can be verified"
        )
    if bool(values["escalation.client_cert"]) != bool(values["escalation.client_key"]):
        return "escalation.client_cert: set together with escalation.client_key"
    return None


def _study_max_wait_not_below_quiet(values: Mapping[str, object]) -> str | None:
    """Below the quiet time, the max wait would hand over every study before it can go quiet."""
    quiet = cast(float, values["receiver.study_quiet_s"])
    max_wait = cast(float, values["receiver.study_max_wait_s"])
    if max_wait < quiet:
        return (
            "receiver.study_max_wait_s: must be at least receiver.study_quiet_s "
            f"(got {max_wait:g} < {quiet:g})"
        )
    return None


def _service_folders_apart(values: Mapping[str, object]) -> str | None:
    """The watch service triages every file below its inbox, sub-folders included: a folder it
    files into, the receiver's storage or the data folder (the case store, the keys) inside
    the inbox, or the inbox inside one of them, would feed the service its own files for ever.

    Compared with symbolic links resolved, so another name for the same folder is caught too.
    """
    data_dir = cast(Path, values["paths.data_dir"])

    def folder(key: str, fallback: Path) -> Path:
        explicit = cast(Path | None, values[key])
        return Path(os.path.realpath(explicit if explicit is not None else fallback))

    inbox = folder("watch.inbox_dir", data_dir / "watch" / "inbox")
    receiver = folder("receiver.storage_dir", data_dir / "receiver")
    apart = [
        ("watch.done_dir", folder("watch.done_dir", data_dir / "watch" / "done")),
        ("watch.quarantine_dir", folder("watch.quarantine_dir", data_dir / "watch" / "quarantine")),
        # The folders the receiver uses in its storage (see IntakeLayout.for_receiver).
        *(("receiver.storage_dir", receiver / name) for name in ("incoming", "done", "quarantine")),
    ]
    for key, other in apart:
        if _within(inbox, other) or _within(other, inbox):
            return (
                f"watch.inbox_dir: must not be {key}, nor inside it or contain it "
                "(the watch service would triage its own files again)"
            )
    for key, fallback in (
        ("paths.data_dir", data_dir),
        ("paths.case_store", data_dir / "cases.sqlite3"),
    ):
        if _within(folder(key, fallback), inbox):
            return (
                f"watch.inbox_dir: must not contain {key} "
                "(the watch service would take the app's own files for images)"
            )
    return None


def _within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or below it."""
    return path == folder or folder in path.parents


# Rules that involve more than one setting; each returns the error message or None.
_CROSS_CHECKS: tuple[Callable[[Mapping[str, object]], str | None], ...] = (
    _thresholds_ordered,
    _date_options_exclusive,
    _central_connection_verified,
    _study_max_wait_not_below_quiet,
    _service_folders_apart,
)


# --- The validated, frozen settings object ----------------------------------------------------


class Settings:
    """A complete, validated set of values; frozen (change it with :meth:`with_values`).

    ``Settings()`` is all defaults; ``Settings({"processing.workers": 4})`` overrides some.
    Values must already have their type (``4``, not ``"4"``); text goes through
    :func:`load_settings` or :func:`apply_change`.
    """

    __slots__ = ("_values",)
    _values: Mapping[str, object]

    def __init__(self, values: Mapping[str, object] | None = None) -> None:
        merged = {spec.key: spec.default for spec in SETTINGS}
        for key, value in (values or {}).items():
            merged[key] = _spec(key).check(value)
        for rule in _CROSS_CHECKS:
            problem = rule(merged)
            if problem is not None:
                raise ConfigError(problem)
        object.__setattr__(self, "_values", MappingProxyType(merged))

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("Settings are frozen; use with_values()")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("Settings are frozen; use with_values()")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and dict(self._values) == dict(other._values)

    def __hash__(self) -> int:
        return hash(tuple(self._values.items()))

    def __repr__(self) -> str:
        changed = ", ".join(
            f"{key}={'<hidden>' if key == ADMIN_PASSWORD_KEY else self._values[key]!r}"
            for key in self.changed_keys()
        )
        return f"Settings({changed})"

    def get(self, key: str) -> object:
        """The value of a dotted key; an unknown key raises ``ConfigError``."""
        return self._values[_spec(key).key]

    def get_text(self, key: str) -> str:
        """The value as text that ``config set KEY VALUE`` accepts back."""
        return _spec(key).type.format(self.get(key))

    def with_values(self, **overrides: object) -> Settings:
        """A new validated Settings with some values replaced.

        Keys are dotted (``**{"processing.workers": 4}``) or use ``__`` as in the environment
        variables (``processing__workers=4``).
        """
        changes = {key.replace("__", "."): value for key, value in overrides.items()}
        return Settings({**self._values, **changes})

    def changed_keys(self) -> list[str]:
        """Keys whose value differs from the default, in declaration order."""
        return [spec.key for spec in SETTINGS if self._values[spec.key] != spec.default]

    # Typed views of the settings the code uses. None means "the documented fallback".

    @property
    def data_dir(self) -> Path:
        return cast(Path, self._values["paths.data_dir"])

    @property
    def model_dir(self) -> Path | None:
        """The model bundle folder; None means the bundled model."""
        return cast(Path | None, self._values["paths.model_dir"])

    @property
    def case_store_path(self) -> Path:
        """The case database file, with the default already resolved."""
        return self._path_or("paths.case_store", self.data_dir / "cases.sqlite3")

    @property
    def model_name(self) -> str:
        return cast(str, self._values["model.name"])

    @property
    def thresholds_model(self) -> str | None:
        """``name@version`` the admin thresholds were approved for."""
        return cast(str | None, self._values["escalation.thresholds_model"])

    @property
    def normal_below(self) -> float | None:
        return cast(float | None, self._values["escalation.normal_below"])

    @property
    def abnormal_at_or_above(self) -> float | None:
        return cast(float | None, self._values["escalation.abnormal_at_or_above"])

    @property
    def central_url(self) -> str | None:
        """None means no central server: escalated cases are held on the device."""
        return cast(str | None, self._values["escalation.central_url"])

    @property
    def tls_pin_sha256(self) -> str | None:
        return cast(str | None, self._values["escalation.tls_pin"])

    @property
    def ca_file(self) -> Path | None:
        return cast(Path | None, self._values["escalation.ca_file"])

    @property
    def client_cert(self) -> Path | None:
        return cast(Path | None, self._values["escalation.client_cert"])

    @property
    def client_key(self) -> Path | None:
        return cast(Path | None, self._values["escalation.client_key"])

    @property
    def server_public_key(self) -> str | None:
        return cast(str | None, self._values["escalation.server_public_key"])

    @property
    def receipt_public_key(self) -> str | None:
        return cast(str | None, self._values["escalation.receipt_public_key"])

    @property
    def queue_quota_bytes(self) -> int:
        return cast(int, self._values["escalation.queue_quota_mb"]) * 1024 * 1024

    @property
    def connect_timeout_s(self) -> float:
        return cast(float, self._values["escalation.connect_timeout_s"])

    @property
    def read_timeout_s(self) -> float:
        return cast(float, self._values["escalation.read_timeout_s"])

    @property
    def retry_cap_s(self) -> float:
        return cast(float, self._values["escalation.retry_cap_s"])

    @property
    def verdict_poll_s(self) -> float:
        return cast(float, self._values["escalation.verdict_poll_s"])

    @property
    def outbox_dir(self) -> Path:
        """Where sealed envelopes wait for delivery (0700)."""
        return self.data_dir / "outbox"

    @property
    def deid_options(self) -> frozenset[ProfileOption]:
        return ProfileOption.parse(cast(tuple[str, ...], self._values["deidentify.options"]))

    @property
    def safe_private_tags(self) -> tuple[str, ...]:
        return cast(tuple[str, ...], self._values["deidentify.safe_private_tags"])

    @property
    def pixel_clean_rules(self) -> Path | None:
        return cast(Path | None, self._values["deidentify.pixel_clean_rules"])

    @property
    def workers(self) -> int:
        return cast(int, self._values["processing.workers"])

    @property
    def file_timeout_s(self) -> int:
        return cast(int, self._values["processing.file_timeout_s"])

    @property
    def ort_threads_per_worker(self) -> int:
        return cast(int, self._values["processing.ort_threads_per_worker"])

    @property
    def watch_inbox(self) -> Path:
        return self._path_or("watch.inbox_dir", self.data_dir / "watch" / "inbox")

    @property
    def watch_done(self) -> Path:
        return self._path_or("watch.done_dir", self.data_dir / "watch" / "done")

    @property
    def watch_quarantine(self) -> Path:
        return self._path_or("watch.quarantine_dir", self.data_dir / "watch" / "quarantine")

    @property
    def watch_settle_s(self) -> float:
        return cast(float, self._values["watch.settle_s"])

    @property
    def watch_incomplete_timeout_s(self) -> float:
        return cast(float, self._values["watch.incomplete_timeout_s"])

    @property
    def watch_rescan_s(self) -> float:
        return cast(float, self._values["watch.rescan_s"])

    @property
    def receiver_ae_title(self) -> str:
        return cast(str, self._values["receiver.ae_title"])

    @property
    def receiver_bind_address(self) -> str:
        return cast(str, self._values["receiver.bind_address"])

    @property
    def receiver_port(self) -> int:
        return cast(int, self._values["receiver.port"])

    @property
    def receiver_allowed_calling_aes(self) -> tuple[str, ...]:
        """Empty means any calling AE may send."""
        return cast(tuple[str, ...], self._values["receiver.allowed_calling_aes"])

    @property
    def receiver_storage(self) -> Path:
        return self._path_or("receiver.storage_dir", self.data_dir / "receiver")

    @property
    def receiver_study_quiet_s(self) -> float:
        return cast(float, self._values["receiver.study_quiet_s"])

    @property
    def receiver_study_max_wait_s(self) -> float:
        return cast(float, self._values["receiver.study_max_wait_s"])

    @property
    def receiver_min_free_bytes(self) -> int:
        return cast(int, self._values["receiver.min_free_mb"]) * 1024 * 1024

    @property
    def receiver_max_associations(self) -> int:
        return cast(int, self._values["receiver.max_associations"])

    @property
    def receiver_acse_timeout_s(self) -> float:
        return cast(float, self._values["receiver.acse_timeout_s"])

    @property
    def receiver_dimse_timeout_s(self) -> float:
        return cast(float, self._values["receiver.dimse_timeout_s"])

    @property
    def receiver_network_timeout_s(self) -> float:
        return cast(float, self._values["receiver.network_timeout_s"])

    @property
    def done_retention_days(self) -> int:
        """0 means filed images are kept for ever."""
        return cast(int, self._values["intake.done_retention_days"])

    @property
    def metrics_watch_port(self) -> int:
        """0 means no metrics endpoint."""
        return cast(int, self._values["metrics.watch_port"])

    @property
    def metrics_receive_port(self) -> int:
        """0 means no metrics endpoint."""
        return cast(int, self._values["metrics.receive_port"])

    def _path_or(self, key: str, fallback: Path) -> Path:
        explicit = cast(Path | None, self._values[key])
        return explicit if explicit is not None else fallback

    @property
    def theme(self) -> str:
        return cast(str, self._values["display.theme"])

    @property
    def font_scale(self) -> float:
        return cast(float, self._values["display.font_scale"])

    @property
    def has_admin_password(self) -> bool:
        """Whether an admin password is set (admin fields cannot change until one is)."""
        return self._values[ADMIN_PASSWORD_KEY] is not None


# --- Loading and saving -----------------------------------------------------------------------


def load_settings(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Load the settings: ``overrides`` > environment > file > default.

    Parameters
    ----------
    path
        The TOML file; default :func:`~triage_app.paths.default_config_path`. A missing file
        means all defaults.
    env
        The environment (default ``os.environ``). Variables ``TRIAGE_APP_<SECTION>__<NAME>`` are
        read as text by the setting's type; one that names no setting is an error, and so is a
        setting's spelt with one underscore after the section. Pass ``{}`` when the result will
        be saved, so the environment is not written into the file.
    overrides
        Command-line values by dotted key, as text or already typed.

    Raises
    ------
    ConfigError
        For an unreadable file, an unknown key or an invalid value, naming field and source.
    """
    file_path = default_config_path() if path is None else path
    # The precedence, in one place: each layer overwrites the one before.
    values = _read_file(file_path)
    values.update(_read_env(os.environ if env is None else env))
    for key, value in (overrides or {}).items():
        spec = _spec(key, "command line")
        _refuse_password_hash(key, "command line")
        values[key] = (
            spec.parse(value, "command line")
            if isinstance(value, str)
            else spec.check(value, "command line")
        )
    return Settings(values)


def _read_file(path: Path) -> dict[str, object]:
    text = _read_text(path)
    if text is None:
        log.debug("no settings file at %s: using defaults", path)
        return {}
    values = _values_from_text(text, path)
    log.debug("loaded settings from %s", path)
    return values


def _read_text(path: Path) -> str | None:
    """The file's text, or None when there is no file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        why = _denied_because(err, path, os.R_OK)
        raise ConfigError(f"{path}: cannot read the settings file{why}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # TOML is UTF-8 by definition
        raise ConfigError(f"{path}: not valid TOML (not UTF-8)") from None


def _values_from_text(text: str, path: Path) -> dict[str, object]:
    """The checked values a settings file's text holds: what loading it and saving it check."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    values: dict[str, object] = {}
    for section, table in document.items():
        if not isinstance(table, dict):  # a key outside any [section] table
            raise _unknown(section, str(path))
        for name, value in table.items():
            key = f"{section}.{name}"
            values[key] = _spec(key, str(path)).check(value, str(path))
    return values


def _read_env(env: Mapping[str, str]) -> dict[str, object]:
    values: dict[str, object] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        # Only SECTION__NAME-shaped variables are settings; TRIAGE_APP_DEBUG and the like are not.
        if "__" not in rest:
            _refuse_one_underscore(name, rest)
            continue
        key = rest.replace("__", ".").lower()
        spec = _spec(key, name)
        _refuse_password_hash(key, name)
        values[key] = spec.parse(raw, name)
    return values


def _refuse_one_underscore(name: str, rest: str) -> None:
    """A setting's variable with one underscore after the section is a typo, not another
    variable: ignored, it would leave the setting silently at its file value (a systemd
    drop-in's ``TRIAGE_APP_ESCALATION_QUEUE_QUOTA_MB=500`` changed nothing)."""
    # Section names have no underscore (SettingSpec), so only the first one can be the dot.
    key = rest.lower().replace("_", ".", 1)
    if key in SPECS:
        _refuse_password_hash(key, name)  # no spelling of it is read: say so, not how to spell it
        raise ConfigError(
            _message(
                key,
                f"misspelt variable: the setting's is {SPECS[key].env_var}, with two "
                "underscores between section and name",
                name,
            )
        )
    section, dot, _ = key.partition(".")
    if dot and section in _SECTIONS:  # a section's name, then a setting's mistyped twice
        raise _unknown(key, name)
    # A setting's name without its section (TRIAGE_APP_INBOX_DIR): the likeliest slip of all.
    named = [known for known in SPECS if known.partition(".")[2] == rest.lower()]
    if named:
        raise ConfigError(
            _message(
                named[0],
                f"misspelt variable: the setting's is {SPECS[named[0]].env_var}, with its section",
                name,
            )
        )


#: The sections the settings are in (``[escalation]``, ...).
_SECTIONS: Final = frozenset(key.partition(".")[0] for key in SPECS)


def _refuse_password_hash(key: str, source: str) -> None:
    """The admin password hash comes from the settings file only.

    Taken from a variable or a flag, it would let whoever sets the service's environment choose
    the password that admin actions (``queue retry``) accept. Refused rather than ignored: a
    stop with a clear line is found at once, a warning in a journal may never be read.
    """
    if key == ADMIN_PASSWORD_KEY:
        raise ConfigError(
            _message(
                key,
                "comes from the settings file only; set it with "
                "triage-app config set-admin-password",
                source,
            )
        )


def save_settings(
    settings: Settings, path: Path | None = None, *, base: Settings | None = None
) -> Path:
    """Write to the settings file the values the caller changed from ``base``; returns the path.

    ``base`` is what the caller loaded and edited into ``settings``. Only the keys whose value
    differs between the two are written: every other key keeps what the file holds *now*, so
    a change another process saved since the caller loaded (``config set``, the settings form)
    survives. A key the caller changes that the file no longer holds at its ``base`` value was
    changed by someone else meanwhile and is refused (``ConfigError``), as is a change of an
    admin field after the admin password changed (it was authorised by the old one): nothing
    is written, never someone else's change silently undone. Without ``base`` the file is made
    to hold ``settings`` whole: for creating a file (set-up, tests), not for editing one.

    The file is the admin's, edited by hand with comments saying why a value was chosen, so it
    is edited as ``git config`` edits one, never rewritten: comments, blank lines, order,
    quoting, line endings and every key not written stay byte for byte. A value that differs is
    replaced in place (its inline comment kept), a missing non-default one is added after the
    last key of its table (the table is added at the end if needed), and one that becomes unset
    (None) is removed. A missing file starts empty. Reading the file, editing it, checking that
    the result loads back as intended and replacing it (atomically, 0600 from creation: it
    holds the admin password hash) happen under one lock on the file's folder, so two saves
    never interleave.

    A save that changes nothing (``config set`` of the value the file already means) leaves the
    file alone, bytes, owner and mtime. A file replaced by root keeps its owner, group and
    mode: the services run as their own user and read it at their next start, which a root's
    0600 copy would stop (see :func:`~triage_app.paths.write_private_file`).
    """
    target = default_config_path() if path is None else path
    try:
        ensure_private_dir(target.parent)
    except OSError as err:
        raise _cannot_save(err, target) from None
    with _settings_folder_locked(target):
        held = _read_text(target)
        text = held or ""
        if base is None:
            wanted = {spec.key: settings.get(spec.key) for spec in SETTINGS}
            intended = settings
        else:
            wanted, intended = _changes_onto_file(settings, base, text, target)
        edited = _edited_text(text, wanted, target)
        # Checked by the loader itself: nothing is written that `config validate` would refuse.
        if Settings(_values_from_text(edited, target)) != intended:
            raise ConfigError(
                f"{target}: editing the file would not give the new settings; "
                "nothing was saved (edit it by hand)"
            )
        if held is not None and edited == held:
            log.info("settings in %s unchanged: not rewritten", target)
            return target
        try:
            write_private_file(target, edited.encode(), keep_owner=True)
        except OSError as err:
            raise _cannot_save(err, target) from None
    log.info("saved settings to %s", target)
    return target


def _denied_because(err: OSError, path: Path, need: int) -> str:
    """:func:`~triage_app.paths.denied_because` for a settings path: the app's own settings
    folder, where a first run as root leaves root's files, is the tree one ``chown -R`` fixes."""
    return denied_because(err, path, need, tree=default_config_path().parent)


def _cannot_save(err: OSError, target: Path) -> ConfigError:
    """A save the settings folder refused: the file is replaced there, so the folder must let
    this user list, lock, create and rename in it, whatever the file's own mode."""
    why = _denied_because(err, target.parent, FOLDER_ACCESS)
    return ConfigError(f"{target.parent}: cannot save the settings file {target.name} here{why}")


def _changes_onto_file(
    settings: Settings, base: Settings, text: str, path: Path
) -> tuple[dict[str, object], Settings]:
    """The values to write (those ``settings`` changes from ``base``) and the settings the
    file will then hold, or ``ConfigError`` when the file changed under one of them."""
    now = _values_from_text(text, path)
    changed = [spec for spec in SETTINGS if settings.get(spec.key) != base.get(spec.key)]
    guarded = list(changed)
    if any(spec.admin for spec in changed) and SPECS[ADMIN_PASSWORD_KEY] not in guarded:
        # The caller's admin password was checked against base's hash.
        guarded.append(SPECS[ADMIN_PASSWORD_KEY])
    for spec in guarded:
        held = now.get(spec.key, spec.default)
        if held != base.get(spec.key):
            raise ConfigError(
                f"{path}: {spec.key} was changed meanwhile (now {_shown(spec, held)}); "
                "nothing was saved: reload and try again"
            )
    wanted = {spec.key: settings.get(spec.key) for spec in changed}
    try:
        intended = Settings({**now, **wanted})
    except ConfigError as err:  # a cross-field rule, with another key changed meanwhile
        raise ConfigError(
            f"{path}: with the file as it is now, {err.message}; "
            "nothing was saved: reload and try again"
        ) from None
    return wanted, intended


def _shown(spec: SettingSpec, value: object) -> str:
    """A value for a message; never the password hash, which is only ever compared."""
    if spec.key == ADMIN_PASSWORD_KEY and value is not None:
        return "another admin password"
    return spec.type.format(value)


@contextmanager
def _settings_folder_locked(target: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the settings file's folder while the block runs.

    Read-edit-replace is not atomic: two saves at once would each edit the text they read, and
    the second rename would undo the first's change. The folder rather than a lock file, so
    nothing is left beside the settings. Waits a while for another save (which takes
    milliseconds); on a file system without locks it goes on unlocked, as saves did before.
    """
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        try:
            fd = lock_folder(target.parent)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"{target}: another program kept the settings folder locked for "
                    f"{_LOCK_WAIT_S:g} s; nothing was saved: try again"
                ) from None
            time.sleep(_LOCK_POLL_S)
            continue
        except OSError as err:
            raise _cannot_save(err, target) from None
        break
    if fd is None:
        log.warning(
            "%s: the file system has no locks: saved without protection against another "
            "save at the same moment",
            target.parent,
        )
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _edited_text(text: str, wanted: Mapping[str, object], path: Path) -> str:
    """``text`` with each of the ``wanted`` values it does not hold set, added or removed."""
    try:
        document = tomlkit.parse(text)
        held = document.unwrap()
        for spec in SETTINGS:
            if spec.key not in wanted:
                continue
            section, name = spec.key.split(".")
            value = wanted[spec.key]
            table = held.get(section)
            if isinstance(table, dict) and name in table:
                if _holds(spec, table[name], value):
                    continue  # as written: 0.10 stays 0.10, a default stays written out
            elif value == spec.default:
                continue  # an absent key already means its default
            _set_in(document, section, name, spec.type.to_toml(value), path)
        return _with_line_endings_of(text, document.as_string())
    except TOMLKitError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None


def _with_line_endings_of(original: str, edited: str) -> str:
    """``edited`` with the lines tomlkit added ended as ``original``'s are (CRLF or LF).

    tomlkit ends every line it writes (a new table, a key after a last line without an end)
    with LF. In a file written with CRLF only, every LF alone in the result is one of those.
    A file that mixes both is left as tomlkit writes it: LF is already one of its endings.
    """
    crlf = original.count("\r\n")
    if crlf == 0 or crlf != original.count("\n"):
        return edited
    return re.sub(r"(?<!\r)\n", "\r\n", edited)


def _holds(spec: SettingSpec, raw: object, value: object) -> bool:
    """Whether a value as written in the file is ``value`` (an invalid one is not)."""
    try:
        return spec.check(raw) == value
    except ConfigError:
        return False


def _set_in(
    document: tomlkit.TOMLDocument, section: str, name: str, value: object, path: Path
) -> None:
    """Set ``section.name`` in place; None (TOML has no null) removes the key."""
    table = document.get(section)
    if table is None:
        if value is not None:
            document[section] = tomlkit.table()
            document[section][name] = value
        return
    if not isinstance(table, MutableMapping):  # `display = 1`: the loader refuses it too
        raise _unknown(section, str(path))
    if value is None:
        del table[name]  # only a key the file holds reaches here: absent already means None
    elif name in table:
        table[name] = value  # tomlkit keeps the line's indent and inline comment
    else:
        _add_after_last_key(table, name, value)


def _add_after_last_key(table: MutableMapping[str, object], name: str, value: object) -> None:
    """Add ``name`` under the table's last key, not after the comments that end the table.

    Those comments belong to what follows (the next table's heading, commented-out examples):
    tomlkit appends after them, which would move a ``# approved by Dr X`` away from its table.
    A table without keys yet gets it right under its header, for the same reason.
    """
    if isinstance(table, Table):
        body = table.value.body
        keys = [(key, item) for key, item in body if key is not None]
        new: Item = tomlkit.item(value)
        if keys:
            last_key, last = keys[-1]
            # The same indent and line ending as the key above.
            new.trivia.indent = last.trivia.indent.rsplit("\n", 1)[-1]
            if last.trivia.trail.endswith("\r\n"):
                new.trivia.trail = "\r\n"
            # tomlkit has no public insert-after; tests/test_config.py covers this use.
            table.value._insert_after(last_key, name, new)
            return
        if body:  # comments or blank lines only: the header's line ends, the key comes next
            new.trivia.indent = table.trivia.indent.rsplit("\n", 1)[-1]
            if table.trivia.trail.endswith("\r\n"):
                new.trivia.trail = "\r\n"
            # No public insert-at either; covered by tests/test_config.py too.
            table.value._insert_at(0, name, new)
            return
    table[name] = value


# --- Admin password and audited changes -------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One accepted setting change, for the caller to write to the audit log."""

    key: str
    old: object
    new: object
    admin: bool


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def set_admin_password(settings: Settings, password: str) -> Settings:
    """Return settings holding a salted scrypt hash of ``password`` (never the password).

    The caller decides who may do this (e.g. asks for the current password first).
    """
    if len(password) < MIN_ADMIN_PASSWORD_LENGTH:
        raise ConfigError(
            f"admin password: must be at least {MIN_ADMIN_PASSWORD_LENGTH} characters"
        )
    salt = secrets.token_bytes(_SCRYPT_SALT_BYTES)
    digest = hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        maxmem=_SCRYPT_MAXMEM,
        dklen=_SCRYPT_HASH_BYTES,
    )
    encoded = f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"
    return settings.with_values(**{ADMIN_PASSWORD_KEY: encoded})


def verify_admin_password(settings: Settings, password: str) -> bool:
    """Whether ``password`` matches the stored hash (False when none is set); constant time."""
    stored = settings.get(ADMIN_PASSWORD_KEY)
    if stored is None:
        return False
    # The stored string already matched the scrypt$n$r$p$salt$hash pattern on load.
    _, n, r, p, salt, digest = cast(str, stored).split("$")
    try:
        expected = base64.b64decode(digest, validate=True)
        candidate = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt, validate=True),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_SCRYPT_MAXMEM,
            dklen=len(expected),
        )
    except ValueError as err:  # bad base64 or scrypt parameters
        raise ConfigError(f"{ADMIN_PASSWORD_KEY}: unusable hash ({err})") from None
    return hmac.compare_digest(candidate, expected)


def apply_change(
    settings: Settings, key: str, raw_value: str, *, admin_password: str | None
) -> tuple[Settings, Change]:
    """Parse ``raw_value`` for ``key`` (``config set KEY VALUE``) and return the new settings.

    Admin fields need the correct admin password; clinician fields need none. The returned
    :class:`Change` is for the caller's audit log; nothing is saved here.

    Raises
    ------
    AdminAuthError
        For an admin field without a correct admin password (or with none set yet).
    ConfigError
        For an unknown key, an invalid value, or the password hash itself.
    """
    spec = _spec(key)
    if key == ADMIN_PASSWORD_KEY:
        raise ConfigError(f"{key}: cannot be set directly; use the admin password command")
    if spec.admin:
        if not settings.has_admin_password:
            raise AdminAuthError(
                f"{key}: admin field, and no admin password is set yet; "
                "set one with triage-app config set-admin-password"
            )
        if admin_password is None:
            raise AdminAuthError(f"{key}: admin field; the admin password is required")
        if not verify_admin_password(settings, admin_password):
            raise AdminAuthError(f"{key}: admin field; wrong admin password")
    new_value = spec.parse(raw_value)
    updated = settings.with_values(**{key: new_value})
    return updated, Change(key=key, old=settings.get(key), new=new_value, admin=spec.admin)


THRESHOLD_KEYS = frozenset({"escalation.normal_below", "escalation.abnormal_at_or_above"})


def unused_thresholds(settings: Settings) -> str | None:
    """Why the admin thresholds in ``settings`` are not used, or None when they are (or unset).

    Thresholds are approved for one model: without ``escalation.thresholds_model`` the policy
    keeps every model's own defaults, so a threshold set alone silently changes nothing.
    """
    if settings.thresholds_model is not None or (
        settings.normal_below is None and settings.abnormal_at_or_above is None
    ):
        return None
    return (
        "escalation.thresholds_model is not set, so the thresholds are not used (the model's "
        "own defaults are); set it to the model they were approved for (name@version)"
    )


# --- Self-description -------------------------------------------------------------------------


class SettingRow(NamedTuple):
    """One line of ``config show`` / the docs / a generated settings form."""

    key: str
    type: str
    default: str
    description: str
    admin: bool


def describe() -> list[SettingRow]:
    """Every setting with its type, default (as text), description and admin flag."""
    return [
        SettingRow(
            spec.key,
            spec.type.describe(),
            spec.type.format(spec.default),
            spec.description,
            spec.admin,
        )
        for spec in SETTINGS
    ]
