"""A Hugging Face `transformers` causal language model as a peer (`model: hf_causal_lm`).

    model_args: {path: DIR}                                  # from_pretrained, local files only
    model_args: {config: {model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}}  # random init

The model's logits come back as (B·T, V) like every token model's here, so every loss and
metric applies per position. V is the run's vocabulary (the data's tokenizer): a model whose
output layer is padded beyond it (common: 32,000 tokens in a 32,064-row matrix) has its
logits cut to the tokenizer's tokens — the padded rows are tokens no text ever holds — and a
model with fewer rows than the tokenizer is refused, naming both sizes. Peers therefore
always share one vocabulary: distilling across different tokenizers (token alignment) is out
of scope.

Windows are packed without padding inside a window; the last window of a split is padded on
the right, and a causal model's logits at real positions do not depend on the padding after
them, so no attention mask is passed. The padded positions carry label −100, which every loss
and metric leaves out (the engine drops those rows before the method sees them).

`transformers` is imported only when such a model is built (installing: the `hf` extra).
The wrapped model is `.model`: `codistill export` saves it with `save_pretrained`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from codistill.errors import ConfigError, first_line
from codistill.models.registry import register_model


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("model", "hf_causal_lm needs the `transformers` package: pip install 'codistill[hf]'") from None
    return transformers


class CausalLM(nn.Module):
    """A `transformers` causal LM whose forward is token ids (B, T) → logits (B·T, vocab)."""

    def __init__(self, model: nn.Module, vocab: int):
        super().__init__()
        self.model = model
        self.vocab = vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=x, use_cache=False).logits
        return logits[..., :self.vocab].reshape(-1, self.vocab)


def check_args(path: str | None = None, config: dict | None = None) -> str | None:
    """What is wrong with hf_causal_lm's model_args before anything is built (None: nothing)."""
    if (path is None) == (config is None):
        return "give exactly one of `path` (a local model folder) and `config` (e.g. {model_type: llama, ...})"
    if path is not None and not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
        return f"{path!r} is not a model folder (no config.json): give a folder save_pretrained wrote"
    if config is not None and "model_type" not in config:
        return "`config` needs a `model_type` (e.g. llama, gpt2, qwen2) and that model's settings"
    return None


def load_pretrained(path: str) -> nn.Module:
    transformers = _transformers()
    try:
        # fp32 master weights whatever the folder's dtype; the run's precision is the forward
        # pass's compute dtype (engine/precision.py).
        return transformers.AutoModelForCausalLM.from_pretrained(os.path.expanduser(path), local_files_only=True,
                                                                 dtype=torch.float32)
    except ImportError as err:  # a model whose code needs a package that is not installed
        raise ConfigError("model_args.path", f"{path}: {first_line(err, 200)}") from None


def _vocabulary(where: str) -> dict[str, int]:
    """The token → id map of a tokenizer folder or a `tokenizers` JSON file."""
    if os.path.isdir(where):
        return _transformers().AutoTokenizer.from_pretrained(where, local_files_only=True).get_vocab()
    from tokenizers import Tokenizer

    return Tokenizer.from_file(where).get_vocab()


def check_tokenizer(model_args: dict, ours: str | None) -> str | None:
    """A pretrained folder that brings a tokenizer must bring the run's (`ours`: its folder or
    file): the same tokens with the same ids. Two vocabularies of one size would pass every
    shape check and teach nonsense."""
    path = model_args.get("path")
    if not path or not ours:
        return None
    folder = os.path.expanduser(path)
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None  # a model folder without a tokenizer: its vocabulary size is checked when it is built
    theirs, mine = _vocabulary(folder), _vocabulary(ours)
    if theirs != mine:
        return (f"the tokenizer in {path} ({len(theirs)} tokens) is not the run's tokenizer ({ours}, {len(mine)} "
                f"tokens): peers and data must share one tokenizer (cross-tokenizer distillation is not supported); "
                f"set data.tokenizer: {{path: {path}}} to tokenize with the model's")
    return None


@register_model("hf_causal_lm", input_kind="tokens", check=check_args, check_tokenizer=check_tokenizer,
                loads_weights=lambda args: args.get("path") is not None)
def hf_causal_lm(num_classes: int, path: str | None = None, config: dict | None = None) -> nn.Module:
    """A Hugging Face transformers causal LM: a local folder (`path`) or a config to initialise (`config`)."""
    problem = check_args(path, config)
    if problem:
        raise ConfigError("model_args", problem)
    transformers = _transformers()
    if path is not None:
        model = load_pretrained(path)
    else:
        settings = dict(config)
        vocab = settings.setdefault("vocab_size", num_classes)
        if vocab < num_classes:
            raise ConfigError("model_args.config.vocab_size", f"is {vocab}, but the tokenizer has {num_classes} tokens")
        kind = settings.pop("model_type")
        try:
            model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(kind, **settings))
        # A package the model's code needs is not installed, or the model_type is unknown (that
        # message lists every known one: cut).
        except (ImportError, ValueError, KeyError) as err:
            raise ConfigError("model_args.config", f"{kind}: {first_line(err, 200)}") from None
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < num_classes:
        raise ConfigError("model_args", f"the model predicts {rows} tokens but the tokenizer has {num_classes}: peers "
                          "and the data must share one vocabulary (cross-tokenizer distillation is not supported)")
    return CausalLM(model, num_classes)
