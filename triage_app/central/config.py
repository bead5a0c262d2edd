"""The central server's settings, checked once when they are made.

A frozen value object rather than entries in the device's settings file: the server runs on
another machine with its own data folder, and one object handed to ``create_app`` and ``serve``
keeps every limit in one place. Files (TLS certificate and key) are checked when the server
starts, not here, so that ``central cases`` can build a config just to find the data folder.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from triage_app.config import is_loopback_host
from triage_app.errors import ConfigError, KeyFileError

MIB = 1024 * 1024
DEFAULT_PORT = 8443
DEFAULT_MAX_BODY_BYTES = 256 * MIB
DEFAULT_MAX_ENVELOPE_AGE = timedelta(days=30)
DEFAULT_MAX_PARALLEL_UPLOADS = 8
DEFAULT_UPLOAD_IDLE_TIMEOUT_S = 60.0
DEFAULT_REQUEST_HEAD_TIMEOUT_S = 60.0
#: Client connections served at once: a site's devices with room to spare. ``serve`` raises
#: the process's open-file limit to cover them (``server.raise_open_file_limit``).
DEFAULT_MAX_CONNECTIONS = 1000
#: An upload, a verdict poll and a health check at once need a few; tests use the floor.
MIN_CONNECTIONS = 4
#: Beyond this no ordinary host has the file descriptors, nor the kernel the listen backlog.
MAX_CONNECTIONS = 100_000
MAX_TIMEOUT_S = 3600
#: How far in the future a ``created_at`` (or a signed request's timestamp) may lie.
MAX_CLOCK_SKEW = timedelta(seconds=300)


@dataclass(frozen=True)
class CentralConfig:
    """Where the server keeps its data, where it listens, and what it accepts.

    ``tls_cert``/``tls_key`` are both set or both ``None``; ``None`` is only for a loopback host
    with ``allow_plain_http=True`` (a development aid: devices always pin a TLS certificate).
    ``model_dir`` is the central model bundle; ``None`` runs no model, so verdicts stay pending.
    ``max_parallel_uploads`` bounds the uploads being checked and stored at once (each holds a
    thread; more wait, unread); ``upload_idle_timeout_s`` cuts off a body that stops arriving,
    ``request_head_timeout_s`` a connection that does not send a whole request head in time.
    ``max_connections`` caps the client connections served at once (idle keep-alive ones
    included): a connection takes a place with its first request and keeps it until it closes;
    a request on another while all are taken is answered 503 ``server_busy`` at once, with
    ``Retry-After``, and that connection closed, so that a surge of devices backs off instead of
    exhausting the server's file descriptors (``app.ConnectionCap``; health and metrics are
    always answered).
    """

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_envelope_age: timedelta = DEFAULT_MAX_ENVELOPE_AGE
    model_dir: Path | None = None
    allow_plain_http: bool = False
    max_parallel_uploads: int = DEFAULT_MAX_PARALLEL_UPLOADS
    upload_idle_timeout_s: float = DEFAULT_UPLOAD_IDLE_TIMEOUT_S
    request_head_timeout_s: float = DEFAULT_REQUEST_HEAD_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        if not isinstance(self.data_dir, Path):
            raise ConfigError(f"central.data_dir: must be a path (got {self.data_dir!r})")
        if not self.host or any(c.isspace() for c in self.host):
            raise ConfigError(f"central.host: must be a host name or address (got {self.host!r})")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ConfigError(f"central.port: must be an integer (got {self.port!r})")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"central.port: must be between 0 and 65535 (got {self.port})")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("central.tls_cert/tls_key: give both the certificate and its key")
        if self.tls_cert is None and not self.allow_plain_http:
            raise ConfigError("central.tls_cert: required (the server only speaks HTTPS)")
        if self.tls_cert is None and not is_loopback_host(self.host):
            raise ConfigError(
                f"central.host: plain HTTP is allowed on loopback only (got {self.host!r})"
            )
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int):
            raise ConfigError(
                f"central.max_body_bytes: must be an integer (got {self.max_body_bytes!r})"
            )
        if self.max_body_bytes < 1024:
            raise ConfigError(
                f"central.max_body_bytes: must be at least 1024 (got {self.max_body_bytes})"
            )
        if not isinstance(self.max_envelope_age, timedelta):
            raise ConfigError(
                f"central.max_envelope_age: must be a duration (got {self.max_envelope_age!r})"
            )
        if self.max_envelope_age <= timedelta(0):
            raise ConfigError(
                f"central.max_envelope_age: must be positive (got {self.max_envelope_age})"
            )
        if (
            isinstance(self.max_parallel_uploads, bool)
            or not isinstance(self.max_parallel_uploads, int)
            or not 1 <= self.max_parallel_uploads <= 256
        ):
            raise ConfigError(
                "central.max_parallel_uploads: must be an integer from 1 to 256"
                f" (got {self.max_parallel_uploads!r})"
            )
        if (
            isinstance(self.max_connections, bool)
            or not isinstance(self.max_connections, int)
            or not MIN_CONNECTIONS <= self.max_connections <= MAX_CONNECTIONS
        ):
            raise ConfigError(
                f"central.max_connections: must be an integer from {MIN_CONNECTIONS} to"
                f" {MAX_CONNECTIONS} (got {self.max_connections!r})"
            )
        _check_timeout("upload_idle_timeout_s", self.upload_idle_timeout_s)
        _check_timeout("request_head_timeout_s", self.request_head_timeout_s)
        if self.model_dir is not None and not isinstance(self.model_dir, Path):
            raise ConfigError(f"central.model_dir: must be a path or None (got {self.model_dir!r})")

    @property
    def central_dir(self) -> Path:
        """The server's own folder under the data folder (keys, database, cases)."""
        return self.data_dir / "central"

    @property
    def keys_dir(self) -> Path:
        return self.central_dir / "keys"

    @property
    def db_path(self) -> Path:
        return self.central_dir / "central.sqlite3"

    @property
    def cases_dir(self) -> Path:
        return self.central_dir / "cases"

    @property
    def uses_tls(self) -> bool:
        return self.tls_cert is not None

    def check_tls_files(self) -> None:
        """Refuse to start with a certificate or key that is not a readable file, or with a
        private key other users may read (the rule the server's own key files follow)."""
        for name, path in (("tls_cert", self.tls_cert), ("tls_key", self.tls_key)):
            if path is not None and not path.is_file():
                raise ConfigError(f"central.{name}: no such file: {path}")
        if self.tls_key is not None:
            mode = stat.S_IMODE(self.tls_key.stat().st_mode)
            if mode & 0o077:
                raise KeyFileError(
                    f"central.tls_key: {self.tls_key}: permissions {mode:04o} are too open; "
                    "it must be readable by this user only (chmod 600)"
                )


def _check_timeout(name: str, value: object) -> None:
    """A time limit in seconds: a number from 0.1 to 3600 (``ConfigError`` naming the field)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0.1 <= value <= MAX_TIMEOUT_S
    ):
        raise ConfigError(f"central.{name}: must be 0.1 to {MAX_TIMEOUT_S} seconds (got {value!r})")
