"""What a nightly run with --reuse costs against a full run, and what checkpointing costs, in one run.

    python benchmarks/bench_nightly.py [--size 2000]

The corpus: `--size` JPEG photos of 640×480 in files with captions (benchmarks/photo_corpus.py), the baked
pretrained encoders (MobileNet V1 + MiniLM), DirectRunner. Night 2 is night 1 with 5 % new records and 5 % changed
ones (half a new image, half a new caption). Each run is the whole command in a fresh process, timed from start to
exit, as cron or Airflow sees it:
  full, no checkpoint   night 2 embedded from scratch, --no_checkpoint
  full                  night 2 embedded from scratch (checkpointing on: the default)
  reuse                 night 2 with --reuse night 1
and prints the seconds and the ratios reuse / full and full / full-no-checkpoint. With `--repeats N` the two full
runs alternate N times and each keeps its fastest: checkpointing costs a few per cent, less than this machine's
noise from one run to the next.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.photo_corpus import caption, photo_jpeg, source_photos, write_photo_corpus  # noqa: E402
from schemas import layout  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def night_two(night_one: str, root: str, share_new: float = 0.05, share_changed: float = 0.05) -> str:
    """Night 1's manifest with `share_new` new records and `share_changed` changed ones, in `root`."""
    rows = [json.loads(line) for line in open(night_one, encoding="utf-8")]
    base = os.path.dirname(night_one)
    photos = source_photos()
    changed = int(len(rows) * share_changed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for index, row in enumerate(rows[:changed]):
        row["image"] = os.path.join(base, row["image"])
        if index % 2:
            row["text"] = caption(50_000 + index)
        else:
            path = os.path.join(root, "images", f"changed-{index}.jpg")
            with open(path, "wb") as handle:
                handle.write(photo_jpeg(photos, 50_000 + index))
            row["image"] = path
    for row in rows[changed:]:
        row["image"] = os.path.join(base, row["image"])
    new_manifest = write_photo_corpus(os.path.join(root, "new"), int(len(rows) * share_new), first_seed=len(rows))
    rows += [json.loads(line) | {"image": os.path.join(root, "new", json.loads(line)["image"])}
             for line in open(new_manifest, encoding="utf-8")]
    manifest = os.path.join(root, "manifest.jsonl")
    with open(manifest, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return manifest


def nightly_corpus(folder: str, size: int) -> tuple[str, str]:
    """The two nights' manifests under `folder`, built unless a whole earlier build of the same size is there."""
    done = os.path.join(folder, f"built-{size}")
    night_one, night_two_manifest = (os.path.join(folder, name, "manifest.jsonl") for name in ("night1", "night2"))
    if not os.path.exists(done):
        shutil.rmtree(folder, ignore_errors=True)
        night_one = write_photo_corpus(os.path.join(folder, "night1"), size)
        night_two_manifest = night_two(night_one, os.path.join(folder, "night2"))
        open(done, "w").close()
    return night_one, night_two_manifest


def timed_run(manifest: str, output: str, *flags: str) -> tuple[float, dict]:
    command = [sys.executable, "-m", "beam_jobs.embed_corpus", "--input", manifest, "--output", output,
               "--progress_interval", "1000", *flags]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    with open(os.path.join(output, layout.REPORT_NAME), encoding="utf-8") as handle:
        return seconds, json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each full variant (fastest kept)")
    parser.add_argument("--corpus", default=None,
                        help="keep the two nights' corpora here, built on the first call and taken as they are on "
                             "the next (--corpus_only builds them and stops: building 20,000 photos takes minutes)")
    parser.add_argument("--corpus_only", action="store_true")
    parser.add_argument("--reuse_only", action="store_true",
                        help="skip the full run without checkpoints: measure reuse / full only")
    args = parser.parse_args()
    corpus = args.corpus or tempfile.mkdtemp(prefix="hubembed-bench-corpus-")
    night_one, night_two_manifest = nightly_corpus(corpus, args.size)
    if args.corpus_only:
        return
    work = tempfile.mkdtemp(prefix="hubembed-bench-nightly-")
    try:
        root = os.path.join(work, "root")
        timed_run(night_one, os.path.join(root, "dt=1"))
        runs: dict[str, tuple[float, dict]] = {}
        for attempt in range(args.repeats):
            variants = [("full, no checkpoint", ["--no_checkpoint"]), ("full", [])][args.reuse_only:]
            for name, flags in variants:
                folder = name.replace(", ", "-").replace(" ", "-")
                measured = timed_run(night_two_manifest, os.path.join(work, f"{folder}-{attempt}"), *flags)
                if name not in runs or measured[0] < runs[name][0]:
                    runs[name] = measured
        runs["reuse"] = timed_run(night_two_manifest, os.path.join(root, "dt=2"), "--reuse", os.path.join(root, "dt=*"))
        print(f"\nnight 2: {runs['full'][1]['read']} records ({args.size} + 5 % new, 5 % changed), "
              f"{os.cpu_count()} cores")
        print(f"  {'run':<22}{'wall s':>9}{'pipeline s':>12}{'embedded fresh':>16}{'reused':>8}")
        for name, (seconds, report) in runs.items():
            print(f"  {name:<22}{seconds:>9.1f}{report['seconds']:>12.1f}{report['embedded_fresh']:>16}"
                  f"{report['reused']:>8}")
        full, reuse = runs["full"][0], runs["reuse"][0]
        print(f"  reuse / full (wall): {reuse / full:.3f}", end="")
        if "full, no checkpoint" in runs:
            print(f"   full / full without checkpoints: {full / runs['full, no checkpoint'][0]:.3f}", end="")
        print()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.corpus:
            shutil.rmtree(corpus, ignore_errors=True)


if __name__ == "__main__":
    main()
