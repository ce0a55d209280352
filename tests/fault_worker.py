"""``python -m tests.fault_worker PAUSE -- TRAIN_ARGS...``: ``train.py TRAIN_ARGS`` with a pause
inside a checkpoint save, so a test can SIGKILL the process at a known moment of the save.

PAUSE is ``none`` or ``PHASE:N:MARKER``: at the N-th save (counting from 1) the process stops at
PHASE, writes the file MARKER and sleeps until it is killed. Phases, in the order a save passes them:

- ``state``: the partial folder exists, orbax has not written the state yet
- ``meta``: the state is written, meta.json and the manifest are not
- ``commit``: the manifest is written, the folder is not yet renamed into place
- ``prune``: the checkpoint is committed, older ones are not yet pruned
- ``disk-full``: no pause; the N-th save's state write fails with ENOSPC, as on a full disk
"""

import os
import runpy
import sys
import time
from pathlib import Path


def _install(phase: str, n: int, marker: Path) -> None:
    import orbax.checkpoint as ocp

    from flaxsst import checkpoints

    count = {"saves": 0}

    def pause_here(name: str) -> None:
        if phase == name and count["saves"] == n:
            marker.write_text(name)
            while True:
                time.sleep(1)

    original_save = ocp.Checkpointer.save

    def checkpointer_save(self, directory, *args, **kwargs):
        count["saves"] += 1
        pause_here("state")
        if phase == "disk-full" and count["saves"] == n:
            raise ValueError(f'RESOURCE_EXHAUSTED: Failed writing "{directory}": No space left on device [os_error_code=28]')
        result = original_save(self, directory, *args, **kwargs)
        pause_here("meta")
        return result

    original_manifest = checkpoints.write_manifest

    def write_manifest(folder):
        original_manifest(folder)
        pause_here("commit")

    original_prune = checkpoints.Checkpoints._prune

    def prune(self, protect):
        pause_here("prune")
        return original_prune(self, protect)

    ocp.Checkpointer.save = checkpointer_save
    checkpoints.write_manifest = write_manifest
    checkpoints.Checkpoints._prune = prune


def main() -> None:
    pause, separator, *train_args = sys.argv[1:]
    assert separator == "--", sys.argv
    if pause != "none":
        phase, n, marker = pause.split(":", 2)
        _install(phase, int(n), Path(marker))
    root = Path(__file__).resolve().parents[1]
    sys.argv = ["train.py", *train_args]
    os.chdir(root)
    runpy.run_path(str(root / "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
