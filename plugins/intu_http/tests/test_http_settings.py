"""The ``http:`` block: defaults, addresses, loopback unless ``allow_remote``, the token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from intu_http.settings import HttpSettings, parse_http_settings

from intu_core.config.problems import Problems
from intu_core.config.section import Section


def parse(data: dict[str, Any]) -> tuple[HttpSettings, list[str]]:
    problems = Problems()
    settings = parse_http_settings(Section(data, file=Path("intu.yaml"), path="http", problems=problems))
    return settings, [str(p) for p in problems]


def test_defaults_listen_on_loopback_port_8080_without_a_token() -> None:
    assert parse({}) == (HttpSettings("127.0.0.1", 8080, "", False), [])


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [("localhost:9000", "localhost", 9000), ("[::1]:8080", "::1", 8080), ("127.0.0.2:0", "127.0.0.2", 0)],
)
def test_loopback_addresses(listen: str, host: str, port: int) -> None:
    settings, problems = parse({"listen": listen})
    assert problems == [] and (settings.host, settings.port) == (host, port)


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:8080", "intu.example.org:8080"])
def test_an_address_other_hosts_reach_needs_allow_remote(listen: str) -> None:
    _, problems = parse({"listen": listen})
    assert len(problems) == 1 and problems[0].startswith("intu.yaml: http.listen: ")
    assert "allow_remote: true" in problems[0]
    settings, problems = parse({"listen": listen, "allow_remote": True})
    assert problems == [] and settings.allow_remote


@pytest.mark.parametrize(
    ("listen", "why"),
    [
        ("8080", "expected host:port"),
        ("127.0.0.1:http", "expected a port from 0 to 65535"),
        ("127.0.0.1:70000", "expected a port from 0 to 65535"),
        ("::1:8080", "put an IPv6 address in brackets"),
    ],
)
def test_malformed_addresses(listen: str, why: str) -> None:
    _, problems = parse({"listen": listen})
    assert len(problems) == 1 and why in problems[0]


def test_a_short_token_and_an_unknown_key_are_errors() -> None:
    _, problems = parse({"token": "secret", "tokn": "x"})
    assert any("http.token: expected at least 16 characters, found 6" in p for p in problems)
    assert any("unknown key 'tokn' (did you mean 'token'?)" in p for p in problems)
