"""The `tracking:` section: which experiment trackers a run is sent to (TensorBoard, MLflow,
Weights & Biases), any combination, none by default (`docs/tracking.md`).

Only the settings are checked here. Whether a tracker's package is installed is asked where the
run's one tracker writer opens (`codistill/tracking/`), on the driver: the workers never import
a tracker, so a cluster's workers need neither the packages nor a route to the server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from codistill.errors import check


@dataclass(frozen=True, kw_only=True, slots=True)
class MlflowSettings:
    tracking_uri: str | None = None
    """The MLflow tracking server (`http://host:5000`) or store (`file:///…`, `sqlite:///…`).
    None: `MLFLOW_TRACKING_URI` from the environment, else MLflow's own default (`./mlruns`)."""
    experiment: str = "codistill"
    """The MLflow experiment the run is logged under (made when it does not exist)."""

    def __post_init__(self):
        check(self.tracking_uri is None or bool(self.tracking_uri.strip()), "tracking_uri",
              "must be a URI (http://host:5000, file:///path, sqlite:///path) or left out")
        check(bool(self.experiment.strip()), "experiment", "must be a non-empty experiment name")


@dataclass(frozen=True, kw_only=True, slots=True)
class WandbSettings:
    project: str = "codistill"
    """The W&B project the run is logged under."""
    entity: str | None = None
    """The W&B team or user (None: the logged-in user's default entity)."""
    mode: Literal["online", "offline"] = "online"
    """online: sent to the W&B server as the run trains; offline: written into the run folder
    (`wandb/`), to be sent later with `wandb sync`."""

    def __post_init__(self):
        check(bool(self.project.strip()), "project", "must be a non-empty project name")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrackingConfig:
    """Where a run's records are sent besides its own Parquet table. `mlflow: true` and
    `wandb: true` are short for their default settings (`{}`)."""

    tensorboard: bool = False
    """Write TensorBoard event files into the run folder (`tensorboard/`)."""
    mlflow: MlflowSettings | bool | None = None
    """Log to MLflow: `{tracking_uri, experiment}`, or true for the defaults."""
    wandb: WandbSettings | bool | None = None
    """Log to Weights & Biases: `{project, entity, mode}`, or true for the defaults."""

    def __post_init__(self):
        # true/false become the settings or None once, here: everyone after asks one type.
        for name, settings in (("mlflow", MlflowSettings), ("wandb", WandbSettings)):
            value = getattr(self, name)
            if isinstance(value, bool):
                object.__setattr__(self, name, settings() if value else None)

    @property
    def trackers(self) -> list[str]:
        """The trackers this run is sent to, in a fixed order."""
        return [name for name, on in (("tensorboard", self.tensorboard), ("mlflow", self.mlflow),
                                      ("wandb", self.wandb)) if on]
