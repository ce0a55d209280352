"""Load on the real-time endpoint: ``flaxsst.serve`` against the anchor (Azure ML's ``azmlinfsrv``
around a transformers pipeline, ``../shared/bench/anchor_serve``), one after the other on the same
machine, the same model export and the same requests.

    python -m bench.serve_load --make-model /tmp/distilbert-random --tokenizer ../shared/data/distilbert-base-uncased-finetuned-sst-2-english
    python -m bench.serve_load --model /tmp/distilbert-random --anchor-python /tmp/azml-venv/bin/python \\
        --data ../shared/data/sst2/dev.tsv --concurrency 1 8 32 64 --seconds 20 --soak-seconds 600 \\
        --out bench/results/serve-cpu-DATE.jsonl --plot bench/results/serve-cpu-DATE.png

Each request is ``{"input_data": [...]}`` of 1-8 SST-2 dev sentences (drawn with a fixed seed, so
both servers get the same sequence) to ``POST /score``. The client is its own process
(``--client URL``): CONCURRENCY asyncio workers, each posting its next request as soon as the last
is answered, for SECONDS. Both servers stay up and take turns at each level. One JSON line per
server and level: requests/s, sentences/s, p50/p90/p99
ms of the answered (200) requests, status counts, the server's resident memory (its whole process
tree) before and after; ``--soak-seconds`` then runs flaxsst at the last concurrency, sampling memory
every 10 s. At the end: a Markdown table, and ``--plot`` draws latency against throughput.
(~3 min for a first DistilBERT-base warm-up on 2 CPU cores without the compilation cache, plus 2 x
levels x SECONDS, plus the soak.)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import json
import os
import math
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANCHOR_DIR = ROOT.parent / "shared" / "bench" / "anchor_serve"


def sentences(path: str) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return [row["sentence"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def request_bodies(texts: list[str], count: int, seed: int = 0) -> list[tuple[bytes, int]]:
    """``count`` bodies of 1-8 sentences each, and how many sentences each holds."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(count):
        chosen = rng.sample(texts, rng.randint(1, 8))
        bodies.append((json.dumps({"input_data": chosen}).encode(), len(chosen)))
    return bodies


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]  # nearest rank


async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int, path: str,
               body: bytes) -> tuple[int, bool]:
    """POST ``body`` on an open connection and read the whole answer; -> (status, whether the server
    closes the connection after it)."""
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length, close = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
    await reader.readexactly(length)
    return status, close


async def load(url: str, seconds: float, concurrency: int, bodies: list[tuple[bytes, int]], probe: bool = False) -> dict:
    """``concurrency`` clients posting ``bodies`` to ``url`` for ``seconds``; with ``probe``, ``/health``
    and ``/ready`` timed alongside, as a load balancer's or Kubernetes' checks see them."""
    import httpx

    latencies, codes, sent = [], collections.Counter(), [0]
    next_body = [0]
    parsed = urllib.parse.urlsplit(url)
    host, port, path = parsed.hostname, parsed.port or 80, parsed.path or "/"
    stop = time.perf_counter() + seconds

    async def worker():
        """One keep-alive connection, HTTP/1.1 by hand: a Python HTTP client library costs more CPU per
        request than the server does, and would measure itself."""
        connection = None
        while time.perf_counter() < stop:
            body, count = bodies[next_body[0] % len(bodies)]
            next_body[0] += 1
            started = time.perf_counter()
            try:
                if connection is None:
                    connection = await asyncio.open_connection(host, port)
                status, close = await post(*connection, host, port, path, body)
                codes[str(status)] += 1
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                    sent[0] += count
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as error:  # counted, not raised
                codes[type(error).__name__] += 1
                close = True
                await asyncio.sleep(0.01)
            if close and connection is not None:
                connection[1].close()
                connection = None
        if connection is not None:
            connection[1].close()

    probes = {"/ready": [], "/health": []}

    async def prober():
        """As a Kubernetes probe: a new connection each time, every 50 ms. The first request after the
        prober's sleep is not timed: on a saturated 2-core machine it times the prober's own wake-up
        (the outlier followed whichever route went first when their order was swapped)."""
        base = url.rsplit("/", 1)[0]
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as fresh:
            while time.perf_counter() < stop:
                try:
                    await fresh.get(base + "/health")
                except Exception:
                    pass
                for route, values in probes.items():
                    started = time.perf_counter()
                    try:
                        await fresh.get(base + route)
                        values.append(time.perf_counter() - started)
                    except Exception:
                        values.append(float("inf"))
                await asyncio.sleep(0.1)

    began = time.perf_counter()
    await asyncio.gather(prober() if probe else asyncio.sleep(0), *(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - began
    return {"concurrency": concurrency, "seconds": wall, "latencies": latencies, "sentences": sent[0],
            "codes": dict(codes), "probes": probes}


def summary(parts: list[dict]) -> dict:
    """One level's figures from its client processes' raw results (the slowest one's wall time)."""
    latencies = sorted(x for part in parts for x in part["latencies"])
    wall = max(part["seconds"] for part in parts)
    codes = collections.Counter()
    for part in parts:
        codes.update(part["codes"])
    row = {"concurrency": sum(part["concurrency"] for part in parts), "seconds": round(wall, 1),
            "requests_per_s": round(len(latencies) / wall, 1),
            "sentences_per_s": round(sum(part["sentences"] for part in parts) / wall, 1),
            "p50_ms": round(percentile(latencies, 50) * 1e3, 1), "p90_ms": round(percentile(latencies, 90) * 1e3, 1),
            "p99_ms": round(percentile(latencies, 99) * 1e3, 1), "codes": dict(codes),
            **({"client_processes": len(parts) - 1} if len(parts) > 2 else {})}
    for route in ("/health", "/ready"):
        values = sorted(x for part in parts for x in part["probes"].get(route, []))
        if values:
            name = route.strip("/")
            row.update({f"{name}_p50_ms": round(percentile(values, 50) * 1e3, 1),
                        f"{name}_p99_ms": round(percentile(values, 99) * 1e3, 1),
                        f"{name}_max_ms": round(values[-1] * 1e3, 1)})
    return row


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children[int(fields[1])].append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and every process below it, in MiB."""
    total = 0
    for current in process_tree(pid):
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time of ``pids`` so far."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time every core of the machine has spent busy (not idle or waiting on I/O) since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, timeout: float, process: subprocess.Popen, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"error: {what} exited with {process.returncode}")
        try:
            if check():
                return time.monotonic() - started
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit(f"error: {what} was not ready within {timeout} s")


def start_flaxsst(args) -> tuple[subprocess.Popen, str, float]:
    import httpx

    port = free_port()
    log = open(Path(args.logs) / "flaxsst.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "flaxsst.serve", "--model", args.model, "--port", str(port),
                                *args.flaxsst_flags], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    ready_s = wait_for(lambda: httpx.get(f"{url}/ready", timeout=5).status_code == 200, args.start_timeout, process,
                       "flaxsst.serve")
    return process, f"{url}/score", ready_s


def start_anchor(args) -> tuple[subprocess.Popen, str, float]:
    import httpx

    port = free_port()
    log = open(Path(args.logs) / "anchor.log", "w")
    process = subprocess.Popen([args.anchor_python, "start_local.py", "--entry_script", "score.py", "--model_dir",
                                str(Path(args.model).resolve()), "--port", str(port), "--worker_count",
                                str(args.anchor_workers)], cwd=args.anchor_dir, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/score"
    body = {"input_data": ["Today was an amazing day!"]}
    ready_s = wait_for(lambda: httpx.post(url, json=body, timeout=30).status_code == 200, args.start_timeout, process,
                       "the anchor (azmlinfsrv)")
    return process, url, ready_s


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)


def client(args, url: str, concurrency: int, seconds: float, server_pid: int, sample_every: float = 0) -> dict:
    """One level in client processes of their own (``--client-processes``: one asyncio client tops out
    near 1,000 requests/s, less past ~100 connections); memory samples of the server while it runs."""
    count = max(1, min(getattr(args, "client_processes", 1), concurrency))
    shares = [concurrency // count + (i < concurrency % count) for i in range(count)]
    shares.append(0)  # a process of its own times the probes, so the clients' own event loops do not delay them
    outputs = [tempfile.TemporaryFile("w+") for _ in shares]  # the raw latencies outgrow a pipe's buffer
    processes = [subprocess.Popen([sys.executable, "-m", "bench.serve_load", "--client", url, "--data", args.data,
                                   "--seconds", str(seconds), "--concurrency", str(share), "--seed", str(i),
                                   *(["--probe"] if share == 0 else [])], cwd=ROOT,
                                  stdout=output, text=True) for i, (share, output) in enumerate(zip(shares, outputs))]
    samples, next_sample = [], time.monotonic()
    measured = process_tree(server_pid) + [p.pid for p in processes]
    ours, busy, began = cpu_seconds(measured), machine_busy_seconds(), time.monotonic()
    while any(p.poll() is None for p in processes):
        measured = sorted(set(measured) | set(process_tree(server_pid)))
        if sample_every and time.monotonic() >= next_sample:
            samples.append(tree_rss_mb(server_pid))
            next_sample += sample_every
        time.sleep(0.2)
    parts = []
    for process, output in zip(processes, outputs):
        output.seek(0)
        out = output.read()
        output.close()
        if process.returncode != 0:
            raise SystemExit(f"error: the client exited with {process.returncode}")
        parts.append(json.loads(out.strip().splitlines()[-1]))
    row = summary(parts)
    wall = time.monotonic() - began
    # CPU the rest of the machine took meanwhile (other processes share these cores): in cores
    row["other_cpu_cores"] = round(max(0.0, (machine_busy_seconds() - busy) - (cpu_seconds(measured) - ours)) / wall, 2)
    if samples:
        row["rss_mb_samples"] = samples
    return row


def measure(args, servers: dict, levels: list[int], soak: float = 0) -> list[dict]:
    """Every level on every server, the servers taking turns at each level (so a change in what else
    the machine runs falls on both alike); then the soak on flaxsst."""
    rows = []
    for concurrency in levels:
        for name, (process, url, ready_s) in servers.items():
            before = tree_rss_mb(process.pid)
            row = client(args, url, concurrency, args.seconds, process.pid)
            row.update(server=name, ready_s=round(ready_s, 1), rss_mb_before=before,
                       rss_mb_after=tree_rss_mb(process.pid))
            print(json.dumps(row), flush=True)
            rows.append(row)
    if soak and "flaxsst" in servers:
        process, url, _ = servers["flaxsst"]
        before = tree_rss_mb(process.pid)
        row = client(args, url, levels[-1], soak, process.pid, sample_every=10)
        row.update(server="flaxsst", soak=True, rss_mb_before=before, rss_mb_after=tree_rss_mb(process.pid))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| server | concurrency | requests/s | sentences/s | p50 ms | p90 ms | p99 ms | statuses | RSS MiB before -> after "
             "| other processes' CPU (cores) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        label = f"{r['concurrency']}" + (f" (soak {r['seconds']:.0f} s)" if r.get("soak") else "")
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(r["codes"].items()))
        lines.append(f"| {r['server']} | {label} | {r['requests_per_s']} | {r['sentences_per_s']} | {r['p50_ms']} | "
                     f"{r['p90_ms']} | {r['p99_ms']} | {codes} | {r['rss_mb_before']} -> {r['rss_mb_after']} | "
                     f"{r.get('other_cpu_cores', '')} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for server, marker in (("flaxsst", "o"), ("anchor", "s")):
        points = [r for r in rows if r["server"] == server and not r.get("soak")]
        if not points:
            continue
        x = [r["sentences_per_s"] for r in points]
        for key, style in (("p99_ms", "-"), ("p50_ms", ":")):
            ax.plot(x, [r[key] for r in points], style, marker=marker, label=f"{server} {key[:3]}")
        for r in points:
            ax.annotate(f"c={r['concurrency']}", (r["sentences_per_s"], r["p99_ms"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.set_xlabel("sentences/s")
    ax.set_ylabel("latency, ms (log)")
    ax.set_yscale("log")
    ax.set_title("POST /score, 1-8 SST-2 dev sentences per request")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def make_model(out: str, tokenizer: str) -> None:
    """A random-weight DistilBERT-base SST-2 export (as the anchor's README measures), with the hub
    model's tokenizer files."""
    import shutil

    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.DistilBertConfig(num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                           label2id={"NEGATIVE": 0, "POSITIVE": 1})
    transformers.DistilBertForSequenceClassification(config).eval().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (Path(tokenizer) / name).is_file():
            shutil.copy(Path(tokenizer) / name, Path(out) / name)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="the HF export both servers load")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"), help="SST-2 dev.tsv")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--soak-seconds", type=float, default=0, help="flaxsst at the last concurrency, after the levels")
    p.add_argument("--servers", nargs="+", default=["flaxsst", "anchor"], choices=["flaxsst", "anchor"])
    p.add_argument("--anchor-python", default=sys.executable, help="interpreter with azureml-inference-server-http, "
                   "torch and transformers")
    p.add_argument("--anchor-dir", default=str(ANCHOR_DIR), help="score.py and start_local.py of the anchor")
    p.add_argument("--anchor-workers", type=int, default=2)
    p.add_argument("--flaxsst-flags", nargs=argparse.REMAINDER, default=[], help="passed on to flaxsst.serve (last)")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--logs", default="/tmp/serve_load", help="the servers' logs")
    p.add_argument("--out", help="append the JSON lines here")
    p.add_argument("--plot", help="PNG of latency against throughput")
    p.add_argument("--client", metavar="URL", help="(internal) run one level against URL and print its JSON")
    p.add_argument("--client-processes", type=int, default=1, help="client processes sharing each level's "
                   "connections (one asyncio client is the bottleneck past ~1,000 requests/s)")
    p.add_argument("--seed", type=int, default=0, help="(internal) the client's request bodies")
    p.add_argument("--probe", action="store_true", help="(internal) time /health and /ready during the level")
    p.add_argument("--make-model", metavar="DIR", help="write the random-weight DistilBERT-base export to DIR")
    p.add_argument("--tokenizer", help="folder with the tokenizer files for --make-model")
    args = p.parse_args()
    if args.make_model:
        make_model(args.make_model, args.tokenizer)
        return
    if args.client:
        bodies = request_bodies(sentences(args.data), 50000, seed=args.seed)
        print(json.dumps(asyncio.run(load(args.client, args.seconds, args.concurrency[0], bodies, args.probe))))
        return
    if not args.model:
        p.error("--model is required")
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    servers = {}
    try:
        for name in args.servers:  # both stay up, idle while the other is measured
            servers[name] = (start_flaxsst if name == "flaxsst" else start_anchor)(args)
        rows = measure(args, servers, args.concurrency, args.soak_seconds)
    finally:
        for process, _, _ in servers.values():
            stop(process)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    if args.plot:
        plot(rows, args.plot)
    print(table(rows))


if __name__ == "__main__":
    main()
