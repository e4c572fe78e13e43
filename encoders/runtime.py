"""The one place TensorFlow is imported.

`hub.KerasLayer` needs Keras 2 (the `tf-keras` package) on TF 2.16+, and TensorFlow picks its Keras when it is
first imported: `TF_USE_LEGACY_KERAS=1` must be in the environment before that. Every module of this project
that needs TensorFlow imports it from here, so the variable is set first on the launcher and on every worker
(a worker imports this module when it unpickles a DoFn that uses TensorFlow). tensorflow_text is imported here
too: a SavedModel whose graph holds its ops (BERT preprocessors, the baked MiniLM) loads only where it is.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ INFO/WARNING chatter (oneDNN notices, CUDA probing on CPU-only hosts) drowns the job's own log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_hub as hub  # noqa: E402
import tensorflow_text  # noqa: E402, F401  (registers the tokenizer ops that TF Hub text modules, ours too, carry)
import tf_keras  # noqa: E402

__all__ = ["tf", "hub", "tf_keras", "configure_devices"]


def configure_devices(device: str = "auto") -> str:
    """Choose where inference runs and return a TF device string.

    `auto` uses the first GPU TensorFlow sees, with memory growth on (so several SDK processes can share one GPU,
    as under NVIDIA MPS on Dataflow), else the CPU. `cpu` hides the GPUs. `gpu` requires one.
    """
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"--device must be auto, cpu or gpu, not {device!r}")
    gpus = tf.config.list_physical_devices("GPU")
    if device == "cpu" or not gpus:
        if device == "gpu":
            raise RuntimeError("--device=gpu but TensorFlow sees no GPU on this worker")
        if gpus:
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:  # devices already initialised in this process: placement below still pins the CPU
                pass
        return "/CPU:0"
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised by an earlier model in this process
            pass
    return "/GPU:0"
