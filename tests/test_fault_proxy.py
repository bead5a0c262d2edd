"""The fault-injection proxy itself: each mode does what the transport tests rely on.

If the proxy silently forwarded in "blackhole" or cut at the wrong byte, the transport tests
would pass for the wrong reason; these tests pin its behaviour down against a plain TCP echo
server, without HTTP or TLS in the way.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.fault_proxy import FaultProxy


class _EchoHandler(socketserver.BaseRequestHandler):
    server: EchoServer

    def handle(self) -> None:
        with self.server.lock:
            self.server.accepted += 1
        self.request.settimeout(5.0)
        while True:
            try:
                data = self.request.recv(65536)
                if not data:
                    return
                with self.server.lock:
                    self.server.received += data
                self.request.sendall(data)
            except OSError:
                return


class EchoServer(socketserver.ThreadingTCPServer):
    """Echoes every byte back and records what arrived, so tests can see what was forwarded."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.lock = threading.Lock()
        self.received = b""
        self.accepted = 0

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.port) as fault_proxy:
        yield fault_proxy
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("fault-proxy")]
    assert not leaked


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def connect(port: int, timeout: float = 3.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def assert_dropped(sock: socket.socket) -> None:
    """The peer went away: an orderly EOF or a reset, but no data."""
    try:
        data = sock.recv(100)
    except ConnectionResetError:
        data = b""
    assert data == b""


def test_pass_forwards_both_ways_and_counts(proxy: FaultProxy, echo: EchoServer) -> None:
    payload = b"x" * 200_000
    with connect(proxy.port) as sock:
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
    wait_until(lambda: proxy.bytes_down == len(payload))
    stats = proxy.stats()
    assert (stats.connections, stats.bytes_up, stats.bytes_down) == (1, len(payload), len(payload))
    assert echo.received == payload


def test_refuse_closes_the_port_and_reopens_it(proxy: FaultProxy) -> None:
    port = proxy.port
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        connect(port).close()
    proxy.pass_through()
    assert proxy.port == port
    with connect(port) as sock:
        sock.sendall(b"back")
        assert recv_exactly(sock, 4) == b"back"


def test_reset_sends_rst(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.reset()
    # Under load the RST can even beat connect() back to the caller.
    with pytest.raises(ConnectionResetError), connect(proxy.port) as sock:
        sock.recv(10)
    assert proxy.stats().resets == 1
    assert echo.accepted == 0


def test_blackhole_accepts_but_never_answers(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.blackhole()
    with connect(proxy.port, timeout=0.3) as sock:
        sock.sendall(b"anyone there?")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            sock.recv(10)
        assert time.monotonic() - started >= 0.25
    wait_until(lambda: proxy.stats().bytes_discarded == 13)
    assert echo.accepted == 0
    assert proxy.bytes_up == 0


def test_cut_after_forwards_exactly_n_bytes_then_drops(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.cut_after(10)
    with connect(proxy.port) as sock:
        sock.sendall(b"0123456789abcdefghij" * 5)
        assert_dropped(sock)
    wait_until(lambda: echo.received == b"0123456789")
    assert proxy.bytes_up == 10
    assert proxy.bytes_down == 0


def test_cut_after_counts_across_chunks(proxy: FaultProxy, echo: EchoServer) -> None:
    proxy.cut_after(7)
    with connect(proxy.port) as sock:
        sock.sendall(b"abcd")
        assert recv_exactly(sock, 4) == b"abcd"
        sock.sendall(b"efgh")
        assert_dropped(sock)
    wait_until(lambda: echo.received == b"abcdefg")


def test_delay_slows_each_chunk(proxy: FaultProxy) -> None:
    proxy.delay(0.2)
    with connect(proxy.port) as sock:
        started = time.monotonic()
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        # One chunk up, one chunk down, each delayed.
        assert time.monotonic() - started >= 0.4


def test_a_switch_affects_only_new_connections(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy.port) as old:
        # The kernel completes a connect before the proxy accepts it: wait for the accept.
        wait_until(lambda: proxy.connections == 1)
        proxy.blackhole()
        old.sendall(b"still")
        assert recv_exactly(old, 5) == b"still"
        with connect(proxy.port, timeout=0.2) as new:
            new.sendall(b"lost")
            with pytest.raises(TimeoutError):
                new.recv(4)
    assert proxy.connections == 2


def test_kill_connections_breaks_established_ones(proxy: FaultProxy) -> None:
    with connect(proxy.port) as sock:
        sock.sendall(b"a")
        assert recv_exactly(sock, 1) == b"a"
        proxy.kill_connections()
        assert_dropped(sock)


def test_an_unreachable_target_resets_the_client() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        dead_port = placeholder.getsockname()[1]
    with (
        FaultProxy("127.0.0.1", dead_port) as proxy,
        pytest.raises(ConnectionResetError),
        connect(proxy.port) as sock,
    ):
        sock.recv(1)


def test_close_joins_every_thread_even_with_open_connections(echo: EchoServer) -> None:
    proxy = FaultProxy("127.0.0.1", echo.port)
    proxy.start()
    with connect(proxy.port) as passing:
        passing.sendall(b"x")
        assert recv_exactly(passing, 1) == b"x"
        proxy.blackhole()
        with connect(proxy.port) as silent:
            silent.sendall(b"y")
            wait_until(lambda: proxy.connections == 2)
            started = time.monotonic()
            proxy.close()
            assert time.monotonic() - started < 2
    assert [t.name for t in threading.enumerate() if t.name.startswith("fault-proxy")] == []
    with pytest.raises(RuntimeError):
        proxy.pass_through()
