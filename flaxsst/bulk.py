"""``python -m flaxsst.bulk``: score files of texts with Ray Data, on this machine or on a Ray cluster.

    python -m flaxsst.bulk --model M --input 'reviews/*.parquet' --output scored/ [--address ADDR]

reads CSV, TSV, JSON lines, Parquet or text files (one text per line), scores the ``--text-column`` with
``flaxsst.ray.ClassifierPredictor`` on an actor pool (one actor per node by default, each reserving all but one
of its CPUs and using all its cores), and writes Parquet (default) or JSON lines files into ``--output`` with every input column plus
``label``, ``score`` and ``error``. Ray shows the progress; the command ends with a summary line (rows, errors,
rows/s, where the output is) and writes it to ``--output``/``_SUCCESS``, so a reader can tell a finished
output from one cut short (SIGTERM and Ctrl-C stop the job and its Ray instance, exit 75). Without ``--address`` a Ray instance starts on this machine for the job (or the
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

# seconds the cluster has to reserve the actors' CPUs (actor_places)
PLACEMENT_TIMEOUT = 120

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
                inside = sorted(str(p.absolute()) for p in Path(path).rglob("*")
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


def check_output(output: str, overwrite: bool, files: Sequence[str]) -> None:
    """A local ``--output`` must be a folder that is missing or empty, or ``--overwrite`` (its files go once every
    other check has passed, ``clear_output``), and hold none of the input."""
    if "://" in output or not os.path.exists(output):
        return
    if not os.path.isdir(output):
        raise DataError(f"--output {output}: is a file, expected a folder")
    folder = os.path.abspath(output)
    inside = [path for path in files if "://" not in path and os.path.commonpath([folder, path]) == folder]
    if inside:
        raise DataError(f"--output {output}: holds the input file {inside[0]}; give another folder")
    if os.listdir(output) and not overwrite:
        raise DataError(f"--output {output}: the folder is not empty; give another folder, or --overwrite to "
                        "replace what it holds")


def clear_output(output: str) -> None:
    """``--overwrite``: the files of a local ``--output`` go."""
    if "://" not in output and os.path.isdir(output) and os.listdir(output):
        import shutil

        shutil.rmtree(output)


def check_address(address: str, timeout: float = 5.0) -> None:
    """A ``HOST:PORT`` or ``ray://HOST:PORT`` address must answer a TCP connection within ``timeout`` seconds
    (Ray itself retries a dead address for minutes); ``ConfigError`` names it. ``local`` and ``auto`` go to Ray."""
    import socket

    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address}: expected HOST:PORT, ray://HOST:PORT, auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({e.strerror or e}); is its head "
                          "running, and is this its address?") from None


def job_error(error: BaseException) -> Exception | None:
    """The user's problem behind an exception Ray raised from a task or an actor (a ``FlaxsstError`` of the
    predictor, or a file that does not parse), as one line; None for anything else (a bug: it keeps its traceback)."""
    from flaxsst.errors import FlaxsstError

    seen, causes = set(), [error]
    while causes:
        cause = causes.pop()
        if cause is None or id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, FlaxsstError):
            return cause
        if type(cause).__name__ in ("ArrowInvalid", "UnicodeDecodeError") or isinstance(cause, FileNotFoundError):
            return DataError(f"--input: {' '.join(str(cause).split())[:500]}")
        causes.extend([cause.__cause__, getattr(cause, "cause", None)])
    return None


def cluster_nodes(ray) -> list[dict]:
    """The cluster's alive nodes that have CPUs."""
    return [node for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) > 0]


def written(output: str, output_format: str, error_column: str) -> tuple[int, int, int]:
    """(rows, rows with an error, files) of what the job wrote."""
    import pyarrow.dataset as pads

    if "://" not in output and not os.path.isdir(output):  # no row: Ray writes no file
        os.makedirs(output, exist_ok=True)
        return 0, 0, 0
    dataset = pads.dataset(output, format="parquet" if output_format == "parquet" else "json")
    rows = dataset.count_rows()
    errors = dataset.count_rows(filter=pads.field(error_column).is_valid()) if rows else 0
    return rows, errors, len(dataset.files)


def actor_pool(ray, args: argparse.Namespace) -> tuple[int, float, list[dict]]:
    """(actors, CPUs each reserves, the cluster's nodes): one actor per node unless ``--actors``, at most one per
    CPU; an actor's XLA runs on every core of its node, and one CPU of each node stays for reading and writing,
    or the job waits forever (``ConfigError`` for a setting that leaves none)."""
    nodes = cluster_nodes(ray)
    actors = args.actors or len(nodes)
    smallest = min(node["Resources"]["CPU"] for node in nodes)
    per_node = math.ceil(actors / len(nodes))
    cpus = args.cpus_per_actor or (smallest - 1) / per_node
    if per_node > smallest and not args.cpus_per_actor:
        raise ConfigError(f"--actors {actors}: {per_node} on a node of {smallest:g} CPUs; at most one per CPU "
                          f"({int(smallest) * len(nodes)} on this cluster), each holds a model in memory")
    if cpus <= 0 or cpus * per_node > smallest - 1:
        raise ConfigError(f"--actors {actors} of {cpus:g} CPU: {per_node} on a node of {smallest:g} CPUs leave none "
                          "of its CPUs for reading and writing (Ray Data's tasks take one), and the job would wait "
                          "forever; give fewer --actors or --cpus-per-actor, or nodes of 2 CPUs or more")
    return actors, cpus, nodes


def actor_places(ray, actors: int, cpus: float, nodes: int):
    """The actors' scheduling strategy: a placement group of one bundle per node (``STRICT_SPREAD``), each
    room for its node's share of the actors. An actor of a node that dies restarts only in its own bundle,
    which waits for a node without one: never beside a live actor, where it would take the CPU Ray Data's
    reads and writes need while the live actor's output waits for them, and the job would never end."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    per_node = math.ceil(actors / nodes)
    group = placement_group([{"CPU": cpus * per_node}] * math.ceil(actors / per_node), strategy="STRICT_SPREAD")
    if not group.wait(timeout_seconds=PLACEMENT_TIMEOUT):
        raise ConfigError(f"the cluster did not give {actors} actor(s) {cpus:g} CPU each, {per_node} a node, within "
                          f"{PLACEMENT_TIMEOUT} s (other jobs hold its CPUs?); give fewer --actors or --cpus-per-actor")
    return PlacementGroupSchedulingStrategy(group)


def main(args: argparse.Namespace) -> int:
    from flaxsst.config import parse_classifier_dtype
    from flaxsst.hub import resolve_model_dir
    from flaxsst.ray import OUTPUT_COLUMNS, ClassifierPredictor, check_columns

    files, kind = input_files(args.input)
    text_column = "text" if kind == "text" else args.text_column
    if kind == "text" and args.text_column != "text":
        raise ConfigError(f"--text-column {args.text_column}: text files have one column, 'text'")
    try:
        parse_classifier_dtype(args.dtype)
    except ConfigError as e:
        raise ConfigError(f"--dtype: {e}") from None
    if args.max_length < 2:
        raise ConfigError(f"--max-length {args.max_length}: must be at least 2")
    if "://" not in args.output:  # every node is told the same absolute paths
        args.output = os.path.abspath(args.output)
    check_output(args.output, args.overwrite, files)
    resolve_model_dir(args.model, key="--model")  # a bad --model fails here, in one line, before the cluster
    model = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
    for flag in ("actors", "cpus_per_actor", "batch_rows"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} {value}: must be positive")
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    check_address(address)
    if address == "local":
        # a Ray instance for this job alone, listening on the loopback only (as Ray's own does on macOS and
        # Windows) instead of the machine's address
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    began = time.perf_counter()
    ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    try:  # whatever ends the job, the Ray instance it started goes with it
        actors, cpus, nodes = actor_pool(ray, args)
        print(f"bulk: {len(files)} {kind} file(s), {actors} actor(s) of {cpus:g} CPU on {len(nodes)} node(s)",
              file=sys.stderr, flush=True)
        ray.data.DataContext.get_current().execution_options.preserve_order = args.preserve_order
        dataset = read(files, kind, text_column)
        try:
            columns = dataset.columns()
        except Exception as e:
            raise job_error(e) or e from None
        if not columns:
            raise DataError("--input: the files hold no rows")
        added = [args.label_column, args.score_column, args.error_column]
        try:
            check_columns(columns, text_column, added)
        except ValueError as e:
            flag = {name: f"--{option}-column" for name, option in zip(added, OUTPUT_COLUMNS)}
            hint = next((f" ({flag[name]} names it)" for name in added if f"{name!r}" in str(e)), "")
            raise DataError(f"--input: {e}{hint}") from None
        predictor_args = dict(model=model, text_column=text_column, all_scores=args.all_scores,
                              label_column=args.label_column, score_column=args.score_column,
                              error_column=args.error_column, dtype=args.dtype, max_length=args.max_length)
        scored = dataset.repartition(target_num_rows_per_block=args.batch_rows).map_batches(
            ClassifierPredictor, fn_constructor_kwargs=predictor_args, batch_size=args.batch_rows,
            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus,
            scheduling_strategy=actor_places(ray, actors, cpus, len(nodes)))
        if args.overwrite:
            clear_output(args.output)
        try:
            with handling(as_ctrl_c, [signal.SIGTERM]):
                if args.format == "parquet":
                    scored.write_parquet(args.output)
                else:  # pandas writes 10 decimals unless told; 15 keeps a score to 5e-16
                    scored.write_json(args.output, double_precision=15)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: {args.output} holds part of the rows and no {SUCCESS}; rerun the "
                              "same command with --overwrite") from None
        except Exception as e:
            raise job_error(e) or e from None
        seconds = time.perf_counter() - began
    finally:
        ray.shutdown()
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
    p.add_argument("--dtype", default="float32",
                   help="compute dtype: float32, bfloat16, or int8 (int8 dense layers on an x86-64 CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty --output")
    return p


def console_main(argv: Sequence[str] | None = None) -> int:
    """``python -m flaxsst.bulk``."""
    return cli.run(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(console_main())
