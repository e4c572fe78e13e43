"""TF Hub handles → loaded encoders: the `load_model` half of the embedding step.

An `EncoderSpec` names a module (a tfhub.dev / Kaggle URL, or a local or `gs://` SavedModel folder: anything
`hub.KerasLayer` accepts) and how to call it. `probe_encoder` loads it once on the launcher to check it and read
its output width and image size, so a bad handle fails at start in one line; `LoadedEncoder` is what a worker
builds in `setup()` (through `shared.Shared`, once per process) and calls per batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Literal

import numpy as np

from encoders.runtime import hub, tf

Modality = Literal["image", "text"]
DEFAULT_IMAGE_SIZE = 224
_PROBE_BATCH = 2

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

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if v is not None}, sort_keys=True)

    @property
    def cache_tag(self) -> str:
        return self.to_json()


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


def _one_line(error: Exception) -> str:
    """The telling line of a TF/Keras error: Keras wraps the cause under 'Exception encountered when calling...'."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if not line.startswith(("Exception encountered", "Call arguments", "•"))]
    text = (telling or lines or [type(error).__name__])[0].split(" Received args:")[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _probe_input(modality: Modality, image_size: int) -> tf.Tensor:
    if modality == "image":
        return tf.zeros([_PROBE_BATCH, image_size, image_size, 3], tf.float32)
    return tf.constant(["hubembed start-up probe", ""])


def probe_encoder(spec: EncoderSpec, image_size_flag: int | None = None) -> EncoderSpec:
    """Load the module, run a tiny batch, and return the spec with its image size and output width.

    Raises EncoderConfigError with a one-line message for anything a user must fix: a handle that does not load,
    a module that does not take the modality's input, or an output that is not a [B, d] float tensor.
    """
    try:
        layer = keras_layer(spec)
    except Exception as error:  # hub raises many kinds (OSError, ValueError, NotFoundError, HTTP errors)
        raise EncoderConfigError(f"cannot load {spec.modality} encoder {spec.handle!r}: {_one_line(error)}") from error
    image_size = None
    if spec.modality == "image":
        fixed = _fixed_image_size(layer)
        if fixed and image_size_flag and fixed != image_size_flag:
            raise EncoderConfigError(
                f"image encoder {spec.handle!r} takes {fixed}x{fixed} images but --image_size={image_size_flag}")
        image_size = fixed or image_size_flag or DEFAULT_IMAGE_SIZE
    try:
        output = layer(_probe_input(spec.modality, image_size or DEFAULT_IMAGE_SIZE))
    except Exception as error:
        expected = "[B, H, W, 3] float32 in [0, 1]" if spec.modality == "image" else "a [B] string tensor"
        raise EncoderConfigError(
            f"{spec.modality} encoder {spec.handle!r} does not take {expected}: {_one_line(error)}") from error
    if isinstance(output, dict):
        raise EncoderConfigError(
            f"{spec.modality} encoder {spec.handle!r} returns a dict with keys {sorted(output)}: "
            f"pass --{spec.modality}_output_key to pick the embedding")
    shape = output.shape
    if shape.rank != 2 or shape[0] != _PROBE_BATCH or not output.dtype.is_floating:
        raise EncoderConfigError(
            f"{spec.modality} encoder {spec.handle!r} returns {output.dtype.name}{shape.as_list()}, "
            f"not a [B, d] float embedding")
    return dataclasses.replace(spec, image_size=image_size, dim=int(shape[1]))


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
        self._call = tf.function(lambda inputs: tf.cast(layer(inputs), tf.float32), input_signature=input_signature)
        log.info("loaded %s encoder %s on %s in %.1fs", spec.modality, spec.handle, device,
                 time.perf_counter() - started)

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        with tf.device(self.device):
            return self._call(tf.convert_to_tensor(inputs)).numpy()
