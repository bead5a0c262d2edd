"""The server as a whole: health, keys, metrics, TLS, restarts on the same data, ``serve``."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from fastapi import FastAPI

from tests.central.conftest import (
    Central,
    StartCentral,
    free_port,
    make_case,
    new_device,
    seal_case,
    serve_in_process,
)
from tests.central.test_api import assert_refused, receipt_key_of
from tests.helpers import run_cli
from tests.tls import ServerMaterial, make_self_signed_server
from triage_app.central.config import CentralConfig
from triage_app.central.errors import PortInUseError
from triage_app.central.server import (
    KEEP_ALIVE_TIMEOUT_S,
    MIN_BACKLOG,
    ServerThread,
    _reap_closed_connections,
    bind_socket,
    uvicorn_config,
)
from triage_app.central.storage import DICOM_FILE, CentralStore
from triage_app.errors import ConfigError
from triage_app.escalation.keys import ServerPublicKey
from triage_app.escalation.receipt import verify_receipt


def test_health_answers_with_the_case_count(central: Central) -> None:
    assert central.get("/v1/health").json() == {"status": "ok", "cases": 0, "model": None}
    device = central.register(new_device())
    case = make_case(30)
    central.post(case.case_id, central.seal(case, device))

    assert central.get("/v1/health").json()["cases"] == 1


def test_keys_are_what_a_device_needs_to_seal_and_check_receipts(central: Central) -> None:
    keys = central.get("/v1/keys").json()

    assert set(keys) == {
        "server_key_id",
        "server_public_key",
        "retired_key_ids",
        "server_id",
        "receipt_public_key",
    }
    server_key = ServerPublicKey.from_b64(keys["server_public_key"])
    assert server_key.key_id == keys["server_key_id"] == central.key_ring.active.key_id
    assert keys["retired_key_ids"] == []
    assert keys["server_id"] == central.key_ring.server_id
    device = central.register(new_device())
    case = make_case(31)
    response = central.post(case.case_id, seal_case(case, device, server_key))
    assert response.status_code == 201


def test_metrics_count_cases_duplicates_and_refusals(central: Central) -> None:
    device = central.register(new_device())
    case = make_case(32)
    body = central.seal(case, device)
    central.post(case.case_id, body)
    central.post(case.case_id, body)
    central.post(case.case_id, central.seal(case, new_device()))  # unknown device

    response = central.get("/metrics")

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    lines = set(response.text.splitlines())
    assert "triage_central_cases_received_total 1.0" in lines
    assert "triage_central_duplicate_deliveries_total 1.0" in lines
    assert 'triage_central_rejections_total{code="unknown_device"} 1.0' in lines
    assert "triage_central_stored_cases 1.0" in lines
    assert (
        'triage_central_request_seconds_count{method="POST",route="/v1/cases/{case_id}"} 3.0'
        in lines
    )
    assert case.case_id not in response.text  # labelled by route template, not by case


def test_two_servers_in_one_process_keep_their_own_metrics(start_central: StartCentral) -> None:
    one = start_central()
    other = start_central(one.thread.config.data_dir.parent / "other")
    device = one.register(new_device())
    case = make_case(33)
    one.post(case.case_id, one.seal(case, device))

    assert "triage_central_cases_received_total 1.0" in one.get("/metrics").text
    assert "triage_central_cases_received_total 0.0" in other.get("/metrics").text


def test_a_restart_on_the_same_data_keeps_cases_keys_and_receipts(
    start_central: StartCentral, tmp_path: Path
) -> None:
    data_dir = tmp_path / "server"
    first = start_central(data_dir)
    device = first.register(new_device())
    case = make_case(34)
    body = first.seal(case, device)
    receipt = first.post(case.case_id, body).json()["receipt"]
    receipt_key = receipt_key_of(first)
    first.thread.stop()

    second = start_central(data_dir)
    again = second.post(case.case_id, body)

    assert again.status_code == 200, again.text
    verified = verify_receipt(
        again.json(),
        receipt_key,
        case_id=case.case_id,
        device_id=device.device_id,
        payload_sha256=receipt["payload_sha256"],
    )
    assert verified.deliveries == 2
    assert again.json()["receipt"] == receipt | {"deliveries": 2}
    assert second.get("/v1/health").json()["cases"] == 1
    assert (second.store.case_dir(case.case_id) / DICOM_FILE).read_bytes() == case.payload.dicom


def test_a_key_rotated_by_the_admin_command_takes_effect_at_the_next_start(
    start_central: StartCentral, tmp_path: Path
) -> None:
    """What ``central keys --help`` and the README tell admins: a running server keeps the
    keys it read at start."""
    data_dir = tmp_path / "server"
    first = start_central(data_dir)
    old_key_id = first.get("/v1/keys").json()["server_key_id"]
    device = first.register(new_device())
    case = make_case(35)

    rotated = run_cli("central", "keys", "--rotate", data_dir=data_dir)

    assert rotated.returncode == 0, rotated.stderr
    new_keys = json.loads(rotated.stdout)
    new_key = ServerPublicKey.from_b64(new_keys["server_public_key"])
    assert new_keys["server_key_id"] != old_key_id
    assert first.get("/v1/keys").json()["server_key_id"] == old_key_id
    sealed_to_new = seal_case(case, device, new_key)
    assert_refused(first.post(case.case_id, sealed_to_new), 422, "unknown_server_key")
    first.thread.stop()
    second = start_central(data_dir)
    assert second.get("/v1/keys").json()["server_key_id"] == new_keys["server_key_id"]
    assert second.post(case.case_id, sealed_to_new).status_code == 201
    described = " ".join(run_cli("central", "keys", "--help", data_dir=data_dir).stdout.split())
    assert "until it is restarted" in described


def test_tls_is_required_and_verified(central: Central, tmp_path: Path) -> None:
    plain = central.url.replace("https://", "http://")
    with requests.Session() as session:
        session.trust_env = False
        with pytest.raises(requests.ConnectionError):
            session.get(plain + "/v1/health", timeout=10)
        stranger = make_self_signed_server(tmp_path / "stranger")
        session.verify = str(stranger.ca_cert)
        with pytest.raises(requests.exceptions.SSLError):
            session.get(central.url + "/v1/health", timeout=10)


def test_a_taken_port_is_a_temporary_error(central: Central) -> None:
    """Mostly the instance before, still closing: ``serve`` exits 75 and systemd tries again."""
    port = central.thread.port
    assert port is not None
    with pytest.raises(PortInUseError) as caught:
        bind_socket("127.0.0.1", port)
    reason = "Address already in use"  # once: not create_server's repeat of the address
    assert str(caught.value) == f"central: cannot listen on 127.0.0.1:{port} ({reason})"
    assert caught.value.temporary


def test_an_address_not_of_this_machine_is_a_config_error() -> None:
    """A wrong ``--host`` (192.0.2.1: TEST-NET-1) does not come right by itself: exit 2, the
    unit stays failed."""
    with pytest.raises(ConfigError) as caught:
        bind_socket("192.0.2.1", 0)
    reason = "Cannot assign requested address"
    assert str(caught.value) == f"central: cannot listen on 192.0.2.1:0 ({reason})"
    assert not caught.value.temporary


@pytest.mark.parametrize(
    ("max_connections", "backlog"), [(4, MIN_BACKLOG), (1000, 1000), (100_000, 100_000)]
)
def test_uvicorn_is_told_a_short_keep_alive_and_a_backlog_as_deep_as_the_cap(
    tmp_path: Path, tls: ServerMaterial, max_connections: int, backlog: int
) -> None:
    """uvicorn listens with its own backlog (2048 unless told); the cap is the app's, so
    uvicorn's ``limit_concurrency`` (its own plain 503, for health checks too) stays off."""
    config = CentralConfig(
        tmp_path,
        tls_cert=tls.server_cert,
        tls_key=tls.server_key,
        max_connections=max_connections,
    )

    settings = uvicorn_config(FastAPI(), config, graceful_s=5)

    assert settings.limit_concurrency is None
    assert settings.backlog == backlog
    assert settings.timeout_keep_alive == KEEP_ALIVE_TIMEOUT_S == 5


def test_server_thread_owns_and_closes_what_it_opened(tmp_path: Path, tls: ServerMaterial) -> None:
    config = CentralConfig(
        tmp_path / "server", port=0, tls_cert=tls.server_cert, tls_key=tls.server_key
    )
    with ServerThread(config) as server:
        assert server.port is not None and server.port > 0
        assert server.url == f"https://127.0.0.1:{server.port}"
    with CentralStore.for_config(config) as store:  # the file is closed and reopens cleanly
        assert store.count() == 0


def test_serve_runs_in_the_foreground_and_stops_gracefully_on_sigterm(
    tmp_path: Path, tls: ServerMaterial, http: requests.Session
) -> None:
    port = free_port()
    process = serve_in_process(tmp_path / "server", port, tls)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = http.get(f"https://127.0.0.1:{port}/v1/health", timeout=5)
                break
            except requests.ConnectionError:
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, "serve() did not start listening"
                time.sleep(0.1)
        assert health.json()["status"] == "ok"
        health.close()  # the response holds the socket open until it is closed
        http.close()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # A clean stop: the store closed and "stopped" logged (uvicorn's re-raised signal is absorbed).
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert (tmp_path / "server" / "central" / "central.sqlite3").is_file()


def test_unknown_paths_are_refused_in_the_error_shape(central: Central) -> None:
    assert_refused(central.get("/"), 404, "not_found")


class _DetachedSslTransport(asyncio.Transport):
    """What Python 3.11.2's SSL transport does once its protocol is detached: closing, and
    ``abort()`` raising AttributeError (3.11.7 checks for None first)."""

    def __init__(self) -> None:
        super().__init__()
        self.aborts = 0

    def is_closing(self) -> bool:
        return True

    def abort(self) -> None:
        self.aborts += 1
        raise AttributeError("'NoneType' object has no attribute '_abort'")


def test_stopping_with_a_half_closed_tls_connection_is_no_internal_error() -> None:
    """A site's ``systemctl stop triage-central`` with devices connected ended in exit 70
    (an AttributeError from the reaper) on Debian 12's Python."""
    transport = _DetachedSslTransport()
    server = SimpleNamespace(
        should_exit=True,
        server_state=SimpleNamespace(connections=[SimpleNamespace(transport=transport)]),
    )

    async def run_until_aborted() -> None:
        reaper = asyncio.create_task(_reap_closed_connections(server))  # type: ignore[arg-type]
        while transport.aborts < 2 and not reaper.done():
            await asyncio.sleep(0.05)
        assert not reaper.done(), reaper.exception()
        reaper.cancel()

    asyncio.run(asyncio.wait_for(run_until_aborted(), timeout=30))
    assert transport.aborts >= 2, "the reaper went on after the failed abort"
