"""A look at an embedding job's output: exact counts in one streaming pass, and a bounded sample to draw from.

`survey_embeddings` reads the output's Parquet a record batch at a time (any Beam filesystem: local, gs://) and keeps
exact counts (rows, modality coverage, labels, vector norms) and a uniform random sample of at most `capacity` rows
(`Reservoir`), so memory is bounded by the sample and one batch, never by the output. The 2-D map (`project_2d`) and
the nearest neighbours (`nearest_neighbours`) are drawn from the sample; `load_thumbnail` reads a record's image for
the contact sheet, a failure becoming a reason to show, never an error.

No TensorFlow: the files are read with pyarrow and the maths is numpy. Unlike the classifier's reader
(transforms.downstream.embeddings_input, which refuses null vectors), a null vector here is a row of NaN: an
inspection counts it as not finite rather than stopping.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import io
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageOps, UnidentifiedImageError

from schemas import dead_letters as letters
from schemas import embeddings as cols
from schemas.records import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, Reason
from transforms.embedding.image_check import ImageRefused, read_image

BATCH_ROWS = 4096  # rows per record batch read: 4096 vectors of 1,408 float32 are 23 MB
TOP_LABELS = 20  # labels listed by count in the report
THUMBNAIL_PIXELS = 128  # a contact sheet tile's longer side
UMAP_NEIGHBOURS = 15  # UMAP's default neighbourhood: a sample must hold more rows than this for UMAP to be used
PROGRESS_SECONDS = 10.0  # between progress lines of a long pass (one per file would flood the console)
QUERY_CHUNK = 256  # queries scored against the sample at a time: a [256, sample] similarity block at most
# What a contact sheet tile says of an image the bounded read refused (a missing file says "missing").
REFUSED_AS = {Reason.IMAGE_NOT_A_FILE: "not a file", Reason.IMAGE_TOO_LARGE: "too large", Reason.IMAGE_EMPTY: "empty",
              Reason.NOT_AN_IMAGE: "not an image"}

log = logging.getLogger("hubembed")


def iter_batches(path: str, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """One Parquet file (any Beam filesystem) → record batches of `columns`, streamed row group by row group."""
    with FileSystems.open(path) as handle:
        yield from pq.ParquetFile(handle).iter_batches(batch_size=BATCH_ROWS, columns=list(columns))


def decode_metadata(metadata: dict[str, str]) -> dict:
    """The hubembed.* key-value metadata (`schemas.embeddings.read_metadata`) with its JSON values decoded: encoder
    specs, preprocessing, layout and storage (objects, arrays) and booleans; the plain-text values (version,
    creation time, reuse key, pixel limit) stay text, a hex digest of digits alone being no number."""
    decoded = {}
    for key, value in sorted(metadata.items()):
        if value[:1] in ("{", "[", '"') or value in ("true", "false", "null"):
            try:
                decoded[key] = json.loads(value)
                continue
            except ValueError:
                pass
        decoded[key] = value
    return decoded


@dataclasses.dataclass(frozen=True)
class VectorView:
    """A vector column as inspected: a stored one, or a modality's part of `embedding` when only that is stored."""

    name: str
    source: str  # the stored column it is read from
    offset: int
    dim: int
    mask: str | None  # the has_image / has_text column: norms of a modality count only the rows that have it


def vector_views(schema: pa.Schema) -> list[VectorView]:
    """Every vector column of a file, in schema order, then each modality held only inside `embedding` (from
    `hubembed.embedding_layout`)."""
    masks = {cols.IMAGE_EMBEDDING: cols.HAS_IMAGE, cols.TEXT_EMBEDDING: cols.HAS_TEXT}
    views = [VectorView(field.name, field.name, 0, field.type.list_size, masks.get(field.name))
             for field in schema if field.name in (cols.IMAGE_EMBEDDING, cols.TEXT_EMBEDDING, cols.EMBEDDING)
             and pa.types.is_fixed_size_list(field.type)]
    if cols.EMBEDDING in schema.names:
        layout = json.loads(cols.read_metadata(schema).get(cols.META_EMBEDDING_LAYOUT, "[]"))
        views += [VectorView(name, cols.EMBEDDING, offset, dim, masks.get(name))
                  for name, offset, dim in layout if name not in schema.names]
    return [view for view in views if view.mask is None or view.mask in schema.names]


def sample_views(views: Sequence[VectorView]) -> list[VectorView]:
    """What a sampled row's vector is made of: the multimodal `embedding`, or, when a run stored only the
    per-modality columns (`--vectors modalities`), those concatenated image first, as `embedding` would hold them."""
    stored = {view.name: view for view in views if view.name == view.source}
    if cols.EMBEDDING in stored:
        return [stored[cols.EMBEDDING]]
    return [stored[name] for name in (cols.IMAGE_EMBEDDING, cols.TEXT_EMBEDDING) if name in stored]


def vector_matrix(array: pa.Array) -> np.ndarray:
    """A fixed_size_list<float32 | float16>[d] array → [rows, d] float32; a null vector becomes a row of NaN, so it
    counts as not finite."""
    dim = array.type.list_size
    if array.null_count:
        matrix = np.full((len(array), dim), np.nan, np.float32)
        valid = array.is_valid()
        matrix[valid.to_numpy(zero_copy_only=False)] = vector_matrix(array.filter(valid))
        return matrix
    return np.asarray(array.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)


@dataclasses.dataclass
class NormStats:
    """L2 norms of one vector column's vectors: min / mean / max over the finite ones, and how many are zero or not
    finite (NaN, infinity, or a null vector)."""

    rows: int = 0
    zero: int = 0
    non_finite: int = 0
    least: float = math.inf
    greatest: float = -math.inf
    total: float = 0.0  # of the finite norms, for the mean

    def add(self, matrix: np.ndarray) -> None:
        finite = np.isfinite(matrix).all(axis=1)
        norms = np.linalg.norm(matrix[finite].astype(np.float64), axis=1)
        self.rows += len(matrix)
        self.non_finite += int(len(matrix) - finite.sum())
        self.zero += int((norms == 0).sum())
        if len(norms):
            self.least = min(self.least, float(norms.min()))
            self.greatest = max(self.greatest, float(norms.max()))
            self.total += float(norms.sum())

    def to_dict(self) -> dict:
        finite = self.rows - self.non_finite
        return {"rows": self.rows, "min": self.least if finite else None,
                "mean": self.total / finite if finite else None, "max": self.greatest if finite else None,
                "zero": self.zero, "non_finite": self.non_finite}


class Reservoir:
    """A uniform random sample of at most `capacity` rows of a stream met in batches: Algorithm R, where the i-th
    row takes a random slot with probability capacity / i, drawn for a whole batch at once. Seeded by `rng`, so the
    same output gives the same sample. Holds each sampled row's vector and its `fields` (id, label, image)."""

    def __init__(self, capacity: int, rng: np.random.Generator):
        self.capacity = capacity
        self.rng = rng
        self.seen = 0  # rows offered so far
        self.size = 0  # rows held
        self.vectors: np.ndarray | None = None  # [capacity, d], allocated at the first offer
        self.fields: dict[str, list] = {}

    def offer(self, vectors: np.ndarray, fields: dict[str, pa.Array]) -> None:
        """Offer a batch of rows: their vectors [n, d] and, per field, an array of n values."""
        if self.vectors is None:
            self.vectors = np.zeros((self.capacity, vectors.shape[1]), np.float32)
            self.fields = {name: [None] * self.capacity for name in fields}
        filling = min(len(vectors), self.capacity - self.size)
        self._place(np.arange(filling), np.arange(self.size, self.size + filling), vectors, fields)
        self.size += filling
        self.seen += filling
        later = len(vectors) - filling
        if not later:
            return
        counts = self.seen + np.arange(1, later + 1)  # each row is the count-th one seen
        drawn = self.rng.integers(0, counts)
        taken = drawn < self.capacity
        rows, slots = filling + np.flatnonzero(taken), drawn[taken]
        # A slot drawn twice in one batch keeps the later row, as the row-at-a-time algorithm would.
        last = len(slots) - 1 - np.unique(slots[::-1], return_index=True)[1]
        self._place(rows[last], slots[last], vectors, fields)
        self.seen += later

    def _place(self, rows: np.ndarray, slots: np.ndarray, vectors: np.ndarray, fields: dict[str, pa.Array]) -> None:
        if not len(rows):
            return
        self.vectors[slots] = vectors[rows]
        for name, array in fields.items():
            for slot, value in zip(slots.tolist(), array.take(pa.array(rows)).to_pylist(), strict=True):
                self.fields[name][slot] = value

    def sample(self) -> tuple[np.ndarray, dict[str, list]]:
        """The rows held: vectors [size, d] and each field's values, in slot order."""
        if self.vectors is None:
            return np.zeros((0, 0), np.float32), {}
        return self.vectors[:self.size], {name: values[:self.size] for name, values in self.fields.items()}


@dataclasses.dataclass
class Survey:
    """What one pass over the embeddings found; exact counts, and the sample."""

    rows: int
    coverage: dict[str, int | None]  # image / text / both / neither; None for a modality the run did not embed
    norms: dict[str, NormStats]
    labels: collections.Counter | None  # label → rows (None: unlabeled); None when there is no label column
    sample: Reservoir


def survey_embeddings(paths: Sequence[str], schema: pa.Schema, reservoir: Reservoir,
                      image_column: str | None = None) -> Survey:
    """One streaming pass over `paths` (files of one run, all with `schema`'s columns): counts, norms and labels of
    every row, and each row whose sample vector is finite offered to `reservoir` with its id, label and image."""
    views = vector_views(schema)
    parts = sample_views(views)
    masks = [name for name in (cols.HAS_IMAGE, cols.HAS_TEXT) if name in schema.names]
    has_label = cols.LABEL in schema.names
    fields = [cols.ID] + ([cols.LABEL] if has_label else []) + ([image_column] if image_column else [])
    columns = list(dict.fromkeys([*fields, *masks, *(view.source for view in views)]))
    norms = {view.name: NormStats() for view in views}
    coverage = collections.Counter()
    labels = collections.Counter() if has_label else None
    rows = 0
    logged = time.monotonic()
    for number, path in enumerate(paths, 1):
        for batch in iter_batches(path, columns):
            rows += batch.num_rows
            present = {name: batch.column(name) for name in masks}
            for name, mask in present.items():
                coverage[name] += pc.sum(mask).as_py() or 0
            if len(present) == 2:
                coverage["both"] += pc.sum(pc.and_(*present.values())).as_py() or 0
            matrices = {source: vector_matrix(batch.column(source)) for source in {view.source for view in views}}
            for view in views:
                matrix = matrices[view.source][:, view.offset:view.offset + view.dim]
                if view.mask is not None:
                    matrix = matrix[present[view.mask].to_numpy(zero_copy_only=False)]
                norms[view.name].add(matrix)
            if labels is not None:
                for counted in pc.value_counts(batch.column(cols.LABEL)).to_pylist():
                    labels[counted["values"]] += counted["counts"]
            vectors = np.hstack([matrices[view.source] for view in parts])
            finite = np.isfinite(vectors).all(axis=1)
            # Rows whose vector is not finite are counted above but kept out of the sample: one NaN would blank the
            # map and every similarity.
            chosen = pa.array(np.flatnonzero(finite)) if not finite.all() else None
            reservoir.offer(vectors if chosen is None else vectors[finite],
                            {name: batch.column(name) if chosen is None else batch.column(name).take(chosen)
                             for name in fields})
        if time.monotonic() - logged >= PROGRESS_SECONDS or number == len(paths):
            log.info("inspect: %d of %d files read, %d rows so far", number, len(paths), rows)
            logged = time.monotonic()
    with_image = coverage[cols.HAS_IMAGE] if cols.HAS_IMAGE in masks else None
    with_text = coverage[cols.HAS_TEXT] if cols.HAS_TEXT in masks else None
    both = coverage["both"] if len(masks) == 2 else 0
    neither = rows - (with_image or 0) - (with_text or 0) + both
    return Survey(rows, {"image": with_image, "text": with_text, "both": both, "neither": neither}, norms, labels,
                  reservoir)


@dataclasses.dataclass
class DeadLetterCounts:
    total: int
    by_reason: dict[str, int]  # most frequent first
    examples: dict[str, dict]  # reason → the first letter of it met: {"id", "message"}


def count_dead_letters(paths: Sequence[str]) -> DeadLetterCounts:
    """Dead letters by reason, streamed from the dead-letter Parquet files, with one example of each reason."""
    by_reason: collections.Counter = collections.Counter()
    examples: dict[str, dict] = {}
    for path in paths:
        for batch in iter_batches(path, [letters.ID, letters.REASON, letters.MESSAGE]):
            reasons = batch.column(letters.REASON)
            for counted in pc.value_counts(reasons).to_pylist():
                reason = counted["values"]
                by_reason[reason] += counted["counts"]
                if reason not in examples:
                    first = pc.index(reasons, reason).as_py()
                    examples[reason] = {"id": batch.column(letters.ID)[first].as_py(),
                                        "message": batch.column(letters.MESSAGE)[first].as_py()[:300]}
    return DeadLetterCounts(sum(by_reason.values()), dict(by_reason.most_common()), examples)


@dataclasses.dataclass
class Projection:
    points: np.ndarray  # [rows, 2]
    method: str  # "umap" or "pca"
    explained_variance: list[float] | None  # PCA: the share of the sample's variance along each axis


def pca_2d(vectors: np.ndarray) -> Projection:
    """The sample on its first two principal axes.

    The axes are the top right singular vectors of the centred sample, taken here from the SVD of the smaller of its
    two Gram matrices, which holds the same axes and variances: the SVD of a 5,000 × 1,408 sample itself took 2 s on
    2 cores (13 s in float32), that of its 1,408 × 1,408 Gram matrix 0.3 s.
    """
    centred = vectors.astype(np.float64) - vectors.mean(axis=0, dtype=np.float64)
    rows, dims = centred.shape
    if rows >= dims:
        _, variances, axes = np.linalg.svd(centred.T @ centred, hermitian=True)
        points = centred @ axes[:2].T
    else:
        left, variances, _ = np.linalg.svd(centred @ centred.T, hermitian=True)
        points = left[:, :2] * np.sqrt(np.maximum(variances[:2], 0.0))
    points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))  # a 1-d vector has one axis
    total = float(variances.sum())
    shares = [float(variance) / total if total > 0 else 0.0 for variance in variances[:2]]
    return Projection(points, "pca", shares + [0.0] * (2 - len(shares)))


def project_2d(vectors: np.ndarray, seed: int) -> Projection:
    """The sample's 2-D map: UMAP (cosine, seeded) when the `umap` package is installed and the sample holds more
    rows than a UMAP neighbourhood, else PCA; a UMAP that fails falls back to PCA with a warning."""
    if len(vectors) > UMAP_NEIGHBOURS + 1 and importlib.util.find_spec("umap") is not None:
        try:
            import umap

            reducer = umap.UMAP(n_components=2, n_neighbors=UMAP_NEIGHBOURS, metric="cosine", random_state=seed)
            return Projection(np.asarray(reducer.fit_transform(vectors), np.float64), "umap", None)
        except Exception as error:  # numba or its LLVM missing on this machine, a degenerate sample
            log.warning("UMAP failed (%s: %s): the map is a PCA instead", type(error).__name__, error)
    return pca_2d(vectors)


def nearest_neighbours(vectors: np.ndarray, queries: Sequence[int], count: int) -> list[list[tuple[int, float]]]:
    """For each query row of `vectors`, the `count` other rows most similar to it by cosine, most similar first, as
    (row, similarity). The query's own row is left out: it is always its own nearest, at 1. A zero vector is
    similar to nothing (0)."""
    lengths = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, lengths, out=np.zeros_like(vectors), where=lengths > 0)
    count = min(count, len(vectors) - 1)
    found = []
    for start in range(0, len(queries), QUERY_CHUNK):
        chunk = np.asarray(queries[start:start + QUERY_CHUNK])
        similarities = unit[chunk] @ unit.T
        similarities[np.arange(len(chunk)), chunk] = -np.inf
        for scores in similarities:
            best = np.argpartition(-scores, count - 1)[:count] if count else np.array([], int)
            best = best[np.argsort(-scores[best], kind="stable")]
            found.append([(int(other), float(scores[other])) for other in best])
    return found


def resolve_image(reference: str, image_root: str | None) -> str:
    """An image path or URI from the output → what to open: a URI or an absolute path as it is, a relative path
    under `image_root` (or the current folder)."""
    if "://" in reference or os.path.isabs(reference):
        return reference
    if image_root is None:
        return os.path.abspath(reference)
    return FileSystems.join(image_root, reference)


def load_thumbnail(reference: str | None, image_root: str | None,
                   size: int = THUMBNAIL_PIXELS) -> tuple[np.ndarray | None, str | None]:
    """A record's image as a thumbnail of at most `size` pixels a side, upright by its Exif orientation: (pixels,
    None), or (None, why not) for a record without one, a file missing, unreadable or not an image. Never raises for
    a bad image; a local path that is not a regular file (a FIFO would block) is never opened."""
    if not reference:
        return None, "no image"
    try:  # the embedding job's own bounded read: special files refused unopened, at most the byte cap read
        data = read_image(resolve_image(reference, image_root), DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS)
    except ImageRefused as refused:
        if refused.reason == Reason.IMAGE_MISSING:
            return None, "missing" if isinstance(refused.error, FileNotFoundError) else (
                f"unreadable: {_first_line(refused)}")
        return None, f"{REFUSED_AS.get(refused.reason, refused.reason)}: {_first_line(refused)}"
    try:
        with warnings.catch_warnings():
            # The embedding job judged the image's pixels already; PIL's own bomb limit still raises, well above.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                opened.draft("RGB", (size, size))  # a JPEG is decoded at a reduced scale: fast, and all a tile needs
                image = ImageOps.exif_transpose(opened).convert("RGB")
        image.thumbnail((size, size))
        return np.asarray(image), None
    except UnidentifiedImageError:  # its message names the in-memory buffer, nothing of the file
        return None, "not an image: no known image format"
    except Exception as error:  # OSError for truncated data, DecompressionBombError, a decoder's own errors
        return None, f"not an image: {_first_line(error)}"


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:120]
