"""The launcher: which engine a local run uses, worker processes' share of the cores, the light `hubembed` CLI,
a console without library chatter, and a fast exit that loses nothing."""

from __future__ import annotations

import collections
import gc
import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.portability.api import beam_fn_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner

from beam_jobs import flags, standby
from beam_jobs.embed_corpus import EmbedCorpusOptions
from beam_jobs.embed_corpus import main as embed_main
from beam_jobs.embed_corpus import run as embed_run
from beam_jobs.launch import (
    IN_PROCESS_RUNNER,
    TF_THREAD_VARIABLES,
    WORKER_LOG_RELAY,
    InProcessRunner,
    WorkerLogRelay,
    job_main,
    pin_direct_runner,
    worker_processes,
)
from beam_jobs.predict import PredictOptions
from beam_jobs.train_classifier import TrainClassifierOptions
from encoders.runtime import native_start_up_lines_filtered
from schemas import layout
from tests import corpus_builders as corpora
from tests.conftest import read_parquet_dir
from transforms import report as progress_report
from transforms.embedding.rows import ARROW_POOL_VARIABLE
from transforms.report import ProgressLog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# absl's line format (severity letter, then the date) and the banner TensorFlow's libraries print while loading.
NATIVE_LINE_MARKS = ("absl::InitializeLog", "cudart_stub", "oneDNN", "cuda_platform", "port.cc")


@pytest.fixture
def small_corpus(tmp_path) -> str:
    return corpora.write_jsonl_manifest(str(tmp_path / "corpus"), corpora.good_rows(4))


def embed_args(encoders: dict, input_path: str, output: str, *extra: str) -> list[str]:
    return ["--input", input_path, "--output", output, "--image_encoder", encoders["image"],
            "--text_encoder", encoders["text"], *extra]


@pytest.mark.parametrize("runner", [[], ["--runner", "DirectRunner"]], ids=["no runner", "DirectRunner"])
def test_a_local_run_is_in_process_and_never_reaches_for_prism(caplog, tmp_path, small_corpus, fixture_encoders,
                                                               runner):
    caplog.set_level(logging.DEBUG)
    output = str(tmp_path / "out")
    assert embed_main(embed_args(fixture_encoders, small_corpus, output, *runner)) == 0

    assert os.path.exists(os.path.join(output, layout.SUCCESS_NAME))
    messages = [f"{record.name}: {record.getMessage()}" for record in caplog.records]
    assert not [message for message in messages if "prism" in message.lower()]
    assert "hubembed: running on Beam's FnApiRunner in this process" in messages


def test_the_pinned_runner_is_the_fn_api_runner(tmp_path):
    pipeline = beam.Pipeline(options=pin_direct_runner(PipelineOptions([])))
    counted = beam.metrics.Metrics.counter("test", "seen")

    def count(value):
        counted.inc()
        return value

    _ = pipeline | beam.Create(range(5)) | beam.Map(count)
    result = pipeline.run()
    result.wait_until_finish()

    assert isinstance(pipeline.runner, InProcessRunner)
    assert isinstance(result, fn_runner.RunnerResult)
    assert [c.committed for c in result.metrics().query()["counters"] if c.key.metric.name == "seen"] == [5]


@pytest.mark.parametrize("asked, runs_on", [
    (None, IN_PROCESS_RUNNER), ("DirectRunner", IN_PROCESS_RUNNER), ("direct", IN_PROCESS_RUNNER),
    ("PrismRunner", "PrismRunner"), ("PortableRunner", "PortableRunner"), ("DataflowRunner", "DataflowRunner"),
    ("SwitchingDirectRunner", "SwitchingDirectRunner"),
])
def test_only_direct_runner_is_pinned(asked, runs_on):
    options = PipelineOptions(["--runner", asked] if asked else [])
    assert pin_direct_runner(options).view_as(StandardOptions).runner == runs_on


def test_a_job_runs_with_arrow_memory_from_jemalloc(arrow_pool, monkeypatch):
    """Every job's process takes Arrow's memory from jemalloc before its run begins (job_main): the start-up checks'
    reads and an in-process run's steps, the copy of --reuse vectors among them, pay no huge-page first touches."""
    monkeypatch.delenv(ARROW_POOL_VARIABLE, raising=False)
    pa.set_memory_pool(pa.mimalloc_memory_pool())
    pools_seen = []
    assert job_main([], flags.EMBED, lambda argv: pools_seen.append(pa.default_memory_pool().backend_name),
                    lambda report: 0) == 0
    assert pools_seen == ["jemalloc"]


def seen_from_a_worker(_) -> str:
    """What an element sees of its process: its pid, main module, frozen objects, Arrow's memory pool, TensorFlow
    thread variables."""
    main_module = sys.modules["__main__"].__spec__
    return json.dumps([os.getpid(), main_module.name if main_module else None, gc.get_freeze_count(),
                       pa.default_memory_pool().backend_name, *(os.environ.get(name) for name in TF_THREAD_VARIABLES)])


def test_worker_processes_are_the_projects_workers_with_their_share_of_tensorflow_threads(tmp_path):
    """What each SDK worker process of a multi_processing run sees, from inside it: it runs beam_jobs.sdk_worker
    (TensorFlow imported before the harness and frozen out of the collector's sight, Arrow's memory from jemalloc
    before any step runs: this pipeline has no step of the job's), and its environment gives it its share of the
    cores for TensorFlow."""
    before = {name: os.environ.get(name) for name in TF_THREAD_VARIABLES}
    share = str(max(1, len(os.sched_getaffinity(0)) // 2))
    options = pin_direct_runner(PipelineOptions(["--direct_num_workers", "2",
                                                 "--direct_running_mode", "multi_processing"]))
    with beam.Pipeline(options=options) as pipeline:
        _ = (pipeline
             | beam.Create(range(8))
             | beam.Reshuffle()
             | beam.Map(seen_from_a_worker)
             | beam.io.WriteToText(str(tmp_path / "seen")))

    seen = [json.loads(line) for path in glob.glob(str(tmp_path / "seen*")) for line in open(path)]
    assert len(seen) == 8
    assert os.getpid() not in {pid for pid, *_ in seen}  # the elements were processed in worker processes
    assert {main for _, main, *_ in seen} == {"beam_jobs.sdk_worker"}
    assert all(frozen > 100_000 for _, _, frozen, *_ in seen)  # TensorFlow's and Beam's objects, imported first
    assert {pool for _, _, _, pool, *_ in seen} == {os.environ.get(ARROW_POOL_VARIABLE) or "jemalloc"}
    expected = [before[name] or share for name in TF_THREAD_VARIABLES]
    assert {tuple(values) for _, _, _, _, *values in seen} == {tuple(expected)}
    assert {name: os.environ.get(name) for name in TF_THREAD_VARIABLES} == before  # the launcher's, as it was


def test_a_multi_processing_run_reconciles_and_writes_what_one_process_writes(caplog, tmp_path, fixture_encoders):
    """Counters come back from the worker processes: the report adds up, and matches the files written; the
    console shows the workers' own lines (progress, encoder loads) as a run in one process shows them, and no
    notices of Beam's about starting its workers."""
    manifest, expected = corpora.write_bad_manifest(str(tmp_path / "corpus"))
    lenient = ("--max_error_rate", "1", "--max_image_pixels", "1000000")
    caplog.set_level(logging.INFO)
    assert embed_main(embed_args(fixture_encoders, manifest, str(tmp_path / "workers"), *lenient, "--progress_interval",
                                 "0", "--direct_num_workers", "2", "--direct_running_mode", "multi_processing")) == 0
    # The console shows WARNING and up of other loggers: nothing of Beam's, and no worker's line left as Beam relays it.
    assert [record.getMessage() for record in caplog.records
            if record.name.startswith("apache_beam") and record.levelno >= logging.WARNING] == []
    assert not any(record.getMessage().startswith("Worker:") for record in caplog.records)
    workers_lines = [record.getMessage() for record in caplog.records if record.name == "hubembed"]
    progress = [line for line in workers_lines if line.startswith("progress (worker ")]
    assert progress and all(f"(worker {os.getpid()})" not in line for line in progress)
    assert any(line.startswith("loaded image encoder") for line in workers_lines)
    # The workers that ran the pipeline are the two the launcher started ahead of the run (beam_jobs.standby).
    started_ahead = [re.fullmatch(r"started 2 worker processes ahead of the run \(pids (\d+), (\d+)\)", line)
                     for line in workers_lines]
    standby_pids = {int(pid) for match in started_ahead if match for pid in match.groups()}
    assert len(standby_pids) == 2
    assert {int(re.match(r"progress \(worker (\d+)\)", line)[1]) for line in progress} <= standby_pids
    workers = json.load(open(tmp_path / "workers" / layout.REPORT_NAME))
    alone = embed_run(embed_args(fixture_encoders, manifest, str(tmp_path / "alone"), *lenient))

    reasons = collections.Counter(reason for reason in expected.values() if reason)
    reasons["unreadable_row"] += 1  # the line that is not JSON
    assert workers["reconciled"] and workers["passed"]
    assert (workers["read"], workers["embedded"], workers["dead_lettered"]) == (20, 5, 15)
    assert workers["dead_lettered_by_reason"] == dict(reasons)
    embedded = read_parquet_dir(str(tmp_path / "workers"), "embeddings")
    assert embedded.num_rows == workers["embedded"]
    assert read_parquet_dir(str(tmp_path / "workers"), layout.DEAD_LETTERS_PREFIX).num_rows == 15

    assert (alone.read, alone.embedded, alone.dead_lettered_by_reason) == (20, 5, dict(reasons))
    by_id = {row["id"]: row["embedding"] for row in read_parquet_dir(str(tmp_path / "alone"), "embeddings").to_pylist()}
    assert sorted(embedded.column("id").to_pylist()) == sorted(by_id)
    for row in embedded.to_pylist():
        np.testing.assert_allclose(row["embedding"], by_id[row["id"]], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("argv", [
    [], ["--direct_running_mode", "multi_processing"], ["--direct_running_mode=multi_processing",
                                                         "--direct_num_workers=3"],
    ["--direct_num_workers", "2"], ["--direct_num_workers", "2", "--direct_running_mode", "multi_threading"],
    ["--runner", "DirectRunner", "--direct_running_mode", "multi_processing", "--direct_num_workers", "2"],
    ["--runner", "direct", "--direct_running_mode", "multi_processing", "--direct_num_workers", "1"],
    ["--runner", "PrismRunner", "--direct_running_mode", "multi_processing", "--direct_num_workers", "2"],
    ["--runner", "DataflowRunner", "--direct_running_mode", "multi_processing"],
])
def test_the_launcher_reads_how_many_worker_processes_a_run_starts_before_importing_beam(argv):
    """What standby_workers reads from the flags alone is what the runner starts once Beam has parsed them."""
    options = pin_direct_runner(PipelineOptions(argv))
    starts = worker_processes(options) if options.view_as(StandardOptions).runner == IN_PROCESS_RUNNER else 0
    assert standby.requested_worker_processes(argv) == starts


def live_processes() -> Iterator[tuple[int, int, list[bytes]]]:
    """(pid, parent pid, command line) of each process of this machine that has not ended, from /proc (a zombie
    nobody reaped yet has ended)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as handle:
                state, parent = handle.read().rsplit(")", 1)[1].split()[:2]
        except (FileNotFoundError, ProcessLookupError):  # ended meanwhile
            continue
        if state != "Z":
            yield int(entry), int(parent), command


def standby_children(launcher_pid: int) -> dict[int, list[bytes]]:
    """pid → command line of the live standby workers (`beam_jobs.sdk_worker --standby`) whose parent is
    `launcher_pid`."""
    return {pid: command for pid, parent, command in live_processes()
            if parent == launcher_pid and b"beam_jobs.sdk_worker" in command and b"--standby" in command}


def test_standby_workers_end_with_their_launcher_even_when_it_is_killed(tmp_path, small_corpus, fixture_encoders):
    """`hubembed embed` with worker processes starts them ahead of the run, before it imports the job; killed with
    SIGKILL before its run, the launcher leaves no worker behind: each sees its stdin close and ends."""
    command = [sys.executable, "-m", "beam_jobs.cli", "embed",
               *embed_args(fixture_encoders, small_corpus, str(tmp_path / "out"), "--direct_num_workers", "2",
                           "--direct_running_mode", "multi_processing")]
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while len(standby_children(launcher.pid)) < 2 and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.02)
    standbys = standby_children(launcher.pid)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert len(standbys) == 2  # started by the command itself, at once
    deadline = time.monotonic() + 60  # a standby killed mid-import ends once its imports are done
    while set(standbys) & {pid for pid, _, _ in live_processes()} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(standbys) & {pid for pid, _, _ in live_processes()}


def test_a_worker_whose_standby_is_gone_starts_by_itself(tmp_path):
    """A go-between that claims a standby no longer listening (it ended, its socket file left behind) gives up on it
    at once and on the others when all are claimed: the worker then starts as Beam's own would."""
    listener = standby.wait_for_a_run(standby.socket_path(str(tmp_path), 0))
    listener.close()
    started = time.monotonic()
    assert standby.hand_over({standby.STANDBY_VARIABLE: f"{tmp_path}:1"}) is None  # refused: the standby is gone
    assert standby.hand_over({standby.STANDBY_VARIABLE: f"{tmp_path}:1"}) is None  # claimed already
    assert time.monotonic() - started < standby.CONNECT_SECONDS


def test_a_failed_start_up_check_leaves_no_standby_worker_behind(tmp_path, fixture_encoders):
    """Misconfiguration still fails at start in one line with worker processes asked for, and the standbys started
    ahead of the run end with the launcher, their folder removed."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "beam_jobs.cli", "embed",
         *embed_args(fixture_encoders, str(tmp_path / "missing.jsonl"), str(tmp_path / "out"),
                     "--direct_num_workers", "2", "--direct_running_mode", "multi_processing")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, list[bytes]] = {}
    while launcher.poll() is None:  # the missing input is found after the job's import, seconds after they start
        seen.update(standby_children(launcher.pid))
        time.sleep(0.02)
    _, stderr = launcher.communicate()
    assert launcher.returncode == 2
    assert stderr.strip().startswith("hubembed: error:") and len(stderr.strip().splitlines()) == 1
    assert len(seen) == 2
    assert not set(seen) & {pid for pid, _, _ in live_processes()}
    sockets = [part.decode() for command in seen.values() for part in command if part.endswith(b".sock")]
    assert len(sockets) == 2 and not any(os.path.exists(os.path.dirname(path)) for path in sockets)


def run_python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_help_and_flag_types_are_answered_without_beam_or_tensorflow():
    probe = run_python("""
        import sys
        from beam_jobs import cli
        codes = []
        for argv in (["--help"], ["embed", "--help"], ["train", "--help"], ["predict", "--help"],
                     ["embed", "--batch_size", "many"], ["predict", "--top_k", "1.5"]):
            try:
                codes.append(cli.main(argv))
            except SystemExit as exit:
                codes.append(exit.code)
        heavy = sorted({name.split(".")[0] for name in sys.modules} & {"apache_beam", "tensorflow", "tf_keras"})
        print("RESULT", codes, heavy)
    """)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().splitlines()[-1] == "RESULT [0, 0, 0, 0, 2, 2] []"
    for flag in ("--image_encoder", "--l2_normalize", "--features", "--fine_tune", "--top_k", "--direct_num_workers"):
        assert flag in probe.stdout
    assert "argument --batch_size: invalid int value: 'many'" in probe.stderr
    assert "usage: hubembed predict" in probe.stderr


@pytest.mark.parametrize("command, options_class", [
    (flags.EMBED, EmbedCorpusOptions), (flags.TRAIN, TrainClassifierOptions), (flags.PREDICT, PredictOptions)])
def test_the_light_parser_and_beams_options_read_flags_alike(command, options_class):
    argv = ["--batch_size", "7", "--overwrite", "--input", "in/*.jsonl"]
    light = vars(command.parser().parse_known_args(argv)[0])
    beam_view = PipelineOptions(argv).view_as(options_class)
    assert light["batch_size"] == 7
    assert light == {name: getattr(beam_view, name) for name in light}


NATIVE_LINES = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
                b"I0000 00:00:1795320067.734409   12538 port.cc:153] oneDNN custom operations are on.\n"
                b"W0000 00:00:1795320067.734409   12538 some.cc:1] a warning\n"
                b"E0000 00:00:1795320067.734409   12538 cuda_platform.cc:52] failed call to cuInit\n"
                b"a line of someone else\n")


@pytest.mark.parametrize("level, kept", [
    ("0", ("WARNING: All log", "I0000", "W0000", "E0000", "a line")),
    ("2", ("E0000", "a line")),
    ("3", ("a line",)),
])
def test_native_start_up_lines_follow_tf_cpp_min_log_level(capfd, monkeypatch, level, kept):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", level)
    with native_start_up_lines_filtered():
        os.write(2, NATIVE_LINES)  # as native code writes: to the file descriptor, under Python's sys.stderr
    assert capfd.readouterr().err.splitlines() == [
        line for line in NATIVE_LINES.decode().splitlines() if line.startswith(kept)]


def test_the_console_script_runs_a_job_with_only_its_own_lines(tmp_path, small_corpus, fixture_encoders):
    hubembed = os.path.join(os.path.dirname(sys.executable), "hubembed")
    env = {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}
    output = str(tmp_path / "out")
    done = subprocess.run([hubembed, "embed", *embed_args(fixture_encoders, small_corpus, output)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)

    assert done.returncode == 0, done.stderr
    assert "embed_corpus: run report" in done.stdout  # flushed before the fast exit
    report = json.load(open(os.path.join(output, layout.REPORT_NAME)))
    assert (report["read"], report["embedded"]) == (4, 4)
    assert os.path.exists(os.path.join(output, layout.SUCCESS_NAME))
    chatter = [line for line in done.stderr.splitlines() if any(mark in line for mark in NATIVE_LINE_MARKS)]
    assert chatter == []
    assert all(" INFO hubembed: " in line or " INFO encoders." in line for line in done.stderr.splitlines())


def test_the_console_script_freezes_what_the_job_imported(tmp_path):
    """`hubembed <command>` runs one command in its process: what the job's import made is frozen out of the
    collector's sight before the run, so the run's first full collections do not walk it (in-process callers of
    cli.main, tests and notebooks, keep their collector as it was)."""
    done = run_python("""
        import atexit, gc
        from beam_jobs import cli
        atexit.register(lambda: print(gc.get_freeze_count()))
        cli.console_main()
    """, "embed", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "out"))
    assert done.returncode == 2  # the missing input, found after the job's import
    assert int(done.stdout.split()[-1]) > 100_000  # TensorFlow's and Beam's objects


def test_exit_process_runs_exit_handlers_and_waits_for_live_threads(tmp_path):
    done = run_python("""
        import atexit, sys, threading, time
        from beam_jobs.cli import exit_process
        marker = sys.argv[1]
        atexit.register(lambda: open(marker + ".atexit", "w").close())
        def late_writer():
            time.sleep(0.3)
            open(marker + ".thread", "w").close()
        threading.Thread(target=late_writer).start()
        print("last words", end="")
        exit_process(3)
    """, str(tmp_path / "m"))
    assert (done.returncode, done.stdout) == (3, "last words")
    assert os.path.exists(tmp_path / "m.atexit") and os.path.exists(tmp_path / "m.thread")

    fast = run_python("""
        import atexit, sys
        from beam_jobs.cli import exit_process
        atexit.register(lambda: open(sys.argv[1], "w").close())
        print("bye", end="")
        exit_process(0)
    """, str(tmp_path / "fast"))
    assert (fast.returncode, fast.stdout) == (0, "bye")
    assert os.path.exists(tmp_path / "fast")


def relayed(severity, message: str, location: str) -> logging.LogRecord:
    """A worker's log entry as Beam's logging service hands it to the launcher's logging."""
    entry = beam_fn_api_pb2.LogEntry(severity=severity, message=message, log_location=location)
    entry.timestamp.seconds, entry.timestamp.nanos = 1_700_000_000, 250_000_000
    one_line = str(entry).replace("\n", " ")
    return logging.LogRecord(WORKER_LOG_RELAY, logging.INFO, __file__, 1, "Worker: %s", (one_line,), None)


def test_the_worker_log_relay_keeps_the_jobs_own_lines_and_the_warnings_of_others():
    relay = WorkerLogRelay()
    severity = beam_fn_api_pb2.LogEntry.Severity
    message = 'progress (worker 7): 32 rows done "quoted"\nand a second line'
    own = relayed(severity.INFO, message, progress_report.__file__ + ":61")
    assert relay.filter(own)
    assert (own.name, own.levelno, own.getMessage()) == ("hubembed", logging.INFO, message)
    assert own.created == 1_700_000_000.25

    assert not relay.filter(relayed(severity.INFO, "Creating state cache", "/site-packages/apache_beam/x.py:3"))
    warning = relayed(severity.WARN, "a bundle failed, retrying", "/site-packages/apache_beam/x.py:3")
    assert relay.filter(warning)
    assert (warning.name, warning.levelno, warning.getMessage()) == ("worker", logging.WARNING,
                                                                      "a bundle failed, retrying")
    notice = relayed(severity.WARN, "No semi_persistent_directory found: ...", "/x/sdk_worker_main.py:1")
    assert not relay.filter(notice)
    own_info = logging.LogRecord(WORKER_LOG_RELAY, logging.INFO, __file__, 1, "Job %s started", ("1",), None)
    assert not relay.filter(own_info)  # the relay logger's own INFO lines stay off the console, as before


def test_the_progress_rate_counts_from_the_start_of_the_work(caplog):
    """The first line's rate counts from the DoFn's setup (start), not from the moment the first rows came out."""
    caplog.set_level(logging.INFO)
    progress = ProgressLog(0)
    progress.start()
    time.sleep(0.2)
    progress.add(embedded=32)
    [line] = [record.getMessage() for record in caplog.records if record.name == "hubembed"]
    assert line.startswith("progress: 32 rows done (32 embedded, 0 dead-lettered), ")  # the launcher's process
    assert float(line.rsplit(", ", 1)[1].split()[0]) <= 32 / 0.2
