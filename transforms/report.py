"""The logger half of the job: steady progress lines while it runs, and the run report from Beam's counters."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import TypeVar

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.utils import shared

from schemas.report import RunReport
from transforms.dead_letters import DEAD_LETTER_REASON_PREFIX, DEAD_LETTERED, METRICS_NAMESPACE, RECORDS_READ

log = logging.getLogger("hubembed")
ReportT = TypeVar("ReportT", bound=RunReport)


class _ProgressCounts:
    """One per worker process (through shared.Shared): counts from every thread, logged at a steady pace."""

    def __init__(self, interval_seconds: float):
        self.lock = threading.Lock()
        self.started = self.last_logged = time.monotonic()
        self.interval_seconds = interval_seconds
        self.embedded = self.dead_lettered = 0


class ProgressLog:
    """Passed to the DoFns that embed or dead-letter; logs `rows done, rows/s, dead letters` every interval.

    Per process, not per job: on a cluster each worker logs its own share (the runner's UI has the totals from
    the counters); on DirectRunner in one process that is the whole job. A process other than the launcher's names
    itself in its lines (`worker 1234`): the worker processes of a multi_processing run log side by side.
    """

    def __init__(self, interval_seconds: float = 10.0):
        self._handle = shared.Shared()
        self._interval_seconds = interval_seconds
        self._launcher_pid = os.getpid()
        self._counts: _ProgressCounts | None = None

    def __getstate__(self):
        return {**self.__dict__, "_counts": None}

    def start(self) -> None:
        """From a DoFn's setup: the rate counts from here, the model's load included, not from the first rows out."""
        if self._counts is None:
            interval = self._interval_seconds
            self._counts = self._handle.acquire(lambda: _ProgressCounts(interval), tag="progress")

    def add(self, embedded: int = 0, dead_lettered: int = 0) -> None:
        self.start()
        counts = self._counts
        with counts.lock:
            counts.embedded += embedded
            counts.dead_lettered += dead_lettered
            now = time.monotonic()
            if now - counts.last_logged < counts.interval_seconds:
                return
            counts.last_logged = now
            done = counts.embedded + counts.dead_lettered
            rate = done / max(now - counts.started, 1e-9)
        process = "" if os.getpid() == self._launcher_pid else f" (worker {os.getpid()})"
        log.info("progress%s: %d rows done (%d embedded, %d dead-lettered), %.1f rows/s",
                 process, done, counts.embedded, counts.dead_lettered, rate)


def counters(result) -> dict[str, int]:
    """The job's committed counters by name (attempted where a runner does not commit, e.g. some portable ones)."""
    totals: dict[str, int] = {}
    query = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + int(value or 0)
    return totals


def build_report(report_class: type[ReportT], job: str, result, seconds: float, max_error_rate: float,
                 outputs: dict[str, str], metadata: dict[str, str] | None = None) -> ReportT:
    """A job's run report from its counters: records read, its main output's rows, dead letters by reason."""
    totals = counters(result)
    read = totals.get(RECORDS_READ, 0)
    dead = totals.get(DEAD_LETTERED, 0)
    output_rows = {report_class.OUTPUT_NAME: totals.get(report_class.OUTPUT_COUNTER, 0)}
    output_rows.update({field: totals.get(counter, 0) for field, counter in report_class.EXTRA_COUNTERS.items()})
    return report_class(
        job=job, read=read, dead_lettered=dead, **output_rows,
        dead_lettered_by_reason={name[len(DEAD_LETTER_REASON_PREFIX):]: value for name, value in sorted(totals.items())
                                 if name.startswith(DEAD_LETTER_REASON_PREFIX)},
        seconds=round(seconds, 3), rows_per_second=round(read / seconds, 2) if seconds > 0 else 0.0,
        error_rate=round(dead / read, 6) if read else 0.0, max_error_rate=max_error_rate,
        outputs=outputs, metadata=dict(metadata or {}),
    )


def write_report(report: RunReport, path: str) -> None:
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(report.to_dict(), indent=2, sort_keys=True).encode())


def format_report(report: RunReport) -> str:
    """The short console table."""
    rows = [("read", report.read), (report.OUTPUT_NAME, report.output_rows)]
    if any(getattr(report, field) for field in report.EXTRA_COUNTERS):
        rows += [("  embedded fresh", report.output_rows - sum(getattr(report, f) for f in report.EXTRA_COUNTERS))]
        rows += [(f"  {field}", getattr(report, field)) for field in report.EXTRA_COUNTERS]
    rows += [("dead-lettered", report.dead_lettered)]
    rows += [(f"  {reason}", count) for reason, count in report.dead_lettered_by_reason.items()]
    width = max(len(name) for name, _ in rows)
    lines = [f"{report.job}: run report"] + [f"  {name:<{width}}  {count:>10,}" for name, count in rows]
    copied = sum(getattr(report, field) for field in report.EXTRA_COUNTERS)
    if copied:
        lines.append(f"  {'share reused':<{width}}  {copied / max(report.output_rows, 1):>10.1%}")
    lines.append(f"  {'time':<{width}}  {report.seconds:>9.1f}s   ({report.rows_per_second:,.1f} rows/s)")
    lines.append(f"  {'error rate':<{width}}  {report.error_rate:>10.2%}   (max {report.max_error_rate:.2%})")
    if not report.reconciled:
        lines.append(f"  COUNTS DO NOT ADD UP: read {report.read} != {report.OUTPUT_NAME} + dead-lettered "
                     f"{report.output_rows + report.dead_lettered}")
    lines += [f"  {name}: {path}" for name, path in report.outputs.items()]
    return "\n".join(lines)
