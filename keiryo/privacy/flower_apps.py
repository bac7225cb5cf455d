"""keiryo's Flower apps: a ``ClientApp`` that trains any keiryo model on its non-IID shard of any keiryo data
source with the task's loss, and a ``ServerApp`` that runs Flower's FedAvg or FedProx over compressed updates.

Each client's reply leaves through two Flower mods, innermost first: Flower's :class:`LocalDpMod` (optional:
clip the update, add Gaussian noise) and :class:`CompressedUpdates` (keiryo's wire format: the delta to the
global model, top-k sparsified and int8-quantized with error feedback, see :mod:`keiryo.privacy.federated`;
the residual stays in the node's Flower ``Context.state`` between rounds). The server strategies are Flower's
own, subclassed only to turn the compressed replies back into weights before Flower aggregates them
(:class:`CompressedFedAvg`, :class:`CompressedFedProx`), to count the bytes each round uploads, and to say in
the log which client failed in a round that went on without it.

The same apps run under Flower's simulation engine (:func:`keiryo.privacy.federated.run_federated`) and as
real processes: ``flwr run`` on a project whose components are ``keiryo.privacy.flower_apps:server_app`` and
``:client_app``, with the :class:`~keiryo.privacy.federated.FederatedConfig` as JSON in the run config key
``keiryo-config`` (:func:`write_flower_project` writes such a project).

Importing this module imports Flower (the ``federated`` extra, its own environment: see the README).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np

from keiryo._faults import fault_point
from keiryo.privacy._backend import require

require("flwr", "Flower (keiryo federate; it lives in its own environment, .venv-federated from scripts/setup)", "federated")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.clientapp.mod import LocalDpMod  # noqa: E402
from flwr.common.logger import log  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg, FedProx  # noqa: E402

from keiryo.privacy.federated import (  # noqa: E402
    Compressed,
    CompressionConfig,
    FederatedConfig,
    UpdateCodec,
    client_setup,
    local_train,
    server_setup,
    write_outputs,
)

CONFIG_KEY = "keiryo-config"  # run config key holding the FederatedConfig as JSON (flwr run)
STYPE_SPARSE, STYPE_DENSE = "keiryo.topk-delta", "keiryo.delta"  # Array.stype of a compressed update
RESIDUAL_KEY = "keiryo.residual"  # Context.state record holding a client's error-feedback residual

ConfigSource = Callable[[Context], FederatedConfig]


def config_from(fixed: FederatedConfig | None) -> ConfigSource:
    """The config of a run: ``fixed`` (simulation, in-process), else the run config's ``keiryo-config`` JSON."""

    def get(context: Context) -> FederatedConfig:
        if fixed is not None:
            return fixed
        text = context.run_config.get(CONFIG_KEY)
        if not isinstance(text, str):
            from keiryo.errors import ConfigError

            raise ConfigError(f"Flower run config has no {CONFIG_KEY!r} (a FederatedConfig as JSON); keiryo federate writes it")
        return FederatedConfig.from_json(text)

    return get


# -- client side ---------------------------------------------------------------------------------------------


def is_float(a: Array) -> bool:
    return a.dtype.startswith("float") or a.dtype in ("bfloat16",)


class CompressedUpdates:
    """A Flower client mod: replace the reply's weights by their compressed delta to the weights received."""

    def __init__(self, cfg: CompressionConfig):
        self.cfg = cfg

    def __call__(self, msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        sent = next(iter(msg.content.array_records.values()))
        reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        key, local = next(iter(reply.content.array_records.items()))
        held = ctxt.state.array_records.get(RESIDUAL_KEY)
        codec = UpdateCodec(self.cfg, {k: v.numpy() for k, v in held.items()} if held is not None else {})
        f32 = np.float32
        deltas = {k: local[k].numpy().astype(f32) - sent[k].numpy().astype(f32) for k in local if is_float(local[k])}
        enc = codec.encode(deltas)
        out = ArrayRecord()
        for k in local:  # keep the model's order; integer buffers (BatchNorm counters) go whole
            if k in enc:
                c = enc[k]
                shape = (len(c.values),)
                out[k] = Array(str(c.values.dtype), shape, STYPE_DENSE if c.indices is None else STYPE_SPARSE, c.to_bytes())
            else:
                out[k] = local[k]
        if self.cfg.error_feedback:
            ctxt.state[RESIDUAL_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in codec.residual.items()})
        reply.content[key] = out
        return reply


def wire_mod(config: ConfigSource) -> Callable[[Message, Context, Callable[[Message, Context], Message]], Message]:
    """One client mod that chains, per the run's config, Flower's LocalDpMod (inner) and CompressedUpdates (outer):
    noise is added to the full update, then the noised update is compressed (post-processing keeps the DP bound)."""

    def mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        cfg = config(ctxt)
        chain = call_next
        if cfg.dp is not None:
            dp = LocalDpMod(cfg.dp.clipping_norm, cfg.dp.clipping_norm, cfg.dp.epsilon, cfg.dp.delta)
            chain = _bind(dp, chain)
        if cfg.compression is not None:
            chain = _bind(CompressedUpdates(cfg.compression), chain)
        return chain(msg, ctxt)

    return mod


def _bind(mod: Any, nxt: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    return lambda m, c: mod(m, c, nxt)


def client_fault(name: str) -> None:
    """Tests: ``KEIRYO_FAULT=NAME`` kills this client's process here (a SuperNode dying mid-round);
    ``KEIRYO_FAULT=NAME:raise`` makes the ClientApp raise instead (a crash the SuperNode survives)."""
    if os.environ.get("KEIRYO_FAULT") == f"{name}:raise":
        raise RuntimeError(f"injected client crash at {name}")
    fault_point(name)


def reason_line(msg: Message) -> str:
    """A failed reply's reason in one line: the last ``SomeError: message`` line of the traceback it carries."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", msg.error.reason or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b[^:]*:\s*\S", ln)]
    text = errors[-1] if errors else lines[0] if lines else f"error code {msg.error.code}"
    return (text[:240] + "...") if len(text) > 240 else text


def make_client_app(fixed: FederatedConfig | None = None) -> ClientApp:
    """The keiryo ClientApp (``fixed``: the config, in-process; None: read from the run config)."""
    config = config_from(fixed)
    app = ClientApp(mods=[wire_mod(config)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = config(context)
        part = int(context.node_config["partition-id"])
        parts = int(context.node_config["num-partitions"])
        rnd = int(msg.content["config"]["server-round"])
        env = client_setup(cfg, part, parts)
        handle = env.handle
        handle.module.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        client_fault(f"federate.client-{part}.round-{rnd}")
        mu = float(msg.content["config"].get("proximal-mu", 0.0))
        loss, n = local_train(env, cfg, mu, seed=cfg.seed * 100_003 + rnd * 1009 + part)
        metrics = MetricRecord({"num-examples": n, "train-loss": loss, "partition-id": part})
        return Message(RecordDict({"arrays": ArrayRecord(handle.module.state_dict()), "metrics": metrics}), reply_to=msg)

    return app


# -- server side ---------------------------------------------------------------------------------------------


def decode_update(update: ArrayRecord, base: ArrayRecord) -> ArrayRecord:
    """Weights from a compressed reply: ``base`` (the global model sent) plus each decoded delta."""
    out = ArrayRecord()
    for k, a in update.items():
        if a.stype in (STYPE_SPARSE, STYPE_DENSE):
            ref = base[k].numpy()
            count = None if a.stype == STYPE_DENSE else int(a.shape[0])
            delta = Compressed.from_bytes(a.data, tuple(ref.shape), a.dtype, count).decode()
            out[k] = Array(np.ascontiguousarray((ref.astype(np.float32) + delta).astype(ref.dtype)))
        else:
            out[k] = a
    return out


class _CompressedRounds:
    """Mixed into Flower's strategies: decode compressed replies, count bytes, log failed clients."""

    arrayrecord_key: str

    def _init_rounds(self) -> None:
        self.rounds: list[dict[str, Any]] = []
        self._sent: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._sent = arrays
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        failed = [m for m in replies if m.has_error()]
        for m in failed:
            log(
                WARNING,
                "keiryo: round %d: client node %d failed (%s); the round goes on with the other %d client(s)",
                server_round,
                m.metadata.src_node_id,
                reason_line(m),
                len(ok),
            )
        upload = fp32 = 0
        partitions = []
        for m in ok:
            metrics = next(iter(m.content.metric_records.values()))
            if "partition-id" in metrics:  # who took part (the DP record counts each client's rounds)
                partitions.append(int(metrics["partition-id"]))  # type: ignore[arg-type]
                del metrics["partition-id"]
            arrays = next(iter(m.content.array_records.values()))
            upload += sum(len(a.data) for a in arrays.values())
            fp32 += sum(int(np.prod(a.numpy().shape)) * 4 for a in (self._sent or arrays).values() if is_float(a))
            if self._sent is not None and any(a.stype in (STYPE_SPARSE, STYPE_DENSE) for a in arrays.values()):
                m.content[next(iter(m.content.array_records))] = decode_update(arrays, self._sent)
        self.rounds.append(
            {
                "round": server_round,
                "clients_ok": len(ok),
                "clients_failed": [{"node": int(m.metadata.src_node_id), "reason": reason_line(m)} for m in failed],
                "partitions": sorted(partitions),
                "upload_bytes": upload,
                "fp32_bytes": fp32,
            }
        )
        log(
            INFO,
            "keiryo: round %d: %d client update(s), %d bytes uploaded (%d as fp32 weights, %.1fx fewer)",
            server_round,
            len(ok),
            upload,
            fp32,
            fp32 / upload if upload else 0.0,
        )
        return super().aggregate_train(server_round, ok + failed)  # type: ignore[misc]


class CompressedFedAvg(_CompressedRounds, FedAvg):
    """Flower's FedAvg over keiryo's compressed updates."""

    def __init__(self, **kwargs: Any):
        FedAvg.__init__(self, **kwargs)
        self._init_rounds()


class CompressedFedProx(_CompressedRounds, FedProx):
    """Flower's FedProx (clients add (mu/2)·||w - w_global||² to their loss) over keiryo's compressed updates."""

    def __init__(self, **kwargs: Any):
        FedProx.__init__(self, **kwargs)
        self._init_rounds()


def make_strategy(cfg: FederatedConfig) -> CompressedFedAvg | CompressedFedProx:
    per_round = max(1, round(cfg.fraction * cfg.clients))
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction,
        "fraction_evaluate": 0.0,  # the server evaluates the global model on the test split instead
        "min_train_nodes": per_round,
        "min_available_nodes": cfg.clients,
    }
    if cfg.strategy == "fedprox":
        return CompressedFedProx(proximal_mu=cfg.proximal_mu, **common)
    return CompressedFedAvg(**common)


def make_server_app(fixed: FederatedConfig | None = None, done: Callable[[dict[str, Any]], None] | None = None) -> ServerApp:
    """The keiryo ServerApp: Flower's strategy for ``cfg.rounds`` rounds, the global model evaluated on the test
    split after each, the final model and ``federated.json`` written to ``cfg.out``."""
    config = config_from(fixed)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config(context)
        env = server_setup(cfg)
        strategy = make_strategy(cfg)
        curve: list[dict[str, Any]] = []
        t0 = time.perf_counter()

        def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            env.handle.module.load_state_dict(arrays.to_torch_state_dict())
            m = env.evaluate()
            curve.append({"round": rnd, env.task.primary: m[env.task.primary], "seconds": round(time.perf_counter() - t0, 3)})
            return MetricRecord({env.task.primary: float(m[env.task.primary])})

        result = strategy.start(
            grid,
            ArrayRecord(env.handle.module.state_dict()),
            num_rounds=cfg.rounds,
            timeout=cfg.round_timeout,
            train_config=ConfigRecord({"lr": cfg.lr}),
            evaluate_fn=evaluate,
        )
        env.handle.module.load_state_dict(result.arrays.to_torch_state_dict())
        summary = write_outputs(cfg, env, strategy.rounds, curve, time.perf_counter() - t0)
        if done is not None:
            done(summary)

    return app


# -- flwr run ------------------------------------------------------------------------------------------------

client_app = make_client_app()  # the config comes from the run config key "keiryo-config"
server_app = make_server_app()


def write_flower_project(cfg: FederatedConfig, where: Path) -> Path:
    """A Flower project directory for ``flwr run`` (real SuperLink / SuperNodes): a pyproject.toml whose
    components are keiryo's apps and whose run config carries ``cfg``."""
    where.mkdir(parents=True, exist_ok=True)
    text = (
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "keiryo-federate"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "keiryo"\n\n'
        "[tool.flwr.app.components]\n"
        'serverapp = "keiryo.privacy.flower_apps:server_app"\nclientapp = "keiryo.privacy.flower_apps:client_app"\n\n'
        f"[tool.flwr.app.config]\n{CONFIG_KEY} = {json.dumps(cfg.to_json())}\n"
    )
    (where / "pyproject.toml").write_text(text, encoding="utf-8")
    return where
