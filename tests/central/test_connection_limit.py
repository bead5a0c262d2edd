"""The connection cap (``CentralConfig.max_connections``) on the real server, over loopback TLS.

Past the cap a request must be answered 503 at once (and its connection closed) rather than the
server taking ever more connections until its file descriptors run out; the server must serve
again as soon as connections close, and a device must take the 503 as "retry later", never as a
refusal of the case. Idle connections (TLS handshake done, nothing sent) and requests in
progress (an upload whose body stalls) both count.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import select
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.central.conftest import Central, StartCentral, make_case, new_device
from tests.escalation.conftest import FakeClock, device_settings, link_for, make_uploader
from tests.helpers import run_cli
from tests.tls import ServerMaterial
from triage_app.central.config import DEFAULT_MAX_CONNECTIONS, CentralConfig
from triage_app.central.server import open_files_needed
from triage_app.errors import PermanentRejectionError
from triage_app.escalation.outbox import OutboxState
from triage_app.escalation.transport import (
    CentralClient,
    RetryableTransportError,
    TransportConfig,
)

#: The smallest cap the configuration accepts.
CAP = 4
#: An answer at the cap must come at once; this only bounds a loaded test machine.
QUICK_S = 3.0


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


@pytest.fixture
def hold(tls: ServerMaterial) -> Iterator[Callable[[Central, str], ssl.SSLSocket]]:
    """Open connections that stay open until the test closes them (or ends):

    * ``"idle"``: the TLS handshake done, not a byte of a request sent;
    * ``"upload"``: an upload in progress: the server has begun reading its body (it answered
      ``100 Continue``, so it counts it for sure), and the body then stalls.
    """
    held: list[ssl.SSLSocket] = []

    def open_one(central: Central, kind: str) -> ssl.SSLSocket:
        conn = _connect(central, tls)
        held.append(conn)
        if kind == "upload":
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


def _get(central: Central, tls: ServerMaterial, path: str) -> tuple[str, float]:
    """``GET path`` on a new connection: the whole answer (read to the connection's end) and
    how long it took."""
    started = time.monotonic()
    with contextlib.closing(_connect(central, tls)) as conn:
        conn.sendall(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    return answer.decode("latin-1"), time.monotonic() - started


def _healthy_again(central: Central, timeout_s: float = 5.0) -> float:
    """Seconds until ``/v1/health`` answers 200 again (on a new connection each time)."""
    started = time.monotonic()
    while True:
        with requests.Session() as session:
            session.trust_env = False
            session.verify = central.http.verify
            status = session.get(f"{central.url}/v1/health", timeout=5).status_code
        if status == 200:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"/v1/health still answers {status}"
        time.sleep(0.05)


def test_a_request_past_the_cap_is_answered_503_at_once_and_health_recovers(
    start_central: StartCentral, tls: ServerMaterial, hold: Callable[[Central, str], ssl.SSLSocket]
) -> None:
    central = start_central(max_connections=CAP)
    held = [hold(central, "idle"), hold(central, "idle"), hold(central, "upload")]
    held.append(hold(central, "upload"))  # the cap: CAP connections open

    answer, took = _get(central, tls, "/v1/health")

    assert answer.startswith("HTTP/1.1 503 "), answer[:80]
    head = answer.lower()
    assert "connection: close" in head  # the excess connection is not kept
    assert answer.endswith("Service Unavailable")  # uvicorn's own answer, not the app's
    assert took < QUICK_S, f"the 503 took {took:.2f} s"
    for conn in held:
        conn.close()
    assert _healthy_again(central) < 5.0


def test_exactly_max_connections_are_served(
    start_central: StartCentral, tls: ServerMaterial, hold: Callable[[Central, str], ssl.SSLSocket]
) -> None:
    """The cap counts the connection a request comes on: at ``CAP`` connections open, a request
    on one of them is served, and one on a further connection is not."""
    central = start_central(max_connections=CAP)
    held = [hold(central, "idle") for _ in range(CAP)]

    held[-1].sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert held[-1].recv(4096).startswith(b"HTTP/1.1 200 ")  # kept alive: still CAP open
    assert _get(central, tls, "/v1/health")[0].startswith("HTTP/1.1 503 ")


def test_the_device_takes_the_503_as_retry_later_not_as_a_refusal(
    start_central: StartCentral, tls: ServerMaterial, hold: Callable[[Central, str], ssl.SSLSocket]
) -> None:
    """Through the product's transport: a retryable error, never one that quarantines."""
    central = start_central(max_connections=CAP)
    device = central.register(new_device())
    case = make_case(40)
    envelope = central.seal(case, device)
    for _ in range(CAP):
        hold(central, "idle")
    config = TransportConfig(central.url, pinned_sha256=tls.fingerprint_sha256)

    with CentralClient(config) as client:
        with pytest.raises(RetryableTransportError) as health:
            client.health()
        with pytest.raises(RetryableTransportError) as upload:
            client.post_case(case.case_id, envelope)

    assert health.value.status == 503
    # The server answers before reading the body and closes the connection: a client still
    # sending the envelope may see the close instead of the 503. Both are retried.
    assert upload.value.status in (503, None), upload.value
    assert not isinstance(upload.value, PermanentRejectionError)
    assert central.store.count() == 0


def test_the_uploader_keeps_the_case_and_delivers_it_once_there_is_room(
    start_central: StartCentral,
    tls: ServerMaterial,
    hold: Callable[[Central, str], ssl.SSLSocket],
    tmp_path: Path,
) -> None:
    """The device's own uploader and outbox: the case waits (pending, not quarantined) and goes
    through once connections are free."""
    central = start_central(max_connections=CAP)
    info = central.key_ring.public_info()
    settings = device_settings(
        tmp_path / "device",
        central.url,
        tls.fingerprint_sha256,
        **{
            "escalation.server_public_key": str(info["server_public_key"]),
            "escalation.receipt_public_key": str(info["receipt_public_key"]),
        },
    )
    case = make_case(41)
    with link_for(settings) as link:
        central.register(link.device)
        assert link.queue is not None
        link.queue.enqueue(case.case_id, case.payload.to_bytes(), reason="uncertain")
        clock = FakeClock()  # from now: the case is due
        held = [hold(central, "idle") for _ in range(CAP)]
        with make_uploader(link, clock=clock) as uploader:
            refused = uploader.send_next()
            assert refused is not None and refused.outcome == "retry", refused
            assert refused.detail.startswith("transport_error: "), refused
            item = link.outbox.get(case.case_id)
            assert item is not None and item.state is OutboxState.PENDING, item
            assert item.quarantined_at is None
            for conn in held:
                conn.close()
            _healthy_again(central)
            clock.advance_past(item.next_attempt_at)
            delivered = uploader.send_next()
        assert delivered is not None and delivered.outcome == "delivered", delivered
    assert central.store.get_case(case.case_id) is not None


def test_metrics_show_open_connections_and_requests_in_progress(
    central: Central, hold: Callable[[Central, str], ssl.SSLSocket]
) -> None:
    hold(central, "upload")
    hold(central, "upload")

    lines = set(central.get("/metrics").text.splitlines())

    # The two uploads and the scrape itself.
    assert "triage_central_open_connections 3.0" in lines
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
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_APP_")}
    lines: list[str] = []
    limits = ""
    with subprocess.Popen(
        [sys.executable, "-c", script],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
        bufsize=0,
    ) as server:
        assert server.stderr is not None
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline and server.poll() is None:
                if not select.select([server.stderr], [], [], 0.5)[0]:
                    continue
                lines.append(server.stderr.readline().decode(errors="replace"))
                if "listening on" in lines[-1]:
                    limits = Path(f"/proc/{server.pid}/limits").read_text()
                    break
        finally:
            server.kill()
            server.wait()
    assert any("at most 1000 connections" in line for line in lines), lines
    soft_limit = re.search(r"^Max open files\s+(\d+)", limits, flags=re.MULTILINE)
    assert soft_limit is not None, limits
    assert int(soft_limit.group(1)) == expected
    assert any(f"raised from 256 to {expected}" in line for line in lines), lines
