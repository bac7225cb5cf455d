"""A user's own BERT-style sentence encoder, as a keiryo model factory (``bench/models/minilm.py:build``).

MiniLM-L6 shape (vocab 30522, hidden 384, 6 layers, 12 heads, FFN 1536): about 22.7 M parameters.
``forward(input_ids, attention_mask)`` returns the mean-pooled sentence embedding. Written with
plain torch modules, the way a user's model would be; keiryo knows nothing about it but its inputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads) + bias
        return self.out((att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.attn = SelfAttention(dim, heads)
        self.ln1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.ln2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x, bias))
        return self.ln2(x + self.ffn(x))


class MiniLM(nn.Module):
    def __init__(self, vocab: int = 30522, dim: int = 384, layers: int = 6, heads: int = 12, ffn: int = 1536, max_len: int = 512):
        super().__init__()
        self.word = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.ln = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(Layer(dim, heads, ffn) for _ in range(layers))
        for m in self.modules():  # BERT's initialisation
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        x = self.ln(self.word(input_ids) + self.pos(torch.arange(n, device=input_ids.device))[None])
        keep = attention_mask.to(x.dtype)
        bias = ((1.0 - keep) * -1e4)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        return (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1.0)


def build(vocab: int = 30522, dim: int = 384, layers: int = 6, heads: int = 12, ffn: int = 1536) -> nn.Module:
    return MiniLM(vocab, dim, layers, heads, ffn)
