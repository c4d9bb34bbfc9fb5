"""A real headless Chromium driven over its DevTools protocol (a websocket), for the report tests.

One browser per test module. ``open`` loads a page and records what the page
asked for: every network request Chromium saw (``Network.requestWillBeSent``),
every Content-Security-Policy violation (a listener installed before the
page's own code runs) and console errors. ``evaluate`` reads the rendered DOM
after the page's scripts ran; ``screenshot`` takes the pixels of a region.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

RECORD_VIOLATIONS = """
window.__violations = [];
document.addEventListener('securitypolicyviolation', function (e) {
  window.__violations.push(e.blockedURI + ' (' + e.violatedDirective + ')');
});
"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageLoad:
    """What one page load asked for.

    Attributes:
        url: the page.
        requests: every URL Chromium was asked to load for the page (the page itself included).
        violations: loads the page's Content-Security-Policy blocked.
        seconds: from navigation to the load event.
    """

    url: str
    requests: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def outside(self) -> list[str]:
        """Requests for anything but the page itself and ``data:`` URIs: network or other files."""
        return [u for u in self.requests if u != self.url and not u.startswith("data:")]


class Browser:
    def __init__(self, width: int = 1280, height: int = 1000):
        from websockets.sync.client import connect

        exe = chromium()
        if exe is None:
            raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
        self.profile = tempfile.mkdtemp(prefix="segray-chromium-")
        self.process = subprocess.Popen(
            [
                exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--mute-audio", f"--window-size={width},{height}",
                f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "--remote-allow-origins=*", "about:blank",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        port = self._devtools_port()
        # Keep reading Chromium's log so that a full pipe never blocks it.
        threading.Thread(target=lambda: [None for _ in self.process.stderr], daemon=True).start()
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(p for p in pages if p.get("type") == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=20)
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Page.addScriptToEvaluateOnNewDocument", source=RECORD_VIOLATIONS)

    def _devtools_port(self) -> int:
        deadline = time.time() + 30
        while time.time() < deadline:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode} before DevTools listened")
            match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if match:
                return int(match.group(1))
        raise RuntimeError("chromium did not open DevTools within 30 s")

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        msg_id = self._next_id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            if message.get("id") == msg_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def _wait_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.time() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            self.events.append(message)
            if message.get("method") == name:
                return message

    def open(self, path_or_url: str) -> PageLoad:
        url = path_or_url if "://" in path_or_url else "file://" + os.path.abspath(path_or_url)
        self.events = []
        start = time.perf_counter()
        self.call("Page.navigate", url=url)
        self._wait_event("Page.loadEventFired")
        # Two animation frames: the layout and paint after the load event are done.
        self.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(1))))")
        seconds = time.perf_counter() - start
        load = PageLoad(url, seconds=seconds)
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Network.requestWillBeSent":
                load.requests.append(params["request"]["url"])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                load.console_errors.append(params["entry"].get("text", ""))
        load.violations = self.evaluate("window.__violations")
        return load

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('text')} {result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def rect(self, selector: str) -> dict[str, float]:
        """The element's box in page coordinates."""
        box = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
            " return {x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: r.height}; })()"
        )
        return box

    def screenshot(self, selector: str) -> np.ndarray:
        """The element's pixels as (H, W, 3) RGB uint8, as Chromium painted them."""
        box = self.rect(selector)
        clip = {**box, "scale": 1}
        data = self.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)["data"]
        import base64

        image = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
            shutil.rmtree(self.profile, ignore_errors=True)
