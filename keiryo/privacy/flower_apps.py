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
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.clientapp.mod import LocalDpMod  # noqa: E402
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.common.logger import log  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, FedProx  # noqa: E402

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
LEGACY_FIT_PARAMETERS = "fitins.parameters"  # the ArrayRecord of Flower's legacy FitIns (the SecAgg+ workflow's)
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
        if cfg.secagg is not None:  # outermost: it calls the app (and LocalDpMod) only in its masked-vector stage
            chain = _bind(secaggplus_mod, chain)
        return chain(msg, ctxt)

    return mod


def load_ndarrays(module: Any, arrays: list[np.ndarray]) -> None:
    """Load Flower's legacy (unnamed) parameters into ``module``, in its ``state_dict`` order."""
    import torch

    state = module.state_dict()
    if len(arrays) != len(state):
        raise ValueError(f"{len(arrays)} arrays received for a model of {len(state)} tensors")
    module.load_state_dict(
        {k: torch.as_tensor(np.asarray(a)).to(v.dtype).reshape(v.shape) for (k, v), a in zip(state.items(), arrays, strict=True)}
    )


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
        env = client_setup(cfg, part, parts)
        handle = env.handle
        if LEGACY_FIT_PARAMETERS in msg.content.array_records:  # SecAgg+ runs on Flower's legacy FitIns / FitRes
            fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
            load_ndarrays(handle.module, parameters_to_ndarrays(fitins.parameters))
            rnd = int(fitins.config["server-round"])
            mu = float(fitins.config.get("proximal_mu", 0.0))
        else:
            rnd = int(msg.content["config"]["server-round"])
            handle.module.load_state_dict(msg.content["arrays"].to_torch_state_dict())
            mu = float(msg.content["config"].get("proximal-mu", 0.0))
        client_fault(f"federate.client-{part}.round-{rnd}")
        loss, n = local_train(env, cfg, mu, seed=cfg.seed * 100_003 + rnd * 1009 + part)
        if LEGACY_FIT_PARAMETERS in msg.content.array_records:
            arrays = [v.detach().cpu().numpy() for v in handle.module.state_dict().values()]
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {"train-loss": loss, "partition-id": part})
            return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
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
        self._received = 0  # the last round whose replies receive() decoded

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._sent = arrays
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._received != server_round:
            replies = self.receive(server_round, replies)
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]

    def receive(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Decode the round's compressed replies into weights (in place), count their bytes, log failed clients;
        returns the replies, successful ones first."""
        self._received = server_round
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
        return ok + failed


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


class CentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's central DP with server-side fixed clipping, over keiryo's strategies: the replies are decoded
    first (so the clip bounds the update the server aggregates, whatever the wire format and error feedback sent),
    then weighted equally (the noise, ``z·clip/m``, is calibrated to a plain mean of m clipped updates; FedAvg's
    weighting by rows would let a large shard move the mean by more than ``clip/m``)."""

    strategy: CompressedFedAvg | CompressedFedProx

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return self.strategy.rounds

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = self.strategy.receive(server_round, replies)
        for m in replies:
            if not m.has_error():
                metrics = next(iter(m.content.metric_records.values()))
                metrics[self.strategy.weighted_by_key] = 1
        return super().aggregate_train(server_round, replies)


def make_strategy(cfg: FederatedConfig) -> CompressedFedAvg | CompressedFedProx | CentralDP:
    per_round = max(1, round(cfg.fraction * cfg.clients))
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction,
        "fraction_evaluate": 0.0,  # the server evaluates the global model on the test split instead
        "min_train_nodes": per_round,
        "min_available_nodes": cfg.clients,
    }
    inner: CompressedFedAvg | CompressedFedProx
    if cfg.strategy == "fedprox":
        inner = CompressedFedProx(proximal_mu=cfg.proximal_mu, **common)
    else:
        inner = CompressedFedAvg(**common)
    if cfg.central_dp is None:
        return inner
    return CentralDP(inner, cfg.central_dp.noise_multiplier, cfg.central_dp.clipping_norm, per_round)


# -- secure aggregation (SecAgg+ on Flower's legacy workflow API) ---------------------------------------------


def _reply_bytes(msg: Message) -> int:
    """Payload bytes of a reply: its arrays and the bytes, strings and numbers of its config records."""
    n = sum(len(a.data) for rec in msg.content.array_records.values() for a in rec.values())
    for rec in msg.content.config_records.values():
        for v in rec.values():
            for x in v if isinstance(v, list) else [v]:
                n += len(x) if isinstance(x, bytes | str) else 8
    return n


class WatchedGrid:
    """The server's Grid, counting the bytes of every reply per round (SecAgg+ runs 4 exchanges a round) and
    handing each batch of replies to ``watch`` (tests: what the server sees)."""

    def __init__(self, grid: Grid, watch: Callable[[list[Message]], None] | None = None):
        self._grid = grid
        self._watch = watch
        self.bytes_by_round: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for m in replies:
            if not m.has_error() and m.metadata.group_id.isdigit():
                rnd = int(m.metadata.group_id)
                self.bytes_by_round[rnd] = self.bytes_by_round.get(rnd, 0) + _reply_bytes(m)
        if self._watch is not None:
            self._watch(replies)
        return replies


def secagg_strategy(cfg: FederatedConfig, base: type, **kwargs: Any) -> Any:
    """Flower's legacy FedAvg / FedProx that records, per round, what SecAgg+ hands it: every client's FitRes
    carries the same unmasked **sum** (no individual update), its row count and metrics."""

    class SecAggRounds(base):  # type: ignore[misc, valid-type]
        def __init__(self, **kw: Any):
            super().__init__(**kw)
            self.rounds: list[dict[str, Any]] = []
            self.seen: list[list[Any]] = []  # the parameters aggregate_fit received, per round (tests)

        def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> Any:
            partitions = []
            for _, res in results:
                if "partition-id" in res.metrics:
                    partitions.append(int(res.metrics.pop("partition-id")))
            self.seen.append([parameters_to_ndarrays(res.parameters) for _, res in results])
            for f in failures:
                log(WARNING, "keiryo: round %d: a client failed (%s); SecAgg+ goes on with the others", server_round, f)
            self.rounds.append(
                {
                    "round": server_round,
                    "clients_ok": len(results),
                    "clients_failed": [{"node": -1, "reason": str(f)[:240]} for f in failures],
                    "partitions": sorted(partitions),
                    "upload_bytes": 0,  # filled in from the grid's count after the round
                    "fp32_bytes": 0,
                }
            )
            return super().aggregate_fit(server_round, results, failures)

    return SecAggRounds(**kwargs)


def run_secagg(cfg: FederatedConfig, grid: Grid, context: Context, env: Any, evaluate: Callable[[int, ArrayRecord], MetricRecord],
               watch: Callable[[list[Message]], None] | None = None) -> tuple[ArrayRecord, list[dict[str, Any]]]:  # fmt: skip
    """``cfg.rounds`` rounds of FedAvg / FedProx whose fit step is Flower's SecAggPlusWorkflow; returns the final
    global weights (named like the model's state_dict) and the per-round records."""
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.strategy import FedProx as LegacyFedProx
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    assert cfg.secagg is not None
    sa = cfg.secagg
    names = list(env.handle.module.state_dict())
    initial = [v.detach().cpu().numpy() for v in env.handle.module.state_dict().values()]
    fp32 = sum(int(a.size) * 4 for a in initial if a.dtype.kind == "f")
    per_round = max(1, round(cfg.fraction * cfg.clients))

    def named(arrays: list[np.ndarray]) -> ArrayRecord:
        pairs = zip(names, initial, arrays, strict=True)
        return ArrayRecord(
            {k: Array(np.ascontiguousarray(np.asarray(a).astype(ref.dtype).reshape(ref.shape))) for k, ref, a in pairs}
        )

    def evaluate_fn(rnd: int, arrays: list[np.ndarray], _: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        return 0.0, {k: v for k, v in evaluate(rnd, named(arrays)).items()}

    kwargs: dict[str, Any] = {
        "fraction_fit": cfg.fraction,
        "fraction_evaluate": 0.0,
        "min_fit_clients": per_round,
        "min_available_clients": cfg.clients,
        "initial_parameters": ndarrays_to_parameters(initial),
        "evaluate_fn": evaluate_fn,
        "on_fit_config_fn": lambda rnd: {"server-round": rnd, "lr": cfg.lr},
        "fit_metrics_aggregation_fn": lambda metrics: {},  # the server scores the global model itself
    }
    if cfg.strategy == "fedprox":
        strategy = secagg_strategy(cfg, LegacyFedProx, proximal_mu=cfg.proximal_mu, **kwargs)
    else:
        strategy = secagg_strategy(cfg, LegacyFedAvg, **kwargs)
    as_count = lambda v: int(v) if v > 1 else float(v)  # noqa: E731  (Flower: an int is a count, a float a fraction)
    workflow = SecAggPlusWorkflow(
        num_shares=as_count(sa.num_shares),
        reconstruction_threshold=as_count(sa.reconstruction_threshold),
        max_weight=sa.max_weight,
        clipping_range=sa.clipping_range,
        quantization_range=sa.quantization_range,
        timeout=cfg.round_timeout,
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=cfg.rounds, round_timeout=cfg.round_timeout), strategy=strategy
    )
    watched = WatchedGrid(grid, watch)
    DefaultWorkflow(fit_workflow=workflow)(watched, legacy)  # type: ignore[arg-type]
    for r in strategy.rounds:
        r["upload_bytes"] = watched.bytes_by_round.get(r["round"], 0)
        r["fp32_bytes"] = fp32 * r["clients_ok"]
        log(
            INFO,
            "keiryo: round %d: SecAgg+ over %d clients, %d bytes uploaded (all 4 stages)",
            r["round"],
            r["clients_ok"],
            r["upload_bytes"],
        )
    final = legacy.state.array_records[MAIN_PARAMS_RECORD]
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(final, keep_input=True))
    if len(arrays) != len(names):
        raise RuntimeError(f"SecAgg+ ended with {len(arrays)} arrays for a model of {len(names)} tensors (see the Flower log)")
    return named(arrays), strategy.rounds


def make_server_app(
    fixed: FederatedConfig | None = None,
    done: Callable[[dict[str, Any]], None] | None = None,
    watch: Callable[[list[Message]], None] | None = None,
) -> ServerApp:
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

        if cfg.secagg is not None:
            arrays, rounds = run_secagg(cfg, grid, context, env, evaluate, watch)
        else:
            result = strategy.start(
                grid,
                ArrayRecord(env.handle.module.state_dict()),
                num_rounds=cfg.rounds,
                timeout=cfg.round_timeout,
                train_config=ConfigRecord({"lr": cfg.lr}),
                evaluate_fn=evaluate,
            )
            arrays, rounds = result.arrays, strategy.rounds
        env.handle.module.load_state_dict(arrays.to_torch_state_dict())
        summary = write_outputs(cfg, env, rounds, curve, time.perf_counter() - t0)
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
