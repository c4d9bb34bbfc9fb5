"""A faulty S3 endpoint: an HTTP proxy in front of the moto server that fails a share of requests.

On a seeded schedule (one random draw per request, in the order requests
arrive) a request is answered, instead of by the store, with one of:

- ``500``: ``InternalError`` (the request never reaches the store);
- ``503``: ``SlowDown`` (never reaches the store);
- ``reset``: the connection is reset (RST) without an answer (never reaches the store);
- ``stall``: the store's answer is held for ``stall_s`` half-way through its body.

Every other request is forwarded unchanged. ``counts`` holds how many of each
were injected, and ``requests`` how many came in.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("500", "503", "reset", "stall")

_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>segray-fault</RequestId></Error>"
)
_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


class FaultProxy:
    """Starts on 127.0.0.1 (a free port) in front of ``target`` (``http://host:port``)."""

    def __init__(self, target: str, rate: float = 0.05, seed: int = 0, stall_s: float = 1.0):
        host, _, port = target.split("://", 1)[1].rstrip("/").partition(":")
        self.target = (host, int(port or 80))
        self.rate = rate
        self.stall_s = stall_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {k: 0 for k in FAULTS}
        self.requests = 0
        self.enabled = True
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
                fault = proxy.draw()
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
                self.send_response(response.status, response.reason)
                for k, v in response.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                # A HEAD answer carries the object's length, not its (empty) body's.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
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

    def draw(self) -> str | None:
        with self.lock:
            self.requests += 1
            roll = self.rng.random()
            if not self.enabled or roll >= self.rate:
                return None
            fault = FAULTS[int(roll / self.rate * len(FAULTS)) % len(FAULTS)]
            self.counts[fault] += 1
            return fault

    def summary(self) -> str:
        injected = sum(self.counts.values())
        kinds = " ".join(f"{k}={v}" for k, v in self.counts.items())
        return f"{self.requests} requests, {injected} faults injected ({kinds})"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
