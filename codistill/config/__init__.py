"""The run configuration: plain YAML in, frozen dataclasses out (`schema.py`), built and
validated with key paths in every error (`builder.py`); `tune.space`'s grammar in
`search_space.py`; the data-parallel baseline as a transform of a config (`data_parallel.py`)."""

from codistill.config.builder import (apply_override, build_dataclass, dump_config, first_difference,
                                      load_config, set_path, shaped_like, to_dict)
from codistill.config.schema import (BornAgainSettings, DataConfig, ExchangeConfig, ExperimentConfig, OptimizerConfig, PeerSpec,
                                     RaySettings, TeacherConfig, TrainConfig, TuneSettings)
from codistill.config.strict_yaml import load_yaml
from codistill.config.tracking import MlflowSettings, TrackingConfig, WandbSettings
from codistill.config.data_parallel import data_parallel
from codistill.errors import ConfigError

__all__ = ["BornAgainSettings", "ConfigError", "DataConfig", "ExchangeConfig", "ExperimentConfig", "MlflowSettings",
           "OptimizerConfig", "PeerSpec", "RaySettings", "TeacherConfig", "TrackingConfig", "TrainConfig", "TuneSettings",
           "WandbSettings", "apply_override", "build_dataclass",
           "data_parallel", "dump_config", "first_difference", "load_config", "load_yaml", "set_path", "shaped_like",
           "to_dict"]
