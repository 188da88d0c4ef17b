"""The ``http:`` block of ``intu.yaml``: where ``intu serve`` serves the API, metrics and health::

    http:
      listen: "127.0.0.1:8080"       # host:port ([::1]:8080 for IPv6); loopback unless allow_remote
      token: "${INTU_HTTP_TOKEN}"    # operator actions (retry, purge) need "Authorization: Bearer <token>"
      allow_remote: false            # true to listen on an address other hosts can reach

Without the block there is no HTTP server. Without ``token`` (or with an empty one) everything
can be read and nothing changed: operator actions answer 403. The server holds patient
identifiers (the message history), so it refuses an address that is not loopback unless
``allow_remote: true`` says that other hosts are meant to reach it (put TLS and access control
in front of it, in a reverse proxy).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from intu_core.config.section import Section

DEFAULT_LISTEN = "127.0.0.1:8080"
# The one host name accepted without allow_remote: anything else needs a DNS answer to judge.
_LOOPBACK_NAMES = frozenset({"localhost"})
# A token shorter than this is guessable by anyone who can reach the port.
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class HttpSettings:
    """The parsed ``http:`` block (see the module docstring)."""

    host: str = "127.0.0.1"
    port: int = 8080
    token: str = ""
    allow_remote: bool = False

    @property
    def listen(self) -> str:
        """``host:port`` as written in ``intu.yaml`` (brackets around an IPv6 address)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as a pair; ``ValueError`` with what is wrong."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port (e.g. {DEFAULT_LISTEN}), found {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"put an IPv6 address in brackets ([::1]:8080), found {text!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected a port from 0 to 65535 after the ':', found {text!r}")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address or ``localhost``) can only be reached from this machine."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def parse_http_settings(section: Section) -> HttpSettings:
    """The ``http:`` block; problems go to ``section`` (file, line and key path)."""
    listen = section.str("listen", DEFAULT_LISTEN)
    token = section.str("token", "") or ""
    allow_remote = section.bool("allow_remote", False)
    host, port = HttpSettings.host, HttpSettings.port
    if listen is not None:
        try:
            host, port = parse_listen(listen)
        except ValueError as exc:
            section.error("listen", str(exc))
        else:
            if not allow_remote and not is_loopback(host):
                section.error(
                    "listen",
                    f"{listen!r} can be reached from other hosts, and the API shows patient"
                    " identifiers: listen on 127.0.0.1 (the default), or set allow_remote: true"
                    " and protect it (a reverse proxy with TLS)",
                )
    if token and len(token) < MIN_TOKEN_LENGTH:
        section.error(
            "token",
            f"expected at least {MIN_TOKEN_LENGTH} characters, found {len(token)}: a short token is"
            " guessed (e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)",
        )
    section.done()
    return HttpSettings(host=host, port=port, token=token, allow_remote=bool(allow_remote))


__all__ = ["DEFAULT_LISTEN", "HttpSettings", "is_loopback", "parse_http_settings", "parse_listen"]
