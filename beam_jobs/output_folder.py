"""A job's output folder as a commit protocol: claim it, write the run under `_staging/`, publish it atomically.

Readers and sensors trust `_SUCCESS` (Spark's convention): nothing appears under a final name before the run has
succeeded, and `_SUCCESS` is written last. A run killed at any point leaves the published files of an earlier run
untouched and, for a new folder, no final file at all; the same command then completes (and the embedding job
takes back the batches a killed run had finished, from `_staging/checkpoints/`).

Two runs on one folder: the first holds a lock for its whole life (an OS file lock on local disks, released by
the kernel when the process dies, so a killed run never leaves a stale lock); the second fails at start in one
line. On object stores, where no such lock exists, the lock file names the run that claimed the folder last, and
a run publishes only if the lock still names it, so the files of two runs are never mixed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import IO, TypeVar

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs.launch import JobConfigError, check_output_folder, pin_direct_runner
from schemas import layout
from schemas.report import RunReport
from transforms.embedding.files import matching_paths
from transforms.report import build_report, write_report

ReportT = TypeVar("ReportT", bound=RunReport)

log = logging.getLogger("hubembed")


@dataclasses.dataclass
class RunFolder:
    """One run's claim on an output folder: where its sinks write while it runs, and where it publishes."""

    output: str
    job: str
    run_id: str
    main_prefix: str  # the dataset's file prefix: embeddings, predictions
    lock: IO | None = None  # the open, locked file on local disks

    @property
    def staging_root(self) -> str:
        return FileSystems.join(self.output, layout.STAGING_DIR)

    @property
    def staging(self) -> str:
        return FileSystems.join(self.staging_root, self.run_id)

    @property
    def checkpoints(self) -> str:
        return FileSystems.join(self.staging_root, layout.CHECKPOINTS_DIR)

    def staged(self) -> dict[str, str]:
        """The sinks' file prefixes while the run works (under `_staging/<run>/`)."""
        return {
            self.main_prefix: FileSystems.join(self.staging, self.main_prefix),
            "dead_letters": FileSystems.join(self.staging, layout.DEAD_LETTERS_DIR, layout.DEAD_LETTERS_PREFIX),
        }

    def published(self) -> dict[str, str]:
        """What a published run holds, as the run report names it (the Parquet outputs as globs)."""
        return {**_as_globs(self.output, self.main_prefix),
                "success": FileSystems.join(self.output, layout.SUCCESS_NAME)}

    def staged_files(self) -> dict[str, str]:
        """What an unpublished run left in its staging folder, as the run report names it."""
        return _as_globs(self.staging, self.main_prefix)


def _as_globs(folder: str, main_prefix: str) -> dict[str, str]:
    return {
        main_prefix: FileSystems.join(folder, main_prefix + "-*" + layout.PARQUET_SUFFIX),
        "dead_letters": FileSystems.join(folder, layout.DEAD_LETTERS_DIR,
                                         layout.DEAD_LETTERS_PREFIX + "-*" + layout.PARQUET_SUFFIX),
        "report": FileSystems.join(folder, layout.REPORT_NAME),
    }


def _published_files(output: str, main_prefix: str) -> list[str]:
    """The final names of a published (or half-published) run in `output`."""
    found = matching_paths(FileSystems.join(output, main_prefix + "-*" + layout.PARQUET_SUFFIX))
    found += matching_paths(FileSystems.join(output, layout.DEAD_LETTERS_DIR, "*"))
    # Sidecars of the layout before `_`-names: left beside a new run, they would stop readers opening the folder.
    for legacy in layout.LEGACY_SIDECARS:
        found += matching_paths(FileSystems.join(output, legacy))
    found += [FileSystems.join(output, name) for name in (layout.REPORT_NAME, layout.SUCCESS_NAME)
              if FileSystems.exists(FileSystems.join(output, name))]
    return found


def read_run_report(output: str) -> dict | str | None:
    """The run report published in `output` as a dict; None when there is none, a sentence when it does not parse."""
    path = FileSystems.join(output, layout.REPORT_NAME)
    if not FileSystems.exists(path):
        return None
    try:
        with FileSystems.open(path) as handle:
            report = json.loads(handle.read())
    except ValueError:
        report = None
    return report if isinstance(report, dict) else "its run report does not parse"


def report_job(output: str) -> str | None:
    """The job named by the run report published in `output`, if there is one."""
    report = read_run_report(output)
    if isinstance(report, str):
        return f"an unknown job ({report})"
    return report.get("job") if report else None


def _take_lock(folder: RunFolder) -> None:
    lock_path = FileSystems.join(folder.staging_root, layout.LOCK_NAME)
    if "://" in folder.output:
        with FileSystems.create(lock_path) as handle:
            handle.write(folder.run_id.encode())
        return
    os.makedirs(folder.staging_root, exist_ok=True)
    handle = open(lock_path, "a+")  # noqa: SIM115 (held open for the run's life: the lock lives with it)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another run"
        handle.close()
        raise JobConfigError(f"{folder.output} is being written by another run ({holder}): wait for it, "
                             "or write to another folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"run {folder.run_id}, pid {os.getpid()}")
    handle.flush()
    folder.lock = handle


def _lock_is_ours(folder: RunFolder) -> bool:
    if folder.lock is not None:
        return True
    with FileSystems.open(FileSystems.join(folder.staging_root, layout.LOCK_NAME)) as handle:
        return handle.read().decode().strip() == folder.run_id


def claim(output: str, main_prefix: str, job: str, overwrite: bool) -> RunFolder:
    """Claim `output` for a new run of `job`; raises JobConfigError (one line) when it may not.

    Refused: a folder publishing another job's output (predict pointed at an embeddings folder: even with
    --overwrite, that would delete the other job's report and dead letters), a folder holding a published run
    without --overwrite, a folder another live run holds. Earlier runs' staged files (a killed run) are removed,
    except the checkpoints, which the embedding job takes back.
    """
    check_output_folder(output)
    other_job = report_job(output)
    if other_job not in (None, job):
        raise JobConfigError(f"{output} holds the output of {other_job}, not of {job}: write to another folder")
    earlier = _published_files(output, main_prefix)
    if earlier and not overwrite:
        raise JobConfigError(f"{output} already holds a run's output ({len(earlier)} files or folders): "
                             "pass --overwrite to replace it (when the new run succeeds), or write to a new folder")
    folder = RunFolder(output=output, job=job, run_id=uuid.uuid4().hex[:12], main_prefix=main_prefix)
    _take_lock(folder)
    stale = [path for path in matching_paths(FileSystems.join(folder.staging_root, "*"))
             if os.path.basename(path.rstrip("/")) not in (layout.LOCK_NAME, layout.CHECKPOINTS_DIR)]
    if stale:
        log.info("removing %d staged files or folders of an earlier, unfinished run", len(stale))
        FileSystems.delete(stale)
    return folder


def publish(folder: RunFolder, report: dict) -> None:
    """Move the staged run into place, then write the report and, last, `_SUCCESS`; drop `_staging/`.

    An earlier run's published files are removed only now, when the new run has succeeded: `_SUCCESS` first, so
    that no sensor takes the folder for complete while it changes.
    """
    if not _lock_is_ours(folder):  # one line, like a refusal at start: the run's work is kept, not published
        raise JobConfigError(f"another run claimed {folder.output} while this one ran: not publishing "
                             f"(this run's files stay in {folder.staging})")
    earlier = _published_files(folder.output, folder.main_prefix)
    success = FileSystems.join(folder.output, layout.SUCCESS_NAME)
    if success in earlier:
        FileSystems.delete([success])
        earlier.remove(success)
    if earlier:
        FileSystems.delete(earlier)
    staged = folder.staged()
    sources = matching_paths(staged[folder.main_prefix] + "-*" + layout.PARQUET_SUFFIX)
    sources += matching_paths(staged["dead_letters"] + "-*" + layout.PARQUET_SUFFIX)
    destinations = [folder.output + path[len(folder.staging):] for path in sources]
    dead_letters_dir = FileSystems.join(folder.output, layout.DEAD_LETTERS_DIR)
    if not FileSystems.exists(dead_letters_dir):
        FileSystems.mkdirs(dead_letters_dir)
    if sources:
        FileSystems.rename(sources, destinations)
    with FileSystems.create(FileSystems.join(folder.output, layout.REPORT_NAME)) as handle:
        handle.write(json.dumps(report, indent=2, sort_keys=True).encode())
    with FileSystems.create(success) as handle:
        handle.write(json.dumps({"job": folder.job, "run_id": folder.run_id}).encode())
    FileSystems.delete([folder.staging_root])
    release(folder)


def release(folder: RunFolder) -> None:
    """Give the folder up (the lock; the kernel does it too when the process dies)."""
    if folder.lock is not None:
        folder.lock.close()
        folder.lock = None


def run_and_publish(options: PipelineOptions, build: Callable[[beam.Pipeline], None], report_class: type[ReportT],
                    job: str, max_error_rate: float, folder: RunFolder, metadata: dict[str, str]) -> ReportT:
    """Build the pipeline (`build`), run it, report, and publish the run when it passed; the folder is released
    whatever happens."""
    try:
        pipeline = beam.Pipeline(options=pin_direct_runner(options))  # DirectRunner: in-process, never Prism
        build(pipeline)
        started = time.perf_counter()
        result = pipeline.run()
        result.wait_until_finish()
        return report_and_publish(report_class, job, result, time.perf_counter() - started, max_error_rate, folder,
                                  metadata)
    finally:
        release(folder)


def report_and_publish(report_class: type[ReportT], job: str, result, seconds: float, max_error_rate: float,
                       folder: RunFolder, metadata: dict[str, str]) -> ReportT:
    """The run report from the counters; publish the run when it passed (counts reconciled, dead letters within
    --max_error_rate), else leave it staged, its report beside it, for a look and a rerun that resumes it."""
    report = build_report(report_class, job, result, seconds, max_error_rate, folder.published(), metadata)
    if report.passed:
        publish(folder, report.to_dict())
    else:
        report.outputs = folder.staged_files()
        write_report(report, report.outputs["report"])
        log.warning("the run is not published: its files stay in %s", folder.staging)
    return report
