"""The job on the portable topology that Flink and Spark clusters use: a job service and a pool of SDK workers.

Both run here on loopback as separate processes, so the pipeline is really submitted as a proto, its DoFns are
unpickled in other processes, the encoders are loaded there, and the counters come back through the job service.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from beam_jobs.embed_corpus import run
from tests import corpus_builders as corpora
from tests.conftest import read_parquet_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def portable_services(tmp_path_factory):
    # The worker pool starts SDK workers with the `python` on PATH: make it this interpreter.
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    job_port, pool_port = free_port(), free_port()
    logs = tmp_path_factory.mktemp("portable")
    processes = [
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                          "--port", str(job_port)], env=env, stdout=open(logs / "job.log", "wb"),
                         stderr=subprocess.STDOUT),
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                          f"--service_port={pool_port}"], env=env, stdout=open(logs / "pool.log", "wb"),
                         stderr=subprocess.STDOUT),
    ]
    try:
        wait_for_port(job_port)
        wait_for_port(pool_port)
        yield ["--runner", "PortableRunner", f"--job_endpoint=localhost:{job_port}", "--environment_type=EXTERNAL",
               f"--environment_config=localhost:{pool_port}"]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def test_portable_runner_matches_direct_runner(portable_services, fixture_encoders, tmp_path):
    manifest, expected = corpora.write_bad_manifest(str(tmp_path / "corpus"))
    common = ["--input", manifest, "--image_encoder", fixture_encoders["image"], "--text_encoder",
              fixture_encoders["text"], "--max_image_pixels", "1000000", "--max_error_rate", "1"]
    portable = run([*common, "--output", str(tmp_path / "portable"), *portable_services])
    direct = run([*common, "--output", str(tmp_path / "direct"), "--runner", "DirectRunner"])

    assert (portable.read, portable.embedded, portable.dead_lettered) == (
        direct.read, direct.embedded, direct.dead_lettered)
    assert portable.dead_lettered_by_reason == direct.dead_lettered_by_reason
    assert portable.reconciled
    left = read_parquet_dir(str(tmp_path / "portable"), "embeddings").sort_by("id")
    right = read_parquet_dir(str(tmp_path / "direct"), "embeddings").sort_by("id")
    assert left.column("id").to_pylist() == right.column("id").to_pylist()
    np.testing.assert_array_equal(np.stack(left.column("embedding").to_numpy(zero_copy_only=False)),
                                  np.stack(right.column("embedding").to_numpy(zero_copy_only=False)))


def test_pretrained_default_encoders_load_in_separate_workers(portable_services, tmp_path):
    """No handles: the job bakes (or finds) the defaults and the SDK workers, other processes, load them.

    The text encoder's graph holds tensorflow_text ops, which load only in a process that imported tensorflow_text:
    this is the run that shows encoders.runtime does that on workers too.
    """
    rows = corpora.good_rows(3)
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), rows)
    output = str(tmp_path / "out")
    report = run(["--input", manifest, "--output", output, "--l2_normalize", *portable_services])
    assert (report.read, report.embedded) == (3, 3)
    table = read_parquet_dir(output, "embeddings")
    assert table.schema.field("embedding").type.list_size == 1024 + 384
    metadata = table.schema.metadata
    assert b"mobilenet-v1-100-224-feature-vector" in metadata[b"hubembed.image_encoder"]
    assert b"minilm-l6-v2" in metadata[b"hubembed.text_encoder"]
    text_vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))[:, 1024:]  # MiniLM's slice
    np.testing.assert_allclose(np.linalg.norm(text_vectors, axis=1), 1.0, rtol=1e-5)
