"""Dynamic batching: collect queued items into batches of at most `max_size`, waiting at most
`max_wait_s` after the first item for more (0 takes only what is already queued)."""

from __future__ import annotations

import queue
import time
from typing import Generic, TypeVar

T = TypeVar("T")

# How often an idle worker looks at its stop flag.
IDLE_POLL_S = 0.2


class DynamicBatcher(Generic[T]):
    def __init__(self, max_size: int, max_wait_s: float, maxsize: int) -> None:
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.queue: queue.Queue[T] = queue.Queue(maxsize=maxsize)

    def offer(self, item: T) -> bool:
        """Queue an item; False when the queue is full (the caller refuses the item)."""
        try:
            self.queue.put_nowait(item)
            return True
        except queue.Full:
            return False

    def next_batch(self, idle_timeout: float = IDLE_POLL_S) -> list[T]:
        """Block up to `idle_timeout` for a first item; then gather a batch. [] when idle."""
        try:
            first = self.queue.get(timeout=idle_timeout)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_size:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(self.queue.get(timeout=left))
            except queue.Empty:
                break
        return batch

    def __len__(self) -> int:
        return self.queue.qsize()
