"""flaxsst.packed_dot: the packed layout worked by hand, the FFI dot against numpy in float64, the
Classifier's packed program against transformers, and the fall-back where the kernel cannot be built."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from flaxsst import packed_dot

LANES = packed_dot.load()
needs_kernel = pytest.mark.skipif(LANES is None, reason="no C++ compiler, or no AVX2 and FMA: the packed dots fall back")


def test_pack_puts_each_panel_of_columns_in_one_contiguous_run():
    kernel = np.arange(12, dtype=np.float32).reshape(3, 4)  # K=3, N=4: panels of 2 columns
    packed = packed_dot.pack(kernel, 2)
    assert packed.shape == (3, 4)
    # panel 0: rows of columns 0-1, then panel 1: rows of columns 2-3
    assert packed.ravel().tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]
    with pytest.raises(ValueError, match="multiple of 32"):
        packed_dot.pack(np.zeros((3, 48), np.float32), 16)


def test_pack_params_packs_the_dense_kernels_whose_outputs_fit_the_panels_only():
    params = {"a": {"kernel": np.ones((4, 16), np.float32), "bias": np.zeros(16, np.float32)},
              "b": {"kernel": np.ones((16, 2), np.float32), "bias": np.zeros(2, np.float32)},
              "norm": {"scale": np.ones(16, np.float32), "bias": np.zeros(16, np.float32)}}
    kernel = np.arange(64, dtype=np.float32).reshape(4, 16)
    params["a"]["kernel"] = kernel
    out = packed_dot.pack_params(params, 8)
    np.testing.assert_array_equal(out["a"]["kernel"], packed_dot.pack(kernel, 8))
    assert out["b"]["kernel"] is params["b"]["kernel"] and out["norm"] is not None
    np.testing.assert_array_equal(out["norm"]["scale"], params["norm"]["scale"])


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 11, 12, 13, 17, 24, 30])
@pytest.mark.parametrize("k, n", [(32, 64), (768, 768), (96, 3072), (0, 32), (20, 32), (40, 96)])  # 2, 6 panels
def test_packed_dot_equals_the_float64_product(rows, k, n):
    rng = np.random.default_rng(rows * k)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    got = np.asarray(jax.jit(lambda a, b: packed_dot.packed_dot_general(a, b, (((1,), (0,)), ((), ()))))(
        x, packed_dot.pack(w, LANES)))
    expected = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got, expected, atol=2e-5 * np.sqrt(k), rtol=0)


@needs_kernel
def test_packed_dot_takes_leading_batch_axes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 32)).astype(np.float32)
    w = rng.standard_normal((32, 2 * LANES)).astype(np.float32)
    got = np.asarray(packed_dot.packed_dot_general(x, packed_dot.pack(w, LANES), (((2,), (0,)), ((), ()))))
    np.testing.assert_allclose(got, np.einsum("bsk,kn->bsn", x.astype(np.float64), w), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="dimension numbers"):
        packed_dot.packed_dot_general(x, w, (((1,), (0,)), ((), ())))


@needs_kernel
def test_a_float32_cpu_classifier_runs_every_dense_layer_packed(tiny_model_dir):
    from flaxsst import Classifier
    from flaxsst.convert import load_pretrained

    clf = Classifier.from_pretrained(tiny_model_dir)
    assert clf.packed_lanes == LANES and clf.small_forward is None
    _, original = load_pretrained(tiny_model_dir)
    lin1 = ["distilbert", "transformer", "layer", "0", "ffn", "lin1", "kernel"]
    got, expected = clf.params, original
    for key in lin1:
        got, expected = got[key], expected[key]
    np.testing.assert_array_equal(got, packed_dot.pack(expected, LANES))
    hlo = clf.forward.lower(clf.params, np.ones((4, 40), np.int32), np.ones((4, 40), np.int32)).compile().as_text()
    assert hlo.count('custom_call_target="flaxsst_packed_dot"') == 2 * 6 + 1  # q, k, v, out, lin1, lin2 in each of 2 layers; pre_classifier


FRESH_PROCESS = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from flaxsst import Classifier, packed_dot
clf = Classifier.from_pretrained(sys.argv[1])
print("lanes", packed_dot.load(), "packed_lanes", clf.packed_lanes)
print(json.dumps(clf.logits(["a fine film"]).tolist()))
"""


def in_a_fresh_process(model_dir, kernel_dir, env: dict):
    """A new process's Classifier of ``model_dir``, ``env`` set: (its lanes line, its stderr), after checking
    its logits of one text against transformers'."""
    import torch
    import transformers

    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(model_dir)], capture_output=True, text=True,
                         env=dict(os.environ, FLAXSST_KERNEL_DIR=str(kernel_dir), **env), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lanes_line, logits = out.stdout.splitlines()[:2]
    model = transformers.DistilBertForSequenceClassification.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        expected = model(**tok(["a fine film"], return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(np.array(json.loads(logits)), expected, atol=1e-5, rtol=0)
    return lanes_line, out.stderr


@pytest.mark.parametrize("env, says", [({"CXX": "false"}, "compiling"), ({"FLAXSST_PACKED_DOT": "0"}, None)])
def test_without_the_kernel_small_batches_keep_xla_dots_and_the_same_logits(tiny_model_dir, tmp_path, env, says):
    lanes_line, stderr = in_a_fresh_process(tiny_model_dir, tmp_path / "kernels", env)
    assert lanes_line == "lanes None packed_lanes 0"
    if says:
        assert says in stderr and "using XLA's dots" in stderr
    assert not list((tmp_path / "kernels").glob("*.so"))


@needs_kernel
def test_the_avx2_kernel_gives_the_transformers_logits(tiny_model_dir, tmp_path):
    """Eight lanes, as on an AVX2-only CPU: the same source compiled for Haswell."""
    lanes_line, _ = in_a_fresh_process(tiny_model_dir, tmp_path / "kernels", {"FLAXSST_PACKED_DOT_MARCH": "haswell"})
    assert lanes_line == "lanes 8 packed_lanes 8"
    assert len(list((tmp_path / "kernels").glob("packed_dot-*.so"))) == 1
