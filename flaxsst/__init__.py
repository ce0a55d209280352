"""flaxsst: DistilBERT SST-2 sentiment in JAX/Flax, numerically identical to Hugging Face's PyTorch model."""

from flaxsst.runtime import quiet_tpu_runtime

__all__ = ["Classifier", "ModelConfig", "Tokenizer"]
__version__ = "0.1.0"

# Before anything imports jax's backends: libtpu (the tpu extra) on a machine without TPU chips starts quietly.
quiet_tpu_runtime()

_WHERE = {"Classifier": "flaxsst.classifier", "ModelConfig": "flaxsst.config", "Tokenizer": "flaxsst.tokenizer"}


def __getattr__(name: str):
    # Imported on first use: `import flaxsst` (and every command's start, its --help included) does not load jax.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'flaxsst' has no attribute {name!r}")
