"""TF Hub handles → loaded encoders: the `load_model` half of the embedding step.

An `EncoderSpec` names a module (a tfhub.dev / Kaggle URL, or a local or `gs://` SavedModel folder: anything
`hub.KerasLayer` accepts) and how to call it. `probe_encoder` loads it once on the launcher to check it and read
its output width and image size, so a bad handle fails at start in one line; `LoadedEncoder` is what a worker
builds in `setup()` (through `shared.Shared`, once per process) and calls per batch.

An encoder is identified by its content, not its handle: `encoder_fingerprint` hashes the SavedModel's graph,
variables and assets, `functions_fingerprint` the bodies of its functions (which the first does not see),
`probe_encoder` records both in the spec, and `schemas.embeddings.spec_identity` keeps what
decides the vectors (that fingerprint and how the module is called), so the same model at another path is the same
encoder and another model saved over the same path is not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Literal, NamedTuple

import numpy as np

from encoders.function_library import FINGERPRINT_FILE, functions_fingerprint
from encoders.preprocessing import to_model_inputs
from encoders.runtime import hub, tf

Modality = Literal["image", "text"]
DEFAULT_IMAGE_SIZE = 224
_PROBE_BATCH = 2
PROBE_CACHE_VERSION = 2  # raise when what a probe checks changes: older remembered probes are then not used
# What decides an encoder's vectors, so what must match for two runs' embeddings to be comparable: the module's
# content and how it is called. Not the handle (where it lies) nor the name (what this project calls it).

log = logging.getLogger(__name__)


class EncoderConfigError(ValueError):
    """A handle that cannot be used as an encoder; the message is one line, fit for the console."""


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """How to load and call one encoder, plus what `probe_encoder` learnt about it."""

    modality: Modality
    handle: str
    signature: str | None = None
    output_key: str | None = None
    image_size: int | None = None  # images only: the module's fixed input size, else the --image_size flag
    dim: int | None = None  # output width, filled by probe_encoder
    name: str | None = None  # the project's own name for a baked pretrained encoder, if it is one
    fingerprint: str | None = None  # encoder_fingerprint(handle), filled by probe_encoder
    # functions_fingerprint(handle), filled by probe_encoder: what `fingerprint` does not see (see there). None for
    # a module without fingerprint.pb (its `fingerprint` hashes every file) and in specs written before it existed.
    functions_fingerprint: str | None = None
    # Images only: how the decoder's [0, 1] RGB pixels become the module's input (encoders.preprocessing), and how
    # they are resized to image_size. None is the default of each (unit, area).
    input_convention: str | None = None
    resize: str | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if v is not None}, sort_keys=True)

    @property
    def cache_tag(self) -> str:
        return self.to_json()


def sha256_of_file(path: str) -> str:
    """SHA-256 (hex) of a file's bytes, through tf.io.gfile: local, gs:// and every filesystem TF reads."""
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_under(folder: str) -> list[tuple[str, str]]:
    """Every file under `folder` (recursively, any TF filesystem), sorted: (path relative to `folder`, full path)."""
    found = []
    for directory, _, names in tf.io.gfile.walk(folder):
        for name in names:
            path = tf.io.gfile.join(directory, name)
            found.append((path[len(folder):].lstrip("/"), path))
    return sorted(found)


def sha256_of_files(folder: str) -> dict[str, str]:
    """Every file under `folder` (recursively): relative path → SHA-256 of its bytes; {} when it is no folder."""
    if not tf.io.gfile.isdir(folder):
        return {}
    return {relative: sha256_of_file(path) for relative, path in files_under(folder)}


def encoder_fingerprint(handle: str) -> str:
    """The content fingerprint of the module a handle names (SHA-256, hex): the same for the same model wherever it
    lies (a copy at another path, relative or absolute, another cache folder, gs://), different for another model,
    even one saved over the same folder. Hub URLs are fingerprinted in the folder `hub.resolve` downloaded them to.

    A SavedModel with a fingerprint.pb (TF >= 2.12) is identified by the graph hashes TensorFlow wrote there
    (graph_def_program_hash, signature_def_hash, saved_object_graph_hash: unlike saved_model_checksum, they do not
    change when the same model is saved again), the SHA-256 of variables/variables.index and of the assets.
    fingerprint.pb's own checkpoint_hash is a hash of that index file, which holds a CRC32C of every variable's
    bytes (TensorFlow checks them on restore), so the variable values are covered without reading the variables
    themselves (a remote model is not downloaded twice); the index is hashed here rather than taken from
    fingerprint.pb so that variables rewritten by a TensorFlow that writes no fingerprint are seen. The assets
    (e.g. a tokenizer's vocabulary) are hashed because fingerprint.pb does not cover them. Any other module (no
    fingerprint.pb: older SavedModels, TF1 Hub modules): the SHA-256 of every file in its folder.
    fingerprint.pb's graph hash does not cover the function library, where a TF2 module's ops live:
    `functions_fingerprint` does, and the spec carries both.
    Raises OSError / ValueError when the handle does not resolve or a file cannot be read.
    """
    path = hub.resolve(handle).rstrip("/")
    if tf.io.gfile.exists(tf.io.gfile.join(path, FINGERPRINT_FILE)):
        fingerprint = tf.saved_model.experimental.read_fingerprint(path)
        index = tf.io.gfile.join(path, "variables", "variables.index")
        content = {
            "graph_def_program_hash": fingerprint.graph_def_program_hash,
            "signature_def_hash": fingerprint.signature_def_hash,
            "saved_object_graph_hash": fingerprint.saved_object_graph_hash,
            "variables_index": sha256_of_file(index) if tf.io.gfile.exists(index) else None,
            "assets": sha256_of_files(tf.io.gfile.join(path, "assets")),
        }
    else:
        content = {"files": sha256_of_files(path)}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def save_reusable_module(module: tf.Module, path: str, variables: list[tf.Variable] | None = None,
                         trainable_variables: list[tf.Variable] | None = None) -> str:
    """`module` (its `__call__` a tf.function) saved at `path` as a Reusable SavedModel, what hub.KerasLayer loads.

    The API wants `variables`, `trainable_variables` and `regularization_losses` as attributes of the root;
    tf.Module's are read-only properties that are not saved, so the export goes through a plain trackable root that
    carries them (and the module, to track its lookup tables). They are the module's own unless given (a Keras 3
    model's variables are not tf.Variables that tf.Module finds). Returns `path`.
    """
    root = tf.train.Checkpoint()
    root.module = module
    root.__call__ = module.__call__
    root.variables = list(module.variables if variables is None else variables)
    root.trainable_variables = list(module.trainable_variables if trainable_variables is None
                                    else trainable_variables)
    root.regularization_losses = []
    tf.saved_model.save(root, path)
    return path


def model_inputs(spec: EncoderSpec, inputs: tf.Tensor) -> tf.Tensor:
    """What the module is called with: an image encoder's pixels ([0, 1] RGB) in its input convention, in the
    graph; texts as they are. The embedding job, the fine-tuning model and so the fine-tuned serving model all call
    their encoder through it."""
    return to_model_inputs(inputs, spec.input_convention) if spec.modality == "image" else inputs


def keras_layer(spec: EncoderSpec, trainable: bool = False, name: str | None = None) -> hub.KerasLayer:
    """The module as a Keras layer, called the way the spec says (signature, output key); trainable to fine-tune."""
    kwargs = {"trainable": trainable}
    if name:
        kwargs["name"] = name
    if spec.signature:
        kwargs["signature"] = spec.signature
        kwargs["signature_outputs_as_dict"] = spec.output_key is None
    if spec.output_key:
        kwargs["output_key"] = spec.output_key
    return hub.KerasLayer(spec.handle, **kwargs)


def _fixed_image_size(layer) -> int | None:
    """The H (= W) of the module's input signature when it is fixed, e.g. [None, 224, 224, 3] → 224."""
    # What hub.KerasLayer calls: a signature's ConcreteFunction, or the restored root whose __call__ is a
    # RestoredFunction holding one ConcreteFunction per traced input signature.
    fn = layer._callable
    specs = []
    for candidate in (fn, getattr(fn, "__call__", None)):  # noqa: B004 (the attribute itself, not callability)
        if hasattr(candidate, "structured_input_signature"):
            specs.extend(tf.nest.flatten(candidate.structured_input_signature))
        for concrete in getattr(candidate, "_list_all_concrete_functions", lambda: [])():
            specs.extend(tf.nest.flatten(concrete.structured_input_signature))
    for spec in specs:
        if isinstance(spec, tf.TensorSpec) and spec.shape.rank == 4 and spec.dtype == tf.float32:
            height, width = spec.shape[1], spec.shape[2]
            if height is not None and height == width:
                return int(height)
    return None


def one_line(error: Exception) -> str:
    """The telling line of a TF/Keras error: Keras wraps the cause under 'Exception encountered when calling...'."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if not line.startswith(("Exception encountered", "Call arguments", "•"))]
    text = (telling or lines or [type(error).__name__])[0].split(" Received args:")[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _signatures_hint(spec: EncoderSpec) -> str:
    """For a SavedModel with no callable root (a Keras 3 `model.export()`, a TF serving export) and no signature
    asked for: the signatures it has, to pass with --<modality>_signature. Empty where there is nothing to say."""
    if spec.signature:
        return ""
    try:
        names = sorted(tf.saved_model.load(hub.resolve(spec.handle)).signatures)
    except Exception:  # not a SavedModel at all: the load error says enough
        return ""
    return f"; pass --{spec.modality}_signature, one of: {', '.join(names)}" if names else ""


def _probe_input(modality: Modality, image_size: int) -> tf.Tensor:
    if modality == "image":
        return tf.zeros([_PROBE_BATCH, image_size, image_size, 3], tf.float32)
    return tf.constant(["hubembed start-up probe", ""])


class Fingerprints(NamedTuple):
    """A module's two content fingerprints, named as the EncoderSpec fields they fill."""

    fingerprint: str  # encoder_fingerprint
    functions_fingerprint: str | None  # functions_fingerprint


def content_fingerprints(handle: str) -> Fingerprints:
    """Both fingerprints of the module a handle names. Raises as encoder_fingerprint does."""
    return Fingerprints(encoder_fingerprint(handle), functions_fingerprint(handle))


def _readable_fingerprints(handle: str) -> Fingerprints | None:
    """content_fingerprints(handle), or None where they cannot be read (not there, not a SavedModel: the full probe
    then says why, in one line)."""
    try:
        return content_fingerprints(handle)
    except Exception:
        return None


def _probe_cache_path(probe_cache: str, spec: EncoderSpec, fingerprints: Fingerprints,
                      image_size_flag: int | None) -> str:
    """Where the probe of this module content, called this way, is remembered."""
    key = json.dumps([PROBE_CACHE_VERSION, spec.modality, *fingerprints, spec.signature, spec.output_key,
                      image_size_flag])
    return os.path.join(probe_cache, hashlib.sha256(key.encode()).hexdigest() + ".json")


def probe_encoder(spec: EncoderSpec, image_size_flag: int | None = None,
                  probe_cache: str | None = None) -> EncoderSpec:
    """Load the module, run a tiny batch, and return the spec with its image size, output width and fingerprint.

    Raises EncoderConfigError with a one-line message for anything a user must fix: a handle that does not load,
    a module that does not take the modality's input, or an output that is not a [B, d] float tensor.
    With `probe_cache` (a local folder), a module whose content was probed before, called the same way, is not
    loaded again: its probe is read back by its content fingerprint (a nightly run saves loading each model twice).
    """
    fingerprints = _readable_fingerprints(spec.handle) if probe_cache else None
    cached = _probe_cache_path(probe_cache, spec, fingerprints, image_size_flag) if fingerprints else None
    if cached and os.path.exists(cached):
        with open(cached, encoding="utf-8") as handle:
            known = json.load(handle)
        return dataclasses.replace(spec, image_size=known["image_size"], dim=known["dim"], **fingerprints._asdict())
    probed = _probe(spec, image_size_flag, fingerprints)
    if cached:
        os.makedirs(probe_cache, exist_ok=True)
        temporary = f"{cached}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump({"image_size": probed.image_size, "dim": probed.dim}, handle)
        os.replace(temporary, cached)  # whole or absent, whatever runs at once
    return probed


def _probe(spec: EncoderSpec, image_size_flag: int | None, fingerprints: Fingerprints | None = None) -> EncoderSpec:
    try:
        layer = keras_layer(spec)
    except Exception as error:  # hub raises many kinds (OSError, ValueError, NotFoundError, HTTP errors)
        raise EncoderConfigError(f"cannot load {spec.modality} encoder {spec.handle!r}: "
                                 f"{one_line(error).rstrip('.')}{_signatures_hint(spec)}") from error
    image_size = None
    if spec.modality == "image":
        fixed = _fixed_image_size(layer)
        if fixed and image_size_flag and fixed != image_size_flag:
            raise EncoderConfigError(
                f"image encoder {spec.handle!r} takes {fixed}x{fixed} images but --image_size={image_size_flag}")
        image_size = fixed or image_size_flag or DEFAULT_IMAGE_SIZE
    try:
        output = layer(model_inputs(spec, _probe_input(spec.modality, image_size or DEFAULT_IMAGE_SIZE)))
    except Exception as error:
        expected = "[B, H, W, 3] float32 in [0, 1]" if spec.modality == "image" else "a [B] string tensor"
        raise EncoderConfigError(
            f"{spec.modality} encoder {spec.handle!r} does not take {expected}: {one_line(error)}") from error
    if isinstance(output, dict):
        raise EncoderConfigError(
            f"{spec.modality} encoder {spec.handle!r} returns a dict with keys {sorted(output)}: "
            f"pass --{spec.modality}_output_key to pick the embedding")
    shape = output.shape
    if shape.rank != 2 or shape[0] != _PROBE_BATCH or not output.dtype.is_floating:
        raise EncoderConfigError(
            f"{spec.modality} encoder {spec.handle!r} returns {output.dtype.name}{shape.as_list()}, "
            f"not a [B, d] float embedding")
    if fingerprints is None:  # not taken before the load (no probe cache), or not readable then
        started = time.perf_counter()
        try:
            fingerprints = content_fingerprints(spec.handle)  # after loading: a hub URL is downloaded by then
        except Exception as error:  # OSError, NotFoundError, a fingerprint.pb or saved_model.pb that does not parse
            raise EncoderConfigError(
                f"cannot fingerprint {spec.modality} encoder {spec.handle!r}: {one_line(error)}") from error
        log.info("%s encoder %s: fingerprint %s (%.2fs)", spec.modality, spec.handle, fingerprints.fingerprint[:16],
                 time.perf_counter() - started)
    return dataclasses.replace(spec, image_size=image_size, dim=int(shape[1]), **fingerprints._asdict())


class LoadedEncoder:
    """One module loaded in this process, called with a fixed input signature so odd batch sizes never retrace."""

    def __init__(self, spec: EncoderSpec, device: str):
        started = time.perf_counter()
        self.spec = spec
        self.device = device
        with tf.device(device):
            layer = keras_layer(spec)
        if spec.modality == "image":
            input_signature = [tf.TensorSpec([None, spec.image_size, spec.image_size, 3], tf.float32)]
        else:
            input_signature = [tf.TensorSpec([None], tf.string)]
        # autograph=False: the module's graph is already built; converting this wrapper's Python costs a worker
        # a fraction of a second for nothing.
        self._call = tf.function(lambda inputs: tf.cast(layer(model_inputs(spec, inputs)), tf.float32),
                                 input_signature=input_signature, autograph=False)
        log.info("loaded %s encoder %s on %s in %.1fs", spec.modality, spec.handle, device,
                 time.perf_counter() - started)

    def __call__(self, inputs: np.ndarray | tf.Tensor) -> np.ndarray:
        with tf.device(self.device):
            return self._call(tf.convert_to_tensor(inputs)).numpy()
