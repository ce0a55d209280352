"""Bulk predictions: the same texts through the streaming command line (one process) and through Ray Data
(``python -m flaxsst.bulk``) with 1 and 2 actors on this machine, in one run.

    python -m bench.bulk_ray --model /tmp/distilbert-random --data ../shared/data/sst2 --rows 5000 --rounds 2 \\
        --out bench/results/bulk-cpu-DATE.jsonl

The texts: SST-2 dev, then test, then train sentences, ``--rows`` of them, one per line in a text file that
every runner reads. Each runner is a whole command, launch to exit (Ray's start, the model's load, compiles
answered by the compilation cache after the first round, reading and writing): a JSON line per round, then a
summary line with the best round of each and the ratios to the command line's time. Every runner's labels
are checked equal to the command line's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def texts_of(data: Path, rows: int) -> list[str]:
    """``rows`` SST-2 sentences: dev, test, then train (GLUE's TSVs: the sentence is the first column of dev and
    train, the second of test)."""
    texts: list[str] = []
    for name, column in (("dev.tsv", 0), ("test.tsv", 1), ("train.tsv", 0)):
        lines = (data / name).read_text(encoding="utf-8").splitlines()[1:]
        texts.extend(line.split("\t")[column] for line in lines)
        if len(texts) >= rows:
            break
    return texts[:rows]


def run(command: list[str]) -> float:
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def labels_of_cli(path: Path) -> list[str]:
    return [json.loads(line)["label"] for line in path.read_text().splitlines()]


def labels_of_bulk(folder: Path) -> list[str]:
    import pyarrow.dataset as pads

    return pads.dataset(folder, format="parquet").to_table(columns=["label"]).column("label").to_pylist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="the GLUE SST-2 folder")
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-rows", type=int, default=1024)
    p.add_argument("--out", help="append the JSON lines to this file")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bulk-bench-"))
    texts = texts_of(Path(args.data), args.rows)
    source = work / "texts.txt"
    source.write_text("".join(f"{t}\n" for t in texts), encoding="utf-8")
    python = sys.executable
    runners = {
        "cli": lambda out: [python, "-m", "flaxsst.predict", "--model", args.model, "--input", str(source),
                            "--output", str(out)],
        "ray-1": lambda out: [python, "-m", "flaxsst.bulk", "--model", args.model, "--input", str(source), "--output",
                              str(out), "--actors", "1", "--preserve-order", "--batch-rows", str(args.batch_rows)],
        "ray-2": lambda out: [python, "-m", "flaxsst.bulk", "--model", args.model, "--input", str(source), "--output",
                              str(out), "--actors", "2", "--preserve-order", "--batch-rows", str(args.batch_rows)],
    }
    lines, best = [], {}
    reference = None
    try:
        for round_ in range(args.rounds):
            for name, command in runners.items():
                out = work / f"{name}-{round_}" / ("out.jsonl" if name == "cli" else "")
                out.parent.mkdir(parents=True, exist_ok=True)
                if name != "cli":
                    shutil.rmtree(out, ignore_errors=True)
                seconds = run(command(out))
                labels = labels_of_cli(out) if name == "cli" else labels_of_bulk(out)
                reference = reference or labels
                assert len(labels) == len(texts) and labels == reference, f"{name}: labels differ from the cli's"
                line = {"runner": name, "round": round_, "rows": len(texts), "seconds": round(seconds, 2),
                        "rows_per_second": round(len(texts) / seconds, 1)}
                print(json.dumps(line), flush=True)
                lines.append(line)
                best[name] = min(best.get(name, seconds), seconds)
        summary = {"summary": True, "rows": len(texts), "cpus": os.cpu_count(),
                   **{f"{name}_s": round(seconds, 2) for name, seconds in best.items()},
                   **{f"{name}_over_cli": round(seconds / best["cli"], 3) for name, seconds in best.items()}}
        print(json.dumps(summary), flush=True)
        lines.append(summary)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(line) + "\n" for line in lines)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
