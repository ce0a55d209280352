"""The container image of ``deploy/docker/Dockerfile``, built, started, timed and stopped for real.

    # as root, with dockerd running (no registry needed: the base images are built from Debian packages)
    python -m bench.container wheelhouse --wheelhouse /tmp/flaxsst-wheels
    python -m bench.container base
    python -m bench.container build run --wheelhouse /tmp/flaxsst-wheels --model /tmp/exp/full \\
        --starts 3 --out bench/results/container-cpu-DATE.jsonl

(``python -m bench.serve_load --make-model /tmp/exp/full --tokenizer ../shared/data/distilbert-base-uncased-finetuned-sst-2-english``
makes a random-weight DistilBERT-base export.) Steps, each JSON lines (seconds; MiB):
- ``wheelhouse``: ``pip wheel '.[serve]'`` into ``--wheelhouse`` (flaxsst and every dependency of its
  serve extra, torch-free), pinned to this environment's versions; its size and largest wheels.
- ``base``: two base images from Debian packages (``debootstrap --variant=minbase`` bookworm, python
  3.11), ``docker import``-ed: ``--base-image`` (python3, python3-venv, ca-certificates: the runtime)
  and ``--build-base-image`` (the same and g++: installs the wheels and prepares). An image that
  exists is kept. ``--base-image python:3.11-slim`` (with a registry) needs no ``base`` step.
- ``build``: the build context staged in ``--context`` (``wheels/``, ``model/``), then ``docker
  build`` of the Dockerfile (no network used): its seconds, the image's size, its layers, its user.
- ``run``: ``--starts`` containers (``--network host``, the server on 127.0.0.1 and a free port),
  each: launch (``docker run``) to ``/ready`` 200 polled every 0.1 s, the card's sample POSTed to
  ``/score`` (its latency, its shape and label checked), the container's memory (the RSS of its
  processes, and the cgroup's figure of ``docker stats``), PID 1's command line, then SIGTERM
  (``docker kill --signal TERM``): ``/ready`` 503 after it, a request during the drain answered, the
  exit code (must be 0) and the seconds from the signal to the exit. Then one start pointed at an
  empty program store and kernel folder it cannot write (``FLAXSST_PROGRAM_DIR``,
  ``FLAXSST_KERNEL_DIR``): what a node whose CPU is not the build machine's sees (every program
  compiled at start, XLA's dots, one warning a program it cannot store).
A summary line ends ``run``. No container is left behind (each is removed by its name).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.serve_load import free_port, tree_rss_mb

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
SAMPLE = {"input_data": ["Today was an amazing day!"]}
MODEL_IN_IMAGE = "/opt/flaxsst/model"
RUNTIME_PACKAGES = "python3,python3-venv,ca-certificates"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Never pinned into the wheelhouse: the test extra's torch and its CUDA companions.
# What a node whose CPU is not the build machine's sees: no stored program and no kernel under its CPU's
# key, in a store its user cannot write (the image's, root's).
OTHER_CPU = {"FLAXSST_PROGRAM_DIR": "/opt/flaxsst/home/other-cpu", "FLAXSST_KERNEL_DIR": "/opt/flaxsst/home/other-cpu"}
NOT_PINNED = ("torch", "nvidia-", "triton", "flaxsst")

OUT: list[Path] = []


def emit(record: dict) -> dict:
    line = json.dumps(record)
    print(line, flush=True)
    for path in OUT:
        with open(path, "a") as f:
            f.write(line + "\n")
    return record


def sh(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kwargs)


def out(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, text=True, capture_output=True).stdout.strip()


def mib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


# ---- wheelhouse ----

def wheelhouse(args) -> None:
    """``pip wheel '.[serve]'``: flaxsst and its serve dependencies, at this environment's versions."""
    folder = Path(args.wheelhouse)
    folder.mkdir(parents=True, exist_ok=True)
    frozen = out([sys.executable, "-m", "pip", "list", "--format=freeze", "--exclude-editable"]).splitlines()
    pins = [line for line in frozen if "==" in line and "+" not in line
            and not line.lower().startswith(NOT_PINNED)]
    started = time.monotonic()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="constraints-") as constraints:
        constraints.write("\n".join(pins) + "\n")
        constraints.flush()
        sh([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(folder), "--constraint",
            constraints.name, ".[serve]"], cwd=ROOT)
    wheels = sorted(folder.glob("*.whl"), key=lambda p: p.stat().st_size, reverse=True)
    emit({"step": "wheelhouse", "dir": str(folder), "seconds": round(time.monotonic() - started, 1),
          "wheels": len(wheels), "mib": mib(folder),
          "largest": {p.name: round(p.stat().st_size / 2**20, 1) for p in wheels[:6]}})


# ---- base images ----

def image_exists(docker: str, image: str) -> bool:
    return subprocess.run([docker, "image", "inspect", image], check=False, capture_output=True).returncode == 0


def base(args) -> None:
    """The runtime and build base images from Debian packages (debootstrap), unless they exist."""
    for image, packages in ((args.base_image, RUNTIME_PACKAGES), (args.build_base_image, RUNTIME_PACKAGES + ",g++")):
        if not image:
            continue
        if image_exists(args.docker, image) and not args.rebuild_base:
            emit({"step": "base", "image": image, "kept": True, "mib": image_mib(args.docker, image)})
            continue
        if not shutil.which("debootstrap"):
            raise SystemExit("error: the base step needs debootstrap (apt-get install debootstrap) and root")
        started = time.monotonic()
        rootfs = Path(tempfile.mkdtemp(prefix="flaxsst-rootfs-", dir=args.work_dir))
        cache = Path(args.work_dir) / "flaxsst-debcache"
        cache.mkdir(parents=True, exist_ok=True)
        try:
            sh(["debootstrap", "--variant=minbase", f"--include={packages}", f"--cache-dir={cache}",
                args.suite, str(rootfs), args.mirror], stdout=subprocess.DEVNULL)
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for p in (rootfs / junk).glob("*"):
                    if p.is_file():
                        p.unlink()
            tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            sh([args.docker, "import", "-c", f"ENV PATH={DEFAULT_PATH}", "-c", 'CMD ["/bin/bash"]', "-", image],
               stdin=tar.stdout, stdout=subprocess.DEVNULL)
            if tar.wait():
                raise SystemExit(f"error: tar of {rootfs} failed")
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
        python = out([args.docker, "run", "--rm", "--network", "none", image, "python3", "--version"])
        emit({"step": "base", "image": image, "suite": args.suite, "packages": packages,
              "seconds": round(time.monotonic() - started, 1), "mib": image_mib(args.docker, image), "python": python})


def image_mib(docker: str, image: str) -> float:
    return round(int(out([docker, "image", "inspect", "-f", "{{.Size}}", image])) / 2**20, 1)


# ---- build ----

def stage(source: Path, target: Path) -> None:
    """``source`` copied to ``target`` as hard links where the filesystem allows (no second copy)."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    shutil.copytree(source, target, copy_function=link)


def build(args) -> None:
    wheels = Path(args.wheelhouse)
    if not any(wheels.glob("flaxsst-*.whl")):
        raise SystemExit(f"error: no flaxsst wheel in {wheels}; run the wheelhouse step first")
    context = Path(args.context)
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    stage(wheels, context / "wheels")
    stage(Path(args.model), context / "model")
    emit({"step": "context", "dir": str(context), "wheels_mib": mib(context / "wheels"),
          "model_mib": mib(context / "model")})
    cmd = [args.docker, "build", "-f", str(DOCKERFILE), "-t", args.tag, "--build-arg", f"BASE={args.base_image}",
           "--build-arg", f"BUILD_BASE={args.build_base_image or args.base_image}"]
    if args.no_cache:
        cmd.append("--no-cache")
    log_path = Path(args.work_dir) / "flaxsst-docker-build.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        code = subprocess.run([*cmd, str(context)], check=False, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = round(time.monotonic() - started, 1)
    text = log_path.read_text()
    if code:
        print(text[-4000:], file=sys.stderr)
        raise SystemExit(f"error: docker build exited {code} (log: {log_path})")
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)  # the legacy builder colours the build's stderr
    prepared = [line.strip() for line in plain.splitlines() if "prepared:" in line or "packed" in line]
    layers = [line.partition("|") for line in
              out([args.docker, "history", "--format", "{{.Size}}|{{.CreatedBy}}", args.tag]).splitlines()]
    user = out([args.docker, "image", "inspect", "-f",
                ("{{.Config.User}} {{json .Config.Entrypoint}} {{json .Config.Cmd}}"), args.tag])
    emit({"step": "build", "tag": args.tag, "base": args.base_image, "build_base": args.build_base_image,
          "seconds": seconds, "image_mib": image_mib(args.docker, args.tag), "log": str(log_path),
          "prepare_log": prepared[-3:], "config": user,
          "layers": [f"{size} {made[:90] or '(the base)'}" for size, _, made in layers if size != "0B"]})
    shutil.rmtree(context, ignore_errors=True)


# ---- run ----

def request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def status_or_none(port: int, path: str) -> int | None:
    try:
        return request(port, "GET", path, timeout=1)[0]
    except OSError:
        return None


def running(docker: str, name: str) -> bool:
    return out([docker, "inspect", "-f", "{{.State.Running}}", name]) == "true"


def start(args, name: str, port: int, env: dict[str, str] | None = None, timeout: float = 600) -> dict:
    """One container from launch to its first answer, its memory, and its SIGTERM exit."""
    cmd = [args.docker, "run", "-d", "--name", name, "--network", "host"]
    for key, value in (env or {}).items():
        cmd += ["-e", f"{key}={value}"]
    cmd += [args.tag, "--model", MODEL_IN_IMAGE, "--host", "127.0.0.1", "--port", str(port),
            "--drain-grace-s", str(args.drain_grace_s)]
    record: dict = {"port": port}
    launched = time.monotonic()
    sh(cmd, stdout=subprocess.DEVNULL)
    record["docker_run_s"] = round(time.monotonic() - launched, 2)
    health = None
    while True:
        elapsed = time.monotonic() - launched
        if health is None and status_or_none(port, "/health") == 200:
            health = record["health_s"] = round(elapsed, 2)
        if status_or_none(port, "/ready") == 200:
            record["ready_s"] = round(time.monotonic() - launched, 2)
            break
        if elapsed > timeout or not running(args.docker, name):
            tail = "\n".join(container_log(args.docker, name)[-30:])
            raise SystemExit(f"error: {name} not ready after {elapsed:.0f} s:\n{tail}")
        time.sleep(0.1)
    sent = time.monotonic()
    code, body = request(port, "POST", "/score", SAMPLE)
    record["first_answer_ms"] = round((time.monotonic() - sent) * 1000, 1)
    answer = json.loads(body)
    record["answer"] = answer
    record["answer_ok"] = (code == 200 and isinstance(answer, list) and len(answer) == 1
                           and answer[0].get("label") in ("POSITIVE", "NEGATIVE")
                           and 0.0 <= float(answer[0].get("score", -1)) <= 1.0)
    time.sleep(2)  # idle memory, after the first answer
    pid = int(out([args.docker, "inspect", "-f", "{{.State.Pid}}", name]))
    record["rss_mib"] = tree_rss_mb(pid)
    record["cgroup_mem"] = out([args.docker, "stats", "--no-stream", "--format", "{{.MemUsage}}", name])
    record["pid1"] = out([args.docker, "exec", name, "cat", "/proc/1/cmdline"]).replace("\0", " ").strip()
    record["user"] = out([args.docker, "exec", name, "id", "-u"])
    lines = container_log(args.docker, name)
    record["ready_log"] = [line.split(" ", 1)[-1] for line in lines if "ready:" in line or "packed" in line][-2:]
    record["store_warnings"] = sum("cannot store the program" in line for line in lines)
    signalled = time.monotonic()
    sh([args.docker, "kill", "--signal", "TERM", name], stdout=subprocess.DEVNULL)
    while status_or_none(port, "/ready") == 200 and time.monotonic() - signalled < 5:
        time.sleep(0.05)
    record["ready_503_after_term_s"] = round(time.monotonic() - signalled, 2)
    record["drain_answer_status"] = request(port, "POST", "/score", SAMPLE)[0]
    record["exit_code"] = int(out([args.docker, "wait", name]))
    record["term_to_exit_s"] = round(time.monotonic() - signalled, 2)
    record["finished_log"] = [line.split(" ", 1)[-1] for line in container_log(args.docker, name)[-2:]]
    return record


def container_log(docker: str, name: str) -> list[str]:
    logs = subprocess.run([docker, "logs", name], check=False, capture_output=True, text=True)
    return (logs.stdout + logs.stderr).splitlines()


def remove(docker: str, name: str) -> None:
    subprocess.run([docker, "rm", "-f", name], check=False, capture_output=True)


def run(args) -> None:
    if not image_exists(args.docker, args.tag):
        raise SystemExit(f"error: no image {args.tag}; run the build step first")
    starts = []
    for i in range(args.starts):
        name = f"flaxsst-bench-{os.getpid()}-{i}"
        try:
            starts.append(emit({"step": "run", "start": i + 1, **start(args, name, free_port())}))
        finally:
            remove(args.docker, name)
    cold = None
    if args.cold:
        name = f"flaxsst-bench-{os.getpid()}-cold"
        try:  # no programs and no kernel for this CPU, a store it cannot write: a node whose CPU differs from the build's
            cold = emit({"step": "run-unprepared", **start(args, name, free_port(), OTHER_CPU)})
        finally:
            remove(args.docker, name)
    emit({"step": "summary", "tag": args.tag, "image_mib": image_mib(args.docker, args.tag),
          "ready_s": [s["ready_s"] for s in starts], "ready_s_median": statistics.median(s["ready_s"] for s in starts),
          "first_answer_ms": [s["first_answer_ms"] for s in starts], "rss_mib": [s["rss_mib"] for s in starts],
          "exit_codes": [s["exit_code"] for s in starts], "term_to_exit_s": [s["term_to_exit_s"] for s in starts],
          "answers_ok": all(s["answer_ok"] for s in starts),
          "unprepared_ready_s": cold["ready_s"] if cold else None})


def machine(args) -> None:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    server = out([args.docker, "version", "-f", "{{.Server.Version}}"])
    client = out([args.docker, "version", "-f", "{{.Client.Version}}"])
    emit({"step": "machine", "cpu": model, "cores": os.cpu_count(), "docker_server": server, "docker_client": client,
          "kernel": platform.release()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("steps", nargs="+", choices=["wheelhouse", "base", "build", "run"])
    p.add_argument("--wheelhouse", default="/tmp/flaxsst-wheels", help="the wheelhouse folder")
    p.add_argument("--model", default="/tmp/exp/full", help="HF export folder baked into the image")
    p.add_argument("--tag", default="flaxsst:bench")
    p.add_argument("--base-image", default="flaxsst-base:bookworm", help="the Dockerfile's BASE")
    p.add_argument("--build-base-image", default="flaxsst-build:bookworm",
                   help="the Dockerfile's BUILD_BASE ('' : the same as --base-image)")
    p.add_argument("--rebuild-base", action="store_true", help="debootstrap the base images even if they exist")
    p.add_argument("--suite", default="bookworm")
    p.add_argument("--mirror", default="http://deb.debian.org/debian")
    p.add_argument("--context", default=None, help="where the build context is staged (default: WORK_DIR/flaxsst-context)")
    p.add_argument("--work-dir", default=tempfile.gettempdir())
    p.add_argument("--no-cache", action="store_true", help="docker build --no-cache")
    p.add_argument("--starts", type=int, default=3)
    p.add_argument("--no-cold", dest="cold", action="store_false", help="skip the start with an empty FLAXSST_HOME")
    p.add_argument("--drain-grace-s", type=float, default=5.0)
    p.add_argument("--docker", default="docker")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args()
    args.context = args.context or str(Path(args.work_dir) / "flaxsst-context")
    if args.out:
        OUT.append(Path(args.out))
    if {"base", "build", "run"} & set(args.steps):
        machine(args)
    for step in ("wheelhouse", "base", "build", "run"):
        if step in args.steps:
            globals()[step](args)


if __name__ == "__main__":
    main()
