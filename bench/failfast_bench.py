"""Fail-fast benchmark: how long `klstream score`, with its default settings, takes to give up on an
endpoint that can never answer, and what it says.

Each case runs the real CLI as a subprocess (``python -m klstream score``) against one broken
endpoint, from process start to exit (interpreter start-up included):

* ``refused``: a port nothing listens on (bound, then closed);
* ``silent``: a listener that accepts connections and never answers;
* ``500``, ``503``, ``malformed``: the emulator answering every request so;
* ``html-200``: a server answering every request 200 with an HTML page.

Usage: python bench/failfast_bench.py [--cases refused silent 500 503 malformed html-200]
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from klstream.backends import endpoint_from_environment
from klstream.emulator import EmulatorServer, FaultConfig
from klstream.input.explode import explode
from klstream.input.sample import SampleOptions, sample

ROOT = Path(__file__).resolve().parent.parent


def refused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@contextlib.contextmanager
def silent_listener() -> Iterator[str]:
    """Accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        server.close()


class _HtmlPage(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        page = b"<html><body>Welcome to the network</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@contextlib.contextmanager
def html_server() -> Iterator[str]:
    """Answers every request 200 with an HTML page (a captive portal, a misrouted proxy)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HtmlPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def endpoint(case: str) -> Iterator[str]:
    faults = {
        "500": FaultConfig(rate_500=1.0),
        "503": FaultConfig(rate_503=1.0),
        "malformed": FaultConfig(rate_malformed=1.0),
    }
    if case == "refused":
        yield f"http://127.0.0.1:{refused_port()}"
    elif case == "silent":
        with silent_listener() as url:
            yield url
    elif case == "html-200":
        with html_server() as url:
            yield url
    else:
        with EmulatorServer(faults[case]) as server:
            yield server.base_url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", nargs="+", default=["refused", "silent", "500", "503", "malformed", "html-200"]
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        inputs, run_dir = Path(scratch) / "in", Path(scratch) / "run"
        with EmulatorServer() as server:
            sample(
                ROOT / "examples" / "prompts.txt",
                inputs,
                SampleOptions("toy", num_samples=1, max_tokens=20, seed=1),
                endpoint_from_environment("gemini", base_url=server.base_url),
            )
        explode(inputs, run_dir)
        print(f"{'endpoint':<10} {'exit':>4} {'seconds':>8}  message")
        for case in args.cases:
            with endpoint(case) as url:
                started = time.monotonic()
                process = subprocess.run(
                    [sys.executable, "-m", "klstream", "score", str(run_dir)]
                    + ["--model2", "toy", "--base-url", url, "--overwrite"],
                    capture_output=True,
                    text=True,
                )
                elapsed = time.monotonic() - started
            lines = [line for line in process.stderr.splitlines() if line.strip()]
            message = lines[0] if lines else ""
            print(f"{case:<10} {process.returncode:>4} {elapsed:>8.1f}  {message[:160]}")


if __name__ == "__main__":
    main()
