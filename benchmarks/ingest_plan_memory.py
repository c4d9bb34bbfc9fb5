"""Driver memory of ingest's listing and planning, in the number of images (issue 13, item 7).

Makes N synthetic image/mask pairs in the ``ids`` layout (empty files: no
pixels, only keys), then, in a fresh process for each N, lists and pairs them
(``list_pairs``) and plans the chunks Ray will process (``plan_chunks``), and
prints the driver's peak RSS. The per-image statistics no longer come back to
the driver (each chunk's task returns one summary row), so what is left on the
driver is the listing itself.

    python benchmarks/ingest_plan_memory.py                 # 1,000,000 keys
    python benchmarks/ingest_plan_memory.py --keys 100000 --dir /tmp/keys

Target: peak RSS < 500 MB at 1 million keys.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from tqdm import tqdm

CHILD = r"""
import json, resource, sys, time
import psutil
from segray.data import chunk_items, plan_chunks
from segray.data.layouts import list_pairs
root, shard_mb = sys.argv[1], float(sys.argv[2])
base = psutil.Process().memory_info().rss
t0 = time.perf_counter()
plan = list_pairs(root, "ids", None, 3, None, None, "images")
t1 = time.perf_counter()
chunks = plan_chunks(plan, shard_mb, min_chunks=4)
items = chunk_items(plan, root, chunks)
t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"pairs": len(plan.pairs), "errors": len(plan.errors), "chunks": len(chunks),
                  "list_s": t1 - t0, "plan_s": t2 - t1, "base_rss": base, "peak_rss": peak}))
"""


def make_keys(root: str, n: int) -> None:
    """``root/images/k.png`` and ``root/masks/k.png`` for k < n (kept when already there)."""
    marker = os.path.join(root, f".made-{n}")
    if os.path.exists(marker):
        return
    for kind in ("images", "masks"):
        os.makedirs(os.path.join(root, kind), exist_ok=True)
    for k in tqdm(range(n), desc="keys", unit="pair", mininterval=2):
        name = f"img_{k:08d}.png"
        for kind in ("images", "masks"):
            os.close(os.open(os.path.join(root, kind, name), os.O_CREAT | os.O_WRONLY, 0o644))
    open(marker, "w").close()


def measure(root: str, shard_mb: float) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, root, str(shard_mb)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="largest number of image/mask pairs")
    parser.add_argument("--steps", type=int, default=3, help="sizes measured: keys/10^(steps-1) .. keys")
    parser.add_argument("--dir", default=None, help="where the keys go (kept for the next run); default a temporary folder")
    parser.add_argument("--shard-mb", type=float, default=128.0)
    args = parser.parse_args()

    base_dir = args.dir or tempfile.mkdtemp(prefix="segray-keys-")
    sizes = sorted({max(1, args.keys // 10**k) for k in range(args.steps)})
    rows = []
    for n in sizes:
        root = os.path.join(base_dir, f"n{n}")
        t0 = time.perf_counter()
        make_keys(root, n)
        made = time.perf_counter() - t0
        r = measure(root, args.shard_mb)
        assert r["pairs"] == n, r
        rows.append((n, r))
        print(
            f"{n:>9,} pairs: list+pair {r['list_s']:6.1f} s, plan {r['plan_s']:5.2f} s, {r['chunks']} chunks; "
            f"RSS after imports {r['base_rss'] / 2**20:6.0f} MB, peak {r['peak_rss'] / 2**20:6.0f} MB "
            f"({(r['peak_rss'] - r['base_rss']) / n:6.0f} B/pair); keys made in {made:.0f} s",
            flush=True,
        )
    n, r = rows[-1]
    slope = (rows[-1][1]["peak_rss"] - rows[0][1]["peak_rss"]) / max(1, rows[-1][0] - rows[0][0])
    print(f"driver peak RSS at {n:,} keys: {r['peak_rss'] / 2**20:.0f} MB (target < 500 MB); growth {slope:.0f} bytes per pair")
    print(
        f"RESULT keys={n} peak_rss_mb={r['peak_rss'] / 2**20:.0f} base_rss_mb={r['base_rss'] / 2**20:.0f} "
        f"bytes_per_pair={slope:.0f} list_s={r['list_s']:.1f} plan_s={r['plan_s']:.2f} target_met={int(r['peak_rss'] < 500 * 2**20)}"
    )


if __name__ == "__main__":
    main()
