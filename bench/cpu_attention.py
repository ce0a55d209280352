"""DistilBERT-base's attention alone on a CPU (6 layers, 12 heads of 64), in the ways it can be written:
scores as an einsum over ``[batch, seq, heads, d]`` or as a matmul of heads-major operands, the padding
mask as a select or as an added 0 / -1e30, softmax as ``jax.nn.softmax`` or written out.

    python -m bench.cpu_attention

Prints a JSON line per shape and variant (median ms of ``--calls`` calls).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["24x32", "24x64", "12x128"], help="ROWSxLENGTH")
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp

    lowest = jnp.finfo(jnp.float32).min

    def written_out(s):
        s = s - s.max(-1, keepdims=True)
        e = jnp.exp(s)
        return e / e.sum(-1, keepdims=True)

    def variant(scores: str, softmax, mask: str):
        def attention(q, k, v, keep):
            for _ in range(6):
                if scores == "einsum":
                    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
                else:
                    s = q.transpose(0, 2, 1, 3) @ k.transpose(0, 2, 3, 1)
                keep4 = keep[:, None, None, :].astype(bool)
                s = jnp.where(keep4, s, lowest) if mask == "select" else s + jnp.where(keep4, 0.0, -1e30)
                w = softmax(s)
                if scores == "einsum":
                    q = jnp.einsum("bhqk,bkhd->bqhd", w, v, preferred_element_type=jnp.float32)
                else:
                    q = (w @ v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
            return q
        return jax.jit(attention)

    rng = np.random.default_rng(0)
    for shape in args.shapes:
        rows, length = map(int, shape.split("x"))
        q = jnp.asarray(rng.standard_normal((rows, length, 12, 64)).astype(np.float32))
        keep = jnp.ones((rows, length), jnp.int32).at[:, length - length // 4:].set(0)
        for scores in ("einsum", "matmul"):
            for softmax_name, softmax in (("jax.nn.softmax", lambda s: jax.nn.softmax(s, axis=-1)),
                                          ("written_out", written_out)):
                for mask in ("select", "add"):
                    fn = variant(scores, softmax, mask)
                    np.asarray(fn(q, q, q, keep))
                    times = []
                    for _ in range(args.calls):
                        start = time.perf_counter()
                        np.asarray(fn(q, q, q, keep))
                        times.append(1000 * (time.perf_counter() - start))
                    print(json.dumps({"rows": rows, "length": length, "scores": scores, "softmax": softmax_name,
                                      "mask": mask, "median_ms": round(float(np.median(times)), 2)}), flush=True)


if __name__ == "__main__":
    main()
