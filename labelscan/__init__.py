"""labelscan: find likely mislabeled training examples of a trained ReLU network.

The library stands without the CLI: ``summarize`` makes the LAFTR summary in one pass over
the training data, ``fsd`` estimates the function space distance from it, and
``self_influence`` scores every example by its proximal self-influence.
"""

__version__ = "0.1.0"

from labelscan.data import Preprocessing, open_dataset  # noqa: E402
from labelscan.influence.scoring import InfluenceSettings  # noqa: E402
from labelscan.laftr.summary import LaftrSummary  # noqa: E402
from labelscan.model import load_model  # noqa: E402
from labelscan.pipeline import fsd, self_influence, summarize  # noqa: E402

__all__ = [
    "InfluenceSettings", "LaftrSummary", "Preprocessing", "__version__", "fsd", "load_model",
    "open_dataset", "self_influence", "summarize",
]
