"""TLS for DICOM associations, both sides: the settings types and their parsers, SSL contexts,
and clear words for TLS failures. Shared by the destination (client) and the source (server), and
usable by any other plugin that speaks DICOM over TLS.

Host names: the client verifies the peer's certificate against ``host`` as configured
(``check_hostname``). DICOM peers are often addressed by IP; Python's ``ssl`` matches an IP
address against the certificate's IP subjectAltName entries (not the CN), so a PACS addressed as
``10.1.2.3`` needs ``IP:10.1.2.3`` in its certificate. We never turn verification off.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from intu_core import Section


@dataclass(frozen=True)
class TlsClientSettings:
    """TLS for a requestor: the server verified with ``ca_cert``, optional client certificate."""

    enabled: bool = False
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None


@dataclass(frozen=True)
class TlsServerSettings:
    """TLS for a DICOM listener: our certificate and, for mutual TLS, the CA of the clients."""

    enabled: bool = False
    cert: Path | None = None
    key: Path | None = None
    ca_cert: Path | None = None
    require_client_cert: bool = False


# -- parsing -------------------------------------------------------------------------------------


def _cert_file(section: Section, key: str, enabled: bool) -> Path | None:
    """The path at ``key``; checked to be an existing file only when TLS is ``enabled`` (a
    disabled block may keep paths for later, as the source's ``tls`` block may)."""
    if not section.has(key):
        section.raw(key)  # mark as read
        return None
    path = section.path(key, None, must_exist=enabled)
    if enabled and path is not None and path.exists() and not path.is_file():
        section.error(key, f"expected a file, found a directory ({path})")
    return path


def parse_tls_client(section: Section) -> TlsClientSettings:
    """Parse a requestor's ``tls:`` block, recording every problem in ``section``."""
    enabled = bool(section.bool("enabled", False))
    ca_cert = _cert_file(section, "ca_cert", enabled)
    client_cert = _cert_file(section, "client_cert", enabled)
    client_key = _cert_file(section, "client_key", enabled)
    if section.has("client_cert") and not section.has("client_key"):
        section.error(
            "client_cert",
            "expected tls.client_key with tls.client_cert (the private key of the client "
            "certificate), found client_cert alone",
        )
    if section.has("client_key") and not section.has("client_cert"):
        section.error(
            "client_key",
            "expected tls.client_cert with tls.client_key (the client certificate), found client_key alone",
        )
    if enabled and not section.has("ca_cert"):
        section.error(
            None,
            "expected tls.ca_cert when tls.enabled is true (the CA that signed the PACS's "
            "certificate, used to verify it), found none",
        )
    section.done()
    return TlsClientSettings(enabled, ca_cert, client_cert, client_key)


def parse_tls_server(section: Section) -> TlsServerSettings:
    """Parse a listener's ``tls:`` block, recording every problem in ``section``."""
    enabled = bool(section.bool("enabled", False))
    # Certificate files only have to exist when TLS is on.
    cert = section.path("cert", None, must_exist=enabled)
    key = section.path("key", None, must_exist=enabled)
    ca_cert = section.path("ca_cert", None, must_exist=enabled)
    require_client_cert = bool(section.bool("require_client_cert", False))
    if enabled:
        if cert is None:
            section.error(None, "missing required key 'cert' (our certificate, PEM) when TLS is enabled")
        if key is None:
            section.error(None, "missing required key 'key' (our private key, PEM) when TLS is enabled")
        if require_client_cert and ca_cert is None:
            section.error(
                "require_client_cert",
                "require_client_cert needs 'ca_cert' (the CA that signs client certificates)",
            )
    section.done()
    return TlsServerSettings(enabled, cert, key, ca_cert, require_client_cert)


# -- contexts and errors -------------------------------------------------------------------------


class TlsConfigError(ValueError):
    """A certificate, key or CA file cannot be used; the message names the file and why."""


def _check_file(label: str, path: Path | None) -> Path:
    if path is None:
        raise TlsConfigError(f"{label}: not configured")
    path = Path(path)
    if not path.is_file():
        raise TlsConfigError(f"{label} {path}: no such file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise TlsConfigError(f"{label} {path}: cannot be read ({exc.strerror})") from None
    return path


def _load_ca(ctx: ssl.SSLContext, label: str, path: Path | None) -> None:
    path = _check_file(label, path)
    try:
        ctx.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, ValueError) as exc:
        raise TlsConfigError(f"{label} {path}: not a PEM CA certificate ({_reason(exc)})") from None


def _load_chain(
    ctx: ssl.SSLContext, cert_label: str, cert: Path | None, key_label: str, key: Path | None
) -> None:
    cert = _check_file(cert_label, cert)
    key = _check_file(key_label, key)
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as exc:
        reason = _reason(exc)
        if "KEY_VALUES_MISMATCH" in reason.upper() or "key values mismatch" in reason:
            raise TlsConfigError(f"{key_label} {key}: does not match the certificate {cert}") from None
        if "PEM" in reason.upper() or "NO_START_LINE" in reason.upper():
            raise TlsConfigError(
                f"{cert_label} {cert} / {key_label} {key}: not a PEM certificate and unencrypted PEM "
                f"private key ({reason})"
            ) from None
        raise TlsConfigError(f"{cert_label} {cert} / {key_label} {key}: cannot be used ({reason})") from None


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else str(exc)


def client_context(tls: TlsClientSettings) -> ssl.SSLContext:
    """An SSL context for the destination: TLS 1.2+, the server verified against ``ca_cert``
    (certificate chain and host name/IP), the client certificate offered when configured."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    _load_ca(ctx, "tls.ca_cert", tls.ca_cert)
    if tls.client_cert is not None or tls.client_key is not None:
        _load_chain(ctx, "tls.client_cert", tls.client_cert, "tls.client_key", tls.client_key)
    return ctx


def server_context(tls: TlsServerSettings) -> ssl.SSLContext:
    """An SSL context for a DICOM listener: TLS 1.2+, our certificate and key; client
    certificates verified against ``ca_cert`` (required when ``require_client_cert``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, "tls.cert", tls.cert, "tls.key", tls.key)
    if tls.ca_cert is not None:
        _load_ca(ctx, "tls.ca_cert", tls.ca_cert)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    elif tls.require_client_cert:
        raise TlsConfigError("tls.require_client_cert: needs tls.ca_cert to verify client certificates")
    return ctx


# X509 verify codes (OpenSSL x509_vfy.h) and what the user should do about each.
_VERIFY_ADVICE = {
    10: "the server's certificate has expired: the PACS needs a renewed certificate",
    9: "the server's certificate is not yet valid: check the clocks of both machines",
    18: "the server's certificate is self-signed and not in tls.ca_cert: add it to tls.ca_cert",
    19: "the server's certificate chain is signed by an unknown CA: set tls.ca_cert to the CA "
    "that signed the PACS's certificate",
    20: "the server's certificate is signed by an unknown CA: set tls.ca_cert to the CA that "
    "signed the PACS's certificate",
    21: "the server's certificate is signed by an unknown CA: set tls.ca_cert to the CA that "
    "signed the PACS's certificate",
    62: "the server's certificate does not name the configured host: use the host name or IP "
    "the certificate was issued for (subjectAltName), or have it reissued",
    64: "the server's certificate does not name the configured IP address (no matching IP "
    "subjectAltName): use the host name it was issued for, or have it reissued",
}


def describe_tls_error(exc: BaseException, address: str) -> tuple[bool, str]:
    """(retryable, sentence) for an error raised while connecting with TLS to ``address``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", None)
        message = getattr(exc, "verify_message", "") or _reason(exc)
        advice = _VERIFY_ADVICE.get(code or -1, "check tls.ca_cert and the PACS's certificate")
        return False, f"TLS certificate verification of {address} failed ({message}): {advice}"
    reason = _reason(exc)
    if isinstance(exc, (ssl.SSLEOFError, ConnectionResetError)) or "EOF" in reason:
        return True, (
            f"TLS handshake with {address} failed: the peer closed the connection during the "
            f"handshake ({reason}); is this a plain (non-TLS) DICOM port, or does the peer require "
            "a client certificate (tls.client_cert)?"
        )
    if "WRONG_VERSION_NUMBER" in reason.upper() or "wrong version number" in reason:
        return False, (
            f"TLS handshake with {address} failed: the peer does not speak TLS ({reason}); it is "
            "probably a plain DICOM port: check the port or set tls.enabled: false"
        )
    if "ALERT" in reason.upper():
        return False, (
            f"TLS handshake with {address} failed: the peer refused it ({reason}); check the "
            "client certificate (tls.client_cert/client_key) and the TLS versions the peer allows"
        )
    return True, f"TLS error with {address}: {reason}"
