"""A small GPT-style causal transformer for language-model peers (`input_kind: tokens`).

Token + learned position embeddings, pre-norm blocks (causal self-attention through
`scaled_dot_product_attention`, a 4× MLP with GELU), a final LayerNorm, and an output layer
tied to the token embedding (GPT-2's shape, without dropout). The logits come back as
(B·T, V), one row per position, so every loss and metric of a classifier applies per token.
Width, depth, heads and context length are `peers.<i>.model_args`."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from codistill.data.task import TOKENS
from codistill.models.registry import register_model


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, heads, t, w/heads)
        h = h + self.proj(attended.transpose(1, 2).reshape(b, t, w))
        return h + self.mlp(self.norm2(h))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, width: int = 128, depth: int = 2, heads: int = 4, context: int = 128):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.context = context
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, vocab_size, bias=False)
        self.output.weight = self.token.weight  # tied
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape
        if t > self.context:
            raise ValueError(f"a window of {t} tokens is longer than the model's context {self.context}")
        h = self.token(x) + self.position(torch.arange(t, device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.output(self.norm(h)).reshape(b * t, -1)


@register_model("gpt", input_kind=TOKENS, blocks=lambda model: list(model.blocks))
def gpt(num_classes: int, width: int = 128, depth: int = 2, heads: int = 4, context: int = 128) -> nn.Module:
    """A GPT-style causal transformer with a tied output layer (model_args: width, depth, heads, context)."""
    return GPT(num_classes, width, depth, heads, context)
