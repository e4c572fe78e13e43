"""--mixed_precision: the encoders' graphs rewritten to bfloat16 on a CPU that has the instructions (float16 on a
GPU), the outputs marked, and --reuse keeping them apart from float32 ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from beam_jobs.embed_corpus import run as embed_run
from encoders.runtime import MIXED_PRECISION_OPTIONS, cpu_has_bfloat16, tf
from schemas import embeddings as cols
from tests import corpus_builders as corpora
from tests.conftest import read_parquet_dir
from transforms.embedding.reuse import reuse_key

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_INFO = "processor\t: 0\nflags\t\t: fpu sse sse2 avx2 avx512f {extra}\nbogomips\t: 4000\n"


def test_a_cpu_has_bfloat16_by_its_amx_or_avx512_bf16_flag():
    assert cpu_has_bfloat16(CPU_INFO.format(extra="amx_tile amx_bf16"))
    assert cpu_has_bfloat16(CPU_INFO.format(extra="avx512_bf16"))
    assert not cpu_has_bfloat16(CPU_INFO.format(extra="avx512_vnni"))
    assert not cpu_has_bfloat16("")


def test_the_reuse_key_keeps_mixed_precision_apart_and_float32_keys_as_they_were():
    metadata = {cols.META_STORAGE: json.dumps({"vectors": "concat", "dtype": "float32"}),
                cols.META_L2_NORMALIZE: "false"}
    before = reuse_key(metadata)  # an output written before the precision was recorded
    assert reuse_key({**metadata, cols.META_COMPUTE_PRECISION: cols.PRECISION_FLOAT32}) == before
    assert reuse_key({**metadata, cols.META_COMPUTE_PRECISION: cols.PRECISION_MIXED}) != before


@pytest.mark.skipif(not cpu_has_bfloat16(), reason="this CPU has no bfloat16 instructions")
def test_a_mixed_precision_run_moves_vectors_slightly_and_says_so(tmp_path, fixture_encoders):
    """Run as a user runs it, in a process of its own (the rewrite is an option of the whole process)."""
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), corpora.good_rows(6))
    args = ["--input", manifest, "--image_encoder", fixture_encoders["image"], "--text_encoder",
            fixture_encoders["text"]]
    mixed = subprocess.run([sys.executable, "-m", "beam_jobs.embed_corpus", *args, "--output", str(tmp_path / "mixed"),
                            "--mixed_precision"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert mixed.returncode == 0, mixed.stderr
    plain = embed_run([*args, "--output", str(tmp_path / "plain")])
    assert plain.passed

    table = read_parquet_dir(str(tmp_path / "mixed"), "embeddings")
    assert cols.read_metadata(table.schema)[cols.META_COMPUTE_PRECISION] == cols.PRECISION_MIXED
    expected = {row["id"]: np.array(row["embedding"]) for row in
                read_parquet_dir(str(tmp_path / "plain"), "embeddings").to_pylist()}
    assert len(expected) == table.num_rows == 6
    for row in table.to_pylist():
        got, want = np.array(row["embedding"]), expected[row["id"]]
        assert got @ want / (np.linalg.norm(got) * np.linalg.norm(want)) > 0.99
    moved = max(np.abs(np.array(row["embedding"]) - expected[row["id"]]).max() for row in table.to_pylist())
    assert moved > 1e-4  # bfloat16 keeps 8 bits of mantissa: float32 would agree to 1e-6
    stored = pq.read_schema(next(iter(tmp_path.joinpath("plain").glob("embeddings-*.parquet"))))
    assert cols.read_metadata(stored)[cols.META_REUSE_KEY] != cols.read_metadata(table.schema)[cols.META_REUSE_KEY]


def test_mixed_precision_where_it_would_be_slower_fails_at_start_in_one_line(tmp_path, fixture_encoders, capsys,
                                                                              monkeypatch):
    """A machine without a GPU whose CPU has no bfloat16 instructions (this one's CPU stands in for one)."""
    from beam_jobs import embed_corpus
    from encoders import runtime

    monkeypatch.setattr(runtime, "cpu_has_bfloat16", lambda: False)
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), corpora.good_rows(2))
    code = embed_corpus.main(["--input", manifest, "--output", str(tmp_path / "out"), "--image_encoder",
                              fixture_encoders["image"], "--text_encoder", fixture_encoders["text"],
                              "--mixed_precision", "--device", "cpu"])
    assert code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("hubembed: error: --mixed_precision needs a GPU or a CPU with bfloat16 instructions")
    assert not os.path.exists(tmp_path / "out" / "_SUCCESS")


@pytest.mark.skipif(not cpu_has_bfloat16(), reason="this CPU has no bfloat16 instructions")
def test_an_in_process_mixed_run_leaves_the_process_in_float32(tmp_path, fixture_encoders):
    """The rewrite is an option of the whole process: a run in this process turns it off when its DoFns are torn
    down, so what the process runs next (here a float32 run with a batch size none had before, whose graphs are
    rewritten or not when they first run) is float32 again."""
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), corpora.good_rows(6))
    args = ["--input", manifest, "--image_encoder", fixture_encoders["image"], "--text_encoder",
            fixture_encoders["text"]]
    assert embed_run([*args, "--output", str(tmp_path / "before")]).passed
    assert embed_run([*args, "--output", str(tmp_path / "mixed"), "--mixed_precision"]).passed
    options = tf.config.optimizer.get_experimental_options()
    assert not any(options.get(option) for option in MIXED_PRECISION_OPTIONS)
    assert embed_run([*args, "--output", str(tmp_path / "after"), "--batch_size", "5"]).passed

    def vectors(name: str) -> dict:
        return {row["id"]: np.array(row["embedding"]) for row in
                read_parquet_dir(str(tmp_path / name), "embeddings").to_pylist()}

    before, mixed, after = vectors("before"), vectors("mixed"), vectors("after")
    assert max(np.abs(mixed[key] - before[key]).max() for key in before) > 1e-4
    for key, vector in before.items():
        np.testing.assert_allclose(after[key], vector, rtol=1e-5, atol=1e-6)
