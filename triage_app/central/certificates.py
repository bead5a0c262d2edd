"""A self-signed server certificate for a central server that has no CA-issued one.

Devices pin the certificate's SHA-256, so a self-signed certificate is as trustworthy as a
CA-issued one once its fingerprint is in the device settings; it is what the demo uses on
loopback and what a site can start with (``triage-app central make-cert``). The key is written
0600 and never leaves the server's data folder.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from triage_app.paths import ensure_private_dir, write_private_file

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServerCertificate:
    """Where the certificate and key are, and the fingerprint devices pin."""

    cert: Path
    key: Path
    sha256: str  # lower-case hex SHA-256 of the certificate's DER


def fingerprint(cert_pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def make_self_signed(
    folder: Path, hosts: Sequence[str] = DEFAULT_HOSTS, *, days: int = 825
) -> ServerCertificate:
    """Write ``server-cert.pem`` and ``server-key.pem`` (0600) for ``hosts`` into ``folder``."""
    ensure_private_dir(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = dt.datetime.now(dt.UTC)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = folder / "server-cert.pem", folder / "server-key.pem"
    write_private_file(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    write_private_file(cert_path, cert_pem)
    return ServerCertificate(cert_path, key_path, fingerprint(cert_pem))
