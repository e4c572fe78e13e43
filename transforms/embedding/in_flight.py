"""Work a DoFn hands to threads of its own, whose results leave the DoFn in order, from the bundle's thread.

Beam's outputs must leave from the thread that runs the bundle: the DoFn submits work, goes on with its next
elements, and emits what is done in a later `process` call, or at the end of the bundle.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Generic, TypeVar

from apache_beam.transforms.window import GlobalWindows

ResultT = TypeVar("ResultT")


class InFlight(Generic[ResultT]):
    """Futures in submission order; at most `limit` of them wait, done or not, before the oldest is waited for."""

    def __init__(self, limit: int):
        self._limit = limit
        self._futures: collections.deque[Future[ResultT]] = collections.deque()

    def clear(self) -> None:
        """At the start of a bundle: a retried bundle starts with nothing of the failed attempt."""
        self._futures = collections.deque()

    def add(self, future: Future[ResultT]) -> Iterator[ResultT]:
        """Hand `future` over; the results of the oldest futures that are done, or that must be waited for."""
        self._futures.append(future)
        while self._futures and (len(self._futures) > self._limit or self._futures[0].done()):
            yield self._futures.popleft().result()

    def drain(self) -> Iterator[ResultT]:
        """At the end of the bundle: every result, in order."""
        while self._futures:
            yield self._futures.popleft().result()


def at_end_of_window(value):
    """An output of `finish_bundle`, which has no element to take a window from: the global window's (the only one
    of batch pipelines)."""
    return GlobalWindows.windowed_value_at_end_of_window(value)
