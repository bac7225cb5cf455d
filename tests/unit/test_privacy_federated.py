"""Compressed federated updates: top-k + int8 with error feedback, bytes on the wire, non-IID shards."""

from __future__ import annotations

import numpy as np
import pytest

from keiryo.errors import ConfigError
from keiryo.privacy.federated import Compressed, CompressionConfig, UpdateCodec, dirichlet_shards, fp32_bytes, payload_bytes


def _deltas(seed=0):
    rng = np.random.default_rng(seed)
    return {"fc.weight": rng.normal(size=(64, 64)).astype(np.float32), "fc.bias": rng.normal(size=64).astype(np.float32)}


def test_topk_int8_sends_the_largest_entries_in_a_fraction_of_the_bytes():
    d = _deltas()
    enc = UpdateCodec(CompressionConfig(top_k=0.05)).encode(d)
    w = enc["fc.weight"]
    assert w.values.dtype == np.int8 and w.indices is not None and len(w.indices) == round(0.05 * 4096)
    assert set(w.indices) == set(np.argsort(-np.abs(d["fc.weight"]).ravel())[: len(w.indices)])
    sent = d["fc.weight"].ravel()[w.indices]
    assert np.abs(w.decode().ravel()[w.indices] - sent).max() <= w.scale / 2 + 1e-7  # int8 rounding only
    assert enc["fc.bias"].indices is None and np.array_equal(enc["fc.bias"].decode(), d["fc.bias"])  # small: whole, fp32
    # wire bytes: a 4096-bit mask (cheaper than 205 int32 indices) + 205 int8 values + scale, plus the 64-float
    # bias; fp32 would be 4 x 4160
    assert payload_bytes(enc) == 512 + 205 + 4 + 64 * 4 + 4
    assert fp32_bytes(d) / payload_bytes(enc) > 16
    for name, c in enc.items():  # the wire form is exactly nbytes and reads back to the same update
        wire = c.to_bytes()
        assert len(wire) == c.nbytes
        back = Compressed.from_bytes(wire, c.shape, str(c.values.dtype), None if c.indices is None else len(c.indices))
        assert np.array_equal(back.decode(), c.decode()), name
    sparse = UpdateCodec(CompressionConfig(top_k=0.01)).encode(d)["fc.weight"]  # 41 of 4096: int32 indices are smaller
    assert sparse.index_bytes == 41 * 4 and len(sparse.to_bytes()) == sparse.nbytes
    back = Compressed.from_bytes(sparse.to_bytes(), sparse.shape, "int8", 41)
    assert np.array_equal(back.indices, sparse.indices) and np.array_equal(back.decode(), sparse.decode())


def test_error_feedback_sends_everything_eventually():
    """What was sent plus what is kept equals the sum of the true deltas (Stich et al.'s invariant)."""
    codec = UpdateCodec(CompressionConfig(top_k=0.1))
    sent = np.zeros((64, 64), np.float32)
    total = np.zeros((64, 64), np.float32)
    for r in range(20):
        d = _deltas(r)
        total += d["fc.weight"]
        sent += codec.encode(d)["fc.weight"].decode()
    assert np.allclose(sent + codec.residual["fc.weight"], total, atol=1e-4)
    # without feedback the dropped mass is simply lost
    plain = UpdateCodec(CompressionConfig(top_k=0.1, error_feedback=False))
    lost = sum(np.abs(_deltas(r)["fc.weight"] - plain.encode(_deltas(r))["fc.weight"].decode()).sum() for r in range(3))
    assert lost > 0 and not plain.residual


def test_dirichlet_shards_partition_the_rows_and_small_alpha_skews_the_classes():
    labels = np.repeat(np.arange(10), 60)
    for alpha in (0.1, 100.0):
        shards = dirichlet_shards(labels, 20, alpha, seed=0)
        assert len(shards) == 20 and np.array_equal(np.sort(np.concatenate(shards)), np.arange(len(labels)))
    classes = {a: np.mean([len(np.unique(labels[s])) for s in dirichlet_shards(labels, 20, a)]) for a in (0.1, 100.0)}
    assert classes[0.1] < 5 < 9 < classes[100.0]
    with pytest.raises(ConfigError, match="cannot give 20 clients 2 rows each"):
        dirichlet_shards(labels[:30], 20, 0.3)
