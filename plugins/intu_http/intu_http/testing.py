"""Test support for the HTTP side (no pytest at import): requests that return every status as a
value, and validation of answers against the schemas of ``openapi.json``.

    status, headers, body = request(port, "GET", "/api/v1/destinations")
    check_schema(body, "#/paths/~1destinations/get/responses/200")
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from intu_http.server import OPENAPI_FILE


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, headers (lower-case names), body parsed as JSON when it is JSON."""

    status: int
    headers: Mapping[str, str]
    body: Any
    raw: bytes


def request(
    port: int,
    method: str,
    path: str,
    *,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    timeout: float = 30.0,
) -> Answer:
    """``method path`` on ``host:port``; ``token`` sends ``Authorization: Bearer <token>``."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, headers=sent)
        response = conn.getresponse()
        raw = response.read()
        got = {name.lower(): value for name, value in response.getheaders()}
    finally:
        conn.close()
    body: Any = raw
    if got.get("content-type", "").startswith("application/json") and raw:
        body = json.loads(raw)
    return Answer(response.status, got, body, raw)


def openapi() -> dict[str, Any]:
    """The OpenAPI description the server serves."""
    return json.loads(OPENAPI_FILE.read_text())


def check_schema(body: Any, pointer: str) -> None:
    """Validate ``body`` against the schema at JSON pointer ``pointer`` of ``openapi.json`` (a
    response, ``#/paths/~1messages/get/responses/200``, or a schema, ``#/components/schemas/Error``);
    ``jsonschema.ValidationError`` says where it differs. Needs the ``test`` extra (jsonschema)."""
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    document = openapi()
    target: Any = document
    for part in pointer.lstrip("#/").split("/"):
        target = target[part.replace("~1", "/").replace("~0", "~")]
    if "content" in target:  # a response object: its JSON schema
        target = target["content"]["application/json"]["schema"]
    uri = "urn:intu:openapi"
    registry: Registry[Any] = Registry().with_resource(uri, Resource.from_contents(document, DRAFT202012))
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:intu:check", **target}
    schema = json.loads(json.dumps(schema).replace('"#/components/', f'"{uri}#/components/'))
    jsonschema.Draft202012Validator(schema, registry=registry).validate(body)


__all__ = ["Answer", "check_schema", "openapi", "request"]
