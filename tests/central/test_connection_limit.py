"""The connection cap (``CentralConfig.max_connections``) on the real server, over loopback TLS.

The app enforces it (``app.ConnectionCap``): a connection is admitted by its first request if
fewer than the cap of admitted connections are open, and served until it closes; a request on
a connection that is not admitted at the cap is answered 503 ``server_busy`` at once, in the
protocol's error shape with ``Retry-After``, and its connection closed. ``/v1/health`` and
``/metrics`` are always answered, health saying "busy". The server must serve again as soon as
connections close, log a storm of refusals in one line, and a device must take the 503 (or the
reset a large upload may see instead) as "retry later", never as a refusal of the case, and
not send its cases again before their time because health answers. Uploads in progress (a
body that stalls) hold their places for sure; they fill the cap here, since an idle keep-alive
connection is closed after 5 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import random
import re
import resource
import socket
import ssl
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.central.conftest import Central, StartCentral, TestCase, make_case, new_device
from tests.escalation.conftest import FakeClock, device_settings, link_for, make_uploader
from tests.helpers import run_cli, serve_until_listening, wait_until
from tests.tls import ServerMaterial
from triage_app.central.app import (
    BUSY_LINGER_BYTES,
    BUSY_LINGER_S,
    BUSY_RETRY_AFTER_S,
    CAP_PRUNE_INTERVAL_S,
    SERVER_BUSY,
    BusyLog,
    ConnectionCap,
)
from triage_app.central.config import DEFAULT_MAX_CONNECTIONS, CentralConfig
from triage_app.central.server import open_files_needed
from triage_app.config import Settings
from triage_app.errors import PermanentRejectionError
from triage_app.escalation.envelope import Payload
from triage_app.escalation.outbox import OutboxState
from triage_app.escalation.transport import (
    CentralClient,
    RetryableTransportError,
    TransportConfig,
)
from triage_app.escalation.uploader import Attempt, Uploader, UploaderConfig

#: The smallest cap the configuration accepts.
CAP = 4
#: An answer at the cap must come at once; this only bounds a loaded test machine.
QUICK_S = 3.0
#: What the refusals are logged as (``app.BusyLog``).
BUSY_LINE = "at the connection cap"


@dataclass(frozen=True)
class Answer:
    """An HTTP/1.1 answer as read off the socket."""

    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def error_code(self) -> str:
        return str(json.loads(self.body)["error"]["code"])


def _connect(central: Central, tls: ServerMaterial) -> ssl.SSLSocket:
    """A TLS connection to the server, handshake done."""
    context = ssl.create_default_context(cafile=str(tls.ca_cert))
    port = int(central.url.rsplit(":", 1)[1])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return context.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


def _request(conn: ssl.SSLSocket, path: str, *, close: bool = False, headers: str = "") -> Answer:
    """``GET path`` on ``conn`` (with the header lines ``headers``) and its whole answer."""
    extra = headers + ("Connection: close\r\n" if close else "")
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode())
    return _answer(conn)


def _upload_head(length: int, extra: str = "") -> bytes:
    """The head of an upload of ``length`` bytes (the body is the caller's to send)."""
    return (
        f"POST /v1/cases/{make_case(0).case_id} HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n{extra}\r\n"
    ).encode("ascii")


def _answer(conn: ssl.SSLSocket) -> Answer:
    """The next answer on ``conn``, read whole (by ``Content-Length``)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"the connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "the connection closed within the body"
        body += chunk
    return Answer(int(status_line.split()[1]), headers, body)


def _get(central: Central, tls: ServerMaterial, path: str) -> tuple[Answer, float]:
    """``GET path`` on a new connection (no ``Connection: close`` asked for): the answer and
    how long it took."""
    started = time.monotonic()
    with contextlib.closing(_connect(central, tls)) as conn:
        answer = _request(conn, path)
    return answer, time.monotonic() - started


def _closed_by_server(conn: ssl.SSLSocket) -> bool:
    """Whether the server closed ``conn`` (within ``QUICK_S``)."""
    conn.settimeout(QUICK_S)
    try:
        return conn.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


@pytest.fixture
def hold(tls: ServerMaterial) -> Iterator[Callable[[Central, str], ssl.SSLSocket]]:
    """Open connections that stay open until the test closes them (or ends):

    * ``"idle"``: the TLS handshake done, not a byte of a request sent;
    * ``"served"``: one request answered, the connection kept alive (for 5 s: keep-alive);
    * ``"upload"``: an upload in progress: the server has begun reading its body (it answered
      ``100 Continue``), and the body then stalls (the idle timeout is 60 s).
    """
    held: list[ssl.SSLSocket] = []

    def open_one(central: Central, kind: str) -> ssl.SSLSocket:
        conn = _connect(central, tls)
        held.append(conn)
        if kind == "served":
            answer = _request(conn, "/v1/keys")
            assert answer.status == 200, answer
        elif kind == "upload":
            conn.sendall(
                (
                    f"POST /v1/cases/{make_case(0).case_id} HTTP/1.1\r\nHost: localhost\r\n"
                    "Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n"
                    "Expect: 100-continue\r\n\r\n"
                ).encode("ascii")
            )
            interim = conn.recv(4096)
            assert interim.startswith(b"HTTP/1.1 100 "), interim[:80]
        return conn

    yield open_one
    for conn in held:
        with contextlib.suppress(OSError):
            conn.close()


def _fill(
    central: Central, hold: Callable[[Central, str], ssl.SSLSocket], n: int = CAP
) -> list[ssl.SSLSocket]:
    """``n`` uploads in progress: admitted connections that stay (no keep-alive timer)."""
    return [hold(central, "upload") for _ in range(n)]


def _served_again(central: Central, tls: ServerMaterial, timeout_s: float = 5.0) -> float:
    """Seconds until a request on a new connection is served again (``/v1/keys``: health is
    answered even at the cap)."""
    started = time.monotonic()
    while True:
        status = _get(central, tls, "/v1/keys")[0].status
        if status == 200:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"/v1/keys still answers {status}"
        time.sleep(0.05)


def _small_case(index: int, image_bytes: int = 2048) -> TestCase:
    """A case whose envelope is a few KiB (by default): the server has it all before it
    answers, so the answer is never lost to a reset (see the large upload below)."""
    case_id = hashlib.sha256(f"connection-cap-{index}".encode()).hexdigest()
    result = {"case_id": case_id, "decision": "escalate", "reason": "uncertain", "score": 0.5}
    return TestCase(case_id, Payload(json.dumps(result).encode(), b"\0" * image_bytes))


#: An image as large as a real radiograph's: a refused upload of it is never read at the cap.
LARGE_IMAGE_BYTES = 8 << 20


def _device(central: Central, tls: ServerMaterial, tmp_path: Path) -> Settings:
    """A device that escalates to ``central``, its keys configured (not fetched)."""
    info = central.key_ring.public_info()
    return device_settings(
        tmp_path / "device",
        central.url,
        tls.fingerprint_sha256,
        **{
            "escalation.server_public_key": str(info["server_public_key"]),
            "escalation.receipt_public_key": str(info["receipt_public_key"]),
        },
    )


@pytest.mark.expect_log_warnings  # the cap's own line
def test_at_the_cap_a_request_on_a_new_connection_is_refused_server_busy_at_once(
    start_central: StartCentral, tls: ServerMaterial, hold: Callable[[Central, str], ssl.SSLSocket]
) -> None:
    central = start_central(max_connections=CAP)
    held = _fill(central, hold)

    started = time.monotonic()
    conn = _connect(central, tls)
    with contextlib.closing(conn):
        answer = _request(conn, "/v1/keys")  # no "Connection: close" asked for
        closed = _closed_by_server(conn)
    took = time.monotonic() - started

    assert answer.status == 503, answer
    assert answer.headers["content-type"] == "application/json"
    assert json.loads(answer.body) == {
        "error": {
            "code": SERVER_BUSY,
            "message": f"the server is serving its maximum of {CAP} connections; retry later",
        }
    }
    assert BUSY_RETRY_AFTER_S[0] <= int(answer.headers["retry-after"]) <= BUSY_RETRY_AFTER_S[1]
    assert answer.headers["connection"].lower() == "close"
    assert closed, "the refused connection was kept open"
    assert took < QUICK_S, f"the 503 took {took:.2f} s"
    for conn in held:
        conn.close()
    assert _served_again(central, tls) < 5.0


@pytest.mark.expect_log_warnings  # the cap's own line
def test_a_refused_upload_is_answered_without_its_body_being_read(
    start_central: StartCentral, tls: ServerMaterial, hold: Callable[[Central, str], ssl.SSLSocket]
) -> None:
    """A device that asks ``Expect: 100-continue`` gets the 503 instead of the go-ahead: the
    refusal reads nothing of the body (nor buffers it)."""
    central = start_central(max_connections=CAP)
    _fill(central, hold)

    with contextlib.closing(_connect(central, tls)) as conn:
        conn.sendall(_upload_head(1_000_000, "Expect: 100-continue\r\n"))
        first = _answer(conn)  # a "100 Continue" would come first
        closed = _closed_by_server(conn)

    assert first.status == 503, first
    assert first.error_code() == SERVER_BUSY
    assert closed, "the connection waited for a body the client was told not to send"


@pytest.mark.expect_log_warnings  # the cap's own line
def test_a_refused_small_upload_is_read_so_that_its_sender_gets_the_503_not_a_reset(
    start_central: StartCentral, tls: ServerMaterial, hold: Callable[[Central, str], ssl.SSLSocket]
) -> None:
    """A device sends its whole body before it reads the answer (urllib3 does). Were the
    connection closed while the body still arrives (a slow link), the rest would meet a reset
    and the 503, with its ``Retry-After``, be lost: up to ``BUSY_LINGER_BYTES`` the server reads
    the body and throws it away first."""
    central = start_central(max_connections=CAP)
    _fill(central, hold)
    piece = b"\0" * 16384
    pieces = 16

    with contextlib.closing(_connect(central, tls)) as conn:
        conn.sendall(_upload_head(len(piece) * pieces))
        conn.sendall(piece)
        answer = _answer(conn)  # at once, before the rest of the body
        time.sleep(0.3)  # the rest comes after the answer, as over a slow link
        sent = 1
        with contextlib.suppress(OSError):
            for _ in range(pieces - 1):
                conn.sendall(piece)
                sent += 1
                time.sleep(0.01)
        conn.settimeout(QUICK_S)
        end = conn.recv(1)

    assert answer.status == 503, answer
    assert answer.error_code() == SERVER_BUSY
    assert BUSY_RETRY_AFTER_S[0] <= int(answer.headers["retry-after"]) <= BUSY_RETRY_AFTER_S[1]
    assert sent == pieces, f"the body met a reset after {sent} of {pieces} pieces"
    assert end == b"", "the connection was kept open after the body"


@pytest.mark.expect_log_warnings  # the cap's own line
def test_a_refused_body_is_read_for_at_most_a_second_and_a_large_one_not_at_all(
    start_central: StartCentral, tls: ServerMaterial, hold: Callable[[Central, str], ssl.SSLSocket]
) -> None:
    """What a refusal may cost the busy server is bounded: a body that stalls holds its
    connection ``BUSY_LINGER_S``, and a body over ``BUSY_LINGER_BYTES`` is not read."""
    central = start_central(max_connections=CAP)
    _fill(central, hold)
    took: dict[int, float] = {}

    for length in (1000, BUSY_LINGER_BYTES + 1):
        with contextlib.closing(_connect(central, tls)) as conn:
            started = time.monotonic()
            conn.sendall(_upload_head(length))  # and not a byte of the body
            answer = _answer(conn)
            assert answer.status == 503, answer
            assert _closed_by_server(conn), f"a refused upload of {length} bytes kept open"
            took[length] = time.monotonic() - started

    assert BUSY_LINGER_S - 0.1 <= took[1000] < BUSY_LINGER_S + QUICK_S, took
    assert took[BUSY_LINGER_BYTES + 1] < BUSY_LINGER_S - 0.1, took


def test_connections_that_sent_no_request_take_no_place(
    start_central: StartCentral, tls: ServerMaterial, hold: Callable[[Central, str], ssl.SSLSocket]
) -> None:
    """A connection is admitted by its first request: idle ones (closed after the 60 s head
    timeout) do not keep devices out."""
    central = start_central(max_connections=CAP)
    for _ in range(CAP + 2):
        hold(central, "idle")

    assert _get(central, tls, "/v1/keys")[0].status == 200


@pytest.mark.expect_log_warnings  # the cap's own line
def test_a_connection_served_before_the_cap_was_reached_keeps_being_served(
    start_central: StartCentral, tls: ServerMaterial, hold: Callable[[Central, str], ssl.SSLSocket]
) -> None:
    """Connections opened after it, idle or refused, do not cut off one being served."""
    central = start_central(max_connections=CAP)
    first = hold(central, "served")
    _fill(central, hold, CAP - 1)  # the cap: CAP admitted
    for _ in range(CAP):
        hold(central, "idle")
    assert _get(central, tls, "/v1/keys")[0].status == 503

    assert _request(first, "/v1/keys").status == 200
    health = _request(first, "/v1/health")
    assert health.status == 200
    assert json.loads(health.body)["status"] == "ok"  # this connection is served: not busy
    assert _request(first, "/v1/keys").status == 200


@pytest.mark.expect_log_warnings  # the cap's own line
def test_health_and_metrics_are_answered_at_the_cap_and_show_the_refusals(
    start_central: StartCentral, tls: ServerMaterial, hold: Callable[[Central, str], ssl.SSLSocket]
) -> None:
    """Monitoring sees a busy server as busy, not down; a liveness probe does not restart it."""
    central = start_central(max_connections=CAP)
    before = json.loads(_get(central, tls, "/v1/health")[0].body)
    _fill(central, hold)
    for _ in range(3):
        assert _get(central, tls, "/v1/cases/nothing/verdict")[0].status == 503

    health, took = _get(central, tls, "/v1/health")
    scrape = _get(central, tls, "/metrics")[0]

    assert before == {"status": "ok", "cases": 0, "model": None}
    assert health.status == 200, health
    assert json.loads(health.body) == {"status": "busy", "cases": 0, "model": None}
    assert took < QUICK_S
    assert scrape.status == 200, scrape
    lines = set(scrape.body.decode().splitlines())
    assert f'triage_central_rejections_total{{code="{SERVER_BUSY}"}} 3.0' in lines
    assert f"triage_central_admitted_connections {float(CAP)}" in lines  # the scrape is not
    assert _get(central, tls, "/v1/keys")[0].status == 503  # ... nor did they take a place


@pytest.mark.expect_log_warnings  # the cap's own line, once
def test_a_storm_of_refusals_is_one_log_line_not_one_per_request(
    start_central: StartCentral,
    tls: ServerMaterial,
    hold: Callable[[Central, str], ssl.SSLSocket],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="uvicorn")
    central = start_central(max_connections=CAP)
    _fill(central, hold)

    for _ in range(40):
        assert _get(central, tls, "/v1/keys")[0].status == 503

    messages = [record.getMessage() for record in caplog.records]
    assert "Exceeded concurrency limit." not in messages  # uvicorn's, once per request
    assert [m for m in messages if BUSY_LINE in m] == [
        f"{BUSY_LINE} ({CAP} connections served): requests on further connections are refused"
        f" 503 {SERVER_BUSY} (a count follows at most every 60 s)"
    ]


@pytest.mark.expect_log_warnings  # what is logged is the test
def test_the_busy_log_counts_refusals_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    scheduled: list[tuple[float, Callable[[], None]]] = []
    busy = BusyLog(CAP, clock=lambda: now[0], schedule=lambda d, f: scheduled.append((d, f)))

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if BUSY_LINE in r.getMessage()]

    for _ in range(100):  # refusals begin: one line at once
        busy.refused()
        now[0] += 0.1
    assert len(lines()) == 1 and "are refused 503 server_busy" in lines()[0]
    assert [delay for delay, _ in scheduled] == [60.0]  # the count, once the minute is over

    now[0] = 1060.0
    scheduled.pop()[1]()
    assert len(lines()) == 2
    assert "100 request(s) refused 503 server_busy in the last 60 s" in lines()[1]

    now[0] = 1061.0
    for _ in range(50):  # still refusing: counted, not logged
        busy.refused()
    assert len(lines()) == 2
    assert [delay for delay, _ in scheduled] == [59.0]
    now[0] = 1120.0
    scheduled.pop()[1]()
    assert "50 request(s) refused 503 server_busy in the last 59 s" in lines()[2]

    now[0] = 1500.0  # a quiet spell, then refusals again: a line at once
    busy.refused()
    assert len(lines()) == 4 and "are refused" in lines()[3]
    busy.summarise()  # as the server's shutdown does
    assert "1 request(s) refused" in lines()[4]
    busy.summarise()
    assert len(lines()) == 5  # nothing left to count


@dataclass
class _Connection:
    """What the cap reads of one of uvicorn's protocol objects."""

    client: tuple[str, int]
    server: tuple[str, int] = ("127.0.0.1", 8443)


def test_the_cap_admits_a_connection_by_its_first_request_and_forgets_it_once_closed() -> None:
    now = [0.0]
    connections = [_Connection(("10.0.0.1", port)) for port in (1001, 1002, 1003)]
    cap = ConnectionCap(2, clock=lambda: now[0])
    one, two, three = (c.client for c in connections)
    server = connections[0].server

    assert cap.admit(three, server)  # no server watched (TestClient): no cap
    cap.watch(lambda: connections)
    assert cap.admit(one, server) and cap.admit(two, server)
    assert not cap.admit(three, server)  # the cap
    assert cap.admit(one, server)  # admitted: served whatever opened since
    assert cap.admitted() == 2

    del connections[0]  # the first closes
    assert not cap.admit(three, server)  # looked for closed ones a moment ago: not yet seen
    now[0] += CAP_PRUNE_INTERVAL_S
    assert cap.admit(three, server)
    assert cap.admitted() == 2
    assert not cap.admit(one, server)  # forgotten: back, it would be a new connection


@pytest.mark.expect_log_warnings  # the cap's own line
def test_the_device_client_takes_the_503_as_retry_after_not_as_a_refusal(
    start_central: StartCentral, tls: ServerMaterial, hold: Callable[[Central, str], ssl.SSLSocket]
) -> None:
    """Through the product's transport: a retryable error with the server's ``Retry-After``,
    never one that quarantines; health answers, so the device knows the link works, and says
    the server is busy."""
    central = start_central(max_connections=CAP)
    device = central.register(new_device())
    case = _small_case(1)
    envelope = central.seal(case, device)
    _fill(central, hold)
    config = TransportConfig(central.url, pinned_sha256=tls.fingerprint_sha256)

    with CentralClient(config) as client:
        health = client.health()
        with pytest.raises(RetryableTransportError) as upload:
            client.post_case(case.case_id, envelope)

    assert health["status"] == "busy"
    assert upload.value.status == 503, upload.value
    assert SERVER_BUSY in upload.value.message
    retry_after = upload.value.retry_after_s
    assert retry_after is not None
    assert BUSY_RETRY_AFTER_S[0] <= retry_after <= BUSY_RETRY_AFTER_S[1]
    assert central.store.count() == 0


@pytest.mark.expect_log_warnings  # the cap's own line
def test_a_large_upload_refused_unread_is_retried_not_quarantined(
    start_central: StartCentral, tls: ServerMaterial, hold: Callable[[Central, str], ssl.SSLSocket]
) -> None:
    """The server answers a body over ``BUSY_LINGER_BYTES`` without reading it and closes the
    connection: the client, still sending, sees either the 503 or the connection reset (a
    network error, no status). Either is retried; nothing is stored, no place taken."""
    central = start_central(max_connections=CAP)
    device = central.register(new_device())
    case = _small_case(40, LARGE_IMAGE_BYTES)
    envelope = central.seal(case, device)
    assert len(envelope) > 4 * BUSY_LINGER_BYTES
    _fill(central, hold)
    config = TransportConfig(central.url, pinned_sha256=tls.fingerprint_sha256)

    started = time.monotonic()
    with CentralClient(config) as client, pytest.raises(RetryableTransportError) as upload:
        client.post_case(case.case_id, envelope)
    took = time.monotonic() - started

    error = upload.value
    assert not isinstance(error, PermanentRejectionError)
    if error.status is None:  # the reset: a network error, which says nothing of a wait
        assert error.message.startswith("upload: cannot reach "), error.message
        assert "timed out" not in error.message, error.message
        assert error.retry_after_s is None
    else:
        assert error.status == 503, error
        assert SERVER_BUSY in error.message
        assert error.retry_after_s is not None
        assert BUSY_RETRY_AFTER_S[0] <= error.retry_after_s <= BUSY_RETRY_AFTER_S[1]
    assert took < QUICK_S, f"refused after {took:.2f} s"
    assert central.store.count() == 0
    assert _get(central, tls, "/v1/keys")[0].status == 503  # still at the cap


@pytest.mark.expect_log_warnings  # the cap's own line
def test_the_uploader_waits_the_retry_after_and_delivers_once_there_is_room(
    start_central: StartCentral,
    tls: ServerMaterial,
    hold: Callable[[Central, str], ssl.SSLSocket],
    tmp_path: Path,
) -> None:
    """The device's own uploader and outbox: the case waits (pending, not quarantined, the link
    still online) at least the server's ``Retry-After``, and goes through once there is room."""
    central = start_central(max_connections=CAP)
    settings = _device(central, tls, tmp_path)
    case = _small_case(2)
    with link_for(settings) as link:
        central.register(link.device)
        assert link.queue is not None
        link.queue.enqueue(case.case_id, case.payload.to_bytes(), reason="uncertain")
        clock = FakeClock()  # from now: the case is due
        held = _fill(central, hold)
        with make_uploader(link, clock=clock) as uploader:
            refused = uploader.send_next()
            assert refused is not None and refused.outcome == "retry", refused
            assert f"HTTP 503 {SERVER_BUSY}, retry after " in refused.detail, refused
            retry_after = re.search(r"retry after (\d+) s", refused.detail)
            assert retry_after is not None
            item = link.outbox.get(case.case_id)
            assert item is not None and item.state is OutboxState.PENDING, item
            assert item.quarantined_at is None
            due = datetime.fromisoformat(item.next_attempt_at)
            # At least Retry-After from now (the outbox keeps milliseconds).
            assert due + timedelta(milliseconds=1) >= clock.now + timedelta(
                seconds=int(retry_after.group(1))
            )
            assert uploader.connectivity.snapshot().online is True  # not a link down
            for conn in held:
                conn.close()
            _served_again(central, tls)
            clock.now = due - timedelta(milliseconds=50)
            assert uploader.send_next() is None  # room now, but the case keeps its time
            clock.advance_past(item.next_attempt_at)
            delivered = uploader.send_next()
        assert delivered is not None and delivered.outcome == "delivered", delivered
    assert central.store.get_case(case.case_id) is not None


@pytest.mark.expect_log_warnings  # the cap's own line
def test_an_uploader_reset_at_the_cap_keeps_its_backoff_while_health_says_busy(
    start_central: StartCentral,
    tls: ServerMaterial,
    hold: Callable[[Central, str], ssl.SSLSocket],
    tmp_path: Path,
) -> None:
    """A case too large to be read at the cap sees its connection reset (or the 503): to the
    device a link down. Its health probes, every 0.1 s here, are answered (health is never
    refused) but say "busy", so the case goes again only when its own backoff is over, never
    at a probe: a fleet at a busy server does not push its cases at it every few seconds. Once
    places are free it goes through."""
    central = start_central(max_connections=CAP)
    settings = _device(central, tls, tmp_path)
    case = _small_case(3, LARGE_IMAGE_BYTES)
    with link_for(settings) as link:
        central.register(link.device)
        assert link.queue is not None
        link.queue.enqueue(case.case_id, case.payload.to_bytes(), reason="uncertain")
        assert len(link.outbox.envelope(case.case_id)) > 4 * BUSY_LINGER_BYTES
    held = _fill(central, hold)
    # (when the attempt was reported, the attempt, the case's next attempt after it)
    seen: list[tuple[datetime, Attempt, str]] = []
    stop = threading.Event()

    def run() -> None:
        with link_for(settings) as own:
            assert own.keys is not None
            uploader = Uploader(
                outbox=own.outbox,
                client=own.client,
                device=own.device,
                keys=own.keys,
                store_path=settings.case_store_path,
                config=UploaderConfig(retry_cap_s=2.0, probe_s=0.1, verdict_poll_s=60.0),
                rng=random.Random(7),
            )

            def record(attempt: Attempt) -> None:
                item = own.outbox.get(attempt.case_id)
                seen.append((datetime.now(UTC), attempt, item.next_attempt_at if item else ""))

            with uploader:
                uploader.run(stop, on_attempt=record, idle_s=0.05)

    runner = threading.Thread(target=run, name="uploader")
    runner.start()
    try:
        time.sleep(3.0)  # thirty probe intervals at the cap
        refused = list(seen)
        for conn in held:
            conn.close()
        with link_for(settings) as link:

            def delivered() -> bool:
                item = link.outbox.get(case.case_id)
                return item is not None and item.state is OutboxState.DELIVERED

            wait_until(delivered, timeout_s=30, what="the delivery once places are free")
    finally:
        stop.set()
        runner.join(30)

    assert refused, "the case was never tried"
    assert all(attempt.outcome == "retry" for _, attempt, _ in refused), refused
    early = [
        n
        for n, ((_, _, due), (tried, _, _)) in enumerate(itertools.pairwise(refused), start=2)
        if tried < datetime.fromisoformat(due)
    ]
    assert not early, f"attempts {early} of {len(refused)} came before the case's time"
    # Its backoff (full jitter, at most 2 s here) allows a few in 3 s; a probe every 0.1 s that
    # made it due each time allowed dozens.
    assert len(refused) <= 8, f"{len(refused)} attempts in 3 s"
    assert central.store.get_case(case.case_id) is not None


@pytest.mark.expect_log_warnings  # the cap's own line
def test_x_forwarded_for_changes_neither_the_client_nor_the_cap(
    start_central: StartCentral,
    tls: ServerMaterial,
    hold: Callable[[Central, str], ssl.SSLSocket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server terminates TLS itself behind no proxy: a header from 127.0.0.1 naming
    another client is not believed (uvicorn would by default), so the cap, which knows a
    connection by its client's address, finds the connection among the open ones."""
    central = start_central(max_connections=CAP)
    cap = central.thread.app.state.connection_cap
    assert isinstance(cap, ConnectionCap)
    clients: list[tuple[str, int]] = []
    admit = cap.admit

    def recording(client: tuple[str, int], server: tuple[str, int]) -> bool:
        clients.append(client)
        return admit(client, server)

    monkeypatch.setattr(cap, "admit", recording)
    conns = [hold(central, "idle") for _ in range(CAP + 3)]

    def forwarded(i: int) -> str:
        return f"X-Forwarded-For: 10.0.0.{i}\r\n"

    statuses = [_request(c, "/v1/keys", headers=forwarded(i)).status for i, c in enumerate(conns)]
    time.sleep(CAP_PRUNE_INTERVAL_S)  # so the next refusal looks for closed connections again
    again = [_request(c, "/v1/keys", headers=forwarded(9)).status for c in conns[:CAP]]
    late = _get(central, tls, "/v1/keys")[0].status
    scrape = set(_get(central, tls, "/metrics")[0].body.decode().splitlines())

    assert clients[: len(conns)] == [("127.0.0.1", c.getsockname()[1]) for c in conns]
    assert statuses == [200] * CAP + [503] * 3
    assert again == [200] * CAP, "a connection being served was refused"
    assert late == 503
    assert f"triage_central_admitted_connections {float(CAP)}" in scrape


def test_metrics_show_open_and_admitted_connections_and_requests_in_progress(
    central: Central, hold: Callable[[Central, str], ssl.SSLSocket]
) -> None:
    hold(central, "upload")
    hold(central, "upload")
    hold(central, "idle")

    lines = set(central.get("/metrics").text.splitlines())

    # The two uploads, the idle connection and the scrape itself; the scrape (always answered)
    # and the idle connection are not admitted; the uploads and the scrape are in progress.
    assert "triage_central_open_connections 4.0" in lines
    assert "triage_central_admitted_connections 2.0" in lines
    assert "triage_central_requests_in_progress 3.0" in lines


def test_a_cap_out_of_bounds_is_a_one_line_usage_error(tmp_path: Path) -> None:
    run = run_cli(
        *("central", "serve", "--port", "0", "--max-connections", "2"),
        *("--tls-cert", tmp_path / "cert.pem", "--tls-key", tmp_path / "key.pem"),
        data_dir=tmp_path,
    )

    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        "triage-app: error: config_invalid: central.max_connections: must be an integer "
        "from 4 to 100000 (got 2)"
    ]


def test_serve_raises_a_low_open_file_limit_to_cover_the_cap(
    tmp_path: Path, tls: ServerMaterial
) -> None:
    """systemd and shells start services with a soft limit of 1024 open files, fewer than the
    default cap needs; ``serve`` raises it (within the hard limit) before it listens."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    needed = open_files_needed(
        CentralConfig(tmp_path, tls_cert=tls.server_cert, tls_key=tls.server_key)
    )
    assert needed > DEFAULT_MAX_CONNECTIONS
    expected = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    script = textwrap.dedent(
        f"""
        import resource, runpy, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, {hard}))
        sys.argv = ["triage-app", "central", "serve", "--port", "0",
                    "--tls-cert", {str(tls.server_cert)!r}, "--tls-key", {str(tls.server_key)!r},
                    "--data-dir", {str(tmp_path / "server")!r}]
        runpy.run_module("triage_app", run_name="__main__")
        """
    )
    limits: list[str] = []
    lines = serve_until_listening(
        [sys.executable, "-c", script],
        lambda pid: limits.append(Path(f"/proc/{pid}/limits").read_text()),
    )
    assert any("at most 1000 connections" in line for line in lines), lines
    soft_limit = re.search(r"^Max open files\s+(\d+)", "".join(limits), flags=re.MULTILINE)
    assert soft_limit is not None, limits
    assert int(soft_limit.group(1)) == expected
    assert any(f"raised from 256 to {expected}" in line for line in lines), lines
