"""Kernels per train step and per-chip memory of the trainer's step and its candidates, from the
program libtpu compiles for a TPU slice (no TPU needed); one JSON line per (variant, length).

    python bench/kernels.py                                   # v5e:2x2, batch 32, seq 64 and 128, every variant
    python bench/kernels.py --variants stacked tree --lengths 64 --hlo /tmp/hlo

DistilBERT-base shapes (768/6/12/3072, vocab 30522) in bfloat16, the recipe's optimizer
(conf/sst2.yaml). A variant is a ``train.param_layout`` (and its model): ``tree`` (every tensor its
own leaf, the blocks unrolled), ``flat`` (parameters and AdamW moments as one vector each),
``stacked`` (the blocks' parameters stacked and the blocks scanned). Kernels are counted as
``flaxsst.hlo`` defines them: a loop body counts once per trip.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flaxsst.aot import compile_program, parse_slice, topology_devices  # noqa: E402
from flaxsst.config import load_train_config  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "conf" / "sst2.yaml"
VARIANTS = ("tree", "flat", "grouped", "stacked")


def measure(variant: str, length: int, topology: str, batch: int, hlo: Path | None) -> dict:
    import jax

    from flaxsst.aot import _batch, _stacked, model_config_of
    from flaxsst.model import init_params
    from flaxsst.steps import create_train_state
    from flaxsst.trainer import build_steps

    config = load_train_config(RECIPE, ["model.init=", "model.dtype=bfloat16", f"train.param_layout={variant}",
                                        f"train.global_batch_size={batch}", f"data.max_seq_length={length}",
                                        "data.length_buckets=[]"])
    slice_ = parse_slice(topology)
    devices = topology_devices(slice_)
    n = len(devices)
    model_config = model_config_of(config)
    params = jax.eval_shape(lambda: init_params(model_config, 0))
    steps = build_steps(config, model_config, params, total_steps=6315, devices=devices)
    state = jax.eval_shape(lambda p: create_train_state(steps.layout.pack(p), steps.optimizer, 0), params)
    record = compile_program("train", steps.train, (_stacked(state, n), _batch(n, batch // n, length)), slice_,
                             length, batch // n, hlo / variant if hlo else None)
    return {"what": "kernels_per_train_step", "variant": variant, "batch": batch, "dtype": "bfloat16", **record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hlo", type=Path, help="write each compiled program's HLO under DIR/VARIANT/")
    args = parser.parse_args()
    import jax

    print(json.dumps({"jax": jax.__version__, "libtpu": _libtpu_version(), "topology": args.topology}), flush=True)
    for length in args.lengths:
        for variant in args.variants:
            print(json.dumps(measure(variant, length, args.topology, args.batch, args.hlo)), flush=True)


def _libtpu_version() -> str:
    from importlib.metadata import version

    return version("libtpu")


if __name__ == "__main__":
    main()
