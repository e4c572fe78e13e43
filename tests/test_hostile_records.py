"""Records that must not stop the job: bad bytes in ids and fields, over-long texts, records the encoder fails on
alone (even in batches of one), and the options and output folders a user gets wrong."""

from __future__ import annotations

import json
import os

import pytest

from beam_jobs.embed_corpus import main, run
from schemas.report import EmbedRunReport
from tests import corpus_builders as corpora
from tests.conftest import read_parquet_dir
from tests.fixture_models import PoisonedTextEncoder
from tests.test_embed_config import fails_in_one_line
from transforms.dead_letters import MAX_CONSECUTIVE_FAILURES


def text_job(encoder: str, manifest: str, output: str, *extra: str) -> EmbedRunReport:
    return run(["--input", manifest, "--output", output, "--image_encoder", "none", "--text_encoder", encoder,
                "--max_error_rate", "1", *extra])


def accounted_for(report: EmbedRunReport, output: str) -> tuple[list[dict], list[dict]]:
    """The embedded and dead-lettered rows, after checking that every record read is in exactly one of them."""
    embedded = read_parquet_dir(output, "embeddings").to_pylist()
    dead = read_parquet_dir(output, "dead_letters").to_pylist()
    assert (report.embedded, report.dead_lettered) == (len(embedded), len(dead))
    assert report.read == len(embedded) + len(dead) and report.reconciled
    return embedded, dead


@pytest.mark.parametrize("batch_size", ["1", "2"])
def test_a_record_failing_alone_in_a_small_batch_is_dead_lettered(fixture_encoders, tmp_path, batch_size):
    rows = [{"id": f"t{i}", "text": f"harmless text {i}"} for i in range(5)]
    rows[0]["text"] = rows[4]["text"] = PoisonedTextEncoder.POISON  # first and last: each alone in its batch
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), rows)
    output = str(tmp_path / "out")
    report = text_job(fixture_encoders["poisoned_text"], manifest, output, "--batch_size", batch_size,
                      "--min_batch_size", "1")
    embedded, dead = accounted_for(report, output)
    assert sorted(row["id"] for row in embedded) == ["t1", "t2", "t3"]
    assert sorted((row["id"], row["reason"]) for row in dead) == [("t0", "encoder_failed"), ("t4", "encoder_failed")]
    # The message keeps what the model said, not TensorFlow's "Graph execution error:" wrapper.
    assert all("poisoned input" in row["message"] and "Graph execution" not in row["message"] for row in dead)


def test_a_long_run_of_records_failing_alone_is_the_encoders_fault(fixture_encoders, tmp_path):
    rows = [{"id": f"p{i}", "text": PoisonedTextEncoder.POISON} for i in range(MAX_CONSECUTIVE_FAILURES + 6)]
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), rows)
    with pytest.raises(Exception, match="in a row failed alone"):
        text_job(fixture_encoders["poisoned_text"], manifest, str(tmp_path / "out"), "--batch_size", "1",
                 "--min_batch_size", "1")


def test_bad_bytes_in_ids_labels_and_passthrough_are_dead_lettered_with_their_field(fixture_encoders, tmp_path):
    lines = [
        b'{"id": "good", "text": "fine words", "label": "a", "shop": "s1"}',
        b'{"id": "caf\xe9", "text": "latin-1 byte in the id"}',
        b'{"id": "lone-\\ud800", "text": "a lone surrogate escaped in JSON"}',
        b'{"id": "bad-label", "text": "label with a bad byte", "label": "b\xff"}',
        b'{"id": "bad-shop", "text": "passthrough with a bad byte", "shop": "s\xfe"}',
        b'{"id": "also-good", "text": "more words", "label": "b", "shop": "s2"}',
    ]
    manifest = corpora.write_file(str(tmp_path / "corpus" / "m.jsonl"), b"\n".join(lines) + b"\n")
    output = str(tmp_path / "out")
    # Batches of one: each bad record alone, where a pyarrow failure used to look like a broken encoder.
    report = text_job(fixture_encoders["text"], manifest, output, "--passthrough", "shop", "--batch_size", "1",
                      "--min_batch_size", "1")
    embedded, dead = accounted_for(report, output)
    assert sorted(row["id"] for row in embedded) == ["also-good", "good"]
    reasons = {row["id"]: (row["reason"], row["message"]) for row in dead}
    assert reasons["caf\\xe9"][0] == "invalid_id" and "not valid UTF-8" in reasons["caf\\xe9"][1]
    assert reasons["lone-\\ud800"][0] == "invalid_id"
    assert reasons["bad-label"][0] == "invalid_field" and reasons["bad-label"][1].startswith("label:")
    assert reasons["bad-shop"][0] == "invalid_field" and reasons["bad-shop"][1].startswith("shop:")


def test_text_over_the_cap_is_dead_lettered_before_the_encoder(fixture_encoders, tmp_path):
    rows = [{"id": "short", "text": "a short caption"}, {"id": "long", "text": "word " * 3000}]
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), rows)
    output = str(tmp_path / "out")
    report = text_job(fixture_encoders["text"], manifest, output, "--max_text_chars", "10000")
    embedded, dead = accounted_for(report, output)
    assert [row["id"] for row in embedded] == ["short"]
    assert [(row["id"], row["reason"]) for row in dead] == [("long", "text_too_long")]
    assert "15,000 characters" in dead[0]["message"]


def test_max_error_rate_zero_fails_on_a_single_dead_letter(fixture_encoders, tmp_path, capsys):
    rows = [{"id": f"t{i}", "text": f"text {i}"} for i in range(40)] + [{"id": "nothing"}]
    manifest = corpora.write_jsonl_manifest(str(tmp_path / "corpus"), rows)
    argv = ["--input", manifest, "--image_encoder", "none", "--text_encoder", fixture_encoders["text"]]
    assert main([*argv, "--output", str(tmp_path / "strict"), "--max_error_rate", "0"]) == 1
    assert "1 of 41 records were dead-lettered" in capsys.readouterr().err
    # The rate is compared from the counts, never rounded first.
    report = EmbedRunReport(job="x", read=3_000_000, embedded=2_999_999, dead_lettered=1,
                            dead_lettered_by_reason={"no_modality": 1}, seconds=1.0, rows_per_second=1.0,
                            error_rate=round(1 / 3_000_000, 6), max_error_rate=0.0, outputs={})
    assert report.error_rate == 0.0 and not report.passed


@pytest.fixture
def manifest(tmp_path) -> str:
    return corpora.write_jsonl_manifest(str(tmp_path / "corpus"), corpora.good_rows(2))


@pytest.mark.parametrize("flags, fragment", [
    (["--passthrough", "shop,shop"], "--passthrough names a column twice: shop"),
    (["--num_shards", "-1"], "--num_shards must be at least 0"),
    (["--image_size", "0"], "--image_size must be at least 1"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--max_text_chars", "0"], "--max_text_chars must be at least 1"),
    (["--max_image_pixels", "-5"], "--max_image_pixels must be at least 1"),
    (["--progress_interval", "-1"], "--progress_interval must be a number of seconds, at least 0"),
    (["--max_eror_rate", "0.5"], "unknown option --max_eror_rate: did you mean --max_error_rate?"),
    (["--l2_normalise"], "did you mean --l2_normalize?"),
])
def test_bad_option_values_fail_at_start(capsys, tmp_path, manifest, fixture_encoders, flags, fragment):
    fails_in_one_line(capsys, ["--input", manifest, "--output", str(tmp_path / "o"),
                               "--image_encoder", fixture_encoders["image"], "--text_encoder",
                               fixture_encoders["text"], *flags], fragment)
    assert not os.path.exists(tmp_path / "o" / "_run_report.json")


def test_output_with_glob_characters_is_refused_and_deletes_nothing(capsys, tmp_path, manifest, fixture_encoders):
    runs = tmp_path / "runs"
    for night in ("a", "b"):
        assert main(["--input", manifest, "--output", str(runs / night), "--image_encoder",
                     fixture_encoders["image"], "--text_encoder", fixture_encoders["text"]]) == 0
    before = sorted(os.listdir(runs / "a")) + sorted(os.listdir(runs / "b"))
    capsys.readouterr()
    for output in (str(runs / "*"), str(tmp_path / "run[1]")):
        fails_in_one_line(capsys, ["--input", manifest, "--output", output, "--overwrite",
                                   "--image_encoder", fixture_encoders["image"],
                                   "--text_encoder", fixture_encoders["text"]], "glob characters")
    assert sorted(os.listdir(runs / "a")) + sorted(os.listdir(runs / "b")) == before


def test_unwritable_output_fails_at_start(capsys, tmp_path, manifest, fixture_encoders):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    argv = ["--input", manifest, "--image_encoder", fixture_encoders["image"], "--text_encoder",
            fixture_encoders["text"]]
    fails_in_one_line(capsys, [*argv, "--output", str(a_file)], "is a file, not a folder")
    fails_in_one_line(capsys, [*argv, "--output", str(a_file / "below")], "cannot write to --output")


def test_another_jobs_output_is_never_overwritten(capsys, tmp_path, manifest, fixture_encoders):
    from beam_jobs.launch import JobConfigError
    from beam_jobs.output_folder import claim

    output = str(tmp_path / "emb")
    assert main(["--input", manifest, "--output", output, "--image_encoder", fixture_encoders["image"],
                 "--text_encoder", fixture_encoders["text"]]) == 0
    before = sorted(os.listdir(output))
    # What predict claims when its --output is an embeddings folder, with --overwrite.
    with pytest.raises(JobConfigError, match="holds the output of embed_corpus, not of predict"):
        claim(output, "predictions", "predict", overwrite=True)
    assert sorted(os.listdir(output)) == before
    with open(os.path.join(output, "_run_report.json")) as handle:
        assert json.load(handle)["job"] == "embed_corpus"


def test_printable_keeps_valid_text_and_escapes_bad_bytes():
    from transforms.dead_letters import printable

    assert printable("plain ünïcödé") == "plain ünïcödé"
    assert printable(b"caf\xe9".decode("utf-8", "surrogateescape")) == "caf\\xe9"
    assert printable("lone \ud800") == "lone \\ud800"
    assert printable(None) is None
