"""A replica's start-up and memory: ``flaxsst.serve`` against a transformers pipeline process, same
model folder, same machine, in one run.

    python -m bench.serve_load --make-model /tmp/distilbert-random --tokenizer ../shared/data/distilbert-base-uncased-finetuned-sst-2-english
    python -m bench.serve_coldstart --model /tmp/distilbert-random --data ../shared/data/sst2/dev.tsv \\
        --restarts 3 --load-seconds 600 --out bench/results/coldstart-cpu-DATE.jsonl

Phases, each a JSON line (seconds from launch; resident memory of the process tree in MiB):
- ``pipeline``: a fresh Python process that imports transformers, builds
  ``pipeline("text-classification", model=...)`` and answers one sentence: launch to that first
  answer, and its memory then (the anchor; ``--restarts`` times).
- ``empty``: ``flaxsst.serve`` with an empty ``FLAXSST_HOME`` (no compilation cache, no stored
  programs, no packed-dot kernel): launch to ``/ready`` 200, idle memory once ready.
- ``prepare``: ``flaxsst.serve --prepare`` into another empty ``FLAXSST_HOME``: the kernel built and
  every program compiled and stored (a container image's build step).
- ``restart``: ``flaxsst.serve`` on that prepared home: launch to ``/ready``, idle memory
  (``--restarts`` times), and the first answer's latency.
- ``load``: the last restarted server under ``--load-concurrency`` clients (``bench.serve_load``'s
  client: 1-8 SST-2 dev sentences a request) for ``--load-seconds``: memory every 10 s, and after.
A summary line ends the run: the medians and the goals' ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.serve_load import client, free_port, stop, tree_rss_mb

ROOT = Path(__file__).resolve().parents[1]

PIPELINE = """
import sys, time
from transformers import pipeline
classify = pipeline("text-classification", model=sys.argv[1], device=sys.argv[2])
print(classify(["Today was an amazing day!"]), flush=True)
time.sleep(3600)
"""


def pipeline_start(model: str, device: str = "cpu") -> dict:
    """The anchor: launch to the first answer of a pipeline process, and its memory then."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-c", PIPELINE, model, device], stdout=subprocess.PIPE, text=True,
                               stderr=subprocess.DEVNULL)
    try:
        process.stdout.readline()
        ready_s = time.monotonic() - started
        time.sleep(1)
        return {"phase": "pipeline", "device": device, "ready_s": round(ready_s, 2),
                "rss_mb_idle": tree_rss_mb(process.pid), "gpu_mb": gpu_memory_mb()}
    finally:
        stop(process)


def serve(model: str, home: str, logs: Path, name: str, extra: list[str] | None = None):
    """A ``flaxsst.serve`` process on ``home``; -> (process, url, seconds to /ready)."""
    import httpx

    port = free_port()
    env = dict(os.environ, FLAXSST_HOME=home)
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "flaxsst.serve", "--model", model, "--port", str(port),
                                *(extra or [])], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=open(logs / f"{name}.log", "w"))
    url = f"http://127.0.0.1:{port}"
    while True:  # polled every 0.1 s: the figure is launch to the first 200
        if process.poll() is not None:
            raise SystemExit(f"error: {name} exited with {process.returncode}; see {logs / name}.log")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return process, url, time.monotonic() - started
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > 900:
            raise SystemExit(f"error: {name} was not ready within 900 s")
        time.sleep(0.1)


def gpu_memory_mb() -> int | None:
    """Memory in use on the first GPU (nvidia-smi), or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return int(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def first_answer_ms(url: str) -> float:
    import httpx

    started = time.perf_counter()
    httpx.post(f"{url}/score", json={"input_data": ["Today was an amazing day!"]}, timeout=30).raise_for_status()
    return round((time.perf_counter() - started) * 1e3, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a HF model folder (bench.serve_load --make-model makes one)")
    p.add_argument("--data", required=True, help="SST-2 dev.tsv, the load's sentences")
    p.add_argument("--restarts", type=int, default=3)
    p.add_argument("--load-seconds", type=float, default=600)
    p.add_argument("--load-concurrency", type=int, default=64)
    p.add_argument("--pipeline-device", default="cpu", help="the anchor's device (cuda on a GPU machine)")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--logs", default=None, help="server logs (default: a temporary folder)")
    args = p.parse_args()
    logs = Path(args.logs or tempfile.mkdtemp(prefix="coldstart_logs_"))
    logs.mkdir(parents=True, exist_ok=True)
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    for _ in range(args.restarts):
        emit(pipeline_start(args.model, args.pipeline_device))
    empty_home, prepared_home = tempfile.mkdtemp(prefix="coldstart_empty_"), tempfile.mkdtemp(prefix="coldstart_home_")
    try:
        process, url, ready_s = serve(args.model, empty_home, logs, "empty")
        time.sleep(1)
        emit({"phase": "empty", "ready_s": round(ready_s, 2), "rss_mb_idle": tree_rss_mb(process.pid),
              "gpu_mb": gpu_memory_mb()})
        stop(process)
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "flaxsst.serve", "--model", args.model, "--prepare"], cwd=ROOT,
                       env=dict(os.environ, FLAXSST_HOME=prepared_home), check=True,
                       stderr=open(logs / "prepare.log", "w"))
        emit({"phase": "prepare", "seconds": round(time.monotonic() - started, 2)})
        for attempt in range(args.restarts):
            process, url, ready_s = serve(args.model, prepared_home, logs, f"restart{attempt}")
            time.sleep(1)
            row = {"phase": "restart", "ready_s": round(ready_s, 2), "rss_mb_idle": tree_rss_mb(process.pid),
                   "first_answer_ms": first_answer_ms(url), "gpu_mb": gpu_memory_mb()}
            emit(row)
            if attempt < args.restarts - 1:
                stop(process)
        if args.load_seconds > 0:
            load_args = argparse.Namespace(data=args.data)
            before = tree_rss_mb(process.pid)
            row = client(load_args, f"{url}/score", args.load_concurrency, args.load_seconds, process.pid,
                         sample_every=10)
            time.sleep(2)
            row.update(phase="load", rss_mb_before=before, rss_mb_after=tree_rss_mb(process.pid),
                       rss_mb_max=max(row.get("rss_mb_samples", [before])))
            emit(row)
        stop(process)
    finally:
        shutil.rmtree(empty_home, ignore_errors=True)
        shutil.rmtree(prepared_home, ignore_errors=True)

    def median(phase: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["phase"] == phase)

    summary = {"phase": "summary", "pipeline_ready_s": median("pipeline", "ready_s"),
               "pipeline_rss_mb": median("pipeline", "rss_mb_idle"), "empty_ready_s": median("empty", "ready_s"),
               "restart_ready_s": median("restart", "ready_s"), "restart_rss_mb": median("restart", "rss_mb_idle")}
    summary["restart_vs_pipeline"] = round(summary["restart_ready_s"] / summary["pipeline_ready_s"], 2)
    summary["rss_vs_pipeline"] = round(summary["restart_rss_mb"] / summary["pipeline_rss_mb"], 2)
    load_rows = [r for r in rows if r["phase"] == "load"]
    if load_rows:
        summary["load_rss_mb_max"] = load_rows[0]["rss_mb_max"]
    emit(summary)


if __name__ == "__main__":
    main()
