"""A TCP proxy for tests that injects network faults between a client and a real server.

The uploader's promises (never hang, never lose a case, retry the right things) are about what
happens when the network misbehaves, which mocks cannot show: a real socket must be refused,
reset, left silent or cut in the middle of an upload. ``FaultProxy`` listens on an ephemeral
loopback port, forwards to ``target_host:target_port`` and can be switched at runtime between:

- ``pass_through()``: forward both ways (the default);
- ``refuse()``: close the listening socket, so connects are refused; any other mode reopens it
  on the same port;
- ``reset()``: accept, then close at once with a TCP RST (``SO_LINGER`` 0);
- ``blackhole()``: accept, read and discard, never connect upstream or answer (read timeouts);
- ``cut_after(n)``: forward ``n`` bytes client→server on each connection, then reset both
  sides (a drop in the middle of an upload);
- ``delay(seconds)``: forward, sleeping before each chunk in either direction.

A connection keeps the mode it was accepted in; a switch affects the next connections (HTTP
clients reuse pooled connections: ``kill_connections()`` breaks those). The
proxy is TLS-agnostic (it moves bytes), so HTTPS clients still do their handshake with the real
server. ``close()`` stops every thread and joins it; it raises if one does not stop, so a test
cannot leak threads unnoticed.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from types import TracebackType

_POLL_S = 0.02
_CHUNK = 64 * 1024
_JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ProxyMode:
    """``name`` is one of pass, refuse, reset, blackhole, cut_after, delay."""

    name: str
    n_bytes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class ProxyStats:
    connections: int
    bytes_up: int
    bytes_down: int
    bytes_discarded: int
    resets: int


def _abort(sock: socket.socket) -> None:
    """Close with RST instead of FIN: the peer sees ECONNRESET, as on a dropped link."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        # _lock guards mode, counters and the thread/socket registries; _listener_lock guards the
        # listening socket, which the accept loop polls while holding it.
        self._lock = threading.Lock()
        self._listener_lock = threading.Lock()
        self._stop = threading.Event()
        self._mode = ProxyMode("pass")
        self._listener: socket.socket | None = self._listen(0)
        self.port: int = self._listener.getsockname()[1]
        self._accept_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._live: set[socket.socket] = set()
        self._connections = 0
        self._bytes_up = 0
        self._bytes_down = 0
        self._bytes_discarded = 0
        self._resets = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        if self._accept_thread is not None:
            return
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"fault-proxy-{self.port}", daemon=True
        )
        self._accept_thread.start()

    def close(self) -> None:
        """Stop accepting, interrupt every connection and join every thread."""
        self._stop.set()
        with self._listener_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        threads: list[threading.Thread] = []
        if self._accept_thread is not None:
            # Joined first: once it is gone no new connection thread can appear.
            self._accept_thread.join(_JOIN_TIMEOUT_S)
            threads.append(self._accept_thread)
        self.kill_connections()
        with self._lock:
            threads += self._threads
        for thread in threads:
            thread.join(_JOIN_TIMEOUT_S)
        alive = [thread.name for thread in threads if thread.is_alive()]
        if alive:
            raise RuntimeError(f"fault proxy threads did not stop: {alive}")

    # --- modes -------------------------------------------------------------------------------

    @property
    def mode(self) -> ProxyMode:
        with self._lock:
            return self._mode

    def pass_through(self) -> None:
        self._set_mode(ProxyMode("pass"))

    def refuse(self) -> None:
        self._set_mode(ProxyMode("refuse"))

    def reset(self) -> None:
        self._set_mode(ProxyMode("reset"))

    def blackhole(self) -> None:
        self._set_mode(ProxyMode("blackhole"))

    def cut_after(self, n_bytes: int) -> None:
        if n_bytes < 0:
            raise ValueError("n_bytes must be >= 0")
        self._set_mode(ProxyMode("cut_after", n_bytes=n_bytes))

    def delay(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        self._set_mode(ProxyMode("delay", seconds=seconds))

    def _set_mode(self, mode: ProxyMode) -> None:
        if self._stop.is_set():
            raise RuntimeError("the proxy is closed")
        # Mode first: a connection accepted before a refuse() takes effect is reset, not served.
        with self._lock:
            self._mode = mode
        with self._listener_lock:
            if mode.name == "refuse":
                if self._listener is not None:
                    self._listener.close()
                    self._listener = None
            elif self._listener is None:
                self._listener = self._listen(self.port)

    def kill_connections(self) -> None:
        """Break every open connection (pooled keep-alive ones too), as a link loss would."""
        with self._lock:
            for sock in self._live:
                # shutdown, not close: it wakes the owning thread, which closes its own sockets.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    # --- counters ----------------------------------------------------------------------------

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(
                self._connections,
                self._bytes_up,
                self._bytes_down,
                self._bytes_discarded,
                self._resets,
            )

    @property
    def connections(self) -> int:
        return self.stats().connections

    @property
    def bytes_up(self) -> int:
        """Bytes forwarded client → server."""
        return self.stats().bytes_up

    @property
    def bytes_down(self) -> int:
        """Bytes forwarded server → client."""
        return self.stats().bytes_down

    # --- internals ---------------------------------------------------------------------------

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(32)
        except OSError:
            listener.close()
            raise
        return listener

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            accepted: socket.socket | None = None
            with self._listener_lock:
                listener = self._listener
                if listener is not None:
                    # Polled under the lock so refuse()/close() never close it mid-select.
                    ready, _, _ = select.select([listener], [], [], _POLL_S)
                    if ready:
                        try:
                            accepted, _ = listener.accept()
                        except OSError:
                            accepted = None
            if accepted is not None:
                self._spawn(accepted)
            elif listener is None:
                self._stop.wait(_POLL_S)

    def _spawn(self, accepted: socket.socket) -> None:
        with self._lock:
            self._connections += 1
            mode = self._mode
            self._live.add(accepted)
            thread = threading.Thread(
                target=self._serve,
                args=(accepted, mode),
                name=f"fault-proxy-{self.port}-conn{self._connections}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()

    def _forget(self, *socks: socket.socket) -> None:
        with self._lock:
            for sock in socks:
                self._live.discard(sock)

    def _serve(self, client: socket.socket, mode: ProxyMode) -> None:
        client.setblocking(True)
        try:
            if mode.name in ("reset", "refuse"):
                with self._lock:
                    self._resets += 1
                self._forget(client)
                _abort(client)
                return
            if mode.name == "blackhole":
                self._swallow(client)
                return
            self._forward(client, mode)
        finally:
            self._forget(client)
            client.close()

    def _swallow(self, client: socket.socket) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([client], [], [], _POLL_S)
            if not ready:
                continue
            try:
                data = client.recv(_CHUNK)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self._bytes_discarded += len(data)

    def _forward(self, client: socket.socket, mode: ProxyMode) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=2.0)
        except OSError:
            self._forget(client)
            _abort(client)
            return
        with self._lock:
            if self._stop.is_set():
                upstream.close()
                return
            self._live.add(upstream)
        try:
            self._pump(client, upstream, mode)
        finally:
            self._forget(upstream)
            upstream.close()

    def _pump(self, client: socket.socket, upstream: socket.socket, mode: ProxyMode) -> None:
        # Socket timeouts bound sendall() when a peer stops reading; close() interrupts too.
        client.settimeout(5.0)
        upstream.settimeout(5.0)
        budget = mode.n_bytes if mode.name == "cut_after" else None
        open_from = {client, upstream}
        while open_from and not self._stop.is_set():
            ready, _, _ = select.select(list(open_from), [], [], _POLL_S)
            for source in ready:
                sink = upstream if source is client else client
                try:
                    data = source.recv(_CHUNK)
                except OSError:
                    return
                if not data:
                    open_from.discard(source)
                    try:
                        sink.shutdown(socket.SHUT_WR)
                    except OSError:
                        return
                    continue
                if source is client and budget is not None and len(data) >= budget:
                    self._cut(client, upstream, data[:budget])
                    return
                if mode.name == "delay" and mode.seconds > 0:
                    self._stop.wait(mode.seconds)
                try:
                    sink.sendall(data)
                except OSError:
                    return
                with self._lock:
                    if source is client:
                        self._bytes_up += len(data)
                    else:
                        self._bytes_down += len(data)
                if source is client and budget is not None:
                    budget -= len(data)

    def _cut(self, client: socket.socket, upstream: socket.socket, last: bytes) -> None:
        try:
            upstream.sendall(last)
        except OSError:
            pass
        else:
            with self._lock:
                self._bytes_up += len(last)
        with self._lock:
            self._resets += 1
        self._forget(client, upstream)
        # Give the server a moment to read the last bytes before the RST discards them.
        time.sleep(0.05)
        _abort(upstream)
        _abort(client)
