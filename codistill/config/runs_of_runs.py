"""The settings of runs of runs: a Ray Tune sweep (`tune:`) and the generations of
`codistill born-again` (`born_again:`), sections of the run configuration (`schema.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from codistill.config.method import MethodConfig, registered_with
from codistill.config.search_space import parse_distribution
from codistill.errors import check
from codistill.metrics import ACCURACY, BITS, Score


def objective_score(objective: str | None) -> Score:
    """The score a sweep's objective is in: bits per token (fewer is better) or accuracy."""
    return BITS if (objective or "").endswith("_bits") else ACCURACY


@dataclass(frozen=True, kw_only=True, slots=True)
class TuneSettings:
    space: dict[str, str] = field(default_factory=dict)
    """Config key path → distribution, e.g. `method.temperature: loguniform(1, 10)`,
    `peers.*.optimizer.lr: loguniform(1e-3, 1e-1)`, `method.weight: uniform(0, 1)`."""
    objective: Literal["best_accuracy", "mean_accuracy", "ensemble_accuracy", "member_mean_accuracy",
                       "best_bits", "mean_bits", "ensemble_bits", "member_mean_bits"] | None = None
    """What a trial is judged by, reported at every evaluation (so ASHA can stop it early): an
    accuracy (the most wins) or — a next-token task's score — bits per token (the fewest wins).
    member_mean_*: the mean over the group's members — peers, or one network's branches. None:
    the ensemble's figure in the task's score, ensemble_accuracy or (language models) ensemble_bits."""
    num_samples: int = 8
    """Trials to sample (with `grid(...)` values: repetitions of the grid)."""
    max_concurrent: int = 1
    """Trials running at once; each trial is a whole group of peers."""
    scheduler: Literal["asha", "fifo"] = "asha"
    search: Literal["random", "optuna"] = "random"
    grace_period: int = 1
    """ASHA: evaluations a trial always gets before it may be stopped."""
    reduction_factor: int = 2
    """ASHA: keep the top 1/reduction_factor at each rung."""
    backend: Literal["ray", "local"] = "ray"
    """How a trial runs its peers: ray = one Ray Train run per trial (a worker per peer, any
    node); local = the peers as threads inside the trial's own process (no Train start-up;
    the trial reserves a CPU per peer on one node)."""
    start_at_config: bool = False
    """The first trial runs the config's own values of the searched keys (the paper's setting,
    when the config is the paper's recipe), then `num_samples` − 1 sampled ones."""
    seeds_per_trial: int = 1
    """Each trial trains this many seeds (the config's seed, seed + 1, …) one after another and
    is judged by their mean: less selection noise, at that many times the cost. Above 1 the
    trial reports once, at its end (scheduler: fifo)."""

    @property
    def score(self) -> Score:
        """The score the objective is in, and so the direction a trial is judged in."""
        return objective_score(self.objective)

    def __post_init__(self):
        for key, text in self.space.items():
            parse_distribution(text, f"space.{key}")
        check(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        check(self.max_concurrent >= 1, "max_concurrent", f"must be >= 1, got {self.max_concurrent}")
        check(self.grace_period >= 1, "grace_period", f"must be >= 1, got {self.grace_period}")
        check(self.reduction_factor >= 2, "reduction_factor", f"must be >= 2, got {self.reduction_factor}")
        check(self.seeds_per_trial >= 1, "seeds_per_trial", f"must be >= 1, got {self.seeds_per_trial}")
        check(self.seeds_per_trial == 1 or self.scheduler == "fifo", "scheduler",
              "must be fifo with seeds_per_trial > 1 (a trial of several seeds reports once, at its end)")
        if self.search == "optuna":
            grids = [k for k, t in self.space.items() if t.strip().startswith("grid(")]
            check(not grids, f"space.{grids[0] if grids else ''}", "grid(...) cannot be used with search: optuna")


@dataclass(frozen=True, kw_only=True, slots=True)
class BornAgainSettings:
    """The generations of `codistill born-again` (Furlanello et al. 2018)."""

    generations: int = 3
    """Generations in all: the first trains with the run's own `method` and no teacher, each
    later one learns from the one before (same peers, same recipe, a new initialisation)."""
    method: MethodConfig | None = None
    """How generation k learns from generation k − 1 (None: `codistill born-again`'s default,
    KD at T = 1, α = 0.5)."""

    def __post_init__(self):
        check(self.generations >= 2, "generations", f"must be >= 2 (a teacher and a student), got {self.generations}")
        check(self.method is None or self.method.learns_from_teacher(), "method.name",
              f"method {self.method.name if self.method else ''!r} learns from no teacher; use one that does: "
              + ", ".join(registered_with("can_use_teacher")))
