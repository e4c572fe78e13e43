"""The downstream stage end to end: embed (fixture Hub models) → train_classifier → predict, on DirectRunner.

`fixture_encoders` (tests/conftest.py) builds the tiny Hub-format encoders once per session.
One sample corpus is embedded once per session and the three frozen-feature classifiers are trained once; the
other tests reuse them and build small variants of the Parquet (other encoder metadata, no label column,
unlabeled rows, poisoned vectors) with pyarrow, keeping the embedding job's schema metadata.
"""

from __future__ import annotations

import glob
import io
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from beam_jobs import embed_corpus, launch, predict, train_classifier
from encoders.runtime import tf
from schemas import embeddings as cols
from schemas import layout
from schemas import predictions as pred
from scripts.make_sample_corpus import make_sample_corpus
from transforms.downstream.classify import balanced_class_weights, split_metrics
from transforms.downstream.embeddings_input import available_columns, iter_tables
from transforms.downstream.serving import head_inputs
from transforms.downstream.split import TEST, TRAIN, VALIDATION, split_fraction, split_of
from transforms.downstream.tft_features import SPLIT, RowSource, label_vocabulary, labeled_rows, load_transform
from transforms.downstream.training_input import fits_in_memory, split_dataset, survey

# 1800 rows give a 462-row test split. Measured with the default head (docs/downstream.md), test-split accuracy for
# seeds 0, 1, 2 (each run is reproducible; the seeds move the weights, dropout and shuffling, not the split):
#   image 0.866, 0.864, 0.864   text 0.701, 0.693, 0.727   both 0.926, 0.918, 0.924
# `both` beats `image` by 0.054 to 0.060 on every seed (the sample corpus's faint marks are faint enough that the
# image alone misses them, scripts/make_sample_corpus.py), so one seed's runs carry the test; the margin is a little
# under half the smallest gap measured.
CORPUS_ROWS = 1800
VALIDATION_RATIO, TEST_RATIO = 0.15, 0.25
SPLIT_FLAGS = ["--validation_ratio", str(VALIDATION_RATIO), "--test_ratio", str(TEST_RATIO)]
BOTH_ACCURACY_BAR = 0.9
BOTH_MARGIN = 0.025
FAST = ["--epochs", "3", "--patience", "1"]  # for tests about plumbing, not accuracy
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory) -> str:
    return make_sample_corpus(str(tmp_path_factory.mktemp("corpus")), size=CORPUS_ROWS, seed=0)


@pytest.fixture(scope="session")
def embeddings(tmp_path_factory, fixture_encoders, sample_corpus) -> str:
    """The embedding job's output folder for the sample corpus."""
    output = str(tmp_path_factory.mktemp("embeddings"))
    report = embed_corpus.run(["--input", sample_corpus, "--output", output, "--image_encoder",
                               fixture_encoders["image"], "--text_encoder", fixture_encoders["text"], "--overwrite"])
    assert report.passed and report.embedded == CORPUS_ROWS
    return output


def embeddings_glob(folder: str) -> str:
    return os.path.join(folder, "embeddings-*.parquet")


def train(tmp_path_factory, embeddings: str, features: str) -> dict:
    """A default-flag training run (seed 0) through the command line entry point: its report and folder."""
    output = str(tmp_path_factory.mktemp(f"classifier_{features}"))
    code = train_classifier.main(["--input", embeddings_glob(embeddings), "--output", output, "--features", features,
                                  *SPLIT_FLAGS])
    assert code == 0
    with open(os.path.join(output, train_classifier.REPORT_NAME)) as handle:
        return {"report": json.load(handle), "output": output}


@pytest.fixture(scope="session")
def frozen_runs(tmp_path_factory, embeddings) -> dict[str, dict]:
    """features → its run; the runs the other tests inspect."""
    return {features: train(tmp_path_factory, embeddings, features) for features in ("image", "text", "both")}


def read_embeddings_table(folder: str) -> pa.Table:
    """The embeddings of an output folder with the per-modality vectors as columns, whatever --vectors stored
    (they are slices of `embedding` by default), and the files' metadata."""
    paths = sorted(glob.glob(embeddings_glob(folder)))
    schema = pq.read_schema(paths[0])
    tables = [table for path in paths for table in iter_tables(path, available_columns(schema))]
    return pa.concat_tables(tables).replace_schema_metadata(schema.metadata)


def write_variant(table: pa.Table, folder, name: str = "embeddings-00000-of-00001.parquet") -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), name)
    pq.write_table(table, path)
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("hubembed: error: ")
    return err


# --- accuracy: the point of the stage -------------------------------------------------------------------------


def test_both_modalities_beat_each_one(frozen_runs):
    accuracy = {features: run["report"]["metrics"]["accuracy"] for features, run in frozen_runs.items()}
    print("test-split accuracy:", accuracy)
    assert accuracy["both"] >= BOTH_ACCURACY_BAR
    assert accuracy["both"] >= max(accuracy["image"], accuracy["text"]) + BOTH_MARGIN
    assert accuracy["both"] >= accuracy["text"] + 0.15
    assert accuracy["image"] > accuracy["text"] > 0.6  # each single modality learns something, the image more


def test_report_pictures_and_per_class_table(frozen_runs):
    run = frozen_runs["both"]
    report, output = run["report"], run["output"]
    assert report["mode"] == "frozen" and report["features"] == "both"
    assert sorted(report["labels"]) == ["healthy", "mildew", "rust"]
    per_class = report["metrics"]["per_class"]
    assert [row["label"] for row in per_class] == report["labels"]
    assert sum(row["support"] for row in per_class) == report["rows"][TEST]
    assert report["metrics"]["macro_f1"] == pytest.approx(np.mean([row["f1"] for row in per_class]), abs=1e-5)
    confusion = np.array(report["metrics"]["confusion_matrix"])
    assert confusion.sum() == report["rows"][TEST]
    assert np.trace(confusion) / confusion.sum() == pytest.approx(report["metrics"]["accuracy"], abs=1e-5)
    assert report["training"]["epochs_run"] >= report["training"]["best_epoch"] >= 1
    assert len(report["training"]["history"]["val_loss"]) == report["training"]["epochs_run"]
    for picture in (train_classifier.CONFUSION_MATRIX_PNG, train_classifier.TRAINING_CURVES_PNG):
        with open(os.path.join(output, picture), "rb") as handle:
            assert handle.read(8) == PNG_MAGIC
    # The transform graph is beside the model, and the model holds the metadata predict checks.
    assert os.path.isdir(os.path.join(output, "transform", "transform_fn"))
    with open(os.path.join(output, "model", "assets.extra", "model_info.json")) as handle:
        info = json.load(handle)
    assert info["labels"] == report["labels"] and info["inputs"] == {
        cols.IMAGE_EMBEDDING: 8, cols.HAS_IMAGE: 0, cols.TEXT_EMBEDDING: 6, cols.HAS_TEXT: 0}


def test_metrics_and_class_weights_by_hand():
    metrics = split_metrics(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), ["a", "b", "c"])
    assert metrics.accuracy == pytest.approx(0.6)
    assert [m.precision for m in metrics.per_class] == pytest.approx([0.5, 2 / 3, 0.0])
    assert [m.recall for m in metrics.per_class] == pytest.approx([0.5, 1.0, 0.0])
    assert metrics.macro_f1 == pytest.approx((0.5 + 0.8 + 0.0) / 3, abs=1e-6)
    assert balanced_class_weights(np.array([3, 1])) == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0)}


# --- serving ---------------------------------------------------------------------------------------------------


def test_serving_model_signature(frozen_runs, embeddings):
    model = tf.saved_model.load(os.path.join(frozen_runs["both"]["output"], "model"))
    assert {"serving_default", "labels"} <= set(model.signatures)
    labels = [label.decode() for label in model.signatures["labels"]()["labels"].numpy()]
    assert labels == frozen_runs["both"]["report"]["labels"]
    table = read_embeddings_table(embeddings).slice(0, 5)
    outputs = model.signatures["serving_default"](
        image_embedding=tf.constant(np.stack(table.column(cols.IMAGE_EMBEDDING).to_numpy(zero_copy_only=False))),
        has_image=tf.constant(table.column(cols.HAS_IMAGE).to_numpy(zero_copy_only=False)),
        text_embedding=tf.constant(np.stack(table.column(cols.TEXT_EMBEDDING).to_numpy(zero_copy_only=False))),
        has_text=tf.constant(table.column(cols.HAS_TEXT).to_numpy(zero_copy_only=False)))
    probabilities = outputs["probabilities"].numpy()
    assert probabilities.shape == (5, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(outputs["probability"].numpy(), probabilities.max(axis=1))
    assert [label.decode() for label in outputs["predicted_label"].numpy()] == [
        labels[index] for index in probabilities.argmax(axis=1)]


def test_predict_job_matches_in_process_evaluation(frozen_runs, embeddings, tmp_path):
    trained = frozen_runs["both"]["output"]
    output = str(tmp_path / "predictions")
    code = predict.main(["--input", embeddings_glob(embeddings), "--model", os.path.join(trained, "model"),
                         "--output", output])
    assert code == 0
    with open(os.path.join(output, layout.REPORT_NAME)) as handle:
        report = json.load(handle)
    assert report["read"] == CORPUS_ROWS == report["predicted"] + report["dead_lettered"]
    assert report["dead_lettered"] == 0 and report["reconciled"] and report["passed"]
    scored = pa.concat_tables([pq.read_table(path) for path in glob.glob(os.path.join(output, "predictions-*"))])
    assert scored.schema.remove_metadata() == pred.predictions_schema()
    by_id = {row[pred.ID]: row for row in scored.to_pylist()}
    assert len(by_id) == CORPUS_ROWS
    in_process = pq.read_table(os.path.join(trained, train_classifier.TEST_PREDICTIONS)).to_pylist()
    assert len(in_process) == frozen_runs["both"]["report"]["rows"][TEST] > 0
    for row in in_process:
        served = by_id[row[pred.ID]]
        assert served[pred.PREDICTED_LABEL] == row[pred.PREDICTED_LABEL]
        assert served[pred.PROBABILITY] == pytest.approx(row[pred.PROBABILITY], abs=1e-5)
        assert served[pred.TOP_K_LABELS] == row[pred.TOP_K_LABELS]
        assert served[pred.TOP_K_LABELS][0] == served[pred.PREDICTED_LABEL]
        assert served[pred.TOP_K_PROBABILITIES] == sorted(served[pred.TOP_K_PROBABILITIES], reverse=True)
    # Scored by the predict job, the test split has the accuracy the training report states.
    table = read_embeddings_table(embeddings)
    label_of = dict(zip(table.column(cols.ID).to_pylist(), table.column(cols.LABEL).to_pylist(), strict=True))
    correct = np.mean([by_id[row[pred.ID]][pred.PREDICTED_LABEL] == label_of[row[pred.ID]] for row in in_process])
    assert correct == pytest.approx(frozen_runs["both"]["report"]["metrics"]["accuracy"], abs=1e-6)


def test_predict_dead_letters_bad_rows_and_reconciles(frozen_runs, embeddings, tmp_path, capsys):
    """NaN, a wrong-width vector and a missing id are dead-lettered; the other rows are predicted."""
    table = read_embeddings_table(embeddings).slice(0, 40)
    metadata = table.schema.metadata
    image = [list(vector) for vector in table.column(cols.IMAGE_EMBEDDING).to_pylist()]
    text = [list(vector) for vector in table.column(cols.TEXT_EMBEDDING).to_pylist()]
    ids = table.column(cols.ID).to_pylist()
    image[3][2] = float("nan")
    text[7] = text[7] + [0.5]  # 7 values where the model takes 6
    ids[11] = None
    poisoned = pa.table({
        cols.ID: pa.array(ids, pa.string()), cols.LABEL: table.column(cols.LABEL),
        cols.IMAGE_EMBEDDING: pa.array(image, pa.list_(pa.float32())), cols.HAS_IMAGE: table.column(cols.HAS_IMAGE),
        cols.TEXT_EMBEDDING: pa.array(text, pa.list_(pa.float32())), cols.HAS_TEXT: table.column(cols.HAS_TEXT),
    }).replace_schema_metadata(metadata)
    source = write_variant(poisoned, tmp_path / "poisoned")
    model = os.path.join(frozen_runs["both"]["output"], "model")
    output = str(tmp_path / "scored")
    code = predict.main(["--input", source, "--model", model, "--output", output, "--max_error_rate", "0.2"])
    assert code == 0
    report = json.loads(open(os.path.join(output, layout.REPORT_NAME)).read())
    assert (report["read"], report["predicted"], report["dead_lettered"]) == (40, 37, 3)
    assert report["dead_lettered_by_reason"] == {"missing_id": 1, "not_finite": 1, "wrong_width": 1}
    dead = pq.read_table(os.path.join(output, layout.DEAD_LETTERS_DIR)).to_pylist()
    assert {(row["id"], row["reason"], row["stage"]) for row in dead} == {
        (ids[3], "not_finite", "predict"), (ids[7], "wrong_width", "predict"), (None, "missing_id", "predict")}
    assert all(row["source"].startswith(source + "#row") for row in dead)
    scored = pq.read_table(glob.glob(os.path.join(output, "predictions-*.parquet"))[0])
    assert sorted(scored.column(pred.ID).to_pylist()) == sorted(i for n, i in enumerate(ids) if n not in (3, 7, 11))
    # Above --max_error_rate: the same run fails with exit 1 and says where the dead letters are.
    capsys.readouterr()
    code = predict.main(["--input", source, "--model", model, "--output", output, "--overwrite"])
    assert code == launch.EXIT_TOO_MANY_ERRORS
    assert "3 of 40 records were dead-lettered" in capsys.readouterr().err


def test_predict_refuses_input_of_other_encoders(frozen_runs, embeddings, tmp_path, capsys):
    table = read_embeddings_table(embeddings).slice(0, 10)
    metadata = dict(table.schema.metadata)
    spec = json.loads(metadata[cols.META_TEXT_ENCODER.encode()])
    metadata[cols.META_TEXT_ENCODER.encode()] = json.dumps({**spec, "fingerprint": "0" * 64}).encode()
    source = write_variant(table.replace_schema_metadata(metadata), tmp_path / "other")
    code = predict.main(["--input", source, "--model", os.path.join(frozen_runs["both"]["output"], "model"),
                         "--output", str(tmp_path / "out")])
    assert code == launch.EXIT_CONFIG
    err = one_line_error(capsys)
    assert "other encoders" in err and cols.META_TEXT_ENCODER in err
    assert not os.path.exists(str(tmp_path / "out" / layout.REPORT_NAME))


# --- input checks ----------------------------------------------------------------------------------------------


def test_train_refuses_files_of_mixed_encoders(embeddings, tmp_path, capsys):
    table = read_embeddings_table(embeddings)
    metadata = dict(table.schema.metadata)
    spec = json.loads(metadata[cols.META_IMAGE_ENCODER.encode()])
    metadata[cols.META_IMAGE_ENCODER.encode()] = json.dumps({**spec, "fingerprint": "0" * 64}).encode()
    folder = tmp_path / "mixed"
    write_variant(table.slice(0, 300), folder, "embeddings-00000-of-00002.parquet")
    write_variant(table.slice(300).replace_schema_metadata(metadata), folder, "embeddings-00001-of-00002.parquet")
    code = train_classifier.main(["--input", embeddings_glob(str(folder)), "--output", str(tmp_path / "out")])
    assert code == launch.EXIT_CONFIG
    err = one_line_error(capsys)
    assert "embeddings-00001-of-00002.parquet was embedded with other encoders" in err
    assert cols.META_IMAGE_ENCODER in err


def test_train_refuses_files_without_label_column(embeddings, tmp_path, capsys):
    table = read_embeddings_table(embeddings).drop_columns([cols.LABEL])
    source = write_variant(table, tmp_path / "nolabel")
    code = train_classifier.main(["--input", source, "--output", str(tmp_path / "out")])
    assert code == launch.EXIT_CONFIG
    assert "has no label column" in one_line_error(capsys)


@pytest.mark.parametrize("argv, message", [
    (["--features", "image", "--test_ratio", "0.5", "--validation_ratio", "0.5"], "must leave rows for training"),
    (["--hidden_units", "128,x"], "--hidden_units must be comma-separated integers"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--input", "/nonexistent/embeddings-*.parquet"], "no embeddings Parquet files match"),
])
def test_train_misconfiguration_fails_in_one_line(embeddings, tmp_path, capsys, argv, message):
    base = ["--input", embeddings_glob(embeddings), "--output", str(tmp_path / "out")]
    assert train_classifier.main(base + argv) == launch.EXIT_CONFIG
    assert message in one_line_error(capsys)


def test_train_refuses_to_overwrite_without_flag(frozen_runs, embeddings, capsys):
    code = train_classifier.main(["--input", embeddings_glob(embeddings), "--output", frozen_runs["text"]["output"],
                                  "--features", "text"])
    assert code == launch.EXIT_CONFIG
    assert "pass --overwrite" in one_line_error(capsys)


def test_help_lists_the_options(capsys):
    for job, flags in ((train_classifier, ("--features", "--class_weights", "--fine_tune", "--top_k_labels",
                                           "--label_frequency_threshold", "--hidden_units", "--test_ratio")),
                       (predict, ("--model", "--top_k", "--max_error_rate", "--batch_size"))):
        with pytest.raises(SystemExit) as exit_info:
            job.main(["--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert all(flag in out for flag in flags), out


# --- split and skipped rows ------------------------------------------------------------------------------------


def test_split_is_a_stable_function_of_the_id(frozen_runs, embeddings):
    # Pinned values: SHA-256 of the id, so they hold on every machine and run.
    assert split_fraction("leaf-00000") == pytest.approx(0.148009488, abs=1e-9)
    assert [split_of(f"leaf-{n:05d}", 0.15, 0.2) for n in range(5)] == [TEST, TRAIN, TRAIN, TRAIN, TEST]
    assert split_of("b", 0.15, 0.2) == VALIDATION
    ids = read_embeddings_table(embeddings).column(cols.ID).to_pylist()
    splits = [split_of(i, VALIDATION_RATIO, TEST_RATIO) for i in ids]
    assert splits == [split_of(i, VALIDATION_RATIO, TEST_RATIO) for i in reversed(ids)][::-1]  # order-free
    shares = {name: splits.count(name) / len(ids) for name in (TRAIN, VALIDATION, TEST)}
    assert shares[TEST] == pytest.approx(TEST_RATIO, abs=0.03)
    assert shares[VALIDATION] == pytest.approx(VALIDATION_RATIO, abs=0.03)
    # Every run put exactly the rows whose id hashes to `test` in its test split.
    expected = sorted(i for i, split in zip(ids, splits, strict=True) if split == TEST)
    for run in frozen_runs.values():
        tested = pq.read_table(os.path.join(run["output"], train_classifier.TEST_PREDICTIONS)).column(pred.ID)
        assert sorted(tested.to_pylist()) == expected
        assert run["report"]["rows"][TEST] == len(expected)


def test_training_streams_every_row_once_as_the_whole_table_gives_it(frozen_runs, embeddings, tmp_path):
    """The streamed passes (count, analysis, train, validation, test) read a record batch at a time: over many small
    files they see each usable row once, transformed exactly as the whole table in memory would be."""
    table = read_embeddings_table(embeddings)
    for index, start in enumerate(range(0, table.num_rows, 37)):  # 17 files: every file is a record batch of its own
        write_variant(table.slice(start, 37), tmp_path, f"embeddings-{index:05d}.parquet")
    dims = {cols.IMAGE_EMBEDDING: table.schema.field(cols.IMAGE_EMBEDDING).type.list_size,
            cols.TEXT_EMBEDDING: table.schema.field(cols.TEXT_EMBEDDING).type.list_size}
    source = RowSource(tuple(sorted(glob.glob(embeddings_glob(str(tmp_path))))), "both", dims, VALIDATION_RATIO,
                       TEST_RATIO)
    whole, _ = labeled_rows(table, "both", dims, VALIDATION_RATIO, TEST_RATIO)
    counts = survey(source)
    transform = load_transform(os.path.join(frozen_runs["both"]["output"], train_classifier.TRANSFORM_DIR))
    labels = label_vocabulary(transform)
    assert counts.read == table.num_rows
    layer = transform.transform_features_layer()
    for split in (TRAIN, VALIDATION, TEST):
        chosen = whole[SPLIT] == split
        assert counts.kept(split, labels) == chosen.sum() > 0
        streamed = list(split_dataset(source, split, labels, layer, batch_size=16))
        inputs = np.concatenate([batch.numpy() for batch, _ in streamed])
        expected = head_inputs(layer({name: tf.constant(whole[name][chosen]) for name in source.raw_names}))
        np.testing.assert_allclose(inputs, expected.numpy(), atol=1e-5)  # same rows, same order, same transform
        assert [labels[i] for batch in streamed for i in batch[1].numpy()] == whole[cols.LABEL][chosen].tolist()
    shuffled = np.concatenate([ids for _, ids in split_dataset(source, TRAIN, labels, layer, 16, 64, seed=1)])
    train_labels = whole[cols.LABEL][whole[SPLIT] == TRAIN]
    assert sorted(shuffled.tolist()) == sorted(labels.index(label) for label in train_labels)  # each row once
    # A split small enough is kept in memory after its first epoch: every epoch the same batches as streaming.
    assert fits_in_memory(counts.kept(TRAIN, labels), dims) and not fits_in_memory(10_000_000, dims)
    streaming = split_dataset(source, TRAIN, labels, layer, 16, 64, seed=1).repeat(3)
    cached = split_dataset(source, TRAIN, labels, layer, 16, 64, seed=1, cache=True).repeat(3)
    for (inputs, ids), (cached_inputs, cached_ids) in zip(streaming, cached, strict=True):
        np.testing.assert_array_equal(inputs.numpy(), cached_inputs.numpy())
        np.testing.assert_array_equal(ids.numpy(), cached_ids.numpy())


def test_unlabeled_rows_are_skipped_and_counted(embeddings, tmp_path):
    table = read_embeddings_table(embeddings)
    labels = table.column(cols.LABEL).to_pylist()
    for index in range(0, 60, 3):  # 20 rows without a label, some blank rather than null
        labels[index] = "" if index % 4 == 0 else None
    blank = sum(1 for label in labels if not label)
    table = table.set_column(table.schema.get_field_index(cols.LABEL), cols.LABEL, pa.array(labels, pa.string()))
    source = write_variant(table, tmp_path / "unlabeled")
    report = train_classifier.run(["--input", source, "--output", str(tmp_path / "out"), "--features", "both",
                                   *FAST])
    assert report.rows["skipped_unlabeled"] == blank == 20
    assert report.rows[TRAIN] + report.rows[VALIDATION] + report.rows[TEST] == CORPUS_ROWS - blank
    assert report.rows["read"] == CORPUS_ROWS


def test_top_k_labels_and_balanced_class_weights(embeddings, tmp_path):
    report = train_classifier.run(["--input", embeddings_glob(embeddings), "--output", str(tmp_path / "out"),
                                   "--features", "image", "--top_k_labels", "2", "--class_weights", "balanced",
                                   *FAST])
    assert len(report.labels) == 2
    assert report.rows["skipped_label_not_in_vocabulary"] == CORPUS_ROWS // 3
    assert report.hyperparameters["class_weights"] == "balanced"


def test_label_limits_that_leave_no_classifier_fail_in_one_line(embeddings, tmp_path, capsys):
    code = train_classifier.main(["--input", embeddings_glob(embeddings), "--output", str(tmp_path / "out"),
                                  "--label_frequency_threshold", str(CORPUS_ROWS), *FAST])
    assert code == launch.EXIT_CONFIG
    assert "the training split has 0 label(s)" in one_line_error(capsys)


# --- fine-tune mode --------------------------------------------------------------------------------------------


def test_fine_tune_names_an_encoder_that_cannot_be_trained(fixture_encoders, sample_corpus, tmp_path, capsys):
    code = train_classifier.main(["--fine_tune", "--input", sample_corpus, "--output", str(tmp_path / "out"),
                                  "--features", "image", "--image_encoder", fixture_encoders["image"], *FAST])
    assert code == launch.EXIT_CONFIG
    assert "cannot fine-tune the encoders: LookupError: No gradient defined for operation" in one_line_error(capsys)


def test_fine_tune_trains_the_encoders_and_reports_in_the_same_form(fixture_encoders, sample_corpus, frozen_runs,
                                                                    tmp_path):
    output = str(tmp_path / "fine_tuned")
    code = train_classifier.main(["--fine_tune", "--input", sample_corpus, "--output", output, "--features", "both",
                                  "--image_encoder", fixture_encoders["image_trainable"], "--text_encoder",
                                  fixture_encoders["text"], "--epochs", "2", "--patience", "2", *SPLIT_FLAGS])
    assert code == 0
    with open(os.path.join(output, train_classifier.REPORT_NAME)) as handle:
        report = json.load(handle)
    frozen = frozen_runs["both"]["report"]
    assert report["mode"] == "fine_tune"
    assert set(report) == set(frozen) and set(report["metrics"]) == set(frozen["metrics"])
    assert set(frozen["rows"]) <= set(report["rows"])
    assert report["rows"]["read"] == CORPUS_ROWS and report["rows"]["dead_lettered"] == 0
    assert report["rows"][TEST] == frozen["rows"][TEST]  # the same split by id
    changes = report["training"]["encoder_weight_change"]
    assert {name.split("/")[0] for name in changes} >= {"image_encoder", "text_encoder"}, changes
    assert all(change > 0 for change in changes.values()), changes
    for picture in (train_classifier.CONFUSION_MATRIX_PNG, train_classifier.TRAINING_CURVES_PNG):
        assert os.path.getsize(os.path.join(output, picture)) > 0
    # The exported model takes raw image bytes and text, and answers as the in-process evaluation did.
    model = tf.saved_model.load(os.path.join(output, "model"))
    manifest = [json.loads(line) for line in open(sample_corpus)]
    tested = pq.read_table(os.path.join(output, train_classifier.TEST_PREDICTIONS)).to_pylist()[:8]
    rows = {row["id"]: row for row in manifest}
    images = [open(os.path.join(os.path.dirname(sample_corpus), rows[t["id"]]["image"]), "rb").read() for t in tested]
    outputs = model.signatures["serving_default"](image_bytes=tf.constant(images),
                                                  text=tf.constant([rows[t["id"]]["text"] for t in tested]))
    assert [label.decode() for label in outputs["predicted_label"].numpy()] == [t["predicted_label"] for t in tested]
    np.testing.assert_allclose(outputs["probability"].numpy(), [t["probability"] for t in tested], atol=1e-4)
    # Serving decodes every format the embedding job takes, as training did: the same pixels as PNG and as
    # lossless WebP score the same.
    pixels = Image.open(io.BytesIO(images[0])).convert("RGB")
    encoded = {}
    for fmt, options in (("PNG", {}), ("WEBP", {"lossless": True})):
        buffer = io.BytesIO()
        pixels.save(buffer, format=fmt, **options)
        encoded[fmt] = model.signatures["serving_default"](
            image_bytes=tf.constant([buffer.getvalue()]), text=tf.constant([rows[tested[0]["id"]]["text"]]))
    np.testing.assert_allclose(encoded["WEBP"]["probabilities"].numpy(), encoded["PNG"]["probabilities"].numpy(),
                               atol=1e-6)


def test_predict_refuses_a_local_model_on_a_cluster_runner(frozen_runs, embeddings, tmp_path, capsys):
    code = predict.main(["--input", embeddings_glob(embeddings), "--model", os.path.join(frozen_runs["both"]["output"],
                         "model"), "--output", str(tmp_path / "out"), "--runner", "DataflowRunner"])
    assert code == launch.EXIT_CONFIG
    assert "is a local folder that DataflowRunner workers cannot read" in one_line_error(capsys)


def test_train_and_predict_take_the_folder_and_every_storage_choice(frozen_runs, sample_corpus, fixture_encoders,
                                                                     tmp_path):
    """The default run stores `embedding` alone (the fixtures above); here the per-modality columns alone, as
    float16: the same model trains on it, and predict scores it, both given the output folder, not a glob."""
    output = str(tmp_path / "half")
    report = embed_corpus.run(["--input", sample_corpus, "--output", output, "--vectors", "modalities",
                               "--float16", "--image_encoder", fixture_encoders["image"],
                               "--text_encoder", fixture_encoders["text"]])
    assert report.passed and cols.EMBEDDING not in pq.read_schema(glob.glob(embeddings_glob(output))[0]).names
    trained = str(tmp_path / "classifier")
    assert train_classifier.main(["--input", output, "--output", trained, "--features", "both", *SPLIT_FLAGS]) == 0
    with open(os.path.join(trained, train_classifier.REPORT_NAME)) as handle:
        accuracy = json.load(handle)["metrics"]["accuracy"]
    assert accuracy >= frozen_runs["both"]["report"]["metrics"]["accuracy"] - 0.03
    # The model trained on float32 slices of `embedding` scores the float16 per-modality columns.
    scored = str(tmp_path / "scored")
    assert predict.main(["--input", output, "--model", os.path.join(frozen_runs["both"]["output"], "model"),
                         "--output", scored]) == 0
    assert len(pd.read_parquet(scored)) == CORPUS_ROWS
    assert {name for name in os.listdir(scored) if not name.startswith("predictions-")} == {
        "_SUCCESS", "_dead_letters", "_run_report.json"}
