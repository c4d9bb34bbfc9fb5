"""Connecting to Ray: the cluster a job was submitted to, or a local one."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    """Joins the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``) or starts a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    kwargs = {"log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS") and num_cpus:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
