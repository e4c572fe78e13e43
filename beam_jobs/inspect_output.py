"""A look at an embedding job's output: what it holds, and pictures of a sample of it.

    hubembed inspect OUTPUT --output REPORT_DIR [--sample 5000] [--neighbours 5] [--queries 5] [--seed 0]
                     [--image_column image] [--image_root FOLDER]
    python -m beam_jobs.inspect_output ...   (the same)

OUTPUT is an output folder of the embedding job (local or gs://), read and never written. One streaming pass over its
embeddings Parquet gives exact counts (rows, modality coverage, vector norms, labels) and a bounded uniform sample
(transforms.downstream.inspect); the dead letters are counted by reason, the encoders read from the files' metadata,
and the counts checked against the run report. REPORT_DIR receives inspect.json, map.png (the sample on a 2-D map, by
label), neighbours.json (nearest neighbours of a few sampled records) and, when the records' images can be found
through a passthrough column, neighbours.png (a contact sheet); the console gets a short summary.

REPORT_DIR is required rather than defaulting to a sibling of OUTPUT: beside nightly outputs (`ROOT/dt=.../`) a
sibling `dt=..._inspect/` folder would be read as a partition of ROOT by pyarrow, Spark and DuckDB, and fail them on
its PNG files.

No pipeline runs and TensorFlow is never imported; Beam is used for its filesystems, and for the same start-up
checks, one-line errors and exit codes as the other jobs (beam_jobs.launch.job_main).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import time

import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs import flags
from beam_jobs.cli import exit_process
from beam_jobs.launch import EXIT_OK, GLOB_CHARACTERS, JobConfigError, check_output_folder, job_main
from beam_jobs.output_folder import read_run_report, report_job
from schemas import embeddings as cols
from schemas import layout
from transforms.downstream import inspect
from transforms.downstream.embeddings_input import EmbeddingsInputError, read_schema
from transforms.downstream.plots import plot_contact_sheet, plot_embedding_map
from transforms.embedding.files import matching_files, matching_paths

JOB_NAME = "inspect"
REPORT_NAME = "inspect.json"
MAP_PNG = "map.png"
NEIGHBOURS_JSON = "neighbours.json"
CONTACT_SHEET_PNG = "neighbours.png"
DEFAULT_IMAGE_COLUMN = "image"  # the manifest's image column, as `--passthrough image` copies it
MAP_LABELS = 10  # labels coloured on the map (one tab10 colour each); the rest are grey
THUMBNAIL_THREADS = 8  # images read at once for the contact sheet: remote reads wait on the network, not the CPU

log = logging.getLogger("hubembed")


class InspectOptions(PipelineOptions):
    """The inspection's flags, known to Beam's parser too, so a misspelt one fails at start like any job's."""

    @classmethod
    def _add_argparse_args(cls, parser):
        flags.add_inspect_flags(parser)


@dataclasses.dataclass(frozen=True)
class InspectPlan:
    """What start-up checking decided."""

    output: str
    report_dir: str
    files: list[tuple[str, int]]  # the embeddings files, with their sizes in bytes
    dead_letter_files: list[str]
    schema: pa.Schema  # the first file's; every file holds its columns at the same widths
    other_encoders: list[str]  # files written with other encoders or layout than the first
    image_column: str | None
    no_contact_sheet: str | None  # why there is no contact sheet, when there is none
    image_root: str | None
    sample: int
    neighbours: int
    queries: int
    seed: int


def _is_at_or_under(path: str, folder: str) -> bool:
    path, folder = path.rstrip("/"), folder.rstrip("/")
    return path == folder or path.startswith(folder + "/")


def _absolute(path: str) -> str:
    return path.rstrip("/") if "://" in path else os.path.abspath(path)


def _string_columns(schema: pa.Schema) -> list[str]:
    return [field.name for field in schema if pa.types.is_string(field.type) or pa.types.is_large_string(field.type)]


def plan_inspect(job: InspectOptions) -> InspectPlan:
    """Check everything a user can get wrong before reading a row. Raises JobConfigError (one line)."""
    if not job.embeddings_output:
        raise JobConfigError("OUTPUT is required: an output folder of the embedding job")
    if not job.output:
        raise JobConfigError("--output is required: the folder to write the report and pictures into")
    for flag, value, least in (("--sample", job.sample, 2), ("--neighbours", job.neighbours, 1),
                               ("--queries", job.queries, 0)):
        if value < least:
            raise JobConfigError(f"{flag} must be at least {least}, not {value}")
    output = _absolute(job.embeddings_output)
    if any(ch in output for ch in GLOB_CHARACTERS):
        raise JobConfigError(f"OUTPUT {output!r} holds glob characters ({GLOB_CHARACTERS}): name one output folder")
    if "://" not in output and not os.path.isdir(output):
        what = "is a file, not a folder" if os.path.exists(output) else "does not exist"
        raise JobConfigError(f"OUTPUT {output} {what}: name an output folder of the embedding job")
    pattern = FileSystems.join(output, f"{layout.EMBEDDINGS_PREFIX}-*{layout.PARQUET_SUFFIX}")
    files = matching_files(pattern)
    if not files:
        other_job = report_job(output)
        raise JobConfigError(f"{output} holds no embeddings files ({os.path.basename(pattern)})"
                             + (f": it holds the output of {other_job}" if other_job else ""))
    schema, other_encoders = _check_files(files)
    image_column, no_contact_sheet = _image_column(job.image_column, schema, files[0][0])
    report_dir = _absolute(job.output)
    if _is_at_or_under(report_dir, output):
        raise JobConfigError(f"--output {report_dir} is inside OUTPUT, where readers of the dataset would meet the "
                             "report's files: write it elsewhere")
    if matching_paths(FileSystems.join(report_dir, f"{layout.EMBEDDINGS_PREFIX}-*")) or report_job(report_dir):
        raise JobConfigError(f"--output {report_dir} holds a job's output: write the report to a folder of its own")
    check_output_folder(report_dir)  # no glob, not a file, writable: found before the pass over the data
    if job.image_root and "://" not in job.image_root and not os.path.isdir(job.image_root):
        raise JobConfigError(f"--image_root {job.image_root} is not a folder")
    dead_letter_files = matching_paths(FileSystems.join(
        output, layout.DEAD_LETTERS_DIR, f"{layout.DEAD_LETTERS_PREFIX}-*{layout.PARQUET_SUFFIX}"))
    return InspectPlan(output, report_dir, files, dead_letter_files, schema, other_encoders, image_column,
                       no_contact_sheet, job.image_root, job.sample, job.neighbours, job.queries, job.seed)


def _check_files(files: list[tuple[str, int]]) -> tuple[pa.Schema, list[str]]:
    """Every file's footer: the first file's schema, and the files made with other encoders than it. A file that is
    not Parquet, or lacks a column of the first (or holds it at another width), is not one run's output: refused."""
    try:
        schemas = [read_schema(path) for path, _ in files]
    except EmbeddingsInputError as error:
        raise JobConfigError(str(error)) from error
    first = schemas[0]
    if not inspect.vector_views(first):
        raise JobConfigError(f"{files[0][0]} has no vector column ({cols.EMBEDDING}, {cols.IMAGE_EMBEDDING} or "
                             f"{cols.TEXT_EMBEDDING}): it is not the embedding job's output")
    if cols.ID not in first.names:
        raise JobConfigError(f"{files[0][0]} has no {cols.ID} column: it is not the embedding job's output")
    for (path, _), schema in zip(files[1:], schemas[1:], strict=True):
        unlike = [field.name for field in first if field.name not in schema.names
                  or not schema.field(field.name).type.equals(field.type)]
        if unlike:
            raise JobConfigError(f"{path} lacks columns of {files[0][0]}, or holds them at other widths "
                                 f"({', '.join(unlike)}): the two are not one run's output")
    identity = cols.encoder_identity(cols.read_metadata(first))
    other = [path for (path, _), schema in zip(files, schemas, strict=True)
             if cols.encoder_identity(cols.read_metadata(schema)) != identity]
    return first, other


def _image_column(asked: str | None, schema: pa.Schema, path: str) -> tuple[str | None, str | None]:
    """(the column images are read from, or None; why there is no contact sheet, or None)."""
    texts = _string_columns(schema)
    if asked is not None:
        if asked not in schema.names:
            raise JobConfigError(f"--image_column {asked!r} is not a column of {path} (its text columns: "
                                 f"{', '.join(texts)}); pass the manifest's image column through the embedding job "
                                 "with --passthrough")
        if asked not in texts:
            raise JobConfigError(f"--image_column {asked!r} is not a text column of {path} "
                                 f"({schema.field(asked).type})")
        return asked, None
    if cols.HAS_IMAGE not in schema.names:
        return None, "no contact sheet: the output has no image embeddings"
    if DEFAULT_IMAGE_COLUMN in texts:
        return DEFAULT_IMAGE_COLUMN, None
    return None, (f"no contact sheet: the output has no column of image paths (embed with --passthrough "
                  f"{DEFAULT_IMAGE_COLUMN}, or name one with --image_column)")


def inspect_output(plan: InspectPlan) -> dict:
    """The pass over the data, the pictures and the report; returns the report as written to inspect.json, with
    the neighbours table under "neighbours" / "table"."""
    started = time.perf_counter()
    rng = np.random.default_rng(plan.seed)
    survey = inspect.survey_embeddings([path for path, _ in plan.files], plan.schema,
                                       inspect.Reservoir(plan.sample, rng), plan.image_column)
    dead = inspect.count_dead_letters(plan.dead_letter_files)
    vectors, fields = survey.sample.sample()
    labels = fields.get(cols.LABEL, [None] * len(vectors))
    outputs = {"report": FileSystems.join(plan.report_dir, REPORT_NAME)}
    map_section = _draw_map(plan, vectors, labels, survey.labels, outputs)
    queries = rng.choice(len(vectors), size=min(plan.queries, len(vectors)), replace=False).tolist() \
        if len(vectors) >= 2 else []
    found = inspect.nearest_neighbours(vectors, queries, plan.neighbours) if queries else []
    table = [_entry(fields, plan.image_column, query,
                    neighbours=[_entry(fields, plan.image_column, row, similarity) for row, similarity in hits])
             for query, hits in zip(queries, found, strict=True)]
    contact_sheet = _draw_contact_sheet(plan, table, outputs) if table else None
    per_query = max(0, min(plan.neighbours, len(vectors) - 1))
    neighbours = {"metric": "cosine", "self_excluded": True, "per_query": per_query, "queries": table}
    if table:
        outputs["neighbours"] = FileSystems.join(plan.report_dir, NEIGHBOURS_JSON)
        _write_json(outputs["neighbours"], neighbours)
    run_report = _run_report(plan.output)
    matches = None if run_report is None else (
        run_report.get("embedded") == survey.rows and run_report.get("dead_lettered") == dead.total
        and run_report.get("dead_lettered_by_reason", {}) == dead.by_reason)
    report = {
        "job": JOB_NAME,
        "output": plan.output,
        "published": FileSystems.exists(FileSystems.join(plan.output, layout.SUCCESS_NAME)),
        "files": {"embeddings": len(plan.files), "bytes": sum(size for _, size in plan.files),
                  "dead_letters": len(plan.dead_letter_files), "other_encoders": plan.other_encoders},
        "rows": survey.rows,
        "coverage": survey.coverage,
        "vector_norms": {name: stats.to_dict() for name, stats in survey.norms.items()},
        "dead_letters": dataclasses.asdict(dead),
        "labels": _label_section(survey.labels),
        "metadata": inspect.decode_metadata(cols.read_metadata(plan.schema)),
        "run_report": run_report,
        "matches_run_report": matches,
        "sample": {"rows": len(vectors), "capacity": plan.sample, "seed": plan.seed,
                   "finite_rows": survey.sample.seen},
        "map": map_section,
        "neighbours": {**{key: value for key, value in neighbours.items() if key != "queries"},
                       "queries": len(table), "path": outputs.get("neighbours")},
        "contact_sheet": contact_sheet or {"path": None, "image_column": plan.image_column,
                                           "skipped": plan.no_contact_sheet or "no contact sheet: no queries"},
        "outputs": outputs,
        "seconds": round(time.perf_counter() - started, 3),
    }
    _write_json(outputs["report"], report)
    return {**report, "neighbours": {**report["neighbours"], "table": table}}


def _entry(fields: dict[str, list], image_column: str | None, row: int, similarity: float | None = None,
           **more) -> dict:
    """A sampled row as the neighbours table shows it: id, label, similarity to the query, image path."""
    entry = {"id": fields[cols.ID][row], "label": fields[cols.LABEL][row] if cols.LABEL in fields else None}
    if similarity is not None:
        entry["similarity"] = round(similarity, 6)
    if image_column is not None:
        entry["image"] = fields[image_column][row]
    return {**entry, **more}


def _label_section(labels: dict | None) -> dict | None:
    if labels is None:
        return None
    named = labels_by_rows(labels)
    return {"distinct": len(named), "unlabeled": labels.get(None, 0),
            "top": [{"label": label, "rows": rows} for label, rows in named[:inspect.TOP_LABELS]]}


def labels_by_rows(labels: dict) -> list[tuple[str, int]]:
    """Labels by rows, most first, ties by name (so two runs print alike); the unlabeled left out."""
    return sorted(((label, rows) for label, rows in labels.items() if label is not None), key=lambda x: (-x[1], x[0]))


def _draw_map(plan: InspectPlan, vectors: np.ndarray, labels: list, label_counts, outputs: dict) -> dict:
    if len(vectors) < 2:
        return {"path": None, "skipped": f"a map needs 2 sampled rows, the sample holds {len(vectors)}"}
    projection = inspect.project_2d(vectors, plan.seed)
    coloured = [label for label, _ in labels_by_rows(label_counts or {})][:MAP_LABELS]
    if projection.method == "pca":
        axis_names = tuple(f"principal axis {n} ({share:.1%} of the variance)"
                           for n, share in enumerate(projection.explained_variance, 1))
    else:
        axis_names = ("UMAP 1", "UMAP 2")
    outputs["map"] = FileSystems.join(plan.report_dir, MAP_PNG)
    plot_embedding_map(projection.points, labels, coloured,
                       f"{len(vectors):,} sampled rows of {os.path.basename(plan.output)} ({projection.method})",
                       axis_names, outputs["map"])
    return {"path": outputs["map"], "projection": projection.method,
            "explained_variance": projection.explained_variance, "coloured_labels": coloured}


def _draw_contact_sheet(plan: InspectPlan, table: list[dict], outputs: dict) -> dict | None:
    """neighbours.png: per query, its image then its neighbours'; each table entry gets "image_problem" (None when
    drawn). None when the output has no image column."""
    if plan.image_column is None:
        return None
    entries = [entry for query in table for entry in (query, *query["neighbours"])]
    references = sorted({entry["image"] for entry in entries if entry["image"]})
    with concurrent.futures.ThreadPoolExecutor(THUMBNAIL_THREADS) as pool:
        loaded = dict(zip(references, pool.map(lambda ref: inspect.load_thumbnail(ref, plan.image_root), references),
                          strict=True))
    tiles = []
    for query in table:
        row = []
        for entry in (query, *query["neighbours"]):
            pixels, problem = loaded.get(entry["image"], (None, "no image"))
            entry["image_problem"] = problem
            score = "query" if "similarity" not in entry else f"{entry['similarity']:.3f}"
            row.append((pixels, f"{_short(entry['id'])}\n{score}", problem))
        tiles.append(row)
    outputs["contact_sheet"] = FileSystems.join(plan.report_dir, CONTACT_SHEET_PNG)
    plot_contact_sheet(tiles, "each row: a sampled record, then its nearest neighbours (cosine similarity)",
                       outputs["contact_sheet"])
    drawn = sum(problem is None for _, problem in loaded.values())
    return {"path": outputs["contact_sheet"], "image_column": plan.image_column, "skipped": None,
            "images": len(references), "drawn": drawn}


def _size(count: int) -> str:
    """A byte count as the console shows it: in the largest unit that leaves at least 1."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count} bytes"


def _short(text: str, width: int = 22) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _run_report(output: str) -> dict | None:
    """The run report's counts, when OUTPUT has a run report that parses."""
    report = read_run_report(output)
    if not isinstance(report, dict):
        return None
    return {key: report.get(key) for key in ("job", "read", "embedded", "dead_lettered", "dead_lettered_by_reason",
                                             "reconciled", "passed")}


def _write_json(path: str, value: dict) -> None:
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(value, indent=2).encode())


def format_summary(report: dict) -> str:
    """The console summary of a report."""
    rows = report["rows"]
    files = report["files"]
    state = "published" if report["published"] else "NOT published (no _SUCCESS: a failed or running run)"
    lines = [f"inspect: {report['output']} ({state}; {files['embeddings']} embeddings files, "
             f"{_size(files['bytes'])})"]
    counts = [("rows", rows)]
    # "neither" is 0 in any output of the job (such records are dead letters): shown only when it is not.
    counts += [(f"with {name}", count) for name, count in report["coverage"].items()
               if count is not None and (name != "neither" or count)]
    counts += [("dead-lettered", report["dead_letters"]["total"])]
    width = max(len(name) for name, _ in counts) + 2
    for name, count in counts:
        share = f"  {count / rows:6.1%}" if rows and name.startswith("with") else ""
        lines.append(f"  {name:<{width}} {count:>10,}{share}")
    for reason, count in report["dead_letters"]["by_reason"].items():
        example = report["dead_letters"]["examples"][reason]
        lines.append(f"    {reason:<{width - 2}} {count:>10,}  e.g. {example['id']}: {_short(example['message'], 70)}")
    if report["run_report"] is not None:
        run = report["run_report"]
        verdict = "matches" if report["matches_run_report"] else "DOES NOT MATCH these counts"
        lines.append(f"  run report: read {run['read']:,} = {run['embedded']:,} embedded + "
                     f"{run['dead_lettered']:,} dead-lettered: {verdict}")
    labels = report["labels"]
    if labels is not None:
        top = ", ".join(f"{item['label']} {item['rows']:,}" for item in labels["top"][:8])
        lines.append(f"  labels: {labels['distinct']:,} distinct, {labels['unlabeled']:,} unlabeled rows"
                     + (f"; {top}" if top else "") + (", ..." if labels["distinct"] > 8 else ""))
    lines.append("  vector norms            rows        min       mean        max    zero  non-finite")
    for name, stats in report["vector_norms"].items():
        values = "".join(f" {stats[key]:>10.4f}" if stats[key] is not None else f" {'-':>10}"
                         for key in ("min", "mean", "max"))
        lines.append(f"    {name:<16} {stats['rows']:>9,}{values} {stats['zero']:>7,} {stats['non_finite']:>11,}")
    lines += _encoder_lines(report["metadata"])
    if report["files"]["other_encoders"]:
        lines.append(f"  WARNING: {len(report['files']['other_encoders'])} files were embedded with other encoders "
                     "than the first: their vectors are not comparable")
    sample = report["sample"]
    lines.append(f"  sample: {sample['rows']:,} rows of {sample['finite_rows']:,} with a finite vector "
                 f"(at most {sample['capacity']:,}, seed {sample['seed']})")
    drawn = report["map"]
    if drawn["path"]:
        shares = drawn.get("explained_variance")
        detail = f" ({', '.join(f'{share:.1%}' for share in shares)} of the variance)" if shares else ""
        lines.append(f"  map: {drawn['projection']}{detail} → {drawn['path']}")
    else:
        lines.append(f"  no map: {drawn['skipped']}")
    lines += _neighbour_lines(report["neighbours"])
    sheet = report["contact_sheet"]
    lines.append(f"  contact sheet → {sheet['path']}" if sheet["path"] else f"  {sheet['skipped']}")
    lines.append(f"  report → {report['outputs']['report']}")
    return "\n".join(lines)


def _encoder_lines(metadata: dict) -> list[str]:
    lines = []
    for key in (cols.META_IMAGE_ENCODER, cols.META_TEXT_ENCODER):
        spec = metadata.get(key)
        if isinstance(spec, dict):
            size = f", {spec['image_size']}x{spec['image_size']} input" if spec.get("image_size") else ""
            name = f"{spec['name']} " if spec.get("name") else ""
            lines.append(f"  {spec.get('modality', key)} encoder: {name}{spec.get('handle')} "
                         f"({spec.get('dim')}-d{size})")
    settings = [f"{key[len(cols.META_PREFIX):]} {_as_text(metadata[key])}" for key in
                (cols.META_L2_NORMALIZE, cols.META_VERSION, cols.META_CREATED_AT) if key in metadata]
    if settings:
        lines.append(f"  written with: {', '.join(settings)}")
    return lines


def _as_text(value) -> str:
    """A decoded metadata value as the metadata spelt it: text as it is, anything else as JSON (true, not True)."""
    return value if isinstance(value, str) else json.dumps(value)


def _neighbour_lines(neighbours: dict) -> list[str]:
    table = neighbours["table"]
    if not table:
        return ["  no neighbours: no queries (--queries 0, or fewer than 2 sampled rows)"]
    lines = [f"  nearest neighbours (cosine; the query itself left out) of {len(table)} sampled records:",
             f"    {'query':<24} {'label':<12} {'neighbour':<24} {'label':<12} similarity"]
    for query in table:
        first = True
        for hit in query["neighbours"] or [{"id": "-", "label": None, "similarity": float('nan')}]:
            left = f"{_short(query['id'], 24):<24} {_short(query['label'] or '-', 12):<12}" if first else " " * 37
            lines.append(f"    {left} {_short(hit['id'], 24):<24} {_short(hit['label'] or '-', 12):<12} "
                         f"{hit['similarity']:>10.4f}")
            first = False
    return lines


def run(argv: list[str] | None = None) -> dict:
    """Plan and inspect. Raises JobConfigError on misconfiguration."""
    job = PipelineOptions(argv).view_as(InspectOptions)
    plan = plan_inspect(job)
    log.info("inspecting %d embeddings files of %s, sampling at most %d rows", len(plan.files), plan.output,
             plan.sample)
    return inspect_output(plan)


def finish(report: dict) -> int:
    print(format_summary(report))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, flags.INSPECT, run, finish)


if __name__ == "__main__":
    exit_process(main())
