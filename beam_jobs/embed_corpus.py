"""The embedding job: an image/text corpus → multimodal TF Hub embeddings in Parquet.

    python -m beam_jobs.embed_corpus --input corpus/manifest.jsonl --output out/embeddings/ [--runner ...]

read → prepare (unchanged records matched to their rows in --reuse outputs and a killed run's checkpoints, whose
vectors are copied) → embed the rest (both modalities, concatenated) → write, plus the dead letters and the run
report; the run is published atomically (beam_jobs.output_folder). Everything a user can get wrong is checked
before the pipeline starts (`plan_job`), and fails in one line.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from importlib import metadata as package_metadata

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_jobs import flags, output_folder
from beam_jobs.cli import exit_process
from beam_jobs.flags import NO_ENCODER
from beam_jobs.launch import LOCAL_RUNNERS, REMOTE_RUNNERS, JobConfigError, finish_run, job_main, single_worker
from encoders import resolve as encoder_resolve
from encoders.hub_module import EncoderConfigError, EncoderSpec
from encoders.preprocessing import image_preprocessing
from encoders.resolve import EncoderChoice
from encoders.runtime import mixed_precision_type, tf
from schemas import embeddings as cols
from schemas import layout
from schemas.report import EmbedRunReport
from transforms.embedding.checkpoint import CheckpointBatches, checkpoint_files
from transforms.embedding.embed import EmbedConfig, EmbedRecords
from transforms.embedding.prepare import PrepareRecords
from transforms.embedding.read import CorpusConfigError, ReadCorpus, infer_format, match_patterns
from transforms.embedding.reuse import (
    ORIGIN_CHECKPOINT,
    CopyStoredVectors,
    ReuseConfigError,
    StoredFile,
    accepted_reuse_keys,
    find_reusable_files,
    preference_order,
    reuse_key,
    usable_checkpoints,
)
from transforms.embedding.write import WriteDeadLetters, WriteEmbeddings
from transforms.report import ProgressLog

JOB_NAME = "embed_corpus"

log = logging.getLogger("hubembed")


class EmbedCorpusOptions(PipelineOptions):
    """The embedding job's options; every other flag goes to Beam (runner, project, region, workers...)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        flags.add_embed_flags(parser)


@dataclasses.dataclass
class JobPlan:
    """What start-up checking decided: resolved format, probed encoders and the output schema."""

    input_format: str
    image: EncoderSpec | None
    text: EncoderSpec | None
    passthrough: tuple[str, ...]
    schema_metadata: dict[str, str]
    embed_config: EmbedConfig
    folder: output_folder.RunFolder
    stored_files: list[StoredFile]  # the outputs and checkpoints vectors may be copied from, in preference order


def _package_version() -> str:
    try:
        return package_metadata.version("hubembed")
    except package_metadata.PackageNotFoundError:
        return "0+unknown"


def resolve_encoder(choice: EncoderChoice) -> EncoderSpec | None:
    """An encoder's flags → a probed EncoderSpec (encoders.resolve), or None for `none` (no encoder)."""
    if choice.handle.strip().lower() == NO_ENCODER:
        return None
    try:
        return encoder_resolve.resolve_encoder(choice)
    except EncoderConfigError as error:
        raise JobConfigError(str(error)) from error


def encoder_choices(job) -> tuple[EncoderChoice, EncoderChoice]:
    """(image, text): what a job's encoder flags say (the handles, add_image_input_flags', and the signature and
    output-key flags of the jobs that have them)."""
    def called(modality: str) -> dict:
        return {"signature": getattr(job, f"{modality}_signature", None),
                "output_key": getattr(job, f"{modality}_output_key", None)}

    image = EncoderChoice("image", job.image_encoder, image_size=job.image_size, weights=job.image_encoder_weights,
                          input_convention=job.image_input_convention, resize=job.image_resize,
                          cache_dir=job.encoder_cache_dir, **called("image"))
    return image, EncoderChoice("text", job.text_encoder, cache_dir=job.encoder_cache_dir, **called("text"))


def plan_job(job: EmbedCorpusOptions, runner: str | None) -> JobPlan:
    """Check everything a user can get wrong, before any worker starts. Raises JobConfigError (one line)."""
    if not job.input:
        raise JobConfigError("--input is required")
    if not job.output:
        raise JobConfigError("--output is required")
    for flag, value, least in (("--batch_size", job.batch_size, 1), ("--min_batch_size", job.min_batch_size, 1),
                               ("--num_shards", job.num_shards, 0), ("--max_image_pixels", job.max_image_pixels, 1),
                               ("--max_image_bytes", job.max_image_bytes, 1),
                               ("--max_text_chars", job.max_text_chars, 1), ("--image_size", job.image_size, 1)):
        if value is not None and value < least:
            raise JobConfigError(f"{flag} must be at least {least}, not {value}")
    if not 0.0 <= job.max_error_rate <= 1.0:
        raise JobConfigError("--max_error_rate must be between 0 and 1")
    if not job.progress_interval >= 0:  # 0 logs every batch
        raise JobConfigError("--progress_interval must be a number of seconds, at least 0")
    try:
        input_format = infer_format(job.input) if job.input_format == "auto" else job.input_format
        match_patterns(job.input, input_format)
    except CorpusConfigError as error:
        raise JobConfigError(str(error)) from error
    image_choice, text_choice = encoder_choices(job)
    image, text = resolve_encoder(image_choice), resolve_encoder(text_choice)
    if image is None and text is None:
        raise JobConfigError(f"both encoders are '{NO_ENCODER}': there is nothing to embed")
    if runner in REMOTE_RUNNERS:
        for spec in (image, text):
            if spec is not None and "://" not in spec.handle:
                raise JobConfigError(f"{spec.modality} encoder {spec.handle} is a local folder that {runner} workers "
                                     "cannot read: copy it to gs:// (or pass a tfhub.dev / Kaggle handle)")
    if job.device == "gpu" and runner in LOCAL_RUNNERS and not tf.config.list_physical_devices("GPU"):
        raise JobConfigError("--device=gpu but TensorFlow sees no GPU on this machine (use --device=auto or cpu)")
    if job.mixed_precision and runner in LOCAL_RUNNERS:
        local_device = "/CPU:0" if job.device == "cpu" or not tf.config.list_physical_devices("GPU") else "/GPU:0"
        if mixed_precision_type(local_device) is None:
            raise JobConfigError("--mixed_precision needs a GPU or a CPU with bfloat16 instructions (AMX, "
                                 "AVX512_BF16); this machine's encoders would run slower than in float32")
    passthrough = tuple(name.strip() for name in job.passthrough.split(",") if name.strip())
    repeated = sorted({name for name in passthrough if passthrough.count(name) > 1})
    if repeated:
        raise JobConfigError(f"--passthrough names a column twice: {', '.join(repeated)}")
    reserved = {cols.ID, cols.LABEL, cols.IMAGE_EMBEDDING, cols.TEXT_EMBEDDING, cols.EMBEDDING, cols.HAS_IMAGE,
                cols.HAS_TEXT, cols.IMAGE_SHA256, cols.TEXT_SHA256}
    clashing = sorted(reserved.intersection(passthrough))
    if clashing:
        raise JobConfigError(f"--passthrough names output columns of the job itself: {', '.join(clashing)}")
    metadata = {
        cols.META_VERSION: _package_version(),
        cols.META_CREATED_AT: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        cols.META_L2_NORMALIZE: json.dumps(bool(job.l2_normalize)),
        cols.META_EMBEDDING_LAYOUT: json.dumps(cols.embedding_layout(image and image.dim, text and text.dim)),
    }
    if image is not None:
        metadata[cols.META_IMAGE_ENCODER] = image.to_json()
        metadata[cols.META_IMAGE_PREPROCESSING] = json.dumps(
            image_preprocessing(image.image_size, image.input_convention, image.resize), sort_keys=True)
    if text is not None:
        metadata[cols.META_TEXT_ENCODER] = text.to_json()
    dtype = "float16" if job.float16 else "float32"
    metadata[cols.META_STORAGE] = json.dumps({"vectors": job.vectors, "dtype": dtype}, sort_keys=True)
    metadata[cols.META_COMPUTE_PRECISION] = cols.PRECISION_MIXED if job.mixed_precision else cols.PRECISION_FLOAT32
    metadata[cols.META_MAX_IMAGE_PIXELS] = str(job.max_image_pixels)
    metadata[cols.META_REUSE_KEY] = reuse_key(metadata)
    accepted_keys = accepted_reuse_keys(metadata)
    try:
        stored = find_reusable_files(job.reuse, accepted_keys)
    except ReuseConfigError as error:
        raise JobConfigError(str(error)) from error
    schema = cols.embeddings_schema(image and image.dim, text and text.dim, passthrough, metadata, job.vectors, dtype)
    config = EmbedConfig(image=image, text=text, schema=schema, passthrough=passthrough,
                         l2_normalize=bool(job.l2_normalize), device=job.device,
                         mixed_precision=bool(job.mixed_precision))
    folder = output_folder.claim(job.output, layout.EMBEDDINGS_PREFIX, JOB_NAME, job.overwrite)
    # A killed run's finished batches: taken back like --reuse outputs, so the rerun embeds only what was in flight.
    stored += usable_checkpoints(checkpoint_files(folder.checkpoints), accepted_keys)
    return JobPlan(input_format, image, text, passthrough, metadata, config, folder, preference_order(stored))


def build_pipeline(pipeline: beam.Pipeline, job: EmbedCorpusOptions, plan: JobPlan) -> None:
    """read → prepare (unchanged records matched to stored rows) → embed the rest (checkpointed) → write, and the
    matched records' stored vectors copied → write, all under the run's staging folder; the dead letters of every
    step merged into one sink."""
    progress = ProgressLog(job.progress_interval)
    tfrecord_keys = {"id": job.tfrecord_id_key, "image": job.tfrecord_image_key, "text": job.tfrecord_text_key,
                     "label": job.tfrecord_label_key}
    read = ReadCorpus(job.input, plan.input_format, plan.passthrough, tfrecord_keys,
                      fan_out=not single_worker(pipeline.options))
    records, unreadable = pipeline | "ReadCorpus" >> read
    to_embed, reused, unprepared = records | "PrepareRecords" >> PrepareRecords(
        read.again(), use_image=plan.image is not None, use_text=plan.text is not None,
        max_image_pixels=job.max_image_pixels, max_text_chars=job.max_text_chars, max_image_bytes=job.max_image_bytes,
        stored_files=plan.stored_files)
    min_batch_size, max_batch_size = flags.batch_bounds(job)
    embeddings, unembedded = to_embed | "EmbedRecords" >> EmbedRecords(
        plan.embed_config, progress, min_batch_size=min_batch_size, max_batch_size=max_batch_size)
    if not job.no_checkpoint:
        embeddings = embeddings | "Checkpoint" >> beam.ParDo(CheckpointBatches(plan.folder.checkpoints))
    staged = plan.folder.staged()
    # Fresh and reused rows have sinks of their own, their files one dataset either way: a Flatten of the two would
    # be a stage boundary, where DirectRunner holds every table of the run in memory until both sides are done.
    embeddings | "WriteEmbeddings" >> WriteEmbeddings(staged[layout.EMBEDDINGS_PREFIX], plan.embed_config.schema,
                                                      job.num_shards)
    if plan.stored_files:
        (reused
         | "CopyStoredVectors" >> CopyStoredVectors(plan.stored_files, plan.embed_config.schema, plan.passthrough)
         | "WriteReused" >> WriteEmbeddings(staged[layout.EMBEDDINGS_PREFIX] + layout.REUSED_INFIX,
                                            plan.embed_config.schema, job.num_shards))
    ((unreadable, unprepared, unembedded)
     | "AllDeadLetters" >> beam.Flatten()
     | "WriteDeadLetters" >> WriteDeadLetters(staged["dead_letters"], progress))


def run(argv: list[str] | None = None) -> EmbedRunReport:
    """Plan, run and report. Raises JobConfigError on misconfiguration."""
    options = PipelineOptions(argv)
    job = options.view_as(EmbedCorpusOptions)
    plan = plan_job(job, options.view_as(StandardOptions).runner)
    for spec in (plan.image, plan.text):
        if spec is not None:
            log.info("%s encoder: %s → %d-d%s", spec.modality, spec.handle, spec.dim,
                     f", {spec.image_size}x{spec.image_size} input" if spec.image_size else "")
    if plan.stored_files:
        log.info("reusing vectors from %d files (%d checkpoint files of a killed run)", len(plan.stored_files),
                 sum(file.origin == ORIGIN_CHECKPOINT for file in plan.stored_files))
    return output_folder.run_and_publish(options, lambda pipeline: build_pipeline(pipeline, job, plan),
                                         EmbedRunReport, JOB_NAME, job.max_error_rate, plan.folder,
                                         plan.schema_metadata)


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, flags.EMBED, run, finish_run)


if __name__ == "__main__":
    exit_process(main())
