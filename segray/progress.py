"""Progress bars for long loops on the driver (Ray Data draws its own)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True) -> Iterator[T]:
    """Wraps ``items`` in a tqdm bar on stderr; silent when disabled or not a terminal-like run."""
    if not enabled:
        yield from items
        return
    yield from tqdm(items, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
