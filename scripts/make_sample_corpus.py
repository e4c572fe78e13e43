"""A small, deterministic image+text corpus whose label is learnable from each modality, and more so from both.

    python scripts/make_sample_corpus.py --output sample_corpus --size 300

Three leaf conditions (healthy, rust, mildew). The image carries the class (rust: orange-brown spots; mildew:
pale powdery patches; healthy: none), but for a share of the images the marks are faint. The text carries the
class only for a share of the rows; the rest are generic. Where the image is faint the text is more often
telling, so neither modality alone is enough for every row, while both together are.
Writes `images/<id>.jpg` and `manifest.jsonl` (id, image, text, label).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image, ImageDraw

LABELS = ("healthy", "rust", "mildew")
TELLING_TEXTS = {
    "healthy": ["a vigorous leaf, uniformly green and glossy", "clean foliage with no lesions at all",
                "the plant looks healthy and the leaves are intact"],
    "rust": ["orange pustules on the underside of the leaf", "rust coloured spots spreading along the veins",
             "small brown-orange lesions dot the blade"],
    "mildew": ["a white powdery film coats the upper surface", "grey-white fungal growth like flour on the leaf",
               "powdery mildew patches on young leaves"],
}
GENERIC_TEXTS = ["photo taken in the greenhouse this morning", "leaf sample from row twelve",
                 "picture from the field survey", "another specimen for the record", "sample collected near the gate"]
MARK_COLOURS = {"rust": (190, 95, 30), "mildew": (235, 235, 225)}
# How much of a mark's colour a faint mark takes (the rest is the leaf's). At 0.25 even the tiny test encoder saw
# most faint marks: the image alone reached 0.94 and both modalities beat it by 0 to 0.024 by seed. At 0.1 the image
# alone reaches 0.86 and both 0.92, 0.054 to 0.060 apart on each seed (docs/downstream.md).
FAINT_BLEND = 0.1


def _leaf_image(label: str, faint: bool, rng: np.random.RandomState, size: int = 96) -> Image.Image:
    base = np.array([40 + rng.randint(30), 110 + rng.randint(50), 40 + rng.randint(30)], dtype=np.float32)
    pixels = base + rng.normal(0, 12, size=(size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if label in MARK_COLOURS:
        draw = ImageDraw.Draw(image)
        colour = np.array(MARK_COLOURS[label], dtype=np.float32)
        blend = FAINT_BLEND if faint else 0.9
        spots = 3 if faint else 5 + rng.randint(6)
        for _ in range(spots):
            x, y = rng.randint(0, size, 2)
            r = (3 + rng.randint(5)) * (2 if label == "mildew" else 1)
            fill = tuple(int(v) for v in (blend * colour + (1 - blend) * base))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    return image


def make_sample_corpus(output: str, size: int = 300, seed: int = 0) -> str:
    """Write the corpus under `output` and return the manifest's path."""
    rng = np.random.RandomState(seed)
    os.makedirs(os.path.join(output, "images"), exist_ok=True)
    rows = []
    for index in range(size):
        label = LABELS[index % len(LABELS)]
        faint = rng.rand() < 0.4
        telling = rng.rand() < (0.75 if faint else 0.4)
        text_pool = TELLING_TEXTS[label] if telling else GENERIC_TEXTS
        text = text_pool[rng.randint(len(text_pool))]
        row_id = f"leaf-{index:05d}"
        _leaf_image(label, faint, rng).save(os.path.join(output, "images", f"{row_id}.jpg"), quality=90)
        rows.append({"id": row_id, "image": f"images/{row_id}.jpg", "text": text, "label": label})
    manifest = os.path.join(output, "manifest.jsonl")
    with open(manifest, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="sample_corpus")
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_sample_corpus(args.output, args.size, args.seed))


if __name__ == "__main__":
    main()
