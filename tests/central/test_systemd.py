"""``serve``'s server as a systemd ``Type=notify`` service, in this process: READY=1 once it
serves, WATCHDOG=1 from its event loop (a hung loop stops the pings), STOPPING=1 at shutdown.

The whole command under a notify socket is in ``tests/test_cli_central.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import requests
from fastapi import FastAPI

from tests.central.conftest import CENTRAL_MODEL
from tests.tls import ServerMaterial
from triage_app.central.app import create_app
from triage_app.central.config import CentralConfig
from triage_app.central.server import (
    ServerThread,
    bind_socket,
    load_key_ring,
    make_server,
    open_store,
    run_server,
)

#: WATCHDOG_USEC for these tests: a ping every 0.2 s.
WATCHDOG_S = 0.4


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A real datagram socket where systemd's would be, named by $NOTIFY_SOCKET, and a
    watchdog interval for this process."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1e6)))
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        yield sock


def _pending(sock: socket.socket) -> list[bytes]:
    """The datagrams already waiting, without waiting for more."""
    sock.setblocking(False)
    try:
        messages = []
        while True:
            try:
                messages.append(sock.recv(64))
            except BlockingIOError:
                return messages
    finally:
        sock.settimeout(30)


@pytest.mark.timeout(60)
def test_the_watchdog_is_pinged_from_the_event_loop_and_stops_while_it_hangs(
    tmp_path: Path, tls: ServerMaterial, notify_socket: socket.socket
) -> None:
    config = CentralConfig(
        tmp_path / "server", port=0, tls_cert=tls.server_cert, tls_key=tls.server_key
    )
    release = threading.Event()
    try:
        with notifying_server(config) as (loops, _, port):
            assert notify_socket.recv(64) == b"READY=1"
            # Ready means served: the first request is answered, no retry needed.
            with requests.Session() as http:
                http.trust_env = False
                health = http.get(
                    f"https://127.0.0.1:{port}/v1/health", verify=str(tls.ca_cert), timeout=10
                )
            assert health.status_code == 200
            assert [notify_socket.recv(64) for _ in range(2)] == [b"WATCHDOG=1"] * 2

            hung = threading.Event()

            def hang() -> None:
                """Block the event loop, as a handler that never returns would."""
                hung.set()
                release.wait(30)

            loops[0].call_soon_threadsafe(hang)
            assert hung.wait(10)
            assert set(_pending(notify_socket)) <= {b"WATCHDOG=1"}  # sent before it hung
            notify_socket.settimeout(2.5 * WATCHDOG_S)  # past systemd's limit: no ping came
            with pytest.raises(TimeoutError):
                notify_socket.recv(64)
            release.set()
            notify_socket.settimeout(30)
            assert notify_socket.recv(64) == b"WATCHDOG=1"  # the loop turns again
    finally:
        release.set()
    messages = []
    while b"STOPPING=1" not in messages:
        messages.append(notify_socket.recv(64))
    assert set(messages[:-1]) <= {b"WATCHDOG=1"}  # pings sent before the shutdown began
    assert _pending(notify_socket) == []  # no ping after STOPPING=1


def test_a_server_in_a_thread_tells_systemd_nothing(
    tmp_path: Path, tls: ServerMaterial, notify_socket: socket.socket
) -> None:
    """Only ``serve`` is the service: a test's or the demo's server must not say READY=1 for
    a process that happens to run under systemd."""
    config = CentralConfig(
        tmp_path / "server", port=0, tls_cert=tls.server_cert, tls_key=tls.server_key
    )
    with ServerThread(config):
        pass
    assert _pending(notify_socket) == []


@contextlib.contextmanager
def notifying_server(
    config: CentralConfig,
) -> Iterator[tuple[list[asyncio.AbstractEventLoop], FastAPI, int]]:
    """``serve``'s server on a free port in a thread: its loop (once running), app and port."""
    loops: list[asyncio.AbstractEventLoop] = []
    with open_store(config) as store:
        app = create_app(config, key_ring=load_key_ring(config), store=store)
        sock = bind_socket(config.host, 0)
        server = make_server(app, config, graceful_s=5, notify=True)

        async def run() -> None:
            loops.append(asyncio.get_running_loop())
            await run_server(server, sock)

        thread = threading.Thread(target=asyncio.run, args=(run(),))
        thread.start()
        try:
            yield loops, app, sock.getsockname()[1]
        finally:
            server.should_exit = True
            thread.join(30)
            sock.close()
    assert not thread.is_alive()


def _no_ping_for(sock: socket.socket, seconds: float) -> bool:
    """Whether no WATCHDOG=1 arrived for ``seconds`` (from now)."""
    _pending(sock)
    sock.settimeout(seconds)
    try:
        while True:
            if sock.recv(64) == b"WATCHDOG=1":
                return False
    except TimeoutError:
        return True
    finally:
        sock.settimeout(30)


@pytest.mark.timeout(60)
def test_no_ping_while_every_request_thread_is_stuck(
    tmp_path: Path, tls: ServerMaterial, notify_socket: socket.socket
) -> None:
    """A loop that turns is not enough: with the request threads all stuck (a store call that
    never returns, say), no request is answered, and systemd must restart the server."""
    config = CentralConfig(
        tmp_path / "server", port=0, tls_cert=tls.server_cert, tls_key=tls.server_key
    )
    release = threading.Event()
    with notifying_server(config) as (loops, _, _):
        assert notify_socket.recv(64) == b"READY=1"
        assert notify_socket.recv(64) == b"WATCHDOG=1"

        async def occupy_every_thread() -> None:
            limiter = anyio.to_thread.current_default_thread_limiter()
            async with anyio.create_task_group() as tasks:
                for _ in range(int(limiter.total_tokens)):
                    tasks.start_soon(wait_in_a_thread)

        async def wait_in_a_thread() -> None:
            await anyio.to_thread.run_sync(release.wait)

        stuck = asyncio.run_coroutine_threadsafe(occupy_every_thread(), loops[0])
        try:
            assert _no_ping_for(notify_socket, 2.5 * WATCHDOG_S)
        finally:
            release.set()
        stuck.result(30)
        assert notify_socket.recv(64) == b"WATCHDOG=1"  # requests get threads again


@pytest.mark.timeout(90)
@pytest.mark.expect_log_warnings
def test_no_ping_once_the_verdict_worker_has_stopped(
    tmp_path: Path, tls: ServerMaterial, notify_socket: socket.socket, caplog: Any
) -> None:
    """Cases would be received and never decided: a restart starts the worker again."""
    config = CentralConfig(
        tmp_path / "server",
        port=0,
        tls_cert=tls.server_cert,
        tls_key=tls.server_key,
        model_dir=CENTRAL_MODEL,
    )
    with notifying_server(config) as (_, app, _):
        assert notify_socket.recv(64) == b"READY=1"
        assert notify_socket.recv(64) == b"WATCHDOG=1"
        app.state.worker.stop()
        assert _no_ping_for(notify_socket, 2.5 * WATCHDOG_S)
    assert "watchdog not pinged: the verdict worker has stopped" in caplog.text
