"""How close the embedding job comes to the bare model loop on the same machine, in one run.

    python benchmarks/bench_embed_job.py [--size 512] [--batch_size 32]

Measures, on the sample corpus (JPEG files + texts) and the baked pretrained encoders:
  bare image loop   decode+resize (the job's own TF decoder) + MobileNet, batch by batch, no Beam
  bare text loop    MiniLM over the texts, batch by batch, no Beam
  job image-only    the whole Beam job on DirectRunner, --text_encoder none
  job text-only     the whole Beam job, --image_encoder none
  job both          the whole Beam job, both encoders, concatenated
and prints rows/s and the ratios job / bare. Whole-process time, model loading included for the job (it loads the
models on its workers), excluded for the bare loops: the ratio is a lower bound on the job's own efficiency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from beam_jobs.embed_corpus import run  # noqa: E402
from encoders import pretrained  # noqa: E402
from encoders.hub_module import EncoderSpec, LoadedEncoder, probe_encoder  # noqa: E402
from scripts.make_sample_corpus import make_sample_corpus  # noqa: E402
from transforms.embed import make_image_decoder  # noqa: E402


def bare_rate(encoder: LoadedEncoder, inputs: list, batch_size: int, prepare) -> float:
    started = time.perf_counter()
    for start in range(0, len(inputs), batch_size):
        encoder(prepare(inputs[start:start + batch_size]))
    return len(inputs) / (time.perf_counter() - started)


def job_rate(manifest: str, work: str, name: str, batch_size: int, *flags: str) -> float:
    report = run(["--input", manifest, "--output", os.path.join(work, name), "--batch_size", str(batch_size),
                  "--min_batch_size", str(batch_size), "--progress_interval", "1000", *flags])
    assert report.embedded == report.read, report
    return report.rows_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="hubembed-bench-")
    try:
        manifest = make_sample_corpus(os.path.join(work, "corpus"), args.size)
        rows = [json.loads(line) for line in open(manifest, encoding="utf-8")]
        images = [open(os.path.join(work, "corpus", row["image"]), "rb").read() for row in rows]
        texts = [row["text"] for row in rows]
        image_spec = probe_encoder(EncoderSpec("image", pretrained.ensure_baked(pretrained.DEFAULT_IMAGE_ENCODER)))
        text_spec = probe_encoder(EncoderSpec("text", pretrained.ensure_baked(pretrained.DEFAULT_TEXT_ENCODER)))
        image_model, text_model = LoadedEncoder(image_spec, "/CPU:0"), LoadedEncoder(text_spec, "/CPU:0")
        decode = make_image_decoder(image_spec.image_size)
        image_model(np.zeros((2, 224, 224, 3), np.float32))  # trace once outside the timing, as the job's warm-up
        text_model(np.array(["warm up"], dtype=object))

        figures = {
            "bare image loop": bare_rate(image_model, images, args.batch_size,
                                         lambda chunk: np.stack([decode(data).numpy() for data in chunk])),
            "bare text loop": bare_rate(text_model, texts, args.batch_size,
                                        lambda chunk: np.array(chunk, dtype=object)),
            "job image-only": job_rate(manifest, work, "image", args.batch_size, "--text_encoder", "none"),
            "job text-only": job_rate(manifest, work, "text", args.batch_size, "--image_encoder", "none"),
            "job both": job_rate(manifest, work, "both", args.batch_size),
        }
        bare_both = 1.0 / (1.0 / figures["bare image loop"] + 1.0 / figures["bare text loop"])
        print(f"\n{args.size} rows, batch {args.batch_size}, {os.cpu_count()} cores")
        for name, rate in figures.items():
            print(f"  {name:<16} {rate:8.1f} rows/s")
        print(f"  job image-only / bare image loop: {figures['job image-only'] / figures['bare image loop']:.2f}")
        print(f"  job text-only  / bare text loop:  {figures['job text-only'] / figures['bare text loop']:.2f}")
        print(f"  job both       / bare both loops: {figures['job both'] / bare_both:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
