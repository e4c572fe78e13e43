"""Keras models as encoders: converted once into a Reusable SavedModel that `hub.KerasLayer` loads like a Hub module.

What a team already has, beside TF Hub modules:
- a Keras model file: `.keras` (Keras 3, what TF 2.16+ writes, or tf-keras' zip format), `.h5` / `.hdf5`
  (tf-keras' legacy format), or a tf-keras SavedModel folder (it holds `keras_metadata.pb`);
- `keras.applications.<Name>` with a weights file (`--image_encoder_weights`, local or gs://): the architecture is
  built without its top, pooled by global average, at the job's image size, and the weights loaded into it. No
  download happens at run time.

The model is wrapped in a module whose `__call__(inputs, training=False)` takes what the job feeds (images
[B, H, W, 3] float32 in the encoder's input convention, or texts [B] tf.string) and returns [B, d] float32: an output
with more axes (a feature map, per-token vectors) is averaged over them. Every variable is exposed as the Reusable
SavedModel API asks, so `hub.KerasLayer(path, trainable=True)` fine-tunes it. The conversion is keyed by the
source's content (and the architecture, image size, versions), written beside its final name and renamed into
place (encoders.atomic), so a second run, or a worker, finds it done.

An image model's input convention is part of its spec (encoders.preprocessing): a keras.applications family's
`preprocess_input`, recognised by what it does to known pixels, is the default; a model file says nothing of it,
so the launcher asks for `--image_input_convention` rather than guess.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable

import numpy as np

from encoders.atomic import build_folder_atomically
from encoders.hub_module import files_under, one_line, save_reusable_module, sha256_of_file, sha256_of_files
from encoders.preprocessing import CONVENTION_NAMES, to_model_inputs
from encoders.runtime import tf, tf_keras

APPLICATIONS_PREFIX = "keras.applications."
MODEL_FILE_SUFFIXES = (".keras", ".h5", ".hdf5")
SAVEDMODEL_MARKER = "keras_metadata.pb"  # what tf-keras writes into a SavedModel folder of a Keras model
CONVERTED_SUBDIR = "keras"  # in the encoder cache
# Bumped when what a conversion writes changes: converted folders are named after it, so an older one is not taken.
CONVERSION_REVISION = 1
PROVENANCE_FILE = "hubembed_keras_encoder.json"
DEFAULT_APPLICATION_SIZE = 224
# Pixels (0-255, RGB) a family's preprocess_input is tried on to recognise its convention: asymmetric in every
# channel, so a channel swap, a scale or a mean shows.
_CONVENTION_PROBE = np.array([[[[0.0, 64.0, 255.0], [255.0, 128.0, 3.0], [17.0, 200.0, 90.0]]]], np.float32)


class KerasEncoderError(ValueError):
    """A Keras source that cannot be used as an encoder; the message is one line."""


@dataclasses.dataclass(frozen=True)
class KerasEncoder:
    """A converted Keras model: its SavedModel folder in the cache, and the input convention it implies (None: the
    source does not say)."""

    path: str
    input_convention: str | None


def is_keras_source(handle: str) -> bool:
    """Whether an encoder handle names a Keras model rather than a Hub module (a file suffix, the applications prefix,
    or a folder holding keras_metadata.pb)."""
    handle = handle.strip()
    if handle.startswith(APPLICATIONS_PREFIX) or handle.lower().endswith(MODEL_FILE_SUFFIXES):
        return True
    if "://" in handle and not handle.startswith("gs://"):  # tfhub.dev / Kaggle URLs: never a Keras folder
        return False
    try:
        return tf.io.gfile.exists(tf.io.gfile.join(handle, SAVEDMODEL_MARKER))
    except tf.errors.OpError:
        return False


def convert_keras_encoder(handle: str, modality: str, cache_root: str, weights: str | None = None,
                          image_size: int | None = None) -> KerasEncoder:
    """The Keras model `handle` names, as a Reusable SavedModel in `<cache_root>/keras/`, converted on first use.

    Raises KerasEncoderError (one line) for a source that is missing, does not load, or is not an encoder of the
    modality.
    """
    handle = handle.strip()
    if handle.startswith(APPLICATIONS_PREFIX):
        if modality != "image":
            raise KerasEncoderError(f"{handle} is an image architecture, not a {modality} encoder")
        architecture = _application(handle)
        if not weights:
            raise KerasEncoderError(f"{handle} needs its weights: pass --image_encoder_weights (a .weights.h5 or .h5 "
                                    "file, local or gs://); nothing is downloaded at run time")
        size = image_size or DEFAULT_APPLICATION_SIZE
        convention = family_convention(architecture)
        key = {"architecture": handle, "weights": _content_digest(weights), "size": size}
        load = lambda local: _load_application(architecture, local["weights"], size)  # noqa: E731
        sources = {"weights": weights}
    else:
        if weights:
            raise KerasEncoderError(f"a weights file is for a keras.applications architecture, not {handle!r}")
        convention = None
        key = {"model": _content_digest(handle)}
        load = lambda local: _load_model_file(local["model"])  # noqa: E731
        sources = {"model": handle}
    import keras  # Keras 3, beside tf-keras: its version is part of what a conversion depends on

    key.update(modality=modality, revision=CONVERSION_REVISION, keras=keras.__version__,
               tf_keras=tf_keras.__version__, tensorflow=tf.__version__)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    target = os.path.join(cache_root, CONVERTED_SUBDIR, digest[:32])
    provenance = {"source": handle, "weights": weights, "modality": modality, "input_convention": convention,
                  "conversion_revision": CONVERSION_REVISION, "key": key}

    def build(folder: str) -> None:
        with tempfile.TemporaryDirectory(prefix="hubembed-keras-") as scratch:
            local = {name: _local_copy(path, scratch) for name, path in sources.items()}
            save_encoder_module(load(local), modality, folder)
        with open(os.path.join(folder, PROVENANCE_FILE), "w", encoding="utf-8") as out:
            json.dump(provenance, out, indent=1)

    build_folder_atomically(target, build)
    return KerasEncoder(target, convention)


def _application(handle: str) -> Callable:
    import keras

    name = handle[len(APPLICATIONS_PREFIX):]
    architecture = getattr(keras.applications, name, None)
    if not name.isidentifier() or not callable(architecture) or not name[:1].isupper():
        known = ", ".join(sorted(n for n in dir(keras.applications) if n[:1].isupper()))
        raise KerasEncoderError(f"{handle} is not a keras.applications architecture; known: {known}")
    return architecture


def family_convention(architecture: Callable) -> str:
    """The input convention of a keras.applications architecture: what its family's `preprocess_input` does to known
    pixels, matched against encoders.preprocessing's conventions (a pass-through is `raw`: the model rescales)."""
    family = sys.modules[architecture.__module__]
    preprocess = getattr(family, "preprocess_input", None)
    if preprocess is not None:
        prepared = np.asarray(preprocess(_CONVENTION_PROBE.copy()), np.float32)
        pixels = tf.constant(_CONVENTION_PROBE / 255.0)
        for name in CONVENTION_NAMES:
            if np.allclose(prepared, np.asarray(to_model_inputs(pixels, name)), rtol=1e-4, atol=1e-3):
                return name
    raise KerasEncoderError(f"cannot tell the input convention of keras.applications.{architecture.__name__} "
                            f"({family.__name__}.preprocess_input): pass --image_input_convention")


def _content_digest(path: str) -> str:
    """SHA-256 of a file, or of every file of a folder with its relative path (local or gs://)."""
    try:
        if tf.io.gfile.isdir(path):
            return hashlib.sha256(json.dumps(sha256_of_files(path), sort_keys=True).encode()).hexdigest()
        return sha256_of_file(path)
    except (tf.errors.OpError, OSError) as error:
        raise KerasEncoderError(f"cannot read Keras model {path!r}: {one_line(error)}") from error


def _local_copy(path: str, scratch: str) -> str:
    """`path` itself when local; a gs:// (or other remote) file or folder copied into `scratch` otherwise: the Keras
    loaders read local files."""
    if "://" not in path:
        return path
    base = os.path.join(scratch, os.path.basename(path.rstrip("/")) or "model")
    if tf.io.gfile.isdir(path):
        for relative, remote in files_under(path):
            os.makedirs(os.path.dirname(os.path.join(base, relative)), exist_ok=True)
            tf.io.gfile.copy(remote, os.path.join(base, relative))
    else:
        tf.io.gfile.copy(path, base)
    return base


def _keras_version_of(path: str) -> str | None:
    """The Keras version a `.keras` zip was written by (its metadata.json), or None when it says nothing."""
    try:
        with zipfile.ZipFile(path) as archive:
            return str(json.loads(archive.read("metadata.json")).get("keras_version") or "") or None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def _load_model_file(path: str):
    """A Keras model file or SavedModel folder, loaded by the Keras that wrote it (Keras 3 for a `.keras` file it
    wrote, else tf-keras; a legacy `.h5` that tf-keras refuses is tried in Keras 3 too)."""
    import keras

    loaders = [tf_keras.models.load_model, keras.saving.load_model]
    if path.lower().endswith(".keras") and (_keras_version_of(path) or "3").startswith("3"):
        loaders.reverse()
    elif os.path.isdir(path):
        loaders = loaders[:1]  # Keras 3 reads no SavedModel folder
    errors = []
    for loader in loaders:
        try:
            return loader(path, compile=False)
        except Exception as error:  # each Keras raises its own kinds (ValueError, TypeError, OSError, ...)
            errors.append(error)
    raise KerasEncoderError(f"cannot load Keras model {path!r}: {one_line(errors[0])}")


def _load_application(architecture: Callable, weights: str, size: int):
    try:
        model = architecture(weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3))
    except ValueError as error:
        raise KerasEncoderError(f"keras.applications.{architecture.__name__} at {size}x{size}: "
                                f"{one_line(error)}") from error
    try:
        with warnings.catch_warnings():  # a file that does not fit warns once per layer before it fails
            warnings.simplefilter("ignore")
            model.load_weights(weights)
    except Exception as error:  # a file of another architecture, with the top, or not a weights file
        raise KerasEncoderError(
            f"weights {weights!r} do not fit keras.applications.{architecture.__name__} without its top "
            f"(include_top=False): {one_line(error)}") from error
    return model


def _as_tf_variable(variable) -> tf.Variable:
    # Keras 3's variables wrap the tf.Variable (`.value`); tf-keras' are tf.Variables, whose `.value` is a method.
    return variable if isinstance(variable, tf.Variable) else variable.value


class KerasEncoderModule(tf.Module):
    """A Keras model called as the embedding job calls an encoder: [B, H, W, 3] float32 or [B] strings → [B, d]."""

    def __init__(self, model, modality: str):
        super().__init__(name="hubembed_keras_encoder")
        self.model = model
        inputs = list(getattr(model, "inputs", None) or [])
        if len(inputs) != 1:
            raise KerasEncoderError(f"a Keras encoder takes one input; this model takes {len(inputs)}")
        shape = tuple(inputs[0].shape)
        if modality == "image":
            if len(shape) != 4 or shape[-1] != 3:
                raise KerasEncoderError(f"an image encoder takes [B, H, W, 3] images; this model takes {list(shape)}")
            signature = tf.TensorSpec([None, shape[1], shape[2], 3], tf.float32)
        else:
            if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
                raise KerasEncoderError(f"a text encoder takes [B] or [B, 1] strings; this model takes {list(shape)}")
            signature = tf.TensorSpec([None], tf.string)
        as_model_input = (lambda texts: texts[:, None]) if len(shape) == 2 else (lambda inputs: inputs)

        @tf.function
        def call(inputs, training=False):
            outputs = self.model(as_model_input(inputs), training=training)
            if isinstance(outputs, (dict, list, tuple)):
                raise KerasEncoderError("a Keras encoder returns one tensor; this model returns several")
            outputs = tf.cast(outputs, tf.float32)
            if outputs.shape.rank > 2:  # a feature map or per-token vectors: pooled to [B, d]
                outputs = tf.reduce_mean(outputs, axis=list(range(1, outputs.shape.rank - 1)))
            return outputs

        # Traced for both values of `training` (hub.KerasLayer passes a Python bool): batch norm and dropout behave
        # as Keras says in each, and the SavedModel keeps both.
        for training in (False, True):
            call.get_concrete_function(signature, training)
        self.__call__ = call


def save_encoder_module(model, modality: str, path: str) -> None:
    """`model` wrapped (KerasEncoderModule) and saved at `path` as a Reusable SavedModel, every variable exposed."""
    try:
        module = KerasEncoderModule(model, modality)
    except (ValueError, TypeError, tf.errors.OpError) as error:
        if isinstance(error, KerasEncoderError):
            raise
        raise KerasEncoderError(f"the Keras model does not take the {modality} encoder's input: "
                                f"{one_line(error)}") from error
    save_reusable_module(module, path, variables=[_as_tf_variable(v) for v in model.weights],
                         trainable_variables=[_as_tf_variable(v) for v in model.trainable_weights])
