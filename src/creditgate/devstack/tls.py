"""A throwaway certificate authority for the secure dev stack.

`issue_tls_files(folder, password)` writes, once per stack:

    ca.pem            the CA certificate: what clients trust (CREDITGATE_*_CA_FILE)
    server.pem        the servers' certificate, signed by the CA, for 127.0.0.1 and localhost
    server-key.pem    its private key (Redis reads it; mode 0600)
    server.p12        the same key and certificate as a PKCS#12 keystore, for Kafka

The CA's own key is never written: nothing signs anything after `up`, and a CA key
lying in a work tree is the one file here that could do harm elsewhere.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Long enough for any local session; short enough that a leaked file soon stops mattering.
_VALID_DAYS = 30
# A little slack before "now", so a clock a few seconds behind accepts a fresh certificate.
_BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path
    keystore_file: Path  # PKCS#12, protected by the keystore password


def tls_files(folder: Path) -> TlsFiles:
    return TlsFiles(
        ca_file=folder / "ca.pem",
        cert_file=folder / "server.pem",
        key_file=folder / "server-key.pem",
        keystore_file=folder / "server.p12",
    )


def issue_tls_files(folder: Path, keystore_password: str) -> TlsFiles:
    """Create a CA and a server certificate signed by it, unless they exist already."""
    files = tls_files(folder)
    if all(
        path.is_file()
        for path in (files.ca_file, files.cert_file, files.key_file, files.keystore_file)
    ):
        return files
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "creditgate dev stack CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    server_cert = (
        _builder(server_name, ca_name, server_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # Clients check the address they dialled against these names: the stack
        # advertises 127.0.0.1, and people type localhost.
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                    x509.DNSName("localhost"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    _write(files.ca_file, ca_cert.public_bytes(pem), private=False)
    _write(files.cert_file, server_cert.public_bytes(pem), private=False)
    _write(
        files.key_file,
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        private=True,
    )
    # Java reads PKCS#12 with AES and PBKDF2 (what BestAvailableEncryption picks).
    _write(
        files.keystore_file,
        pkcs12.serialize_key_and_certificates(
            b"kafka",
            server_key,
            server_cert,
            [ca_cert],
            serialization.BestAvailableEncryption(keystore_password.encode()),
        ),
        private=True,
    )
    return files


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
    )


def _write(path: Path, data: bytes, *, private: bool) -> None:
    # Private files are created 0600 from the start, never chmod-ed after the fact.
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
