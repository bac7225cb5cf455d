"""The privacy commands and options: ``keiryo train --dp`` options, ``keiryo federate``.

Registered from :mod:`keiryo.cli.main`; nothing here imports Opacus or Flower until a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from keiryo.errors import ConfigError

privacy_app = typer.Typer(help="Privacy tools: keys for encrypted packages.", no_args_is_help=True)


def dp_config(
    dp: bool,
    target_epsilon: float | None,
    delta: float | None,
    max_grad_norm: float,
    accountant: str,
    grad_sample_mode: str = "auto",
) -> Any:
    """The ``--dp`` options as a :class:`~keiryo.privacy.dp.DPConfig` (None without ``--dp``)."""
    from keiryo.privacy.dp import DPConfig

    if not dp:
        given = [n for n, v in (("--target-epsilon", target_epsilon), ("--delta", delta)) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --dp (differentially private training)")
        return None
    if target_epsilon is None:
        raise ConfigError("--dp needs --target-epsilon (the run's privacy budget, e.g. 8; smaller is more private)")
    return DPConfig.parse(
        {
            "target_epsilon": target_epsilon,
            "delta": delta,
            "max_grad_norm": max_grad_norm,
            "accountant": accountant,
            "grad_sample_mode": grad_sample_mode,
        },
        where="--dp options",
    )


CalibDataOpt = Annotated[
    str,
    typer.Option(
        "--calib-data",
        help="calibration set for post-training quantization: train (the private train split) | synthetic | a public "
        "data source; recorded in results.json (data.calibration)",
    ),
]


def calibration(splits: Any, handle: Any, source: str, size: int, seed: int) -> Any:
    """``splits`` calibrated on ``source`` (``--calib-data``); a DP-trained model calibrated on its train split is
    told that the calibration is not covered by its guarantee."""
    from keiryo.data.splits import with_calibration

    splits = with_calibration(splits, source, size, seed)
    if source == "train" and handle.metadata.get("privacy"):
        from keiryo._console import stderr_console

        stderr_console().print(
            "note: this model was trained with DP; post-training quantization calibrated on the train split is NOT "
            "covered by its guarantee (--calib-data synthetic or a public data source is)",
            highlight=False,
        )
    return splits


def print_guarantees(console: Any, pkg_or_manifest: Any) -> None:
    """The privacy lines of a package: its DP guarantee and for whom its model is encrypted."""
    from keiryo.privacy.dp import summary_line

    m = pkg_or_manifest
    if isinstance(m, Path):
        from keiryo.packages import read_manifest

        m = read_manifest(m)
    rec = m.get("privacy")
    if rec:
        console.print(f"privacy: {summary_line(rec)}", highlight=False)
    enc = m.get("encryption")
    if enc:
        console.print(f"encrypted: {enc['cipher']} ({enc['key_wrap']}) for key {enc['recipient']}", highlight=False)


@privacy_app.command("keygen")
def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="the device's private key (X25519 PEM) or the symmetric key file")],
    kind: Annotated[str, typer.Option("--kind", help="x25519 (a key pair: NAME.pub.pem to --encrypt-to) | symmetric")] = "x25519",
    overwrite: Annotated[bool, typer.Option(help="replace existing key files")] = False,
) -> None:
    """Create a key for encrypted packages: a device key pair (X25519), or a 32-byte symmetric key."""
    from keiryo.privacy.encryption import read_key, write_symmetric_key, write_x25519_pair

    if kind not in ("x25519", "symmetric"):
        raise ConfigError(f"--kind {kind!r}: expected x25519 or symmetric")
    k: Literal["x25519", "symmetric"] = kind  # type: ignore[assignment]
    from keiryo.cli.main import _console

    if k == "symmetric":
        p = write_symmetric_key(out, overwrite=overwrite)
        _console().print(f"symmetric key: {p} (mode 600), fingerprint {read_key(p).fingerprint}", highlight=False)
        return
    priv, pub = write_x25519_pair(out, overwrite=overwrite)
    _console().print(
        f"private key: {priv} (mode 600, stays on the device)\npublic key:  {pub} (give it to --encrypt-to), "
        f"fingerprint {read_key(pub).fingerprint}",
        highlight=False,
    )


def federate(
    out: Annotated[Path, typer.Option("--out", "-o", help="directory: model.safetensors (the global model), federated.json")],
    model: Annotated[str, typer.Option("--model", "-m", help="zoo:NAME, path/to/file.py:factory or package.module:factory")] = (
        "zoo:mlp"
    ),
    data: Annotated[str, typer.Option("--data", "-d", help="digits | file.npz | image folder | file.csv | module:function")] = (
        "digits"
    ),
    model_opt: Annotated[Optional[list[str]], typer.Option("--model-opt", help="model option key=value (repeatable)")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", "-w", help="initial weights (default: from --seed)")] = None,
    data_opt: Annotated[Optional[list[str]], typer.Option("--data-opt", help="data option key=value (repeatable)")] = None,
    task: Annotated[str, typer.Option("--task", help="task name, or auto (from the data)")] = "auto",
    task_opt: Annotated[Optional[list[str]], typer.Option("--task-opt", help="task option key=value")] = None,
    clients: Annotated[int, typer.Option(min=2, help="clients, each holding a shard of the train split")] = 10,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration of the shards (small: non-IID)")] = 0.3,
    rounds: Annotated[int, typer.Option(min=1)] = 10,
    fraction: Annotated[float, typer.Option(help="fraction of the clients sampled each round")] = 1.0,
    strategy: Annotated[str, typer.Option(help="fedavg | fedprox (Flower's strategies)")] = "fedavg",
    proximal_mu: Annotated[float, typer.Option("--proximal-mu", help="fedprox: weight of the proximal term")] = 0.01,
    local_epochs: Annotated[int, typer.Option("--local-epochs", min=1, help="epochs a client runs each round")] = 1,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option(help="clients' SGD learning rate")] = 0.05,
    updates: Annotated[str, typer.Option(help="int8-topk (compressed, error feedback) | fp32 (Flower's default)")] = "int8-topk",
    top_k: Annotated[float, typer.Option("--top-k", help="int8-topk: fraction of each tensor's entries sent")] = 0.1,
    dp_epsilon: Annotated[
        Optional[float], typer.Option("--dp-epsilon", help="client-side DP (Flower's LocalDpMod): epsilon per round")
    ] = None,
    dp_delta: Annotated[float, typer.Option("--dp-delta", help="client-side DP: delta per round")] = 1e-5,
    dp_clip: Annotated[float, typer.Option("--dp-clip", help="client-side DP: L2 clipping norm of an update")] = 1.0,
    central_dp_noise: Annotated[
        Optional[float],
        typer.Option("--central-dp-noise", help="central DP (Flower's server-side fixed clipping): noise multiplier z"),
    ] = None,
    central_dp_clip: Annotated[
        float, typer.Option("--central-dp-clip", help="central DP: L2 bound the server clips each client's update to")
    ] = 1.0,
    central_dp_delta: Annotated[
        float, typer.Option("--central-dp-delta", help="central DP: delta of the epsilon reported")
    ] = 1e-5,
    secagg: Annotated[
        bool,
        typer.Option(
            "--secagg", help="secure aggregation (Flower's SecAgg+): the server only sees the sum; needs --updates fp32"
        ),
    ] = False,
    secagg_clip: Annotated[
        float, typer.Option("--secagg-clip", help="SecAgg+ clipping range: weights are clipped to [-r, r] and quantized")
    ] = 8.0,
    seed: Annotated[int, typer.Option("--seed", help="seed for the split, the shards and the initial weights")] = 0,
    flower_project: Annotated[
        Optional[Path],
        typer.Option("--flower-project", help="write a Flower project for `flwr run` on real SuperNodes instead of simulating"),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
) -> None:
    """Federated learning on Flower: N simulated clients with non-IID shards train the model (FedAvg or FedProx)
    and send compressed updates; the global model lands in OUT/model.safetensors for compress / optimize / package.

    Needs keiryo[federated] (Flower), which lives in its own environment: scripts/setup builds .venv-federated."""
    from keiryo.data.splits import DataSpec, parse_options
    from keiryo.privacy.federated import FederatedConfig, model_privacy, run_federated

    if updates not in ("int8-topk", "fp32"):
        raise ConfigError(f"--updates {updates!r}: expected int8-topk or fp32")
    dspec = DataSpec.parse({"source": data, "options": parse_options(data_opt), "seed": seed}, where="--data")
    cfg = FederatedConfig.parse(
        {
            "model": model,
            "model_options": parse_options(model_opt),
            "weights": str(weights) if weights else None,
            "data": dspec.model_dump(),
            "task": task,
            "task_options": parse_options(task_opt),
            "clients": clients,
            "alpha": alpha,
            "rounds": rounds,
            "fraction": fraction,
            "strategy": strategy,
            "proximal_mu": proximal_mu,
            "local_epochs": local_epochs,
            "batch_size": batch_size,
            "lr": lr,
            "compression": {"top_k": top_k} if updates == "int8-topk" else None,
            "dp": None if dp_epsilon is None else {"epsilon": dp_epsilon, "delta": dp_delta, "clipping_norm": dp_clip},
            "central_dp": None
            if central_dp_noise is None
            else {"noise_multiplier": central_dp_noise, "clipping_norm": central_dp_clip, "delta": central_dp_delta},
            "secagg": {"clipping_range": secagg_clip} if secagg else None,
            "seed": seed,
            "out": str(out.resolve()),
        },
        where="keiryo federate",
    )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out}: not empty; pass --overwrite to replace its model.safetensors and federated.json")
    from keiryo.cli.main import _console

    con = _console()
    if flower_project is not None:
        from keiryo.privacy._backend import require

        require("flwr", "Flower (keiryo federate; .venv-federated from scripts/setup)", "federated")
        from keiryo.privacy.flower_apps import write_flower_project

        where = write_flower_project(cfg, flower_project)
        con.print(
            f"Flower project: {where}\n  flower-superlink --insecure\n"
            f"  flower-supernode --insecure --superlink 127.0.0.1:9092 --clientappio-api-address 127.0.0.1:9094 "
            f'--node-config "partition-id=0 num-partitions={clients}"   (one per client, its own port and partition-id)\n'
            f"  flwr run {where} <superlink connection in $FLWR_HOME/config.toml, e.g. address 127.0.0.1:9093, insecure>"
            f" --stream",
            highlight=False,
        )
        return
    s = run_federated(cfg)
    metric = s["metric"]
    first = next((c for c in s["curve"] if c["round"] == 0), None)
    start = f" (from {first[metric]:.4g})" if first else ""
    con.print(
        f"{cfg.strategy} over {clients} clients (alpha {alpha:g}), {rounds} rounds in {s['seconds']:.0f}s: "
        f"test {metric} {s['test'][metric]:.4g}{start}",
        highlight=False,
    )
    ratio = s["fp32_bytes_per_client_round"] / s["upload_bytes_per_client_round"] if s["upload_bytes_per_client_round"] else 0
    wire = "SecAgg+: masked vector, keys and shares" if secagg else updates
    con.print(
        f"upload per client and round: {s['upload_bytes_per_client_round']:.0f} bytes ({wire}; fp32 weights "
        f"{s['fp32_bytes_per_client_round']:.0f} bytes, {ratio:.1f}x)",
        highlight=False,
    )
    for f in s["failures"]:
        con.print(f"round {f['round']}: client node {f['node']} failed ({f['reason']}); aggregated without it", highlight=False)
    rec = model_privacy(s)
    if rec is not None:
        from keiryo.privacy.dp import summary_line

        con.print(f"privacy: {summary_line(rec)}", highlight=False)
    mo = "".join(f" --model-opt {o}" for o in model_opt or [])
    con.print(
        f"global model: {out / 'model.safetensors'}  (next: keiryo compress --model {model}{mo} --weights "
        f"{out / 'model.safetensors'} --data {data} --recipe int8 --out DIR)",
        highlight=False,
    )
