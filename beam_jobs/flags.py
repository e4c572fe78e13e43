"""Each job's own flags, defined once, and the jobs the `hubembed` console script runs; no Beam, no TensorFlow.

A job's flags are added by one function taking an argparse parser: the job's PipelineOptions subclass calls it
from `_add_argparse_args` (Beam's parser, shared by every options class imported in the process, hence `add_flag`),
and `hubembed <command>` calls it on a parser of its own, to print help and check flag types in a fraction of a
second, before the job's module (Beam, TensorFlow: seconds of imports) is imported at all.

The defaults and choices the flags share with the steps that use them (the readers' formats, prepare's limits,
the head's class-weight modes) live in schemas/, the image encoders' input conventions in encoders.preprocessing:
none of them imports Beam or TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from beam_jobs.options import add_flag
from encoders.preprocessing import AREA, CONVENTION_NAMES, RESIZE_METHODS
from schemas.embeddings import VECTOR_CHOICES, VECTORS_CONCAT
from schemas.records import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_TEXT_CHARS, INPUT_FORMATS
from schemas.training import CLASS_WEIGHT_MODES, FEATURES

NO_ENCODER = "none"  # an encoder flag's value that leaves the modality out

BEAM_EPILOG = ("Any other flag (--runner, --project, --region, ...) goes to Beam. Without --runner (or with "
               "DirectRunner) the job runs on this machine, on Beam's FnApiRunner; --direct_num_workers N "
               "--direct_running_mode multi_processing runs it in N worker processes, each with its share of the "
               "cores for TensorFlow.")


def add_batch_flags(group) -> None:
    """The model batches' bounds, the same flags (and defaults: one process may hold both jobs' options) in every
    job that runs a model on BatchElements' batches."""
    add_flag(group, "--batch_size", type=int, default=32, help="largest batch sent through a model")
    add_flag(group, "--min_batch_size", type=int, default=None,
             help="smallest batch (default: --batch_size, so every batch is full but a bundle's last); below it, "
                  "BatchElements adapts by how long the step after it takes, which the embedding job's model "
                  "thread hides from it")


def batch_bounds(job) -> tuple[int, int]:
    """(smallest, largest) batch from add_batch_flags' flags: --min_batch_size left out is --batch_size."""
    return (job.batch_size if job.min_batch_size is None else job.min_batch_size), job.batch_size


def add_image_input_flags(group) -> None:
    """How an image encoder is fed, the same flags in every job that runs one (embed, fine-tune)."""
    add_flag(group, "--image_size", type=int, default=None,
             help="image height = width fed to the image encoder when its input signature does not "
                  "fix it (default 224)")
    add_flag(group, "--image_encoder_weights", default=None,
             help="weights file (.weights.h5 / .h5, local or gs://) of a keras.applications.NAME image encoder")
    add_flag(group, "--image_input_convention", default=None, choices=CONVENTION_NAMES,
             help="the image encoder's input: unit ([0, 1] RGB, TF Hub's), symmetric ([-1, 1]), caffe (BGR less "
                  "the ImageNet means), torch (ImageNet mean/std), raw (0-255); default: the encoder's own (a "
                  "Keras application family's preprocess_input, else unit)")
    add_flag(group, "--image_resize", default=AREA, choices=tuple(RESIZE_METHODS),
             help="how images are brought to the encoder's size: area (shrink by area, enlarge bilinear), "
                  "bilinear, bicubic (both antialiased) or nearest")


def add_embed_flags(parser: argparse.ArgumentParser) -> None:
    """The embedding job's flags (beam_jobs.embed_corpus)."""
    group = parser.add_argument_group("hubembed embed_corpus")
    add_flag(group, "--input", help="manifest (.jsonl/.csv/.parquet, globs ok), image folder root, "
                                    "WebDataset shards (shard-{000000..000009}.tar) or TFRecord files")
    add_flag(group, "--output", help="output folder, published when the run succeeds: embeddings-*.parquet, "
                                     "_dead_letters/, _run_report.json, then _SUCCESS")
    add_flag(group, "--reuse", action="append", default=[],
             help="an earlier output (folder or glob of folders, e.g. 'ROOT/dt=*'; repeatable) whose "
                  "vectors unchanged records take instead of being embedded again")
    add_flag(group, "--vectors", default=VECTORS_CONCAT, choices=VECTOR_CHOICES,
             help="vector columns to write: the multimodal `embedding` (concat), the per-modality "
                  "ones (modalities), or both")
    add_flag(group, "--float16", action="store_true", help="store vectors as float16 (half the size)")
    add_flag(group, "--no_checkpoint", action="store_true",
             help="do not checkpoint finished batches under _staging/ (a killed run then starts over)")
    add_flag(group, "--input_format", default="auto", choices=("auto", *INPUT_FORMATS),
             help="force the input format instead of inferring it from --input")
    for modality, default_name in (("image", "MobileNet V1 feature vector"), ("text", "all-MiniLM-L6-v2")):
        add_flag(group, f"--{modality}_encoder", default="",
                 help=f"{modality} encoder: a baked encoder's name (`hubembed encoders list`), a TF Hub / Kaggle "
                      f"handle, a SavedModel folder, a Keras model (.keras, .h5, Keras SavedModel folder"
                      f"{', or keras.applications.NAME with --image_encoder_weights' if modality == 'image' else ''})"
                      f", local or gs://; empty: the baked {default_name}; '{NO_ENCODER}': no {modality} embedding")
        add_flag(group, f"--{modality}_signature", default=None,
                 help=f"signature of the {modality} module to call (default: the module's __call__)")
        add_flag(group, f"--{modality}_output_key", default=None,
                 help=f"output key of the {modality} module's dict output, if it returns one")
    add_image_input_flags(group)
    add_flag(group, "--passthrough", default="", help="comma-separated input columns copied to the output")
    add_batch_flags(group)
    add_flag(group, "--num_shards", type=int, default=0, help="output Parquet files (0: the runner chooses)")
    add_flag(group, "--l2_normalize", action="store_true",
             help="L2-normalise each modality's vector before concatenating")
    add_flag(group, "--max_error_rate", type=float, default=0.01,
             help="exit non-zero when dead letters / records read exceeds this")
    add_flag(group, "--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
             help="images with more pixels (from the header) are dead-lettered, never decoded")
    add_flag(group, "--max_image_bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
             help="larger image files and image_bytes values are dead-lettered (image_too_large); a "
                  "file is never read past this many bytes")
    add_flag(group, "--max_text_chars", type=int, default=DEFAULT_MAX_TEXT_CHARS,
             help="longer texts are dead-lettered (text_too_long) before any encoder sees them")
    add_flag(group, "--device", default="auto", choices=("auto", "cpu", "gpu"),
             help="where the encoders run: the GPU when TensorFlow sees one, or forced")
    add_flag(group, "--mixed_precision", action="store_true",
             help="run the encoders in mixed precision: float16 on a GPU, bfloat16 on a CPU with bfloat16 "
                  "instructions (AMX, AVX512_BF16); faster, vectors move slightly (README), recorded in the "
                  "metadata, and --reuse keeps such outputs apart from float32 ones")
    for field, default in (("id", "id"), ("image", "image/encoded"), ("text", "text"), ("label", "label")):
        add_flag(group, f"--tfrecord_{field}_key", default=default,
                 help=f"tf.train.Example feature holding the {field}")
    add_flag(group, "--progress_interval", type=float, default=10.0, help="seconds between progress lines")
    add_flag(group, "--overwrite", action="store_true",
             help="replace the output of an earlier run in --output instead of refusing to start")
    add_flag(group, "--encoder_cache_dir", default=None,
             help="where the baked default encoders live (default $HUBEMBED_CACHE_DIR or "
                  "~/.cache/hubembed/encoders)")


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """The training job's flags (beam_jobs.train_classifier)."""
    group = parser.add_argument_group("hubembed train_classifier")
    add_flag(group, "--input", help="an embed_corpus output folder or a glob of its Parquet files (local, gs://); "
                                    "with --fine_tune: the raw corpus, as embed_corpus's --input")
    add_flag(group, "--output", help="output folder: model/, transform/, training_report.json, "
                                     "confusion_matrix.png, training_curves.png, test_predictions.parquet")
    add_flag(group, "--features", default="both", choices=FEATURES,
             help="image_embedding, text_embedding, or both concatenated (with has_image/has_text)")
    add_flag(group, "--validation_ratio", type=float, default=0.15, help="share of ids in the validation split")
    add_flag(group, "--test_ratio", type=float, default=0.2, help="share of ids in the test split")
    add_flag(group, "--top_k_labels", type=int, default=0,
             help="keep only the k most frequent labels (0: all); rows of other labels are skipped")
    add_flag(group, "--label_frequency_threshold", type=int, default=0,
             help="keep only labels seen at least this often in the training split (0: all)")
    add_flag(group, "--hidden_units", default="128", help="comma-separated sizes of the head's Dense(relu) "
                                                          "layers, each followed by Dropout")
    add_flag(group, "--dropout", type=float, default=0.2, help="dropout rate after each hidden layer")
    add_flag(group, "--modality_dropout", type=float, default=0.4,
             help="--features both: while training, hide a row's image (or its text) with this probability "
                  "each, as if missing, so the head learns each modality alone too (0: off)")
    add_flag(group, "--learning_rate", type=float, default=3e-3, help="Adam learning rate of the head")
    add_flag(group, "--epochs", type=int, default=200, help="most epochs; early stopping usually ends sooner")
    add_flag(group, "--batch_size", type=int, default=32, help="training batch size")
    add_flag(group, "--patience", type=int, default=20,
             help="epochs without a better validation loss before stopping (best weights restored)")
    add_flag(group, "--class_weights", default="none", choices=CLASS_WEIGHT_MODES,
             help="'balanced': weight each label by n_rows / (n_labels * its rows), for imbalance")
    add_flag(group, "--seed", type=int, default=0, help="seed of weights, dropout and shuffling")
    add_flag(group, "--overwrite", action="store_true",
             help="replace the output of an earlier run in --output instead of refusing to start")
    fine = parser.add_argument_group("hubembed train_classifier --fine_tune")
    add_flag(fine, "--fine_tune", action="store_true",
             help="train the encoders too (hub.KerasLayer trainable=True), from the raw corpus")
    add_flag(fine, "--input_format", default="auto", choices=("auto", *INPUT_FORMATS),
             help="the raw corpus's format (as embed_corpus)")
    add_flag(fine, "--image_encoder", default="", help="image encoder handle (as embed_corpus)")
    add_flag(fine, "--text_encoder", default="", help="text encoder handle (as embed_corpus)")
    add_image_input_flags(fine)
    add_flag(fine, "--fine_tune_learning_rate", type=float, default=1e-4,
             help="Adam learning rate of the whole model (encoders and head) in fine-tune mode")
    add_flag(fine, "--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
             help="images with more pixels are dead-lettered (as embed_corpus)")
    add_flag(fine, "--encoder_cache_dir", default=None, help="where the baked default encoders live")


def add_predict_flags(parser: argparse.ArgumentParser) -> None:
    """The scoring job's flags (beam_jobs.predict)."""
    group = parser.add_argument_group("hubembed predict")
    add_flag(group, "--input", help="an embed_corpus output folder, or a glob of its Parquet files (local or gs://)")
    add_flag(group, "--model", help="the serving model folder train_classifier wrote (<output>/model)")
    add_flag(group, "--output", help="output folder: predictions-*.parquet, _dead_letters/, _run_report.json, "
                                     "then _SUCCESS")
    add_flag(group, "--top_k", type=int, default=3, help="labels (with probabilities) kept per row")
    add_batch_flags(group)
    add_flag(group, "--num_shards", type=int, default=0, help="output Parquet files (0: the runner chooses)")
    add_flag(group, "--max_error_rate", type=float, default=0.01,
             help="exit non-zero when dead letters / rows read exceeds this")
    add_flag(group, "--overwrite", action="store_true",
             help="replace the output of an earlier run in --output instead of refusing to start")


def add_inspect_flags(parser: argparse.ArgumentParser) -> None:
    """The inspection's flags (beam_jobs.inspect_output). OUTPUT is optional to argparse so that Beam's parser,
    which every options class in the process shares, never requires it; the job says so in one line when missing."""
    group = parser.add_argument_group("hubembed inspect", "Reads OUTPUT and writes the report to --output; no "
                                                          "pipeline runs, so the runner flags of the note below "
                                                          "change nothing.")
    add_flag(group, "embeddings_output", nargs="?", metavar="OUTPUT",
             help="an output folder of the embedding job (required; local or gs://): its embeddings-*.parquet, "
                  "_dead_letters/, _run_report.json and _SUCCESS are read, never written")
    add_flag(group, "--output", metavar="REPORT_DIR",
             help="folder for the report (required): inspect.json, map.png, neighbours.json and neighbours.png, "
                  "replaced if an earlier inspect wrote them; not OUTPUT nor inside it, where Parquet readers would "
                  "meet them")
    add_flag(group, "--sample", type=int, default=5000, metavar="N",
             help="rows kept in the uniform random sample (reservoir, seeded) that the map and the neighbours are "
                  "drawn from; memory is bounded by it, whatever the output's size (at least 2)")
    add_flag(group, "--neighbours", type=int, default=5, metavar="K",
             help="nearest neighbours shown per query (cosine similarity; the query itself left out)")
    add_flag(group, "--queries", type=int, default=5, metavar="Q",
             help="sampled records whose neighbours are shown (0: none; at most the sample's rows)")
    add_flag(group, "--image_column", default=None, metavar="NAME",
             help="a passthrough column holding each record's image path or URI (embed with --passthrough image), "
                  "for the contact sheet (default: `image` when the output has it; without one, no contact sheet)")
    add_flag(group, "--image_root", default=None, metavar="FOLDER",
             help="folder (local or gs://) that relative image paths are resolved against, e.g. the manifest's "
                  "folder (default: the current folder)")
    add_flag(group, "--seed", type=int, default=0, metavar="S",
             help="seed of the sample and of the queries drawn from it")


@dataclasses.dataclass(frozen=True)
class JobCommand:
    """A job as the command line sees it: `hubembed <name>` or `python -m <module>`, whose `main(argv)` runs it."""

    name: str
    module: str
    summary: str
    add_flags: Callable[[argparse.ArgumentParser], None]

    def parser(self, prog: str | None = None) -> argparse.ArgumentParser:
        """The job's own flags, for --help and flag types; Beam's flags are left for Beam (parse_known_args).
        No abbreviations: Beam's parser takes none, so `--inp` must not pass here for `--input`."""
        parser = argparse.ArgumentParser(prog=prog or f"python -m {self.module}", description=self.summary,
                                         epilog=BEAM_EPILOG, allow_abbrev=False)
        self.add_flags(parser)
        return parser


EMBED = JobCommand("embed", "beam_jobs.embed_corpus",
                   "The embedding job: an image/text corpus → multimodal TF Hub embeddings in Parquet.",
                   add_embed_flags)
TRAIN = JobCommand("train", "beam_jobs.train_classifier",
                   "The downstream stage: a classifier on the embedding job's Parquet, or fine-tuned from the raw "
                   "corpus.", add_train_flags)
PREDICT = JobCommand("predict", "beam_jobs.predict",
                     "The scoring job: embeddings Parquet + a classifier from train_classifier → predictions "
                     "Parquet.", add_predict_flags)
INSPECT = JobCommand("inspect", "beam_jobs.inspect_output",
                     "A look at an embedding job's output: counts, modality coverage, vector norms, dead letters, "
                     "labels and encoders, with a 2-D map and nearest neighbours of a sample.", add_inspect_flags)
JOBS = {command.name: command for command in (EMBED, TRAIN, PREDICT, INSPECT)}
