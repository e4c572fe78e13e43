"""--mixed_precision beside float32, in one run: speed, and how far the vectors move.

    python benchmarks/bench_mixed_precision.py [--corpus DIR] [--photos N] [--captions N]

The same corpora as bench_throughput.py (JPEG photos of 640×480 from files, captions of 18–40 words; --corpus shares
them). For the baked MobileNet V1 and MiniLM, each in float32 and in mixed precision (bfloat16 on a CPU with
bfloat16 instructions, float16 on a GPU: encoders.runtime.use_mixed_precision):

model alone   the encoder as the job's workers load it, on the photos decoded by the job's decoder (batches of 32,
              ready in memory) or on the captions, in a process of its own (the rewrite is the process's option)
job           python -m beam_jobs.embed_corpus, image only on the photos, text only on the captions, without and
              with --mixed_precision: the run report's rate
vectors       cosine of each row's mixed-precision vector to its float32 one (the model alone's), and how often a
              row's nearest other row is the same in both
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_decode_fidelity import cosines  # noqa: E402
from benchmarks.bench_throughput import (  # noqa: E402
    BATCH,
    DEFAULT_SIZES,
    caption_corpus,
    log,
    photo_corpus,
    run_job,
)

MODELS = {"image": "mobilenet-v1-100-224-feature-vector", "text": "minilm-l6-v2"}
PRECISIONS = ("float32", "mixed")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_alone(modality: str, precision: str, inputs_file: str, vectors_file: str) -> None:
    """In a process of its own: the encoder over the inputs listed in `inputs_file`, timed after a first batch;
    the vectors go to `vectors_file` (.npy), the rate to stdout as JSON."""
    from encoders import pretrained
    from encoders.hub_module import EncoderSpec, LoadedEncoder, probe_encoder
    from encoders.runtime import tf, use_mixed_precision
    from transforms.image_decode import ImageDecoder

    if precision == "mixed":
        use_mixed_precision("/CPU:0")
    with open(inputs_file, encoding="utf-8") as handle:
        items = json.load(handle)
    spec = probe_encoder(EncoderSpec(modality, pretrained.ensure_baked(MODELS[modality])))
    encoder = LoadedEncoder(spec, "/CPU:0")
    chunks = [items[start:start + BATCH] for start in range(0, len(items), BATCH)]
    if modality == "image":
        decoder = ImageDecoder(spec.image_size)
        batches = []
        for chunk in chunks:
            pixels, errors = decoder.decode_batch([open(path, "rb").read() for path in chunk])
            assert not any(errors)
            batches.append(pixels)
    else:
        batches = [tf.constant(np.array(chunk, dtype=object)) for chunk in chunks]
    encoder(batches[0])  # traced and rewritten outside the timing
    started = time.perf_counter()
    vectors = np.concatenate([encoder(batch) for batch in batches])
    rate = len(items) / (time.perf_counter() - started)
    np.save(vectors_file, vectors)
    print(json.dumps({"rate": rate}))


def nearest_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    """How often a row's nearest other row (by cosine) is the same in both sets of vectors."""
    def nearest(vectors: np.ndarray) -> np.ndarray:
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)
        return similarity.argmax(1)

    return float((nearest(reference) == nearest(other)).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=None, help="corpora kept here (bench_throughput.py --corpus shares them)")
    parser.add_argument("--photos", type=int, default=1500, help="640x480 photos used (of the shared corpus)")
    parser.add_argument("--captions", type=int, default=4000, help="captions used (of the shared corpus)")
    parser.add_argument("--model_alone", nargs=4, metavar=("MODALITY", "PRECISION", "INPUTS", "VECTORS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model_alone:
        model_alone(*args.model_alone)
        return 0

    work = tempfile.mkdtemp(prefix="hubembed-bench-mixed-")
    corpus_root = args.corpus or os.path.join(work, "corpus")
    print(f"hubembed mixed-precision benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores "
          f"(load average {os.getloadavg()[0]:.1f} at start)")
    photos = photo_corpus(corpus_root, DEFAULT_SIZES.photos, (640, 480))
    captions_manifest, _ = caption_corpus(corpus_root, DEFAULT_SIZES.captions)
    manifests, inputs = {}, {}
    for modality, source, count in (("image", photos.manifest, args.photos), ("text", captions_manifest,
                                                                                args.captions)):
        with open(source, encoding="utf-8") as handle:
            rows = [json.loads(next(handle)) for _ in range(count)]
        for row in rows:  # the first `count` rows, in a manifest of their own elsewhere: image paths made absolute
            if "image" in row:
                row["image"] = os.path.join(os.path.dirname(source), row["image"])
        manifests[modality] = os.path.join(work, f"{modality}.jsonl")
        with open(manifests[modality], "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        inputs[modality] = os.path.join(work, f"{modality}-inputs.json")
        with open(inputs[modality], "w", encoding="utf-8") as handle:
            json.dump([row["image"] if modality == "image" else row["text"] for row in rows], handle)

    results: dict[tuple[str, str], dict] = {}
    for modality in MODELS:
        for precision in PRECISIONS:
            photos.warmed()
            vectors_file = os.path.join(work, f"{modality}-{precision}.npy")
            done = subprocess.run([sys.executable, __file__, "--model_alone", modality, precision, inputs[modality],
                                   vectors_file], capture_output=True, text=True, cwd=REPO, check=True)
            alone = json.loads(done.stdout.strip().splitlines()[-1])["rate"]
            flags = ["--text_encoder", "none"] if modality == "image" else ["--image_encoder", "none"]
            if precision == "mixed":
                flags.append("--mixed_precision")
            job = run_job(manifests[modality], os.path.join(work, f"job-{modality}-{precision}"), *flags)
            results[modality, precision] = {"alone": alone, "job": job.rate, "vectors": np.load(vectors_file)}
            log(f"  {modality} {precision}: model alone {alone:.1f}, job {job.rate:.1f} rows/s")

    print(f"\n{'rows/s':<44}{'MobileNet V1':>14}{'MiniLM':>12}")
    for precision in PRECISIONS:
        for what in ("alone", "job"):
            name = f"{'model alone' if what == 'alone' else 'the job'}, {precision}"
            print(f"  {name:<42}" + "".join(f"{results[m, precision][what]:>{w}.1f}"
                                             for m, w in zip(MODELS, (14, 12), strict=True)))
    print("  ratios, mixed / float32")
    for what in ("alone", "job"):
        name = "model alone" if what == "alone" else "the job"
        print(f"    {name:<40}" + "".join(f"{results[m, 'mixed'][what] / results[m, 'float32'][what]:>{w}.2f}"
                                         for m, w in zip(MODELS, (14, 12), strict=True)))
    print("  vectors, mixed against float32")
    for modality in MODELS:
        reference, other = results[modality, "float32"]["vectors"], results[modality, "mixed"]["vectors"]
        found = cosines(reference, other)
        print(f"    {modality}: cosine min {found.min():.4f}, 1st percentile {np.percentile(found, 1):.4f}, median "
              f"{np.median(found):.4f}; below 0.99: {(found < 0.99).mean():.1%}; nearest row the same: "
              f"{nearest_agreement(reference, other):.1%} of {len(found)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
