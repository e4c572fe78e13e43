"""The classifier stage at corpus scale: peak memory and wall time of train_classifier against its number of rows.

    python benchmarks/bench_training.py [--rows 50000 1000000] [--base_photos 2000] [--work DIR]
    python benchmarks/bench_training.py --fine_tune_photos 1000 5000 [--work DIR]

Real embeddings first: the embedding job (baked MobileNet V1 + MiniLM, 1,408-d) over `--base_photos` labelled
photos with captions (benchmarks/photo_corpus.py). Then, for each size, that many synthetic rows built from them:
each real row repeated under new ids with a little Gaussian noise on its vector, written as the embedding job
writes (its schema and metadata, 50,000 rows a file). `python -m beam_jobs.train_classifier --features both` runs
on each as a user runs it; the figures are its peak RSS (the largest of its processes) and its wall time.

--fine_tune_photos: `train_classifier --fine_tune --features image` (the baked MobileNet V1 made trainable) on that
many 640x480 photos from files instead, the same figures: the images must stream, never be held all at once.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import platform
import shutil
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.measure import run_measured  # noqa: E402
from benchmarks.photo_corpus import write_photo_corpus  # noqa: E402
from schemas import embeddings as cols  # noqa: E402
from schemas import layout  # noqa: E402

ROWS_PER_FILE = 50_000
NOISE = 0.02  # relative to each dimension's spread: the rows stay their label's, and no two are equal
MEMORY_GROWTH = 0.25  # issue 10: peak memory within +25 % from the smallest size to the largest


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def real_embeddings(work: str, photos: int) -> pa.Table:
    """The embedding job's output over `photos` labelled photos, as one Table (with its schema's metadata)."""
    output = os.path.join(work, f"base-{photos}")
    if not glob.glob(os.path.join(output, layout.SUCCESS_NAME)):
        manifest = write_photo_corpus(os.path.join(work, f"photos-{photos}"), photos)
        run_measured([sys.executable, "-m", "beam_jobs.embed_corpus", "--input", manifest, "--output", output,
                      "--overwrite"], output + ".log")
    files = sorted(glob.glob(os.path.join(output, f"{layout.EMBEDDINGS_PREFIX}*.parquet")))
    return pa.concat_tables([pq.read_table(path) for path in files])


def synthetic_rows(base: pa.Table, rows: int, folder: str, seed: int = 0) -> None:
    """`rows` rows from `base`'s, ROWS_PER_FILE a file: row i is base row i mod n under a new id, its vector
    moved by NOISE × the dimension's spread."""
    rng = np.random.default_rng(seed)
    dim = base.schema.field(cols.EMBEDDING).type.list_size
    vectors = base.column(cols.EMBEDDING).combine_chunks().flatten().to_numpy().reshape(-1, dim)
    spread = vectors.std(axis=0) * NOISE
    os.makedirs(folder)
    for start in range(0, rows, ROWS_PER_FILE):
        count = min(ROWS_PER_FILE, rows - start)
        picked = np.arange(start, start + count) % base.num_rows
        table = base.take(pa.array(picked))
        ids = [f"{row_id}~{start + index}" for index, row_id in enumerate(table.column(cols.ID).to_pylist())]
        moved = (vectors[picked] + rng.standard_normal((count, dim), np.float32) * spread).astype(np.float32)
        table = table.set_column(table.schema.get_field_index(cols.ID), cols.ID, pa.array(ids, pa.string()))
        table = table.set_column(table.schema.get_field_index(cols.EMBEDDING), base.schema.field(cols.EMBEDDING),
                                 pa.FixedSizeListArray.from_arrays(pa.array(moved.reshape(-1)), dim))
        pq.write_table(table.replace_schema_metadata(base.schema.metadata),
                       os.path.join(folder, f"{layout.EMBEDDINGS_PREFIX}-{start // ROWS_PER_FILE:05d}.parquet"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 1_000_000], help="row counts to train on")
    parser.add_argument("--base_photos", type=int, default=2000, help="photos embedded for the real rows")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--work", default=None, help="keep the embeddings and synthetic rows here between runs")
    parser.add_argument("--fine_tune_photos", type=int, nargs="+", default=None,
                        help="fine-tune on these numbers of photos instead of training on embeddings")
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="hubembed-bench-training-")
    os.makedirs(work, exist_ok=True)
    fine_tuning = args.fine_tune_photos is not None
    flags = ["--features", "image", "--fine_tune"] if fine_tuning else ["--features", "both"]
    print(f"hubembed training benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; train_classifier {' '.join(flags)} --epochs {args.epochs} --batch_size "
          f"{args.batch_size}" + ("" if fine_tuning else f"; rows from {args.base_photos} embedded photos"),
          flush=True)
    if not fine_tuning:
        base = real_embeddings(work, args.base_photos)
        log(f"real embeddings: {base.num_rows} rows")
    results = []
    try:
        for rows in args.fine_tune_photos or args.rows:
            if fine_tuning:
                folder = os.path.join(work, f"photos-{rows}")
                if not os.path.exists(os.path.join(folder, "manifest.jsonl")):
                    write_photo_corpus(folder, rows)
                source = os.path.join(folder, "manifest.jsonl")
            else:
                source = os.path.join(work, f"rows-{rows}")
                if not os.path.isdir(source):
                    synthetic_rows(base, rows, source)
            output = os.path.join(work, f"classifier-{'fine-tuned-' if fine_tuning else ''}{rows}")
            shutil.rmtree(output, ignore_errors=True)
            measured = run_measured([sys.executable, "-m", "beam_jobs.train_classifier", "--input", source,
                                     "--output", output, *flags, "--epochs", str(args.epochs),
                                     "--batch_size", str(args.batch_size)], output + ".log")
            accuracy = next((line.split()[1] for line in measured.console.splitlines()
                             if line.startswith("  accuracy ")), "?")  # the console's test-split table
            log(f"  {rows:,} rows: peak RSS {measured.peak_rss_mb:.0f} MB, wall {measured.wall:.1f} s, "
                f"test accuracy {accuracy}")
            results.append((rows, measured))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n  {'rows':>10}{'peak RSS MB':>14}{'wall s':>10}{'s / 100k rows':>16}")
    for rows, measured in results:
        print(f"  {rows:>10,}{measured.peak_rss_mb:>14.0f}{measured.wall:>10.1f}{measured.wall / rows * 1e5:>16.1f}")
    (small, first), (large, last) = results[0], results[-1]
    growth = last.peak_rss_mb / first.peak_rss_mb - 1
    verdict = "met" if growth <= MEMORY_GROWTH else "MISSED"
    print(f"  peak RSS {large:,} / {small:,} rows: {1 + growth:.2f} (target <= {1 + MEMORY_GROWTH:.2f}) {verdict}")
    print(f"  wall per row, {large:,} / {small:,} rows: {(last.wall / large) / (first.wall / small):.2f} "
          "(1.00 is linear)")


if __name__ == "__main__":
    main()
