"""Decoding off the critical path: JPEGs decoded at the DCT scale the encoder needs, batches decoded side by side,
batches weighed by image pixels and text length, and the three-stage EmbedBatch losing nothing."""

from __future__ import annotations

import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from benchmarks.photo_corpus import photo_jpeg, source_photos
from encoders.hub_module import EncoderSpec, probe_encoder
from encoders.runtime import tf
from schemas import embeddings as cols
from schemas.records import Record
from tests import corpus_builders as corpora
from transforms.embedding.decode_threads import DecodeThreads
from transforms.embedding.embed import (
    PIXELS_PER_SLOT,
    TEXT_CHARS_PER_SLOT,
    EmbedBatch,
    EmbedConfig,
    EmbedRecords,
    batch_slots,
)
from transforms.embedding.in_flight import InFlight
from transforms.embedding.rows import ARROW_POOL_VARIABLE
from transforms.image_decode import JPEG_SCALES, ImageDecodeError, ImageDecoder, decode_and_resize, jpeg_scale
from transforms.report import ProgressLog

SIZE = 224


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return source_photos()


def one_encoder_config(modality: str, handle: str) -> EmbedConfig:
    """The EmbedConfig of one encoder alone (probed), its vectors written concatenated, in float32."""
    spec = probe_encoder(EncoderSpec(modality, handle))
    image, text = (spec, None) if modality == "image" else (None, spec)
    schema = cols.embeddings_schema(image and image.dim, text and text.dim, (), {}, cols.VECTORS_CONCAT, "float32")
    return EmbedConfig(image=image, text=text, schema=schema)


def jpeg_of(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("width, height, scale", [(640, 480, 2), (2048, 1536, 4), (4000, 3000, 8), (300, 250, 1),
                                                  (447, 900, 2), (445, 900, 1)])
def test_the_dct_scale_keeps_the_short_side_at_least_the_input_size(width, height, scale):
    data = jpeg_of(width, height)
    chosen = JPEG_SCALES[int(jpeg_scale(tf.constant(data), SIZE))]
    assert chosen == scale
    assert min(tf.io.decode_jpeg(data, ratio=chosen).shape[:2]) >= SIZE  # as libjpeg rounds the scaled sides
    if scale < JPEG_SCALES[-1]:
        assert min(tf.io.decode_jpeg(data, ratio=scale * 2).shape[:2]) < SIZE  # the next scale would be too small


@pytest.mark.parametrize("size", [(640, 480), (2048, 1536)])
def test_a_jpeg_decoded_at_its_dct_scale_is_close_to_the_full_resolution_decode(photos, size):
    data = photo_jpeg(photos, seed=7, size=size)
    full = tf.io.decode_jpeg(data, channels=3)
    reference = tf.image.resize(full, [SIZE, SIZE], method="bilinear", antialias=True).numpy() / 255.0
    scaled = decode_and_resize(tf.constant(data), SIZE).numpy()
    difference = np.abs(scaled - reference)
    # libjpeg's scaled IDCT is a box filter of the 8x8 block: a few levels of 255 apart, never a different picture.
    assert difference.mean() < 0.01 and np.percentile(difference, 99) < 0.06, (difference.mean(), difference.max())


def test_a_batch_decodes_as_each_image_alone_and_names_the_broken_ones(photos):
    good = photo_jpeg(photos, seed=1)
    whole = photo_jpeg(photos, seed=2)
    end = whole.rindex(b"\xff\xd9")
    truncated = whole[: len(whole) // 2] + whole[end:]  # closed with an end marker: decodes, with grey rows
    images = [good, corpora.image_bytes(3, size=(300, 200)), b"\xff\xd8\xff\xe0 not a jpeg at all", truncated,
              corpora.image_bytes(4, fmt="JPEG")]
    decoder = ImageDecoder(SIZE)
    pixels, errors = decoder.decode_batch(images)
    assert [error is not None for error in errors] == [False, False, True, True, False]
    assert all(isinstance(error, ImageDecodeError) for error in errors if error is not None)
    for index in (0, 1, 4):
        np.testing.assert_allclose(pixels[index], decoder(images[index]), atol=1e-6)
    # Without the broken ones the batch is one graph call; its pixels are the same.
    together, none = decoder.decode_batch([images[0], images[1], images[4]])
    assert none == [None, None, None]
    np.testing.assert_allclose(together, tf.gather(pixels, [0, 1, 4]), atol=1e-6)


def test_large_images_and_long_texts_take_more_slots():
    assert batch_slots(Record(id="a", source="s", text="a caption", image_pixels=640 * 480)) == 1
    assert batch_slots(Record(id="b", source="s", image_pixels=2048 * 1536)) == 1
    assert batch_slots(Record(id="c", source="s", image_pixels=3 * PIXELS_PER_SLOT)) == 3
    assert batch_slots(Record(id="d", source="s", image_pixels=3 * PIXELS_PER_SLOT + 1)) == 4
    assert batch_slots(Record(id="e", source="s", text="x" * (2 * TEXT_CHARS_PER_SLOT + 1))) == 3


def test_long_texts_make_smaller_batches_and_every_record_comes_out(fixture_encoders):
    """A real pipeline: 12 short texts and 6 of 3 slots each, batches of 8 slots; each output table is one model
    batch, so its rows say how the records were batched."""
    config = one_encoder_config("text", fixture_encoders["text"])
    short = [Record(id=f"short-{i}", source="s", text=f"caption {i}") for i in range(12)]
    long = [Record(id=f"long-{i}", source="s", text="word " * (TEXT_CHARS_PER_SLOT // 2)) for i in range(6)]
    with beam.Pipeline("DirectRunner") as pipeline:
        tables, dead = (pipeline
                        | beam.Create(short + long, reshuffle=False)
                        | EmbedRecords(config, ProgressLog(1000), min_batch_size=8, max_batch_size=8))
        ids = tables | "Ids" >> beam.FlatMap(lambda table: table.column(cols.ID).to_pylist())
        assert_that(ids, equal_to([record.id for record in short + long]), label="every record embedded")
        assert_that(dead, equal_to([]), label="no dead letters")
        batches = tables | "Rows" >> beam.Map(lambda table: (
            table.num_rows, all(name.startswith("long") for name in table.column(cols.ID).to_pylist())))

        def check(sizes: list[tuple[int, bool]]) -> None:
            assert max(rows for rows, _ in sizes) == 8  # short texts fill the batch
            long_batches = [rows for rows, all_long in sizes if all_long]
            assert long_batches and max(long_batches) <= 2  # 3 slots each: two fit in 8 slots, never three

        assert_that(batches, check, label="batch sizes")


def test_a_batch_whose_images_all_break_is_dead_lettered_and_the_run_goes_on(fixture_encoders, photos):
    """Batches of 4: one where some images break and one where every image breaks. The broken ones are dead-lettered
    alone (image_corrupt), the others embedded."""
    config = one_encoder_config("image", fixture_encoders["image"])
    broken = b"\xff\xd8\xff\xe0 not a jpeg at all"
    images = [photo_jpeg(photos, seed=1), broken, photo_jpeg(photos, seed=2), broken, broken, broken, broken, broken]
    records = [Record(id=f"r{index}", source="s", image_bytes=data) for index, data in enumerate(images)]
    with beam.Pipeline("DirectRunner") as pipeline:
        tables, dead = (pipeline
                        | beam.Create(records, reshuffle=False)
                        | EmbedRecords(config, ProgressLog(1000), min_batch_size=4, max_batch_size=4))
        ids = tables | "Ids" >> beam.FlatMap(lambda table: table.column(cols.ID).to_pylist())
        assert_that(ids, equal_to(["r0", "r2"]), label="the decodable images embedded")
        assert_that(dead | beam.Map(lambda letter: (letter.id, letter.reason)),
                    equal_to([(f"r{index}", "image_corrupt") for index in (1, 3, 4, 5, 6, 7)]), label="dead letters")


@pytest.mark.parametrize("asked, in_force", [(None, "jemalloc"), ("system", "system")])
def test_the_embedding_workers_take_arrow_memory_from_jemalloc_unless_told_otherwise(
        fixture_encoders, arrow_pool, monkeypatch, asked, in_force):
    """A real pipeline in this process: the embedding DoFn's setup makes jemalloc Arrow's pool, where mimalloc took
    huge pages whose first touch cost 0.3-0.5 s a process here; a pool named in ARROW_DEFAULT_MEMORY_POOL stays."""
    if asked:
        monkeypatch.setenv(ARROW_POOL_VARIABLE, asked)
    else:
        monkeypatch.delenv(ARROW_POOL_VARIABLE, raising=False)
    pa.set_memory_pool(pa.mimalloc_memory_pool() if not asked else pa.system_memory_pool())
    config = one_encoder_config("text", fixture_encoders["text"])
    with beam.Pipeline("DirectRunner") as pipeline:
        tables, _ = (pipeline
                     | beam.Create([Record(id=f"r-{i}", source="s", text=f"caption {i}") for i in range(4)])
                     | EmbedRecords(config, ProgressLog(1000)))
        assert_that(tables | beam.Map(lambda table: table.num_rows) | beam.CombineGlobally(sum), equal_to([4]))
    assert pa.default_memory_pool().backend_name == in_force


def decoding_threads(threads: DecodeThreads, model_thread: ThreadPoolExecutor, decode_seconds: float,
                     model_seconds: float, batches: int) -> list[str]:
    """Batches through `threads` as EmbedBatch sends them (each decode submitted, then the model's work on the model
    thread, which waits for it and reports its time; at most IN_FLIGHT_BATCHES handed over): the name of the thread
    that decoded each batch."""
    def decode() -> str:
        time.sleep(decode_seconds)
        return threading.current_thread().name

    def model(decoded) -> str:
        name = decoded.result()
        start = time.perf_counter()
        time.sleep(model_seconds)
        threads.model_ran(time.perf_counter() - start)
        return name

    in_flight = InFlight(EmbedBatch.IN_FLIGHT_BATCHES)
    names = []
    for _ in range(batches):
        names += in_flight.add(model_thread.submit(model, threads.submit(decode)))
    return names + list(in_flight.drain())


@pytest.mark.parametrize("decode_seconds, model_seconds, on_gpu, model_thread_first", [
    (0.02, 0.001, False, DecodeThreads.BATCHES_MEASURED + 1),  # a cheap model on the CPU: moves once measured
    (0.002, 0.02, False, None),  # the model the larger part: the model thread keeps decoding
    (0.002, 0.02, True, 0)])  # a GPU: threads of their own from the start
def test_decoding_has_threads_of_its_own_on_a_gpu_or_when_the_model_costs_less_than_the_decode(
        decode_seconds, model_seconds, on_gpu, model_thread_first):
    """The first batches measured on the model thread are decoded there; once decoding moves (in the batches that
    follow, as the runner's thread hands them over), it stays on the decode threads."""
    model_thread = ThreadPoolExecutor(1, thread_name_prefix="hubembed-embed")
    threads = DecodeThreads(model_thread, on_gpu=on_gpu)
    try:
        names = decoding_threads(threads, model_thread, decode_seconds, model_seconds, batches=12)
    finally:
        threads.shutdown()
        model_thread.shutdown()
    on_model_thread = [name.startswith("hubembed-embed") for name in names]
    assert all(name.startswith(("hubembed-embed", "hubembed-decode")) for name in names)
    if model_thread_first is None:
        assert all(on_model_thread)
        return
    moved = on_model_thread.index(False)
    assert model_thread_first <= moved <= model_thread_first + EmbedBatch.IN_FLIGHT_BATCHES
    assert not any(on_model_thread[moved:])


def test_batches_decoded_two_at_a_time_keep_every_record_with_its_own_image(fixture_encoders, photos, caplog):
    """A real pipeline, batches of 4: the fixture model costs less than the decode, so after the first batches two
    batches decode at once on threads of their own. Each photo, sent many times, gets the same vector wherever its
    batch was decoded; the broken images are dead-lettered alone."""
    config = one_encoder_config("image", fixture_encoders["image"])
    images = [photo_jpeg(photos, seed=seed) for seed in range(4)]
    broken = b"\xff\xd8\xff\xe0 not a jpeg at all"
    records = [Record(id=f"r{index:02d}-{'broken' if index % 7 == 3 else index % 4}", source="s",
                      image_bytes=broken if index % 7 == 3 else images[index % 4]) for index in range(48)]
    with caplog.at_level(logging.DEBUG, logger="hubembed"), beam.Pipeline("DirectRunner") as pipeline:
        tables, dead = (pipeline
                        | beam.Create(records, reshuffle=False)
                        | EmbedRecords(config, ProgressLog(1000), min_batch_size=4, max_batch_size=4))
        rows = tables | "Rows" >> beam.FlatMap(lambda table: zip(
            table.column(cols.ID).to_pylist(), table.column(cols.EMBEDDING).to_pylist(), strict=True))

        def check(embedded: list[tuple[str, list[float]]]) -> None:
            assert sorted(record_id for record_id, _ in embedded) == sorted(
                record.id for record in records if "broken" not in record.id)
            by_photo: dict[str, list[np.ndarray]] = {}
            for record_id, vector in embedded:
                by_photo.setdefault(record_id.split("-")[1], []).append(np.array(vector))
            assert len(by_photo) == 4
            for vectors in by_photo.values():
                np.testing.assert_allclose(np.stack(vectors), np.broadcast_to(vectors[0], (len(vectors),
                                                                                         len(vectors[0]))), atol=1e-6)
            firsts = [vectors[0] for vectors in by_photo.values()]
            assert min(np.abs(a - b).max() for index, a in enumerate(firsts) for b in firsts[index + 1:]) > 1e-3

        assert_that(rows, check, label="each photo's vector")
        assert_that(dead | beam.Map(lambda letter: (letter.id, letter.reason)),
                    equal_to([(record.id, "image_corrupt") for record in records if "broken" in record.id]),
                    label="dead letters")
    assert any("decoding on threads of its own" in message for message in caplog.messages)
