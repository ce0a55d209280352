"""Kernels per train step and per-chip memory of the trainer's step and its candidates, from the
program libtpu compiles for a TPU slice (no TPU needed); and the seconds this CPU takes to compile
the recipe's programs. One JSON line per measurement.

    python -m bench.kernels                                     # v5e:2x2, batch 32, seq 64 and 128, every variant
    python -m bench.kernels --variants grouped tree --lengths 64 --hlo /tmp/hlo
    python -m bench.kernels --cpu-compile --pretrained ../shared/data/minilm-l6   # the MiniLM recipe's programs

DistilBERT-base shapes (768/6/12/3072, vocab 30522) in bfloat16 with the recipe's optimizer
(conf/sst2.yaml). The variants are ``bench.step_variants``': ``grouped`` (the trainer's, with the
TPU attention kernels), ``einsum`` (the trainer's with the einsum attention), ``tree`` (one array per
tensor, the default before the groups and the kernels), ``flat`` and ``stacked`` (the blocks
scanned). Kernels are counted as ``flaxsst.hlo`` defines them: a loop body once per trip.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu is loaded for the topology alone

import jax  # noqa: E402

from bench import step_variants  # noqa: E402
from flaxsst import cli  # noqa: E402
from flaxsst.aot import batch_shapes, compile_program, model_config_of, parse_slice, per_device, topology_devices  # noqa: E402
from flaxsst.config import load_train_config  # noqa: E402
from flaxsst.evaluation import global_eval_batch  # noqa: E402
from flaxsst.model import init_params, precision_of  # noqa: E402
from flaxsst.parallel import pmap_eval_step  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = ("grouped", "einsum", "tree", "flat", "stacked")


def _variant_steps(config, variant: str, devices: list | None):
    """The train and eval programs of ``variant`` for ``config`` (shapes only)."""
    model_config = model_config_of(config)
    precision = precision_of(config)
    params = jax.eval_shape(lambda: init_params(model_config, 0))
    step, state, _, layout = step_variants.build(variant, model_config, precision, params, config.train, 6315)
    evaluate = pmap_eval_step(step_variants.model_for(variant, model_config, precision), layout, devices)
    return step_variants.pmapped(step, devices), evaluate, state


def measure(variant: str, length: int, topology: str, batch: int, hlo: Path | None) -> dict:
    config = load_train_config(CONF / "sst2.yaml", ["model.pretrained=", "model.dtype=bfloat16",
                                                    f"train.global_batch_size={batch}", f"data.max_seq_length={length}",
                                                    "data.length_buckets=[]"])
    slice_ = parse_slice(topology)
    devices = topology_devices(slice_)
    n = len(devices)
    train, _, state = _variant_steps(config, variant, devices)
    record = compile_program("train", train, (per_device(state, n), batch_shapes(n, batch // n, length)), slice_,
                             length, batch // n, hlo / variant if hlo else None)
    return {"what": "kernels_per_train_step", "variant": variant, "batch": batch, "dtype": "bfloat16", **record}


def cpu_compile(variant: str, pretrained: str, repeat: int) -> list[dict]:
    """Every train and eval program of the MiniLM recipe (conf/sst2_minilm.yaml, float32, one CPU
    device as the trainer on this machine uses) compiled one after another with no compilation
    cache; the shapes come from ``pretrained``'s config.json, no weights are read."""
    config = load_train_config(CONF / "sst2_minilm.yaml", [f"model.pretrained={pretrained}", "model.dtype=float32"])
    devices = jax.local_devices()[:1]
    rows = []
    train, evaluate, state = _variant_steps(config, variant, devices)
    for length in sorted(set(config.data.length_buckets) | {config.data.max_seq_length}):
        for kind, fn, args in (
                ("train", train, (per_device(state, 1), batch_shapes(1, config.train.global_batch_size, length))),
                ("eval", evaluate, (per_device(state.params, 1),
                                    batch_shapes(1, global_eval_batch(config.train.eval_batch_size, 1), length)))):
            start = time.perf_counter()
            fn.lower(*args).compile()
            rows.append({"what": "cpu_compile_seconds", "variant": variant, "program": kind, "length": length,
                         "repeat": repeat, "seconds": round(time.perf_counter() - start, 2)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=cli.first_paragraph(__doc__))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hlo", type=Path, help="write each compiled program's HLO under DIR/VARIANT/")
    parser.add_argument("--cpu-compile", action="store_true", help="time the recipe's programs' compile on this CPU instead")
    parser.add_argument("--pretrained", default="", help="with --cpu-compile: the MiniLM folder whose config.json gives the shapes")
    parser.add_argument("--repeats", type=int, default=1, help="with --cpu-compile: rounds over the variants, interleaved")
    args = parser.parse_args()
    if args.cpu_compile:
        print(json.dumps({"jax": jax.__version__, "cpu": os.cpu_count()}), flush=True)
        for repeat in range(args.repeats):
            for variant in args.variants:
                cpu_compile(variant, args.pretrained, repeat)
        return
    from importlib.metadata import version

    print(json.dumps({"jax": jax.__version__, "libtpu": version("libtpu"), "topology": args.topology}), flush=True)
    for length in args.lengths:
        for variant in args.variants:
            print(json.dumps(measure(variant, length, args.topology, args.batch, args.hlo)), flush=True)


if __name__ == "__main__":
    main()
