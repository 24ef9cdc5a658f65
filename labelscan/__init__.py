"""labelscan: find likely mislabeled training examples of a trained ReLU network.

The library stands without the CLI: ``summarize`` makes the LAFTR summary in one pass over
the training data, ``fsd`` estimates the function space distance from it, and
``self_influence`` scores every example by its proximal self-influence.

The names load on first use (PEP 562), so that importing the package stays cheap and the
command line can answer Ctrl-C cleanly even while torch is still loading.
"""

from importlib import import_module as _import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_HOMES = {
    "InfluenceSettings": "labelscan.influence.scoring",
    "LabelscanError": "labelscan.errors",
    "LaftrSummary": "labelscan.laftr.summary",
    "Preprocessing": "labelscan.data",
    "fsd": "labelscan.pipeline",
    "load_model": "labelscan.model",
    "open_dataset": "labelscan.data",
    "self_influence": "labelscan.pipeline",
    "summarize": "labelscan.pipeline",
}

__all__ = [
    "InfluenceSettings", "LabelscanError", "LaftrSummary", "Preprocessing", "__version__", "fsd",
    "load_model", "open_dataset", "self_influence", "summarize",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads these
    from labelscan.data import Preprocessing, open_dataset
    from labelscan.errors import LabelscanError
    from labelscan.influence.scoring import InfluenceSettings
    from labelscan.laftr.summary import LaftrSummary
    from labelscan.model import load_model
    from labelscan.pipeline import fsd, self_influence, summarize


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'labelscan' has no attribute {name!r}")
    value = getattr(_import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
