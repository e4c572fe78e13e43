"""The scoring job: embeddings Parquet + a classifier from train_classifier → predictions Parquet.

    python -m beam_jobs.predict --input out/embeddings/ --model out/classifier/model \
        --output out/predictions/ [--top_k 3] [--runner ...]

read (the files, checked at start against the encoders the model was trained on) → check each row (id, vector
width, finite values) → score in batches with the serving model (one copy per worker) → write the predictions,
the dead letters and the run report, published like the embedding job's (beam_jobs.output_folder). Every row read
ends in exactly one of predictions-*.parquet and _dead_letters/; the job exits non-zero when the dead-lettered
share exceeds --max_error_rate.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_jobs import flags, output_folder
from beam_jobs.cli import exit_process
from beam_jobs.launch import REMOTE_RUNNERS, JobConfigError, finish_run, job_main
from schemas import embeddings as cols
from schemas import layout
from schemas import predictions as pred
from schemas.training import ModelInfo
from transforms.downstream.embeddings_input import (
    EmbeddingsInputError,
    content_identity,
    identity_difference,
    inspect_embeddings,
    same_identity,
)
from transforms.downstream.predict import ScoreEmbeddings
from transforms.downstream.serving import check_serving_model, read_model_info
from transforms.embedding.write import WriteDeadLetters, WriteEmbeddings

JOB_NAME = "predict"

log = logging.getLogger("hubembed")


class PredictOptions(PipelineOptions):
    """The scoring job's options; every other flag goes to Beam (runner, project, region, workers...)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        flags.add_predict_flags(parser)


@dataclasses.dataclass
class PredictPlan:
    paths: tuple[str, ...]
    info: ModelInfo
    top_k: int
    schema_metadata: dict[str, str]
    folder: output_folder.RunFolder


def plan_job(job: PredictOptions, runner: str | None = None) -> PredictPlan:
    """Check the model, the input against it, and the flags, before any worker starts. Raises JobConfigError."""
    for flag in ("input", "model", "output"):
        if not getattr(job, flag):
            raise JobConfigError(f"--{flag} is required")
    if runner in REMOTE_RUNNERS and "://" not in job.model:
        raise JobConfigError(f"--model {job.model} is a local folder that {runner} workers cannot read: copy it to "
                             "gs://")
    if job.top_k < 1 or min(flags.batch_bounds(job)) < 1:
        raise JobConfigError("--top_k, --batch_size and --min_batch_size must be at least 1")
    if not 0.0 <= job.max_error_rate <= 1.0:
        raise JobConfigError("--max_error_rate must be between 0 and 1")
    try:
        info = read_model_info(job.model)
    except (OSError, ValueError) as error:
        raise JobConfigError(str(error).splitlines()[0]) from error
    if info.mode != "frozen":
        raise JobConfigError(f"{job.model} is a {info.mode} model that takes raw images/text "
                             f"({', '.join(info.inputs)}), not embeddings: call its serving signature directly")
    try:
        check_serving_model(job.model, info)  # here, not in every worker's setup()
    except ValueError as error:
        raise JobConfigError(str(error)) from error
    try:
        embeddings = inspect_embeddings(job.input, (cols.ID, *info.inputs))
    except EmbeddingsInputError as error:
        raise JobConfigError(str(error)) from error
    # By content: the same encoders at other paths are accepted, another model saved over the same path is not.
    trained_on = content_identity(info.encoder_identity)
    if not same_identity(trained_on, embeddings.identity):
        raise JobConfigError(f"{embeddings.paths[0]} was embedded with other encoders than {job.model} was trained "
                             f"on ({identity_difference(trained_on, embeddings.identity)})")
    folder = output_folder.claim(job.output, layout.PREDICTIONS_PREFIX, JOB_NAME, job.overwrite)
    metadata = {pred.META_MODEL: job.model, pred.META_MODEL_INFO: json.dumps(info.to_dict(), sort_keys=True)}
    return PredictPlan(embeddings.paths, info, min(job.top_k, len(info.labels)), metadata, folder)


def build_pipeline(pipeline: beam.Pipeline, job: PredictOptions, plan: PredictPlan) -> None:
    """read → check → score → write; dead letters of every step into one sink."""
    schema = pred.predictions_schema(plan.schema_metadata)
    predictions, dead_letters = (
        pipeline
        | "EmbeddingFiles" >> beam.Create(list(plan.paths))
        | "ScoreEmbeddings" >> ScoreEmbeddings(job.model, plan.info, schema, plan.top_k, *flags.batch_bounds(job)))
    # WriteEmbeddings is the embedding job's batched Parquet sink: it writes any Tables of the schema it is given.
    staged = plan.folder.staged()
    predictions | "WritePredictions" >> WriteEmbeddings(staged[layout.PREDICTIONS_PREFIX], schema, job.num_shards)
    dead_letters | "WriteDeadLetters" >> WriteDeadLetters(staged["dead_letters"])


def run(argv: list[str] | None = None) -> pred.PredictRunReport:
    """Plan, run and report. Raises JobConfigError on misconfiguration."""
    options = PipelineOptions(argv)
    job = options.view_as(PredictOptions)
    plan = plan_job(job, options.view_as(StandardOptions).runner)
    log.info("model %s: %s features, labels %s", job.model, plan.info.features, ", ".join(plan.info.labels))
    return output_folder.run_and_publish(options, lambda pipeline: build_pipeline(pipeline, job, plan),
                                         pred.PredictRunReport, JOB_NAME, job.max_error_rate, plan.folder,
                                         plan.schema_metadata)


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, flags.PREDICT, run, finish_run)


if __name__ == "__main__":
    exit_process(main())
