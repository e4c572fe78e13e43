"""An image encoder's input convention and resize method: applied in the graph, recorded, and checked downstream.

The round trip: the same pixels under each convention give the vectors the model gives on inputs prepared by hand
(NumPy, and Keras' own `preprocess_input` for the modes Keras names), in the job as in the encoder alone; the
Parquet metadata says which; a classifier trained on one convention's vectors refuses another's; --reuse never
takes vectors made under another convention.
"""

from __future__ import annotations

import glob
import json
import os

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest

from beam_jobs import embed_corpus, launch, predict, train_classifier
from encoders.hub_module import EncoderSpec, LoadedEncoder, probe_encoder
from encoders.preprocessing import CONVENTION_NAMES, RESIZE_METHODS, to_model_inputs
from encoders.runtime import hub, tf
from schemas import embeddings as cols
from scripts.make_sample_corpus import make_sample_corpus
from tests import corpus_builders as corpora
from tests.test_embed_config import fails_in_one_line
from transforms.image_decode import decode_and_resize

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)


def by_hand(pixels: np.ndarray, convention: str) -> np.ndarray:
    """[0, 1] RGB pixels → a convention's model inputs, written out in NumPy."""
    if convention == "unit":
        return pixels
    if convention == "symmetric":
        return pixels * 2.0 - 1.0
    if convention == "caffe":
        return pixels[..., ::-1] * 255.0 - CAFFE_MEAN_BGR
    if convention == "torch":
        return (pixels - IMAGENET_MEAN) / IMAGENET_STD
    if convention == "raw":
        return pixels * 255.0
    raise AssertionError(convention)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.RandomState(3).uniform(0.0, 1.0, size=(4, 32, 32, 3)).astype(np.float32)


@pytest.mark.parametrize("convention", CONVENTION_NAMES)
def test_each_convention_is_the_formula_keras_and_torchvision_use(pixels, convention):
    ours = to_model_inputs(tf.constant(pixels), convention).numpy()
    np.testing.assert_allclose(ours, by_hand(pixels, convention), rtol=1e-5, atol=1e-4)
    keras_mode = {"symmetric": "tf", "caffe": "caffe", "torch": "torch"}.get(convention)
    if keras_mode:  # Keras' own implementation of the mode, on the 0-255 values it takes
        theirs = keras.applications.imagenet_utils.preprocess_input(pixels * 255.0, mode=keras_mode)
        np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("convention", CONVENTION_NAMES)
def test_the_encoder_sees_the_inputs_prepared_by_hand(fixture_encoders, pixels, convention):
    spec = probe_encoder(EncoderSpec("image", fixture_encoders["image"], input_convention=convention))
    loaded = LoadedEncoder(spec, "/CPU:0")
    layer = hub.KerasLayer(fixture_encoders["image"])
    expected = layer(tf.constant(by_hand(pixels, convention))).numpy()
    np.testing.assert_allclose(loaded(pixels), expected, rtol=1e-5, atol=1e-4)
    if convention != "unit":  # the fixture encoder is channel-sensitive: another convention, other vectors
        assert not np.allclose(loaded(pixels), layer(tf.constant(pixels)).numpy(), atol=1e-3)


def embed(corpus: str, output: str, image: str, *flags: str) -> embed_corpus.EmbedRunReport:
    report = embed_corpus.run(["--input", corpus, "--output", output, "--image_encoder", image,
                               "--text_encoder", "none", "--vectors", "both", *flags])
    assert report.passed and report.dead_lettered == 0
    return report


def read_output(folder: str):
    files = sorted(glob.glob(os.path.join(folder, "embeddings-*.parquet")))
    return pq.ParquetDataset(files).read().sort_by(cols.ID)


def test_the_job_applies_records_and_checks_the_convention(fixture_encoders, tmp_path, capsys):
    rows = corpora.good_rows(6)
    corpus = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), rows)
    image = fixture_encoders["image"]
    embed(corpus, str(tmp_path / "caffe"), image, "--image_input_convention", "caffe", "--image_resize", "bicubic")
    table = read_output(str(tmp_path / "caffe"))

    # The vectors: the model on the project's decode (bicubic) prepared by hand, row by row.
    layer = hub.KerasLayer(image)
    by_id = {row["id"]: row["image_bytes"] for row in rows}
    decoded = np.stack([decode_and_resize(tf.constant(by_id[row_id]), 32, "bicubic").numpy()
                        for row_id in table.column(cols.ID).to_pylist()])
    expected = layer(tf.constant(by_hand(decoded, "caffe"))).numpy()
    np.testing.assert_allclose(np.stack(table.column(cols.IMAGE_EMBEDDING).to_numpy(zero_copy_only=False)),
                               expected, rtol=1e-4, atol=1e-3)

    # The metadata says how the inputs were made.
    metadata = cols.read_metadata(table.schema)
    preprocessing = json.loads(metadata[cols.META_IMAGE_PREPROCESSING])
    assert preprocessing["input_convention"]["input_convention"] == "caffe"
    assert preprocessing["input_convention"]["channels"] == "BGR"
    assert preprocessing["resize"] == RESIZE_METHODS["bicubic"]
    spec = json.loads(metadata[cols.META_IMAGE_ENCODER])
    assert spec["input_convention"] == "caffe" and spec["resize"] == "bicubic"

    # The default run (unit, area) describes its preprocessing as the job always has: no convention key, so the
    # outputs of earlier versions stay reusable.
    embed(corpus, str(tmp_path / "unit"), image)
    unit_table = read_output(str(tmp_path / "unit"))
    unit_preprocessing = json.loads(cols.read_metadata(unit_table.schema)[cols.META_IMAGE_PREPROCESSING])
    assert "input_convention" not in unit_preprocessing and unit_preprocessing["value_range"] == [0.0, 1.0]

    # --reuse refuses, at start, vectors made under another convention; it takes those made under the same one.
    capsys.readouterr()
    fails_in_one_line(capsys, ["--input", corpus, "--output", str(tmp_path / "again"), "--image_encoder", image,
                               "--text_encoder", "none", "--image_input_convention", "caffe", "--image_resize",
                               "bicubic", "--reuse", str(tmp_path / "unit")], "was embedded with other encoders, "
                                                                              "preprocessing")
    same = embed(corpus, str(tmp_path / "same"), image, "--image_input_convention", "caffe", "--image_resize",
                 "bicubic", "--reuse", str(tmp_path / "caffe"))
    assert same.reused == len(rows) and same.embedded_fresh == 0


def test_a_classifier_refuses_embeddings_made_under_another_convention(fixture_encoders, tmp_path, capsys):
    corpus = make_sample_corpus(str(tmp_path / "corpus"), size=120, seed=2)
    image = fixture_encoders["image"]
    embed(corpus, str(tmp_path / "unit"), image)
    embed(corpus, str(tmp_path / "torch"), image, "--image_input_convention", "torch")
    assert train_classifier.main(["--input", str(tmp_path / "unit"), "--output", str(tmp_path / "model_run"),
                                  "--features", "image", "--epochs", "2", "--patience", "1"]) == launch.EXIT_OK
    model = str(tmp_path / "model_run" / "model")
    assert predict.main(["--input", str(tmp_path / "unit"), "--model", model, "--output",
                         str(tmp_path / "unit_predictions")]) == launch.EXIT_OK
    capsys.readouterr()
    assert predict.main(["--input", str(tmp_path / "torch"), "--model", model, "--output",
                         str(tmp_path / "torch_predictions")]) == launch.EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "was embedded with other encoders than" in err, err
    assert cols.META_IMAGE_PREPROCESSING in err and "torch" in err


def test_misconfigured_conventions_fail_at_start(fixture_encoders, tmp_path, capsys):
    corpus = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), corpora.good_rows(2))
    base = ["--input", corpus, "--output", str(tmp_path / "o"), "--text_encoder", "none"]
    fails_in_one_line(capsys, [*base, "--image_encoder", fixture_encoders["image"], "--image_encoder_weights",
                               str(tmp_path / "w.weights.h5")], "weights file is for a keras.applications")
    fails_in_one_line(capsys, [*base[:-2], "--image_encoder", "none", "--text_encoder",
                               "mobilenet-v1-100-224-feature-vector"], "is a baked image encoder, not a text one")
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        embed_corpus.main([*base, "--image_encoder", fixture_encoders["image"], "--image_input_convention", "bgr"])
    assert "invalid choice: 'bgr'" in capsys.readouterr().err
