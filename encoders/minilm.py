"""sentence-transformers/all-MiniLM-L6-v2 rebuilt in TensorFlow: string in, normalised 384-d sentence vector out.

The pipeline is the one sentence-transformers runs (`encode(..., normalize_embeddings=True)`):
Hugging Face's fast BERT tokenizer (uncased) → BERT (6 layers, hidden 384, 12 heads) → attention-masked mean
pooling → L2 normalisation. Tokenisation is part of the graph (tensorflow_text), so the SavedModel takes raw
`tf.string` and needs no Python tokenizer at serving time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import load as load_safetensors

from encoders.runtime import tf

# isort: split
# tensorflow_text imports TensorFlow: only after encoders.runtime has set TF_USE_LEGACY_KERAS.
import tensorflow_text as tf_text
from tensorflow_text.python.ops import bert_tokenizer

# sentence-transformers' `max_seq_length` for this model (sentence_bert_config.json), counting [CLS] and [SEP].
MAX_SEQ_LENGTH = 256
EMBEDDING_DIM = 384
# The tokenizer's added (special) tokens. Hugging Face matches them in the raw text before normalisation, so a
# literal "[UNK]" in a sentence is the unknown token, not "[", "unk", "]".
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SPECIAL_TOKEN_PATTERN = r"\[(?:PAD|UNK|CLS|SEP|MASK)\]"
# Hugging Face's WordPiece turns a word longer than this many characters into [UNK]. tensorflow_text's limit is in
# bytes, so it gets 4 bytes per character (the UTF-8 maximum): it never cuts a word the character rule keeps.
MAX_CHARS_PER_WORD = 100
# What a word of more than MAX_CHARS_PER_WORD characters is swapped for before tokenisation: over tensorflow_text's
# byte limit, so it is [UNK] too, and the tokenizer never sees (nor copies) a long word.
TOO_LONG_WORD = "x" * (4 * MAX_CHARS_PER_WORD + 1)
# Word pieces a sentence keeps between [CLS] and [SEP]. Every word and every special-token literal gives at least
# one, so a text's first MAX_KEPT_TOKENS words and literals hold every token it keeps: the rest of a long text is
# dropped before any per-word work, which would otherwise grow with its length (or, copying it per word, its square).
MAX_KEPT_TOKENS = MAX_SEQ_LENGTH - 2
# The characters tensorflow_text's BasicTokenizer (inside BertTokenizer) makes words of their own: punctuation and
# CJK ideographs. Its own pattern, so the words split_words cuts at are the ones the tokenizer splits into.
KEPT_DELIMITER_PATTERN = bert_tokenizer._KEEP_DELIM_NO_WHITESPACE_PATTERN

# Files of the sentence-transformers model folder this module reads.
MODEL_FILES = ("config.json", "vocab.txt", "model.safetensors", "1_Pooling/config.json")


def normalize_like_bert_uncased(texts: tf.Tensor) -> tf.Tensor:
    """Hugging Face's `BertNormalizer(clean_text, lowercase, strip_accents=None)` on a string tensor.

    tensorflow_text's `lower_case=True` path differs from it in ways the parity test can see: it case-folds with
    NFKC (ß → ss, ﬁ → fi, full-width → ASCII), turns control/format characters into spaces where HF deletes them,
    and does not treat non-ASCII spaces (NBSP, ideographic space) as whitespace. So the normalisation is done here
    with tensorflow_text/TF string ops in HF's order, and the BertTokenizer below runs with lower_case=False.
    """
    # clean_text: drop NUL, U+FFFD and every "other" (C*) character except \t \n \r; map Unicode spaces to " ".
    texts = tf.strings.regex_replace(texts, r"[\x00\x{FFFD}]|[^\PC\t\n\r]", "")
    texts = tf.strings.regex_replace(texts, r"\p{Z}", " ")
    # strip_accents (implied by lowercase when strip_accents is None): NFD, then drop non-spacing marks.
    texts = tf_text.normalize_utf8(texts, "NFD")
    texts = tf.strings.regex_replace(texts, r"\p{Mn}", "")
    return tf.strings.lower(texts, encoding="utf-8")


def keep_first_special_tokens(texts: tf.Tensor, count: int) -> tf.Tensor:
    """[B] raw strings, each cut just before its (count + 1)-th special-token literal (whole when it has fewer).

    Linear in the text, so later steps see at most count literals (each is a token) and count + 1 pieces between.
    The texts must hold no NUL byte: it marks where each literal starts.
    """
    marked = tf.strings.regex_replace(texts, SPECIAL_TOKEN_PATTERN, "\x00\\0")
    parts = tf.strings.split(marked, sep="\x00", maxsplit=count + 1)  # the last part: the rest, one copy
    return tf.strings.reduce_join(parts[:, : count + 1], axis=1)


def split_words(normalized: tf.Tensor, count: int) -> tf.RaggedTensor:
    """[N] normalised strings → [N, (≤ count)] their first `count` words, as BertTokenizer's BasicTokenizer splits.

    Its words are runs of non-whitespace between punctuation and CJK ideographs, which are words of their own: with
    those spaced out, a whitespace split that stops after `count` words finds them, in time linear in the text and
    with one copy of the rest, where the tokenizer makes tensors for every word of it. The whitespace is the same:
    after normalize_like_bert_uncased only space, tab, newline and carriage return are left of it.
    """
    spaced = tf.strings.regex_replace(normalized, KEPT_DELIMITER_PATTERN, r" \0 ")
    return tf.strings.split(spaced, maxsplit=count)[:, :count]


def replace_rows(rows: tf.RaggedTensor, replace: tf.Tensor, replacement: tf.Tensor) -> tf.RaggedTensor:
    """rows [R, (k)] with every row r where replace[r] is True swapped for the single value replacement[r]."""
    kept = tf.ragged.boolean_mask(rows, tf.ones_like(rows, tf.bool) & ~replace[:, None])
    swapped = tf.RaggedTensor.from_row_lengths(tf.boolean_mask(replacement, replace), tf.cast(replace, tf.int64))
    return tf.concat([kept, swapped], axis=1)  # each row is empty in one of the two


class MiniLMSentenceEncoder(tf.Module):
    """[B] tf.string → [B, 384] float32, unit-length; `training=True` turns on BERT's dropout (p=0.1)."""

    def __init__(self, config: Mapping, vocab: list[str], weights: Mapping[str, np.ndarray]):
        super().__init__(name="minilm_l6_v2")
        self.num_layers = int(config["num_hidden_layers"])
        self.num_heads = int(config["num_attention_heads"])
        self.hidden_size = int(config["hidden_size"])
        self.head_size = self.hidden_size // self.num_heads
        self.layer_norm_epsilon = float(config["layer_norm_eps"])
        self.dropout_rate = float(config["hidden_dropout_prob"])
        self.attention_dropout_rate = float(config["attention_probs_dropout_prob"])
        self.cls_id = vocab.index("[CLS]")
        self.sep_id = vocab.index("[SEP]")
        self.pad_id = vocab.index("[PAD]")

        self.vocab_table = tf.lookup.StaticVocabularyTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(vocab), tf.range(len(vocab), dtype=tf.int64), key_dtype=tf.string, value_dtype=tf.int64
            ),
            num_oov_buckets=1,
        )
        self.tokenizer = tf_text.BertTokenizer(
            self.vocab_table,
            suffix_indicator="##",
            max_bytes_per_word=4 * MAX_CHARS_PER_WORD,
            token_out_type=tf.int64,
            unknown_token="[UNK]",
            lower_case=False,  # normalize_like_bert_uncased does it, HF's way
        )

        def variable(key: str, name: str, transpose: bool = False) -> tf.Variable:
            value = weights[key]
            # PyTorch Linear stores [out, in]; y = x @ kernel wants [in, out].
            return tf.Variable(value.T.copy() if transpose else value, name=name, dtype=tf.float32)

        self.word_embeddings = variable("embeddings.word_embeddings.weight", "embeddings/word")
        self.position_embeddings = variable("embeddings.position_embeddings.weight", "embeddings/position")
        self.token_type_embeddings = variable("embeddings.token_type_embeddings.weight", "embeddings/token_type")
        self.embedding_norm = (
            variable("embeddings.LayerNorm.weight", "embeddings/layer_norm/gamma"),
            variable("embeddings.LayerNorm.bias", "embeddings/layer_norm/beta"),
        )
        self.layers = []
        for index in range(self.num_layers):
            prefix = f"encoder.layer.{index}."

            def dense(part: str, name: str, prefix: str = prefix, index: int = index) -> tuple[tf.Variable, ...]:
                return (
                    variable(f"{prefix}{part}.weight", f"layer_{index}/{name}/kernel", transpose=True),
                    variable(f"{prefix}{part}.bias", f"layer_{index}/{name}/bias"),
                )

            def norm(part: str, name: str, prefix: str = prefix, index: int = index) -> tuple[tf.Variable, ...]:
                return (
                    variable(f"{prefix}{part}.weight", f"layer_{index}/{name}/gamma"),
                    variable(f"{prefix}{part}.bias", f"layer_{index}/{name}/beta"),
                )

            self.layers.append(
                {
                    "query": dense("attention.self.query", "attention/query"),
                    "key": dense("attention.self.key", "attention/key"),
                    "value": dense("attention.self.value", "attention/value"),
                    "attention_output": dense("attention.output.dense", "attention/output"),
                    "attention_norm": norm("attention.output.LayerNorm", "attention/layer_norm"),
                    "intermediate": dense("intermediate.dense", "intermediate"),
                    "output": dense("output.dense", "output"),
                    "output_norm": norm("output.LayerNorm", "output/layer_norm"),
                }
            )

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([], tf.bool)])
        def call(texts: tf.Tensor, training: tf.Tensor = False) -> tf.Tensor:
            token_ids = self.tokenize(texts)
            return self.pool(self.encode(token_ids, training), token_ids)

        self.__call__ = call

    def tokenize(self, texts: tf.Tensor) -> tf.RaggedTensor:
        """[B] strings → [B, (T)] int64 token ids: [CLS] word pieces [SEP], at most 256 in all.

        Linear in the length of a text: only its first MAX_KEPT_TOKENS words and special-token literals can give a
        kept token, so only those reach the tokenizer, each word cut to what decides its tokens.
        """
        # regex_split stops at a NUL byte; \x01 is a control character too, so clean_text still deletes it below.
        texts = tf.strings.regex_replace(texts, r"\x00", "\x01")
        texts = keep_first_special_tokens(texts, MAX_KEPT_TOKENS)
        # Cut special-token literals out first (kept as pieces of their own), as HF's added-token matching does.
        pieces = tf_text.regex_split(texts, SPECIAL_TOKEN_PATTERN, SPECIAL_TOKEN_PATTERN)  # [B, (P)]
        flat_pieces = pieces.flat_values
        is_special = tf.strings.regex_full_match(flat_pieces, SPECIAL_TOKEN_PATTERN)
        # A whole piece is normalised: lower-casing looks across words (a final sigma), so a cut piece could differ.
        words = split_words(normalize_like_bert_uncased(flat_pieces), MAX_KEPT_TOKENS)  # [N, (words)]
        # Every earlier word or literal of the same text takes at least one of the kept tokens: a piece keeps only
        # as many words as are left. A literal keeps none (its piece is swapped for its id below).
        taken = tf.where(is_special, tf.ones_like(words.row_lengths()), words.row_lengths())
        taken_before = tf.cumsum(taken, exclusive=True)
        taken_before -= tf.gather(taken_before, tf.gather(pieces.row_starts(), pieces.value_rowids()))
        budget = tf.where(is_special, tf.zeros_like(taken), tf.maximum(MAX_KEPT_TOKENS - taken_before, 0))
        words = tf.ragged.boolean_mask(words, tf.ragged.range(words.row_lengths()) < budget[:, None])
        too_long = tf.strings.length(words.flat_values, unit="UTF8_CHAR") > MAX_CHARS_PER_WORD
        words = words.with_flat_values(tf.where(too_long, TOO_LONG_WORD, words.flat_values))
        # Re-joined with spaces, the words split into themselves again: the tokenizer sees them and nothing else.
        wordpieces = self.tokenizer.tokenize(tf.strings.reduce_join(words, axis=1, separator=" "))  # [N, (w), (p)]
        piece_ids = replace_rows(wordpieces.merge_dims(1, 2), is_special, self.vocab_table.lookup(flat_pieces))
        token_ids = pieces.with_flat_values(piece_ids).merge_dims(1, 2)  # [B, (tokens)]
        token_ids = token_ids[:, :MAX_KEPT_TOKENS]
        token_ids, _ = tf_text.combine_segments([token_ids], self.cls_id, self.sep_id)
        return token_ids

    def encode(self, token_ids: tf.RaggedTensor, training: tf.Tensor) -> tf.Tensor:
        """BERT: [B, (T)] ids → [N, hidden], the last hidden state of each of the N tokens of the batch.

        Everything but attention works per token, so it runs on the batch's real tokens packed together, not on a
        [B, T_max] padded block: in a batch of mixed lengths most of a padded block is padding. Only attention
        scatters the tokens into [B, T_max] (padded keys masked out) and gathers them back.
        """
        row_ids = token_ids.value_rowids()  # [N]: which sentence each token belongs to
        positions = tf.range(tf.size(row_ids, out_type=tf.int64), dtype=tf.int64) - tf.gather(
            token_ids.row_starts(), row_ids
        )
        padded_shape = token_ids.bounding_shape()  # [B, T_max]
        padded_index = tf.stack([row_ids, positions], axis=1)  # [N, 2]: each token's place in [B, T_max]
        hidden = (
            tf.gather(self.word_embeddings, token_ids.flat_values)
            + tf.gather(self.position_embeddings, positions)
            + self.token_type_embeddings[0]  # a single segment: token type 0 everywhere
        )
        hidden = self._dropout(self._layer_norm(hidden, self.embedding_norm), self.dropout_rate, training)
        mask = tf.sequence_mask(token_ids.row_lengths(), padded_shape[1], dtype=tf.float32)  # [B, T_max]
        # Additive mask: padded keys get a large negative score so softmax gives them ~0 weight.
        attention_bias = (1.0 - mask)[:, None, None, :] * -1e9  # [B, 1, 1, T_max]
        for layer in self.layers:
            hidden = self._transformer_layer(hidden, padded_index, padded_shape, attention_bias, layer, training)
        return hidden

    def pool(self, hidden: tf.Tensor, token_ids: tf.RaggedTensor) -> tf.Tensor:
        """Mean over each sentence's tokens (sentence-transformers Pooling, mean mode), then L2 normalisation."""
        means = tf.math.unsorted_segment_mean(hidden, token_ids.value_rowids(), num_segments=token_ids.nrows())
        return tf.math.l2_normalize(means, axis=1, epsilon=1e-24)  # 1e-24 on the squared norm = torch's 1e-12

    def _transformer_layer(
        self,
        hidden: tf.Tensor,
        padded_index: tf.Tensor,
        padded_shape: tf.Tensor,
        attention_bias: tf.Tensor,
        layer: dict,
        training: tf.Tensor,
    ) -> tf.Tensor:
        batch, length = padded_shape[0], padded_shape[1]

        def heads(x: tf.Tensor) -> tf.Tensor:  # [N, H*D] packed → [B, H, T_max, D] padded
            padded = tf.scatter_nd(padded_index, x, tf.stack([batch, length, self.hidden_size]))
            return tf.transpose(tf.reshape(padded, [batch, length, self.num_heads, self.head_size]), [0, 2, 1, 3])

        query = heads(self._dense(hidden, layer["query"]))
        key = heads(self._dense(hidden, layer["key"]))
        value = heads(self._dense(hidden, layer["value"]))
        scores = tf.matmul(query, key, transpose_b=True) * (1.0 / math.sqrt(self.head_size)) + attention_bias
        probs = self._dropout(tf.nn.softmax(scores, axis=-1), self.attention_dropout_rate, training)
        context = tf.reshape(tf.transpose(tf.matmul(probs, value), [0, 2, 1, 3]), [batch, length, self.hidden_size])
        context = tf.gather_nd(context, padded_index)  # back to [N, hidden]
        attended = self._dropout(self._dense(context, layer["attention_output"]), self.dropout_rate, training)
        hidden = self._layer_norm(attended + hidden, layer["attention_norm"])
        intermediate = tf.nn.gelu(self._dense(hidden, layer["intermediate"]), approximate=False)  # BERT's erf GELU
        output = self._dropout(self._dense(intermediate, layer["output"]), self.dropout_rate, training)
        return self._layer_norm(output + hidden, layer["output_norm"])

    @staticmethod
    def _dense(x: tf.Tensor, kernel_and_bias: tuple[tf.Variable, tf.Variable]) -> tf.Tensor:
        kernel, bias = kernel_and_bias
        return tf.nn.bias_add(tf.matmul(x, kernel), bias)  # x: [N, in]

    def _layer_norm(self, x: tf.Tensor, gamma_and_beta: tuple[tf.Variable, tf.Variable]) -> tf.Tensor:
        gamma, beta = gamma_and_beta
        mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + self.layer_norm_epsilon) * gamma + beta

    @staticmethod
    def _dropout(x: tf.Tensor, rate: float, training: tf.Tensor) -> tf.Tensor:
        # tf.cond, not a rate of 0 at inference: inference then draws no random numbers at all.
        return tf.cond(training, lambda: tf.nn.dropout(x, rate=rate), lambda: tf.identity(x))


def build_module(model_files: Mapping[str, bytes]) -> MiniLMSentenceEncoder:
    """The encoder from the sentence-transformers model folder's files (paths relative to it, see MODEL_FILES)."""
    config = json.loads(model_files["config.json"])
    pooling = json.loads(model_files["1_Pooling/config.json"])
    # This module implements exactly one recipe; refuse a folder that asks for another rather than mis-encode.
    if not pooling.get("pooling_mode_mean_tokens") or config.get("model_type") != "bert":
        raise ValueError(f"expected a BERT model with mean pooling, got {config.get('model_type')!r} / {pooling}")
    vocab = model_files["vocab.txt"].decode("utf-8").splitlines()
    if len(vocab) != int(config["vocab_size"]):
        raise ValueError(f"vocab.txt has {len(vocab)} entries, config.json says {config['vocab_size']}")
    weights = load_safetensors(model_files["model.safetensors"])
    return MiniLMSentenceEncoder(config, vocab, weights)
