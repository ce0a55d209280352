"""Servers as a user starts them: a real process on 127.0.0.1 (a free port the server picks and
prints), talked to over real HTTP, stopped by its own pid."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.commands import ROOT, command_env

LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


class ServerProcess:
    """``python -m flaxsst.serve ARGS --port 0``; ``url`` once it listens; stderr kept in ``lines``."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, start_timeout: float = 180):
        self.process = subprocess.Popen([sys.executable, "-m", "flaxsst.serve", "--port", "0", *args], cwd=ROOT,
                                        env=env or command_env(devices=1), text=True, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self.url: str | None = None
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._listening.wait(start_timeout)
        if self.url is None:
            self.stop()
            raise AssertionError(f"the server did not listen within {start_timeout} s:\n{self.stderr()}")

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            match = LISTENING.search(line)
            if match and self.url is None:
                self.url = match.group(1)
                self._listening.set()
        self._listening.set()

    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 180) -> float:
        """Poll ``/ready`` until 200; -> seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.stderr()}")
            if httpx.get(f"{self.url}/ready", timeout=10).status_code == 200:
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"/ready was not 200 within {timeout} s:\n{self.stderr()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        returncode = stop_process(self.process, sig, timeout)
        self._reader.join(10)
        return returncode


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    """``sig`` to ``process`` (by its own pid), then SIGKILL if it is still there after ``timeout``; its exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
    return process.returncode


async def post_all(url: str, bodies: list, timeout: float = 120) -> list[httpx.Response | Exception]:
    """POST every body at once (one connection each); -> the responses (or errors) in order."""
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=len(bodies) or 1)) as client:
        async def one(body):
            try:
                return await client.post(url, json=body)
            except httpx.HTTPError as e:
                return e
        return await asyncio.gather(*(one(body) for body in bodies))


def run_async(coroutine):
    return asyncio.run(coroutine)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_flags(max_length: int = 16, batch_size: int = 4) -> list[str]:
    """Small shapes: 12 programs (rows 1, 2, 4; lengths 4, 8, 12, 16), a warm-up of seconds."""
    return ["--max-length", str(max_length), "--batch-size", str(batch_size), "--length-step", "4"]


def served_classifier(model_dir, max_length: int = 16, batch_size: int = 4):
    """The reference ``Classifier`` of a server started with ``model_flags(max_length, batch_size)``."""
    from flaxsst.classifier import Classifier

    return Classifier.from_pretrained(model_dir, batch_size=batch_size, max_length=max_length, length_step=4)


def texts_of(seed: int, count: int) -> list[str]:
    """``count`` distinct SST-2-like texts of varied length."""
    from tests.fixtures import WORDS

    import numpy as np

    rng = np.random.default_rng(seed)
    return [f"{seed} {i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(0, 14)))) for i in range(count)]
