"""Two processes (2 CPU devices each) through jax.distributed equal one process with the same global batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.multihost_case import one_step

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["pmap", "shard_map"])
def test_two_processes_end_with_identical_params_equal_to_one_process(tmp_path, kind):
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    workers = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(i), port, str(tmp_path), kind],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-4000:]
    first, second = (dict(np.load(tmp_path / f"params-{i}.npz")) for i in range(2))
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    assert float(first["examples"]) == 6.0  # the psum saw both hosts' rows

    params, examples = one_step(0, 1, devices=jax.devices()[:4], kind=kind)
    assert examples == 6.0
    single = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    assert single.keys() == first.keys() - {"examples"}
    for key, value in single.items():
        np.testing.assert_allclose(first[key], value, atol=1e-6, rtol=0, err_msg=key)
