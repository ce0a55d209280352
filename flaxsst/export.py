"""The end of a training run: its best checkpoint (by dev accuracy) evaluated once more and written
in Hugging Face layout, with its ``eval_results.json`` and the run's curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flaxsst.checkpoints import Checkpoints
from flaxsst.config import TrainConfig
from flaxsst.convert import save_pretrained
from flaxsst.errors import CheckpointError
from flaxsst.evaluation import describe_split, evaluate, write_results
from flaxsst.metrics import format_table
from flaxsst.parallel import replicate
from flaxsst.run_setup import RunSetup
from flaxsst.workdir import Workdir


def export_best(config: TrainConfig, setup: RunSetup, checkpoints: Checkpoints, state: Any, best_step: int,
                workdir: Workdir, is_main: bool) -> tuple[Path | None, dict]:
    """Checkpoint ``best_step`` (restored in the shape of ``state``, a host copy) evaluated on every
    process, then exported by process 0; -> (the export folder, or None off process 0, its metrics)."""
    problem = checkpoints.verify(best_step)
    if problem is not None:
        raise CheckpointError(f"the best checkpoint {checkpoints.path(best_step)} is damaged ({problem}); "
                              "it cannot be exported")
    restored, _ = checkpoints.restore(best_step, state)
    final = evaluate(setup.eval, replicate(restored.params), setup.eval_split, setup.model_config, config,
                     setup.tokenizer.pad_id)
    if not is_main:
        return None, final
    params = setup.steps.groups.unpack(restored.params)
    export_dir = save_pretrained(workdir.export, setup.model_config, params, tokenizer=setup.tokenizer)
    write_results(workdir.eval_results, final, setup.eval_split, step=best_step,
                  checkpoint=str(checkpoints.path(best_step)))
    print(f"{describe_split(setup.eval_split)}: the exported checkpoint, step {best_step} "
          f"(epoch {best_step / setup.steps_per_epoch:.2f}, the best dev accuracy of the run)")
    print(format_table(final, setup.model_config.id2label))
    from flaxsst.plot import plot_workdir

    plot_workdir(workdir.root)
    return export_dir, final
