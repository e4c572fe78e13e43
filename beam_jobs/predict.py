"""The scoring job: embeddings Parquet + a classifier from train_classifier → predictions Parquet.

    python -m beam_jobs.predict --input out/embeddings/embeddings-*.parquet --model out/classifier/model \
        --output out/predictions/ [--top_k 3] [--runner ...]

read (the files, checked at start against the encoders the model was trained on) → check each row (id, vector
width, finite values) → score in batches with the serving model (one copy per worker) → write the predictions,
the dead letters and the run report. Every row read ends in exactly one of predictions-*.parquet and
dead_letters-*.parquet; the job exits non-zero when the dead-lettered share exceeds --max_error_rate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_jobs.launch import REMOTE_RUNNERS, JobConfigError, claim_output, finish_run, job_main, written_files
from beam_jobs.options import add_flag
from schemas import embeddings as cols
from schemas import predictions as pred
from schemas.training import ModelInfo
from transforms.embeddings_input import EmbeddingsInputError, identity_difference, inspect_embeddings
from transforms.predict import ScoreEmbeddings
from transforms.report import build_report, write_report
from transforms.serving import read_model_info
from transforms.write import WriteDeadLetters, WriteEmbeddings

JOB_NAME = "predict"
PREDICTIONS_PREFIX = "predictions"
DEAD_LETTERS_PREFIX = "dead_letters"
REPORT_NAME = "run_report.json"

log = logging.getLogger("hubembed")


class PredictOptions(PipelineOptions):
    """The scoring job's options; every other flag goes to Beam (runner, project, region, workers...)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        group = parser.add_argument_group("hubembed predict")
        add_flag(group, "--input", help="embeddings Parquet written by embed_corpus (a glob, local or gs://)")
        add_flag(group, "--model", help="the serving model folder train_classifier wrote (<output>/model)")
        add_flag(group, "--output", help="output folder: predictions-*.parquet, dead_letters-*.parquet, "
                                            "run_report.json")
        add_flag(group, "--top_k", type=int, default=3, help="labels (with probabilities) kept per row")
        add_flag(group, "--batch_size", type=int, default=32, help="largest batch sent through the model")
        add_flag(group, "--min_batch_size", type=int, default=8,
                           help="smallest batch BatchElements starts from before it adapts upwards")
        add_flag(group, "--num_shards", type=int, default=0, help="output Parquet files (0: the runner chooses)")
        add_flag(group, "--max_error_rate", type=float, default=0.01,
                           help="exit non-zero when dead letters / rows read exceeds this")
        add_flag(group, "--overwrite", action="store_true",
                           help="replace the output of an earlier run in --output instead of refusing to start")


@dataclasses.dataclass
class PredictPlan:
    paths: tuple[str, ...]
    info: ModelInfo
    top_k: int
    schema_metadata: dict[str, str]
    outputs: dict[str, str]


def plan_job(job: PredictOptions, runner: str | None = None) -> PredictPlan:
    """Check the model, the input against it, and the flags, before any worker starts. Raises JobConfigError."""
    for flag in ("input", "model", "output"):
        if not getattr(job, flag):
            raise JobConfigError(f"--{flag} is required")
    if runner in REMOTE_RUNNERS and "://" not in job.model:
        raise JobConfigError(f"--model {job.model} is a local folder that {runner} workers cannot read: copy it to "
                             "gs://")
    if job.top_k < 1 or job.batch_size < 1 or job.min_batch_size < 1:
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
        embeddings = inspect_embeddings(job.input, (cols.ID, *info.inputs))
    except EmbeddingsInputError as error:
        raise JobConfigError(str(error)) from error
    if embeddings.identity != info.encoder_identity:
        raise JobConfigError(f"{embeddings.paths[0]} was embedded with other encoders than {job.model} was trained "
                             f"on ({identity_difference(info.encoder_identity, embeddings.identity)})")
    outputs = claim_output(job.output, {"predictions": PREDICTIONS_PREFIX, "dead_letters": DEAD_LETTERS_PREFIX},
                           REPORT_NAME, job.overwrite, JOB_NAME)
    metadata = {pred.META_MODEL: job.model, pred.META_MODEL_INFO: json.dumps(info.to_dict(), sort_keys=True)}
    return PredictPlan(embeddings.paths, info, min(job.top_k, len(info.labels)), metadata, outputs)


def build_pipeline(pipeline: beam.Pipeline, job: PredictOptions, plan: PredictPlan) -> None:
    """read → check → score → write; dead letters of every step into one sink."""
    schema = pred.predictions_schema(plan.schema_metadata)
    predictions, dead_letters = (
        pipeline
        | "EmbeddingFiles" >> beam.Create(list(plan.paths))
        | "ScoreEmbeddings" >> ScoreEmbeddings(job.model, plan.info, schema, plan.top_k, job.min_batch_size,
                                               job.batch_size))
    # WriteEmbeddings is the embedding job's batched Parquet sink: it writes any Tables of the schema it is given.
    predictions | "WritePredictions" >> WriteEmbeddings(plan.outputs["predictions"], schema, job.num_shards)
    dead_letters | "WriteDeadLetters" >> WriteDeadLetters(plan.outputs["dead_letters"])


def run(argv: list[str] | None = None) -> pred.PredictRunReport:
    """Plan, run and report. Raises JobConfigError on misconfiguration."""
    options = PipelineOptions(argv)
    job = options.view_as(PredictOptions)
    plan = plan_job(job, options.view_as(StandardOptions).runner)
    log.info("model %s: %s features, labels %s", job.model, plan.info.features, ", ".join(plan.info.labels))
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, job, plan)
    started = time.perf_counter()
    result = pipeline.run()
    result.wait_until_finish()
    report = build_report(pred.PredictRunReport, JOB_NAME, result, time.perf_counter() - started,
                          job.max_error_rate, written_files(plan.outputs), plan.schema_metadata)
    write_report(report, plan.outputs["report"])
    return report


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, "python -m beam_jobs.predict", __doc__, PredictOptions, run, finish_run)


if __name__ == "__main__":
    sys.exit(main())
