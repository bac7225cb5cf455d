"""Small transformer encoder classifier.

Inputs shaped (C, H, W) are cut into patches (ViT-style); inputs shaped
(length, features) are embedded per step. Attention is written out (q/k/v
projections, ``num_heads``) so heads and FFN width can be pruned structurally.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from keiryo.config import KeiryoConfig
from keiryo.model.zoo import register_zoo


class TransformerOptions(KeiryoConfig):
    dim: int = Field(64, ge=8)
    heads: int = Field(4, ge=1)
    layers: int = Field(2, ge=1)
    ffn: int = Field(128, ge=8)
    patch: int = Field(2, ge=1, description="patch size for image inputs")
    dropout: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> TransformerOptions:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t(x).reshape(b, n, self.num_heads, -1).transpose(1, 2) for t in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        attn = F.dropout(attn.softmax(dim=-1), self.dropout, self.training)
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class TransformerClassifier(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, opts: TransformerOptions):
        super().__init__()
        self.image = len(input_shape) == 3
        if self.image:
            c, h, w = input_shape
            p = opts.patch
            if h % p or w % p:
                raise ValueError(f"image {h}x{w} is not divisible by patch size {p}")
            self.embed: nn.Module = nn.Conv2d(c, opts.dim, p, p)
            tokens = (h // p) * (w // p)
        else:
            tokens, feats = input_shape
            self.embed = nn.Linear(feats, opts.dim)
        self.pos = nn.Parameter(torch.zeros(1, tokens, opts.dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(opts.dim, opts.heads, opts.ffn, opts.dropout) for _ in range(opts.layers)])
        self.norm = nn.LayerNorm(opts.dim)
        self.head = nn.Linear(opts.dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.image:
            x = self.embed(x).flatten(2).transpose(1, 2)
        else:
            x = self.embed(x)
        x = self.blocks(x + self.pos)
        return self.head(self.norm(x).mean(dim=1))


@register_zoo("transformer", TransformerOptions, (2, 3), "small transformer encoder (patches or sequences)")
def transformer(input_shape: tuple[int, ...], num_classes: int, opts: TransformerOptions) -> nn.Module:
    return TransformerClassifier(input_shape, num_classes, opts)
