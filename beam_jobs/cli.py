"""`hubembed <command> ...`: one console script over the project's entry points.

A command's --help, and a flag of the wrong type, are answered from its flags alone (beam_jobs.flags), without
importing the job: Beam and TensorFlow cost seconds to import, a help page should not. Only a command that runs
imports its module, and calls the same `main(argv)` as `python -m <module>`.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import sys
import threading
from types import ModuleType
from typing import NoReturn

from beam_jobs.flags import JOBS
from beam_jobs.standby import standby_workers

# Commands whose module parses its own arguments (its own subcommands); cheap to import.
DELEGATED = {
    "encoders": ("encoders.commands", "the baked encoders: `hubembed encoders list`, `hubembed encoders bake`"),
}


def usage() -> str:
    width = max(len(name) for name in (*JOBS, *DELEGATED))
    lines = ["usage: hubembed <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in JOBS.items()]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in DELEGATED.items()]
    lines += ["", "`hubembed <command> --help` lists the command's options; `hubembed embed ...` runs what "
                  "`python -m beam_jobs.embed_corpus ...` runs."]
    return "\n".join(lines)


def main(argv: list[str] | None = None, freeze_imports: bool = False) -> int:
    """Run a `hubembed` command. `freeze_imports`, for a process that runs this one command and exits (the console
    script): what the job's import created is frozen out of the collector's sight (`gc.freeze`) once imported,
    instead of walked by the run's first full collections (0.5-1 s inside a 10 s run, measured)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in DELEGATED:
        return importlib.import_module(DELEGATED[name][0]).main(rest)
    if name not in JOBS:
        print(f"hubembed: error: no command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    command = JOBS[name]
    command.parser(prog=f"hubembed {name}").parse_known_args(rest)  # --help and flag types, as argparse reports them
    with standby_workers(rest):  # before the job's imports, which theirs then overlap (beam_jobs.standby)
        job = import_paused_collector(command.module)
        if freeze_imports:
            gc.freeze()
        return job.main(rest)


def import_paused_collector(module: str) -> ModuleType:
    """Import `module` with Python's garbage collector paused meanwhile.

    TensorFlow and Beam create some 700,000 objects as they import, and Python's collector walks all of those made
    so far at each of its full collections, half a dozen during the import: 0.8 s of the 3.6 s their import takes
    here. Paused, it walks them once, at its first full collection after (about 0.3 s). They are not frozen out of
    its sight (`gc.freeze`) here: a process that imports a job in-process (tests, a notebook) would keep its garbage
    of the moment for good; the console script's process, which runs one command, freezes them (`main`).
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        return importlib.import_module(module)
    finally:
        if collecting:
            gc.enable()


def exit_process(code: int) -> NoReturn:
    """End the process with `code` once a job has returned: exit handlers run and the streams are flushed, but
    Python's own finalization is skipped. Tearing down TensorFlow's and Beam's module graphs takes about 2 s on 2
    cores and does nothing a finished job needs (its files are closed and published by then). With a non-daemon
    thread still alive, which a normal exit waits for, the exit is the normal one."""
    others = [thread for thread in threading.enumerate() if thread is not threading.current_thread()]
    if any(thread.is_alive() and not thread.daemon for thread in others):
        sys.exit(code)
    atexit._run_exitfuncs()  # logging.shutdown, weakref finalizers (temporary folders), libraries' own handlers
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing more can reach it
            pass
    os._exit(code)


def console_main() -> NoReturn:
    """The `hubembed` console script (setup.py)."""
    exit_process(main(freeze_imports=True))


if __name__ == "__main__":
    console_main()
