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
them, so no attention mask is passed. A model that is not causal is refused when it is built
(`check_causal`): `AutoModelForCausalLM` also builds encoders (BERT's `BertLMHeadModel`, RoBERTa,
ELECTRA, …) whose attention is bidirectional unless `is_decoder: true` — each position would see
the next token, its own label — and a folder whose model type has no causal-LM class at all
(DistilBERT, T5) is refused before transformers lists every model type it knows. The padded positions carry label −100, which every loss
and metric leaves out (the engine drops those rows before the method sees them).

`transformers` is imported only when such a model is built (installing: the `hf` extra).
The wrapped model is `.model`: `codistill export` saves it with `save_pretrained`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from codistill.data.task import TOKENS
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
        config = getattr(model, "config", None)
        self.positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.positions and x.shape[-1] > self.positions:  # else "index out of range in self", deep inside
            raise ValueError(f"the model has {self.positions} positions, fewer than the {x.shape[-1]} tokens of a "
                             f"window (data.context={x.shape[-1]}): lower data.context or give the model more positions")
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


def check_has_causal_head(config, key: str, folder: str | None = None) -> None:
    """Refuse a model type no `AutoModelForCausalLM` class takes (DistilBERT, T5, …): transformers'
    own error lists every model type it knows, hundreds of them."""
    transformers = _transformers()
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        what = f"{folder} holds a {config.model_type!r} model, which has" if folder else f"{config.model_type!r} has"
        raise ConfigError(key, f"{what} no causal-LM head in transformers (no AutoModelForCausalLM class): give a "
                          "decoder such as llama, gpt2 or qwen2")


def _sees_later_tokens(model: nn.Module, vocab: int, length: int = 6) -> bool:
    """Whether changing the last token of a short random sequence changes an earlier position's
    logits: what no causal model does. Two forward passes of a few tokens, in eval mode (no
    dropout), on a generator of its own (the run's random numbers are untouched)."""
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % vocab
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            before, after = (model(input_ids=t.to(device), use_cache=False).logits[0, :-1].float() for t in (ids, changed))
    finally:
        model.train(training)
    return not torch.allclose(before, after, rtol=1e-4, atol=1e-5)


def check_causal(model: nn.Module, vocab: int, key: str, folder: str | None = None) -> None:
    """Refuse a model whose positions see the tokens after them: an encoder architecture (it has a
    masked-LM head) whose config is not a decoder (`is_decoder` false), or any model the probe
    `_sees_later_tokens` catches. Trained as a next-token model, such a model reads its labels."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    config = model.config
    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if encoder or _sees_later_tokens(model, vocab):
        why = ("an encoder whose config is not a decoder (is_decoder: false)" if encoder else
               "its logits at a position change with a later token")
        where = f"{folder} ({config.model_type})" if folder else f"the {config.model_type} model of model_args.config"
        raise ConfigError(key, f"{where} is not a causal language model: {why}, so each position "
                          "would see the next token, its own label; give a decoder (llama, gpt2, qwen2, …) or set "
                          "is_decoder: true in its config")


def load_pretrained(path: str) -> nn.Module:
    transformers = _transformers()
    folder = os.path.expanduser(path)
    try:
        check_has_causal_head(transformers.AutoConfig.from_pretrained(folder, local_files_only=True), "model_args.path",
                              path)
        # fp32 master weights whatever the folder's dtype; the run's precision is the forward
        # pass's compute dtype (engine/precision.py).
        return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
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


def save_pretrained(network: nn.Module, folder: str) -> None:
    """The peer as the folder `AutoModelForCausalLM.from_pretrained` loads: its weights are the
    transformers model's own, so transformers writes them."""
    network.model.save_pretrained(folder)


def decoder_layers(network: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a `CausalLM`: the modules of the classes transformers itself
    declares must not be split across devices (`_no_split_modules`: LlamaDecoderLayer, GPT2Block, …)."""
    names = set(getattr(network.model, "_no_split_modules", None) or ())
    return [m for m in network.model.modules() if type(m).__name__ in names]


@register_model("hf_causal_lm", input_kind=TOKENS, check=check_args, check_tokenizer=check_tokenizer,
                loads_weights=lambda args: args.get("path") is not None, export=save_pretrained,
                blocks=decoder_layers)
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
            model_config = transformers.AutoConfig.for_model(kind, **settings)
            check_has_causal_head(model_config, "model_args.config")
            model = transformers.AutoModelForCausalLM.from_config(model_config)
        except ConfigError:
            raise
        # A package the model's code needs is not installed, or the model_type is unknown (that
        # message lists every known one: cut).
        except (ImportError, ValueError, KeyError) as err:
            raise ConfigError("model_args.config", f"{kind}: {first_line(err, 200)}") from None
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < num_classes:
        raise ConfigError("model_args", f"the model predicts {rows} tokens but the tokenizer has {num_classes}: peers "
                          "and the data must share one vocabulary (cross-tokenizer distillation is not supported)")
    check_causal(model, num_classes, "model_args", path)
    return CausalLM(model, num_classes)
