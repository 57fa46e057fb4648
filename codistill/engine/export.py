"""`codistill export RUN --peer I --to DIR`: one peer of a run as a Hugging Face folder.

The peer's newest checkpoint that loads (a finished or an interrupted run) becomes a folder
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load: the model's
`save_pretrained`, the tokenizer the run's data was tokenized with (a given folder's, or the BPE
trained for the corpus), and a README card naming the run, the method, the step and the peer's
bits per token on the test split at that step. Only `hf_causal_lm` peers export this way: their
weights are a `transformers` model's own.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from codistill.config import load_yaml
from codistill.engine.checkpoint import checkpoint_folders, newest_loadable, peer_file, registered_model
from codistill.engine.run import CONFIG_FILE
from codistill.errors import ConfigError
from codistill.models import create_model
from codistill.storage import RunStorage


def _bits_at(storage: RunStorage, peer: int, step: int) -> float | None:
    from codistill.records import RecordsError, read_records

    try:
        rows = read_records(storage).to_pylist()
    except RecordsError:
        return None
    found = [r.get("bits") for r in rows if r["split"] == "test" and r["peer"] == peer and r["step"] == step]
    return found[-1] if found and found[-1] is not None else None


def _tokenizer_of(config: dict, saw: dict) -> tuple[str | None, str]:
    """(where the run's tokenizer is, or None; why not): the run's data loaded again (its corpus
    and tokenizer are cached), and only when it is still the corpus the peer was trained on."""
    from codistill.config import load_config
    from codistill.data import load_data

    try:
        data = load_data(load_config(config).data)
    except ConfigError as err:  # data given from Python (`train(cfg, data=…)`) is not registered here
        return None, f"the run's data cannot be loaded here ({err}); save its tokenizer beside the model"
    if (data.fingerprint or {}).get("corpus_sha256") != saw.get("corpus_sha256"):
        return None, "the corpus changed since the run; save the run's tokenizer beside the model"
    return data.tokenizer, "the run's tokens were bytes"


def _new_or_empty_folder(to: str) -> Path:
    """The folder `--to` names, made now (so a path that cannot be a folder is one line before
    anything is written): a file there, a file on the way, or no permission is refused."""
    target = Path(os.path.expanduser(to))
    if target.exists() and not target.is_dir():
        raise ConfigError("--to", f"{to} is a file, not a folder; name a new or empty folder (nothing was written)")
    if target.is_dir() and any(target.iterdir()):
        raise ConfigError("--to", f"{to} holds files already; name a new or empty folder (nothing was written)")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        on_the_way = next((p for p in target.parents if p.exists()), None)
        why = (f"{on_the_way} is a file" if on_the_way is not None and not on_the_way.is_dir()
               else err.strerror or type(err).__name__)
        raise ConfigError("--to", f"{to} cannot be made a folder: {why}; name a folder that can be written "
                                  "(nothing was written)") from None
    return target


def export_peer(run_dir: str, peer: int, to: str) -> dict:
    """Write peer `peer` of the run at `run_dir` into the folder `to`; returns what the card says."""
    storage = RunStorage.at(run_dir)
    if not storage.exists(CONFIG_FILE):
        raise ConfigError("run_dir", f"{storage.uri} is not a codistill run (no {CONFIG_FILE})")
    config = load_yaml(storage.read_bytes(CONFIG_FILE).decode())
    peers = config.get("peers", [])
    if not 0 <= peer < len(peers):
        raise ConfigError("--peer", f"the run has {len(peers)} peers (0..{len(peers) - 1}), got {peer}")
    if peers[peer].get("model") != "hf_causal_lm":
        raise ConfigError("--peer", f"peer {peer} is model {peers[peer].get('model')!r}; export writes transformers "
                                    "folders of hf_causal_lm peers")
    target = _new_or_empty_folder(to)
    found = newest_loadable(storage, [f for f in checkpoint_folders(storage)
                                      if storage.exists(f"{f[1]}/{peer_file(peer)}")], [peer])
    if found is None:
        raise ConfigError("run_dir", f"{storage.uri} has no checkpoint of peer {peer} that loads yet")
    step, (state,) = found
    name, model_args, weights = registered_model(state)
    data = state.get("data") or {}
    tokenizer, why_not = _tokenizer_of(config, data)
    network = create_model(name, int(data["vocab_size"]), **model_args)
    network.load_state_dict(weights)
    network.model.save_pretrained(str(target))
    if tokenizer:
        from codistill.data.text import save_tokenizer

        save_tokenizer(tokenizer, target)
    card = {"run": config.get("name"), "method": config.get("method", {}).get("name"), "peer": peer, "step": step,
            "test_bits_per_token": _bits_at(storage, peer, step), "corpus_sha256": data.get("corpus_sha256"),
            "tokenizer": "included" if tokenizer else f"not included: {why_not}"}
    lines = [f"# {card['run']}, peer {peer}", "", "Trained with codistill. Load it with",
             f"`AutoModelForCausalLM.from_pretrained({str(target)!r})`.", ""]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in card.items()]
    (target / "README.md").write_text("\n".join(lines) + "\n")
    return card


def main(args: argparse.Namespace) -> int:
    card = export_peer(args.run_dir, args.peer, args.to)
    bits = card["test_bits_per_token"]
    print(f"wrote {args.to}: peer {card['peer']} of {card['run']} at step {card['step']}"
          + (f", {bits:.4f} bits per token on the test split" if bits is not None else ""))
    return 0
