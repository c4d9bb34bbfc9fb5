"""``segray demo``: the whole pipeline on a local Ray with a local folder as storage."""

from __future__ import annotations

import os
import time

from segray import storage


def run_demo(workdir: str, n: int = 96, size: tuple[int, int] = (64, 64), overwrite: bool = True) -> dict[str, str]:
    """Synthesises shapes, ingests them and prints what each step left where.

    Returns:
        The URIs of what the demo wrote, by step.
    """
    from segray.cli import _print_dataset
    from segray.data import ingest, synthesize
    from segray.runtime import init_ray

    workdir = os.path.abspath(workdir)
    if overwrite:
        storage.delete_dir(workdir)
    raw, data = storage.join(workdir, "raw"), storage.join(workdir, "dataset")
    t0 = time.time()
    print(f"[1/2] synthesising {n} pairs of {size[0]}x{size[1]} shapes into {raw}")
    synthesize(raw, n=n, size=size, num_classes=4, seed=0)
    init_ray(num_cpus=max(4, os.cpu_count() or 1))
    print(f"[2/2] ingesting {raw} -> {data}")
    result = ingest(raw, data, val_fraction=0.2, command=f"segray demo --dir {workdir}")
    _print_dataset(result.info, data)
    print(f"demo done in {time.time() - t0:.0f} s; everything is under {workdir}")
    return {"raw": raw, "dataset": data}
