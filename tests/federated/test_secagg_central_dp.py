"""Secure aggregation (Flower's SecAgg+) and central DP (Flower's server-side fixed clipping) on keiryo's apps:
small simulations (3 clients, one round, a tiny MLP) compared with FedAvg computed by hand from the same clients."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.common import bytes_to_ndarray  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key  # noqa: E402

from keiryo.errors import ConfigError  # noqa: E402
from keiryo.model import load_weights  # noqa: E402
from keiryo.privacy.federated import (  # noqa: E402
    FederatedConfig,
    client_setup,
    local_train,
    model_privacy,
    run_federated,
    server_setup,
)

MLP = {"hidden": [8]}  # 610 parameters


def _clients_by_hand(cfg: FederatedConfig) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], list[int]]:
    """What each client of round 1 trains, run in this process: the initial weights, each client's weights, rows."""
    start = {k: v.detach().clone() for k, v in server_setup(cfg).handle.module.state_dict().items()}
    local, rows = [], []
    for part in range(cfg.clients):
        env = client_setup(cfg, part, cfg.clients)
        env.handle.module.load_state_dict(start)
        _, n = local_train(env, cfg, 0.0, seed=cfg.seed * 100_003 + 1 * 1009 + part)  # the ClientApp's seed, round 1
        local.append({k: v.detach().numpy().copy() for k, v in env.handle.module.state_dict().items()})
        rows.append(n)
    return {k: v.numpy() for k, v in start.items()}, local, rows


def test_secagg_aggregates_what_fedavg_would_and_the_server_sees_only_masked_vectors(tmp_path):
    cfg = FederatedConfig.parse(
        {"clients": 3, "rounds": 1, "alpha": 1.0, "model_options": MLP, "compression": None, "secagg": {},
         "out": str(tmp_path)}
    )  # fmt: skip
    replies: list = []
    s = run_federated(cfg, watch=replies.extend)
    got = {k: v.numpy() for k, v in load_weights(tmp_path / "model.safetensors").items()}

    _, local, rows = _clients_by_hand(cfg)
    fedavg = {k: sum(n * w[k] for n, w in zip(rows, local, strict=True)) / sum(rows) for k in got}
    # SecAgg+ quantizes to steps of 2 * 8 / 2**22 ~ 3.8e-6 (stochastic rounding) and the weights n / max_weight
    err = max(float(np.abs(got[k] - fedavg[k]).max()) for k in got)
    spread = min(max(float(np.abs(got[k] - w[k]).max()) for k in got) for w in local)
    assert err < 5e-5 and spread > 100 * err, (err, spread)

    # the server received 4 exchanges of 3 replies; none holds a client's weights, only keys, shares and masked integers
    assert len(replies) == 12 and not any(m.has_error() for m in replies)
    flat = [np.concatenate([w[k].ravel() for k in got]) for w in local]
    masked = []
    for m in replies:
        for rec in m.content.array_records.values():
            assert len(rec) == 0  # secaggplus_mod empties the FitRes parameters before they leave the client
        vec = m.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS)
        if vec is not None:
            arrays = [bytes_to_ndarray(b) for b in vec]
            assert all(a.dtype.kind in "iu" for a in arrays)  # integers mod 2**32, no float weights
            masked.append(np.concatenate([a.ravel() for a in arrays[1:]]).astype(np.float64))  # [0]: the weight factor
    assert len(masked) == 3
    for v in masked:  # a masked vector is uniform noise mod 2**32: uncorrelated with every client's weights
        assert v.std() > 2**30 and all(abs(np.corrcoef(v, w)[0, 1]) < 0.25 for w in flat)

    (r,) = s["rounds"]
    assert r["clients_ok"] == 3 and r["partitions"] == [0, 1, 2] and r["upload_bytes"] > r["fp32_bytes"] > 0


def test_secagg_with_client_side_dp_sums_clipped_noised_updates_and_reports_local_epsilon(tmp_path):
    """--secagg with --dp-epsilon: LocalDpMod clips and noises each client's update before SecAgg+ masks it. The
    global model is the row-weighted mean of the clipped updates plus the mean of the clients' noise (std
    sigma * sqrt(sum n_i^2) / sum n_i), the server sees only masked integers, and the record is local DP."""
    clip, eps, delta = 0.05, 20.0, 1e-5
    cfg = FederatedConfig.parse(
        {"clients": 3, "rounds": 1, "alpha": 1.0, "model_options": MLP, "compression": None, "secagg": {},
         "dp": {"epsilon": eps, "delta": delta, "clipping_norm": clip}, "out": str(tmp_path)}
    )  # fmt: skip
    replies: list = []
    s = run_federated(cfg, watch=replies.extend)
    got = {k: v.numpy() for k, v in load_weights(tmp_path / "model.safetensors").items()}
    start, local, rows = _clients_by_hand(cfg)

    def clipped(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        d = {k: (w[k] - start[k]).astype(np.float64) for k in w}
        norm = float(np.sqrt(sum((v**2).sum() for v in d.values())))
        assert norm > clip  # every client moved further than the clip: clipping is what is tested
        return {k: v * clip / norm for k, v in d.items()}

    mean = {k: sum(n * clipped(w)[k] for n, w in zip(rows, local, strict=True)) / sum(rows) for k in got}
    noise = np.concatenate([(got[k] - start[k] - mean[k]).ravel() for k in got])
    sigma = clip * np.sqrt(2 * np.log(1.25 / delta)) / eps  # Flower's LocalDpMod, per client
    expected = sigma * np.sqrt(sum(n * n for n in rows)) / sum(rows)
    assert 0.8 * expected < noise.std() < 1.2 * expected, (noise.std(), expected)

    masked = [m for m in replies if m.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS)]
    assert len(masked) == 3 and all(len(rec) == 0 for m in replies for rec in m.content.array_records.values())
    rec = model_privacy(s)
    assert rec is not None and rec["mechanism"] == "client-level local DP" and rec["clipping_norm"] == clip
    assert rec["per_round"] == {"epsilon": eps, "delta": delta} and rec["epsilon"] > 0
    assert "the server" in rec["holds_against"]


def test_secagg_refuses_sparse_updates_and_too_few_clients():
    with pytest.raises(ConfigError, match=r"--secagg: SecAgg\+ masks dense vectors .* use --updates fp32"):
        FederatedConfig.parse({"clients": 3, "secagg": {}})
    with pytest.raises(ConfigError, match="2 client"):
        FederatedConfig.parse({"clients": 2, "secagg": {}, "compression": None})
    with pytest.raises(ConfigError, match="--secagg with --central-dp-noise"):
        FederatedConfig.parse(
            {"clients": 3, "secagg": {}, "compression": None, "central_dp": {"noise_multiplier": 1, "clipping_norm": 1}}
        )


def test_central_dp_clips_each_decoded_update_averages_equally_and_reports_epsilon(tmp_path):
    """Compressed updates with error feedback, decoded by the server, clipped to 0.05, averaged, noised (z = 0.8):
    the global model's distance from the equal-weight mean of the clipped updates is the noise Flower adds (its
    std z·clip/3), and epsilon comes from Opacus's accountants."""
    clip, z = 0.05, 0.8
    cfg = FederatedConfig.parse(
        {"clients": 3, "rounds": 1, "alpha": 1.0, "model_options": MLP, "compression": {"top_k": 1.0},
         "central_dp": {"noise_multiplier": z, "clipping_norm": clip}, "out": str(tmp_path)}
    )  # fmt: skip
    s = run_federated(cfg)
    got = {k: v.numpy() for k, v in load_weights(tmp_path / "model.safetensors").items()}
    start, local, _ = _clients_by_hand(cfg)

    def clipped(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        d = {k: w[k] - start[k] for k in w}
        norm = float(np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in d.values())))
        assert norm > clip  # every client moved further than the clip: clipping is what is tested
        return {k: v * clip / norm for k, v in d.items()}

    mean = {k: sum(clipped(w)[k] for w in local) / 3 for k in got}  # equal weights, not by rows
    noise = np.concatenate([(got[k] - start[k] - mean[k]).ravel() for k in got])
    sigma = z * clip / 3  # Flower's compute_stdv on the mean of 3 updates
    assert 0.8 * sigma < noise.std() < 1.2 * sigma  # int8 rounding of the deltas (~1e-4) is far below sigma (0.013)

    rec = model_privacy(s)
    assert rec is not None and rec["mechanism"] == "client-level central DP" and rec["rounds"] == 1
    assert rec["noise_multiplier"] == z and rec["clipping_norm"] == clip and rec["sample_rate"] == 1.0
    assert rec["epsilon"] == rec["epsilon_without_sampling_amplification"] > 0  # every client every round: no amplification
    assert set(rec["epsilon_by_accountant"]) == {"rdp", "prv"}


def test_central_dp_and_local_dp_are_not_combined():
    with pytest.raises(ConfigError, match="choose client-side"):
        FederatedConfig.parse({"dp": {"epsilon": 1}, "central_dp": {"noise_multiplier": 1, "clipping_norm": 1}})
