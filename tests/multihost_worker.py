"""One process of a two-process run: ``python -m tests.multihost_worker PROCESS_ID PORT OUT_DIR [train]``.

Each process has 2 CPU devices and joins through ``jax.distributed``. Without ``train`` it reads
its own half of a global batch (``process_slice``) and runs one train step over all 4 devices; with
``train`` it runs the whole ``Trainer`` on conf/tiny.yaml in the shared workdir OUT_DIR/run.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests.multihost_case import one_step  # noqa: E402


def main() -> None:
    process_id, port, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    if sys.argv[4:] == ["train"]:
        from tests.multihost_case import tiny_training_run

        result = tiny_training_run(os.path.join(out_dir, "run"))
        params, examples = result.params, result.eval_metrics["accuracy"]
    else:
        params, examples = one_step(jax.process_index(), jax.process_count())
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(os.path.join(out_dir, f"params-{process_id}.npz"), examples=examples, **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
