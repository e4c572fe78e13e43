"""An encoder flag → the module to load and how to feed it: the one place the kinds of handle are told apart.

- empty: the project's baked default for the modality;
- a baked encoder's name (`hubembed encoders list`, e.g. `use-multilingual-v3`): baked into the cache on first use;
- a Keras model (a `.keras` / `.h5` file, a Keras SavedModel folder, or `keras.applications.<Name>` with a weights
  file): converted once into a Reusable SavedModel in the cache (encoders.keras_model);
- anything else: a TF Hub / Kaggle handle or a SavedModel folder, as `hub.KerasLayer` takes it.

An image encoder's input convention is the one asked for, else the encoder's own (a baked encoder's, a Keras
application family's), else TF Hub's [0, 1]. The module is then probed (encoders.hub_module.probe_encoder).
"""

from __future__ import annotations

import dataclasses
import os

from encoders import keras_model, pretrained
from encoders.catalogue import CATALOGUE
from encoders.hub_module import EncoderConfigError, EncoderSpec, Modality, probe_encoder
from encoders.preprocessing import AREA, CONVENTION_NAMES, UNIT, convention, resize_method

PROBE_CACHE_DIR = "_probes"  # in the encoder cache: what start-up learnt of each module's content


@dataclasses.dataclass(frozen=True)
class EncoderChoice:
    """What a job's flags say of one modality's encoder."""

    modality: Modality
    handle: str  # empty: the baked default
    signature: str | None = None
    output_key: str | None = None
    image_size: int | None = None  # when the module does not fix it
    weights: str | None = None  # a keras.applications architecture's weights file
    input_convention: str | None = None  # empty or None: the encoder's own
    resize: str | None = None  # empty or None: area
    cache_dir: str | None = None  # the encoder cache (pretrained.cache_dir)


def resolve_encoder(choice: EncoderChoice) -> EncoderSpec:
    """The choice → a probed EncoderSpec. Raises EncoderConfigError (one line) for anything a user must fix."""
    handle, name, own_convention, converted = choice.handle.strip(), None, None, False
    if not handle:
        handle = pretrained.DEFAULT_IMAGE_ENCODER if choice.modality == "image" else pretrained.DEFAULT_TEXT_ENCODER
    if handle in CATALOGUE:
        name, baked = handle, CATALOGUE[handle]
        if baked.modality != choice.modality:
            raise EncoderConfigError(f"{name} is a baked {baked.modality} encoder, not a {choice.modality} one")
        try:
            handle = pretrained.ensure_baked(name, choice.cache_dir)
        except pretrained.EncoderUnavailable as error:
            raise EncoderConfigError(str(error)) from error
        own_convention = baked.input_convention
    elif keras_model.is_keras_source(handle):
        try:
            keras = keras_model.convert_keras_encoder(handle, choice.modality, pretrained.cache_dir(choice.cache_dir),
                                                      weights=choice.weights, image_size=choice.image_size)
        except keras_model.KerasEncoderError as error:
            raise EncoderConfigError(str(error)) from error
        handle, own_convention, converted = keras.path, keras.input_convention, True
    if choice.weights and not converted:
        raise EncoderConfigError(f"a weights file is for a keras.applications architecture, not {choice.handle!r}")
    spec = EncoderSpec(modality=choice.modality, handle=handle, signature=choice.signature,
                       output_key=choice.output_key, name=name)
    if choice.modality == "image":
        if converted and not (choice.input_convention or own_convention):
            # A model file does not say what its training fed it: a guess would give wrong vectors, silently.
            raise EncoderConfigError(f"image encoder {choice.handle!r} is a Keras model file that does not say how "
                                     f"its inputs are prepared: pass --image_input_convention "
                                     f"({', '.join(CONVENTION_NAMES)})")
        chosen = choice.input_convention or own_convention or UNIT
        try:
            convention(chosen)
            resize = resize_method(choice.resize or AREA)
        except ValueError as error:
            raise EncoderConfigError(str(error)) from None
        spec = dataclasses.replace(spec, input_convention=chosen, resize=resize)
    probes = os.path.join(pretrained.cache_dir(choice.cache_dir), PROBE_CACHE_DIR)
    return probe_encoder(spec, choice.image_size, probes)
