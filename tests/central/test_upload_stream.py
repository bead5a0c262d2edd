"""One client cannot hurt the others: stalled and slow uploads on the real server (loopback TLS).

Connections that open an upload and stall must hold no thread and no growing buffer, uploads
must never take the threads verdict polls and health checks run in, and a body that stops
arriving is cut off with 408 so that its device retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from tests.central.conftest import Central, StartCentral, make_case, new_device
from tests.tls import ServerMaterial
from triage_app.central.upload_stream import UploadGate, UploadLimits, _PieceChannel
from triage_app.escalation.envelope import MAGIC

# More than the 40 threads of the server's default pool, which verdict polls and health use.
STALLED = 48


def _open_upload(
    port: int, ca: ServerMaterial, case_id: str, first: bytes, length: int
) -> ssl.SSLSocket:
    """A TLS connection that has sent a POST's head and ``first`` body bytes of ``length``."""
    context = ssl.create_default_context(cafile=str(ca.ca_cert))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = context.wrap_socket(raw, server_hostname="localhost")
    head = (
        f"POST /v1/cases/{case_id} HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
    )
    conn.sendall(head.encode("ascii") + first)
    return conn


def _read_answer(conn: ssl.SSLSocket) -> str:
    """The whole HTTP answer (head and ``Content-Length`` body), as text."""
    conn.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += conn.recv(4096)
    return (head + b"\r\n\r\n" + body).decode("latin-1")


@pytest.fixture
def stalled(central: Central, tls: ServerMaterial) -> Iterator[list[ssl.SSLSocket]]:
    """``STALLED`` uploads that sent the first bytes of an envelope's magic number, then stop."""
    port = int(central.url.rsplit(":", 1)[1])
    sockets = [
        _open_upload(port, tls, make_case(0).case_id, MAGIC[:6], 1_000_000) for _ in range(STALLED)
    ]
    yield sockets
    for conn in sockets:
        with contextlib.suppress(OSError):
            conn.close()


def test_stalled_uploads_hold_no_thread_health_and_uploads_are_served(
    central: Central, stalled: list[ssl.SSLSocket]
) -> None:
    time.sleep(0.5)  # let the server take every stalled request in
    started = time.monotonic()
    health = central.http.get(f"{central.url}/v1/health", timeout=10)
    assert health.status_code == 200
    assert time.monotonic() - started < 5.0, "health waited behind the stalled uploads"

    device = central.register(new_device())
    case = make_case(1)
    answer = central.post(case.case_id, central.seal(case, device))
    assert answer.status_code == 201, answer.text
    assert central.poll(case.case_id, device).status_code == 202
    assert stalled  # still open while all this was served


def test_a_body_that_stops_arriving_is_cut_off_with_408(
    start_central: StartCentral, tls: ServerMaterial
) -> None:
    central = start_central(upload_idle_timeout_s=0.5)
    device = central.register(new_device())
    case = make_case(2)
    envelope = central.seal(case, device)
    port = int(central.url.rsplit(":", 1)[1])
    # The whole signed header and some chunk bytes: the receiving thread has started.
    conn = _open_upload(port, tls, case.case_id, envelope[:2000], len(envelope))
    with contextlib.closing(conn):
        answer = _read_answer(conn)
    assert answer.startswith("HTTP/1.1 408"), answer[:80]
    assert '"code":"body_timeout"' in answer
    assert "connection: close" in answer.lower()
    assert central.store.get_case(case.case_id) is None
    # Nothing staged is left behind, and the device can send the case again.
    folder = central.store.case_dir(case.case_id)
    assert not folder.exists() or not any(folder.iterdir())
    assert central.post(case.case_id, envelope).status_code == 201


def test_uploads_beyond_the_parallel_limit_wait_and_all_arrive(
    start_central: StartCentral,
) -> None:
    central = start_central(max_parallel_uploads=1)
    device = central.register(new_device())
    cases = [make_case(10 + i) for i in range(4)]
    bodies = {case.case_id: central.seal(case, device) for case in cases}
    statuses: dict[str, int] = {}

    def send(case_id: str) -> None:
        statuses[case_id] = central.post(case_id, bodies[case_id]).status_code

    threads = [threading.Thread(target=send, args=(case_id,)) for case_id in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == {case_id: 201 for case_id in bodies}
    assert {c.case_id for c in central.store.cases()} == set(bodies)


# --- The channel between the event loop and the receiving thread (a unit) --------------------


def test_the_channel_holds_the_loop_back_while_the_thread_is_behind() -> None:
    async def scenario() -> tuple[int, list[int]]:
        channel = _PieceChannel(limit=3 * 1024)
        piece = b"x" * 1024
        taken: list[int] = []
        for _ in range(3):
            await channel.put(piece)  # up to the limit: no wait
        blocked = asyncio.ensure_future(channel.put(piece))
        await asyncio.sleep(0.05)
        waited = 0 if blocked.done() else 1  # over the limit: the loop waits for room

        def take_two() -> None:
            for _ in range(2):
                got = channel.get()
                assert got is not None
                taken.append(len(got))

        await asyncio.to_thread(take_two)
        await asyncio.wait_for(blocked, 5)  # room again: the piece goes in
        channel.end()
        rest = await asyncio.to_thread(lambda: [channel.get() for _ in range(3)])
        taken.extend(len(r) for r in rest if r is not None)
        assert rest[-1] is None
        return waited, taken

    waited, taken = asyncio.run(scenario())
    assert waited == 1
    assert taken == [1024, 1024, 1024, 1024]


def test_a_closed_channel_drops_pieces_and_never_keeps_the_loop_waiting() -> None:
    async def scenario() -> bool:
        channel = _PieceChannel(limit=10)
        await channel.put(b"0123456789ab")  # one piece may go over the limit
        waiting = asyncio.ensure_future(channel.put(b"more"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        channel.close()  # the thread refused the envelope and left
        await asyncio.wait_for(waiting, 5)
        await channel.put(b"after")  # dropped, no wait
        return True

    assert asyncio.run(scenario())


def test_the_gate_limits_are_what_the_server_config_says(start_central: StartCentral) -> None:
    central = start_central(max_parallel_uploads=3, upload_idle_timeout_s=7.5)
    gate = central.thread.app.state.uploads
    assert isinstance(gate, UploadGate)
    assert gate.limits == UploadLimits(
        max_body_bytes=central.thread.config.max_body_bytes, idle_timeout_s=7.5, parallel=3
    )


# --- The request head (uvicorn times a connection out only after a response) -----------------


def _connect(central: Central, tls: ServerMaterial) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(tls.ca_cert))
    port = int(central.url.rsplit(":", 1)[1])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def test_a_connection_that_never_sends_a_whole_request_head_is_cut(
    start_central: StartCentral, tls: ServerMaterial
) -> None:
    central = start_central(request_head_timeout_s=0.5)
    with contextlib.closing(_connect(central, tls)) as conn:
        conn.sendall(b"GET /v1/health HTTP/1.1\r\nHost: loc")  # and then nothing
        started = time.monotonic()
        conn.settimeout(10)
        try:
            data = conn.recv(4096)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        took = time.monotonic() - started
    assert data == b"", data[:80]
    assert took < 5.0


def test_a_slow_but_whole_request_head_in_time_is_answered(
    start_central: StartCentral, tls: ServerMaterial
) -> None:
    central = start_central(request_head_timeout_s=2.0)
    with contextlib.closing(_connect(central, tls)) as conn:
        conn.sendall(b"GET /v1/health HTTP/1.1\r\n")
        time.sleep(0.6)
        conn.sendall(b"Host: localhost\r\n\r\n")
        conn.settimeout(10)
        answer = conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
