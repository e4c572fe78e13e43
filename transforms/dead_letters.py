"""Dead letters: the second output of every step that can fail, and the one place records are counted.

Every step routes `Record`s to its main output and `DeadLetter`s to `DEAD_LETTER_TAG`. The counters live here so
that the run report's identity `read == embedded + dead_lettered` is checked on counters kept in three places
only: where records are read, embedded, and dead-lettered.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas.records import DeadLetter, Record
from schemas.report import EmbedRunReport

DEAD_LETTER_TAG = "dead_letters"
METRICS_NAMESPACE = "hubembed"
RECORDS_READ = "records_read"
RECORDS_EMBEDDED = EmbedRunReport.OUTPUT_COUNTER
DEAD_LETTERED = "dead_lettered"
DEAD_LETTER_REASON_PREFIX = "dead_letter."


def printable(value: str | None) -> str | None:
    """`value` as a string Parquet and the console accept: bytes that are not UTF-8 (kept by surrogateescape when a
    file, a name or a manifest held them) become `\\xNN` escapes, so a dead letter can always be written."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape" if _only_escaped_bytes(text) else "backslashreplace").decode(
            "utf-8", "backslashreplace")


def _only_escaped_bytes(text: str) -> bool:
    """True when every surrogate in `text` is one surrogateescape made from a byte (U+DC80..U+DCFF)."""
    return all(not 0xD800 <= ord(ch) <= 0xDFFF or 0xDC80 <= ord(ch) <= 0xDCFF for ch in text)


def dead_letter(record: Record | None, stage: str, reason: str, error: Exception | str,
                source: str | None = None) -> DeadLetter:
    """A DeadLetter for `record` (or for a `source` that never became a record), from an exception or a message."""
    if isinstance(error, Exception):
        error_class, message = type(error).__name__, telling_message(error)
    else:
        error_class, message = "check", error
    return DeadLetter(
        id=printable(record.id) if record is not None else None,
        source=printable(record.source if record is not None else (source or "?")),
        stage=stage, reason=reason, error_class=error_class, message=printable(message)[:2000],
    )


def telling_message(error: Exception) -> str:
    """What went wrong, in the words of whoever said it, without TensorFlow's wrapping: "Graph execution error:" and
    the traceback of the op's creation before the op's own line, and the {{function_node ...}}, [[{{node ...}}]]
    and [Op:...] marks around it (the eager form a traced function with control flow raises)."""
    message = str(error) or type(error).__name__
    tf_message = getattr(error, "message", None)  # tf.errors.OpError keeps the op's own message here
    if isinstance(tf_message, str) and tf_message.strip():
        message = tf_message
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    telling = [line for line in lines if not line.startswith((
        "Graph execution error", "Exception encountered when calling", "Detected at node", "File ", "Traceback",
        "[[", "Call arguments", "•", "Stack trace"))]
    text = " ".join((telling or lines)[:3])
    text = re.sub(r"\[\[.*?\]\]|\{\{function_node [^}]*\}\}|\[Op:[^\]]*\]", "", text)
    return " ".join(text.split()) or type(error).__name__


class RouteOutputs(beam.DoFn):
    """Route what a step yields: Records to the main output, DeadLetters to the dead-letter output.

    Wrapping a plain generator function keeps each step's logic free of Beam's tagging: the function yields
    either kind and this DoFn sorts them. `count_read` marks the reader's routing, where `records_read` counts
    every input record, good or not.
    """

    def __init__(self, step_fn, count_read: bool = False):
        self._step_fn = step_fn
        self._count_read = count_read
        self._read = Metrics.counter(METRICS_NAMESPACE, RECORDS_READ)

    def process(self, element, *args, **kwargs) -> Iterator:
        for item in self._step_fn(element, *args, **kwargs):
            if self._count_read:
                self._read.inc()
            if isinstance(item, DeadLetter):
                yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, item)
            else:
                yield item


ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

# Errors that say the machine or the model is in trouble, never that one record is bad: out of memory, a device or
# file system gone, the runtime cancelled. They are raised, for the runner to retry the bundle or fail the job.
MACHINE_ERROR_NAMES = frozenset({
    "MemoryError", "ResourceExhaustedError", "UnavailableError", "InternalError", "CancelledError",
    "DeadlineExceededError", "AbortedError", "DataLossError", "OSError", "SystemError",
})
# A record that fails alone is dead-lettered; this many in a row, over however many batches, is the encoder's fault.
MAX_CONSECUTIVE_FAILURES = 64


def is_machine_error(error: BaseException) -> bool:
    return any(cls.__name__ in MACHINE_ERROR_NAMES for cls in type(error).__mro__)


class FailureRun:
    """Counts records that failed alone in a row, across the batches of one DoFn instance, so a broken encoder
    is told from bad records even when every batch holds one record (`--batch_size 1`, the last of a bundle)."""

    def __init__(self, limit: int = MAX_CONSECUTIVE_FAILURES):
        self.limit = limit
        self.consecutive = 0

    def record(self, failed: bool, error: Exception | None = None) -> None:
        self.consecutive = self.consecutive + 1 if failed else 0
        if failed and self.consecutive >= self.limit:
            raise RuntimeError(f"{self.consecutive} records in a row failed alone, the last with "
                               f"{type(error).__name__}: {telling_message(error)}: the encoder, not the data, is "
                               "at fault") from error


def batch_or_one_by_one(items: Sequence[ItemT], run: Callable[[Sequence[ItemT]], ResultT],
                        failure_run: FailureRun | None = None,
                        ) -> tuple[list[ResultT], list[tuple[ItemT, Exception]]]:
    """`run(items)` as one batch; if that raises, `run([item])` for each item, and the items that fail alone.

    One poisonous record must not sink its batch (nor, after the runner's retries, the job): the caller
    dead-letters what fails alone. What is not a record's fault is raised, for the runner to retry or fail the job:
    a machine error (out of memory, a device lost: `is_machine_error`), or `failure_run`'s limit of records in a
    row failing alone (a broken encoder).
    """
    failure_run = failure_run or FailureRun()
    try:
        result = run(items)
    except Exception as batch_error:
        if is_machine_error(batch_error) and len(items) == 1:
            raise
        results, failures = [], []
        for item in items:
            try:
                results.append(run([item]))
            except Exception as error:
                if is_machine_error(error):
                    raise
                failure_run.record(True, error)
                failures.append((item, error))
            else:
                failure_run.record(False)
        return results, failures
    failure_run.record(False)
    return [result], []


def route(label: str, pcoll, step_fn, *side_inputs, count_read: bool = False) -> tuple:
    """Apply `step_fn` (element → iterable of Record | DeadLetter) and return (records, dead_letters)."""
    outputs = pcoll | label >> beam.ParDo(RouteOutputs(step_fn, count_read), *side_inputs).with_outputs(
        DEAD_LETTER_TAG, main="records")
    return outputs.records, outputs[DEAD_LETTER_TAG]


class CountDeadLetters(beam.DoFn):
    """Count each dead letter, in total and by reason, just before the dead-letter sink."""

    def __init__(self, progress=None):
        self._total = Metrics.counter(METRICS_NAMESPACE, DEAD_LETTERED)
        self._progress = progress

    def setup(self):
        if self._progress is not None:
            self._progress.start()

    def process(self, letter: DeadLetter) -> Iterable[DeadLetter]:
        self._total.inc()
        Metrics.counter(METRICS_NAMESPACE, DEAD_LETTER_REASON_PREFIX + letter.reason).inc()
        if self._progress is not None:
            self._progress.add(dead_lettered=1)
        yield letter
