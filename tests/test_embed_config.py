"""Misconfiguration fails at start, in one line, before any pipeline runs; and the options are discoverable."""

from __future__ import annotations

import glob
import os

import pytest

from beam_jobs.embed_corpus import main
from encoders.runtime import tf
from tests import corpus_builders as corpora


@pytest.fixture
def manifest(tmp_path) -> str:
    return corpora.write_jsonl_manifest(str(tmp_path / "corpus"), corpora.good_rows(2))


def fails_in_one_line(capsys, argv: list[str], *fragments: str) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("hubembed: error:")]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_handle(capsys, tmp_path, manifest, fixture_encoders):
    fails_in_one_line(capsys, ["--input", manifest, "--output", str(tmp_path / "o"),
                               "--image_encoder", str(tmp_path / "no-such-model"),
                               "--text_encoder", fixture_encoders["text"]],
                      "cannot load image encoder", "no-such-model")


def test_encoder_whose_output_is_not_a_matrix(capsys, tmp_path, manifest, fixture_encoders):
    fails_in_one_line(capsys, ["--input", manifest, "--output", str(tmp_path / "o"), "--image_encoder", "none",
                               "--text_encoder", fixture_encoders["bad_rank"]],
                      "float32[2, 2, 3]", "not a [B, d] float embedding")


def test_encoder_of_the_wrong_modality(capsys, tmp_path, manifest, fixture_encoders):
    fails_in_one_line(capsys, ["--input", manifest, "--output", str(tmp_path / "o"),
                               "--image_encoder", fixture_encoders["text"], "--text_encoder", "none"],
                      "image encoder", "does not take [B, H, W, 3]")


def test_image_size_that_contradicts_the_module(capsys, tmp_path, manifest, fixture_encoders):
    fails_in_one_line(capsys, ["--input", manifest, "--output", str(tmp_path / "o"), "--image_size", "64",
                               "--image_encoder", fixture_encoders["image"], "--text_encoder", "none"],
                      "takes 32x32 images but --image_size=64")


def test_unreadable_input_path(capsys, tmp_path, fixture_encoders):
    fails_in_one_line(capsys, ["--input", str(tmp_path / "nothing-*.jsonl"), "--output", str(tmp_path / "o"),
                               "--image_encoder", fixture_encoders["image"], "--text_encoder", "none"],
                      "no input files match")


def test_input_of_unknown_format(capsys, tmp_path, fixture_encoders):
    path = corpora.write_file(str(tmp_path / "corpus.xyz"), b"?")
    fails_in_one_line(capsys, ["--input", path, "--output", str(tmp_path / "o"),
                               "--image_encoder", fixture_encoders["image"], "--text_encoder", "none"],
                      "cannot tell the input format", "--input_format")


def test_no_encoder_at_all(capsys, tmp_path, manifest):
    fails_in_one_line(capsys, ["--input", manifest, "--output", str(tmp_path / "o"),
                               "--image_encoder", "none", "--text_encoder", "none"], "nothing to embed")


def test_output_of_an_earlier_run_is_not_overwritten_silently(capsys, tmp_path, manifest, fixture_encoders):
    argv = ["--input", manifest, "--output", str(tmp_path / "o"), "--image_encoder", fixture_encoders["image"],
            "--text_encoder", fixture_encoders["text"]]
    assert main(argv) == 0
    capsys.readouterr()
    fails_in_one_line(capsys, argv, "already holds a run's output", "--overwrite")
    assert main([*argv, "--overwrite", "--num_shards", "1"]) == 0
    assert sorted(os.listdir(tmp_path / "o")) == [
        "_SUCCESS", "_dead_letters", "_run_report.json", "embeddings-00000-of-00001.parquet"]
    assert os.listdir(tmp_path / "o" / "_dead_letters") == ["dead_letters-00000-of-00001.parquet"]


def test_passthrough_may_not_shadow_output_columns(capsys, tmp_path, manifest, fixture_encoders):
    fails_in_one_line(capsys, ["--input", manifest, "--output", str(tmp_path / "o"), "--passthrough", "embedding",
                               "--image_encoder", fixture_encoders["image"], "--text_encoder", "none"],
                      "--passthrough", "embedding")


def test_local_handle_on_a_cluster_runner(capsys, tmp_path, manifest, fixture_encoders):
    fails_in_one_line(capsys, ["--input", manifest, "--output", str(tmp_path / "o"), "--runner", "DataflowRunner",
                               "--image_encoder", fixture_encoders["image"], "--text_encoder", "none"],
                      "local folder", "DataflowRunner")


def test_help_lists_the_job_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--input", "--output", "--image_encoder", "--text_encoder", "--image_output_key", "--batch_size",
                 "--l2_normalize", "--max_error_rate", "--passthrough", "--input_format", "--device"):
        assert flag in out


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="this machine has a GPU")
def test_gpu_forced_where_there_is_none(capsys, tmp_path, manifest, fixture_encoders):
    fails_in_one_line(capsys, ["--input", manifest, "--output", str(tmp_path / "o"), "--device", "gpu",
                               "--image_encoder", fixture_encoders["image"], "--text_encoder", "none"],
                      "--device=gpu", "no GPU")


def test_console_script_dispatches_to_the_job(capsys):
    from beam_jobs.cli import main as hubembed

    with pytest.raises(SystemExit):
        hubembed(["embed", "--help"])
    assert "--image_encoder" in capsys.readouterr().out
    assert hubembed(["no-such-command"]) == 2
    assert "hubembed embed" in capsys.readouterr().err


def test_a_module_probed_before_is_not_loaded_again(tmp_path, fixture_encoders):
    import shutil

    from encoders.hub_module import EncoderConfigError, EncoderSpec, probe_encoder

    module = str(tmp_path / "text")
    shutil.copytree(fixture_encoders["text"], module)
    probes = str(tmp_path / "probes")
    first = probe_encoder(EncoderSpec("text", module), None, probes)
    assert len(os.listdir(probes)) == 1
    # Without its variables' values the module cannot load: the probe remembered by its content fingerprints (the
    # graph, the functions, the variables' index) still answers.
    for data in glob.glob(os.path.join(module, "variables", "variables.data-*")):
        os.remove(data)
    assert probe_encoder(EncoderSpec("text", module), None, probes) == first
    with pytest.raises(EncoderConfigError, match="cannot load"):
        probe_encoder(EncoderSpec("text", module))
