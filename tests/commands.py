"""Running the command lines as a user does: real processes, with a shared compilation cache so
that repeated starts of the same run compile once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command_env(devices: int = 8, compile_cache: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               TQDM_DISABLE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if compile_cache is not None:
        env.update(FLAXSST_COMPILATION_CACHE="1", FLAXSST_CACHE_DIR=str(compile_cache))
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str] | None = None, stdin: str | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """``python ARGS`` in the repository root; -> the finished process with its text output."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, input=stdin,
                          env=env or command_env(), timeout=timeout)


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env or command_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def assert_one_line_error(result: subprocess.CompletedProcess, *named: str) -> str:
    """Exit 2, and stderr is one line ``error: ...`` naming each of ``named``, without a traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def assert_error_line(result: subprocess.CompletedProcess, *named: str) -> str:
    """Exit 2 after some progress: the last line of stderr is the only ``error: ...`` line, naming each
    of ``named``, and there is no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for text in named:
        assert text in lines[-1], (text, lines[-1])
    return lines[-1]
