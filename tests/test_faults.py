"""Fault injection with real processes and real signals: SIGKILL at seeded random moments and inside
checkpoint saves, a full disk, damaged checkpoints, and a second run on a live workdir. Each ends in
one clear line, nothing is lost, and a rerun exports the model an uninterrupted run exports, bit for bit.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flaxsst.checkpoints import Checkpoints, check_manifest
from tests.commands import assert_error_line, assert_one_line_error, command_env, run, start

SEED = 20261123
# conf/tiny.yaml, 60 steps (10 per epoch): a save every 3 steps, an evaluation every epoch.
RUN = ["conf/tiny.yaml", "data.synthetic_train_size=300", "data.synthetic_eval_size=64", "train.num_epochs=6",
       "train.checkpoint_every_steps=3", "train.log_every_steps=2", "train.keep_checkpoints=2",
       "model.config.dropout=0.1", "model.config.attention_dropout=0.1", "train.eval_batch_size=32"]


def _train_args(workdir: Path, *extra: str) -> list[str]:
    return ["--config", RUN[0], "--workdir", str(workdir), *RUN[1:], *extra]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module")
def env(compile_cache):
    return command_env(devices=2, compile_cache=compile_cache)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env) -> dict:
    """The uninterrupted run: its exported weights (bytes) and its metrics records."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run(["train.py", *_train_args(workdir)], env)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"weights": (workdir / "export" / "model.safetensors").read_bytes(), "workdir": workdir,
            "metrics": _records(workdir)}


def _records(workdir: Path) -> list[tuple[str, int]]:
    return [(r["kind"], r["step"]) for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]


def _assert_consistent(workdir: Path) -> None:
    """Between runs: every committed checkpoint is intact and metrics.jsonl has each record once, in order."""
    checkpoints = Checkpoints(workdir / "checkpoints", keep=2)
    for step in checkpoints.committed_steps():
        assert checkpoints.verify(step) is None, (step, checkpoints.verify(step))
    if (workdir / "metrics.jsonl").exists():
        records = _records(workdir)
        assert len(records) == len(set(records)) and [s for _, s in records] == sorted(s for _, s in records)


def _finish(workdir: Path, env, reference) -> None:
    result = run(["train.py", *_train_args(workdir)], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "export" / "model.safetensors").read_bytes() == reference["weights"]
    assert _records(workdir) == reference["metrics"]


def _kill_plan(seed: int) -> list[tuple[str, float | str]]:
    """Ten kills: first four inside a save (one per phase, in a seeded order, at the first or second
    save of that process: the run is still young, so each lands), then six after a seeded random delay
    from the start (which lands in start-up, compiling, steps, saves or the export)."""
    rng = random.Random(seed)
    phases = ["state", "meta", "commit", "prune"]
    rng.shuffle(phases)
    return ([("save", f"{phase}:{rng.choice([1, 2])}") for phase in phases]
            + [("delay", round(rng.uniform(1.0, 9.0), 2)) for _ in range(6)])


def test_sigkill_at_ten_seeded_moments_then_a_rerun_exports_the_uninterrupted_model_bitwise(tmp_path, env, reference):
    plan = _kill_plan(SEED)
    print(f"kill plan (seed {SEED}): {plan}")
    workdir = tmp_path / "run"
    inside_saves = 0
    for kind, when in plan:
        if kind == "save":
            marker = tmp_path / "paused"
            marker.unlink(missing_ok=True)
            process = start(["-m", "tests.fault_worker", f"{when}:{marker}", "--", *_train_args(workdir)], env)
            deadline = time.time() + 120
            while not marker.exists() and process.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            inside_saves += marker.exists()
        else:
            process = start(["train.py", *_train_args(workdir)], env)
            try:
                process.wait(timeout=when)
            except subprocess.TimeoutExpired:
                pass
        finished_first = process.poll() is not None
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        _assert_consistent(workdir)
        steps = Checkpoints(workdir / "checkpoints", keep=2).committed_steps()
        print(f"  {kind} {when}: {'had exited' if finished_first else 'killed'}; checkpoints {steps}")
    assert inside_saves >= 3, f"only {inside_saves} kills landed inside a save (plan {plan})"
    _finish(workdir, env, reference)


def _mounted_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_during_a_save_is_one_line_and_a_rerun_finishes_once_space_is_freed(tmp_path, env, reference):
    """On a real tmpfs too small for the run where the machine lets the test mount one; else the
    state write of the third save fails with ENOSPC, as orbax reports a full disk."""
    disk = tmp_path / "disk"
    real = _mounted_tmpfs(disk, "1200k")
    workdir = disk / "run"
    try:
        if real:
            result = run(["train.py", *_train_args(workdir, f"data.cache_dir={tmp_path / 'cache'}")], env)
        else:
            result = run(["-m", "tests.fault_worker", "disk-full:3", "--", *_train_args(workdir)], env)
        line = assert_error_line(result, "no space left on", str(workdir / "checkpoints"))
        print(f"{'tmpfs' if real else 'injected ENOSPC'}: {line}")
        _assert_consistent(workdir)
        if real:
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        extra = [f"data.cache_dir={tmp_path / 'cache'}"] if real else []
        result = run(["train.py", *_train_args(workdir, *extra)], env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (workdir / "export" / "model.safetensors").read_bytes() == reference["weights"]
    finally:
        if real:
            subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.fixture(scope="module")
def stopped_at_step_12(tmp_path_factory, env) -> Path:
    """A workdir whose run stopped at step 12 (max_steps): committed checkpoints 10 (the epoch's
    evaluation) and 12."""
    workdir = tmp_path_factory.mktemp("stopped") / "run"
    result = run(["train.py", *_train_args(workdir, "train.max_steps=12")], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Checkpoints(workdir / "checkpoints", keep=2).committed_steps() == [10, 12]
    return workdir


def _largest_file(checkpoint: Path) -> Path:
    return max((p for p in (checkpoint / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(checkpoint: Path) -> None:
    path = _largest_file(checkpoint)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delete(checkpoint: Path) -> None:
    (checkpoint / "meta.json").unlink()


def _overwrite(checkpoint: Path) -> None:
    path = _largest_file(checkpoint)
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _delete, _overwrite], ids=["truncated", "deleted", "overwritten"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_and_the_run_finishes_bitwise(
        tmp_path, env, reference, stopped_at_step_12, damage):
    workdir = tmp_path / "run"
    shutil.copytree(stopped_at_step_12, workdir)
    damage(workdir / "checkpoints" / "12")
    assert check_manifest(workdir / "checkpoints" / "12") is not None
    result = run(["train.py", *_train_args(workdir)], env)
    assert result.returncode == 0, result.stderr[-3000:]
    warning = [line for line in result.stderr.splitlines() if "skipped damaged checkpoints" in line]
    assert len(warning) == 1 and f"{workdir / 'checkpoints' / '12'}:" in warning[0], result.stderr[-3000:]
    assert f"resuming from {workdir / 'checkpoints' / '10'}" in warning[0]
    assert (workdir / "export" / "model.safetensors").read_bytes() == reference["weights"]


def test_every_checkpoint_damaged_is_one_error_listing_them_and_nothing_is_trained(tmp_path, env, stopped_at_step_12):
    workdir = tmp_path / "run"
    shutil.copytree(stopped_at_step_12, workdir)
    _overwrite(workdir / "checkpoints" / "12")
    _delete(workdir / "checkpoints" / "10")
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and ".lock" not in p.name}
    result = run(["train.py", *_train_args(workdir)], env)
    assert_one_line_error(result, "every checkpoint in", f"{workdir / 'checkpoints' / '12'}: state/",
                          f"{workdir / 'checkpoints' / '10'}: meta.json is missing")
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and ".lock" not in p.name}
    assert after == before  # nothing trained, rewound, exported or deleted


def test_a_second_run_on_a_live_workdir_exits_2_naming_the_holder_until_the_holder_is_killed(tmp_path, env):
    workdir = tmp_path / "run"
    holder = start(["train.py", *_train_args(workdir, "train.num_epochs=500")], env)
    deadline = time.time() + 120
    while not (workdir / "checkpoints").is_dir() and holder.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert holder.poll() is None, holder.communicate()[1][-3000:]
    second = run(["train.py", *_train_args(workdir, "train.num_epochs=500")], env)
    assert_one_line_error(second, f"workdir {workdir} is in use by pid {holder.pid}", "train.py --config")
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=60)
    third = run(["train.py", *_train_args(workdir, "train.num_epochs=500", "train.max_steps=15")], env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resuming from" in third.stderr
