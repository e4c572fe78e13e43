"""End-to-end runs of the embedding job on DirectRunner with the tiny real encoders."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from beam_jobs.embed_corpus import main, run
from encoders.hub_module import EncoderSpec, LoadedEncoder, probe_encoder
from schemas import embeddings as cols
from schemas.dead_letters import DEAD_LETTER_SCHEMA
from tests import corpus_builders as corpora
from tests.conftest import read_parquet_dir
from transforms.image_decode import make_image_decoder


def embed(encoders: dict, input_path: str, output: str, *extra: str):
    """The job with every vector column stored (--vectors both), so the tests can compare them."""
    return run(["--input", input_path, "--output", output, "--image_encoder", encoders["image"],
                "--text_encoder", encoders["text"], "--runner", "DirectRunner", "--vectors", "both", *extra])


def expected_vectors(encoders: dict, rows: list[dict]) -> dict[str, np.ndarray]:
    """What the job must produce, computed directly with the same modules outside Beam."""
    image = LoadedEncoder(probe_encoder(EncoderSpec("image", encoders["image"])), "/CPU:0")
    text = LoadedEncoder(probe_encoder(EncoderSpec("text", encoders["text"])), "/CPU:0")
    decode = make_image_decoder(image.spec.image_size)
    pixels = np.stack([decode(row["image_bytes"]).numpy() for row in rows])
    image_vectors = image(pixels)
    text_vectors = text(np.array([row["text"] for row in rows], dtype=object))
    return {row["id"]: np.concatenate([image_vectors[i], text_vectors[i]]) for i, row in enumerate(rows)}


FORMATS = {
    "jsonl": lambda root, rows: corpora.write_jsonl_manifest(root, rows),
    "csv": lambda root, rows: corpora.write_csv_manifest(root, rows),
    "parquet": lambda root, rows: corpora.write_parquet_manifest(root, rows),
    "image_folder": lambda root, rows: corpora.write_image_folder(root, rows),
    "webdataset": lambda root, rows: corpora.write_webdataset(root, rows),
    "tfrecord": lambda root, rows: corpora.write_tfrecords(root, rows),
}


@pytest.mark.parametrize("input_format", sorted(FORMATS))
def test_each_input_format_embeds_every_record(fixture_encoders, tmp_path, input_format):
    rows = corpora.good_rows(6)
    input_path = FORMATS[input_format](str(tmp_path / "corpus"), rows)
    output = str(tmp_path / "out")
    passthrough = [] if input_format == "image_folder" else ["--passthrough", "shop"]
    report = embed(fixture_encoders, input_path, output, *passthrough)

    assert (report.read, report.embedded, report.dead_lettered) == (6, 6, 0)
    table = read_parquet_dir(output, "embeddings")
    ids = [f"{row['label']}/{row['id']}" for row in rows] if input_format == "image_folder" else [r["id"] for r in rows]
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    by_id = {row["id"]: row for row in table.to_pylist()}
    expected = expected_vectors(fixture_encoders, rows)
    for row, wanted_id in zip(rows, ids, strict=True):
        got = by_id[wanted_id]
        assert got["label"] == row["label"]
        assert got["has_image"] and got["has_text"]
        np.testing.assert_allclose(got["embedding"], expected[row["id"]], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["embedding"], got["image_embedding"] + got["text_embedding"])
        if passthrough:
            assert got["shop"] == row["shop"]


def test_output_files_match_the_schema_and_carry_metadata(fixture_encoders, tmp_path):
    rows = corpora.good_rows(5)
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), rows)
    output = str(tmp_path / "out")
    embed(fixture_encoders, manifest, output, "--passthrough", "shop", "--num_shards", "2")

    files = sorted(f for f in os.listdir(output) if f.startswith("embeddings-"))
    assert files == ["embeddings-00000-of-00002.parquet", "embeddings-00001-of-00002.parquet"]
    expected_schema = cols.embeddings_schema(8, 6, ["shop"])
    for name in files:
        schema = pq.read_schema(os.path.join(output, name))
        assert schema.equals(expected_schema, check_metadata=False)
        metadata = cols.read_metadata(schema)
        assert json.loads(metadata[cols.META_IMAGE_ENCODER])["handle"] == fixture_encoders["image"]
        assert json.loads(metadata[cols.META_IMAGE_ENCODER])["dim"] == 8
        assert json.loads(metadata[cols.META_TEXT_ENCODER])["dim"] == 6
        assert json.loads(metadata[cols.META_IMAGE_PREPROCESSING])["size"] == [32, 32]
        assert json.loads(metadata[cols.META_EMBEDDING_LAYOUT]) == [["image_embedding", 0, 8], ["text_embedding", 8, 6]]
        assert metadata[cols.META_VERSION] and metadata[cols.META_CREATED_AT].startswith("20")
    frame = read_parquet_dir(output, "embeddings").to_pandas()
    assert len(frame) == 5 and frame["id"].is_unique
    assert all(len(vector) == 14 for vector in frame["embedding"])
    report = json.load(open(os.path.join(output, "_run_report.json")))
    assert report["read"] == 5 and report["reconciled"] and report["passed"]


def test_every_bad_input_is_dead_lettered_with_its_reason(fixture_encoders, tmp_path):
    manifest, expected = corpora.write_bad_manifest(str(tmp_path / "corpus"))
    output = str(tmp_path / "out")
    report = embed(fixture_encoders, manifest, output, "--max_image_pixels", "1000000", "--max_error_rate", "1")

    embedded = read_parquet_dir(output, "embeddings").to_pylist()
    dead = read_parquet_dir(output, "dead_letters")
    assert dead.schema.equals(DEAD_LETTER_SCHEMA, check_metadata=False)
    dead_rows = dead.to_pylist()
    # Every record is in exactly one place, and the counters agree with the files.
    with open(manifest, "rb") as handle:
        assert report.read == sum(1 for line in handle if line.strip())
    assert report.embedded == len(embedded) and report.dead_lettered == len(dead_rows)
    assert report.read == report.embedded + report.dead_lettered
    reasons = {row["id"]: row["reason"] for row in dead_rows if row["id"]}
    for record_id, reason in expected.items():
        if record_id.startswith("<line"):
            continue
        if reason is None:
            assert record_id in {row["id"] for row in embedded}, record_id
        elif record_id != "dup":
            assert reasons.get(record_id) == reason, (record_id, reasons.get(record_id))
    assert [row["reason"] for row in dead_rows if row["id"] is None].count("missing_id") == 2
    assert [row["reason"] for row in dead_rows if row["id"] is None].count("unreadable_row") == 1
    duplicate = next(row for row in dead_rows if row["reason"] == "duplicate_id")
    assert duplicate["id"] == "dup" and duplicate["source"].endswith(":18") and ":17" in duplicate["message"]
    assert report.dead_lettered_by_reason["image_corrupt"] == 3
    for row in dead_rows:
        assert row["source"] and row["stage"] in ("read", "prepare", "embed") and row["message"]
    # Records with a missing modality are embedded with zeros there and the mask off.
    by_id = {row["id"]: row for row in embedded}
    assert not by_id["text-only"]["has_image"] and by_id["text-only"]["has_text"]
    assert not any(by_id["text-only"]["image_embedding"])
    assert by_id["image-empty-text"]["has_image"] and not by_id["image-empty-text"]["has_text"]
    assert not any(by_id["image-empty-text"]["embedding"][8:])


def test_job_fails_when_dead_letters_pass_the_error_rate(fixture_encoders, tmp_path, capsys):
    manifest, _ = corpora.write_bad_manifest(str(tmp_path / "corpus"))
    args = ["--input", manifest, "--image_encoder", fixture_encoders["image"],
            "--text_encoder", fixture_encoders["text"]]
    assert main([*args, "--output", str(tmp_path / "strict")]) == 1
    err = capsys.readouterr().err
    assert "dead-lettered" in err and "--max_error_rate" in err
    assert main([*args, "--output", str(tmp_path / "lenient"), "--max_error_rate", "0.9"]) == 0
    assert "dead-lettered" in capsys.readouterr().out


def test_same_input_in_other_batches_gives_the_same_embeddings(fixture_encoders, tmp_path):
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), corpora.good_rows(7))
    embed(fixture_encoders, manifest, str(tmp_path / "a"))
    embed(fixture_encoders, manifest, str(tmp_path / "b"), "--batch_size", "3", "--min_batch_size", "1")
    first = read_parquet_dir(str(tmp_path / "a"), "embeddings").sort_by("id")
    second = read_parquet_dir(str(tmp_path / "b"), "embeddings").sort_by("id")
    assert first.column("id").equals(second.column("id"))
    # Equal to float32's rounding, not bit for bit: TensorFlow's CPU kernels split a batch's arithmetic by its size,
    # and on an AMD EPYC without AVX-512 a record's vector in a batch of 7 and in one of 3 differed by 1 ulp.
    np.testing.assert_allclose(np.stack(first.column("embedding").to_numpy(zero_copy_only=False)),
                               np.stack(second.column("embedding").to_numpy(zero_copy_only=False)),
                               rtol=1e-5, atol=1e-5)


def test_text_only_run_has_no_image_columns(fixture_encoders, tmp_path):
    rows = corpora.good_rows(4)
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), rows)
    with open(manifest, "a") as handle:
        handle.write(json.dumps({"id": "image-but-no-text", "image": "images/item-0.img"}) + "\n")
    output = str(tmp_path / "out")
    report = run(["--input", manifest, "--output", output, "--image_encoder", "none",
                  "--text_encoder", fixture_encoders["text"], "--max_error_rate", "0.5", "--vectors", "both"])
    table = read_parquet_dir(output, "embeddings")
    assert table.schema.equals(cols.embeddings_schema(None, 6), check_metadata=False)
    assert (report.embedded, report.dead_lettered_by_reason) == (4, {"no_modality": 1})
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
                                  np.stack(table.column("text_embedding").to_numpy(zero_copy_only=False)))


def test_image_only_run_with_l2_normalisation(fixture_encoders, tmp_path):
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), corpora.good_rows(4))
    output = str(tmp_path / "out")
    run(["--input", manifest, "--output", output, "--image_encoder", fixture_encoders["image"],
         "--text_encoder", "none", "--l2_normalize"])
    table = read_parquet_dir(output, "embeddings")
    assert cols.TEXT_EMBEDDING not in table.column_names and cols.HAS_TEXT not in table.column_names
    vectors = np.stack(table.column(cols.EMBEDDING).to_numpy(zero_copy_only=False))  # the image's alone
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert cols.read_metadata(table.schema)[cols.META_L2_NORMALIZE] == "true"


def test_image_size_comes_from_the_flag_when_the_module_does_not_fix_it(fixture_encoders, tmp_path):
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), corpora.good_rows(2))
    output = str(tmp_path / "out")
    run(["--input", manifest, "--output", output, "--image_encoder", fixture_encoders["image_any_size"],
         "--text_encoder", "none", "--image_size", "48"])
    metadata = cols.read_metadata(read_parquet_dir(output, "embeddings").schema)
    assert json.loads(metadata[cols.META_IMAGE_PREPROCESSING])["size"] == [48, 48]
    assert json.loads(metadata[cols.META_IMAGE_ENCODER])["image_size"] == 48


def test_a_record_the_encoder_fails_on_is_dead_lettered_alone(fixture_encoders, tmp_path):
    from tests.fixture_models import PoisonedTextEncoder

    rows = [{"id": f"t{i}", "text": f"harmless text {i}"} for i in range(7)]
    rows[3]["text"] = PoisonedTextEncoder.POISON
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), rows)
    output = str(tmp_path / "out")
    report = run(["--input", manifest, "--output", output, "--image_encoder", "none", "--text_encoder",
                  fixture_encoders["poisoned_text"], "--batch_size", "8", "--min_batch_size", "8",
                  "--max_error_rate", "1"])
    assert (report.read, report.embedded, report.dead_lettered_by_reason) == (7, 6, {"encoder_failed": 1})
    dead = read_parquet_dir(output, "dead_letters").to_pylist()
    assert dead[0]["id"] == "t3" and dead[0]["stage"] == "embed" and "poisoned input" in dead[0]["message"]
    embedded = read_parquet_dir(output, "embeddings")
    assert sorted(embedded.column("id").to_pylist()) == [f"t{i}" for i in range(7) if i != 3]
    # The batch-mates embedded one by one equal what the healthy encoder gives them.
    healthy = run(["--input", manifest, "--output", str(tmp_path / "healthy"), "--image_encoder", "none",
                   "--text_encoder", fixture_encoders["text"], "--max_error_rate", "1"])
    assert healthy.embedded == 7
    reference = {row["id"]: row["embedding"] for row in read_parquet_dir(str(tmp_path / "healthy"),
                                                                         "embeddings").to_pylist()}
    for row in embedded.to_pylist():
        np.testing.assert_allclose(row["embedding"], reference[row["id"]], rtol=1e-6)
