"""Keras models as encoders (encoders.keras_model): a keras.applications architecture with a weights file, Keras 3
`.keras` files, tf-keras `.h5` files and SavedModel folders, for images and texts, converted once into the encoder
cache and run by the embedding job on DirectRunner. The vectors are compared with the Keras model itself, called on
inputs prepared by Keras' own `preprocess_input` (or by hand), never with the converted module.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest

from beam_jobs import embed_corpus
from encoders import keras_model
from encoders.hub_module import EncoderConfigError, LoadedEncoder
from encoders.resolve import EncoderChoice, resolve_encoder
from encoders.runtime import hub, tf, tf_keras
from schemas import embeddings as cols
from tests import corpus_builders as corpora
from tests.test_embed_config import fails_in_one_line
from tests.test_encoder_conventions import by_hand, read_output
from transforms.image_decode import decode_and_resize

SIZE = 64  # small enough for a fast test, large enough for MobileNet's strides


@pytest.fixture(scope="module")
def application(tmp_path_factory) -> tuple[keras.Model, str]:
    """MobileNet (V1) without its top, random weights saved as a Keras 3 weights file."""
    keras.utils.set_random_seed(5)
    model = keras.applications.MobileNet(weights=None, include_top=False, pooling="avg",
                                           input_shape=(SIZE, SIZE, 3))
    path = str(tmp_path_factory.mktemp("weights") / "mobilenet.weights.h5")
    model.save_weights(path)
    return model, path


def image_model_keras3(path: str, seed: int = 9) -> keras.Model:
    """A small Keras 3 CNN whose output is a feature map (pooled by the wrapper) and that sees colour order."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(6, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    model = keras.Model(inputs, keras.layers.Conv2D(5, 3)(x))
    model.save(path)
    return model


def decoded(rows: list[dict], ids: list[str], size: int) -> np.ndarray:
    by_id = {row["id"]: row["image_bytes"] for row in rows}
    return np.stack([decode_and_resize(tf.constant(by_id[row_id]), size).numpy() for row_id in ids])


def stored(table, column: str) -> np.ndarray:
    return np.stack(table.column(column).to_numpy(zero_copy_only=False))


def run_job(corpus: str, output: str, *flags: str) -> embed_corpus.EmbedRunReport:
    report = embed_corpus.run(["--input", corpus, "--output", output, "--vectors", "both", *flags])
    assert report.passed and report.dead_lettered == 0
    return report


def test_an_application_with_a_weights_file_embeds_end_to_end(application, tmp_path):
    model, weights = application
    rows = corpora.good_rows(5)
    corpus = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), rows)
    cache = str(tmp_path / "cache")
    run_job(corpus, str(tmp_path / "out"), "--image_encoder", "keras.applications.MobileNet",
            "--image_encoder_weights", weights, "--image_size", str(SIZE), "--text_encoder", "none",
            "--encoder_cache_dir", cache)
    table = read_output(str(tmp_path / "out"))
    ids = table.column(cols.ID).to_pylist()
    # The family's default is its own preprocess_input (MobileNet: [-1, 1]), applied by Keras here.
    prepared = keras.applications.mobilenet.preprocess_input(decoded(rows, ids, SIZE) * 255.0)
    np.testing.assert_allclose(stored(table, cols.IMAGE_EMBEDDING), np.asarray(model(prepared, training=False)),
                               rtol=1e-4, atol=1e-4)
    metadata = cols.read_metadata(table.schema)
    assert json.loads(metadata[cols.META_IMAGE_PREPROCESSING])["input_convention"]["input_convention"] == "symmetric"
    assert json.loads(metadata[cols.META_IMAGE_ENCODER])["dim"] == model.output_shape[-1]


@pytest.mark.parametrize("architecture, expected", [("MobileNetV2", "symmetric"), ("ResNet50", "caffe"),
                                                    ("DenseNet121", "torch"), ("EfficientNetB0", "raw"),
                                                    ("Xception", "symmetric"), ("ConvNeXtTiny", "raw")])
def test_each_application_family_gets_its_own_preprocess_input(architecture, expected):
    assert keras_model.family_convention(getattr(keras.applications, architecture)) == expected


def test_a_keras3_file_and_a_text_model_embed_end_to_end(tmp_path):
    image_path = str(tmp_path / "cnn.keras")
    image_model = image_model_keras3(image_path)
    keras.utils.set_random_seed(3)
    vectorize = keras.layers.TextVectorization(max_tokens=40, output_sequence_length=12)
    vectorize.adapt([row["text"] for row in corpora.good_rows(6)])
    texts_in = keras.Input((1,), dtype="string")
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(40, 7)(vectorize(texts_in)))
    text_model = keras.Model(texts_in, pooled)
    text_path = str(tmp_path / "bag.keras")
    text_model.save(text_path)

    rows = corpora.good_rows(6)
    corpus = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), rows)
    run_job(corpus, str(tmp_path / "out"), "--image_encoder", image_path, "--image_input_convention", "caffe",
            "--text_encoder", text_path, "--encoder_cache_dir", str(tmp_path / "cache"))
    table = read_output(str(tmp_path / "out"))
    ids = table.column(cols.ID).to_pylist()
    feature_map = np.asarray(image_model(by_hand(decoded(rows, ids, 32), "caffe"), training=False))
    np.testing.assert_allclose(stored(table, cols.IMAGE_EMBEDDING), feature_map.mean(axis=(1, 2)),
                               rtol=1e-4, atol=1e-4)
    texts = {row["id"]: row["text"] for row in rows}
    expected_text = np.asarray(text_model(np.array([[texts[row_id]] for row_id in ids])))
    np.testing.assert_allclose(stored(table, cols.TEXT_EMBEDDING), expected_text, rtol=1e-5, atol=1e-6)


def tf_keras_model() -> tf_keras.Model:
    tf_keras.utils.set_random_seed(4)
    inputs = tf_keras.Input((24, 24, 3))
    x = tf_keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    return tf_keras.Model(inputs, tf_keras.layers.Dense(3)(tf_keras.layers.GlobalAveragePooling2D()(x)))


@pytest.mark.parametrize("saved_as", ["legacy.h5", "savedmodel_folder"])
def test_tf_keras_files_are_encoders(tmp_path, saved_as):
    model = tf_keras_model()
    path = str(tmp_path / saved_as)
    model.save(path, save_format="h5" if saved_as.endswith(".h5") else "tf")
    assert keras_model.is_keras_source(path)
    spec = resolve_encoder(EncoderChoice("image", path, input_convention="raw", cache_dir=str(tmp_path / "cache")))
    assert (spec.dim, spec.image_size, spec.input_convention) == (3, 24, "raw")
    pixels = np.random.RandomState(0).uniform(size=(3, 24, 24, 3)).astype(np.float32)
    converted = hub.KerasLayer(spec.handle)(tf.constant(pixels * 255.0)).numpy()
    np.testing.assert_allclose(converted, model(pixels * 255.0).numpy(), rtol=1e-5, atol=1e-5)


def test_a_converted_model_fine_tunes_and_is_converted_once(tmp_path):
    image_model_keras3(str(tmp_path / "cnn.keras"))
    choice = EncoderChoice("image", str(tmp_path / "cnn.keras"), input_convention="unit",
                           cache_dir=str(tmp_path / "cache"))
    spec = resolve_encoder(choice)
    stamp = os.stat(os.path.join(spec.handle, "saved_model.pb")).st_mtime_ns
    assert resolve_encoder(choice).handle == spec.handle  # found, not converted again
    assert os.stat(os.path.join(spec.handle, "saved_model.pb")).st_mtime_ns == stamp
    assert not [entry for entry in os.listdir(os.path.dirname(spec.handle)) if ".baking-" in entry]
    image_model_keras3(str(tmp_path / "cnn.keras"), seed=10)  # another model saved over the same file
    assert resolve_encoder(choice).handle != spec.handle

    layer = hub.KerasLayer(spec.handle, trainable=True)
    classifier = tf_keras.Sequential([tf_keras.Input((32, 32, 3)), layer, tf_keras.layers.Dense(2)])
    # Both convolutions' kernels and biases and batch norm's scale and offset; its moving statistics are not.
    assert len(layer.trainable_weights) == 6 and len(layer.non_trainable_weights) == 2
    images = np.random.RandomState(1).uniform(size=(8, 32, 32, 3)).astype(np.float32)
    before = layer(images, training=False).numpy()
    classifier.compile(optimizer=tf_keras.optimizers.SGD(0.5),
                       loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    classifier.fit(images, np.arange(8) % 2, epochs=1, verbose=0)
    assert not np.allclose(before, layer(images, training=False).numpy(), atol=1e-4)


def test_a_keras3_export_is_called_through_its_signature(tmp_path):
    # model.export() writes a plain SavedModel with serving signatures and no callable root: a Hub-style handle,
    # which the start-up check tells how to call.
    keras.utils.set_random_seed(6)
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(5, 3)(inputs)))
    exported = str(tmp_path / "exported")
    model.export(exported, verbose=False)
    assert not keras_model.is_keras_source(exported)
    cache = str(tmp_path / "cache")
    with pytest.raises(EncoderConfigError, match="pass --image_signature, one of: .*serving_default"):
        resolve_encoder(EncoderChoice("image", exported, cache_dir=cache))
    with pytest.raises(EncoderConfigError, match="pass --image_output_key"):
        resolve_encoder(EncoderChoice("image", exported, signature="serving_default", cache_dir=cache))
    spec = resolve_encoder(EncoderChoice("image", exported, signature="serving_default", output_key="output_0",
                                         cache_dir=cache))
    assert (spec.dim, spec.image_size) == (5, 32)
    pixels = np.random.RandomState(4).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(LoadedEncoder(spec, "/CPU:0")(pixels), np.asarray(model(pixels)), rtol=1e-5,
                               atol=1e-6)


def test_a_model_on_another_filesystem_is_copied_and_converted(tmp_path):
    local = str(tmp_path / "cnn.keras")
    model = image_model_keras3(local)
    remote = "ram://hubembed-test/cnn.keras"  # TensorFlow's in-memory filesystem stands in for gs://
    tf.io.gfile.makedirs("ram://hubembed-test")
    tf.io.gfile.copy(local, remote, overwrite=True)
    spec = resolve_encoder(EncoderChoice("image", remote, input_convention="unit", cache_dir=str(tmp_path / "c")))
    pixels = np.random.RandomState(2).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(hub.KerasLayer(spec.handle)(pixels).numpy(),
                               np.asarray(model(pixels, training=False)).mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)


def test_keras_misconfiguration_fails_at_start_in_one_line(application, tmp_path, capsys):
    _, weights = application
    corpus = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), corpora.good_rows(2))
    base = ["--input", corpus, "--output", str(tmp_path / "o"), "--text_encoder", "none",
            "--encoder_cache_dir", str(tmp_path / "cache")]
    fails_in_one_line(capsys, [*base, "--image_encoder", "keras.applications.MobileNet"],
                      "needs its weights", "--image_encoder_weights")
    fails_in_one_line(capsys, [*base, "--image_encoder", "keras.applications.NoSuchNet", "--image_encoder_weights",
                               weights], "is not a keras.applications architecture", "ResNet50")
    fails_in_one_line(capsys, [*base, "--image_encoder", "keras.applications.ResNet50", "--image_encoder_weights",
                               weights, "--image_size", str(SIZE)], "do not fit keras.applications.ResNet50")
    image_model_keras3(str(tmp_path / "cnn.keras"))
    fails_in_one_line(capsys, [*base, "--image_encoder", str(tmp_path / "cnn.keras")], "--image_input_convention")
    fails_in_one_line(capsys, [*base, "--image_encoder", str(tmp_path / "missing.keras"),
                               "--image_input_convention", "unit"], "cannot read Keras model")
    (tmp_path / "garbage.h5").write_bytes(b"not a model")
    fails_in_one_line(capsys, [*base, "--image_encoder", str(tmp_path / "garbage.h5"),
                               "--image_input_convention", "unit"], "cannot load Keras model")
    fails_in_one_line(capsys, [*base[:-4], "--image_encoder", "none", "--text_encoder",
                               "keras.applications.MobileNet", "--encoder_cache_dir", str(tmp_path / "cache")],
                      "is an image architecture, not a text encoder")
    with pytest.raises(EncoderConfigError, match="takes \\[B\\] or \\[B, 1\\] strings"):
        resolve_encoder(EncoderChoice("text", str(tmp_path / "cnn.keras"), cache_dir=str(tmp_path / "cache")))
