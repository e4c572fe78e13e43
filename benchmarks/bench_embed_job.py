"""How close the embedding job comes to the bare model loop on the same machine, in one run.

    python benchmarks/bench_embed_job.py [--size 512] [--batch_size 32]

Measures, on the sample corpus (JPEG files + texts) and the baked pretrained encoders:
  bare image loop   decode+resize (the job's own TF decoder) + MobileNet, batch by batch, no Beam
  bare text loop    MiniLM over the texts, batch by batch, no Beam
  job image-only    the whole Beam job on DirectRunner, --text_encoder none
  job text-only     the whole Beam job, --image_encoder none
  job both          the whole Beam job, both encoders, concatenated
and prints rows/s and the ratios job / bare. Whole-run time, model loading included for the job (it loads the
models on its workers), excluded for the bare loops: that ratio is a lower bound on the job's own efficiency.
Each job also runs on the first `--small` rows, which gives its fixed cost per run (start-up, model loading,
finalising the sinks) and its steady-state rate, (size - small) / (t_size - t_small): what a large nightly corpus
sees.
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
from transforms.image_decode import make_image_decoder  # noqa: E402


def bare_rate(encoder: LoadedEncoder, inputs: list, batch_size: int, prepare) -> float:
    started = time.perf_counter()
    for start in range(0, len(inputs), batch_size):
        encoder(prepare(inputs[start:start + batch_size]))
    return len(inputs) / (time.perf_counter() - started)


def job_seconds(manifest: str, work: str, name: str, batch_size: int, *flags: str) -> tuple[int, float]:
    report = run(["--input", manifest, "--output", os.path.join(work, name), "--batch_size", str(batch_size),
                  "--min_batch_size", str(batch_size), "--progress_interval", "1000", *flags])
    assert report.embedded == report.read, report
    return report.read, report.seconds


def job_rates(manifests: tuple[str, str], work: str, name: str, batch_size: int, *flags: str) -> dict[str, float]:
    """Whole-run rows/s on the full manifest, the fixed seconds per run, and the steady-state rows/s."""
    small_rows, small_seconds = job_seconds(manifests[0], work, name + "-small", batch_size, *flags)
    rows, seconds = job_seconds(manifests[1], work, name, batch_size, *flags)
    steady = (rows - small_rows) / max(seconds - small_seconds, 1e-9)
    return {"whole": rows / seconds, "fixed_seconds": max(seconds - rows / steady, 0.0), "steady": steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--small", type=int, default=128, help="rows of the small run that measures the fixed cost")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="hubembed-bench-")
    try:
        manifest = make_sample_corpus(os.path.join(work, "corpus"), args.size)
        rows = [json.loads(line) for line in open(manifest, encoding="utf-8")]
        small_manifest = os.path.join(work, "corpus", "small.jsonl")
        with open(small_manifest, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows[:args.small])
        manifests = (small_manifest, manifest)
        images = [open(os.path.join(work, "corpus", row["image"]), "rb").read() for row in rows]
        texts = [row["text"] for row in rows]
        image_spec = probe_encoder(EncoderSpec("image", pretrained.ensure_baked(pretrained.DEFAULT_IMAGE_ENCODER)))
        text_spec = probe_encoder(EncoderSpec("text", pretrained.ensure_baked(pretrained.DEFAULT_TEXT_ENCODER)))
        image_model, text_model = LoadedEncoder(image_spec, "/CPU:0"), LoadedEncoder(text_spec, "/CPU:0")
        decode = make_image_decoder(image_spec.image_size)
        image_model(np.zeros((2, 224, 224, 3), np.float32))  # trace once outside the timing, as the job's warm-up
        text_model(np.array(["warm up"], dtype=object))

        bare = {
            "image": bare_rate(image_model, images, args.batch_size,
                               lambda chunk: np.stack([decode(data).numpy() for data in chunk])),
            "text": bare_rate(text_model, texts, args.batch_size, lambda chunk: np.array(chunk, dtype=object)),
        }
        bare["both"] = 1.0 / (1.0 / bare["image"] + 1.0 / bare["text"])
        jobs = {
            "image": job_rates(manifests, work, "image", args.batch_size, "--text_encoder", "none"),
            "text": job_rates(manifests, work, "text", args.batch_size, "--image_encoder", "none"),
            "both": job_rates(manifests, work, "both", args.batch_size),
        }
        print(f"\n{args.size} rows (small run: {args.small}), batch {args.batch_size}, {os.cpu_count()} cores")
        print(f"  {'modality':<9}{'bare loop':>11}{'job whole run':>15}{'job fixed s':>13}{'job steady':>12}"
              f"{'whole/bare':>12}{'steady/bare':>13}")
        for name, job in jobs.items():
            print(f"  {name:<9}{bare[name]:>11.1f}{job['whole']:>15.1f}{job['fixed_seconds']:>13.1f}"
                  f"{job['steady']:>12.1f}{job['whole'] / bare[name]:>12.2f}{job['steady'] / bare[name]:>13.2f}")
        print("  (rows/s; bare 'both' = the image and text loops one after the other)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
