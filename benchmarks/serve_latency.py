"""Latency and throughput of ``segray serve`` under a real HTTP client on 127.0.0.1.

    python benchmarks/serve_latency.py [--concurrency 1,8,32] [--requests 300] [--seconds 20] [--size 64] [--model unet]

Serves one model (the mid-sized variant of ``inference_throughput.BACKEND_OPTIONS``,
random weights: speed does not depend on them) twice, with dynamic batching
(``--max-batch 16 --batch-wait-ms 5``) and without (``--max-batch 1``), each
with ``--replicas`` fixed replicas. At each concurrency C, C client threads
each keep one HTTP/1.1 connection and POST PNG images back to back until
``--requests`` answers or ``--seconds`` have passed (whichever first; both
bound the run). Prints p50/p95/p99 latency and requests/s per setting; every
answer must be a 200 with a mask of the image's size. Ends with a RESULT line.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from inference_throughput import make_run  # noqa: E402

from segray.data import decode_mask, encode_png  # noqa: E402


def load(port: int, bodies: list[bytes], size: int, concurrency: int, max_requests: int, max_seconds: float) -> dict[str, float]:
    """C threads POSTing until the request or time bound; latencies in ms, rate in requests/s."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    issued = [0]
    deadline = time.perf_counter() + max_seconds

    def worker(seed: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        k = seed
        while True:
            with lock:
                if issued[0] >= max_requests or time.perf_counter() >= deadline:
                    break
                issued[0] += 1
            body = bodies[k % len(bodies)]
            k += concurrency
            t0 = time.perf_counter()
            conn.request("POST", "/segment", body=body, headers={"Content-Type": "image/png"})
            response = conn.getresponse()
            data = response.read()
            elapsed = time.perf_counter() - t0
            with lock:
                if response.status != 200:
                    errors.append(f"{response.status} {data[:200]!r}")
                elif decode_mask(data).shape != (size, size):
                    errors.append(f"mask of shape {decode_mask(data).shape}")
                else:
                    latencies.append(elapsed * 1000.0)
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} bad answer(s) at concurrency {concurrency}; first: {errors[0]}")
    lat = np.asarray(latencies)
    return {
        "requests": float(len(lat)),
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "p99": float(np.percentile(lat, 99)),
        "rps": len(lat) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=300, help="answers per setting at most")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per setting at most")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default="unet")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--replica-cpus", type=float, default=0.5)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    import socket

    from segray.runtime import quiet_logging

    quiet_logging()
    import segray

    workdir = args.dir or tempfile.mkdtemp(prefix="segray-serve-bench-")
    run = make_run(os.path.join(workdir, "run"), args.model, args.size, [110.0, 110.0, 110.0], [40.0, 40.0, 40.0])
    rng = np.random.default_rng(0)
    bodies = [encode_png(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(64)]
    print(
        f"{os.cpu_count()} CPUs; {args.model} at {args.size}x{args.size}; backend {args.backend}; {args.replicas} replica(s) of "
        f"{args.replica_cpus} CPU; at most {args.requests} requests or {args.seconds:.0f} s per setting"
    )
    result = []
    rows = []
    for label, max_batch in (("batch16", 16), ("nobatch", 1)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        served = segray.serve(
            segray.ServeConfig(
                run=run, port=port, replicas=args.replicas, max_batch=max_batch, batch_wait_ms=5.0,
                backend=args.backend, replica_cpus=args.replica_cpus, blocking=False,
            )
        )
        try:
            load(port, bodies, args.size, max(levels), min(64, args.requests), args.seconds)  # warm-up, not counted
            for c in levels:
                stats = load(port, bodies, args.size, c, args.requests, args.seconds)
                rows.append((label, c, stats))
                result += [f"{label}_c{c}_{k}={stats[k]:.1f}" for k in ("p50", "p95", "p99", "rps")]
        finally:
            served.shutdown()
    print(f"{'setting':<9} {'conc':>5} {'requests':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    for label, c, s in rows:
        print(f"{label:<9} {c:>5} {int(s['requests']):>9} {s['p50']:>8.1f} {s['p95']:>8.1f} {s['p99']:>8.1f} {s['rps']:>8.1f}")
    print("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()
