"""The deterministic train / validation / test split: a row's split is a function of its id alone.

SHA-256 of the UTF-8 id, first 8 bytes as a fraction of 2**64: the same id falls in the same split on every run,
machine, Python version and runner (unlike `hash()`, which is salted per process), whatever the row order or
sharding, and growing the corpus never moves an existing row to another split.
"""

from __future__ import annotations

import hashlib

TRAIN, VALIDATION, TEST = "train", "validation", "test"
SPLITS = (TRAIN, VALIDATION, TEST)


def split_fraction(row_id: str) -> float:
    """A stable pseudo-random number in [0, 1) for the id."""
    digest = hashlib.sha256(row_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(row_id: str, validation_ratio: float, test_ratio: float) -> str:
    """test: the lowest `test_ratio` of fractions, validation: the next `validation_ratio`, train: the rest."""
    fraction = split_fraction(row_id)
    if fraction < test_ratio:
        return TEST
    if fraction < test_ratio + validation_ratio:
        return VALIDATION
    return TRAIN


def check_ratios(validation_ratio: float, test_ratio: float) -> str | None:
    """None when the ratios leave a training split, else the one-line complaint."""
    if not (0.0 < validation_ratio < 1.0 and 0.0 < test_ratio < 1.0):
        return "--validation_ratio and --test_ratio must each be between 0 and 1 (exclusive)"
    if validation_ratio + test_ratio >= 1.0:
        return "--validation_ratio + --test_ratio must leave rows for training (sum below 1)"
    return None
