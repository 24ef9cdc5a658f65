"""Training data in, validated tensors out: tables, npz, IDX and image folders as one Dataset."""

from labelscan.data.dataset import Batch, Dataset
from labelscan.data.formats import open_dataset
from labelscan.data.preprocessing import Preprocessing

__all__ = ["Batch", "Dataset", "Preprocessing", "open_dataset"]
