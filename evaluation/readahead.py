"""Read ahead on a background thread: the next chunks are read and decoded while the network runs."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

READAHEAD_DEPTH = 2  # chunks waiting in memory


def read_ahead(items: Iterable[T], depth: int = READAHEAD_DEPTH) -> Iterator[T]:
    """Iterate `items` on a background thread, at most `depth` ahead; its errors re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def worker() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((item, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put((None, exc))
            return
        q.put((done, None))

    thread = threading.Thread(target=worker, daemon=True, name="read-ahead")
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
