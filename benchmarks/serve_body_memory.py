"""Peak memory of ``segray serve``'s proxy and replica under large concurrent request bodies.

    PYTHONPATH=$PWD python benchmarks/serve_body_memory.py [--bodies 8] [--mb 300] [--max-pixels 25000000]

Serves a small model (one replica, TensorFlow backend) on a local Ray, then
sends ``--bodies`` POST /segment requests of ``--mb`` MiB of random bytes at
once, first with a Content-Length header, then chunked (no length). Each
client streams its body from a generator of 1 MiB pieces, so the client holds
no body. A sampler reads the resident set (RSS) of the HTTP proxy actor and
of the replica every 20 ms (Serve is started afresh for each phase); the table gives each one's RSS before the phase,
its peak during it, and the answers' statuses. Ends with a RESULT line.

Run it with ``PYTHONPATH`` at another checkout to measure that code (the
script itself imports ``segray`` from the path; only ``benchmarks/`` is
added for ``make_run``).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import sys
import tempfile
import threading
import time

MIB = 2**20


def server_processes(timeout: float = 60.0) -> dict[str, int]:
    """PIDs of this driver's Serve proxy and replica (Ray's workers are children of the raylet this driver started).

    Waits until there is exactly one of each (an earlier Serve's actors take a moment to exit).
    """
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, list[int]] = {"proxy": [], "replica": []}
        for p in psutil.Process().children(recursive=True):
            try:
                title = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "ray::ProxyActor" in title:
                found["proxy"].append(p.pid)
            elif "ray::ServeReplica" in title:
                found["replica"].append(p.pid)
        if all(len(v) == 1 for v in found.values()):
            return {k: v[0] for k, v in found.items()}
        if time.monotonic() > deadline:
            raise RuntimeError(f"found {found}; expected one Serve proxy and one replica among this driver's processes")
        time.sleep(0.5)


class Sampler:
    """Peak RSS (MiB) of some processes, read every ``every`` seconds on a thread."""

    def __init__(self, pids: dict[str, int], every: float = 0.02):
        import psutil

        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = collections.defaultdict(float)
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> dict[str, float]:
        return {name: p.memory_info().rss / MIB for name, p in self.processes.items()}

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, value in self.rss().items():
                self.peak[name] = max(self.peak[name], value)
            time.sleep(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def post_streamed(port: int, total: int, chunked: bool, piece: bytes) -> tuple[int, str, float]:
    """POSTs ``total`` bytes (``piece`` repeated) as one body; returns (status, answer, seconds)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.putrequest("POST", "/segment")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Transfer-Encoding" if chunked else "Content-Length", "chunked" if chunked else str(total))
    conn.endheaders()
    try:
        sent = 0
        while sent < total:
            n = min(len(piece), total - sent)
            if chunked:
                conn.send(b"%x\r\n" % n)
            conn.send(piece[:n] if n < len(piece) else piece)
            if chunked:
                conn.send(b"\r\n")
            sent += n
        if chunked:
            conn.send(b"0\r\n\r\n")
    except OSError:
        pass  # the server may close the connection once it has answered; its answer is still read below
    try:
        response = conn.getresponse()
        status, answer = response.status, response.read()[:200].decode("utf-8", "replace")
    except OSError as e:
        status, answer = 0, f"{type(e).__name__}: {e}"
    conn.close()
    return status, answer, time.perf_counter() - t0


def phase(port: int, pids: dict[str, int], bodies: int, total: int, chunked: bool) -> dict:
    piece = os.urandom(MIB)
    sampler = Sampler(pids)
    before = sampler.rss()
    results: list[tuple[int, str, float]] = []
    lock = threading.Lock()

    def client() -> None:
        r = post_streamed(port, total, chunked, piece)
        with lock:
            results.append(r)

    start = time.perf_counter()
    with sampler:
        threads = [threading.Thread(target=client) for _ in range(bodies)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - start
    return {"before": before, "peak": dict(sampler.peak), "after": sampler.rss(), "results": results, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bodies", type=int, default=8, help="concurrent requests")
    parser.add_argument("--mb", type=int, default=300, help="MiB per body")
    parser.add_argument("--max-pixels", type=int, default=25_000_000)
    parser.add_argument("--max-body-mb", type=float, default=None, help="the server's body limit (default: derived from --max-pixels)")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()

    import socket

    import ray

    # Here, not at import: tests import server_processes from this module.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from inference_throughput import make_run
    from segray.runtime import quiet_logging

    quiet_logging()
    import segray

    ray.init(num_cpus=4, include_dashboard=False)
    workdir = args.dir or tempfile.mkdtemp(prefix="segray-serve-body-")
    run = make_run(os.path.join(workdir, "run"), "unet", 32, [110.0] * 3, [40.0] * 3)
    total = args.mb * MIB
    result = [f"bodies={args.bodies}", f"body_mib={args.mb}"]
    rows = []
    # A fresh Serve per phase: memory freed after one phase is not always given back to the system.
    for label, chunked in (("content-length", False), ("chunked", True)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        limits = {"max_pixels": args.max_pixels} | ({"max_body_mb": args.max_body_mb} if args.max_body_mb is not None else {})
        served = segray.serve(segray.ServeConfig(run=run, port=port, replicas=1, backend="tensorflow", blocking=False, **limits))
        try:
            pids = server_processes()
            limit = served.card.get("input", {}).get("max_body_bytes")
            out = phase(port, pids, args.bodies, total, chunked)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/healthz")
            out["healthy"] = json.loads(conn.getresponse().read()).get("status") == "ok"
            conn.close()
        finally:
            served.shutdown()
        rows.append((label, chunked, out))
    print(
        f"segray from {os.path.dirname(os.path.dirname(os.path.abspath(segray.__file__)))}; {args.bodies} bodies of {args.mb} MiB "
        f"at once; max_pixels {args.max_pixels:,}; body limit {'none' if limit is None else f'{limit / MIB:.1f} MiB'}"
    )
    print(f"{'phase':<15} {'process':<8} {'before MiB':>11} {'peak MiB':>9} {'growth MiB':>11} {'statuses':<14} {'seconds':>8}")
    for label, chunked, out in rows:
        statuses = collections.Counter(r[0] for r in out["results"])
        status_text = ",".join(f"{n}x{s}" for s, n in sorted(statuses.items()))
        key = "chunked" if chunked else "cl"
        for name in ("proxy", "replica"):
            before, peak = out["before"][name], out["peak"][name]
            print(f"{label:<15} {name:<8} {before:>11.0f} {peak:>9.0f} {peak - before:>11.0f} {status_text:<14} {out['wall']:>8.1f}")
            result += [f"{key}_{name}_before_mib={before:.0f}", f"{key}_{name}_peak_mib={peak:.0f}", f"{key}_{name}_growth_mib={peak - before:.0f}"]
        result += [f"{key}_statuses={status_text}", f"{key}_seconds={out['wall']:.1f}", f"{key}_healthy_after={int(out['healthy'])}"]
        first = out["results"][0]
        print(f"  first answer: {first[0]} {first[1][:160]}")
    print("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()
