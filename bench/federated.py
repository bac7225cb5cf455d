#!/usr/bin/env python
"""Federated figures (issue 15), side by side in one run: 20 simulated clients (Flower's simulation engine) with
non-IID digits shards (Dirichlet alpha 0.3), FedAvg with fp32 updates and with int8 + top-k updates (error
feedback), against centralized training of the same model: rounds to reach within 2 pt of centralized, bytes
uploaded per round, final accuracy.

Model: the zoo MLP (one hidden layer of 64) on digits 8x8. Runs in the federated environment:

    nice -n 5 .venv-federated/bin/python bench/federated.py        # ~6 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from keiryo.data import load_data
from keiryo.machine import cpu
from keiryo.model import load_model
from keiryo.privacy.federated import FederatedConfig, dirichlet_shards, run_federated, shard_keys
from keiryo.tasks import get_task
from keiryo.train import TrainConfig, train

MODEL, OPTIONS = "zoo:mlp", {"hidden": [64]}


def centralized(data, seeds: int, epochs: int) -> list[float]:
    accs = []
    for seed in range(seeds):
        h = load_model(MODEL, data, options=OPTIONS, seed=seed)
        task = get_task("classification").bind(h.output_names)
        res = train(
            h,
            data,
            task,
            TrainConfig(epochs=epochs, lr=1e-2, batch_size=64, patience=epochs, seed=seed, threads=1),
            progress=False,
        )
        accs.append(100 * res.test_metrics["accuracy"])
    return accs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--top-k", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=40, help="centralized training epochs")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of centralized training")
    ap.add_argument("--fed-seeds", type=int, default=3, help="seeds (shards and initial weights) of each federated run")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_all = time.perf_counter()
    data = load_data("digits")
    shards = dirichlet_shards(shard_keys(data.train), args.clients, args.alpha, seed=0)
    labels = shard_keys(data.train)
    classes = [len(np.unique(labels[s])) for s in shards]
    print(
        f"CPU: {cpu()}; digits train {len(data.train)}, test {len(data.test)}; {MODEL} {OPTIONS}\n"
        f"{args.clients} clients, Dirichlet alpha {args.alpha}: rows per client {min(map(len, shards))}..{max(map(len, shards))}, "
        f"classes per client {min(classes)}..{max(classes)} (mean {statistics.mean(classes):.1f})",
        flush=True,
    )
    t0 = time.perf_counter()
    cent = centralized(data, args.seeds, args.epochs)
    c_mean = statistics.mean(cent)
    print(
        f"centralized: {c_mean:.2f} ± {statistics.pstdev(cent):.2f} % ({args.seeds} seeds, {args.epochs} epochs, "
        f"{time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    rows: dict[str, list[tuple[dict, int | None]]] = {}
    with tempfile.TemporaryDirectory() as td:
        for name, comp in (("fp32", None), ("int8+top-k", {"top_k": args.top_k})):
            rows[name] = []
            for seed in range(args.fed_seeds):
                cfg = FederatedConfig.parse(
                    {
                        "model_options": OPTIONS,
                        "clients": args.clients,
                        "alpha": args.alpha,
                        "rounds": args.rounds,
                        "local_epochs": args.local_epochs,
                        "batch_size": 16,
                        "lr": 0.05,
                        "compression": comp,
                        "seed": seed,
                        "out": str(Path(td) / f"{name}-{seed}"),
                    }
                )
                t0 = time.perf_counter()
                s = run_federated(cfg)
                curve = [(c["round"], 100 * c["accuracy"]) for c in s["curve"]]
                reach = next((r for r, a in curve if a >= c_mean - 2), None)
                rows[name].append((s, reach))
                print(
                    f"{name:11s} seed {seed}: final {100 * s['test']['accuracy']:.2f} %, within 2 pt of centralized at round "
                    f"{reach if reach is not None else f'> {args.rounds}'}; upload per round {s['upload_bytes_per_round']:.0f} B "
                    f"({s['upload_bytes_per_client_round']:.0f} B per client, fp32 weights {s['fp32_bytes_per_client_round']:.0f} B); "
                    f"{time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
                print("  accuracy by round: " + " ".join(f"{r}:{a:.1f}" for r, a in curve if r % 5 == 0), flush=True)
    summary = {}
    for name, runs in rows.items():
        finals = [100 * s["test"]["accuracy"] for s, _ in runs]
        reach = [r for _, r in runs]
        per_round = statistics.mean(s["upload_bytes_per_round"] for s, _ in runs)
        summary[name] = (statistics.mean(finals), per_round)
        print(
            f"{name:11s} final {statistics.mean(finals):.2f} ± {statistics.pstdev(finals):.2f} % ({len(runs)} seeds); rounds to within "
            f"2 pt of centralized {reach}; {per_round:.0f} B uploaded per round ({args.clients} clients)"
        )
    ratio = summary["fp32"][1] / summary["int8+top-k"][1]
    drop = summary["fp32"][0] - summary["int8+top-k"][0]
    print(
        f"int8+top-k vs fp32 updates: {ratio:.1f}x fewer bytes per round, mean final accuracy {drop:+.2f} pt lower "
        f"(aim: >= 8x at <= 1 pt); whole run {time.perf_counter() - t_all:.0f}s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
