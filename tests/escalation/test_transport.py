"""The HTTPS transport against a real TLS server on loopback, with real network faults.

What must hold: the device talks only to the server its config authenticates (pin and/or CA
file, whatever the environment says), sends nothing to any other, never hangs, and turns every
answer into the outcome the uploader acts on (stored, retry later, quarantine).
"""

from __future__ import annotations

import gc
import json
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.fault_proxy import FaultProxy
from tests.tls import (
    ClientMaterial,
    ServerMaterial,
    make_ca,
    make_client,
    make_self_signed_server,
    make_server,
)
from triage_app.errors import (
    CertificatePinError,
    ConfigError,
    PermanentRejectionError,
    TransportError,
)
from triage_app.escalation.transport import (
    CentralClient,
    PostOutcome,
    RetryableTransportError,
    ServerRejectionError,
    TransportConfig,
    VerdictOutcome,
    make_session,
    retry_after_of,
)

CASE_ID = "ab" * 32
ENVELOPE = b"TRGENV\x00\x01" + bytes(range(256)) * 16
RECEIPT = {"receipt": {"case_id": CASE_ID, "deliveries": 1}, "signature": "c2ln"}


# --- a scripted HTTPS server ------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, obj: object, **headers: str) -> Reply:
    return Reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **headers})


def error_reply(status: int, code: str, message: str, **headers: str) -> Reply:
    return json_reply(status, {"error": {"code": code, "message": message}}, **headers)


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request stderr lines."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            with self.server.lock:
                self.server.incomplete += 1
            self.close_connection = True
            return
        recorded = Recorded(self.command, self.path, dict(self.headers.items()), body)
        reply = self.server.record(recorded)
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)
        self.close_connection = True

    do_GET = _answer  # noqa: N815 - http.server's naming
    do_POST = _answer  # noqa: N815


class ScriptedServer(ThreadingHTTPServer):
    """Answers from a queue of scripted replies (then ``default``) and records every complete
    request; TLS is done per connection in the handler thread so one slow client cannot stall
    the accept loop."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, ssl_context: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.ssl_context = ssl_context
        self.lock = threading.Lock()
        self.replies: deque[Reply] = deque()
        self.default = json_reply(201, RECEIPT)
        self.requests: list[Recorded] = []
        self.handshake_failures = 0
        self.incomplete = 0
        self.errors = 0

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def script(self, *replies: Reply) -> None:
        with self.lock:
            self.replies.extend(replies)

    def record(self, request: Recorded) -> Reply:
        with self.lock:
            self.requests.append(request)
            return self.replies.popleft() if self.replies else self.default

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(5.0)
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except OSError:
            with self.lock:
                self.handshake_failures += 1
            return
        try:
            _Handler(tls, client_address, self)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Dropped and cut connections are the point of some tests: count, don't print."""
        with self.lock:
            self.errors += 1


def server_context(material: ServerMaterial, client_ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(material.server_cert, material.server_key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    return context


@contextmanager
def serving(context: ssl.SSLContext | None) -> Iterator[ScriptedServer]:
    server = ScriptedServer(context)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --- fixtures ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Material:
    main: ServerMaterial  # the real central server, issued by CA "main-ca"
    other: ServerMaterial  # a different server with its own CA "other-ca"
    stranger: ServerMaterial  # self-signed, trusted by nobody
    client: ClientMaterial  # issued by "client-ca"
    client_ca: Path


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    folder = tmp_path_factory.mktemp("tls")
    client_ca = make_ca(folder, "client-ca")
    return Material(
        main=make_server(folder, "main"),
        other=make_server(folder, "other"),
        stranger=make_self_signed_server(folder),
        client=make_client(folder, client_ca),
        client_ca=client_ca.cert_path,
    )


@pytest.fixture
def server(material: Material) -> Iterator[ScriptedServer]:
    with serving(server_context(material.main)) as scripted:
        yield scripted


@pytest.fixture
def stranger_server(material: Material) -> Iterator[ScriptedServer]:
    with serving(server_context(material.stranger)) as scripted:
        yield scripted


def pinned(port: int, pin: str, **kwargs: Any) -> TransportConfig:
    return TransportConfig(f"https://127.0.0.1:{port}", pinned_sha256=pin, **kwargs)


@contextmanager
def client_for(config: TransportConfig, **kwargs: Any) -> Iterator[CentralClient]:
    with CentralClient(config, **kwargs) as central:
        yield central


def post(config: TransportConfig, envelope: bytes = ENVELOPE) -> PostOutcome:
    with client_for(config) as central:
        return central.post_case(CASE_ID, envelope)


# --- configuration ----------------------------------------------------------------------------


def test_plain_http_is_refused_unless_loopback_and_allowed() -> None:
    with pytest.raises(ConfigError, match="https"):
        TransportConfig("http://central.example.org", allow_http_for_loopback=True)
    with pytest.raises(ConfigError, match="https"):
        TransportConfig("http://127.0.0.1:8080")
    for host in ("127.0.0.1", "[::1]", "localhost"):
        assert not TransportConfig(f"http://{host}:8080", allow_http_for_loopback=True).is_https


def test_https_needs_a_pin_or_a_ca_file() -> None:
    with pytest.raises(ConfigError, match="pinned_sha256") as caught:
        TransportConfig("https://central.example.org")
    assert "ca_file" in str(caught.value)


def test_pin_is_normalised_and_validated(material: Material) -> None:
    fingerprint = material.main.fingerprint_sha256
    colons = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    assert pinned(1, colons).pin == fingerprint
    for bad in ("abc", fingerprint[:-2], "zz" * 32, fingerprint + "00"):
        with pytest.raises(ConfigError, match="pinned_sha256"):
            pinned(1, bad)


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"base_url": "https://user:pw@central.example.org"}, "credentials"),
        ({"base_url": "ftp://central.example.org"}, "base_url"),
        ({"base_url": "https://central.example.org/?x=1"}, "query"),
        ({"base_url": "https://central.example.org:99999"}, "port"),
        ({"read_timeout_s": True}, "read_timeout_s"),
        ({"client_key": Path("k.pem")}, "client_key"),
        ({"connect_timeout_s": 0}, "connect_timeout_s"),
        ({"read_timeout_s": float("inf")}, "read_timeout_s"),
    ],
)
def test_other_config_mistakes_name_the_field(kwargs: dict[str, Any], field_name: str) -> None:
    settings: dict[str, Any] = {
        "base_url": "https://central.example.org",
        "pinned_sha256": "a" * 64,
    }
    with pytest.raises(ConfigError, match=field_name):
        TransportConfig(**{**settings, **kwargs})


def test_session_ignores_the_environment(tmp_path: Path) -> None:
    config = TransportConfig("https://central.example.org", pinned_sha256="a" * 64)
    session = make_session(config)
    try:
        assert session.trust_env is False
        assert session.proxies == {}
    finally:
        session.close()
    with pytest.raises(ConfigError, match="ca_file"):
        make_session(
            TransportConfig("https://central.example.org", ca_file=tmp_path / "missing.pem")
        )


# --- who the device trusts --------------------------------------------------------------------


def test_the_pinned_server_gets_the_envelope(material: Material, server: ScriptedServer) -> None:
    outcome = post(pinned(server.port, material.main.fingerprint_sha256))
    assert outcome == PostOutcome(status=201, body=RECEIPT, retry_after_s=None)
    [request] = server.requests
    assert (request.method, request.path) == ("POST", f"/v1/cases/{CASE_ID}")
    assert request.body == ENVELOPE
    assert request.headers["Content-Type"] == "application/octet-stream"


@pytest.mark.expect_log_warnings
def test_a_wrong_pin_fails_closed_before_sending(
    material: Material, server: ScriptedServer
) -> None:
    with pytest.raises(CertificatePinError) as caught:
        post(pinned(server.port, material.other.fingerprint_sha256))
    # One line naming the setting to fix and the fingerprint the server showed.
    assert str(caught.value) == (
        f"upload: the certificate of https://127.0.0.1:{server.port} does not match "
        f"escalation.tls_pin (its SHA-256 fingerprint is {material.main.fingerprint_sha256}); "
        "nothing was sent. If it is the server's (compare with the tls_pin `central make-cert` "
        "printed there), set escalation.tls_pin to it"
    )
    assert caught.value.code == "certificate_pin_mismatch"
    assert server.requests == []
    assert server.incomplete == 0


@pytest.mark.expect_log_warnings
def test_pin_and_ca_file_must_both_hold(material: Material, server: ScriptedServer) -> None:
    both = pinned(server.port, material.main.fingerprint_sha256, ca_file=material.main.ca_cert)
    assert post(both).status == 201
    right_ca_wrong_pin = pinned(
        server.port, material.other.fingerprint_sha256, ca_file=material.main.ca_cert
    )
    with pytest.raises(CertificatePinError):
        post(right_ca_wrong_pin)
    right_pin_wrong_ca = pinned(
        server.port, material.main.fingerprint_sha256, ca_file=material.other.ca_cert
    )
    with pytest.raises(CertificatePinError):
        post(right_pin_wrong_ca)
    assert len(server.requests) == 1


def test_the_environment_hazard_is_real(
    material: Material, server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: a default session lets REQUESTS_CA_BUNDLE override its own ``verify``
    (psf/requests#3829), which is why the transport turns ``trust_env`` off."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(material.main.ca_cert))
    with requests.Session() as naive:
        naive.verify = str(material.other.ca_cert)  # should refuse the main server...
        answer = naive.get(f"https://127.0.0.1:{server.port}/v1/health", timeout=5)
    assert answer.status_code == 201  # ...but the environment won


@pytest.mark.expect_log_warnings
def test_ca_bundle_variables_do_not_override_the_pin(
    material: Material, server: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(name, str(material.other.ca_cert))
    assert post(pinned(server.port, material.main.fingerprint_sha256)).status == 201
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(name, str(material.main.ca_cert))  # would trust this server
    with pytest.raises(CertificatePinError):
        post(pinned(server.port, material.other.fingerprint_sha256))
    assert len(server.requests) == 1


def test_ca_file_accepts_its_own_server(material: Material, server: ScriptedServer) -> None:
    config = TransportConfig(f"https://127.0.0.1:{server.port}", ca_file=material.main.ca_cert)
    assert post(config).status == 201
    localhost = TransportConfig(f"https://localhost:{server.port}", ca_file=material.main.ca_cert)
    assert post(localhost).status == 201


@pytest.mark.expect_log_warnings
def test_ca_file_refuses_a_self_signed_stranger(
    material: Material, stranger_server: ScriptedServer
) -> None:
    config = TransportConfig(
        f"https://127.0.0.1:{stranger_server.port}", ca_file=material.main.ca_cert
    )
    with pytest.raises(CertificatePinError, match=r"not trusted by escalation\.ca_file"):
        post(config)
    assert stranger_server.requests == []


@pytest.mark.expect_log_warnings
def test_ca_bundle_variables_do_not_change_the_ca_file_decision(
    material: Material,
    server: ScriptedServer,
    stranger_server: ScriptedServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(name, str(material.stranger.ca_cert))
    # The environment trusts only the stranger: the real server is still accepted...
    good = TransportConfig(f"https://127.0.0.1:{server.port}", ca_file=material.main.ca_cert)
    assert post(good).status == 201
    # ...and the stranger is still refused.
    bad = TransportConfig(
        f"https://127.0.0.1:{stranger_server.port}", ca_file=material.main.ca_cert
    )
    with pytest.raises(CertificatePinError):
        post(bad)
    assert stranger_server.requests == []


def test_a_per_request_verify_cannot_switch_pinning_off(
    material: Material, server: ScriptedServer
) -> None:
    session = make_session(pinned(server.port, material.other.fingerprint_sha256))
    try:
        for verify in (False, str(material.main.ca_cert)):
            with pytest.raises(requests.exceptions.SSLError, match="Fingerprints did not match"):
                session.get(f"https://127.0.0.1:{server.port}/v1/health", verify=verify, timeout=5)
    finally:
        session.close()
    assert server.requests == []


def test_client_certificate_for_mutual_tls(material: Material) -> None:
    context = server_context(material.main, client_ca=material.client_ca)
    with serving(context) as mtls:
        with_cert = pinned(
            mtls.port,
            material.main.fingerprint_sha256,
            client_cert=material.client.cert,
            client_key=material.client.key,
        )
        assert post(with_cert).status == 201
        with pytest.raises(TransportError) as caught:
            post(pinned(mtls.port, material.main.fingerprint_sha256))
        assert not isinstance(caught.value, CertificatePinError | PermanentRejectionError)
        assert len(mtls.requests) == 1


# --- answers ----------------------------------------------------------------------------------


@pytest.fixture
def central(material: Material, server: ScriptedServer) -> Iterator[CentralClient]:
    config = pinned(server.port, material.main.fingerprint_sha256)
    fixed_now = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
    with client_for(config, clock=lambda: fixed_now) as client:
        yield client


def test_a_repeat_delivery_is_a_success(central: CentralClient, server: ScriptedServer) -> None:
    server.script(json_reply(200, RECEIPT))
    assert central.post_case(CASE_ID, ENVELOPE).status == 200


@pytest.mark.parametrize(
    ("reply", "retry_after"),
    [
        (error_reply(503, "storage_unavailable", "disk full", **{"Retry-After": "7"}), 7.0),
        (Reply(429, headers={"Retry-After": "Sun, 22 Nov 2026 10:01:30 GMT"}), 90.0),
        (Reply(408), None),
        (Reply(500, b"<html>oops</html>", {"Retry-After": "soon"}), None),
        (Reply(502, headers={"Retry-After": "-3"}), 0.0),
    ],
    ids=["503-seconds", "429-http-date", "408", "500-garbage", "502-negative"],
)
def test_retryable_statuses_carry_retry_after(
    central: CentralClient, server: ScriptedServer, reply: Reply, retry_after: float | None
) -> None:
    server.script(reply)
    with pytest.raises(RetryableTransportError) as caught:
        central.post_case(CASE_ID, ENVELOPE)
    error = caught.value
    assert isinstance(error, TransportError)
    assert not isinstance(error, PermanentRejectionError)
    assert (error.status, error.retry_after_s) == (reply.status, retry_after)
    assert retry_after_of(error) == retry_after
    assert "\n" not in str(error)


@pytest.mark.parametrize(
    ("reply", "server_code"),
    [
        (error_reply(400, "envelope_malformed", "bad magic\nat offset 0"), "envelope_malformed"),
        (error_reply(401, "bad_signature", "signature does not verify"), "bad_signature"),
        (error_reply(409, "replayed_envelope", "seen before"), "replayed_envelope"),
        (Reply(413, b"too big"), "http_413"),
        (error_reply(422, "envelope_tampered", "chunk 3 fails"), "envelope_tampered"),
    ],
)
def test_other_client_errors_are_permanent(
    central: CentralClient, server: ScriptedServer, reply: Reply, server_code: str
) -> None:
    server.script(reply)
    with pytest.raises(ServerRejectionError) as caught:
        central.post_case(CASE_ID, ENVELOPE)
    error = caught.value
    assert isinstance(error, PermanentRejectionError)
    assert error.code == "rejected"
    assert (error.status, error.server_code) == (reply.status, server_code)
    assert server_code in str(error)
    assert "\n" not in str(error)
    assert retry_after_of(error) is None


def test_error_messages_never_carry_the_payload(
    central: CentralClient, server: ScriptedServer
) -> None:
    secret = b"PATIENT-SECRET-PAYLOAD"
    server.script(error_reply(400, "envelope_malformed", "nope"), Reply(503))
    for _ in range(2):
        with pytest.raises(TransportError) as caught:
            central.post_case(CASE_ID, secret)
        assert "PATIENT" not in str(caught.value)


def test_redirects_are_never_followed(central: CentralClient, server: ScriptedServer) -> None:
    server.script(Reply(307, headers={"Location": "/v1/elsewhere"}))
    with pytest.raises(RetryableTransportError, match="307") as caught:
        central.post_case(CASE_ID, ENVELOPE)
    assert caught.value.status == 307
    assert [r.path for r in server.requests] == [f"/v1/cases/{CASE_ID}"]


def test_a_success_without_a_json_receipt_is_retried(
    central: CentralClient, server: ScriptedServer
) -> None:
    server.script(Reply(201, b"stored!"), json_reply(201, ["not", "an", "object"]))
    for _ in range(2):
        with pytest.raises(RetryableTransportError, match="JSON"):
            central.post_case(CASE_ID, ENVELOPE)


def test_an_oversized_answer_is_refused(central: CentralClient, server: ScriptedServer) -> None:
    server.script(Reply(201, b"x" * (1024 * 1024 + 10)))
    with pytest.raises(RetryableTransportError, match="larger"):
        central.post_case(CASE_ID, ENVELOPE)


def test_case_ids_cannot_escape_the_path(central: CentralClient, server: ScriptedServer) -> None:
    for bad in ("../keys", "a/b", "", "x" * 129, "a%2fb"):
        with pytest.raises(ValueError, match="case_id"):
            central.post_case(bad, ENVELOPE)
    assert server.requests == []


def test_verdict_polling(central: CentralClient, server: ScriptedServer) -> None:
    verdict = {"case_id": CASE_ID, "verdict": "abnormal", "score": 0.91, "model": {}}
    server.script(
        json_reply(200, verdict),
        json_reply(202, {"status": "pending"}),
        Reply(202),
        error_reply(404, "unknown_case", "no such case"),
        error_reply(401, "bad_signature", "timestamp too far off"),
        Reply(503, headers={"Retry-After": "2"}),
    )
    headers = {"X-Device-Id": "dev-0123456789abcdef", "X-Timestamp": "1", "X-Signature": "c2ln"}
    assert central.get_verdict(CASE_ID, headers) == VerdictOutcome(200, verdict)
    assert central.get_verdict(CASE_ID, headers) == VerdictOutcome(202, {"status": "pending"})
    assert central.get_verdict(CASE_ID, headers) == VerdictOutcome(202, {})
    assert central.get_verdict(CASE_ID, headers).status == 404
    with pytest.raises(ServerRejectionError, match="bad_signature"):
        central.get_verdict(CASE_ID, headers)
    with pytest.raises(RetryableTransportError) as caught:
        central.get_verdict(CASE_ID, headers)
    assert caught.value.retry_after_s == 2.0
    first = server.requests[0]
    assert (first.method, first.path) == ("GET", f"/v1/cases/{CASE_ID}/verdict")
    assert first.headers["X-Device-Id"] == "dev-0123456789abcdef"
    assert first.headers["X-Signature"] == "c2ln"


def test_keys_and_health(central: CentralClient, server: ScriptedServer) -> None:
    keys = {"server_key_id": "0" * 16, "server_public_key": "AAAA", "retired_key_ids": []}
    server.script(json_reply(200, keys), json_reply(200, {"status": "ok", "cases": 3}), Reply(500))
    assert central.get_keys() == keys
    assert central.health() == {"status": "ok", "cases": 3}
    with pytest.raises(RetryableTransportError):
        central.health()
    assert [r.path for r in server.requests] == ["/v1/keys", "/v1/health", "/v1/health"]


# --- network faults ---------------------------------------------------------------------------


@pytest.fixture
def proxied(
    material: Material, server: ScriptedServer
) -> Iterator[tuple[FaultProxy, CentralClient]]:
    with FaultProxy("127.0.0.1", server.port) as proxy:
        config = pinned(
            proxy.port,
            material.main.fingerprint_sha256,
            connect_timeout_s=0.5,
            read_timeout_s=0.5,
        )
        with client_for(config) as client:
            yield proxy, client


def expect_network_error(call: Callable[[], object], within_s: float = 3.0) -> TransportError:
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        call()
    assert time.monotonic() - started < within_s
    error = caught.value
    assert isinstance(error, RetryableTransportError)
    assert error.status is None
    assert error.retry_after_s is None
    assert "\n" not in str(error)
    return error


def test_through_the_proxy_everything_works(
    proxied: tuple[FaultProxy, CentralClient], server: ScriptedServer
) -> None:
    proxy, client = proxied
    assert client.post_case(CASE_ID, ENVELOPE).status == 201
    assert server.requests[0].body == ENVELOPE
    assert proxy.bytes_up > len(ENVELOPE)


def test_a_silent_server_times_out_during_the_handshake(
    proxied: tuple[FaultProxy, CentralClient], server: ScriptedServer
) -> None:
    proxy, client = proxied
    proxy.blackhole()
    error = expect_network_error(lambda: client.post_case(CASE_ID, ENVELOPE))
    assert "timed out" in str(error)
    assert server.requests == []


def test_a_silent_server_hits_the_read_timeout() -> None:
    """Over plain loopback HTTP the request is written, so the read timeout is what fires."""
    with serving(None) as plain, FaultProxy("127.0.0.1", plain.port) as proxy:
        proxy.blackhole()
        config = TransportConfig(
            f"http://127.0.0.1:{proxy.port}",
            allow_http_for_loopback=True,
            connect_timeout_s=5,
            read_timeout_s=0.5,
        )
        with client_for(config) as client:
            error = expect_network_error(lambda: client.post_case(CASE_ID, ENVELOPE))
        assert "timed out waiting for" in str(error)
        assert proxy.stats().bytes_discarded > len(ENVELOPE)
        assert plain.requests == []


def test_refused_connections(proxied: tuple[FaultProxy, CentralClient]) -> None:
    proxy, client = proxied
    proxy.refuse()
    error = expect_network_error(lambda: client.post_case(CASE_ID, ENVELOPE))
    # Where (the origin with its scheme and port) and the system's reason, in words.
    assert str(error) == (
        f"upload: cannot reach https://127.0.0.1:{proxy.port}: connection refused (ECONNREFUSED)"
    )
    proxy.pass_through()
    assert client.post_case(CASE_ID, ENVELOPE).status == 201


def test_a_name_that_does_not_resolve_says_so(material: Material) -> None:
    """``.invalid`` never resolves (RFC 6761); the path of the URL is never in the message."""
    config = TransportConfig(
        "https://central.invalid/site-a", pinned_sha256=material.main.fingerprint_sha256
    )
    with client_for(config) as client:
        error = expect_network_error(client.health, within_s=30)
    assert str(error).startswith(
        "health check: cannot reach https://central.invalid:443: name not resolved ("
    ), error
    assert "site-a" not in str(error)


def test_reset_connections(
    proxied: tuple[FaultProxy, CentralClient], server: ScriptedServer
) -> None:
    proxy, client = proxied
    proxy.reset()
    # Repeated, because the RST sometimes lands before the TLS wrap: CPython < 3.11.8 then
    # abandons an open SSLSocket (python/cpython#113280) that the transport must close.
    for _ in range(10):
        error = expect_network_error(lambda: client.post_case(CASE_ID, ENVELOPE))
        assert "cannot reach" in str(error)
    del error
    expect_network_error(client.health)
    gc.collect()
    assert server.requests == []


def test_a_drop_in_the_middle_of_an_upload(
    proxied: tuple[FaultProxy, CentralClient], server: ScriptedServer
) -> None:
    proxy, client = proxied
    big = ENVELOPE * 128  # 512 KiB: the cut lands well inside the body
    proxy.cut_after(16 * 1024)
    expect_network_error(lambda: client.post_case(CASE_ID, big))
    assert proxy.bytes_up == 16 * 1024
    assert server.requests == []
    proxy.pass_through()
    assert client.post_case(CASE_ID, big).status == 201
    assert server.requests[-1].body == big
