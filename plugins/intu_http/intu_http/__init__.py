"""intu-http: the HTTP side of ``intu serve``: a JSON API (with its OpenAPI description),
Prometheus metrics, health checks and the web dashboard, on one loopback port by default.

``intu.yaml`` turns it on with an ``http:`` block (``settings.py``)::

    http:
      listen: "127.0.0.1:8080"
      token: "${INTU_HTTP_TOKEN}"

Modules: ``settings`` (the block), ``server`` (routing, static files, the HTTP server), ``api``
(one function per API route, answers as values), ``metrics`` (``/metrics``: the engine's
registry through a ``prometheus_client`` collector); ``openapi.json`` and ``static/`` are data.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from intu_core.hookspecs import hookimpl
from intu_core.types import SettingsBlock
from intu_core.view import EngineView
from intu_http.settings import HttpSettings, parse_http_settings

if TYPE_CHECKING:  # the server (asyncio, prometheus_client) is imported when an engine starts one:
    # every `intu` command loads this plugin, and most never serve HTTP
    from intu_http.server import HttpServer

__version__ = "0.1.0"

log = logging.getLogger("intu.http")

# One engine per process: the server of the engine that started it, stopped with that engine.
_servers: dict[int, HttpServer] = {}


@hookimpl
def intu_settings_blocks() -> list[SettingsBlock]:
    """The ``http:`` block."""
    return [
        SettingsBlock("http", parse_http_settings, "HTTP API, /metrics, /healthz, /readyz and the dashboard")
    ]


@hookimpl
def intu_engine_started(engine: EngineView) -> None:
    """Start the server when the project has an ``http:`` block (``RuntimeError`` when its
    address cannot be bound: ``intu serve`` stops with that one line)."""
    settings = engine.settings("http")
    if not isinstance(settings, HttpSettings):
        return
    from intu_http.server import HttpServer

    server = HttpServer(engine, settings)
    server.start()
    _servers[id(engine)] = server


@hookimpl
def intu_engine_stopping(engine: EngineView) -> None:
    """Stop the server first: a load balancer sees the port close as the engine stops."""
    server = _servers.pop(id(engine), None)
    if server is not None:
        server.stop()


def running_server(engine: EngineView) -> HttpServer | None:
    """The server started for ``engine`` (tests read its bound port)."""
    return _servers.get(id(engine))


def __getattr__(name: str) -> Any:
    if name == "HttpServer":
        from intu_http.server import HttpServer

        return HttpServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["HttpServer", "HttpSettings", "parse_http_settings", "running_server"]
