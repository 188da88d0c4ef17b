"""The users' guide documents every setting and route of the HTTP plugin."""

from __future__ import annotations

from pathlib import Path

from intu_http import parse_http_settings
from intu_http.testing import openapi

from intu_core.testing.docs import markdown_section, undocumented_settings

GUIDE = (Path(__file__).resolve().parents[3] / "docs" / "guide.md").read_text()
SECTION = markdown_section(GUIDE, "The HTTP API, metrics and health")


def test_every_setting_is_documented() -> None:
    assert undocumented_settings(parse_http_settings, SECTION) == []


def test_every_route_of_the_openapi_description_is_documented() -> None:
    for path, operations in openapi()["paths"].items():
        if path == "/openapi.json":
            continue
        for method in operations:
            assert f"{method.upper()} /api/v1{path}" in SECTION, (method, path)
    for route in ("GET /metrics", "GET /healthz", "GET /readyz"):
        assert route in SECTION
