"""The SDK worker process of a run on this machine in worker processes (`--direct_running_mode multi_processing`).

    python -m beam_jobs.sdk_worker                     (started by the FnApiRunner, never by hand)
    python -m beam_jobs.sdk_worker --standby SOCKET    (started ahead of the run by beam_jobs.standby)

Beam's own worker, `apache_beam.runners.worker.sdk_worker_main`, started and ended as fits a process that holds
TensorFlow:
- Started ahead of the run when the launcher could (beam_jobs.standby): the process the runner starts then only
  hands its environment over to a standby that has imported everything already, and waits for it.
- Every worker of the project's pipelines imports TensorFlow as it unpickles the first DoFn that runs a model. Here
  it is imported first, with the garbage collector paused (`import_paused_collector`: 0.8 s of CPU less a worker),
  then frozen out of the collector's sight: a worker lives for one run, and what it imported stays to its end.
- Once Beam's harness is done (its bundles finished, its DoFns torn down, its log flushed), the process exits
  without Python's finalization (`exit_process`). Tearing down TensorFlow's module graph took 1.1 s a worker, and
  the runner closes its workers one after another: closing 2 workers took 2.2 s at the end of a run, now 0.1 s.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import traceback
from typing import NoReturn

from beam_jobs import standby

BEAM_WORKER_MAIN = "apache_beam.runners.worker.sdk_worker_main"
# What every worker of the project's pipelines imports: TensorFlow, tensorflow_hub and tensorflow_text, configured.
PRELOADED = ("encoders.runtime",)


def main() -> NoReturn:
    listener = None
    if sys.argv[1:2] == [standby.STANDBY_FLAG]:
        listener = standby.wait_for_a_run(sys.argv[2])
    else:
        code = standby.hand_over(os.environ)
        if code is not None:
            os._exit(code)  # nothing of this process's own to flush or finalize: it imported nothing
    # Imported here, not above: a go-between starts in milliseconds, and must not pay for what it does not run.
    from beam_jobs.cli import exit_process, import_paused_collector
    from transforms.embedding.rows import choose_arrow_memory_pool

    harness = import_paused_collector(BEAM_WORKER_MAIN)
    for module in PRELOADED:
        import_paused_collector(module)
    gc.freeze()  # a worker lives for one run: what it imported stays to its end, and need not be walked again
    choose_arrow_memory_pool()  # before any step of the run makes an Arrow buffer
    if listener is None:
        harness.main(sys.argv)  # raises when the harness fails: the traceback and a nonzero exit, as Beam's own
        exit_process(0)
    connection = standby.take_run(listener)
    if connection is None:  # the launcher ended without a run for this standby
        exit_process(0)
    code = 0
    try:
        harness.main(sys.argv[:1])
    except SystemExit as exit_:  # as the interpreter reads it: None is success, a message is failure
        code = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    with connection, contextlib.suppress(OSError):  # a go-between gone has no one to tell
        connection.sendall(f"{code}\n".encode())
    exit_process(code)


if __name__ == "__main__":
    main()
