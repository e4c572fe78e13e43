"""The downstream stage: a classifier on the embedding job's Parquet, or fine-tuned from the raw corpus.

    python -m beam_jobs.train_classifier --input out/embeddings/ --output out/classifier/ \
        [--features image|text|both] [--class_weights balanced] [...]
    python -m beam_jobs.train_classifier --fine_tune --input corpus/manifest.jsonl --output out/fine_tuned/ \
        --image_encoder H --text_encoder H [--features ...]

Frozen features (default): read → prepare (label present, split by id hash) → tf.Transform analysis on Beam
(label vocabulary, per-dimension z-score) → train the Keras head → evaluate on the test split → write the
serving model, the transform graph, the report and its pictures.
Fine-tune (--fine_tune): read → prepare (the embedding job's ReadCorpus + PrepareRecords on Beam) → train
trainable hub.KerasLayer encoders under the same head, with a low learning rate → the same evaluation and outputs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions

from beam_jobs import flags
from beam_jobs.cli import exit_process
from beam_jobs.embed_corpus import NO_ENCODER, encoder_choices, resolve_encoder
from beam_jobs.launch import (
    EXIT_OK,
    REMOTE_RUNNERS,
    JobConfigError,
    check_output_folder,
    clear_earlier_run,
    job_main,
    pin_direct_runner,
)
from encoders.hub_module import EncoderSpec
from encoders.preprocessing import AREA, image_preprocessing
from encoders.runtime import tf
from schemas import embeddings as cols
from schemas import layout
from schemas import predictions as pred
from schemas.training import ModelInfo, TrainingReport
from transforms.downstream import fine_tune
from transforms.downstream.classify import (
    HeadConfig,
    build_head,
    class_weight_for,
    fit,
    format_metrics,
    set_seed,
    split_metrics,
    with_modality_dropout,
)
from transforms.downstream.embeddings_input import (
    FEATURE_COLUMNS,
    EmbeddingsInput,
    EmbeddingsInputError,
    embeddings_identity,
    inspect_embeddings,
)
from transforms.downstream.plots import plot_confusion_matrix, plot_training_curves
from transforms.downstream.predict import prediction_table
from transforms.downstream.serving import FineTunedModel, FrozenFeatureModel, export
from transforms.downstream.split import SPLITS, TEST, TRAIN, VALIDATION, check_ratios
from transforms.downstream.tft_features import (
    RowSource,
    SkippedRows,
    analyze_training_split,
    label_vocabulary,
    load_transform,
    vector_columns,
)
from transforms.downstream.training_input import (
    SHUFFLE_ROWS,
    Survey,
    fits_in_memory,
    split_chunks,
    split_dataset,
    survey,
)
from transforms.embedding.read import CorpusConfigError, infer_format, match_patterns
from transforms.report import counters

JOB_NAME = "train_classifier"
MODEL_DIR, TRANSFORM_DIR = "model", "transform"
REPORT_NAME = "training_report.json"
CONFUSION_MATRIX_PNG, TRAINING_CURVES_PNG = "confusion_matrix.png", "training_curves.png"
TEST_PREDICTIONS = "test_predictions.parquet"

log = logging.getLogger("hubembed")


class TrainClassifierOptions(PipelineOptions):
    """The training job's options; every other flag goes to Beam (runner, temp_location...)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        flags.add_train_flags(parser)


@dataclasses.dataclass
class TrainPlan:
    """What start-up checking decided."""

    mode: str
    head: HeadConfig
    outputs: dict[str, str]
    top_k: int | None
    frequency_threshold: int | None
    embeddings: EmbeddingsInput | None = None  # frozen mode
    input_format: str | None = None  # fine-tune mode
    image: EncoderSpec | None = None
    text: EncoderSpec | None = None


def _check_output(output: str, overwrite: bool, fine_tuning: bool) -> dict[str, str]:
    check_output_folder(output)
    outputs = {
        "model": FileSystems.join(output, MODEL_DIR),
        "report": FileSystems.join(output, REPORT_NAME),
        "confusion_matrix": FileSystems.join(output, CONFUSION_MATRIX_PNG),
        "training_curves": FileSystems.join(output, TRAINING_CURVES_PNG),
        "test_predictions": FileSystems.join(output, TEST_PREDICTIONS),
    }
    if fine_tuning:
        # fine-tune mode only: the records read/prepare could not use, where the embedding job puts its own
        outputs["dead_letters"] = FileSystems.join(output, layout.DEAD_LETTERS_DIR, layout.DEAD_LETTERS_PREFIX)
    else:
        outputs["transform"] = FileSystems.join(output, TRANSFORM_DIR)
    earlier = [path for name, path in outputs.items() if name != "dead_letters" and FileSystems.exists(path)]
    earlier += [m.path for r in FileSystems.match([FileSystems.join(output, layout.DEAD_LETTERS_DIR, "*")])
                for m in r.metadata_list]
    clear_earlier_run(output, earlier, overwrite)
    return outputs


def _head_config(job: TrainClassifierOptions) -> HeadConfig:
    try:
        hidden_units = tuple(int(size) for size in job.hidden_units.split(",") if size.strip())
    except ValueError as error:
        raise JobConfigError(f"--hidden_units must be comma-separated integers, not {job.hidden_units!r}") from error
    if any(size < 1 for size in hidden_units):
        raise JobConfigError("--hidden_units sizes must be at least 1")
    if not 0.0 <= job.dropout < 1.0:
        raise JobConfigError("--dropout must be in [0, 1)")
    if not 0.0 <= job.modality_dropout <= 0.5:
        raise JobConfigError("--modality_dropout must be in [0, 0.5] (it hides one of two modalities per row)")
    if job.epochs < 1 or job.batch_size < 1 or job.patience < 0:
        raise JobConfigError("--epochs and --batch_size must be at least 1, --patience at least 0")
    if job.learning_rate <= 0 or job.fine_tune_learning_rate <= 0:
        raise JobConfigError("--learning_rate and --fine_tune_learning_rate must be positive")
    return HeadConfig(hidden_units=hidden_units, dropout=job.dropout, learning_rate=job.learning_rate,
                      epochs=job.epochs, batch_size=job.batch_size, patience=job.patience,
                      class_weights=job.class_weights, modality_dropout=job.modality_dropout, seed=job.seed)


def plan_job(job: TrainClassifierOptions, runner: str | None = None, temp_location: str | None = None) -> TrainPlan:
    """Check everything a user can get wrong, before any work. Raises JobConfigError (one line)."""
    if not job.input:
        raise JobConfigError("--input is required")
    if not job.output:
        raise JobConfigError("--output is required")
    if runner in REMOTE_RUNNERS:
        # tf.Transform's analysis (or fine-tune's records) is written by the workers and read back here.
        for flag, path in (("--output", job.output), ("--temp_location", temp_location or "")):
            if "://" not in path:
                raise JobConfigError(f"{runner} workers cannot write {flag} {path or '(unset)'}: use gs:// (or "
                                     "another shared filesystem)")
    ratio_problem = check_ratios(job.validation_ratio, job.test_ratio)
    if ratio_problem:
        raise JobConfigError(ratio_problem)
    if job.top_k_labels < 0 or job.label_frequency_threshold < 0:
        raise JobConfigError("--top_k_labels and --label_frequency_threshold must be 0 (off) or positive")
    head = _head_config(job)
    top_k, threshold = job.top_k_labels or None, job.label_frequency_threshold or None
    if not job.fine_tune:
        try:
            embeddings = inspect_embeddings(job.input, (cols.ID, cols.LABEL, *FEATURE_COLUMNS[job.features]))
        except EmbeddingsInputError as error:
            raise JobConfigError(str(error)) from error
        outputs = _check_output(job.output, job.overwrite, fine_tuning=False)
        return TrainPlan("frozen", head, outputs, top_k, threshold, embeddings=embeddings)
    try:
        input_format = infer_format(job.input) if job.input_format == "auto" else job.input_format
        match_patterns(job.input, input_format)
    except CorpusConfigError as error:
        raise JobConfigError(str(error)) from error
    use_image, use_text = job.features in ("image", "both"), job.features in ("text", "both")
    for modality, handle, used in (("image", job.image_encoder, use_image), ("text", job.text_encoder, use_text)):
        if used and handle.strip().lower() == NO_ENCODER:
            raise JobConfigError(f"--features {job.features} needs an {modality} encoder, not '{NO_ENCODER}'")
    image_choice, text_choice = encoder_choices(job)
    image = resolve_encoder(image_choice) if use_image else None
    text = resolve_encoder(text_choice) if use_text else None
    outputs = _check_output(job.output, job.overwrite, fine_tuning=True)
    return TrainPlan("fine_tune", head, outputs, top_k, threshold, input_format=input_format, image=image, text=text)


def _check_splits(counts: Survey, labels: list[str]) -> None:
    for name in SPLITS:
        if not counts.kept(name, labels):
            raise JobConfigError(f"the {name} split is empty: use more labeled rows or change --validation_ratio / "
                                 "--test_ratio")


def _test_predictions_schema(model_info: ModelInfo) -> pa.Schema:
    """The predict job's schema, with the model's identity in its metadata as the predict job writes it."""
    return pred.predictions_schema({pred.META_MODEL_INFO: json.dumps(model_info.to_dict(), sort_keys=True)})


def _write_test_predictions(path: str, scored: Iterable[tuple[Sequence[str], np.ndarray, np.ndarray]],
                            labels: list[str], model_info: ModelInfo) -> tuple[np.ndarray, np.ndarray]:
    """The test split's (ids, probabilities, true label ids), batch after batch, appended to a Parquet file of the
    predict job's schema; returns (true label ids, predicted label ids)."""
    schema = _test_predictions_schema(model_info)
    true_ids, predicted_ids = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    with FileSystems.create(path) as handle, pq.ParquetWriter(
            handle, schema, use_dictionary=cols.dictionary_columns(schema)) as writer:
        for ids, probabilities, label_ids in scored:
            writer.write_table(prediction_table(list(ids), probabilities, labels, top_k=min(3, len(labels)),
                                                schema=schema))
            true_ids.append(label_ids)
            predicted_ids.append(probabilities.argmax(axis=1))
    return np.concatenate(true_ids), np.concatenate(predicted_ids)


def _finish(plan: TrainPlan, job: TrainClassifierOptions, labels: list[str], rows: dict[str, int],
            true_ids: np.ndarray, predicted_ids: np.ndarray, training: dict, started: float,
            metadata: dict[str, str]) -> TrainingReport:
    """Metrics, pictures and report: the same for both modes, so their reports compare side by side."""
    metrics = split_metrics(true_ids, predicted_ids, labels)
    title = f"{plan.mode} {job.features}"
    plot_confusion_matrix(metrics.confusion_matrix, labels, f"{title}: test split (accuracy {metrics.accuracy:.3f})",
                          plan.outputs["confusion_matrix"])
    plot_training_curves(training["history"], training["best_epoch"], title, plan.outputs["training_curves"])
    hyperparameters = {**dataclasses.asdict(plan.head), "validation_ratio": job.validation_ratio,
                       "test_ratio": job.test_ratio, "top_k_labels": job.top_k_labels,
                       "label_frequency_threshold": job.label_frequency_threshold}
    report = TrainingReport(job=JOB_NAME, mode=plan.mode, features=job.features, labels=labels, rows=rows,
                            metrics=metrics, training=training, hyperparameters=hyperparameters,
                            seconds=round(time.perf_counter() - started, 3), outputs=plan.outputs, metadata=metadata)
    with FileSystems.create(plan.outputs["report"]) as handle:
        handle.write(json.dumps(report.to_dict(), indent=2, sort_keys=True).encode())
    return report


def _log_non_finite(skipped: SkippedRows, features: str) -> None:
    """One warning line naming a few of the rows skipped for NaN / inf vectors, so they can be found."""
    ids = [row_id for split in SPLITS for row_id in skipped.non_finite[split]]
    if ids:
        by_split = ", ".join(f"{split} {len(skipped.non_finite[split])}" for split in SPLITS)
        log.warning("skipped %d rows with NaN or infinity in the %s vectors (%s), e.g. %s", len(ids), features,
                    by_split, ", ".join(ids[:5]))


def train_frozen(plan: TrainPlan, job: TrainClassifierOptions, options: PipelineOptions) -> TrainingReport:
    """Embeddings Parquet → tf.Transform analysis → head → serving model and report, every pass streaming the rows
    a record batch at a time (transforms.downstream.training_input): memory holds the model and bounded buffers,
    not rows."""
    started = time.perf_counter()
    embeddings = plan.embeddings
    source = RowSource(tuple(embeddings.paths), job.features, embeddings.dims, job.validation_ratio, job.test_ratio)
    # Analyze: the full pass over the training split, on Beam; writes transform/ beside the model.
    temp_location = options.view_as(GoogleCloudOptions).temp_location
    analyze_training_split(source, plan.top_k, plan.frequency_threshold, plan.outputs["transform"], options,
                           temp_dir=FileSystems.join(temp_location, "hubembed-tft") if temp_location else None)
    transform = load_transform(plan.outputs["transform"])
    labels = label_vocabulary(transform)
    if len(labels) < 2:
        raise JobConfigError(f"the training split has {len(labels)} label(s) after --top_k_labels / "
                             "--label_frequency_threshold: a classifier needs at least 2")
    counts = survey(source)
    log.info("%d rows read, %d labels; training on %d rows, validating on %d, testing on %d", counts.read,
             len(labels), *(counts.kept(name, labels) for name in SPLITS))
    _log_non_finite(counts.skipped, job.features)
    _check_splits(counts, labels)
    # Train on the transform's outputs: the very layer the serving model embeds.
    set_seed(plan.head.seed)
    transform_layer = transform.transform_features_layer()
    head = build_head(len(labels), plan.head)
    model = FrozenFeatureModel(transform_layer, head, labels, job.features, embeddings.dims)

    def batches(name: str, shuffle_rows: int = 0):
        return split_dataset(source, name, labels, transform_layer, plan.head.batch_size, shuffle_rows,
                             plan.head.seed, cache=fits_in_memory(counts.kept(name, labels), source.dims))

    modality_dims = [embeddings.dims[column] for column in vector_columns(job.features)]
    training = fit(with_modality_dropout(head, modality_dims, plan.head), batches(TRAIN, SHUFFLE_ROWS),
                   batches(VALIDATION), plan.head, plan.head.learning_rate,
                   class_weight_for(plan.head, counts.class_counts(labels)))
    # Evaluate through the serving path (transform layer + head), then export.
    info = ModelInfo(mode=plan.mode, features=job.features, labels=labels,
                     inputs={name: embeddings.dims.get(name, 0) for name in FEATURE_COLUMNS[job.features]},
                     encoder_identity=embeddings.identity)
    log.info("trained %d epochs (best %d); scoring the test split", training["epochs_run"], training["best_epoch"])
    export(model, plan.outputs["model"], info)
    scored = ((ids, model.probabilities({name: tf.constant(values) for name, values in inputs.items()}), label_ids)
              for inputs, label_ids, ids in split_chunks(source, TEST, labels))
    true_ids, predicted = _write_test_predictions(plan.outputs["test_predictions"], scored, labels, info)
    rows = {"read": counts.read, **counts.skipped.counts(),
            "skipped_label_not_in_vocabulary": counts.outside(labels),
            **{name: counts.kept(name, labels) for name in SPLITS}}
    return _finish(plan, job, labels, rows, true_ids, predicted, training, started, embeddings.metadata)


def train_fine_tuned(plan: TrainPlan, job: TrainClassifierOptions, options: PipelineOptions) -> TrainingReport:
    """Raw corpus → records (read + prepare on Beam) → trainable encoders + head → serving model and report. The
    records stream from the pipeline's files a batch at a time, decoded batch by batch: memory holds the model and
    bounded buffers, not the corpus."""
    started = time.perf_counter()
    use_image, use_text = plan.image is not None, plan.text is not None
    temp_location = options.view_as(GoogleCloudOptions).temp_location
    with tempfile.TemporaryDirectory(prefix="hubembed-records-") as local_temp:
        records_prefix = FileSystems.join(temp_location or local_temp, f"hubembed-records-{time.time_ns()}")
        pipeline = beam.Pipeline(options=options)
        fine_tune.build_records_pipeline(pipeline, job.input, plan.input_format, use_image, use_text,
                                         job.max_image_pixels, records_prefix, plan.outputs["dead_letters"])
        result = pipeline.run()
        result.wait_until_finish()
        paths = fine_tune.records_files(records_prefix)
        try:
            return _fine_tune_on(paths, plan, job, counters(result), started)
        finally:
            if paths:
                FileSystems.delete(paths)


def _fine_tune_on(paths: list[str], plan: TrainPlan, job: TrainClassifierOptions, totals: dict[str, int],
                  started: float) -> TrainingReport:
    use_image, use_text = plan.image is not None, plan.text is not None
    source = fine_tune.RecordsSource(tuple(paths), job.validation_ratio, job.test_ratio, use_image, use_text,
                                     plan.image.image_size if plan.image else None,
                                     (plan.image.resize if plan.image else None) or AREA)
    counts = source.survey()
    labels = fine_tune.label_vocabulary(counts.labels[TRAIN], plan.top_k, plan.frequency_threshold)
    if len(labels) < 2:
        raise JobConfigError(f"the training split has {len(labels)} label(s): a classifier needs at least 2")
    _check_splits(counts, labels)
    log.info("%d records read, %d labels; training on %d records, validating on %d, testing on %d", counts.read,
             len(labels), *(counts.kept(name, labels) for name in SPLITS))

    def batches(name: str, shuffle_rows: int = 0, with_ids: bool = False):
        return source.dataset(name, labels, plan.head.batch_size, shuffle_rows, plan.head.seed, with_ids)

    set_seed(plan.head.seed)
    model = fine_tune.build_fine_tune_model(plan.image, plan.text, len(labels), plan.head, batches(TRAIN))
    train, validation = batches(TRAIN, fine_tune.SHUFFLE_RECORDS), batches(VALIDATION)
    class_weight = class_weight_for(plan.head, counts.class_counts(labels))

    def scored() -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
        for inputs, label_ids, ids in batches(TEST, with_ids=True):
            yield ([row_id.decode("utf-8") for row_id in ids.numpy()], model(inputs, training=False).numpy(),
                   label_ids.numpy())

    # Keras's transfer-learning recipe: first the new head on frozen encoders (at --learning_rate), so that the
    # low-rate fine-tuning starts from a head that already works instead of pushing random gradients into the
    # pretrained weights; then everything at --fine_tune_learning_rate.
    try:
        fine_tune.set_encoders_trainable(model, False)
        head_phase = fit(model, train, validation, plan.head, plan.head.learning_rate, class_weight)
        # The test accuracy with the encoders still frozen: what fine-tuning adds, within the same run.
        frozen_accuracy = float(np.mean(np.concatenate([probabilities.argmax(axis=1) == label_ids
                                                        for _, probabilities, label_ids in scored()])))
        fine_tune.set_encoders_trainable(model, True)
        before = fine_tune.encoder_weights(model)
        tuned_phase = fit(model, train, validation, plan.head, job.fine_tune_learning_rate, class_weight)
    except Exception as error:  # LookupError, wrapped by autograph in a StagingError
        # An op inside an encoder without a gradient: TensorFlow differentiates a restored function for all its
        # inputs, so even the head phase fails; that encoder cannot be fine-tuned, whatever the data.
        cause = next((line.strip() for line in str(error).splitlines() if "No gradient defined" in line), None)
        if cause is None:
            raise
        raise JobConfigError(f"cannot fine-tune the encoders: {cause.split('. In general')[0]}") from error
    training = {
        "epochs_run": head_phase["epochs_run"] + tuned_phase["epochs_run"],
        "best_epoch": head_phase["epochs_run"] + tuned_phase["best_epoch"],
        "history": {name: values + tuned_phase["history"].get(name, []) for name, values in
                    head_phase["history"].items()},
        "head_phase_epochs": head_phase["epochs_run"],
        "head_phase_test_accuracy": round(frozen_accuracy, 6),
        "encoder_weight_change": fine_tune.weight_change(before, fine_tune.encoder_weights(model)),
    }
    metadata = {}
    if plan.image:
        metadata[cols.META_IMAGE_ENCODER] = plan.image.to_json()
        metadata[cols.META_IMAGE_PREPROCESSING] = json.dumps(
            image_preprocessing(plan.image.image_size, plan.image.input_convention, plan.image.resize), sort_keys=True)
    if plan.text:
        metadata[cols.META_TEXT_ENCODER] = plan.text.to_json()
    info = ModelInfo(mode=plan.mode, features=job.features, labels=labels,
                     inputs={name: 0 for name, used in (("image_bytes", use_image), ("text", use_text)) if used},
                     encoder_identity=embeddings_identity(metadata))
    export(FineTunedModel(model, labels, use_image, use_text, source.image_size, source.image_resize),
           plan.outputs["model"], info)
    true_ids, predicted = _write_test_predictions(plan.outputs["test_predictions"], scored(), labels, info)
    rows = {"read": totals.get("records_read", 0), "dead_lettered": totals.get("dead_lettered", 0),
            **counts.skipped.counts(),  # unlabeled only: the encoders run in the model, there are no vectors
            "skipped_label_not_in_vocabulary": counts.outside(labels),
            **{name: counts.kept(name, labels) for name in SPLITS}}
    return _finish(plan, job, labels, rows, true_ids, predicted, training, started, metadata)


def run(argv: list[str] | None = None) -> TrainingReport:
    """Plan, train, evaluate and write. Raises JobConfigError on misconfiguration."""
    options = PipelineOptions(argv)
    job = options.view_as(TrainClassifierOptions)
    plan = plan_job(job, options.view_as(StandardOptions).runner, options.view_as(GoogleCloudOptions).temp_location)
    pin_direct_runner(options)  # for tf.Transform's pipeline and fine-tune's records pipeline alike
    return train_fine_tuned(plan, job, options) if plan.mode == "fine_tune" else train_frozen(plan, job, options)


def format_report(report: TrainingReport) -> str:
    rows = ", ".join(f"{name} {count}" for name, count in report.rows.items())
    lines = [format_metrics(f"{report.job} ({report.mode}, features {report.features}): test split", report.metrics),
             f"  rows: {rows}",
             f"  epochs: {report.training['epochs_run']} (best {report.training['best_epoch']}), "
             f"{report.seconds:.1f}s"]
    lines += [f"  {name}: {path}" for name, path in report.outputs.items()]
    return "\n".join(lines)


def finish_training(report: TrainingReport) -> int:
    print(format_report(report))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, flags.TRAIN, run, finish_training)


if __name__ == "__main__":
    exit_process(main())
