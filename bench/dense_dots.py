"""The dense dots of one DistilBERT-base forward alone: 6 layers of q, k, v, out (768x768), lin1 (768x3072) and
lin2 (3072x768), float32, at each of ``--rows`` rows, as XLA's own dots, YNNPACK's (jaxlib's default),
``flaxsst.packed_dot``'s and ``flaxsst.int8``'s (weights int8, rows quantized as they run), the kinds taking
turns for ``--rounds`` rounds. JSON lines: median ms per kind and rows.

    python -m bench.dense_dots --rows 1 8 17 24 48 128 384
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxsst import int8, packed_dot
from flaxsst.classifier import CPU_PLAIN_DOTS

SHAPES = {"q": (768, 768), "k": (768, 768), "v": (768, 768), "o": (768, 768), "lin1": (768, 3072), "lin2": (3072, 768)}


def chain(dot):
    def run(layers, x):
        for w in layers:
            hidden = dot(jnp.tanh(dot(x, w["q"]) + dot(x, w["k"]) + dot(x, w["v"])), w["o"])
            x = jnp.tanh(dot(jnp.tanh(dot(hidden, w["lin1"])), w["lin2"]))
        return x
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 17, 24, 48, 128, 384])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=25, help="timed calls of each kind a round")
    args = parser.parse_args()
    lanes = packed_dot.load()
    rng = np.random.default_rng(0)
    layers = [{name: (rng.standard_normal(shape) * 0.02).astype(np.float32) for name, shape in SHAPES.items()}
              for _ in range(6)]
    plain = jax.device_put(layers)
    kinds = {"xla_dots": (chain(jnp.matmul), plain, CPU_PLAIN_DOTS), "ynnpack": (chain(jnp.matmul), plain, {})}
    if lanes:
        packed = jax.device_put([{name: packed_dot.pack(w, lanes) for name, w in layer.items()} for layer in layers])
        dot = lambda x, w: packed_dot.packed_dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))  # noqa: E731
        kinds["packed"] = (chain(dot), packed, {})
    if packed_dot.int8_levels():
        pairs = packed_dot.int8_pairs()
        quantized = [{name: int8.prepare(w, lanes, pairs) for name, w in layer.items()} for layer in layers]
        kinds["int8"] = (chain(lambda x, w: int8.int8_dot(x, *w)), jax.device_put(quantized), {})
    print(json.dumps({"what": "meta", "jax": jax.__version__, "packed_lanes": lanes,
                      "int8_levels": packed_dot.int8_levels(), "int8_pairs": packed_dot.int8_pairs(),
                      "int8_amx": packed_dot.int8_amx()}), flush=True)
    for rows in args.rows:
        x = jax.device_put(rng.standard_normal((rows, 768)).astype(np.float32))
        programs = {name: (jax.jit(fn, compiler_options=options).lower(w, x).compile(), w)
                    for name, (fn, w, options) in kinds.items()}
        outputs = {name: np.asarray(program(w, x)) for name, (program, w) in programs.items()}
        times = {name: [] for name in programs}
        for _ in range(args.rounds):
            for name, (program, w) in programs.items():
                for _ in range(3):
                    np.asarray(program(w, x))
                for _ in range(args.calls):
                    start = time.perf_counter()
                    np.asarray(program(w, x))
                    times[name].append(time.perf_counter() - start)
        medians = {name: round(1000 * float(np.median(t)), 3) for name, t in times.items()}
        print(json.dumps({"what": "dots", "rows": rows, "median_ms": medians,
                          "max_abs_diff_vs_xla_dots": {name: float(np.abs(out - outputs["xla_dots"]).max())
                                                      for name, out in outputs.items()}}), flush=True)


if __name__ == "__main__":
    main()
