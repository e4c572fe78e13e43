"""Nightly runs: the output folder is a dataset every Parquet reader opens as it is, a run is published atomically,
unchanged records take their vectors from an earlier night (--reuse), and a killed run resumes."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import duckdb
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from beam_jobs import output_folder
from beam_jobs.embed_corpus import main, run
from schemas import embeddings as cols
from schemas import layout
from tests import corpus_builders as corpora
from tests import fixture_models
from tests.test_embed_config import fails_in_one_line
from transforms.embedding.reuse import reuse_key

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encoders_argv(encoders: dict) -> list[str]:
    return ["--image_encoder", encoders["image"], "--text_encoder", encoders["text"]]


def rows_by_id(folder: str) -> pd.DataFrame:
    return pd.read_parquet(folder).set_index("id").sort_index()


def assert_same_vectors(left: pd.DataFrame, right: pd.DataFrame, columns=(cols.EMBEDDING,)) -> None:
    """The same ids, and bit-identical vectors."""
    assert list(left.index) == list(right.index)
    for column in columns:
        for a, b in zip(left[column], right[column], strict=True):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_output_folder_is_a_dataset_for_pandas_pyarrow_and_duckdb(fixture_encoders, tmp_path):
    manifest, _ = corpora.write_bad_manifest(str(tmp_path / "corpus"))  # dead letters too
    root = tmp_path / "root"
    for night in ("2026-11-20", "2026-11-21"):
        report = run(["--input", manifest, "--output", str(root / f"dt={night}"), "--max_image_pixels", "1000000",
                      "--max_error_rate", "1", *encoders_argv(fixture_encoders)])
    output = str(root / "dt=2026-11-21")
    assert sorted(os.listdir(output)) == ["_SUCCESS", "_dead_letters", "_run_report.json",
                                          "embeddings-00000-of-00001.parquet"]
    frame = pd.read_parquet(output)
    assert len(frame) == report.embedded and frame["id"].is_unique
    assert ds.dataset(output).count_rows() == report.embedded
    # The model's small batches are gathered into row groups: one here, not one per batch of 8.
    row_groups = pq.ParquetFile(glob.glob(os.path.join(output, "*.parquet"))[0]).metadata
    assert row_groups.num_row_groups == 1
    # A dictionary for the columns whose values repeat, none for the vectors (schemas.embeddings.dictionary_columns).
    chunks = {row_groups.row_group(0).column(i).path_in_schema.split(".")[0]: row_groups.row_group(0).column(i)
              for i in range(row_groups.num_columns)}
    vectors = {cols.EMBEDDING, cols.IMAGE_EMBEDDING, cols.TEXT_EMBEDDING} & set(chunks)
    assert vectors and not any(chunks[name].has_dictionary_page for name in vectors)
    assert chunks[cols.LABEL].has_dictionary_page and chunks[cols.ID].has_dictionary_page
    count = duckdb.sql(f"select count(*) from read_parquet('{output}/*.parquet')").fetchall()[0][0]
    assert count == report.embedded
    # The Hive layout: a reader over the root sees every night, with a `dt` column.
    nights = pd.read_parquet(str(root))
    assert sorted(nights["dt"].astype(str).unique()) == ["2026-11-20", "2026-11-21"]
    assert len(nights) == 2 * report.embedded
    by_night = duckdb.sql(f"select dt, count(*) from read_parquet('{root}/*/*.parquet', hive_partitioning=true) "
                          "group by dt order by dt").fetchall()
    assert [n for _, n in by_night] == [report.embedded, report.embedded]
    dead = pd.read_parquet(os.path.join(output, layout.DEAD_LETTERS_DIR))
    assert len(dead) == report.dead_lettered
    with open(os.path.join(output, layout.REPORT_NAME)) as handle:
        assert json.load(handle)["reconciled"]


def nightly_corpora(tmp_path) -> tuple[str, str, dict[str, str]]:
    """Two nights of one corpus: night 2 drops a record, changes an image, a text and a label, adds a record."""
    night1 = corpora.good_rows(10)
    night2 = [dict(row) for row in night1 if row["id"] != "item-0"]
    changes = {"item-1": "image", "item-2": "text", "item-3": "label", "item-10": "new"}
    by_id = {row["id"]: row for row in night2}
    by_id["item-1"]["image_bytes"] = corpora.image_bytes(101)
    by_id["item-2"]["text"] = "a caption rewritten overnight"
    by_id["item-3"]["label"] = "relabelled"
    night2.append(corpora.good_rows(11)[10])
    return (corpora.write_jsonl_manifest(str(tmp_path / "night1"), night1),
            corpora.write_jsonl_manifest(str(tmp_path / "night2"), night2), changes)


def test_reuse_embeds_only_what_changed_and_equals_a_full_run(fixture_encoders, tmp_path):
    night1, night2, changes = nightly_corpora(tmp_path)
    root = tmp_path / "root"
    argv = encoders_argv(fixture_encoders)
    assert main(["--input", night1, "--output", str(root / "dt=1"), *argv]) == 0
    reused = run(["--input", night2, "--output", str(root / "dt=2"), "--reuse", str(root / "dt=*"), *argv])
    # item-1 (image) and item-2 (text) changed, item-10 is new: three embedded; a changed label alone is reused.
    assert (reused.read, reused.embedded, reused.reused, reused.embedded_fresh) == (10, 10, 7, 3)
    full = run(["--input", night2, "--output", str(tmp_path / "full"), *argv])
    assert full.reused == 0 and full.embedded_fresh == 10
    left, right = rows_by_id(str(root / "dt=2")), rows_by_id(str(tmp_path / "full"))
    assert_same_vectors(left, right)
    assert "item-0" not in left.index  # gone from the input: gone from the output
    assert left.loc["item-3", "label"] == "relabelled"
    assert (left[cols.IMAGE_SHA256] == right[cols.IMAGE_SHA256]).all()
    with open(root / "dt=2" / layout.REPORT_NAME) as handle:
        report = json.load(handle)
    assert (report["reused"], report["embedded_fresh"], report["reused_share"]) == (7, 3, 0.7)
    # The same command twice: the same rows, bit-identical vectors.
    again = run(["--input", night2, "--output", str(root / "dt=2"), "--reuse", str(root / "dt=1"), "--overwrite",
                 *argv])
    assert again.reused == 7
    assert_same_vectors(rows_by_id(str(root / "dt=2")), left)


def test_reuse_over_many_chunks_and_buckets_equals_a_full_run(fixture_encoders, tmp_path):
    """More records than one chunk of the match (transforms.embedding.match_ids.CHUNK_RECORDS), ids spread over every
    bucket, and duplicate ids far apart in the manifest, so in other chunks than the record they repeat."""
    rows = [{"id": f"item-{i}", "text": f"caption {i}", "label": "a"} for i in range(1100)]
    rows[::50] = [dict(row, image_bytes=corpora.image_bytes(i)) for i, row in enumerate(rows[::50])]
    duplicates = [{"id": f"item-{i}", "text": f"a repeat of {i}", "label": "b"} for i in range(0, 1100, 37)]
    night1 = corpora.write_jsonl_manifest(str(tmp_path / "night1"), rows + duplicates)
    night2_rows = [dict(row, text=f"changed {i}") if i % 40 == 3 else row for i, row in enumerate(rows)]
    night2_rows += [{"id": f"new-{i}", "text": f"new caption {i}"} for i in range(20)]
    night2 = corpora.write_jsonl_manifest(str(tmp_path / "night2"), night2_rows + duplicates)
    root = tmp_path / "root"
    argv = [*encoders_argv(fixture_encoders), "--max_error_rate", "1"]
    assert main(["--input", night1, "--output", str(root / "dt=1"), *argv]) == 0
    reused = run(["--input", night2, "--output", str(root / "dt=2"), "--reuse", str(root / "dt=1"), *argv])
    full = run(["--input", night2, "--output", str(tmp_path / "full"), *argv])
    changed = len(range(3, 1100, 40))
    assert (reused.embedded, reused.embedded_fresh, reused.dead_lettered) == (1120, changed + 20, len(duplicates))
    assert (full.embedded, full.reused, full.dead_lettered) == (1120, 0, len(duplicates))
    assert_same_vectors(rows_by_id(str(root / "dt=2")), rows_by_id(str(tmp_path / "full")))
    assert dead_letter_reasons(str(root / "dt=2")) == dead_letter_reasons(str(tmp_path / "full"))
    assert {reason for _, _, reason in dead_letter_reasons(str(root / "dt=2"))} == {"duplicate_id"}


def dead_letter_reasons(folder: str) -> list[tuple[str, str, str]]:
    dead = pd.read_parquet(os.path.join(folder, layout.DEAD_LETTERS_DIR))
    return sorted(zip(dead["source"], dead["id"].fillna(""), dead["reason"], strict=True))


def test_reuse_on_hostile_input_dead_letters_what_a_full_run_does(fixture_encoders, tmp_path):
    """Every bad case, reused: the same rows and the same dead letters as a full run, whatever reuse skipped (the
    header check of unchanged images, a second read); a stricter --max_image_pixels tonight refuses a reused
    image that an earlier night embedded under a looser one."""
    manifest, _ = corpora.write_bad_manifest(str(tmp_path / "corpus"))
    root = tmp_path / "root"
    argv = ["--input", manifest, "--max_error_rate", "1", *encoders_argv(fixture_encoders)]
    assert main([*argv, "--output", str(root / "dt=1"), "--max_image_pixels", "2000000"]) == 0
    assert "huge" in rows_by_id(str(root / "dt=1")).index  # 1200x1000 pixels
    # Tonight's limits: as night 1's, fewer pixels (huge.png is 1200x1000), fewer bytes (huge.png is over 1 MB).
    for night, limits in (("dt=2", ["--max_image_pixels", "2000000"]), ("dt=3", ["--max_image_pixels", "1000000"]),
                          ("dt=4", ["--max_image_pixels", "2000000", "--max_image_bytes", "100000"])):
        reused = run([*argv, "--output", str(root / night), *limits, "--reuse", str(root / "dt=1")])
        full = run([*argv, "--output", str(tmp_path / f"full-{night}"), *limits])
        assert reused.reused == full.embedded > 0 and reused.embedded_fresh == 0
        assert_same_vectors(rows_by_id(str(root / night)), rows_by_id(str(tmp_path / f"full-{night}")))
        assert dead_letter_reasons(str(root / night)) == dead_letter_reasons(str(tmp_path / f"full-{night}"))
        refused = {(row_id, reason) for _, row_id, reason in dead_letter_reasons(str(root / night))}
        assert (("huge", "image_too_large") in refused) == (night != "dt=2")


def test_reuse_refuses_other_encoders_and_skips_unpublished_outputs(fixture_encoders, tmp_path, capsys):
    night1, night2, _ = nightly_corpora(tmp_path)
    root = tmp_path / "root"
    assert main(["--input", night1, "--output", str(root / "dt=1"), *encoders_argv(fixture_encoders)]) == 0
    fails_in_one_line(capsys, ["--input", night2, "--output", str(root / "dt=2"), "--reuse", str(root / "dt=1"),
                               "--image_encoder", fixture_encoders["image_any_size"], "--image_size", "32",
                               "--text_encoder", fixture_encoders["text"]],
                      "dt=1 was embedded with other encoders")
    fails_in_one_line(capsys, ["--input", night2, "--output", str(root / "dt=2"), "--reuse", str(root / "dt=1"),
                               "--l2_normalize", *encoders_argv(fixture_encoders)], "cannot be reused")
    os.remove(root / "dt=1" / layout.SUCCESS_NAME)  # a night that never finished publishing
    report = run(["--input", night2, "--output", str(root / "dt=2"), "--reuse", str(root / "dt=*"),
                  *encoders_argv(fixture_encoders)])
    assert report.reused == 0 and report.embedded_fresh == 10


def test_reuse_refuses_a_changed_function_body_and_takes_outputs_written_before_it_was_fingerprinted(
        fixture_encoders, tmp_path, capsys):
    night1, night2, _ = nightly_corpora(tmp_path)
    root = tmp_path / "root"
    assert main(["--input", night1, "--output", str(root / "dt=1"), *encoders_argv(fixture_encoders)]) == 0
    # The same variables, another computation: fingerprint.pb alone would have let its vectors be copied.
    squared = fixture_models.build_squared_text_encoder(str(tmp_path / "squared"))
    fails_in_one_line(capsys, ["--input", night2, "--output", str(root / "dt=2"), "--reuse", str(root / "dt=1"),
                               "--image_encoder", fixture_encoders["image"], "--text_encoder", squared],
                      "dt=1 was embedded with other encoders")
    # Night 1 as an older hubembed wrote it: specs without function fingerprints, the reuse key computed on them.
    for path in glob.glob(str(root / "dt=1" / "embeddings-*.parquet")):
        table = pq.read_table(path)
        metadata = cols.read_metadata(table.schema)
        for key in (cols.META_IMAGE_ENCODER, cols.META_TEXT_ENCODER):
            spec = json.loads(metadata[key])
            spec.pop(cols.FUNCTIONS_FINGERPRINT)
            metadata[key] = json.dumps(spec, sort_keys=True)
        metadata[cols.META_REUSE_KEY] = reuse_key(metadata)
        pq.write_table(table.replace_schema_metadata({**table.schema.metadata, **{
            key.encode(): value.encode() for key, value in metadata.items()}}), path)
    report = run(["--input", night2, "--output", str(root / "dt=2"), "--reuse", str(root / "dt=1"),
                  *encoders_argv(fixture_encoders)])
    assert report.reused == 7 and report.embedded_fresh == 3  # a new record, a changed image and text


def test_a_failed_run_publishes_nothing_and_keeps_the_earlier_run(fixture_encoders, tmp_path):
    manifest, _ = corpora.write_bad_manifest(str(tmp_path / "bad"))
    good = corpora.write_jsonl_manifest(str(tmp_path / "good"), corpora.good_rows(4))
    fresh, earlier = str(tmp_path / "fresh"), str(tmp_path / "earlier")
    argv = encoders_argv(fixture_encoders)
    # Too many dead letters: the run finishes but is not published; its files wait under _staging/.
    assert main(["--input", manifest, "--output", fresh, *argv]) == 1
    assert os.listdir(fresh) == [layout.STAGING_DIR]
    assert glob.glob(os.path.join(fresh, layout.STAGING_DIR, "*", layout.DEAD_LETTERS_DIR, "*.parquet"))
    assert main(["--input", good, "--output", earlier, *argv]) == 0
    before = {name: os.path.getmtime(os.path.join(earlier, name)) for name in os.listdir(earlier)}
    assert main(["--input", manifest, "--output", earlier, "--overwrite", *argv]) == 1
    after = {name: os.path.getmtime(os.path.join(earlier, name)) for name in os.listdir(earlier)
             if name != layout.STAGING_DIR}
    assert after == before and len(pd.read_parquet(earlier)) == 4


def test_a_second_run_on_a_held_folder_fails_in_one_line(fixture_encoders, tmp_path, capsys):
    good = corpora.write_jsonl_manifest(str(tmp_path / "good"), corpora.good_rows(4))
    output = str(tmp_path / "out")
    holder = output_folder.claim(output, layout.EMBEDDINGS_PREFIX, "embed_corpus", overwrite=False)
    try:
        fails_in_one_line(capsys, ["--input", good, "--output", output, *encoders_argv(fixture_encoders)],
                          "is being written by another run")
    finally:
        output_folder.release(holder)
    assert main(["--input", good, "--output", output, *encoders_argv(fixture_encoders)]) == 0


def job_command(manifest: str, output: str, encoders: dict) -> list[str]:
    return [sys.executable, "-m", "beam_jobs.embed_corpus", "--input", manifest, "--output", output,
            "--image_encoder", "none", "--text_encoder", encoders["text"], "--batch_size", "4",
            "--min_batch_size", "4", "--num_shards", "1"]


def test_a_killed_run_resumes_from_its_checkpoints_and_leaves_the_earlier_run(fixture_encoders, tmp_path):
    rows = [{"id": f"t{i:05d}", "text": f"caption number {i} about a leaf"} for i in range(4000)]
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), rows)
    output = str(tmp_path / "out")
    # Last night's run in the folder, which tonight's --overwrite may replace only when it succeeds.
    earlier = corpora.write_jsonl_manifest(str(tmp_path / "earlier"), rows[:100])
    subprocess.run(job_command(earlier, output, fixture_encoders), cwd=REPO, check=True, capture_output=True)
    published = {name: open(os.path.join(output, name), "rb").read() for name in os.listdir(output)
                 if os.path.isfile(os.path.join(output, name))}

    command = [*job_command(manifest, output, fixture_encoders), "--overwrite"]
    checkpoints = os.path.join(output, layout.STAGING_DIR, layout.CHECKPOINTS_DIR, "part-*.parquet")
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(glob.glob(checkpoints)) < 20 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.poll() is None, "the job ended before it could be killed"
    job.send_signal(signal.SIGKILL)
    job.wait()
    # Killed: last night's files are as they were, byte for byte, and still the only dataset there.
    assert {name: open(os.path.join(output, name), "rb").read() for name in published} == published
    assert len(pd.read_parquet(output)) == 100
    checkpointed = len(pd.read_parquet(os.path.join(output, layout.STAGING_DIR, layout.CHECKPOINTS_DIR)))
    assert checkpointed >= 80

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    with open(os.path.join(output, layout.REPORT_NAME)) as handle:
        report = json.load(handle)
    # The rerun embeds only what the killed run had not finished.
    assert (report["resumed"], report["embedded_fresh"]) == (checkpointed, 4000 - checkpointed)
    assert not os.path.exists(os.path.join(output, layout.STAGING_DIR))

    clean = str(tmp_path / "clean")
    subprocess.run(job_command(manifest, clean, fixture_encoders), cwd=REPO, check=True, capture_output=True,
                   timeout=300)
    assert_same_vectors(rows_by_id(output), rows_by_id(clean))


@pytest.mark.parametrize("vectors, float16", [("concat", False), ("modalities", True), ("both", True)])
def test_storage_choices_are_in_the_metadata(fixture_encoders, tmp_path, vectors, float16):
    good = corpora.write_jsonl_manifest(str(tmp_path / "good"), corpora.good_rows(4))
    output = str(tmp_path / "out")
    run(["--input", good, "--output", output, "--vectors", vectors, *(["--float16"] if float16 else []),
         *encoders_argv(fixture_encoders)])
    dataset = ds.dataset(output)
    storage = json.loads(cols.read_metadata(dataset.schema)[cols.META_STORAGE])
    assert storage == {"vectors": vectors, "dtype": "float16" if float16 else "float32"}
    names = set(dataset.schema.names)
    assert (cols.EMBEDDING in names) == (vectors != "modalities")
    assert (cols.IMAGE_EMBEDDING in names) == (vectors != "concat")
    vector_field = dataset.schema.field(cols.EMBEDDING if vectors != "modalities" else cols.TEXT_EMBEDDING)
    assert str(vector_field.type.value_type) == ("halffloat" if float16 else "float")


def test_overwrite_clears_the_sidecars_of_the_earlier_layout(fixture_encoders, tmp_path):
    """An output folder written before the `_`-names (run_report.json, dead_letters-*.parquet beside the data):
    --overwrite leaves a folder pandas opens."""
    good = corpora.write_jsonl_manifest(str(tmp_path / "good"), corpora.good_rows(4))
    output = tmp_path / "out"
    output.mkdir()
    (output / "run_report.json").write_text(json.dumps({"job": "embed_corpus"}))
    pd.DataFrame({"id": ["x"], "reason": ["no_modality"]}).to_parquet(output / "dead_letters-00000-of-00001.parquet")
    assert main(["--input", good, "--output", str(output), "--overwrite", *encoders_argv(fixture_encoders)]) == 0
    assert sorted(name for name in os.listdir(output) if not name.startswith("embeddings-")) == [
        "_SUCCESS", "_dead_letters", "_run_report.json"]
    assert len(pd.read_parquet(str(output))) == 4
