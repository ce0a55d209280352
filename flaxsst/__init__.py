"""flaxsst: DistilBERT SST-2 sentiment in JAX/Flax, numerically identical to Hugging Face's PyTorch model."""

from flaxsst.config import ModelConfig
from flaxsst.predict import Classifier
from flaxsst.tokenizer import Tokenizer

__all__ = ["Classifier", "ModelConfig", "Tokenizer"]
__version__ = "0.1.0"
