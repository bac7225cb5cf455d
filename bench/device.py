#!/usr/bin/env python
"""The training passes on an accelerator: the same fine-tune on CPU and on CUDA (mixed precision), side by side.

Trains zoo:text_encoder on generated token data for a few epochs with ``device=cpu`` and ``device=cuda``
(autocast bf16 where the GPU supports it, else fp16 with a gradient scaler) and prints the time per epoch
and the validation accuracy of each. Without a CUDA device it says so and exits 0: the CPU path is what CI
tests; this script is for a machine with a GPU.

    .venv/bin/python bench/device.py
"""

from __future__ import annotations

import argparse

import torch
from _checks import report

from keiryo.data import DataSpec, load_data
from keiryo.model import load_model
from keiryo.tasks import get_task
from keiryo.train import TrainConfig, train


def run(device: str, epochs: int) -> tuple[float, float, str]:
    data = load_data(DataSpec(source="tokens", options={"samples": 4000, "vocab": 2000, "seq": 64}, seed=0))
    h = load_model("zoo:text_encoder", data, output_name="logits", options={"vocab": 2000, "dim": 256, "layers": 4, "ffn": 1024})
    task = get_task("sequence-classification").bind(h.output_names)
    cfg = TrainConfig(epochs=epochs, lr=1e-3, batch_size=64, patience=epochs, device=device)  # type: ignore[arg-type]
    res = train(h, data, task, cfg, progress=False, description=f"train on {device}")
    return res.seconds / res.epochs_run, res.test_metrics["accuracy"], res.device


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here (torch.cuda.is_available() is False): nothing to compare; the CPU path is tested in CI")
        return 0
    cpu_s, cpu_acc, _ = run("cpu", args.epochs)
    gpu_s, gpu_acc, dev = run("cuda", args.epochs)
    name = torch.cuda.get_device_name(0)
    print(f"cpu : {cpu_s:7.2f} s/epoch, test accuracy {cpu_acc:.2%}")
    print(f"cuda: {gpu_s:7.2f} s/epoch, test accuracy {gpu_acc:.2%} ({name}, bf16 {torch.cuda.is_bf16_supported()})")
    checks = [
        ("trained on the GPU", dev.startswith("cuda"), dev),
        (
            "mixed-precision accuracy within 3 pt of fp32 CPU",
            abs(gpu_acc - cpu_acc) <= 0.03,
            f"{(gpu_acc - cpu_acc) * 100:+.2f} pt",
        ),
        ("faster per epoch than the CPU", gpu_s < cpu_s, f"{cpu_s / gpu_s:.1f}x"),
    ]
    return report(checks, name)


if __name__ == "__main__":
    raise SystemExit(main())
