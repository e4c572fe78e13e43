"""`hubembed inspect` on a real output of the embedding job (the tiny fixture encoders, DirectRunner).

One small corpus is embedded once for the module: labelled rows with both modalities, text-only and image-only rows
(some unlabeled), a record duplicated under two ids, and three records that are dead-lettered; its image paths are
passed through (`--passthrough image`). After the run, two embedded records' image files are broken, so the contact
sheet meets a missing file and a file that is not an image. The inspection runs once in this process (every record a
query) and once in a subprocess (`python -m`, --sample 10); the tests read what they wrote.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image

from beam_jobs import cli, embed_corpus, flags
from beam_jobs.inspect_output import CONTACT_SHEET_PNG, MAP_PNG, NEIGHBOURS_JSON, REPORT_NAME, InspectOptions
from schemas import embeddings as cols
from schemas import layout
from schemas.records import Reason
from tests import corpus_builders as corpora
from tests.conftest import read_parquet_dir
from transforms.downstream.inspect import Reservoir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABELS = ("cat", "dog", "fox")
NEIGHBOURS = 5
DEAD_LETTERED = {"corrupt": Reason.IMAGE_CORRUPT, "not-an-image": Reason.NOT_AN_IMAGE, "missing": Reason.IMAGE_MISSING}
BROKEN_AFTER_EMBEDDING = {"full-0": "missing", "full-1": "not an image"}  # id → what the contact sheet says


def quadrant_image(seed: int) -> bytes:
    """A PNG of four flat colours: the fixture image encoder sees an image's quadrant means, so these differ."""
    colours = np.random.RandomState(seed).randint(0, 256, size=(2, 2, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.kron(colours, np.ones((20, 20, 1), np.uint8))).save(buffer, format="PNG")
    return buffer.getvalue()


def corpus_rows() -> list[dict]:
    rows = [{"id": f"full-{i}", "image_bytes": quadrant_image(i), "text": f"record {i} words w{i} v{i * 7}",
             "label": LABELS[i % 3]} for i in range(12)]
    rows += [{"id": f"text-{i}", "text": f"only words here t{i} u{i * 3}", "label": LABELS[i % 3]} for i in range(4)]
    rows += [{"id": f"image-{i}", "image_bytes": quadrant_image(100 + i), **({"label": "dog"} if i < 2 else {})}
             for i in range(4)]
    twin = {"image_bytes": quadrant_image(999), "text": "the very same record twice", "label": "cat"}
    rows += [{"id": "twin-a", **twin}, {"id": "twin-b", **twin}]
    jpeg = corpora.image_bytes(5, size=(64, 64), fmt="JPEG")
    rows += [{"id": "corrupt", "image_bytes": jpeg[:len(jpeg) // 3], "text": "cut short", "label": "cat"},
             {"id": "not-an-image", "image_bytes": b"plain text, no picture\n" * 8, "text": "t", "label": "dog"},
             {"id": "missing", "image_bytes": quadrant_image(7), "text": "gone", "label": "fox"}]
    return rows


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, fixture_encoders) -> dict:
    """The embedding job's output for the corpus (two files), its run report, and the corpus's rows and folder."""
    corpus = str(tmp_path_factory.mktemp("inspect_corpus"))
    rows = corpus_rows()
    manifest = corpora.write_jsonl_manifest(corpus, rows)
    os.remove(os.path.join(corpus, "images", "missing.img"))
    output = str(tmp_path_factory.mktemp("inspect_embeddings") / "out")
    report = embed_corpus.run(["--input", manifest, "--output", output, "--image_encoder", fixture_encoders["image"],
                               "--text_encoder", fixture_encoders["text"], "--passthrough", "image",
                               "--num_shards", "2", "--max_error_rate", "0.5"])
    assert report.passed
    os.remove(os.path.join(corpus, "images", "full-0.img"))
    corpora.write_file(os.path.join(corpus, "images", "full-1.img"), b"no longer an image")
    with open(os.path.join(output, layout.REPORT_NAME)) as handle:
        run_report = json.load(handle)
    return {"output": output, "corpus": corpus, "rows": rows, "run_report": run_report}


@pytest.fixture(scope="module")
def inspected(tmp_path_factory, embedded) -> dict:
    """`hubembed inspect` with every sampled record a query: its exit code, console, and the files it wrote."""
    report_dir = str(tmp_path_factory.mktemp("inspect_report") / "report")
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        code = cli.main(["inspect", embedded["output"], "--output", report_dir, "--image_root", embedded["corpus"],
                         "--queries", "1000", "--neighbours", str(NEIGHBOURS)])
    with open(os.path.join(report_dir, REPORT_NAME)) as handle:
        report = json.load(handle)
    with open(os.path.join(report_dir, NEIGHBOURS_JSON)) as handle:
        neighbours = json.load(handle)
    return {"code": code, "console": console.getvalue(), "report": report, "neighbours": neighbours,
            "dir": report_dir}


def embedded_rows(embedded: dict) -> list[dict]:
    return [row for row in embedded["rows"] if row["id"] not in DEAD_LETTERED]


def test_the_counts_add_up_to_the_run_report(embedded, inspected):
    report, run_report = inspected["report"], embedded["run_report"]
    assert inspected["code"] == 0
    assert report["rows"] == run_report["embedded"] == len(embedded_rows(embedded))
    assert report["dead_letters"]["total"] == run_report["dead_lettered"] == len(DEAD_LETTERED)
    assert report["rows"] + report["dead_letters"]["total"] == run_report["read"]
    assert report["dead_letters"]["by_reason"] == run_report["dead_lettered_by_reason"] == dict(
        collections.Counter(DEAD_LETTERED.values()))
    assert report["dead_letters"]["examples"][Reason.IMAGE_MISSING]["id"] == "missing"
    assert report["matches_run_report"] is True and report["published"] is True
    assert report["files"]["embeddings"] == 2 and report["files"]["other_encoders"] == []


def test_coverage_labels_and_encoders(embedded, inspected, fixture_encoders):
    report, rows = inspected["report"], embedded_rows(embedded)
    with_image = sum("image_bytes" in row for row in rows)
    with_text = sum("text" in row for row in rows)
    both = sum("image_bytes" in row and "text" in row for row in rows)
    assert report["coverage"] == {"image": with_image, "text": with_text, "both": both, "neither": 0}
    assert (with_image, with_text, both) == (18, 18, 14)

    labels = collections.Counter(row.get("label") for row in rows)
    assert report["labels"]["unlabeled"] == labels.pop(None) == 2
    assert report["labels"]["distinct"] == len(labels)
    assert {item["label"]: item["rows"] for item in report["labels"]["top"]} == labels
    assert [item["rows"] for item in report["labels"]["top"]] == sorted(labels.values(), reverse=True)

    metadata = report["metadata"]
    image, text = metadata[cols.META_IMAGE_ENCODER], metadata[cols.META_TEXT_ENCODER]
    assert (image["handle"], image["dim"], text["handle"], text["dim"]) == (
        fixture_encoders["image"], 8, fixture_encoders["text"], 6)
    assert metadata[cols.META_EMBEDDING_LAYOUT] == [[cols.IMAGE_EMBEDDING, 0, 8], [cols.TEXT_EMBEDDING, 8, 6]]
    assert metadata[cols.META_L2_NORMALIZE] is False
    console = inspected["console"]
    assert fixture_encoders["image"] in console and fixture_encoders["text"] in console


def test_vector_norms_are_those_of_the_stored_vectors(embedded, inspected):
    """Norms of `embedding` over every row, and of each modality's part of it over the rows that have it."""
    table = read_parquet_dir(embedded["output"], layout.EMBEDDINGS_PREFIX)
    vectors = np.array(table.column(cols.EMBEDDING).to_pylist(), np.float64)
    parts = {cols.EMBEDDING: (vectors, np.ones(len(vectors), bool)),
             cols.IMAGE_EMBEDDING: (vectors[:, :8], np.array(table.column(cols.HAS_IMAGE).to_pylist())),
             cols.TEXT_EMBEDDING: (vectors[:, 8:], np.array(table.column(cols.HAS_TEXT).to_pylist()))}
    norms = inspected["report"]["vector_norms"]
    assert sorted(norms) == sorted(parts)
    for name, (matrix, present) in parts.items():
        lengths = np.linalg.norm(matrix[present], axis=1)
        stats = norms[name]
        assert (stats["rows"], stats["zero"], stats["non_finite"]) == (int(present.sum()), 0, 0)
        assert stats["min"] == pytest.approx(lengths.min(), rel=1e-5)
        assert stats["mean"] == pytest.approx(lengths.mean(), rel=1e-5)
        assert stats["max"] == pytest.approx(lengths.max(), rel=1e-5)


def test_every_query_finds_others_most_similar_first_and_the_twins_find_each_other(embedded, inspected):
    table = read_parquet_dir(embedded["output"], layout.EMBEDDINGS_PREFIX)
    vectors = dict(zip(table.column(cols.ID).to_pylist(), np.array(table.column(cols.EMBEDDING).to_pylist()),
                       strict=True))
    queries = inspected["neighbours"]["queries"]
    assert sorted(query["id"] for query in queries) == sorted(vectors)  # --queries 1000: every sampled record
    labels = {row["id"]: row.get("label") for row in embedded["rows"]}
    for query in queries:
        hits = query["neighbours"]
        assert len(hits) == NEIGHBOURS
        assert query["id"] not in [hit["id"] for hit in hits]  # the query itself is left out
        similarities = [hit["similarity"] for hit in hits]
        assert similarities == sorted(similarities, reverse=True)
        assert query["label"] == labels[query["id"]] and all(hit["label"] == labels[hit["id"]] for hit in hits)
        a, b = vectors[query["id"]], vectors[hits[0]["id"]]
        assert hits[0]["similarity"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-5)
    by_id = {query["id"]: query for query in queries}
    for twin, other in (("twin-a", "twin-b"), ("twin-b", "twin-a")):
        first = by_id[twin]["neighbours"][0]
        assert first["id"] == other and first["similarity"] > 0.999
        assert by_id[twin]["neighbours"][1]["similarity"] < 0.999  # nothing else is a copy


def test_pictures_are_pngs_and_broken_images_are_grey_tiles(embedded, inspected):
    report = inspected["report"]
    queries = inspected["neighbours"]["queries"]
    for name, least_width, least_height in ((MAP_PNG, 400, 300),
                                            (CONTACT_SHEET_PNG, (NEIGHBOURS + 1) * 100, len(queries) * 100)):
        path = os.path.join(inspected["dir"], name)
        with open(path, "rb") as handle:
            assert handle.read(8) == PNG_MAGIC
        with Image.open(path) as picture:
            picture.verify()
            assert picture.size[0] >= least_width and picture.size[1] >= least_height, (name, picture.size)
    assert report["map"]["projection"] == "pca" and len(report["map"]["explained_variance"]) == 2
    assert report["map"]["coloured_labels"] == [item["label"] for item in report["labels"]["top"]]
    sheet = report["contact_sheet"]
    assert sheet["path"].endswith(CONTACT_SHEET_PNG) and sheet["image_column"] == "image"

    problems = {entry["id"]: entry["image_problem"] for query in queries for entry in (query, *query["neighbours"])}
    for record_id, problem in problems.items():
        if record_id in BROKEN_AFTER_EMBEDDING:
            assert problem.startswith(BROKEN_AFTER_EMBEDDING[record_id])
        elif record_id.startswith("text-"):
            assert problem == "no image"
        else:
            assert problem is None, (record_id, problem)
    assert sheet["images"] == 18 and sheet["drawn"] == 16


def test_the_console_summary(inspected):
    console = inspected["console"]
    for line in ("  rows                    22", "  with both               14", "  dead-lettered            3",
                 "    image_missing", "run report: read 25 = 22 embedded + 3 dead-lettered: matches",
                 "labels: 3 distinct, 2 unlabeled rows", "sample: 22 rows of 22", "map: pca",
                 "nearest neighbours (cosine; the query itself left out) of 22 sampled records", "contact sheet → ",
                 f"report → {os.path.join(inspected['dir'], REPORT_NAME)}"):
        assert line in console, line


def test_a_bounded_sample_as_a_module_without_tensorflow(tmp_path, embedded):
    """`python -m beam_jobs.inspect_output` with --sample 10: the counts stay exact, the sample holds 10 rows, and
    nothing imports TensorFlow (`-X importtime` lists every import); `hubembed inspect --help` needs neither
    TensorFlow nor Beam."""
    report_dir = str(tmp_path / "report")
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "beam_jobs.inspect_output", embedded["output"],
                           "--output", report_dir, "--sample", "10", "--queries", "3", "--image_root",
                           embedded["corpus"]], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "apache_beam" in imported and "pyarrow.parquet" in imported
    assert not [name for name in imported if name.split(".")[0] in ("tensorflow", "tf_keras", "tensorflow_hub")]
    with open(os.path.join(report_dir, REPORT_NAME)) as handle:
        report = json.load(handle)
    assert report["sample"] == {"rows": 10, "capacity": 10, "seed": 0, "finite_rows": 22}
    assert report["rows"] == 22 and report["coverage"]["both"] == 14  # exact, whatever the sample
    assert report["neighbours"]["queries"] == 3 and "sample: 10 rows of 22" in done.stdout

    helped = subprocess.run([sys.executable, "-c", (
        "import sys\nfrom beam_jobs import cli\ntry:\n    cli.main(['inspect', '--help'])\n"
        "except SystemExit as exit:\n    print('EXIT', exit.code)\n"
        "print('HEAVY', sorted({n.split('.')[0] for n in sys.modules} & {'apache_beam', 'tensorflow'}))")],
        capture_output=True, text=True, cwd=REPO, timeout=60)
    assert helped.stdout.splitlines()[-2:] == ["EXIT 0", "HEAVY []"], helped.stderr
    assert "usage: hubembed inspect" in helped.stdout and "--image_column NAME" in helped.stdout


def test_without_an_image_column_there_is_no_contact_sheet_and_one_line_says_why(tmp_path, embedded):
    """The same output with its image column dropped (the job run without --passthrough image)."""
    folder = tmp_path / "no_images"
    folder.mkdir()
    for path in sorted(os.listdir(embedded["output"])):
        if path.startswith(layout.EMBEDDINGS_PREFIX):
            table = pq.read_table(os.path.join(embedded["output"], path))
            pq.write_table(table.drop_columns(["image"]), str(folder / path))
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        assert cli.main(["inspect", str(folder), "--output", str(tmp_path / "report"), "--queries", "2"]) == 0
    report = json.load(open(tmp_path / "report" / REPORT_NAME))
    assert report["contact_sheet"]["path"] is None
    assert not os.path.exists(tmp_path / "report" / CONTACT_SHEET_PNG)
    why = [line for line in console.getvalue().splitlines() if "no contact sheet" in line]
    assert len(why) == 1 and "--passthrough image" in why[0]
    assert report["run_report"] is None and report["published"] is False and report["dead_letters"]["total"] == 0


@pytest.mark.parametrize("argv, message", [
    ([], "OUTPUT is required"),
    (["{missing}", "--output", "{report}"], "does not exist"),
    (["{empty}", "--output", "{report}"], "holds no embeddings files"),
    (["{output}"], "--output is required"),
    (["{output}", "--output", "{output}/report"], "is inside OUTPUT"),
    (["{output}", "--output", "{report}", "--sample", "1"], "--sample must be at least 2, not 1"),
    (["{output}", "--output", "{report}", "--image_column", "picture"], "--image_column 'picture' is not a column"),
    (["{output}", "--output", "{report}", "--image_column", "has_image"], "is not a text column"),
    (["{output}", "--output", "{report}", "--neighbors", "3"], "did you mean --neighbours?"),
])
def test_misconfiguration_exits_2_with_one_line(capsys, tmp_path, embedded, argv, message):
    (tmp_path / "empty").mkdir()
    places = {"missing": str(tmp_path / "nowhere"), "empty": str(tmp_path / "empty"), "report": str(tmp_path / "r"),
              "output": embedded["output"]}
    capsys.readouterr()
    assert cli.main(["inspect", *[arg.format(**places) for arg in argv]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hubembed: error: ") and message in err, err
    assert not os.path.exists(tmp_path / "r" / REPORT_NAME)


def test_the_light_parser_and_beams_options_read_inspect_flags_alike():
    argv = ["out/embeddings", "--output", "report", "--sample", "7", "--image_column", "path", "--seed", "3"]
    light = vars(flags.INSPECT.parser().parse_known_args(argv)[0])
    beam_view = PipelineOptions(argv).view_as(InspectOptions)
    assert light["sample"] == 7 and light["embeddings_output"] == "out/embeddings"
    assert light == {name: getattr(beam_view, name) for name in light}


def test_the_reservoir_is_a_uniform_sample_of_bounded_size():
    """Rows 0..999 offered in uneven batches: every row is kept with probability capacity / rows, the sample never
    holds more than its capacity, and a seed gives the same sample."""
    rows, capacity, draws = 1000, 50, 600
    kept = np.zeros(rows)
    for seed in range(draws):
        reservoir = Reservoir(capacity, np.random.default_rng(seed))
        for start in range(0, rows, 37):
            ids = np.arange(start, min(start + 37, rows))
            reservoir.offer(ids[:, None].astype(np.float32), {"id": pa.array(ids)})
        vectors, fields = reservoir.sample()
        assert len(vectors) == capacity and reservoir.seen == rows
        assert fields["id"] == vectors[:, 0].astype(int).tolist() and len(set(fields["id"])) == capacity
        kept[fields["id"]] += 1
    share = kept / draws
    expected = capacity / rows
    assert abs(share.mean() - expected) < 1e-9
    for decile in np.split(share, 10):  # early, middle and late rows alike
        assert abs(decile.mean() - expected) < 0.01
    first = Reservoir(capacity, np.random.default_rng(1))
    again = Reservoir(capacity, np.random.default_rng(1))
    for reservoir in (first, again):
        reservoir.offer(np.arange(rows, dtype=np.float32)[:, None], {"id": pa.array(range(rows))})
    assert first.sample()[1] == again.sample()[1]
