"""flaxsst.int8: the quantization and the packed order worked by hand, the FFI int8 dot against numpy's
integer product, the int8 Classifier against transformers with int8 linears written here in numpy, the
AVX2 build (products summed two by two in int16), the float32 fall-back, and --dtype int8 through the predict
command and the server."""

import concurrent.futures
import json
import os
import subprocess
import sys

import httpx
import jax
import numpy as np
import pytest

from flaxsst import int8, packed_dot
from tests.fixtures import sentences, tiny_hf_folder
from tests.serving import ServerProcess, model_flags

LANES = packed_dot.load()
LEVELS = packed_dot.int8_levels()
PAIRS = packed_dot.int8_pairs()
needs_kernel = pytest.mark.skipif(not LEVELS, reason="no C++ compiler, or no AVX2 (or AVX-512BW): int8 falls back")


def column_bound(w: np.ndarray, pairs: bool) -> np.ndarray:
    """Per column of ``w [K, N]``: the largest |weight|, or with ``pairs`` the largest sum of the weights of one
    sign among w[2i] and w[2i + 1] (a last odd k alone)."""
    if not pairs:
        return np.abs(w).max(axis=0)
    bound = np.zeros(w.shape[1], np.float32)
    for i in range(0, w.shape[0], 2):
        pair = w[i:i + 2]
        bound = np.maximum(bound, np.maximum(np.where(pair > 0, pair, 0).sum(axis=0),
                                             -np.where(pair < 0, pair, 0).sum(axis=0)))
    return bound


def reference_int8_dot(x: np.ndarray, w: np.ndarray, levels: int, pairs: bool) -> np.ndarray:
    """``x [M, K] @ w [K, N]`` as the module docstring states it: int8 columns, each row of ``x`` on
    ``levels`` unsigned levels with 0.0 exact, products summed in int64, float32 scales."""
    x, w = np.asarray(x, np.float32), np.asarray(w, np.float32)
    w_scale = (column_bound(w, pairs) / np.float32(127)).astype(np.float32)
    w_scale[w_scale == 0] = 1
    q = np.clip(np.rint(w / w_scale), -127, 127).astype(np.int64)
    lo, hi = np.minimum(x.min(axis=1), 0), np.maximum(x.max(axis=1), 0)
    x_scale = ((hi - lo) / np.float32(levels)).astype(np.float32)
    x_scale[x_scale == 0] = 1
    zero = np.clip(np.rint(-lo / x_scale), 0, levels).astype(np.int64)
    xq = np.clip(np.rint(x * (np.float32(1) / x_scale)[:, None]) + zero[:, None], 0, levels).astype(np.int64)
    total = xq @ q - zero[:, None] * q.sum(axis=0)
    return total.astype(np.float32) * (x_scale[:, None] * w_scale[None, :])


def test_quantize_kernel_worked_by_hand():
    q, scale = int8.quantize_kernel(np.array([[1.0, -2.0, 0.0], [0.5, 4.0, 0.0]], np.float32))
    np.testing.assert_allclose(scale, [1 / 127, 4 / 127, 1], rtol=1e-7)
    assert q.dtype == np.int8 and q.tolist() == [[127, -64, 0], [64, 127, 0]]  # 63.5 and -63.5 round to even
    # pairs: column 0's one pair sums to 1.5, column 1's positive weight 4 outweighs its negative -2
    q, scale = int8.quantize_kernel(np.array([[1.0, -2.0, 0.0], [0.5, 4.0, 0.0]], np.float32), pairs=True)
    np.testing.assert_allclose(scale, [1.5 / 127, 4 / 127, 1], rtol=1e-7)
    assert q.tolist() == [[85, -64, 0], [42, 127, 0]]  # 84.67 and 42.33
    # K = 3: the last k is a pair alone; 3 + 2 of column 0 and -1 + -3 of column 1 are the largest sums
    q, scale = int8.quantize_kernel(np.array([[3.0, -1.0], [2.0, -3.0], [-4.5, 1.0]], np.float32), pairs=True)
    np.testing.assert_allclose(scale, [5 / 127, 4 / 127], rtol=1e-7)


def test_pair_scaled_levels_cannot_saturate_int16():
    """With ``pairs``, 255 levels of a row times any two weights of a pair stay within int16, where the largest
    weight's scale (pairs of large weights of one sign, as in |w| below) would overflow."""
    rng = np.random.default_rng(3)
    w = np.abs(rng.standard_normal((768, 64))).astype(np.float32)
    w[::7] *= -1
    for pairs, fits in ((True, True), (False, False)):
        q = int8.quantize_kernel(w, pairs=pairs)[0].astype(np.int64)
        positive, negative = np.where(q > 0, q, 0), np.where(q < 0, q, 0)
        top = 255 * (positive[0::2] + positive[1::2]).max()
        bottom = 255 * (negative[0::2] + negative[1::2]).min()
        assert (top <= 32767 and bottom >= -32768) == fits, (pairs, top, bottom)


def test_pack_puts_four_k_of_a_column_side_by_side_in_panels():
    q = np.arange(32, dtype=np.int8).reshape(8, 4)  # K=8, N=4: panels of 2 columns, blocks of 4 k
    packed = int8.pack(q, 2)
    assert packed.shape == (8, 4)
    # panel 0 = columns 0-1: k 0-3 of column 0, k 0-3 of column 1, then k 4-7 of each; then panel 1
    assert packed.ravel().tolist()[:16] == [0, 4, 8, 12, 1, 5, 9, 13, 16, 20, 24, 28, 17, 21, 25, 29]
    assert packed.ravel().tolist()[16:20] == [2, 6, 10, 14]
    with pytest.raises(ValueError, match="multiple of 4"):
        int8.pack(np.zeros((6, 4), np.int8), 2)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 8, 13, 16, 18, 24, 32, 33, 48])  # AMX from 8; tiles of 16 + rest
@pytest.mark.parametrize("k, n", [(32, 64), (100, 64), (768, 768), (64, 3072), (3072, 64)])  # 100: a tail past 32
def test_int8_dot_equals_the_integer_product(rows, k, n):
    rng = np.random.default_rng(rows * k + n)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, : k // 2] = np.abs(x[0, : k // 2])  # a row with a long positive run, as after GELU
    if rows > 1:
        x[1] = np.abs(x[1]) + 0.5  # all positive: the zero point sits at level 0, levels up to 255
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:, : n // 2] = np.abs(w[:, : n // 2])  # columns of positive pairs, which int16 sums would saturate on
    q, scale = int8.quantize_kernel(w, PAIRS)
    got = np.asarray(jax.jit(int8.int8_dot)(x, int8.pack(q, LANES), scale, q.astype(np.int32).sum(axis=0)))
    expected = reference_int8_dot(x, w, LEVELS, PAIRS)
    np.testing.assert_allclose(got, expected, rtol=2e-7, atol=0)
    # and the quantization itself costs ~1% of the float product's size
    exact = x.astype(np.float64) @ w
    assert np.abs(got - exact).max() < 0.03 * np.abs(exact).max()


@needs_kernel
def test_dots_called_from_several_threads_at_once_stay_exact():
    """The kernel's own spinning helpers serve one call at a time; calls that find them busy share XLA's pool."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((768, 3072)).astype(np.float32)
    q, scale = int8.quantize_kernel(w, PAIRS)
    weights = (int8.pack(q, LANES), scale, q.astype(np.int32).sum(axis=0))
    packed = packed_dot.pack(w, LANES)
    int8_dot = jax.jit(int8.int8_dot)
    float_dot = jax.jit(lambda x, p: packed_dot.packed_dot_general(x, p, (((1,), (0,)), ((), ()))))
    inputs = [rng.standard_normal((rows, 768)).astype(np.float32) for rows in (1, 3, 18, 40) * 4]

    def both(x):
        for _ in range(5):
            got_int8, got_float = np.asarray(int8_dot(x, *weights)), np.asarray(float_dot(x, packed))
        return got_int8, got_float

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(both, inputs))
    for x, (got_int8, got_float) in zip(inputs, results):
        np.testing.assert_allclose(got_int8, reference_int8_dot(x, w, LEVELS, PAIRS), rtol=2e-7, atol=0)
        np.testing.assert_allclose(got_float, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-3)


@needs_kernel
def test_int8_dot_takes_leading_batch_axes_and_zero_rows():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 64)).astype(np.float32)
    x[1, 2] = 0  # a row of zeros: scale 1, every level 0
    w = rng.standard_normal((64, 2 * LANES)).astype(np.float32)
    q, scale = int8.quantize_kernel(w, PAIRS)
    got = np.asarray(int8.int8_dot(x, int8.pack(q, LANES), scale, q.astype(np.int32).sum(axis=0)))
    np.testing.assert_allclose(got.reshape(15, -1), reference_int8_dot(x.reshape(15, 64), w, LEVELS, PAIRS),
                               rtol=2e-7)
    assert not got[1, 2].any()


def int8_transformers_logits(model_dir, texts, levels: int, lanes: int, pairs: bool) -> np.ndarray:
    """transformers' model with every linear of ``2 * lanes``-multiple outputs replaced by
    ``reference_int8_dot`` plus its bias: the int8 model, built without flaxsst's parameters or modules."""
    import torch
    import transformers

    model = transformers.DistilBertForSequenceClassification.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)

    class Int8Linear(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.w = linear.weight.detach().numpy().T.copy()
            self.b = linear.bias.detach().numpy()

        def forward(self, x):
            rows = x.detach().numpy().reshape(-1, x.shape[-1])
            y = reference_int8_dot(rows, self.w, levels, pairs) + self.b
            return torch.from_numpy(y.reshape(*x.shape[:-1], -1))

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child.out_features % (2 * lanes) == 0:
                setattr(module, child_name, Int8Linear(child))
    rows = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding
            rows.append(model(**tok([text], return_tensors="pt")).logits.numpy()[0])
    return np.array(rows)


@needs_kernel
def test_an_int8_classifier_gives_transformers_logits_with_int8_linears(tiny_model_dir):
    from flaxsst import Classifier

    clf = Classifier.from_pretrained(tiny_model_dir, dtype="int8")
    assert clf.int8_lanes == LANES and clf.packed_lanes == 0 and clf.precision.int8_lanes == LANES
    hlo = clf.forward.lower(clf.params, np.ones((4, 40), np.int32), np.ones((4, 40), np.int32)).compile().as_text()
    assert hlo.count('custom_call_target="flaxsst_int8_dot"') == 2 * 6 + 1  # q, k, v, out, lin1, lin2 x 2; pre_classifier
    texts = sentences()
    got = clf.logits(texts)
    expected = int8_transformers_logits(tiny_model_dir, texts, LEVELS, LANES, PAIRS)
    # an input one float32 rounding away from a level's edge may land on the next level: ~1e-4 of the range
    np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max(), rtol=0)
    fp32 = Classifier.from_pretrained(tiny_model_dir).logits(texts)
    assert np.abs(got - fp32).max() > 0  # it is not the float32 model
    assert (got.argmax(axis=1) == fp32.argmax(axis=1)).all()


@needs_kernel
def test_an_input_width_that_is_not_a_multiple_of_4_is_padded_with_zeros(tmp_path, vocab_file):
    """lin2 of a 66-wide FFN: its kernel gains two rows of zeros, its input two zero columns (lin1, 66 outputs,
    stays float32)."""
    from flaxsst import Classifier

    model_dir = tiny_hf_folder(tmp_path / "odd", vocab_file, hidden_dim=66)
    clf = Classifier.from_pretrained(model_dir, dtype="INT8")
    ffn = clf.params["distilbert"]["transformer"]["layer"]["0"]["ffn"]
    assert ffn["lin2"]["kernel"].shape == (68, 32) and ffn["lin2"]["kernel"].dtype == np.int8
    assert ffn["lin1"]["kernel"].dtype == np.float32
    texts = sentences()
    expected = int8_transformers_logits(model_dir, texts, LEVELS, LANES, PAIRS)
    np.testing.assert_allclose(clf.logits(texts), expected, atol=2e-3 * np.abs(expected).max(), rtol=0)


FRESH_PROCESS = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from flaxsst import Classifier, packed_dot
clf = Classifier.from_pretrained(sys.argv[1], dtype="int8")
print(json.dumps({"levels": packed_dot.int8_levels(), "pairs": packed_dot.int8_pairs(), "int8_lanes": clf.int8_lanes,
                  "amx": packed_dot.int8_amx()}))
print(json.dumps(clf.logits(sys.argv[2:]).tolist()))
"""


def in_a_fresh_process(model_dir, tmp_path, env: dict, copies: int = 1):
    """A new process's int8 Classifier, ``env`` set: (its kernel's facts, its logits of ``copies`` x the
    sentences, the texts, its stderr)."""
    texts = sentences() * copies
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(model_dir), *texts], capture_output=True,
                         text=True, env=dict(os.environ, FLAXSST_KERNEL_DIR=str(tmp_path / "kernels"), **env),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    facts, logits = out.stdout.splitlines()[:2]
    return json.loads(facts), np.array(json.loads(logits)), texts, out.stderr


@needs_kernel
def test_the_avx2_build_scales_columns_by_their_pairs(tiny_model_dir, tmp_path):
    """As on an AVX2-only CPU: ``vpmaddubsw`` sums two u8 x s8 products in int16, which pair-scaled columns never
    saturate."""
    facts, got, texts, _ = in_a_fresh_process(tiny_model_dir, tmp_path, {"FLAXSST_PACKED_DOT_MARCH": "haswell"})
    assert facts == {"levels": 255, "pairs": True, "int8_lanes": 8, "amx": False}
    expected = int8_transformers_logits(tiny_model_dir, texts, 255, 8, True)
    np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max(), rtol=0)


@pytest.mark.skipif(not packed_dot.int8_amx(), reason="no AMX tiles here: every batch runs vpdpbusd already")
def test_without_amx_tiles_a_long_batch_runs_vpdpbusd_to_the_same_levels(tiny_model_dir, tmp_path):
    facts, got, texts, _ = in_a_fresh_process(tiny_model_dir, tmp_path, {"FLAXSST_INT8_AMX": "0"}, copies=4)
    assert facts == {"levels": 255, "pairs": False, "int8_lanes": LANES, "amx": False}
    expected = int8_transformers_logits(tiny_model_dir, texts, 255, LANES, False)
    np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max(), rtol=0)


def test_without_the_kernel_int8_runs_float32_and_says_so(tiny_model_dir, tmp_path):
    import torch
    import transformers

    facts, got, texts, stderr = in_a_fresh_process(tiny_model_dir, tmp_path, {"FLAXSST_PACKED_DOT": "0"})
    assert facts == {"levels": 0, "pairs": False, "int8_lanes": 0, "amx": False}
    assert "dtype int8 runs float32 here: FLAXSST_PACKED_DOT=0 turns the kernel off" in stderr
    model = transformers.DistilBertForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        expected = np.array([model(**tok([t], return_tensors="pt")).logits.numpy()[0] for t in texts])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_a_bad_dtype_names_int8_among_the_choices(tiny_model_dir):
    from flaxsst import Classifier
    from flaxsst.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown dtype 'int4'.*'int8'"):
        Classifier.from_pretrained(tiny_model_dir, dtype="int4")


@needs_kernel
def test_predict_and_serve_take_dtype_int8(tiny_model_dir):
    from flaxsst import Classifier

    texts = sentences()
    expected = Classifier.from_pretrained(tiny_model_dir, dtype="int8", max_length=16, batch_size=4,
                                          length_step=4)(texts)
    result = subprocess.run([sys.executable, "-m", "flaxsst.predict", "--model", str(tiny_model_dir), "--dtype", "int8",
                             "--max-length", "16"], input=json.dumps({"input_data": texts}), capture_output=True,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert result.returncode == 0, result.stderr
    for got, want in zip(json.loads(result.stdout), expected):
        assert got["label"] == want["label"] and got["score"] == pytest.approx(want["score"], abs=1e-5)
    server = ServerProcess(["--model", str(tiny_model_dir), *model_flags(16), "--dtype", "int8"])
    try:
        server.wait_ready()
        assert f"int8 dense layers, {LANES} lanes" in server.stderr()
        answer = httpx.post(f"{server.url}/score", json={"input_data": texts}, timeout=60)
        assert answer.status_code == 200, answer.text
        for got, want in zip(answer.json(), expected):
            assert got["label"] == want["label"] and got["score"] == pytest.approx(want["score"], abs=1e-5)
    finally:
        assert server.stop() == 0, server.stderr()
