"""`codistill export RUN --peer I --to DIR`: one peer of a run as a Hugging Face folder.

The peer's newest checkpoint that loads (a finished or an interrupted run) becomes a folder
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load: the model's
`save_pretrained`, the tokenizer the run's data was tokenized with (a given folder's, or the BPE
trained for the corpus: found through the checkpoint's data fingerprint, the corpus not loaded;
refused when its files changed since, left out and said when it is gone), and a README card naming the run, the method, the step and the peer's
bits per token on the test split at that step. What a model is written as is the model's own
capability, declared in its registry entry (`ModelEntry.export`; `hf_causal_lm`: `save_pretrained`):
a model without one is refused naming those that have it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from codistill.config import load_yaml
from codistill.engine.checkpoint import checkpoint_folders, newest_loadable, peer_file, registered_model
from codistill.engine.run import CONFIG_FILE
from codistill.data.task import Fingerprint
from codistill.data.text import tokenizer_hash
from codistill.errors import ConfigError
from codistill.metrics import BITS, Score, score_of
from codistill.models import MODELS, create_model
from codistill.storage import RunStorage


def _score_at(storage: RunStorage, peer: int, step: int) -> tuple[Score, float | None]:
    """(the score the run's test records carry, peer `peer`'s value of it at `step`, or None)."""
    from codistill.records import RecordsError, read_records

    try:
        rows = read_records(storage).to_pylist()
    except RecordsError:
        return BITS, None
    found = [r for r in rows if r["split"] == "test" and r["peer"] == peer and r["step"] == step]
    if not found:
        return BITS, None
    score = score_of(found[-1])
    return score, found[-1].get(score.name)


def _tokenizer_of(saw: Fingerprint) -> tuple[str | None, str]:
    """(where the run's tokenizer is, or None; why not), from the checkpoint's fingerprint alone —
    the corpus is not loaded. A tokenizer that is no longer what the run's ids were made with is
    refused: shipped beside the model, it would read its ids as other text."""
    place = saw.tokenizer_place
    if place is None:
        if saw.tokenizer == "bytes":
            return None, "the run's tokens were bytes"
        return None, "the checkpoint does not say where its tokenizer is (written before it did); save it beside the model"
    if not os.path.exists(place):
        return None, "gone"
    now = tokenizer_hash(place)
    if now != saw.tokenizer_sha256:
        raise ConfigError("run_dir", f"the tokenizer at {place} is now {now[:16]}, but the run's ids were made with "
                                     f"{(saw.tokenizer_sha256 or 'another')[:16]}: it changed since the run; nothing "
                                     "was written (put the run's tokenizer back, or save it beside the model yourself)")
    return place, ""


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
    model = peers[peer].get("model")
    if model not in MODELS or MODELS[model].export is None:
        exportable = ", ".join(n for n, entry in MODELS.items() if entry.export is not None)
        raise ConfigError("--peer", f"peer {peer} is model {model!r}, which has no folder to export; models that "
                                    f"export: {exportable}")
    target = _new_or_empty_folder(to)
    found = newest_loadable(storage, [f for f in checkpoint_folders(storage)
                                      if storage.exists(f"{f[1]}/{peer_file(peer)}")], [peer])
    if found is None:
        raise ConfigError("run_dir", f"{storage.uri} has no checkpoint of peer {peer} that loads yet")
    step, (state,) = found
    name, model_args, weights = registered_model(state)
    if not state.get("data"):
        raise ConfigError("run_dir", f"peer {peer}'s checkpoint holds no data fingerprint: it was not trained on a "
                                     "text corpus")
    saw = Fingerprint.from_dict(state["data"])
    tokenizer, why_not = _tokenizer_of(saw)
    network = create_model(name, saw.vocab_size, **model_args)
    network.load_state_dict(weights)
    MODELS[name].export(network, str(target))
    if tokenizer:
        from codistill.data.text import save_tokenizer

        save_tokenizer(tokenizer, target)
    score, value = _score_at(storage, peer, step)
    card = {"run": config.get("name"), "method": config.get("method", {}).get("name"), "peer": peer, "step": step,
            f"test_{score.label.replace(' ', '_')}": value, "corpus_sha256": saw.corpus_sha256,
            "tokenizer_sha256": saw.tokenizer_sha256, "tokenizer": "included" if tokenizer else f"not included ({why_not})"}
    lines = [f"# {card['run']}, peer {peer}", "", "Trained with codistill. Load it with",
             f"`AutoModelForCausalLM.from_pretrained({str(target)!r})`.", ""]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in card.items()]
    (target / "README.md").write_text("\n".join(lines) + "\n")
    return card


def main(args: argparse.Namespace) -> int:
    card = export_peer(args.run_dir, args.peer, args.to)
    key = next(k for k in card if k.startswith("test_"))  # the task's score: test_bits_per_token
    value = card[key]
    print(f"wrote {args.to}: peer {card['peer']} of {card['run']} at step {card['step']}"
          + (f", {value:.4f} {key[len('test_'):].replace('_', ' ')} on the test split" if value is not None else "")
          + f"; tokenizer: {card['tokenizer']}")
    return 0
