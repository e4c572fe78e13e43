"""Dead letters: the second output of every step that can fail, and the one place records are counted.

Every step routes `Record`s to its main output and `DeadLetter`s to `DEAD_LETTER_TAG`. The counters live here so
that the run report's identity `read == embedded + dead_lettered` is checked on counters kept in three places
only: where records are read, embedded, and dead-lettered.
"""

from __future__ import annotations

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


def dead_letter(record: Record | None, stage: str, reason: str, error: Exception | str,
                source: str | None = None) -> DeadLetter:
    """A DeadLetter for `record` (or for a `source` that never became a record), from an exception or a message."""
    if isinstance(error, Exception):
        error_class, message = type(error).__name__, str(error) or type(error).__name__
    else:
        error_class, message = "check", error
    return DeadLetter(
        id=record.id if record is not None else None,
        source=record.source if record is not None else (source or "?"),
        stage=stage, reason=reason, error_class=error_class, message=message[:2000],
    )


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


def batch_or_one_by_one(items: Sequence[ItemT], run: Callable[[Sequence[ItemT]], ResultT],
                        ) -> tuple[list[ResultT], list[tuple[ItemT, Exception]]]:
    """`run(items)` as one batch; if that raises, `run([item])` for each item, and the items that fail alone.

    One poisonous record must not sink its batch (nor, after the runner's retries, the job): the caller
    dead-letters what fails alone. If every item fails alone, the fault is not the data: the batch's error is
    raised, for the runner to retry or fail the job.
    """
    try:
        return [run(items)], []
    except Exception as batch_error:
        results, failures = [], []
        for item in items:
            try:
                results.append(run([item]))
            except Exception as error:
                failures.append((item, error))
        if not results:
            raise batch_error
        return results, failures


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

    def process(self, letter: DeadLetter) -> Iterable[DeadLetter]:
        self._total.inc()
        Metrics.counter(METRICS_NAMESPACE, DEAD_LETTER_REASON_PREFIX + letter.reason).inc()
        if self._progress is not None:
            self._progress.add(dead_lettered=1)
        yield letter
