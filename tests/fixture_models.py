"""Tiny TF Hub-format (reusable TF2 SavedModel) encoders for fast, offline tests.

They follow the Reusable SavedModel API that `hub.KerasLayer` expects: `__call__(inputs, training=False)`,
`variables`, `trainable_variables` and `regularization_losses`. They are deterministic (fixed seeds) and small, but
real: the image one responds to colour and layout, the text one to the words, so a classifier can learn from their
outputs. The text one and the `differentiable` image one fine-tune under `hub.KerasLayer(path, trainable=True)`;
the default image one pools with an area resize, an op TensorFlow has no gradient for, which is how a real module
that cannot be fine-tuned behaves.
"""

from __future__ import annotations

import numpy as np

from encoders.hub_module import save_reusable_module
from encoders.runtime import tf

IMAGE_DIM = 8
TEXT_DIM = 6
TEXT_BUCKETS = 97


class TinyImageEncoder(tf.Module):
    """[B, H, W, 3] float32 in [0, 1] → [B, 8]: mean colour of each image quadrant through a dense layer."""

    def __init__(self, size: int | None, differentiable: bool = False):
        super().__init__()
        rng = np.random.RandomState(7)
        self.kernel = tf.Variable(rng.normal(size=(12, IMAGE_DIM)).astype("float32"), name="kernel")
        self.bias = tf.Variable(np.zeros(IMAGE_DIM, "float32"), name="bias")
        spec = tf.TensorSpec([None, size, size, 3], tf.float32)

        @tf.function(input_signature=[spec, tf.TensorSpec([], tf.bool)])
        def call(images, training=False):
            if differentiable:  # the same quadrant means, from ops that have gradients (needs an even, fixed size)
                half = size // 2
                quadrants = tf.reduce_mean(tf.reshape(images, [-1, 2, half, 2, half, 3]), axis=[2, 4])
            else:
                quadrants = tf.image.resize(images, [2, 2], method="area")  # [B, 2, 2, 3]
            return tf.matmul(tf.reshape(quadrants, [-1, 12]), self.kernel) + self.bias

        self.__call__ = call


class TinyTextEncoder(tf.Module):
    """[B] tf.string → [B, 6]: mean of hashed word embeddings (zeros for an empty string)."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(11)
        self.table = tf.Variable(rng.normal(size=(TEXT_BUCKETS, TEXT_DIM)).astype("float32"), name="table")

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([], tf.bool)])
        def call(texts, training=False):
            words = tf.strings.split(tf.strings.lower(texts))
            ids = tf.strings.to_hash_bucket_fast(words, TEXT_BUCKETS)
            vectors = tf.gather(self.table, ids)  # ragged [B, (words), 6]
            total = tf.reduce_sum(vectors, axis=1)
            count = tf.cast(tf.maximum(words.row_lengths(), 1), tf.float32)[:, None]
            return total / count

        self.__call__ = call


class SquaredTextEncoder(TinyTextEncoder):
    """TinyTextEncoder's variables with another computation (its vectors squared): a re-export whose change lies
    in the function body alone, which TensorFlow's fingerprint.pb does not see."""

    def __init__(self):
        super().__init__()

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([], tf.bool)])
        def call(texts, training=False):
            words = tf.strings.split(tf.strings.lower(texts))
            ids = tf.strings.to_hash_bucket_fast(words, TEXT_BUCKETS)
            vectors = tf.gather(self.table, ids)
            total = tf.reduce_sum(vectors, axis=1)
            count = tf.cast(tf.maximum(words.row_lengths(), 1), tf.float32)[:, None]
            return tf.square(total / count)

        self.__call__ = call


class PoisonedTextEncoder(TinyTextEncoder):
    """TinyTextEncoder that fails (InvalidArgumentError) on any batch holding the text POISON: a model that
    chokes on one input, for the batch-then-one-by-one fallback."""

    POISON = "poison pill"

    def __init__(self):
        super().__init__()
        embed = self.__call__

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([], tf.bool)])
        def call(texts, training=False):
            tf.debugging.assert_equal(tf.reduce_any(tf.equal(texts, self.POISON)), False, message="poisoned input")
            return embed(texts, training)

        self.__call__ = call


class BadRankEncoder(tf.Module):
    """[B] tf.string → [B, 2, 3]: not a [B, d] embedding, for the start-up check."""

    def __init__(self):
        super().__init__()

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def call(texts):
            return tf.zeros([tf.shape(texts)[0], 2, 3])

        self.__call__ = call


save = save_reusable_module


def build_image_encoder(path: str, size: int | None = 32, differentiable: bool = False) -> str:
    return save(TinyImageEncoder(size, differentiable), path)


def build_text_encoder(path: str) -> str:
    return save(TinyTextEncoder(), path)


def build_squared_text_encoder(path: str) -> str:
    return save(SquaredTextEncoder(), path)


def build_poisoned_text_encoder(path: str) -> str:
    return save(PoisonedTextEncoder(), path)


def build_bad_rank_encoder(path: str) -> str:
    return save(BadRankEncoder(), path)
