"""A long text cannot exhaust a worker: the baked MiniLM's work on a text is bounded by what it keeps (issue 7).

The encoder keeps a text's first 254 word pieces, and every word and special-token literal gives at least one, so
only a text's first 254 words and literals can matter: its tokenisation is linear in the text's length and the
tokenizer sees at most those words. Measured here in a fresh process (peak RSS, time) on 20 MB texts of several
shapes. Parity with sentence-transformers and Hugging Face's token ids is tests/test_pretrained_encoders.py's.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from encoders import minilm, pretrained
from encoders.runtime import hub, tf

REPO_ROOT = Path(__file__).resolve().parent.parent
LONG_TEXT_BYTES = 20_000_000
PEAK_GROWTH_LIMIT_MB = 400
SECONDS_LIMIT = 30
# The measuring process's heap is capped this far above what it holds once the model is loaded, so an encoder
# that regresses fails the test (the process dies) instead of taking the machine's memory with it.
HEAP_HEADROOM_BYTES = 2 * 2**30
PROSE = "Brown spots spread over the older leaves, then the stem wilts; mould follows (after rain). "
CJK_PROSE = "葉子上有褐色斑點，莖枯萎了。"


@pytest.fixture(scope="session")
def minilm_cache(tmp_path_factory) -> str:
    """A cache with MiniLM baked (reused across runs via $HUBEMBED_CACHE_DIR, as tests/test_pretrained_encoders)."""
    root = os.environ.get(pretrained.CACHE_DIR_ENV) or str(tmp_path_factory.mktemp("pretrained_encoders"))
    pretrained.ensure_baked(pretrained.MINILM, root)
    return root


@pytest.fixture(scope="session")
def minilm_files(minilm_cache) -> dict[str, bytes]:
    return pretrained.read_source_files(
        pretrained.MINILM_SOURCE, pretrained.fetch_archive(pretrained.MINILM_SOURCE, minilm_cache)
    )


def long_and_short_texts(size: int) -> dict[str, tuple[str, str]]:
    """Shape → (a text of about `size` bytes, a short text with the same kept tokens)."""
    prose = PROSE * (size // len(PROSE))
    cjk = CJK_PROSE * (size // len(CJK_PROSE.encode()))  # no whitespace at all: every ideograph is a word
    literals = "[SEP] leaf " * (size // 11)
    tail = PROSE * 40  # well over 254 words
    return {
        "prose": (prose, prose[:5000]),
        "cjk": (cjk, cjk[:2000]),
        "special_literals": (literals, literals[:5000]),
        # A word of more than 100 characters is [UNK], however long.
        "one_huge_word": ("x" * size + " " + tail, "x" * 101 + " " + tail),
    }


def _status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(f"{key}:"))


def measure_long_texts(model_path: str, size: int) -> None:
    """Run in a fresh process: per text shape, one JSON line with the peak RSS growth and the time of embedding the
    long text, and how far its vector is from its short equivalent's."""
    layer = hub.KerasLayer(model_path)
    embed = tf.function(lambda texts: layer(texts), input_signature=[tf.TensorSpec([None], tf.string)])
    embed(tf.constant([PROSE]))  # trace and warm up on a short text
    _, hard_limit = resource.getrlimit(resource.RLIMIT_DATA)
    cap = _status_bytes("VmData") + HEAP_HEADROOM_BYTES
    if hard_limit != resource.RLIM_INFINITY:
        cap = min(cap, hard_limit)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard_limit))
    for shape, (text, short) in long_and_short_texts(size).items():
        long_input = tf.constant([text])
        del text
        short_vector = embed(tf.constant([short])).numpy()[0]
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        before = _status_bytes("VmRSS")
        started = time.perf_counter()
        long_vector = embed(long_input).numpy()[0]
        seconds = time.perf_counter() - started
        growth = _status_bytes("VmHWM") - before
        print(json.dumps({"shape": shape, "growth_mb": growth / 2**20, "seconds": seconds,
                          "max_diff": float(np.abs(long_vector - short_vector).max())}), flush=True)


def test_a_20_mb_text_embeds_in_bounded_memory_and_time(minilm_cache):
    path = pretrained.ensure_baked(pretrained.MINILM, minilm_cache)
    script = f"from tests.test_long_text import measure_long_texts; measure_long_texts({path!r}, {LONG_TEXT_BYTES})"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    print("\n" + "\n".join(json.dumps(line) for line in lines))
    assert result.returncode == 0, (
        f"the measuring process exited {result.returncode} after {len(lines)} texts (a crash: past its heap cap?): "
        f"{result.stderr[-2000:]}"
    )
    assert [line["shape"] for line in lines] == list(long_and_short_texts(100))
    for line in lines:
        assert line["growth_mb"] < PEAK_GROWTH_LIMIT_MB, line
        assert line["seconds"] < SECONDS_LIMIT, line
        # Truncation is unchanged: a long text is its first few thousand characters (the vectors, not just close).
        assert line["max_diff"] <= 1e-6, line


def test_only_the_first_254_words_and_literals_count(minilm_files):
    encoder = minilm.build_module(minilm_files)
    vocab = minilm_files["vocab.txt"].decode("utf-8").splitlines()
    cls, sep, mask, unk = (vocab.index(token) for token in ("[CLS]", "[SEP]", "[MASK]", "[UNK]"))
    leaf, stem, ideograph = vocab.index("leaf"), vocab.index("stem"), vocab.index("葉")
    expected = {
        "[SEP] " * 300: [cls] + [sep] * 254 + [sep],
        "[SEP]" * 200 + " leaf" * 100: [cls] + [sep] * 200 + [leaf] * 54 + [sep],  # literals and words share 254
        ("leaf " * 100 + "[MASK] ") * 5: [cls] + ([leaf] * 100 + [mask]) * 2 + [leaf] * 52 + [sep],
        "x" * 200_000 + " leaf" * 300: [cls, unk] + [leaf] * 253 + [sep],
        "é" * 101 + " leaf": [cls, unk, leaf, sep],
        "葉" * 100_000: [cls] + [ideograph] * 254 + [sep],
        "leaf" + " " * 100_000 + "stem": [cls, leaf, stem, sep],
    }
    token_ids = encoder.tokenize(tf.constant(list(expected))).to_list()
    for (text, ids), got in zip(expected.items(), token_ids, strict=True):
        assert got == ids, f"{text[:30]!r}..."


def test_a_bake_of_an_older_graph_is_not_reused(minilm_cache, tmp_path):
    # A cache baked before the tokenisation change holds the plain-named folder: it must not count as baked.
    old_bake = tmp_path / pretrained.MINILM
    old_bake.mkdir()
    (old_bake / "saved_model.pb").write_bytes(b"an older graph")
    assert pretrained.BAKE_REVISIONS[pretrained.MINILM] > 1
    assert not pretrained.is_baked(pretrained.MINILM, str(tmp_path))
    assert pretrained.model_dir(pretrained.MINILM, str(tmp_path)) != str(old_bake)

    baked = pretrained.ensure_baked(pretrained.MINILM, minilm_cache)
    with open(os.path.join(baked, pretrained.PROVENANCE_FILE), encoding="utf-8") as handle:
        assert json.load(handle)["bake_revision"] == pretrained.BAKE_REVISIONS[pretrained.MINILM]
