"""How far the job's fast JPEG decode moves the vectors, against decoding every photo at full resolution.

    python benchmarks/bench_decode_fidelity.py [--count 200]

The job decodes a JPEG at the DCT scale that keeps its short side ≥ the encoder's input (libjpeg's 1/2, 1/4, 1/8)
and shrinks it by area averaging. Compared here, on real photographs (scikit-image's sample photos as they ship,
and `--count` JPEG crops of them at 640×480 and 2048×1536 from benchmarks/photo_corpus.py), through the baked
MobileNet V1 feature vector and its ImageNet classifier:
  full + antialias     the whole JPEG decoded, resized bilinear with antialiasing (the reference)
  job: DCT + area      what the job does
  full, no antialias   the job's decode before this change (bilinear, no antialias), for scale
  DCT + bilinear antialias   the same scale, the costlier filter
and prints the cosine of each one's feature vectors to the reference's (min, median) and how often the top-1
ImageNet class agrees.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.photo_corpus import photo_jpeg, source_photos  # noqa: E402
from encoders import pretrained  # noqa: E402
from encoders.hub_module import EncoderSpec, LoadedEncoder, probe_encoder  # noqa: E402
from encoders.runtime import tf  # noqa: E402
from transforms.image_decode import decode_and_resize  # noqa: E402


def full_resolution(data: bytes, size: int, antialias: bool) -> np.ndarray:
    image = tf.io.decode_jpeg(data, channels=3)
    return (tf.image.resize(image, [size, size], method="bilinear", antialias=antialias) / 255.0).numpy()


def dct_antialiased(data: bytes, size: int) -> np.ndarray:
    shape = tf.io.extract_jpeg_shape(data).numpy()
    scale = max(scale for scale in (1, 2, 4, 8) if -(-min(shape[:2]) // scale) >= size)
    image = tf.io.decode_jpeg(data, channels=3, ratio=scale)
    return (tf.image.resize(image, [size, size], method="bilinear", antialias=True) / 255.0).numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="crops of each size")
    args = parser.parse_args()
    photos = source_photos()
    sets: dict[str, list[bytes]] = {}
    native = []
    for photo in photos:
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, format="JPEG", quality=92)
        native.append(buffer.getvalue())
    sets[f"scikit-image photos as shipped ({len(native)})"] = native
    for width, height in ((640, 480), (2048, 1536)):
        sets[f"{args.count} crops of {width}x{height}"] = [photo_jpeg(photos, seed, (width, height))
                                                          for seed in range(args.count)]
    features, classifier = (LoadedEncoder(probe_encoder(EncoderSpec("image", pretrained.ensure_baked(name))), "/CPU:0")
                            for name in (pretrained.MOBILENET_FEATURES, pretrained.MOBILENET_CLASSIFICATION))
    size = features.spec.image_size
    print(f"{'photos':<40}{'decode':<26}{'cosine min':>11}{'median':>9}{'top-1 same':>12}")
    for name, images in sets.items():
        variants = {
            "full + antialias": np.stack([full_resolution(data, size, True) for data in images]),
            "job: DCT + area": np.stack([decode_and_resize(tf.constant(data), size).numpy() for data in images]),
            "full, no antialias": np.stack([full_resolution(data, size, False) for data in images]),
            "DCT + bilinear antialias": np.stack([dct_antialiased(data, size) for data in images]),
        }
        vectors = {key: features(pixels) for key, pixels in variants.items()}
        classes = {key: np.argmax(classifier(pixels), axis=1) for key, pixels in variants.items()}
        for key in list(variants)[1:]:
            similarity = cosines(vectors[key], vectors["full + antialias"])
            agree = np.mean(classes[key] == classes["full + antialias"])
            print(f"{name:<40}{key:<26}{similarity.min():>11.4f}{np.median(similarity):>9.4f}{agree:>12.1%}")


if __name__ == "__main__":
    main()
