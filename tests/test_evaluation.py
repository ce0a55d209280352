"""evaluate.py on a run's own export: it scores what the run scored, and says which data it scores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flaxsst.config import load_train_config
from flaxsst.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
# a run whose eval set differs from the defaults' (synthetic_eval_size 400) and from tiny.yaml's seed
RUN = ["data.synthetic_train_size=200", "data.synthetic_eval_size=72", "train.num_epochs=1", "train.seed=3",
       "train.checkpoint_every_steps=100", "train.log_every_steps=100"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    result = Trainer(load_train_config(ROOT / "conf" / "tiny.yaml", RUN), workdir).run()
    assert result.finished
    return workdir


def _evaluate(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.mark.parametrize("model", ["export", "."])
def test_a_runs_export_is_scored_on_the_runs_own_eval_split(run_dir, tmp_path, model):
    out = tmp_path / "eval"
    result = _evaluate("--model", str(run_dir / model), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    run_results = json.loads((run_dir / "eval_results.json").read_text())
    again = json.loads((out / "eval_results.json").read_text())
    assert again["num_examples"] == run_results["num_examples"] == 72
    assert again["confusion_matrix"] == run_results["confusion_matrix"]
    assert again["accuracy"] == run_results["accuracy"]
    assert again["split"] == run_results["split"] == "validation"
    assert again["source"] == run_results["source"] == "synthetic [validation]"
    assert again["data_settings"] == f"the run's settings ({run_dir / 'config.yaml'})"
    assert f"split 'validation': 72 examples from synthetic [validation] (data settings: the run's settings " \
        f"({run_dir / 'config.yaml'}))" in result.stdout


def test_a_data_override_on_a_runs_export_is_named(run_dir, tmp_path):
    result = _evaluate("--model", str(run_dir / "export"), "--output", str(tmp_path), "data.synthetic_eval_size=40")
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((tmp_path / "eval_results.json").read_text())
    assert again["num_examples"] == 40
    assert again["data_settings"].endswith("with data.synthetic_eval_size=40")
    assert "split 'validation': 40 examples from synthetic [validation]" in result.stdout
