"""The data-parallel baseline as what it is: one peer on all the workers of a config's K peers.

Not a method and not a layout but the alternative K peers' workers have (Anil et al., 2018,
against whom codistillation is judged): ONE model trained on every worker of the group (K peers ×
each peer's workers), its batch the sum of the peers' batches. On Ray that is one Ray Train run
doing DDP over those workers; on the local runner one peer with that batch, the same arithmetic
in one process (the gradient of the mean over the global batch). It learns with the
cross-entropy alone (`independent`), with peer 0's model and optimizer; its learning rate is
the peers' scaled by the group size K (`DATA_PARALLEL_LR_RULE`). `codistill train --data-parallel`
trains it, and `codistill compare`'s `data_parallel` arm is it.
"""

from __future__ import annotations

import math

import yaml

from codistill.config.builder import load_config, to_dict
from codistill.config.schema import ExperimentConfig
from codistill.errors import ConfigError

DATA_PARALLEL_LR_RULE = {"adam": "sqrt", "adamw": "sqrt", "sgd": "linear"}
"""How the learning rate grows with the K-fold batch: √K for the adaptive optimizers (the
square-root rule: the gradient noise's scale falls as √K), K for SGD (the linear rule of Goyal
et al., 2017)."""


def data_parallel(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg`'s K peers' workers, batches and resources given to one model, peer 0's, trained with
    the cross-entropy alone. Every value not named here is `cfg`'s (its own or the schema's
    default); the result is validated as any config is."""
    peers = cfg.peers
    if len({(p.model, yaml.safe_dump(dict(p.model_args))) for p in peers}) > 1:
        raise ConfigError("peers", "data_parallel trains one model on all the workers: the peers must be one "
                                   f"model, got {', '.join(p.model for p in peers)}")
    k = len(peers)
    resources: dict[str, float] = {}
    for p in peers:
        for name, amount in (p.resources or cfg.ray.resources_per_peer or {}).items():
            resources[name] = resources.get(name, 0) + amount
    optimizer = peers[0].optimizer
    scale = math.sqrt(k) if DATA_PARALLEL_LR_RULE[optimizer.name] == "sqrt" else k
    data = to_dict(cfg)
    data.pop("tune", None)  # a train of its own; `compare --tune` searches around it
    data["method"] = {"name": "independent"}
    data["peers"] = [{**data["peers"][0], "workers": None, "resources": None,
                      "optimizer": {**data["peers"][0]["optimizer"], "lr": optimizer.lr * scale}}]
    data["data"]["batch_size"] = cfg.data.batch_size * k
    data["ray"].update(workers_per_peer=sum(cfg.workers_of(i) for i in range(k)), resources_per_peer=resources or None)
    return load_config(data)
