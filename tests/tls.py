"""Throwaway TLS material for tests: a CA, a server certificate for loopback, client certificates.

Tests need real certificates to prove what the transport trusts (a pin, a CA file) and what it
refuses (a wrong pin, a stranger's self-signed certificate). Nothing here is fit for production:
keys are written unencrypted and live only as long as the test's temporary folder.
EC P-256 keys keep generation fast enough to make fresh material per test.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES: tuple[x509.GeneralName, ...] = (
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
    x509.IPAddress(ipaddress.IPv6Address("::1")),
)


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA certificate and key kept in memory so it can issue more certificates."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path


@dataclass(frozen=True)
class ServerMaterial:
    """What a test server loads and what a client is configured with.

    ``fingerprint_sha256`` is the lower-case hex SHA-256 of the server certificate's DER, the
    value a client pins. ``ca_cert`` is the issuing CA (for a self-signed certificate it is the
    certificate itself).
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path
    fingerprint_sha256: str


@dataclass(frozen=True)
class ClientMaterial:
    cert: Path
    key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _validity() -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=2)


def make_ca(folder: Path, name: str = "test-ca") -> CertificateAuthority:
    """A self-signed CA written to ``folder/<name>.pem``."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    not_before, not_after = _validity()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = folder / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CertificateAuthority(name=name, cert=cert, key=key, cert_path=cert_path)


def _leaf(
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: CertificateAuthority | None,
    usage: x509.ObjectIdentifier,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(x509.SubjectAlternativeName(LOOPBACK_NAMES), critical=False)
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    return builder.sign(issuer.key if issuer else key, hashes.SHA256())


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """Lower-case hex SHA-256 of the certificate's DER: what the transport pins."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def make_server(
    folder: Path, name: str = "server", ca: CertificateAuthority | None = None
) -> ServerMaterial:
    """A server certificate for localhost/127.0.0.1/::1, issued by ``ca``.

    Without ``ca`` a fresh CA named ``<name>-ca`` is made. Files: ``<name>.pem``,
    ``<name>.key``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    authority = ca if ca is not None else make_ca(folder, f"{name}-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf("localhost", key, authority, ExtendedKeyUsageOID.SERVER_AUTH)
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return ServerMaterial(authority.cert_path, cert_path, key_path, fingerprint_sha256(cert))


def make_self_signed_server(folder: Path, name: str = "stranger") -> ServerMaterial:
    """A server certificate that is its own issuer: valid names, trusted by nobody."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf("localhost", key, None, ExtendedKeyUsageOID.SERVER_AUTH)
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return ServerMaterial(cert_path, cert_path, key_path, fingerprint_sha256(cert))


def make_client(folder: Path, ca: CertificateAuthority, name: str = "client") -> ClientMaterial:
    """A client certificate issued by ``ca``, for servers that require mutual TLS."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(name, key, ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return ClientMaterial(cert_path, key_path)
