"""Your own model and data set, defined in this file, trained with DML on the local runner and on
Ray — with identical results.

    python examples/own_model.py [--storage runs/own_model] [--steps 300]

Nothing to do for Ray: what this script registers (even here, in __main__) travels with the run
to every Ray Train worker. From the CLI, name the module that registers them instead:
`codistill train my.yaml --import mypkg.models` (or `imports: [mypkg.models]` in the config);
on a multi-node cluster that module must be importable on every node (installed there, or
shipped with `ray job submit --working-dir .`).
"""

import argparse
import math

import torch
from torch import nn

from codistill import ArrayDataset, load_config, register_dataset, register_model, train


@register_model("my_tiny_mlp", input_kind="sequence")
def my_tiny_mlp(num_classes: int) -> nn.Module:
    # Any nn.Module that maps a batch to [batch, num_classes] logits can be a peer.
    return nn.Sequential(nn.Flatten(), nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, num_classes))


def waves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes of noisy waves (sine, square, sawtooth, flat), 40 samples each, random phase."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    t = torch.linspace(0, 4 * math.pi, 40).unsqueeze(0) + 2 * math.pi * torch.rand(n, 1, generator=g)
    shapes = torch.stack([t.sin(), t.sin().sign(), (t % (2 * math.pi)) / math.pi - 1, torch.zeros_like(t)], 1)
    x = shapes[torch.arange(n), y] + 0.8 * torch.randn(n, 40, generator=g)
    return x.unsqueeze(1), y


@register_dataset("my_waves", input_kind="sequence", num_classes=4, train_examples=1600)
def my_waves(root, augment, download) -> ArrayDataset:
    (x, y), (x_test, y_test) = waves(1600, seed=1), waves(400, seed=2)
    return ArrayDataset(x, y, x_test, y_test, num_classes=4, input_kind="sequence")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", default="runs/own_model")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    config = {"method": {"name": "dml", "temperature": 2.0},
              "peers": [{"model": "my_tiny_mlp"}, {"model": "my_tiny_mlp"}],
              "data": {"name": "my_waves", "batch_size": 50},
              "train": {"steps": args.steps, "eval_every": 100, "checkpoint_every": 100},
              "ray": {"storage_path": args.storage}}
    local = train(load_config({**config, "name": "own-local"}), backend="local")
    on_ray = train(load_config({**config, "name": "own-ray"}), backend="ray")
    print(local.summary)
    same = local.final["peer_accuracy"] == on_ray.final["peer_accuracy"] and \
        local.final["ensemble_accuracy"] == on_ray.final["ensemble_accuracy"]
    print(f"local {local.final['peer_accuracy']}, ray {on_ray.final['peer_accuracy']}: identical: {same}")


if __name__ == "__main__":
    main()
