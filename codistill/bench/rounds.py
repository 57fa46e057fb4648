"""`codistill bench rounds`: one weights round of a ~50M-parameter Hugging Face Llama (fp32, ~200 MB)
through the object store — whole, and split into M pieces as the ranks of a sharded peer would
publish it — and as a snapshot on the run's storage (the lasting board's path for rounds beyond
`exchange.round_board_mb`), each against a bare `ray.put` + `ray.get` of the same tensors on
the same machine: ratios are medians of paired repeats with a 95% bootstrap interval."""

from __future__ import annotations

import argparse

from codistill.bench.common import latency_row, paired_ratio, ratio_text, write_json

# ~50M parameters: the size issue 42 measures sharding at (embeddings 2 × 16.4M, 8 blocks of 3.1M).
LLAMA_50M = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376,
             "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
             "max_position_embeddings": 512, "tie_word_embeddings": False}


def llama_state(config: dict) -> dict:
    from codistill.models import create_model

    return create_model("hf_causal_lm", config["vocab_size"], config=config).state_dict()


def main(args: argparse.Namespace) -> int:
    from codistill.engine.ray.connect import connect_ray, disconnect_ray
    from codistill.exchange.base import payload_bytes
    from codistill.exchange.round_costs import time_weights_round

    state = llama_state(LLAMA_50M)
    params = sum(t.numel() for t in state.values())
    size = payload_bytes(state)
    pieces = [2, 4]
    print(f"# codistill bench rounds — a weights round of an HF Llama of {params / 1e6:.1f}M parameters "
          f"({size / 2**20:.0f} MiB fp32), {args.rounds} paired repeats, local Ray", flush=True)
    connect_ray(None)
    try:
        times = time_weights_round(state, pieces, args.rounds)
    finally:
        disconnect_ray()
    figures = {"parameters": params, "bytes": size, "latency": {n: latency_row(t) for n, t in times.items()},
               "ratio_to_bare": {n: paired_ratio(times["bare"], t) for n, t in times.items() if n != "bare"}}
    labels = {"bare": "bare ray.put + ray.get", "whole": "round board, whole state dict",
              **{f"pieces_{m}": f"round board, {m} pieces (shard by shard)" for m in pieces},
              "snapshot": "snapshot on storage (write + read)"}
    print(f"\n{'one round':<40}    p50         p90     ÷ bare [95% CI]")
    for name, row in figures["latency"].items():
        ratio = ratio_text(figures["ratio_to_bare"][name]) if name != "bare" else ""
        print(f"  {labels[name]:<40}{row['p50_ms']:>7.0f} ms{row['p90_ms']:>8.0f} ms   {ratio}")
    print(f"\nbare put + get moves {size / 2**20 / (figures['latency']['bare']['p50_ms'] / 1000):,.0f} MiB/s")
    write_json(args.out, figures)
    return 0
