#!/usr/bin/env python
"""Privacy figures (issue 15), side by side in one run: DP-SGD accuracy at epsilon 3 and 8 (delta 1e-5) against
non-DP training on the same schedule (mean of 3 seeds), time per epoch, and the DP model then int8 (calibrated
on the private calibration split, and on synthetic inputs that the DP guarantee still covers).

Model: the zoo MLP (one hidden layer of 64) on digits 8x8, 30 epochs, batch 256, lr 0.05, clipping norm 0.5
(the same schedule with and without DP). One thread, so the time per epoch compares like with like.

With --pretrain: the demo's MobileNetV2 family (width 0.25, GroupNorm, 139 k parameters, digits 8x8) pretrained
without DP on public font-digits (rendered from fonts), then fine-tuned on the private digits with and without DP
(lr 0.01); int8 calibrated on the private split and on the public font-digits.

    nice -n 5 .venv/bin/python bench/privacy.py            # ~6 min on 2 shared cores
    nice -n 5 .venv/bin/python bench/privacy.py --timing   # time per epoch only, DP against non-DP (~30 s)
    .venv/bin/python bench/privacy.py --pretrain           # ~35 min
    .venv/bin/python bench/privacy.py --pretrain --timing --epochs 5 --modes ghost
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from keiryo.benchmark import BenchConfig
from keiryo.data import load_data
from keiryo.data.splits import DataSpec, MemorySplit
from keiryo.machine import cpu
from keiryo.model import load_model
from keiryo.pipeline import RunOptions, compress, load_recipe
from keiryo.privacy.dp import DPConfig, noise_multiplier_for
from keiryo.tasks import get_task
from keiryo.train import TrainConfig, train

MODEL, OPTIONS = "zoo:mlp", {"hidden": [64]}
# --pretrain: the demo's MobileNetV2 family, narrowed (139 k parameters), GroupNorm where the demo has BatchNorm,
# pretrained on public digits rendered from fonts, then fine-tuned on the private digits (8x8)
CNN, CNN_OPTIONS = "zoo:mobilenetv2", {"width": 0.25, "last_channel": 64}
PUBLIC = DataSpec(source="font-digits", options={"samples": 20000})


def pretrain(data, model: str, options: dict, epochs: int):
    """Public pretraining: ``model`` with the layers DP-SGD needs (``keiryo train --dp-ready``) trained without DP
    on digits rendered from fonts (public, generated). (weights, public splits, zero-shot accuracy on the private
    test split, seconds)."""
    from keiryo.privacy.dp import make_dp_ready
    from keiryo.train import evaluate_torch

    public = load_data(PUBLIC)
    h = load_model(model, data, options=options, seed=0, output_name="logits")
    make_dp_ready(h)
    task = get_task("classification").bind(h.output_names)
    cfg = TrainConfig(epochs=epochs, lr=0.01, batch_size=128, patience=epochs, seed=0, threads=2)
    res = train(h, public, task, cfg, progress=False)
    zero_shot = evaluate_torch(h, data.test, task)["accuracy"]
    return {k: v.clone() for k, v in h.module.state_dict().items()}, public, zero_shot, res.seconds


def run(
    data,
    seed: int,
    epsilon: float | None,
    epochs: int,
    model: str = MODEL,
    options: dict | None = None,
    lr: float = 0.05,
    start: dict | None = None,
):
    """(model, result, seconds per epoch of training: the one-off noise calibration of a DP run is not counted).
    ``start``: pretrained weights of the DP-ready model (public pretraining) to fine-tune from."""
    h = load_model(model, data, options=OPTIONS if options is None else options, seed=seed, output_name="logits")
    if start is not None:
        from keiryo.privacy.dp import make_dp_ready

        make_dp_ready(h)
        h.module.load_state_dict(start)
    task = get_task("classification").bind(h.output_names)
    dp = DPConfig(target_epsilon=epsilon, delta=1e-5, max_grad_norm=0.5) if epsilon else None
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=256, patience=epochs, seed=seed, threads=1, dp=dp)
    calibration = 0.0
    if dp is not None:  # the noise search (PRV accountant) runs once per run, before the first step: time it apart
        batches = -(-len(data.train) // 256)
        t0 = time.perf_counter()
        noise_multiplier_for(dp, 1 / batches, epochs * batches, 1e-5, "bench")
        calibration = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = train(h, data, task, cfg, progress=False)
    return h, res, (time.perf_counter() - t0 - calibration) / res.epochs_run


def int8_accuracy(h, data, calib: MemorySplit, out: Path) -> tuple[float, float]:
    """(fp32 ONNX accuracy, int8 static accuracy), both measured on onnxruntime."""
    d = dataclasses.replace(data, calib=calib)
    opts = RunOptions(bench=BenchConfig(iterations=10, warmup=2, throughput_iterations=2), progress=False)
    res = compress(h, d, [load_recipe("int8")], out, opts=opts, overwrite=True)
    by = {c["name"]: c["metrics"]["accuracy"] for c in res["candidates"] if c.get("status") == "ok"}
    return by["fp32"], by["int8"]


def epoch_times(
    data,
    epochs: int,
    batch_size: int = 256,
    options: dict | None = None,
    model: str = MODEL,
    modes: tuple[str, ...] = ("hooks", "ghost"),
    same_layers: bool = False,
) -> None:
    """Time per epoch, DP (ε = 8) against non-DP on the same schedule, measured inside the epoch loop (the one-off
    noise search and the final ε accounting are not epochs), epochs of the two interleaved so machine drift hits
    both alike; the DP step split into its parts: data (Poisson sampling), forward, backward with Opacus's
    per-sample gradients, and the optimizer step (per-sample clipping and noise). Medians over ``epochs``.
    ``same_layers``: the non-DP model has the DP model's layers (GroupNorm for BatchNorm), as after --dp-ready."""
    from keiryo.model.io import call_module, flatten_outputs
    from keiryo.privacy.dp import make_private, prepare_module
    from keiryo.train import evaluate_torch

    def setup(mode: str | None):
        h = load_model(model, data, options=OPTIONS if options is None else options, seed=0, output_name="logits")
        task = get_task("classification").bind(h.output_names)
        if mode is None and same_layers:  # the non-DP run on the DP model's layers (GroupNorm), as --pretrain trains it
            h.module, _ = prepare_module(h.module)
        opt = torch.optim.AdamW(h.module.parameters(), lr=0.05)
        if mode is None:
            return h, task, opt, None
        cfg = DPConfig(target_epsilon=8, delta=1e-5, max_grad_norm=0.5, accountant="rdp", grad_sample_mode=mode)
        h.module, conv = prepare_module(h.module, cfg.small_groups)
        opt = torch.optim.AdamW(h.module.parameters(), lr=0.05)
        return (
            h,
            task,
            opt,
            make_private(h.module, opt, data.train, batch_size, epochs + 2, cfg, 0, conv, task.loss, task.sample_losses),
        )

    def epoch(h, task, opt, run, parts: list[float]) -> tuple[float, float]:
        """(seconds of the training steps, seconds of the whole epoch: steps + validation metrics)."""
        module = run.module if run else h.module
        opt = run.optimizer if run else opt
        gen = torch.Generator().manual_seed(0)
        batches = run.loader if run else data.train.batches(batch_size, shuffle=True, generator=gen)
        module.train()
        t0 = t = time.perf_counter()
        for x, y in batches:
            t1 = time.perf_counter()
            outs, _ = flatten_outputs(call_module(module, x, h.input_names))
            loss = (run.criterion if run and run.criterion else task.loss)(outs, task.targets(y))
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.perf_counter()
            opt.step()
            t4 = time.perf_counter()
            for i, d in enumerate((t1 - t, t2 - t1, t3 - t2, t4 - t3)):
                parts[i] += d
            t = t4
        steps = time.perf_counter() - t0
        module.eval()
        evaluate_torch(h, data.val, task)
        return steps, time.perf_counter() - t0

    runs = {"non-DP": setup(None), **{f"DP ({m})": setup(m) for m in modes}}
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    parts = {k: [0.0] * 4 for k in runs}
    for i in range(epochs + 2):
        for name, s in runs.items():
            r = epoch(*s, parts[name])
            if i >= 2:  # two warm-up epochs each
                rows[name].append(r)
    med = {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v)) for k, v in rows.items()}
    base = med["non-DP"]
    for k in rows:
        p = ", ".join(
            f"{n} {1000 * x / (epochs + 2):.1f}" for n, x in zip(("data", "forward", "backward", "step"), parts[k], strict=True)
        )
        print(
            f"{k:10s} training steps {1000 * med[k][0]:.1f} ms/epoch ({med[k][0] / base[0]:.2f}x; {p} ms), "
            f"epoch with validation {1000 * med[k][1]:.1f} ms ({med[k][1] / base[1]:.2f}x)"
        )
    print(f"(median of {epochs} interleaved epochs, batch {batch_size}; parts are means per epoch)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--timing", action="store_true", help="only the time per epoch, DP against non-DP (~30 s)")
    ap.add_argument("--batch-size", type=int, default=256, help="--timing: batch size")
    ap.add_argument("--hidden", type=int, default=64, help="--timing: width of the MLP's hidden layer")
    ap.add_argument("--model", default=MODEL, help="--timing: zoo model (zoo:mlp, or zoo:mobilenetv2: the demo's CNN)")
    ap.add_argument(
        "--options",
        default=None,
        help='JSON options of a zoo --model (the demo\'s: none; a narrower variant: \'{"width": 0.35, "last_channel": 128}\')',
    )
    ap.add_argument("--lr", type=float, default=None, help="learning rate (AdamW), DP and non-DP alike (0.05; --pretrain 0.01)")
    ap.add_argument(
        "--pretrain",
        action="store_true",
        help="the demo's CNN family (GroupNorm, 139 k parameters, digits 8x8) pretrained on public font-digits, then "
        "fine-tuned with and without DP (with --timing: that model's time per epoch)",
    )
    ap.add_argument("--pretrain-epochs", type=int, default=8, help="--pretrain: epochs on the public data")
    ap.add_argument("--modes", default="hooks,ghost", help="--timing: Opacus modes timed against non-DP (hooks, ghost)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_data("digits")
    extra = json.loads(args.options) if args.options else {}
    model = CNN if args.pretrain else args.model
    if model != MODEL and not args.pretrain:  # the demo's CNN on the demo's data (digits at 16x16)
        from keiryo.demo import DEMO_DATA

        data = load_data(DEMO_DATA)
    lr = args.lr if args.lr is not None else 0.01 if args.pretrain else 0.05
    if args.timing:
        options = {"hidden": [args.hidden]} if model == MODEL else extra or (CNN_OPTIONS if args.pretrain else {})
        print(f"CPU: {cpu()}; digits train {len(data.train)}; {model} {options}; one torch thread")
        epoch_times(data, args.epochs, args.batch_size, options, model, tuple(args.modes.split(",")), args.pretrain)
        return 0
    options = OPTIONS if model == MODEL else extra or (CNN_OPTIONS if args.pretrain else {})
    print(
        f"CPU: {cpu()}; digits train {len(data.train)}, test {len(data.test)}; {model} {options}, {args.epochs} epochs, lr {lr}",
        flush=True,
    )
    start = public = None
    if args.pretrain:
        start, public, zero_shot, secs = pretrain(data, model, options, args.pretrain_epochs)
        print(
            f"public pretraining: {len(public.train)} font-digits, {args.pretrain_epochs} epochs, {secs:.0f} s (2 threads); "
            f"zero-shot accuracy on the private test split {100 * zero_shot:.2f} %",
            flush=True,
        )
    rows = {}
    keep = {}
    for eps in (None, 8.0, 3.0):
        accs, times, eps_spent = [], [], []
        for seed in range(args.seeds):
            h, res, per_epoch = run(data, seed, eps, args.epochs, model, options, lr, start)
            accs.append(100 * res.test_metrics["accuracy"])
            print(f"  eps={eps} seed {seed}: {accs[-1]:.2f} %, {per_epoch:.2f} s/epoch", flush=True)
            times.append(per_epoch)
            if res.privacy:
                eps_spent.append(res.privacy["epsilon"])
            if seed == 0:
                keep[eps] = (h, res)
        name = "non-DP" if eps is None else f"DP eps={eps:g}"
        rows[eps] = (statistics.mean(accs), statistics.pstdev(accs), statistics.mean(times))
        spent = f", epsilon spent {statistics.mean(eps_spent):.3f} (PRV)" if eps_spent else ""
        print(
            f"{name:12s} accuracy {rows[eps][0]:.2f} ± {rows[eps][1]:.2f} % ({args.seeds} seeds), {rows[eps][2]:.3f} s/epoch{spent}",
            flush=True,
        )
    base = rows[None]
    for eps in (8.0, 3.0):
        p = keep[eps][1].privacy
        print(
            f"  eps={eps:g}: {base[0] - rows[eps][0]:+.2f} pt below non-DP, time/epoch {rows[eps][2] / base[2]:.2f}x; "
            f"noise {p['noise_multiplier']:.3f}, sampling rate {p['sample_rate']:.3f}, {p['steps']} steps, RDP eps {p['epsilon_by_accountant']['rdp']}"
        )
    h8 = keep[8.0][0]
    g = torch.Generator().manual_seed(0)
    synthetic = MemorySplit({"image": torch.rand((256, *data.calib.inputs["image"].shape[1:]), generator=g)}, None)
    other, what = (public.calib, "the public font-digits") if public is not None else (synthetic, "synthetic uniform inputs")
    with tempfile.TemporaryDirectory() as td:
        fp32, priv = int8_accuracy(h8, data, data.calib, Path(td) / "private")
        _, syn = int8_accuracy(h8, data, other, Path(td) / "public")
    print(
        f"DP eps=8 (seed 0) then int8: fp32 ONNX {100 * fp32:.2f} %, int8 calibrated on private data {100 * priv:.2f} % "
        f"({100 * (priv - fp32):+.2f} pt; not covered by the DP guarantee), on {what} {100 * syn:.2f} % "
        f"({100 * (syn - fp32):+.2f} pt; covered)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
