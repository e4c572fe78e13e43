"""The downstream stage against input it must not trust: NaN / infinity in the vectors, encoders identified by
their content rather than their path, and a model folder that is not a model. Real runs on DirectRunner with the
fixture encoders (tests/fixture_models.py) and the sample corpus."""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_jobs import embed_corpus, launch, predict, train_classifier
from encoders.function_library import functions_fingerprint
from encoders.hub_module import EncoderSpec, encoder_fingerprint, probe_encoder
from schemas import embeddings as cols
from schemas import predictions as pred
from schemas.embeddings import spec_identity
from scripts.make_sample_corpus import make_sample_corpus
from tests import fixture_models
from transforms.downstream.embeddings_input import same_identity
from transforms.downstream.split import SPLITS, TEST, TRAIN, VALIDATION, split_of

CORPUS_ROWS = 600
VALIDATION_RATIO, TEST_RATIO = 0.15, 0.25
SPLIT_FLAGS = ["--validation_ratio", str(VALIDATION_RATIO), "--test_ratio", str(TEST_RATIO)]
TRAIN_FLAGS = [*SPLIT_FLAGS, "--epochs", "60", "--patience", "8"]
FAST = [*SPLIT_FLAGS, "--epochs", "2", "--patience", "1"]  # for tests about plumbing, not accuracy


class ReweightedTextEncoder(fixture_models.TinyTextEncoder):
    """The fixture text encoder's graph with other weights: another model that only its variables tell apart."""

    def __init__(self):
        super().__init__()
        self.table.assign(np.random.RandomState(99).normal(size=self.table.shape).astype("float32"))


def embed(corpus: str, output: str, image: str, text: str) -> str:
    # Per-modality columns stored too (--vectors both): the tests below poison them one modality at a time.
    report = embed_corpus.run(["--input", corpus, "--output", output, "--image_encoder", image, "--text_encoder",
                               text, "--vectors", "both"])
    assert report.passed and report.dead_lettered == 0
    return output


def read_output(folder: str, prefix: str) -> pa.Table:
    """Every `<prefix>-*.parquet` a job wrote under `folder`, wherever its layout puts them (not staging)."""
    files = sorted(path for path in glob.glob(os.path.join(folder, "**", f"{prefix}-*.parquet"), recursive=True)
                   if "_staging" not in path)
    assert files, f"no {prefix} files in {folder}"
    return pa.concat_tables([pq.read_table(path) for path in files])


def read_run_report(folder: str) -> dict:
    """The predict job's run report (`run_report.json`, `_run_report.json` in the newer layout)."""
    (path,) = glob.glob(os.path.join(folder, "*run_report.json"))
    return read_json(path)


def read_embeddings(folder: str) -> pa.Table:
    return read_output(folder, "embeddings")


def write_embeddings(table: pa.Table, folder: str, name: str = "embeddings-00000-of-00001.parquet") -> str:
    os.makedirs(folder, exist_ok=True)
    pq.write_table(table, os.path.join(folder, name))
    return os.path.join(folder, "embeddings-*.parquet")


def vectors(table: pa.Table, column: str) -> np.ndarray:
    """A vector column as [rows, d], rows in id order."""
    return np.stack(table.sort_by(cols.ID).column(column).to_numpy(zero_copy_only=False))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hubembed: error: "), err
    return err


def read_json(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return make_sample_corpus(str(tmp_path_factory.mktemp("hostile_corpus")), size=CORPUS_ROWS, seed=0)


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory, fixture_encoders, corpus) -> str:
    return embed(corpus, str(tmp_path_factory.mktemp("hostile_embeddings")), fixture_encoders["image"],
                 fixture_encoders["text"])


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, embeddings) -> dict:
    """`both` on the clean embeddings: the accuracy the poisoned runs must keep, and the model predict uses."""
    output = str(tmp_path_factory.mktemp("hostile_clean"))
    code = train_classifier.main(["--input", os.path.join(embeddings, "embeddings-*.parquet"), "--output", output,
                                  *TRAIN_FLAGS])
    assert code == 0
    return {"output": output, "report": read_json(os.path.join(output, train_classifier.REPORT_NAME))}


# --- 1. non-finite vectors -------------------------------------------------------------------------------------


def poison(table: pa.Table) -> tuple[pa.Table, dict[str, list[str]], list[str]]:
    """NaN / ±inf in some rows' vectors, in every split; returns the table, the poisoned ids by split, and the ids
    whose text vector is poisoned (what `--features text` must skip)."""
    ids = table.column(cols.ID).to_pylist()
    by_split = {split: [n for n, row_id in enumerate(ids) if split_of(row_id, VALIDATION_RATIO, TEST_RATIO) == split]
                for split in SPLITS}
    image = np.stack(table.column(cols.IMAGE_EMBEDDING).to_numpy(zero_copy_only=False)).astype(np.float32)
    text = np.stack(table.column(cols.TEXT_EMBEDDING).to_numpy(zero_copy_only=False)).astype(np.float32)
    has_image = table.column(cols.HAS_IMAGE).to_pylist()
    train_rows, validation_rows, test_rows = by_split[TRAIN], by_split[VALIDATION], by_split[TEST]
    image[train_rows[0], 0] = np.nan
    image[train_rows[1], 3] = np.inf
    text[train_rows[2], 1] = -np.inf
    # A missing image whose (unused by the head, but scaled by the transform) vector holds NaN.
    has_image[train_rows[3]] = False
    image[train_rows[3], :] = np.nan
    text[validation_rows[0], :] = np.nan
    image[test_rows[0], 5] = -np.inf
    text[test_rows[1], 2] = np.nan
    poisoned = {TRAIN: train_rows[:4], VALIDATION: validation_rows[:1], TEST: test_rows[:2]}
    text_poisoned = [ids[n] for n in (train_rows[2], validation_rows[0], test_rows[1])]
    columns = {cols.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(image.reshape(-1)), image.shape[1]),
               cols.TEXT_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(text.reshape(-1)), text.shape[1]),
               cols.HAS_IMAGE: pa.array(has_image, pa.bool_())}
    for name, column in columns.items():
        table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), column)
    return table, {split: [ids[n] for n in rows] for split, rows in poisoned.items()}, text_poisoned


def test_non_finite_vectors_are_skipped_in_training_and_dead_lettered_in_predict(embeddings, clean_run, tmp_path,
                                                                                 capsys):
    table, poisoned, text_poisoned = poison(read_embeddings(embeddings))
    assert table.schema.metadata == read_embeddings(embeddings).schema.metadata  # still the embedding job's file
    source = write_embeddings(table, str(tmp_path / "poisoned"))
    n_poisoned = sum(len(ids) for ids in poisoned.values())

    output = str(tmp_path / "trained")
    capsys.readouterr()
    assert train_classifier.main(["--input", source, "--output", output, *TRAIN_FLAGS]) == 0
    console = capsys.readouterr().out
    report = read_json(os.path.join(output, train_classifier.REPORT_NAME))
    rows, clean_rows = report["rows"], clean_run["report"]["rows"]
    assert rows["skipped_non_finite"] == n_poisoned == 7
    for split in SPLITS:
        assert rows[f"skipped_non_finite_{split}"] == len(poisoned[split])
        assert rows[split] == clean_rows[split] - len(poisoned[split])
    assert f"skipped_non_finite {n_poisoned}" in console and "skipped_non_finite_train 4" in console
    # One NaN row used to make the z-score NaN and every prediction one label (accuracy about 1/3).
    accuracy, clean_accuracy = report["metrics"]["accuracy"], clean_run["report"]["metrics"]["accuracy"]
    print(f"test accuracy: clean {clean_accuracy:.3f}, with {n_poisoned} non-finite rows skipped {accuracy:.3f}")
    assert clean_accuracy > 0.85
    assert accuracy >= clean_accuracy - 0.03
    tested = pq.read_table(os.path.join(output, train_classifier.TEST_PREDICTIONS)).column(pred.ID).to_pylist()
    assert not set(tested) & set(poisoned[TEST])

    # Only the vectors the features use count: --features text keeps the rows whose image alone is poisoned.
    text_report = train_classifier.run(["--input", source, "--output", str(tmp_path / "text"), "--features", "text",
                                        *FAST])
    assert text_report.rows["skipped_non_finite"] == len(text_poisoned) == 3

    # predict: every poisoned row is a `not_finite` dead letter, every other row is predicted.
    scored = str(tmp_path / "scored")
    assert predict.main(["--input", source, "--model", os.path.join(clean_run["output"], "model"), "--output",
                         scored, "--max_error_rate", "0.05"]) == 0
    run_report = read_run_report(scored)
    assert (run_report["read"], run_report["predicted"], run_report["dead_lettered"]) == (
        CORPUS_ROWS, CORPUS_ROWS - n_poisoned, n_poisoned)
    assert run_report["dead_lettered_by_reason"] == {pred.PredictReason.NOT_FINITE: n_poisoned}
    assert run_report["reconciled"] and run_report["passed"]
    dead = read_output(scored, "dead_letters").to_pylist()
    assert sorted(row["id"] for row in dead) == sorted(row_id for ids in poisoned.values() for row_id in ids)
    assert all(row["stage"] == pred.STAGE_PREDICT and "NaN or infinity" in row["message"] for row in dead)
    predictions = read_output(scored, "predictions")
    assert np.isfinite(predictions.column(pred.PROBABILITY).to_numpy()).all()


# --- 2. encoders identified by their content -------------------------------------------------------------------


def test_encoder_fingerprint_follows_the_content_not_the_path(fixture_encoders, tmp_path, monkeypatch):
    original = fixture_encoders["text"]
    fingerprint = encoder_fingerprint(original)
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    copy = shutil.copytree(original, str(tmp_path / "copies" / "text"))
    resaved = fixture_models.build_text_encoder(str(tmp_path / "resaved"))  # the same model saved again
    monkeypatch.chdir(tmp_path)
    for same in (copy, "copies/text", "copies/text/", resaved):
        assert encoder_fingerprint(same) == fingerprint, same
    # Another model: other weights in the same graph (saved over the copy's folder), another graph, other assets.
    fixture_models.save(ReweightedTextEncoder(), copy)
    assert encoder_fingerprint(copy) != fingerprint
    assert encoder_fingerprint(fixture_encoders["image"]) != fingerprint
    with_asset = shutil.copytree(original, str(tmp_path / "with_asset"))
    with open(os.path.join(with_asset, "assets", "vocab.txt"), "w") as handle:
        handle.write("a\nb\n")
    assert encoder_fingerprint(with_asset) != fingerprint
    # Without fingerprint.pb (SavedModels of TF < 2.12), the files themselves: copies agree, other weights differ.
    legacy = shutil.copytree(original, str(tmp_path / "legacy"))
    os.remove(os.path.join(legacy, "fingerprint.pb"))
    legacy_copy = shutil.copytree(legacy, str(tmp_path / "legacy_copy"))
    assert encoder_fingerprint(legacy) == encoder_fingerprint(legacy_copy)
    legacy_other = shutil.copytree(copy, str(tmp_path / "legacy_other"))
    os.remove(os.path.join(legacy_other, "fingerprint.pb"))
    assert encoder_fingerprint(legacy_other) != encoder_fingerprint(legacy)

    # probe_encoder records it; the identity is the fingerprint and how the module is called, not the handle.
    spec = probe_encoder(EncoderSpec("text", original, name="a-name"))
    assert spec.fingerprint == fingerprint and json.loads(spec.to_json())["fingerprint"] == fingerprint
    elsewhere = probe_encoder(EncoderSpec("text", "copies/../resaved"))
    assert spec_identity(json.loads(spec.to_json())) == spec_identity(json.loads(elsewhere.to_json())) == {
        "modality": "text", "fingerprint": fingerprint, "functions_fingerprint": functions_fingerprint(original),
        "dim": fixture_models.TEXT_DIM}
    # A spec written before fingerprints existed is identified by its handle, the only identity it has.
    assert spec_identity({"modality": "text", "handle": "/m", "dim": 6}) == {"modality": "text", "handle": "/m",
                                                                            "dim": 6}


def test_the_identity_sees_a_changed_function_body(fixture_encoders, tmp_path):
    original = fixture_encoders["text"]
    changed = fixture_models.build_squared_text_encoder(str(tmp_path / "squared"))
    resaved = fixture_models.build_text_encoder(str(tmp_path / "resaved"))
    # TensorFlow's fingerprint.pb hashes the outer graph, not the functions: the two look alike to it.
    assert encoder_fingerprint(changed) == encoder_fingerprint(original)
    assert functions_fingerprint(changed) != functions_fingerprint(original) == functions_fingerprint(resaved)

    def identity(path: str, older: bool = False) -> dict:
        spec = json.loads(probe_encoder(EncoderSpec("text", path)).to_json())
        if older:  # as hubembed recorded it before it fingerprinted functions
            spec.pop(cols.FUNCTIONS_FINGERPRINT)
        return {cols.META_TEXT_ENCODER: spec_identity(spec), cols.META_L2_NORMALIZE: "false"}

    assert not same_identity(identity(original), identity(changed))
    assert same_identity(identity(original), identity(resaved))
    # An identity recorded before: compared on what it has, as then (it cannot tell the two apart, as it could not).
    assert same_identity(identity(original, older=True), identity(original))
    assert same_identity(identity(changed), identity(original, older=True))
    reweighted = fixture_models.save(ReweightedTextEncoder(), str(tmp_path / "reweighted"))
    assert not same_identity(identity(original, older=True), identity(reweighted))


def test_same_encoder_elsewhere_is_accepted_other_model_at_the_same_path_is_refused(fixture_encoders, tmp_path,
                                                                                    monkeypatch, capsys):
    corpus = make_sample_corpus(str(tmp_path / "corpus"), size=150, seed=1)
    image, text = fixture_encoders["image"], shutil.copytree(fixture_encoders["text"], str(tmp_path / "enc" / "text"))
    first = read_embeddings(embed(corpus, str(tmp_path / "first"), image, text))
    model_output = str(tmp_path / "model_run")
    assert train_classifier.main(["--input", str(tmp_path / "first" / "embeddings-*.parquet"), "--output",
                                  model_output, *FAST]) == 0
    model = os.path.join(model_output, "model")

    def predict_on(table: pa.Table, name: str) -> int:
        return predict.main(["--input", write_embeddings(table, str(tmp_path / name)), "--model", model, "--output",
                             str(tmp_path / f"{name}_predictions")])

    def train_on_mixed(other: pa.Table, name: str) -> int:
        """Half the rows from the first run's file, half from `other`'s, in two files of one glob."""
        folder = str(tmp_path / name)
        write_embeddings(first.slice(0, 75), folder, "embeddings-00000-of-00002.parquet")
        source = write_embeddings(other.slice(75), folder, "embeddings-00001-of-00002.parquet")
        return train_classifier.main(["--input", source, "--output", str(tmp_path / f"{name}_model"), *FAST])

    # The same model at another path (a relative one, from another folder): the same vectors, accepted.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(text, "elsewhere/text")
    moved = read_embeddings(embed(corpus, str(tmp_path / "moved"), image, "elsewhere/text"))
    moved_spec = json.loads(moved.schema.metadata[cols.META_TEXT_ENCODER.encode()])
    assert moved_spec["handle"] == "elsewhere/text"
    np.testing.assert_allclose(vectors(moved, cols.EMBEDDING), vectors(first, cols.EMBEDDING), atol=1e-6)
    assert predict_on(moved, "moved_input") == launch.EXIT_OK
    assert train_on_mixed(moved, "mixed_moved") == launch.EXIT_OK

    # Another model saved over the first one's folder: the same handle, other vectors, refused in one line.
    fixture_models.save(ReweightedTextEncoder(), text)
    replaced = read_embeddings(embed(corpus, str(tmp_path / "replaced"), image, text))
    replaced_spec = json.loads(replaced.schema.metadata[cols.META_TEXT_ENCODER.encode()])
    assert replaced_spec["handle"] == json.loads(first.schema.metadata[cols.META_TEXT_ENCODER.encode()])["handle"]
    assert not np.allclose(vectors(replaced, cols.TEXT_EMBEDDING), vectors(first, cols.TEXT_EMBEDDING), atol=1e-3)
    capsys.readouterr()
    assert predict_on(replaced, "replaced_input") == launch.EXIT_CONFIG
    err = one_line_error(capsys)
    assert "was embedded with other encoders than" in err and f"{cols.META_TEXT_ENCODER}.fingerprint" in err
    assert cols.META_IMAGE_ENCODER not in err  # the image encoder is the same: only what differs is named
    assert not glob.glob(str(tmp_path / "replaced_input_predictions" / "*"))  # refused before anything was written
    assert train_on_mixed(replaced, "mixed_replaced") == launch.EXIT_CONFIG
    err = one_line_error(capsys)
    assert "embeddings-00001-of-00002.parquet was embedded with other encoders" in err
    assert f"{cols.META_TEXT_ENCODER}.fingerprint" in err


# --- 3. a model folder that is not a model ---------------------------------------------------------------------


def test_predict_refuses_a_model_folder_without_a_loadable_saved_model(clean_run, embeddings, tmp_path, capsys):
    model = os.path.join(clean_run["output"], "model")
    info_only = tmp_path / "info_only"
    shutil.copytree(os.path.join(model, "assets.extra"), info_only / "assets.extra")
    no_variables = shutil.copytree(model, str(tmp_path / "no_variables"))
    shutil.rmtree(os.path.join(no_variables, "variables"))
    for folder, message in ((str(info_only), "holds model_info.json but no SavedModel"),
                            (no_variables, "is not a loadable SavedModel")):
        output = tmp_path / f"out_{os.path.basename(folder)}"
        capsys.readouterr()
        code = predict.main(["--input", os.path.join(embeddings, "embeddings-*.parquet"), "--model", folder,
                             "--output", str(output)])
        assert code == launch.EXIT_CONFIG
        assert message in one_line_error(capsys)
        assert not glob.glob(str(output / "*"))  # refused before anything was written
