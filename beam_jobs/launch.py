"""What every job's entry point shares: its flags on the command line, logging, one-line errors, exit codes."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import uuid
from collections.abc import Callable
from typing import TypeVar

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from schemas.report import RunReport
from transforms.report import format_report

EXIT_OK, EXIT_TOO_MANY_ERRORS, EXIT_CONFIG = 0, 1, 2
# Runners whose workers never share the launcher's disk. Flink, Spark and Portable runners can run on this machine
# (a local job server, an embedded cluster), so a local folder is left for them to judge.
REMOTE_RUNNERS = ("DataflowRunner",)
# Runners whose workers are processes of this machine: what the launcher sees (a GPU) is what they see.
LOCAL_RUNNERS = (None, "DirectRunner", "direct", "BundleBasedDirectRunner", "SwitchingDirectRunner")

ReportT = TypeVar("ReportT")


class JobConfigError(ValueError):
    """Misconfiguration found at start; the message is one line, fit for the console."""


def job_main(argv: list[str] | None, prog: str, doc: str, options_class: type,
             run: Callable[[list[str]], ReportT], finish: Callable[[ReportT], int]) -> int:
    """Parse (for --help and flag types), log, run; a JobConfigError is one `hubembed: error:` line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                     epilog="Any other flag (--runner, --project, --region, ...) goes to Beam.")
    options_class._add_argparse_args(parser)
    parser.parse_known_args(argv)  # --help, and type errors in our own flags, as argparse reports them
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("hubembed", "encoders"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        check_flag_spelling(argv)
        report = run(argv)
    except JobConfigError as error:
        print(f"hubembed: error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    return finish(report)


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
