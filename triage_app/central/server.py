"""Running the central API under uvicorn: in the foreground (``serve``) or in a thread.

Why we bind the listening socket ourselves: a port that is taken becomes one clear
``PortInUseError`` (exit 75: systemd tries again) instead of uvicorn's ``sys.exit``, and port 0
(tests, the demo) yields the real port before the first request. TLS is always on except for
the explicit loopback development flag, with TLS 1.2 as the floor. Shutdown is uvicorn's
graceful one (SIGINT/SIGTERM in the foreground, ``stop()`` for a thread): open requests finish,
the verdict worker stops after its current case, and the database is closed last.

Why connections are capped (``CentralConfig.max_connections``): every open connection holds a
file descriptor and TLS buffers, and after an outage a whole fleet reconnects at once. The app
enforces the cap (``app.ConnectionCap``): a connection is admitted by its first request if
fewer than the cap of admitted connections are open, and all its requests are served; a request
on a connection not admitted at the cap is answered 503 ``server_busy`` at once, with
``Retry-After``, and its connection closed (the device retries), instead of the server running
out of descriptors and failing for every device. ``GET /v1/health`` and ``GET /metrics`` are
always answered (health with ``"status": "busy"`` at the cap). ``make_server`` hands the app
uvicorn's set of open connections for that.

Under systemd (``Type=notify``) ``serve`` says ``READY=1`` once uvicorn serves, pings the
watchdog from the event loop and says ``STOPPING=1`` when it shuts down
(:class:`NotifyingServer`), as the device's services do (``headless``, ``metrics.sd_notify``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from types import FrameType, TracebackType
from typing import Self

import anyio
import anyio.to_thread
import uvicorn
from fastapi import FastAPI

from triage_app.central.app import CentralMetrics, ConnectionCap, create_app
from triage_app.central.config import DEFAULT_REQUEST_HEAD_TIMEOUT_S, CentralConfig
from triage_app.central.errors import PortInUseError
from triage_app.central.storage import CentralStore
from triage_app.errors import ConfigError
from triage_app.escalation.keys import ServerKeyRing
from triage_app.metrics import sd_notify, watchdog_interval_s

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 30
_START_TIMEOUT_S = 30.0
_CLOSE_GRACE_S = 1.0
#: Seconds an idle keep-alive connection stays open (see ``uvicorn_config``).
KEEP_ALIVE_TIMEOUT_S = 5
#: The least listen backlog, whatever the connection cap (see :func:`listen_backlog`).
MIN_BACKLOG = 128
#: File descriptors the server opens besides its connections: the store (SQLite, its journal),
#: keys, the model, logs, the event loop, TLS handshakes not yet counted as connections.
FD_HEADROOM = 256
#: Files an upload being stored holds open (image, small files, their folder).
FD_PER_UPLOAD = 4


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    """Stand-in handler while uvicorn owns shutdown (see :func:`serve`)."""


def load_key_ring(config: CentralConfig) -> ServerKeyRing:
    """The server's keys under ``<data>/central/keys/``, created on first run."""
    return ServerKeyRing.load_or_create(config.central_dir)


def open_store(config: CentralConfig) -> CentralStore:
    """The store a starting server serves from, rid of what a crash mid-delivery left in it
    (before anything listens: a delivery in progress would leave the same files)."""
    store = CentralStore.for_config(config)
    try:
        store.remove_crash_leftovers()
    except BaseException:
        store.close()
        raise
    return store


def bind_socket(host: str, port: int, *, backlog: int = MIN_BACKLOG) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0 = any free port), or a one-line error:
    :class:`PortInUseError` (temporary) for a port another process holds, ``ConfigError`` for
    anything else (an address not of this machine, a port below 1024 without the capability).

    uvicorn listens on it again with its own ``backlog`` when it starts: pass the same value
    (:func:`listen_backlog`).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        # The errno's own text: create_server's strerror repeats the address the line names.
        # A name lookup's failure has a negative code and no errno text of its own.
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror
        message = f"central: cannot listen on {host}:{port} ({reason})"
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(message) from None
        raise ConfigError(message) from None
    # Answers go out as two writes (headers, body); without TCP_NODELAY the second waits for
    # the client's delayed ACK, ~40 ms per answer. Linux hands the option to accepted sockets.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def listen_backlog(config: CentralConfig) -> int:
    """Connections the kernel may complete and queue before the server accepts them.

    Why as deep as the cap: after an outage the devices reconnect within a second or two, and
    a connection that finds the queue full has its SYN dropped, which the device sees as a
    network down (a connect timeout) rather than as an answer; accepted, it gets one at once
    (served, or 503 ``server_busy`` at the cap). The kernel shortens it to
    ``net.core.somaxconn`` (4096 by default since Linux 5.4); queued connections hold no file
    descriptor of ours.
    """
    return max(MIN_BACKLOG, config.max_connections)


def uvicorn_config(app: FastAPI, config: CentralConfig, *, graceful_s: int) -> uvicorn.Config:
    """uvicorn's settings for our app: TLS files, keep-alive and backlog for the connection cap,
    no access log, no logging setup of its own (the entry point configures logging)."""
    config.check_tls_files()
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        ssl_certfile=config.tls_cert,
        ssl_keyfile=config.tls_key,
        ssl_context_factory=_tls12_floor if config.uses_tls else None,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=graceful_s,
        server_header=False,
        # No limit_concurrency: the app enforces max_connections (app.ConnectionCap), because
        # uvicorn's own 503 (plain text, no Retry-After, a warning logged per request) refuses
        # health checks and scrapes too, and requests on connections it is serving already.
        # uvicorn accepts every connection; the app refuses a request on one it has not
        # admitted while max_connections admitted ones are open.
        #
        # Idle keep-alive connections count against the cap, so they are closed soon: 5 s
        # keeps a device's connection for the next case of a drain pass (no new TLS handshake)
        # but not across verdict polls, 15 s apart. Set here so that a change of uvicorn's
        # default cannot change it.
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT_S,
        backlog=listen_backlog(config),
        # The server terminates TLS itself and supports no reverse proxy, so the peer is the
        # client. With uvicorn's default (True) a request from 127.0.0.1 carrying
        # X-Forwarded-For would get that header's address as its scope["client"]: any local
        # process could pose as another host, and the connection cap, which knows a connection
        # by its client's address, would match it with no open connection and forget every
        # admitted one (unlimited connections served, the admitted gauge 0).
        proxy_headers=False,
    )


class NotifyingServer(uvicorn.Server):
    """uvicorn's server as a systemd ``Type=notify`` service (nothing is sent without
    ``$NOTIFY_SOCKET``).

    ``READY=1`` once uvicorn serves: the app's startup has run and the event loop accepts on
    the bound socket, so a unit ordered after this one finds the port answering. ``WATCHDOG=1``
    every half ``WatchdogSec=`` from a task on the event loop, and only after the app's
    ``serving`` check ran in a request thread and passed: a hung loop, request threads all
    stuck, a store that does not answer or a dead verdict worker stop the pings, and systemd
    restarts the server, not only one that exits. ``STOPPING=1`` as the graceful shutdown
    begins (systemd stops watching then).
    """

    _watchdog: asyncio.Task[None] | None = None
    serving: Callable[[], bool] = staticmethod(lambda: True)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        sd_notify("READY=1")
        interval_s = watchdog_interval_s()
        if interval_s is not None:
            self._watchdog = asyncio.create_task(_ping_watchdog(interval_s, self.serving))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        sd_notify("STOPPING=1")
        if self._watchdog is not None:
            self._watchdog.cancel()
            with suppress(asyncio.CancelledError):
                await self._watchdog
        await super().shutdown(sockets=sockets)


async def _ping_watchdog(interval_s: float, serving: Callable[[], bool]) -> None:
    """Half the interval, as the device services' loops turn: a ping is never older than that.

    ``serving`` runs where the sync endpoints run (anyio's default thread limiter): when every
    one of those threads is stuck, it waits too, and no ping goes out.
    """
    while True:
        with anyio.move_on_after(interval_s / 2):
            if await anyio.to_thread.run_sync(serving, abandon_on_cancel=True):
                sd_notify("WATCHDOG=1")
        await asyncio.sleep(interval_s / 2)


def make_server(
    app: FastAPI, config: CentralConfig, *, graceful_s: int, notify: bool = False
) -> uvicorn.Server:
    """uvicorn's server for our app: its open connections handed to the app's connection cap
    (the app alone does not see connections) and counted in its ``/metrics``; with ``notify``,
    one that tells systemd how it is (:class:`NotifyingServer`, for ``serve`` only)."""
    server_class = NotifyingServer if notify else uvicorn.Server
    server = server_class(uvicorn_config(app, config, graceful_s=graceful_s))
    serving = getattr(app.state, "serving", None)
    if isinstance(server, NotifyingServer) and serving is not None:
        server.serving = serving
    state = server.server_state
    cap = getattr(app.state, "connection_cap", None)
    if isinstance(cap, ConnectionCap):
        cap.watch(lambda: state.connections)
    metrics = getattr(app.state, "metrics", None)
    if isinstance(metrics, CentralMetrics):
        metrics.count_connections(lambda: len(state.connections), lambda: len(state.tasks))
    return server


def open_files_needed(config: CentralConfig) -> int:
    """The file descriptors a server with ``config`` may hold at its connection cap."""
    return config.max_connections + FD_PER_UPLOAD * config.max_parallel_uploads + FD_HEADROOM


def raise_open_file_limit(needed: int) -> None:
    """Raise this process's soft limit on open files to ``needed``, within its hard limit.

    Why: systemd and most shells start a process with a soft limit of 1024, fewer than the
    default cap of connections plus the server's own files; past it ``accept`` fails with "Too
    many open files", and so does every file the store opens, for every device. The soft limit
    is raised only as far as needed (descriptors above 1024 break ``select()``).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
            return
        log.info("open-file limit raised from %d to %d for the connection cap", soft, target)
    if target < needed:
        log.warning(
            "the server may need %d open files at its connection cap but may open only %d: "
            "lower --max-connections or raise the hard limit (LimitNOFILE=, ulimit -Hn)",
            needed,
            target,
        )


def _tls12_floor(_: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    context = default()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def serve(config: CentralConfig) -> None:
    """Run the central server in the foreground until SIGINT or SIGTERM.

    Loads (or creates) the key ring, opens the store (removing crash leftovers) and loads the
    central model before it listens, so every configuration error surfaces at once as a
    ``TriageError``. The key ring is read once: ``central keys --rotate`` or ``--prune-days``
    run meanwhile take effect at the next start. Under systemd it notifies readiness, the
    watchdog and its stop (:class:`NotifyingServer`).
    """
    config.check_tls_files()
    raise_open_file_limit(open_files_needed(config))
    key_ring = load_key_ring(config)
    # A retired key is kept as long as an envelope sealed to it can still be accepted: envelopes
    # older than the maximum queue age are refused as stale anyway.
    for key_id in key_ring.prune(config.max_envelope_age):
        log.info("retired server key %s pruned (older than the maximum queue age)", key_id)
    with open_store(config) as store:
        app = create_app(config, key_ring=key_ring, store=store)
        sock = bind_socket(config.host, config.port, backlog=listen_backlog(config))
        server = make_server(app, config, graceful_s=GRACEFUL_SHUTDOWN_S, notify=True)
        log.info(
            "central server %s listening on %s:%d (%s, at most %d connections)",
            key_ring.server_id,
            config.host,
            sock.getsockname()[1],
            "https" if config.uses_tls else "plain http",
            config.max_connections,
        )
        # uvicorn re-raises SIGINT/SIGTERM once it has shut down gracefully; with the default
        # handlers that would end the process before the store is closed. No-op handlers turn
        # the re-raise into a return, so the cleanup below runs and the exit code is 0.
        previous = {sig: signal.signal(sig, _ignore_signal) for sig in _STOP_SIGNALS}
        try:
            asyncio.run(
                run_server(server, sock, request_head_timeout_s=config.request_head_timeout_s)
            )
        finally:
            sock.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    log.info("central server stopped")


async def run_server(
    server: uvicorn.Server,
    sock: socket.socket,
    *,
    request_head_timeout_s: float = DEFAULT_REQUEST_HEAD_TIMEOUT_S,
) -> None:
    """uvicorn's ``serve`` on ``sock``, with idle TLS connections reaped once it stops and
    connections that take longer than ``request_head_timeout_s`` to send a request cut."""
    reapers = [
        asyncio.create_task(_reap_closed_connections(server)),
        asyncio.create_task(_cut_slow_request_heads(server, request_head_timeout_s)),
    ]
    try:
        await server.serve(sockets=[sock])
    finally:
        for reaper in reapers:
            reaper.cancel()
        for reaper in reapers:
            with suppress(asyncio.CancelledError):
                await reaper


async def _cut_slow_request_heads(server: uvicorn.Server, timeout_s: float) -> None:
    """Abort a connection that has waited ``timeout_s`` for a complete request head.

    Why: uvicorn times a connection out only after a response (keep-alive). One that opens and
    sends nothing, or a head a byte at a time, would hold its socket for ever, and enough of
    them would exhaust the server's file descriptors (a body that stalls has its own limit, in
    ``upload_stream``). This reads uvicorn's per-connection state; where that is missing it
    does nothing (``tests/central/test_server.py`` then fails).
    """
    loop = asyncio.get_running_loop()
    waiting_since: dict[int, float] = {}
    while True:
        await asyncio.sleep(min(1.0, timeout_s / 4))
        now = loop.time()
        waiting = [c for c in list(server.server_state.connections) if _waits_for_head(c)]
        waiting_since = {id(c): waiting_since.get(id(c), now) for c in waiting}
        for connection in waiting:
            transport = getattr(connection, "transport", None)
            if now - waiting_since[id(connection)] < timeout_s:
                continue
            if isinstance(transport, asyncio.Transport) and not transport.is_closing():
                log.info("closed a connection that sent no whole request in %g s", timeout_s)
                transport.abort()


def _waits_for_head(connection: object) -> bool:
    """Whether uvicorn's connection waits for a request head with no timer of its own."""
    if getattr(connection, "timeout_keep_alive_task", True) is not None:
        return False  # uvicorn's keep-alive timer runs (or this is not its HTTP/1.1 protocol)
    cycle = getattr(connection, "cycle", False)
    return cycle is None or getattr(cycle, "response_complete", False) is True


async def _reap_closed_connections(server: uvicorn.Server) -> None:
    """Abort connections the server closed but whose TLS shutdown still waits for the client.

    Why: on shutdown uvicorn closes idle keep-alive connections, and a TLS close waits for the
    client's close_notify, which a client holding a pooled connection never sends; the graceful
    shutdown would then wait its full timeout. Requests in progress are not touched (their
    transports are not closing), and a closed one gets a grace period to flush its last bytes.
    """
    loop = asyncio.get_running_loop()
    closing_since: dict[int, float] = {}
    while True:
        await asyncio.sleep(0.2)
        if not server.should_exit:
            continue
        now = loop.time()
        for connection in list(server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if not isinstance(transport, asyncio.Transport) or not transport.is_closing():
                continue
            if now - closing_since.setdefault(id(connection), now) >= _CLOSE_GRACE_S:
                # Python 3.11.2 (Debian 12's) raises AttributeError aborting an SSL transport
                # whose protocol is already detached; it is closed then, which is all we want.
                with suppress(AttributeError):
                    transport.abort()


class ServerThread:
    """The real server under uvicorn in a background thread, for tests and the demo.

    ``start()`` returns the bound port (``config.port`` 0 picks a free one). A key ring or store
    passed in stays the caller's (and is not cleaned of crash leftovers); otherwise they are
    loaded from ``config`` and the store is closed by ``stop()``. Signal handlers are left alone
    (uvicorn installs none off the main thread).
    """

    def __init__(
        self,
        config: CentralConfig,
        *,
        key_ring: ServerKeyRing | None = None,
        store: CentralStore | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.config = config
        self.key_ring = key_ring if key_ring is not None else load_key_ring(config)
        self._owns_store = store is None
        self.store = store if store is not None else open_store(config)
        self.app = create_app(config, key_ring=self.key_ring, store=self.store, now=now)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``https://127.0.0.1:41234``."""
        if self.port is None:
            raise RuntimeError("the server is not started")
        scheme = "https" if self.config.uses_tls else "http"
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{scheme}://{host}:{self.port}"

    def start(self, timeout_s: float = _START_TIMEOUT_S) -> int:
        """Start serving and return the port once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the server is already started")
        sock = bind_socket(self.config.host, self.config.port, backlog=listen_backlog(self.config))
        port: int = sock.getsockname()[1]
        server = make_server(self.app, self.config, graceful_s=5)
        self._server = server
        self._thread = threading.Thread(
            target=self._run, args=(server, sock), name=f"central-server-{port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() >= deadline:
                self.stop()
                raise ConfigError(
                    f"central: the server on port {port} did not start"
                    + (f" ({self._error})" if self._error else "")
                )
            time.sleep(0.01)
        self.port = port
        log.info("central server thread listening on %s:%d", self.config.host, port)
        return port

    def _run(self, server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            head_timeout_s = self.config.request_head_timeout_s
            asyncio.run(run_server(server, sock, request_head_timeout_s=head_timeout_s))
        except SystemExit as exc:
            # uvicorn exits this way when the app's startup fails; start() reports it.
            self._error = exc
        finally:
            sock.close()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Shut down gracefully (requests in progress finish), then close the store if ours."""
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(timeout_s)
            if thread.is_alive():
                log.error("central server thread did not stop within %.0f s", timeout_s)
        self.port = None
        if self._owns_store:
            self.store.close()
            self._owns_store = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
