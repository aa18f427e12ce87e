"""Endpoints that are not the Gemini API, for tests of what klstream does when one is given:
a port nobody listens on, a listener that never answers, and a plain HTTP server answering
every request as a test function says.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass


def refused_url() -> str:
    """A local URL whose port was free a moment ago: connecting is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class SilentListener:
    url: str
    accepted: list[socket.socket]


@contextlib.contextmanager
def silent_listener() -> Iterator[SilentListener]:
    """Accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.05)
    listener = SilentListener(f"http://127.0.0.1:{server.getsockname()[1]}", [])
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                listener.accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        stop.set()
        thread.join()
        for connection in listener.accepted:
            connection.close()
        server.close()


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes


Answer = Callable[[dict[str, str], bytes], Reply]
"""Builds the reply to a POST from its headers (lower-case names) and body."""


@contextlib.contextmanager
def http_server(answer: Answer) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 answering every POST with ``answer``; yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {name.lower(): value for name, value in self.headers.items()}
            reply = answer(headers, body)
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
