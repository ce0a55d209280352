"""Azure ML scoring script (deployment.yml's ``scoring_script``): ``flaxsst.serve.azureml_score``.

Azure uploads the repository as the deployment's code folder; this file puts that folder on
``sys.path`` (when flaxsst is not installed in the environment) and re-exports ``init`` and ``run``.
"""

import sys
from pathlib import Path

try:
    import flaxsst  # noqa: F401  (installed in the environment)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flaxsst.serve.azureml_score import init, run

__all__ = ["init", "run"]
