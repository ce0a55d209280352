"""``python -m flaxsst.bulk``: score files of texts with Ray Data, on this machine or on a Ray cluster.

    python -m flaxsst.bulk --model M --input 'reviews/*.parquet' --output scored/ [--address ADDR]

reads CSV, TSV, JSON lines, Parquet or text files (one text per line), scores the ``--text-column`` with
``flaxsst.ray.ClassifierPredictor`` on an actor pool (one actor per node by default, each taking the whole
node), and writes Parquet (default) or JSON lines files into ``--output`` with every input column plus
``label``, ``score`` and ``error``. Ray shows the progress; the command ends with a summary line (rows, errors,
rows/s, where the output is) and writes it to ``--output``/``_SUCCESS``, so a reader can tell a finished
output from one cut short. Without ``--address`` a Ray instance starts on this machine for the job (or the
one in ``RAY_ADDRESS`` is used); with it, the job runs on that cluster, whose nodes must all read the model
folder, the input and the output (a shared file system, or URIs such as ``s3://``).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

from flaxsst import cli
from flaxsst.errors import ConfigError, DataError, Interrupted
from flaxsst.metric_log import duration
from flaxsst.signals import as_ctrl_c, handling

# input kinds by file name ending
KINDS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".ndjson": "json",
         ".json": "json", ".txt": "text"}
SUCCESS = "_SUCCESS"


def input_kind(path: str) -> str:
    """The reader a file takes, by its ending (``KINDS``); ``DataError`` names a file no reader takes."""
    name = path.lower()
    for ending, kind in KINDS.items():
        if name.endswith(ending):
            return kind
    raise DataError(f"--input {path}: not a file this command reads (endings: {', '.join(KINDS)})")


def input_files(patterns: Sequence[str]) -> tuple[list[str], str]:
    """The files ``patterns`` name (globs, folders: the files in them, or URIs, passed to Ray as they are) and
    their one kind; ``DataError`` names a pattern matching nothing or files of two kinds."""
    files: list[str] = []
    for pattern in patterns:
        if "://" in pattern:
            files.append(pattern)
            continue
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise DataError(f"--input {pattern}: no file matches")
        for path in matched:
            if os.path.isdir(path):
                inside = sorted(str(p) for p in Path(path).rglob("*")
                                if p.is_file() and not p.name.startswith((".", "_")))
                if not inside:
                    raise DataError(f"--input {path}: the folder has no files")
                files.extend(inside)
            else:
                files.append(os.path.abspath(path))
    kinds = {input_kind(path) for path in files if not path.endswith("/")}
    if len(kinds) > 1:
        raise DataError(f"--input: files of different kinds ({', '.join(sorted(kinds))}): give one kind per job")
    return files, kinds.pop() if kinds else "parquet"


def read(files: list[str], kind: str, text_column: str):
    """A Ray Dataset of ``files``; a CSV or TSV text column is read as strings whatever it holds (a text
    column of numbers stays text), a TSV has no quoting (GLUE's files)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import ray

    if kind == "parquet":
        return ray.data.read_parquet(files)
    if kind in ("csv", "tsv"):
        parse = pacsv.ParseOptions(delimiter="\t", quote_char=False) if kind == "tsv" else pacsv.ParseOptions()
        return ray.data.read_csv(files, parse_options=parse,
                                 convert_options=pacsv.ConvertOptions(column_types={text_column: pa.string()}),
                                 file_extensions=None)
    if kind == "json":
        return ray.data.read_json(files, lines=True, file_extensions=None)
    return ray.data.read_text(files, drop_empty_lines=False, file_extensions=None)


def check_output(output: str, overwrite: bool) -> None:
    """A local ``--output`` must be a folder that is missing or empty (or ``--overwrite``: its files go)."""
    if "://" in output or not os.path.exists(output):
        return
    if not os.path.isdir(output):
        raise DataError(f"--output {output}: is a file, expected a folder")
    if os.listdir(output):
        if not overwrite:
            raise DataError(f"--output {output}: the folder is not empty; give another folder, or --overwrite to "
                            "replace what it holds")
        import shutil

        shutil.rmtree(output)


def cluster_nodes(ray) -> list[dict]:
    """The cluster's alive nodes that have CPUs."""
    return [node for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) > 0]


def written(output: str, output_format: str, error_column: str) -> tuple[int, int, int]:
    """(rows, rows with an error, files) of what the job wrote."""
    import pyarrow.dataset as pads

    dataset = pads.dataset(output, format="parquet" if output_format == "parquet" else "json")
    rows = dataset.count_rows()
    errors = dataset.count_rows(filter=pads.field(error_column).is_valid()) if rows else 0
    return rows, errors, len(dataset.files)


def main(args: argparse.Namespace) -> int:
    from flaxsst.hub import resolve_model_dir
    from flaxsst.ray import OUTPUT_COLUMNS, ClassifierPredictor, check_columns

    files, kind = input_files(args.input)
    text_column = "text" if kind == "text" else args.text_column
    if kind == "text" and args.text_column != "text":
        raise ConfigError(f"--text-column {args.text_column}: text files have one column, 'text'")
    check_output(args.output, args.overwrite)
    resolve_model_dir(args.model, key="--model")  # a bad --model fails here, in one line, before the cluster starts
    for flag in ("actors", "cpus_per_actor", "batch_rows"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} {value}: must be positive")
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        # a Ray instance for this job alone, listening on the loopback only (as Ray's own does on macOS and
        # Windows) instead of the machine's address
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    began = time.perf_counter()
    ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    nodes = cluster_nodes(ray)
    actors = args.actors or len(nodes)
    # an actor's XLA runs on every core of its node; one CPU of each node stays for reading and writing, or the
    # job waits forever
    smallest = min(node["Resources"]["CPU"] for node in nodes)
    per_node = math.ceil(actors / len(nodes))
    cpus = args.cpus_per_actor or (smallest - 1) / per_node
    if cpus <= 0 or cpus * per_node > smallest - 1:
        ray.shutdown()
        raise ConfigError(f"--actors {actors} of {cpus:g} CPU: {per_node} on a node of {smallest:g} CPUs leave none "
                          "of its CPUs for reading and writing (Ray Data's tasks take one), and the job would wait "
                          "forever; give fewer --actors or --cpus-per-actor, or nodes of 2 CPUs or more")
    print(f"bulk: {len(files)} {kind} file(s), {actors} actor(s) of {cpus:g} CPU on {len(nodes)} node(s)",
          file=sys.stderr, flush=True)
    ray.data.DataContext.get_current().execution_options.preserve_order = args.preserve_order
    dataset = read(files, kind, text_column)
    added = [args.label_column, args.score_column, args.error_column]
    try:
        check_columns(dataset.columns(), text_column, added)
    except ValueError as e:
        flag = {name: f"--{option}-column" for name, option in zip(added, OUTPUT_COLUMNS)}
        hint = next((f" ({flag[name]} names it)" for name in added if f"{name!r}" in str(e)), "")
        raise DataError(f"--input: {e}{hint}") from None
    predictor_args = dict(model=args.model, text_column=text_column, all_scores=args.all_scores,
                          label_column=args.label_column, score_column=args.score_column,
                          error_column=args.error_column, dtype=args.dtype, max_length=args.max_length)
    scored = dataset.repartition(target_num_rows_per_block=args.batch_rows).map_batches(
        ClassifierPredictor, fn_constructor_kwargs=predictor_args,
        batch_size=args.batch_rows, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus)
    try:
        with handling(as_ctrl_c, [signal.SIGTERM]):
            scored.write_parquet(args.output) if args.format == "parquet" else scored.write_json(args.output)
    except KeyboardInterrupt:
        ray.shutdown()
        raise Interrupted(f"interrupted: {args.output} holds part of the rows and no {SUCCESS}; rerun the same "
                          "command with --overwrite") from None
    seconds = time.perf_counter() - began
    rows, errors, count = written(args.output, args.format, args.error_column)
    summary = {"rows": rows, "errors": errors, "seconds": round(seconds, 2),
               "rows_per_second": round(rows / max(seconds, 1e-9), 1), "output": args.output,
               "format": args.format, "files": count, "actors": actors, "nodes": len(nodes)}
    if "://" not in args.output:
        Path(args.output, SUCCESS).write_text(json.dumps(summary) + "\n", encoding="utf-8")
    print(f"bulk: {rows} rows, {errors} errors, {summary['rows_per_second']:g} rows/s in {duration(seconds)} "
          f"-> {args.output} ({count} {args.format} file(s))", file=sys.stderr, flush=True)
    return cli.EXIT_OK


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m flaxsst.bulk", description=cli.first_paragraph(__doc__))
    p.add_argument("--model", required=True, help="HF folder (on every node) or hub id")
    p.add_argument("--input", required=True, nargs="+",
                   help="files, folders or globs (quoted) of one kind: .parquet, .csv, .tsv, .jsonl/.json, .txt")
    p.add_argument("--output", required=True, help="a folder, missing or empty, that every node can write")
    p.add_argument("--format", choices=["parquet", "jsonl"], default="parquet", help="the output files' format")
    p.add_argument("--address", default=None,
                   help="a Ray cluster's address: HOST:6379 from one of its nodes, ray://HOST:10001 from outside, "
                        "auto for the cluster this machine is part of (ray start); default: RAY_ADDRESS, else a Ray "
                        "instance started for this job on this machine")
    p.add_argument("--text-column", default="text", help="the column holding the texts (default: text)")
    p.add_argument("--label-column", default="label", help="the predicted label's column (default: label)")
    p.add_argument("--score-column", default="score", help="its score's column (default: score)")
    p.add_argument("--error-column", default="error", help="the column saying why a row was not scored")
    p.add_argument("--all-scores", action="store_true", help="add a score_<LABEL> column per label")
    p.add_argument("--actors", type=int, default=None, help="model replicas (default: one per node)")
    p.add_argument("--cpus-per-actor", type=float, default=None,
                   help="CPUs each actor reserves (default: all but one of the smallest node's, shared by the actors a node "
                        "holds; its model uses every core of its node whatever it reserves)")
    p.add_argument("--batch-rows", type=int, default=1024, help="rows per batch an actor is given (default: 1024)")
    p.add_argument("--preserve-order", action="store_true", help="write the rows in input order (slower)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --output")
    return p


def console_main(argv: Sequence[str] | None = None) -> int:
    """``python -m flaxsst.bulk``."""
    return cli.run(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(console_main())
