"""A webhook receiver as a child process of the test: an ``http.server`` on 127.0.0.1.

Each POST is kept as one JSON file (``<folder>/posts/<n>.json``: its path, Authorization header and
body as text) and answered by path (``codes``, default 204; a 302 names ``/ok`` as its Location).
The test reads the files; :meth:`HookServer.close` stops the process by its PID.

Run as ``python tests/hookserver.py FOLDER CODES_JSON``: it writes its port to ``FOLDER/port``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HookServer:
    """The receiver process; ``port`` is its port on 127.0.0.1."""

    def __init__(self, folder: Path, codes: dict[str, int] | None = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(folder), json.dumps(codes or {})],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = folder / "port"
        deadline = time.monotonic() + 20
        while not port_file.exists() or not port_file.read_text().strip():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError("the webhook receiver did not start")
            time.sleep(0.02)
        self.port = int(port_file.read_text())

    def posts(self) -> list[tuple[str, str | None, bytes]]:
        """Every POST so far, in order: (path, Authorization header, body)."""
        out = []
        for file in sorted((self.folder / "posts").glob("*.json")):
            post = json.loads(file.read_text())
            out.append((post["path"], post["authorization"], post["body"].encode("utf-8")))
        return out

    def received(self, path: str) -> list[bytes]:
        """The bodies POSTed to ``path``."""
        return [body for where, _, body in self.posts() if where == path]

    def close(self) -> None:
        """Stop the process by its PID; safe to call twice."""
        from tests.conftest import stop_child

        stop_child(self.process, grace=10)


def _serve(folder: Path, codes: dict[str, int]) -> None:
    posts = folder / "posts"
    posts.mkdir(parents=True, exist_ok=True)
    count = [0]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                count[0] += 1
                number = count[0]
            record = {
                "path": self.path,
                "authorization": self.headers.get("Authorization"),
                "body": body.decode("utf-8", "replace"),
            }
            tmp = posts / f".{number:06d}.tmp"
            tmp.write_text(json.dumps(record))
            tmp.rename(posts / f"{number:06d}.json")
            code = codes.get(self.path, 204)
            self.send_response(code)
            if code == 302:
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/ok")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    (folder / "port.tmp").write_text(str(server.server_address[1]))
    (folder / "port.tmp").rename(folder / "port")
    server.serve_forever(poll_interval=0.05)


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), json.loads(sys.argv[2]))
