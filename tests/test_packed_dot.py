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
    with pytest.raises(ValueError, match="multiple of 16"):
        packed_dot.pack(np.zeros((3, 24), np.float32), 16)


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
@pytest.mark.parametrize("k, n", [(32, 64), (768, 768), (96, 3072)])
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
def test_the_classifiers_small_batches_run_packed(tiny_model_dir):
    from flaxsst import Classifier
    from flaxsst.predict import CPU_PACKED_BATCH_TOKENS

    clf = Classifier.from_pretrained(tiny_model_dir)
    assert clf.small_tokens == CPU_PACKED_BATCH_TOKENS
    kernel = clf.small_params["distilbert"]["transformer"]["layer"]["0"]["ffn"]["lin1"]["kernel"]
    np.testing.assert_array_equal(kernel, packed_dot.pack(clf.params["distilbert"]["transformer"]["layer"]["0"]["ffn"]["lin1"]["kernel"], LANES))
    assert "custom_call_target=\"flaxsst_packed_dot\"" in clf.small_forward.lower(
        clf.small_params, np.ones((1, 8), np.int32), np.ones((1, 8), np.int32)).compile().as_text()


FALLBACK = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from flaxsst import Classifier, packed_dot
clf = Classifier.from_pretrained(sys.argv[1])
print("lanes", packed_dot.load(), "small_tokens", clf.small_tokens)
print(json.dumps(clf.logits(["a fine film"]).tolist()))
"""


@pytest.mark.parametrize("env, says", [({"CXX": "false"}, "compiling"), ({"FLAXSST_PACKED_DOT": "0"}, None)])
def test_without_the_kernel_small_batches_keep_xla_dots_and_the_same_logits(tiny_model_dir, tmp_path, env, says):
    import torch
    import transformers

    run_env = dict(os.environ, FLAXSST_KERNEL_DIR=str(tmp_path / "kernels"), **env)
    out = subprocess.run([sys.executable, "-c", FALLBACK, str(tiny_model_dir)], capture_output=True, text=True,
                         env=run_env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "lanes None small_tokens 22"
    if says:
        assert says in out.stderr and "using XLA's dots" in out.stderr
    assert not list((tmp_path / "kernels").glob("*.so"))
    model = transformers.DistilBertForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        expected = model(**tok(["a fine film"], return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(np.array(json.loads(lines[1])), expected, atol=1e-5, rtol=0)
