"""The HTTP server ``intu serve`` runs when ``intu.yaml`` has an ``http:`` block.

The standard library's ``ThreadingHTTPServer``: one thread per connection, a handful of routes,
nothing to install. Routes:

- ``/api/v1/...``: the JSON API (``api.py``), described by ``/api/v1/openapi.json``;
- ``/metrics`` (Prometheus, ``metrics.py``), ``/healthz`` (the process answers), ``/readyz``;
- ``/`` (the dashboard's ``static/index.html``) and ``/static/<name>``: files of the package's
  ``static`` folder, nothing outside it.

Every answer is JSON except ``/metrics`` and the static files; errors are ``{"error": "..."}``
with the status that says what went wrong (400, 401, 403, 404, 405, 409, 503).
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from intu_core.queue import QueueUnavailable
from intu_core.view import EngineView
from intu_http import api
from intu_http.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from intu_http.metrics import exposition
from intu_http.settings import HttpSettings, is_loopback

log = logging.getLogger("intu.http")

API = "/api/v1"
STATIC_DIR = Path(str(resources.files("intu_http") / "static"))
OPENAPI_FILE = Path(str(resources.files("intu_http") / "openapi.json"))
# Static file names: letters, digits, '-', '_', '.', no leading dot; one level (no folders).
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
#: What a route answers: status, body, headers.
Answer = tuple[int, bytes, list[tuple[str, str]]]
Respond = Callable[[dict[str, list[str]]], Answer]
# How often the throughput sampler reads the delivered counters.
SAMPLE_EVERY_S = 5.0
# A request body is never needed (the POST routes take none); refuse a large one unread.
MAX_BODY = 64 * 1024


class HttpServer:
    """Serves one ``EngineView`` on ``settings.host:settings.port`` until ``stop``."""

    def __init__(self, view: EngineView, settings: HttpSettings) -> None:
        self.view = view
        self.settings = settings
        self.throughput = api.Throughput()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        """The port bound (``listen: 127.0.0.1:0`` in tests picks a free one)."""
        return self._server.server_address[1] if self._server is not None else self.settings.port

    def start(self) -> None:
        """Bind and serve in background threads; ``RuntimeError`` with the reason when it cannot bind."""
        handler = _handler_class(self)
        server_class = _Server6 if ":" in self.settings.host else _Server
        try:
            self._server = server_class((self.settings.host, self.settings.port), handler)
        except OSError as exc:
            raise RuntimeError(
                f"http: cannot listen on {self.settings.listen}: {exc.strerror or exc}"
                " (change http.listen in intu.yaml)"
            ) from exc
        serve = threading.Thread(target=self._server.serve_forever, name="intu-http", daemon=True)
        sampler = threading.Thread(target=self._sample, name="intu-http-sampler", daemon=True)
        self._threads = [serve, sampler]
        for thread in self._threads:
            thread.start()
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        log.info(
            "dashboard, API, /metrics and health on http://%s:%d/%s",
            host,
            self.port,
            "" if self.settings.token else " (no http.token: operator actions are disabled)",
        )

    def stop(self) -> None:
        """Stop accepting and close the listening socket (a request being answered is not waited
        for: its thread is a daemon, and what it reads is the engine's, which stops after)."""
        self._stopping.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _sample(self) -> None:
        while not self._stopping.wait(SAMPLE_EVERY_S):
            try:
                self.throughput.sample(self.view.metrics())
            except Exception:  # a sampler that dies would freeze the rates: log and go on
                log.exception("throughput sample failed")

    # -- routing ---------------------------------------------------------------------------
    def answer(self, method: str, target: str, authorization: str | None, host: str | None = None) -> Answer:
        """Status, body and headers for one request (what the handler writes); ``host`` is its
        ``Host`` header."""
        if not self.settings.allow_remote and not _loopback_host(host):
            # DNS rebinding: a web page the operator visits names its own host and resolves it to
            # 127.0.0.1, and the browser would let it read the history; a loopback server answers
            # only requests addressed to a loopback name.
            return _json(
                api.error(
                    403,
                    f"Host {host!r} is not a loopback address; this server listens on loopback only"
                    " (a proxy must pass Host: 127.0.0.1, or set http.allow_remote)",
                )
            )
        parts = urlsplit(target)
        path = unquote(parts.path)
        params = parse_qs(parts.query, keep_blank_values=True)
        try:
            route = self._route(path)
            if route is None:
                return _json(api.error(404, f"no such path {path!r}; the API is under {API}/ (openapi.json)"))
            allowed, respond = route
            if method not in allowed:
                return _json(
                    api.error(
                        405,
                        f"{method} is not allowed on {path}; use {', '.join(allowed)}",
                        ("Allow", ", ".join(allowed)),
                    )
                )
            if "POST" in allowed:
                denied = api.authorize(self.settings.token, authorization)
                if denied is not None:
                    return _json(denied)
            return respond(params)
        except api.BadRequest as exc:
            return _json(api.error(400, str(exc)))
        except QueueUnavailable as exc:
            return _json(api.error(503, f"the queue cannot be reached now: {exc}", ("Retry-After", "5")))

    def _route(self, path: str) -> tuple[tuple[str, ...], Respond] | None:
        view = self.view
        get = ("GET", "HEAD")
        fixed: dict[str, Respond] = {
            "/healthz": lambda p: _json(api.Reply(200, {"alive": True})),
            "/readyz": lambda p: _json(api.readyz(view)),
            "/metrics": lambda p: (200, exposition(view), [("Content-Type", METRICS_CONTENT_TYPE)]),
            f"{API}/openapi.json": lambda p: _file(OPENAPI_FILE),
            f"{API}/channels": lambda p: _json(api.channels(view)),
            f"{API}/destinations": lambda p: _json(api.destinations(view, self.throughput)),
            f"{API}/messages": lambda p: _json(api.messages(view, p)),
            f"{API}/dead-letters": lambda p: _json(api.dead_letters(view, p)),
            "/": lambda p: _file(STATIC_DIR / "index.html"),
        }
        if path in fixed:
            return get, fixed[path]
        if path.startswith(f"{API}/messages/"):
            message_id = path[len(f"{API}/messages/") :]
            if message_id and "/" not in message_id:
                return get, lambda p: _json(api.message(view, message_id))
            return None
        match = re.fullmatch(rf"{API}/entries/([^/]+)/(retry|purge)", path)
        if match:
            entry_id, action = match.groups()
            act = api.retry_entry if action == "retry" else api.purge_entry
            return ("POST",), lambda p: _json(act(view, entry_id))
        if path.startswith("/static/"):
            name = path[len("/static/") :]
            if not _STATIC_NAME.fullmatch(name):
                return None
            return get, lambda p: _file(STATIC_DIR / name)
        return None


def _json(reply: api.Reply) -> Answer:
    body = json.dumps(reply.body, ensure_ascii=False).encode()
    # Answers carry patient identifiers: no cache anywhere keeps them.
    return (
        reply.status,
        body,
        [("Content-Type", "application/json"), ("Cache-Control", "no-store"), *reply.headers],
    )


def _loopback_host(host: str | None) -> bool:
    """Whether a ``Host`` header names a loopback address or ``localhost`` (with any port)."""
    if not host:
        return True  # HTTP/1.0 without Host: not a browser
    name = host.strip()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    else:
        name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    return is_loopback(name)


def _file(path: Path) -> Answer:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return _json(api.error(404, f"no such file {path.name!r}"))
    kind = _CONTENT_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return 200, data, [("Content-Type", kind), ("Cache-Control", "no-cache")]


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow client never holds up intu serve's stop


class _Server6(_Server):
    address_family = socket.AF_INET6


def _handler_class(server: HttpServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so that a stop never waits for an idle keep-alive.
        protocol_version = "HTTP/1.0"
        server_version = "intu"
        sys_version = ""
        timeout = 30  # a client that sends nothing gives its thread back

        def _respond(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                status, body, headers = _json(api.error(413, "these routes take no request body"))
            else:
                if length:
                    self.rfile.read(length)
                try:
                    status, body, headers = server.answer(
                        method, self.path, self.headers.get("Authorization"), self.headers.get("Host")
                    )
                except Exception:  # a bug: answer 500 and keep serving
                    log.exception("HTTP %s %s failed", method, self.path)
                    status, body, headers = _json(api.error(500, "internal error (see the intu log)"))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (the name BaseHTTPRequestHandler calls)
            self._respond("GET")

        def do_HEAD(self) -> None:  # noqa: N802
            self._respond("HEAD")

        def do_POST(self) -> None:  # noqa: N802
            self._respond("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._respond("PUT")

        def do_DELETE(self) -> None:  # noqa: N802
            self._respond("DELETE")

        def do_PATCH(self) -> None:  # noqa: N802
            self._respond("PATCH")

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


__all__ = ["API", "HttpServer", "STATIC_DIR"]
