"""Where the embed step decodes a batch's images: on its model thread, right before the encoders, or on threads of
their own, two batches at a time, while the model thread runs the encoders on the batch before.

One batch's decode graph alone leaves a core idle at its tail (its last images decode on one thread) and while
Python hands the batch in and out; two batches decoding at once keep the cores busy. That is the case to take when
the model is not on the CPU (a GPU), or costs the CPU little beside the decode. When the model is the larger part of
a batch's time on the CPU, the two share the same cores, and decoding beside the model slowed the whole run.
Measured on 2 cores, 6,000 photos of 640×480, side by side: with a model that costs nothing, two batches decoding at
once ran at 1.15–1.19 × the model thread's decoding; with MobileNet V1 on the CPU, at 0.96–0.98 ×.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

ResultT = TypeVar("ResultT")

log = logging.getLogger("hubembed")


class DecodeThreads:
    """Hands each batch's decode to the thread that should run it (see the module's docstring).

    On a GPU, decoding has threads of its own from the start. On a CPU the model thread decodes, and times both its
    decodes and its encoder calls over the first batches (the very first, which traces the graphs, aside); if the
    encoders took less time than the decode, decoding moves to threads of its own for the rest of the run. Once
    moved it stays: decodes running beside the model no longer measure what the model costs alone.
    """

    CONCURRENT_DECODES = 2
    BATCHES_MEASURED = 3  # after the first

    def __init__(self, model_thread: ThreadPoolExecutor, on_gpu: bool):
        self._model_thread = model_thread
        self._threads: ThreadPoolExecutor | None = None
        self._decode_seconds: list[float] = []
        self._model_seconds: list[float] = []
        if on_gpu:
            self._start_threads()

    def submit(self, decode: Callable[[], ResultT]) -> Future[ResultT]:
        """Run `decode` on the decode threads, or on the model thread ahead of the work submitted after it."""
        if self._threads is not None:
            return self._threads.submit(decode)
        return self._model_thread.submit(self._timed, decode)

    def model_ran(self, seconds: float) -> None:
        """The model thread's encoders took `seconds` over one batch: decides, once enough batches are measured."""
        if self._threads is not None or len(self._model_seconds) > self.BATCHES_MEASURED:
            return
        self._model_seconds.append(seconds)
        if len(self._model_seconds) <= self.BATCHES_MEASURED or len(self._decode_seconds) <= self.BATCHES_MEASURED:
            return
        model = statistics.median(self._model_seconds[1:])
        decode = statistics.median(self._decode_seconds[1:self.BATCHES_MEASURED + 1])
        if model < decode:
            log.debug("decoding on threads of its own: the encoders take %.1f ms a batch, the decode %.1f ms",
                      model * 1e3, decode * 1e3)
            self._start_threads()

    def shutdown(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(cancel_futures=True)

    def _start_threads(self) -> None:
        self._threads = ThreadPoolExecutor(self.CONCURRENT_DECODES, thread_name_prefix="hubembed-decode")

    def _timed(self, decode: Callable[[], ResultT]) -> ResultT:
        start = time.perf_counter()
        result = decode()
        if len(self._decode_seconds) <= self.BATCHES_MEASURED:
            self._decode_seconds.append(time.perf_counter() - start)
        return result
