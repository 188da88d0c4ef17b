"""A throw-away PKI for TLS tests: a CA, server and client certificates, and the bad cases."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server cert for 127.0.0.1/localhost, a client cert, an expired server cert, a
    server cert for another name, and an unrelated CA; all PEM files."""
    # cryptography is a test dependency only: imported when a PKI is made.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    out: dict[str, Path] = {}

    def key() -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(name: str, k: Any) -> None:
        path = folder / f"{name}.key"
        path.write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        out[f"{name}_key"] = path

    def write_cert(name: str, cert: Any) -> None:
        path = folder / f"{name}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[name] = path

    def ca(name: str) -> tuple[Any, Any]:
        k = key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(k, hashes.SHA256())
        )
        return k, cert

    def leaf(
        ca_key: Any, ca_cert: Any, cn: str, sans: list[Any], *, expired: bool = False, client: bool = False
    ) -> Any:
        k = key()
        before = now - datetime.timedelta(days=10 if expired else 1)
        after = now - datetime.timedelta(days=1) if expired else now + datetime.timedelta(days=30)
        usage = (
            x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(before)
            .not_valid_after(after)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return k, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = ca("intu test CA")
    write_cert("ca", ca_cert)
    _, other_ca = ca("some other CA")
    write_cert("other_ca", other_ca)
    local = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    leaves: list[tuple[str, str, list[Any], bool, bool]] = [
        ("server", "pacs", local, False, False),
        ("expired", "pacs", local, True, False),
        ("wrong_host", "pacs.example.org", [x509.DNSName("pacs.example.org")], False, False),
        ("client", "INTU_SCU", [], False, True),
    ]
    for name, cn, sans, expired, client in leaves:
        k, cert = leaf(ca_key, ca_cert, cn, sans, expired=expired, client=client)
        write_cert(name, cert)
        write_key(name, k)
    return out
