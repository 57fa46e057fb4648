"""Data sets (a registry) and the batch schedule every peer shares."""

from codistill.data.datasets import DATASETS, ArrayDataset, DatasetEntry, load_data, load_dataset, register_dataset
from codistill.data import hf_text, loaders, text  # noqa: F401  (register the data sets codistill brings)
from codistill.data.schedule import BatchSchedule

__all__ = ["DATASETS", "ArrayDataset", "DatasetEntry", "BatchSchedule", "load_data", "load_dataset",
           "register_dataset"]
