"""Shared fixtures: the tiny Hub-format encoders, built once per test session, and the baked pretrained ones."""

from __future__ import annotations

import glob
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encoders import pretrained
from schemas import layout
from tests import fixture_models


@pytest.fixture
def arrow_pool():
    """The process's Arrow memory pool, set back as it was after the test."""
    before = pa.default_memory_pool()
    yield
    pa.set_memory_pool(before)


@pytest.fixture(scope="session")
def fixture_encoders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("encoders")
    return {
        "image": fixture_models.build_image_encoder(str(root / "image")),
        "image_any_size": fixture_models.build_image_encoder(str(root / "image_any_size"), size=None),
        "image_trainable": fixture_models.build_image_encoder(str(root / "image_trainable"), differentiable=True),
        "text": fixture_models.build_text_encoder(str(root / "text")),
        "bad_rank": fixture_models.build_bad_rank_encoder(str(root / "bad_rank")),
        "poisoned_text": fixture_models.build_poisoned_text_encoder(str(root / "poisoned_text")),
    }


@pytest.fixture(scope="session")
def encoder_cache(tmp_path_factory) -> str:
    """A cache with every pretrained encoder baked (once per session; reused across runs via $HUBEMBED_CACHE_DIR)."""
    root = os.environ.get(pretrained.CACHE_DIR_ENV) or str(tmp_path_factory.mktemp("pretrained_encoders"))
    for name in pretrained.ENCODER_NAMES:
        pretrained.ensure_baked(name, root)
    return root


def read_parquet_dir(folder: str, prefix: str) -> pa.Table:
    """Every `<prefix>-*.parquet` of a job's output `folder` (dead letters: in its `_dead_letters/`), concatenated."""
    if prefix == layout.DEAD_LETTERS_PREFIX:
        folder = os.path.join(folder, layout.DEAD_LETTERS_DIR)
    files = sorted(glob.glob(os.path.join(folder, f"{prefix}-*.parquet")))
    assert files, f"no {prefix} files in {folder}"
    return pa.concat_tables([pq.read_table(path) for path in files])
