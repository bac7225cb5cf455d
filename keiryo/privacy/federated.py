"""Compressed model updates for federated learning: top-k sparsified, int8-quantized deltas with error feedback.

A client sends ``delta = local weights - global weights`` for each float tensor. :class:`UpdateCodec`
adds the residual it kept from its previous rounds (error feedback, Seide et al. 2014 / Stich et al. 2018),
keeps the ``top_k`` fraction of entries by magnitude, quantizes their values to int8 with one symmetric
scale per tensor, and remembers what it did not send (the residual). On the wire a tensor is its int32
indices, int8 values and one float32 scale; :func:`payload_bytes` counts exactly those bytes, so the
bytes per round reported are the bytes a client uploads (fp32: 4 bytes per parameter).

The codec is plain numpy: the Flower ``ClientApp`` / ``ServerApp`` (``keiryo federate``, the
``federated`` extra) send :class:`Compressed` tensors as Flower ``ArrayRecord`` entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field

from keiryo.config import KeiryoConfig
from keiryo.errors import ConfigError


class CompressionConfig(KeiryoConfig):
    top_k: float = Field(0.1, gt=0, le=1, description="fraction of each tensor's entries sent (by magnitude)")
    bits: Literal[8, 32] = Field(8, description="value bits: 8 (int8) or 32 (float32, no quantization)")
    error_feedback: bool = Field(True, description="keep what was not sent and add it to the next round's delta")
    min_size: int = Field(256, ge=0, description="tensors smaller than this (biases, norms) are sent whole in fp32")


@dataclass(frozen=True)
class Compressed:
    """One tensor's update: ``values[i] * scale`` at flat ``indices[i]`` (all entries when ``indices`` is None)."""

    shape: tuple[int, ...]
    values: np.ndarray  # int8 (quantized) or float32
    scale: float
    indices: np.ndarray | None = None  # int32 flat positions

    @property
    def nbytes(self) -> int:
        idx = 0 if self.indices is None else self.indices.nbytes
        return int(self.values.nbytes + idx + 4)  # + the float32 scale

    def decode(self) -> np.ndarray:
        vals = self.values.astype(np.float32) * np.float32(self.scale)
        if self.indices is None:
            return vals.reshape(self.shape)
        out = np.zeros(int(np.prod(self.shape)), dtype=np.float32)
        out[self.indices] = vals
        return out.reshape(self.shape)


def _quantize(x: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
    if bits == 32:
        return x.astype(np.float32), 1.0
    peak = float(np.abs(x).max()) if x.size else 0.0
    scale = peak / 127.0 if peak > 0 else 1.0
    return np.clip(np.rint(x / scale), -127, 127).astype(np.int8), scale


@dataclass
class UpdateCodec:
    """A client's encoder: keeps the error-feedback residual between rounds (one codec per client)."""

    cfg: CompressionConfig = field(default_factory=CompressionConfig)
    residual: dict[str, np.ndarray] = field(default_factory=dict)

    def encode(self, deltas: dict[str, np.ndarray]) -> dict[str, Compressed]:
        out: dict[str, Compressed] = {}
        for name, d in deltas.items():
            d = np.asarray(d, dtype=np.float32)
            if d.size < self.cfg.min_size:
                out[name] = Compressed(d.shape, d.astype(np.float32), 1.0)
                continue
            if self.cfg.error_feedback:
                d = d + self.residual.get(name, 0.0)
            flat = d.reshape(-1)
            k = max(1, int(round(self.cfg.top_k * flat.size)))
            idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :] if k < flat.size else np.arange(flat.size)
            idx = np.sort(idx).astype(np.int32)
            q, scale = _quantize(flat[idx], self.cfg.bits)
            c = Compressed(d.shape, q, scale, None if k == flat.size else idx)
            if self.cfg.error_feedback:
                self.residual[name] = d - c.decode()
            out[name] = c
        return out


def payload_bytes(update: dict[str, Compressed]) -> int:
    """Bytes a client uploads for ``update`` (indices, values, scales)."""
    return sum(c.nbytes for c in update.values())


def fp32_bytes(deltas: dict[str, np.ndarray]) -> int:
    """Bytes of the same update sent uncompressed in float32."""
    return sum(int(np.asarray(d).size) * 4 for d in deltas.values())


def dirichlet_shards(labels: np.ndarray, clients: int, alpha: float, seed: int = 0, min_size: int = 2) -> list[np.ndarray]:
    """Non-IID shards: each class's rows split across ``clients`` by Dirichlet(``alpha``) proportions
    (small alpha: each client sees few classes). Every client gets at least ``min_size`` rows."""
    if clients < 1 or alpha <= 0:
        raise ConfigError(f"dirichlet shards: clients {clients} and alpha {alpha}: expected clients >= 1 and alpha > 0")
    if len(labels) < clients * min_size:
        raise ConfigError(f"{len(labels)} rows cannot give {clients} clients {min_size} rows each")
    rng = np.random.default_rng(seed)
    while True:
        shards: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(rows)).astype(int)[:-1]
            for i, part in enumerate(np.split(rows, cuts)):
                shards[i].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
