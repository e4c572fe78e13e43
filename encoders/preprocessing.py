"""An image encoder's input convention: how the decoder's pixels (RGB, float32 in [0, 1]) become the model's input.

TF Hub's image modules take [0, 1] RGB (`unit`). Models from elsewhere expect what their training pipeline fed
them: Keras applications name these modes in their `preprocess_input` ("tf" is `symmetric`, "caffe", "torch"), and
some rescale inside the model and take plain 0-255 values (`raw`). The convention is part of an encoder's spec: it
is applied in the graph, right before the model, by the embedding job, the fine-tuning model and the serving model
alike, and recorded in the Parquet metadata, so vectors made under another convention are never mixed with these.

The resize method is the other half of what an encoder is fed: `RESIZE_METHODS` are what the decoder offers.
The tables import no TensorFlow (the CLI's flags and `hubembed encoders list` read them); `to_model_inputs` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

# ImageNet's channel statistics, as Keras' preprocess_input and torchvision use them.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # on the 0-255 scale, in the BGR order caffe's models take


@dataclasses.dataclass(frozen=True)
class InputConvention:
    """model input = (pixels[..., channel order] * scale - mean) / std, pixels in [0, 1] RGB."""

    name: str
    description: str
    bgr: bool = False
    scale: float = 1.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def metadata(self) -> dict:
        """What the Parquet metadata records of it."""
        return {"input_convention": self.name, "channels": "BGR" if self.bgr else "RGB", "scale": self.scale,
                "mean": list(self.mean), "std": list(self.std)}


UNIT = "unit"
CONVENTIONS: Mapping[str, InputConvention] = MappingProxyType({convention.name: convention for convention in (
    InputConvention(UNIT, "RGB in [0, 1], the TF Hub convention"),
    InputConvention("symmetric", "RGB in [-1, 1] (Keras' 'tf' mode: MobileNet, Inception, Xception)",
                    scale=2.0, mean=(1.0, 1.0, 1.0)),
    InputConvention("caffe", "BGR on 0-255 less the ImageNet means (Keras' 'caffe' mode: VGG, ResNet50)",
                    bgr=True, scale=255.0, mean=CAFFE_MEAN_BGR),
    InputConvention("torch", "RGB in [0, 1] standardised by the ImageNet means and deviations (Keras' 'torch' "
                             "mode: DenseNet; torchvision)", mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB),
    InputConvention("raw", "RGB on 0-255, for models that rescale inside (EfficientNet, ConvNeXt, RegNet)",
                    scale=255.0),
)})
CONVENTION_NAMES = tuple(CONVENTIONS)

AREA = "area"
# How the decoder brings an image to the encoder's size (transforms.image_decode); the first is the default.
RESIZE_METHODS: Mapping[str, str] = MappingProxyType({
    AREA: "tf.image.resize area when shrinking, bilinear (antialias) when enlarging, no crop",
    "bilinear": "tf.image.resize bilinear with antialias, no crop",
    "bicubic": "tf.image.resize bicubic with antialias, no crop",
    "nearest": "tf.image.resize nearest neighbour, no crop",
})


def image_preprocessing(size: int, input_convention: str | None, resize: str | None) -> dict:
    """How an image encoder's inputs were made, as the Parquet metadata records it (and what must match for two
    runs' image vectors to be comparable). The default convention adds no key: outputs written before conventions
    existed describe the same preprocessing in the same words, and stay reusable."""
    described = {
        "decoder": "tf.io.decode_image, first frame of animations, 3 channels (grey and RGBA made RGB), "
                   "8-bit BMPs through their palette",
        "orientation": "JPEG Exif orientation applied (2-8, as PIL.ImageOps.exif_transpose)",
        "jpeg_dct_scale": "a JPEG is decoded at the largest of libjpeg's 1/2, 1/4, 1/8 scales whose short side "
                          "stays >= size (tf.io.decode_jpeg ratio)",
        "resize": RESIZE_METHODS[resize or AREA],
        "size": [size, size],
        "value_range": [0.0, 1.0], "dtype": "float32"}
    chosen = convention(input_convention)
    if chosen.name != UNIT:
        described["input_convention"] = chosen.metadata()
    return described


def convention(name: str | None) -> InputConvention:
    """The named convention (None: `unit`); ValueError, one line, for a name that is not one."""
    try:
        return CONVENTIONS[name or UNIT]
    except KeyError:
        raise ValueError(f"unknown input convention {name!r}; known: {', '.join(CONVENTION_NAMES)}") from None


def resize_method(name: str) -> str:
    """`name`, checked: ValueError, one line, for a name that is not one of RESIZE_METHODS."""
    if name not in RESIZE_METHODS:
        raise ValueError(f"unknown resize method {name!r}; known: {', '.join(RESIZE_METHODS)}")
    return name


def to_model_inputs(pixels, name: str | None):
    """Decoded pixels ([..., 3] RGB float32 in [0, 1]) → the model's inputs under convention `name`, in the graph.
    The `unit` convention is the pixels themselves: no op is added."""
    from encoders.runtime import tf  # here, not at the top: see the module's docstring

    chosen = convention(name)
    if chosen.name == UNIT:
        return pixels
    values = tf.reverse(pixels, axis=[-1]) if chosen.bgr else pixels
    values = values * chosen.scale - tf.constant(chosen.mean, tf.float32)
    if chosen.std != (1.0, 1.0, 1.0):
        values = values / tf.constant(chosen.std, tf.float32)
    return values
