"""Read the next slide's block in a background thread while the current one trains.

OpenSlide releases the GIL while it decodes tiles, so one reader thread overlaps
reading with the training step. Results come back in order; an exception raised
by a read is raised again when its item is consumed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Generic, TypeVar

__all__ = ["Prefetcher"]

T = TypeVar("T")
R = TypeVar("R")


class Prefetcher(Generic[T, R]):
    """Iterate ``(item, fn(item))`` with up to ``depth`` calls running ahead in a thread.

    Parameters
    ----------
    fn:
        The read, e.g. ``lambda i: dataset.read_block_safe(i, row, col, augment=spec_of(i))``.
    items:
        What to read, in order (indices, ``SlideItem``s, ...).
    depth:
        How many reads may be in flight ahead of the consumer (memory: about
        ``depth + 1`` blocks).

    Examples
    --------
    >>> with Prefetcher(lambda i: i * i, range(3)) as pf:
    ...     list(pf)
    [(0, 0), (1, 1), (2, 4)]
    """

    def __init__(self, fn: Callable[[T], R], items: Iterable[T], depth: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"Prefetcher depth must be >= 1, got {depth}")
        self._fn = fn
        self._items = iter(items)
        self._depth = depth
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="halo-prefetch")
        self._queue: deque[tuple[T, Future[R]]] = deque()

    def _fill(self) -> None:
        while self._pool is not None and len(self._queue) < self._depth + 1:
            try:
                item = next(self._items)
            except StopIteration:
                return
            self._queue.append((item, self._pool.submit(self._fn, item)))

    def __iter__(self) -> Iterator[tuple[T, R]]:
        return self

    def __next__(self) -> tuple[T, R]:
        self._fill()
        if not self._queue:
            self.close()
            raise StopIteration
        item, fut = self._queue.popleft()
        self._fill()  # start the next read before handing this one over
        return item, fut.result()

    def close(self) -> None:
        """Cancel pending reads and stop the thread."""
        for _, fut in self._queue:
            fut.cancel()
        self._queue.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Prefetcher[T, R]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
