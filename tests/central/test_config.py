"""CentralConfig refuses what the server could not run with, in one line naming the field."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from triage_app.central.config import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    CentralConfig,
)
from triage_app.errors import ConfigError

TLS: dict[str, Any] = {"tls_cert": Path("cert.pem"), "tls_key": Path("key.pem")}


def test_defaults_follow_the_protocol(tmp_path: Path) -> None:
    config = CentralConfig(tmp_path, **TLS)

    assert (config.host, config.port) == ("127.0.0.1", 8443)
    assert config.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 256 * 1024 * 1024
    assert config.max_envelope_age == timedelta(days=30)
    assert config.model_dir is None
    assert config.max_connections == DEFAULT_MAX_CONNECTIONS == 1000
    assert config.keys_dir == tmp_path / "central" / "keys"
    assert config.cases_dir == tmp_path / "central" / "cases"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"port": 70000}, "central.port"),
        ({"port": -1}, "central.port"),
        ({"port": True}, "central.port"),
        ({"host": ""}, "central.host"),
        ({"host": "a b"}, "central.host"),
        ({"tls_key": None}, "central.tls_cert/tls_key"),
        ({"tls_cert": None, "tls_key": None}, "central.tls_cert"),
        ({"max_body_bytes": 10}, "central.max_body_bytes"),
        ({"max_body_bytes": 1.5}, "central.max_body_bytes"),
        ({"max_envelope_age": timedelta(0)}, "central.max_envelope_age"),
        ({"max_envelope_age": 30}, "central.max_envelope_age"),
        ({"model_dir": "models/x"}, "central.model_dir"),
        ({"max_connections": 3}, "central.max_connections"),
        ({"max_connections": 100_001}, "central.max_connections"),
        ({"max_connections": "1000"}, "central.max_connections"),
        ({"max_connections": 1000.0}, "central.max_connections"),
        ({"max_connections": True}, "central.max_connections"),
        ({"max_connections": None}, "central.max_connections"),
    ],
)
def test_bad_values_are_refused(tmp_path: Path, fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        CentralConfig(tmp_path, **(TLS | fields))
    message = str(caught.value)
    assert message.startswith(field + ":")
    assert "\n" not in message


def test_plain_http_only_on_loopback_and_only_when_asked(tmp_path: Path) -> None:
    assert not CentralConfig(tmp_path, allow_plain_http=True).uses_tls
    with pytest.raises(ConfigError, match="loopback"):
        CentralConfig(tmp_path, host="0.0.0.0", allow_plain_http=True)


def test_tls_files_are_checked_when_the_server_starts(tmp_path: Path) -> None:
    config = CentralConfig(tmp_path, **TLS)
    with pytest.raises(ConfigError, match=r"central\.tls_cert: no such file"):
        config.check_tls_files()


def test_the_connection_cap_is_bounded_with_the_settings_code(tmp_path: Path) -> None:
    for fine in (4, 100_000):
        assert CentralConfig(tmp_path, **TLS, max_connections=fine).max_connections == fine
    with pytest.raises(ConfigError) as caught:
        CentralConfig(tmp_path, **TLS, max_connections=0)
    assert caught.value.code == "config_invalid"
    assert str(caught.value) == (
        "central.max_connections: must be an integer from 4 to 100000 (got 0)"
    )
