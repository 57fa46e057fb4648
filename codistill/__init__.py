"""codistill: distributed online distillation (DML, codistillation, ONE, KD and its family) on
Ray and PyTorch.

    from codistill import load_config, train
    result = train(load_config("configs/dml_mnist1d.yaml"), backend="ray")

Your own models, data sets and methods join the registries with `register_model`,
`register_dataset` and `register_method`."""

from codistill.config import ConfigError, ExperimentConfig, load_config
from codistill.data import ArrayDataset, register_dataset
from codistill.engine.run import RunResult, train
from codistill.methods import Method, MethodConfig, Needs, Signals, register_method
from codistill.models import register_model

__version__ = "0.1.0"

__all__ = ["ArrayDataset", "ConfigError", "ExperimentConfig", "Method", "MethodConfig", "Needs", "RunResult", "Signals",
           "load_config", "register_dataset", "register_method", "register_model", "train"]
