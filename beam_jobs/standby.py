"""Worker processes started ahead of a run (`--direct_running_mode multi_processing` on this machine).

Beam's FnApiRunner starts its SDK worker processes when the pipeline starts to run, and each first imports
TensorFlow and Beam: about 3 s of CPU inside the run, which one process (in_memory) spent before its run began. The
launcher starts as many standby workers as the run will ask for as soon as it knows the flags, and they import while
it imports, checks the job and builds the pipeline. When the runner then starts a worker (`python -m
beam_jobs.sdk_worker`), that process is a go-between: it claims a standby, hands it the worker's environment (the
runner's addresses, the options, the worker id), waits for it to end and exits with its exit code:

    launcher                                     standby (python -m beam_jobs.sdk_worker --standby SOCKET)
    standby_workers(argv) ──── starts ─────────► listens on SOCKET, imports TensorFlow and Beam, waits
    imports the job, checks it, builds the pipeline
    the FnApiRunner starts a worker:
      python -m beam_jobs.sdk_worker ── claims ─► takes the environment, runs Beam's harness, sends its exit code
      (`hand_over`: imports nothing, waits)

A worker that finds no standby to claim (a second pipeline of the same job, a standby that died) starts as before.
Standbys nobody claimed exit when the launcher ends (their stdin, a pipe from it, closes), even if it is killed.
Stdlib only: the go-between and the `hubembed` command use it before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping

# What --runner names Beam's DirectRunner by (Beam matches runner names without case), and the class the launcher
# pins it to (beam_jobs.launch.pin_direct_runner), by Beam's runner path.
DIRECT_RUNNER_NAMES = ("direct", "directrunner")
IN_PROCESS_RUNNER = "beam_jobs.launch.InProcessRunner"
# TensorFlow sizes its thread pools from these when it first runs an op (unless a session config says otherwise).
TF_THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
# Where the launcher's standbys wait: "FOLDER:COUNT", their sockets FOLDER/0.sock ... in the launcher's environment,
# which the runner's worker processes inherit.
STANDBY_VARIABLE = "HUBEMBED_STANDBY_WORKERS"
STANDBY_FLAG = "--standby"
WORKER_MODULE = "beam_jobs.sdk_worker"
# How long a go-between waits for its standby's socket to appear: a standby binds it within its first 0.1 s, and the
# runner starts its workers seconds after the standbys (the launcher imports and checks the job meanwhile).
CONNECT_SECONDS = 10
SOCKET_PATH_MAX = 100  # bytes of a Unix socket's path: at most 108 on Linux, 104 on macOS

log = logging.getLogger("hubembed")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and `taskset` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tensorflow_thread_shares(processes: int) -> dict[str, str]:
    """The TensorFlow thread variables that give each of `processes` worker processes its share of the cores, for
    those the user did not set (none for one process, whose pools already hold a thread per core)."""
    if processes <= 1:
        return {}
    share = str(max(1, usable_cores() // processes))
    return {name: share for name in TF_THREAD_VARIABLES if name not in os.environ}


def requested_worker_processes(argv: list[str]) -> int:
    """How many SDK worker processes a run with these flags starts on this machine, read without Beam (its option
    names, as beam_jobs.launch.worker_processes reads them from the options): 0 for any other runner or mode."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--runner")
    parser.add_argument("--direct_running_mode")
    parser.add_argument("--direct_num_workers", type=int, default=1)  # Beam's default
    try:
        flags, _ = parser.parse_known_args(argv)
    except SystemExit:  # a malformed value: the job's own parser reports it
        return 0
    direct = flags.runner is None or flags.runner.lower() in DIRECT_RUNNER_NAMES or flags.runner == IN_PROCESS_RUNNER
    if not direct or flags.direct_running_mode != "multi_processing":
        return 0
    return flags.direct_num_workers or os.cpu_count() or 1  # 0: one per core, as the FnApiRunner reads it


def socket_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"{index}.sock")


def claim_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"{index}.claimed")


@contextlib.contextmanager
def standby_workers(argv: list[str]) -> Iterator[None]:
    """Start the standby workers a run with `argv` will use, for as long as the block runs; then end those nobody
    claimed and remove their folder. Nothing when the run starts no worker processes, or when an outer block (the
    `hubembed` command, then the job's own main) started them already."""
    count = requested_worker_processes(argv)
    if not count or os.environ.get(STANDBY_VARIABLE):
        yield
        return
    folder = tempfile.mkdtemp(prefix="hubembed-workers-")
    if len(socket_path(folder, count).encode()) > SOCKET_PATH_MAX:  # a deep TMPDIR: the workers start cold instead
        shutil.rmtree(folder, ignore_errors=True)
        yield
        return
    environment = dict(os.environ, **tensorflow_thread_shares(count))
    processes = [subprocess.Popen([sys.executable, "-m", WORKER_MODULE, STANDBY_FLAG, socket_path(folder, index)],
                                  stdin=subprocess.PIPE, env=environment) for index in range(count)]
    os.environ[STANDBY_VARIABLE] = f"{folder}:{count}"
    log.info("started %d worker process%s ahead of the run (pids %s)", count, "es" if count > 1 else "",
             ", ".join(str(process.pid) for process in processes))
    try:
        yield
    finally:
        os.environ.pop(STANDBY_VARIABLE, None)
        for index, process in enumerate(processes):
            process.stdin.close()  # a claimed standby has served its run by now, and ends
            if not os.path.exists(claim_path(folder, index)):
                process.kill()  # never claimed (a failed start-up check): it may still be importing
        for process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _claim(folder: str, count: int) -> socket.socket | None:
    """A connection to a standby of `folder` no other worker claimed (first come, by an exclusive claim file), or
    None when all are taken or none answers."""
    for index in range(count):
        try:
            os.close(os.open(claim_path(folder, index), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        deadline = time.monotonic() + CONNECT_SECONDS
        while True:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connection.connect(socket_path(folder, index))
                return connection
            except FileNotFoundError:  # not bound yet
                connection.close()
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            except ConnectionRefusedError:  # no one listens: the standby ended
                connection.close()
                break
    return None


def hand_over(environment: Mapping[str, str]) -> int | None:
    """Run this worker in a standby of the launcher, when there is one to claim: send it `environment`, wait for it
    to end, and return its exit code (1 if it ended without sending one); None when no standby was claimed."""
    where = environment.get(STANDBY_VARIABLE)
    if not where:
        return None
    folder, count = where.rsplit(":", 1)
    connection = _claim(folder, int(count))
    if connection is None:
        return None
    reply = b""
    with connection, contextlib.suppress(OSError):  # the standby ended before its reply: reset, or closed early
        connection.sendall(json.dumps(dict(environment)).encode() + b"\n")
        while chunk := connection.recv(4096):
            reply += chunk
    return int(reply) if reply.strip().isdigit() else 1


def wait_for_a_run(path: str) -> socket.socket:
    """A standby's listening socket at `path`, bound at once so that a go-between can connect while the standby
    still imports."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    return listener


def take_run(listener: socket.socket) -> socket.socket | None:
    """Wait for a go-between, or for the launcher's end (stdin closed: None); then the connection, whose first line
    is the worker's environment, now this process's."""
    with selectors.DefaultSelector() as selector:
        selector.register(listener, selectors.EVENT_READ)
        selector.register(sys.stdin, selectors.EVENT_READ)
        ready = {key.fileobj for key, _ in selector.select()}
    if listener not in ready:
        return None
    connection, _ = listener.accept()
    listener.close()
    line = b""
    while not line.endswith(b"\n"):
        chunk = connection.recv(65536)
        if not chunk:
            return None
        line += chunk
    os.environ.update(json.loads(line))
    return connection
