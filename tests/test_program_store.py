"""Stored inference programs (flaxsst.program_store) and the server's prepare step: a start from the
store compiles nothing and answers as transformers does; another CPU never loads what this one
stored; a damaged entry is compiled again; the packed-dot kernel is built ahead, never while serving."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from flaxsst import packed_dot, program_store
from tests.commands import ROOT, command_env, run
from tests.serving import ServerProcess, model_flags

TEXTS = ["a fine film", "dull", "the film was great and charming , a joy from start to end"]

# A fresh process: warm up from the store at FLAXSST_HOME, count XLA compiles, print the logits.
WARM = """
import json, sys
import jax
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **_: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
from flaxsst.classifier import Classifier
clf = Classifier.from_pretrained(sys.argv[1], batch_size=4, max_length=16, length_step=4)
if "cache-all" in sys.argv:  # tiny programs compile faster than the cache's threshold: keep them all
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
if "compile-first" in sys.argv:  # the process compiled something of its own first, with JAX's persistent cache on
    jax.jit(lambda x: x * 2 + 1)(jax.numpy.ones(3)).block_until_ready()
total = clf.warm_up()
before = len(compiles)
logits = clf.logits(json.loads(sys.argv[2]))
print(json.dumps({"total": total, "compiled": clf.programs_compiled, "compiles_in_warm_up": before,
                  "compiles_after": len(compiles) - before, "logits": logits.tolist()}))
"""


def warm(model_dir, home, *extra, **env):
    result = subprocess.run([sys.executable, "-c", WARM, str(model_dir), json.dumps(TEXTS), *extra], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env=command_env(devices=1, **{"FLAXSST_HOME": str(home), "FLAXSST_PROGRAM_STORE": "1", **env}))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def transformers_logits(model_dir):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    with torch.no_grad():
        return model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.numpy()


def test_a_second_start_loads_every_program_from_the_store_and_compiles_nothing(tiny_model_dir, tmp_path):
    first, _ = warm(tiny_model_dir, tmp_path)
    assert first["total"] == 12 and first["compiled"] == 12
    stored = list((tmp_path / "programs").glob("*/*.xla"))
    assert len(stored) == 12
    second, _ = warm(tiny_model_dir, tmp_path)
    assert second["compiled"] == 0 and second["compiles_in_warm_up"] == 0 and second["compiles_after"] == 0
    reference = transformers_logits(tiny_model_dir)
    np.testing.assert_allclose(second["logits"], reference, atol=1e-5)
    np.testing.assert_allclose(first["logits"], reference, atol=1e-5)


def test_programs_stored_by_a_process_whose_compilation_cache_is_warm_load_and_run(tiny_model_dir, tmp_path):
    """A compile that JAX's persistent cache answers yields an executable that serializes without its
    kernels' code (it loads, then fails with "Function ... not found"). A store under a new key (another
    flaxsst version, say) over a warm cache, in a process that compiled something before its warm-up
    (which makes JAX decide the cache is in use for the whole process), still keeps programs that run."""
    cache = {"FLAXSST_COMPILATION_CACHE": "1", "FLAXSST_CACHE_DIR": str(tmp_path / "jax")}
    for store in ("first", "second"):
        stored, _ = warm(tiny_model_dir, tmp_path, "cache-all", "compile-first",
                         FLAXSST_PROGRAM_DIR=str(tmp_path / store), **cache)
        assert stored["compiled"] == 12
    loaded, _ = warm(tiny_model_dir, tmp_path, "cache-all", FLAXSST_PROGRAM_DIR=str(tmp_path / "second"), **cache)
    assert loaded["compiled"] == 0 and loaded["compiles_after"] == 0
    np.testing.assert_allclose(loaded["logits"], transformers_logits(tiny_model_dir), atol=1e-5)


def test_another_cpu_never_loads_the_programs_this_one_stored(tiny_model_dir, tmp_path, monkeypatch):
    """Two machines sharing one store: the second CPU's key differs, so it compiles its own programs
    into a folder of its own and loads nothing of the first's."""
    from flaxsst.classifier import Classifier

    def classifier():
        return Classifier.from_pretrained(tiny_model_dir, batch_size=2, max_length=8, length_step=4)

    monkeypatch.setenv("FLAXSST_PROGRAM_STORE", "1")
    monkeypatch.setenv("FLAXSST_PROGRAM_DIR", str(tmp_path))
    monkeypatch.setattr(program_store, "cpu_identity", lambda: "x86_64 CPU-A fma avx2 avx512f")
    here = classifier()
    assert here.warm_up() == 4 and here.programs_compiled == 4
    monkeypatch.setattr(program_store, "cpu_identity", lambda: "x86_64 CPU-B fma avx2")
    other = classifier()
    assert other.store_key != here.store_key
    assert other.warm_up() == 4 and other.programs_compiled == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([here.store_key, other.store_key])
    np.testing.assert_allclose(other.logits(TEXTS), here.logits(TEXTS), atol=1e-6)


def test_a_damaged_stored_program_is_compiled_again_and_replaced(tiny_model_dir, tmp_path):
    warm(tiny_model_dir, tmp_path)
    damaged = sorted((tmp_path / "programs").glob("*/*.xla"))[0]
    damaged.write_bytes(b"not a program")
    again, stderr = warm(tiny_model_dir, tmp_path)
    assert again["compiled"] == 1 and "cannot be loaded" in stderr and damaged.name in stderr
    assert damaged.stat().st_size > 1000
    np.testing.assert_allclose(again["logits"], transformers_logits(tiny_model_dir), atol=1e-5)


def test_the_kernel_is_named_for_the_cpu_it_is_built_for():
    assert packed_dot.kernel_key(["avx2", "fma"]) != packed_dot.kernel_key(["avx2", "fma", "avx512f"])
    assert packed_dot.kernel_key(["fma", "avx2"]) == packed_dot.kernel_key(["avx2", "fma"])


@pytest.mark.skipif(not packed_dot.load(), reason="the packed dots cannot run on this machine")
def test_the_server_never_builds_the_kernel_prepare_does_and_a_start_after_it_is_warm(tiny_model_dir, tmp_path):
    env = command_env(devices=1, FLAXSST_HOME=str(tmp_path), FLAXSST_PROGRAM_STORE="1")
    flags = ["--model", str(tiny_model_dir), *model_flags()]
    unprepared = ServerProcess(flags, env=env)
    try:
        unprepared.wait_ready()
    finally:
        assert unprepared.stop() == 0
    assert "no packed-dot kernel built for this CPU" in unprepared.stderr() and "--prepare" in unprepared.stderr()
    assert not list((tmp_path / "kernels").glob("*.so"))
    prepared = run(["-m", "flaxsst.serve", *flags, "--prepare"], env)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert "prepared: 12 programs" in prepared.stderr and len(list((tmp_path / "kernels").glob("*.so"))) == 1
    server = ServerProcess(flags, env=env)
    try:
        server.wait_ready()
        assert "12 programs warm" in server.stderr() and "(12 from the program store, 0 compiled)" in server.stderr()
        assert "no packed-dot kernel" not in server.stderr()
    finally:
        assert server.stop() == 0


def test_the_store_key_covers_what_makes_a_program(monkeypatch):
    base = program_store.program_key({"config": 1})
    assert program_store.program_key({"config": 2}) != base
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=true")
    assert program_store.program_key({"config": 1}) != base
