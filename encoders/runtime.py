"""The one place TensorFlow is imported.

`hub.KerasLayer` needs Keras 2 (the `tf-keras` package) on TF 2.16+, and TensorFlow picks its Keras when it is
first imported: `TF_USE_LEGACY_KERAS=1` must be in the environment before that. Every module of this project
that needs TensorFlow imports it from here, so the variable is set first on the launcher and on every worker
(a worker imports this module when it unpickles a DoFn that uses TensorFlow). tensorflow_text is imported here
too: a SavedModel whose graph holds its ops (BERT preprocessors, the baked MiniLM) loads only where it is.
"""

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ notices (oneDNN, CUDA probing and cuInit on CPU-only hosts, oneDNN's int64 fallback) drown the
# job's own lines; errors still reach Python as exceptions. TF_CPP_MIN_LOG_LEVEL=0 brings the notices back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# What TensorFlow's native libraries print while they load, before absl logging is initialised and whatever
# TF_CPP_MIN_LOG_LEVEL says (TF 2.21: the oneDNN notice and "Could not find cuda drivers", twice each): absl's
# banner, and lines whose first letter is their severity (I, W, E, F), then the date.
ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called"
ABSL_LINE = re.compile(r"^([IWEF])\d{4} ")
SEVERITIES = "IWEF"  # TF_CPP_MIN_LOG_LEVEL 0..3 hides the severities before it


def _min_log_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def native_start_up_lines_filtered() -> Iterator[None]:
    """Hold TensorFlow's native start-up lines to TF_CPP_MIN_LOG_LEVEL, as TensorFlow holds its later ones.

    Everything written to file descriptor 2 meanwhile is captured; afterwards the lines below the level go to this
    module's debug log and everything else (errors, Python warnings, other threads' lines) back to stderr.
    """
    level = _min_log_level()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no stderr to keep clean
        saved = None
    if level <= 0 or saved is None:
        yield
        return
    log = logging.getLogger(__name__)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()  # Python's own lines, buffered meanwhile, join the capture in their order
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = []
            for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True):
                severity = ABSL_LINE.match(line)
                if line.startswith(ABSL_BANNER) or (severity and SEVERITIES.index(severity[1]) < level):
                    log.debug("tensorflow: %s", line.rstrip())
                else:
                    kept.append(line)
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _skip_keras3_probe() -> None:
    """tensorflow_hub loads every module by first trying Keras 3's `keras.saving.legacy.saved_model`, which Keras 3
    does not have: the attempt imports all of Keras 3 (0.5-0.8 s per process) to fail, and hub goes on with tf.keras's
    load context, the one TF_USE_LEGACY_KERAS makes right. Marking the missing module missing makes it fail at once."""
    try:
        keras_major = int(metadata.version("keras").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return
    if keras_major >= 3:
        sys.modules.setdefault("keras.saving.legacy.saved_model", None)


_skip_keras3_probe()
with native_start_up_lines_filtered():
    import tensorflow as tf
    import tensorflow_hub as hub
    import tensorflow_text  # noqa: F401  (registers the tokenizer ops that TF Hub text modules, ours too, carry)
    import tf_keras

__all__ = ["tf", "hub", "tf_keras", "configure_devices", "native_start_up_lines_filtered", "use_mixed_precision",
           "stop_mixed_precision", "mixed_precision_type"]

# CPU flags (Linux /proc/cpuinfo names) of the instructions oneDNN runs bfloat16 convolutions and matmuls on. Without
# them oneDNN emulates bfloat16, slower than float32.
BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPU_INFO = "/proc/cpuinfo"


def cpu_has_bfloat16(cpu_info: str | None = None) -> bool:
    """Whether this machine's CPU has bfloat16 instructions (`cpu_info`: the text of /proc/cpuinfo; read when None,
    False where there is none)."""
    if cpu_info is None:
        try:
            with open(CPU_INFO) as handle:
                cpu_info = handle.read()
        except OSError:
            return False
    flags = {flag for line in cpu_info.splitlines() if line.startswith("flags") for flag in line.split()}
    return any(flag in flags for flag in BFLOAT16_CPU_FLAGS)


# Grappler's rewrite options: float16 where CUDA runs the graph, bfloat16 where oneDNN does.
MIXED_PRECISION_OPTIONS = ("auto_mixed_precision", "auto_mixed_precision_onednn_bfloat16")


def mixed_precision_type(device: str) -> str | None:
    """What --mixed_precision computes in on `device` ("/GPU:0", "/CPU:0"): float16 on a GPU, bfloat16 on a CPU with
    bfloat16 instructions; None where it would run slower than float32."""
    if device.startswith("/GPU"):
        return "float16"
    return "bfloat16" if cpu_has_bfloat16() else None


def use_mixed_precision(device: str) -> str:
    """Run this process's TensorFlow graphs in mixed precision from now on, through Grappler's graph rewrite (it
    reaches a SavedModel's restored graphs, which Keras' mixed-precision policy does not): mixed_precision_type's.
    Returns the type; RuntimeError where there is none. The option is the process's, and a function is rewritten
    when it first runs for an input shape: set it before the encoders' first call, keep it while they run, and take
    it back with `stop_mixed_precision`."""
    kind = mixed_precision_type(device)
    if kind is None:
        raise RuntimeError("--mixed_precision on a worker without a GPU, whose CPU has no bfloat16 instructions "
                           f"({' or '.join(BFLOAT16_CPU_FLAGS)}): it would run slower than float32")
    option = MIXED_PRECISION_OPTIONS[0] if kind == "float16" else MIXED_PRECISION_OPTIONS[1]
    tf.config.optimizer.set_experimental_options({option: True})
    return kind


def stop_mixed_precision() -> None:
    """Graphs first run from now on stay float32 (what use_mixed_precision turned on, off again)."""
    tf.config.optimizer.set_experimental_options({option: False for option in MIXED_PRECISION_OPTIONS})


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
