"""Compressed model updates for federated learning: top-k sparsified, int8-quantized deltas with error feedback.

A client sends ``delta = local weights - global weights`` for each float tensor. :class:`UpdateCodec`
adds the residual it kept from its previous rounds (error feedback, Seide et al. 2014 / Stich et al. 2018),
keeps the ``top_k`` fraction of entries by magnitude, quantizes their values to int8 with one symmetric
scale per tensor, and remembers what it did not send (the residual). On the wire a tensor is its int32
positions (a bitmask of one bit per entry, or int32 indices where fewer than 1 in 32 entries are kept, whichever
is smaller), int8 values and one float32 scale; :func:`payload_bytes` counts exactly those bytes, so the bytes
per round reported are the bytes a client uploads (fp32: 4 bytes per parameter).

The codec is plain numpy: the Flower ``ClientApp`` / ``ServerApp`` (:mod:`keiryo.privacy.flower_apps`,
``keiryo federate``, the ``federated`` extra) send :meth:`Compressed.to_bytes` as Flower ``Array`` entries.
This module also holds what the apps share without importing Flower: :class:`FederatedConfig`, the clients'
shards and local training, the server's evaluation and outputs, and :func:`run_federated` (the simulation).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from keiryo.config import KeiryoConfig
from keiryo.data.splits import DataSpec
from keiryo.errors import ConfigError, DataError


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
    def index_bytes(self) -> int:
        """Bytes of the positions on the wire: the smaller of a bitmask (1 bit per entry) and int32 indices."""
        if self.indices is None:
            return 0
        return min(-(-int(np.prod(self.shape)) // 8), self.indices.nbytes)

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.index_bytes + 4)  # + the float32 scale

    def to_bytes(self) -> bytes:
        """The wire form: positions (bitmask or little-endian int32), then the values, then the float32 scale."""
        pos = b""
        if self.indices is not None:
            n = int(np.prod(self.shape))
            if self.index_bytes < self.indices.nbytes:
                mask = np.zeros(n, dtype=bool)
                mask[self.indices] = True
                pos = np.packbits(mask).tobytes()
            else:
                pos = self.indices.astype("<i4").tobytes()
        return pos + self.values.tobytes() + np.float32(self.scale).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, shape: tuple[int, ...], dtype: str, count: int | None) -> Compressed:
        """Read :meth:`to_bytes` back: ``count`` values at positions (None: every entry), of ``dtype``."""
        n = int(np.prod(shape))
        size = np.dtype(dtype).itemsize
        k = n if count is None else count
        idx_len = len(data) - 4 - k * size
        if idx_len < 0 or (count is None and idx_len != 0):
            raise ValueError(f"{len(data)} bytes cannot hold {k} {dtype} values of a {shape} update")
        indices = None
        if count is not None:
            raw = data[:idx_len]
            if idx_len != min(-(-n // 8), 4 * k):
                raise ValueError(f"{idx_len} bytes of positions for {k} of {n} entries, expected {min(-(-n // 8), 4 * k)}")
            if -(-n // 8) < 4 * k:
                indices = np.flatnonzero(np.unpackbits(np.frombuffer(raw, np.uint8), count=n)).astype(np.int32)
            else:
                indices = np.frombuffer(raw, "<i4").astype(np.int32)
            if len(indices) != k:
                raise ValueError(f"update positions name {len(indices)} entries, expected {k}")
        values = np.frombuffer(data[idx_len : idx_len + k * size], dtype).copy()
        scale = float(np.frombuffer(data[-4:], np.float32)[0])
        return cls(tuple(shape), values, scale, indices)

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


# -- the federated run ---------------------------------------------------------------------------------------


class LocalDPConfig(KeiryoConfig):
    """Client-side DP through Flower's ``LocalDpMod``: each client clips its update to ``clipping_norm`` (L2) and
    adds Gaussian noise calibrated to (``epsilon``, ``delta``) per round; the guarantee covers the client's whole
    shard (client-level), whoever sees the update (server included)."""

    epsilon: float = Field(gt=0, description="per-round epsilon of one client's update (Gaussian mechanism)")
    delta: float = Field(1e-5, gt=0, lt=1, description="per-round delta")
    clipping_norm: float = Field(1.0, gt=0, description="L2 bound on a client's update (its sensitivity)")


class SecAggConfig(KeiryoConfig):
    """Secure aggregation through Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the
    clients): each client uploads its weighted weights quantized to integers and masked, the server only ever
    unmasks their sum. Its own quantization (``clipping_range``, ``quantization_range``) replaces keiryo's
    compressed updates, which it cannot carry (masking needs every entry of a dense vector)."""

    num_shares: float = Field(
        1.0, gt=0, description="shares of each client's secrets: a fraction (<= 1) of the round's clients, or a count (> 2)"
    )
    reconstruction_threshold: float = Field(
        0.5, gt=0, description="shares needed to unmask: a fraction (<= 1) of num_shares, or a count"
    )
    clipping_range: float = Field(8.0, gt=0, description="each weight is clipped to [-r, r] before quantization")
    quantization_range: int = Field(2**22, ge=2, description="integers per [-r, r] (2**22: steps of r / 2**21)")
    max_weight: float = Field(1000.0, gt=0, description="the largest client weight (rows) SecAgg+ quantizes exactly")


class CentralDPConfig(KeiryoConfig):
    """Central (server-side) client-level DP through Flower's ``DifferentialPrivacyServerSideFixedClipping``: the
    server clips each client's update (as decoded, after keiryo's compressed wire format) to ``clipping_norm``,
    averages them with equal weights and adds Gaussian noise of std ``noise_multiplier * clipping_norm / m`` (m
    clients per round). The guarantee covers a client's whole shard against anyone who gets the model, not
    against the server (it sees each update before the noise)."""

    noise_multiplier: float = Field(gt=0, description="noise std in units of the clipping norm, on the sum of updates")
    clipping_norm: float = Field(gt=0, description="L2 bound of a client's update, applied by the server")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta the model's epsilon is reported at")


class FederatedConfig(KeiryoConfig):
    """One federated run: what is trained on which data, how it is split across clients, and the wire format."""

    model: str = Field("zoo:mlp", description="zoo:NAME, path/to/file.py:factory or package.module:factory")
    model_options: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(None, description="initial weights (.safetensors or a state_dict); None: from seed")
    data: DataSpec = Field(default_factory=DataSpec)
    task: str = Field("auto", description="task name (auto: inferred from the data)")
    task_options: dict[str, Any] = Field(default_factory=dict)
    clients: int = Field(10, ge=2, description="clients (SuperNodes); each holds one shard of the train split")
    alpha: float = Field(0.3, gt=0, description="Dirichlet concentration of the shards: small = non-IID")
    rounds: int = Field(10, ge=1)
    fraction: float = Field(1.0, gt=0, le=1, description="fraction of the clients sampled each round")
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0, description="fedprox: weight of (mu/2)·||w - w_global||² in the clients' loss")
    local_epochs: int = Field(1, ge=1, description="epochs over its shard a client runs each round")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0, description="clients' SGD learning rate")
    momentum: float = Field(0.9, ge=0, lt=1)
    compression: CompressionConfig | None = Field(
        default_factory=CompressionConfig, description="compressed updates (None: fp32 weights, Flower's default)"
    )
    dp: LocalDPConfig | None = Field(None, description="client-side DP (Flower's LocalDpMod)")
    central_dp: CentralDPConfig | None = Field(None, description="central DP (Flower's server-side fixed clipping)")
    secagg: SecAggConfig | None = Field(None, description="secure aggregation (Flower's SecAgg+)")
    seed: int = 0
    threads: int = Field(1, ge=1, description="torch threads per client")
    round_timeout: float = Field(600, gt=0, description="seconds the server waits for a round's replies")
    out: str = Field("keiryo-federated", description="directory for model.safetensors and federated.json")

    @model_validator(mode="after")
    def _compatible(self) -> FederatedConfig:
        if self.secagg is not None and self.compression is not None:
            raise ConfigError(
                "--secagg: SecAgg+ masks dense vectors it quantizes itself, so it cannot carry top-k int8 updates (a "
                "sparse update's positions are not masked and masked sums need every entry); use --updates fp32"
            )
        if self.secagg is not None and self.central_dp is not None:
            raise ConfigError(
                "--secagg with --central-dp-noise: the server clips each client's update for central DP, which secure "
                "aggregation hides from it; use one of them (or --dp-epsilon, client-side DP, with --secagg)"
            )
        if self.dp is not None and self.central_dp is not None:
            raise ConfigError("--dp-epsilon with --central-dp-noise: choose client-side (local) or central DP, not both")
        if self.secagg is not None and max(1, round(self.fraction * self.clients)) < 3:
            raise ConfigError(
                f"--secagg: {max(1, round(self.fraction * self.clients))} client(s) per round; SecAgg+ needs at least 3 "
                "(with 2 each learns the other's update from the sum)"
            )
        return self


FEDERATED_METADATA_KEY = "keiryo.federated"  # the run's summary in the global model's .safetensors metadata


def load_task(cfg: FederatedConfig, data: Any) -> Any:
    from keiryo.tasks import get_task, infer_task

    return get_task(infer_task(data) if cfg.task == "auto" else cfg.task, **cfg.task_options)


def load_handle(cfg: FederatedConfig, data: Any, task: Any) -> Any:
    from keiryo.model import ModelSpec, load_model

    spec = ModelSpec(source=cfg.model, options=cfg.model_options, weights=cfg.weights)
    handle = load_model(spec, data, seed=cfg.seed, output_name=task.default_output)
    task.bind(handle.output_names)
    task.check(handle.io.outputs, data)
    if not task.needs_targets:
        raise ConfigError(f"keiryo federate: task {task.name} has no labels to train on; expected a task with targets")
    return handle


def shard_keys(train: Any) -> np.ndarray:
    """What the Dirichlet shards are drawn over: integer class labels, or quantile bins (10) of other targets."""
    from keiryo.data.splits import MemorySplit

    y: Any = None
    if isinstance(train, MemorySplit):
        y = train.targets
    elif getattr(getattr(train, "dataset", None), "targets", None) is not None:
        y = train.dataset.targets[train.indices]
    else:
        ys = [t for _, t in train.batches(256) if t is not None]
        y = np.concatenate([np.asarray(t) for t in ys]) if ys else None
    if y is None:
        return np.zeros(len(train), dtype=np.int64)
    y = np.asarray(y)
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    v = y.reshape(len(y), -1).astype(np.float64).mean(axis=1)
    return np.searchsorted(np.quantile(v, np.linspace(0, 1, 11)[1:-1]), v).astype(np.int64)


def shard_split(train: Any, rows: np.ndarray) -> Any:
    from keiryo.data.splits import MemorySplit, StreamSplit

    if isinstance(train, MemorySplit):
        return train[rows]
    if isinstance(train, StreamSplit):
        return StreamSplit(train.dataset, np.asarray(train.indices)[rows], train.workers)
    raise DataError(f"keiryo federate: cannot shard a {type(train).__name__} train split")


@dataclass
class ClientEnv:
    handle: Any
    task: Any
    split: Any  # this client's shard of the train split


_CLIENTS: dict[tuple[str, int, int], ClientEnv] = {}  # per process: a simulation worker serves many clients


def client_setup(cfg: FederatedConfig, part: int, parts: int) -> ClientEnv:
    """Client ``part`` of ``parts``: its Dirichlet(alpha) shard of the train split, the model and the task."""
    key = (cfg.to_json(), part, parts)
    if key not in _CLIENTS:
        from keiryo.data import load_data

        if not 0 <= part < parts:
            raise ConfigError(f"partition-id {part}: expected 0 <= partition-id < num-partitions ({parts})")
        data = load_data(cfg.data)
        task = load_task(cfg, data)
        handle = load_handle(cfg, data, task)
        rows = dirichlet_shards(shard_keys(data.train), parts, cfg.alpha, seed=cfg.seed)[part]
        if len(_CLIENTS) > 64:
            _CLIENTS.clear()
        _CLIENTS[key] = ClientEnv(handle, task, shard_split(data.train, rows))
    return _CLIENTS[key]


def local_train(env: ClientEnv, cfg: FederatedConfig, mu: float, seed: int) -> tuple[float, int]:
    """``cfg.local_epochs`` of SGD on the client's shard with the task's loss (+ FedProx's proximal term when
    ``mu`` > 0); returns (mean loss, rows seen per epoch)."""
    import torch

    from keiryo.model.io import call_module, flatten_outputs

    module, task, names = env.handle.module, env.task, env.handle.input_names
    prev = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if mu > 0 else []
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    total, seen = 0.0, 0
    module.train()
    try:
        for _ in range(cfg.local_epochs):
            for x, y in env.split.batches(cfg.batch_size, shuffle=True, generator=gen):
                n = len(next(iter(x.values())))
                if n < 2 and seen > 0:
                    continue  # a batch of one breaks BatchNorm
                outs, _ = flatten_outputs(call_module(module, x, names))
                loss = task.loss(outs, task.targets(y) if y is not None else None)
                if mu > 0:
                    loss = loss + (mu / 2) * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                if not torch.isfinite(loss):
                    raise DataError(f"local training diverged: loss is {loss.item()}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * n
                seen += n
    finally:
        module.eval()
        torch.set_num_threads(prev)
    return total / max(1, seen), len(env.split)


@dataclass
class ServerEnv:
    handle: Any
    task: Any
    data: Any

    def evaluate(self) -> dict[str, Any]:
        from keiryo.train import evaluate_torch

        return evaluate_torch(self.handle, self.data.test, self.task)


def server_setup(cfg: FederatedConfig) -> ServerEnv:
    """The server's model (the initial global weights) and the test split it scores each round's model on."""
    from keiryo.data import load_data

    data = load_data(cfg.data)
    task = load_task(cfg, data)
    return ServerEnv(load_handle(cfg, data, task), task, data)


def dp_record(dp: LocalDPConfig, rounds_by_client: dict[str, int]) -> dict[str, Any]:
    """The client-level guarantee of Flower's LocalDpMod: per round, per client over the rounds it took part in,
    and for the model (the largest client's: shards are disjoint, the model is post-processing).

    Flower calibrates sigma = clip·sqrt(2 ln(1.25/delta))/epsilon (the classical Gaussian mechanism, proven for
    epsilon < 1); rounds compose by RDP (the Gaussian mechanism's exact Renyi curve), reported beside basic
    composition (r·epsilon, r·delta)."""
    sigma = math.sqrt(2 * math.log(1.25 / dp.delta)) / dp.epsilon  # noise std in units of the clipping norm

    def composed(r: int) -> dict[str, float]:
        if r == 0:
            return {"rounds": 0, "epsilon_rdp": 0.0, "epsilon_basic": 0.0, "delta": dp.delta}
        orders = np.concatenate([np.linspace(1.1, 10.9, 99), np.arange(11, 257)])
        eps = r * orders / (2 * sigma**2) + math.log(1 / dp.delta) / (orders - 1)
        return {"rounds": r, "epsilon_rdp": float(eps.min()), "epsilon_basic": r * dp.epsilon, "delta": dp.delta}

    per = {k: composed(r) for k, r in sorted(rounds_by_client.items(), key=lambda kv: int(kv[0]))}
    worst = max(rounds_by_client.values(), default=0)
    return {
        "mechanism": "Flower LocalDpMod (client-side clipping + Gaussian noise)",
        "level": "client (a client's whole shard)",
        "per_round": {"epsilon": dp.epsilon, "delta": dp.delta, "noise_std": sigma * dp.clipping_norm},
        "clipping_norm": dp.clipping_norm,
        "per_client": per,
        "model": composed(worst),
        "note": "sigma from the classical Gaussian mechanism (Dwork & Roth Thm A.1), proven for per-round epsilon < 1",
    }


def central_dp_record(cdp: CentralDPConfig, rounds: int, clients: int, per_round: int) -> dict[str, Any]:
    """The client-level guarantee of central DP with fixed clipping (DP-FedAvg, McMahan et al. 2018, as Flower's
    ``DifferentialPrivacyServerSideFixedClipping`` implements it): each round releases the mean of ``per_round``
    updates clipped to ``clipping_norm`` plus Gaussian noise of std ``z·clip/per_round`` — the sampled Gaussian
    mechanism with noise multiplier z at sampling rate ``per_round / clients`` — composed over the rounds by
    Opacus's accountants (RDP, PRV). The accountants assume Poisson sampling of clients; Flower samples a fixed
    number uniformly, so ε without sampling amplification (every round counted in full) is reported beside."""
    from keiryo.privacy.dp import epsilon_of

    q = min(1.0, per_round / clients)
    by = {a: round(epsilon_of(a, [(cdp.noise_multiplier, q, rounds)], cdp.delta), 4) for a in ("rdp", "prv")}
    full = round(epsilon_of("rdp", [(cdp.noise_multiplier, 1.0, rounds)], cdp.delta), 4)
    return {
        "kind": "central",
        "mechanism": "Flower DifferentialPrivacyServerSideFixedClipping (server clips each update, noises the mean)",
        "level": "client (a client's whole shard)",
        "noise_multiplier": cdp.noise_multiplier,
        "clipping_norm": cdp.clipping_norm,
        "sample_rate": round(q, 6),
        "rounds": rounds,
        "delta": cdp.delta,
        "epsilon_by_accountant": by,
        "epsilon_without_sampling_amplification": full,
        "noise_std": cdp.noise_multiplier * cdp.clipping_norm / per_round,
    }


def model_privacy(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The DP record of a federated model for results.json and the signed package manifest (``privacy``), from
    the run's summary (``federated.json``, or the ``keiryo.federated`` metadata of its weights); None without DP.

    Client-level local DP (Flower's LocalDpMod): ε for the model is the most-used client's, composed over the
    rounds it took part in by RDP (the Gaussian mechanism's exact Renyi curve), with basic composition beside it."""
    dp = summary.get("privacy")
    if not dp:
        return None
    cfg = summary.get("config") or {}
    clients_n = int(cfg.get("clients", 0))
    if dp.get("kind") == "central":
        by = dp["epsilon_by_accountant"]
        return {
            "mechanism": "client-level central DP",
            "implementation": dp["mechanism"],
            "library": dp.get("library", "flwr"),
            "epsilon": by["rdp"],
            "delta": dp["delta"],
            "accountant": "rdp",
            "epsilon_by_accountant": by,
            "epsilon_without_sampling_amplification": dp["epsilon_without_sampling_amplification"],
            "clipping_norm": dp["clipping_norm"],
            "noise_multiplier": dp["noise_multiplier"],
            "sample_rate": dp["sample_rate"],
            "rounds": dp["rounds"],
            "rounds_total": int(cfg.get("rounds", dp["rounds"])),
            "clients": clients_n,
            "clients_per_round": max(1, round(float(cfg.get("fraction", 1.0)) * clients_n)),
            "level": dp["level"],
            "unit": "one client's whole shard of the train split",
            "holds_against": "anyone who gets the model; NOT the server (it sees each update before the noise)",
            "model_selection": "last round (no best-round choice on the test split)",
        }
    model = dp["model"]
    clients = int(cfg.get("clients", len(dp.get("per_client", {}))))
    rec: dict[str, Any] = {
        "mechanism": "client-level local DP",
        "implementation": dp["mechanism"],
        "library": dp.get("library", "flwr"),
        "epsilon": round(float(model["epsilon_rdp"]), 4),
        "delta": float(model["delta"]),
        "accountant": "rdp",
        "epsilon_by_accountant": {"rdp": round(float(model["epsilon_rdp"]), 4), "basic": round(float(model["epsilon_basic"]), 4)},
        "delta_basic": float(dp["per_round"]["delta"]) * int(model["rounds"]),
        "per_round": {"epsilon": dp["per_round"]["epsilon"], "delta": dp["per_round"]["delta"]},
        "clipping_norm": dp["clipping_norm"],
        "noise_multiplier": round(float(dp["per_round"]["noise_std"]) / float(dp["clipping_norm"]), 6),
        "rounds": int(model["rounds"]),
        "rounds_total": int(cfg.get("rounds", model["rounds"])),
        "clients": clients,
        "clients_per_round": max(1, round(float(cfg.get("fraction", 1.0)) * clients)),
        "level": dp.get("level", "client (a client's whole shard)"),
        "unit": "one client's whole shard of the train split",
        "holds_against": "the server and anyone who gets the model (noise added on the client)",
        "model_selection": "last round (no best-round choice on the test split)",
        "note": dp.get("note", ""),
    }
    return rec


def write_outputs(
    cfg: FederatedConfig, env: ServerEnv, rounds: list[dict[str, Any]], curve: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    """``cfg.out``/model.safetensors (the global model, ready for compress / optimize / package) and
    ``federated.json``; returns the summary written."""
    from keiryo.model import save_weights

    out = Path(cfg.out)
    primary = env.task.primary
    test = env.evaluate()
    uploads = [r["upload_bytes"] for r in rounds if r["clients_ok"]]
    summary: dict[str, Any] = {
        "config": json.loads(cfg.to_json()),
        "task": env.task.name,
        "metric": primary,
        "test": {k: v for k, v in test.items() if isinstance(v, int | float)},
        "curve": curve,
        "rounds": rounds,
        "upload_bytes_per_round": float(np.mean(uploads)) if uploads else 0.0,
        "upload_bytes_per_client_round": float(np.mean([r["upload_bytes"] / r["clients_ok"] for r in rounds if r["clients_ok"]]))
        if uploads
        else 0.0,
        "fp32_bytes_per_client_round": float(np.mean([r["fp32_bytes"] / r["clients_ok"] for r in rounds if r["clients_ok"]]))
        if uploads
        else 0.0,
        "failures": [{"round": r["round"], **f} for r in rounds for f in r["clients_failed"]],
        "seconds": round(seconds, 3),
        "model": str(out / "model.safetensors"),
    }
    if cfg.dp is not None:
        took: dict[str, int] = {str(p): 0 for p in range(cfg.clients)}
        for r in rounds:
            for p in r.get("partitions", []):
                took[str(p)] = took.get(str(p), 0) + 1
        summary["privacy"] = dp_record(cfg.dp, took)
    if cfg.central_dp is not None:  # every round is counted, including one skipped for a failed client
        per_round = max(1, round(cfg.fraction * cfg.clients))
        summary["privacy"] = central_dp_record(cfg.central_dp, len(rounds), cfg.clients, per_round)
    if "privacy" in summary:
        from importlib.metadata import PackageNotFoundError, version

        try:
            summary["privacy"]["library"] = f"flwr {version('flwr')}"
        except PackageNotFoundError:  # a summary written without Flower (tests)
            summary["privacy"]["library"] = "flwr"
    meta = {
        "model": json.dumps({"source": cfg.model, "options": cfg.model_options}),
        "data": json.dumps(env.data.summary()),
        "task": env.task.name,
        f"test_{primary}": f"{float(test[primary]):.6f}",
        FEDERATED_METADATA_KEY: json.dumps({k: v for k, v in summary.items() if k not in ("curve", "rounds", "model")}),
    }
    save_weights(env.handle.module, out / "model.safetensors", meta)
    (out / "federated.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def run_federated(cfg: FederatedConfig, *, verbose: bool = False, watch: Any = None) -> dict[str, Any]:
    """``cfg.clients`` clients and the server through Flower's simulation engine (Ray, one CPU per client actor);
    returns the summary also written to ``cfg.out``/federated.json."""
    from keiryo.privacy._backend import require

    require("flwr", "Flower (keiryo federate; it lives in its own environment, .venv-federated from scripts/setup)", "federated")
    import os

    from flwr.simulation import run_simulation

    from keiryo.privacy.flower_apps import make_client_app, make_server_app

    got: list[dict[str, Any]] = []
    cpus = max(1, min(cfg.clients, os.cpu_count() or 1))
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": cpus, "log_to_driver": verbose}}
    run_simulation(
        server_app=make_server_app(cfg, got.append, watch),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.clients,
        backend_config=backend,  # type: ignore[arg-type]
        verbose_logging=verbose,
    )
    if not got:
        raise DataError(f"keiryo federate: the simulation ended without a global model (see the Flower log above; out {cfg.out})")
    return got[0]
