"""A self-signed server certificate for a central server that has no CA-issued one.

Devices pin the certificate's SHA-256, so a self-signed certificate is as trustworthy as a
CA-issued one once its fingerprint is in the device settings; it is what the demo uses on
loopback and what a site can start with (``triage-app central make-cert``). The key is written
0600 and never leaves the server's data folder. A new certificate has a new fingerprint, which cuts
off every device until its pin is changed: an existing pair is replaced only when asked to.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from triage_app.central.errors import CertificateExistsError
from triage_app.errors import ConfigError
from triage_app.paths import (
    ensure_private_dir,
    fsync_dir,
    remove_abandoned_temps,
    write_locked_temp,
)

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CERT_NAME = "server-cert.pem"
KEY_NAME = "server-key.pem"


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
    folder: Path, hosts: Sequence[str] = DEFAULT_HOSTS, *, days: int = 825, force: bool = False
) -> ServerCertificate:
    """Write ``server-cert.pem`` and ``server-key.pem`` (0600) for ``hosts`` into ``folder``.

    Raises :class:`CertificateExistsError` if either is there already, unless ``force``. Both
    are written and fsynced under temporary names before either takes its place, so a failure
    or crash while writing leaves the old pair; only a crash between the two renames could
    leave the new key with the old certificate.
    """
    ensure_private_dir(folder)
    cert_path, key_path = folder / CERT_NAME, folder / KEY_NAME
    existing = [path.name for path in (key_path, cert_path) if os.path.lexists(path)]
    if existing and not force:
        raise CertificateExistsError(
            f"{folder} already holds {' and '.join(existing)}; devices pin that certificate, "
            "so replacing it (--force) needs the new tls_pin on every device"
        )
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
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        remove_abandoned_temps(folder, for_suffixes=(KEY_NAME, CERT_NAME))  # an earlier crash's
        _write_pair(key_path, key_pem, cert_path, cert_pem)
    except OSError as exc:
        raise ConfigError(
            f"central: could not write the TLS key and certificate in {folder} ({exc.strerror})"
        ) from exc
    return ServerCertificate(cert_path, key_path, fingerprint(cert_pem))


def _write_pair(key_path: Path, key_pem: bytes, cert_path: Path, cert_pem: bytes) -> None:
    """Both files in full and fsynced first, then both renames: the pair changes together."""
    key_tmp, key_fd = write_locked_temp(key_path.parent, key_path.name, key_pem)
    try:
        cert_tmp, cert_fd = write_locked_temp(cert_path.parent, cert_path.name, cert_pem)
        try:
            key_tmp.replace(key_path)
            cert_tmp.replace(cert_path)
        finally:
            cert_tmp.unlink(missing_ok=True)  # gone after the rename; debris after a failure
            os.close(cert_fd)
    finally:
        key_tmp.unlink(missing_ok=True)
        os.close(key_fd)
    fsync_dir(key_path.parent)
