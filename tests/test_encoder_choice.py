"""Baked encoders chosen by name: the embedding job end to end on a multilingual corpus with `use-multilingual-v3`,
and `hubembed encoders list`, the catalogue a user picks from (a real subprocess, no TensorFlow imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from beam_jobs import embed_corpus
from encoders import catalogue, pretrained
from encoders.runtime import hub
from schemas import embeddings as cols
from tests import corpus_builders as corpora
from tests.test_encoder_conventions import read_output

REPO_ROOT = Path(__file__).resolve().parent.parent

# One caption in each script USE multilingual v3 was trained on, and their English meaning, id by id.
MULTILINGUAL_CAPTIONS = {
    "en": "A dog runs across the green meadow.",
    "fr": "Un chien court à travers la prairie verte.",
    "de": "Ein Hund läuft über die grüne Wiese.",
    "ru": "Собака бежит по зелёному лугу.",
    "ar": "كلب يركض عبر المرج الأخضر.",
    "zh": "一只狗跑过绿色的草地。",
    "ja": "犬が緑の草原を走っています。",
    "ko": "개가 푸른 초원을 가로질러 달린다.",
    "th": "สุนัขวิ่งข้ามทุ่งหญ้าสีเขียว",
    "tr": "Bir köpek yeşil çayırda koşuyor.",
}
UNRELATED = "The stock market closed lower after the central bank raised interest rates."


def test_the_job_embeds_a_multilingual_corpus_with_the_baked_use(encoder_cache, tmp_path):
    rows = [{"id": language, "text": text} for language, text in MULTILINGUAL_CAPTIONS.items()]
    rows.append({"id": "unrelated", "text": UNRELATED})
    corpus = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), rows)
    report = embed_corpus.run(["--input", corpus, "--output", str(tmp_path / "out"), "--image_encoder", "none",
                               "--text_encoder", pretrained.USE_MULTILINGUAL, "--encoder_cache_dir", encoder_cache,
                               "--vectors", "both"])
    assert report.passed and report.embedded == len(rows) and report.dead_lettered == 0

    table = read_output(str(tmp_path / "out"))
    ids = table.column(cols.ID).to_pylist()
    vectors = dict(zip(ids, np.stack(table.column(cols.TEXT_EMBEDDING).to_numpy(zero_copy_only=False)),
                       strict=True))
    # The job's vectors are the baked model's own, row by row.
    layer = hub.KerasLayer(pretrained.ensure_baked(pretrained.USE_MULTILINGUAL, encoder_cache))
    expected = layer(np.array([row["text"] for row in rows], dtype=object)).numpy()
    for row, vector in zip(rows, expected, strict=True):
        np.testing.assert_allclose(vectors[row["id"]], vector, rtol=1e-4, atol=1e-5)
    # Every translation is closer to the English caption than the unrelated English sentence is.
    unrelated = float(vectors["en"] @ vectors["unrelated"])
    for language in MULTILINGUAL_CAPTIONS:
        assert float(vectors["en"] @ vectors[language]) > unrelated + 0.1, language
    spec = json.loads(cols.read_metadata(table.schema)[cols.META_TEXT_ENCODER])
    assert spec["name"] == pretrained.USE_MULTILINGUAL and spec["dim"] == 512


def hubembed(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "import sys; from beam_jobs.cli import main; code = main(sys.argv[1:]); "
               "assert 'tensorflow' not in sys.modules; sys.exit(code)", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, check=False)


def test_encoders_list_shows_every_baked_encoder_without_importing_tensorflow(encoder_cache, tmp_path):
    listed = hubembed("encoders", "list", "--cache_dir", encoder_cache, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in map(json.loads, listed.stdout.splitlines())}
    assert set(rows) == set(pretrained.ENCODER_NAMES) == set(catalogue.CATALOGUE)
    assert rows[pretrained.USE_MULTILINGUAL]["dim"] == "512" and "th" in rows[pretrained.USE_MULTILINGUAL]["languages"]
    assert rows[pretrained.MOBILENET_FEATURES]["input"] == "unit"
    assert rows[pretrained.MINILM]["source"] == pretrained.MINILM_SOURCE.requirement
    for row in rows.values():
        assert row["baked"] == "yes" and row["size"].endswith("MB") and row["licence"]
    # The listing's sizes are the folders' own.
    size = catalogue.folder_size(pretrained.model_dir(pretrained.USE_MULTILINGUAL, encoder_cache))
    assert rows[pretrained.USE_MULTILINGUAL]["size"] == catalogue.human_size(size)

    empty = hubembed("encoders", "list", "--cache_dir", str(tmp_path / "empty"))
    assert empty.returncode == 0, empty.stderr
    header, *lines = empty.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "MODALITY", "DIM", "LANGUAGES"] and len(lines) == len(rows)
    assert all(" no " in line for line in lines)


@pytest.mark.parametrize("argv, message", [(["encoders"], "required"), (["encoders", "bake", "--only", "nope"],
                                                                           "invalid choice")])
def test_encoders_commands_refuse_bad_arguments(argv, message):
    result = hubembed(*argv)
    assert result.returncode == 2 and message in result.stderr
