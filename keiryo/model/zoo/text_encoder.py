"""BERT-style text encoder: token ids + attention mask in; class logits or a sentence embedding out.

``forward(input_ids, attention_mask)`` (int64, shape (batch, seq)). Attention is written out
(q/k/v projections, additive mask) so it exports to plain MatMul/Softmax ONNX graphs that
onnxruntime's dynamic and static int8 quantize, and so heads and FFN width can be pruned.
With ``num_classes`` the model classifies (``pooling`` of the final states -> Linear); without
(``embedding: true``) it returns the pooled embedding.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from keiryo.config import KeiryoConfig
from keiryo.model.zoo import register_zoo


class TextEncoderOptions(KeiryoConfig):
    vocab: int = Field(1000, ge=8, description="vocabulary size (token ids 0..vocab-1; 0 is padding)")
    max_len: int = Field(128, ge=4, description="longest sequence the position table covers")
    dim: int = Field(128, ge=8)
    heads: int = Field(4, ge=1)
    layers: int = Field(2, ge=1)
    ffn: int = Field(256, ge=8)
    pooling: Literal["cls", "mean"] = "mean"
    embedding: bool = Field(False, description="return the pooled embedding instead of class logits")
    dropout: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> TextEncoderOptions:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self


class MaskedSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.num_heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t(x).reshape(b, n, self.num_heads, -1).transpose(1, 2) for t in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1])) + bias
        attn = F.dropout(attn.softmax(dim=-1), self.dropout, self.training)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class TextBlock(nn.Module):
    """Post-norm encoder block (as in BERT)."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attn = MaskedSelfAttention(dim, heads, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x, bias)))
        return self.norm2(x + self.drop(self.ffn(x)))


class TextEncoder(nn.Module):
    def __init__(self, num_classes: int | None, opts: TextEncoderOptions):
        super().__init__()
        self.tokens = nn.Embedding(opts.vocab, opts.dim)
        self.positions = nn.Embedding(opts.max_len, opts.dim)
        self.norm = nn.LayerNorm(opts.dim)
        self.blocks = nn.ModuleList(TextBlock(opts.dim, opts.heads, opts.ffn, opts.dropout) for _ in range(opts.layers))
        self.pooling = opts.pooling
        self.head = None if opts.embedding or not num_classes else nn.Linear(opts.dim, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        pos = torch.arange(n, device=input_ids.device).unsqueeze(0)
        x = self.norm(self.tokens(input_ids) + self.positions(pos))
        keep = attention_mask.to(x.dtype)
        bias = ((1.0 - keep) * -1e4)[:, None, None, :]
        for block in self.blocks:
            x = block(x, bias)
        if self.pooling == "cls":
            pooled = x[:, 0]
        else:
            pooled = (x * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True).clamp_min(1.0)
        return pooled if self.head is None else self.head(pooled)


@register_zoo(
    "text_encoder",
    TextEncoderOptions,
    (1,),
    "BERT-style encoder: (input_ids, attention_mask) -> logits or embedding",
    needs_outputs=False,
)
def text_encoder(input_shape: tuple[int, ...], num_classes: int | None, opts: TextEncoderOptions) -> nn.Module:
    if input_shape[0] > opts.max_len:
        raise ValueError(f"sequences of {input_shape[0]} tokens exceed max_len={opts.max_len}")
    return TextEncoder(num_classes, opts)
