"""Data sets (a registry) and the batch schedule every peer shares."""

from codistill.data.datasets import DATASETS, ArrayDataset, DatasetEntry, load_data, load_dataset, register_dataset
from codistill.data import text  # noqa: F401  (registers stdlib and text)
from codistill.data.schedule import BatchSchedule

__all__ = ["DATASETS", "ArrayDataset", "DatasetEntry", "BatchSchedule", "load_data", "load_dataset",
           "register_dataset"]
