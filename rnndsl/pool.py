"""The pool a drop-in's engines and a scripted cell's TorchScript kernels come from, one per call."""
from __future__ import annotations

import threading
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")


class IdlePool(Generic[T]):
    """Objects a call binds its parameters into (a drop-in's engines, a scripted cell's kernels), so
    that two calls running at once must not share one: a call takes an idle one, or makes one, and
    gives it back. One thread finds the same one idle at every call; another is made only while two
    calls run at once. A module keeps its pool in its ``__dict__``, which DataParallel's replicas copy:
    they share the pool, each with its own weights. The pool holds no reference to the module (that
    would keep a deleted one alive until a garbage collection): ``make`` comes with each ``take``."""

    def __init__(self, items: Iterable[T] = ()) -> None:
        self._idle = list(items)
        self._lock = threading.Lock()

    def take(self, make: Callable[[], T]) -> T:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return make()

    def give_back(self, item: T) -> None:
        with self._lock:
            self._idle.append(item)
