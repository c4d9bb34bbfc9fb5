"""A faulty S3 endpoint: an HTTP proxy in front of the moto server that fails a share of requests.

On a seeded schedule (one random draw per request, in the order requests
arrive) a request is answered, instead of by the store, with one of:

- ``500``: ``InternalError`` (the request never reaches the store);
- ``503``: ``SlowDown`` (never reaches the store);
- ``reset``: the connection is reset (RST) without an answer (never reaches the store);
- ``stall``: the store's answer is held for ``stall_s`` half-way through its body;
- ``lost``: the store does the request (a write is stored), then the
  connection is reset before any answer: a write accepted, its answer lost;
- ``truncated``: the store's answer is sent with its full ``Content-Length``
  but the connection is closed half-way through the body (an answer without
  a body, a HEAD's or a PUT's 200, is passed unchanged and not counted);
- ``timeout``: the store does the request, then nothing is sent for
  ``timeout_s`` (longer than the client's timeout) and the connection is
  closed: a store that hangs after accepting a write.

``kinds`` picks the faults of the schedule (the first four by default).
``force(kind, n, match)`` gives the next ``n`` requests that ``match`` the
fault ``kind`` whatever the schedule says. Every other request is forwarded
unchanged. ``counts`` holds how many of each were injected, and ``requests``
how many came in.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("500", "503", "reset", "stall")
KINDS = (*FAULTS, "lost", "truncated", "timeout")

_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>segray-fault</RequestId></Error>"
)
_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}

# (method, path, headers) -> whether a forced fault applies to the request.
Match = Callable[[str, str, dict], bool]


def conditional_put(method: str, path: str, headers: dict) -> bool:
    """A claim: a PUT with ``If-None-Match: *`` (``storage.create_exclusive``)."""
    return method == "PUT" and headers.get("if-none-match") == "*"


class FaultProxy:
    """Starts on 127.0.0.1 (a free port) in front of ``target`` (``http://host:port``)."""

    def __init__(
        self, target: str, rate: float = 0.05, seed: int = 0, stall_s: float = 1.0,
        kinds: tuple[str, ...] = FAULTS, timeout_s: float = 8.0,
    ):
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
        host, _, port = target.split("://", 1)[1].rstrip("/").partition(":")
        self.target = (host, int(port or 80))
        self.rate = rate
        self.stall_s = stall_s
        self.timeout_s = timeout_s
        self.kinds = tuple(kinds)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {k: 0 for k in self.kinds}
        self.requests = 0
        self.enabled = True
        self.forced: list[list] = []  # [kind, n left, match]
        self.closing = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _error(self, status: int, code: str, message: str) -> None:
                body = _ERROR_BODY.format(code=code, message=message).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                if status == 503:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _reset(self) -> None:
                # SO_LINGER 0: close() sends RST, as a dropped connection does.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _handle(self) -> None:
                body = self._body()
                fault = proxy.draw(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
                if fault == "500":
                    return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
                if fault == "503":
                    return self._error(503, "SlowDown", "Please reduce your request rate.")
                if fault == "reset":
                    return self._reset()
                conn = http.client.HTTPConnection(*proxy.target, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                conn.close()
                if fault == "lost":
                    return self._reset()
                if fault == "timeout":
                    # Holds the answer past the client's timeout; the client gives up first.
                    proxy.closing.wait(proxy.timeout_s)
                    return self._reset()
                if fault == "truncated" and (self.command == "HEAD" or not data):
                    fault = proxy.undo(fault)  # no body to cut: answered unchanged, not counted
                self.send_response(response.status, response.reason)
                for k, v in response.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                # A HEAD answer carries the object's length, not its (empty) body's.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if fault == "truncated":
                    # The promised body stops half-way: the connection is closed (FIN, not RST).
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if self.command == "HEAD" or not data:
                    if fault == "stall":
                        time.sleep(proxy.stall_s)
                    return
                half = len(data) // 2
                self.wfile.write(data[:half])
                if fault == "stall":
                    self.wfile.flush()
                    time.sleep(proxy.stall_s)
                self.wfile.write(data[half:])

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def force(self, kind: str, n: int, match: Match) -> None:
        """The next ``n`` requests for which ``match(method, path, lower-cased headers)`` holds get ``kind``."""
        with self.lock:
            self.counts.setdefault(kind, 0)
            self.forced.append([kind, n, match])

    def draw(self, method: str = "GET", path: str = "/", headers: dict | None = None) -> str | None:
        with self.lock:
            self.requests += 1
            for entry in self.forced:
                kind, left, match = entry
                if left > 0 and match(method, path, headers or {}):
                    entry[1] -= 1
                    self.counts[kind] += 1
                    return kind
            roll = self.rng.random()
            if not self.enabled or roll >= self.rate:
                return None
            fault = self.kinds[int(roll / self.rate * len(self.kinds)) % len(self.kinds)]
            self.counts[fault] += 1
            return fault

    def undo(self, kind: str) -> None:
        """Takes back a drawn fault that did not apply to its request."""
        with self.lock:
            self.counts[kind] -= 1

    def summary(self) -> str:
        injected = sum(self.counts.values())
        kinds = " ".join(f"{k}={v}" for k, v in self.counts.items())
        return f"{self.requests} requests, {injected} faults injected ({kinds})"

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
