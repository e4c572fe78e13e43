"""What each baked pretrained encoder is: modality, width, languages, input convention, licence, where it comes from.

`hubembed encoders list` prints it, with whether each is baked in the cache yet and its size there; the launcher
reads an encoder's modality and input convention from it when a flag names the encoder. No TensorFlow is imported.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from types import MappingProxyType

from encoders import pretrained
from encoders.preprocessing import UNIT

ALL_LANGUAGES = "-"  # images have none
# The 16 languages of Google's model card for USE multilingual v3, in its order (Chinese simplified and traditional).
USE_LANGUAGES = "ar,zh-CN,zh-TW,en,fr,de,it,ja,ko,nl,pl,pt,es,th,tr,ru"
# The weights' licence, and the licence of the package that carries them where it differs.
MOBILENET_LICENCE = "Apache-2.0 (TensorFlow models), MIT (package)"


@dataclasses.dataclass(frozen=True)
class PretrainedEncoder:
    """One baked encoder, as `hubembed encoders list` shows it."""

    name: str
    modality: str
    dim: int
    languages: str
    input_convention: str | None  # images: encoders.preprocessing's name; texts: None (raw strings in)
    licence: str
    summary: str

    @property
    def source(self) -> str:
        return pretrained.SOURCES[self.name].requirement


CATALOGUE: Mapping[str, PretrainedEncoder] = MappingProxyType({encoder.name: encoder for encoder in (
    PretrainedEncoder(pretrained.MOBILENET_FEATURES, "image", 1024, ALL_LANGUAGES, UNIT, MOBILENET_LICENCE,
                      "MobileNet V1 1.0 224, ImageNet; the pooled feature vector (the default image encoder)"),
    PretrainedEncoder(pretrained.MOBILENET_CLASSIFICATION, "image", 1001, ALL_LANGUAGES, UNIT, MOBILENET_LICENCE,
                      "MobileNet V1 1.0 224, ImageNet; the 1,001 class logits"),
    PretrainedEncoder(pretrained.MINILM, "text", 384, "en", None, "Apache-2.0 (model), MIT (package)",
                      "sentence-transformers all-MiniLM-L6-v2, L2-normalised, 256 tokens (the default text encoder)"),
    PretrainedEncoder(pretrained.USE_MULTILINGUAL, "text", 512, USE_LANGUAGES, None, "Apache-2.0 (model and package)",
                      "Google's Universal Sentence Encoder multilingual v3 (CNN), L2-normalised, 10,000 characters"),
)})


def folder_size(path: str) -> int:
    """Bytes of every file under `path`."""
    return sum(os.path.getsize(os.path.join(directory, name)) for directory, _, names in os.walk(path)
               for name in names)


def human_size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"


def encoder_rows(cache_dir: str | None = None) -> list[dict[str, str]]:
    """One row per baked encoder, for the listing: its facts, whether it is baked in the cache, and its size."""
    rows = []
    for encoder in CATALOGUE.values():
        baked = pretrained.is_baked(encoder.name, cache_dir)
        rows.append({
            "name": encoder.name, "modality": encoder.modality, "dim": str(encoder.dim),
            "languages": encoder.languages, "input": encoder.input_convention or "strings",
            "baked": "yes" if baked else "no",
            "size": human_size(folder_size(pretrained.model_dir(encoder.name, cache_dir))) if baked else "-",
            "licence": encoder.licence, "source": encoder.source,
        })
    return rows


def format_listing(rows: list[dict[str, str]]) -> str:
    """The rows as an aligned table, a header first."""
    if not rows:
        return ""
    columns = list(rows[0])
    widths = {column: max(len(column), *(len(row[column]) for row in rows)) for column in columns}
    lines = ["  ".join(column.upper().ljust(widths[column]) for column in columns).rstrip()]
    lines += ["  ".join(row[column].ljust(widths[column]) for column in columns).rstrip() for row in rows]
    return "\n".join(lines)
