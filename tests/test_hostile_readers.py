"""The corpus readers against hostile input: names and ids that are not UTF-8, fields of the wrong type, JSON nested
past the parser, broken and compressed files, byte order marks, CSV quoting, JSON arrays, odd image folders and
overlapping patterns. Each case is a real DirectRunner run of the job, and every record read must end in the
embeddings or the dead letters, the counters agreeing with the files."""

from __future__ import annotations

import base64
import bz2
import glob
import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_jobs.embed_corpus import main, run
from schemas.report import EmbedRunReport
from tests import corpus_builders as corpora
from tests.corpus_builders import os_name, write_file
from transforms.embedding.read import MAX_JSON_ARRAY_BYTES, CorpusConfigError, infer_format


def embed(encoders: dict, input_path: str, output: str, *extra: str) -> EmbedRunReport:
    return run(["--input", input_path, "--output", output, "--image_encoder", encoders["image"],
                "--text_encoder", encoders["text"], "--runner", "DirectRunner", "--max_error_rate", "1", *extra])


def output_rows(output: str, prefix: str) -> list[dict]:
    """Every row of the `<prefix>-*.parquet` files anywhere under `output` (none is an empty list)."""
    files = sorted(glob.glob(os.path.join(output, "**", f"{prefix}-*.parquet"), recursive=True))
    return [row for path in files for row in pq.read_table(path).to_pylist()]


def accounted_for(report: EmbedRunReport, output: str) -> tuple[dict[str, dict], list[dict]]:
    """The embedded rows by id and the dead letters, after checking every record read is in exactly one of them."""
    embedded = output_rows(output, "embeddings")
    dead = output_rows(output, "dead_letters")
    assert (report.embedded, report.dead_lettered) == (len(embedded), len(dead))
    assert report.read == len(embedded) + len(dead) and report.reconciled
    return {row["id"]: row for row in embedded}, dead


def letters_at(dead: list[dict], fragment: str) -> list[dict]:
    return [letter for letter in dead if fragment in letter["source"]]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PNG = corpora.image_bytes(1)


# 1. Names and ids holding bytes that are not UTF-8 (and JSON's lone surrogates): never a crash.

def bad_names_jsonl(root: str) -> tuple[str, set[str], int]:
    write_file(os_name(os.fsencode(root) + b"/m\xe9.jsonl"),
               b'{"id": "caf\xe9", "text": "latin-1 id"}\n{"id": "\\ud800", "text": "a lone surrogate"}\n'
               b'{"id": "ok", "text": "fine"}\n')
    return os.path.join(root, "m?.jsonl"), {"ok"}, 2


def bad_names_csv(root: str) -> tuple[str, set[str], int]:
    write_file(os_name(os.fsencode(root) + b"/m\xe9.csv"), b"id,text\ncaf\xe9,latin-1 id\nok,fine\n")
    return os.path.join(root, "m?.csv"), {"ok"}, 1


def bad_names_folder(root: str) -> tuple[str, set[str], int]:
    raw = os.fsencode(root)
    write_file(os_name(raw + b"/c\xe9t/a.png"), PNG)
    write_file(os_name(raw + b"/dog/b\xff.png"), PNG)
    write_file(os_name(raw + b"/dog/ok.png"), PNG)
    write_file(os_name(raw + b"/dog/ok.txt"), b"a caption")
    return root, {"dog/ok"}, 2


def bad_names_webdataset(root: str) -> tuple[str, set[str], int]:
    corpora.write_tar(os_name(os.fsencode(root) + b"/s\xe9-000000.tar"),
                      [(os_name(b"k\xe9.txt"), b"hello"), ("ok.txt", b"fine"), ("ok.png", PNG)])
    return os.path.join(root, "s?-000000.tar"), {"ok"}, 1


def bad_names_tfrecord(root: str) -> tuple[str, set[str], int]:
    corpora.write_tfrecord_examples(os_name(os.fsencode(root) + b"/p\xe9.tfrecord"),
                                    [{"id": b"caf\xe9", "text": b"latin-1 id"}, {"id": b"ok", "text": b"fine"}])
    return os.path.join(root, "p?.tfrecord"), {"ok"}, 1


@pytest.mark.parametrize("build", [bad_names_jsonl, bad_names_csv, bad_names_folder, bad_names_webdataset,
                                   bad_names_tfrecord], ids=lambda build: build.__name__.removeprefix("bad_names_"))
def test_names_and_ids_that_are_not_utf8_are_dead_lettered_not_fatal(fixture_encoders, tmp_path, build):
    input_path, good_ids, bad_count = build(str(tmp_path / "corpus"))
    output = str(tmp_path / "out")
    report = embed(fixture_encoders, input_path, output)

    embedded, dead = accounted_for(report, output)
    assert set(embedded) == good_ids
    # The ids made of odd bytes reach PrepareRecords, which names them (the lead's invalid_id).
    assert [letter["reason"] for letter in dead] == ["invalid_id"] * bad_count
    assert all("\\x" in letter["source"] or "\\x" in letter["id"] or "\\ud800" in letter["id"] for letter in dead)


def test_an_input_path_that_is_not_utf8_fails_in_one_line(fixture_encoders, tmp_path, capsys):
    manifest = write_file(os_name(os.fsencode(str(tmp_path)) + b"/m\xe9.jsonl"), b'{"id": "a", "text": "t"}\n')
    code = main(["--input", manifest, "--output", str(tmp_path / "out"), "--image_encoder", "none",
                 "--text_encoder", fixture_encoders["text"]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not valid UTF-8" in err and "glob" in err and "\n" not in err


# 2. Fields of the wrong type.

def test_manifest_fields_of_the_wrong_type_are_dead_lettered_naming_field_and_type(fixture_encoders, tmp_path):
    wrapped = "\n".join(b64(PNG)[i:i + 76] for i in range(0, len(b64(PNG)), 76))  # MIME-style base64
    rows = [  # (row, reason or None for embedded, a fragment of the message)
        ('{"id": "a", "image_bytes": 5, "text": "t"}', "invalid_field", "image_bytes must be bytes or base64 text, "
                                                                         "not int 5"),
        ('{"id": "b", "image_bytes": [1, 2], "text": "t"}', "invalid_field", "not list [1, 2]"),
        ('{"id": "c", "image": 7, "text": "t"}', "invalid_field", "image must be a path or URI string, not int"),
        ('{"id": ["x", "y"], "text": "t"}', "invalid_id", "the id must be a string or an integer, not list"),
        ('{"id": {"k": 1}, "text": "t"}', "invalid_id", "not dict"),
        ('{"id": 1.0, "text": "t"}', "invalid_id", "not float 1.0"),
        ('{"id": true, "text": "t"}', "invalid_id", "not bool True"),
        ('{"id": "t-list", "text": ["a"]}', "invalid_field", "the text must be a string, not list"),
        ('{"id": "t-num", "text": 3}', "invalid_field", "the text must be a string, not int 3"),
        ('{"id": "l-list", "text": "t", "label": [1]}', "invalid_field", "the label must be a string or an integer"),
        ('{"id": "l-float", "text": "t", "label": 1.5}', "invalid_field", "not float 1.5"),
        ('{"id": NaN, "text": "NaN is how pandas writes null"}', "missing_id", "no id"),
        ('{"id": 12, "text": "an integer id", "label": 3, "meta": {"b": [1, 2], "a": null}}', None, ""),
        ('{"id": "nan-text", "text": NaN, "image_bytes": "' + b64(PNG) + '"}', None, ""),
        ('{"id": "wrapped", "image_bytes": ' + json.dumps(wrapped) + ', "text": "t", "meta": 1.5}', None, ""),
    ]
    manifest = write_file(str(tmp_path / "m.jsonl"), "\n".join(row for row, _, _ in rows).encode() + b"\n")
    output = str(tmp_path / "out")
    report = embed(fixture_encoders, manifest, output, "--passthrough", "meta")

    embedded, dead = accounted_for(report, output)
    for line, (_, reason, fragment) in enumerate(rows, start=1):
        letters = [letter for letter in dead if letter["source"].endswith(f"m.jsonl:{line}")]
        if reason is None:
            assert not letters, letters
        else:
            assert [(letter["reason"], fragment in letter["message"]) for letter in letters] == [(reason, True)], (
                line, letters)
    assert set(embedded) == {"12", "nan-text", "wrapped"}
    assert embedded["12"]["label"] == "3" and embedded["12"]["meta"] == '{"a": null, "b": [1, 2]}'
    assert embedded["nan-text"]["has_image"] and not embedded["nan-text"]["has_text"]
    assert embedded["wrapped"]["has_image"] and embedded["wrapped"]["meta"] == "1.5"


def test_parquet_columns_of_the_wrong_type_and_values_python_cannot_hold(fixture_encoders, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    pq.write_table(pa.table({
        "id": pa.array([1, 2, 3], pa.int64()),
        "image_bytes": pa.array([[PNG], None, None], pa.list_(pa.binary())),
        "text": ["t", "an integer id", "t"],
        "label": pa.array([None, None, 2.0]),
        "unused": pa.array([[1], [2], [3]]),  # a column the job never reads
    }), str(folder / "m-1.parquet"))
    # Seconds since 1970: 10**15 is past datetime's year 9999, so that row cannot become a Python value.
    pq.write_table(pa.table({"id": pa.array([0, 10**15], pa.timestamp("s")), "text": ["t", "t"]}),
                   str(folder / "m-2.parquet"))
    output = str(tmp_path / "out")
    report = embed(fixture_encoders, str(folder / "m-*.parquet"), output)

    embedded, dead = accounted_for(report, output)
    assert set(embedded) == {"2"}
    reasons = {letter["source"].rsplit("/", 1)[1]: letter["reason"] for letter in dead}
    assert reasons == {"m-1.parquet#row1": "invalid_field", "m-1.parquet#row3": "invalid_field",
                       "m-2.parquet#row1": "invalid_id", "m-2.parquet#row2": "unreadable_row"}
    assert "not list" in letters_at(dead, "m-1.parquet#row1")[0]["message"]
    assert "not datetime" in letters_at(dead, "m-2.parquet#row1")[0]["message"]


def test_tfrecord_features_of_the_wrong_type(fixture_encoders, tmp_path):
    path = corpora.write_tfrecord_examples(str(tmp_path / "corpus" / "part-0.tfrecord"), [
        {"id": 7, "text": b"an integer id", "label": 4},
        {"id": 1.5, "text": b"a float id"},
        {"id": b"t-float", "text": 3.0},
        {"id": b"l-float", "text": b"t", "label": 2.5},
        {"id": b"i-int", "image/encoded": 5, "text": b"t"},
    ])
    output = str(tmp_path / "out")
    report = embed(fixture_encoders, path, output)

    embedded, dead = accounted_for(report, output)
    assert set(embedded) == {"7"} and embedded["7"]["label"] == "4"
    assert sorted((letter["id"] or "", letter["reason"]) for letter in dead) == [
        ("", "invalid_id"), ("i-int", "invalid_field"), ("l-float", "invalid_field"), ("t-float", "invalid_field")]
    assert "not float 1.5" in next(letter["message"] for letter in dead if letter["id"] is None)


# 3. JSON nested deeper than Python's parser goes.

def deep_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("where", ["jsonl", "json_array", "webdataset_member"])
def test_json_nested_past_the_parser_is_an_unreadable_row(fixture_encoders, tmp_path, where):
    root = str(tmp_path / "corpus")
    if where == "jsonl":
        input_path = write_file(f"{root}/m.jsonl", ('{"id": "deep", "x": ' + deep_json() + '}\n'
                                                    '{"id": "ok", "text": "fine"}\n').encode())
        expected = {"ok"}
    elif where == "json_array":
        write_file(f"{root}/a.json", ('[{"id": "deep", "x": ' + deep_json() + '}]').encode())
        write_file(f"{root}/b.json", b'[{"id": "ok", "text": "fine"}]')
        input_path, expected = f"{root}/*.json", {"ok"}
    else:
        input_path = corpora.write_tar(f"{root}/s.tar", [("a.txt", b"t"), ("a.json", ('{"x": ' + deep_json() + "}")
                                                                                      .encode()), ("b.txt", b"fine")])
        expected = {"b"}
    output = str(tmp_path / "out")
    report = embed(fixture_encoders, input_path, output)

    embedded, dead = accounted_for(report, output)
    assert set(embedded) == expected
    assert [letter["reason"] for letter in dead] == ["unreadable_row"]
    assert "recursion" in dead[0]["message"]


# 4. Broken Parquet files among good ones.

def test_broken_parquet_files_are_one_letter_each_and_the_good_rows_are_embedded(fixture_encoders, tmp_path):
    folder = tmp_path / "corpus"
    rows = [{"id": f"g{i}", "text": f"good text {i}"} for i in range(3)]
    corpora.write_parquet_manifest(str(folder), rows)  # manifest.parquet
    pq.write_table(pa.Table.from_pylist([{"id": f"t{i}", "text": "x"} for i in range(100)]),
                   str(folder / "truncated.parquet"))
    (folder / "truncated.parquet").write_bytes((folder / "truncated.parquet").read_bytes()[:700])
    (folder / "empty.parquet").write_bytes(b"")
    (folder / "words.parquet").write_bytes(b"these words are not a parquet file\n" * 10)
    # Row group 1 of 3 is corrupt: groups 0 and 2 are still read.
    grouped = [{"id": f"r{i}", "text": f"row {i} of three groups"} for i in range(60)]
    corpora.write_parquet_with_a_corrupt_row_group(str(folder / "grouped.parquet"), grouped, 20, broken=1)
    output = str(tmp_path / "out")
    report = embed(fixture_encoders, str(folder / "*.parquet"), output)

    embedded, dead = accounted_for(report, output)
    assert set(embedded) == {"g0", "g1", "g2"} | {f"r{i}" for i in (*range(20), *range(40, 60))}
    assert sorted(letter["source"].rsplit("/", 1)[1] for letter in dead) == [
        "empty.parquet", "grouped.parquet#row21", "truncated.parquet", "words.parquet"]
    assert {letter["reason"] for letter in dead} == {"unreadable_row"}
    assert "rows 21-40 (row group 1)" in letters_at(dead, "grouped.parquet")[0]["message"]


# 5. Compressed manifests and shards.

def test_compressed_names_infer_their_format():
    assert infer_format("c/m.jsonl.gz") == "jsonl" and infer_format("c/m.csv.bz2") == "csv"
    assert infer_format("c/part-*.tfrecord.gz") == "tfrecord" and infer_format("c/shard-{0..3}.tar.xz") == "webdataset"
    assert infer_format("c/m.json.GZ") == "jsonl" and infer_format("c/m.ndjson.zst") == "jsonl"
    for refused in ("c/m.parquet.gz", "c/part.tfrecord.bz2"):
        with pytest.raises(CorpusConfigError, match="compressed"):
            infer_format(refused)


def compressed_jsonl(root: str) -> str:
    return write_file(f"{root}/m.jsonl.gz", gzip.compress(b'{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n'))


def compressed_csv(root: str) -> str:  # Excel's byte order mark and CRLF, inside bz2
    return write_file(f"{root}/m.csv.bz2", bz2.compress(b"\xef\xbb\xbfid,text\r\na,x\r\nb,\"y\r\nz\"\r\n"))


def compressed_json_array(root: str) -> str:
    return write_file(f"{root}/m.json.gz", gzip.compress(b' [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]'))


def compressed_webdataset(root: str) -> str:
    shard = corpora.write_tar(f"{root}/plain.tar", [("a.txt", b"x"), ("b.txt", b"y"), ("b.png", PNG)])
    with open(shard, "rb") as handle:
        write_file(f"{root}/s-0.tar.gz", gzip.compress(handle.read()))
    os.remove(shard)
    return f"{root}/s-{{0..0}}.tar.gz"


def compressed_tfrecord(root: str) -> str:
    return corpora.write_tfrecord_examples(f"{root}/part-0.tfrecord.gz", [{"id": b"a", "text": b"x"},
                                                                          {"id": b"b", "text": b"y"}], compressed=True)


@pytest.mark.parametrize("build", [compressed_jsonl, compressed_csv, compressed_json_array, compressed_webdataset,
                                   compressed_tfrecord], ids=lambda build: build.__name__.removeprefix("compressed_"))
def test_compressed_inputs_are_inferred_and_read(fixture_encoders, tmp_path, build):
    input_path = build(str(tmp_path / "corpus"))
    output = str(tmp_path / "out")
    report = embed(fixture_encoders, input_path, output)

    embedded, dead = accounted_for(report, output)
    assert set(embedded) == {"a", "b"} and not dead


def test_a_compressed_manifest_cut_short_keeps_its_rows_and_says_where_it_stops(fixture_encoders, tmp_path):
    lines = b"".join(b'{"id": "r%d", "text": "some text %d"}\n' % (i, i) for i in range(2000))
    packed = gzip.compress(lines)
    manifest = write_file(str(tmp_path / "corpus" / "m.jsonl.gz"), packed[: len(packed) // 2])
    output = str(tmp_path / "out")
    report = embed(fixture_encoders, manifest, output, "--image_encoder", "none")

    embedded, dead = accounted_for(report, output)
    assert 100 < len(embedded) < 2000 and set(embedded) == {f"r{i}" for i in range(len(embedded))}
    # The last line read is cut mid-way (one letter), then the stream ends before gzip's end marker (one more).
    assert [letter["reason"] for letter in dead] == ["unreadable_row"] * len(dead) and 1 <= len(dead) <= 2
    assert any("EOFError" in letter["message"] for letter in dead)


# 6. Byte order marks, CSV quoting and field sizes, JSON arrays.

def test_byte_order_mark_in_jsonl(fixture_encoders, tmp_path):
    manifest = write_file(str(tmp_path / "m.jsonl"), b'\xef\xbb\xbf{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}')
    output = str(tmp_path / "out")
    embedded, dead = accounted_for(embed(fixture_encoders, manifest, output), output)
    assert set(embedded) == {"a", "b"} and not dead


def test_csv_from_excel_with_a_large_image_a_stray_separator_and_a_quote_left_open(fixture_encoders, tmp_path):
    large = corpora.image_bytes(3, size=(300, 300))  # ~270 KB: over csv's default 128 KiB field limit as base64
    lines = [
        "id,image_bytes,text,label",
        f"large,{b64(large)},a large image,cat",
        "short,,a row with fewer fields than the header",
        "stray,,one, separator too many,dog",
        '"multi",,"a caption',
        'over two lines",cat',
        'open,,"this quote is never closed,cat',
        "swallowed-1,,a row inside the open quote,dog",
        "swallowed-2,,another,dog",
    ]
    manifest = write_file(str(tmp_path / "m.csv"), b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    output = str(tmp_path / "out")
    report = embed(fixture_encoders, manifest, output)

    embedded, dead = accounted_for(report, output)
    assert set(embedded) == {"large", "short", "multi"}
    assert embedded["large"]["has_image"] and embedded["large"]["label"] == "cat"
    assert embedded["short"]["label"] is None
    by_source = {letter["source"].rsplit("/", 1)[1]: letter for letter in dead}
    assert set(by_source) == {"m.csv:4", "m.csv:7"}
    assert "5 fields but the header has 4" in by_source["m.csv:4"]["message"]
    # The open quote took lines 7 to the end: one letter names them, none of them vanishes silently.
    assert "lines 7-9" in by_source["m.csv:7"]["message"] and "quote" in by_source["m.csv:7"]["message"]


def test_json_files_holding_arrays_or_lines_and_an_array_over_the_bound(fixture_encoders, tmp_path):
    folder = tmp_path / "corpus"
    write_file(str(folder / "array.json"),
               b'\xef\xbb\xbf \n [{"id": "a1", "text": "x"}, 5, null,'
               b' {"id": "a2", "text": NaN, "image_bytes": "' + b64(PNG).encode() + b'"}]')
    write_file(str(folder / "lines.json"), b'{"id": "j1", "text": "x"}\n{"id": "j2", "text": "y"}\n')
    with open(folder / "big.json", "wb") as handle:  # just over the bound: parsed whole, it would cost gigabytes
        handle.write(b'[{"id": "big", "text": "' + b"x" * MAX_JSON_ARRAY_BYTES + b'"}]')
    output = str(tmp_path / "out")
    report = embed(fixture_encoders, str(folder / "*.json"), output)

    embedded, dead = accounted_for(report, output)
    assert set(embedded) == {"a1", "a2", "j1", "j2"}
    assert embedded["a2"]["has_image"] and not embedded["a2"]["has_text"]
    assert sorted(letter["source"].rsplit("/", 1)[1] for letter in dead) == [
        "array.json#row2", "array.json#row3", "big.json"]
    assert "JSONL" in letters_at(dead, "big.json")[0]["message"]


# 7. Image folders: every file is a record or a dead letter.

def test_every_file_of_an_image_folder_is_a_record_or_a_dead_letter(fixture_encoders, tmp_path):
    root = tmp_path / "folder"
    write_file(str(root / "at-the-root.png"), PNG)
    write_file(str(root / "note-at-the-root.txt"), b"text only, no label")
    write_file(str(root / "cat" / "x.jpg"), corpora.image_bytes(2, fmt="JPEG"))
    write_file(str(root / "cat" / "x.JPG"), corpora.image_bytes(3, fmt="JPEG"))
    write_file(str(root / "cat" / "deep" / "er" / "y.png"), PNG)
    write_file(str(root / "cat" / "s.png"), PNG)
    write_file(str(root / "cat" / "s.txt"), b"the caption")
    write_file(str(root / "cat" / "s.TXT"), b"a second caption")
    write_file(str(root / "cat" / ".DS_Store"), b"\x00\x00\x00\x01Bud1")
    os.symlink(str(tmp_path / "nowhere.png"), str(root / "cat" / "dangling.png"))
    os.symlink(str(tmp_path / "nowhere.txt"), str(root / "cat" / "gone.txt"))
    write_file(str(tmp_path / "elsewhere" / "e.png"), PNG)
    os.symlink(str(tmp_path / "elsewhere"), str(root / "linked"))
    write_file(str(root / "cat" / "piped.png"), PNG)
    os.mkfifo(str(root / "cat" / "piped.txt"))  # its reader would wait for ever
    output = str(tmp_path / "out")
    report = embed(fixture_encoders, str(root), output)

    embedded, dead = accounted_for(report, output)
    assert report.read == 12
    assert set(embedded) == {"at-the-root", "note-at-the-root", "cat/x", "cat/deep/er/y", "cat/s"}
    assert embedded["at-the-root"]["label"] is None and embedded["note-at-the-root"]["label"] is None
    assert embedded["cat/deep/er/y"]["label"] == "cat"
    assert embedded["cat/s"]["has_image"] and embedded["cat/s"]["has_text"]
    reasons = sorted((letter["source"].rsplit("/", 1)[1], letter["reason"]) for letter in dead)
    assert reasons == [(".DS_Store", "unsupported_file"), ("dangling.png", "image_missing"),
                       ("gone.txt", "unreadable_row"), ("linked", "unsupported_file"),
                       ("piped.png", "unreadable_row"), ("s.txt", "duplicate_id"), ("x.jpg", "duplicate_id")]
    assert "not followed" in letters_at(dead, "linked")[0]["message"]
    assert "FIFO" in letters_at(dead, "piped.png")[0]["message"]


def test_fifos_devices_and_folders_a_pattern_matches_are_never_opened(fixture_encoders, tmp_path):
    folder = tmp_path / "m"
    write_file(str(folder / "ok.jsonl"), b'{"id": "ok", "text": "fine"}\n')
    os.mkfifo(str(folder / "fifo.jsonl"))  # a read would block for ever
    os.symlink("/dev/zero", str(folder / "zeros.jsonl"))  # a read would never end
    (folder / "folder.jsonl").mkdir()  # matched by its exact name
    output = str(tmp_path / "out")
    report = embed(fixture_encoders, str(folder / "{*,folder}.jsonl"), output)

    embedded, dead = accounted_for(report, output)
    assert set(embedded) == {"ok"}
    assert sorted((letter["source"].rsplit("/", 1)[1], letter["reason"]) for letter in dead) == [
        ("fifo.jsonl", "unsupported_file"), ("folder.jsonl", "unsupported_file"), ("zeros.jsonl", "unsupported_file")]
    assert "character device" in letters_at(dead, "zeros.jsonl")[0]["message"]


# 8. Overlapping patterns and broken shards.

def test_a_file_matched_by_two_patterns_is_read_once(fixture_encoders, tmp_path):
    write_file(str(tmp_path / "m" / "a.jsonl"), b'{"id": "a", "text": "x"}\n')
    write_file(str(tmp_path / "m" / "b.jsonl"), b'{"id": "b", "text": "y"}\n')
    output = str(tmp_path / "out")
    report = embed(fixture_encoders, str(tmp_path / "m" / "{a,*}.jsonl"), output)

    embedded, dead = accounted_for(report, output)
    assert set(embedded) == {"a", "b"} and not dead


def test_shards_tarfile_would_stop_reading_quietly_are_dead_lettered(fixture_encoders, tmp_path):
    root = tmp_path / "shards"
    corpora.write_tar(str(root / "good.tar"), [("g.txt", b"fine"), ("g.json", b'{"id": "good", "label": 3}'),
                                               ("list.txt", b"t"), ("list.json", b"[1, 2]")])
    # A corrupt header after the first member: tarfile's stream mode would just stop there.
    broken = bytearray(open(corpora.write_tar(str(root / "broken.tar"), [
        ("b1.txt", b"one"), ("b2.txt", b"two"), ("b3.txt", b"three")]), "rb").read())
    broken[1024 + 148:1024 + 156] = b"9999999\x00"  # the second header's checksum
    (root / "broken.tar").write_bytes(bytes(broken))
    # Two archives in one file (`cat a.tar b.tar`): tarfile stops at the first one's end.
    first = open(corpora.write_tar(str(root / "one.tar"), [("c1.txt", b"one")]), "rb").read()
    second = open(corpora.write_tar(str(root / "two.tar"), [("c2.txt", b"two")]), "rb").read()
    (root / "concatenated.tar").write_bytes(first + second)
    os.remove(root / "one.tar")
    os.remove(root / "two.tar")
    output = str(tmp_path / "out")
    report = embed(fixture_encoders, str(root / "*.tar"), output)

    embedded, dead = accounted_for(report, output)
    assert set(embedded) == {"good", "b1", "c1"} and embedded["good"]["label"] == "3"
    reasons = sorted((letter["source"].rsplit("/", 1)[1], letter["reason"]) for letter in dead)
    assert reasons == [("broken.tar#1", "unreadable_row"), ("concatenated.tar#1", "unreadable_row"),
                       ("good.tar#1:list", "unreadable_row")]
    assert "data follows" in letters_at(dead, "broken.tar")[0]["message"]
