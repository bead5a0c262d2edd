"""Escalation figures: upload cost, durable enqueue rate, recovery time and bytes sent.

Why this exists: the escalation issue asks for four figures, two of them with targets, and a
number measured on another day or machine proves nothing. This script measures all four in one
run, on loopback (127.0.0.1), with the real parts: the central server under uvicorn
(``ServerThread``, no central model) in a process of its own (``ServerProcess``: as on a network,
it shares neither the GIL nor the CPU time of the device's Python), real TLS with a self-signed
certificate the device pins (``make_self_signed``), real SQLite files (WAL, ``synchronous=FULL``)
and real spool files.

What it measures:

1. **A 20 MB case, sealed + uploaded + receipt-verified, against a plain HTTPS PUT of the same
   bytes** (target: ours <= 1.5x the PUT), the steps the issue names: ``seal_bytes`` (which
   hashes the payload for the signed header) and ``Uploader.send_next`` (claim, map the spool
   file and check its header, signature and chunk lengths, POST, the server's header check,
   decryption, hashing and writing as the body arrives, fsyncs and commit, receipt verification,
   delivered). Between the two the device queues the envelope durably (``Outbox.enqueue``: file
   written, hashed, fsynced and renamed, row committed); that step is timed apart and shown with
   the total and ratio including it (the PUT's client keeps no durable copy to compare it
   with). The payload is a ~20 MB DICOM-looking body (128-byte preamble, ``DICM``, random
   bytes: the server runs no model, it only stores it) behind a small result JSON. The
   baseline sends the same payload bytes with a session from ``make_session`` (same pinned
   TLS) as a ``PUT`` to a minimal FastAPI app of this file, in a process of its own, run with
   the same uvicorn settings and certificate (``uvicorn_config``), that writes the body to a
   temporary file as it arrives (streamed, as ours), then fsync, rename, folder fsync, before it
   answers 201. So the ratio is what our protocol adds on top of "send it and make it durable
   once". The simplest handler (whole body in memory, then the durable write) is measured too,
   for comparison: it is the weaker baseline on a bad day. One untimed warm-up round first
   (connections, caches), then ``--repeat`` rounds, ours and the two PUTs taking turns going
   first; medians and minima (``--upload-only`` runs this figure alone).
   Below it, each step of ours is timed alone on the same bytes (median of ``--repeat``): where
   the time goes.
2. **Durable enqueues per second**: ``Outbox.enqueue`` of 200 sealed envelopes (40 with
   ``--quick``) of 50 kB each into a fresh outbox, as shipped (``synchronous=FULL``, fsync of
   the file and of the folder). For scale, the same with the file fsyncs switched off
   (``os.fsync`` replaced by a no-op for the loop) and with every fsync off (also ``PRAGMA
   synchronous=OFF``): the ceiling without durability, never a product setting.
3. **Time from link restored to delivery** (target: <= 10 s): the product's
   ``BackgroundUploader`` talks to the server through a TCP proxy of this file that can drop
   the link (refuse new connections with a reset, cut the open ones). Per trial: link down,
   queue 3 cases of 1 MB, let the uploader fail, restore, and read the outbox's
   ``delivered_at`` for the first and the last case. Two kinds of outage, 3 trials each (1
   with ``--quick``; ``--repeat`` is for section 1): *short*, restored once every case has
   failed 3 times (its next try drawn from up to 4 s, some from up to 8 s) at a random point of
   the probe cycle; *long*, restored once every case has failed 5 times and still has at least
   8 s of backoff to wait, longer than a probe cycle, so the probe is what brings them back.
   While offline the uploader probes ``/v1/health`` every ``probe_s`` (5 s) and makes every
   waiting case due when it answers. ``backoff left`` is how long the cases would still have
   waited for their own backoff at the restore (shortest-longest); ``probe answered`` is when
   the first probe after the restore answered ("none": a case's own retry got through first;
   the uploader then counts itself online and stops probing, so the other cases wait out their
   own backoff). The probes are watched by wrapping ``Uploader.probe``, not changed.
4. **Share of bytes uploaded against sending every image**: a hold-out set of synthetic phantoms
   (``--seed`` 4242, the model card's test seed, never used in training or calibration; written
   as files first) through ``triage_and_record`` with the shipped model (``chest-dx-demo``) and
   its default thresholds, escalations sealed into the outbox, then the queue drained to the
   server. Reported: images, escalated and queued cases, bytes of every input file, bytes of the
   queued envelopes (what goes over the network, HTTP headers aside), their share, and the
   envelope's overhead over the de-identified payload it carries. Cases the PHI gate blocks
   are never sent; their input bytes are listed apart.

How to read it: medians and ratios are comparable only within one run (same machine, same load);
the verdict lines compare them with the issue's targets and assert nothing. Section 1's "server"
column is the server's own time for the request (its request-duration metric for ours, the
handler's clock for the PUT), so "total - server" is the client and the wire. fsync costs
depend on the disk and on what else writes to it, so section 1 varies from run to run on a
shared machine: read the min column too. Both servers listen on ``bind_socket``'s socket
(``TCP_NODELAY`` set: without it an answer written as headers and body waits ~40 ms for the
client's delayed ACK).

Run from the repository root: ``.venv/bin/python benchmarks/escalation_figures.py [--repeat 5]
[--out DIR] [--quick] [--keep] [--upload-only]``; ``--quick`` shrinks every size for a smoke run,
``--upload-only`` measures figure 1 alone (a quick way to compare changes to the upload path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import platform
import random
import re
import secrets
import shutil
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from unittest import mock

import requests
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client.parser import text_string_to_metric_families
from report import save_report
from starlette.concurrency import run_in_threadpool

from triage_app.batch import triage_and_record
from triage_app.central.certificates import ServerCertificate, make_self_signed
from triage_app.central.config import CentralConfig
from triage_app.central.server import (
    ServerThread,
    bind_socket,
    load_key_ring,
    run_server,
    uvicorn_config,
)
from triage_app.central.storage import (
    DICOM_FILE,
    RESULT_FILE,
    SIGNED_HEADER_FILE,
    CentralStore,
    StagedFiles,
)
from triage_app.config import Settings
from triage_app.escalation.background import BackgroundUploader
from triage_app.escalation.envelope import (
    DEFAULT_CHUNK_SIZE,
    BytesLike,
    EnvelopeStream,
    Payload,
    check_sealed,
    open_envelope,
    read_header,
    seal_bytes,
    verify_header,
)
from triage_app.escalation.keys import (
    ServerKeyRing,
    ServerPublicKey,
    load_or_create_device_identity,
)
from triage_app.escalation.outbox import OutboxItem, OutboxState
from triage_app.escalation.service import EscalationLink, open_escalation, open_outbox
from triage_app.escalation.transport import TransportConfig, make_session
from triage_app.escalation.uploader import Uploader, UploaderConfig
from triage_app.logs import configure_logging
from triage_app.paths import write_private_file
from triage_app.results import BLOCKED, HELD, QUEUED, CaseResult
from triage_app.synthetic import write_phantom_set

MB = 1_000_000
POST_ROUTE = "/v1/cases/{case_id}"
DEFAULT_HOLDOUT_SEED = 4242  # the model card's test seed: never used in training or calibration
RATIO_TARGET = 1.5
RECOVERY_TARGET_S = 10.0
LINK_CASES = 3
LINK_CASE_BYTES = 1 * MB
ENQUEUE_ENVELOPE_BYTES = 50_000
WAIT_TIMEOUT_S = 120.0
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")
HANDLER_SECONDS = "X-Handler-Seconds"

log = logging.getLogger("escalation_figures")


@dataclass(frozen=True)
class Sizes:
    """What a run measures; ``--quick`` shrinks everything."""

    case_bytes: int
    repeat: int
    enqueues: int
    link_trials: int
    images: int


# --------------------------------------------------------------------------------------------
# Small helpers


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mb(n: int) -> str:
    return f"{n / MB:.1f} MB"


def _table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    indent: str = "  ",
    align: str | None = None,
) -> list[str]:
    """A text table, a rule under the header; ``align`` is "l"/"r" per column (default: the
    first column left, the others right)."""
    cells = [list(header), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    sides = align or "l" + "r" * (len(header) - 1)

    def line(row: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if side == "l" else c.rjust(w)
            for c, w, side in zip(row, widths, sides, strict=True)
        ]
        return (indent + "  ".join(parts)).rstrip()

    return [line(cells[0]), indent + "  ".join("-" * w for w in widths), *map(line, cells[1:])]


def _wait_until(predicate: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.01)


def _case_id() -> str:
    return secrets.token_hex(32)


def make_payload(dicom_bytes: int, rng: random.Random) -> bytes:
    """A payload as the pipeline makes one: result JSON, then a DICOM-looking file."""
    result = {
        "case_id": "0" * 64,
        "decision": "escalate",
        "reason": "uncertain",
        "score": 0.5,
        "model": {"name": "chest-dx-demo", "version": "1.0.0", "sha256": "0" * 64},
        "image": {"rows": 3000, "columns": 3000, "transfer_syntax": "1.2.840.10008.1.2.1"},
    }
    dicom = bytes(128) + b"DICM" + rng.randbytes(max(0, dicom_bytes - 132))
    result_json = json.dumps(result, sort_keys=True).encode("utf-8")
    return Payload(result_json=result_json, dicom=dicom).to_bytes()


def tls_description(port: int) -> str:
    """The TLS version and cipher the server negotiates on loopback (for the header line)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only asks what is negotiated; the device pins
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        cipher = tls.cipher()
        return f"{tls.version()} {cipher[0] if cipher else '?'}"


# --------------------------------------------------------------------------------------------
# The baseline: a plain durable PUT under the same uvicorn settings


def durable_write(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename, folder fsync: a durable write, nothing more."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    _publish(tmp, path)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _publish(tmp: Path, path: Path) -> None:
    tmp.replace(path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def make_plain_put_app(folder: Path) -> FastAPI:
    """``PUT /blobs/{name}``: write the body to a temporary file as it arrives, then fsync,
    rename and fsync the folder, and answer 201 with a small JSON and the handler's own time in
    ``X-Handler-Seconds``. Streamed like ours (and like any web server with a large body), so
    the baseline neither holds 20 MB in memory nor waits for the whole body before writing."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.put("/blobs/{name}")
    async def put_blob(name: str, request: Request) -> Response:
        if not _BLOB_NAME.fullmatch(name):
            return JSONResponse({"error": "bad name"}, status_code=400)
        started = time.perf_counter()
        path = folder / name
        tmp = path.with_name(f".{name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        size = 0
        try:
            async for piece in request.stream():
                _write_all(fd, piece)  # into the page cache: microseconds a piece
                size += len(piece)
            await run_in_threadpool(os.fsync, fd)
        finally:
            os.close(fd)
        await run_in_threadpool(_publish, tmp, path)
        return _created(name, size, started)

    @app.put("/buffered/{name}")
    async def put_buffered(name: str, request: Request) -> Response:
        """The simplest handler: the whole body in memory, then the durable write."""
        if not _BLOB_NAME.fullmatch(name):
            return JSONResponse({"error": "bad name"}, status_code=400)
        started = time.perf_counter()
        body = await request.body()
        await run_in_threadpool(durable_write, folder / name, body)
        return _created(name, len(body), started)

    return app


def _created(name: str, size: int, started: float) -> Response:
    took = time.perf_counter() - started
    return JSONResponse(
        {"name": name, "bytes": size}, status_code=201, headers={HANDLER_SECONDS: f"{took:.6f}"}
    )


def _serve_plain_put(folder: Path, certificate: ServerCertificate, conn: Connection) -> None:
    """The baseline server's process: the PUT app under uvicorn, configured as the central
    server is; sends its port, serves until told to stop."""
    config = CentralConfig(
        data_dir=folder, port=0, tls_cert=certificate.cert, tls_key=certificate.key
    )
    server = uvicorn.Server(uvicorn_config(make_plain_put_app(folder), config, graceful_s=5))
    sock = bind_socket("127.0.0.1", 0)
    thread = threading.Thread(
        target=lambda: asyncio.run(run_server(server, sock)), name="plain-put", daemon=True
    )
    thread.start()
    _wait_until(lambda: bool(server.started), "the plain PUT server", 30.0)
    conn.send(sock.getsockname()[1])
    conn.recv()  # stop
    server.should_exit = True
    thread.join(15.0)
    sock.close()


def _serve_central(config: CentralConfig, conn: Connection) -> None:
    """The central server's process: ``ServerThread`` (no model); sends its port, serves until
    told to stop."""
    configure_logging(logging.WARNING)
    server = ServerThread(config)
    conn.send(server.start())
    conn.recv()  # stop
    server.stop()


class ServerProcess:
    """A server in a process of its own, as on a real network: the device's Python does not
    share its GIL (and CPU time) with the server's, as it would with a server thread."""

    def __init__(self, name: str, target: Callable[..., None], *args: object) -> None:
        context = multiprocessing.get_context("spawn")  # no forked copy of this process's threads
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=target, args=(*args, child_conn), name=name, daemon=True
        )
        self.name = name
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._process.start()
        if not self._conn.poll(60.0):
            raise RuntimeError(f"{self.name} did not start within 60 s")
        self.port = int(self._conn.recv())

    def cpu_seconds(self) -> float | None:
        """CPU time the server's process has used so far (:func:`process_cpu_seconds`)."""
        return process_cpu_seconds(self._process.pid)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self._process.join(20.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5.0)


def process_cpu_seconds(pid: int | None) -> float | None:
    """CPU time ``pid`` has used so far, every thread it ever ran included (Linux's CPU clock
    of another process, ``clock_gettime(((~pid) << 3) | 2)``, in ns: far finer than
    ``/proc/PID/stat``'s ticks of 10 ms, and unlike summing ``/proc/PID/task/*`` it keeps the
    time of threads that ended, such as the server's fsync helpers); None where unavailable."""
    if pid is None:
        return None
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        return None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity; ``os.cpu_count`` counts them all)."""
    return len(os.sched_getaffinity(0))


def _cpu_spent(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


# --------------------------------------------------------------------------------------------
# A link that can be dropped


def _cut(sock: socket.socket) -> None:
    """Shut down (wakes a thread blocked in recv) and close."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a refused or dropped connection looks to the client."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class LinkProxy:
    """A TCP forwarder 127.0.0.1:port -> the server, with a switch.

    Down: new connections are accepted and reset at once, open ones are cut (the device sees
    connection errors, as on a dropped link). Up: bytes are copied both ways.
    """

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._up = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._pumps: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="link-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._acceptor.start()

    def set_link(self, up: bool) -> None:
        if up:
            self._up.set()
            return
        with self._lock:
            self._up.clear()
            doomed = list(self._open)
            self._open.clear()
        for sock in doomed:
            _cut(sock)

    def close(self) -> None:
        self._closed.set()
        self.set_link(False)
        self._acceptor.join(5.0)
        self._listener.close()
        for pump in self._pumps:
            pump.join(5.0)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._up.is_set():
                _reset(conn)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                _reset(conn)
                continue
            conn.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                if not self._up.is_set():  # dropped in the meantime
                    _reset(conn)
                    upstream.close()
                    continue
                self._open.update((conn, upstream))
            for src, dst in ((conn, upstream), (upstream, conn)):
                pump = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                pump.start()
                self._pumps.append(pump)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass  # cut, reset or closed by the other pump: the connection is over
        finally:
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            _cut(src)
            _cut(dst)


# --------------------------------------------------------------------------------------------
# The loopback world: one central server, devices registered with it


@dataclass
class World:
    """The central server in its own process, with what the benchmark needs of it here: its
    key ring (loaded from its data folder) and store (device registry, as ``central
    add-device`` writes it), and a pinned session to scrape its ``/metrics``."""

    work: Path
    certificate: ServerCertificate
    central: ServerProcess
    key_ring: ServerKeyRing
    store: CentralStore
    scraper: requests.Session

    def device_settings(
        self, data_dir: Path, *, url: str | None = None, **extra: object
    ) -> Settings:
        """A device registered with the server, pinning its certificate and knowing its keys
        (as an admin would paste them, so no key fetch gets into the timings)."""
        device = load_or_create_device_identity(data_dir)
        self.store.registry.add_device(device.public_key_b64(), f"bench {data_dir.name}")
        info = self.key_ring.public_info()
        values: dict[str, object] = {
            "paths.data_dir": data_dir,
            "escalation.central_url": url or self.central.url,
            "escalation.tls_pin": self.certificate.sha256,
            "escalation.server_public_key": str(info["server_public_key"]),
            "escalation.receipt_public_key": str(info["receipt_public_key"]),
        }
        values.update(extra)
        return Settings(values)

    def server_post_seconds(self) -> float:
        """Sum of the server's own durations of ``POST /v1/cases/{case_id}`` so far, read from
        its ``/metrics`` (call it outside the timed steps)."""
        answer = self.scraper.get(f"{self.central.url}/metrics", timeout=(5.0, 30.0))
        answer.raise_for_status()
        for family in text_string_to_metric_families(answer.text):
            for sample in family.samples:
                if sample.name == "triage_central_request_seconds_sum" and sample.labels == {
                    "method": "POST",
                    "route": POST_ROUTE,
                }:
                    return float(sample.value)
        return 0.0


def _link(settings: Settings) -> EscalationLink:
    link = open_escalation(settings)
    if link is None or link.keys is None:
        raise RuntimeError("the device has no central server configured")
    return link


# --------------------------------------------------------------------------------------------
# 1. A 20 MB case against a plain PUT


@dataclass
class Component:
    what: str
    product: str
    runs_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float | None:
        return _median(self.runs_s)


@dataclass
class UploadResult:
    """Figure 1. ``ours_total_s`` is what the issue names: sealed + uploaded + receipt verified
    (``seal_bytes`` + ``Uploader.send_next``); the durable enqueue between them is timed apart
    (``ours_enqueue_s``) and added in ``ours_with_enqueue_s``."""

    payload_bytes: int
    envelope_bytes: int
    rounds: int
    ours_total_s: list[float] = field(default_factory=list)
    ours_with_enqueue_s: list[float] = field(default_factory=list)
    ours_seal_s: list[float] = field(default_factory=list)
    ours_enqueue_s: list[float] = field(default_factory=list)
    ours_send_s: list[float] = field(default_factory=list)
    ours_server_s: list[float] = field(default_factory=list)
    plain_total_s: list[float] = field(default_factory=list)
    plain_server_s: list[float] = field(default_factory=list)
    buffered_total_s: list[float] = field(default_factory=list)
    buffered_server_s: list[float] = field(default_factory=list)
    # CPU time a round used, this process (seal + send_next, or the PUT's client) and the
    # server's process: unlike wall time, not stretched by the two ends sharing the cores.
    ours_client_cpu_s: list[float] = field(default_factory=list)
    ours_seal_cpu_s: list[float] = field(default_factory=list)
    ours_server_cpu_s: list[float] = field(default_factory=list)
    plain_client_cpu_s: list[float] = field(default_factory=list)
    plain_server_cpu_s: list[float] = field(default_factory=list)
    components: list[Component] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        return _ratio(_median(self.ours_total_s), _median(self.plain_total_s))

    @property
    def min_ratio(self) -> float | None:
        """Best round against best round: the least disturbed by a noisy machine."""
        return _ratio(min(self.ours_total_s, default=None), min(self.plain_total_s, default=None))

    @property
    def paired_ratio(self) -> float | None:
        """Median over rounds of ours / PUT in the same round (run back to back): steadier than
        the ratio of medians when the machine's load drifts during the run."""
        pairs = [o / p for o, p in zip(self.ours_total_s, self.plain_total_s, strict=True) if p]
        return _median(pairs)

    @property
    def cpu_ratio(self) -> float | None:
        """CPU time of both ends, ours / the streamed PUT (medians): the work each does, which
        a machine with cores to spare for the server's receiving thread would run in parallel
        with the transfer, where on a shared 2-core machine it stretches the wall time."""
        ours = _sum_medians(self.ours_client_cpu_s, self.ours_server_cpu_s)
        plain = _sum_medians(self.plain_client_cpu_s, self.plain_server_cpu_s)
        return _ratio(ours, plain)

    @property
    def floor_s(self) -> float | None:
        """The least time ours could take here from its CPU time alone: the seal (done before
        the upload starts), then the upload's CPU time at both ends spread perfectly over every
        CPU, with no waiting at all. Against the PUT's measured time: a bound, not a forecast."""
        seal = _median(self.ours_seal_cpu_s)
        both = _sum_medians(self.ours_client_cpu_s, self.ours_server_cpu_s)
        if seal is None or both is None:
            return None
        return seal + (both - seal) / usable_cpus()

    @property
    def buffered_ratio(self) -> float | None:
        """Against the buffering PUT handler (the weaker baseline, for comparison)."""
        return _ratio(_median(self.ours_total_s), _median(self.buffered_total_s))

    @property
    def send_ratio(self) -> float | None:
        """``send_next`` alone: the upload, without the sealing done when the case is triaged."""
        return _ratio(_median(self.ours_send_s), _median(self.plain_total_s))

    @property
    def with_enqueue_ratio(self) -> float | None:
        """With the durable enqueue (a 20 MB fsync the PUT's client has no counterpart of)."""
        return _ratio(_median(self.ours_with_enqueue_s), _median(self.plain_total_s))


def _ratio(ours: float | None, plain: float | None) -> float | None:
    return ours / plain if ours and plain else None


def _sum_medians(*series: list[float]) -> float | None:
    medians = [_median(runs) for runs in series]
    return None if None in medians else sum(m for m in medians if m is not None)


def measure_upload(world: World, case_bytes: int, repeat: int, seed: int) -> UploadResult:
    payload = make_payload(case_bytes, random.Random(seed))
    settings = world.device_settings(world.work / "device-upload")
    plain_folder = world.work / "plain-put"
    plain_folder.mkdir(mode=0o700)
    plain = ServerProcess("plain PUT server", _serve_plain_put, plain_folder, world.certificate)
    plain.start()
    result = UploadResult(payload_bytes=len(payload), envelope_bytes=0, rounds=repeat)
    try:
        link = _link(settings)
        session = make_session(TransportConfig(plain.url, pinned_sha256=world.certificate.sha256))
        with link, contextlib.closing(session):
            assert link.keys is not None
            uploader = Uploader(
                outbox=link.outbox,
                client=link.client,
                device=link.device,
                keys=link.keys,
                store_path=None,  # these cases are not in a case store: no state mirror
            )
            server_key = link.keys.server_key

            def ours(record: bool) -> None:
                case_id = _case_id()
                server_before = world.server_post_seconds()
                cpu0 = time.process_time()
                t0 = time.perf_counter()
                # As EscalationQueue.enqueue: the payload is hashed once, while sealing.
                envelope = seal_bytes(
                    payload, case_id=case_id, device=link.device, server_key=server_key
                )
                payload_sha256 = read_header(envelope).payload_sha256
                t1 = time.perf_counter()
                cpu1 = time.process_time()
                link.outbox.enqueue(
                    case_id, envelope, reason="uncertain", payload_sha256=payload_sha256
                )
                server_cpu0 = world.central.cpu_seconds()
                cpu2 = time.process_time()
                t2 = time.perf_counter()
                attempt = uploader.send_next()
                t3 = time.perf_counter()
                cpu3 = time.process_time()
                server_cpu = _cpu_spent(server_cpu0, world.central.cpu_seconds())
                if attempt is None or attempt.outcome != "delivered":
                    raise RuntimeError(f"the 20 MB case was not delivered: {attempt}")
                result.envelope_bytes = len(envelope)
                if record:
                    result.ours_seal_s.append(t1 - t0)
                    result.ours_enqueue_s.append(t2 - t1)
                    result.ours_send_s.append(t3 - t2)
                    result.ours_total_s.append((t1 - t0) + (t3 - t2))
                    result.ours_with_enqueue_s.append(t3 - t0)
                    result.ours_server_s.append(world.server_post_seconds() - server_before)
                    result.ours_client_cpu_s.append((cpu1 - cpu0) + (cpu3 - cpu2))
                    result.ours_seal_cpu_s.append(cpu1 - cpu0)
                    if server_cpu is not None:
                        result.ours_server_cpu_s.append(server_cpu)
                link.outbox.wait_for_removals()  # the spool file's removal, outside the timings
                # As the PUT's file is removed after its round: neither server's disk fills up.
                shutil.rmtree(world.store.case_dir(case_id), ignore_errors=True)

            def put(route: str, totals: list[float], servers: list[float], record: bool) -> None:
                name = _case_id()
                server_cpu0 = plain.cpu_seconds()
                cpu0 = time.process_time()
                t0 = time.perf_counter()
                response = session.put(
                    f"{plain.url}/{route}/{name}",
                    data=payload,
                    headers={"Content-Type": "application/octet-stream"},
                    timeout=(5.0, 120.0),
                )
                _ = response.content
                t1 = time.perf_counter()
                cpu1 = time.process_time()
                server_cpu = _cpu_spent(server_cpu0, plain.cpu_seconds())
                if response.status_code != 201:
                    raise RuntimeError(f"plain PUT answered HTTP {response.status_code}")
                if record:
                    totals.append(t1 - t0)
                    servers.append(float(response.headers[HANDLER_SECONDS]))
                    if route == "blobs":
                        result.plain_client_cpu_s.append(cpu1 - cpu0)
                        if server_cpu is not None:
                            result.plain_server_cpu_s.append(server_cpu)
                (plain_folder / name).unlink()

            def streamed(record: bool) -> None:
                put("blobs", result.plain_total_s, result.plain_server_s, record)

            def buffered(record: bool) -> None:
                put("buffered", result.buffered_total_s, result.buffered_server_s, record)

            for round_no in range(repeat + 1):  # round 0 warms up connections and caches
                steps = [ours, streamed, buffered]
                shift = round_no % len(steps)  # each goes first in turn
                for step in steps[shift:] + steps[:shift]:
                    step(round_no > 0)
                label = "warm-up" if round_no == 0 else f"round {round_no}/{repeat}"
                print(f"  [1] {label} done", file=sys.stderr)
            result.components = measure_components(world, link, payload, repeat)
    finally:
        plain.stop()
    return result


def stream_open(
    envelope: BytesLike, device_key: Ed25519PublicKey, server_keys: Mapping[str, X25519PrivateKey]
) -> None:
    """What the server's receiving thread does with the body's pieces, without the files."""
    stream = EnvelopeStream()
    view = memoryview(envelope)
    piece = 256 * 1024
    stream.feed_header(view[:piece])
    stream.verify(device_key)
    stream.unseal(server_keys)
    stream.feed(b"", _ignore_piece)
    for start in range(piece, len(view), piece):
        stream.feed(view[start : start + piece], _ignore_piece)
    stream.finish()


def _ignore_piece(_: memoryview) -> None:
    pass


def measure_components(
    world: World, link: EscalationLink, payload: bytes, repeat: int
) -> list[Component]:
    """Each step of ours alone, on the same bytes: where the time goes."""
    assert link.keys is not None
    device, server_key = link.device, link.keys.server_key
    case_id = _case_id()
    envelope = seal_bytes(payload, case_id=case_id, device=device, server_key=server_key)
    payload_sha256 = read_header(envelope).payload_sha256
    link.outbox.enqueue(case_id, envelope, reason="out_of_scope", payload_sha256=payload_sha256)
    scratch = world.work / "components"
    scratch.mkdir(mode=0o700, exist_ok=True)
    server_keys = world.key_ring.private_keys
    opened = open_envelope(envelope, device_public_key=device.public_key(), server_keys=server_keys)
    aead = AESGCM(AESGCM.generate_key(bit_length=256))

    def aes_only() -> None:
        view = memoryview(payload)
        for index in range(0, len(payload), DEFAULT_CHUNK_SIZE):
            aead.encrypt(bytes(12), view[index : index + DEFAULT_CHUNK_SIZE], b"aad")

    def server_files() -> None:
        staged = StagedFiles(scratch, case_id)
        staged.write(
            {
                DICOM_FILE: opened.dicom,
                RESULT_FILE: opened.result_json,
                SIGNED_HEADER_FILE: opened.signed_header,
            }
        )
        staged.publish()

    steps: list[tuple[Component, Callable[[], object]]] = [
        (
            Component(
                "device: seal (SHA-256 of the payload, HPKE, sign, AES-GCM)",
                "seal_bytes",
            ),
            lambda: seal_bytes(payload, case_id=case_id, device=device, server_key=server_key),
        ),
        (
            Component("  of which SHA-256 of the payload", "seal_bytes"),
            lambda: hashlib.sha256(payload).hexdigest(),
        ),
        (Component("  of which AES-256-GCM, 1 MiB chunks", "seal_bytes"), aes_only),
        (
            Component(
                "device: SHA-256 of the envelope (a helper thread, during the write)",
                "Outbox.enqueue",
            ),
            lambda: hashlib.sha256(envelope).hexdigest(),
        ),
        (
            Component("device: durable write of the envelope", "Outbox.enqueue (file part)"),
            lambda: write_private_file(scratch / "spool.env", bytes(envelope)),
        ),
        (
            Component(
                "device: read + check of the spool file (header, signature, chunk lengths)",
                "Uploader._envelope",
            ),
            lambda: check_sealed(link.outbox.envelope(case_id), device.public_key()),
        ),
        (
            Component("server: header + signature check", "read_header, verify_header"),
            lambda: verify_header(envelope, device.public_key()),
        ),
        (
            Component(
                "server: open as it arrives, 256 KiB pieces (HPKE, AES-GCM, SHA-256; no writes)",
                "EnvelopeStream",
            ),
            lambda: stream_open(envelope, device.public_key(), server_keys),
        ),
        (
            Component(
                "server: durable writes of image.dcm + result.json + signed header "
                "(all at once; in the POST the image is written as it arrives)",
                "StagedFiles",
            ),
            server_files,
        ),
        (
            Component("baseline: durable write of the payload", "plain PUT handler"),
            lambda: durable_write(scratch / "plain.bin", payload),
        ),
    ]
    for component, step in steps:
        for _ in range(repeat):
            t0 = time.perf_counter()
            step()
            component.runs_s.append(time.perf_counter() - t0)
    shutil.rmtree(scratch, ignore_errors=True)
    return [component for component, _ in steps]


# --------------------------------------------------------------------------------------------
# 2. Durable enqueues per second


@dataclass
class EnqueueResult:
    variant: str
    enqueues: int
    envelope_bytes: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.enqueues / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.enqueues * self.envelope_bytes / MB / self.seconds


def _no_fsync(fd: int) -> None:
    """Stand-in for ``os.fsync`` in the ceiling runs (the bytes reach the page cache only)."""


def measure_enqueues(world: World, count: int, seed: int) -> list[EnqueueResult]:
    rng = random.Random(seed)
    variants = (
        ("as shipped: synchronous=FULL + file and folder fsync", True, True),
        ("without the file fsyncs (SQLite still FULL)", False, True),
        ("ceiling: no fsync at all (synchronous=OFF too)", False, False),
    )
    results = []
    for number, (label, file_fsync, sqlite_full) in enumerate(variants, start=1):
        data_dir = world.work / f"device-enqueue-{number}"
        settings = Settings({"paths.data_dir": data_dir})
        device = load_or_create_device_identity(data_dir)
        info = world.key_ring.public_info()
        server_key = ServerPublicKey.from_b64(str(info["server_public_key"]))
        jobs = []
        for _ in range(count):
            payload = make_payload(ENQUEUE_ENVELOPE_BYTES, rng)
            case_id = _case_id()
            envelope = seal_bytes(payload, case_id=case_id, device=device, server_key=server_key)
            jobs.append((case_id, envelope, hashlib.sha256(payload).hexdigest()))
        with open_outbox(settings) as outbox:
            if not sqlite_full:
                # The ceiling only: no product setting turns this off.
                outbox._conn.execute("PRAGMA synchronous=OFF")
            patch = (
                contextlib.nullcontext()
                if file_fsync
                else mock.patch.object(os, "fsync", _no_fsync)
            )
            with patch:
                t0 = time.perf_counter()
                for case_id, envelope, payload_sha256 in jobs:
                    outbox.enqueue(
                        case_id, envelope, reason="uncertain", payload_sha256=payload_sha256
                    )
                seconds = time.perf_counter() - t0
            queued = outbox.status().pending
        if queued != count:
            raise RuntimeError(f"{queued} of {count} envelopes queued")
        size = len(jobs[0][1])
        results.append(EnqueueResult(label, count, size, seconds))
        print(f"  [2] {label}: {count / seconds:.0f}/s", file=sys.stderr)
    return results


# --------------------------------------------------------------------------------------------
# 3. Link restored -> delivery


@dataclass(frozen=True)
class Outage:
    """How far the uploader has backed off when the link comes back."""

    name: str
    failures_per_case: int  # every case has failed at least this often
    min_backoff_left_s: float  # and each still waits at least this long (0: whatever it has)
    random_wait: bool  # then wait a random part of the probe interval before the restore


OUTAGES = (
    # The last delays were drawn from up to 4-8 s: a case's own retry may beat the probe.
    Outage("short", 3, 0.0, True),
    # Every case still has >= 8 s to wait, longer than a probe cycle (5 s + the 1 s idle
    # step): what brings the cases back is the probe.
    Outage("long", 5, 8.0, False),
)


@dataclass
class LinkTrial:
    outage: str
    failed_attempts: int  # failed deliveries of this trial's cases before the restore
    failures_in_a_row: int  # connectivity: failures since the last success (probes included)
    max_attempts: int  # the most attempts one case had
    backoff_left_min_s: float  # the shortest wait a case still had for its own backoff
    backoff_left_max_s: float  # the longest
    probe_answered_s: float | None  # first /v1/health probe that answered; None: none did
    first_s: float
    all_s: float


@dataclass
class LinkResult:
    probe_s: float
    retry_cap_s: float
    cases_per_trial: int
    case_bytes: int
    trials: list[LinkTrial] = field(default_factory=list)

    def summary(self, outage: str | None = None) -> dict[str, float | None]:
        """Median and max of restore -> first and -> all delivered (one outage or all)."""
        chosen = [t for t in self.trials if outage is None or t.outage == outage]
        firsts, alls = [t.first_s for t in chosen], [t.all_s for t in chosen]
        return {
            "first_median_s": _median(firsts),
            "first_max_s": max(firsts, default=None),
            "all_median_s": _median(alls),
            "all_max_s": max(alls, default=None),
        }


def _backoff_left(items: Sequence[OutboxItem], at: datetime) -> list[float]:
    return [
        (datetime.fromisoformat(item.next_attempt_at) - at).total_seconds()
        for item in items
        if item.state is OutboxState.PENDING
    ]


def measure_link_recovery(world: World, trials: int, seed: int) -> LinkResult:
    rng = random.Random(seed)
    central_port = world.central.port
    if central_port is None:
        raise RuntimeError("the central server is not running")
    proxy = LinkProxy(central_port)
    proxy.start()
    settings = world.device_settings(world.work / "device-link", url=proxy.url)
    config = UploaderConfig(retry_cap_s=settings.retry_cap_s)
    result = LinkResult(config.probe_s, config.retry_cap_s, LINK_CASES, LINK_CASE_BYTES)
    background = BackgroundUploader(settings)
    # When the uploader's /v1/health probes answer: watched, not changed.
    probes: list[tuple[datetime, bool]] = []
    original_probe = Uploader.probe

    def watched_probe(uploader: Uploader) -> bool:
        answered = original_probe(uploader)
        probes.append((datetime.now(UTC), answered))
        return answered

    try:
        link = _link(settings)
        with link, mock.patch.object(Uploader, "probe", watched_probe):
            queue = link.queue
            assert queue is not None
            background.start()
            for outage in OUTAGES:
                for number in range(1, trials + 1):
                    proxy.set_link(False)
                    cases = []
                    for _ in range(LINK_CASES):
                        case_id = _case_id()
                        payload = make_payload(LINK_CASE_BYTES, rng)
                        queue.enqueue(case_id, payload, reason="uncertain")
                        cases.append(case_id)

                    def items(ids: list[str] = cases) -> list[OutboxItem]:
                        return [item for item in map(link.outbox.get, ids) if item is not None]

                    def backed_off(want: Outage = outage) -> bool:
                        now = items()
                        if min(item.attempts for item in now) < want.failures_per_case:
                            return False
                        left = _backoff_left(now, datetime.now(UTC))
                        return len(left) == len(now) and min(left) >= want.min_backoff_left_s

                    _wait_until(backed_off, "failed attempts while the link is down", 180.0)
                    if outage.random_wait:  # anywhere in the probe cycle
                        time.sleep(rng.uniform(0.0, config.probe_s))
                    before = items()
                    snapshot = background.snapshot()
                    restored_at = datetime.now(UTC)
                    proxy.set_link(True)
                    left = _backoff_left(before, restored_at) or [0.0]

                    def delivered() -> bool:
                        return all(item.state is OutboxState.DELIVERED for item in items())

                    _wait_until(delivered, "delivery after the link came back", WAIT_TIMEOUT_S)
                    times = [
                        (datetime.fromisoformat(item.delivered_at) - restored_at).total_seconds()
                        for item in items()
                        if item.delivered_at is not None
                    ]
                    answered = [
                        (at - restored_at).total_seconds()
                        for at, ok in list(probes)
                        if ok and restored_at <= at
                    ]
                    first_probe = min(answered, default=None)
                    trial = LinkTrial(
                        outage=outage.name,
                        failed_attempts=sum(item.attempts for item in before),
                        failures_in_a_row=snapshot.consecutive_failures,
                        max_attempts=max(item.attempts for item in before),
                        backoff_left_min_s=max(0.0, min(left)),
                        backoff_left_max_s=max(0.0, max(left)),
                        probe_answered_s=(
                            first_probe
                            if first_probe is not None and first_probe <= max(times)
                            else None
                        ),
                        first_s=min(times),
                        all_s=max(times),
                    )
                    result.trials.append(trial)
                    print(
                        f"  [3] {outage.name} outage {number}/{trials}: first delivery "
                        f"{trial.first_s:.2f} s, all {trial.all_s:.2f} s after the restore",
                        file=sys.stderr,
                    )
    finally:
        proxy.set_link(True)  # let an attempt in progress finish rather than hang on a cut
        background.stop()
        proxy.close()
    return result


# --------------------------------------------------------------------------------------------
# 4. Bytes uploaded against sending every image


@dataclass
class HoldoutResult:
    seed: int
    images: int
    render_s: float
    triage_s: float = 0.0
    failed: int = 0
    normal: int = 0
    abnormal: int = 0
    escalated: int = 0
    uncertain: int = 0
    out_of_scope: int = 0
    queued: int = 0
    held: int = 0
    blocked: int = 0
    input_bytes: int = 0
    escalated_input_bytes: int = 0
    blocked_input_bytes: int = 0
    payload_bytes: int = 0
    envelope_bytes: int = 0
    delivered: int = 0
    delivered_bytes: int = 0

    @property
    def escalated_share(self) -> float:
        return self.escalated / self.images if self.images else 0.0

    @property
    def byte_share(self) -> float:
        return self.envelope_bytes / self.input_bytes if self.input_bytes else 0.0

    @property
    def envelope_overhead(self) -> float:
        return self.envelope_bytes / self.payload_bytes - 1 if self.payload_bytes else 0.0


def write_holdout(folder: Path, seed: int, count: int) -> tuple[list[Path], float]:
    """The phantoms as DICOM files (rendered in processes: call before any thread starts)."""
    t0 = time.perf_counter()
    write_phantom_set(folder, seed, count, workers=min(2, os.cpu_count() or 1))
    return sorted(folder.glob("*.dcm")), time.perf_counter() - t0


def measure_holdout(world: World, files: list[Path], seed: int, render_s: float) -> HoldoutResult:
    result = HoldoutResult(seed=seed, images=len(files), render_s=render_s)
    sizes = {str(path): path.stat().st_size for path in files}
    result.input_bytes = sum(sizes.values())
    settings = world.device_settings(world.work / "device-holdout")  # default thresholds
    link = _link(settings)
    with link:
        t0 = time.perf_counter()
        outcomes = list(triage_and_record(files, settings, queue=link.queue))
        result.triage_s = time.perf_counter() - t0
        for outcome in outcomes:
            if not isinstance(outcome, CaseResult):
                result.failed += 1
                continue
            if outcome.decision == "normal":
                result.normal += 1
            elif outcome.decision == "abnormal":
                result.abnormal += 1
            else:
                result.escalated += 1
                result.uncertain += outcome.reason == "uncertain"
                result.out_of_scope += outcome.reason == "out_of_scope"
            state = outcome.escalation.state if outcome.escalation else None
            if state == QUEUED and outcome.payload is not None:
                result.queued += 1
                result.payload_bytes += len(outcome.payload)
                result.escalated_input_bytes += sizes.get(outcome.path, 0)
            result.held += state == HELD
            if state == BLOCKED:
                result.blocked += 1
                result.blocked_input_bytes += sizes.get(outcome.path, 0)
        result.envelope_bytes = sum(item.size_bytes for item in link.outbox.items())
        print(
            f"  [4] {len(files)} images triaged in {result.triage_s:.1f} s, "
            f"{result.queued} queued; draining",
            file=sys.stderr,
        )
        with link.uploader() as uploader:
            attempts = uploader.drain()
        result.delivered = sum(a.outcome == "delivered" for a in attempts)
        result.delivered_bytes = sum(
            item.size_bytes for item in link.outbox.items() if item.state is OutboxState.DELIVERED
        )
    return result


# --------------------------------------------------------------------------------------------
# Report


def verdict_ratio(upload: UploadResult) -> str:
    ratio = upload.ratio
    if ratio is None:
        return "[1] ours / plain PUT = n/a"
    met = "MET" if ratio <= RATIO_TARGET else "NOT MET"
    return (
        f"[1] {_mb(upload.payload_bytes)} case, ours / plain PUT = {ratio:.2f}× "
        f"(target ≤ {RATIO_TARGET}×): {met}"
    )


def verdict_recovery(link: LinkResult) -> str:
    overall = link.summary()
    worst = overall["first_max_s"]
    if worst is None:
        return "[3] link restored → first delivery = n/a"
    met = "MET" if worst <= RECOVERY_TARGET_S else "NOT MET"
    return (
        f"[3] link restored → first delivery: median {_s(overall['first_median_s'])} s, max "
        f"{_s(worst)} s over {len(link.trials)} trials (target ≤ {RECOVERY_TARGET_S:.0f} s, "
        f"probe every {link.probe_s:g} s): {met}; → all delivered: max "
        f"{_s(overall['all_max_s'])} s"
    )


def render_upload(upload: UploadResult) -> list[str]:
    """Figure 1's lines."""

    def row(what: str, runs: list[float], server: list[float] | None = None) -> tuple[str, ...]:
        return (
            what,
            _ms(_median(runs)),
            _ms(min(runs, default=None)),
            _ms(max(runs, default=None)),
            "" if server is None else _ms(_median(server)),
        )

    lines = [
        "",
        f"1. One case of {_mb(upload.payload_bytes)} (envelope {_mb(upload.envelope_bytes)}): "
        f"sealed + uploaded + receipt verified, against a plain HTTPS PUT + durable write of "
        f"the same bytes; each server in a process of its own (median of {upload.rounds} "
        "rounds after 1 warm-up)",
    ]
    rows: list[tuple[str, ...]] = [
        row("ours: seal + send_next", upload.ours_total_s, upload.ours_server_s),
        row("  seal (seal_bytes, which hashes the payload)", upload.ours_seal_s),
        row(
            "  Uploader.send_next (POST → receipt → delivered)",
            upload.ours_send_s,
            upload.ours_server_s,
        ),
        row(
            "plain PUT (same TLS pin), streamed to a file, fsync",
            upload.plain_total_s,
            upload.plain_server_s,
        ),
        row(
            "(weaker: body buffered, then written + fsync)",
            upload.buffered_total_s,
            upload.buffered_server_s,
        ),
        row("(between seal and send: Outbox.enqueue, durable)", upload.ours_enqueue_s),
        row("(ours with it: seal + enqueue + send_next)", upload.ours_with_enqueue_s),
    ]
    lines += _table(("step", "median ms", "min ms", "max ms", "server ms"), rows)

    def times(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}×"

    lines.append(
        f"  ratio ours / plain PUT (streamed): {times(upload.ratio)} (medians), "
        f"{times(upload.paired_ratio)} (median of each round's ratio), "
        f"{times(upload.min_ratio)} (minima)"
    )
    lines.append(
        f"  for comparison: with the durable enqueue {times(upload.with_enqueue_ratio)} (the "
        f"PUT's client keeps no durable copy); send_next alone {times(upload.send_ratio)} "
        f"(sealing happens when the case is triaged); against the buffering PUT "
        f"{times(upload.buffered_ratio)}"
    )
    lines += render_cpu(upload)
    lines += ["", f"  where ours spends it: each step alone on the same bytes, median of "
              f"{upload.rounds}"]  # fmt: skip
    rows = [(c.what, _ms(c.median_s), c.product) for c in upload.components]
    lines += _table(("step", "ms", "product code"), rows, indent="    ", align="lrl")
    return lines


def render_cpu(upload: UploadResult) -> list[str]:
    """CPU time per case at each end: the work, where the wall times above also hold the two
    ends (and the server's two threads) waiting for each other on the shared cores."""
    if not upload.ours_server_cpu_s or not upload.plain_server_cpu_s:
        return ["  (CPU time per case: not measured, no /proc on this system)"]
    ours_device, ours_server = _median(upload.ours_client_cpu_s), _median(upload.ours_server_cpu_s)
    put_client, put_server = _median(upload.plain_client_cpu_s), _median(upload.plain_server_cpu_s)
    rows = [
        (
            "ours (device: seal + send_next)",
            _ms(ours_device),
            _ms(ours_server),
            _ms(_sum_medians(upload.ours_client_cpu_s, upload.ours_server_cpu_s)),
        ),
        (
            "plain PUT (streamed)",
            _ms(put_client),
            _ms(put_server),
            _ms(_sum_medians(upload.plain_client_cpu_s, upload.plain_server_cpu_s)),
        ),
    ]
    ratio = upload.cpu_ratio
    lines = ["", f"  CPU time per case (median of {upload.rounds}; {usable_cpus()} CPUs "
             "shared by both ends)"]  # fmt: skip
    lines += _table(("", "client ms", "server ms", "both ms"), rows, indent="    ")
    lines.append(
        "    ratio of CPU time, ours / plain PUT: " + ("-" if ratio is None else f"{ratio:.2f}×")
    )
    floor, plain = upload.floor_s, _median(upload.plain_total_s)
    if floor is not None and plain:
        lines.append(
            f"    the least ours could take on {usable_cpus()} CPUs from that CPU time alone "
            f"(the seal, then the upload's CPU at both ends spread over every CPU, no waiting): "
            f"{_ms(floor)} ms, {floor / plain:.2f}× the PUT's median"
        )
    return lines


def render_report(
    upload: UploadResult,
    enqueues: list[EnqueueResult],
    link: LinkResult,
    holdout: HoldoutResult,
    header: list[str],
) -> str:
    lines = [*header, *render_upload(upload)]
    # 2
    first = enqueues[0] if enqueues else None
    lines += [
        "",
        f"2. Durable enqueues: Outbox.enqueue of {first.enqueues if first else 0} sealed "
        f"envelopes of {first.envelope_bytes if first else 0} bytes into a fresh outbox",
    ]
    rows: list[tuple[str, ...]] = [
        (r.variant, f"{r.per_s:.0f}", f"{1e3 / r.per_s:.1f}", f"{r.mb_per_s:.1f}") for r in enqueues
    ]
    lines += _table(("variant", "enqueues/s", "ms each", "MB/s"), rows)
    # 3
    lines += [
        "",
        f"3. Link restored → delivery: BackgroundUploader through a droppable TCP proxy, "
        f"{link.cases_per_trial} cases of {_mb(link.case_bytes)} queued while down; probe "
        f"every {link.probe_s:g} s while offline, retry cap {link.retry_cap_s:g} s",
        "  short: restore once every case has failed 3 times, at a random point of the probe "
        "cycle; long: once every case has failed 5 times and still waits ≥ 8 s",
    ]
    rows = []
    for outage in OUTAGES:
        chosen = [t for t in link.trials if t.outage == outage.name]
        rows += [
            (
                f"{outage.name} {n}",
                str(t.failed_attempts),
                str(t.max_attempts),
                str(t.failures_in_a_row),
                f"{t.backoff_left_min_s:.1f}-{t.backoff_left_max_s:.1f}",
                "none" if t.probe_answered_s is None else _s(t.probe_answered_s),
                _s(t.first_s),
                _s(t.all_s),
            )
            for n, t in enumerate(chosen, start=1)
        ]
        if chosen:
            summary = link.summary(outage.name)
            blank = ("",) * 5
            rows.append((f"{outage.name} median", *blank, _s(summary["first_median_s"]),
                         _s(summary["all_median_s"])))  # fmt: skip
            rows.append((f"{outage.name} max", *blank, _s(summary["first_max_s"]),
                         _s(summary["all_max_s"])))  # fmt: skip
    lines += _table(
        (
            "outage",
            "failed attempts",
            "most by 1 case",
            "failures in a row",
            "backoff left s",
            "probe answered s",
            "→ first s",
            "→ all s",
        ),
        rows,
    )
    # 4
    h = holdout
    lines += [
        "",
        f"4. Bytes uploaded against sending every image: {h.images} hold-out phantoms (seed "
        f"{h.seed}) through triage_and_record, shipped model, default thresholds",
    ]
    rows = [
        ("images (failed inputs)", f"{h.images} ({h.failed})"),
        ("decided normal / abnormal on the device", f"{h.normal} / {h.abnormal}"),
        (
            "escalated (uncertain / out of scope)",
            f"{h.escalated} ({h.uncertain} / {h.out_of_scope}), {100 * h.escalated_share:.1f}%",
        ),
        ("queued / held / blocked", f"{h.queued} / {h.held} / {h.blocked}"),
        ("bytes of all input files (send every image)", f"{h.input_bytes:,}"),
        ("bytes of the queued cases' input files", f"{h.escalated_input_bytes:,}"),
        ("bytes of the blocked cases' input files (not sent)", f"{h.blocked_input_bytes:,}"),
        ("bytes of the de-identified payloads", f"{h.payload_bytes:,}"),
        ("bytes of the queued envelopes (uploaded)", f"{h.envelope_bytes:,}"),
        ("share uploaded: envelope bytes / input bytes", f"{100 * h.byte_share:.1f}%"),
        (
            "envelope overhead over its payload",
            f"{100 * h.envelope_overhead:.3f}% "
            f"({(h.envelope_bytes - h.payload_bytes) / max(h.queued, 1):.0f} bytes a case)",
        ),
        ("delivered to the server (bytes)", f"{h.delivered} ({h.delivered_bytes:,})"),
        ("phantoms written / triage time", f"{h.render_s:.1f} s / {h.triage_s:.1f} s"),
    ]
    lines += _table(("figure", "value"), rows)
    lines += ["", verdict_ratio(upload), verdict_recovery(link)]
    return "\n".join(lines)


def upload_json(upload: UploadResult, sizes: Sizes, tls: str) -> dict[str, Any]:
    """The machine and figure 1 (all of ``--upload-only``'s JSON)."""
    return {
        "benchmark": "escalation_figures",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "tls": tls,
        },
        "sizes": asdict(sizes),
        "upload": {
            **asdict(upload),
            "ratio": upload.ratio,
            "min_ratio": upload.min_ratio,
            "paired_ratio": upload.paired_ratio,
            "with_enqueue_ratio": upload.with_enqueue_ratio,
            "send_ratio": upload.send_ratio,
            "buffered_ratio": upload.buffered_ratio,
            "cpu_ratio": upload.cpu_ratio,
            "floor_s": upload.floor_s,
            "ours_median_s": _median(upload.ours_total_s),
            "plain_median_s": _median(upload.plain_total_s),
        },
        "verdicts": [verdict_ratio(upload)],
    }


def to_json(
    upload: UploadResult,
    enqueues: list[EnqueueResult],
    link: LinkResult,
    holdout: HoldoutResult,
    sizes: Sizes,
    tls: str,
) -> dict[str, Any]:
    return {
        **upload_json(upload, sizes, tls),
        "enqueue": [{**asdict(r), "per_s": r.per_s, "mb_per_s": r.mb_per_s} for r in enqueues],
        "link": {
            **asdict(link),
            "outages": [asdict(outage) for outage in OUTAGES],
            "summary": link.summary(),
            "summary_by_outage": {o.name: link.summary(o.name) for o in OUTAGES},
        },
        "holdout": {
            **asdict(holdout),
            "escalated_share": holdout.escalated_share,
            "byte_share": holdout.byte_share,
            "envelope_overhead": holdout.envelope_overhead,
        },
        "verdicts": [verdict_ratio(upload), verdict_recovery(link)],
    }


# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, help="rounds of figure 1 (default 5, quick 2)")
    parser.add_argument("--out", type=Path, help="folder for escalation_figures.json/.txt")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_HOLDOUT_SEED,
        help=f"phantom seed of the hold-out set (default {DEFAULT_HOLDOUT_SEED})",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (path printed)")
    parser.add_argument(
        "--upload-only", action="store_true", help="figure 1 (the 20 MB case against a PUT) alone"
    )
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be positive")
    return args


def sizes_for(args: argparse.Namespace) -> Sizes:
    if args.quick:
        return Sizes(case_bytes=2 * MB, repeat=args.repeat or 2, enqueues=40, link_trials=1,
                     images=24)  # fmt: skip
    return Sizes(case_bytes=20 * MB, repeat=args.repeat or 5, enqueues=200, link_trials=3,
                 images=200)  # fmt: skip


@contextlib.contextmanager
def central_server(work: Path) -> Iterator[World]:
    certificate = make_self_signed(work / "tls")
    config = CentralConfig(
        data_dir=work / "central",
        port=0,
        tls_cert=certificate.cert,
        tls_key=certificate.key,
        model_dir=None,  # stores cases, decides nothing: verdicts stay pending
    )
    key_ring = load_key_ring(config)  # created here, loaded the same by the server
    server = ServerProcess("central server", _serve_central, config)
    server.start()
    try:
        with (
            CentralStore.for_config(config) as store,
            contextlib.closing(
                make_session(TransportConfig(server.url, pinned_sha256=certificate.sha256))
            ) as scraper,
        ):
            yield World(work, certificate, server, key_ring, store, scraper)
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_for(args)
    configure_logging(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="escalation-bench-"))
    try:
        if args.upload_only:
            files: list[Path] = []
            render_s = 0.0
        else:
            # Rendering forks worker processes: done first, before any server or proxy thread.
            files, render_s = write_holdout(work / "holdout", args.seed, sizes.images)
            print(f"  [4] {len(files)} phantoms written in {render_s:.1f} s", file=sys.stderr)
        with central_server(work) as world:
            assert world.central.port is not None
            tls = tls_description(world.central.port)
            header = [
                "Escalation figures on loopback (127.0.0.1): central server under uvicorn "
                "(ServerThread, no model), pinned self-signed certificate, SQLite WAL "
                "synchronous=FULL on both sides",
                f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
                f"{platform.python_version()}, load average at start "
                f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; TLS: {tls}",
            ]
            upload = measure_upload(world, sizes.case_bytes, sizes.repeat, args.seed)
            if args.upload_only:
                report = "\n".join([*header, *render_upload(upload), "", verdict_ratio(upload)])
                data = upload_json(upload, sizes, tls)
            else:
                enqueues = measure_enqueues(world, sizes.enqueues, args.seed)
                link = measure_link_recovery(world, sizes.link_trials, args.seed)
                holdout = measure_holdout(world, files, args.seed, render_s)
                report = render_report(upload, enqueues, link, holdout, header)
                data = to_json(upload, enqueues, link, holdout, sizes, tls)
        print(report)
        if args.out:
            save_report(args.out, "escalation_figures", data, report)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    leftover = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if leftover:
        print(f"threads still running at exit: {', '.join(leftover)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
