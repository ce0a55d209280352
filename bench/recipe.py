"""The full SST-2 recipe through the trainer, timed: compile, training (compile, eval and
checkpoint saves excluded), examples/s, and dev metrics. Prints one JSON line.

    python -m bench.recipe --config conf/sst2.yaml --workdir /tmp/r model.pretrained="" data.path=glue_data/SST-2
    python -m bench.recipe --config conf/sst2_minilm.yaml --workdir /tmp/m model.pretrained=/path/to/minilm data.path=...

``model.pretrained=""`` trains a random-init DistilBERT-base (the hub weights' shapes and
compute) for timing. The batches are the recipe's; config overrides change only
what the command line says (e.g. model.dtype, data.length_buckets).
"""

import argparse
import json
import logging
import time

import jax

from flaxsst import cli
from flaxsst.config import load_train_config
from flaxsst.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=cli.first_paragraph(__doc__))
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--tokenizer", help="tokenizer folder when model.pretrained is empty (random init)")
    parser.add_argument("--profile", metavar="DIR",
                        help="trace the training loop itself over --profile-steps and add a per-step summary "
                             "(device busy vs span: does the loop leave the device idle?)")
    parser.add_argument("--profile-steps", default="2000:2100", metavar="A:B", help="steps A..B to trace (default 2000:2100)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flaxsst").setLevel(logging.INFO)
    overrides = list(args.overrides)
    if args.tokenizer:
        overrides.append(f"model.tokenizer={args.tokenizer}")
    config = load_train_config(args.config, overrides)
    tracer = LoopTrace(args.profile, args.profile_steps) if args.profile else None
    start = time.perf_counter()
    result = Trainer(config, args.workdir, on_step=tracer).run()
    wall = time.perf_counter() - start
    examples = result.step * config.train.global_batch_size
    metrics = {k: v for k, v in (result.eval_metrics or {}).items()}
    print(json.dumps({
        "what": "flaxsst_recipe", "config": args.config, "overrides": args.overrides, "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(), "jax": jax.__version__, "steps": result.step,
        "compile_s": round(result.compile_seconds, 2), "train_s": round(result.train_seconds, 2),
        "examples_per_s": round(examples / result.train_seconds, 1), "wall_s": round(wall, 1), **metrics,
        **({"trace": tracer.summary()} if tracer else {}),
    }), flush=True)


class LoopTrace:
    """``Trainer(on_step=...)`` hook: a perfetto trace of the real loop from step A to step B."""

    def __init__(self, log_dir: str, steps: str):
        first, _, last = steps.partition(":")
        self.first, self.last, self.log_dir = int(first), int(last), log_dir
        if not 0 < self.first < self.last:
            raise SystemExit(f"--profile-steps {steps!r}: expected A:B with 0 < A < B")
        self.active = self.done = False

    def __call__(self, trainer, step: int) -> None:
        if step == self.first and not self.done:
            jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
            self.active = True
        elif step == self.last and self.active:
            jax.block_until_ready(trainer.state)
            jax.profiler.stop_trace()
            self.active, self.done = False, True

    def summary(self) -> dict:
        from bench.throughput import summarize_latest_trace

        if self.active:
            jax.profiler.stop_trace()
            return {"error": f"the run ended before step {self.last}"}
        if not self.done:
            return {"error": f"the run never reached step {self.first}"}
        return {"steps_traced": f"{self.first}:{self.last}", **summarize_latest_trace(self.log_dir, self.last - self.first)}


if __name__ == "__main__":
    main()
