"""What every job's entry point shares: its flags on the command line, logging, one-line errors, exit codes."""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import multiprocessing
import os
import shlex
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.portability import python_urns
from apache_beam.portability.api import beam_fn_api_pb2, beam_provision_api_pb2, beam_runner_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.portable_runner import JobServiceHandle
from apache_beam.runners.runner import PipelineResult, PipelineRunner
from google.protobuf import text_format

from beam_jobs.flags import JobCommand
from beam_jobs.standby import (
    DIRECT_RUNNER_NAMES,
    IN_PROCESS_RUNNER,
    TF_THREAD_VARIABLES,
    standby_workers,
    tensorflow_thread_shares,
)
from schemas.report import RunReport
from transforms.embedding.rows import choose_arrow_memory_pool
from transforms.report import format_report

EXIT_OK, EXIT_TOO_MANY_ERRORS, EXIT_CONFIG = 0, 1, 2
# Runners whose workers never share the launcher's disk. Flink, Spark and Portable runners can run on this machine
# (a local job server, an embedded cluster), so a local folder is left for them to judge.
REMOTE_RUNNERS = ("DataflowRunner",)
# Runners whose workers are processes of this machine: what the launcher sees (a GPU) is what they see.
LOCAL_RUNNERS = (None, "DirectRunner", "direct", "BundleBasedDirectRunner", "SwitchingDirectRunner", IN_PROCESS_RUNNER)
# The logger under which Beam relays the log of its SDK worker processes (--direct_running_mode multi_processing),
# the levels of its LogEntry severities, and the project's packages, whose lines WorkerLogRelay keeps at INFO.
WORKER_LOG_RELAY = "apache_beam.runners.portability.local_job_service"
WORKER_LOG_LEVELS = {
    beam_fn_api_pb2.LogEntry.Severity.TRACE: logging.DEBUG, beam_fn_api_pb2.LogEntry.Severity.DEBUG: logging.DEBUG,
    beam_fn_api_pb2.LogEntry.Severity.INFO: logging.INFO, beam_fn_api_pb2.LogEntry.Severity.NOTICE: logging.INFO,
    beam_fn_api_pb2.LogEntry.Severity.WARN: logging.WARNING, beam_fn_api_pb2.LogEntry.Severity.ERROR: logging.ERROR,
    beam_fn_api_pb2.LogEntry.Severity.CRITICAL: logging.CRITICAL,
}
OWN_PACKAGES = ("beam_jobs", "encoders", "schemas", "transforms")
# The command line of the FnApiRunner's worker processes (multi_processing), as Beam writes it, and ours.
BEAM_WORKER_COMMAND = f"{sys.executable} -m apache_beam.runners.worker.sdk_worker_main"
WORKER_COMMAND = f"{shlex.quote(sys.executable)} -m beam_jobs.sdk_worker"

log = logging.getLogger("hubembed")

ReportT = TypeVar("ReportT")


class JobConfigError(ValueError):
    """Misconfiguration found at start; the message is one line, fit for the console."""


def job_main(argv: list[str] | None, command: JobCommand, run: Callable[[list[str]], ReportT],
             finish: Callable[[ReportT], int]) -> int:
    """Parse (for --help and flag types), log, run; a JobConfigError is one `hubembed: error:` line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command.parser().parse_known_args(argv)  # --help, and type errors in our own flags, as argparse reports them
    choose_arrow_memory_pool()  # before the run's first Arrow buffers: the start-up checks' reads, an in-process run
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("hubembed", "encoders"):
        logging.getLogger(name).setLevel(logging.INFO)
    relay = logging.getLogger(WORKER_LOG_RELAY)
    relay.setLevel(logging.INFO)  # the workers' INFO lines reach WorkerLogRelay, which keeps the job's own
    if not any(isinstance(existing, WorkerLogRelay) for existing in relay.filters):
        relay.addFilter(WorkerLogRelay())
    try:
        check_flag_spelling(argv)
        with standby_workers(argv):  # their imports overlap the start-up checks (beam_jobs.standby)
            report = run(argv)
    except JobConfigError as error:
        print(f"hubembed: error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    return finish(report)


class WorkerLogRelay(logging.Filter):
    """Shows the log of SDK worker processes (--direct_running_mode multi_processing) as an in-process run shows it.

    Beam relays each worker's records through one logger of its own, as `Worker: ` and the whole LogEntry message
    (severity, timestamp, source location...) on one line, at the record's level: under the console's WARNING
    threshold a worker's progress lines and encoder loads were lost, and its warnings were protobuf dumps. This
    keeps the lines logged by the job's own modules at INFO and up, anything else at WARNING and up, each as its
    message alone, at its level and time; and drops the two notices every worker logs as it starts, about Beam's
    housekeeping (the job's options, parsed before their classes are imported; no semi-persistent folder, which
    local workers never have).
    """

    NOTICES = ("Discarding unparseable args", "No semi_persistent_directory found")

    def __init__(self):
        super().__init__()
        # Where the job's modules live: a worker of this machine imports them from the same place.
        self._own_folders = tuple(os.path.dirname(importlib.util.find_spec(package).origin) + os.sep
                                  for package in OWN_PACKAGES)

    def filter(self, record: logging.LogRecord) -> bool:
        entry = self._log_entry(record)
        if entry is None:  # the relay logger's own: shown from WARNING up, as before its level was lowered for workers
            return record.levelno >= logging.WARNING and not any(n in record.getMessage() for n in self.NOTICES)
        if any(notice in entry.message for notice in self.NOTICES):
            return False
        level = WORKER_LOG_LEVELS.get(entry.severity, logging.INFO)
        own = entry.log_location.startswith(self._own_folders)
        if level < logging.WARNING and not own:
            return False
        record.levelno, record.levelname = level, logging.getLevelName(level)
        record.name = log.name if own else "worker"
        record.msg, record.args = entry.message + (f"\n{entry.trace}" if entry.trace else ""), ()
        record.created = entry.timestamp.seconds + entry.timestamp.nanos / 1e9
        record.msecs = entry.timestamp.nanos // 1_000_000
        return True

    @staticmethod
    def _log_entry(record: logging.LogRecord) -> beam_fn_api_pb2.LogEntry | None:
        """The LogEntry Beam's logging service relayed as `Worker: %s` (its text format on one line), or None."""
        if record.msg != "Worker: %s" or len(record.args or ()) != 1:
            return None
        try:
            return text_format.Parse(str(record.args[0]), beam_fn_api_pb2.LogEntry())
        except text_format.ParseError:
            return None


class InProcessRunner(PipelineRunner):
    """DirectRunner for batch jobs, without its detour through Prism.

    Beam 2.77's DirectRunner first tries the Prism runner, downloading its binary from GitHub (on a machine
    without internet it logs the failure and falls back): a job would then run on an engine none of the tests
    cover, whose metrics are named otherwise. This runs the pipeline on Beam's FnApiRunner, built as Beam's
    SwitchingDirectRunner builds it for batch pipelines (the pipeline options in the provision info, where
    multi_processing workers read them); --direct_num_workers and --direct_running_mode keep their meaning.
    """

    def run_pipeline(self, pipeline, options: PipelineOptions) -> PipelineResult:
        encoded_options = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        provision_info = fn_runner.ExtendedProvisionInfo(
            beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded_options))
        processes = worker_processes(options)
        with tensorflow_threads_per_worker(processes):
            if processes:
                log.info("running on Beam's FnApiRunner in %d worker process%s, TensorFlow threads in each: %s",
                         processes, "es" if processes > 1 else "",
                         ", ".join(f"{name}={os.environ.get(name, 'one per core')}" for name in TF_THREAD_VARIABLES))
            else:
                log.info("running on Beam's FnApiRunner in this process")
            return WorkerProcessRunner(provision_info=provision_info).run_pipeline(pipeline, options)


class WorkerProcessRunner(fn_runner.FnApiRunner):
    """Beam's FnApiRunner, whose worker processes (multi_processing) run `beam_jobs.sdk_worker`: Beam's worker,
    started and ended as fits a process holding TensorFlow (1.1 s less at each worker's end, 0.8 s at its start)."""

    def run_via_runner_api(self, pipeline_proto: beam_runner_api_pb2.Pipeline,
                           options: PipelineOptions) -> fn_runner.RunnerResult:
        for environment in pipeline_proto.components.environments.values():
            if environment.urn == python_urns.SUBPROCESS_SDK and environment.payload == BEAM_WORKER_COMMAND.encode():
                environment.payload = WORKER_COMMAND.encode()
        return super().run_via_runner_api(pipeline_proto, options)


def pin_direct_runner(options: PipelineOptions) -> PipelineOptions:
    """Make DirectRunner (or no --runner) mean InProcessRunner in `options`, for every pipeline built from them
    (tf.Transform's too); any other runner named stays as asked. Returns `options`."""
    standard = options.view_as(StandardOptions)
    if standard.runner is None or standard.runner.lower() in DIRECT_RUNNER_NAMES:
        standard.runner = IN_PROCESS_RUNNER
    return options


def worker_processes(options: PipelineOptions) -> int:
    """How many SDK worker processes the FnApiRunner starts for `options`; 0 when it runs the pipeline in this
    process (in_memory; multi_threading, whose workers are threads)."""
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode != "multi_processing":
        return 0
    return direct.direct_num_workers or multiprocessing.cpu_count()  # 0: one per core, as the FnApiRunner reads it


def single_worker(options: PipelineOptions) -> bool:
    """Whether the pipeline runs on one worker, DirectRunner in this process: no step pays for spreading work."""
    runner = options.view_as(StandardOptions).runner
    return (runner in LOCAL_RUNNERS and worker_processes(options) == 0
            and (options.view_as(DirectOptions).direct_num_workers or 1) <= 1)


@contextlib.contextmanager
def tensorflow_threads_per_worker(processes: int) -> Iterator[None]:
    """Give each of `processes` worker processes its share of the cores for TensorFlow, while they start.

    Each SDK worker process starts its own TensorFlow, whose thread pools hold a thread per core: N of them
    oversubscribe the cores N times, and the image decoder's threads and the model's fight over them. The worker
    processes inherit this process's environment, so the variables TensorFlow reads when it creates its pools are
    set for the run's length, unless the user set them. Threads of one process (in_memory, multi_threading) share
    one TensorFlow, whose pools already hold one thread per core: nothing to share out.
    """
    added = tensorflow_thread_shares(processes)
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def check_flag_spelling(argv: list[str]) -> None:
    """Refuse a flag no options class knows when it is one edit from a known one (`--max_eror_rate`).

    Beam passes unknown flags on (portable runners hand them to the job server) and only warns, so a misspelt
    flag of ours would silently leave its default in force. A flag close to no known one still passes on.
    """
    parsers = []
    PipelineOptions(argv).get_all_options(add_extra_args_fn=parsers.append)
    known = sorted({flag for action in parsers[0]._actions for flag in action.option_strings if flag.startswith("--")})
    _, unknown = parsers[0].parse_known_args(argv)
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.85)
        if close:
            raise JobConfigError(f"unknown option {flag}: did you mean {close[0]}?")


def finish_run(report: RunReport) -> int:
    """Print the run report; exit 1 when the counts do not add up or the dead letters pass --max_error_rate."""
    print(format_report(report))
    if not report.reconciled:
        print(f"hubembed: error: {report.read} records read but {report.output_rows} {report.OUTPUT_NAME} + "
              f"{report.dead_lettered} dead-lettered: the runner lost or duplicated records", file=sys.stderr)
        return EXIT_TOO_MANY_ERRORS
    if not report.passed:
        print(f"hubembed: error: {report.dead_lettered} of {report.read} records were dead-lettered "
              f"({report.error_rate:.2%} > --max_error_rate {report.max_error_rate:.2%}); "
              f"see {report.outputs['dead_letters']}", file=sys.stderr)
        return EXIT_TOO_MANY_ERRORS
    return EXIT_OK


GLOB_CHARACTERS = "*?[]{}"


def check_output_folder(output: str) -> None:
    """An output must be one folder we can write: no glob characters (Beam's sinks and deletes would expand them,
    `--overwrite` on `runs/*` deleting every run), not a file, and writable, all found before any work is done."""
    if any(ch in output for ch in GLOB_CHARACTERS):
        raise JobConfigError(f"--output {output!r} holds glob characters ({GLOB_CHARACTERS}): name one folder")
    if "://" not in output and os.path.exists(output) and not os.path.isdir(output):
        raise JobConfigError(f"--output {output!r} is a file, not a folder")
    probe = FileSystems.join(output, f"_hubembed_write_check_{uuid.uuid4().hex}")
    try:
        if not FileSystems.exists(output):
            FileSystems.mkdirs(output)
        with FileSystems.create(probe) as handle:
            handle.write(b"")
        FileSystems.delete([probe])
    except Exception as error:  # PermissionError, read-only mounts, BeamIOError with the cause inside
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise JobConfigError(f"cannot write to --output {output!r}: {cause}") from error


def clear_earlier_run(output: str, earlier: list[str], overwrite: bool) -> None:
    """Refuse an output folder holding `earlier` (a previous run's files and folders), or delete them with
    --overwrite; then make sure the folder exists."""
    if earlier and not overwrite:
        raise JobConfigError(f"{output} already holds a run's output ({len(earlier)} files or folders): "
                             "pass --overwrite to replace it, or write to a new folder")
    if earlier:
        FileSystems.delete(earlier)
    if not FileSystems.exists(output):
        FileSystems.mkdirs(output)
