"""The read-only HTTP server: ``/health``, ``/status``, ``/metrics`` and ``/`` (the page).

Standard-library ``ThreadingHTTPServer`` on ``status.host:status.port``. It reads SQLite through
its own read-only connection and the daemon's probes (worker, disk guard, scheduler, model cache,
the pipeline plan); it never writes, never serves a file, and every other method gets 405. A slow
client only holds its own request thread, and only for ``REQUEST_TIMEOUT`` seconds.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from processor.state import State
from processor.status.document import Probes, collect_status, health
from processor.status.metrics import metrics_text
from processor.status.page import status_html

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0


# ---------------------------------------------------------------------------------------- server
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: StatusServer

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="ctwatch-status-request",
            daemon=True,
        )
        thread.start()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "ctwatch"
    sys_version = ""
    protocol_version = "HTTP/1.0"
    timeout = REQUEST_TIMEOUT

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
        path = urlsplit(self.path).path
        route = {
            "/": self._page,
            "/health": self._health,
            "/status": self._status,
            "/metrics": self._metrics,
        }.get(path)
        if route is None:
            self._send(
                404,
                "application/json",
                {"error": "not found", "paths": ["/", "/health", "/status", "/metrics"]},
            )
            return
        try:
            route()
        except Exception as exc:  # a failed read answers 503 with every reason known; the server lives
            log.exception("status.request_failed path=%s", path)
            _, known = health(self.server.app.probes, None)
            self._send(
                503,
                "application/json",
                {
                    "status": "unhealthy",
                    "reasons": [f"status unavailable: {type(exc).__name__}", *known.get("reasons", [])],
                },
            )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # every method but GET: 405, whatever its name
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        self._send(
            405,
            "application/json",
            {"error": f"method {self.command} not allowed; this endpoint is read-only (GET)"},
            allow="GET",
        )

    def _health(self) -> None:
        app = self.server.app
        try:
            code, document = app.read(lambda state, probes: health(probes, state))
        except sqlite3.Error:  # the database cannot even be opened: said, with every other reason
            log.warning("status.database_unavailable path=/health", exc_info=True)
            code, document = health(app.probes, None)
        self._send(code, "application/json", document)

    def _status(self) -> None:
        self._send(200, "application/json", self.server.app.read(lambda s, p: collect_status(p, s)))

    def _metrics(self) -> None:
        status, totals = self.server.app.read(lambda s, p: (collect_status(p, s), s.studies_by_status()))
        self._send(200, "text/plain; version=0.0.4; charset=utf-8", metrics_text(status, totals))

    def _page(self) -> None:
        self._send(
            200,
            "text/html; charset=utf-8",
            status_html(self.server.app.read(lambda s, p: collect_status(p, s))),
        )

    def _send(self, code: int, content_type: str, body: Any, allow: str | None = None) -> None:
        data = (body if isinstance(body, str) else json.dumps(body, indent=1, default=str)).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server signature)
        log.debug("status.request client=%s %s", self.client_address[0], format % args)


class StatusServer:
    """Owns the HTTP server, its ``ctwatch-status`` thread and its read-only SQLite connection."""

    def __init__(self, state_path: Path, probes: Probes, host: str, port: int) -> None:
        self.state_path = state_path
        self.probes = probes
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._state: State | None = None
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def read(self, query: Callable[[State, Probes], Any]) -> Any:
        """Run ``query`` on the read-only connection (one request at a time on it)."""
        with self._lock:
            if self._state is None:
                self._state = State(self.state_path, readonly=True, timeout=2.0)
            return query(self._state, self.probes)

    def start(self) -> None:
        """Bind (OSError when the port is taken) and serve on the ``ctwatch-status`` thread.

        Called again by the supervisor when that thread died: the old socket is closed first and
        the same port is bound again."""
        if self._server is not None:
            self._server.server_close()
        port = self.port if self.port is not None else self.requested_port
        self._server = _Server((self.host, port), _Handler)
        self._server.app = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.25},
            name="ctwatch-status",
            daemon=True,
        )
        self._thread.start()
        log.info(
            "status.listening url=http://%s:%d/ host=%s port=%d", self.host, self.port, self.host, self.port
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            if self._state is not None:
                self._state.close()
                self._state = None
