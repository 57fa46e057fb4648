"""Deep mutual learning from Python: load a config, change it, train on Ray, read the records.

    python examples/dml_python_api.py
"""

import os

import ray

from codistill import load_config, train

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "dml_mnist1d.yaml")
cfg = load_config(CONFIG, [
    "name=api-example",
    "train.steps=1000",
    "method.temperature=2",
    "peers.1.model=mnist1d_mlp",  # peers may differ in architecture
])

ray.init(address="local", include_dashboard=False, log_to_driver=False)
result = train(cfg, backend="ray", on_progress=lambda step, m: print(f"step {step}", m.get("ensemble_accuracy", "")))
print(result.summary)

# One Parquet table per run: every step of every peer, and every evaluation.
table = result.records
test_rows = [r for r in table.to_pylist() if r["split"] == "test"]
print(f"{table.num_rows} records; last evaluation: {test_rows[-1]}")
print(f"plot written to {result.plot_path}")
