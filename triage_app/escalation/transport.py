"""HTTPS transport to the central server: pinned TLS, strict timeouts, classified answers.

The uploader must never send a case to the wrong server and must never hang, so this layer

- builds ``requests`` sessions whose trust comes only from :class:`TransportConfig`: a pinned
  SHA-256 fingerprint of the server certificate and/or a CA file. ``trust_env`` is off because
  ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` would otherwise silently replace ``Session.verify``
  (psf/requests#3829), and proxies from the environment are ignored for the same reason;
- checks the pin during the TLS handshake, before a single byte of the request is written
  (urllib3's ``assert_fingerprint``), and fails closed with :class:`CertificatePinError`;
- always passes (connect, read) timeouts and never follows redirects;
- turns every answer into either a result or one of three errors the uploader acts on:
  :class:`RetryableTransportError` (network trouble, 408, 429, 5xx; back off and retry, honouring
  ``retry_after_s``), :class:`ServerRejectionError` (other 4xx: quarantine the envelope) and
  :class:`CertificatePinError` (wrong server: keep the case, alert).

Error messages are one line and never contain the envelope, headers or response bodies beyond
the server's own error code and message.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import re
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import SSLError as Urllib3SSLError

from triage_app.config import is_loopback_host
from triage_app.errors import (
    CertificatePinError,
    ConfigError,
    PermanentRejectionError,
    TransportError,
)
from triage_app.escalation.backoff import parse_retry_after

if TYPE_CHECKING:
    from requests.adapters import _HostParams, _PoolKwargs

log = logging.getLogger(__name__)

#: Answers are small JSON documents (receipts, verdicts, keys); anything bigger is refused so a
#: broken or hostile server cannot exhaust the device's memory.
MAX_ANSWER_BYTES: Final = 1 << 20
#: Statuses that say "not now" rather than "never" (protocol: 408, 429 and 5xx are retried).
RETRYABLE_CLIENT_STATUSES: Final = frozenset({408, 429})

_PIN_RE = re.compile(r"[0-9a-f]{64}")
_CASE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_GOT_FINGERPRINT_RE = re.compile(r'got "([0-9a-fA-F]+)"')
# urllib3.util.ssl_.assert_fingerprint's messages: the only way urllib3 2.x reports a pin
# mismatch is an SSLError with one of these texts (see _pin_failure).
_URLLIB3_PIN_MESSAGES: Final = ("Fingerprints did not match", "No certificate for the peer")


class RetryableTransportError(TransportError):
    """The attempt failed for a reason that may go away: retry later with backoff.

    ``status`` is the HTTP status (``None`` for network errors and timeouts);
    ``retry_after_s`` is the server's ``Retry-After`` in seconds, if it sent a usable one.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class ServerRejectionError(PermanentRejectionError):
    """The server refused the request for good (a 4xx other than 408/429).

    ``server_code`` is the protocol's error code from the body (``"bad_signature"``, ...) or
    ``"http_<status>"`` when the body has none; ``server_message`` is the server's one line.
    """

    def __init__(self, message: str, *, status: int, server_code: str, server_message: str) -> None:
        super().__init__(message)
        self.status = status
        self.server_code = server_code
        self.server_message = server_message


def retry_after_of(error: BaseException) -> float | None:
    """The server's ``Retry-After`` carried by a transport error, or ``None``."""
    value = getattr(error, "retry_after_s", None)
    return float(value) if isinstance(value, int | float) else None


def http_status_of(error: BaseException) -> int | None:
    """The HTTP status a transport error came with, or ``None`` when no answer came (network
    trouble, a timeout, a certificate that is not the pinned one).

    An answer, whatever its status, means the link to the server works: the uploader keeps
    "offline" for errors without one.
    """
    value = getattr(error, "status", None)
    return value if isinstance(value, int) else None


def normalize_fingerprint(value: str) -> str:
    """Lower-case hex without colons or spaces; raises ``ConfigError`` unless it is SHA-256."""
    cleaned = "".join(value.split()).replace(":", "").lower()
    if not _PIN_RE.fullmatch(cleaned):
        raise ConfigError(
            "pinned_sha256 must be the 64 hex digits of the SHA-256 of the server certificate "
            "(DER), colons allowed"
        )
    return cleaned


@dataclass(frozen=True)
class TransportConfig:
    """Where the central server is and what proves it is the real one.

    ``pinned_sha256`` is the SHA-256 of the server certificate's DER (hex, any case, colons
    allowed). With only a pin, chain validation is replaced by the pin (a self-signed server
    certificate is fine); with only ``ca_file`` the chain and host name are validated against
    that file alone; with both, both must hold. Plain ``http`` is refused unless
    ``allow_http_for_loopback`` is set and the host is loopback (local tests and demos).
    """

    base_url: str
    pinned_sha256: str | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    allow_http_for_loopback: bool = False
    _pin: str | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").lower()
        if scheme not in {"https", "http"} or not host:
            raise ConfigError(
                f"base_url must be an https:// URL with a host, got {self.base_url!r}"
            )
        try:
            parts.port  # noqa: B018 - urlsplit validates the port lazily
        except ValueError as exc:
            raise ConfigError(f"base_url has an invalid port: {self.base_url!r}") from exc
        if parts.username is not None or parts.password is not None:
            raise ConfigError("base_url must not contain credentials")
        if parts.query or parts.fragment:
            raise ConfigError("base_url must not have a query or fragment")
        if scheme == "http":
            if not (self.allow_http_for_loopback and is_loopback_host(host)):
                raise ConfigError(
                    "base_url must use https (plain http is allowed only for a loopback host "
                    "with allow_http_for_loopback)"
                )
            if self.pinned_sha256 is not None or self.ca_file is not None:
                raise ConfigError("pinned_sha256 and ca_file need an https base_url")
        elif self.pinned_sha256 is None and self.ca_file is None:
            raise ConfigError(
                "an https base_url needs pinned_sha256 (server certificate fingerprint) or "
                "ca_file (CA bundle) to authenticate the server"
            )
        if self.pinned_sha256 is not None:
            object.__setattr__(self, "_pin", normalize_fingerprint(self.pinned_sha256))
        if self.client_key is not None and self.client_cert is None:
            raise ConfigError("client_key is set but client_cert is not")
        for name in ("connect_timeout_s", "read_timeout_s"):
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")

    @property
    def is_https(self) -> bool:
        return urlsplit(self.base_url).scheme.lower() == "https"

    @property
    def pin(self) -> str | None:
        """The normalised fingerprint (lower-case hex, no colons) or ``None``."""
        return self._pin

    @property
    def timeout(self) -> tuple[float, float]:
        return (float(self.connect_timeout_s), float(self.read_timeout_s))

    @property
    def origin(self) -> str:
        """``scheme://host:port`` for messages, the port always written out (the usual mistake
        is a URL without the server's port) and never the path (it may carry a case id)."""
        parts = urlsplit(self.base_url)
        scheme = parts.scheme.lower()
        port = parts.port or (443 if self.is_https else 80)
        host = (parts.hostname or "").lower()
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _tls_pool_kwargs(config: TransportConfig) -> dict[str, Any]:
    """urllib3 pool settings that implement the config's trust decision, and nothing else."""
    kwargs: dict[str, Any] = {"ca_cert_dir": None}
    if config.ca_file is not None:
        kwargs["cert_reqs"] = "CERT_REQUIRED"
        kwargs["ca_certs"] = str(config.ca_file)
    else:
        # The pin replaces chain validation; the fingerprint check below is what fails closed.
        kwargs["cert_reqs"] = "CERT_NONE"
        kwargs["ca_certs"] = None
    kwargs["assert_fingerprint"] = config.pin
    kwargs["cert_file"] = str(config.client_cert) if config.client_cert else None
    kwargs["key_file"] = str(config.client_key) if config.client_key else None
    return kwargs


class PinnedHTTPSAdapter(HTTPAdapter):
    """An adapter whose TLS trust is fixed by the config, whatever a caller passes as ``verify``.

    ``requests`` rebuilds each pool's TLS settings from the per-request ``verify``/``cert``
    (``build_connection_pool_key_attributes`` and ``cert_verify``); both are overridden so no
    code path (a stray ``verify=True``, an environment bundle) can swap in another trust store.
    """

    def __init__(self, config: TransportConfig) -> None:
        # Set before super().__init__, which calls init_poolmanager.
        self._tls = _tls_pool_kwargs(config)
        super().__init__(max_retries=0)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **{**pool_kwargs, **self._tls})

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        return super().proxy_manager_for(proxy, **{**proxy_kwargs, **self._tls})

    def build_connection_pool_key_attributes(
        self,
        request: requests.PreparedRequest,
        verify: bool | str | None,
        cert: str | tuple[str, str] | None = None,
    ) -> tuple[_HostParams, _PoolKwargs]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, False, None
        )
        # The stubs' TypedDict has no assert_fingerprint; urllib3 accepts it as a pool key.
        cast("dict[str, Any]", pool_kwargs).update(self._tls)
        return host_params, pool_kwargs

    def cert_verify(
        self,
        conn: Any,
        url: str,
        verify: bool | str | None,
        cert: str | tuple[str, str] | None,
    ) -> None:
        for name, value in self._tls.items():
            setattr(conn, name, value)


def make_session(config: TransportConfig) -> requests.Session:
    """A ``requests.Session`` that trusts exactly what ``config`` says and nothing from the
    environment (no CA bundle variables, no proxies, no .netrc)."""
    for name in ("ca_file", "client_cert", "client_key"):
        path: Path | None = getattr(config, name)
        if path is not None and not path.is_file():
            raise ConfigError(f"{name} {path} does not exist or is not a file")
    session = requests.Session()
    session.trust_env = False
    session.verify = str(config.ca_file) if config.ca_file is not None else True
    session.headers["User-Agent"] = "triage-app-uploader/1"
    if config.is_https:
        session.mount("https://", PinnedHTTPSAdapter(config))
    session.mount("http://", HTTPAdapter(max_retries=0))
    return session


@dataclass(frozen=True)
class PostOutcome:
    """A stored case: 201 (first delivery) or 200 (repeat) and the receipt JSON."""

    status: int
    body: dict[str, Any]
    retry_after_s: float | None


@dataclass(frozen=True)
class VerdictOutcome:
    """200 (verdict in ``body``), 202 (still pending) or 404 (the server does not know it)."""

    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Mapping[str, str]
    content: bytes


def _exception_chain(error: BaseException, *, implicit: bool = True) -> Iterator[BaseException]:
    """Every exception reachable from ``error`` through urllib3 ``reason``, args and causes.

    ``requests`` wraps urllib3's ``MaxRetryError`` (whose ``reason`` holds the real error) in its
    own exceptions' ``args``, so the standard ``__cause__`` chain alone does not reach it.
    ``implicit`` also follows ``__context__`` (errors that were being handled at the time), which
    finds more but includes noise such as a probe's ``ENOTCONN`` behind a reset.
    """
    seen: set[int] = set()
    queue: deque[BaseException] = deque([error])
    while queue:
        current = queue.popleft()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked: list[object] = [getattr(current, "reason", None), *current.args, current.__cause__]
        if implicit:
            linked.append(current.__context__)
        queue.extend(item for item in linked if isinstance(item, BaseException))


def _pin_failure(error: BaseException) -> tuple[str, str | None] | None:
    """``(kind, detail)`` when ``error`` is a certificate the config does not trust, else None.

    urllib3 2.x reports a fingerprint mismatch as ``urllib3.exceptions.SSLError("Fingerprints
    did not match. Expected ..., got ...")`` raised after the handshake and before the request
    is written; requests wraps it as ``requests.exceptions.SSLError``. There is no dedicated
    exception type, so the message is matched. Chain or host name failures against the CA file
    surface as ``ssl.SSLCertVerificationError``.
    """
    for item in _exception_chain(error):
        if isinstance(item, Urllib3SSLError) and any(
            str(item).startswith(text) for text in _URLLIB3_PIN_MESSAGES
        ):
            match = _GOT_FINGERPRINT_RE.search(str(item))
            return "pin", match.group(1).lower() if match else None
        if isinstance(item, ssl.SSLCertVerificationError):
            return "ca", item.verify_message or item.reason or str(item)
    return None


def _close_orphaned_tls_sockets(error: BaseException) -> None:
    """Close an ``ssl.SSLSocket`` that CPython created and then abandoned while failing.

    Before 3.11.8/3.12.2 (python/cpython#113280), ``SSLSocket._create`` took over the TCP
    socket and then let an error from its "is it connected?" probe escape without closing it,
    e.g. when the peer's RST arrives before the handshake. Nothing else holds that object, so
    the file descriptor stayed open until garbage collection (with a ``ResourceWarning``). The
    object is only reachable from the traceback; closing it there is always safe.
    """
    for item in _exception_chain(error):
        tb = item.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_code.co_name == "_create" and frame.f_globals.get("__name__") == "ssl":
                orphan = frame.f_locals.get("self")
                if isinstance(orphan, ssl.SSLSocket):
                    orphan.close()
            tb = tb.tb_next


def _root_cause(error: BaseException) -> BaseException:
    """The most specific underlying error (socket or TLS level) for a one-line message."""
    wrappers = ("requests.", "urllib3.")
    plain = [
        item
        for item in _exception_chain(error, implicit=False)
        if isinstance(item, OSError) and not type(item).__module__.startswith(wrappers)
    ]
    return plain[-1] if plain else error


def _os_reason(cause: BaseException) -> str:
    """What the operating system said, in words an admin reads: ``connection refused
    (ECONNREFUSED)``, ``name not resolved (Name or service not known)``, ...; the exception's
    type and text for anything else."""
    if isinstance(cause, socket.gaierror):
        return f"name not resolved ({_one_line(cause.strerror or str(cause))})"
    if isinstance(cause, ssl.SSLError):  # its errno is OpenSSL's, not the system's
        return f"TLS error ({_one_line(cause.reason or str(cause))})"
    if isinstance(cause, TimeoutError) and cause.errno is None:
        return "timed out"
    if isinstance(cause, OSError) and isinstance(cause.errno, int):
        symbol = errno.errorcode.get(cause.errno)
        if symbol is not None and cause.strerror:
            return f"{cause.strerror[:1].lower()}{cause.strerror[1:]} ({symbol})"
    return f"{type(cause).__name__}: {_one_line(str(cause))}"


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class CentralClient:
    """Calls the central API (docs/escalation-protocol.md) and classifies every outcome.

    Pass ``session`` only to share one made by :func:`make_session`; the client's guarantees
    (pinning, no environment trust) come from that function. ``clock`` turns an HTTP-date
    ``Retry-After`` into seconds. Use one client per thread: ``requests`` does not promise that
    a session is thread-safe.
    """

    def __init__(
        self,
        config: TransportConfig,
        session: requests.Session | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.config = config
        self._owns_session = session is None
        self._session = session if session is not None else make_session(config)
        self._base = config.base_url.rstrip("/")
        self._clock = clock or (lambda: datetime.now(UTC))

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> CentralClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- API --------------------------------------------------------------------------------

    def post_case(self, case_id: str, envelope: bytes | memoryview) -> PostOutcome:
        """Upload one envelope. Returns on 200/201; raises on anything else (see module doc)."""
        path = f"/v1/cases/{_checked_case_id(case_id)}"
        answer = self._request(
            "POST",
            path,
            what="upload",
            data=envelope,
            headers={"Content-Type": "application/octet-stream"},
        )
        if answer.status in (200, 201):
            return PostOutcome(
                status=answer.status,
                body=self._json_object(answer, "upload"),
                retry_after_s=self._retry_after(answer),
            )
        raise self._status_error(answer, "upload")

    def get_verdict(self, case_id: str, headers: Mapping[str, str]) -> VerdictOutcome:
        """Poll a verdict with the signed headers (``X-Device-Id``, ``X-Timestamp``,
        ``X-Signature``) the caller computed."""
        path = f"/v1/cases/{_checked_case_id(case_id)}/verdict"
        answer = self._request("GET", path, what="verdict poll", headers=dict(headers))
        if answer.status == 200:
            return VerdictOutcome(200, self._json_object(answer, "verdict poll"))
        if answer.status in (202, 404):
            return VerdictOutcome(answer.status, self._json_object_or_empty(answer))
        raise self._status_error(answer, "verdict poll")

    def get_keys(self) -> dict[str, Any]:
        """The server's public keys (``GET /v1/keys``), read over the pinned connection."""
        answer = self._request("GET", "/v1/keys", what="key fetch")
        if answer.status == 200:
            return self._json_object(answer, "key fetch")
        raise self._status_error(answer, "key fetch")

    def health(self) -> dict[str, Any]:
        answer = self._request("GET", "/v1/health", what="health check")
        if answer.status == 200:
            return self._json_object(answer, "health check")
        raise self._status_error(answer, "health check")

    # --- plumbing ---------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        data: bytes | memoryview | None = None,
        headers: dict[str, str] | None = None,
    ) -> _Answer:
        try:
            with self._session.request(
                method,
                self._base + path,
                # A memoryview (a mapped spool file) is sent in one piece like bytes (urllib3's
                # body_to_chunks takes any buffer); the type stubs only name bytes.
                data=cast("bytes | None", data),
                headers=headers,
                timeout=self.config.timeout,
                allow_redirects=False,
                stream=True,
            ) as response:
                content = self._read_capped(response, what)
                log.debug("%s %s: HTTP %d", what, self.config.origin, response.status_code)
                return _Answer(response.status_code, response.headers, content)
        except requests.RequestException as exc:
            _close_orphaned_tls_sockets(exc)
            raise self._network_error(exc, what) from exc

    def _read_capped(self, response: requests.Response, what: str) -> bytes:
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(chunk_size=64 * 1024):
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise RetryableTransportError(
                    f"{what}: answer from {self.config.origin} is larger than "
                    f"{MAX_ANSWER_BYTES} bytes",
                    status=response.status_code,
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _network_error(self, exc: requests.RequestException, what: str) -> TransportError:
        origin = self.config.origin
        failure = _pin_failure(exc)
        if failure is not None:
            kind, detail = failure
            if kind == "pin":
                found = (
                    f"its SHA-256 fingerprint is {detail}"
                    if detail
                    else "it presented no certificate"
                )
                log.warning(
                    "%s: the certificate of %s is not the pinned one (%s)", what, origin, found
                )
                return CertificatePinError(
                    f"{what}: the certificate of {origin} does not match escalation.tls_pin "
                    f"({found}); nothing was sent. If it is the server's (compare with the "
                    "tls_pin `central make-cert` printed there), set escalation.tls_pin to it"
                )
            log.warning("%s: certificate of %s is not trusted: %s", what, origin, detail)
            return CertificatePinError(
                f"{what}: the certificate of {origin} is not trusted by escalation.ca_file "
                f"({_one_line(detail or 'verification failed')}); nothing was sent"
            )
        if isinstance(exc, requests.Timeout):
            phase = "connecting to" if isinstance(exc, requests.ConnectTimeout) else "waiting for"
            reason = f"timed out {phase} {origin}"
        else:
            reason = f"cannot reach {origin}: {_os_reason(_root_cause(exc))}"
        log.debug("%s failed: %s", what, reason)
        return RetryableTransportError(f"{what}: {reason}")

    def _retry_after(self, answer: _Answer) -> float | None:
        return parse_retry_after(answer.headers.get("Retry-After"), self._clock())

    def _status_error(self, answer: _Answer, what: str) -> TransportError:
        status = answer.status
        origin = self.config.origin
        if status in RETRYABLE_CLIENT_STATUSES or status >= 500:
            retry_after = self._retry_after(answer)
            code, message = _error_body(answer)
            detail = f" {code}" if code else ""
            log.debug("%s: HTTP %d%s from %s", what, status, detail, origin)
            return RetryableTransportError(
                f"{what}: {origin} answered HTTP {status}{detail}"
                + (f", retry after {retry_after:g} s" if retry_after is not None else ""),
                status=status,
                retry_after_s=retry_after,
            )
        if 400 <= status < 500:
            code, message = _error_body(answer)
            server_code = code or f"http_{status}"
            log.info("%s: %s refused it with HTTP %d %s", what, origin, status, server_code)
            return ServerRejectionError(
                f"{what}: {origin} refused it with HTTP {status} {server_code}"
                + (f": {message}" if message else ""),
                status=status,
                server_code=server_code,
                server_message=message,
            )
        return RetryableTransportError(
            f"{what}: unexpected HTTP {status} from {origin}", status=status
        )

    def _json_object(self, answer: _Answer, what: str) -> dict[str, Any]:
        parsed = _parse_json_object(answer.content)
        if parsed is None:
            raise RetryableTransportError(
                f"{what}: HTTP {answer.status} from {self.config.origin} is not a JSON object",
                status=answer.status,
            )
        return parsed

    @staticmethod
    def _json_object_or_empty(answer: _Answer) -> dict[str, Any]:
        return _parse_json_object(answer.content) or {}


def _checked_case_id(case_id: str) -> str:
    """Refuse ids that could change the URL path (slashes, dots, percent signs...)."""
    if not _CASE_ID_RE.fullmatch(case_id):
        raise ValueError("case_id must be 1-128 characters of [A-Za-z0-9_-]")
    return case_id


def _parse_json_object(content: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _error_body(answer: _Answer) -> tuple[str, str]:
    """The protocol's ``{"error": {"code", "message"}}``; empty strings when absent."""
    parsed = _parse_json_object(answer.content) or {}
    error = parsed.get("error")
    if not isinstance(error, dict):
        return "", ""
    code = error.get("code")
    message = error.get("message")
    return (
        _one_line(code, 64) if isinstance(code, str) else "",
        _one_line(message) if isinstance(message, str) else "",
    )
