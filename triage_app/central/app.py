"""The central API (docs/escalation-protocol.md, "Central API") as a FastAPI application.

Why the checks run in this order on ``POST /v1/cases/{case_id}``: the cheapest refusal first and
nothing decrypted for a sender the server does not trust. The body is read with a hard limit
(413 from ``Content-Length`` before reading, and again while streaming); then the header is
parsed, the device looked up (401), its signature checked (401), its revocation checked (403),
the URL's case id compared with the signed one, the age checked, and only then is the envelope
opened with the key ring's private keys and stored. Revocation comes after the signature so that
only the device itself can learn it was revoked. Every refusal is ``{"error": {"code",
"message"}}`` with the protocol's status, so the device can tell "retry" (408, 429, 5xx) from
"quarantine" (other 4xx).

Privacy: requests are logged with case ids, device ids and codes only; payloads never are. A
refusal's message never repeats what the client sent unless it has the shape of an id.

The connection cap (``CentralConfig.max_connections``) is enforced here (:class:`ConnectionCap`)
rather than by uvicorn's ``limit_concurrency``, which answered its own plain 503 (no code, no
``Retry-After``) to health checks and scrapes too, refused requests on connections it was
already serving, and logged a warning per refusal. ``GET /v1/health`` says ``"busy"`` (still
200) while a request on its connection would be refused, so that a device does not answer a
busy server by sending it every waiting case at once (``uploader.Uploader.probe``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, MutableMapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from triage_app.central.config import MAX_CLOCK_SKEW, CentralConfig
from triage_app.central.errors import (
    BodyTimeoutError,
    BodyTooLargeError,
    CaseConflictError,
    CaseIdMismatchError,
    DeviceRevokedError,
    ReplayedEnvelopeError,
    StaleEnvelopeError,
    UnknownDeviceError,
)
from triage_app.central.registry import DeviceRecord
from triage_app.central.storage import (
    DICOM_FILE,
    RESULT_FILE,
    SIGNED_HEADER_FILE,
    CentralStore,
    Verdict,
)
from triage_app.central.upload_stream import UploadGate, UploadLimits
from triage_app.central.verdicts import CentralModel, VerdictWorker, failure_message
from triage_app.errors import (
    EnvelopeError,
    EnvelopeSignatureError,
    EnvelopeTamperedError,
    EnvelopeTruncatedError,
    MalformedEnvelopeError,
    StoreError,
    UnknownServerKeyError,
)
from triage_app.escalation.envelope import (
    BytesLike,
    EnvelopeHeader,
    EnvelopeStream,
    OpenedEnvelope,
    PayloadSplitter,
    is_case_id,
    parse_timestamp,
)
from triage_app.escalation.keys import ServerKeyRing
from triage_app.escalation.receipt import Receipt, sign_receipt, verify_request_signature

log = logging.getLogger(__name__)

#: The HTTP status of every refusal code (protocol, "Central API").
STATUS_BY_CODE: dict[str, int] = {
    MalformedEnvelopeError.code: 400,
    CaseIdMismatchError.code: 400,
    UnknownDeviceError.code: 401,
    EnvelopeSignatureError.code: 401,
    DeviceRevokedError.code: 403,
    ReplayedEnvelopeError.code: 409,
    CaseConflictError.code: 409,
    StaleEnvelopeError.code: 409,
    BodyTimeoutError.code: 408,
    BodyTooLargeError.code: 413,
    UnknownServerKeyError.code: 422,
    EnvelopeTamperedError.code: 422,
    EnvelopeTruncatedError.code: 422,
}
_LOGGABLE_ID = re.compile(r"[0-9a-f]{64}|dev-[0-9a-f]{16}")
_DEVICE_ID = re.compile(r"dev-[0-9a-f]{16}")
#: Seconds a device should wait before retrying after a 503 (storage failed).
RETRY_AFTER_S = 30
#: The code of a request refused at the connection cap (503, :class:`ConnectionCap`).
SERVER_BUSY = "server_busy"
#: The codes the API answers with that are no exception's ``code`` (those are in
#: ``STATUS_BY_CODE``), with their HTTP status (None: the status of the HTTP error itself).
#: docs/error-codes.md has a row for each (tests/test_docs.py).
API_ERROR_CODES: dict[str, int | None] = {
    "not_found": 404,
    "method_not_allowed": 405,
    "bad_request": 400,
    "http_error": None,
    SERVER_BUSY: 503,
}
#: The ``Retry-After`` of a ``server_busy`` 503, drawn per refusal from this range of seconds.
#: At least the keep-alive timeout (5 s, ``server.KEEP_ALIVE_TIMEOUT_S``): by then the idle
#: connections holding places have been closed. Spread over 5 s more because the device waits
#: exactly ``Retry-After`` while its own jitter is shorter (its first retries): a fleet refused in
#: the same second would otherwise come back in the same second, and be refused again.
BUSY_RETRY_AFTER_S = (5, 10)
#: At most one log line about requests refused at the cap per this many seconds.
BUSY_LOG_INTERVAL_S = 60.0
#: The least time between two scans of the open connections for admitted ones that closed
#: (:meth:`ConnectionCap.admit`): a scan costs a pass over every open connection.
CAP_PRUNE_INTERVAL_S = 0.25
#: Requests answered at the cap: cheap, and monitoring must see a busy server as busy, not down.
ALWAYS_ANSWERED = frozenset({("GET", "/v1/health"), ("GET", "/metrics")})
#: A refused request that declares a body of at most this many bytes has it read and thrown away
#: before its connection is closed (:class:`_ConnectionCapMiddleware`), for at most
#: :data:`BUSY_LINGER_S`: closed with unread bytes, the connection is reset, and a client still
#: sending loses the 503 and its ``Retry-After``. A larger body is not read at all (the server
#: at its cap does not take in megabytes it will not keep): its sender may see the reset.
BUSY_LINGER_BYTES = 1 << 20
#: The longest a refused request's body is read (:data:`BUSY_LINGER_BYTES`), whatever arrives.
BUSY_LINGER_S = 1.0


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The protocol's error body, one line of message."""
    body = {"error": {"code": code, "message": " ".join(message.split())}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass(frozen=True)
class CentralMetrics:
    """The server's Prometheus metrics, in a registry of their own (never the global one), so
    that several apps in one process (tests, the demo) do not collide."""

    registry: CollectorRegistry
    received: Counter
    duplicates: Counter
    rejections: Counter
    verdicts: Counter
    stored_cases: Gauge
    request_seconds: Histogram
    open_connections: Gauge
    admitted_connections: Gauge
    requests_in_progress: Gauge

    @classmethod
    def create(cls, store: CentralStore) -> CentralMetrics:
        registry = CollectorRegistry(auto_describe=True)
        stored = Gauge(
            "triage_central_stored_cases", "Cases stored on this server.", registry=registry
        )
        stored.set_function(lambda: float(store.count()))
        return cls(
            registry=registry,
            received=Counter(
                "triage_central_cases_received",
                "Cases stored for the first time.",
                registry=registry,
            ),
            duplicates=Counter(
                "triage_central_duplicate_deliveries",
                "Repeated deliveries of stored cases (answered 200 with the same receipt).",
                registry=registry,
            ),
            rejections=Counter(
                "triage_central_rejections",
                "Refused requests, by error code.",
                ["code"],
                registry=registry,
            ),
            verdicts=Counter(
                "triage_central_verdicts",
                "Verdicts of the central model, by label.",
                ["verdict"],
                registry=registry,
            ),
            stored_cases=stored,
            request_seconds=Histogram(
                "triage_central_request_seconds",
                "Time to answer a request, by method and route.",
                ["method", "route"],
                registry=registry,
            ),
            open_connections=Gauge(
                "triage_central_open_connections",
                "Client connections open now, idle and refused ones included.",
                registry=registry,
            ),
            admitted_connections=Gauge(
                "triage_central_admitted_connections",
                "Open client connections admitted under max_connections (what the cap counts).",
                registry=registry,
            ),
            requests_in_progress=Gauge(
                "triage_central_requests_in_progress",
                "Requests being answered now, this scrape included.",
                registry=registry,
            ),
        )

    def count_connections(
        self, connections: Callable[[], int], requests_in_progress: Callable[[], int]
    ) -> None:
        """Read the two gauges from the HTTP server at each scrape (the app does not see
        connections: ``server.make_server`` hands it uvicorn's counts)."""
        self.open_connections.set_function(lambda: float(connections()))
        self.requests_in_progress.set_function(lambda: float(requests_in_progress()))


class CaseReceiver:
    """The synchronous part of ``POST /v1/cases/{case_id}``: check, open, store, sign.

    Runs in a worker thread (crypto and fsync must not block the event loop).
    """

    def __init__(
        self,
        config: CentralConfig,
        key_ring: ServerKeyRing,
        store: CentralStore,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._config = config
        self._key_ring = key_ring
        self._store = store
        self._now = now or (lambda: datetime.now(UTC))

    def receive(self, path_case_id: str, body: BytesLike) -> tuple[dict[str, Any], bool]:
        """Check, open and store a whole body: :meth:`receive_stream` with one piece."""
        pieces = iter((body, None))
        return self.receive_stream(path_case_id, lambda: next(pieces))

    def receive_stream(
        self, path_case_id: str, next_piece: Callable[[], BytesLike | None]
    ) -> tuple[dict[str, Any], bool]:
        """Check, open and store the body that ``next_piece`` hands out as it arrives (None at
        its end); return the signed receipt and whether this is the case's first delivery.

        Every check the signed header decides runs once its bytes are in, before another piece
        is asked for; then each chunk is decrypted, hashed and its image bytes written to a
        temporary file as it arrives. Nothing takes its place before the payload hash is right.
        Raises an :class:`~triage_app.errors.EnvelopeError` (a refusal with its code) or a
        :class:`~triage_app.errors.StoreError` (retryable), or whatever ``next_piece`` raises.
        """
        stream = EnvelopeStream()
        try:
            header = None
            while header is None:
                piece = next_piece()
                header = stream.end_of_header() if piece is None else stream.feed_header(piece)
        except EnvelopeError as err:
            log.info("refused case %s: %s", loggable(path_case_id), err.code)
            raise
        try:
            return self._receive(path_case_id, stream, header, next_piece)
        except EnvelopeError as err:
            log.info(
                "refused case %s from device %s: %s",
                loggable(path_case_id),
                header.device_id,
                err.code,
            )
            raise

    def _receive(
        self,
        path_case_id: str,
        stream: EnvelopeStream,
        header: EnvelopeHeader,
        next_piece: Callable[[], BytesLike | None],
    ) -> tuple[dict[str, Any], bool]:
        device = self.registered_device(header.device_id)
        stream.verify(device.public_key())
        refuse_revoked(device)
        if header.case_id != path_case_id:
            raise CaseIdMismatchError(
                "the case id in the URL is not the one in the signed envelope header"
            )
        self._check_age(header.created_at)
        stream.unseal(self._key_ring.private_keys)
        self._store.check_new_envelope(header.case_id, header.device_id, header.envelope_id)
        # The image goes to a temporary file chunk by chunk; it and the small files are
        # fsynced together once the payload hash is right, and renamed with the row's commit.
        with self._store.stage_stream(header.case_id) as staged:
            if staged is None:  # stored already: the payload is checked, not written again
                splitter = PayloadSplitter(header.payload_bytes, _discard)
            else:
                image_fd = staged.begin(DICOM_FILE)
                splitter = PayloadSplitter(
                    header.payload_bytes,
                    lambda piece: staged.append(image_fd, piece, start_writeback=True),
                )
            piece: BytesLike | None = b""  # the bytes after the signature are buffered
            while piece is not None:
                stream.feed(piece, splitter)
                piece = next_piece()
            stream.finish()
            result_json = splitter.result_json()
            if staged is not None:
                staged.write({RESULT_FILE: result_json, SIGNED_HEADER_FILE: stream.signed_header})
            opened = OpenedEnvelope(
                header=header,
                signed_header=stream.signed_header,
                result_json=result_json,
                dicom=memoryview(b""),  # on disk already; accept() writes nothing for a repeat
            )
            delivery, first = self._store.accept(opened, staged)
        receipt = Receipt(
            case_id=delivery.case_id,
            device_id=delivery.device_id,
            envelope_id=delivery.envelope_id,
            payload_sha256=delivery.payload_sha256,
            received_at=parse_timestamp(delivery.received_at),
            server_id=self._key_ring.server_id,
            deliveries=delivery.deliveries,
        )
        return sign_receipt(receipt, self._key_ring.receipt_key), first

    def registered_device(self, device_id: str) -> DeviceRecord:
        """The registered device ``device_id``, revoked or not: whether it was revoked is only
        told once its signature verifies (:func:`refuse_revoked`), so that nobody else learns it.

        The id is named in the refusal only if it has the shape of one (it is client text).
        """
        if not _DEVICE_ID.fullmatch(device_id):
            raise UnknownDeviceError("the request carries no valid device id")
        device = self._store.registry.get(device_id)
        if device is None:
            raise UnknownDeviceError(f"device {device_id} is not registered with this server")
        return device

    def _check_age(self, created: datetime) -> None:
        now = self._now()
        if created < now - self._config.max_envelope_age:
            raise StaleEnvelopeError(
                f"the envelope was created more than {_days(self._config.max_envelope_age)} ago"
            )
        if created > now + MAX_CLOCK_SKEW:
            raise StaleEnvelopeError(
                f"the envelope was created more than {MAX_CLOCK_SKEW.seconds} s in the future"
            )


def create_app(
    config: CentralConfig,
    *,
    key_ring: ServerKeyRing,
    store: CentralStore,
    now: Callable[[], datetime] | None = None,
) -> FastAPI:
    """The central API over an open store and a loaded key ring.

    The central model (``config.model_dir``) is loaded and hash-checked here, so a bad bundle
    stops the server before it listens; its worker thread runs while the app runs (lifespan).
    ``now`` replaces the clock for age and signature checks (tests).
    """
    clock = now or (lambda: datetime.now(UTC))
    metrics = CentralMetrics.create(store)
    model = None if config.model_dir is None else CentralModel(config.model_dir)

    def on_verdict(verdict: Verdict) -> None:
        metrics.verdicts.labels(verdict=verdict.verdict).inc()

    worker = VerdictWorker(store, model, on_verdict=on_verdict)
    receiver = CaseReceiver(config, key_ring, store, clock)
    uploads = UploadGate(
        UploadLimits(
            max_body_bytes=config.max_body_bytes,
            idle_timeout_s=config.upload_idle_timeout_s,
            parallel=config.max_parallel_uploads,
        )
    )

    cap = ConnectionCap(config.max_connections)
    busy_log = BusyLog(config.max_connections)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            busy_log.summarise()  # refusals since the last count, not left untold
            await run_in_threadpool(worker.stop)

    app = FastAPI(
        title="triage central server",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.worker = worker

    def serving() -> bool:
        """For systemd's watchdog (``server.NotifyingServer``): run in a request thread, it
        proves that requests get a thread, the store answers and verdicts are made."""
        try:
            store.ping()
        except StoreError as err:
            log.error("watchdog not pinged: the store does not answer (%s)", err.code)
            return False
        if not worker.alive():
            log.error("watchdog not pinged: the verdict worker has stopped")
            return False
        return True

    app.state.serving = serving
    app.state.uploads = uploads
    app.state.metrics = metrics
    app.state.connection_cap = cap  # server.make_server hands it the server's connections
    metrics.admitted_connections.set_function(lambda: float(cap.admitted()))
    app.add_middleware(_TimingMiddleware, histogram=metrics.request_seconds)
    # Added last, so it runs first: a refusal is not timed as a request of some route.
    app.add_middleware(
        _ConnectionCapMiddleware,
        cap=cap,
        refusals=metrics.rejections.labels(code=SERVER_BUSY),
        busy_log=busy_log,
    )

    def reject(err: EnvelopeError) -> JSONResponse:
        metrics.rejections.labels(code=err.code).inc()
        status = STATUS_BY_CODE.get(err.code, 400)
        # The rest of such a body is not read: the connection cannot carry another request.
        headers = {"Connection": "close"} if status in (408, 413) else None
        return error_response(status, err.code, err.message, headers)

    @app.post("/v1/cases/{case_id}")
    async def post_case(case_id: str, request: Request) -> Response:
        try:
            signed, first = await uploads.receive(request, receiver.receive_stream, case_id)
        except ClientDisconnect:
            # The link dropped mid-upload: nothing was stored, and the device will send again.
            log.info("upload of case %s cut off by the client", loggable(case_id))
            return Response(status_code=400)
        except (BodyTooLargeError, BodyTimeoutError) as err:
            log.info("refused case %s: %s", loggable(case_id), err.code)
            return reject(err)
        except EnvelopeError as err:
            return reject(err)
        except StoreError as err:
            metrics.rejections.labels(code=err.code).inc()
            log.error("case %s not stored (%s): answering 503", loggable(case_id), err.code)
            return error_response(
                503,
                err.code,
                "the case could not be stored; retry later",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        if first:
            metrics.received.inc()
            worker.submit(case_id)
        else:
            metrics.duplicates.inc()
        return JSONResponse(signed, status_code=201 if first else 200)

    @app.get("/v1/cases/{case_id}/verdict")
    def get_verdict(case_id: str, request: Request) -> Response:
        device_id = request.headers.get("x-device-id", "")
        try:
            device = receiver.registered_device(device_id)
            verify_request_signature(
                device.public_key(),
                "GET",
                request.url.path,
                request.headers,
                int(clock().timestamp()),
            )
            refuse_revoked(device)
        except EnvelopeError as err:
            log.info(
                "refused verdict poll for case %s by device %s: %s",
                loggable(case_id),
                loggable(device_id),
                err.code,
            )
            return reject(err)
        case = store.get_case(case_id) if is_case_id(case_id) else None
        if case is None or case.device_id != device.device_id:
            # Another device's case is "unknown" too: its existence is not this device's business.
            return error_response(404, "unknown_case", "no such case from this device")
        if case.verdict is not None:
            return JSONResponse(case.verdict.to_json())
        failure = store.get_verdict_failure(case_id)
        if failure is not None:
            # The fixed text of its code, not the stored one: rows written by an older server
            # may hold a decoder's or OpenCV's own message.
            return error_response(422, failure.code, failure_message(failure.code))
        return JSONResponse({"case_id": case_id, "status": "pending"}, status_code=202)

    @app.get("/v1/health")
    def health(request: Request) -> dict[str, Any]:
        # Answered 200 even at the cap (ALWAYS_ANSWERED): monitoring sees a busy server, not a
        # dead one. "busy" when a request on this connection would be refused now, so that a
        # device probing the link does not send its waiting cases at once (Uploader.probe).
        # The same keys either way: clients that read only "cases" or "model" see no change.
        served = cap.would_serve(request.scope.get("client"), request.scope.get("server"))
        status = "ok" if served else "busy"
        return {"status": status, "cases": store.count(), "model": worker.model_info}

    @app.get("/v1/keys")
    def keys() -> dict[str, Any]:
        return dict(key_ring.public_info())

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return error_response(400, "bad_request", "the request is not valid")

    @app.exception_handler(StoreError)
    async def store_error(_: Request, exc: StoreError) -> Response:
        log.error("central store failed: %s", exc.code)
        return error_response(
            503,
            exc.code,
            "storage is unavailable; retry later",
            {"Retry-After": str(RETRY_AFTER_S)},
        )

    return app


def refuse_revoked(device: DeviceRecord) -> None:
    """403 ``device_revoked`` for a revoked device; call only once its signature verified."""
    if device.revoked:
        raise DeviceRevokedError(f"device {device.device_id} was revoked")


def _discard(_: memoryview) -> None:
    """The image sink of a repeat delivery: its bytes are checked, not kept."""


def loggable(identifier: str) -> str:
    """A case or device id as it may be logged; anything else a client sent is not echoed."""
    return identifier if _LOGGABLE_ID.fullmatch(identifier) else "<invalid id>"


def _days(age: timedelta) -> str:
    return f"{age.days} days" if age.days else f"{int(age.total_seconds())} s"


_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _TimingMiddleware:
    """Observe each HTTP request's duration, labelled by route template (never by case id)."""

    def __init__(
        self, app: Callable[[_Scope, _Receive, _Send], Awaitable[None]], histogram: Histogram
    ) -> None:
        self._app = app
        self._histogram = histogram

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self._app(scope, receive, send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self._histogram.labels(method=scope["method"], route=template).observe(
                time.perf_counter() - started
            )


_ConnectionKey = tuple[tuple[Any, ...], tuple[Any, ...] | None]


def _connection_key(client: Any, server: Any) -> _ConnectionKey | None:
    """A connection's identity: its client's and the server's (host, port); None if unknown."""
    if client is None:
        return None
    return tuple(client), None if server is None else tuple(server)


class ConnectionCap:
    """Which connections are served under ``CentralConfig.max_connections``.

    The rule: a connection is *admitted* by its first request that is not always answered
    (:data:`ALWAYS_ANSWERED`), if fewer than ``limit`` admitted connections are open then; it
    stays admitted, and every later request on it is served, until it closes. A request on a
    connection that is not admitted while ``limit`` are is refused (503 ``server_busy``).

    Why admission rather than "more than ``limit`` connections open" (uvicorn's rule): a
    connection being served is never refused because others opened after it, so a device's
    drain pass or a stalled upload's own connection is not cut off by a crowd; and connections
    that open and send nothing take no place (the request-head timeout closes them).

    How: the ASGI scope tells no connection apart, so a connection is known by its client's and
    the server's address (unique among open TCP connections), and one that closed is forgotten
    by comparing the admitted ones with the HTTP server's open connections (uvicorn's protocol
    objects carry the same ``client``/``server``). That pass costs one look at every open
    connection, so it runs only when the cap looks reached, at most every
    :data:`CAP_PRUNE_INTERVAL_S`; a place freed in between may be seen that much later. Until
    :meth:`watch` is given the server's connections (``server.make_server`` does; TestClient
    tests have none) there is no cap. Thread-safe: scrapes count from a worker thread.
    """

    def __init__(self, limit: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._admitted: set[_ConnectionKey] = set()
        self._open: Callable[[], Iterable[object]] | None = None
        self._pruned_at = -math.inf

    def watch(self, open_connections: Callable[[], Iterable[object]]) -> None:
        """Enforce the cap over the connections ``open_connections`` lists (objects with the
        ``client`` and ``server`` addresses of uvicorn's protocols)."""
        with self._lock:
            self._open = open_connections
            self._admitted.clear()

    def admit(self, client: Any, server: Any) -> bool:
        """Whether a request on the connection from ``client`` to ``server`` is served;
        admits the connection if it is new and there is room."""
        return self._serves(client, server, admit=True)

    def would_serve(self, client: Any, server: Any) -> bool:
        """Whether a request on the connection from ``client`` to ``server`` would be served
        now, without admitting it (``/v1/health`` says "busy" otherwise). As cheap as
        :meth:`admit`: it looks for closed connections no more often."""
        return self._serves(client, server, admit=False)

    def _serves(self, client: Any, server: Any, *, admit: bool) -> bool:
        if self._open is None:
            return True
        key = _connection_key(client, server)
        with self._lock:
            if key in self._admitted:
                return True
            if len(self._admitted) >= self.limit:
                if self._clock() - self._pruned_at < CAP_PRUNE_INTERVAL_S:
                    return False
                self._prune()
                if len(self._admitted) >= self.limit:
                    return False
            if admit and key is not None:  # no address (not TCP): served, not counted
                self._admitted.add(key)
            return True

    def admitted(self) -> int:
        """Admitted connections open now (the gauge ``triage_central_admitted_connections``)."""
        with self._lock:
            self._prune()
            return len(self._admitted)

    def _prune(self) -> None:
        if self._open is None:
            return
        try:
            connections = list(self._open())
        except RuntimeError:  # changed size while a scrape's thread copied it: stale this once
            return
        live = {
            key
            for c in connections
            if (key := _connection_key(getattr(c, "client", None), getattr(c, "server", None)))
        }
        self._admitted &= live
        self._pruned_at = self._clock()


class BusyLog:
    """The log of requests refused at the connection cap: one line when refusals begin after a
    quiet spell, then a count at most every ``interval_s``, never a line per request (a reconnect
    storm refuses thousands a second; journald would rate-limit and drop real errors).

    ``clock`` (seconds) and ``schedule`` (run a callable after a delay; the event loop's
    ``call_later`` by default, so call :meth:`refused` on it) are for tests.
    """

    def __init__(
        self,
        limit: int,
        *,
        interval_s: float = BUSY_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        schedule: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        self._limit = limit
        self._interval_s = interval_s
        self._clock = clock
        self._schedule = schedule
        self._count = 0  # refusals not yet in a summary line
        self._since = 0.0  # when the first of them came
        self._line_at: float | None = None
        self._summary_scheduled = False

    def refused(self) -> None:
        """Count one refusal; log now if no line was logged in the last interval."""
        now = self._clock()
        if self._count == 0:
            self._since = now
        self._count += 1
        if self._line_at is not None and now - self._line_at < self._interval_s:
            self._arm(now)
        elif self._count == 1:
            log.warning(
                "at the connection cap (%d connections served): requests on further"
                " connections are refused 503 %s (a count follows at most every %.0f s)",
                self._limit,
                SERVER_BUSY,
                self._interval_s,
            )
            self._line_at = now
            self._arm(now)
        else:  # the scheduled summary did not run (a test's clock): this one says it
            self.summarise()

    def _arm(self, now: float) -> None:
        """Have the refusals counted so far summarised once the interval is over."""
        if self._summary_scheduled or self._line_at is None or not self._count:
            return
        self._summary_scheduled = True
        schedule = self._schedule or asyncio.get_running_loop().call_later
        schedule(max(0.0, self._line_at + self._interval_s - now), self._scheduled_summary)

    def _scheduled_summary(self) -> None:
        self._summary_scheduled = False
        now = self._clock()
        if self._line_at is not None and now - self._line_at < self._interval_s:
            self._arm(now)  # a summary was logged meanwhile
        else:
            self.summarise()

    def summarise(self) -> None:
        """Log how many requests were refused since the last count, if any were."""
        if not self._count:
            return
        now = self._clock()
        log.warning(
            "at the connection cap (%d connections served): %d request(s) refused 503 %s in"
            " the last %.0f s; raise --max-connections or find the devices holding connections",
            self._limit,
            self._count,
            SERVER_BUSY,
            now - self._since,
        )
        self._count = 0
        self._line_at = now


class _ConnectionCapMiddleware:
    """Refuse a request 503 ``server_busy`` when :class:`ConnectionCap` does not serve its
    connection: the protocol's error body, ``Retry-After`` and ``Connection: close`` (the body
    is not kept, so the connection cannot carry another request). Pure ASGI, so that an upload
    that is served streams through untouched.

    The answer goes out before any of the body is read (a client that asked
    ``Expect: 100-continue`` gets it instead of the go-ahead). A small body is then read and
    thrown away before the connection closes (:func:`_lingers`), so that its sender, still
    sending, gets the answer rather than a reset.
    """

    def __init__(
        self,
        app: Callable[[_Scope, _Receive, _Send], Awaitable[None]],
        cap: ConnectionCap,
        refusals: Counter,
        busy_log: BusyLog,
    ) -> None:
        self._app = app
        self._cap = cap
        self._refusals = refusals
        self._busy_log = busy_log
        self._rng = random.Random()

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if (
            scope["type"] != "http"
            or (scope["method"], scope["path"]) in ALWAYS_ANSWERED
            or self._cap.admit(scope.get("client"), scope.get("server"))
        ):
            await self._app(scope, receive, send)
            return
        self._refusals.inc()
        self._busy_log.refused()
        retry_after = self._rng.randint(*BUSY_RETRY_AFTER_S)
        response = error_response(
            503,
            SERVER_BUSY,
            f"the server is serving its maximum of {self._cap.limit} connections; retry later",
            {"Retry-After": str(retry_after), "Connection": "close"},
        )
        if not _lingers(scope):
            await response(scope, receive, send)
            return
        start = {"type": "http.response.start", "status": 503, "headers": response.raw_headers}
        await send(start)
        await send({"type": "http.response.body", "body": response.body, "more_body": True})
        await _discard_body(receive)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _lingers(scope: _Scope) -> bool:
    """Whether a refused request's body is read before its connection closes: only one that
    declares a length of at most :data:`BUSY_LINGER_BYTES` and is sent without waiting for a
    go-ahead (``Expect: 100-continue``: that client sends nothing more after the 503)."""
    length: int | None = None
    for name, value in scope.get("headers", ()):
        if name in (b"expect", b"transfer-encoding"):
            return False
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            length = int(text) if text.isdigit() else None
    return length is not None and 0 < length <= BUSY_LINGER_BYTES


async def _discard_body(receive: _Receive) -> None:
    """Read and throw away a refused request's body: at most :data:`BUSY_LINGER_BYTES`, for
    at most :data:`BUSY_LINGER_S`, then the connection is closed whatever is left."""
    read = 0
    with suppress(TimeoutError):
        async with asyncio.timeout(BUSY_LINGER_S):
            while read <= BUSY_LINGER_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                read += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
