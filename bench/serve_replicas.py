"""Two ``flaxsst.serve`` replicas behind HAProxy (``deploy/haproxy/haproxy.cfg``) on a full-size model,
under steady load: a rolling restart and a SIGKILL while clients post, then the probes of a saturated
replica. JSON lines; the figures of bench/RESULTS.md.

    python -m bench.serve_replicas --model /tmp/distilbert-random --data ../shared/data/sst2/dev.tsv \\
        --out bench/results/replicas-cpu-DATE.jsonl

Phases:
- ``prepare``: ``flaxsst.serve --prepare`` into one FLAXSST_HOME that every replica shares (a
  restarted replica is ready in seconds).
- ``rolling``: ``--concurrency`` clients through HAProxy for ``--seconds``; meanwhile replica 1 gets
  SIGTERM, its successor starts on the same port and is routed, then replica 2 the same, then replica
  1 gets SIGKILL. Statuses of every request (a lost request is any status but 200), sentences/s, p99.
- ``saturated``: 64 clients straight at one replica, ``/health`` and ``/ready`` timed from a process
  of their own, each on a new connection.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.serve_load import client, free_port, stop

ROOT = Path(__file__).resolve().parents[1]


def replica(model: str, home: str, port: int, logs: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flaxsst.serve", "--model", model, "--port", str(port),
                             "--drain-grace-s", "5"], cwd=ROOT, env=dict(os.environ, FLAXSST_HOME=home),
                            stdout=subprocess.DEVNULL, stderr=open(logs / f"{name}.log", "w"))


def wait_ready(port: int, process: subprocess.Popen, timeout: float = 600) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"error: the replica on port {port} exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"error: the replica on port {port} was not ready within {timeout} s")


def states(stats_port: int) -> dict[str, str]:
    text = httpx.get(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=5).text.lstrip("# ")
    return {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(text)) if row["pxname"] == "replicas"}


def wait_state(stats_port: int, name: str, state: str, timeout: float = 60) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if states(stats_port).get(name) == state:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"error: {name} was not {state} within {timeout} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="SST-2 dev.tsv")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=90)
    p.add_argument("--haproxy", default=shutil.which("haproxy") or "/usr/sbin/haproxy")
    p.add_argument("--out")
    args = p.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="replicas_logs_"))
    home = tempfile.mkdtemp(prefix="replicas_home_")

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "flaxsst.serve", "--model", args.model, "--prepare"], cwd=ROOT, check=True,
                   env=dict(os.environ, FLAXSST_HOME=home), stderr=open(logs / "prepare.log", "w"))
    emit({"phase": "prepare", "seconds": round(time.monotonic() - started, 1)})
    ports = [free_port(), free_port()]
    replicas = [replica(args.model, home, port, logs, f"replica{i + 1}") for i, port in enumerate(ports)]
    lb_port, stats_port = free_port(), free_port()
    balancer = subprocess.Popen([args.haproxy, "-db", "-f", str(ROOT / "deploy" / "haproxy" / "haproxy.cfg")],
                                env=dict(os.environ, FLAXSST_LB_BIND=f"127.0.0.1:{lb_port}",
                                         FLAXSST_LB_STATS=f"127.0.0.1:{stats_port}",
                                         FLAXSST_REPLICA_1=f"127.0.0.1:{ports[0]}",
                                         FLAXSST_REPLICA_2=f"127.0.0.1:{ports[1]}"),
                                stdout=open(logs / "haproxy.log", "w"), stderr=subprocess.STDOUT)
    events = []
    try:
        for port, process in zip(ports, replicas):
            wait_ready(port, process)
        wait_state(stats_port, "replica1", "UP")
        wait_state(stats_port, "replica2", "UP")
        result = {}
        load = threading.Thread(target=lambda: result.update(row=client(
            argparse.Namespace(data=args.data), f"http://127.0.0.1:{lb_port}/score", args.concurrency, args.seconds,
            replicas[0].pid)))
        load.start()
        began = time.monotonic()
        time.sleep(10)
        for index in range(2):
            signalled = time.monotonic()
            replicas[index].send_signal(signal.SIGTERM)
            code = replicas[index].wait(120)
            replicas[index] = replica(args.model, home, ports[index], logs, f"replica{index + 1}-successor")
            ready_s = wait_ready(ports[index], replicas[index])
            routed_s = wait_state(stats_port, f"replica{index + 1}", "UP")
            events.append({"event": f"rolling restart of replica{index + 1}", "at_s": round(signalled - began, 1),
                           "exit_code": code, "successor_ready_s": round(ready_s, 2),
                           "routed_after_ready_s": round(routed_s, 2)})
            time.sleep(5)
        killed = time.monotonic()
        replicas[0].kill()
        replicas[0].wait(30)
        events.append({"event": "SIGKILL of replica1", "at_s": round(killed - began, 1),
                       "marked_down_s": round(wait_state(stats_port, "replica1", "DOWN"), 2)})
        load.join()
        row = result["row"]
        row.update(phase="rolling", events=events,
                   lost=sum(count for status, count in row["codes"].items() if status != "200"))
        emit(row)
        for process in replicas:
            stop(process)
        single = replica(args.model, home, ports[1], logs, "saturated")
        wait_ready(ports[1], single)
        row = client(argparse.Namespace(data=args.data), f"http://127.0.0.1:{ports[1]}/score", 64, 30, single.pid)
        row.update(phase="saturated")
        emit(row)
        stop(single)
    finally:
        for process in replicas:
            if process.poll() is None:
                stop(process)
        stop(balancer)
        shutil.rmtree(home, ignore_errors=True)
    print(f"logs: {logs}", file=sys.stderr)


if __name__ == "__main__":
    main()
